//! The async contract of `SingleFlight`, every scenario on tokio (multi-thread)
//! and on smol. Interleavings are forced with gates and counted waiters.

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{DropFlag, Gate, Probe, Rt, until};
use epochflight::{Epoch, Outcome, Role, SingleFlight};

type Flights = SingleFlight<&'static str, u64>;
type Fallible = SingleFlight<&'static str, u64, String>;

/// Spawns a caller of `sf.run(key, ..)` whose work waits on `gate`, counts
/// itself in `runs`, and returns `value`.
fn spawn_run(
    rt: Rt,
    sf: &Arc<Flights>,
    key: &'static str,
    gate: &Arc<Gate>,
    runs: &Arc<AtomicUsize>,
    value: u64,
) -> common::Task<Outcome<u64>> {
    let (sf, gate, runs) = (sf.clone(), gate.clone(), runs.clone());
    rt.spawn(async move {
        sf.run(key, move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.wait().await;
            value
        })
        .await
    })
}

// ---------------------------------------------------------------- Go's Do

fn do_returns_value_and_error(rt: Rt) {
    rt.run("do_returns_value_and_error", || async {
        let sf = Fallible::new();
        let ok = sf.try_run("k", || async { Ok(42) }).await.unwrap();
        assert_eq!((ok.value, ok.role), (42, Role::Led));
        assert!(ok.epoch > Epoch::NONE);
        let err = sf.try_run("e", || async { Err("boom".to_string()) }).await;
        assert_eq!(err, Err("boom".to_string()));
        assert_eq!(sf.current("e"), None, "an error stores nothing");
        assert!(sf.current("k").is_some());
    });
}

/// Go's TestDoDupSuppress: the leader is held until all 9 followers joined.
fn ten_callers_one_execution(rt: Rt) {
    rt.run("ten_callers_one_execution", move || async move {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![spawn_run(rt, &sf, "k", &gate, &runs, 7)];
        until(|| runs.load(Ordering::SeqCst) == 1).await;
        for i in 0..9 {
            tasks.push(spawn_run(rt, &sf, "k", &gate, &runs, 100 + i));
        }
        until(|| sf.waiters("k") == 9).await;
        gate.open();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.join().await.expect("caller panicked"));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "exactly one execution");
        let epoch = outcomes[0].epoch;
        for o in &outcomes {
            assert_eq!((o.value, o.epoch), (7, epoch), "all ten see one result");
        }
        let led = outcomes.iter().filter(|o| o.role == Role::Led).count();
        assert_eq!(led, 1);
        assert!(!sf.is_in_flight("k"));
        assert_eq!(sf.current("k").unwrap().epoch, epoch);
    });
}

