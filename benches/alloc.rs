//! Heap allocated per follower and per flight, counted by a global allocator.
//!
//! Its own bench target (a plain `main`, no criterion) so that the counting
//! allocator does not slow the timed benches. Everything runs on this thread,
//! polled by hand with a no-op waker, so the counts are exact and contain
//! nothing but the calls: the boxes that hold the callers' futures are left
//! out (their size is the "future" column). Each scenario runs once to warm
//! up (map capacity) and is then measured on a second run.
//!
//! Memory (issue 12): bytes held per stored idle key, beside a bare
//! `Mutex<HashMap<u64, (u64, u64)>>` holding the same value and epoch; and
//! the bytes held before and after storing, then `forget`-ing, a million
//! keys. Held bytes are those allocated and not yet freed, counted by the
//! same allocator.
//!
//! `cargo bench --bench alloc` prints the tables (`-- followers` or
//! `-- memory` only one of them); with `--test` it runs a tiny size as a
//! smoke test.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use epochflight::SingleFlight;
use parking_lot::Mutex;

use common::paired::{filter, test_mode};
use common::record::record;
use common::{AsyncSingleflight, Epochflight, Flights, SingleflightAsync, yield_once};

const KEY: u64 = 7;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed.
static HELD: AtomicI64 = AtomicI64::new(0);

