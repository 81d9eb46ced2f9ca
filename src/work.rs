//! A flight's user work, boxed so that a driver that stops can hand it,
//! already started, to a follower or to the spawner: a polled future cannot
//! move.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future a flight's driver polls.
pub(crate) enum Work<T, E> {
    /// From a fallible call (`try_*`).
    ReturnsResult(Pin<Box<dyn Future<Output = Result<T, E>> + Send>>),
    /// From an infallible call: the user's future boxed as it is, with no
    /// adapter future around it (one state machine less per flight).
    ReturnsValue(Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T, E> Work<T, E> {
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        match self {
            Work::ReturnsResult(work) => work.as_mut().poll(cx),
            Work::ReturnsValue(work) => work.as_mut().poll(cx).map(Ok),
        }
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
        Work::ReturnsResult(Box::pin((self.0)()))
    }
}

impl<T, F, Fut> MakeWork<T, Infallible> for ReturnsValue<F>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    fn make(self) -> Work<T, Infallible> {
        Work::ReturnsValue(Box::pin((self.0)()))
    }
}
