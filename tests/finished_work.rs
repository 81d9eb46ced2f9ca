//! The destructor of a *finished* work's future (one that returned `Ready`):
//! it runs once, in place, before the result is published (I1), while the
//! flight is still in progress, with no lock held, marked as the flight's
//! work (a call it makes on the key is nested); a panic in it is the
//! driver's, on the spawner too. Written by a review of session 5's change,
//! which moved that drop into the work's box (`work.rs`).

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use common::{panic_message, with_timeout, yield_now};
use epochflight::{Epoch, Role, SingleFlight};
use futures::executor::block_on;
use futures::task::noop_waker;

/// A task the spawner was given.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    let waker = noop_waker();
    f.poll(&mut Context::from_waker(&waker))
}

/// Counts its drops; panics in the first one if `panics`.
struct Guard {
    drops: Arc<AtomicUsize>,
    panics: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.drops.fetch_add(1, Ordering::SeqCst) == 0 && self.panics {
            panic!("finished future's destructor panicked");
        }
    }
}

/// A future that is ready at its second poll and holds `Guard` across it.
async fn ready_on_second_poll(guard: Guard, value: u32) -> u32 {
    let _guard = guard;
    yield_now().await;
    value
}

/// A destructor that panics after the future returned `Ready`: dropped once
/// (no double drop of the emptied place), the panic reaches the driver, the
/// result is not published, the follower is promoted and leads its own `f`.
#[test]
fn destructor_panicking_after_ready_drops_once_and_promotes_a_follower() {
    with_timeout("destructor_panicking_after_ready", || {
        let sf: SingleFlight<&str, u32> = SingleFlight::new();
        let drops = Arc::new(AtomicUsize::new(0));
        let guard = Guard {
            drops: drops.clone(),
            panics: true,
        };
        let mut leader = Box::pin(sf.run("k", move || ready_on_second_poll(guard, 1)));
        let mut follower = Box::pin(sf.run("k", || async { 2 }));
        assert!(poll_once(leader.as_mut()).is_pending());
        assert!(poll_once(follower.as_mut()).is_pending());
        let panicked = catch_unwind(AssertUnwindSafe(|| poll_once(leader.as_mut())));
        assert_eq!(
            panic_message(&*panicked.expect_err("the destructor's panic reaches the driver")),
            "finished future's destructor panicked"
        );
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped exactly once");
        drop(leader);
        let promoted = block_on(follower);
        assert_eq!((promoted.value, promoted.role), (2, Role::Led));
        assert_eq!(sf.current("k").map(|v| v.value), Some(2));
        assert!(!sf.is_in_flight("k"));

        // The fallible shape (`ReturnsResult`), no follower: the key is free.
        let sf: SingleFlight<&str, u32, ()> = SingleFlight::new();
        let drops = Arc::new(AtomicUsize::new(0));
        let guard = Guard {
            drops: drops.clone(),
            panics: true,
        };
        let mut leader = Box::pin(sf.try_run("k", move || async move {
            Ok(ready_on_second_poll(guard, 1).await)
        }));
        assert!(poll_once(leader.as_mut()).is_pending());
        assert!(catch_unwind(AssertUnwindSafe(|| poll_once(leader.as_mut()))).is_err());
        assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped exactly once");
        drop(leader);
        assert!(!sf.is_in_flight("k"));
        assert_eq!(sf.current("k"), None);
        let next = block_on(sf.try_run("k", || async { Ok(3) })).unwrap();
        assert_eq!((next.value, next.role), (3, Role::Led));
    });
}

