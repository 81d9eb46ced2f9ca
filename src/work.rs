//! A flight's user work, boxed so that a driver that stops can hand it,
//! already started, to a follower or to the spawner: a polled future cannot
//! move.
//!
//! # Invariants
//!
//! - A box holds `Some(future)` until the future returns `Ready`, then
//!   `None`; it is never polled again after that.
//! - The future is dropped by the poll that finished it: in place, on the
//!   thread marked as driving the flight (a call its destructor makes on the
//!   key is nested), before the result is published and so before the key
//!   can start another work (I1).
//! - The emptied box is freed after the flight is published: freeing it at
//!   once made the allocator read back the word the future's last poll had
//!   just written (glibc checks it), a stall on every flight.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// The future a flight's driver polls.
pub(crate) enum Work<T, E> {
    /// From a fallible call (`try_*`).
    ReturnsResult(Pin<Box<dyn DropsWhenReady<Result<T, E>>>>),
    /// From an infallible call: the user's future boxed (in its `Option`)
    /// with no adapter future around it (one state machine less per flight).
    ReturnsValue(Pin<Box<dyn DropsWhenReady<T>>>),
}

/// A user's future in a place it is dropped from as soon as it finishes:
/// `Option<Fut>`.
pub(crate) trait DropsWhenReady<O>: Send {
    /// Polls the future; once it is ready, drops it, keeping its place.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O>;
}

impl<Fut> DropsWhenReady<Fut::Output> for Option<Fut>
where
    Fut: Future + Send,
{
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Fut::Output> {
        let future = self.as_mut().as_pin_mut();
        let output = ready!(
            future
                .expect("a flight's work is polled until it finishes, not after")
                .poll(cx)
        );
        self.set(None);
        Poll::Ready(output)
    }
}

/// A caller's closure, which makes the work if the caller ends up running it.
pub(crate) trait MakeWork<T, E> {
    fn make(self) -> Work<T, E>;
}

/// A `try_*` caller's closure: its future returns `Result<T, E>`.
pub(crate) struct ReturnsResult<F>(pub(crate) F);

/// An infallible caller's closure: its future returns `T`.
pub(crate) struct ReturnsValue<F>(pub(crate) F);

impl<T, E, F, Fut> MakeWork<T, E> for ReturnsResult<F>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    fn make(self) -> Work<T, E> {
        Work::ReturnsResult(Box::pin(Some((self.0)())))
    }
}

impl<T, F, Fut> MakeWork<T, Infallible> for ReturnsValue<F>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    fn make(self) -> Work<T, Infallible> {
        Work::ReturnsValue(Box::pin(Some((self.0)())))
    }
}
