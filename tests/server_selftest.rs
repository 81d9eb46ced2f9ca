//! Tests of the loopback test server itself (tests/support/server.rs), with real HTTP
//! clients: reqwest on tokio, ureq on plain threads, and smol for the async waits.

#[path = "support/server.rs"]
mod server;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use server::{ServerConfig, TestServer};

const LIMIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ helpers

/// Runs an async test body under a timeout.
async fn timed<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

/// Runs a blocking test body on its own thread under a timeout; re-raises its panic.
fn timed_blocking(f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(()) => t.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(t.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("timed out"),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// The string value of `"key":"value"` in a flat JSON object.
fn field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = json[start..].find('"')?;
    Some(json[start..start + len].to_owned())
}

fn form(rt: &str) -> String {
    format!("grant_type=refresh_token&refresh_token={rt}")
}

/// GET `path` with a bearer token: (status, WWW-Authenticate).
async fn get(s: &TestServer, path: &str, at: &str) -> (u16, Option<String>) {
    let r = client()
        .get(s.url(path))
        .bearer_auth(at)
        .send()
        .await
        .unwrap();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), www)
}

/// POST /token: (status, body).
async fn refresh(s: &TestServer, rt: &str) -> (u16, String) {
    let r = client()
        .post(s.url("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(rt))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The `name=value` of the Set-Cookie header for `name`, and the whole header.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<(String, String)> {
    r.headers().get_all("set-cookie").iter().find_map(|v| {
        let v = v.to_str().unwrap();
        let value = v.split(';').next()?.strip_prefix(&format!("{name}="))?;
        Some((value.to_owned(), v.to_owned()))
    })
}

const INVALID: &str = r#"Bearer error="invalid_token""#;

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_expired_rotation_and_reuse_with_reqwest() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (at, rt) = s.initial_tokens();
        assert_eq!(get(&s, "/resource", &at).await, (200, None));
        assert_eq!(get(&s, "/resource/a/b", &at).await.0, 200);

        s.expire_access_tokens();
        assert_eq!(get(&s, "/resource", &at).await, (401, Some(INVALID.into())));

        let (status, body) = refresh(&s, &rt).await;
        assert_eq!(status, 200, "{body}");
        let at2 = field(&body, "access_token").unwrap();
        let rt2 = field(&body, "refresh_token").unwrap();
        assert_eq!(field(&body, "token_type").as_deref(), Some("Bearer"));
        assert!(body.contains(r#""expires_in":3600"#), "{body}");
        assert!(at2 != at && rt2 != rt);
        assert_eq!(get(&s, "/resource", &at2).await.0, 200);
        assert_eq!((s.refresh_calls(), s.successful_refreshes()), (1, 1));

        // The old refresh token again: reuse detection revokes the session.
        let (status, body) = refresh(&s, &rt).await;
        assert_eq!(status, 400);
        assert_eq!(field(&body, "error").as_deref(), Some("invalid_grant"));
        assert_eq!(s.reuse_detections(), 1);
        assert_eq!(
            get(&s, "/resource", &at2).await,
            (401, Some(INVALID.into()))
        );
        assert_eq!(
            refresh(&s, &rt2).await.0,
            400,
            "current refresh token revoked too"
        );
        assert_eq!(s.reuse_detections(), 1, "a revoked token is not a reuse");
        assert_eq!(refresh(&s, "no-such-token").await.0, 400);

        let c = s.counters();
        assert_eq!(
            (c.resource_ok, c.resource_unauthorized, c.arrivals),
            (3, 2, 5)
        );
        assert_eq!((c.refresh_calls, c.successful_refreshes), (4, 1));
        assert_eq!(c.requests_total, 9);
        assert_eq!(s.hits("/token"), 4);
    })
    .await;
}

#[test]
fn ureq_from_a_plain_thread() {
    let s = TestServer::start(ServerConfig::default());
    timed_blocking(move || {
        let a = agent();
        let (at, rt) = s.initial_tokens();
        let get = |at: &str| {
            let r = a
                .get(s.url("/resource"))
                .header("Authorization", format!("Bearer {at}"));
            let r = r.call().unwrap();
            let www = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), www)
        };
        assert_eq!(get(&at), (200, None));
        s.expire_access_tokens();
        assert_eq!(get(&at), (401, Some(INVALID.into())));

        let mut r = a
            .post(s.url("/token"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send(form(&rt))
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let body = r.body_mut().read_to_string().unwrap();
        let at2 = field(&body, "access_token").unwrap();
        assert_eq!(get(&at2), (200, None));
        // Blocking gate: both resource requests and the refresh have been counted.
        assert!(s.wait_for_arrivals(3, LIMIT));
        assert!(s.wait_for_refresh_calls(1, LIMIT));
        assert!(
            !s.wait_for_arrivals(4, Duration::from_millis(50)),
            "times out"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_401_is_sent_after_the_delay_even_if_a_refresh_completed_meanwhile() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (at, rt) = s.initial_tokens();
        s.expire_access_tokens();
        let delay = Duration::from_millis(1500);
        s.set_unauthorized_delay(delay);

        let sent = Instant::now();
        let late = tokio::spawn(get_owned(s.url("/resource"), at));
        assert!(
            s.wait_for_arrivals_async(1, LIMIT).await,
            "old-token request arrived"
        );
        assert_eq!(s.resource_unauthorized(), 1, "verdict taken on arrival");

        let (status, body) = refresh(&s, &rt).await;
        assert_eq!(status, 200);
        let at2 = field(&body, "access_token").unwrap();
        assert_eq!(
            get(&s, "/resource", &at2).await.0,
            200,
            "200s are not delayed"
        );
        assert!(
            !late.is_finished(),
            "the refresh completed before the 401 was sent"
        );

        let (status, www) = late.await.unwrap();
        assert_eq!((status, www.as_deref()), (401, Some(INVALID)));
        assert!(sent.elapsed() >= delay);
    })
    .await;
}

async fn get_owned(url: String, at: String) -> (u16, Option<String>) {
    let r = client().get(url).bearer_auth(at).send().await.unwrap();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), www)
}

