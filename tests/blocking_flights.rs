//! The blocking API from plain threads, and async and blocking callers mixed
//! on one key (DESIGN I9).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use common::{DropFlag, Gate, Probe, Rt, until, until_blocking, with_timeout};
use epochflight::{Epoch, Role, SingleFlight};

type Flights = SingleFlight<&'static str, u64>;

#[test]
fn eight_threads_one_execution() {
    with_timeout("eight_threads_one_execution", || {
        let sf = Flights::new();
        let gate = Gate::new();
        let runs = AtomicUsize::new(0);
        let outs: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = (0..8u64)
                .map(|i| {
                    let (sf, gate, runs) = (&sf, &gate, &runs);
                    let h = s.spawn(move || {
                        sf.run_blocking("k", || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            gate.wait_blocking();
                            i
                        })
                    });
                    if i == 0 {
                        until_blocking(|| runs.load(Ordering::SeqCst) == 1);
                    }
                    h
                })
                .collect();
            until_blocking(|| sf.waiters("k") == 7);
            gate.open();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            outs.iter()
                .all(|o| o.value == 0 && o.epoch == outs[0].epoch)
        );
        assert_eq!(outs.iter().filter(|o| o.role == Role::Led).count(), 1);
    });
}

#[test]
fn blocking_errors_reach_every_caller_and_store_nothing() {
    with_timeout("blocking_errors", || {
        let sf: SingleFlight<&str, u64, String> = SingleFlight::new();
        let gate = Gate::new();
        let runs = AtomicUsize::new(0);
        thread::scope(|s| {
            let leader = s.spawn(|| {
                sf.try_run_blocking("k", || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.wait_blocking();
                    Err("nope".to_string())
                })
            });
            until_blocking(|| runs.load(Ordering::SeqCst) == 1);
            let follower = s.spawn(|| sf.try_run_blocking("k", || Ok(1)));
            until_blocking(|| sf.waiters("k") == 1);
            gate.open();
            assert_eq!(leader.join().unwrap(), Err("nope".to_string()));
            assert_eq!(follower.join().unwrap(), Err("nope".to_string()));
        });
        assert!(sf.is_empty());
        let next = sf.try_run_blocking("k", || Ok(2)).unwrap();
        assert_eq!((next.value, next.role), (2, Role::Led));
    });
}

#[test]
fn blocking_panic_promotes_a_follower() {
    with_timeout("blocking_panic_promotes_a_follower", || {
        let sf = Flights::new();
        let gate = Gate::new();
        let started = AtomicUsize::new(0);
        thread::scope(|s| {
            let leader = s.spawn(|| {
                sf.run_blocking("k", || {
                    started.fetch_add(1, Ordering::SeqCst);
                    gate.wait_blocking();
                    panic!("blocking work panicked")
                })
            });
            until_blocking(|| started.load(Ordering::SeqCst) == 1);
            let follower = s.spawn(|| sf.run_blocking("k", || 9));
            until_blocking(|| sf.waiters("k") == 1);
            gate.open();
            assert!(
                leader.join().is_err(),
                "the panic reached the leader's thread"
            );
            let out = follower.join().unwrap();
            assert_eq!((out.value, out.role), (9, Role::Led));
        });
        assert_eq!(sf.run_blocking("k", || 10).value, 10);
    });
}

#[test]
fn blocking_refresh_if_current_reuses() {
    with_timeout("blocking_refresh_if_current_reuses", || {
        let sf = Flights::new();
        let v1 = sf.refresh_if_current_blocking("k", Epoch::NONE, || 1);
        let v2 = sf.refresh_if_current_blocking("k", v1.epoch, || 2);
        let late = sf.refresh_if_current_blocking("k", v1.epoch, || unreachable!());
        assert_eq!(
            (late.value, late.epoch, late.role),
            (2, v2.epoch, Role::Reused)
        );
    });
}

/// I9: a cancelled async leader's work is handed to a blocking follower,
/// which drives it on its own thread.
#[test]
fn async_leader_work_handed_to_blocking_follower() {
    for rt in Rt::ALL {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let probe = Probe::new();
        let leader_gone = Arc::new(AtomicBool::new(false));
        let (sf2, gate2, probe2, gone2) =
            (sf.clone(), gate.clone(), probe.clone(), leader_gone.clone());
        rt.run(
            "async_leader_work_handed_to_blocking_follower",
            move || async move {
                let (sf, gate, probe) = (sf2, gate2, probe2);
                let leader = {
                    let (sf, gate, probe) = (sf.clone(), gate.clone(), probe.clone());
                    rt.spawn(async move {
                        let _flag = DropFlag(gone2);
                        sf.run("k", move || {
                            probe.watch(async move {
                                gate.wait().await;
                                thread_id_hash()
                            })
                        })
                        .await
                    })
                };
                until(|| probe.started() == 1).await;
                let follower = {
                    let sf = sf.clone();
                    thread::spawn(move || {
                        let out = sf.run_blocking("k", || unreachable!("the work is continued"));
                        (out, thread_id_hash())
                    })
                };
                until(|| sf.waiters("k") == 1).await;
                leader.abort().await;
                until(|| sf.waiters("k") == 0).await; // adopted by the blocking thread
                gate.open();
                let (out, follower_thread) = follower.join().unwrap();
                assert_eq!(out.role, Role::Joined);
                assert_eq!(
                    out.value, follower_thread,
                    "the blocking thread polled it to completion"
                );
                assert_eq!((probe.started(), probe.finished()), (1, 1));
            },
        );
        assert!(leader_gone.load(Ordering::SeqCst));
    }
}

