//! Abandoned work finishes on a spawner (`SingleFlight::with_spawner`), on
//! tokio, smol and plain threads: DESIGN I5 with a spawner.
//!
//! "The caller gives up" is forced: the leader is polled once (its work has
//! started and waits on a gate), then dropped, as a timeout would. Nothing
//! here sleeps; every wait is counted and under the test timeout.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use epochflight::{Epoch, Role, SingleFlight};
use futures::FutureExt;

use common::{Gate, Probe, until, with_timeout};

/// Where the spawner runs abandoned work.
#[derive(Clone, Copy, Debug)]
enum Spawn {
    /// `tokio::spawn`, from inside a tokio runtime.
    Tokio,
    /// `smol::spawn(..).detach()`.
    Smol,
    /// A new thread that `block_on`s the task.
    Thread,
}

/// What the spawner did with the tasks it was given.
#[derive(Default)]
struct Tasks {
    spawned: AtomicUsize,
    finished: AtomicUsize,
    panicked: AtomicUsize,
}

impl Tasks {
    fn spawned(&self) -> usize {
        self.spawned.load(Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
    fn panicked(&self) -> usize {
        self.panicked.load(Ordering::SeqCst)
    }
}

type Flights<T, E = Infallible> = SingleFlight<&'static str, T, E>;

impl Spawn {
    /// A `SingleFlight` whose abandoned work finishes on this spawner,
    /// counted in `tasks` (a panic in a task is caught and counted there:
    /// it reached the spawner's task).
    fn flights<T, E>(self, tasks: &Arc<Tasks>) -> Flights<T, E>
    where
        T: Clone + Send + 'static,
        E: Clone + Send + 'static,
    {
        let tasks = tasks.clone();
        SingleFlight::new().with_spawner(move |task| {
            tasks.spawned.fetch_add(1, Ordering::SeqCst);
            let tasks = tasks.clone();
            let task = async move {
                match AssertUnwindSafe(task).catch_unwind().await {
                    Ok(()) => tasks.finished.fetch_add(1, Ordering::SeqCst),
                    Err(_) => tasks.panicked.fetch_add(1, Ordering::SeqCst),
                };
            };
            match self {
                Spawn::Tokio => drop(tokio::spawn(task)),
                Spawn::Smol => smol::spawn(task).detach(),
                Spawn::Thread => drop(std::thread::spawn(move || {
                    futures::executor::block_on(task)
                })),
            }
        })
    }

    /// Runs a scenario where this spawner can spawn, under the test timeout.
    fn run<F, Fut>(self, name: &str, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        with_timeout(&format!("{name} on {self:?}"), move || match self {
            Spawn::Tokio => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(make()),
            Spawn::Smol => smol::block_on(make()),
            Spawn::Thread => futures::executor::block_on(make()),
        })
    }
}

macro_rules! on_every_spawner {
    ($($scenario:ident),* $(,)?) => {
        mod tokio_spawner {
            $( #[test] fn $scenario() { super::$scenario(super::Spawn::Tokio) } )*
        }
        mod smol_spawner {
            $( #[test] fn $scenario() { super::$scenario(super::Spawn::Smol) } )*
        }
        mod thread_spawner {
            $( #[test] fn $scenario() { super::$scenario(super::Spawn::Thread) } )*
        }
    };
}

/// Work that waits for `gate`, then returns `value`; its life is in `probe`.
fn gated(
    probe: &Arc<Probe>,
    gate: &Arc<Gate>,
    value: u32,
) -> impl FnOnce() -> common::Watched<std::pin::Pin<Box<dyn Future<Output = u32> + Send>>> {
    let (probe, gate) = (probe.clone(), gate.clone());
    move || {
        probe.watch(Box::pin(async move {
            gate.wait().await;
            value
        })
            as std::pin::Pin<Box<dyn Future<Output = u32> + Send>>)
    }
}

/// The only caller gives up after its work started (a timeout): the work
/// finishes on the spawner, exactly once; its result is stored with a new
/// epoch, and a later caller reuses it.
fn lone_leader_cancelled_mid_work_finishes_on_the_spawner(spawn: Spawn) {
    spawn.run("lone_leader_cancelled", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let (probe, gate) = (Probe::new(), Gate::new());
        let mut leader = sf.run("k", gated(&probe, &gate, 7));
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        assert_eq!(tasks.spawned(), 1, "handed to the spawner in the drop");
        assert!(sf.is_in_flight("k"), "still the key's flight");
        gate.open();
        until(|| tasks.finished() == 1).await;
        assert_eq!((probe.started(), probe.finished()), (1, 1));
        assert!(!sf.is_in_flight("k"));
        let stored = sf.current("k").expect("its result is stored");
        assert_eq!(stored.value, 7);
        let later = sf
            .refresh_if_current("k", Epoch::NONE, || async { unreachable!("reuses") })
            .await;
        assert_eq!(
            (later.value, later.epoch, later.role),
            (7, stored.epoch, Role::Reused)
        );
        assert_eq!(tasks.panicked(), 0);
    });
}

/// While the work finishes on the spawner, new callers join it and run
/// nothing; once it lands, a caller holding the older epoch reuses it.
fn new_callers_join_the_flight_on_the_spawner(spawn: Spawn) {
    spawn.run("new_callers_join", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let old = sf.set("k", 1);
        let (probe, gate) = (Probe::new(), Gate::new());
        let mut leader = sf.refresh_if_current("k", old, gated(&probe, &gate, 7));
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        assert_eq!(tasks.spawned(), 1);
        let mut joiner = sf.refresh_if_current("k", old, || async { unreachable!("joins") });
        assert!(futures::poll!(&mut joiner).is_pending());
        assert_eq!(sf.waiters("k"), 1);
        gate.open();
        let joined = joiner.await;
        assert_eq!((joined.value, joined.role), (7, Role::Joined));
        until(|| tasks.finished() == 1).await;
        assert_eq!(sf.current("k").unwrap().epoch, joined.epoch);
        let late = sf
            .refresh_if_current("k", old, || async { unreachable!("reuses") })
            .await;
        assert_eq!((late.epoch, late.role), (joined.epoch, Role::Reused));
        assert_eq!(probe.started(), 1, "the work ran once");
    });
}

/// `forget` or `set` while the work finishes on the spawner cut it loose:
/// its result is not stored.
fn forget_or_set_during_the_run_on_the_spawner_cut_it_loose(spawn: Spawn) {
    spawn.run("forget_or_set_during_the_run", move || async move {
        for forget in [true, false] {
            let tasks = Arc::new(Tasks::default());
            let sf = spawn.flights::<u32, Infallible>(&tasks);
            let (probe, gate) = (Probe::new(), Gate::new());
            let mut leader = sf.run("k", gated(&probe, &gate, 7));
            assert!(futures::poll!(&mut leader).is_pending());
            drop(leader);
            if forget {
                sf.forget("k");
            } else {
                sf.set("k", 9);
            }
            assert!(!sf.is_in_flight("k"));
            gate.open();
            until(|| tasks.finished() == 1).await;
            assert_eq!(probe.finished(), 1, "it ran to its end");
            let stored = sf.current("k").map(|v| v.value);
            assert_eq!(stored, if forget { None } else { Some(9) });
        }
    });
}

/// An error from work finishing on the spawner reaches its joiners and is
/// stored nowhere: the old value and epoch stay, and the next call leads.
fn an_error_on_the_spawner_is_stored_nowhere(spawn: Spawn) {
    spawn.run("an_error_on_the_spawner", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, String>(&tasks);
        let old = sf.set("k", 1);
        let gate = Gate::new();
        let g = gate.clone();
        let mut leader = sf.try_refresh_if_current("k", old, move || async move {
            g.wait().await;
            Err("down".to_string())
        });
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        let mut joiner = sf.try_refresh_if_current("k", old, || async { unreachable!("joins") });
        assert!(futures::poll!(&mut joiner).is_pending());
        gate.open();
        assert_eq!(joiner.await, Err("down".to_string()));
        until(|| tasks.finished() == 1).await;
        let stored = sf.current("k").unwrap();
        assert_eq!((stored.value, stored.epoch), (1, old), "nothing stored");
        assert!(!sf.is_in_flight("k"));
        let next = sf
            .try_refresh_if_current("k", old, || async { Ok(2) })
            .await
            .unwrap();
        assert_eq!((next.value, next.role), (2, Role::Led));
    });
}

/// A panic in work finishing on the spawner reaches the spawner's task, frees
/// the key (not poisoned), and promotes the joiner, which runs its own
/// closure (I6).
fn a_panic_on_the_spawner_reaches_its_task_and_promotes_a_joiner(spawn: Spawn) {
    spawn.run("a_panic_on_the_spawner", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let gate = Gate::new();
        let g = gate.clone();
        let mut leader = sf.run("k", move || async move {
            g.wait().await;
            panic!("intentional panic in work on the spawner");
        });
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        let mut joiner = sf.run("k", || async { 8 });
        assert!(futures::poll!(&mut joiner).is_pending());
        gate.open();
        let promoted = joiner.await;
        assert_eq!((promoted.value, promoted.role), (8, Role::Led));
        until(|| tasks.panicked() == 1).await;
        assert_eq!(tasks.finished(), 0);
        assert_eq!(sf.current("k").unwrap().value, 8);
        assert!(!sf.is_in_flight("k"));
    });
}

/// Work never polled is dropped, not spawned: a caller dropped before its
/// first poll made no work.
fn work_never_polled_is_not_spawned(spawn: Spawn) {
    spawn.run("work_never_polled", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let made = Arc::new(AtomicBool::new(false));
        let m = made.clone();
        let leader = sf.run("k", move || {
            m.store(true, Ordering::SeqCst);
            async { 1 }
        });
        assert!(sf.is_in_flight("k"), "registered when called");
        drop(leader);
        assert_eq!(tasks.spawned(), 0);
        assert!(!made.load(Ordering::SeqCst), "its closure never ran");
        assert!(!sf.is_in_flight("k"));
        assert!(sf.is_empty());
    });
}

