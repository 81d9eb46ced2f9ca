//! DEFECTS found by the torture review of the core (h-torture). Each test
//! here FAILS on the core as merged in `1cdfaaf` and is `#[ignore]`d so that
//! `cargo test --all-features` stays green until the fix lands; run them with
//!
//! ```text
//! cargo test --test review_defects -- --ignored
//! ```
//!
//! and remove the `#[ignore]` together with the fix. Each test forces its
//! interleaving (gates, polls by hand); those that would hang on the current
//! code run under a short timeout and fail loudly instead.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::Gate;
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

fn message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
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
#[ignore = "DEFECT 1 (review): fails on the current core; see the comment above"]
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
        message(&*dropped.expect_err("the drop panicked")),
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
#[ignore = "DEFECT 1 (review): fails on the current core; see the comment above"]
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
#[ignore = "DEFECT 2a (review): hangs (fails after a timeout) on the current core"]
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
                .map_err(|panic| message(&*panic))
            }
        },
    );
    let message = outcome.expect_err("the nested blocking call panics");
    assert!(message.contains("wait for itself"), "message: {message}");
    assert!(!sf.is_in_flight("k"));
}

#[test]
#[ignore = "DEFECT 2b (review): fails on the current core"]
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
#[ignore = "DEFECT 2c (review): hangs (fails after a timeout) on the current core"]
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
            catch_unwind(AssertUnwindSafe(|| drop(leader))).map_err(|panic| message(&*panic))
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
// DEFECT 3: a forgotten value can stay in a reader's slot after `forget`.
//
// src/registry.rs, `Registry::enter`, reuse path: the slot is filled *after*
// the map lock is released (`let entry = stored.clone(); self.reads.fill(..)`,
// and `Registry::read` likewise fills after `drop(map)`). A `forget` of the key
// that runs in that window removes the value and sweeps the slots
// (`ReadCache::forget`) *before* the fill, so the fill then puts the forgotten
// value into the reader's slot, with a version that is already stale. It is
// never answered from (the version check), but it stays alive until that slot
// is refilled for another key or the `SingleFlight` is dropped; a later
// `forget` of the same key does not sweep it (nothing stored, no sweep).
// The docs promise otherwise: "That copy is dropped when the slot is next
// filled, on forget, and with the SingleFlight" (`SingleFlight` # Costs) and
// read_cache.rs: "`forget` empties the slots that hold its key's value" (a
// token kept after sign-out; I7). Bounded by the number of slots.
// Fix: fill only if the version is unchanged, checked under the slot lock
// (`fill` compares `version` with `self.version` after locking the slot and
// drops the entry if it moved on: `forget` bumps the version under the map
// lock before it sweeps, so a fill that sees the old version happened before
// the sweep took the slot's lock).
// ---------------------------------------------------------------------------

thread_local! {
    /// Clones of `Token` on this thread still to pass before one blocks.
    static PASS_BEFORE_BLOCKING: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The gates a blocking clone uses: (entered, release).
static CLONE_GATES: Mutex<Option<(Arc<Gate>, Arc<Gate>)>> = Mutex::new(None);

/// A value that counts its live copies and whose clone can be made to wait.
struct Token {
    live: Arc<AtomicIsize>,
}

impl Token {
    fn new(live: &Arc<AtomicIsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Token { live: live.clone() }
    }
}

impl Clone for Token {
    fn clone(&self) -> Self {
        let copy = Token::new(&self.live);
        let block = PASS_BEFORE_BLOCKING.with(|pass| match pass.get() {
            Some(0) => {
                pass.set(None);
                true
            }
            Some(n) => {
                pass.set(Some(n - 1));
                false
            }
            None => false,
        });
        if block {
            let (entered, release) = CLONE_GATES.lock().unwrap().clone().expect("gates set");
            entered.open();
            release.wait_blocking();
        }
        copy
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
#[ignore = "DEFECT 3 (review): fails on the current core; see the comment above"]
fn a_forgotten_value_is_not_kept_in_a_read_slot() {
    let live = Arc::new(AtomicIsize::new(0));
    let sf: Arc<SingleFlight<&'static str, Token>> = Arc::new(SingleFlight::new());
    sf.set("k", Token::new(&live));
    let (entered, release) = (Gate::new(), Gate::new());
    *CLONE_GATES.lock().unwrap() = Some((entered.clone(), release.clone()));

    let reader = std::thread::spawn({
        let sf = sf.clone();
        move || {
            // First read of "k" on this thread: a miss, remembered.
            drop(futures::executor::block_on(
                sf.get("k", || async { unreachable!() }),
            ));
            // Second miss in a row: the slot is filled. The first clone is
            // the caller's copy, made under the map lock; the second is the
            // slot's, made after the lock is released. It waits there.
            PASS_BEFORE_BLOCKING.with(|pass| pass.set(Some(1)));
            let got = futures::executor::block_on(sf.get("k", || async { unreachable!() }));
            assert_eq!(got.role, Role::Reused);
        }
    });
    entered.wait_blocking(); // the reader is between the map and its slot
    returns_within("forget while a reader fills its slot", {
        let sf = sf.clone();
        move || sf.forget("k")
    });
    // forget returned: the value is gone from the map and from every slot.
    release.open();
    reader.join().expect("reader");
    sf.forget("k"); // a second forget does not help either
    assert_eq!(
        live.load(Ordering::SeqCst),
        0,
        "a copy of the forgotten value is still alive, kept by a read slot"
    );
    drop(sf);
    assert_eq!(live.load(Ordering::SeqCst), 0);
}
