//! I3 (epochs): epochs only grow; `refresh_if_current` with a stale epoch
//! never runs user work; a stored value never goes back to an older epoch.
#![cfg(loom)]

use epochflight::{Epoch, Role};
use epochflight_loom_tests::{Counter, K, Sf, check, pending_times};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;

/// Reads `sf.epoch(&K)` `n` times and checks it never goes backwards.
fn read_epochs(sf: &Sf, n: usize) -> Epoch {
    let mut last = sf.epoch(&K);
    for _ in 1..n {
        let now = sf.epoch(&K);
        assert!(now >= last, "epoch went back from {last:?} to {now:?}");
        last = now;
    }
    last
}

/// I3, late 401s: the key holds value 1 at epoch e1. The main thread leads a
/// refresh from e1 (its work is `Pending` once, so it takes two polls). A
/// late caller (spawned) that also saw e1 calls `refresh_if_current(e1)` at
/// any point of that flight: it joins it (`Joined`) or, once it finished,
/// gets the new value (`Reused`); its own closure never runs. Another caller
/// with the already-stale epoch e0 is always `Reused`. A reader (spawned)
/// sees `epoch(K)` only grow, and only ever e1 or the new epoch. The work
/// runs once.
#[test]
fn stale_refreshes_racing_a_flight_run_nothing() {
    check("I3 stale refresh vs completing flight", None, || {
        let sf = Arc::new(Sf::new());
        let e0 = sf.set(K, 0);
        let e1 = sf.set(K, 1);
        let starts = Counter::new();
        let refresh = {
            let starts = starts.clone();
            sf.refresh_if_current(K, e1, move || {
                starts.bump();
                async {
                    pending_times(1).await;
                    2
                }
            })
        };
        let late =
            {
                let sf = sf.clone();
                thread::spawn(move || {
                    let stale = block_on(sf.refresh_if_current(K, e0, || async {
                        unreachable!("refresh from a stale epoch ran work")
                    }));
                    assert_eq!(stale.role, Role::Reused);
                    assert!(stale.epoch >= e1);
                    block_on(sf.refresh_if_current(K, e1, || async {
                        unreachable!("late refresh ran work")
                    }))
                })
            };
        let reader = {
            let sf = sf.clone();
            thread::spawn(move || {
                let first = sf.epoch(&K);
                let last = read_epochs(&sf, 2);
                (first, last)
            })
        };
        let refreshed = block_on(refresh);
        let late = late.join().unwrap();
        let (first, last) = reader.join().unwrap();

        assert_eq!((refreshed.value, refreshed.role), (2, Role::Led));
        assert!(refreshed.epoch > e1);
        assert_eq!(starts.get(), 1);
        assert_eq!((late.value, late.epoch), (2, refreshed.epoch));
        assert!(matches!(late.role, Role::Joined | Role::Reused));
        for seen in [first, last] {
            assert!(seen == e1 || seen == refreshed.epoch, "reader saw {seen:?}");
        }
        assert_eq!(sf.epoch(&K), refreshed.epoch);
    });
}

