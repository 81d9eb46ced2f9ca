//! Loom models of the flight state machine alone (`flight.rs`), beside the
//! whole-crate models of `loom-tests/`: each races two transitions of one
//! shared [`Flight`] and checks that exactly one party ends up responsible
//! for it and that no registered follower misses its wake-up.
//!
//! They live here because they use crate-internal types, and run from
//! `loom-tests/tests/flight.rs` (the crate's own dev-dependencies do not
//! build under `--cfg loom`). Each function is one model; call it inside
//! nothing: it runs `loom::model` itself.

use std::future::poll_fn;
use std::task::Poll;

use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::thread;

use crate::epoch::Stamp;
use crate::flight::{Flight, Step, Unattended, WaitKind};
use crate::sync::Arc;
use crate::wakers::Registration;
use crate::work::Work;

fn work() -> Work<u32, ()> {
    Work::ReturnsValue(Box::pin(Some(async { 7 })))
}

/// A follower's life: looks until it is done, parked (by loom's
/// `block_on`) after every `Wait` until woken, so a lost wake-up deadlocks
/// the model. If it takes work over, it publishes a result, as a driver
/// would.
fn follow(flight: &Flight<u32, ()>, kind: WaitKind, adopted: &AtomicUsize) {
    let mut registration = Registration::default();
    let step = loom::future::block_on(poll_fn(|cx| {
        match flight.step(kind, cx.waker(), &mut registration) {
            Step::Wait => Poll::Pending,
            step => Poll::Ready(step),
        }
    }));
    match step {
        Step::Done(result) => assert_eq!(result.map(|(value, _)| value), Ok(7)),
        Step::Adopt(_) | Step::Promote => {
            adopted.fetch_add(1, SeqCst);
            drop(flight.publish(Ok((7, Stamp::issued(1)))));
        }
        Step::Wait => unreachable!("block_on returns a decision"),
    }
}

/// A cancelled driver hands its work on while two heirs look: exactly one
/// of them takes it, and the other is woken by its result.
pub fn hand_off_goes_to_exactly_one_heir() {
    loom::model(|| {
        let flight = Arc::new(Flight::<u32, ()>::new());
        let adopted = Arc::new(AtomicUsize::new(0));
        flight.join(WaitKind::Async);
        flight.join(WaitKind::Async);
        let heirs: Vec<_> = (0..2)
            .map(|_| {
                let (flight, adopted) = (flight.clone(), adopted.clone());
                thread::spawn(move || follow(&flight, WaitKind::Async, &adopted))
            })
            .collect();
        let handed = flight.hand_off(Some(work()));
        drop(handed.ok().expect("two heirs wait"));
        for heir in heirs {
            heir.join().unwrap();
        }
        assert_eq!(adopted.load(SeqCst), 1);
    });
}

/// A follower registering its waker while the driver publishes is woken (or
/// sees the result at once): no wake-up is lost between look and register.
pub fn a_follower_registering_during_publish_is_woken() {
    loom::model(|| {
        let flight = Arc::new(Flight::<u32, ()>::new());
        let adopted = Arc::new(AtomicUsize::new(0));
        flight.join(WaitKind::Blocking);
        let follower = {
            let (flight, adopted) = (flight.clone(), adopted.clone());
            thread::spawn(move || follow(&flight, WaitKind::Blocking, &adopted))
        };
        drop(flight.publish(Ok((7, Stamp::issued(1)))));
        follower.join().unwrap();
        assert_eq!(adopted.load(SeqCst), 0);
    });
}

/// The driver gives its work up while its only heir leaves: whichever comes
/// second ends up holding the work (responsible for the flight); the work is
/// never lost and never held twice.
pub fn the_last_heir_leaving_races_a_hand_off() {
    loom::model(|| {
        let flight = Arc::new(Flight::<u32, ()>::new());
        flight.join(WaitKind::Async);
        let heir = {
            let flight = flight.clone();
            thread::spawn(move || {
                let left = flight.leave(WaitKind::Async, Registration::default());
                drop((left.waker, left.wake));
                left.unattended
            })
        };
        let driver = flight.hand_off(Some(work())).err();
        let heir = heir.join().unwrap();
        let holders = [&driver, &heir]
            .iter()
            .filter(|held| matches!(held, Some(Unattended { work: Some(_), .. })))
            .count();
        assert_eq!(holders, 1, "exactly one party holds the work");
    });
}
