//! `auth::AuthMiddleware` in a `reqwest_middleware` client: `401 → refresh →
//! retry` for reqwest, against a real HTTP server on loopback.
//!
//! The embedded server (tests/support/server.rs) issues access tokens and
//! *rotating* refresh tokens, and revokes the whole session if a refresh
//! token is presented twice. The client starts with an expired access token.
//! Its refresher sends the token request through the same client, marked
//! with `SkipAuth`.
//!
//! Run: `cargo run --example reqwest_client --features reqwest`

#[path = "../tests/support/server.rs"]
mod server;

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use epochflight::auth::{AuthMiddleware, NotReplayed, RefreshError, SkipAuth, TokenManager};
use http_body_util::StreamBody;
use hyper::body::Frame;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use server::{ServerConfig, TestServer};

/// `POST /token` with the current refresh token, through the middleware
/// client: `SkipAuth` lets it pass untouched (without it, it would wait for
/// the refresh it is part of). Keeps the rotated refresh token.
async fn refresh(
    client: ClientWithMiddleware,
    url: String,
    refresh_token: Arc<Mutex<String>>,
) -> Result<String, RefreshError<String>> {
    let form = format!(
        "grant_type=refresh_token&refresh_token={}",
        refresh_token.lock().unwrap()
    );
    let transient = |e: reqwest_middleware::Error| RefreshError::Transient(e.to_string());
    let response = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .with_extension(SkipAuth)
        .send()
        .await
        .map_err(transient)?;
    let status = response.status();
    let text = response.text().await.map_err(|e| transient(e.into()))?;
    match status.as_u16() {
        200 => {
            *refresh_token.lock().unwrap() = json_field(&text, "refresh_token");
            Ok(json_field(&text, "access_token"))
        }
        400..=499 => Err(RefreshError::Rejected(text)), // invalid_grant: sign in again
        _ => Err(RefreshError::Transient(text)),
    }
}

#[tokio::main]
async fn main() {
    let server = TestServer::start(ServerConfig::default());
    let (access, refresh_token) = server.initial_tokens();
    server.expire_access_tokens();

    // The refresher needs the client, which needs the manager: a slot ties them.
    let slot: Arc<OnceLock<ClientWithMiddleware>> = Arc::new(OnceLock::new());
    let refresh_token = Arc::new(Mutex::new(refresh_token));
    let (from_refresher, token_url) = (slot.clone(), server.url("/token"));
    let manager = Arc::new(TokenManager::with_token(
        move |_stale: Option<String>| {
            let client = from_refresher.get().expect("client built").clone();
            refresh(client, token_url.clone(), refresh_token.clone())
        },
        access,
    ));
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthMiddleware::new(manager.clone()))
        .build();
    let _ = slot.set(client.clone());

    // 1. A burst of requests with the expired token.
    const N: usize = 50;
    let burst: Vec<_> = (0..N)
        .map(|i| tokio::spawn(client.get(server.url(&format!("/resource/{i}"))).send()))
        .collect();
    let mut ok = 0;
    for task in burst {
        if task.await.expect("task").expect("response").status() == 200 {
            ok += 1;
        }
    }
    println!(
        "{N} concurrent GETs with an expired token: {ok} × 200 OK, \
         {} 401s from the server, {} refresh call(s), {} reuse detection(s)",
        server.resource_unauthorized(),
        server.refresh_calls(),
        server.reuse_detections(),
    );

    // 2. Responses that a new token would not fix are returned as they are.
    let scope = client
        .get(server.url("/scope"))
        .send()
        .await
        .expect("response");
    println!(
        "GET /scope: {} {:?} (no refresh)",
        scope.status(),
        scope.headers()["www-authenticate"]
    );
    let forbidden = client
        .get(server.url("/forbidden"))
        .send()
        .await
        .expect("response");
    println!("GET /forbidden: {} (no refresh)", forbidden.status());

    // 3. A streaming upload cannot be sent twice. With an expired token its
    //    401 is returned, marked; the token is refreshed meanwhile, so
    //    sending it again (with a new stream) succeeds.
    server.expire_access_tokens();
    let upload = || {
        let chunks = futures::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from("data")))]);
        client
            .post(server.url("/resource/upload"))
            .body(reqwest::Body::wrap(StreamBody::new(chunks)))
            .send()
    };
    let first = upload().await.expect("response");
    println!(
        "streamed POST with an expired token: {}, marked {:?}",
        first.status(),
        first.extensions().get::<NotReplayed>().map(|n| n.reason)
    );
    let second = upload().await.expect("response");
    println!("the same upload sent again: {}", second.status());

    let stats = manager.stats();
    println!(
        "manager: {} refresh calls, {} replays; server: {} refresh calls, {} reuse detections",
        stats.refresh_calls,
        stats.retries,
        server.refresh_calls(),
        server.reuse_detections()
    );
    assert_eq!(ok, N);
    assert_eq!(server.reuse_detections(), 0);
}

/// The string value of `"field":"..."` in a flat JSON object.
fn json_field(json: &str, field: &str) -> String {
    let key = format!("\"{field}\":\"");
    let start = json.find(&key).map_or(json.len(), |i| i + key.len());
    let end = json[start..].find('"').map_or(json.len(), |i| start + i);
    json[start..end].to_string()
}
