//! [`ForKey`]: one credential of a [`TokenManager`], and every operation on
//! it. A manager of one credential is the manager whose only key is `()`:
//! its methods are these.

use std::fmt;
use std::hash::Hash;
use std::time::Instant;

use super::coord::{CoordError, Generation};
use super::fleet_store::Store;
use super::refresh::Core;
use super::session::{Fleet, Session, SessionRef, count};
use super::wait::{self, Wait};
use super::work::refresh;
use super::{AuthError, AuthStats, RefreshError, TokenManager};
use crate::block_on::block_on;
use crate::sync::Arc;
use crate::{Epoch, Versioned};

type Got<T, E> = Result<Versioned<T>, AuthError<E>>;

/// The credential of one key of a [`TokenManager`], from
/// [`TokenManager::for_key`]: the same operations as a manager of one
/// credential, with the same guarantees, for this key only.
///
/// Each key has its own token and epochs, its own sign-out and cool-down,
/// its own refresh ahead of expiry and counters; a refresh of one key never
/// waits on another's. The configuration (refresher, cool-down, expiry,
/// hooks) is the manager's.
///
/// # Examples
///
/// ```
/// use epochflight::auth::{RefreshError, TokenManager, Unauthorized};
///
/// struct Status(u16);
/// impl Unauthorized for Status {
///     fn is_unauthorized(&self) -> bool { self.0 == 401 }
/// }
///
/// # futures::executor::block_on(async {
/// let scopes: TokenManager<String, String, &str> =
///     TokenManager::keyed(|scope, _stale| async move { Ok(format!("{scope}-2")) });
/// scopes.for_key(&"read").sign_in("read-1".to_string());
/// let status = scopes
///     .for_key(&"read")
///     .send(|token| async move { Status(if token == "read-2" { 200 } else { 401 }) })
///     .await
///     .unwrap();
/// assert_eq!(status.0, 200);
/// assert_eq!(scopes.for_key(&"read").stats().retries, 1);
/// assert_eq!(scopes.for_key(&"write").stats().refresh_calls, 0);
/// # });
/// ```
pub struct ForKey<'a, T, E, K> {
    manager: &'a TokenManager<T, E, K>,
    key: &'a K,
}

