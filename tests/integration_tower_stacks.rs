//! `AuthLayer` inside real tower stacks (a concurrency limit, a buffer, a
//! timeout), and what a replay carries. In-process services stand in for the
//! network: these tests are about the layer's contract with tower, not HTTP.
#![cfg(feature = "tower")]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::with_timeout;
use epochflight::auth::{
    AuthError, AuthLayer, AuthService, NotReplayed, NotReplayedReason, RefreshError, ServiceError,
    SkipAuth, TokenManager,
};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

type Client = BoxCloneSyncService<Request<Full<Bytes>>, Response<String>, Infallible>;
type Limited = AuthService<tower::limit::ConcurrencyLimit<Client>, String, String>;

/// Runs the test's future on a tokio runtime, under the suite's timeout.
fn run<F, Fut>(name: &str, test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    with_timeout(name, move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(test())
    });
}

/// A client whose `/token` answers "fresh" and whose other paths want
/// `Bearer fresh`.
fn client() -> Client {
    BoxCloneSyncService::new(tower::service_fn(|req: Request<Full<Bytes>>| async move {
        if req.uri().path() == "/token" {
            return Ok::<_, Infallible>(Response::new("fresh".to_string()));
        }
        let ok = req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| v == "Bearer fresh");
        let status = if ok { 200 } else { 401 };
        Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap())
    }))
}

/// A manager whose refresher posts `/token` through `stack`, marked
/// `SkipAuth`, as the docs recommend.
fn refreshing_through(
    stack: Arc<OnceLock<Limited>>,
    token: Option<&str>,
) -> Arc<TokenManager<String, String>> {
    let refresh = move |_stale: Option<String>| {
        let stack = stack.get().expect("stack built").clone();
        async move {
            let mut request = Request::post("http://x/token")
                .body(Full::default())
                .unwrap();
            request.extensions_mut().insert(SkipAuth);
            let response = stack
                .oneshot(request)
                .await
                .map_err(|e| RefreshError::Transient(e.to_string()))?;
            Ok::<_, RefreshError<String>>(response.into_body())
        }
    };
    Arc::new(match token {
        Some(token) => TokenManager::with_token(refresh, token.to_string()),
        None => TokenManager::new(refresh),
    })
}

/// Under a concurrency limit of 1, a request waiting at the request gate
/// must not hold the only permit: the refresh it waits for needs it.
#[test]
fn a_limit_inside_the_layer_does_not_deadlock_the_first_fetch() {
    run(
        "a_limit_inside_the_layer_does_not_deadlock_the_first_fetch",
        || async {
            let slot = Arc::new(OnceLock::new());
            let manager = refreshing_through(slot.clone(), None);
            let stack: Limited = ServiceBuilder::new()
                .layer(AuthLayer::new(manager.clone()))
                .concurrency_limit(1)
                .service(client());
            let _ = slot.set(stack.clone());
            let request = Request::get("http://x/resource")
                .body(Full::default())
                .unwrap();
            let response = stack.oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(manager.stats().refresh_calls, 1);
        },
    );
}

/// The same with an expired token and two concurrent requests: one 401
/// starts the refresh, the other waits at the gate without a permit.
#[test]
fn a_limit_inside_the_layer_does_not_deadlock_a_storm() {
    run(
        "a_limit_inside_the_layer_does_not_deadlock_a_storm",
        || async {
            let slot = Arc::new(OnceLock::new());
            let manager = refreshing_through(slot.clone(), Some("old"));
            let stack: Limited = ServiceBuilder::new()
                .layer(AuthLayer::new(manager.clone()))
                .concurrency_limit(1)
                .service(client());
            let _ = slot.set(stack.clone());
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let request = Request::get(format!("http://x/r/{i}"))
                        .body(Full::default())
                        .unwrap();
                    tokio::spawn(stack.clone().oneshot(request))
                })
                .collect();
            for task in tasks {
                assert_eq!(task.await.unwrap().unwrap().status(), 200);
            }
            assert_eq!(manager.stats().refresh_calls, 1);
        },
    );
}

/// The layer composes with middleware whose errors are `BoxError`: under a
/// `Timeout`, over a `Buffer`.
#[test]
fn the_layer_sits_between_timeout_and_buffer() {
    run("the_layer_sits_between_timeout_and_buffer", || async {
        let manager = Arc::new(TokenManager::with_token(
            |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("fresh".to_string()) },
            "old".to_string(),
        ));
        let stack = ServiceBuilder::new()
            .timeout(Duration::from_secs(30))
            .layer(AuthLayer::new(manager.clone()))
            .buffer(16)
            .service(client());
        let request = Request::get("http://x/resource")
            .body(Full::default())
            .unwrap();
        let response = stack.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            (manager.stats().refresh_calls, manager.stats().retries),
            (1, 1)
        );
    });
}

