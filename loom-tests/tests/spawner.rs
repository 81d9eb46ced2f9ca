//! I5 with a spawner: work whose callers all went away finishes on the
//! spawner (here, a loom thread), and its result is stored as if a caller had
//! awaited it. These models race that hand-over with the other callers.
#![cfg(loom)]

use std::pin::Pin;

use epochflight::{Epoch, Role, SingleFlight};
use epochflight_loom_tests::{Counter, K, check, pending_times, poll_once_then_drop};
use loom::future::block_on;
use loom::sync::{Arc, Mutex};
use loom::thread::{self, JoinHandle};

type Sf = SingleFlight<u8, u32>;
type Spawned = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// A map whose spawner runs each task on a new loom thread, kept in
/// `spawned` to be joined.
fn with_thread_spawner(spawned: &Spawned) -> Sf {
    let spawned = spawned.clone();
    SingleFlight::new().with_spawner(move |task| {
        let handle = thread::spawn(move || block_on(task));
        spawned.lock().unwrap().push(handle);
    })
}

fn join_all(spawned: &Spawned) -> usize {
    let handles: Vec<_> = spawned.lock().unwrap().drain(..).collect();
    let n = handles.len();
    for handle in handles {
        handle.join().unwrap();
    }
    n
}

/// Work that counts its start and its finish and needs two polls.
fn counted_work(
    starts: &Counter,
    finishes: &Counter,
) -> impl FnOnce() -> Pin<Box<dyn Future<Output = u32> + Send>> + use<> {
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

/// The lone leader gives up (its drop hands the work to the spawner) while a
/// new caller arrives: before the drop it is an heir and continues the work
/// (nothing spawned); after it, it joins the flight on the spawner, or reuses
/// its stored value. Either way the work runs once and the caller gets its
/// value, which is stored.
#[test]
fn handing_to_the_spawner_races_a_new_caller_joining() {
    check("I5 spawner vs joiner", None, || {
        let spawned = Spawned::default();
        let sf = Arc::new(with_thread_spawner(&spawned));
        let (starts, finishes) = (Counter::new(), Counter::new());
        let mut leader = Box::pin(sf.run(K, counted_work(&starts, &finishes)));
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        let joiner = {
            let sf = sf.clone();
            thread::spawn(move || {
                let call =
                    sf.refresh_if_current(K, Epoch::NONE, || async { unreachable!("joins") });
                block_on(call)
            })
        };
        drop(leader);
        let joined = joiner.join().unwrap();
        let tasks = join_all(&spawned);
        // It joined (as heir or on the spawner), or came after the value
        // landed and reused it.
        assert_eq!(joined.value, 42);
        assert!(matches!(joined.role, Role::Joined | Role::Reused));
        assert!(tasks <= 1);
        assert_eq!((starts.get(), finishes.get()), (1, 1));
        assert_eq!(sf.current(&K).unwrap().epoch, joined.epoch);
        assert!(!sf.is_in_flight(&K));
    });
}

/// `forget` races the hand-over to the spawner and the work finishing
/// there: whatever the order, the work runs once, to its end, its result is
/// not left stored after `forget`, and no flight is left in the table.
#[test]
fn handing_to_the_spawner_races_forget() {
    check("I5 spawner vs forget", None, || {
        let spawned = Spawned::default();
        let sf = Arc::new(with_thread_spawner(&spawned));
        let (starts, finishes) = (Counter::new(), Counter::new());
        let mut leader = Box::pin(sf.run(K, counted_work(&starts, &finishes)));
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        let forgetter = {
            let sf = sf.clone();
            thread::spawn(move || sf.forget(&K))
        };
        drop(leader);
        forgetter.join().unwrap();
        assert_eq!(join_all(&spawned), 1);
        assert_eq!((starts.get(), finishes.get()), (1, 1));
        // Stored before `forget` and removed by it, or cut loose by it.
        assert!(sf.current(&K).is_none());
        let debug = format!("{sf:?}");
        assert!(
            debug.contains("in_flight: 0, cut_loose_in_flight: 0"),
            "{debug}"
        );
    });
}

/// A caller that joins after the work went to the spawner is woken by the
/// spawner's completion, whatever the order of its registration, its wait
/// and that completion.
#[test]
fn completion_on_the_spawner_wakes_a_caller_that_joined_after() {
    check("I5 spawner wakes late joiner", None, || {
        let spawned = Spawned::default();
        let sf = Arc::new(with_thread_spawner(&spawned));
        let (starts, finishes) = (Counter::new(), Counter::new());
        let mut leader = Box::pin(sf.run(K, counted_work(&starts, &finishes)));
        assert!(poll_once_then_drop(leader.as_mut()).is_pending());
        drop(leader);
        let joiner = {
            let sf = sf.clone();
            thread::spawn(move || {
                let out = block_on(sf.run(K, || async { 7 }));
                // It joined the flight on the spawner, or came after it
                // landed and led its own.
                assert!(matches!(
                    (out.value, out.role),
                    (42, Role::Joined) | (7, Role::Led)
                ));
            })
        };
        joiner.join().unwrap();
        assert_eq!(join_all(&spawned), 1);
        assert_eq!(finishes.get(), 1);
        assert!(!sf.is_in_flight(&K));
    });
}
