//! The "fast at scale" figures of issue 12: epochflight beside a bare
//! `parking_lot` lock over a `HashMap` doing the same, paired (see
//! `common::paired`), printed and saved for `.ci/bench-table`.
//!
//! - `scrambled`: 1, 1,000 or 100,000 keys stored (in key order), then
//!   called in a fixed scrambled order (no two neighbours related, so
//!   neither the prefetcher nor a "last key" hint helps). `run`, a new value
//!   each call, beside a bare `Mutex<HashMap<u64, (u64, u64)>>` (value,
//!   epoch) that reads the key's epoch and stores the new value and epoch + 1
//!   in two lock round trips, as a single flight must (its work runs between
//!   them); `current` beside a bare `get` that copies the value and epoch
//!   out. CPU time of the bench thread per call.
//! - `capturing`: uncontended `run` on one key whose closure captures a
//!   variable, `move || async move { i }`, as real code does, beside the bare
//!   insert+remove of `benches/singleflight.rs`; and the zero-sized
//!   `|| async { 1 }` for reference. CPU time per call.
//! - `readers`: `current`, `epoch` (one hot key) and `TokenManager::token()`
//!   (a valid token, each thread awaiting its calls in its own `block_on`) on
//!   two threads pinned to separate cores, in rounds alternating with one
//!   thread alone: throughput(2) / throughput(1), by wall time. A bare
//!   `Mutex<HashMap>` get and a `RwLock<HashMap>` get for reference, and a
//!   harness whose threads share nothing (the machine's ceiling, 2.0 on two
//!   free cores).
//!
//! Memory per stored key and after `forget` is in `benches/alloc.rs`, which
//! counts allocations. `cargo bench --bench scale -- FILTER` runs the figures
//! whose name contains FILTER (`scrambled`, `readers/token`, …);
//! `cargo bench --bench scale -- --test` runs each figure once, tiny.

mod common;

use std::collections::HashMap;
use std::hint::{black_box, spin_loop};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex as StdMutex};
use std::thread;
use std::time::{Duration, Instant};

use epochflight::SingleFlight;
use epochflight::auth::{RefreshError, TokenManager};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Runtime;

use common::paired::{self, Clock};
use common::record::record;

/// The one key of the single-key figures.
const KEY: u64 = 7;

/// Stored keys in `scrambled`.
const SIZES: [usize; 3] = [1, 1000, 100_000];

/// What a single flight keeps per key at least: the value and its epoch.
type Stored = Mutex<HashMap<u64, (u64, u64)>>;

/// The bare row of the uncontended figures (`benches/singleflight.rs`).
type Bare = Mutex<HashMap<u64, ()>>;

/// CPU time of the bench thread: time it spends descheduled on the shared
/// machine is not counted, on either side of a pair.
const CPU: Clock = Clock::ThreadCpu;

fn main() {
    // Awaited calls run on this thread, in one `block_on` per chunk.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    scrambled(&rt);
    capturing(&rt);
    readers();
    if paired::test_mode() {
        println!("scale: ok");
    }
}

/// Runs `pairs` alternating pairs of `ours` and `base` (each times a chunk
/// of `chunk` calls), prints the median of the per-pair ratios with each
/// side's CPU time per call, and saves them.
fn ratio_figure<A, B>(id: &str, what: &str, sizes: (usize, u32), mut ours: A, mut base: B)
where
    A: FnMut(u32) -> Duration,
    B: FnMut(u32) -> Duration,
{
    let (pairs, chunk) = paired::sized(sizes);
    let timed = paired::alternate(pairs, || ours(chunk), || base(chunk));
    let (median, low, high) = paired::quartiles(&paired::ratios(&timed));
    let (ours_ns, base_ns) = paired::per_call(&timed, chunk);
    println!(
        "{id}: {what}: {median:.2} (quartiles {low:.2}-{high:.2}), median of {pairs} \
         alternating pairs of {chunk}-call chunks; CPU time per call {ours_ns:.1} / {base_ns:.1} ns"
    );
    record(
        id,
        &[
            ("median", median),
            ("low", low),
            ("high", high),
            ("ours_ns", ours_ns),
            ("base_ns", base_ns),
        ],
    );
}

// ---------------------------------------------------------------------------
// scrambled: stored keys called in a scrambled order.

/// The keys `0..n` in a fixed scrambled order (Fisher-Yates, driven by a
/// xorshift generator with a fixed seed).
fn scrambled_keys(n: usize) -> Vec<u64> {
    let mut keys: Vec<u64> = (0..n as u64).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    for i in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        keys.swap(i, (state % (i as u64 + 1)) as usize);
    }
    keys
}

