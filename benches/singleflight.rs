//! `SingleFlight` side by side with the peer crates (`async_singleflight`,
//! `singleflight-async`) and a bare `parking_lot::Mutex<HashMap<u64, ()>>`
//! insert-then-remove, the floor of any lock-and-map design.
//!
//! Groups are scenarios, rows are implementations, so every figure is a
//! ratio within one run. Async groups run on a tokio multi-thread runtime
//! with 2 workers. Scenarios that spawn tasks have a `harness` row: the same
//! spawning, counting and gate with no single-flight, so the single-flight's
//! own share is the difference.
//!
//! `cargo bench --bench singleflight -- --test` runs every row once.

mod common;

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::hint::black_box;
use std::mem;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use common::paired::{self, Clock};
use common::record::record;
use common::{AsyncSingleflight, Epochflight, Flights, SingleflightAsync, yield_once};
use epochflight::{Role, SingleFlight};

/// The one key of the single-key scenarios.
const KEY: u64 = 7;

/// The baseline: what a flight costs at least in a lock-and-map design.
type Bare = Mutex<HashMap<u64, ()>>;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Short settings for the groups whose iterations take nanoseconds.
fn quick(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
}

/// Settings for batch scenarios of `n` tasks or threads. A batch of 100 000
/// takes about 0.2-0.5 s: its ten samples get more time.
fn batches(group: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    let measure = if n >= 100_000 { 5 } else { 2 };
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(measure))
        .throughput(Throughput::Elements(n as u64));
    if n >= 1000 {
        group.sample_size(10).sampling_mode(SamplingMode::Flat);
    } else {
        group.sample_size(20).sampling_mode(SamplingMode::Auto);
    }
}

// ---------------------------------------------------------------------------
// Shared machinery

/// Polls `fut`, calling `then` right after its first poll.
///
/// Takes the future pinned by the caller (`pin!(call(..))`): moving it into
/// an async fn and pinning it there would hold it twice in the task.
async fn after_first_poll<F: Future>(mut fut: Pin<&mut F>, then: impl FnOnce()) -> F::Output {
    let mut then = Some(then);
    poll_fn(|cx| {
        let poll = fut.as_mut().poll(cx);
        if let Some(then) = then.take() {
            then();
        }
        poll
    })
    .await
}

/// Holds a batch's leaders until every task of the batch has made its call.
///
/// A task counts as joined once its call has been polled once. The variants
/// that register when called (epochflight, singleflight-async) are then
/// registered; async_singleflight registers during that first poll unless
/// its map's mutex was taken, so the leaders also wait for
/// [`Flights::settled`]. The executions per batch are checked, and printed if
/// they are not as expected.
struct Gate {
    target: usize,
    joined: AtomicUsize,
    open: Notify,
    executions: AtomicUsize,
}

impl Gate {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            target,
            joined: AtomicUsize::new(0),
            open: Notify::new(),
            executions: AtomicUsize::new(0),
        })
    }

    async fn counted<F: Future>(&self, call: Pin<&mut F>) -> F::Output {
        after_first_poll(call, || {
            if self.joined.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
                self.open.notify_waiters();
            }
        })
        .await
    }

    async fn opened(&self) {
        loop {
            let mut notified = pin!(self.open.notified());
            notified.as_mut().enable();
            if self.joined.load(Ordering::Acquire) >= self.target {
                return;
            }
            notified.await;
        }
    }
}

/// A leader's work in the gated scenarios: wait for the gate, count the run.
async fn held(gate: Arc<Gate>) -> u64 {
    gate.opened().await;
    gate.executions.fetch_add(1, Ordering::Relaxed);
    1
}

/// Executions per batch.
#[derive(Clone, Copy)]
struct Execs {
    batches: u64,
    sum: u64,
    min: usize,
    max: usize,
}

impl Default for Execs {
    fn default() -> Self {
        Self {
            batches: 0,
            sum: 0,
            min: usize::MAX,
            max: 0,
        }
    }
}

impl Execs {
    fn add(&mut self, n: usize) {
        self.batches += 1;
        self.sum += n as u64;
        self.min = self.min.min(n);
        self.max = self.max.max(n);
    }

