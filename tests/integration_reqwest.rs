//! `auth::AuthMiddleware` in a `reqwest_middleware` client, against the
//! loopback OAuth-style server with rotating refresh tokens
//! (tests/support/server.rs).
//!
//! The chain under test is `AuthMiddleware → Hold → reqwest::Client`. `Hold`
//! is a test middleware that holds a request before it is sent, or its
//! response before it is returned, until a gate opens (by middleware
//! extension): the interleavings are forced with it and with the server's
//! arrival counts, never with sleeps. Every test runs under
//! `common::with_timeout`.
#![cfg(feature = "reqwest")]

#[path = "support/server.rs"]
mod server;

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::{Gate, Rt, until};
use epochflight::auth::{
    AuthError, AuthMiddleware, NotReplayed, NotReplayedReason, RefreshError, SkipAuth,
    TokenManager, Unauthorized,
};
use http::Extensions;
use http_body_util::StreamBody;
use hyper::body::Frame;
use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{Body, Request, Response, StatusCode};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use server::{ServerConfig, TestServer};

type Manager = Arc<TokenManager<String, String>>;

/// How long the server holds a late 401: far longer than a refresh and a
/// replay on loopback, so the test can assert the order it claims.
const LATE: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ helpers

/// Middleware extension: hold the request before sending it until the gate opens.
#[derive(Clone)]
struct HoldBeforeSend(Arc<Gate>);

/// Middleware extension: hold the response until the gate opens.
#[derive(Clone)]
struct HoldResponse(Arc<Gate>);

/// A test middleware after the auth middleware: counts the requests that
/// reached it (they have passed the request gate and carry their token) and
/// holds them as their extensions say.
#[derive(Clone, Default)]
struct Hold {
    reached: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Middleware for Hold {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        self.reached.fetch_add(1, Ordering::SeqCst);
        if let Some(HoldBeforeSend(gate)) = extensions.get::<HoldBeforeSend>().cloned() {
            gate.wait().await;
        }
        let after = extensions.get::<HoldResponse>().cloned();
        let response = next.run(request, extensions).await;
        if let Some(HoldResponse(gate)) = after {
            gate.wait().await;
        }
        response
    }
}

fn plain_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn client_with(
    http: reqwest::Client,
    auth: AuthMiddleware<impl Clone + Send + Sync + 'static, String>,
    hold: &Hold,
) -> ClientWithMiddleware {
    ClientBuilder::new(http)
        .with(auth)
        .with(hold.clone())
        .build()
}

/// The string value of `"field":"..."` in a flat JSON object.
fn json_field(json: &str, field: &str) -> String {
    let key = format!("\"{field}\":\"");
    let start = json.find(&key).map_or(json.len(), |i| i + key.len());
    let end = json[start..].find('"').map_or(json.len(), |i| start + i);
    json[start..end].to_string()
}

/// The refresh token the manager's refresher presents next.
type RefreshSlot = Arc<std::sync::Mutex<String>>;