/// What the inner service saw of each attempt.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    custom: Option<String>,
    extension: Option<&'static str>,
    body: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Marker(&'static str);

/// A replay is the same request (method, URI, headers, extensions, body)
/// with only the new token in place of the old.
#[test]
fn a_replay_carries_the_whole_request() {
    run("a_replay_carries_the_whole_request", || async {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let record = record.clone();
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_string())
                };
                let mut attempt = Seen {
                    method: req.method().to_string(),
                    path: req.uri().path().to_string(),
                    authorization: header("authorization"),
                    content_type: header("content-type"),
                    custom: header("x-request-id"),
                    extension: req.extensions().get::<Marker>().map(|m| m.0),
                    body: Bytes::new(),
                };
                attempt.body = req.into_body().collect().await.unwrap().to_bytes();
                let status = if attempt.authorization.as_deref() == Some("Bearer fresh") {
                    200
                } else {
                    401
                };
                record.lock().unwrap().push(attempt);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(String::new())
                        .unwrap(),
                )
            }
        });
        let manager = Arc::new(TokenManager::with_token(
            |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("fresh".to_string()) },
            "old".to_string(),
        ));
        let service = AuthLayer::new(manager).layer(inner);
        let mut request = Request::post("http://x/orders?id=7")
            .header(CONTENT_TYPE, "application/json")
            .header("x-request-id", "abc-123")
            .body(Full::new(Bytes::from_static(br#"{"qty":3}"#)))
            .unwrap();
        request.extensions_mut().insert(Marker("kept"));
        assert_eq!(service.oneshot(request).await.unwrap().status(), 200);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "sent once, replayed once");
        let (first, replay) = (&seen[0], &seen[1]);
        assert_eq!(first.authorization.as_deref(), Some("Bearer old"));
        assert_eq!(replay.authorization.as_deref(), Some("Bearer fresh"));
        let without_token = |s: &Seen| Seen {
            authorization: None,
            ..s.clone()
        };
        assert_eq!(without_token(first), without_token(replay));
        assert_eq!(replay.body, Bytes::from_static(br#"{"qty":3}"#));
        assert_eq!(replay.extension, Some("kept"));
        assert_eq!(replay.custom.as_deref(), Some("abc-123"));
    });
}

/// A streaming body's 401 is returned with its reason even when the refresh
/// fails; the failure rides along in the extensions. Nothing is lost.
#[test]
fn a_stream_401_is_returned_when_the_refresh_fails() {
    run(
        "a_stream_401_is_returned_when_the_refresh_fails",
        || async {
            type Stream =
                futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
            let inner = tower::service_fn(|_req: Request<StreamBody<Stream>>| async {
                let response = Response::builder()
                    .status(401)
                    .body("details".to_string())
                    .unwrap();
                Ok::<_, Infallible>(response)
            });
            let manager = Arc::new(TokenManager::with_token(
                |_stale: Option<String>| async {
                    Err::<String, _>(RefreshError::Transient("503".to_string()))
                },
                "old".to_string(),
            ));
            let service = AuthLayer::new(manager.clone()).layer(inner);
            let body = StreamBody::new(futures::stream::iter(vec![Ok(Frame::data(Bytes::from(
                "x",
            )))]));
            let response = service
                .oneshot(Request::post("http://x/upload").body(body).unwrap())
                .await
                .unwrap();
            assert_eq!(
                (response.status().as_u16(), response.body().as_str()),
                (401, "details")
            );
            let reason = response.extensions().get::<NotReplayed>().map(|n| n.reason);
            assert_eq!(reason, Some(NotReplayedReason::BodyNotReplayable));
            let failed = response.extensions().get::<AuthError<String>>();
            assert_eq!(
                failed,
                Some(&AuthError::Refresh(RefreshError::Transient(
                    "503".to_string()
                )))
            );
            assert_eq!(manager.stats().refresh_calls, 1);
        },
    );
}

/// A request body type this crate knows nothing about, as tonic's or axum's
/// are to it: it cannot implement `ReplayBody` for it.
#[derive(Debug, PartialEq)]
struct Opaque(&'static str);

/// An inner service that wants `Bearer fresh` and records the bodies it got.
fn recording_opaque(
    seen: Arc<Mutex<Vec<&'static str>>>,
) -> impl tower::Service<Request<Opaque>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Opaque>| {
        let seen = seen.clone();
        async move {
            let ok = req
                .headers()
                .get(AUTHORIZATION)
                .is_some_and(|v| v == "Bearer fresh");
            seen.lock().unwrap().push(req.into_body().0);
            let status = if ok { 200 } else { 401 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(String::new())
                    .unwrap(),
            )
        }
    })
}