/// The finished future's destructor runs while its flight is still in
/// progress (I5: before the key is freed), with no lock held (it can read
/// the map), and marked as driving (a blocking call on the key panics with
/// the self-join message rather than waiting for itself).
#[test]
fn finished_future_destructor_runs_in_flight_unlocked_and_nested() {
    struct Looks {
        sf: &'static SingleFlight<&'static str, u32>,
        seen: Arc<Mutex<Vec<String>>>,
    }
    impl Drop for Looks {
        fn drop(&mut self) {
            let mut seen = self.seen.lock().unwrap();
            seen.push(format!("in_flight={}", self.sf.is_in_flight("k")));
            seen.push(format!("epoch_none={}", self.sf.epoch("k") == Epoch::NONE));
            let nested = catch_unwind(AssertUnwindSafe(|| self.sf.run_blocking("k", || 9)));
            seen.push(match nested {
                Ok(o) => format!("nested returned {:?}", o.role),
                Err(p) => format!(
                    "nested panicked: {}",
                    panic_message(&*p).contains("wait for itself")
                ),
            });
        }
    }
    with_timeout("finished_future_destructor", || {
        let sf: &'static SingleFlight<&'static str, u32> = Box::leak(Box::new(SingleFlight::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let looks = Looks {
            sf,
            seen: seen.clone(),
        };
        let outcome = block_on(sf.run("k", move || async move {
            let _looks = looks;
            1
        }));
        assert_eq!((outcome.value, outcome.role), (1, Role::Led));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "in_flight=true".to_string(),
                "epoch_none=true".to_string(),
                "nested panicked: true".to_string()
            ]
        );
        assert_eq!(sf.current("k").map(|v| v.value), Some(1));
        assert!(!sf.is_in_flight("k"));
    });
}

/// The same through the spawner: detached work that finishes on it drops
/// its future before the key is freed; a destructor panic there does not
/// wedge the key.
#[test]
fn detached_work_destructor_panic_after_ready_frees_the_key() {
    with_timeout("detached_destructor_panic", || {
        let spawned: Arc<Mutex<Vec<Task>>> = Arc::default();
        let s = spawned.clone();
        let sf: SingleFlight<&str, u32> =
            SingleFlight::new().with_spawner(move |task| s.lock().unwrap().push(task));
        let drops = Arc::new(AtomicUsize::new(0));
        let guard = Guard {
            drops: drops.clone(),
            panics: true,
        };
        let mut leader = Box::pin(sf.run("k", move || ready_on_second_poll(guard, 1)));
        assert!(poll_once(leader.as_mut()).is_pending());
        drop(leader);
        let task = spawned
            .lock()
            .unwrap()
            .pop()
            .expect("detached to the spawner");
        let ran = catch_unwind(AssertUnwindSafe(|| block_on(task)));
        assert!(
            ran.is_err(),
            "the destructor panic reaches the spawner's task"
        );
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert!(!sf.is_in_flight("k"), "key freed");
        let next = sf.run_blocking("k", || 3);
        assert_eq!((next.value, next.role), (3, Role::Led));
    });
}

/// A follower promoted after a panic that finds a value `set` meanwhile
/// reports `Reused` with that value's epoch (a `Followed::Reused`).
#[test]
fn promoted_follower_finding_a_set_value_reuses_it() {
    with_timeout("promoted_follower_reuses", || {
        let sf: SingleFlight<&str, u32> = SingleFlight::new();
        let seen = sf.set("k", 1);
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let mut leader = Box::pin(sf.refresh_if_current("k", seen, move || async move {
            std::future::poll_fn(|cx| {
                if f2.load(Ordering::SeqCst) {
                    panic!("boom")
                }
                cx.waker().wake_by_ref();
                Poll::<()>::Pending
            })
            .await;
            0
        }));
        let mut follower = Box::pin(sf.refresh_if_current("k", seen, || async { 5 }));
        assert!(poll_once(leader.as_mut()).is_pending());
        assert!(poll_once(follower.as_mut()).is_pending());
        let newer = sf.set("k", 7);
        flag.store(true, Ordering::SeqCst);
        assert!(catch_unwind(AssertUnwindSafe(|| poll_once(leader.as_mut()))).is_err());
        drop(leader);
        let out = block_on(follower);
        assert_eq!((out.value, out.epoch, out.role), (7, newer, Role::Reused));
    });
}
