//! The one place that chooses between real and model-checked synchronisation.
//!
//! Normal builds use `parking_lot` and `std`. Under `RUSTFLAGS="--cfg loom"`
//! the same names resolve to loom's types, so the loom suite in `loom-tests/`
//! and the models in `src/loom_models.rs` explore every interleaving of the
//! real code. Raw `parking_lot` under loom would hang: loom cannot see its
//! blocking.

#[cfg(not(loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::thread;
#[cfg(not(loom))]
pub(crate) use std::thread_local;

#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::thread;
#[cfg(loom)]
pub(crate) use loom::thread_local;
#[cfg(loom)]
pub(crate) use mocked::{Mutex, MutexGuard};

#[cfg(loom)]
mod mocked {
    /// `loom::sync::Mutex` with `parking_lot`'s poison-free `lock()`, so the
    /// rest of the crate is written once against one API.
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            // loom's mutex poisons (and its own `lock` unwraps that), so the
            // models keep panics away from locks; parking_lot never poisons.
            self.0.lock().unwrap()
        }
    }
}

/// `std`'s `Arc` in every build: a [`Waker`](std::task::Waker) can only be
/// made from it, and the HTTP integrations take the user's manager in one.
/// Reference counts are not part of what loom checks here.
pub(crate) use std::sync::Arc as StdArc;

/// This thread's reader number: threads get consecutive numbers when they
/// first read, so two threads pinned to two cores use two different read
/// slots (see `read_cache.rs`). Under loom every thread is reader 0: one
/// shared slot is the case with the most interleavings.
#[cfg(not(loom))]
#[inline]
pub(crate) fn reader_number() -> usize {
    use std::cell::Cell;
    // Const-initialised (one plain load on every read); numbered on first use.
    thread_local!(static NUMBER: Cell<usize> = const { Cell::new(usize::MAX) });
    NUMBER.with(|number| match number.get() {
        usize::MAX => number_this_thread(number),
        assigned => assigned,
    })
}

/// Numbers this thread (its first read): out of line, since it runs once.
#[cfg(not(loom))]
#[cold]
fn number_this_thread(number: &std::cell::Cell<usize>) -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (usize::MAX - 1);
    number.set(next);
    next
}

#[cfg(loom)]
pub(crate) fn reader_number() -> usize {
    0
}

/// How many read slots a `SingleFlight` gets: twice the parallelism the
/// process may use (so pinned threads rarely share one), at most 64.
#[cfg(not(loom))]
pub(crate) fn read_slots() -> usize {
    use std::sync::OnceLock;
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        (cores * 2).next_power_of_two().min(64)
    })
}

#[cfg(loom)]
pub(crate) fn read_slots() -> usize {
    1
}
