//! Drives a future to completion on the current thread.
//!
//! How blocking callers wait: a blocking follower polls the same follower
//! step as an async one, here; a blocking caller that inherits a cancelled
//! async leader's work polls that work here (DESIGN I9); and the auth layer's
//! blocking twins drive an async refresher here. The waker is an [`Event`],
//! so under loom the wait is modelled like every other wait in the crate.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Wake, Waker};

use event_listener::{Event, Listener};

use crate::sync::StdArc as Arc;

struct EventWaker(Event);

impl Wake for EventWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify(usize::MAX);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify(usize::MAX);
    }
}

pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let signal = Arc::new(EventWaker(Event::new()));
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    loop {
        // Listen before polling: a wake-up during the poll is then not lost.
        let listener = signal.0.listen();
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        listener.wait();
    }
}
