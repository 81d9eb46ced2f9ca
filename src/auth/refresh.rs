//! The refresh: the one place where the refresher is called ([`Core`]),
//! and where its result changes a session.
//!
//! Every refresh of every credential, reactive, ahead of expiry or the first
//! fetch, async or blocking, runs as a flight's work (`work.rs`): exactly
//! once per flight, even when handed to another caller, so its effects
//! happen once.
//!
//! With a coordinator, that work is [`fleet::refresh`](super::fleet::refresh)
//! instead of a plain call to the refresher: it claims the shared
//! generation, adopts a newer one instead of refreshing, or refreshes and
//! commits. Only this work talks to the store: local callers join the
//! flight (two levels of single flight).

use std::any::Any;
use std::future::Future;
use std::hash::Hash;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::time::Instant;

use super::coord::Generation;
use super::fleet_store::Coord;
use super::session::{Counters, Fleet, Session, count};
use super::{AuthError, RefreshError, RefreshEvent};
use crate::sync::{AtomicBool, Mutex, Ordering};
use crate::{Epoch, SingleFlight};

pub(super) type RefreshResult<T, E> = Result<T, RefreshError<E>>;
type BoxFuture<O> = Pin<Box<dyn Future<Output = O> + Send>>;
type AsyncRefresh<T, E, K> = dyn Fn(K, Option<T>) -> BoxFuture<RefreshResult<T, E>> + Send + Sync;
type BlockingRefresh<T, E, K> = dyn Fn(K, Option<T>) -> RefreshResult<T, E> + Send + Sync;
pub(super) type RefreshHook<T, E, K> = dyn Fn(&RefreshEvent<'_, T, E, K>) + Send + Sync;
pub(super) type SignOutHook<K> = dyn Fn(&K) + Send + Sync;
type ExpiresAt<T> = dyn Fn(&T) -> Option<std::time::Instant> + Send + Sync;

/// When tokens expire, and how long before that one caller refreshes.
pub(super) struct Expiry<T> {
    pub(super) expires_at: Box<ExpiresAt<T>>,
    pub(super) refresh_ahead: std::time::Duration,
}

/// The user's refresh call.
pub(super) enum Refresher<T, E, K> {
    Async(Box<AsyncRefresh<T, E, K>>),
    Blocking(Box<BlockingRefresh<T, E, K>>),
}

impl<T, E, K> Refresher<T, E, K> {
    pub(super) fn new_async<F, Fut>(refresh: F) -> Self
    where
        F: Fn(K, Option<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RefreshResult<T, E>> + Send + 'static,
    {
        let refresh =
            move |key, stale| -> BoxFuture<RefreshResult<T, E>> { Box::pin(refresh(key, stale)) };
        Refresher::Async(Box::new(refresh))
    }

    pub(super) fn new_blocking<F>(refresh: F) -> Self
    where
        F: Fn(K, Option<T>) -> RefreshResult<T, E> + Send + Sync + 'static,
    {
        Refresher::Blocking(Box::new(refresh))
    }
}

/// What refresh work needs. It is `'static` (it may outlive the caller that
/// started it, handed to a follower), so it holds this by `Arc`.
pub(super) struct Core<T, E, K> {
    pub(super) flights: SingleFlight<K, T, AuthError<E>>,
    pub(super) refresher: Refresher<T, E, K>,
    pub(super) sessions: super::session::Sessions<K, E>,
    /// The totals over every key.
    pub(super) counters: Counters,
    pub(super) cooldown: std::time::Duration,
    pub(super) on_refresh: Option<Box<RefreshHook<T, E, K>>>,
    pub(super) on_sign_out: Option<Box<SignOutHook<K>>>,
    pub(super) expiry: Option<Expiry<T>>,
    /// The store shared with other processes, if any.
    pub(super) coord: Option<Coord<T, K>>,
    /// A panic caught in a hook that ran inside a refresh, re-raised in a
    /// caller once the refresh's result is stored (see `run_hook`).
    hook_panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Whether `hook_panic` may hold one: callers look without the lock.
    hook_panicked: AtomicBool,
}

impl<T, E, K> Core<T, E, K> {
    pub(super) fn new(
        refresher: Refresher<T, E, K>,
        sessions: super::session::Sessions<K, E>,
    ) -> Self {
        Self {
            // `TokenManager::with_spawner` sets a spawner on it.
            flights: SingleFlight::new(),
            refresher,
            sessions,
            counters: Counters::default(),
            cooldown: super::DEFAULT_COOLDOWN,
            on_refresh: None,
            on_sign_out: None,
            expiry: None,
            coord: None,
            hook_panic: Mutex::new(None),
            hook_panicked: AtomicBool::new(false),
        }
    }
}

impl<T, E, K: Clone> Core<T, E, K> {
    /// Calls the refresher (counted).
    pub(super) async fn call_refresher(
        &self,
        session: &Session<E>,
        key: &K,
        stale: Option<T>,
    ) -> RefreshResult<T, E> {
        count(|c| &c.refresh_calls, &session.counters, &self.counters);
        match &self.refresher {
            Refresher::Async(refresh) => refresh(key.clone(), stale).await,
            Refresher::Blocking(refresh) => refresh(key.clone(), stale),
        }
    }

    /// When `token` expires, if the manager knows ([`with_expiry`](super::TokenManager::with_expiry)).
    pub(super) fn expires_at(&self, token: &T) -> Option<std::time::Instant> {
        self.expiry.as_ref().and_then(|e| (e.expires_at)(token))
    }
}

impl<T, E, K> Core<T, E, K>
where
    T: Clone + 'static,
    E: Clone + 'static,
    K: Hash + Eq + Clone,
{
    /// Applies a refresh result to the session: clears or starts the
    /// cool-down, or signs out if the rejected refresh was for the token that
    /// is still current. Then tells the hooks.
    ///
    /// With a coordinator, `generation` is the shared generation of a new
    /// token, and a rejection is the fleet's sign-out (the store was told):
    /// not final here either, a `sign_in` anywhere ends it.
    pub(super) fn record(
        &self,
        session: &Session<E>,
        key: &K,
        base: Epoch,
        result: &RefreshResult<T, E>,
        generation: Option<Generation>,
    ) {
        let counted = |pick: fn(&Counters) -> &crate::sync::AtomicU64| {
            count(pick, &session.counters, &self.counters)
        };
        let failure = match result {
            Err(RefreshError::Transient(e)) => {
                Some((Instant::now(), RefreshError::Transient(e.clone())))
            }
            _ => None,
        };
        let (current, removed, old_failure) = session.locked(|session| {
            // A result for an older token, superseded by `sign_in` or
            // `sign_out` while the refresh ran, says nothing about the
            // current session.
            let current = !session.is_signed_out() && self.flights.epoch(key) == base;
            // Counted with the change they describe: whoever sees one sees
            // the other.
            match result {
                Ok(_) => counted(|c| &c.refreshes_succeeded),
                Err(RefreshError::Transient(_)) => counted(|c| &c.refreshes_failed),
                Err(RefreshError::Rejected(_)) => counted(|c| &c.refreshes_rejected),
            }
            let mut removed = None;
            let mut signed_out_now = false;
            let old_failure = match result {
                Ok(_) => {
                    if current && self.coord.is_some() {
                        session.set_generation(generation);
                        session.set_fleet(Fleet::In);
                    }
                    session.set_failure(None)
                }
                Err(RefreshError::Transient(_)) if current => session.set_failure(failure),
                Err(RefreshError::Transient(_)) => failure,
                Err(RefreshError::Rejected(_)) => {
                    if current {
                        signed_out_now = if self.coord.is_some() {
                            session.set_fleet(Fleet::SignedOut)
                        } else {
                            session.set_signed_out(true)
                        };
                        removed = Some(self.flights.take(key));
                    }
                    None
                }
            };
            (current, (removed, signed_out_now), old_failure)
        });
        let (removed, signed_out_now) = removed;
        drop((removed, old_failure));
        if let Some(hook) = &self.on_refresh {
            self.run_hook(|| {
                hook(&RefreshEvent {
                    result,
                    current,
                    key,
                })
            });
        }
        if signed_out_now {
            self.signed_out(session, key);
        }
    }

    /// Counts a sign-out and tells the hook, outside every lock.
    pub(super) fn signed_out(&self, session: &Session<E>, key: &K) {
        count(|c| &c.sign_outs, &session.counters, &self.counters);
        if let Some(hook) = &self.on_sign_out {
            self.run_hook(|| hook(key));
        }
    }

    /// Runs a hook inside a refresh. A panic there must not look like a
    /// panic of the refresh: that would drop a result the server already
    /// committed to (a rotated refresh token) and let a follower refresh
    /// again with the used one. So it is caught here and re-raised by
    /// [`resume_hook_panic`](Self::resume_hook_panic) once the result is
    /// stored.
    fn run_hook(&self, hook: impl FnOnce()) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(hook)) {
            let mut slot = self.hook_panic.lock();
            let extra = if slot.is_none() {
                *slot = Some(panic);
                self.hook_panicked.store(true, Ordering::Release);
                None
            } else {
                Some(panic)
            };
            drop(slot);
            drop(extra);
        }
    }

    /// Holds the hook-panic slot's lock (unit tests check that calls on a
    /// valid token do not take it).
    #[cfg(test)]
    pub(super) fn hook_panic_slot_for_tests(
        &self,
    ) -> impl std::ops::DerefMut<Target = Option<Box<dyn Any + Send>>> + '_ {
        self.hook_panic.lock()
    }

    /// Re-raises a hook's panic in a caller of the refresh it ran in.
    pub(super) fn resume_hook_panic(&self) {
        if !self.hook_panicked.load(Ordering::Acquire) {
            return;
        }
        let panic = {
            let mut slot = self.hook_panic.lock();
            self.hook_panicked.store(false, Ordering::Release);
            slot.take()
        };
        if let Some(panic) = panic {
            resume_unwind(panic);
        }
    }
}
