//! `auth::UreqAuthMiddleware` in a ureq 3 agent: `401 → refresh → retry`
//! for blocking clients, from many threads, against a real HTTP server on
//! loopback.
//!
//! The embedded server (tests/support/server.rs) issues access tokens and
//! *rotating* refresh tokens, and revokes the whole session if a refresh
//! token is presented twice. The client starts with an expired access token.
//! The rotating refresh token travels inside the token value, so the
//! refresher rotates exactly the token it was handed.
//!
//! Run: `cargo run --example ureq_client --features ureq`

#[path = "../tests/support/server.rs"]
mod server;

use std::sync::Arc;

use epochflight::auth::{Credential, RefreshError, TokenManager, UreqAuthMiddleware};
use server::{ServerConfig, TestServer};

/// What the client keeps: the access token it sends, and the refresh token
/// its next refresh presents.
#[derive(Clone)]
struct Tokens {
    access: String,
    refresh: String,
}

/// Sent as `Authorization: Bearer <access>`.
impl Credential for Tokens {
    fn apply(&self, headers: &mut http::HeaderMap) {
        self.access.apply(headers);
    }
}

/// `POST /token` with the stale tokens' refresh token (a plain agent: the
/// token request needs no access token).
fn refresh(
    agent: &ureq::Agent,
    url: &str,
    stale: Option<Tokens>,
) -> Result<Tokens, RefreshError<String>> {
    let stale = stale.ok_or_else(|| RefreshError::Rejected("signed out".into()))?;
    let transient = |e: ureq::Error| RefreshError::Transient(e.to_string());
    let mut response = agent
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(format!(
            "grant_type=refresh_token&refresh_token={}",
            stale.refresh
        ))
        .map_err(transient)?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().map_err(transient)?;
    match (
        status,
        json_field(&body, "access_token"),
        json_field(&body, "refresh_token"),
    ) {
        (200, Some(access), Some(refresh)) => Ok(Tokens { access, refresh }),
        (400..=499, _, _) => Err(RefreshError::Rejected(body)), // invalid_grant: sign in again
        _ => Err(RefreshError::Transient(body)),
    }
}

fn main() {
    let server = TestServer::start(ServerConfig::default());
    let (access, refresh_token) = server.initial_tokens();
    server.expire_access_tokens();

    let config = || ureq::Agent::config_builder().http_status_as_error(false);
    let (plain, token_url) = (
        ureq::Agent::new_with_config(config().build()),
        server.url("/token"),
    );
    let manager = Arc::new(TokenManager::with_token_blocking(
        move |stale| refresh(&plain, &token_url, stale),
        Tokens {
            access,
            refresh: refresh_token,
        },
    ));
    let agent = UreqAuthMiddleware::new(manager.clone()).build_agent(config());

    // 1. Eight threads, ten requests each, with the expired token.
    const THREADS: usize = 8;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (agent, url) = (agent.clone(), server.url(&format!("/resource/{t}")));
            std::thread::spawn(move || {
                (0..10)
                    .filter(|_| agent.get(&url).call().is_ok_and(|r| r.status() == 200))
                    .count()
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    println!(
        "{} GETs from {THREADS} threads with an expired token: {ok} × 200 OK, \
         {} 401s from the server, {} refresh call(s), {} reuse detection(s)",
        THREADS * 10,
        server.resource_unauthorized(),
        server.refresh_calls(),
        server.reuse_detections(),
    );

    // 2. A POST body is kept and sent again after the refresh.
    server.expire_access_tokens();
    let posted = agent
        .post(server.url("/resource/items"))
        .send(r#"{"name":"x"}"#);
    println!(
        "POST with an expired token: {} after {} refresh call(s) in all",
        posted.expect("response").status(),
        server.refresh_calls()
    );

    let stats = manager.stats();
    println!(
        "manager: {} refresh calls, {} replays; server: {} reuse detections",
        stats.refresh_calls,
        stats.retries,
        server.reuse_detections()
    );
    assert_eq!(ok, THREADS * 10);
    assert_eq!(server.reuse_detections(), 0);
}

/// The string value of `"field":"..."` in a flat JSON object.
fn json_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":\"");
    let start = json.find(&key)? + key.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_string())
}
