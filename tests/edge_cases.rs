//! Edge cases found in review: promotion after `set`, panics in `T::clone`
//! while a result is published, and `set`/`forget` from inside a flight's own
//! work. Each test forces its interleaving by polling futures by hand.

mod common;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use common::{Gate, until_blocking, with_timeout};
use epochflight::{Role, SingleFlight};
use futures::executor::block_on;
use futures::task::noop_waker;

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    let waker = noop_waker();
    f.poll(&mut Context::from_waker(&waker))
}

/// I3: a follower promoted after its leader panicked, on a flight that `set`
/// detached, reuses the newer value instead of running its closure.
#[test]
fn promoted_follower_reuses_value_stored_by_set() {
    with_timeout("promoted_follower_reuses_value_stored_by_set", || {
        let sf: SingleFlight<&str, u32> = SingleFlight::new();
        let e1 = sf.set("k", 1);
        let ran = AtomicUsize::new(0);
        let leader = sf.refresh_if_current("k", e1, || async { panic!("leader's work panics") });
        let follower = sf.refresh_if_current("k", e1, || {
            ran.fetch_add(1, Ordering::SeqCst);
            async { 99 }
        });
        assert_eq!(sf.waiters("k"), 1);
        let e2 = sf.set("k", 2); // a login: a newer value, the flight detached
        assert!(catch_unwind(AssertUnwindSafe(|| block_on(leader))).is_err());
        let out = block_on(follower);
        assert_eq!(ran.load(Ordering::SeqCst), 0, "work ran for a stale epoch");
        assert_eq!((out.value, out.epoch, out.role), (2, e2, Role::Reused));
    });
}

/// The same for `get` when the leader is dropped before its first poll.
#[test]
fn promoted_get_follower_reuses_value_stored_by_set() {
    with_timeout("promoted_get_follower_reuses_value_stored_by_set", || {
        let sf: SingleFlight<&str, u32> = SingleFlight::new();
        let ran = AtomicUsize::new(0);
        let leader = sf.run("k", || async { 1 });
        let follower = sf.get("k", || {
            ran.fetch_add(1, Ordering::SeqCst);
            async { 99 }
        });
        let stored = sf.set("k", 2);
        drop(leader);
        let out = block_on(follower);
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "get ran work although a value is stored"
        );
        assert_eq!((out.value, out.epoch, out.role), (2, stored, Role::Reused));
    });
}

/// A promoted follower that reuses passes the vacancy on: the next follower
/// (a `run`, which never reuses) still gets promoted and completes.
#[test]
fn reusing_follower_passes_the_vacancy_on() {
    with_timeout("reusing_follower_passes_the_vacancy_on", || {
        let sf: SingleFlight<&str, u32> = SingleFlight::new();
        let leader = sf.run("k", || async { 1 });
        let mut getter = Box::pin(sf.get("k", || async { 98 }));
        let runner = sf.run("k", || async { 3 });
        assert_eq!(sf.waiters("k"), 2);
        sf.set("k", 2);
        drop(leader);
        let got = block_on(getter.as_mut());
        assert_eq!((got.value, got.role), (2, Role::Reused));
        let ran = block_on(runner);
        assert_eq!((ran.value, ran.role), (3, Role::Led));
    });
}

/// A `T` whose clone panics once, when armed.
struct Bomb(Arc<AtomicBool>);

impl Clone for Bomb {
    fn clone(&self) -> Self {
        if self.0.swap(false, Ordering::SeqCst) {
            panic!("T::clone panicked");
        }
        Bomb(self.0.clone())
    }
}

/// A panic in `T::clone` while the leader stores its result reaches the
/// leader; the key is not left with a flight nobody drives.
#[test]
fn clone_panic_while_storing_does_not_wedge_the_key() {
    with_timeout("clone_panic_while_storing_does_not_wedge_the_key", || {
        let sf: SingleFlight<&str, Bomb> = SingleFlight::new();
        let armed = Arc::new(AtomicBool::new(false));
        let a = armed.clone();
        let leader = sf.run("k", move || async move {
            a.store(true, Ordering::SeqCst); // the first clone of the result panics
            Bomb(a)
        });
        assert!(catch_unwind(AssertUnwindSafe(|| block_on(leader))).is_err());
        assert!(!sf.is_in_flight("k"), "no flight left behind");
        let next = sf.run_blocking("k", move || Bomb(armed));
        assert_eq!(next.role, Role::Led);
    });
}