/// Go's TestForget: after `forget`, a new caller starts a new flight while the
/// old flight's callers still get the old result, which is not stored.
fn forget_during_flight(rt: Rt) {
    rt.run("forget_during_flight", move || async move {
        let sf = Arc::new(Flights::new());
        let (old_gate, new_gate) = (Gate::new(), Gate::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let old_leader = spawn_run(rt, &sf, "k", &old_gate, &runs, 1);
        until(|| runs.load(Ordering::SeqCst) == 1).await;
        let old_follower = spawn_run(rt, &sf, "k", &old_gate, &runs, 99);
        until(|| sf.waiters("k") == 1).await;

        sf.forget("k");
        assert!(!sf.is_in_flight("k"), "forget cut the old flight loose");
        let new_leader = spawn_run(rt, &sf, "k", &new_gate, &runs, 2);
        until(|| runs.load(Ordering::SeqCst) == 2).await;
        let new_follower = spawn_run(rt, &sf, "k", &new_gate, &runs, 98);
        until(|| sf.waiters("k") == 1).await;

        // The old flight finishes first: it must not clobber the new one.
        old_gate.open();
        let a = old_leader.join().await.unwrap();
        let b = old_follower.join().await.unwrap();
        assert_eq!(
            (a.value, a.role, b.value, b.role),
            (1, Role::Led, 1, Role::Joined)
        );
        assert_eq!(a.epoch, b.epoch);
        assert_eq!(
            sf.current("k"),
            None,
            "a forgotten flight's result is not stored"
        );
        assert!(sf.is_in_flight("k"), "the new flight is still running");

        new_gate.open();
        let c = new_leader.join().await.unwrap();
        let d = new_follower.join().await.unwrap();
        assert_eq!((c.value, d.value, c.epoch), (2, 2, d.epoch));
        assert!(c.epoch > a.epoch, "epochs are never reissued");
        assert_eq!(sf.current("k").unwrap().value, 2);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    });
}

// ------------------------------------------------------------------ burst

/// 1,000 tasks spawned at once, without any fence, while the work runs: the
/// work runs once. (Registering followers under an async lock runs it many
/// times here.)
fn burst_of_1000_runs_once(rt: Rt) {
    rt.run("burst_of_1000_runs_once", move || async move {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..1000)
            .map(|i| spawn_run(rt, &sf, "k", &gate, &runs, i))
            .collect();
        until(|| sf.waiters("k") == 999).await;
        gate.open();
        let mut values = Vec::new();
        for task in tasks {
            values.push(task.join().await.unwrap().value);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(values.iter().all(|v| *v == values[0]));
    });
}

// ----------------------------------------------------------------- epochs

fn stale_epoch_reuses_without_running(rt: Rt) {
    rt.run("stale_epoch_reuses_without_running", move || async move {
        let sf = Arc::new(Flights::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let v1 = sf
            .refresh_if_current("k", Epoch::NONE, || async { 1 })
            .await;
        assert_eq!(v1.role, Role::Led);
        let v2 = sf.refresh_if_current("k", v1.epoch, || async { 2 }).await;
        assert_eq!((v2.value, v2.role), (2, Role::Led));
        assert!(v2.epoch > v1.epoch);

        // A late caller still holding v1: handed v2, runs nothing...
        let r = runs.clone();
        let late = sf
            .refresh_if_current("k", v1.epoch, move || {
                r.fetch_add(1, Ordering::SeqCst);
                async { 3 }
            })
            .await;
        assert_eq!(
            (late.value, late.epoch, late.role),
            (2, v2.epoch, Role::Reused)
        );

        // ...even while a flight is in progress.
        let gate = Gate::new();
        let flying = spawn_run(rt, &sf, "k", &gate, &runs, 4);
        until(|| runs.load(Ordering::SeqCst) == 1).await;
        let r = runs.clone();
        let late = sf
            .refresh_if_current("k", v1.epoch, move || {
                r.fetch_add(1, Ordering::SeqCst);
                async { 5 }
            })
            .await;
        assert_eq!((late.value, late.role), (2, Role::Reused));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "only the flight ran");

        // A caller holding the current epoch joins the flight instead.
        let current = sf.refresh_if_current("k", v2.epoch, || async { 6 });
        assert_eq!(sf.waiters("k"), 1);
        gate.open();
        let joined = current.await;
        let flown = flying.join().await.unwrap();
        assert_eq!(
            (joined.value, joined.role, joined.epoch),
            (4, Role::Joined, flown.epoch)
        );
    });
}

fn none_is_get_or_create(rt: Rt) {
    rt.run("none_is_get_or_create", || async {
        let sf = Flights::new();
        let created = sf
            .refresh_if_current("k", Epoch::NONE, || async { 1 })
            .await;
        assert_eq!((created.value, created.role), (1, Role::Led));
        let got = sf
            .refresh_if_current("k", Epoch::NONE, || async { 2 })
            .await;
        assert_eq!(
            (got.value, got.role, got.epoch),
            (1, Role::Reused, created.epoch)
        );
        // A `seen` not older than the stored epoch counts as current.
        let newer = Epoch::default();
        assert!(newer < created.epoch);
        let refreshed = sf
            .refresh_if_current("k", created.epoch, || async { 3 })
            .await;
        assert_eq!((refreshed.value, refreshed.role), (3, Role::Led));
    });
}

fn epochs_grow_across_keys_and_survive_forget(rt: Rt) {
    rt.run("epochs_grow_across_keys_and_survive_forget", || async {
        let sf = Flights::new();
        let mut last = Epoch::NONE;
        let mut seen = Vec::new();
        for round in 0..3u64 {
            for key in ["a", "b", "c"] {
                let e = sf.run(key, move || async move { round }).await.epoch;
                assert!(e > last, "epoch {e} after {last}");
                last = e;
                seen.push(e);
            }
            let e = sf.set("a", 100);
            assert!(e > last);
            last = e;
            seen.push(e);
            sf.forget("a");
            sf.forget("b");
            assert_eq!(sf.epoch("a"), Epoch::NONE);
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "no epoch was issued twice");
        assert_eq!(sf.epoch("c"), sf.current("c").unwrap().epoch);
    });
}

// ---------------------------------------------------------------- failure

fn error_reaches_every_follower_and_stores_nothing(rt: Rt) {
    rt.run(
        "error_reaches_every_follower_and_stores_nothing",
        move || async move {
            let sf = Arc::new(Fallible::new());
            let before = sf.set("k", 1);
            let gate = Gate::new();
            let runs = Arc::new(AtomicUsize::new(0));
            let spawn = |n: u64| {
                let (sf, gate, runs) = (sf.clone(), gate.clone(), runs.clone());
                rt.spawn(async move {
                    sf.try_refresh_if_current("k", before, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        gate.wait().await;
                        Err(format!("refresh failed ({n})"))
                    })
                    .await
                })
            };
            let leader = spawn(0);
            until(|| runs.load(Ordering::SeqCst) == 1).await;
            let followers: Vec<_> = (1..5).map(spawn).collect();
            until(|| sf.waiters("k") == 4).await;
            gate.open();
            assert_eq!(
                leader.join().await.unwrap(),
                Err("refresh failed (0)".into())
            );
            for f in followers {
                assert_eq!(f.join().await.unwrap(), Err("refresh failed (0)".into()));
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1, "no automatic retry");
            let stored = sf.current("k").unwrap();
            assert_eq!((stored.value, stored.epoch), (1, before), "nothing stored");
            // The next call starts a new flight.
            let next = sf
                .try_refresh_if_current("k", before, || async { Ok(2) })
                .await;
            assert_eq!(next.map(|o| (o.value, o.role)), Ok((2, Role::Led)));
        },
    );
}

