//! I9 (mixing): async and blocking callers share a key; a blocking follower
//! that inherits a cancelled async leader's work drives it on its own thread;
//! async followers are preferred for that hand-off.
#![cfg(loom)]

use std::task::Poll;

use epochflight::Role;
use epochflight_loom_tests::{
    Counter, Flag, K, Sf, check, pending_times, poll_once_then_drop, spin_until, until,
};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;

/// Work that counts its start and finish, and is `Pending` once.
fn counted_work(
    starts: &Counter,
    finishes: &Counter,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> + use<> {
    let (starts, finishes) = (starts.clone(), finishes.clone());
    move || {
        starts.bump();
        Box::pin(async move {
            pending_times(1).await;
            finishes.bump();
            42
        })
    }
}

/// I9 + I5: the main thread is an async leader; it polls once (work
/// `Pending`), waits until a blocking follower (`run_blocking`, spawned
/// thread) has registered, and drops its future. The drop races the
/// blocking follower's look, waker registration and park in every order. The blocking
/// follower adopts the same work and drives it to completion on its own
/// thread (the crate's event-based `block_on`): one start, one finish,
/// `Joined`, and its own closure never runs.
#[test]
fn blocking_follower_drives_a_cancelled_async_leaders_work() {
    check("I9 blocking follower adopts", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes) = (Counter::new(), Counter::new());
        let leader = sf.run(K, counted_work(&starts, &finishes));
        let follower = {
            let sf = sf.clone();
            thread::spawn(move || sf.run_blocking(K, || unreachable!("the follower led")))
        };
        let mut leader = Box::pin(leader);
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        spin_until(|| sf.waiters(&K) == 1);
        drop(leader);
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.role), (42, Role::Joined));
        assert_eq!((starts.get(), finishes.get()), (1, 1));
        assert_eq!(sf.epoch(&K), out.epoch);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// I9 + I2: an async leader (main thread) whose work finishes once two
/// followers have registered: an async one and a blocking one (spawned
/// threads). Both followers' waits race the completion; both get the
/// leader's value and epoch as `Joined`.
#[test]
fn async_and_blocking_followers_both_get_the_result() {
    check("I9 async + blocking followers", None, || {
        let sf = Arc::new(Sf::new());
        let inner = sf.clone();
        let leader = sf.run(K, move || async move {
            until(move || inner.waiters(&K) == 2).await;
            1
        });
        let async_follower = {
            let sf = sf.clone();
            thread::spawn(move || block_on(sf.run(K, || async { unreachable!("async led") })))
        };
        let blocking_follower = {
            let sf = sf.clone();
            thread::spawn(move || sf.run_blocking(K, || unreachable!("blocking led")))
        };
        let led = block_on(leader);
        let a = async_follower.join().unwrap();
        let b = blocking_follower.join().unwrap();

        assert_eq!(led.role, Role::Led);
        for out in [a, b] {
            assert_eq!(
                (out.value, out.epoch, out.role),
                (1, led.epoch, Role::Joined)
            );
        }
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.waiters(&K), 0);
    });
}

/// I9 + I5 + I2, async preferred, then withdrawn: the main thread is an
/// async leader; it polls once; a blocking follower B (spawned) registers;
/// then an async follower A (spawned) registers, polls its future once with
/// a no-op waker and drops it, racing the leader, which drops its future as
/// soon as A has registered. While A is registered, B must leave orphaned
/// work to it (async preferred); when A withdraws (or adopts the work and is
/// dropped as its driver), B must be woken and adopt it. Every order of A's
/// poll and drop against the hand-off and B's waits is explored: B always
/// finishes the same work (one start, one finish, `Joined`).
#[test]
fn blocking_follower_adopts_after_the_preferred_async_follower_leaves() {
    check("I9 async follower leaves, blocking adopts", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes, a_registered) = (Counter::new(), Counter::new(), Flag::new());
        let mut leader = Box::pin(sf.run(K, counted_work(&starts, &finishes)));
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        let b = {
            let sf = sf.clone();
            thread::spawn(move || sf.run_blocking(K, || unreachable!("B led")))
        };
        spin_until(|| sf.waiters(&K) == 1);
        let a = {
            let (sf, a_registered) = (sf.clone(), a_registered.clone());
            thread::spawn(move || {
                let call = sf.run(K, || async { unreachable!("A led") });
                a_registered.raise();
                poll_once_then_drop(call)
            })
        };
        spin_until(|| a_registered.is_raised());
        drop(leader);
        let b = b.join().unwrap();
        if let Poll::Ready(a) = a.join().unwrap() {
            assert_eq!((a.value, a.epoch, a.role), (42, b.epoch, Role::Joined));
        }

        assert_eq!((b.value, b.role), (42, Role::Joined));
        assert_eq!((starts.get(), finishes.get()), (1, 1));
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.waiters(&K), 0);
        assert_eq!(sf.len(), 1);
    });
}
