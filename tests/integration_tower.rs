//! `auth::AuthLayer` over hyper-util's legacy client, against the loopback
//! OAuth-style server with rotating refresh tokens (tests/support/server.rs).
//!
//! The stack under test is `AuthLayer → Held → hyper_util Client`. `Held` is a
//! test service that holds a request before it is sent, or its response
//! before it is returned, until a gate opens (by request extension): the
//! interleavings are forced with it and with the server's arrival counts,
//! never with sleeps. Every test runs under `common::with_timeout`.
#![cfg(feature = "tower")]

#[path = "support/server.rs"]
mod server;

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Gate, Rt, until};
use epochflight::auth::{
    AuthError, AuthLayer, AuthService, Credential, NotReplayed, NotReplayedReason, RefreshError,
    ServiceError, SkipAuth, TokenManager,
};
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use server::{ServerConfig, TestServer};
use tower::{Layer, Service, ServiceExt};

/// A buffered body (replayable) or a stream (not).
type ReqBody = Either<Full<Bytes>, BoxBody<Bytes, Infallible>>;
type Hyper = Client<HttpConnector, ReqBody>;
type Stack = AuthService<Held<Hyper>, Tokens, String>;
type Manager = Arc<TokenManager<Tokens, String>>;

/// How long the server holds a late 401: far longer than a refresh and a
/// replay on loopback, so the test can assert the order it claims.
const LATE: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ helpers

#[derive(Clone, Debug)]
struct Tokens {
    access: String,
    refresh: String,
}

/// Sends the access token as `Authorization: Bearer <access>`.
impl Credential for Tokens {
    fn apply(&self, headers: &mut HeaderMap) {
        self.access.apply(headers);
    }
}

/// Request extension: hold the request before sending it until the gate opens.
#[derive(Clone)]
struct HoldBeforeSend(Arc<Gate>);

/// Request extension: hold the response until the gate opens.
#[derive(Clone)]
struct HoldResponse(Arc<Gate>);

/// A test service between the layer and the client: counts the requests that
/// reached it (they have passed the request gate and carry their token) and
/// holds them as their extensions say.
#[derive(Clone)]
struct Held<S> {
    inner: S,
    reached: Arc<AtomicUsize>,
}

impl<S, B> Service<Request<B>> for Held<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let before = request.extensions().get::<HoldBeforeSend>().cloned();
        let after = request.extensions().get::<HoldResponse>().cloned();
        self.reached.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if let Some(HoldBeforeSend(gate)) = before {
                gate.wait().await;
            }
            let response = inner.call(request).await;
            if let Some(HoldResponse(gate)) = after {
                gate.wait().await;
            }
            response
        })
    }
}

fn hyper_client() -> Hyper {
    Client::builder(TokioExecutor::new()).build_http()
}

fn held(client: Hyper) -> Held<Hyper> {
    Held {
        inner: client,
        reached: Arc::new(AtomicUsize::new(0)),
    }
}

fn full(body: impl Into<Bytes>) -> ReqBody {
    Either::Left(Full::new(body.into()))
}

/// A one-chunk stream: cannot be copied for a replay.
fn stream(body: &'static str) -> ReqBody {
    let chunks = futures::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from(body)))]);
    Either::Right(StreamBody::new(chunks).boxed())
}

fn get(url: String) -> Request<ReqBody> {
    Request::get(url).body(full("")).unwrap()
}

/// The string value of `"field":"..."` in a flat JSON object.
fn json_field(json: &str, field: &str) -> String {
    let key = format!("\"{field}\":\"");
    let start = json.find(&key).map_or(json.len(), |i| i + key.len());
    let end = json[start..].find('"').map_or(json.len(), |i| start + i);
    json[start..end].to_string()
}