// ------------------------------------------------------ leader cancelled

/// I5: the leader is dropped mid-flight; a follower continues the *same*
/// work, which starts once and finishes once.
fn cancelled_leader_hands_work_to_follower(rt: Rt) {
    rt.run(
        "cancelled_leader_hands_work_to_follower",
        move || async move {
            let sf = Arc::new(Flights::new());
            let gate = Gate::new();
            let probe = Probe::new();
            let leader_gone = Arc::new(AtomicBool::new(false));
            let leader = {
                let (sf, gate, probe, gone) =
                    (sf.clone(), gate.clone(), probe.clone(), leader_gone.clone());
                rt.spawn(async move {
                    let _flag = DropFlag(gone);
                    sf.run("k", move || {
                        probe.watch(async move {
                            gate.wait().await;
                            10
                        })
                    })
                    .await
                })
            };
            until(|| probe.started() == 1).await;
            let follower_ran = Arc::new(AtomicUsize::new(0));
            let follower = {
                let (sf, ran) = (sf.clone(), follower_ran.clone());
                rt.spawn(async move {
                    sf.run("k", move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                        async { 20 }
                    })
                    .await
                })
            };
            until(|| sf.waiters("k") == 1).await;
            leader.abort().await;
            assert!(leader_gone.load(Ordering::SeqCst));
            // The follower adopted the work: it is the driver now, no longer a waiter.
            until(|| sf.waiters("k") == 0).await;
            assert!(sf.is_in_flight("k"));
            gate.open();
            let out = follower.join().await.unwrap();
            assert_eq!((out.value, out.role), (10, Role::Joined));
            assert_eq!(
                (probe.started(), probe.finished()),
                (1, 1),
                "continued, not restarted"
            );
            assert_eq!(probe.dropped_unfinished(), 0);
            assert_eq!(probe.max_concurrent_polls.load(Ordering::SeqCst), 1);
            assert_eq!(
                follower_ran.load(Ordering::SeqCst),
                0,
                "its own closure never ran"
            );
            assert_eq!(
                sf.current("k").unwrap().value,
                10,
                "the adopted result is stored"
            );
        },
    );
}