/// `POST /token` through `client`, marked with `SkipAuth`; stores the rotated
/// refresh token in `slot` and returns the access token.
async fn post_token(
    client: ClientWithMiddleware,
    url: String,
    slot: RefreshSlot,
) -> Result<String, RefreshError<String>> {
    let refresh = slot.lock().unwrap().clone();
    let transient = |e: String| RefreshError::Transient(e);
    let response = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=refresh_token&refresh_token={refresh}"))
        .with_extension(SkipAuth)
        .send()
        .await
        .map_err(|e| transient(e.to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| transient(e.to_string()))?;
    match status.as_u16() {
        200 => {
            *slot.lock().unwrap() = json_field(&text, "refresh_token");
            Ok(json_field(&text, "access_token"))
        }
        400..=499 => Err(RefreshError::Rejected(text)),
        _ => Err(transient(text)),
    }
}

/// A manager of bearer access tokens, signed in with `access`, whose
/// refresher posts `refresh` (rotated in place) through the client that
/// `client` will hold once built.
fn manager(
    server: &TestServer,
    client: Arc<OnceLock<ClientWithMiddleware>>,
    access: String,
    refresh: String,
) -> Manager {
    let url = server.url("/token");
    let slot: RefreshSlot = Arc::new(std::sync::Mutex::new(refresh));
    Arc::new(TokenManager::with_token(
        move |_stale: Option<String>| {
            let client = client.get().expect("client built").clone();
            let (url, slot) = (url.clone(), slot.clone());
            async move { post_token(client, url, slot).await }
        },
        access,
    ))
}

struct Setup {
    server: TestServer,
    manager: Manager,
    client: ClientWithMiddleware,
    hold: Hold,
}

/// An expired session, a manager whose refresher uses a plain client (no
/// middleware), and the client with the middleware.
fn setup() -> Setup {
    let server = TestServer::start(ServerConfig::default());
    let (access, refresh) = server.initial_tokens();
    server.expire_access_tokens();
    let plain = Arc::new(OnceLock::new());
    let _ = plain.set(ClientWithMiddleware::from(plain_client()));
    let manager = manager(&server, plain, access, refresh);
    let hold = Hold::default();
    let client = client_with(plain_client(), AuthMiddleware::new(manager.clone()), &hold);
    Setup {
        server,
        manager,
        client,
        hold,
    }
}

fn not_replayed(response: &Response) -> Option<NotReplayedReason> {
    response.extensions().get::<NotReplayed>().map(|n| n.reason)
}

/// Sends `N` GETs held before sending until all have passed the request gate,
/// then releases them; asserts every one succeeds.
async fn storm(setup_client: &ClientWithMiddleware, hold: &Hold, server: &TestServer, n: usize) {
    let release = Gate::new();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let request = setup_client
                .get(server.url(&format!("/resource/{i}")))
                .with_extension(HoldBeforeSend(release.clone()));
            tokio::spawn(request.send())
        })
        .collect();
    until(|| hold.reached.load(Ordering::SeqCst) >= n).await;
    release.open();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

// -------------------------------------------------------------------- tests

/// 200 requests sent concurrently with an expired token: 200 401s, exactly
/// one refresh, no refresh token presented twice.
#[test]
fn storm_after_expiry_refreshes_once() {
    Rt::Tokio.run("reqwest storm", || async {
        const N: usize = 200;
        let s = setup();
        storm(&s.client, &s.hold, &s.server, N).await;
        let c = s.server.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!(
            (c.resource_unauthorized, c.resource_ok),
            (N as u64, N as u64)
        );
        let stats = s.manager.stats();
        assert_eq!((stats.refresh_calls, stats.retries), (1, N as u64));
    });
}

/// A late 401, forced: B's 401 is held in the chain until A's 401 caused a
/// refresh that finished and A was replayed. B takes the new token, no
/// second refresh.
#[test]
fn late_401_reuses_the_finished_refresh() {
    Rt::Tokio.run("reqwest late 401", || async {
        let s = setup();
        let release_b = Gate::new();
        let b = s
            .client
            .get(s.server.url("/resource/b"))
            .with_extension(HoldResponse(release_b.clone()));
        let b = tokio::spawn(b.send());
        assert!(s.server.wait_for_arrivals_async(1, WAIT).await);

        let a = s
            .client
            .get(s.server.url("/resource/a"))
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), StatusCode::OK);
        assert_eq!(s.server.successful_refreshes(), 1);
        assert!(!b.is_finished(), "B's 401 is still held");

        release_b.open();
        assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
        let c = s.server.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!((c.resource_unauthorized, c.resource_ok), (2, 2));
        assert_eq!(s.manager.stats().retries, 2);
    });
}

/// The same with the server holding B's 401 back (`set_unauthorized_delay`,
/// read when B's verdict is fixed and reset before A is sent).
#[test]
fn late_401_held_by_the_server_refreshes_once() {
    Rt::Tokio.run("reqwest late 401 (server delay)", || async {
        let s = setup();
        s.server.set_unauthorized_delay(LATE);
        let b = tokio::spawn(s.client.get(s.server.url("/resource/b")).send());
        assert!(s.server.wait_for_arrivals_async(1, WAIT).await);
        s.server.set_unauthorized_delay(Duration::ZERO);

        let a = s
            .client
            .get(s.server.url("/resource/a"))
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), StatusCode::OK);
        // Asserted, not assumed: B's 401 comes back after the refresh ended.
        assert_eq!(s.server.successful_refreshes(), 1);
        assert!(!b.is_finished(), "B's 401 must still be held: raise LATE");
        assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
        let c = s.server.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!(s.manager.stats().refresh_calls, 1);
    });
}