/// `POST /token` through `service`, marked with `SkipAuth` (which a service
/// without the layer ignores).
async fn post_token<S>(
    service: S,
    url: String,
    refresh: String,
) -> Result<Tokens, RefreshError<String>>
where
    S: Service<Request<ReqBody>, Response = Response<Incoming>>,
    S::Error: std::fmt::Display,
{
    let body = format!("grant_type=refresh_token&refresh_token={refresh}");
    let mut request = Request::post(url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(full(body))
        .unwrap();
    request.extensions_mut().insert(SkipAuth);
    let transient = |e: String| RefreshError::Transient(e);
    let response = service
        .oneshot(request)
        .await
        .map_err(|e| transient(e.to_string()))?;
    let status = response.status();
    let text = response
        .into_body()
        .collect()
        .await
        .map_err(|e| transient(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&text).into_owned();
    match status.as_u16() {
        200 => Ok(Tokens {
            access: json_field(&text, "access_token"),
            refresh: json_field(&text, "refresh_token"),
        }),
        400..=499 => Err(RefreshError::Rejected(text)),
        _ => Err(transient(text)),
    }
}

/// A manager signed in with `tokens` whose refresher posts to the server
/// with a plain client (no layer).
fn manager(server: &TestServer, client: Hyper, tokens: Tokens) -> Manager {
    let url = server.url("/token");
    Arc::new(TokenManager::with_token(
        move |stale: Option<Tokens>| {
            let (client, url) = (client.clone(), url.clone());
            async move { post_token(client, url, stale.expect("signed in").refresh).await }
        },
        tokens,
    ))
}

/// A server whose initial access token has expired, and that session.
fn expired_server(config: ServerConfig) -> (TestServer, Tokens) {
    let server = TestServer::start(config);
    let (access, refresh) = server.initial_tokens();
    server.expire_access_tokens();
    (server, Tokens { access, refresh })
}

/// The usual set-up: an expired session, a manager, and the layered stack.
fn setup() -> (TestServer, Manager, Stack) {
    let (server, tokens) = expired_server(ServerConfig::default());
    let client = hyper_client();
    let manager = manager(&server, client.clone(), tokens);
    let stack = AuthLayer::new(manager.clone()).layer(held(client));
    (server, manager, stack)
}

fn not_replayed<B>(response: &Response<B>) -> Option<NotReplayedReason> {
    response.extensions().get::<NotReplayed>().map(|n| n.reason)
}

// -------------------------------------------------------------------- tests

/// 200 requests sent concurrently with an expired token: every one gets a
/// 401, and the 200 unauthorized responses cause exactly one refresh; no
/// refresh token is presented twice.
#[test]
fn storm_after_expiry_refreshes_once() {
    Rt::Tokio.run("tower storm", || async {
        const N: usize = 200;
        let (server, manager, stack) = setup();
        let reached = stack.get_ref().reached.clone();
        let release = Gate::new();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let mut request = get(server.url(&format!("/resource/{i}")));
                request
                    .extensions_mut()
                    .insert(HoldBeforeSend(release.clone()));
                tokio::spawn(stack.clone().oneshot(request))
            })
            .collect();
        // All N passed the request gate with the expired token before any is sent.
        until(|| reached.load(Ordering::SeqCst) >= N).await;
        release.open();
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        let c = server.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!(
            (c.resource_unauthorized, c.resource_ok),
            (N as u64, N as u64)
        );
        let stats = manager.stats();
        assert_eq!((stats.refresh_calls, stats.retries), (1, N as u64));
    });
}

/// A late 401: request B was sent with the old token, and its 401 comes back
/// only after request A's 401 caused a refresh that has finished. B takes the
/// new token and refreshes nothing. Forced deterministically: B's response is
/// held in the stack until A is done.
#[test]
fn late_401_reuses_the_finished_refresh() {
    Rt::Tokio.run("tower late 401", || async {
        let (server, manager, stack) = setup();
        let release_b = Gate::new();
        let mut b = get(server.url("/resource/b"));
        b.extensions_mut().insert(HoldResponse(release_b.clone()));
        let b = tokio::spawn(stack.clone().oneshot(b));
        assert!(server.wait_for_arrivals_async(1, WAIT).await);

        let a = stack.clone().oneshot(get(server.url("/resource/a")));
        assert_eq!(a.await.unwrap().status(), StatusCode::OK);
        assert_eq!(server.successful_refreshes(), 1);
        assert!(!b.is_finished(), "B's 401 is still held");

        release_b.open();
        assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
        let c = server.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!((c.resource_unauthorized, c.resource_ok), (2, 2));
        assert_eq!(manager.stats().retries, 2);
    });
}