/// I5, no follower: the work is dropped and the key is free.
fn cancelled_leader_without_followers_frees_key(rt: Rt) {
    rt.run(
        "cancelled_leader_without_followers_frees_key",
        move || async move {
            let sf = Arc::new(Flights::new());
            let gate = Gate::new();
            let probe = Probe::new();
            let leader = {
                let (sf, gate, probe) = (sf.clone(), gate.clone(), probe.clone());
                rt.spawn(async move {
                    sf.run("k", move || {
                        probe.watch(async move {
                            gate.wait().await;
                            1
                        })
                    })
                    .await
                })
            };
            until(|| probe.started() == 1).await;
            leader.abort().await;
            assert_eq!(probe.dropped_unfinished(), 1, "the work was dropped");
            assert!(!sf.is_in_flight("k"));
            assert!(sf.is_empty(), "no slot left behind");
            let next = sf.run("k", || async { 2 }).await;
            assert_eq!((next.value, next.role), (2, Role::Led));
        },
    );
}

/// Several followers: the adopter is cancelled too; the next one continues.
fn hand_off_survives_a_chain_of_cancellations(rt: Rt) {
    rt.run(
        "hand_off_survives_a_chain_of_cancellations",
        move || async move {
            let sf = Arc::new(Flights::new());
            let gate = Gate::new();
            let probe = Probe::new();
            let mut callers = Vec::new();
            for i in 0..3u64 {
                let (sf, gate, work_probe) = (sf.clone(), gate.clone(), probe.clone());
                callers.push(rt.spawn(async move {
                    sf.run("k", move || {
                        work_probe.watch(async move {
                            gate.wait().await;
                            i
                        })
                    })
                    .await
                }));
                if i == 0 {
                    until(|| probe.started() == 1).await;
                }
            }
            until(|| sf.waiters("k") == 2).await;
            let last = callers.pop().unwrap();
            let middle = callers.pop().unwrap();
            let first = callers.pop().unwrap();
            first.abort().await; // one follower adopts
            until(|| sf.waiters("k") == 1).await;
            middle.abort().await; // adopter or waiter gone: the work must still reach `last`
            gate.open();
            let out = last.join().await.unwrap();
            assert_eq!(out.value, 0, "the leader's work, continued");
            assert_eq!((probe.started(), probe.finished()), (1, 1));
            assert_eq!(probe.max_concurrent_polls.load(Ordering::SeqCst), 1);
        },
    );
}

/// A leader dropped before its first poll never started its work: a follower
/// runs its own closure and leads.
fn leader_dropped_before_polling_promotes_follower(rt: Rt) {
    rt.run(
        "leader_dropped_before_polling_promotes_follower",
        || async {
            let sf = Flights::new();
            let leader = sf.run("k", || async { 1 });
            let follower = sf.run("k", || async { 2 });
            assert_eq!(sf.waiters("k"), 1);
            drop(leader);
            let out = follower.await;
            assert_eq!((out.value, out.role), (2, Role::Led));
        },
    );
}

fn dropped_follower_withdraws(rt: Rt) {
    rt.run("dropped_follower_withdraws", move || async move {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let leader = spawn_run(rt, &sf, "k", &gate, &runs, 5);
        until(|| runs.load(Ordering::SeqCst) == 1).await;
        let staying = spawn_run(rt, &sf, "k", &gate, &runs, 0);
        let leaving = spawn_run(rt, &sf, "k", &gate, &runs, 0);
        until(|| sf.waiters("k") == 2).await;
        leaving.abort().await;
        assert_eq!(
            sf.waiters("k"),
            1,
            "the dropped follower's registration is gone"
        );
        gate.open();
        assert_eq!(leader.join().await.unwrap().value, 5);
        assert_eq!(staying.join().await.unwrap().value, 5);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(sf.len(), 1);
    });
}

// ------------------------------------------------------------------ panic

/// I6: the panic reaches the polling caller; a follower runs its own closure;
/// the key keeps working.
fn panic_promotes_a_follower(rt: Rt) {
    rt.run("panic_promotes_a_follower", move || async move {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let started = Arc::new(AtomicUsize::new(0));
        let leader = {
            let (sf, gate, started) = (sf.clone(), gate.clone(), started.clone());
            rt.spawn(async move {
                sf.run("k", move || async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    gate.wait().await;
                    panic!("work failed hard");
                })
                .await
            })
        };
        until(|| started.load(Ordering::SeqCst) == 1).await;
        let followers: Vec<_> = (0..3u64)
            .map(|i| {
                let sf = sf.clone();
                rt.spawn(async move { sf.run("k", move || async move { 100 + i }).await })
            })
            .collect();
        until(|| sf.waiters("k") == 3).await;
        gate.open();
        let panic = leader.join().await.expect_err("the leader saw the panic");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"work failed hard"));
        let mut outs = Vec::new();
        for f in followers {
            outs.push(f.join().await.expect("followers do not panic"));
        }
        let led: Vec<_> = outs.iter().filter(|o| o.role == Role::Led).collect();
        assert_eq!(led.len(), 1, "exactly one follower was promoted");
        assert!(
            outs.iter()
                .all(|o| o.value == led[0].value && o.epoch == led[0].epoch)
        );
        let again = sf.run("k", || async { 7 }).await;
        assert_eq!(
            (again.value, again.role),
            (7, Role::Led),
            "key not poisoned"
        );
    });
}

