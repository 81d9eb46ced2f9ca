//! A flight's user work, boxed so that a driver that stops can hand it,
//! already started, to a follower or to the spawner: a polled future cannot
//! move.
//!
//! The future sits in an `Option` in its box, so that a finished one is
//! dropped in place (its destructor runs before its key is freed, I5) and
//! the box freed later, once the flight is published: freeing it at once
//! reads back the word the future's last poll just wrote (the allocator
//! checks it), a stall on every flight.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// The future a flight's driver polls.
pub(crate) enum Work<T, E> {
    /// From a fallible call (`try_*`).
    ReturnsResult(Pin<Box<dyn Runnable<Result<T, E>>>>),
    /// From an infallible call: the user's future boxed as it is, with no
    /// adapter future around it (one state machine less per flight).
    ReturnsValue(Pin<Box<dyn Runnable<T>>>),
}

/// A user's future in a place it is dropped from as soon as it finishes:
/// `Option<Fut>`.
pub(crate) trait Runnable<O>: Send {
    /// Polls the future; once it is ready, drops it, keeping its place.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O>;
}

impl<Fut> Runnable<Fut::Output> for Option<Fut>
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
