//! Helpers shared by the loom models in `tests/`.
//!
//! Everything here is loom-aware: waits are spins that yield the loom thread
//! (loom deprioritises a yielded thread, so a spin costs few interleavings),
//! counters are `loom::sync::atomic`, and futures wake themselves so that
//! whoever polls them next (the leader, or the follower that inherited the
//! work) makes progress. Build with `RUSTFLAGS="--cfg loom"`; see `run.sh`.
#![cfg(loom)]
#![warn(missing_docs, rust_2018_idioms)]

use std::future::Future;
use std::panic;
use std::pin::{Pin, pin};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use epochflight::SingleFlight;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};

/// The one key most models use.
pub const K: u8 = 7;

/// The infallible map the models share between threads.
pub type Sf = SingleFlight<u8, u32>;

/// A fallible map (`E = String`), for the failure model.
pub type TrySf = SingleFlight<u8, u32, String>;

/// Panic payloads starting with this are expected by a model and are not
/// printed (a model panics once per explored interleaving).
pub const INTENTIONAL: &str = "intentional panic (loom model)";

/// Runs `model` under every interleaving loom explores, with the preemption
/// bound `min(bound, $LOOM_MAX_PREEMPTIONS)` (either may be absent), and
/// prints how many interleavings and how long it took.
///
/// `bound` is the model's own cap, for models whose state space explodes at
/// the suite's bound; set `EPOCHFLIGHT_LOOM_NO_CAPS=1` to ignore the caps
/// for a deeper (much slower) run.
pub fn check<F>(name: &str, bound: Option<usize>, model: F)
where
    F: Fn() + Sync + Send + 'static,
{
    quiet_intentional_panics();
    let mut builder = loom::model::Builder::new();
    let no_caps = std::env::var_os("EPOCHFLIGHT_LOOM_NO_CAPS").is_some_and(|v| !v.is_empty());
    let bound = bound.filter(|_| !no_caps);
    builder.preemption_bound = match (builder.preemption_bound, bound) {
        (Some(env), Some(ours)) => Some(env.min(ours)),
        (env, ours) => env.or(ours),
    };
    let runs = std::sync::Arc::new(StdAtomicUsize::new(0));
    let counted = runs.clone();
    let start = Instant::now();
    builder.check(move || {
        counted.fetch_add(1, StdOrdering::Relaxed);
        model();
    });
    eprintln!(
        "loom model {name}: {} interleavings, preemption bound {:?}, {:.1?}",
        runs.load(StdOrdering::Relaxed),
        builder.preemption_bound,
        start.elapsed()
    );
}

fn quiet_intentional_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            if !message.is_some_and(|m| m.starts_with(INTENTIONAL)) {
                default(info);
            }
        }));
    });
}

/// A loom-modelled event counter (how many times work started, finished…).
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self(Arc::new(AtomicUsize::new(0)))
    }

    /// Adds one and returns the new value.
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, SeqCst) + 1
    }

    /// Subtracts one.
    pub fn drop_one(&self) {
        self.0.fetch_sub(1, SeqCst);
    }

    /// The current value.
    pub fn get(&self) -> usize {
        self.0.load(SeqCst)
    }
}

/// A loom-modelled one-way flag.
#[derive(Clone, Debug, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    /// A lowered flag.
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    /// Raises the flag.
    pub fn raise(&self) {
        self.0.store(true, SeqCst);
    }

    /// Whether the flag is raised.
    pub fn is_raised(&self) -> bool {
        self.0.load(SeqCst)
    }
}

/// A counting gate for work futures: [`Gate::wait_for`] resolves once
/// [`Gate::open`] was called `n` times. Waker-based (no spinning), so it
/// costs few interleavings; the waker is re-registered on every poll, so a
/// follower that inherits the work is woken, not the cancelled leader.
#[derive(Clone, Debug)]
pub struct Gate(Arc<GateInner>);

// `loom::future::AtomicWaker` is not used: it `dbg!`s every call.
#[derive(Debug)]
struct GateInner {
    count: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// A closed gate (count 0).
    pub fn new() -> Self {
        Self(Arc::new(GateInner {
            count: AtomicUsize::new(0),
            waker: Mutex::new(None),
        }))
    }

    /// Counts one event and wakes the work waiting on the gate.
    pub fn open(&self) {
        self.0.count.fetch_add(1, SeqCst);
        let waker = self.0.waker.lock().unwrap().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Resolves once `open` was called `n` times.
    pub fn wait_for(&self, n: usize) -> GateWait {
        GateWait(self.clone(), n)
    }
}

/// See [`Gate::wait_for`].
#[derive(Debug)]
pub struct GateWait(Gate, usize);

impl Future for GateWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.0.0;
        // Register, then check: an `open` after the check finds the waker.
        *inner.waker.lock().unwrap() = Some(cx.waker().clone());
        if inner.count.load(SeqCst) >= self.1 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Spins (yielding the loom thread) until `cond` holds.
pub fn spin_until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        loom::thread::yield_now();
    }
}

/// A future that resolves once `cond` holds. While it does not, it yields
/// the loom thread and wakes itself, so any driver (the leader or the
/// follower that inherited the work) keeps polling it.
pub fn until<C: FnMut() -> bool + Send + Unpin>(cond: C) -> Until<C> {
    Until(cond)
}

/// See [`until`].
#[derive(Debug)]
pub struct Until<C>(C);

impl<C: FnMut() -> bool + Unpin> Future for Until<C> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.0)() {
            Poll::Ready(())
        } else {
            loom::thread::yield_now();
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// A future that returns `Pending` `n` times, waking itself each time, then
/// `Ready`: work that needs `n + 1` polls, so it can be cancelled mid-way and
/// continued by someone else.
pub fn pending_times(n: usize) -> PendingTimes {
    PendingTimes(n)
}

/// See [`pending_times`].
#[derive(Debug)]
pub struct PendingTimes(usize);

impl Future for PendingTimes {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            Poll::Ready(())
        } else {
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// Polls `future` once with a no-op waker, then drops it: a caller whose
/// task is cancelled after starting.
pub fn poll_once_then_drop<F: Future>(future: F) -> Poll<F::Output> {
    let mut future = pin!(future);
    future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
}