fn count(bytes: usize) {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    HELD.fetch_add(bytes as i64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        HELD.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes allocated so far.
#[derive(Clone, Copy, Default)]
struct Count {
    allocs: u64,
    bytes: u64,
}

impl Count {
    fn now() -> Self {
        Self {
            allocs: ALLOCS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
        }
    }

    /// Adds what was allocated between `from` and now.
    fn add_since(&mut self, from: Count) {
        let now = Count::now();
        self.allocs += now.allocs - from.allocs;
        self.bytes += now.bytes - from.bytes;
    }

    fn per(&self, n: usize) -> (f64, f64) {
        (self.bytes as f64 / n as f64, self.allocs as f64 / n as f64)
    }
}

/// The leader's work: pending until `open`, then counts its run.
async fn held(open: Arc<AtomicBool>, executions: Arc<AtomicUsize>) -> u64 {
    while !open.load(Ordering::Acquire) {
        yield_once().await;
    }
    executions.fetch_add(1, Ordering::Relaxed);
    1
}

/// What one fan-out cost.
struct Fanout {
    /// Calls and first polls of the followers.
    join: Count,
    /// Completing: the leader's last poll and every follower's last poll.
    complete: Count,
    /// The leader's call and first poll.
    lead: Count,
    /// Size of one caller's future.
    future: usize,
}

type Call<'a> = Pin<Box<dyn Future<Output = u64> + Send + 'a>>;

/// One leader and `n` followers on one key, polled by hand.
fn fanout_once<V: Flights>(flights: &V, n: usize) -> Fanout {
    let mut cx = Context::from_waker(Waker::noop());
    let open = Arc::new(AtomicBool::new(false));
    let executions = Arc::new(AtomicUsize::new(0));
    let mut call = |counted: &mut Count| -> Call<'_> {
        let (open, executions) = (open.clone(), executions.clone());
        let from = Count::now();
        let fut = flights.call(KEY, move || held(open, executions));
        counted.add_since(from);
        let mut fut: Call<'_> = Box::pin(fut);
        let from = Count::now();
        assert!(
            fut.as_mut().poll(&mut cx).is_pending(),
            "nobody may finish yet"
        );
        counted.add_since(from);
        fut
    };
    let mut lead = Count::default();
    let mut join = Count::default();
    let mut leader = call(&mut lead);
    let mut followers: Vec<Call<'_>> = Vec::with_capacity(n);
    for _ in 0..n {
        followers.push(call(&mut join));
    }
    let future = {
        let probe = flights.call(KEY, || async { 0 });
        std::mem::size_of_val(&probe)
    };

    // Outside the counts: a no-op here, where no lock is ever contended.
    assert!(
        pin!(flights.settled())
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    );

    let mut complete = Count::default();
    open.store(true, Ordering::Release);
    let mut cx = Context::from_waker(Waker::noop());
    // Followers may need more than one poll (a lock handed on in turn).
    let mut pending: Vec<usize> = (0..n).collect();
    let from = Count::now();
    assert_eq!(leader.as_mut().poll(&mut cx), Poll::Ready(1));
    for _ in 0..16 {
        pending.retain(|&i| followers[i].as_mut().poll(&mut cx).is_pending());
        if pending.is_empty() {
            break;
        }
    }
    complete.add_since(from);
    assert!(
        pending.is_empty(),
        "{} followers never finished",
        pending.len()
    );
    assert_eq!(executions.load(Ordering::Relaxed), 1, "one execution");
    drop(followers);
    Fanout {
        join,
        complete,
        lead,
        future,
    }
}

/// Bytes and allocations per uncontended flight (`m` flights, one key).
fn uncontended_once<V: Flights>(flights: &V, m: usize) -> Count {
    let mut cx = Context::from_waker(Waker::noop());
    let mut total = Count::default();
    for _ in 0..m {
        let from = Count::now();
        let fut = pin!(flights.call(KEY, || async { 1 }));
        assert_eq!(fut.poll(&mut cx), Poll::Ready(1));
        total.add_since(from);
    }
    total
}

fn uncontended_bare(map: &Mutex<HashMap<u64, ()>>, m: usize) -> Count {
    let mut total = Count::default();
    for _ in 0..m {
        let from = Count::now();
        map.lock().insert(KEY, ());
        map.lock().remove(&KEY);
        total.add_since(from);
    }
    total
}

/// Prints one variant's row; returns its total bytes per follower.
fn row<V: Flights>(n: usize, m: usize) -> f64 {
    let flights = V::new();
    fanout_once(&flights, n);
    let f = fanout_once(&flights, n);
    let (join_b, join_a) = f.join.per(n);
    let (done_b, done_a) = f.complete.per(n);
    let mut all = f.join;
    all.allocs += f.complete.allocs + f.lead.allocs;
    all.bytes += f.complete.bytes + f.lead.bytes;
    let (all_b, all_a) = all.per(n);
    let _ = uncontended_once(&flights, m);
    let (flight_b, flight_a) = uncontended_once(&flights, m).per(m);
    println!(
        "{:<20} {:>9.1} {:>7.2} {:>9.1} {:>7.2} {:>9.1} {:>7.2} {:>8} {:>7} {:>10.1} {:>7.2}",
        V::NAME,
        join_b,
        join_a,
        done_b,
        done_a,
        all_b,
        all_a,
        f.lead.bytes,
        f.future,
        flight_b,
        flight_a,
    );
    all_b
}

/// Whether the table `name` runs: always without a filter; with one, if
/// `name` contains it.
fn selected(name: &str) -> bool {
    filter().is_none_or(|f| name.contains(&f))
}

fn main() {
    let test = test_mode();
    if selected("alloc/followers") {
        followers(test);
    }
    if selected("memory/stored_idle_key memory/forget") {
        memory(test);
    }
    if test {
        println!("alloc: ok");
    }
}

fn followers(test: bool) {
    let (n, m) = if test { (10, 10) } else { (1000, 10_000) };
    println!(
        "alloc: {n} followers on one key (per follower), and {m} uncontended flights (per flight)"
    );
    println!(
        "{:<20} {:>17} {:>17} {:>17} {:>8} {:>7} {:>18}",
        "", "join", "completion", "total", "leader", "future", "uncontended"
    );
    println!(
        "{:<20} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>8} {:>7} {:>10} {:>7}",
        "variant",
        "bytes",
        "allocs",
        "bytes",
        "allocs",
        "bytes",
        "allocs",
        "bytes",
        "bytes",
        "bytes",
        "allocs"
    );
    let per_follower = row::<Epochflight>(n, m);
    record("alloc/followers", &[("epochflight_bytes", per_follower)]);
    row::<AsyncSingleflight>(n, m);
    row::<SingleflightAsync>(n, m);
    let map = Mutex::new(HashMap::new());
    let _ = uncontended_bare(&map, m);
    let (b, a) = uncontended_bare(&map, m).per(m);
    println!(
        "{:<20} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>8} {:>7} {b:>10.1} {a:>7.2}",
        "bare_lock_map", "-", "-", "-", "-", "-", "-", "-", "-"
    );
    println!(
        "join: each follower's call and first poll; completion: the leader's last poll and \
         every follower's, per follower; total: join + completion + the leader's first poll, \
         per follower; leader: the leader's call and first poll; future: size of one caller's \
         future (it lives in the caller's task); uncontended: one call, one ready poll."
    );
}

// ---------------------------------------------------------------------------
// memory: bytes held by stored keys.

/// Bytes held (allocated and not yet freed) now.
fn held_now() -> i64 {
    HELD.load(Ordering::Relaxed)
}

/// What a single flight keeps per key at least: the value and its epoch.
type Stored = Mutex<HashMap<u64, (u64, u64)>>;

/// Bytes held by what `store` builds and keeps, per key of `n`.
fn held_per_key<M>(n: usize, store: impl FnOnce() -> M) -> f64 {
    let before = held_now();
    let kept = store();
    let bytes = held_now() - before;
    drop(kept);
    bytes as f64 / n as f64
}

/// `n` keys stored with `set`.
fn stored_by_set(n: u64) -> SingleFlight<u64, u64> {
    let flights = SingleFlight::new();
    for key in 0..n {
        flights.set(key, key);
    }
    flights
}

/// `n` keys stored by an uncontended `run` each, polled by hand.
fn stored_by_run(n: u64) -> SingleFlight<u64, u64> {
    let flights = SingleFlight::new();
    let mut cx = Context::from_waker(Waker::noop());
    for key in 0..n {
        let call = pin!(flights.run(key, move || async move { key }));
        assert!(call.poll(&mut cx).is_ready(), "the work is ready at once");
    }
    flights
}

fn stored_bare(n: u64) -> Stored {
    let map = Stored::default();
    for key in 0..n {
        map.lock().insert(key, (key, 1));
    }
    map
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn memory(test: bool) {
    let n = if test { 1000 } else { 100_000 };
    let by_set = held_per_key(n, || stored_by_set(n as u64));
    let by_run = held_per_key(n, || stored_by_run(n as u64));
    let bare = held_per_key(n, || stored_bare(n as u64));
    println!(
        "memory/stored_idle_key: bytes held per stored idle key, {n} keys (u64 keys and values): \
         epochflight {by_set:.1} stored by `set` ({:.2}x bare), {by_run:.1} by `run` ({:.2}x bare); \
         bare Mutex<HashMap<u64, (u64, u64)>> {bare:.1}",
        by_set / bare,
        by_run / bare,
    );
    record(
        "memory/stored_idle_key",
        &[
            ("set_bytes", by_set),
            ("run_bytes", by_run),
            ("bare_bytes", bare),
            ("set_ratio", by_set / bare),
            ("run_ratio", by_run / bare),
        ],
    );

    let n: u64 = if test { 10_000 } else { 1_000_000 };
    let before = held_now();
    let flights = stored_by_set(n);
    let stored = held_now() - before;
    for key in 0..n {
        flights.forget(&key);
    }
    assert!(flights.is_empty(), "every key forgotten");
    let after = held_now() - before;
    drop(flights);

    let before = held_now();
    let map = stored_bare(n);
    let bare_stored = held_now() - before;
    for key in 0..n {
        map.lock().remove(&key);
    }
    let bare_after = held_now() - before;
    map.lock().shrink_to_fit();
    let bare_shrunk = held_now() - before;
    drop(map);
    println!(
        "memory/forget: bytes held, {n} keys stored by `set`, then each `forget`-ed: \
         epochflight {:.1} MiB stored, {:.1} MiB after forget; bare map {:.1} MiB stored, \
         {:.1} MiB after remove, {:.1} MiB after shrink_to_fit",
        mib(stored),
        mib(after),
        mib(bare_stored),
        mib(bare_after),
        mib(bare_shrunk),
    );
    record(
        &format!("memory/forget_{n}"),
        &[
            ("stored_bytes", stored as f64),
            ("after_forget_bytes", after as f64),
            ("bare_stored_bytes", bare_stored as f64),
            ("bare_after_remove_bytes", bare_after as f64),
            ("bare_after_shrink_bytes", bare_shrunk as f64),
        ],
    );
}