/// With a spawner, a cancelled leader that still has a follower hands the
/// work to it, as without one: nothing is spawned.
fn a_cancelled_leader_with_a_follower_hands_off_and_spawns_nothing(spawn: Spawn) {
    spawn.run("a_cancelled_leader_with_a_follower", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let (probe, gate) = (Probe::new(), Gate::new());
        let mut leader = sf.run("k", gated(&probe, &gate, 7));
        assert!(futures::poll!(&mut leader).is_pending());
        let mut follower = sf.run("k", || async { unreachable!("joins") });
        assert!(futures::poll!(&mut follower).is_pending());
        drop(leader);
        assert_eq!(tasks.spawned(), 0, "handed to the follower, not spawned");
        gate.open();
        let continued = follower.await;
        assert_eq!((continued.value, continued.role), (7, Role::Joined));
        assert_eq!(probe.started(), 1, "the same work, continued");
    });
}

/// The last follower of work that was handed to it leaves without taking
/// it: that work finishes on the spawner.
fn the_last_heir_leaving_handed_work_spawns_it(spawn: Spawn) {
    spawn.run("the_last_heir_leaving", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let (probe, gate) = (Probe::new(), Gate::new());
        let mut leader = sf.run("k", gated(&probe, &gate, 7));
        assert!(futures::poll!(&mut leader).is_pending());
        let mut follower = sf.run("k", || async { unreachable!("never runs its own") });
        assert!(futures::poll!(&mut follower).is_pending());
        drop(leader);
        assert_eq!(tasks.spawned(), 0);
        drop(follower);
        assert_eq!(tasks.spawned(), 1, "spawned in the last follower's drop");
        gate.open();
        until(|| tasks.finished() == 1).await;
        assert_eq!(sf.current("k").unwrap().value, 7);
        assert_eq!((probe.started(), probe.finished()), (1, 1));
    });
}

