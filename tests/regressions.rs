//! Defects found by the review of the core (the torture run's review), each
//! with the test that failed before its fix: a panicking destructor of
//! cancelled work, calls into a flight's own key from its closure or its
//! destructor, and a read slot racing `forget` (checked by loom instead).
//! Then, from the review of session 5: a `T::clone` panicking under the map
//! lock after another copy was made dropped that copy with the map locked
//! (I8); a drop that reads the map hung.
//! Each test forces its interleaving (gates, polls by hand); those that
//! would hang run under a short timeout and fail loudly instead.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::panic_message;
use epochflight::{Role, SingleFlight};
use futures::task::noop_waker;

/// How long a call that should return at once may take before the test
/// declares it hung. Generous: the machine is shared.
const HANG: Duration = Duration::from_secs(20);

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    let waker = noop_waker();
    f.poll(&mut Context::from_waker(&waker))
}

/// Runs `body` on a thread of its own; fails loudly if it has not returned
/// within [`HANG`] (the hung thread is left behind).
fn returns_within<R: Send + 'static>(what: &str, body: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(body)));
    });
    match rx.recv_timeout(HANG) {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("HANG: {what} did not return within {HANG:?}"),
    }
}

// ---------------------------------------------------------------------------
// DEFECT 1: a panicking destructor of cancelled work wedges its key forever.
//
// src/registry.rs, `Registry::attend`, the drop arm:
//
//     drop(work);
//     self.release(id);
//
// If the work's destructor panics (user code: DESIGN I6/I8 treat the work's
// drop as user work), the panic unwinds out of `attend` before `release`,
// so the flight stays in the table, attached, with nobody responsible for it
// (phase `Running`, no driver, no heir). `is_in_flight` stays true forever;
// every later caller joins it and waits forever (I2). The poll path does not
// have this problem: `Driver::poll_work` drops a finished work while the
// driver is still `InUserCode`, so its own drop gives the flight up.
// The same arm is reached from `Orphan::drop` (an executor dropping the
// spawned task unrun) and from the last heir leaving orphaned work.
// Fix: release the flight from a drop guard (or `catch_unwind` around the
// drop and resume the panic after `release`).
// ---------------------------------------------------------------------------

/// A work whose destructor panics.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("the work's destructor panicked");
    }
}

#[test]
fn a_panicking_destructor_of_cancelled_work_does_not_wedge_the_key() {
    let sf: Arc<SingleFlight<&'static str, u32>> = Arc::new(SingleFlight::new());
    let mut leader = Box::pin(sf.run("k", || async {
        let _guard = PanicsOnDrop;
        std::future::pending::<u32>().await
    }));
    assert!(poll_once(leader.as_mut()).is_pending(), "the work started");
    // The lone leader is cancelled (a timeout): its work is dropped, and
    // that drop panics. The panic reaches the canceller, as it should.
    let dropped = catch_unwind(AssertUnwindSafe(|| drop(leader)));
    assert_eq!(
        panic_message(&*dropped.expect_err("the drop panicked")),
        "the work's destructor panicked"
    );

    assert!(
        !sf.is_in_flight("k"),
        "the key is still in flight after its only work was dropped: nobody is responsible for it"
    );
    // And the next caller is not stranded behind it.
    let next = returns_within("the next run_blocking on the key", {
        let sf = sf.clone();
        move || sf.run_blocking("k", || 2)
    });
    assert_eq!((next.value, next.role), (2, Role::Led));
}

