//! I2 (no lost wake-ups) and I7 (no leaked registrations): every follower
//! returns once its flight completes; a dropped follower withdraws.
#![cfg(loom)]

use epochflight::Role;
use epochflight_loom_tests::{Counter, Gate, K, Sf, check, poll_once_then_drop, spin_until, until};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;
use std::task::Poll;

/// I2, async follower: two async callers of `run`. Whoever leads finishes
/// its work only once the other has registered as a follower (the work polls
/// `sf.waiters`, which also checks that user work can call back into the map,
/// I8), so the follower is guaranteed to be a follower; its look at the
/// flight and waker registration race the leader's completion in every
/// order.
/// The follower returns the leader's value and epoch.
#[test]
fn async_follower_registering_while_leader_completes_returns() {
    check("I2 async follower", None, || {
        let sf = Arc::new(Sf::new());
        let starts = Counter::new();
        let call = {
            let (sf, starts) = (sf.clone(), starts.clone());
            move || {
                let inner = sf.clone();
                block_on(sf.run(K, || {
                    let n = starts.bump() as u32;
                    async move {
                        until(move || inner.waiters(&K) >= 1).await;
                        n
                    }
                }))
            }
        };
        let other = thread::spawn(call.clone());
        let mine = call();
        let theirs = other.join().unwrap();

        assert_eq!(starts.get(), 1);
        let mut roles = [mine.role, theirs.role];
        roles.sort_by_key(|r| *r as u8);
        assert_eq!(roles, [Role::Led, Role::Joined]);
        assert_eq!((mine.value, mine.epoch), (theirs.value, theirs.epoch));
        assert!(!sf.is_in_flight(&K));
    });
}

/// I2, blocking follower: as above with one async caller (spawned thread)
/// and one blocking caller (`run_blocking`, main thread). Either may lead;
/// the leader returns only after the other registered, so the other is a
/// follower whose look, waker registration and park race the completion.
/// The blocking path (the follower step polled by the crate's `block_on`,
/// parked on an event) must not miss the wake-up, or loom reports a
/// deadlock.
#[test]
fn blocking_follower_registering_while_leader_completes_returns() {
    check("I2 blocking follower", None, || {
        let sf = Arc::new(Sf::new());
        let starts = Counter::new();
        let other = {
            let (sf, starts) = (sf.clone(), starts.clone());
            thread::spawn(move || {
                let inner = sf.clone();
                block_on(sf.run(K, || {
                    let n = starts.bump() as u32;
                    async move {
                        until(move || inner.waiters(&K) >= 1).await;
                        n
                    }
                }))
            })
        };
        let mine = sf.run_blocking(K, || {
            let n = starts.bump() as u32;
            spin_until(|| sf.waiters(&K) >= 1);
            n
        });
        let theirs = other.join().unwrap();

        assert_eq!(starts.get(), 1);
        assert_ne!(mine.role, theirs.role);
        assert_eq!((mine.value, mine.epoch), (theirs.value, theirs.epoch));
        assert!(!sf.is_in_flight(&K));
    });
}

/// I2 + I7, a follower dropped mid-wait: the main thread leads (it
/// registers before spawning, so the others are followers), follower A
/// (spawned) waits, follower B (spawned) registers, polls its future once
/// with a no-op waker (so it may have registered a waker) and drops it.
/// The leader's work finishes only after A registered and B was dropped, and
/// from inside the work checks that B's registration is gone
/// (`waiters == 1`). B's drop races A's look and wait in every order.
/// A still returns the leader's value, and at the end nothing is left
/// registered (`waiters == 0`, no flight, one slot; loom also checks that
/// no `Arc` leaked).
#[test]
fn dropped_follower_withdraws_and_the_other_still_returns() {
    check("I2/I7 follower dropped before completion", None, || {
        let sf = Arc::new(Sf::new());
        let gate = Gate::new();
        let inner = sf.clone();
        let wait = gate.wait_for(2);
        let leader = sf.run(K, || async move {
            wait.await;
            assert_eq!(
                inner.waiters(&K),
                1,
                "the dropped follower is still registered"
            );
            1
        });
        let a = {
            let (sf, gate) = (sf.clone(), gate.clone());
            thread::spawn(move || {
                let follower = sf.run(K, || async { unreachable!("A leads") });
                gate.open();
                block_on(follower)
            })
        };
        let b = {
            let (sf, gate) = (sf.clone(), gate.clone());
            thread::spawn(move || {
                let poll = poll_once_then_drop(sf.run(K, || async { unreachable!("B leads") }));
                assert!(poll.is_pending(), "the flight finished before B dropped");
                gate.open();
            })
        };
        let led = block_on(leader);
        let a = a.join().unwrap();
        b.join().unwrap();

        assert_eq!(led.role, Role::Led);
        assert_eq!((a.value, a.epoch, a.role), (1, led.epoch, Role::Joined));
        assert_eq!(sf.waiters(&K), 0);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// I2 + I7, a follower dropped at any point: as above, but the leader's work
/// waits only for both followers to register, so B's single poll and drop
/// also race the completion itself (B may see the result, or withdraw
/// before or after it is published). A returns the value in every case and
/// nothing is left registered.
#[test]
fn follower_dropped_at_any_point() {
    check("I2/I7 follower dropped at any point", None, || {
        let sf = Arc::new(Sf::new());
        let gate = Gate::new();
        let wait = gate.wait_for(2);
        let leader = sf.run(K, || async move {
            wait.await;
            1
        });
        let a = {
            let (sf, gate) = (sf.clone(), gate.clone());
            thread::spawn(move || {
                let follower = sf.run(K, || async { unreachable!("A leads") });
                gate.open();
                block_on(follower)
            })
        };
        let b = {
            let (sf, gate) = (sf.clone(), gate.clone());
            thread::spawn(move || {
                let follower = sf.run(K, || async { unreachable!("B leads") });
                gate.open();
                poll_once_then_drop(follower)
            })
        };
        let led = block_on(leader);
        let a = a.join().unwrap();
        if let Poll::Ready(b) = b.join().unwrap() {
            assert_eq!((b.value, b.epoch, b.role), (1, led.epoch, Role::Joined));
        }

        assert_eq!(led.role, Role::Led);
        assert_eq!((a.value, a.epoch, a.role), (1, led.epoch, Role::Joined));
        assert_eq!(sf.waiters(&K), 0);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}