/// The same with the server holding B's 401 back (`set_unauthorized_delay`),
/// as a slow proxy would. The delay applies to B only: it is read when B's
/// verdict is fixed, and reset before A is sent.
#[test]
fn late_401_held_by_the_server_refreshes_once() {
    Rt::Tokio.run("tower late 401 (server delay)", || async {
        let (server, manager, stack) = setup();
        server.set_unauthorized_delay(LATE);
        let b = tokio::spawn(stack.clone().oneshot(get(server.url("/resource/b"))));
        assert!(server.wait_for_arrivals_async(1, WAIT).await);
        server.set_unauthorized_delay(Duration::ZERO);

        let a = stack.clone().oneshot(get(server.url("/resource/a")));
        assert_eq!(a.await.unwrap().status(), StatusCode::OK);
        // Asserted, not assumed: B's 401 comes back after the refresh ended.
        assert_eq!(server.successful_refreshes(), 1);
        assert!(!b.is_finished(), "B's 401 must still be held: raise LATE");
        assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
        let c = server.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!(manager.stats().refresh_calls, 1);
    });
}

/// `401` with `insufficient_scope`: a new token would not help. Returned as
/// is, sent once, nothing refreshed.
#[test]
fn insufficient_scope_is_returned_as_is() {
    Rt::Tokio.run("tower insufficient_scope", || async {
        let (server, manager, stack) = setup();
        let response = stack.oneshot(get(server.url("/scope"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()[WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.contains("insufficient_scope"), "{challenge}");
        assert_eq!(not_replayed(&response), None);
        assert_eq!((server.hits("/scope"), server.refresh_calls()), (1, 0));
        assert_eq!(manager.stats().retries, 0);
    });
}

/// `403`: returned as is, sent once, nothing refreshed.
#[test]
fn forbidden_is_returned_as_is() {
    Rt::Tokio.run("tower 403", || async {
        let (server, manager, stack) = setup();
        let response = stack.oneshot(get(server.url("/forbidden"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(not_replayed(&response), None);
        assert_eq!((server.hits("/forbidden"), server.refresh_calls()), (1, 0));
        assert_eq!(manager.stats().retries, 0);
    });
}

/// A streaming body cannot be sent twice: the request goes once, and its 401
/// comes back with `NotReplayed { BodyNotReplayable }`. The token was
/// refreshed meanwhile, so sending it again (with a new stream) succeeds.
#[test]
fn streaming_body_is_sent_once_and_its_401_returned_with_the_reason() {
    Rt::Tokio.run("tower streaming body", || async {
        let (server, manager, stack) = setup();
        let upload = || {
            Request::post(server.url("/resource/upload"))
                .body(stream("chunk"))
                .unwrap()
        };
        let response = stack.clone().oneshot(upload()).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::BodyNotReplayable)
        );
        assert_eq!(server.hits("/resource/upload"), 1);
        assert_eq!((server.refresh_calls(), manager.stats().retries), (1, 0));

        let again = stack.oneshot(upload()).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(not_replayed(&again), None);
        assert_eq!(
            (server.hits("/resource/upload"), server.refresh_calls()),
            (2, 1)
        );
    });
}

/// A buffered `POST` is replayed: non-idempotent methods too, since the
/// server rejected the request before acting on it.
#[test]
fn buffered_post_is_replayed() {
    Rt::Tokio.run("tower buffered POST", || async {
        let (server, manager, stack) = setup();
        let request = Request::post(server.url("/resource/items"))
            .header(CONTENT_TYPE, "application/json")
            .body(full(r#"{"name":"x"}"#))
            .unwrap();
        let response = stack.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(br#"{"resource":"/resource/items""#));
        assert_eq!(
            (server.hits("/resource/items"), server.refresh_calls()),
            (2, 1)
        );
        assert_eq!(manager.stats().retries, 1);
    });
}

/// An endpoint that refuses every token: one refresh, one replay, and the
/// second 401 is returned with `NotReplayed { AlreadyReplayed }`. Never a loop.
#[test]
fn second_401_is_returned_as_already_replayed() {
    Rt::Tokio.run("tower second 401", || async {
        let (server, manager, stack) = setup();
        let response = stack.oneshot(get(server.url("/always401"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::AlreadyReplayed)
        );
        assert_eq!((server.hits("/always401"), server.refresh_calls()), (2, 1));
        assert_eq!(manager.stats().retries, 1);
    });
}

/// The refresher posts its token request through the very layered service it
/// refreshes for, marked with `SkipAuth`: a storm completes with one refresh
/// and no deadlock (an unmarked token request would wait at the request gate
/// for its own refresh).
#[test]
fn refresher_through_the_layered_service_with_skip_auth() {
    Rt::Tokio.run("tower refresher through the layer", || async {
        const N: usize = 20;
        let (server, tokens) = expired_server(ServerConfig::default());
        let slot: Arc<OnceLock<Stack>> = Arc::new(OnceLock::new());
        let url = server.url("/token");
        let from_refresher = slot.clone();
        let manager = Arc::new(TokenManager::with_token(
            move |stale: Option<Tokens>| {
                let stack = from_refresher.get().expect("stack built").clone();
                let url = url.clone();
                async move { post_token(stack, url, stale.expect("signed in").refresh).await }
            },
            tokens,
        ));
        let stack = AuthLayer::new(manager.clone()).layer(held(hyper_client()));
        let _ = slot.set(stack.clone());

        let reached = stack.get_ref().reached.clone();
        let release = Gate::new();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let mut request = get(server.url(&format!("/resource/{i}")));
                request
                    .extensions_mut()
                    .insert(HoldBeforeSend(release.clone()));
                tokio::spawn(stack.clone().oneshot(request))
            })
            .collect();
        until(|| reached.load(Ordering::SeqCst) >= N).await;
        release.open();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        // The token request went through the stack, untouched by the layer.
        assert_eq!(reached.load(Ordering::SeqCst), 2 * N + 1);
        let c = server.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (1, 1, 0)
        );
        assert_eq!(manager.stats().refresh_calls, 1);
    });
}

/// A rejected refresh is an error of the call (`ServiceError::Auth`) and
/// signs the session out; later calls fail at once, without network traffic.
#[test]
fn rejected_refresh_signs_out() {
    Rt::Tokio.run("tower rejected refresh", || async {
        let (server, manager, stack) = setup();
        server.reject_refresh(true);
        let error = stack
            .clone()
            .oneshot(get(server.url("/resource")))
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                ServiceError::Auth(AuthError::Refresh(RefreshError::Rejected(_)))
            ),
            "{error:?}"
        );
        assert!(manager.is_signed_out());
        let before = server.requests_total();
        let error = stack
            .oneshot(get(server.url("/resource")))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ServiceError::Auth(AuthError::SignedOut)),
            "{error:?}"
        );
        assert_eq!(server.requests_total(), before);
    });
}

/// A custom classifier replaces the default: here a 403 counts as "refresh
/// and send again".
#[test]
fn custom_classifier_decides_what_is_unauthorized() {
    Rt::Tokio.run("tower custom classifier", || async {
        let (server, tokens) = expired_server(ServerConfig::default());
        let client = hyper_client();
        let manager = manager(&server, client.clone(), tokens);
        let layer = AuthLayer::new(manager.clone()).with_classifier(|head| head.status == 403);
        let stack = layer.layer(held(client));
        let response = stack
            .clone()
            .oneshot(get(server.url("/forbidden")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::AlreadyReplayed)
        );
        assert_eq!((server.hits("/forbidden"), server.refresh_calls()), (2, 1));
        // A 401 is not "unauthorized" for this classifier: returned as is.
        let response = stack.oneshot(get(server.url("/always401"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!((server.hits("/always401"), server.refresh_calls()), (1, 1));
    });
}

/// `with_attach` puts the token where the API wants it, here a custom header
/// (the server reads only `Authorization`, so the replay is refused too: the
/// point is what went on the wire).
#[test]
fn custom_attach_hook_is_used_for_both_attempts() {
    Rt::Tokio.run("tower custom attach", || async {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let echo = tower::service_fn(move |request: Request<String>| {
            let header = request.headers().get("x-token").cloned();
            log.lock()
                .unwrap()
                .push((header, request.headers().get(AUTHORIZATION).cloned()));
            async { Ok::<_, Infallible>(Response::builder().status(401).body(()).unwrap()) }
        });
        let manager = Arc::new(TokenManager::with_token(
            |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("new".to_string()) },
            "old".to_string(),
        ));
        let layer = AuthLayer::with_attach(
            manager,
            |token: &String, head: &mut http::request::Parts| {
                head.headers.insert("x-token", token.parse().unwrap());
            },
        );
        let request = Request::get("http://api.test/")
            .body(String::new())
            .unwrap();
        let response = layer.layer(echo).oneshot(request).await.unwrap();
        assert_eq!(
            not_replayed(&response),
            Some(NotReplayedReason::AlreadyReplayed)
        );
        let seen = seen.lock().unwrap();
        let tokens: Vec<_> = seen
            .iter()
            .map(|(t, a)| (t.clone().unwrap(), a.is_none()))
            .collect();
        let expected =
            [("old", true), ("new", true)].map(|(t, a)| (HeaderValue::from_static(t), a));
        assert_eq!(tokens, expected);
    });
}

/// tower's readiness contract: `call` only on a service whose `poll_ready`
/// returned ready, for the first attempt and for the replay (the service is
/// moved into the future, and polled ready again before the replay).
#[test]
fn inner_service_is_polled_ready_before_every_call() {
    /// Ready only after `poll_ready`; a clone starts not ready.
    struct Strict {
        ready: bool,
        calls: Arc<AtomicUsize>,
    }
    impl Clone for Strict {
        fn clone(&self) -> Self {
            Strict {
                ready: false,
                calls: self.calls.clone(),
            }
        }
    }
    impl Service<Request<String>> for Strict {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<String>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.ready = true;
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: Request<String>) -> Self::Future {
            assert!(std::mem::take(&mut self.ready), "call without poll_ready");
            self.calls.fetch_add(1, Ordering::SeqCst);
            let ok = request.headers()[AUTHORIZATION] == "Bearer new";
            let status = if ok { 200 } else { 401 };
            std::future::ready(Ok(Response::builder()
                .status(status)
                .body(String::new())
                .unwrap()))
        }
    }
    Rt::Tokio.run("tower poll_ready discipline", || async {
        let calls = Arc::new(AtomicUsize::new(0));
        let manager = Arc::new(TokenManager::with_token(
            |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("new".to_string()) },
            "old".to_string(),
        ));
        let mut service = AuthLayer::new(manager).layer(Strict {
            ready: false,
            calls: calls.clone(),
        });
        for _ in 0..2 {
            let request = Request::get("http://api.test/")
                .body(String::new())
                .unwrap();
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        // First request: 401 + replay; second: straight through.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    });
}

/// The service's future is `Send` (it runs on multi-threaded executors) and
/// the layered client is a regular tower service.
#[test]
fn response_future_is_send() {
    fn assert_send<F: Send + 'static>(_: &F) {}
    Rt::Tokio.run("tower future is Send", || async {
        let (server, _manager, mut stack) = setup();
        let future = stack
            .ready()
            .await
            .unwrap()
            .call(get(server.url("/resource")));
        assert_send(&future);
        assert_eq!(future.await.unwrap().status(), StatusCode::OK);
    });
}