/// A `T` whose n-th clone from now panics.
struct Countdown(Arc<AtomicIsize>);

impl Clone for Countdown {
    fn clone(&self) -> Self {
        if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            panic!("T::clone panicked");
        }
        Countdown(self.0.clone())
    }
}

/// A panic in `T::clone` while the followers' copy is made reaches only the
/// leader, whose copy it was: the result is stored and the follower gets it.
/// No second work runs (for a token: no rotated refresh token is presented
/// again), and no flight is left behind.
#[test]
fn clone_panic_while_publishing_reaches_only_the_leader() {
    with_timeout(
        "clone_panic_while_publishing_reaches_only_the_leader",
        || {
            let sf: Arc<SingleFlight<&str, Countdown>> = Arc::new(SingleFlight::new());
            let left = Arc::new(AtomicIsize::new(isize::MAX));
            let gate = Gate::new();
            let runs = Arc::new(AtomicUsize::new(0));
            let (l, g) = (left.clone(), gate.clone());
            let mut leader = Box::pin(sf.run("k", move || async move {
                g.wait().await;
                // 1st clone: the stored copy; 2nd: the followers' copy.
                l.store(2, Ordering::SeqCst);
                Countdown(l)
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            let follower = {
                let (sf, left, runs) = (sf.clone(), left.clone(), runs.clone());
                std::thread::spawn(move || {
                    sf.run_blocking("k", move || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Countdown(left)
                    })
                })
            };
            until_blocking(|| sf.waiters("k") == 1);
            gate.open();
            let panicked = catch_unwind(AssertUnwindSafe(|| block_on(leader)));
            assert!(panicked.is_err(), "the leader's own copy panicked");
            let joined = follower.join().expect("the follower is not affected");
            assert_eq!(joined.role, Role::Joined);
            assert_eq!(runs.load(Ordering::SeqCst), 0, "no second work ran");
            assert_eq!(sf.current("k").unwrap().epoch, joined.epoch, "stored");
            assert!(!sf.is_in_flight("k"));
        },
    );
}

/// `set` and `forget` from inside the work of the same key, with a follower
/// waiting: both callers get the flight's result; nothing is left behind.
#[test]
fn set_and_forget_from_inside_the_work() {
    with_timeout("set_and_forget_from_inside_the_work", || {
        for forget in [false, true] {
            let sf: Arc<SingleFlight<&str, u32>> = Arc::new(SingleFlight::new());
            let (inner, gate) = (sf.clone(), Gate::new());
            let g = gate.clone();
            let mut leader = Box::pin(sf.run("k", move || async move {
                g.wait().await;
                if forget {
                    inner.forget("k");
                } else {
                    inner.set("k", 7);
                }
                1
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            let follower = sf.run("k", || async { 2 });
            gate.open();
            let (a, b) = (block_on(leader), block_on(follower));
            assert_eq!((a.value, b.value, a.epoch), (1, 1, b.epoch));
            assert!(!sf.is_in_flight("k"));
            let stored = sf.current("k").map(|v| v.value);
            assert_eq!(
                stored,
                if forget { None } else { Some(7) },
                "the detached result is not stored"
            );
            assert!(
                format!("{sf:?}").contains("cut_loose_in_flight: 0"),
                "{sf:?}"
            );
        }
    });
}

/// The map's hot-key hint (the slot found last, checked with `K::eq` before
/// hashing) must never answer for another key: here every slot is reused by
/// a different key while the hint points at it, and all keys share one hash
/// bucket, so only the key comparison tells them apart.
#[test]
fn a_reused_slot_never_answers_for_its_previous_key() {
    use std::hash::{BuildHasherDefault, Hasher};

    #[derive(Default)]
    struct OneBucket;
    impl Hasher for OneBucket {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, _: &[u8]) {}
    }

    with_timeout("a_reused_slot_never_answers_for_its_previous_key", || {
        let sf: SingleFlight<u32, u32, std::convert::Infallible, BuildHasherDefault<OneBucket>> =
            SingleFlight::default();
        for round in 0..50u32 {
            let (old, new) = (round, round + 1000);
            sf.set(old, old);
            assert_eq!(sf.current(&old).map(|v| v.value), Some(old));
            sf.forget(&old);
            // `new` takes the slot `old` had, and the hint still points there.
            let epoch = sf.set(new, new);
            assert_eq!(sf.current(&old), None, "round {round}: {old} was forgotten");
            assert!(sf.epoch(&old).is_none() && !epoch.is_none());
            assert_eq!(sf.current(&new).map(|v| v.value), Some(new));
            // Another key moves the hint; `new` is found by hash again.
            sf.set(u32::MAX, 0);
            assert_eq!(
                sf.current(&new).map(|v| (v.value, v.epoch)),
                Some((new, epoch))
            );
            sf.forget(&new);
        }
        // The stale-refresh path reads through the same hint.
        let seen = sf.set(1, 10);
        sf.set(2, 20);
        let reused = block_on(sf.refresh_if_current(1, epochflight::Epoch::NONE, || async { 0 }));
        assert_eq!(
            (reused.value, reused.epoch, reused.role),
            (10, seen, Role::Reused)
        );
    });
}

/// A `T` whose drop panics once `armed` is set and it is the stored value
/// being replaced (value 1).
#[derive(Clone)]
struct DropBomb(u32, Arc<AtomicBool>);

impl Drop for DropBomb {
    fn drop(&mut self) {
        if self.0 == 1 && self.1.swap(false, Ordering::SeqCst) {
            panic!("T::drop panicked");
        }
    }
}

/// A panic in the drop of the value a flight replaces reaches the driver,
/// but only after the result is stored and published: the waiting follower
/// gets it instead of waiting forever for a flight nobody drives.
#[test]
fn drop_panic_of_the_replaced_value_still_publishes_to_followers() {
    with_timeout("drop_panic_of_the_replaced_value_still_publishes", || {
        let sf: SingleFlight<&str, DropBomb> = SingleFlight::new();
        let armed = Arc::new(AtomicBool::new(false));
        sf.set("k", DropBomb(1, armed.clone()));
        let gate = Gate::new();
        let (g, a) = (gate.clone(), armed.clone());
        let mut leader = Box::pin(sf.run("k", move || async move {
            g.wait().await;
            DropBomb(2, a)
        }));
        let mut follower = Box::pin(sf.run("k", || async { unreachable!("joins") }));
        assert!(poll_once(leader.as_mut()).is_pending());
        assert!(poll_once(follower.as_mut()).is_pending());
        assert_eq!(sf.waiters("k"), 1);
        armed.store(true, Ordering::SeqCst);
        gate.open();
        let panicked = catch_unwind(AssertUnwindSafe(|| poll_once(leader.as_mut())));
        assert!(panicked.is_err(), "the drop panic reaches the driver");
        assert!(
            !armed.load(Ordering::SeqCst),
            "the stored value was replaced"
        );
        drop(leader);
        let joined = block_on(follower);
        assert_eq!((joined.value.0, joined.role), (2, Role::Joined));
        assert_eq!(sf.current("k").map(|v| v.value.0), Some(2));
        assert!(!sf.is_in_flight("k"));
    });
}

/// Holds a per-key "lease" until its destructor is let go; says when that
/// destructor started and when it returned.
struct Lease {
    entered: Arc<Gate>,
    release: Arc<Gate>,
    returned: Arc<AtomicBool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.entered.open();
        self.release.wait_blocking();
        self.returned.store(true, Ordering::SeqCst);
    }
}

/// I1 covers destructors: a cancelled leader's work with no follower left is
/// dropped *before* its key is free, so the next caller's work cannot start
/// while the old work's destructor still runs (a lease held there would be
/// held twice). The next caller waits, then runs its own work.
#[test]
fn the_next_work_starts_only_after_the_dropped_work_s_destructor_returned() {
    with_timeout("destructor_order", || {
        let sf: Arc<SingleFlight<&str, u32>> = Arc::new(SingleFlight::new());
        let (entered, release) = (Gate::new(), Gate::new());
        let returned = Arc::new(AtomicBool::new(false));
        let lease = Lease {
            entered: entered.clone(),
            release: release.clone(),
            returned: returned.clone(),
        };
        let canceller = {
            let sf = sf.clone();
            std::thread::spawn(move || {
                let mut leader = Box::pin(sf.run("k", move || async move {
                    let _lease = lease;
                    std::future::pending::<u32>().await
                }));
                assert!(poll_once(leader.as_mut()).is_pending());
                drop(leader); // blocks in the lease's destructor
            })
        };
        entered.wait_blocking();
        let next = {
            let (sf, returned) = (sf.clone(), returned.clone());
            std::thread::spawn(move || {
                sf.run_blocking("k", move || {
                    let old_destructor_returned = returned.load(Ordering::SeqCst);
                    assert!(old_destructor_returned, "started during the old destructor");
                    2
                })
            })
        };
        // The next caller found the flight still there and waits on it.
        until_blocking(|| sf.waiters("k") == 1);
        release.open();
        canceller.join().unwrap();
        let next = next
            .join()
            .expect("the next work started after the destructor");
        assert_eq!((next.value, next.role), (2, Role::Led));
        assert!(!sf.is_in_flight("k"));
    });
}

/// Sets a flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Work that calls back into its own key joins its own flight as a nested
/// follower, which can never take that work over. Cancelled, the work is
/// dropped (with or without a spawner: it waits for itself, so it is not
/// spawned) and the key is freed: no orphan is left for later callers to
/// adopt and wait on, and nothing leaks after `forget` (the work, which holds
/// the map, is freed: no reference cycle).
#[test]
fn work_calling_back_into_its_own_key_is_dropped_when_cancelled() {
    with_timeout("work_calling_back_into_its_own_key", || {
        for spawner in [false, true] {
            let sf: SingleFlight<&str, u32> = if spawner {
                SingleFlight::new()
                    .with_spawner(|_| panic!("work that waits for itself is not spawned"))
            } else {
                SingleFlight::new()
            };
            let sf = Arc::new(sf);
            let dropped = Arc::new(AtomicBool::new(false));
            let (inner, flag) = (sf.clone(), DropFlag(dropped.clone()));
            let mut leader = Box::pin(sf.run("k", move || async move {
                let _flag = flag;
                // Waits for its own flight: Go's self-deadlock.
                inner
                    .run("k", || async { unreachable!("never leads") })
                    .await
                    .value
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            assert_eq!(sf.waiters("k"), 1, "the nested call joined the flight");
            drop(leader);
            assert!(dropped.load(Ordering::SeqCst), "the work was dropped");
            assert!(!sf.is_in_flight("k"), "no orphan left behind");
            sf.forget("k");
            assert_eq!(
                Arc::strong_count(&sf),
                1,
                "the work's handle on the map is freed"
            );
            let next = block_on(sf.run("k", || async { 5 }));
            assert_eq!((next.value, next.role), (5, Role::Led));
        }
    });
}

/// A blocking call made inside a flight's work on that same key would wait
/// for itself forever: it panics with a clear message instead, the panic
/// reaches the leader, and the key is free.
#[test]
fn a_blocking_call_into_its_own_flight_panics_instead_of_hanging() {
    with_timeout("a_blocking_call_into_its_own_flight", || {
        let sf: Arc<SingleFlight<&str, u32>> = Arc::new(SingleFlight::new());
        let inner = sf.clone();
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            sf.run_blocking("k", move || inner.run_blocking("k", || 1).value)
        }))
        .expect_err("the nested blocking call panics");
        let message = panicked
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panicked.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(message.contains("wait for itself"), "message: {message}");
        assert!(!sf.is_in_flight("k"));
        let inner = sf.clone();
        // The same from async work.
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            block_on(sf.run(
                "k",
                move || async move { inner.run_blocking("k", || 1).value },
            ))
        }));
        assert!(panicked.is_err());
        assert!(!sf.is_in_flight("k"));
        assert_eq!(sf.run_blocking("k", || 3).role, Role::Led);
    });
}
