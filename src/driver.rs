//! The caller that runs a flight's work: its leader, a follower that took it
//! over, or a task on the spawner. A drop guard: wherever it stops without a
//! result (cancelled, panicked), its drop gives the flight up to the map,
//! which hands it on (see `flight.rs`).

use std::future::poll_fn;
use std::mem;
use std::task::{Context, Poll};

use crate::block_on::block_on;
use crate::epoch::Role;
use crate::flight::{self, Finished, FlightId};
use crate::registry::{Detached, Registry};
use crate::spawner::Task;
use crate::sync::StdArc;
use crate::work::Work;

pub(crate) struct Driver<'a, K, T, E, S> {
    registry: &'a StdArc<Registry<K, T, E, S>>,
    id: FlightId,
    progress: Progress<T, E>,
    /// It continues work a cancelled driver handed on: its caller `Joined`.
    adopted: bool,
    /// It is the spawner's task: dropped unfinished, it does not spawn again.
    on_spawner: bool,
}

enum Progress<T, E> {
    /// The caller's closure has not run yet: there is no work.
    Unstarted,
    /// User code runs (the closure, a poll of the work) or the result is
    /// being published. Dropped in this state, that code panicked, and the
    /// unwinding already dropped the work.
    InUserCode,
    /// Between two polls of the work.
    Paused(Work<T, E>),
    /// The result is published.
    Finished,
}

impl<'a, K, T, E, S> Driver<'a, K, T, E, S> {
    /// The leader of a new flight, or a follower promoted to run its own
    /// closure.
    pub(crate) fn leading(registry: &'a StdArc<Registry<K, T, E, S>>, id: FlightId) -> Self {
        Self::new(registry, id, Progress::Unstarted, false)
    }

    /// A follower that took over work a cancelled driver handed on.
    pub(crate) fn adopting(
        registry: &'a StdArc<Registry<K, T, E, S>>,
        id: FlightId,
        work: Work<T, E>,
    ) -> Self {
        Self::new(registry, id, Progress::Paused(work), true)
    }

    /// The task on the spawner that finishes detached work.
    fn on_spawner(
        registry: &'a StdArc<Registry<K, T, E, S>>,
        id: FlightId,
        work: Work<T, E>,
    ) -> Self {
        let mut driver = Self::new(registry, id, Progress::Paused(work), true);
        driver.on_spawner = true;
        driver
    }

    fn new(
        registry: &'a StdArc<Registry<K, T, E, S>>,
        id: FlightId,
        progress: Progress<T, E>,
        adopted: bool,
    ) -> Self {
        Self {
            registry,
            id,
            progress,
            adopted,
            on_spawner: false,
        }
    }

    /// `Led` if it runs its own closure, `Joined` if it continues the work a
    /// cancelled driver handed on (the work is the flight's, not its own).
    pub(crate) fn role(&self) -> Role {
        if self.adopted {
            Role::Joined
        } else {
            Role::Led
        }
    }

    /// Whether its work is still to be made by the caller's closure.
    pub(crate) fn is_unstarted(&self) -> bool {
        matches!(self.progress, Progress::Unstarted)
    }
}

