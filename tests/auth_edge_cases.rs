//! `TokenManager` edge cases found in review: a panicking refresher with a
//! request-gate caller waiting, hooks that panic or see superseded results,
//! and configuration extremes. Interleavings are forced by polling by hand.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{Gate, with_timeout};
use epochflight::auth::{RefreshError, TokenManager, Unauthorized};
use futures::executor::block_on;
use futures::task::noop_waker;

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    let waker = noop_waker();
    f.poll(&mut Context::from_waker(&waker))
}

struct Status(u16);

impl Unauthorized for Status {
    fn is_unauthorized(&self) -> bool {
        self.0 == 401
    }
}

/// The refresher panics while a `token()` caller waits at the request gate.
/// The gate caller must not re-store the rejected token under a new epoch:
/// a late 401 for that token still gets a real refresh.
#[test]
fn refresher_panic_does_not_restamp_the_rejected_token() {
    with_timeout(
        "refresher_panic_does_not_restamp_the_rejected_token",
        || {
            let calls = Arc::new(AtomicUsize::new(0));
            let gate = Gate::new();
            let (c, g) = (calls.clone(), gate.clone());
            let m: TokenManager<String, String> = TokenManager::with_token(
                move |_stale| {
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    let g = g.clone();
                    async move {
                        if n == 0 {
                            g.wait().await;
                            panic!("refresher bug");
                        }
                        Ok(format!("t{}", n + 1))
                    }
                },
                "t1".to_string(),
            );
            let e1 = m.epoch();
            let mut leader = Box::pin(m.refresh_if_current(e1));
            assert!(poll_once(leader.as_mut()).is_pending());
            let mut gated = Box::pin(m.token());
            assert!(poll_once(gated.as_mut()).is_pending(), "waits at the gate");
            gate.open();
            assert!(catch_unwind(AssertUnwindSafe(|| block_on(leader))).is_err());
            let got = block_on(gated).unwrap();
            assert_eq!(
                (got.value.as_str(), got.epoch),
                ("t1", e1),
                "the stored token, not restamped"
            );
            assert_eq!(m.epoch(), e1);
            let late = block_on(m.refresh_if_current(e1)).unwrap();
            assert_eq!(late.value, "t2", "the late 401 gets a real refresh");
            assert_eq!(calls.load(Ordering::SeqCst), 2);
        },
    );
}

/// A panic in `on_refresh` after a successful refresh: the refresh's result
/// is kept (no second refresh with the rotated token) and the panic reaches
/// the caller that drove the refresh.
#[test]
fn hook_panic_keeps_the_result_and_is_reraised() {
    with_timeout("hook_panic_keeps_the_result_and_is_reraised", || {
        let stale_seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let gate = Gate::new();
        let (s, g) = (stale_seen.clone(), gate.clone());
        let once = AtomicBool::new(true);
        let m: TokenManager<String, String> = TokenManager::with_token(
            move |stale| {
                s.lock().unwrap().push(stale);
                let g = g.clone();
                async move {
                    g.wait().await;
                    Ok("t2".to_string())
                }
            },
            "t1".to_string(),
        )
        .on_refresh(move |_| {
            if once.swap(false, Ordering::SeqCst) {
                panic!("hook failed (persisting to disk)");
            }
        });
        let e1 = m.epoch();
        let mut leader = Box::pin(m.refresh_if_current(e1));
        assert!(poll_once(leader.as_mut()).is_pending());
        let mut follower = Box::pin(m.refresh_if_current(e1));
        assert!(poll_once(follower.as_mut()).is_pending());
        gate.open();
        let panic = catch_unwind(AssertUnwindSafe(|| block_on(leader))).expect_err("re-raised");
        assert_eq!(
            panic.downcast_ref::<&str>(),
            Some(&"hook failed (persisting to disk)")
        );
        let got = block_on(follower).unwrap();
        assert_eq!(got.value, "t2");
        assert_eq!(m.current().unwrap().value, "t2", "the result was stored");
        assert_eq!(stale_seen.lock().unwrap().len(), 1, "refreshed once");
    });
}

/// `on_refresh` says whether a result is the current session's: a refresh
/// superseded by `sign_in` while it ran reports `current: false`.
#[test]
fn hook_is_told_when_a_result_was_superseded() {
    with_timeout("hook_is_told_when_a_result_was_superseded", || {
        let gate = Gate::new();
        let events: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let (g, ev) = (gate.clone(), events.clone());
        let m: TokenManager<String, String> = TokenManager::with_token(
            move |stale: Option<String>| {
                let g = g.clone();
                async move {
                    g.wait().await;
                    Ok(format!("{}-rotated", stale.unwrap()))
                }
            },
            "old".to_string(),
        )
        .on_refresh(move |event| {
            let token = event.result.clone().unwrap();
            ev.lock().unwrap().push((token, event.current));
        });
        let mut stale_refresh = Box::pin(m.refresh_if_current(m.epoch()));
        assert!(poll_once(stale_refresh.as_mut()).is_pending());
        let new_epoch = m.sign_in("new".to_string());
        gate.open();
        assert_eq!(block_on(stale_refresh).unwrap().value, "old-rotated");
        block_on(m.refresh_if_current(new_epoch)).unwrap();
        assert_eq!(
            *events.lock().unwrap(),
            [
                ("old-rotated".to_string(), false),
                ("new-rotated".to_string(), true)
            ]
        );
        assert_eq!(m.current().unwrap().value, "new-rotated");
    });
}

/// "Always refresh ahead" (`Duration::MAX`) does not overflow.
#[test]
fn huge_refresh_ahead_does_not_overflow() {
    with_timeout("huge_refresh_ahead_does_not_overflow", || {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let m: TokenManager<Instant, String> = TokenManager::with_token_blocking(
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(Instant::now() + Duration::from_secs(60))
            },
            Instant::now() + Duration::from_secs(60),
        )
        .with_expiry(|t| Some(*t), Duration::MAX);
        let first = m.token_blocking().unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "inside the window: refreshed ahead"
        );
        assert!(first.value > Instant::now());
    });
}

/// `cooled_down` counts calls answered with the failure; a caller refreshing
/// ahead of expiry during the cool-down gets its still-valid token instead.
#[test]
fn cooled_down_counts_only_callers_answered_with_the_failure() {
    with_timeout(
        "cooled_down_counts_only_callers_answered_with_the_failure",
        || {
            let m: TokenManager<Instant, String> = TokenManager::with_token_blocking(
                |_| Err(RefreshError::Transient("503".to_string())),
                Instant::now() + Duration::from_secs(10),
            )
            .with_expiry(|t| Some(*t), Duration::from_secs(60))
            .with_cooldown(Duration::from_secs(60));
            for _ in 0..3 {
                assert!(m.token_blocking().is_ok(), "the still-valid token");
            }
            let stats = m.stats();
            assert_eq!(
                (stats.refresh_calls, stats.cooled_down),
                (1, 0),
                "{stats:?}"
            );
            let stale = m.epoch();
            assert!(m.refresh_if_current_blocking(stale).is_err());
            assert_eq!(m.stats().cooled_down, 1);
        },
    );
}

/// The public futures are `Send`, so they can be spawned on work-stealing
/// runtimes.
#[test]
fn futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let m: TokenManager<String, String> = TokenManager::new(|_| async { Ok("t".to_string()) });
    let (token, send) = (m.token(), m.send(|_t| async { Status(200) }));
    is_send(&token);
    is_send(&send);
    let sf: epochflight::SingleFlight<u8, u8> = epochflight::SingleFlight::new();
    let run = sf.run(1, || async { 1 });
    is_send(&run);
}
