//! One credential's session: signed in or out, the last transient failure
//! (the cool-down), the refresh ahead of expiry in progress, and its
//! counters. A [`TokenManager`](super::TokenManager) keeps one per key.
//!
//! Every call reads the flags here first, without a lock: a call on a valid
//! token takes no lock of this module. The lock orders only what changes the
//! session (`sign_in`, `sign_out`, a refresh deciding to run and recording
//! its result), and is taken only when a refresh may start.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::Deref;
use std::time::{Duration, Instant};

use super::coord::Generation;
use super::{AuthStats, RefreshError};
use crate::Epoch;
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, Ordering};

/// Lock order: a session's `state`, then the `SingleFlight` map lock (taken
/// inside by `take`, `replace`, `current`, `epoch`).
pub(super) struct Session<E> {
    /// Written only under `state`'s lock, read first by every call.
    signed_out: AtomicBool,
    /// Whether `state` holds a transient failure (perhaps past its
    /// cool-down): without one, no call needs the lock to check.
    failing: AtomicBool,
    /// The epoch being refreshed ahead of expiry (`Epoch::NONE`'s value for
    /// none). Others keep using the still-valid token meanwhile.
    ahead: AtomicU64,
    /// The thread whose async task drives this credential's refresh and is
    /// waiting (its last poll returned `Pending`), as a
    /// [`thread_tag`](super::wait::thread_tag); 0 for none. A blocking call on
    /// that thread would keep the task from finishing the refresh.
    pub(super) driver: AtomicU64,
    /// With a coordinator: the shared generation of the stored token (or,
    /// with none stored, the last one this session knew), [`UNKNOWN`]
    /// before the store was asked. Written under `state`'s lock.
    generation: AtomicU64,
    /// With a coordinator: why the fleet ended this session, if it did
    /// ([`Fleet`]). Unlike `signed_out`, it is not final: the next call
    /// asks the store whether the fleet signed in again. Written under
    /// `state`'s lock.
    fleet: AtomicU64,
    state: Mutex<State<E>>,
    pub(super) counters: Counters,
}

pub(super) struct State<E> {
    /// The last transient failure, cleared by a success or `sign_in`.
    last_failure: Option<(Instant, RefreshError<E>)>,
}

impl<E> Session<E> {
    pub(super) fn new() -> Self {
        Self {
            signed_out: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            ahead: AtomicU64::new(Epoch::NONE.0),
            driver: AtomicU64::new(0),
            generation: AtomicU64::new(UNKNOWN),
            fleet: AtomicU64::new(Fleet::In as u64),
            state: Mutex::new(State { last_failure: None }),
            counters: Counters::default(),
        }
    }

    /// Signed out by this process (`sign_out`, or a rejected refresh
    /// without a coordinator): final until `sign_in`.
    pub(super) fn is_signed_out(&self) -> bool {
        self.signed_out.load(Ordering::Acquire)
    }

    /// Why the fleet ended this session, if it did (coordinator only).
    pub(super) fn fleet(&self) -> Fleet {
        Fleet::from_u64(self.fleet.load(Ordering::Acquire))
    }