    fn merge(&mut self, other: Execs) {
        self.batches += other.batches;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    fn summary(&self) -> String {
        let avg = self.sum as f64 / self.batches.max(1) as f64;
        format!(
            "min/avg/max = {}/{avg:.2}/{} ({} batches)",
            self.min, self.max, self.batches
        )
    }

    /// Prints the summary if any batch ran other than `expected` times.
    fn check(&self, id: &str, expected: usize) {
        if self.batches > 0 && (self.min != expected || self.max != expected) {
            eprintln!(
                "{id}: executions per batch (expected {expected}): {}",
                self.summary()
            );
        }
    }
}

/// Runs `iters` batches in one task on a worker of `rt`, so their tasks are
/// spawned from inside the runtime; returns the time and the executions.
fn time_batches<B, Fut>(rt: &Runtime, iters: u64, batch: B) -> (Duration, Execs)
where
    B: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = usize> + Send,
{
    rt.block_on(async move {
        tokio::spawn(async move {
            let mut execs = Execs::default();
            let start = Instant::now();
            for _ in 0..iters {
                execs.add(batch().await);
            }
            (start.elapsed(), execs)
        })
        .await
        .expect("batch panicked")
    })
}

/// One row of a batch scenario: times `batch`, returns its executions.
fn bench_batches<B, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    row: &str,
    n: usize,
    batch: B,
) -> Execs
where
    B: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = usize> + Send,
{
    let mut execs = Execs::default();
    group.bench_function(BenchmarkId::new(row, n), |b| {
        b.iter_custom(|iters| {
            let (elapsed, e) = time_batches(rt, iters, batch.clone());
            execs.merge(e);
            elapsed
        })
    });
    execs
}

/// Spawns `n` tasks made by `task` and waits for all of them.
async fn spawn_all<T, Fut>(n: usize, task: T)
where
    T: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(task(i))).collect();
    for handle in handles {
        handle.await.expect("task panicked");
    }
}

// ---------------------------------------------------------------------------
// 1. uncontended: one caller, one key, work that is ready at once.

fn uncontended_row<V: Flights>(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime) {
    let flights = V::new();
    group.bench_function(V::NAME, |b| {
        b.to_async(rt).iter(|| flights.call(KEY, || async { 1 }))
    });
}