// -------------------------------------------------------------------- set

fn set_detaches_running_flight(rt: Rt) {
    rt.run("set_detaches_running_flight", move || async move {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let leader = spawn_run(rt, &sf, "k", &gate, &runs, 1);
        until(|| runs.load(Ordering::SeqCst) == 1).await;
        let follower = spawn_run(rt, &sf, "k", &gate, &runs, 0);
        until(|| sf.waiters("k") == 1).await;
        let set_epoch = sf.set("k", 50);
        assert!(!sf.is_in_flight("k"));
        gate.open();
        let a = leader.join().await.unwrap();
        let b = follower.join().await.unwrap();
        assert_eq!(
            (a.value, b.value, a.epoch),
            (1, 1, b.epoch),
            "its callers get its result"
        );
        assert!(a.epoch > set_epoch, "with a fresh epoch of its own");
        let stored = sf.current("k").unwrap();
        assert_eq!(
            (stored.value, stored.epoch),
            (50, set_epoch),
            "set's value survives"
        );
        assert_eq!(sf.epoch("k"), set_epoch);
    });
}

// ------------------------------------------------------------ re-entrancy

/// I8: work may call back into the same instance.
fn work_may_reenter_the_same_instance(rt: Rt) {
    rt.run("work_may_reenter_the_same_instance", move || async move {
        let sf = Arc::new(Flights::new());
        sf.set("other", 3);
        let inner = sf.clone();
        let out = sf
            .run("k", move || async move {
                assert!(inner.is_in_flight("k"));
                assert_eq!(inner.current("other").unwrap().value, 3);
                assert!(inner.epoch("other") > Epoch::NONE);
                assert_eq!(inner.waiters("k"), 0);
                let nested = inner.run("nested", || async { 4 }).await;
                inner.run_blocking("nested-blocking", || 5);
                nested.value + 1
            })
            .await;
        assert_eq!(out.value, 5);
        assert_eq!(sf.current("nested-blocking").unwrap().value, 5);
    });
}

on_every_runtime!(
    do_returns_value_and_error,
    ten_callers_one_execution,
    forget_during_flight,
    burst_of_1000_runs_once,
    stale_epoch_reuses_without_running,
    none_is_get_or_create,
    epochs_grow_across_keys_and_survive_forget,
    error_reaches_every_follower_and_stores_nothing,
    cancelled_leader_hands_work_to_follower,
    cancelled_leader_without_followers_frees_key,
    hand_off_survives_a_chain_of_cancellations,
    leader_dropped_before_polling_promotes_follower,
    dropped_follower_withdraws,
    panic_promotes_a_follower,
    set_detaches_running_flight,
    work_may_reenter_the_same_instance,
);

/// A caller's future lives in its task, which callers move and spawn; the
/// README and the `benches/alloc.rs` table state 80 bytes for `u64` keys
/// and values. `Role` is a word wide (for the reuse fast path), so a driver
/// keeps a one-byte flag instead: a `Role` field would make this 88.
#[test]
fn a_call_future_for_u64_keys_is_at_most_80_bytes() {
    let sf: SingleFlight<u64, u64> = SingleFlight::new();
    let run = sf.run(7, || async { 1 });
    assert!(
        size_of_val(&run) <= 80,
        "run future: {} bytes",
        size_of_val(&run)
    );
    drop(run);
    let stale = sf.refresh_if_current(7, Epoch::NONE, || async { 1 });
    assert!(
        size_of_val(&stale) <= 80,
        "refresh future: {} bytes",
        size_of_val(&stale)
    );
}
