//! `auth::AuthLayer` around hyper-util's client: `401 → refresh → retry` as
//! tower middleware, against a real HTTP server on loopback.
//!
//! The embedded server (tests/support/server.rs) issues access tokens and
//! *rotating* refresh tokens, and revokes the whole session if a refresh
//! token is presented twice. The client starts with an expired access token.
//!
//! Run: `cargo run --example tower_client --features tower`

#[path = "../tests/support/server.rs"]
mod server;

use std::sync::Arc;

use bytes::Bytes;
use epochflight::auth::{AuthLayer, Credential, NotReplayed, RefreshError, TokenManager};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use server::{ServerConfig, TestServer};
use tower::{ServiceBuilder, ServiceExt};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What the token endpoint returns. The layer sends `access`.
#[derive(Clone)]
struct Tokens {
    access: String,
    refresh: String,
}

impl Credential for Tokens {
    fn apply(&self, headers: &mut HeaderMap) {
        self.access.apply(headers); // Authorization: Bearer <access>
    }
}

/// `POST /token` with the refresh token (rotation: the answer has a new one).
/// It goes through the plain client: the layer is not involved (through the
/// layered service, it would need the `SkipAuth` marker).
async fn refresh(
    http: HttpClient,
    url: String,
    stale: Tokens,
) -> Result<Tokens, RefreshError<String>> {
    let form = format!("grant_type=refresh_token&refresh_token={}", stale.refresh);
    let request = Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))
        .expect("valid request");
    let response = http
        .request(request)
        .await
        .map_err(|e| RefreshError::Transient(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| RefreshError::Transient(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    match status.as_u16() {
        200 => Ok(Tokens {
            access: json_field(&text, "access_token"),
            refresh: json_field(&text, "refresh_token"),
        }),
        400..=499 => Err(RefreshError::Rejected(text)), // invalid_grant: sign in again
        _ => Err(RefreshError::Transient(text)),
    }
}

#[tokio::main]
async fn main() {
    let server = TestServer::start(ServerConfig::default());
    let (access, refresh_token) = server.initial_tokens();
    server.expire_access_tokens();

    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let token_url = server.url("/token");
    let refresher_http = http.clone();
    let manager = Arc::new(TokenManager::with_token(
        move |stale: Option<Tokens>| {
            let (http, url) = (refresher_http.clone(), token_url.clone());
            async move { refresh(http, url, stale.expect("signed in")).await }
        },
        Tokens {
            access,
            refresh: refresh_token,
        },
    ));

    // The API client: every request goes through the auth layer.
    let api = ServiceBuilder::new()
        .layer(AuthLayer::new(manager.clone()))
        .service(http);
    let get = |path: &str| {
        let request = Request::get(server.url(path)).body(Full::default());
        api.clone().oneshot(request.expect("valid request"))
    };

    // 1. A burst of requests with the expired token.
    const N: usize = 50;
    let burst = (0..N).map(|i| tokio::spawn(get(&format!("/resource/{i}"))));
    let mut ok = 0;
    for task in burst.collect::<Vec<_>>() {
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

    // 2. A POST (buffered body): sent with the fresh token.
    let post = Request::post(server.url("/resource/items"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"name":"x"}"#)))
        .expect("valid request");
    let response = api.clone().oneshot(post).await.expect("response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    println!("POST /resource/items: {}", String::from_utf8_lossy(&body));

    // 3. Responses that a new token would not fix are returned as they are.
    let scope = get("/scope").await.expect("response");
    println!(
        "GET /scope: {} {:?} (no refresh)",
        scope.status(),
        scope.headers()["www-authenticate"]
    );
    let forbidden = get("/forbidden").await.expect("response");
    println!("GET /forbidden: {} (no refresh)", forbidden.status());

    // 4. An endpoint that refuses every token: one refresh, one replay, then
    //    the second 401 is returned, marked.
    let refused = get("/always401").await.expect("response");
    println!(
        "GET /always401: {} after one replay, marked {:?}",
        refused.status(),
        refused.extensions().get::<NotReplayed>().map(|n| n.reason)
    );

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