impl<K, T, E, S> Driver<'_, K, T, E, S>
where
    K: Eq + Clone,
    T: Clone,
    E: Clone,
{
    /// Polls the work; once it is done, stores and publishes the result and
    /// returns the caller's copy.
    pub(crate) fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Finished<T, E>> {
        let Progress::Paused(work) = mem::replace(&mut self.progress, Progress::InUserCode) else {
            panic!("an epochflight call was polled after it completed or panicked");
        };
        let polled = flight::driving(self.registry.address(), self.id, || poll(work, cx));
        self.polled(polled)
    }

    /// Calls the caller's closure to make the work, and polls it a first
    /// time. (The fresh work is polled before it is stored: reading it back
    /// right after storing it costs a stall.)
    pub(crate) fn start(
        &mut self,
        make: impl FnOnce() -> Work<T, E>,
        cx: &mut Context<'_>,
    ) -> Poll<Finished<T, E>> {
        self.progress = Progress::InUserCode;
        let polled = flight::driving(self.registry.address(), self.id, || poll(make(), cx));
        self.polled(polled)
    }

    fn polled(&mut self, polled: Polled<T, E>) -> Poll<Finished<T, E>> {
        match polled {
            Polled::Pending(work) => {
                self.progress = Progress::Paused(work);
                Poll::Pending
            }
            Polled::Ready(result, emptied) => {
                let finished = self.finish(result);
                // It holds `None` (the future was dropped by its last poll):
                // freeing it runs no user code; see `work.rs` for why now.
                drop(emptied);
                Poll::Ready(finished)
            }
        }
    }

    /// Runs a blocking caller's closure as the work.
    pub(crate) fn run_blocking(mut self, f: impl FnOnce() -> Result<T, E>) -> Finished<T, E> {
        self.progress = Progress::InUserCode;
        let map = self.registry.address();
        let result = flight::driving(map, self.id, f);
        self.finish(result)
    }

    /// Drives the work to its end on this thread.
    pub(crate) fn drive_blocking(mut self) -> Finished<T, E> {
        block_on(poll_fn(|cx| self.poll_work(cx)))
    }

    fn finish(&mut self, result: Result<T, E>) -> Finished<T, E> {
        // Finished from here: `complete` commits the flight whatever happens,
        // and a panic in it (a clone made for this caller) reaches only it.
        self.progress = Progress::Finished;
        self.registry.complete(self.id, result)
    }
}

/// One poll of `work`, as its driver makes it: the closure that made it,
/// the poll, and the drop of the finished future all run marked as driving
/// the flight (a call any of them makes on the same key is nested), and the
/// finished future is dropped before any lock is taken (its box is freed
/// once the result is published; see `work.rs`).
fn poll<T, E>(work: Work<T, E>, cx: &mut Context<'_>) -> Polled<T, E> {
    // Taken apart first: the box stays in registers (a `Work` kept in memory
    // is written a word at a time, then copied whole when it moves on: a
    // failed store forward). The box's poll drops a finished future.
    match work {
        Work::ReturnsValue(mut future) => match future.as_mut().poll(cx) {
            Poll::Pending => Polled::Pending(Work::ReturnsValue(future)),
            Poll::Ready(value) => Polled::Ready(Ok(value), Work::ReturnsValue(future)),
        },
        Work::ReturnsResult(mut future) => match future.as_mut().poll(cx) {
            Poll::Pending => Polled::Pending(Work::ReturnsResult(future)),
            Poll::Ready(result) => Polled::Ready(result, Work::ReturnsResult(future)),
        },
    }
}

/// What a poll of the work gave.
enum Polled<T, E> {
    /// Not finished: the work, to poll again.
    Pending(Work<T, E>),
    /// Its result, and its box with the future dropped.
    Ready(Result<T, E>, Work<T, E>),
}

impl<K, T, E, S> Drop for Driver<'_, K, T, E, S> {
    fn drop(&mut self) {
        let work = match mem::replace(&mut self.progress, Progress::Finished) {
            Progress::Finished => return,
            Progress::Unstarted | Progress::InUserCode => None,
            Progress::Paused(work) => Some(work),
        };
        self.registry.give_up(self.id, work, !self.on_spawner);
    }
}

/// The task that finishes detached work on the spawner and stores its
/// result as an awaited flight would. Made by `SingleFlight::with_spawner`,
/// where the `Send + 'static` bounds hold.
pub(crate) fn finish_on_spawner<K, T, E, S>(mut detached: Detached<K, T, E, S>) -> Task
where
    K: Eq + Clone + Send + 'static,
    T: Clone + Send + 'static,
    E: Clone + Send + 'static,
    S: Send + Sync + 'static,
{
    Box::pin(async move {
        let work = detached.work.take().expect("detached work is spawned once");
        let mut driver = Driver::on_spawner(&detached.registry, detached.id, work);
        // The result has no caller: it is stored and published, then dropped.
        drop(poll_fn(|cx| driver.poll_work(cx)).await);
    })
}
