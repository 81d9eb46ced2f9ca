//! Keys whose `Hash` or `Eq` panic: the panic reaches the caller whose call
//! ran it; nobody hangs and nothing is left behind in the map.

mod common;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use common::with_timeout;
use epochflight::{Role, SingleFlight};
use futures::executor::block_on;
use futures::task::noop_waker;

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    let waker = noop_waker();
    f.poll(&mut Context::from_waker(&waker))
}

/// A key that panics when hashed or compared, once armed.
#[derive(Clone)]
struct Touchy {
    id: u32,
    hash_panics: Arc<AtomicBool>,
    eq_panics: Arc<AtomicBool>,
}

impl Hash for Touchy {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.hash_panics.load(Ordering::SeqCst) {
            panic!("K::hash panicked");
        }
        self.id.hash(state);
    }
}

impl PartialEq for Touchy {
    fn eq(&self, other: &Self) -> bool {
        if self.eq_panics.load(Ordering::SeqCst) {
            panic!("K::eq panicked");
        }
        self.id == other.id
    }
}

impl Eq for Touchy {}

struct Keys {
    hash_panics: Arc<AtomicBool>,
    eq_panics: Arc<AtomicBool>,
}

impl Keys {
    fn new() -> Self {
        Self {
            hash_panics: Arc::default(),
            eq_panics: Arc::default(),
        }
    }

    fn key(&self, id: u32) -> Touchy {
        Touchy {
            id,
            hash_panics: self.hash_panics.clone(),
            eq_panics: self.eq_panics.clone(),
        }
    }
}

fn nothing_left_in_flight<K, T>(sf: &SingleFlight<K, T>) {
    let debug = format!("{sf:?}");
    assert!(debug.contains("in_flight: 0"), "{debug}");
    assert!(debug.contains("cut_loose_in_flight: 0"), "{debug}");
}

/// A panicking `Hash` runs before anything is touched: the caller panics,
/// the map is as it was, later calls work.
#[test]
fn a_key_whose_hash_panics_touches_nothing() {
    with_timeout("a_key_whose_hash_panics", || {
        let keys = Keys::new();
        let sf: SingleFlight<Touchy, u32> = SingleFlight::new();
        sf.set(keys.key(1), 1);
        keys.hash_panics.store(true, Ordering::SeqCst);
        for _ in 0..1000 {
            assert!(
                catch_unwind(AssertUnwindSafe(|| sf.run(keys.key(2), || async { 2 }))).is_err()
            );
            assert!(catch_unwind(AssertUnwindSafe(|| sf.set(keys.key(2), 2))).is_err());
            assert!(catch_unwind(AssertUnwindSafe(|| sf.current(&keys.key(1)))).is_err());
            assert!(catch_unwind(AssertUnwindSafe(|| sf.forget(&keys.key(1)))).is_err());
        }
        keys.hash_panics.store(false, Ordering::SeqCst);
        assert_eq!(sf.len(), 1);
        nothing_left_in_flight(&sf);
        assert_eq!(sf.current(&keys.key(1)).unwrap().value, 1);
        assert_eq!(sf.run_blocking(keys.key(2), || 2).role, Role::Led);
    });
}

/// A panicking `Eq` never strands a flight: finishing, cancelling or
/// panicking out of a flight finds the key's entry by the flight's mark and
/// compares no keys (so no second panic during an unwinding, which would
/// abort). Only calls that look the key up run `Eq`, and they panic before
/// they change anything.
#[test]
fn a_key_whose_eq_panics_hangs_nobody() {
    with_timeout("a_key_whose_eq_panics", || {
        let keys = Keys::new();
        let sf: Arc<SingleFlight<Touchy, u32>> = Arc::new(SingleFlight::new());
        for round in 0..100 {
            sf.set(keys.key(1), round);
            let gate = common::Gate::new();
            let g = gate.clone();
            let mut leader = Box::pin(sf.run(keys.key(1), move || async move {
                g.wait().await;
                7
            }));
            assert!(poll_once(leader.as_mut()).is_pending());
            let follower = {
                let (sf, key) = (sf.clone(), keys.key(1));
                std::thread::spawn(move || sf.run_blocking(key, || 8))
            };
            common::until_blocking(|| sf.waiters(&keys.key(1)) == 1);
            keys.eq_panics.store(true, Ordering::SeqCst);
            gate.open();
            let led = block_on(leader);
            let followed = follower.join().expect("the follower got the result");
            assert_eq!((led.value, led.role), (7, Role::Led));
            assert_eq!((followed.value, followed.role), (7, Role::Joined));
            // Lookups by key panic, touching nothing.
            let run = catch_unwind(AssertUnwindSafe(|| sf.run_blocking(keys.key(1), || 9)));
            assert!(run.is_err());
            assert!(catch_unwind(AssertUnwindSafe(|| sf.set(keys.key(1), 9))).is_err());
            assert!(catch_unwind(AssertUnwindSafe(|| sf.current(&keys.key(1)))).is_err());
            keys.eq_panics.store(false, Ordering::SeqCst);
            nothing_left_in_flight(&sf);
            assert_eq!(sf.current(&keys.key(1)).unwrap().value, 7);
        }
    });
}

/// A flight on a key whose `Eq` panics is cancelled, or its work panics
/// (the call is then dropped by the unwinding itself), with nobody waiting:
/// the key is freed without comparing keys. A comparison there would be a
/// second panic during an unwinding, which aborts the process.
#[test]
fn a_flight_on_a_key_whose_eq_panics_is_released_cleanly() {
    with_timeout("a_flight_released_cleanly", || {
        let keys = Keys::new();
        let sf: SingleFlight<Touchy, u32> = SingleFlight::new();

        let mut cancelled = Box::pin(sf.run(keys.key(1), std::future::pending::<u32>));
        assert!(poll_once(cancelled.as_mut()).is_pending());
        keys.eq_panics.store(true, Ordering::SeqCst);
        drop(cancelled);
        keys.eq_panics.store(false, Ordering::SeqCst);
        nothing_left_in_flight(&sf);
        assert!(sf.is_empty(), "the key is free");

        keys.eq_panics.store(true, Ordering::SeqCst);
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            block_on(sf.run(keys.key(1), || async {
                panic!("intentional panic in the work")
            }))
        }));
        assert!(panicked.is_err());
        keys.eq_panics.store(false, Ordering::SeqCst);
        nothing_left_in_flight(&sf);
        assert!(sf.is_empty(), "the key is free");
    });
}
