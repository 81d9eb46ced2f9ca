//! ureq 3 with the `ureq` feature, against the loopback OAuth-style server
//! with rotating refresh tokens (tests/support/server.rs), from plain
//! threads:
//!
//! - `UreqAuthMiddleware` in an agent (`AuthAgent`), with ureq's default
//!   `http_status_as_error(true)` (a 401 is `Err(StatusCode(401))`) and with
//!   it off (the 401 is a response, classified by its challenge);
//! - `TokenManager::send_blocking` with ureq's own `Result`, whose
//!   `Err(StatusCode(401))` now counts as unauthorized (it silently did not:
//!   80 requests failed with 0 refreshes).
//!
//! Storms are forced: every thread's first request has its 401 in hand (the
//! server counted it) before the refresh, held at a valve, may proceed. The
//! only timed hold is the server's `unauthorized_delay` for the late-401
//! test, which checks that the 401s were still held when the refresh
//! completed.
#![cfg(feature = "ureq")]

mod common;
#[path = "support/server.rs"]
mod server;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Gate, until_blocking, with_timeout};
use epochflight::auth::{
    AuthAgent, AuthError, Credential, NotReplayed, NotReplayedReason, RefreshError, SkipAuth,
    TokenManager, UreqAuthMiddleware,
};
use http::HeaderMap;
use server::{ServerConfig, TestServer};

const THREADS: usize = 8;
const LIMIT: Duration = Duration::from_secs(30);
const LATE: Duration = Duration::from_millis(1500);

#[derive(Clone, Debug, PartialEq)]
struct Tokens {
    access: String,
    refresh: String,
}

impl Credential for Tokens {
    fn apply(&self, headers: &mut HeaderMap) {
        self.access.apply(headers);
    }
}

type Manager = Arc<TokenManager<Tokens, String>>;

/// Refreshes wait here while the test holds it.
#[derive(Default)]
struct Valve(Mutex<Option<Arc<Gate>>>);

impl Valve {
    fn hold(&self) -> Arc<Gate> {
        let gate = Gate::new();
        *self.0.lock().unwrap() = Some(gate.clone());
        gate
    }

    fn pass(&self) {
        let gate = self.0.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.wait_blocking();
        }
    }
}

fn field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_string())
}

fn config(status_as_error: bool) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder()
        .http_status_as_error(status_as_error)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
}

/// A manager whose blocking refresher posts the rotating refresh token
/// (carried in the stale `Tokens`) with `agent`, marked with `SkipAuth` so
/// that it may be the authorized agent itself.
fn manager(s: &TestServer, valve: &Arc<Valve>, agent: Arc<Mutex<Option<ureq::Agent>>>) -> Manager {
    let (url, valve) = (s.url("/token"), valve.clone());
    let (access, refresh) = s.initial_tokens();
    Arc::new(TokenManager::with_token_blocking(
        move |stale: Option<Tokens>| {
            let stale = stale.ok_or_else(|| RefreshError::Rejected("no refresh token".into()))?;
            valve.pass();
            let agent = agent.lock().unwrap().clone().expect("agent built");
            let transient = |e: ureq::Error| RefreshError::Transient(e.to_string());
            let mut response = agent
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .extension(SkipAuth)
                .config()
                .http_status_as_error(false)
                .build()
                .send(format!(
                    "grant_type=refresh_token&refresh_token={}",
                    stale.refresh
                ))
                .map_err(transient)?;
            let status = response.status().as_u16();
            let body = response.body_mut().read_to_string().map_err(transient)?;
            match (
                status,
                field(&body, "access_token"),
                field(&body, "refresh_token"),
            ) {
                (200, Some(access), Some(refresh)) => Ok(Tokens { access, refresh }),
                (400..=499, _, _) => Err(RefreshError::Rejected(body)),
                _ => Err(RefreshError::Transient(body)),
            }
        },
        Tokens { access, refresh },
    ))
}

/// The manager, and an agent authorized by it that its refresher uses too.
fn setup(s: &TestServer, status_as_error: bool) -> (Manager, AuthAgent, Arc<Valve>) {
    let valve = Arc::new(Valve::default());
    let slot = Arc::new(Mutex::new(None));
    let m = manager(s, &valve, slot.clone());
    let agent = UreqAuthMiddleware::new(m.clone()).build_agent(config(status_as_error));
    *slot.lock().unwrap() = Some((*agent).clone());
    (m, agent, valve)
}

/// What a thread got: the status (or the ureq error) and the body.
type Got = Result<(u16, String), ureq::Error>;

fn get(agent: &ureq::Agent, url: &str) -> Got {
    let mut response = agent.get(url).call()?;
    let body = response.body_mut().read_to_string()?;
    Ok((response.status().as_u16(), body))
}

