//! A refresh, once sent, always lands (issue 11): with a spawner, a refresh
//! whose only callers went away finishes and is applied to the session.
//!
//! Against the loopback server in hold mode: the token endpoint rotates the
//! refresh token when the request *arrives* and holds the response until the
//! test releases it. A caller cancelled while the response is held is
//! therefore surely cancelled after the rotation: without a spawner the new
//! refresh token is lost and the next refresh presents the rotated one (the
//! server detects reuse and revokes the session); with one, it lands.
//!
//! Cancellation is forced, not timed: the caller is dropped once the server
//! says it holds the refresh response. The tower test uses a real `Timeout`
//! layer, whose timeouts can only fire while the response is held.

mod common;
#[path = "support/server.rs"]
mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use epochflight::auth::oauth2::{
    AccessToken, ClientId, OAuth2Error, OAuth2Refresher, OAuth2Token, RefreshToken, ReqwestClient,
    TokenUrl,
};
use epochflight::auth::{AuthError, AuthLayer, TokenManager};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use server::{ServerConfig, TestServer};
use tower::ServiceBuilder;

type Manager = TokenManager<OAuth2Token, OAuth2Error>;

/// The longest any wait on the server may take.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `make` on a tokio runtime under the suite's timeout.
fn run<F, Fut>(name: &str, make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    common::with_timeout(name, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(make())
    });
}

/// A manager holding the server's initial tokens, refreshing with the
/// `oauth2` refresher; with `tokio::spawn` as its spawner if `spawner`.
fn manager(server: &TestServer, spawner: bool, refreshes: &Arc<AtomicUsize>) -> Arc<Manager> {
    let refresher = OAuth2Refresher::new(
        ReqwestClient::new(reqwest::Client::new()),
        ClientId::new("epochflight-tests".into()),
        TokenUrl::new(server.url("/token")).expect("token url"),
    );
    let (access, refresh) = server.initial_tokens();
    let login =
        OAuth2Token::new(AccessToken::new(access)).with_refresh_token(RefreshToken::new(refresh));
    let refreshes = refreshes.clone();
    let manager =
        TokenManager::with_token(refresher.into_refresh_fn(), login).on_refresh(move |_| {
            refreshes.fetch_add(1, Ordering::SeqCst);
        });
    Arc::new(if spawner {
        manager.with_spawner(|refresh| drop(tokio::spawn(refresh)))
    } else {
        manager
    })
}

async fn get(
    client: reqwest::Client,
    url: String,
    token: OAuth2Token,
) -> reqwest::Result<reqwest::Response> {
    client
        .get(url)
        .bearer_auth(token.access_token().secret())
        .send()
        .await
}

/// One `send`, cancelled once the server holds its refresh's response.
async fn send_cancelled_mid_refresh(server: &TestServer, manager: &Manager) {
    let (client, url) = (reqwest::Client::new(), server.url("/resource"));
    let send = manager.send(|token| get(client.clone(), url.clone(), token));
    tokio::select! {
        _ = send => panic!("the send finished while its refresh response was held"),
        held = server.wait_until_async(|c| c.held_responses == 1, LIMIT) => {
            assert!(held, "the refresh reached the server");
        }
    }
}

/// A lone `send` cancelled mid-refresh, then another `send`: one refresh, no
/// reuse detected, still signed in, and the second request succeeds with the
/// token the cancelled refresh got.
#[test]
fn a_lone_send_cancelled_mid_refresh_lands_on_the_spawner() {
    run("a_lone_send_cancelled_mid_refresh", || async {
        let server = TestServer::start(ServerConfig::default());
        let refreshes = Arc::new(AtomicUsize::new(0));
        let manager = manager(&server, true, &refreshes);
        server.expire_access_tokens();
        server.hold_refresh_responses(true);
        send_cancelled_mid_refresh(&server, &manager).await;
        assert!(
            manager.is_refreshing(),
            "the refresh went on, on the spawner"
        );
        server.release_held_responses();
        server.hold_refresh_responses(false);
        common::until(|| !manager.is_refreshing()).await;
        assert_eq!(refreshes.load(Ordering::SeqCst), 1, "the hook saw it");

        let (client, url) = (reqwest::Client::new(), server.url("/resource"));
        let response = manager
            .send(|token| get(client.clone(), url.clone(), token))
            .await
            .expect("signed in")
            .expect("transport");
        assert_eq!(response.status(), 200);
        let counters = server.counters();
        assert_eq!(counters.refresh_calls, 1);
        assert_eq!(counters.reuse_detections, 0);
        assert!(!manager.is_signed_out());
        assert_eq!(manager.stats().refresh_calls, 1);
    });
}