impl<'a, T, E, K> ForKey<'a, T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub(super) fn new(manager: &'a TokenManager<T, E, K>, key: &'a K) -> Self {
        Self { manager, key }
    }

    /// The key.
    pub fn key(&self) -> &'a K {
        self.key
    }

    fn core(&self) -> &'a Arc<Core<T, E, K>> {
        &self.manager.core
    }

    fn session(&self) -> SessionRef<'a, E> {
        self.manager.core.sessions.get(self.key)
    }

    /// This key's token and its epoch: the request gate. See
    /// [`TokenManager::token`].
    ///
    /// # Errors
    ///
    /// [`AuthError::SignedOut`] at once while this key is signed out;
    /// [`AuthError::Refresh`] if the refresh this call waited on failed, or
    /// during the cool-down after a transient failure.
    ///
    /// # Cancel safety
    ///
    /// As [`TokenManager::token`].
    ///
    /// # Panics
    ///
    /// As [`TokenManager::token`].
    pub async fn token(&self) -> Got<T, E> {
        self.token_in(Wait::Async).await
    }

    /// Blocking [`token`](Self::token).
    ///
    /// # Blocking
    ///
    /// As [`TokenManager::token_blocking`].
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token).
    ///
    /// # Panics
    ///
    /// As [`TokenManager::token_blocking`].
    pub fn token_blocking(&self) -> Got<T, E> {
        wait::blocking(self.token_in(Wait::Blocking))
    }

    /// Refreshes this key's token if `seen` is still its current epoch;
    /// otherwise returns the newer token. See
    /// [`TokenManager::refresh_if_current`].
    ///
    /// # Errors
    ///
    /// [`AuthError::SignedOut`] at once while this key is signed out;
    /// [`AuthError::Refresh`] if the refresh failed, or at once during the
    /// cool-down after a transient failure.
    ///
    /// # Cancel safety
    ///
    /// As [`TokenManager::token`].
    ///
    /// # Panics
    ///
    /// As [`TokenManager::token`].
    pub async fn refresh_if_current(&self, seen: Epoch) -> Got<T, E> {
        self.refresh_in(seen, Wait::Async).await
    }

    /// Blocking [`refresh_if_current`](Self::refresh_if_current).
    ///
    /// # Blocking
    ///
    /// As [`TokenManager::token_blocking`].
    ///
    /// # Errors
    ///
    /// As [`refresh_if_current`](Self::refresh_if_current).
    ///
    /// # Panics
    ///
    /// As [`TokenManager::token_blocking`].
    pub fn refresh_if_current_blocking(&self, seen: Epoch) -> Got<T, E> {
        wait::blocking(self.refresh_in(seen, Wait::Blocking))
    }

    /// Stores `token` as this key's current one (after a login) and returns
    /// its epoch. See [`TokenManager::sign_in`].
    ///
    /// # Blocking
    ///
    /// With a coordinator, as [`sign_in_shared_blocking`](Self::sign_in_shared_blocking).
    pub fn sign_in(&self, token: T) -> Epoch {
        match wait::blocking(self.publish_sign_in(&token, Wait::Blocking)) {
            Ok(generation) => self.signed_in(token, generation),
            // Used here; offered to the store as a seed at its refresh.
            Err(_) => self.signed_in(token, None),
        }
    }

    /// Signs this key in fleet-wide with `token`: the store first, then this
    /// process. See [`TokenManager::sign_in_shared`].
    ///
    /// # Errors
    ///
    /// As [`TokenManager::sign_in_shared`].
    ///
    /// # Cancel safety
    ///
    /// As [`TokenManager::sign_in_shared`].
    pub async fn sign_in_shared(&self, token: T) -> Result<Epoch, AuthError<E>> {
        let generation = self.publish_sign_in(&token, Wait::Async).await?;
        Ok(self.signed_in(token, generation))
    }

    /// Blocking [`sign_in_shared`](Self::sign_in_shared).
    ///
    /// # Blocking
    ///
    /// Blocks on the store (with a coordinator).
    ///
    /// # Errors
    ///
    /// As [`sign_in_shared`](Self::sign_in_shared).
    pub fn sign_in_shared_blocking(&self, token: T) -> Result<Epoch, AuthError<E>> {
        let generation = wait::blocking(self.publish_sign_in(&token, Wait::Blocking))?;
        Ok(self.signed_in(token, generation))
    }

    /// Signs this key out: drops its token; every call for this key returns
    /// [`AuthError::SignedOut`] at once, without a network call, until
    /// [`sign_in`](Self::sign_in). See [`TokenManager::sign_out`].
    ///
    /// # Blocking
    ///
    /// With a coordinator, as [`sign_out_shared_blocking`](Self::sign_out_shared_blocking).
    pub fn sign_out(&self) {
        let _ = wait::blocking(self.sign_out_in(Wait::Blocking));
    }

    /// Signs this key out fleet-wide. See [`TokenManager::sign_out_shared`].
    ///
    /// # Errors
    ///
    /// As [`TokenManager::sign_out_shared`].
    ///
    /// # Cancel safety
    ///
    /// As [`TokenManager::sign_out_shared`].
    pub async fn sign_out_shared(&self) -> Result<(), AuthError<E>> {
        self.sign_out_in(Wait::Async).await
    }

    /// Blocking [`sign_out_shared`](Self::sign_out_shared).
    ///
    /// # Blocking
    ///
    /// Blocks on the store (with a coordinator).
    ///
    /// # Errors
    ///
    /// As [`sign_out_shared`](Self::sign_out_shared).
    pub fn sign_out_shared_blocking(&self) -> Result<(), AuthError<E>> {
        wait::blocking(self.sign_out_in(Wait::Blocking))
    }

    /// Signs the fleet in with `token` (with a coordinator): the generation
    /// the store gave it.
    async fn publish_sign_in(
        &self,
        token: &T,
        wait: Wait,
    ) -> Result<Option<Generation>, AuthError<E>> {
        let core = self.core();
        let Some(coord) = &core.coord else {
            return Ok(None);
        };
        let shared = coord.credential(self.key)?;
        let store = Store {
            shared: &shared,
            wait,
        };
        let snapshot = store.sign_in(token, core.expires_at(token)).await?;
        Ok(Some(snapshot.generation))
    }

    /// This process signed in with `token`, of shared `generation`.
    fn signed_in(&self, token: T, generation: Option<Generation>) -> Epoch {
        let (core, key) = (self.core(), self.key);
        let session = self.session();
        let (epoch, replaced, failure) = session.locked(|session| {
            let (epoch, replaced) = core.flights.replace(key.clone(), token);
            session.set_signed_out(false);
            session.set_fleet(Fleet::In);
            session.set_generation(generation);
            (epoch, replaced, session.set_failure(None))
        });
        let seed = core.coord.as_ref().and_then(|coord| coord.take_seed());
        drop((replaced, failure, seed));
        epoch
    }

    /// Signs out, fleet-wide with a coordinator. If the store cannot be
    /// told, this process signs out for good (until `sign_in`).
    async fn sign_out_in(&self, wait: Wait) -> Result<(), AuthError<E>> {
        let (core, key) = (self.core(), self.key);
        let published = match &core.coord {
            None => None,
            Some(coord) => Some(match coord.credential(key) {
                Ok(shared) => {
                    Store {
                        shared: &shared,
                        wait,
                    }
                    .sign_out()
                    .await
                }
                Err(e) => Err(e),
            }),
        };
        let session = self.session();
        let (signed_out_now, removed, seed) = session.locked(|session| {
            let signed_out_now = match &published {
                Some(Ok(snapshot)) => {
                    session.set_generation(Some(snapshot.generation));
                    session.set_fleet(Fleet::SignedOut)
                }
                _ => session.set_signed_out(true),
            };
            let seed = core.coord.as_ref().and_then(|coord| coord.take_seed());
            (signed_out_now, core.flights.take(key), seed)
        });
        drop((removed, seed));
        if signed_out_now {
            core.signed_out(&session, key);
        }
        match published {
            Some(Err(e)) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Forgets this key: drops its token and its session (signed-out state,
    /// cool-down, this key's counters; the manager's totals keep them). The
    /// next call fetches a new token as for a key never seen. A refresh in
    /// flight finishes for its own callers only; its result is not stored.
    ///
    /// For keys that come and go (tenants leaving): a key's session is kept
    /// until then.
    pub fn forget(&self) {
        let (core, key) = (self.core(), self.key);
        let session = self.session();
        let (removed, failure) =
            session.locked(|session| (core.flights.take(key), session.reset()));
        let gone = core.sessions.remove(key);
        let handle = core.coord.as_ref().and_then(|coord| coord.forget(key));
        drop((removed, failure, gone, handle));
    }

    /// Whether this key is signed out (with a coordinator: also when the
    /// fleet signed out, or a refresh was lost).
    pub fn is_signed_out(&self) -> bool {
        let session = self.session();
        session.is_signed_out() || session.fleet() != Fleet::In
    }

    /// This key's current token and epoch, without waiting or fetching.
    pub fn current(&self) -> Option<Versioned<T>> {
        self.core().flights.current(self.key)
    }

    /// This key's current epoch ([`Epoch::NONE`] with no token). Cheap.
    pub fn epoch(&self) -> Epoch {
        self.core().flights.epoch(self.key)
    }

    /// Whether a refresh of this key is in flight.
    pub fn is_refreshing(&self) -> bool {
        self.core().flights.is_in_flight(self.key)
    }

    /// Counts of this key's refreshes, retries and sign-outs.
    pub fn stats(&self) -> AuthStats {
        self.session().counters.snapshot()
    }

    /// The request gate, in either way of waiting.
    pub(super) async fn token_in(&self, wait: Wait) -> Got<T, E> {
        let session = self.session();
        // Read first, without a lock: a signed-out session costs nothing.
        if session.is_signed_out() {
            return Err(AuthError::SignedOut);
        }
        let Some(expiry) = &self.core().expiry else {
            return self.gate(&session, wait).await;
        };
        let Some(current) = self.core().flights.current(self.key) else {
            return self.gate(&session, wait).await;
        };
        let Some(expires_at) = (expiry.expires_at)(&current.value) else {
            return self.gate(&session, wait).await;
        };
        let now = Instant::now();
        if now >= expires_at {
            return self.refresh(&session, current.epoch, Ahead::No, wait).await;
        }
        if expires_at.saturating_duration_since(now) > expiry.refresh_ahead {
            return self.gate(&session, wait).await;
        }
        if !session.claim_ahead(current.epoch) {
            // Another caller refreshes it ahead: use it meanwhile.
            return Ok(current);
        }
        let claim = AheadClaim {
            session: &session,
            epoch: current.epoch,
        };
        let refreshed = self
            .refresh(&session, current.epoch, Ahead::Yes, wait)
            .await;
        drop(claim);
        match refreshed {
            // A refresh ahead that failed transiently, or could not reach
            // the other processes' store, leaves a token that is still
            // valid: use it.
            Err(AuthError::Refresh(RefreshError::Transient(_)))
            | Err(AuthError::Coordination(
                CoordError::Unavailable { .. } | CoordError::CoolingDown { .. },
            )) => Ok(current),
            other => other,
        }
    }

    /// Join a refresh in flight, or take the stored token, or fetch one.
    async fn gate(&self, session: &SessionRef<'a, E>, wait: Wait) -> Got<T, E> {
        // With no token stored the gate may start the first fetch, which the
        // cool-down after a failed one holds back too.
        self.check_may_refresh(session, Epoch::NONE, Ahead::No)?;
        wait::check_may_wait(session, wait);
        let (core, key) = (self.core(), self.key);
        let work = || {
            refresh(
                core.clone(),
                session.to_arc(),
                key.clone(),
                Epoch::NONE,
                wait,
            )
        };
        let got = match wait {
            Wait::Async => {
                let _waiting = wait::Waiting(session);
                core.flights.try_get(key.clone(), work).await
            }
            Wait::Blocking => core
                .flights
                .try_get_blocking(key.clone(), || block_on(work())),
        };
        core.resume_hook_panic();
        Ok(got?.into_versioned())
    }

    /// `refresh_if_current`, in either way of waiting.
    pub(super) async fn refresh_in(&self, seen: Epoch, wait: Wait) -> Got<T, E> {
        let session = self.session();
        self.refresh(&session, seen, Ahead::No, wait).await
    }

    async fn refresh(
        &self,
        session: &SessionRef<'a, E>,
        seen: Epoch,
        ahead: Ahead,
        wait: Wait,
    ) -> Got<T, E> {
        self.check_may_refresh(session, seen, ahead)?;
        let (core, key) = (self.core(), self.key);
        if core.flights.epoch(key) <= seen {
            // Not answered with a newer token: this call may wait.
            wait::check_may_wait(session, wait);
        }
        let work = || refresh(core.clone(), session.to_arc(), key.clone(), seen, wait);
        let refreshed = match wait {
            Wait::Async => {
                let _waiting = wait::Waiting(session);
                core.flights
                    .try_refresh_if_current(key.clone(), seen, work)
                    .await
            }
            Wait::Blocking => {
                core.flights
                    .try_refresh_if_current_blocking(key.clone(), seen, || block_on(work()))
            }
        };
        core.resume_hook_panic();
        Ok(refreshed?.into_versioned())
    }

    /// Refuses a refresh while signed out, or during the cool-down after a
    /// transient failure (unless a newer token or a flight makes the refresh
    /// cost nothing). Takes no lock unless a failure is recorded.
    fn check_may_refresh(
        &self,
        session: &Session<E>,
        seen: Epoch,
        ahead: Ahead,
    ) -> Result<(), AuthError<E>> {
        if !session.may_be_cooling() && !session.is_signed_out() {
            return Ok(());
        }
        let (core, key) = (self.core(), self.key);
        let cooling = session.locked(|session| {
            if session.is_signed_out() {
                return Err(AuthError::SignedOut);
            }
            let flights = &core.flights;
            let would_start_a_refresh = flights.epoch(key) <= seen && !flights.is_in_flight(key);
            Ok(match session.cooling(core.cooldown) {
                Some(failure) if would_start_a_refresh => Some(failure.clone()),
                _ => None,
            })
        })?;
        let Some(failure) = cooling else {
            return Ok(());
        };
        // A caller refreshing ahead falls back on its still-valid token: it
        // is not answered with the failure.
        if ahead == Ahead::No {
            count(|c| &c.cooled_down, &session.counters, &core.counters);
        }
        Err(AuthError::Refresh(failure))
    }

    /// Counts a request sent a second time after an unauthorized response.
    pub(super) fn count_retry(&self) {
        let session = self.session();
        count(|c| &c.retries, &session.counters, &self.core().counters);
    }
}

impl<T, E, K: fmt::Debug> fmt::Debug for ForKey<'_, T, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForKey")
            .field("key", self.key)
            .finish_non_exhaustive()
    }
}

