//! A manager's side of the store it shares with other processes: its
//! coordinator (one credential, or one per key) and the store calls a flight
//! makes, async or blocking as the flight waits. The protocol itself is in
//! [`coord`](super::coord); what a refresh does with it, in `fleet.rs`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::coord::{
    Busy, Claim, ClaimOutcome, Committed, CoordError, Coordinator, Generation, SharedCredential,
    Snapshot,
};
use super::wait::Wait;
use crate::sync::Mutex;

type NameFn<K> = dyn Fn(&K) -> String + Send + Sync;

/// A manager's coordinator: one credential, or one per key.
pub(super) enum Coord<T, K> {
    One {
        shared: SharedCredential<T>,
        /// The token the manager was made with: offered to the store (written
        /// only if the credential was never written) by the first call.
        seed: Mutex<Option<T>>,
    },
    PerKey {
        coordinator: Coordinator<T>,
        name: Box<NameFn<K>>,
        /// Opened credentials: a handle keeps the key's pending commit and
        /// the newest generation it saw.
        open: Mutex<HashMap<K, SharedCredential<T>>>,
    },
}

impl<T: Send + 'static, K: Hash + Eq + Clone> Coord<T, K> {
    /// `key`'s credential in the store.
    pub(super) fn credential(&self, key: &K) -> Result<SharedCredential<T>, CoordError> {
        match self {
            Coord::One { shared, .. } => Ok(shared.clone()),
            Coord::PerKey {
                coordinator,
                name,
                open,
            } => {
                if let Some(shared) = open.lock().get(key) {
                    return Ok(shared.clone());
                }
                // User code, outside the lock.
                let shared = coordinator.credential(&name(key))?;
                Ok(open.lock().entry(key.clone()).or_insert(shared).clone())
            }
        }
    }

    /// The credential's name in the store, if it has one (Debug output).
    pub(super) fn name(&self) -> Option<&str> {
        match self {
            Coord::One { shared, .. } => Some(shared.name()),
            Coord::PerKey { .. } => None,
        }
    }

    pub(super) fn seed(&self) -> Option<T>
    where
        T: Clone,
    {
        match self {
            Coord::One { seed, .. } => seed.lock().clone(),
            Coord::PerKey { .. } => None,
        }
    }

    /// Drops the seed (registered, or replaced by a sign-in), to drop
    /// outside the caller's locks.
    pub(super) fn take_seed(&self) -> Option<T> {
        match self {
            Coord::One { seed, .. } => seed.lock().take(),
            Coord::PerKey { .. } => None,
        }
    }

    /// Forgets `key`'s handle, unless it still has a commit to send.
    pub(super) fn forget(&self, key: &K) -> Option<SharedCredential<T>> {
        match self {
            Coord::One { .. } => None,
            Coord::PerKey { open, .. } => {
                let mut open = open.lock();
                match open.get(key) {
                    Some(shared) if !shared.has_pending_commit() => open.remove(key),
                    _ => None,
                }
            }
        }
    }
}

/// The store, called the way the flight waits: async, or blocking (a
/// blocking caller's work makes blocking store calls, which need no
/// runtime).
pub(super) struct Store<'a, T> {
    pub(super) shared: &'a SharedCredential<T>,
    pub(super) wait: Wait,
}

/// `self.shared.$name(args)`, awaited, or its `_blocking` twin.
macro_rules! twin {
    ($self:ident . $name:ident / $blocking:ident ( $($arg:expr),* )) => {
        match $self.wait {
            Wait::Async => $self.shared.$name($($arg),*).await,
            Wait::Blocking => $self.shared.$blocking($($arg),*),
        }
    };
}

impl<T: Send + 'static> Store<'_, T> {
    pub(super) async fn claim(&self, g: Generation) -> Result<ClaimOutcome<T>, CoordError> {
        twin!(self.claim / claim_blocking(g))
    }

    pub(super) async fn wait(
        &self,
        busy: &Busy,
        timeout: Duration,
    ) -> Result<Snapshot<T>, CoordError> {
        twin!(self.wait / wait_blocking(busy, timeout))
    }

    pub(super) async fn read(&self) -> Result<Snapshot<T>, CoordError> {
        twin!(self.read / read_blocking())
    }

    pub(super) async fn commit(
        &self,
        claim: Claim<T>,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Committed, CoordError> {
        twin!(self.commit / commit_blocking(claim, token, expires_at))
    }

    pub(super) async fn reject(&self, claim: Claim<T>) -> Result<Snapshot<T>, CoordError> {
        twin!(self.reject / reject_blocking(claim))
    }

    pub(super) async fn fail_transient(
        &self,
        claim: Claim<T>,
        cooldown: Duration,
    ) -> Result<Snapshot<T>, CoordError> {
        twin!(self.fail_transient / fail_transient_blocking(claim, cooldown))
    }

    pub(super) async fn seed(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<(bool, Snapshot<T>), CoordError> {
        twin!(self.seed_written / seed_written_blocking(token, expires_at))
    }

    pub(super) async fn reseed(
        &self,
        g: Generation,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        twin!(self.reseed / reseed_blocking(g, token, expires_at))
    }

    pub(super) async fn sign_in(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        twin!(self.sign_in / sign_in_blocking(token, expires_at))
    }

    pub(super) async fn sign_out(&self) -> Result<Snapshot<T>, CoordError> {
        twin!(self.sign_out / sign_out_blocking())
    }
}