/// A follower that took the work over and is then dropped, alone: the work
/// finishes on the spawner.
fn an_heir_that_took_over_then_dropped_spawns_the_work(spawn: Spawn) {
    spawn.run("an_heir_that_took_over", move || async move {
        let tasks = Arc::new(Tasks::default());
        let sf = spawn.flights::<u32, Infallible>(&tasks);
        let (probe, gate) = (Probe::new(), Gate::new());
        let mut leader = sf.run("k", gated(&probe, &gate, 7));
        assert!(futures::poll!(&mut leader).is_pending());
        let mut follower = sf.run("k", || async { unreachable!("never runs its own") });
        assert!(futures::poll!(&mut follower).is_pending());
        drop(leader);
        // Takes the work over, which still waits on the gate.
        assert!(futures::poll!(&mut follower).is_pending());
        assert_eq!(tasks.spawned(), 0);
        drop(follower);
        assert_eq!(tasks.spawned(), 1);
        gate.open();
        until(|| tasks.finished() == 1).await;
        assert_eq!(sf.current("k").unwrap().value, 7);
        assert_eq!((probe.started(), probe.finished()), (1, 1));
    });
}

/// Without a spawner, nothing changes: the lone cancelled leader's work is
/// dropped and the key is free.
fn without_a_spawner_the_work_is_dropped(spawn: Spawn) {
    spawn.run("without_a_spawner", move || async move {
        let sf: Flights<u32> = SingleFlight::new();
        assert!(!sf.has_spawner());
        let (probe, gate) = (Probe::new(), Gate::new());
        let mut leader = sf.run("k", gated(&probe, &gate, 7));
        assert!(futures::poll!(&mut leader).is_pending());
        drop(leader);
        assert_eq!(probe.dropped_unfinished(), 1);
        assert!(!sf.is_in_flight("k"));
        assert!(sf.current("k").is_none());
    });
}