#[tokio::test]
async fn injected_failure_and_rejection_do_not_rotate() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (_, rt) = s.initial_tokens();

        s.fail_refresh_with(Some(503));
        let (status, body) = refresh(&s, &rt).await;
        assert_eq!(status, 503);
        assert_eq!(
            field(&body, "error").as_deref(),
            Some("temporarily_unavailable")
        );
        assert_eq!(refresh(&s, &rt).await.0, 503);
        s.fail_refresh_with(None);

        s.reject_refresh(true);
        let (status, body) = refresh(&s, &rt).await;
        assert_eq!(
            (status, field(&body, "error").as_deref()),
            (400, Some("invalid_grant"))
        );
        s.reject_refresh(false);

        // Nothing was rotated: the same refresh token still works, once.
        assert_eq!((s.refresh_calls(), s.successful_refreshes()), (3, 0));
        assert_eq!(refresh(&s, &rt).await.0, 200);
        assert_eq!((s.successful_refreshes(), s.reuse_detections()), (1, 0));
    })
    .await;
}

#[tokio::test]
async fn cookie_mode_rotates_via_set_cookie() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (at, rt) = s.initial_tokens();
        let c = client();
        let get = |cookie: String| c.get(s.url("/resource")).header("cookie", cookie).send();
        assert_eq!(get(format!("access={at}")).await.unwrap().status(), 200);
        s.expire_access_tokens();
        let r = get(format!("theme=dark; access={at}; refresh={rt}"))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);

        let post = |rt: &str| {
            c.post(s.url("/cookie/refresh"))
                .header("cookie", format!("refresh={rt}"))
                .send()
        };
        let r = post(&rt).await.unwrap();
        assert_eq!(r.status(), 200);
        let (at2, access_header) = set_cookie(&r, "access").unwrap();
        let (rt2, refresh_header) = set_cookie(&r, "refresh").unwrap();
        assert_eq!(access_header, format!("access={at2}; HttpOnly; Path=/"));
        assert_eq!(refresh_header, format!("refresh={rt2}; HttpOnly; Path=/"));
        assert!(at2 != at && rt2 != rt);
        assert_eq!(get(format!("access={at2}")).await.unwrap().status(), 200);
        // The bearer header and the cookie name the same tokens.
        assert_eq!(get_owned(s.url("/resource"), at2.clone()).await.0, 200);

        // Reuse of the old refresh cookie: session revoked, cookies cleared.
        let r = post(&rt).await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(set_cookie(&r, "access").unwrap().0, "");
        assert_eq!(s.reuse_detections(), 1);
        assert_eq!(get(format!("access={at2}")).await.unwrap().status(), 401);
        // No cookie at all.
        let r = c.post(s.url("/cookie/refresh")).send().await.unwrap();
        assert_eq!(r.status(), 400);
    })
    .await;
}

