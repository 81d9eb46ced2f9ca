//! A flight's user work, boxed so that a cancelled driver can hand it,
//! already started, to a follower: a polled future cannot move.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future a flight's driver polls.
pub(crate) enum Work<T, E> {
    /// From a fallible call (`try_*`): the future returns the result.
    Fallible(Pin<Box<dyn Future<Output = Result<T, E>> + Send>>),
    /// From an infallible call (`E` is `Infallible` then): the user's future
    /// boxed as it is, without an adapter future around it (one state
    /// machine less to build, move and poll on every flight).
    Infallible(Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T, E> Work<T, E> {
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        match self {
            Work::Fallible(work) => work.as_mut().poll(cx),
            Work::Infallible(work) => work.as_mut().poll(cx).map(Ok),
        }
    }
}
