//! Drives a future to completion on the current thread.
//!
//! How blocking callers wait: a blocking follower polls the same follower
//! step as an async one, here; a blocking caller that inherits a cancelled
//! async leader's work polls that work here (DESIGN I9); and the auth layer's
//! blocking twins drive an async refresher here.
//!
//! The waker unparks this thread. Each call has its own flag, so a
//! `block_on` nested inside polled work cannot take the outer one's wake-up.
//! (It replaced an `event_listener::Event` per call, which allocated its
//! list and a listener and took a lock per wait: contended `run_blocking`
//! with 4 and 8 threads measured 16-19% faster with this.) Under loom,
//! `thread` and `AtomicBool` are loom's (see `crate::sync`), so the models
//! explore these waits too.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Wake, Waker};

use crate::sync::{AtomicBool, Ordering, StdArc as Arc, thread};

struct ThreadWaker {
    thread: thread::Thread,
    /// Set by a wake-up, cleared by the thread that consumes it.
    woken: AtomicBool,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Unpark only on the first wake-up since the thread last looked: it
        // sees the flag before it parks again.
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.thread.unpark();
        }
    }
}

pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let signal = Arc::new(ThreadWaker {
        thread: thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake-up during the poll left the flag set: no park then. `park`
        // may also return spuriously; the flag is what counts.
        while !signal.woken.swap(false, Ordering::AcqRel) {
            thread::park();
        }
    }
}