on_every_spawner!(
    lone_leader_cancelled_mid_work_finishes_on_the_spawner,
    new_callers_join_the_flight_on_the_spawner,
    forget_or_set_during_the_run_on_the_spawner_cut_it_loose,
    an_error_on_the_spawner_is_stored_nowhere,
    a_panic_on_the_spawner_reaches_its_task_and_promotes_a_joiner,
    work_never_polled_is_not_spawned,
    a_cancelled_leader_with_a_follower_hands_off_and_spawns_nothing,
    the_last_heir_leaving_handed_work_spawns_it,
    an_heir_that_took_over_then_dropped_spawns_the_work,
    without_a_spawner_the_work_is_dropped,
);

/// An executor that drops the spawned task unfinished (shutting down)
/// strands nobody: a joiner takes the work over; with no joiner, the work is
/// dropped and the key freed. Neither is spawned again. Tasks are parked
/// here and dropped by hand, before or after their first poll.
#[test]
fn a_task_dropped_by_its_executor_strands_nobody() {
    with_timeout("a_task_dropped_by_its_executor", || {
        type Parked = Arc<Mutex<Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>>>;
        let parked: Parked = Arc::default();
        let p = parked.clone();
        let sf: Flights<u32> =
            SingleFlight::new().with_spawner(move |task| p.lock().unwrap().push(task));
        futures::executor::block_on(async {
            for first_poll in [false, true] {
                // A joiner takes the work over.
                let (probe, gate) = (Probe::new(), Gate::new());
                let mut leader = sf.run("k", gated(&probe, &gate, 7));
                assert!(futures::poll!(&mut leader).is_pending());
                drop(leader);
                let mut task = parked.lock().unwrap().pop().expect("spawned");
                if first_poll {
                    assert!(futures::poll!(task.as_mut()).is_pending());
                }
                let mut joiner = sf.run("k", || async { unreachable!("continues the work") });
                assert!(futures::poll!(&mut joiner).is_pending());
                drop(task);
                gate.open();
                let joined = joiner.await;
                assert_eq!((joined.value, joined.role), (7, Role::Joined));
                assert_eq!((probe.started(), probe.finished()), (1, 1));
                assert!(parked.lock().unwrap().is_empty(), "not spawned again");

                // Nobody joined: the work is dropped, the key is free.
                let (probe, gate) = (Probe::new(), Gate::new());
                let mut leader = sf.run("k2", gated(&probe, &gate, 7));
                assert!(futures::poll!(&mut leader).is_pending());
                drop(leader);
                let mut task = parked.lock().unwrap().pop().expect("spawned");
                if first_poll {
                    assert!(futures::poll!(task.as_mut()).is_pending());
                }
                drop(task);
                assert_eq!(probe.dropped_unfinished(), 1);
                assert!(!sf.is_in_flight("k2"));
                assert!(parked.lock().unwrap().is_empty(), "not spawned again");
                let next = sf.run("k2", || async { 3 }).await;
                assert_eq!(next.role, Role::Led);
            }
        });
    });
}