/// The same without a spawner: the refresh is dropped with its caller after
/// the server rotated, so the next `send` presents the rotated refresh token,
/// the server detects reuse, and the session is over. (What the spawner
/// prevents; it also shows the test above can fail.)
#[test]
fn without_a_spawner_the_cancelled_refresh_is_lost() {
    run("without_a_spawner", || async {
        let server = TestServer::start(ServerConfig::default());
        let refreshes = Arc::new(AtomicUsize::new(0));
        let manager = manager(&server, false, &refreshes);
        server.expire_access_tokens();
        server.hold_refresh_responses(true);
        send_cancelled_mid_refresh(&server, &manager).await;
        assert!(!manager.is_refreshing(), "the refresh was dropped");
        server.hold_refresh_responses(false);
        let (client, url) = (reqwest::Client::new(), server.url("/resource"));
        let sent = manager
            .send(|token| get(client.clone(), url.clone(), token))
            .await;
        assert!(matches!(sent, Err(AuthError::Refresh(_))), "{sent:?}");
        assert!(manager.is_signed_out());
        assert_eq!(server.counters().reuse_detections, 1);
    });
}

/// The ordinary tower stack: `ServiceBuilder::new().timeout(..)` above the
/// `AuthLayer`. 100 requests all time out while the refresh's response is
/// held; the refresh lands anyway, and the next 100 requests succeed with
/// one refresh in all and no reuse.
#[test]
fn a_tower_timeout_above_the_layer_loses_no_refresh() {
    run("a_tower_timeout_above_the_layer", || async {
        let server = TestServer::start(ServerConfig::default());
        let refreshes = Arc::new(AtomicUsize::new(0));
        let manager = manager(&server, true, &refreshes);
        let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let stack = ServiceBuilder::new()
            .timeout(Duration::from_millis(200))
            .layer(AuthLayer::new(manager.clone()))
            .service(hyper);
        let call = |stack: &_| {
            let request = http::Request::get(server.url("/resource"))
                .body(Full::default())
                .expect("request");
            tower::ServiceExt::oneshot(Clone::clone(stack), request)
        };
        server.expire_access_tokens();
        server.hold_refresh_responses(true);
        let calls: Vec<_> = (0..100).map(|_| tokio::spawn(call(&stack))).collect();
        for call in calls {
            let timed_out = call
                .await
                .expect("task")
                .expect_err("held past the timeout");
            assert!(
                timed_out.is::<tower::timeout::error::Elapsed>(),
                "{timed_out}"
            );
        }
        assert_eq!(server.counters().held_responses, 1, "one refresh, held");
        server.release_held_responses();
        server.hold_refresh_responses(false);
        common::until(|| !manager.is_refreshing()).await;

        let calls: Vec<_> = (0..100).map(|_| tokio::spawn(call(&stack))).collect();
        for call in calls {
            let response = call.await.expect("task").expect("answered");
            assert_eq!(response.status(), 200);
            drop(response.into_body().collect().await);
        }
        let counters = server.counters();
        assert_eq!(counters.refresh_calls, 1);
        assert_eq!(counters.reuse_detections, 0);
        assert!(!manager.is_signed_out());
    });
}

/// A refresh rejected on the spawner applies its outcome too: the session is
/// signed out, and later calls fail at once without a token request.
#[test]
fn a_rejected_refresh_on_the_spawner_signs_out() {
    run("a_rejected_refresh_on_the_spawner", || async {
        let server = TestServer::start(ServerConfig::default());
        let refreshes = Arc::new(AtomicUsize::new(0));
        let manager = manager(&server, true, &refreshes);
        server.expire_access_tokens();
        server.reject_refresh(true);
        server.hold_refresh_responses(true);
        send_cancelled_mid_refresh(&server, &manager).await;
        server.release_held_responses();
        server.hold_refresh_responses(false);
        common::until(|| manager.is_signed_out()).await;
        let (client, url) = (reqwest::Client::new(), server.url("/resource"));
        let sent = manager
            .send(|token| get(client.clone(), url.clone(), token))
            .await;
        assert!(matches!(sent, Err(AuthError::SignedOut)), "{sent:?}");
        assert_eq!(
            server.counters().refresh_calls,
            1,
            "no further token request"
        );
        assert_eq!(manager.stats().sign_outs, 1);
        assert_eq!(refreshes.load(Ordering::SeqCst), 1, "the hook saw it");
    });
}
