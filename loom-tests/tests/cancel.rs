//! I5 (leader cancellation): a dropped leader's work is handed, as it is, to
//! one waiting follower, which continues it; it is never restarted.
#![cfg(loom)]

use std::task::Poll;

use epochflight::Role;
use epochflight_loom_tests::{
    Counter, K, Sf, check, pending_times, poll_once_then_drop, spin_until,
};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;

/// Work that counts its start and its finish and needs `pending + 1` polls.
fn counted_work(
    starts: &Counter,
    finishes: &Counter,
    pending: usize,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> + use<> {
    let (starts, finishes) = (starts.clone(), finishes.clone());
    move || {
        starts.bump();
        Box::pin(async move {
            pending_times(pending).await;
            finishes.bump();
            42
        })
    }
}

/// I5, hand-off: the main thread leads (it registers before spawning), polls
/// its future once (the work starts and is `Pending`), waits until the
/// follower (spawned thread) has registered, and drops its future. The drop
/// races the follower's look at the flight and its wait in every order. The
/// follower
/// continues the same work: it started once and finished once, and the
/// follower gets its value as `Joined`. The key is free afterwards.
#[test]
fn cancelled_leader_hands_its_work_to_the_follower() {
    check("I5 leader cancelled, follower adopts", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes, registered) = (Counter::new(), Counter::new(), Counter::new());
        let leader = sf.run(K, counted_work(&starts, &finishes, 1));
        let follower = {
            let (sf, registered) = (sf.clone(), registered.clone());
            thread::spawn(move || {
                let call = sf.run(K, || async { unreachable!("the follower led") });
                registered.bump();
                block_on(call)
            })
        };
        let mut leader = Box::pin(leader);
        let first = poll_once_then_drop(leader.as_mut());
        assert!(first.is_pending());
        spin_until(|| registered.get() == 1);
        drop(leader);
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.role), (42, Role::Joined));
        assert_eq!(
            (starts.get(), finishes.get()),
            (1, 1),
            "work restarted or lost"
        );
        assert_eq!(sf.epoch(&K), out.epoch);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.waiters(&K), 0);
        assert_eq!(sf.len(), 1);
    });
}

/// I5, dropped at any point: as above but the leader drops its future right
/// after its first poll, so the follower's registration races the drop. If
/// the follower registered first it continues the work (`Joined`, one start,
/// one finish); otherwise the abandoned work is dropped unfinished and the
/// follower leads a flight of its own (`Led`, two starts, one finish). No
/// other combination, no hang, and the key is free afterwards.
#[test]
fn leader_dropped_at_any_point() {
    check("I5 leader dropped at any point", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes) = (Counter::new(), Counter::new());
        let leader = sf.run(K, counted_work(&starts, &finishes, 1));
        let follower = {
            let (sf, starts, finishes) = (sf.clone(), starts.clone(), finishes.clone());
            thread::spawn(move || block_on(sf.run(K, counted_work(&starts, &finishes, 0))))
        };
        assert!(poll_once_then_drop(leader).is_pending());
        let out = follower.join().unwrap();

        assert_eq!(out.value, 42);
        match out.role {
            Role::Joined => assert_eq!((starts.get(), finishes.get()), (1, 1)),
            Role::Led => assert_eq!((starts.get(), finishes.get()), (2, 1)),
            Role::Reused => panic!("run never reuses"),
        }
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// I5/I6, leader dropped before its first poll (its closure never ran): the
/// waiting follower is promoted and runs its own closure (`Led`). The drop
/// races the follower's registration, look and wait.
#[test]
fn leader_dropped_before_starting_promotes_the_follower() {
    check("I5 leader dropped before starting", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes) = (Counter::new(), Counter::new());
        let leader = sf.run(K, || async { unreachable!("the dropped leader started") });
        let follower = {
            let (sf, starts, finishes) = (sf.clone(), starts.clone(), finishes.clone());
            thread::spawn(move || block_on(sf.run(K, counted_work(&starts, &finishes, 0))))
        };
        drop(leader);
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.role), (42, Role::Led));
        assert_eq!((starts.get(), finishes.get()), (1, 1));
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// I5 + I2, the chosen heir disappears: the main thread leads, polls once
/// (work `Pending`, two more polls needed), waits for both followers to
/// register, and drops its future. Follower A (spawned) waits; follower B
/// (spawned) polls its future once with a no-op waker and drops it. B's
/// single poll may come before the hand-off (B withdraws) or after it (B
/// adopts the work, polls it once, and is dropped as its driver, handing it
/// on again), or after A finished (B sees the result). Either way A continues the same work: one start, one finish,
/// A gets its value as `Joined`, nothing is left registered.
#[test]
fn hand_off_survives_the_heir_being_dropped() {
    check("I5 heir dropped", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes, registered) = (Counter::new(), Counter::new(), Counter::new());
        let leader = sf.run(K, counted_work(&starts, &finishes, 2));
        let a = {
            let (sf, registered) = (sf.clone(), registered.clone());
            thread::spawn(move || {
                let call = sf.run(K, || async { unreachable!("A led") });
                registered.bump();
                block_on(call)
            })
        };
        let b = {
            let (sf, registered) = (sf.clone(), registered.clone());
            thread::spawn(move || {
                let call = sf.run(K, || async { unreachable!("B led") });
                registered.bump();
                poll_once_then_drop(call)
            })
        };
        let mut leader = Box::pin(leader);
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        spin_until(|| registered.get() == 2);
        drop(leader);
        let a = a.join().unwrap();
        if let Poll::Ready(b) = b.join().unwrap() {
            // B looked after A had finished the work.
            assert_eq!((b.value, b.epoch, b.role), (42, a.epoch, Role::Joined));
        }

        assert_eq!((a.value, a.role), (42, Role::Joined));
        assert_eq!(
            (starts.get(), finishes.get()),
            (1, 1),
            "work restarted or lost"
        );
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.waiters(&K), 0);
        assert_eq!(sf.len(), 1);
    });
}

/// Bumps a counter when dropped: tells whether abandoned work was dropped.
struct DropCount(Counter);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.bump();
    }
}

/// I5 + I7, nobody left: the main thread leads and polls once (work
/// `Pending`); its only follower (spawned) registers, polls once with a
/// no-op waker and drops its future; the leader drops its future too, at any
/// point relative to the follower (the follower may withdraw first, or
/// adopt the work in its single poll and be dropped as its driver). With no
/// follower left the work is dropped, unfinished, exactly once, and the key
/// is free: no flight, no slot, nothing detached.
#[test]
fn work_is_dropped_and_the_key_freed_when_nobody_is_left() {
    check("I5 nobody left", None, || {
        let sf = Arc::new(Sf::new());
        let (finishes, drops, registered) = (Counter::new(), Counter::new(), Counter::new());
        let leader = {
            let (finishes, drops) = (finishes.clone(), drops.clone());
            sf.run(K, move || async move {
                let _guard = DropCount(drops);
                pending_times(2).await;
                finishes.bump();
                42
            })
        };
        let follower = {
            let (sf, registered) = (sf.clone(), registered.clone());
            thread::spawn(move || {
                let call = sf.run(K, || async { unreachable!("the follower led") });
                registered.bump();
                poll_once_then_drop(call)
            })
        };
        let mut leader = Box::pin(leader);
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        spin_until(|| registered.get() == 1);
        drop(leader);
        assert!(follower.join().unwrap().is_pending());

        assert_eq!((finishes.get(), drops.get()), (0, 1));
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 0);
        assert!(
            format!("{sf:?}").contains("cut_loose_in_flight: 0"),
            "{sf:?}"
        );
    });
}