/// I3, `set` racing a flight: the main thread leads a `run` (work `Pending`
/// once) while a spawned thread `set`s value 100 and then reads the epoch.
/// Whether the set lands before the flight starts its work, during it
/// (detaching the flight) or after it completed, the stored value at the end
/// is the set's value with the set's epoch: the flight's completion never
/// overwrites a newer value, and `epoch(K)` read by either thread never
/// goes back. The flight's caller gets its own value with a fresh epoch.
#[test]
fn set_racing_a_flight_is_never_overwritten() {
    check("I3 set vs flight", None, || {
        let sf = Arc::new(Sf::new());
        let flight = sf.run(K, || async {
            pending_times(1).await;
            1
        });
        let setter = {
            let sf = sf.clone();
            thread::spawn(move || {
                let epoch = sf.set(K, 100);
                let seen = read_epochs(&sf, 2);
                assert!(seen >= epoch);
                epoch
            })
        };
        let out = block_on(flight);
        let after = read_epochs(&sf, 2);
        let set_epoch = setter.join().unwrap();

        assert_eq!((out.value, out.role), (1, Role::Led));
        assert_ne!(out.epoch, set_epoch);
        assert!(after >= out.epoch.min(set_epoch));
        let stored = sf.current(&K).unwrap();
        assert_eq!((stored.value, stored.epoch), (100, set_epoch));
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// I3 + I6, promotion after a `set`: the key holds value 1 at epoch e1; the
/// main thread leads `refresh_if_current(e1)`, then `set`s value 100 (epoch
/// es, detaching the flight) and drops its future before polling it (the
/// flight becomes vacant, as after a panic). A follower (spawned) calls
/// `refresh_if_current(e1)` at any point: before the `set` it joins the
/// flight and is later promoted, but its `seen` is stale by then, so it must
/// reuse the stored value instead of running its closure; after the `set` it
/// reuses at once. Either way: (100, es, `Reused`), no work ran, nothing is
/// left in flight or detached.
#[test]
fn a_follower_promoted_after_a_set_reuses_the_newer_value() {
    check("I3 promotion after set", None, || {
        let sf = Arc::new(Sf::new());
        let e1 = sf.set(K, 1);
        let leader = sf.refresh_if_current(K, e1, || async {
            unreachable!("the dropped leader started")
        });
        let follower = {
            let sf = sf.clone();
            thread::spawn(move || {
                block_on(sf.refresh_if_current(K, e1, || async {
                    unreachable!("a refresh from a stale epoch ran work")
                }))
            })
        };
        let es = sf.set(K, 100);
        drop(leader);
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.epoch, out.role), (100, es, Role::Reused));
        assert_eq!(sf.epoch(&K), es);
        assert!(!sf.is_in_flight(&K));
        assert!(
            format!("{sf:?}").contains("cut_loose_in_flight: 0"),
            "{sf:?}"
        );
        assert_eq!(sf.len(), 1);
    });
}

/// I3, a detached flight's promoted follower: as above but with `run`
/// (which never reuses). A follower that joined before the `set` is
/// promoted on the detached flight and runs its own closure (`Led`), and
/// its result is not stored: the key keeps the set's value and epoch. A
/// follower that came after the `set` leads a new flight on the key and
/// its result is stored. The stored epoch never goes back.
#[test]
fn a_detached_flights_promoted_follower_does_not_overwrite() {
    check("I3 detached promotion", None, || {
        let sf = Arc::new(Sf::new());
        let leader = sf.run(K, || async { unreachable!("the dropped leader started") });
        let follower = {
            let sf = sf.clone();
            thread::spawn(move || block_on(sf.run(K, || async { 2 })))
        };
        let es = sf.set(K, 100);
        drop(leader);
        let out = follower.join().unwrap();

        assert_eq!((out.value, out.role), (2, Role::Led));
        assert!(out.epoch > es);
        let stored = sf.current(&K).unwrap();
        // Joined before the set: detached, not stored. After: stored.
        assert!(
            (stored.value, stored.epoch) == (100, es)
                || (stored.value, stored.epoch) == (2, out.epoch),
            "{stored:?}"
        );
        assert!(!sf.is_in_flight(&K));
        assert!(
            format!("{sf:?}").contains("cut_loose_in_flight: 0"),
            "{sf:?}"
        );
    });
}

/// I3, `get` as a request gate: the key holds value 1 at e1; the main thread
/// leads a refresh from e1 (work `Pending` once, value 2). A `get` (spawned
/// thread) at any point of that flight waits for it (`Joined`) or, once it
/// finished, returns its result (`Reused`): never the value being replaced,
/// and its own closure never runs.
#[test]
fn get_waits_for_the_refresh_in_flight() {
    check("I3 get gated by a refresh", None, || {
        let sf = Arc::new(Sf::new());
        let e1 = sf.set(K, 1);
        let refresh = sf.refresh_if_current(K, e1, || async {
            pending_times(1).await;
            2
        });
        let getter = {
            let sf = sf.clone();
            thread::spawn(move || block_on(sf.get(K, || async { unreachable!("get ran work") })))
        };
        let refreshed = block_on(refresh);
        let got = getter.join().unwrap();

        assert_eq!((refreshed.value, refreshed.role), (2, Role::Led));
        assert_eq!((got.value, got.epoch), (2, refreshed.epoch));
        assert!(matches!(got.role, Role::Joined | Role::Reused), "{got:?}");
    });
}