    /// Whether a transient failure is recorded: only then can a call be
    /// inside a cool-down.
    pub(super) fn may_be_cooling(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Runs `f` with the session locked: the only way to change it. Keep
    /// `f` short, and drop what it returns (old failures, tokens) outside.
    pub(super) fn locked<R>(&self, f: impl FnOnce(&mut Locked<'_, E>) -> R) -> R {
        let mut state = self.state.lock();
        f(&mut Locked {
            session: self,
            state: &mut state,
        })
    }

    /// Claims the refresh of `epoch` ahead of expiry, unless a caller
    /// already has it.
    pub(super) fn claim_ahead(&self, epoch: Epoch) -> bool {
        let mut seen = self.ahead.load(Ordering::Acquire);
        loop {
            if seen == epoch.0 {
                return false;
            }
            match self
                .ahead
                .compare_exchange(seen, epoch.0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => seen = now,
            }
        }
    }

    pub(super) fn release_ahead(&self, epoch: Epoch) {
        let _ = self.ahead.compare_exchange(
            epoch.0,
            Epoch::NONE.0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// The session, locked (see [`Session::locked`]).
pub(super) struct Locked<'a, E> {
    session: &'a Session<E>,
    state: &'a mut State<E>,
}

impl<E> Locked<'_, E> {
    pub(super) fn is_signed_out(&self) -> bool {
        // Written under this lock: no ordering needed beyond it.
        self.session.signed_out.load(Ordering::Relaxed)
    }

    /// Sets the signed-out flag; whether it changed.
    pub(super) fn set_signed_out(&mut self, signed_out: bool) -> bool {
        self.session.signed_out.swap(signed_out, Ordering::AcqRel) != signed_out
    }

    /// The shared generation of the stored token, `None` if unknown.
    pub(super) fn generation(&self) -> Option<Generation> {
        match self.session.generation.load(Ordering::Relaxed) {
            UNKNOWN => None,
            g => Some(Generation::new(g)),
        }
    }

    pub(super) fn set_generation(&mut self, generation: Option<Generation>) {
        let g = generation.map_or(UNKNOWN, Generation::get);
        self.session.generation.store(g, Ordering::Relaxed);
    }

    pub(super) fn fleet(&self) -> Fleet {
        self.session.fleet()
    }

    /// Sets the fleet's verdict on this session; whether the session went
    /// from signed in to ended by it.
    pub(super) fn set_fleet(&mut self, fleet: Fleet) -> bool {
        let was = Fleet::from_u64(self.session.fleet.swap(fleet as u64, Ordering::AcqRel));
        was == Fleet::In && fleet != Fleet::In && !self.is_signed_out()
    }

    /// The last transient failure, if it is within the cool-down.
    pub(super) fn cooling(&self, cooldown: Duration) -> Option<&RefreshError<E>> {
        let (failed_at, failure) = self.state.last_failure.as_ref()?;
        (failed_at.elapsed() < cooldown).then_some(failure)
    }

    /// Replaces the last transient failure; returns the old one, to drop
    /// outside the lock.
    pub(super) fn set_failure(
        &mut self,
        failure: Option<(Instant, RefreshError<E>)>,
    ) -> Option<(Instant, RefreshError<E>)> {
        self.session
            .failing
            .store(failure.is_some(), Ordering::Release);
        std::mem::replace(&mut self.state.last_failure, failure)
    }

    /// Back to a fresh session (for `forget`); what it held, to drop
    /// outside the lock.
    pub(super) fn reset(&mut self) -> Option<(Instant, RefreshError<E>)> {
        self.set_signed_out(false);
        self.set_fleet(Fleet::In);
        self.set_generation(None);
        self.session.ahead.store(Epoch::NONE.0, Ordering::Release);
        self.set_failure(None)
    }
}

/// [`Session::generation`] before the store was asked.
const UNKNOWN: u64 = u64::MAX;

/// The fleet's verdict on a session (coordinator only).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u64)]
pub(super) enum Fleet {
    /// Signed in, as far as this process knows.
    In = 0,
    /// Signed out fleet-wide (a `sign_out`, or a rejected refresh of the
    /// current generation, in any process).
    SignedOut = 1,
    /// A holder's refresh was lost ([`CoordError::Lost`](super::coord::CoordError::Lost)).
    Lost = 2,
}

impl Fleet {
    fn from_u64(n: u64) -> Fleet {
        match n {
            1 => Fleet::SignedOut,
            2 => Fleet::Lost,
            _ => Fleet::In,
        }
    }
}

/// Counts of what a credential's calls did; `AuthStats` is a snapshot.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) refresh_calls: AtomicU64,
    pub(super) refreshes_succeeded: AtomicU64,
    pub(super) refreshes_rejected: AtomicU64,
    pub(super) refreshes_failed: AtomicU64,
    pub(super) sign_outs: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) cooled_down: AtomicU64,
    pub(super) adopted: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> AuthStats {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        AuthStats {
            refresh_calls: load(&self.refresh_calls),
            refreshes_succeeded: load(&self.refreshes_succeeded),
            refreshes_rejected: load(&self.refreshes_rejected),
            refreshes_failed: load(&self.refreshes_failed),
            sign_outs: load(&self.sign_outs),
            retries: load(&self.retries),
            cooled_down: load(&self.cooled_down),
            adopted: load(&self.adopted),
        }
    }
}

/// Increments a counter of one key's session and the manager's total.
pub(super) fn count(pick: impl Fn(&Counters) -> &AtomicU64, session: &Counters, total: &Counters) {
    pick(session).fetch_add(1, Ordering::Relaxed);
    pick(total).fetch_add(1, Ordering::Relaxed);
}

/// The sessions of a manager: one, for a manager of one credential (no map,
/// so that a call looks nothing up), or one per key.
pub(super) enum Sessions<K, E> {
    /// `key` is the only key (`()`).
    One { session: Arc<Session<E>>, key: K },
    /// Sessions are created on first use of a key and removed by `forget`.
    /// (An exclusive lock held for one lookup: `crate::sync` offers no
    /// read-write lock yet.)
    PerKey(Mutex<HashMap<K, Arc<Session<E>>>>),
}

impl<K: Hash + Eq + Clone, E> Sessions<K, E> {
    pub(super) fn get(&self, key: &K) -> SessionRef<'_, E> {
        match self {
            Sessions::One { session, .. } => SessionRef::Borrowed(session),
            Sessions::PerKey(map) => {
                let mut map = map.lock();
                if let Some(session) = map.get(key) {
                    return SessionRef::Owned(session.clone());
                }
                let session = Arc::new(Session::new());
                map.insert(key.clone(), session.clone());
                SessionRef::Owned(session)
            }
        }
    }

    /// Removes `key`'s session (per key), to drop outside the lock.
    pub(super) fn remove(&self, key: &K) -> Option<Arc<Session<E>>> {
        match self {
            Sessions::One { .. } => None,
            Sessions::PerKey(map) => map.lock().remove(key),
        }
    }

    /// How many keys have a session.
    pub(super) fn len(&self) -> usize {
        match self {
            Sessions::One { .. } => 1,
            Sessions::PerKey(map) => map.lock().len(),
        }
    }
}

/// A session found for a call: borrowed from the manager of one credential
/// (no reference count touched), owned otherwise.
pub(super) enum SessionRef<'a, E> {
    Borrowed(&'a Arc<Session<E>>),
    Owned(Arc<Session<E>>),
}

impl<E> SessionRef<'_, E> {
    /// The session for refresh work, which outlives the call.
    pub(super) fn to_arc(&self) -> Arc<Session<E>> {
        match self {
            SessionRef::Borrowed(session) => Arc::clone(session),
            SessionRef::Owned(session) => session.clone(),
        }
    }
}

impl<E> Deref for SessionRef<'_, E> {
    type Target = Session<E>;

    fn deref(&self) -> &Session<E> {
        match self {
            SessionRef::Borrowed(session) => session,
            SessionRef::Owned(session) => session,
        }
    }
}