/// Whether a refresh is made ahead of expiry, with a valid token to fall
/// back on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ahead {
    Yes,
    No,
}

/// This caller's claim to refresh `epoch` ahead of expiry; released on drop,
/// so a cancelled caller does not leave others waiting for nothing.
struct AheadClaim<'a, E> {
    session: &'a Session<E>,
    epoch: Epoch,
}

impl<E> Drop for AheadClaim<'_, E> {
    fn drop(&mut self) {
        self.session.release_ahead(self.epoch);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::super::session::Sessions;
    use super::*;

    type Manager = TokenManager<u32, String>;

    /// Runs `call` on another thread; whether it returned `true` within a
    /// generous deadline (a call waiting for a lock held by the caller of
    /// this function does not).
    fn finishes(call: impl FnOnce() -> bool + Send + 'static) -> bool {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(call());
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
    }

    fn the_session(m: &Manager) -> Arc<Session<String>> {
        match &m.core.sessions {
            Sessions::One { session, .. } => session.clone(),
            Sessions::PerKey(_) => unreachable!("a manager of one credential"),
        }
    }

    /// `token` on a valid token takes neither the session's lock nor the
    /// lock of the hook-panic slot: it finishes while another thread holds
    /// them. (The previous code took the session lock twice per call.)
    #[test]
    fn valid_token_takes_no_lock_of_the_manager() {
        let m = Arc::new(Manager::with_token_blocking(|_| Ok(2), 1));
        let session = the_session(&m);
        let blocking = m.clone();
        let call = move || {
            blocking.token_blocking()
                == Ok(Versioned {
                    value: 1,
                    epoch: blocking.epoch(),
                })
        };
        assert!(session.locked(|_| finishes(call)));
        let polled = m.clone();
        let call = move || futures::executor::block_on(polled.token()).is_ok();
        let slot = m.core.hook_panic_slot_for_tests();
        assert!(finishes(call));
        drop(slot);
        assert_eq!(m.stats().refresh_calls, 0);
    }

    /// Inside the refresh-ahead window, while another caller refreshes
    /// ahead, `token` hands out the still-valid token without the session
    /// lock (the claim is an atomic).
    #[test]
    fn refresh_ahead_in_progress_takes_no_session_lock() {
        let expires_at = Instant::now() + Duration::from_secs(30);
        let m = Arc::new(
            Manager::with_token_blocking(|_| Ok(2), 1)
                .with_expiry(move |_| Some(expires_at), Duration::from_secs(60)),
        );
        let session = the_session(&m);
        assert!(
            session.claim_ahead(m.epoch()),
            "as a caller refreshing ahead"
        );
        let other = m.clone();
        let call = move || other.token_blocking().is_ok_and(|t| t.value == 1);
        assert!(session.locked(|_| finishes(call)));
        assert_eq!(m.stats().refresh_calls, 0);
    }

    /// A cancelled async leader whose refresh is handed to a follower does
    /// not leave its thread marked as the one driving the refresh: a
    /// blocking call there afterwards would wait for the follower, not
    /// deadlock, and must not be refused.
    #[test]
    fn cancelled_leader_does_not_mark_its_thread_as_driver() {
        use std::future::Future;
        use std::task::{Context, Waker};

        let gate = Arc::new(event_listener::Event::new());
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let m = Arc::new(Manager::with_token(
            {
                let (gate, open) = (gate.clone(), open.clone());
                move |_| {
                    let (gate, open) = (gate.clone(), open.clone());
                    async move {
                        while !open.load(std::sync::atomic::Ordering::SeqCst) {
                            let listener = gate.listen();
                            if open.load(std::sync::atomic::Ordering::SeqCst) {
                                break;
                            }
                            listener.await;
                        }
                        Ok(2)
                    }
                }
            },
            1,
        ));
        let session = the_session(&m);
        let seen = m.epoch();
        let mut cx = Context::from_waker(Waker::noop());
        let mut leader = Box::pin(m.refresh_if_current(seen));
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            session.driver.load(crate::sync::Ordering::SeqCst),
            wait::thread_tag(),
            "the leader's task drives the refresh from this thread"
        );
        let mut follower = Box::pin(m.refresh_if_current(seen));
        assert!(follower.as_mut().poll(&mut cx).is_pending());
        drop(leader); // its refresh is handed to the follower
        assert_eq!(session.driver.load(crate::sync::Ordering::SeqCst), 0);

        open.store(true, std::sync::atomic::Ordering::SeqCst);
        gate.notify(usize::MAX);
        assert_eq!(futures::executor::block_on(follower).unwrap().value, 2);
        assert_eq!(m.stats().refresh_calls, 1, "handed on, not restarted");
    }
}
