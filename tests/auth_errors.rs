//! Refresher errors that are not `Clone` (`std::io::Error`,
//! `reqwest::Error`): the manager's error type is `Arc<E>`, the refresher
//! returns its own `E` through `?`, and every caller waiting on the failed
//! refresh gets the very same shared error.

mod common;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Gate, Rt, until};
use epochflight::auth::{AuthError, RefreshError, TokenManager};

async fn read_token_file(gate: Arc<Gate>) -> io::Result<String> {
    gate.wait().await;
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "token file",
    ))
}

/// An `io::Error` from the refresher reaches all ten callers of the failed
/// refresh, shared (one allocation, the same error), with its kind intact.
#[test]
fn io_error_reaches_every_waiter_shared() {
    Rt::Tokio.run("io_error_shared", || async {
        let gate = Gate::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let manager: Arc<TokenManager<String, Arc<io::Error>>> = {
            let (gate, calls) = (gate.clone(), calls.clone());
            Arc::new(TokenManager::new(move |_stale| {
                calls.fetch_add(1, Ordering::SeqCst);
                let file = read_token_file(gate.clone());
                async move {
                    // The refresher's own error, shared by `?`.
                    let token = file.await.map_err(RefreshError::Transient)?;
                    Ok(token)
                }
            }))
        };
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let manager = manager.clone();
                tokio::spawn(async move { manager.token().await })
            })
            .collect();
        until(|| calls.load(Ordering::SeqCst) == 1 && manager.is_refreshing()).await;
        let waiting = manager.for_key(&()).stats();
        assert_eq!(waiting.refresh_calls, 1);
        gate.open();
        let mut errors = Vec::new();
        for caller in callers {
            match caller.await.unwrap() {
                Err(AuthError::Refresh(RefreshError::Transient(error))) => errors.push(error),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(errors[0].kind(), io::ErrorKind::PermissionDenied);
        assert!(
            errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
            "one shared error"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    });
}

/// A `reqwest::Error` from the refresher (the token endpoint is down),
/// through the reqwest middleware: the request fails with the middleware
/// error holding `AuthError<Arc<reqwest::Error>>`, found as the middleware's
/// docs say.
#[cfg(feature = "reqwest")]
#[test]
fn reqwest_error_from_the_refresher_reaches_the_caller() {
    use epochflight::auth::AuthMiddleware;

    Rt::Tokio.run("reqwest_error_shared", || async {
        // A port nobody listens on: connecting fails at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let token_url = format!("http://{}/token", closed.local_addr().unwrap());
        drop(closed);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let manager: Arc<TokenManager<String, Arc<reqwest::Error>>> = {
            let http = http.clone();
            Arc::new(TokenManager::new(move |_stale| {
                let request = http.post(token_url.clone()).send();
                async move {
                    let response = request.await.map_err(RefreshError::Transient)?;
                    Ok(response.text().await.map_err(RefreshError::Transient)?)
                }
            }))
        };
        let client = reqwest_middleware::ClientBuilder::new(http)
            .with(AuthMiddleware::new(manager.clone()))
            .build();
        let error = client
            .get("http://127.0.0.1:9/never-sent")
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("expected the middleware's error, got {error:?}");
        };
        match error.downcast_ref::<AuthError<Arc<reqwest::Error>>>() {
            Some(AuthError::Refresh(RefreshError::Transient(e))) => assert!(e.is_connect(), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(manager.stats().refresh_calls, 1);
    });
}

/// ureq's `Err(StatusCode(401))` is unauthorized (ureq reports statuses as
/// errors by default); any other status or error is a transport error.
#[cfg(feature = "ureq")]
#[test]
fn ureq_status_401_error_is_unauthorized() {
    use epochflight::auth::Unauthorized;

    type Called = Result<http::Response<ureq::Body>, ureq::Error>;
    let error = |e: ureq::Error| -> Called { Err(e) };
    assert!(error(ureq::Error::StatusCode(401)).is_unauthorized());
    assert!(!error(ureq::Error::StatusCode(403)).is_unauthorized());
    assert!(!error(ureq::Error::StatusCode(500)).is_unauthorized());
    assert!(!error(ureq::Error::HostNotFound).is_unauthorized());
}

/// reqwest's `error_for_status` turns a 401 into an error that is
/// unauthorized, inside `reqwest_middleware::Error` too.
#[cfg(feature = "reqwest")]
#[test]
fn reqwest_status_401_error_is_unauthorized() {
    use epochflight::auth::Unauthorized;

    let status_error = |status: u16| {
        let response = http::Response::builder().status(status).body("").unwrap();
        reqwest::Response::from(response)
            .error_for_status()
            .unwrap_err()
    };
    let plain = |status| -> reqwest::Result<reqwest::Response> { Err(status_error(status)) };
    assert!(plain(401).is_unauthorized());
    assert!(!plain(403).is_unauthorized());
    let wrapped = |status| -> reqwest_middleware::Result<reqwest::Response> {
        Err(reqwest_middleware::Error::Reqwest(status_error(status)))
    };
    assert!(wrapped(401).is_unauthorized());
    assert!(!wrapped(500).is_unauthorized());
}