/// I9: with an async and a blocking follower waiting, the async one inherits
/// the cancelled leader's work.
#[test]
fn async_follower_preferred_for_hand_off() {
    Rt::Tokio.run("async_follower_preferred_for_hand_off", || async {
        let rt = Rt::Tokio;
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let probe = Probe::new();
        let leader = {
            let (sf, gate, probe) = (sf.clone(), gate.clone(), probe.clone());
            rt.spawn(async move {
                sf.run("k", move || {
                    probe.watch(async move {
                        gate.wait().await;
                        thread_id_hash()
                    })
                })
                .await
            })
        };
        until(|| probe.started() == 1).await;
        let blocking = {
            let sf = sf.clone();
            thread::spawn(move || (sf.run_blocking("k", || 0), thread_id_hash()))
        };
        until(|| sf.waiters("k") == 1).await;
        let asynchronous = {
            let sf = sf.clone();
            rt.spawn(async move { sf.run("k", || async { 1 }).await })
        };
        until(|| sf.waiters("k") == 2).await;
        leader.abort().await;
        until(|| sf.waiters("k") == 1).await; // one adopted; which one?
        gate.open();
        let a = asynchronous.join().await.unwrap();
        let (b, blocking_thread) = blocking.join().unwrap();
        assert_eq!((a.role, b.role), (Role::Joined, Role::Joined));
        assert_eq!(a.value, b.value);
        assert_ne!(
            a.value, blocking_thread,
            "the async follower drove the work"
        );
    });
}

/// I9: a blocking follower defers orphaned work to an async follower; when
/// that async follower leaves without polling, the blocking one takes over.
#[test]
fn blocking_follower_takes_over_when_async_follower_leaves() {
    Rt::Tokio.run(
        "blocking_follower_takes_over_when_async_follower_leaves",
        || async {
            let sf = Arc::new(Flights::new());
            let gate = Gate::new();
            let probe = Probe::new();
            let leader = {
                let (sf, gate, probe) = (sf.clone(), gate.clone(), probe.clone());
                Rt::Tokio.spawn(async move {
                    sf.run("k", move || {
                        probe.watch(async move {
                            gate.wait().await;
                            thread_id_hash()
                        })
                    })
                    .await
                })
            };
            until(|| probe.started() == 1).await;
            let blocking = {
                let sf = sf.clone();
                thread::spawn(move || (sf.run_blocking("k", || 0), thread_id_hash()))
            };
            until(|| sf.waiters("k") == 1).await;
            // Registered at call time, never polled: it cannot adopt anything.
            let idle_async = sf.run("k", || async { 1 });
            assert_eq!(sf.waiters("k"), 2);
            leader.abort().await;
            // The blocking follower defers to the async one...
            gate.open();
            assert_eq!(sf.waiters("k"), 2);
            // ...until it leaves.
            drop(idle_async);
            let (out, blocking_thread) = blocking.join().unwrap();
            assert_eq!((out.role, out.value), (Role::Joined, blocking_thread));
            assert_eq!((probe.started(), probe.finished()), (1, 1));
        },
    );
}

/// Async and blocking callers on one key share a flight led by either kind.
#[test]
fn blocking_leader_async_followers() {
    Rt::Tokio.run("blocking_leader_async_followers", || async {
        let sf = Arc::new(Flights::new());
        let gate = Gate::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let leader = {
            let (sf, gate, runs) = (sf.clone(), gate.clone(), runs.clone());
            thread::spawn(move || {
                sf.run_blocking("k", || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.wait_blocking();
                    3
                })
            })
        };
        until(|| runs.load(Ordering::SeqCst) == 1).await;
        let followers: Vec<_> = (0..4)
            .map(|_| {
                let sf = sf.clone();
                Rt::Tokio.spawn(async move { sf.run("k", || async { 0 }).await })
            })
            .collect();
        until(|| sf.waiters("k") == 4).await;
        gate.open();
        let led = leader.join().unwrap();
        for f in followers {
            let o = f.join().await.unwrap();
            assert_eq!((o.value, o.epoch, o.role), (3, led.epoch, Role::Joined));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// A number unique to the calling thread, returned by work to show which
/// thread polled it to completion.
fn thread_id_hash() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::SeqCst));
    ID.with(|id| *id)
}