fn spawn_gets(agent: &AuthAgent, url: String) -> Vec<JoinHandle<Got>> {
    (0..THREADS)
        .map(|_| {
            let (agent, url) = (agent.clone(), url.clone());
            std::thread::spawn(move || get(&agent, &url))
        })
        .collect()
}

/// A storm from 8 threads through the agent after expiry: every first
/// attempt reaches the server with the old token (the server holds the 401s
/// back until all have arrived; a request that met the refresh in flight
/// would wait at the gate instead), the refresh is held until all 401s are
/// in; then one refresh, every request answered 200 after one replay, no
/// reuse.
fn storm_refreshes_once(status_as_error: bool) {
    let s = TestServer::start(ServerConfig::default());
    let (m, agent, valve) = setup(&s, status_as_error);
    s.expire_access_tokens();
    s.set_unauthorized_delay(LATE);
    let held = valve.hold();
    let threads = spawn_gets(&agent, s.url("/resource"));
    assert!(s.wait_for_arrivals(THREADS as u64, LIMIT));
    assert_eq!(m.stats().refresh_calls, 0, "every 401 was still held back");
    s.set_unauthorized_delay(Duration::ZERO);
    until_blocking(|| m.stats().refresh_calls == 1);
    held.open();
    for thread in threads {
        let (status, body) = thread.join().unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let c = s.counters();
    assert_eq!(
        (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
        (1, 1, 0)
    );
    assert_eq!(c.resource_ok, THREADS as u64);
    assert_eq!(m.stats().retries, THREADS as u64);
}

/// ureq's default: the 401 is `Err(StatusCode(401))`.
#[test]
fn agent_storm_with_status_errors_refreshes_once() {
    with_timeout("agent_storm_status_errors", || storm_refreshes_once(true));
}

/// `http_status_as_error(false)`: the 401 is a response.
#[test]
fn agent_storm_with_status_responses_refreshes_once() {
    with_timeout("agent_storm_status_responses", || {
        storm_refreshes_once(false)
    });
}

/// Requests sent with the old token whose 401s arrive after the refresh
/// completed (held back by the server): each is replayed with the new
/// token, and there is still exactly one refresh.
#[test]
fn late_401s_refresh_nothing() {
    with_timeout("ureq_late_401", || {
        let s = TestServer::start(ServerConfig::default());
        let (m, agent, _valve) = setup(&s, true);
        s.expire_access_tokens();
        s.set_unauthorized_delay(LATE);
        let late = spawn_gets(&agent, s.url("/resource"));
        assert!(s.wait_for_arrivals(THREADS as u64, LIMIT));
        s.set_unauthorized_delay(Duration::ZERO);
        // Another request meets the expiry and refreshes, start to finish.
        assert_eq!(get(&agent, &s.url("/resource")).unwrap().0, 200);
        assert_eq!(s.refresh_calls(), 1);
        assert!(
            late.iter().all(|t| !t.is_finished()),
            "the late 401s were still held back when the refresh completed"
        );
        for thread in late {
            assert_eq!(thread.join().unwrap().unwrap().0, 200);
        }
        let c = s.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!(m.stats().retries, THREADS as u64 + 1);
    });
}

/// A rejected refresh: every thread of the storm fails with the
/// `AuthError` inside `ureq::Error::Other` (the rejection, or `SignedOut`
/// for one that reached the manager after it), the session is signed out,
/// and no request reaches the server until `sign_in`.
#[test]
fn rejected_refresh_signs_out_and_stops_requests() {
    with_timeout("ureq_rejected", || {
        let s = TestServer::start(ServerConfig::default());
        let (m, agent, valve) = setup(&s, true);
        s.expire_access_tokens();
        s.reject_refresh(true);
        s.set_unauthorized_delay(LATE);
        let held = valve.hold();
        let threads = spawn_gets(&agent, s.url("/resource"));
        assert!(s.wait_for_arrivals(THREADS as u64, LIMIT));
        assert_eq!(m.stats().refresh_calls, 0, "every 401 was still held back");
        s.set_unauthorized_delay(Duration::ZERO);
        until_blocking(|| m.stats().refresh_calls == 1);
        held.open();
        for thread in threads {
            match thread.join().unwrap() {
                Err(ureq::Error::Other(error)) => match error.downcast_ref::<AuthError<String>>() {
                    Some(AuthError::Refresh(RefreshError::Rejected(body))) => {
                        assert_eq!(field(body, "error").as_deref(), Some("invalid_grant"))
                    }
                    Some(AuthError::SignedOut) => {}
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            }
        }
        assert!(m.is_signed_out());
        assert_eq!(s.refresh_calls(), 1);
        let before = s.requests_total();
        let error = get(&agent, &s.url("/resource")).unwrap_err();
        assert!(
            matches!(&error, ureq::Error::Other(e) if e.downcast_ref::<AuthError<String>>() == Some(&AuthError::SignedOut)),
            "{error:?}"
        );
        assert_eq!(s.requests_total(), before, "no request while signed out");

        s.reject_refresh(false);
        let (access, refresh) = s.sign_in_new_session();
        m.sign_in(Tokens { access, refresh });
        assert_eq!(get(&agent, &s.url("/resource")).unwrap().0, 200);
    });
}

/// `send_blocking` with ureq's own `Result` from 8 threads: ureq's default
/// turns the 401 into `Err(StatusCode(401))`, which is unauthorized, so the
/// storm refreshes once and every request succeeds. (Before, `Result`'s
/// impl called every `Err` a transport error: all failed, 0 refreshes.)
#[test]
fn send_blocking_with_ureq_results_refreshes_once() {
    with_timeout("send_blocking_ureq_results", || {
        let s = TestServer::start(ServerConfig::default());
        let valve = Arc::new(Valve::default());
        let plain = ureq::Agent::new_with_config(config(true).build());
        let m = manager(&s, &valve, Arc::new(Mutex::new(Some(plain.clone()))));
        s.expire_access_tokens();
        s.set_unauthorized_delay(LATE);
        let held = valve.hold();
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (m, agent, url) = (m.clone(), plain.clone(), s.url("/resource"));
                std::thread::spawn(move || {
                    m.send_blocking(|tokens: Tokens| {
                        agent
                            .get(&url)
                            .header("authorization", format!("Bearer {}", tokens.access))
                            .call()
                    })
                })
            })
            .collect();
        assert!(s.wait_for_arrivals(THREADS as u64, LIMIT));
        assert_eq!(m.stats().refresh_calls, 0, "every 401 was still held back");
        s.set_unauthorized_delay(Duration::ZERO);
        until_blocking(|| m.stats().refresh_calls == 1);
        held.open();
        for thread in threads {
            let response = thread.join().unwrap().unwrap().unwrap();
            assert_eq!(response.status(), 200);
        }
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.reuse_detections, c.resource_ok),
            (1, 0, 8)
        );
        assert_eq!(m.stats().retries, THREADS as u64);
    });
}

