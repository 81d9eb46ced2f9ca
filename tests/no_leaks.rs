//! DESIGN I7: keys with no flight and no value hold no memory. A counting
//! global allocator measures the live bytes allocated by the measuring thread
//! only: the test harness and the timeout watcher allocate on their own
//! threads at moments of their own, which would otherwise show up as noise.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use epochflight::SingleFlight;

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: safe to touch from inside
    // the allocator. Per thread, so that tests running side by side do not
    // count each other's allocations.
    static MEASURED: Cell<bool> = const { Cell::new(false) };
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    if MEASURED.with(Cell::get) {
        LIVE_BYTES.with(|live| live.set(live.get() + delta));
    }
}

// The one piece of `unsafe` in the project's tests: a global allocator must
// implement an unsafe trait. It only forwards to `System` and counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE_BYTES.with(Cell::get)
}

#[test]
fn hundred_thousand_flights_then_forget_leave_no_memory() {
    common::with_timeout("no_leaks", || {
        let sf: SingleFlight<String, Vec<u8>, String> = SingleFlight::new();
        let flight = |i: u64| {
            // Async flights with a follower (so the shared state is allocated),
            // then a blocking one, then an error: every path frees its memory.
            let key = format!("key-{i}");
            futures::executor::block_on(async {
                let leader = sf.try_run(key.clone(), || async { Ok(vec![1u8; 64]) });
                let follower = sf.try_run(key.clone(), || async { Ok(vec![2u8; 64]) });
                let (a, b) = futures::join!(leader, follower);
                assert_eq!(a.unwrap().value, b.unwrap().value);
            });
            sf.forget(&key);
            sf.try_run_blocking(key.clone(), || Ok(vec![3u8; 64]))
                .unwrap();
            sf.forget(&key);
            let _ = sf.try_run_blocking(key.clone(), || Err("failed".to_string()));
            assert!(sf.is_empty(), "key {key} left a slot");
        };
        // Everything below runs on this thread: no flight spawns anything.
        MEASURED.with(|m| m.set(true));
        // Warm up: the map's table and thread-locals reach their steady size.
        for i in 0..100 {
            flight(i);
        }
        let before = live();
        for i in 100..100_100 {
            flight(i);
        }
        let after = live();
        assert_eq!(
            after - before,
            0,
            "{} bytes leaked over 100,000 flights",
            after - before
        );
    });
}

/// Memory returns as keys are forgotten: the table of values shrinks on its
/// own once it is a quarter full, and `shrink_to_fit` returns the rest.
#[test]
fn forgotten_keys_give_their_memory_back() {
    common::with_timeout("forgotten_keys_give_their_memory_back", || {
        MEASURED.with(|m| m.set(true));
        let before = live();
        let sf: SingleFlight<u64, u64> = SingleFlight::new();
        for k in 0..200_000 {
            sf.set(k, k);
        }
        let full = live() - before;
        for k in 0..200_000 {
            sf.forget(&k);
        }
        let forgotten = live() - before;
        assert!(
            forgotten < full / 50,
            "{forgotten} of {full} bytes still held after every key was forgotten"
        );
        sf.shrink_to_fit();
        let shrunk = live() - before;
        assert!(
            shrunk <= 4096,
            "{shrunk} bytes held by an empty, shrunk map"
        );
        drop(sf);
        MEASURED.with(|m| m.set(false));
    });
}
