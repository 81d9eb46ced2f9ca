//! I4 (failure): an `Err` reaches every caller of that flight, changes no
//! stored state, and is not retried.
#![cfg(loom)]

use epochflight::Role;
use epochflight_loom_tests::{Counter, Gate, K, TrySf, check};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;

/// I4: the key holds value 1 at epoch e1. The main thread leads
/// `try_refresh_if_current(e1)`; its work fails only after a follower
/// (spawned, same call) has registered, so the follower is a follower; its
/// look-and-wait races the failure in every order. Both get the same
/// `Err`, the work ran once, and the stored value and epoch are unchanged
/// (read by the follower right after its error and by the main thread). The
/// next call starts a new flight (no automatic retry happened in between).
#[test]
fn an_error_reaches_every_caller_and_stores_nothing() {
    check("I4 failure", None, || {
        let sf = Arc::new(TrySf::new());
        let e1 = sf.set(K, 1);
        let gate = Gate::new();
        let starts = Counter::new();
        let leader = {
            let (wait, starts) = (gate.wait_for(1), starts.clone());
            sf.try_refresh_if_current(K, e1, move || {
                starts.bump();
                async move {
                    wait.await;
                    Err("down".to_string())
                }
            })
        };
        let follower = {
            let sf = sf.clone();
            thread::spawn(move || {
                let call =
                    sf.try_refresh_if_current(K, e1, || async { unreachable!("the follower led") });
                gate.open();
                let err = block_on(call);
                let stored = sf.current(&K).map(|v| (v.value, v.epoch));
                (err, stored)
            })
        };
        let err = block_on(leader);
        let (follower_err, follower_saw) = follower.join().unwrap();

        assert_eq!(err, Err("down".to_string()));
        assert_eq!(follower_err, Err("down".to_string()));
        assert_eq!(follower_saw, Some((1, e1)));
        assert_eq!(starts.get(), 1);
        assert_eq!(sf.current(&K).map(|v| (v.value, v.epoch)), Some((1, e1)));
        assert_eq!(sf.epoch(&K), e1);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.waiters(&K), 0);

        let next = block_on(sf.try_refresh_if_current(K, e1, || async { Ok(2) })).unwrap();
        assert_eq!((next.value, next.role), (2, Role::Led));
        assert!(next.epoch > e1);
    });
}

/// I4 + I7 on an empty key: a failed first flight leaves no slot behind
/// (`len() == 0`), for the leader and a follower that raced it as above.
#[test]
fn a_failed_first_flight_leaves_no_slot() {
    check("I4 failure on empty key", None, || {
        let sf = Arc::new(TrySf::new());
        let gate = Gate::new();
        let wait = gate.wait_for(1);
        let leader = sf.try_run(K, move || async move {
            wait.await;
            Err("down".to_string())
        });
        let follower = {
            let sf = sf.clone();
            thread::spawn(move || {
                let call = sf.try_run(K, || async { unreachable!("the follower led") });
                gate.open();
                block_on(call)
            })
        };
        assert_eq!(block_on(leader), Err("down".to_string()));
        assert_eq!(follower.join().unwrap(), Err("down".to_string()));
        assert_eq!(sf.current(&K), None);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 0);
    });
}
