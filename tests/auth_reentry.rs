//! Calls that could only wait forever panic with a message instead (each of
//! these hung silently before):
//!
//! - the refresher, or a hook running inside the refresh, calls its own
//!   credential, async or blocking, directly or through an HTTP client whose
//!   auth middleware it forgot to bypass with `SkipAuth`;
//! - a blocking twin runs on an executor thread whose task is driving the
//!   same credential's refresh.

mod common;

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use common::{Gate, with_timeout};
use epochflight::auth::{RefreshError, TokenManager};
use futures::FutureExt;

type Manager = TokenManager<u32, String>;

fn message(panic: Box<dyn Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => panic
            .downcast::<&str>()
            .map(|m| m.to_string())
            .unwrap_or_default(),
    }
}

const OWN_REFRESH: &str = "from inside that credential's own refresh";
const DRIVEN_HERE: &str = "whose async task is driving this credential's refresh";

/// A blocking refresher that asks its own manager for a token.
#[test]
fn refresher_calling_its_own_manager_blocking_panics() {
    with_timeout("refresher_own_manager_blocking", || {
        let slot: Arc<OnceLock<Arc<Manager>>> = Arc::default();
        let own = slot.clone();
        let m = Arc::new(TokenManager::new_blocking(move |_| {
            let m = own.get().expect("set");
            let token = m.token_blocking();
            token
                .map(|t| t.value + 1)
                .map_err(|e| RefreshError::Transient(e.to_string()))
        }));
        let _ = slot.set(m.clone());
        let panic = catch_unwind(AssertUnwindSafe(|| m.token_blocking())).unwrap_err();
        assert!(message(panic).contains(OWN_REFRESH));
        // The key is not poisoned: a refresher that behaves works after it.
        m.sign_in(7);
        assert_eq!(m.token_blocking().unwrap().value, 7);
    });
}

/// An async refresher that awaits its own manager's `token()`.
#[test]
fn refresher_awaiting_its_own_manager_panics() {
    with_timeout("refresher_own_manager_async", || {
        let slot: Arc<OnceLock<Arc<Manager>>> = Arc::default();
        let own = slot.clone();
        let m = Arc::new(TokenManager::new(move |_| {
            let m = own.get().expect("set").clone();
            async move {
                let token = m.token().await;
                token
                    .map(|t| t.value + 1)
                    .map_err(|e| RefreshError::Transient(e.to_string()))
            }
        }));
        let _ = slot.set(m.clone());
        let polled = AssertUnwindSafe(m.token()).catch_unwind();
        let panic = futures::executor::block_on(polled).unwrap_err();
        assert!(message(panic).contains(OWN_REFRESH));
    });
}

/// An `on_refresh` hook (it runs inside the refresh) that asks for a token.
#[test]
fn hook_calling_its_own_manager_panics() {
    with_timeout("hook_own_manager", || {
        let slot: Arc<OnceLock<Arc<Manager>>> = Arc::default();
        let own = slot.clone();
        let m = Arc::new(
            TokenManager::new_blocking(|_| Ok::<_, RefreshError<String>>(1)).on_refresh(
                move |_| {
                    let _ = own.get().expect("set").token_blocking();
                },
            ),
        );
        let _ = slot.set(m.clone());
        let panic = catch_unwind(AssertUnwindSafe(|| m.token_blocking())).unwrap_err();
        assert!(message(panic).contains(OWN_REFRESH));
        // The refresh's result was kept (the hook's panic is caught there).
        assert_eq!(m.current().map(|t| t.value), Some(1));
    });
}

/// On a single-threaded runtime, a task leads a refresh that waits for
/// I/O; `token_blocking` on that thread would block the only thread that
/// can finish it.
#[test]
fn blocking_twin_on_the_thread_driving_the_refresh_panics() {
    with_timeout("blocking_on_driving_thread", || {
        let io = Gate::new();
        let m = {
            let io = io.clone();
            Arc::new(TokenManager::with_token(
                move |_| {
                    let io = io.clone();
                    async move {
                        io.wait().await;
                        Ok::<u32, RefreshError<String>>(2)
                    }
                },
                1,
            ))
        };
        let e1 = m.epoch();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let leader = tokio::spawn({
                let m = m.clone();
                async move { m.refresh_if_current(e1).await }
            });
            common::until(|| m.is_refreshing()).await;
            let blocked = catch_unwind(AssertUnwindSafe(|| m.token_blocking()));
            assert!(message(blocked.unwrap_err()).contains(DRIVEN_HERE));
            // From another thread, the same call just waits for the refresh.
            let other = std::thread::spawn({
                let m = m.clone();
                move || m.token_blocking()
            });
            io.open();
            assert_eq!(leader.await.unwrap().unwrap().value, 2);
            assert_eq!(other.join().unwrap().unwrap().value, 2);
        });
    });
}

/// A refresher that sends its token request through the client whose
/// middleware it belongs to, without `SkipAuth`: the panic says so.
#[cfg(feature = "reqwest")]
#[test]
fn refresher_through_its_own_middleware_without_skip_auth_panics() {
    use epochflight::auth::AuthMiddleware;
    use reqwest_middleware::ClientWithMiddleware;

    common::Rt::Tokio.run("refresher_own_middleware", || async {
        let slot: Arc<OnceLock<ClientWithMiddleware>> = Arc::default();
        let own = slot.clone();
        let m = Arc::new(TokenManager::new(move |_stale: Option<String>| {
            let client = own.get().expect("set").clone();
            async move {
                // Forgot `.with_extension(SkipAuth)`.
                let sent = client.post("http://127.0.0.1:9/token").send().await;
                sent.map(|_| "token".to_string())
                    .map_err(|e| RefreshError::Transient(e.to_string()))
            }
        }));
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(AuthMiddleware::new(m))
            .build();
        let _ = slot.set(client.clone());
        let request =
            tokio::spawn(async move { client.get("http://127.0.0.1:9/items").send().await });
        let panic = request.await.unwrap_err().into_panic();
        let message = message(panic);
        assert!(
            message.contains(OWN_REFRESH) && message.contains("SkipAuth"),
            "{message}"
        );
    });
}