/// `insufficient_scope` and `403`: returned as they are, sent once, nothing
/// refreshed.
#[test]
fn insufficient_scope_and_forbidden_are_returned_as_is() {
    Rt::Tokio.run("reqwest scope and 403", || async {
        let s = setup();
        let scope = s.client.get(s.server.url("/scope")).send().await.unwrap();
        assert_eq!(scope.status(), StatusCode::UNAUTHORIZED);
        let challenge = scope.headers()[WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.contains("insufficient_scope"), "{challenge}");
        assert!(!scope.is_unauthorized());
        assert_eq!(not_replayed(&scope), None);

        let forbidden = s
            .client
            .get(s.server.url("/forbidden"))
            .send()
            .await
            .unwrap();
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
        assert_eq!(not_replayed(&forbidden), None);

        assert_eq!(
            (s.server.hits("/scope"), s.server.hits("/forbidden")),
            (1, 1)
        );
        assert_eq!(s.server.refresh_calls(), 0);
        assert_eq!(s.manager.stats().retries, 0);
    });
}

/// A streaming body (`Request::try_clone` is `None`) is sent once; its 401
/// comes back with `NotReplayed { BodyNotReplayable }`. The token was
/// refreshed meanwhile, so sending again with a new stream succeeds.
#[test]
fn streaming_body_is_sent_once_and_its_401_returned_with_the_reason() {
    Rt::Tokio.run("reqwest streaming body", || async {
        let s = setup();
        let upload = || {
            let chunks =
                futures::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from("chunk")))]);
            s.client
                .post(s.server.url("/resource/upload"))
                .body(Body::wrap(StreamBody::new(chunks)))
                .send()
        };
        let response = upload().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::BodyNotReplayable)
        );
        assert_eq!(s.server.hits("/resource/upload"), 1);
        assert_eq!(
            (s.server.refresh_calls(), s.manager.stats().retries),
            (1, 0)
        );

        let again = upload().await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(not_replayed(&again), None);
        assert_eq!(
            (s.server.hits("/resource/upload"), s.server.refresh_calls()),
            (2, 1)
        );
    });
}

/// A buffered `POST` is replayed (non-idempotent methods too).
#[test]
fn buffered_post_is_replayed() {
    Rt::Tokio.run("reqwest buffered POST", || async {
        let s = setup();
        let response = s
            .client
            .post(s.server.url("/resource/items"))
            .header("content-type", "application/json")
            .body(r#"{"name":"x"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response
                .text()
                .await
                .unwrap()
                .starts_with(r#"{"resource":"/resource/items""#)
        );
        assert_eq!(
            (s.server.hits("/resource/items"), s.server.refresh_calls()),
            (2, 1)
        );
        assert_eq!(s.manager.stats().retries, 1);
    });
}

/// An endpoint that refuses every token: one refresh, one replay, and the
/// second 401 comes back with `NotReplayed { AlreadyReplayed }`.
#[test]
fn second_401_is_returned_as_already_replayed() {
    Rt::Tokio.run("reqwest second 401", || async {
        let s = setup();
        let response = s
            .client
            .get(s.server.url("/always401"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.is_unauthorized());
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::AlreadyReplayed)
        );
        assert_eq!(
            (s.server.hits("/always401"), s.server.refresh_calls()),
            (2, 1)
        );
    });
}

/// The refresher posts its token request through the same middleware client,
/// marked with `SkipAuth`: a storm completes with one refresh, no deadlock.
#[test]
fn refresher_through_the_same_client_with_skip_auth() {
    Rt::Tokio.run("reqwest refresher through the middleware", || async {
        const N: usize = 20;
        let server = TestServer::start(ServerConfig::default());
        let (access, refresh) = server.initial_tokens();
        server.expire_access_tokens();
        let slot = Arc::new(OnceLock::new());
        let manager = manager(&server, slot.clone(), access, refresh);
        let hold = Hold::default();
        let client = client_with(plain_client(), AuthMiddleware::new(manager.clone()), &hold);
        let _ = slot.set(client.clone());

        storm(&client, &hold, &server, N).await;
        // The token request went through the chain, untouched by the middleware.
        assert_eq!(hold.reached.load(Ordering::SeqCst), 2 * N + 1);
        let c = server.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (1, 1, 0)
        );
        assert_eq!(manager.stats().refresh_calls, 1);
    });
}