fn fresh_manager() -> Arc<TokenManager<String, String>> {
    Arc::new(TokenManager::with_token(
        |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("fresh".to_string()) },
        "old".to_string(),
    ))
}

/// Any body type replays with a copy function of the user's.
#[test]
fn any_body_replays_with_a_function() {
    run("any_body_replays_with_a_function", || async {
        let seen: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let layer =
            AuthLayer::new(fresh_manager()).replay_with(|body: &Opaque| Some(Opaque(body.0)));
        let service = layer.layer(recording_opaque(seen.clone()));
        let response = service
            .oneshot(
                Request::post("http://x/rpc")
                    .body(Opaque("payload"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(*seen.lock().unwrap(), ["payload", "payload"]);
    });
}

/// Any body type works with `never_replay`: the 401 comes back with its
/// reason, after the refresh, so the caller's retry uses the new token. With
/// a gRPC classifier (`grpc-status: 16` on an HTTP 200), as for tonic.
#[test]
fn any_body_works_without_replay_and_with_a_grpc_classifier() {
    run(
        "any_body_works_without_replay_and_with_a_grpc_classifier",
        || async {
            let manager = fresh_manager();
            let grpc = tower::service_fn(|req: Request<Opaque>| async move {
                let ok = req
                    .headers()
                    .get(AUTHORIZATION)
                    .is_some_and(|v| v == "Bearer fresh");
                let status = if ok { "0" } else { "16" };
                let response = Response::builder()
                    .status(200)
                    .header("grpc-status", status)
                    .body(String::new());
                Ok::<_, Infallible>(response.unwrap())
            });
            let layer = AuthLayer::new(manager.clone())
                .never_replay()
                .with_classifier(|head| head.headers.get("grpc-status").is_some_and(|s| s == "16"));
            let service = layer.layer(grpc);
            let first = service
                .clone()
                .oneshot(Request::post("http://x/rpc").body(Opaque("a")).unwrap())
                .await
                .unwrap();
            assert_eq!(first.headers()["grpc-status"], "16");
            let reason = first.extensions().get::<NotReplayed>().map(|n| n.reason);
            assert_eq!(reason, Some(NotReplayedReason::BodyNotReplayable));
            assert_eq!(
                manager.stats().refresh_calls,
                1,
                "refreshed for the caller's retry"
            );
            let retry = service
                .oneshot(Request::post("http://x/rpc").body(Opaque("a")).unwrap())
                .await
                .unwrap();
            assert_eq!(retry.headers()["grpc-status"], "0");
            assert_eq!(manager.stats().refresh_calls, 1);
        },
    );
}

/// A service whose first `poll_ready` succeeds and every later one fails,
/// and whose responses are all `401`.
#[derive(Clone, Default)]
struct ReadyOnce {
    polls: Arc<std::sync::atomic::AtomicUsize>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl tower::Service<Request<Full<Bytes>>> for ReadyOnce {
    type Response = Response<String>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Response<String>, &'static str>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        use std::sync::atomic::Ordering::SeqCst;
        std::task::Poll::Ready(match self.polls.fetch_add(1, SeqCst) {
            0 => Ok(()),
            _ => Err("not ready for the replay"),
        })
    }

    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let response = Response::builder().status(401).body(String::new());
        std::future::ready(Ok(response.unwrap()))
    }
}

/// A replay the inner service was never ready for is not counted as a
/// retry: `stats().retries` counts requests sent again.
#[test]
fn a_replay_that_never_got_a_ready_service_is_not_counted() {
    run(
        "a_replay_that_never_got_a_ready_service_is_not_counted",
        || async {
            let manager = Arc::new(TokenManager::with_token(
                |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("fresh".into()) },
                "stale".to_string(),
            ));
            let inner = ReadyOnce::default();
            let service = AuthLayer::new(manager.clone()).layer(inner.clone());
            let request = Request::get("http://x/resource")
                .body(Full::default())
                .unwrap();
            let error = service.oneshot(request).await.unwrap_err();
            assert!(
                matches!(error, ServiceError::Service("not ready for the replay")),
                "{error:?}"
            );
            use std::sync::atomic::Ordering::SeqCst;
            assert_eq!(
                inner.calls.load(SeqCst),
                1,
                "only the first attempt was sent"
            );
            assert_eq!(manager.stats().refresh_calls, 1);
            assert_eq!(manager.stats().retries, 0, "no request was sent again");
        },
    );
}