/// The same through the last heir of orphaned work leaving.
#[test]
fn a_panicking_destructor_of_orphaned_work_does_not_wedge_the_key() {
    let sf: Arc<SingleFlight<&'static str, u32>> = Arc::new(SingleFlight::new());
    let mut leader = Box::pin(sf.run("k", || async {
        let _guard = PanicsOnDrop;
        std::future::pending::<u32>().await
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    let heir = Box::pin(sf.run("k", || async { unreachable!("joins") }));
    drop(leader); // hands the work to the heir, which has not looked yet
    let dropped = catch_unwind(AssertUnwindSafe(|| drop(heir)));
    assert!(
        dropped.is_err(),
        "the heir's drop dropped the work, whose drop panicked"
    );
    assert!(!sf.is_in_flight("k"), "the key is wedged in flight");
    let next = returns_within("the next run_blocking on the key", {
        let sf = sf.clone();
        move || sf.run_blocking("k", || 3)
    });
    assert_eq!(next.value, 3);
}

// ---------------------------------------------------------------------------
// DEFECT 2: a call made from inside an async leader's *closure* is not
// recognised as a call into its own flight.
//
// src/driver.rs, `Driver::start`, calls the user's closure outside
// `flight::driving(..)` (only `poll_work` and `run_blocking` mark the thread
// as driving). So from an async `run`'s closure (user code that runs for
// the flight, as the work's first poll does):
//
// (a) a blocking twin on the same key joins as an ordinary blocking
//     follower and blocks the leader's thread forever, instead of the
//     documented panic ("A blocking twin called from inside this key's own
//     work panics", `# Panics` of `try_run`): the thread and the key hang.
// (b) an async call on the same key made in the closure and kept by the
//     work joins as an ordinary *async heir*. When the leader is cancelled,
//     the work is handed to that heir, which lives inside the work itself:
//     the work is kept (phase `Orphaned`) instead of being dropped, the key
//     stays in flight, and after `forget` the flight is a reference cycle
//     (Flight -> Orphaned(work) -> Follower -> Flight) that is never freed.
//     Work whose nested call is made in its first poll is dropped and the key
//     freed (edge_cases.rs,
//     `work_calling_back_into_its_own_key_is_dropped_when_cancelled`).
//
// Fix: run `make()` in `Driver::start` inside `flight::driving(map, id, ..)`.
// ---------------------------------------------------------------------------

#[test]
fn a_blocking_call_from_an_async_leader_s_closure_into_its_own_key_panics() {
    let sf: Arc<SingleFlight<&'static str, u32>> = Arc::new(SingleFlight::new());
    let outcome = returns_within(
        "an async leader whose closure calls run_blocking on its key",
        {
            let sf = sf.clone();
            move || {
                let inner = sf.clone();
                catch_unwind(AssertUnwindSafe(|| {
                    futures::executor::block_on(sf.run("k", move || {
                        let v = inner.run_blocking("k", || 1).value;
                        async move { v }
                    }))
                }))
                .map(|outcome| outcome.value)
                .map_err(|panic| panic_message(&*panic))
            }
        },
    );
    let message = outcome.expect_err("the nested blocking call panics");
    assert!(message.contains("wait for itself"), "message: {message}");
    assert!(!sf.is_in_flight("k"));
}

#[test]
fn an_async_call_from_a_leader_s_closure_into_its_own_key_is_dropped_with_the_work() {
    // 'static, as a `static` LazyLock SingleFlight would be: a call made in
    // the closure can then be moved into the work.
    let sf: &'static SingleFlight<&'static str, u32> = Box::leak(Box::new(SingleFlight::new()));
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = common::DropFlag(dropped.clone());
    let mut leader = Box::pin(sf.run("k", move || {
        // E.g. a helper that eagerly makes the future it returns.
        let inner = sf.run("k", || async { unreachable!("never leads") });
        async move {
            let _flag = flag;
            let _inner = inner; // kept, never awaited
            std::future::pending::<u32>().await
        }
    }));
    assert!(poll_once(leader.as_mut()).is_pending());
    assert_eq!(
        sf.waiters("k"),
        1,
        "the call from the closure joined the flight"
    );
    drop(leader); // cancelled: nobody outside the work waits for it
    assert!(
        dropped.load(Ordering::SeqCst),
        "the work was kept for an heir that lives inside it"
    );
    assert!(!sf.is_in_flight("k"), "no orphan is left behind");
}

/// (c) The same holds for the work's destructor, which also runs outside
/// `flight::driving` while its flight is still in the table (`attend` drops
/// the work before `release`; `Driver::poll_work` drops a finished work
/// before `complete`): a blocking call on the key from there joins the
/// flight as a blocking follower and waits for a flight whose only
/// responsible party is itself. The same fix applies to those two drops.
#[test]
fn a_blocking_call_from_the_destructor_of_cancelled_work_into_its_own_key_does_not_hang() {
    struct CallsBackOnDrop(&'static SingleFlight<&'static str, u32>);
    impl Drop for CallsBackOnDrop {
        fn drop(&mut self) {
            // E.g. a guard that reads the key's latest value when it goes.
            let _ = self.0.get_blocking("k", || 0);
        }
    }
    let sf: &'static SingleFlight<&'static str, u32> = Box::leak(Box::new(SingleFlight::new()));
    let dropped = returns_within(
        "dropping a cancelled work whose destructor calls get_blocking",
        move || {
            let mut leader = Box::pin(sf.run("k", move || async move {
                let _guard = CallsBackOnDrop(sf);
                std::future::pending::<u32>().await
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            // The lone leader is cancelled: the work is dropped, its destructor
            // calls into the key while the flight is still there.
            catch_unwind(AssertUnwindSafe(|| drop(leader))).map_err(|panic| panic_message(&*panic))
        },
    );
    // Either the nested blocking call panics ("wait for itself"), as it does
    // from the work's poll, or it runs after the key was freed; it must not
    // wait for itself.
    if let Err(message) = dropped {
        assert!(message.contains("wait for itself"), "message: {message}");
    }
}

// ---------------------------------------------------------------------------
// DEFECT 3 (fixed): a forgotten value could stay in a reader's slot after
// `forget`, when a reader filled its slot (after unlocking the map) just as
// the `forget` swept the slots. A slot is now filled only if the map's
// version is still the one read under the map lock, and `forget` changes the
// version before it sweeps. The window holds no user code to stop a thread
// in, so the race is checked by the loom model
// `loom-tests/tests/reads.rs::a_forget_racing_a_slot_fill_leaves_no_copy`.
// ---------------------------------------------------------------------------

/// A value whose clone number `panic_at` (counted from 1) panics, and whose
/// drop, once armed, reads the map it lives in: dropped under the map lock,
/// that read deadlocks (I8 says no `T::drop` under a lock).
struct ReadsOnDrop {
    map: &'static SingleFlight<&'static str, ReadsOnDrop>,
    clones: Arc<std::sync::atomic::AtomicUsize>,
    panic_at: usize,
    armed: Arc<AtomicBool>,
}

impl Clone for ReadsOnDrop {
    fn clone(&self) -> Self {
        let n = self.clones.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.panic_at {
            panic!("T::clone panicked");
        }
        ReadsOnDrop {
            map: self.map,
            clones: self.clones.clone(),
            panic_at: self.panic_at,
            armed: self.armed.clone(),
        }
    }
}

impl Drop for ReadsOnDrop {
    fn drop(&mut self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            // E.g. a token whose drop logs the key's state.
            let _ = self.map.is_in_flight("k");
        }
    }
}

/// A map and a value in it; the clone `panic_at` (counted from the next one)
/// panics, and the first copy dropped after arming reads the map.
fn reads_on_drop(
    panic_at: usize,
) -> (
    &'static SingleFlight<&'static str, ReadsOnDrop>,
    ReadsOnDrop,
    Arc<AtomicBool>,
) {
    let map: &'static SingleFlight<&'static str, ReadsOnDrop> =
        Box::leak(Box::new(SingleFlight::new()));
    let armed = Arc::new(AtomicBool::new(false));
    let value = ReadsOnDrop {
        map,
        clones: Arc::default(),
        panic_at,
        armed: armed.clone(),
    };
    (map, value, armed)
}

// Found by the review of session 5 (present before it): with nobody
// following, a panic in the clone of the driver's own copy unwound out of
// `complete` with the value it replaced still in a local declared after the
// map guard, so the old value was dropped with the map locked.
#[test]
fn a_panicking_clone_of_the_driver_s_copy_drops_the_replaced_value_unlocked() {
    let (map, old, armed) = reads_on_drop(1);
    let (clones, panic_at) = (old.clones.clone(), old.panic_at);
    map.set("k", old);
    armed.store(true, Ordering::SeqCst);
    returns_within("the replaced value's drop", move || {
        let new = ReadsOnDrop {
            map,
            clones,
            panic_at,
            armed: Arc::new(AtomicBool::new(false)),
        };
        let ran = catch_unwind(AssertUnwindSafe(|| map.run_blocking("k", move || new)));
        assert!(ran.is_err(), "the clone's panic reaches the driver");
    });
    assert!(
        !armed.load(Ordering::SeqCst),
        "the replaced value was dropped"
    );
}

// The same class in `current`: the answer's copy is made, then the copy for
// the reader's slot panics; the answer's copy is dropped unlocked.
#[test]
fn a_panicking_clone_for_the_read_slot_drops_the_answer_unlocked() {
    let (map, value, armed) = reads_on_drop(3);
    map.set("k", value);
    returns_within("the answer's drop", move || {
        // The first read misses, copies the answer (clone 1) and records the
        // key; the second fills the slot: clone 2 is the answer, clone 3 (the
        // slot's copy) panics.
        let first = map.current("k").expect("stored");
        drop(first);
        armed.store(true, Ordering::SeqCst);
        let read = catch_unwind(AssertUnwindSafe(|| map.current("k")));
        assert!(read.is_err(), "the clone's panic reaches the reader");
        assert!(
            !armed.load(Ordering::SeqCst),
            "the answer's copy was dropped"
        );
    });
}

// And in a reuse through the map: the caller's copy is made, then the copy
// for the reader's slot panics; the caller's copy is dropped unlocked.
#[test]
fn a_panicking_clone_for_the_read_slot_drops_the_reused_copy_unlocked() {
    let (map, value, armed) = reads_on_drop(4);
    let stale = map.set("k", value.clone()); // clone 1
    map.set("k", value);
    returns_within("the reused copy's drop", move || {
        let reuse = || map.refresh_if_current_blocking("k", stale, || unreachable!("reused"));
        // The first reuse misses the reader's slot and copies the value for
        // the caller (clone 2); the second fills the slot: clone 3 is the
        // caller's copy, clone 4 (the slot's copy) panics.
        assert_eq!(reuse().role, Role::Reused);
        armed.store(true, Ordering::SeqCst);
        let reused = catch_unwind(AssertUnwindSafe(reuse));
        assert!(reused.is_err(), "the clone's panic reaches the caller");
        assert!(
            !armed.load(Ordering::SeqCst),
            "the caller's copy was dropped"
        );
    });
}
