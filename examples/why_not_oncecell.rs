//! Why not `Mutex` + `OnceCell`, or moka? Two situations a token refresh
//! meets, counted for three ways of sharing one refresh:
//!
//! - **`Mutex` + `OnceCell`**: the hand-rolled pattern, a
//!   `Mutex<Arc<tokio::sync::OnceCell<Token>>>` swapped for a fresh cell at
//!   each refresh, callers awaiting `get_or_try_init(refresh)` on it. One
//!   refresh is one cell, which is what is measured here.
//! - **moka**: `moka::future::Cache::try_get_with(key, refresh)` (and
//!   `get_with` for the infallible case), which coalesces concurrent calls.
//! - **epochflight**: `auth::TokenManager::refresh_if_current(epoch)`.
//!
//! 1. *A failed refresh with 50 waiters*: the token endpoint is down. How
//!    many refresh requests do 50 concurrent callers make?
//! 2. *A cancelled refresher with a waiter*: the caller running the refresh
//!    is dropped (a timeout, a client that went away) after its request
//!    left; another caller waits. How many refresh requests reach the
//!    server? With rotating refresh tokens the second one presents a used
//!    refresh token, and the server revokes the session.
//!
//! Each situation is forced, not timed: every caller is polled once (so all
//! are waiting) while the first refresh is held at a gate; then the gate
//! opens. Nothing here depends on the machine's speed.
//!
//! Run: `cargo run --example why_not_oncecell`

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;

use epochflight::auth::{RefreshError, TokenManager};
use futures::future::join_all;
use futures::poll;
use tokio::sync::{Notify, OnceCell};

const WAITERS: usize = 50;

/// A stand-in token endpoint: counts the refresh requests it receives; the
/// first one waits at a gate.
#[derive(Default)]
struct Endpoint {
    requests: AtomicUsize,
    open: AtomicBool,
    opened: Notify,
}

impl Endpoint {
    /// One refresh request, answered with `answer` once the gate is open.
    async fn refresh<T>(&self, answer: T) -> T {
        self.requests.fetch_add(1, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            let opened = self.opened.notified();
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            opened.await;
        }
        answer
    }

    fn open_gate(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

type Failure = &'static str;

/// Situation 1 for one way of sharing: `call` is one caller's request for
/// the token, failing with the endpoint down. Returns (refresh requests,
/// callers that got the error).
async fn failed_refresh<F, Fut, T>(endpoint: &Endpoint, call: F) -> (usize, usize)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut callers = pin!(join_all((0..WAITERS).map(|_| call())));
    // Every caller polled once: the first refresh is in flight, held at the
    // gate, and the other 49 callers wait for it.
    assert!(poll!(callers.as_mut()).is_pending());
    assert_eq!(endpoint.requests(), 1);
    endpoint.open_gate();
    let results = callers.await;
    let errors = results.iter().filter(|r| r.is_err()).count();
    (endpoint.requests(), errors)
}

/// Situation 2 for one way of sharing: the first caller is dropped while its
/// refresh request is out; a second caller waits for the token. Returns the
/// refresh requests made.
async fn cancelled_refresher<F, Fut, T>(endpoint: &Endpoint, call: F) -> usize
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
{
    let mut leader = Box::pin(call());
    assert!(poll!(leader.as_mut()).is_pending());
    let mut waiter = pin!(call());
    assert!(poll!(waiter.as_mut()).is_pending());
    assert_eq!(endpoint.requests(), 1);
    drop(leader); // its request already left
    endpoint.open_gate();
    match poll!(waiter.as_mut()) {
        Poll::Ready(_) => {}
        Poll::Pending => {
            waiter.await;
        }
    }
    endpoint.requests()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // 1. A failed refresh with 50 waiters.
    let once_cell = {
        let endpoint = Endpoint::default();
        let cell: OnceCell<String> = OnceCell::new();
        failed_refresh(&endpoint, || {
            cell.get_or_try_init(|| endpoint.refresh(Err::<String, _>("503")))
        })
        .await
    };
    let moka = {
        let endpoint = Endpoint::default();
        let cache: moka::future::Cache<(), String> = moka::future::Cache::new(1);
        failed_refresh(&endpoint, || async {
            cache
                .try_get_with((), endpoint.refresh(Err::<String, Failure>("503")))
                .await
                .map_err(|_| "503")
        })
        .await
    };
    let ours = {
        let endpoint = Arc::new(Endpoint::default());
        let refresher = endpoint.clone();
        let manager = TokenManager::with_token(
            move |_stale: Option<String>| {
                let endpoint = refresher.clone();
                async move {
                    let answer = Err(RefreshError::Transient("503"));
                    endpoint.refresh(answer).await
                }
            },
            "expired".to_string(),
        );
        let seen = manager.epoch();
        let result = failed_refresh(&endpoint, || async {
            manager.refresh_if_current(seen).await.map_err(|_| "503")
        })
        .await;
        assert_eq!(manager.stats().refresh_calls, 1);
        result
    };

    // 2. A cancelled refresher with a waiter.
    let once_cell_cancel = {
        let endpoint = Endpoint::default();
        let cell: OnceCell<String> = OnceCell::new();
        cancelled_refresher(&endpoint, || {
            cell.get_or_init(|| endpoint.refresh("token-2".to_string()))
        })
        .await
    };
    let moka_cancel = {
        let endpoint = Endpoint::default();
        let cache: moka::future::Cache<(), String> = moka::future::Cache::new(1);
        cancelled_refresher(&endpoint, || {
            cache.get_with((), endpoint.refresh("token-2".to_string()))
        })
        .await
    };
    let ours_cancel = {
        let endpoint = Arc::new(Endpoint::default());
        let refresher = endpoint.clone();
        let manager = TokenManager::with_token(
            move |_stale: Option<String>| {
                let endpoint = refresher.clone();
                async move {
                    let answer = Ok::<_, RefreshError<Failure>>("token-2".to_string());
                    endpoint.refresh(answer).await
                }
            },
            "expired".to_string(),
        );
        let seen = manager.epoch();
        let requests = cancelled_refresher(&endpoint, || manager.refresh_if_current(seen)).await;
        assert_eq!(manager.current().unwrap().value, "token-2");
        requests
    };

    println!("{WAITERS} concurrent callers; the token endpoint answers 503:");
    println!(
        "  {:<22} {:>16} {:>22}",
        "", "refresh requests", "callers given the error"
    );
    for (name, (requests, errors)) in [
        ("Mutex + OnceCell", once_cell),
        ("moka try_get_with", moka),
        ("epochflight", ours),
    ] {
        println!("  {name:<22} {requests:>16} {errors:>22}");
    }
    println!(
        "\nThe caller running the refresh is dropped after its request left; one caller waits:"
    );
    println!("  {:<22} {:>16}", "", "refresh requests");
    for (name, requests) in [
        ("Mutex + OnceCell", once_cell_cancel),
        ("moka get_with", moka_cancel),
        ("epochflight", ours_cancel),
    ] {
        println!("  {name:<22} {requests:>16}");
    }

    assert_eq!(
        ours,
        (1, WAITERS),
        "epochflight: one attempt, its error to all"
    );
    assert_eq!(
        ours_cancel, 1,
        "epochflight: the waiter continues the same request"
    );
}
