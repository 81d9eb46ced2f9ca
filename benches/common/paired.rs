//! Paired figures: epochflight and its baseline timed in alternating short
//! chunks, and the median of the per-pair ratios (or differences).
//!
//! Criterion times rows one after another, so a noisy phase of a shared
//! machine can land on one row and not on its baseline (a row moves by a
//! third between runs while its neighbour does not). A pair's two chunks run
//! back to back, in both orders so that neither always runs warm, and such a
//! phase moves both alike; the median over many pairs drops the pairs it
//! split. The figures are printed, and saved for `.ci/bench-table` (see
//! [`super::record`]).

use std::future::Future;
use std::hint::black_box;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

/// What a chunk is timed with.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// Wall time.
    Wall,
    /// The calling thread's CPU time: the time it spent descheduled (another
    /// job of a shared machine running on its core) is not counted. For
    /// single-threaded chunks only; falls back to wall time off Unix.
    ThreadCpu,
}

impl Clock {
    /// How long `f` took by this clock.
    pub fn time(self, f: impl FnOnce()) -> Duration {
        let start = self.now();
        f();
        self.now() - start
    }

    fn now(self) -> Duration {
        thread_local! {
            static EPOCH: Instant = Instant::now();
        }
        match self {
            Clock::Wall => EPOCH.with(|epoch| epoch.elapsed()),
            Clock::ThreadCpu => thread_cpu_time().unwrap_or_else(|| Clock::Wall.now()),
        }
    }
}

#[cfg(unix)]
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Some(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

#[cfg(not(unix))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

/// Whether the bench runs as `cargo bench -- --test` (each figure once,
/// tiny, nothing saved).
pub fn test_mode() -> bool {
    std::env::args().any(|arg| arg == "--test")
}

/// Criterion's positional filter, if one was given.
pub fn filter() -> Option<String> {
    const TAKES_VALUE: &[&str] = &[
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--measurement-time",
        "--warm-up-time",
        "--sample-size",
        "--profile-time",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--noise-threshold",
        "--significance-level",
        "--confidence-level",
        "--nresamples",
    ];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if TAKES_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

/// Whether the figure `id` runs: always without a filter; with one, if `id`
/// contains it, or if it names the paired figures as a whole (`paired`).
pub fn selected(id: &str) -> bool {
    filter().is_none_or(|f| id.contains(&f) || f.contains("paired"))
}

/// `(pairs, chunk)` as given, or two short pairs in `--test` mode.
pub fn sized((pairs, chunk): (usize, u32)) -> (usize, u32) {
    if test_mode() {
        (2, chunk.min(10))
    } else {
        (pairs, chunk)
    }
}

/// Times `chunk` awaits of `op` in one `block_on`, by `clock`.
pub fn time_awaits<F, Fut>(rt: &Runtime, clock: Clock, chunk: u32, op: &mut F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    rt.block_on(async {
        let start = clock.now();
        for _ in 0..chunk {
            black_box(op().await);
        }
        clock.now() - start
    })
}

/// Times `chunk` calls of `op` on this thread, by `clock`.
pub fn time_calls<F, R>(clock: Clock, chunk: u32, op: &mut F) -> Duration
where
    F: FnMut() -> R,
{
    clock.time(|| {
        for _ in 0..chunk {
            black_box(op());
        }
    })
}

/// Runs `pairs` alternating pairs of `ours` and `base`, each a timed chunk,
/// in both orders so that neither always runs warm; returns each pair's
/// `(ours, base)`.
pub fn alternate<T, A, B>(pairs: usize, mut ours: A, mut base: B) -> Vec<(T, T)>
where
    A: FnMut() -> T,
    B: FnMut() -> T,
{
    (0..pairs)
        .map(|i| {
            if i % 2 == 0 {
                let a = ours();
                (a, base())
            } else {
                let b = base();
                (ours(), b)
            }
        })
        .collect()
}

/// The per-pair values of `compare(ours, base)`, sorted.
pub fn compared(
    pairs: &[(Duration, Duration)],
    compare: impl Fn(Duration, Duration) -> f64,
) -> Vec<f64> {
    let mut values: Vec<f64> = pairs.iter().map(|&(a, b)| compare(a, b)).collect();
    values.sort_by(f64::total_cmp);
    values
}

/// `ours / base` of each pair, sorted.
pub fn ratios(pairs: &[(Duration, Duration)]) -> Vec<f64> {
    compared(pairs, |a, b| a.as_secs_f64() / b.as_secs_f64())
}

/// The median of each side, in ns per call of a `chunk`-call chunk.
pub fn per_call(pairs: &[(Duration, Duration)], chunk: u32) -> (f64, f64) {
    let ns = |side: fn(&(Duration, Duration)) -> Duration| {
        let mut values: Vec<f64> = pairs
            .iter()
            .map(|pair| side(pair).as_secs_f64() * 1e9 / f64::from(chunk))
            .collect();
        values.sort_by(f64::total_cmp);
        quartiles(&values).0
    };
    (ns(|p| p.0), ns(|p| p.1))
}

/// The median and quartiles of sorted values.
pub fn quartiles(sorted: &[f64]) -> (f64, f64, f64) {
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.25), at(0.75))
}