/// Goes round the scrambled keys, and numbers the calls (the new values).
struct Cursor<'a> {
    keys: &'a [u64],
    at: usize,
    calls: u64,
}

impl<'a> Cursor<'a> {
    fn new(keys: &'a [u64]) -> Self {
        Self {
            keys,
            at: 0,
            calls: 0,
        }
    }

    /// The next key, and a value not stored before.
    fn next(&mut self) -> (u64, u64) {
        let key = self.keys[self.at];
        self.at = (self.at + 1) % self.keys.len();
        self.calls += 1;
        (key, self.calls)
    }
}

fn scrambled(rt: &Runtime) {
    for n in SIZES {
        let run_id = format!("scrambled/run/{n}");
        let current_id = format!("scrambled/current/{n}");
        if !paired::selected(&run_id) && !paired::selected(&current_id) {
            continue;
        }
        let keys = scrambled_keys(n);
        let flights: SingleFlight<u64, u64> = SingleFlight::new();
        let map = Stored::default();
        // Stored in key order, called in the scrambled one: a store that
        // keeps keys in insertion order is then not walked in that order.
        for key in 0..n as u64 {
            flights.set(key, key);
            map.lock().insert(key, (key, 1));
        }
        let (flights, map) = (&flights, &map);

        if paired::selected(&run_id) {
            let mut ours_at = Cursor::new(&keys);
            let mut ours = || {
                let (key, i) = ours_at.next();
                flights.run(key, move || async move { i })
            };
            let mut base_at = Cursor::new(&keys);
            let mut base = || {
                let (key, i) = base_at.next();
                async move {
                    let epoch = map.lock().get(&key).map_or(0, |&(_, epoch)| epoch);
                    map.lock().insert(key, (i, epoch + 1))
                }
            };
            // Warm up: one round of the keys on each side.
            paired::time_awaits(rt, CPU, n as u32, &mut ours);
            paired::time_awaits(rt, CPU, n as u32, &mut base);
            ratio_figure(
                &run_id,
                &format!("`run`, {n} stored keys scrambled / bare get+insert"),
                (1000, 2000),
                |chunk| paired::time_awaits(rt, CPU, chunk, &mut ours),
                |chunk| paired::time_awaits(rt, CPU, chunk, &mut base),
            );
            assert_eq!(flights.len(), n, "run stores no other key");
        }

        if paired::selected(&current_id) {
            let mut ours_at = Cursor::new(&keys);
            let mut ours = || flights.current(&ours_at.next().0);
            let mut base_at = Cursor::new(&keys);
            let mut base = || map.lock().get(&base_at.next().0).copied();
            assert!(ours().is_some() && base().is_some(), "every key is stored");
            paired::time_calls(CPU, n as u32, &mut ours);
            paired::time_calls(CPU, n as u32, &mut base);
            ratio_figure(
                &current_id,
                &format!("`current`, {n} stored keys scrambled / bare get"),
                // Longer chunks: reading the clock costs about a microsecond.
                (1000, 10_000),
                |chunk| paired::time_calls(CPU, chunk, &mut ours),
                |chunk| paired::time_calls(CPU, chunk, &mut base),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// capturing: uncontended `run` with a closure that captures a variable.

fn capturing(rt: &Runtime) {
    let flights: SingleFlight<u64, u64> = SingleFlight::new();
    let map = Bare::default();
    let (flights, map) = (&flights, &map);
    let mut bare = || async {
        map.lock().insert(KEY, ());
        map.lock().remove(&KEY)
    };

    let id = "capturing/run_capturing";
    if paired::selected(id) {
        let mut i = 0_u64;
        let mut ours = || {
            i += 1;
            let i = i;
            flights.run(KEY, move || async move { i })
        };
        ratio_figure(
            id,
            "uncontended `run(key, move || async move { i })` / bare insert+remove",
            (2000, 2000),
            |chunk| paired::time_awaits(rt, CPU, chunk, &mut ours),
            |chunk| paired::time_awaits(rt, CPU, chunk, &mut bare),
        );
        let stored = flights.current(&KEY).map(|v| v.value);
        assert_eq!(stored, Some(i), "the last call's value is stored");
    }

    // The same with a spawner set: having one costs nothing until a flight
    // is abandoned (issue 11), so this should match the first line.
    let id = "capturing/run_capturing_with_spawner";
    if paired::selected(id) {
        let spawning: SingleFlight<u64, u64> =
            SingleFlight::new().with_spawner(|task| drop(tokio::spawn(task)));
        let mut i = 0_u64;
        let mut ours = || {
            i += 1;
            let i = i;
            spawning.run(KEY, move || async move { i })
        };
        ratio_figure(
            id,
            "uncontended `run(key, move || async move { i })`, spawner set / bare insert+remove",
            (2000, 2000),
            |chunk| paired::time_awaits(rt, CPU, chunk, &mut ours),
            |chunk| paired::time_awaits(rt, CPU, chunk, &mut bare),
        );
    }

    let id = "capturing/run_zero_sized";
    if paired::selected(id) {
        let mut ours = || flights.run(KEY, || async { 1 });
        ratio_figure(
            id,
            "uncontended `run(key, || async { 1 })` / bare insert+remove (reference)",
            (2000, 2000),
            |chunk| paired::time_awaits(rt, CPU, chunk, &mut ours),
            |chunk| paired::time_awaits(rt, CPU, chunk, &mut bare),
        );
    }
}

// ---------------------------------------------------------------------------
// readers: two reader threads against one.

/// Two reader threads, each pinned to its own core, and a controller (this
/// thread) that starts rounds: in each, the threads marked active call
/// `op(calls)` once, starting together. A thread that cannot be pinned, or
/// whose `op` panics, fails the figure after the crew has stopped (never a
/// controller left waiting at a barrier).
struct Crew<'a> {
    op: &'a (dyn Fn(u32) + Sync),
    calls: u32,
    ready: Barrier,
    start: Barrier,
    end: Barrier,
    active: StdMutex<[bool; 2]>,
    arrived: AtomicUsize,
    stop: AtomicBool,
    /// What went wrong on a reader thread, if anything.
    failed: StdMutex<Option<String>>,
    /// Each active thread's (start, end) in the round.
    spans: StdMutex<Vec<(Instant, Instant)>>,
}

impl<'a> Crew<'a> {
    fn new(op: &'a (dyn Fn(u32) + Sync), calls: u32) -> Self {
        Self {
            op,
            calls,
            ready: Barrier::new(3),
            start: Barrier::new(3),
            end: Barrier::new(3),
            active: StdMutex::new([false; 2]),
            arrived: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            failed: StdMutex::new(None),
            spans: StdMutex::new(Vec::new()),
        }
    }

    fn fail(&self, why: String) {
        self.failed.lock().expect("not poisoned").get_or_insert(why);
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().expect("not poisoned").clone()
    }

    /// One reader thread's life: pins itself, then serves rounds until
    /// stopped.
    fn serve(&self, thread: usize, core: core_affinity::CoreId) {
        if !core_affinity::set_for_current(core) {
            self.fail(format!("pinning thread {thread} to core {core:?} failed"));
        }
        self.ready.wait();
        loop {
            self.start.wait();
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let active = *self.active.lock().expect("not poisoned");
            if active[thread] {
                let count = active.iter().filter(|&&a| a).count();
                // Spin, not park: both threads start within nanoseconds.
                self.arrived.fetch_add(1, Ordering::AcqRel);
                while self.arrived.load(Ordering::Acquire) < count {
                    spin_loop();
                }
                let begin = Instant::now();
                let ran = catch_unwind(AssertUnwindSafe(|| (self.op)(self.calls)));
                let end = Instant::now();
                if ran.is_err() {
                    self.fail(format!("the calls on thread {thread} panicked"));
                }
                self.spans.lock().expect("not poisoned").push((begin, end));
            }
            self.end.wait();
        }
    }

    /// Runs one round with the `active` threads; returns its wall time,
    /// from the first thread's start to the last thread's end, or nothing
    /// once a thread failed.
    fn round(&self, active: [bool; 2]) -> Option<Duration> {
        if self.failure().is_some() {
            return None;
        }
        *self.active.lock().expect("not poisoned") = active;
        self.arrived.store(0, Ordering::Release);
        self.start.wait();
        self.end.wait();
        let spans = std::mem::take(&mut *self.spans.lock().expect("not poisoned"));
        let begin = spans.iter().map(|s| s.0).min()?;
        let end = spans.iter().map(|s| s.1).max()?;
        Some(end - begin)
    }

    /// Lets the reader threads return.
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.start.wait();
    }
}

/// Calls per thread and round: about 2 ms of `op` on one thread.
fn calibrate(op: &(dyn Fn(u32) + Sync)) -> u32 {
    let probe = 1000;
    let best = (0..5)
        .map(|_| Clock::Wall.time(|| op(probe)))
        .min()
        .expect("five probes");
    let per_call = best.as_secs_f64() / f64::from(probe);
    (0.002 / per_call).clamp(1000.0, 10_000_000.0) as u32
}

/// Prints and saves throughput(2) / throughput(1) of `op` (which makes
/// `calls` calls on the calling thread), over alternating pairs of rounds:
/// both pinned threads, and one alone (each core in turn).
///
/// By wall time: a reader parked on a lock is waiting, not done (each
/// thread's CPU time would leave that wait out). On a loaded machine a
/// round also waits for its cores: `readers/harness` shows how much.
fn scaling(id: &str, what: &str, op: &(dyn Fn(u32) + Sync)) {
    if !paired::selected(id) {
        return;
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    assert!(
        cores.len() >= 2,
        "readers: needs two cores to pin its two threads to, found {cores:?}"
    );
    let (pairs, calls) = if paired::test_mode() {
        (2, 100)
    } else {
        (200, calibrate(op))
    };
    let crew = Crew::new(op, calls);
    let timed = thread::scope(|s| {
        for (thread, &core) in cores.iter().take(2).enumerate() {
            let crew = &crew;
            s.spawn(move || crew.serve(thread, core));
        }
        crew.ready.wait();
        let mut alone_on = 0;
        let zero = Duration::ZERO;
        let timed = paired::alternate(
            pairs,
            || crew.round([true, true]).unwrap_or(zero),
            || {
                alone_on ^= 1;
                crew.round([alone_on == 0, alone_on == 1]).unwrap_or(zero)
            },
        );
        crew.stop();
        timed
    });
    if let Some(why) = crew.failure() {
        panic!("{id}: {why}");
    }
    // Two threads make 2 * calls calls in `both`, one makes `calls` in `alone`.
    let scaling = |both: Duration, alone: Duration| 2.0 * alone.as_secs_f64() / both.as_secs_f64();
    let (median, low, high) = paired::quartiles(&paired::compared(&timed, scaling));
    let (both_ns, alone_ns) = paired::per_call(&timed, calls);
    println!(
        "{id}: {what}, throughput of 2 threads / 1: {median:.2} (quartiles {low:.2}-{high:.2}), \
         median of {pairs} alternating pairs of rounds of {calls} calls per thread; \
         wall time per call {alone_ns:.1} ns alone, {both_ns:.1} ns on each of 2 threads"
    );
    record(
        id,
        &[
            ("median", median),
            ("low", low),
            ("high", high),
            ("alone_ns", alone_ns),
            ("both_ns", both_ns),
        ],
    );
}

fn readers() {
    let flights: SingleFlight<u64, u64> = SingleFlight::new();
    flights.set(KEY, 1);
    scaling("readers/current", "`current` on one hot key", &|calls| {
        for _ in 0..calls {
            black_box(flights.current(black_box(&KEY)));
        }
    });
    scaling("readers/epoch", "`epoch` on one hot key", &|calls| {
        for _ in 0..calls {
            black_box(flights.epoch(black_box(&KEY)));
        }
    });

    let token = "a".repeat(40);
    let manager: TokenManager<String, ()> = TokenManager::with_token(
        |_stale| async { Err(RefreshError::Transient(())) },
        token.clone(),
    );
    let got = futures::executor::block_on(manager.token()).expect("a valid token");
    assert_eq!(got.value, token);
    scaling(
        "readers/token",
        "`TokenManager::token()` on a valid token, one `block_on` per thread",
        &|calls| {
            futures::executor::block_on(async {
                for _ in 0..calls {
                    black_box(manager.token().await.expect("a valid token"));
                }
            })
        },
    );
    assert_eq!(
        manager.stats().refresh_calls,
        0,
        "only the valid-token path ran"
    );

    // The ceiling: each thread reads its own map, no lock, nothing shared.
    // Two such threads make twice the calls of one on two free cores; less
    // means the machine lent the round less than two cores.
    scaling(
        "readers/harness",
        "unshared `HashMap` get, one map per thread (the machine's ceiling)",
        &|calls| {
            let map = HashMap::from([(KEY, (1_u64, 1_u64))]);
            for _ in 0..calls {
                black_box(map.get(black_box(&KEY)).copied());
            }
        },
    );
    let map = Stored::default();
    map.lock().insert(KEY, (1, 1));
    scaling(
        "readers/bare_mutex_get",
        "bare `Mutex<HashMap>` get (reference)",
        &|calls| {
            for _ in 0..calls {
                black_box(map.lock().get(black_box(&KEY)).copied());
            }
        },
    );
    let map = RwLock::new(HashMap::from([(KEY, (1_u64, 1_u64))]));
    scaling(
        "readers/bare_rwlock_get",
        "bare `RwLock<HashMap>` get (reference)",
        &|calls| {
            for _ in 0..calls {
                black_box(map.read().get(black_box(&KEY)).copied());
            }
        },
    );
}