#[tokio::test]
async fn fixed_endpoints_and_bad_requests() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (at, _) = s.initial_tokens();
        assert_eq!(
            get(&s, "/always401", &at).await,
            (401, Some(INVALID.into()))
        );
        assert_eq!(get(&s, "/forbidden", &at).await, (403, None));
        let scope = r#"Bearer error="insufficient_scope""#;
        assert_eq!(get(&s, "/scope", &at).await, (401, Some(scope.into())));
        assert_eq!(get(&s, "/nowhere", &at).await.0, 404);
        let r = client().get(s.url("/resource")).send().await.unwrap();
        assert_eq!(r.status(), 401, "no token");
        let r = client().get(s.url("/token")).send().await.unwrap();
        assert_eq!(r.status(), 405);
        let r = client()
            .post(s.url("/token"))
            .body("grant_type=password")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            field(&r.text().await.unwrap(), "error").as_deref(),
            Some("invalid_request")
        );
        assert_eq!(s.hits("/always401"), 1);
        assert_eq!(s.arrivals(), 4, "404s are not protected requests");
    })
    .await;
}

#[tokio::test]
async fn form_values_are_percent_decoded() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (_, rt) = s.initial_tokens();
        let encoded: String = rt.bytes().map(|b| format!("%{b:02X}")).collect();
        let r = client()
            .post(s.url("/token"))
            .body(format!(
                "refresh_token={encoded}&grant_type=refresh%5Ftoken"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn revoke_and_sign_in_new_session() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (at, rt) = s.session();
        s.revoke_session();
        assert_eq!(get(&s, "/resource", &at).await.0, 401);
        assert_eq!(refresh(&s, &rt).await.0, 400);
        let (at2, rt2) = s.sign_in_new_session();
        assert_eq!(get(&s, "/resource", &at2).await.0, 200);
        assert_eq!(refresh(&s, &rt2).await.0, 200);
        assert_eq!(s.reuse_detections(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_refreshes_with_one_token_trip_reuse_detection() {
    timed(async {
        let s = TestServer::start(ServerConfig {
            refresh_latency: Duration::from_millis(100),
            ..ServerConfig::default()
        });
        let (_, rt) = s.initial_tokens();
        let (a, b) = tokio::join!(refresh(&s, &rt), refresh(&s, &rt));
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(statuses, [200, 400]);
        assert_eq!(s.reuse_detections(), 1);
        let winner = if a.0 == 200 { a.1 } else { b.1 };
        let at = field(&winner, "access_token").unwrap();
        assert_eq!(
            get(&s, "/resource", &at).await.0,
            401,
            "the whole session is revoked"
        );
    })
    .await;
}

#[tokio::test]
async fn revoke_old_access_on_refresh_and_short_expiry() {
    timed(async {
        let s = TestServer::start(ServerConfig {
            revoke_old_access_on_refresh: true,
            expires_in: Duration::from_millis(300),
            ..ServerConfig::default()
        });
        let (at, rt) = s.initial_tokens();
        let (_, body) = refresh(&s, &rt).await;
        assert!(body.contains(r#""expires_in":0"#), "whole seconds: {body}");
        assert_eq!(
            get(&s, "/resource", &at).await.0,
            401,
            "old access token revoked"
        );
        let at2 = field(&body, "access_token").unwrap();
        assert_eq!(get(&s, "/resource", &at2).await.0, 200);
        tokio::time::sleep(Duration::from_millis(400)).await; // real expiry, by the clock
        assert_eq!(get(&s, "/resource", &at2).await.0, 401);
        s.set_expires_in(Duration::from_secs(60));
        let (_, body) = refresh(&s, &field(&body, "refresh_token").unwrap()).await;
        assert!(body.contains(r#""expires_in":60"#), "{body}");
    })
    .await;
}

#[test]
fn async_waits_work_on_smol() {
    let s = TestServer::start(ServerConfig::default());
    let (at, _) = s.initial_tokens();
    let url = s.url("/resource");
    smol::block_on(async {
        assert!(
            !s.wait_for_arrivals_async(1, Duration::from_millis(50))
                .await,
            "times out"
        );
        let req = smol::unblock(move || {
            agent()
                .get(url)
                .header("Authorization", format!("Bearer {at}"))
                .call()
        });
        assert!(s.wait_for_arrivals_async(1, LIMIT).await);
        assert_eq!(req.await.unwrap().status().as_u16(), 200);
        assert!(s.wait_until_async(|c| c.resource_ok == 1, LIMIT).await);
    });
}

#[test]
fn drop_stops_the_server_promptly_even_with_open_connections() {
    timed_blocking(|| {
        let s = TestServer::start(ServerConfig::default());
        let addr = s.addr();
        // A keep-alive connection, left open, and a request parked in a long 401 delay.
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = conn.read(&mut buf).unwrap();
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .starts_with("HTTP/1.1 404")
        );
        s.set_unauthorized_delay(Duration::from_secs(3600));
        let mut parked = std::net::TcpStream::connect(addr).unwrap();
        parked
            .write_all(b"GET /always401 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert!(s.wait_for_arrivals(1, LIMIT));

        let started = Instant::now();
        drop(s);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "listener closed"
        );
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            matches!(conn.read(&mut buf), Ok(0) | Err(_)),
            "connection closed"
        );
        parked
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            matches!(parked.read(&mut buf), Ok(0) | Err(_)),
            "parked request dropped"
        );
    });
}

// ------------------------------------------------------------- scale-out modes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_grace_accepts_the_previous_refresh_token_once() {
    timed(async {
        let s = TestServer::start(ServerConfig {
            reuse_grace: Duration::from_secs(30),
            ..ServerConfig::default()
        });
        let (_, rt0) = s.initial_tokens();
        let (status, first) = refresh(&s, &rt0).await;
        assert_eq!(status, 200);
        // The previous token once more, within the grace: accepted, not reuse.
        let (status, again) = refresh(&s, &rt0).await;
        assert_eq!(status, 200, "{again}");
        assert_ne!(
            field(&again, "refresh_token"),
            field(&first, "refresh_token")
        );
        let c = s.counters();
        assert_eq!(
            (c.grace_reuses, c.reuse_detections, c.successful_refreshes),
            (1, 0, 2)
        );
        // A third presentation is reuse.
        let (status, _) = refresh(&s, &rt0).await;
        assert_eq!(status, 400);
        assert_eq!((s.grace_reuses(), s.reuse_detections()), (1, 1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_grace_is_for_the_previous_token_within_the_grace_only() {
    timed(async {
        let s = TestServer::start(ServerConfig::default());
        let (_, rt0) = s.initial_tokens();
        let (_, first) = refresh(&s, &rt0).await;
        let rt1 = field(&first, "refresh_token").unwrap();
        let (status, _) = refresh(&s, &rt1).await;
        assert_eq!(status, 200);
        // rt0 is no longer the previous token: reuse, even with a grace set now.
        s.set_reuse_grace(Duration::from_secs(30));
        let (status, _) = refresh(&s, &rt0).await;
        assert_eq!(status, 400);
        assert_eq!((s.grace_reuses(), s.reuse_detections()), (0, 1));

        // Without a grace, the previous token is reuse at once.
        let s = TestServer::start(ServerConfig::default());
        let (_, rt0) = s.initial_tokens();
        refresh(&s, &rt0).await;
        let (status, _) = refresh(&s, &rt0).await;
        assert_eq!(status, 400);
        assert_eq!((s.grace_reuses(), s.reuse_detections()), (0, 1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_mode_rotates_on_arrival_and_holds_the_response() {
    timed(async {
        let s = TestServer::start(ServerConfig {
            refresh_latency: Duration::from_secs(3600),
            ..ServerConfig::default()
        });
        s.hold_refresh_responses(true);
        let (_, rt0) = s.initial_tokens();
        let url = s.url("/token");
        let body = form(&rt0);
        let held = tokio::spawn(async move {
            client()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        // Rotated on arrival (the hour of latency is skipped), response held.
        assert!(s.wait_until_async(|c| c.held_responses == 1, LIMIT).await);
        assert_eq!(s.successful_refreshes(), 1);
        assert!(!held.is_finished());
        s.release_held_responses();
        let body = held.await.unwrap();
        assert!(field(&body, "refresh_token").is_some(), "{body}");

        // A client that goes away while held loses the new token for good.
        let url = s.url("/token");
        let rt1 = field(&body, "refresh_token").unwrap();
        let body = form(&rt1);
        let lost = tokio::spawn(async move {
            client()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
        });
        assert!(s.wait_until_async(|c| c.held_responses == 2, LIMIT).await);
        lost.abort();
        let _ = lost.await;
        s.hold_refresh_responses(false);
        s.set_refresh_latency(Duration::ZERO);
        let (status, _) = refresh(&s, &rt1).await;
        assert_eq!(status, 400, "rt1 was rotated on arrival");
        assert_eq!((s.successful_refreshes(), s.reuse_detections()), (2, 1));
    })
    .await
}
