//! `auth::AuthMiddleware` in a `reqwest_middleware` client, refreshing with
//! the OAuth 2 refresher (`auth::oauth2`): `401 → refresh → retry` for
//! reqwest, against a real HTTP server on loopback.
//!
//! The embedded server (tests/support/server.rs) issues access tokens and
//! *rotating* refresh tokens, and revokes the whole session if a refresh
//! token is presented twice. The client starts with an expired access token.
//! The refresh token travels inside the token value (`OAuth2Token`), so each
//! refresh presents exactly the refresh token of the token it replaces; the
//! token requests go through a plain reqwest client of their own, outside
//! the middleware.
//!
//! Run: `cargo run --example reqwest_client --features reqwest,oauth2`

#[path = "../tests/support/server.rs"]
mod server;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use epochflight::auth::oauth2::{
    AccessToken, ClientId, OAuth2Refresher, OAuth2Token, RefreshToken, ReqwestClient, TokenUrl,
};
use epochflight::auth::{AuthMiddleware, NotReplayed};
use http_body_util::StreamBody;
use hyper::body::Frame;
use reqwest_middleware::ClientBuilder;
use server::{ServerConfig, TestServer};

#[tokio::main]
async fn main() {
    let server = TestServer::start(ServerConfig::default());
    let (access, refresh) = server.initial_tokens();
    server.expire_access_tokens();

    // The refresher: the refresh-token grant, over its own reqwest client.
    let token_client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client");
    let manager = Arc::new(
        OAuth2Refresher::new(
            ReqwestClient::new(token_client),
            ClientId::new("example".into()),
            TokenUrl::new(server.url("/token")).expect("token URL"),
        )
        .manager(),
    );
    // The tokens of a login, whose access token has since expired.
    manager.sign_in(
        OAuth2Token::new(AccessToken::new(access)).with_refresh_token(RefreshToken::new(refresh)),
    );
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthMiddleware::new(manager.clone()))
        .build();

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
