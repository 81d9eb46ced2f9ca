//! Test harness shared by the core suites: one scenario, several runtimes.
#![allow(dead_code)]

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use event_listener::Event;
use futures::FutureExt;

/// How long any test may take before it fails loudly.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `body` on its own thread and fails the test if it has not returned
/// within [`TEST_TIMEOUT`]. Panics in `body` are re-raised here.
pub fn with_timeout<R: Send + 'static>(name: &str, body: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let _ = tx.send(result);
        })
        .expect("spawn test thread");
    match rx.recv_timeout(TEST_TIMEOUT) {
        Ok(Ok(value)) => {
            thread.join().expect("test thread");
            value
        }
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("test `{name}` timed out after {TEST_TIMEOUT:?}: something hangs"),
    }
}

/// Makes one `#[test]` per runtime for each scenario `fn name(rt: Rt)`:
/// `tokio_rt::name` and `smol_rt::name`. Use with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_every_runtime {
    ($($scenario:ident),* $(,)?) => {
        mod tokio_rt {
            $( #[test] fn $scenario() { super::$scenario(super::Rt::Tokio) } )*
        }
        mod smol_rt {
            $( #[test] fn $scenario() { super::$scenario(super::Rt::Smol) } )*
        }
    };
}

/// The async runtimes every async scenario runs on.
#[derive(Clone, Copy, Debug)]
pub enum Rt {
    /// tokio, multi-thread, 2 workers.
    Tokio,
    /// smol's global executor.
    Smol,
}

pub type Panic = Box<dyn Any + Send>;

/// A spawned task that can be aborted (its future dropped) or joined.
pub enum Task<T> {
    Tokio(tokio::task::JoinHandle<T>),
    Smol(Option<smol::Task<Result<T, Panic>>>),
}

impl<T: Send + 'static> Task<T> {
    /// The task's output, or the panic that ended it.
    pub async fn join(self) -> Result<T, Panic> {
        match self {
            Task::Tokio(handle) => handle.await.map_err(|e| e.into_panic()),
            Task::Smol(mut task) => task.take().expect("joined twice").await,
        }
    }

    /// Drops the task's future (at its current `.await`) and waits until it
    /// is gone.
    pub async fn abort(self) {
        match self {
            Task::Tokio(handle) => {
                handle.abort();
                match handle.await {
                    Err(err) => {
                        assert!(err.is_cancelled(), "task ended with {err:?}, not cancelled")
                    }
                    Ok(_) => panic!("task finished before abort"),
                }
            }
            Task::Smol(mut task) => {
                let out = task.take().expect("aborted twice").cancel().await;
                assert!(out.is_none(), "task finished before abort");
            }
        }
    }
}

impl Rt {
    pub const ALL: [Rt; 2] = [Rt::Tokio, Rt::Smol];

    /// Runs `future` to completion on this runtime, under [`with_timeout`].
    pub fn run<F, Fut>(self, name: &str, make: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        with_timeout(&format!("{name} on {self:?}"), move || match self {
            Rt::Tokio => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(make()),
            Rt::Smol => smol::block_on(make()),
        })
    }

    pub fn spawn<T, F>(self, future: F) -> Task<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        match self {
            Rt::Tokio => Task::Tokio(tokio::spawn(future)),
            Rt::Smol => Task::Smol(Some(smol::spawn(
                std::panic::AssertUnwindSafe(future).catch_unwind(),
            ))),
        }
    }
}

/// A latch that async work or threads can wait on until the test opens it.
#[derive(Default)]
pub struct Gate {
    open: AtomicBool,
    event: Event,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub async fn wait(&self) {
        loop {
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            let listener = self.event.listen();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            listener.await;
        }
    }

    pub fn wait_blocking(&self) {
        use event_listener::Listener;
        loop {
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            let listener = self.event.listen();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            listener.wait();
        }
    }
}

/// Yields to the scheduler once.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(move |cx: &mut Context<'_>| {
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

/// Yields until `condition` holds. A counted wait, not a sleep: the test's
/// timeout catches a condition that never comes.
pub async fn until(mut condition: impl FnMut() -> bool) {
    while !condition() {
        yield_now().await;
    }
}

/// Spins (yielding the thread) until `condition` holds.
pub fn until_blocking(mut condition: impl FnMut() -> bool) {
    while !condition() {
        std::thread::yield_now();
    }
}

/// Counts what happens to a piece of work: how often it started, finished,
/// was dropped unfinished, and how many callers poll it at the same moment.
#[derive(Default)]
pub struct Probe {
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    pub dropped_unfinished: AtomicUsize,
    polling: AtomicUsize,
    pub max_concurrent_polls: AtomicUsize,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    pub fn dropped_unfinished(&self) -> usize {
        self.dropped_unfinished.load(Ordering::SeqCst)
    }

    /// Wraps `work` so that its life is recorded here.
    pub fn watch<F: Future>(self: &Arc<Self>, work: F) -> Watched<F> {
        self.started.fetch_add(1, Ordering::SeqCst);
        Watched {
            probe: self.clone(),
            work: Box::pin(work),
            done: false,
        }
    }
}

pub struct Watched<F> {
    probe: Arc<Probe>,
    work: Pin<Box<F>>,
    done: bool,
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let now = self.probe.polling.fetch_add(1, Ordering::SeqCst) + 1;
        self.probe
            .max_concurrent_polls
            .fetch_max(now, Ordering::SeqCst);
        let poll = self.work.as_mut().poll(cx);
        self.probe.polling.fetch_sub(1, Ordering::SeqCst);
        if poll.is_ready() {
            self.done = true;
            self.probe.finished.fetch_add(1, Ordering::SeqCst);
        }
        poll
    }
}

impl<F> Drop for Watched<F> {
    fn drop(&mut self) {
        if !self.done {
            self.probe.dropped_unfinished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Sets a flag when dropped: tells a test that a task's future is gone.
pub struct DropFlag(pub Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The text of a panic's payload (`&str` or `String`), or "" for others.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}
