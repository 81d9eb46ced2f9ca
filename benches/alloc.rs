//! Heap allocated per follower and per flight, counted by a global allocator.
//!
//! Its own bench target (a plain `main`, no criterion) so that the counting
//! allocator does not slow the timed benches. Everything runs on this thread,
//! polled by hand with a no-op waker, so the counts are exact and contain
//! nothing but the calls: the boxes that hold the callers' futures are left
//! out (their size is the "future" column). Each scenario runs once to warm
//! up (map capacity) and is then measured on a second run.
//!
//! `cargo bench --bench alloc` prints the tables; with `--test` it runs a
//! tiny size as a smoke test.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use common::{AsyncSingleflight, Epochflight, Flights, SingleflightAsync, yield_once};

const KEY: u64 = 7;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

fn record(bytes: usize) {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
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

fn row<V: Flights>(n: usize, m: usize) {
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
}

fn main() {
    let test = std::env::args().any(|arg| arg == "--test");
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
    row::<Epochflight>(n, m);
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
    if test {
        println!("alloc: ok");
    }
}
