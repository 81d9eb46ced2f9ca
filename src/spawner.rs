//! The user's spawner: where work whose callers all went away finishes.
//!
//! It knows nothing of the map: it holds the user's spawn function and a
//! function, chosen where `with_spawner`'s `Send + 'static` bounds hold, that
//! turns a detached flight (`O`) into the task to spawn.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A task for the user's executor.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

pub(crate) struct Spawner<O> {
    spawn: Box<dyn Fn(Task) + Send + Sync>,
    finish: fn(O) -> Task,
}

impl<O> Spawner<O> {
    pub(crate) fn new(spawn: Box<dyn Fn(Task) + Send + Sync>, finish: fn(O) -> Task) -> Self {
        Self { spawn, finish }
    }

    /// Spawns the task that finishes `detached`. Call with no lock held: the
    /// user's spawner may call back into the same `SingleFlight` (I8).
    pub(crate) fn spawn(&self, detached: O) {
        (self.spawn)((self.finish)(detached));
    }
}

impl<O> fmt::Debug for Spawner<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Spawner")
    }
}
