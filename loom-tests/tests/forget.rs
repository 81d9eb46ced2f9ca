//! `forget` during a flight (DESIGN §2, Go's `Forget`): the old flight
//! finishes for its own callers only; callers after `forget` start a new
//! flight; the old flight's completion does not clobber the new entry.
#![cfg(loom)]

use epochflight::Role;
use epochflight_loom_tests::{
    Counter, Gate, K, Sf, check, pending_times, poll_once_then_drop, spin_until,
};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;

/// The main thread leads the old flight, whose work finishes only after
/// `forget`. A spawned thread joins the old flight, calls `forget`, then
/// leads a new flight (value 2) and finally collects its old-flight result.
/// The old flight's completion races the new flight in every order. The old
/// flight's callers both get value 1 with the same epoch; the caller after
/// `forget` leads (`Led`, value 2, a different epoch); at the end the key
/// holds the new flight's value and epoch, never the old one's.
#[test]
fn forget_during_flight_starts_a_new_flight_that_is_not_clobbered() {
    check("forget during flight", None, || {
        let sf = Arc::new(Sf::new());
        let forgotten = Gate::new();
        let wait = forgotten.wait_for(1);
        let old_leader = sf.run(K, move || async move {
            wait.await;
            1
        });
        let other = {
            let sf = sf.clone();
            thread::spawn(move || {
                let old = sf.run(K, || async { unreachable!("joined the old flight") });
                sf.forget(&K);
                forgotten.open();
                let new = block_on(sf.run(K, || async { 2 }));
                (new, block_on(old))
            })
        };
        let led = block_on(old_leader);
        let (new, joined) = other.join().unwrap();

        assert_eq!((led.value, led.role), (1, Role::Led));
        assert_eq!(
            (joined.value, joined.epoch, joined.role),
            (1, led.epoch, Role::Joined)
        );
        assert_eq!((new.value, new.role), (2, Role::Led));
        assert_ne!(new.epoch, led.epoch);
        let stored = sf.current(&K).unwrap();
        assert_eq!((stored.value, stored.epoch), (2, new.epoch));
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// `forget` racing a hand-off: the main thread leads and polls once (work
/// `Pending`), waits for the follower (spawned) to register, and drops its
/// future; a third thread, started once the follower has registered, calls
/// `forget` at any point relative to the drop, the follower's adoption, and
/// the completion. The follower always
/// finishes the same work (one start, one finish, `Joined`); whenever the
/// `forget` landed, the key ends empty (the result was not stored, or was
/// stored and then forgotten), no slot is left, the detached flight is
/// released (`cut_loose_in_flight: 0`), and the next caller leads a fresh
/// flight.
#[test]
fn forget_racing_a_hand_off() {
    check("forget vs hand-off", None, || {
        let sf = Arc::new(Sf::new());
        let (starts, finishes, registered) = (Counter::new(), Counter::new(), Counter::new());
        let leader = {
            let (starts, finishes) = (starts.clone(), finishes.clone());
            sf.run(K, move || {
                starts.bump();
                async move {
                    pending_times(1).await;
                    finishes.bump();
                    42
                }
            })
        };
        let follower = {
            let (sf, registered) = (sf.clone(), registered.clone());
            thread::spawn(move || {
                let call = sf.run(K, || async { unreachable!("the follower led") });
                registered.bump();
                block_on(call)
            })
        };
        let mut leader = Box::pin(leader);
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        spin_until(|| registered.get() == 1);
        let forgetter = {
            let sf = sf.clone();
            thread::spawn(move || sf.forget(&K))
        };
        drop(leader);
        let out = follower.join().unwrap();
        forgetter.join().unwrap();

        assert_eq!((out.value, out.role), (42, Role::Joined));
        assert_eq!((starts.get(), finishes.get()), (1, 1));
        assert_eq!(sf.current(&K), None);
        assert_eq!(sf.len(), 0);
        assert!(
            format!("{sf:?}").contains("cut_loose_in_flight: 0"),
            "{sf:?}"
        );
        let next = block_on(sf.run(K, || async { 7 }));
        assert_eq!((next.value, next.role), (7, Role::Led));
        assert!(next.epoch > out.epoch);
    });
}
