//! The single-flight implementations the benches compare, behind one trait so
//! every scenario runs the same code for each of them.
//!
//! Keys and values are `u64`. Each variant is used the way its docs say:
//! - `epochflight`: [`SingleFlight::run`]; registers when called.
//! - `async_singleflight` 0.6: `UnaryGroup::work` (the infallible group);
//!   registers on its first poll (it takes a `tokio::sync::Mutex`).
//! - `singleflight-async` 0.2: `SingleFlight::work`; registers when called.
//!
//! Beside them: [`paired`], the paired figures (alternating chunks, median of
//! the per-pair ratios), and [`record`], which saves the figures a bench
//! prints for `.ci/bench-table`.

// Each bench target uses a part of these helpers.
#![allow(dead_code)]

pub mod paired;
pub mod record;

use std::future::{Future, poll_fn};
use std::task::Poll;

use futures::FutureExt;

/// A single-flight map from `u64` keys to `u64` values.
pub trait Flights: Send + Sync + 'static {
    /// The row name in every group.
    const NAME: &'static str;

    fn new() -> Self;

    /// One caller for `key`: joins the flight in progress, or leads one that
    /// runs `work`. Variants that register at call time do so here, before
    /// the returned future is polled.
    fn call<W, Fut>(&self, key: u64, work: W) -> impl Future<Output = u64> + Send + '_
    where
        W: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = u64> + Send + 'static;

    /// Completes once every caller whose call has been polled once is
    /// registered with its key. The benches hold leaders on a gate until all
    /// callers have joined; they count a caller as joined after its first
    /// poll, then wait for this.
    fn settled(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::ready(())
    }
}

/// A key no scenario uses, for `AsyncSingleflight::settled`.
const PROBE_KEY: u64 = u64::MAX;

pub struct Epochflight(pub epochflight::SingleFlight<u64, u64>);

impl Flights for Epochflight {
    const NAME: &'static str = "epochflight";

    fn new() -> Self {
        Self(epochflight::SingleFlight::new())
    }

    fn call<W, Fut>(&self, key: u64, work: W) -> impl Future<Output = u64> + Send + '_
    where
        W: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = u64> + Send + 'static,
    {
        // A combinator, not `async move { call.await.value }`: an async block
        // would hold `call` twice (as a capture and as the awaited future).
        self.0.run(key, work).map(|outcome| outcome.value)
    }
}

pub struct AsyncSingleflight(async_singleflight::UnaryGroup<u64, u64>);

impl Flights for AsyncSingleflight {
    const NAME: &'static str = "async_singleflight";

    fn new() -> Self {
        Self(async_singleflight::UnaryGroup::new())
    }

    async fn call<W, Fut>(&self, key: u64, work: W) -> u64
    where
        W: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = u64> + Send + 'static,
    {
        // Its API takes the future itself; `work` runs only if it is polled,
        // i.e. only for the leader, as with the closure-taking crates.
        self.0.work(&key, async move { work().await }).await
    }

    /// A caller whose first poll found the map's `tokio::sync::Mutex` taken
    /// is queued on it, not yet registered. That mutex is fair (FIFO), so a
    /// call that gets through it after them comes after every such caller.
    async fn settled(&self) {
        self.0.work(&PROBE_KEY, async { 0 }).await;
    }
}

pub struct SingleflightAsync(singleflight_async::SingleFlight<u64, u64>);

impl Flights for SingleflightAsync {
    const NAME: &'static str = "singleflight_async";

    fn new() -> Self {
        Self(singleflight_async::SingleFlight::new())
    }

    fn call<W, Fut>(&self, key: u64, work: W) -> impl Future<Output = u64> + Send + '_
    where
        W: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = u64> + Send + 'static,
    {
        self.0.work(key, work)
    }
}

/// Wakes itself and returns `Pending` once.
pub async fn yield_once() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