/// The per-request key: two tenants (two server sessions) through one
/// keyed agent, chosen by a request extension; each refreshes once, within
/// its own session.
#[test]
fn keyed_agent_refreshes_each_tenant_once() {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct Tenant(usize);

    with_timeout("ureq_keyed", || {
        let s = TestServer::start(ServerConfig::default());
        let sessions = [s.initial_tokens(), s.sign_in_new_session()];
        let url = s.url("/token");
        let plain = ureq::Agent::new_with_config(config(false).build());
        let m = Arc::new(TokenManager::keyed_blocking(
            move |_: Tenant, stale: Option<Tokens>| {
                let stale = stale.expect("signed in");
                let mut response = plain
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .send(format!(
                        "grant_type=refresh_token&refresh_token={}",
                        stale.refresh
                    ))
                    .map_err(|e| RefreshError::Transient(e.to_string()))?;
                let body = response.body_mut().read_to_string().unwrap();
                match (field(&body, "access_token"), field(&body, "refresh_token")) {
                    (Some(access), Some(refresh)) => Ok(Tokens { access, refresh }),
                    _ => Err(RefreshError::Rejected(body)),
                }
            },
        ));
        for (tenant, (access, refresh)) in sessions.iter().cloned().enumerate() {
            m.for_key(&Tenant(tenant))
                .sign_in(Tokens { access, refresh });
        }
        let agent = UreqAuthMiddleware::keyed(m.clone(), |head: &http::request::Parts| {
            *head
                .extensions
                .get::<Tenant>()
                .expect("every request names its tenant")
        })
        .build_agent(config(true));
        s.expire_access_tokens();
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let (agent, url) = (agent.clone(), s.url("/resource"));
                std::thread::spawn(move || {
                    let tenant = Tenant(i % 2);
                    let mut response = agent.get(&url).extension(tenant).call().unwrap();
                    (tenant, response.body_mut().read_to_string().unwrap())
                })
            })
            .collect();
        for thread in threads {
            let (tenant, body) = thread.join().unwrap();
            let session = sessions[tenant.0]
                .0
                .split('-')
                .nth(1)
                .unwrap()
                .trim_start_matches('s');
            assert!(body.contains(&format!("\"session\":{session}")), "{body}");
        }
        assert_eq!(s.counters().refresh_calls, 2);
        assert_eq!(s.reuse_detections(), 0);
        assert_eq!(m.for_key(&Tenant(0)).stats().refresh_calls, 1);
        assert_eq!(m.for_key(&Tenant(1)).stats().refresh_calls, 1);
    });
}

