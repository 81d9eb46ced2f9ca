//! I6 (panic): a panic in user work propagates to the caller polling it; the
//! key is not poisoned; one waiting follower is promoted and runs its own
//! closure.
//!
//! Loom limitation shaping these models: loom runs all its threads on one OS
//! thread, so while the panicking thread unwinds (and the driver's drop runs
//! the hand-off, a series of loom operations), `std::thread::panicking()` is
//! true for *every* loom thread. A `loom::sync::Mutex` (whose data sits in a
//! `std::sync::Mutex`) locked by another thread before the panic and
//! released during the unwinding is then poisoned, and the next `lock`
//! panics inside loom (seen first in the parker of event-listener, which the
//! crate's blocking waits used then), aborting the test binary.
//! So here the follower holds no lock while the leader unwinds: it
//! registers (and maybe polls once), tells the leader to panic, and spins on
//! a loom atomic (lock-free in loom; `loom::sync::Notify` would not do, its
//! `wait` may return spuriously) until the leader has caught its panic.
//! These models check the panic path itself (propagation, the driver's drop
//! during unwinding, the vacancy, the promotion, the key's reuse). The race
//! of a vacancy against a follower's look and wait, which uses the same code
//! without a panic, is explored in full by
//! `cancel.rs::leader_dropped_before_starting_promotes_the_follower`.
#![cfg(loom)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use epochflight::Role;
use epochflight_loom_tests::{Counter, Flag, INTENTIONAL, K, Sf, check, spin_until, until};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;
use std::pin::pin;
use std::task::{Context, Waker};

/// I6, async leader whose work panics inside `poll`: the main thread leads;
/// the follower (spawned) registers and polls once (its waker is
/// registered), then lets the leader's work panic. The panic reaches the
/// leader (caught by `catch_unwind` around its `block_on`; the driver is
/// dropped during unwinding and hands the flight on). The follower is
/// promoted and runs its own closure (`Led`, value 2); the panicking work
/// ran once. Afterwards the key is usable: the follower's value is stored
/// and a refresh leads a new flight.
#[test]
fn panicking_work_promotes_the_async_follower() {
    check("I6 async work panics", None, || {
        let sf = Arc::new(Sf::new());
        let (parked, unwound) = (Flag::new(), Flag::new());
        let (panics, follower_runs) = (Counter::new(), Counter::new());
        let leader = {
            let (parked, panics) = (parked.clone(), panics.clone());
            sf.run(K, move || async move {
                until(move || parked.is_raised()).await;
                panics.bump();
                panic!("{INTENTIONAL}: leader's work");
            })
        };
        let follower = {
            let (sf, unwound, runs) = (sf.clone(), unwound.clone(), follower_runs.clone());
            thread::spawn(move || {
                let mut call = pin!(sf.run(K, move || {
                    runs.bump();
                    async { 2 }
                }));
                let first = call.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                assert!(first.is_pending());
                parked.raise();
                spin_until(|| unwound.is_raised());
                block_on(call)
            })
        };
        let caught = catch_unwind(AssertUnwindSafe(|| block_on(leader)));
        unwound.raise();
        assert!(caught.is_err(), "the panic did not reach the leader");
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.role), (2, Role::Led));
        assert_eq!((panics.get(), follower_runs.get()), (1, 1));
        assert_eq!(
            sf.current(&K).map(|v| (v.value, v.epoch)),
            Some((2, out.epoch))
        );
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.waiters(&K), 0);
        let next = block_on(sf.refresh_if_current(K, out.epoch, || async { 3 }));
        assert_eq!((next.value, next.role), (3, Role::Led));
        assert!(next.epoch > out.epoch);
    });
}

/// I6, blocking leader whose closure panics: the main thread leads with
/// `run_blocking`; the async follower (spawned) registers once the flight is
/// in progress and, without polling, lets the closure panic. The panic
/// reaches the leader; the follower's first poll finds the flight vacant,
/// so it is promoted and runs its own closure (`Led`, value 2). The key is
/// usable afterwards (blocking refresh leads a new flight).
#[test]
fn panicking_blocking_closure_promotes_the_follower() {
    check("I6 blocking closure panics", None, || {
        let sf = Arc::new(Sf::new());
        let (registered, unwound) = (Flag::new(), Flag::new());
        let follower = {
            let (sf, registered, unwound) = (sf.clone(), registered.clone(), unwound.clone());
            thread::spawn(move || {
                spin_until(|| sf.is_in_flight(&K));
                let call = sf.run(K, || async { 2 });
                registered.raise();
                spin_until(|| unwound.is_raised());
                block_on(call)
            })
        };
        let caught = catch_unwind(AssertUnwindSafe(|| {
            sf.run_blocking(K, || {
                spin_until(|| registered.is_raised());
                panic!("{INTENTIONAL}: leader's closure");
            })
        }));
        unwound.raise();
        assert!(caught.is_err(), "the panic did not reach the leader");
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.role), (2, Role::Led));
        assert_eq!(
            sf.current(&K).map(|v| (v.value, v.epoch)),
            Some((2, out.epoch))
        );
        assert!(!sf.is_in_flight(&K));
        let next = sf.refresh_if_current_blocking(K, out.epoch, || 3);
        assert_eq!((next.value, next.role), (3, Role::Led));
    });
}
