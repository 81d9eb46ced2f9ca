//! How a call waits, and the waits that could never end.
//!
//! Every operation of the auth layer is one async routine. A blocking twin
//! (`token_blocking`, `send_blocking`, the ureq middleware, …) runs that same
//! routine with [`Wait::Blocking`]: its waits on a refresh use the core's
//! blocking calls (so the core knows a thread, not a task, is waiting), its
//! user calls are plain function calls, and [`blocking()`] drives the whole
//! routine on the current thread. One routine, two ways to wait, as
//! async-lock's `lock_blocking` is `lock().wait()`.
//!
//! Two ways a call can wait forever, and what is done about them:
//!
//! - **A refresh waiting on itself.** The refresher or a hook calls
//!   `token`, `send`, … of its own credential (for example through an HTTP
//!   client whose auth layer it forgot to bypass with `SkipAuth`): the call
//!   would join the refresh it is part of. Detected whenever that call runs
//!   inside a poll of the refresh ([`RefreshPolls`]), async or blocking, and
//!   turned into a panic that says what happened.
//! - **A blocking call on an executor thread whose task drives the
//!   refresh.** An async task on this thread polled the refresh last and is
//!   waiting for I/O; a blocking call here would stop this thread, so the
//!   task may never run again to finish it. Detected when the refresh's last
//!   async poll was on this thread ([`Session::driver`]), and turned into a
//!   panic, as tokio panics when a runtime blocks inside a runtime. What
//!   cannot be seen (the task moved to another worker; a blocking call on
//!   another credential or in another task that the refresh needs) is
//!   documented on the blocking twins: do not call them from async code.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use super::session::Session;
use crate::block_on::block_on;
use crate::sync::{Arc, Ordering};

/// How a call waits for a refresh.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Wait {
    /// By returning `Pending`: a task.
    Async,
    /// By parking its thread.
    Blocking,
}

thread_local! {
    /// Nesting depth of [`blocking`] calls on this thread.
    static BLOCKING: Cell<u32> = const { Cell::new(0) };
    /// The sessions whose refresh this thread is polling right now.
    static POLLING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// Its address tells this thread apart from every other live thread.
    static TAG: u8 = const { 0 };
}

/// This thread, as a non-zero number no other live thread has.
pub(super) fn thread_tag() -> u64 {
    TAG.with(|tag| tag as *const u8 as usize as u64)
}

fn in_blocking() -> bool {
    BLOCKING.with(|depth| depth.get() > 0)
}

/// Runs an operation built with [`Wait::Blocking`] to completion on this
/// thread. Its waits park the thread inside the core, so the first poll
/// normally finishes it: no waker is made for that.
pub(super) fn blocking<F: Future>(future: F) -> F::Output {
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            BLOCKING.with(|depth| depth.set(depth.get() - 1));
        }
    }
    BLOCKING.with(|depth| depth.set(depth.get() + 1));
    let _depth = Depth;
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => block_on(future),
    }
}

fn address<E>(session: &Session<E>) -> usize {
    session as *const Session<E> as usize
}

/// Panics if this call would wait for a refresh that can only finish once
/// this call returns. Called before every wait on a credential's refresh.
pub(super) fn check_may_wait<E>(session: &Session<E>, wait: Wait) {
    let this = address(session);
    if POLLING.with(|polling| polling.borrow().contains(&this)) {
        panic!(
            "epochflight: a call on a credential was made from inside that credential's own \
             refresh (its refresher or an `on_refresh`/`on_sign_out` hook) and would wait for \
             that refresh forever. If the refresher sends its token request through a client \
             with this crate's auth layer or middleware, mark that request with `SkipAuth`."
        );
    }
    if wait == Wait::Blocking && session.driver.load(Ordering::Acquire) == thread_tag() {
        panic!(
            "epochflight: a blocking call (`token_blocking`, `send_blocking`, …) was made on a \
             thread whose async task is driving this credential's refresh: blocking the thread \
             would keep that task from finishing it (a deadlock). In async code, use the async \
             methods (`.await`)."
        );
    }
}

/// Held by an async call while it waits on a refresh. When the call ends
/// (cancelled, or done), this thread may no longer be the one whose task
/// drives the refresh (a cancelled leader's work is handed to a follower,
/// possibly on another thread): forget that it was, so that a later
/// blocking call here is not refused for a refresh it cannot block.
pub(super) struct Waiting<'a, E>(pub(super) &'a Session<E>);

impl<E> Drop for Waiting<'_, E> {
    fn drop(&mut self) {
        // Read first: every call on a valid token ends here, and a shared
        // read costs nothing where a compare-exchange would take the line.
        let this = thread_tag();
        if self.0.driver.load(Ordering::Acquire) == this {
            let _ = self
                .0
                .driver
                .compare_exchange(this, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// A credential's refresh work, watched while it is polled: it tells
/// [`check_may_wait`] which refresh this thread is inside, and which thread's
/// task is driving it.
pub(super) struct RefreshPolls<F, E> {
    work: Pin<Box<F>>,
    session: Arc<Session<E>>,
}

impl<F, E> RefreshPolls<F, E> {
    pub(super) fn new(session: Arc<Session<E>>, work: F) -> Self {
        Self {
            work: Box::pin(work),
            session,
        }
    }
}

impl<F: Future, E> Future for RefreshPolls<F, E> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        struct Inside;
        impl Drop for Inside {
            // Also on a panic of the work.
            fn drop(&mut self) {
                POLLING.with(|polling| polling.borrow_mut().pop());
            }
        }
        let this = address(&self.session);
        POLLING.with(|polling| polling.borrow_mut().push(this));
        let inside = Inside;
        let poll = self.work.as_mut().poll(cx);
        drop(inside);
        // A task waiting for the refresh's I/O keeps it on this thread; a
        // blocking caller parks inside the core and polls it again itself.
        let driver = match poll {
            Poll::Pending if !in_blocking() => thread_tag(),
            _ => 0,
        };
        self.session.driver.store(driver, Ordering::Release);
        poll
    }
}

impl<F, E> Drop for RefreshPolls<F, E> {
    fn drop(&mut self) {
        self.session.driver.store(0, Ordering::Release);
    }
}