// ---------------------------------------------------------- body replay

/// A one-connection-at-a-time HTTP/1.1 server for the replay tests: answers
/// `401` to any token but `Bearer fresh`, and `200` echoing the request body
/// otherwise. It records every body it received.
struct Echo {
    url: String,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Echo {
    fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/echo", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let log = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || serve_echo(stream, &log));
            }
        });
        Echo { url, bodies }
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        self.bodies.lock().unwrap().clone()
    }
}

fn serve_echo(stream: std::net::TcpStream, log: &Mutex<Vec<Vec<u8>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut chunked, mut fresh) = (0, false, false);
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(v) = header.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            chunked |= header == "transfer-encoding: chunked";
            fresh |= header == "authorization: bearer fresh";
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                reader.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            reader.read_exact(&mut body).unwrap();
        }
        log.lock().unwrap().push(body.clone());
        let (status, reply) = if fresh {
            ("200 OK", body)
        } else {
            ("401 Unauthorized", Vec::new())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(&reply).unwrap();
    }
}

fn echo_agent(limit: usize) -> (Arc<TokenManager<String, String>>, AuthAgent) {
    let m = Arc::new(TokenManager::with_token_blocking(
        |_: Option<String>| Ok::<_, RefreshError<String>>("fresh".into()),
        "expired".to_string(),
    ));
    let agent = UreqAuthMiddleware::new(m.clone())
        .replay_limit(limit)
        .build_agent(config(false));
    (m, agent)
}

/// A POST body within the replay limit is sent again, byte for byte, with
/// the new token; one from a reader too.
#[test]
fn body_within_the_limit_is_replayed() {
    with_timeout("ureq_body_replayed", || {
        let echo = Echo::start();
        let (m, agent) = echo_agent(16);
        let mut response = agent.post(&echo.url).send("sixteen bytes!!!").unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.body_mut().read_to_string().unwrap(),
            "sixteen bytes!!!"
        );
        let mut reader: &[u8] = b"from a reader";
        let mut response = agent
            .post(&echo.url)
            .send(ureq::SendBody::from_reader(&mut reader))
            .unwrap();
        assert_eq!(
            response.body_mut().read_to_string().unwrap(),
            "from a reader"
        );
        assert_eq!(
            echo.bodies(),
            vec![
                b"sixteen bytes!!!".to_vec(),
                b"sixteen bytes!!!".to_vec(),
                b"from a reader".to_vec()
            ],
            "the first body was sent twice, the second once (the token was fresh by then)"
        );
        assert_eq!((m.stats().refresh_calls, m.stats().retries), (1, 1));
    });
}

/// A body longer than the replay limit is streamed once; its 401 comes back
/// with `NotReplayed { BodyNotReplayable }` after the token was refreshed,
/// so the caller's own retry uses the new token.
#[test]
fn body_over_the_limit_is_sent_once() {
    with_timeout("ureq_body_not_replayed", || {
        let echo = Echo::start();
        let (m, agent) = echo_agent(4);
        let response = agent.post(&echo.url).send("longer than four").unwrap();
        assert_eq!(response.status(), 401);
        let reason = response.extensions().get::<NotReplayed>().map(|n| n.reason);
        assert_eq!(reason, Some(NotReplayedReason::BodyNotReplayable));
        assert_eq!(echo.bodies(), vec![b"longer than four".to_vec()]);
        assert_eq!((m.stats().refresh_calls, m.stats().retries), (1, 0));
        let mut again = agent.post(&echo.url).send("longer than four").unwrap();
        assert_eq!(
            again.body_mut().read_to_string().unwrap(),
            "longer than four"
        );
    });
}

/// A 401 to the replay comes back with `NotReplayed { AlreadyReplayed }`:
/// never a third attempt.
#[test]
fn second_401_is_returned_with_a_note() {
    with_timeout("ureq_second_401", || {
        let echo = Echo::start();
        let m = Arc::new(TokenManager::with_token_blocking(
            |_: Option<String>| Ok::<_, RefreshError<String>>("still-wrong".into()),
            "expired".to_string(),
        ));
        let agent = UreqAuthMiddleware::new(m.clone()).build_agent(config(false));
        let response = agent.get(&echo.url).call().unwrap();
        assert_eq!(response.status(), 401);
        let reason = response.extensions().get::<NotReplayed>().map(|n| n.reason);
        assert_eq!(reason, Some(NotReplayedReason::AlreadyReplayed));
        assert_eq!(echo.bodies().len(), 2);
    });
}