/// Cookie mode (`T = ()`): the HttpOnly cookies live in the client's cookie
/// store, the middleware attaches nothing, and epochs alone make a storm
/// cause one `POST /cookie/refresh`, sent through the same client with
/// `SkipAuth` so that the store sees the rotated cookies.
#[test]
fn cookie_mode_storm_refreshes_once() {
    Rt::Tokio.run("reqwest cookie mode", || async {
        const N: usize = 50;
        let server = TestServer::start(ServerConfig::default());
        let (access, refresh) = server.initial_tokens();
        server.expire_access_tokens();
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let url: reqwest::Url = server.base_url().parse().unwrap();
        jar.add_cookie_str(&format!("access={access}; Path=/"), &url);
        jar.add_cookie_str(&format!("refresh={refresh}; Path=/"), &url);
        let http = reqwest::Client::builder()
            .no_proxy()
            .cookie_provider(jar)
            .build()
            .unwrap();

        let slot: Arc<OnceLock<ClientWithMiddleware>> = Arc::new(OnceLock::new());
        let (from_refresher, refresh_url) = (slot.clone(), server.url("/cookie/refresh"));
        let manager = Arc::new(TokenManager::with_token(
            move |_stale: Option<()>| {
                let client = from_refresher.get().expect("client built").clone();
                let url = refresh_url.clone();
                async move {
                    let sent = client.post(url).with_extension(SkipAuth).send().await;
                    match sent.map(|r| r.status().as_u16()) {
                        Ok(200) => Ok(()),
                        Ok(status @ 400..=499) => Err(RefreshError::Rejected(status.to_string())),
                        Ok(status) => Err(RefreshError::Transient(status.to_string())),
                        Err(e) => Err(RefreshError::Transient(e.to_string())),
                    }
                }
            },
            (),
        ));
        let hold = Hold::default();
        let client = client_with(http, AuthMiddleware::new(manager.clone()), &hold);
        let _ = slot.set(client.clone());

        storm(&client, &hold, &server, N).await;
        let c = server.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (1, 1, 0)
        );
        assert_eq!(
            (c.resource_unauthorized, c.resource_ok),
            (N as u64, N as u64)
        );
    });
}

/// A rejected refresh fails the request with the `AuthError` inside
/// `reqwest_middleware::Error::Middleware`, and signs the session out: later
/// requests fail at once, without network traffic.
#[test]
fn rejected_refresh_signs_out() {
    Rt::Tokio.run("reqwest rejected refresh", || async {
        let s = setup();
        s.server.reject_refresh(true);
        let error = s
            .client
            .get(s.server.url("/resource"))
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("{error:?}");
        };
        let auth = error.downcast_ref::<AuthError<String>>().unwrap();
        assert!(
            matches!(auth, AuthError::Refresh(RefreshError::Rejected(_))),
            "{auth:?}"
        );
        assert!(s.manager.is_signed_out());

        let before = s.server.requests_total();
        let error = s
            .client
            .get(s.server.url("/resource"))
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("{error:?}");
        };
        assert_eq!(
            error.downcast_ref::<AuthError<String>>(),
            Some(&AuthError::SignedOut)
        );
        assert_eq!(s.server.requests_total(), before);
    });
}

/// A custom classifier replaces the default (here: a 403 means "refresh").
#[test]
fn custom_classifier_decides_what_is_unauthorized() {
    Rt::Tokio.run("reqwest custom classifier", || async {
        let s = setup();
        let middleware = AuthMiddleware::new(s.manager.clone())
            .with_classifier(|response| response.status() == StatusCode::FORBIDDEN);
        let client = client_with(plain_client(), middleware, &s.hold);
        let response = client.get(s.server.url("/forbidden")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::AlreadyReplayed)
        );
        assert_eq!(
            (s.server.hits("/forbidden"), s.server.refresh_calls()),
            (2, 1)
        );
    });
}

/// `TokenManager::send` works with reqwest's own results through the
/// `Unauthorized` impl for `reqwest::Response`, with the same classification.
#[test]
fn send_classifies_reqwest_responses() {
    Rt::Tokio.run("reqwest with TokenManager::send", || async {
        let s = setup();
        let http = plain_client();
        let get = |path: &'static str| {
            let (http, url) = (http.clone(), s.server.url(path));
            s.manager
                .send(move |token| http.get(url.clone()).bearer_auth(token).send())
        };
        assert_eq!(
            get("/resource").await.unwrap().unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            get("/scope").await.unwrap().unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            (s.server.hits("/resource"), s.server.hits("/scope")),
            (2, 1)
        );
        assert_eq!(s.server.refresh_calls(), 1);
    });
}