fn uncontended(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("uncontended");
    quick(&mut group);
    uncontended_row::<Epochflight>(&mut group, &rt);
    uncontended_row::<AsyncSingleflight>(&mut group, &rt);
    uncontended_row::<SingleflightAsync>(&mut group, &rt);
    let map = Bare::default();
    group.bench_function("bare_lock_map", |b| {
        b.to_async(&rt).iter(|| async {
            map.lock().insert(KEY, ());
            map.lock().remove(&KEY)
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// 2. reused: reads, and refresh_if_current with a stale epoch (runs nothing).
// The peers store no values, so they have no row here. The stale refresh is
// awaited, as callers do, under the same async harness as the bare
// insert-then-remove row beside it (the baseline), so their ratio
// compares the operations, not two harnesses. The reads are plain calls and
// sit beside a bare `get`.

fn reused(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("reused");
    quick(&mut group);
    let sf: SingleFlight<u64, u64> = SingleFlight::new();
    let stale = sf.set(KEY, 1);
    sf.set(KEY, 2);
    let check = sf
        .refresh_if_current(KEY, stale, || async { 0 })
        .now_or_never();
    assert_eq!(check.map(|o| o.role), Some(Role::Reused));

    group.bench_function("epochflight_refresh_stale", |b| {
        b.to_async(&rt)
            .iter(|| sf.refresh_if_current(KEY, black_box(stale), || async { 0 }))
    });
    let map = Bare::default();
    group.bench_function("bare_lock_map", |b| {
        b.to_async(&rt).iter(|| async {
            map.lock().insert(KEY, ());
            map.lock().remove(&KEY)
        })
    });
    group.bench_function("epochflight_current", |b| {
        b.iter(|| sf.current(black_box(&KEY)))
    });
    group.bench_function("epochflight_epoch", |b| {
        b.iter(|| sf.epoch(black_box(&KEY)))
    });
    map.lock().insert(KEY, ());
    group.bench_function("bare_lock_map_get", |b| {
        b.iter(|| map.lock().get(black_box(&KEY)).is_some())
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// 3. fanout / 5. keys: n tasks, leaders held until all have called, then
// released. fanout: one key, one leader. keys: n distinct keys, n leaders.

fn key_of(i: usize, distinct: bool) -> u64 {
    if distinct { i as u64 } else { KEY }
}

/// A leader's work in the gated scenarios: wait for the gate and for the
/// callers to be registered, count the run.
async fn held_flight<V: Flights>(gate: Arc<Gate>, flights: Arc<V>) -> u64 {
    gate.opened().await;
    flights.settled().await;
    gate.executions.fetch_add(1, Ordering::Relaxed);
    1
}

async fn gated_flights<V: Flights>(flights: Arc<V>, n: usize, distinct: bool) -> usize {
    let gate = Gate::new(n);
    spawn_all(n, |i| {
        let (flights, gate) = (flights.clone(), gate.clone());
        async move {
            let work = (gate.clone(), flights.clone());
            let work = move || held_flight(work.0, work.1);
            let call = pin!(flights.call(key_of(i, distinct), work));
            black_box(gate.counted(call).await);
        }
    })
    .await;
    gate.executions.load(Ordering::Relaxed)
}

async fn gated_bare(map: Arc<Bare>, n: usize, distinct: bool) -> usize {
    let gate = Gate::new(n);
    spawn_all(n, |i| {
        let (map, gate) = (map.clone(), gate.clone());
        async move {
            let work_gate = gate.clone();
            let key = key_of(i, distinct);
            let leads = distinct || i == 0;
            let call = pin!(async move {
                map.lock().insert(key, ());
                if leads {
                    held(work_gate).await;
                }
                map.lock().remove(&key);
            });
            gate.counted(call).await;
        }
    })
    .await;
    gate.executions.load(Ordering::Relaxed)
}

async fn gated_harness(n: usize, distinct: bool) -> usize {
    let gate = Gate::new(n);
    spawn_all(n, |i| {
        let gate = gate.clone();
        async move {
            let work_gate = gate.clone();
            let leads = distinct || i == 0;
            let call = pin!(async move {
                if leads {
                    held(work_gate).await;
                }
            });
            gate.counted(call).await;
        }
    })
    .await;
    gate.executions.load(Ordering::Relaxed)
}

/// The least a follower can do: park once on a plain list of wakers and be
/// woken, with all the others, in one pass when the leader is done. No map,
/// no flight, no result: the floor under any single-flight's fan-out.
#[derive(Default)]
struct Release {
    done: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Release {
    fn release(&self) {
        self.done.store(true, Ordering::Release);
        let wakers = mem::take(&mut *self.wakers.lock());
        for waker in wakers {
            waker.wake();
        }
    }

    async fn released(&self) {
        poll_fn(|cx| {
            // Checked again under the lock: `release` sets `done` before it
            // takes the list, so a waker pushed here is always taken.
            let mut wakers = self.wakers.lock();
            if self.done.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// The harness with every follower parked on a [`Release`] until the leader
/// is done: `harness_parked` − `harness` is what parking alone costs.
async fn gated_parked(n: usize) -> usize {
    let gate = Gate::new(n);
    let release = Arc::new(Release::default());
    spawn_all(n, |i| {
        let (gate, release) = (gate.clone(), release.clone());
        async move {
            let work_gate = gate.clone();
            let call = pin!(async move {
                if i == 0 {
                    held(work_gate).await;
                    release.release();
                } else {
                    release.released().await;
                }
            });
            gate.counted(call).await;
        }
    })
    .await;
    gate.executions.load(Ordering::Relaxed)
}

fn gated_row<V: Flights>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    n: usize,
    distinct: bool,
) -> Execs {
    let flights = Arc::new(V::new());
    bench_batches(group, rt, V::NAME, n, move || {
        gated_flights(flights.clone(), n, distinct)
    })
}

fn gated(c: &mut Criterion, name: &str, sizes: &[usize], distinct: bool) {
    let rt = runtime();
    let mut group = c.benchmark_group(name);
    for &n in sizes {
        batches(&mut group, n);
        let map = Arc::new(Bare::default());
        let rows = [
            (
                Epochflight::NAME,
                gated_row::<Epochflight>(&mut group, &rt, n, distinct),
            ),
            (
                AsyncSingleflight::NAME,
                gated_row::<AsyncSingleflight>(&mut group, &rt, n, distinct),
            ),
            (
                SingleflightAsync::NAME,
                gated_row::<SingleflightAsync>(&mut group, &rt, n, distinct),
            ),
            (
                "bare_lock_map",
                bench_batches(&mut group, &rt, "bare_lock_map", n, move || {
                    gated_bare(map.clone(), n, distinct)
                }),
            ),
            (
                "harness",
                bench_batches(&mut group, &rt, "harness", n, move || {
                    gated_harness(n, distinct)
                }),
            ),
        ];
        let expected = if distinct { n } else { 1 };
        for (row, execs) in rows {
            execs.check(&format!("{name}/{n} {row}"), expected);
        }
        if !distinct {
            // Every follower parks once and is woken, as a follower must:
            // the floor under a follower's cost, with no single-flight.
            let execs = bench_batches(&mut group, &rt, "harness_parked", n, move || {
                gated_parked(n)
            });
            execs.check(&format!("{name}/{n} harness_parked"), 1);
        }
    }
    group.finish();
}

fn fanout(c: &mut Criterion) {
    gated(c, "fanout", &[10, 100, 1000, 10000], false);
}

fn keys(c: &mut Criterion) {
    gated(c, "keys", &[1, 1000, 100_000], true);
}

// ---------------------------------------------------------------------------
// 4. burst: n tasks on one key spawned at once. No fence on registration:
// the work simply outlasts the burst, running until every task has made its
// call. A crate that registers callers as they call runs it once; one that
// registers them later (behind an async lock) runs it again for callers that
// arrive while it finishes. Executions per batch are printed per row.

async fn busy(executions: Arc<AtomicUsize>, called: Arc<AtomicUsize>, n: usize) -> u64 {
    executions.fetch_add(1, Ordering::Relaxed);
    while called.load(Ordering::Relaxed) < n {
        tokio::task::yield_now().await;
    }
    1
}

async fn burst_flights<V: Flights>(flights: Arc<V>, n: usize) -> usize {
    let executions = Arc::new(AtomicUsize::new(0));
    let called = Arc::new(AtomicUsize::new(0));
    spawn_all(n, |_| {
        let (flights, executions, called) = (flights.clone(), executions.clone(), called.clone());
        async move {
            let work = {
                let called = called.clone();
                move || busy(executions, called, n)
            };
            // The call is made here; when the caller registers is up to the
            // crate (epochflight: now; others: on the first poll).
            let call = flights.call(KEY, work);
            called.fetch_add(1, Ordering::Relaxed);
            black_box(call.await);
        }
    })
    .await;
    executions.load(Ordering::Relaxed)
}

/// Every task runs the work itself: what the burst costs without coalescing.
async fn burst_unshared(n: usize) -> usize {
    let executions = Arc::new(AtomicUsize::new(0));
    let called = Arc::new(AtomicUsize::new(0));
    spawn_all(n, |_| {
        let (executions, called) = (executions.clone(), called.clone());
        async move {
            called.fetch_add(1, Ordering::Relaxed);
            black_box(busy(executions, called, n).await);
        }
    })
    .await;
    executions.load(Ordering::Relaxed)
}

async fn burst_bare(map: Arc<Bare>, n: usize) -> usize {
    let executions = Arc::new(AtomicUsize::new(0));
    spawn_all(n, |_| {
        let (map, _executions) = (map.clone(), executions.clone());
        async move {
            map.lock().insert(KEY, ());
            map.lock().remove(&KEY);
        }
    })
    .await;
    executions.load(Ordering::Relaxed)
}

async fn burst_harness(n: usize) -> usize {
    let executions = Arc::new(AtomicUsize::new(0));
    spawn_all(n, |_| {
        let executions = executions.clone();
        async move {
            black_box(executions);
        }
    })
    .await;
    executions.load(Ordering::Relaxed)
}

fn burst_row<V: Flights>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    n: usize,
) -> Execs {
    let flights = Arc::new(V::new());
    bench_batches(group, rt, V::NAME, n, move || {
        burst_flights(flights.clone(), n)
    })
}

fn burst(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("burst");
    for n in [100, 1000] {
        batches(&mut group, n);
        let map = Arc::new(Bare::default());
        let rows = [
            (
                Epochflight::NAME,
                burst_row::<Epochflight>(&mut group, &rt, n),
            ),
            (
                AsyncSingleflight::NAME,
                burst_row::<AsyncSingleflight>(&mut group, &rt, n),
            ),
            (
                SingleflightAsync::NAME,
                burst_row::<SingleflightAsync>(&mut group, &rt, n),
            ),
            (
                "unshared",
                bench_batches(&mut group, &rt, "unshared", n, move || burst_unshared(n)),
            ),
            (
                "bare_lock_map",
                bench_batches(&mut group, &rt, "bare_lock_map", n, move || {
                    burst_bare(map.clone(), n)
                }),
            ),
            (
                "harness",
                bench_batches(&mut group, &rt, "harness", n, move || burst_harness(n)),
            ),
        ];
        for (row, execs) in rows {
            if execs.batches > 0 {
                eprintln!("burst/{n} {row}: executions per batch: {}", execs.summary());
            }
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// 6. blocking: `run_blocking` alone, and `t` threads on one key with the
// leader held until the others have joined. The peers have no blocking API:
// their rows drive `work` with `futures::executor::block_on`.

/// `iters` rounds on `t` scoped threads; in each round every thread calls
/// `round(thread, round)` once, and a barrier separates the rounds.
fn time_rounds<R>(t: usize, iters: u64, round: R) -> Duration
where
    R: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(t);
    thread::scope(|s| {
        for i in 1..t {
            let (barrier, round) = (&barrier, &round);
            s.spawn(move || {
                barrier.wait();
                for r in 0..iters {
                    barrier.wait();
                    round(i, r);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        for r in 0..iters {
            barrier.wait();
            round(0, r);
        }
        barrier.wait();
        start.elapsed()
    })
}

fn blocking_uncontended(group: &mut BenchmarkGroup<'_, WallTime>) {
    let id = |row| BenchmarkId::new(row, "uncontended");
    let sf: SingleFlight<u64, u64> = SingleFlight::new();
    group.bench_function(id("epochflight"), |b| {
        b.iter(|| sf.run_blocking(KEY, || 1).value)
    });
    let ef = Epochflight::new();
    group.bench_function(id("epochflight_block_on"), |b| {
        b.iter(|| futures::executor::block_on(ef.call(KEY, || async { 1 })))
    });
    let asf = AsyncSingleflight::new();
    group.bench_function(id("async_singleflight_block_on"), |b| {
        b.iter(|| futures::executor::block_on(asf.call(KEY, || async { 1 })))
    });
    let sfa = SingleflightAsync::new();
    group.bench_function(id("singleflight_async_block_on"), |b| {
        b.iter(|| futures::executor::block_on(sfa.call(KEY, || async { 1 })))
    });
    let map = Bare::default();
    group.bench_function(id("bare_lock_map"), |b| {
        b.iter(|| {
            map.lock().insert(KEY, ());
            map.lock().remove(&KEY)
        })
    });
}

/// Yields the thread until `done`.
fn spin_until(done: impl Fn() -> bool) {
    while !done() {
        thread::yield_now();
    }
}

/// One row of `blocking` on `t` threads: times `iters` rounds of `round`
/// and checks that the work ran once per round.
/// `joined` is reset before each batch of rounds: round `r` of a batch
/// waits for `(r + 1) * joiners` joins.
fn bench_rounds<R>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    row: &str,
    t: usize,
    joined: &AtomicUsize,
    executions: &AtomicUsize,
    round: R,
) where
    R: Fn(usize, u64) + Sync,
{
    let mut rounds = 0;
    group.bench_function(BenchmarkId::new(row, format!("{t}_threads")), |b| {
        b.iter_custom(|iters| {
            rounds += iters as usize;
            joined.store(0, Ordering::Relaxed);
            time_rounds(t, iters, &round)
        })
    });
    let ran = executions.load(Ordering::Relaxed);
    if ran != rounds {
        eprintln!("blocking/{t}_threads {row}: the work ran {ran} times in {rounds} rounds");
    }
}

/// `run_blocking` on `t` threads. Each thread counts itself just before it
/// calls; once all `t` have, the leader's work waits for `sf.waiters` to
/// show the `t - 1` followers registered (the map lock is taken only then,
/// so the gate does not contend with the callers).
fn blocking_epochflight(group: &mut BenchmarkGroup<'_, WallTime>, t: usize) {
    let sf: SingleFlight<u64, u64> = SingleFlight::new();
    let (calling, executions) = (AtomicUsize::new(0), AtomicUsize::new(0));
    bench_rounds(group, "epochflight", t, &calling, &executions, |_, r| {
        let target = (r as usize + 1) * t;
        calling.fetch_add(1, Ordering::AcqRel);
        let out = sf.run_blocking(KEY, || {
            spin_until(|| calling.load(Ordering::Acquire) >= target && sf.waiters(&KEY) >= t - 1);
            executions.fetch_add(1, Ordering::Relaxed);
            1
        });
        black_box(out);
    });
}

/// A peer on `t` threads: each thread `block_on`s its call; a call counts as
/// joined once polled once, and the leader's work yields (the thread) until
/// all `t` have and [`Flights::settled`].
fn blocking_peer<V: Flights>(group: &mut BenchmarkGroup<'_, WallTime>, t: usize) {
    let flights = Arc::new(V::new());
    let joined = Arc::new(AtomicUsize::new(0));
    let executions = Arc::new(AtomicUsize::new(0));
    let row = format!("{}_block_on", V::NAME);
    bench_rounds(group, &row, t, &joined, &executions, |_, r| {
        let target = (r as usize + 1) * t;
        let (work_joined, work_executions) = (joined.clone(), executions.clone());
        let work_flights = flights.clone();
        let work = move || async move {
            yield_once().await;
            while work_joined.load(Ordering::Acquire) < target {
                thread::yield_now();
                yield_once().await;
            }
            work_flights.settled().await;
            work_executions.fetch_add(1, Ordering::Relaxed);
            1
        };
        let call = pin!(flights.call(KEY, work));
        let call = after_first_poll(call, || {
            joined.fetch_add(1, Ordering::AcqRel);
        });
        black_box(futures::executor::block_on(call));
    });
}

/// The harness, and the bare lock+map on top of it when `map` is given:
/// thread 0 plays the leader and waits until the others have "joined".
fn blocking_baseline(group: &mut BenchmarkGroup<'_, WallTime>, t: usize, map: Option<&Bare>) {
    let joined = AtomicUsize::new(0);
    let executions = AtomicUsize::new(0);
    let row = if map.is_some() {
        "bare_lock_map"
    } else {
        "harness"
    };
    bench_rounds(group, row, t, &joined, &executions, |i, r| {
        if let Some(map) = map {
            map.lock().insert(KEY, ());
        }
        if i == 0 {
            let target = (r as usize + 1) * (t - 1);
            spin_until(|| joined.load(Ordering::Acquire) >= target);
            executions.fetch_add(1, Ordering::Relaxed);
        } else {
            joined.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(map) = map {
            map.lock().remove(&KEY);
        }
    });
}

fn blocking(c: &mut Criterion) {
    let mut group = c.benchmark_group("blocking");
    quick(&mut group);
    blocking_uncontended(&mut group);
    for t in [2, 4, 8] {
        batches(&mut group, t);
        blocking_epochflight(&mut group, t);
        blocking_peer::<AsyncSingleflight>(&mut group, t);
        blocking_peer::<SingleflightAsync>(&mut group, t);
        blocking_baseline(&mut group, t, Some(&Bare::default()));
        blocking_baseline(&mut group, t, None);
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// Paired ratios (see `common::paired`): alternating short chunks of
// epochflight and the bare row, in both orders, and the median of the
// per-pair ratios, which a noisy phase of a shared machine moves on both
// sides alike. Wall time, as in the README's history. Printed, like the
// executions per burst, and saved for `.ci/bench-table`; run alone with
// `cargo bench --bench singleflight -- paired`.

fn paired_ratio<A, FutA, B, FutB>(name: &str, rt: &Runtime, mut ours: A, mut bare: B)
where
    A: FnMut() -> FutA,
    FutA: Future,
    B: FnMut() -> FutB,
    FutB: Future,
{
    let id = format!("paired/{name}");
    if !paired::selected(&id) {
        return;
    }
    let (pairs, chunk) = paired::sized((2_000, 2_000));
    let wall = Clock::Wall;
    let timed = paired::alternate(
        pairs,
        || paired::time_awaits(rt, wall, chunk, &mut ours),
        || paired::time_awaits(rt, wall, chunk, &mut bare),
    );
    let (median, low, high) = paired::quartiles(&paired::ratios(&timed));
    println!(
        "{id}: epochflight / bare_lock_map, median of {} alternating pairs of chunks of calls: \
         {median:.2} (quartiles {low:.2}-{high:.2})",
        timed.len()
    );
    let (ours_ns, bare_ns) = paired::per_call(&timed, chunk);
    record(
        &id,
        &[
            ("median", median),
            ("low", low),
            ("high", high),
            ("ours_ns", ours_ns),
            ("base_ns", bare_ns),
        ],
    );
}

/// Like [`paired_ratio`] for batches of `n` tasks: prints the median over
/// alternating pairs of (`ours`'s batch − `base`'s batch) / n, the cost per
/// waiter of `ours` above `base` (named in `what`).
fn paired_per_waiter<A, FutA, B, FutB>(
    name: &str,
    what: &str,
    rt: &Runtime,
    n: usize,
    (mut ours, mut base): (A, B),
) where
    A: FnMut() -> FutA,
    FutA: Future,
    B: FnMut() -> FutB,
    FutB: Future,
{
    let id = format!("paired/{name}");
    if !paired::selected(&id) {
        return;
    }
    let (pairs, chunk) = paired::sized((400, 1));
    let wall = Clock::Wall;
    let timed = paired::alternate(
        pairs,
        || paired::time_awaits(rt, wall, chunk, &mut ours),
        || paired::time_awaits(rt, wall, chunk, &mut base),
    );
    let per_waiter =
        |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1e9 / n as f64;
    let values = paired::compared(&timed, per_waiter);
    let (median, low, high) = paired::quartiles(&values);
    println!(
        "{id}: {what}, ns per waiter, median of {} alternating pairs \
         of batches: {median:.1} (quartiles {low:.1}-{high:.1})",
        values.len()
    );
    record(&id, &[("median", median), ("low", low), ("high", high)]);
}

fn paired(_: &mut Criterion) {
    let rt = runtime();
    let map = Bare::default();
    let bare = || async {
        map.lock().insert(KEY, ());
        map.lock().remove(&KEY)
    };
    let flights: SingleFlight<u64, u64> = SingleFlight::new();
    paired_ratio(
        "uncontended",
        &rt,
        || flights.run(KEY, || async { 1 }),
        bare,
    );
    let stale = flights.set(KEY, 1);
    flights.set(KEY, 2);
    // The pair times the stale path only if it is one: the stored value
    // reused at once, the work (which would store 0) not run.
    let check = flights
        .refresh_if_current(KEY, stale, || async { 0 })
        .now_or_never();
    assert_eq!(check.map(|o| (o.role, o.value)), Some((Role::Reused, 2)));
    paired_ratio(
        "reused_refresh_stale",
        &rt,
        || flights.refresh_if_current(KEY, black_box(stale), || async { 0 }),
        bare,
    );
    let n = 1000;
    let fanout = Arc::new(Epochflight::new());
    let ours = || gated_flights(fanout.clone(), n, false);
    let harness = || gated_harness(n, false);
    let parked = || gated_parked(n);
    let above = "epochflight above harness";
    paired_per_waiter("fanout_1000", above, &rt, n, (ours, harness));
    let parking = "harness_parked above harness (parking alone)";
    paired_per_waiter("fanout_1000_parking", parking, &rt, n, (parked, harness));
    let own = "epochflight above harness_parked (its own share)";
    paired_per_waiter("fanout_1000_own", own, &rt, n, (ours, parked));
    // Issue 12's scaling figure: the same share at ten times the waiters,
    // paired in the same sitting (`.ci/bench-table` divides the medians).
    let n = 10_000;
    let ours = || gated_flights(fanout.clone(), n, false);
    let harness = || gated_harness(n, false);
    paired_per_waiter("fanout_10000", above, &rt, n, (ours, harness));
}

criterion_group! {
    name = benches;
    config = Criterion::default().nresamples(20_000);
    targets = uncontended, reused, fanout, burst, keys, blocking, paired
}
criterion_main!(benches);
