//! A [`TokenManager`](super::TokenManager) with a coordinator: its refresh
//! work talks to the store shared with other processes.
//!
//! Two levels of single flight. Local callers join the manager's own flight
//! (as without a coordinator); that flight's work, [`refresh`], is the only
//! thing that talks to the store, so store calls per expiry do not grow with
//! requests: per process and expiry one claim and one commit, or one claim,
//! one wait and one read.
//!
//! Each local token remembers its **shared generation** (in its session,
//! written under the session lock with the token it describes). A refresh
//! claims that generation:
//!
//! - the store holds a newer one (another process refreshed: a late `401`
//!   here): adopt it, no refresh;
//! - another process is refreshing it: wait for its commit (woken by it,
//!   bounded by its lease), adopt;
//! - claimed: refresh with the refresh token **read from the store at the
//!   claim** (never this process's copy), then commit it as the next
//!   generation; a rejected refresh signs the fleet out, a transient failure
//!   cools the fleet down.
//!
//! The fleet's verdicts (signed out, a lost refresh) end the local session
//! too, but not for good: while ended, each call asks the store (one read per
//! local flight) whether the fleet signed in again. A `sign_out` of this
//! process whose store call failed is final, as without a coordinator.

use std::hash::Hash;
use std::time::{Duration, Instant};

use super::coord::{Claim, ClaimOutcome, Committed, CoordError, Generation, Snapshot};
use super::fleet_store::{Coord, Store};
use super::refresh::Core;
use super::session::{Fleet, Session, count};
use super::wait::Wait;
use super::{AuthError, RefreshError};
use crate::Epoch;

/// What the session knew when the refresh was decided.
pub(super) struct Shared {
    pub(super) generation: Option<Generation>,
    pub(super) fleet: Fleet,
    pub(super) wait: Wait,
}

/// How long past a lease (and the reuse grace) a refresh waits for other
/// processes at most, before it gives up with `Unavailable`.
const WAIT_SLACK: Duration = Duration::from_secs(5);

/// The flight's work with a coordinator, for the local token `stale` of
/// epoch `base` (`None`: none here).
pub(super) async fn refresh<T, E, K>(
    core: &Core<T, E, K>,
    session: &Session<E>,
    key: K,
    base: Epoch,
    stale: Option<T>,
    shared: Shared,
) -> Result<T, AuthError<E>>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let coord = core.coord.as_ref().expect("called with a coordinator");
    let credential = coord.credential(&key)?;
    let work = Work {
        core,
        session,
        key: &key,
        base,
        store: Store {
            shared: &credential,
            wait: shared.wait,
        },
    };
    if stale.is_none() {
        if let Some(seed) = coord.seed() {
            return work.register_seed(seed).await;
        }
        if shared.fleet != Fleet::In {
            return work.ask_fleet(shared.generation, shared.fleet).await;
        }
    }
    let g = match (shared.generation, &stale) {
        (Some(g), _) => g,
        // Nothing here yet: the store's token, or the first fetch.
        (None, None) => Generation::INITIAL,
        // A token the store never gave this process (the seed while the
        // store was down, a `sign_in` that could not reach it): offered as a
        // seed, written only if the credential was never written.
        (None, Some(token)) => {
            let (written, snapshot) = work.store.seed(token, core.expires_at(token)).await?;
            if !written {
                return work.adopt(snapshot);
            }
            snapshot.generation
        }
    };
    work.claim_and_refresh(g, stale).await
}

struct Work<'a, T, E, K> {
    core: &'a Core<T, E, K>,
    session: &'a Session<E>,
    key: &'a K,
    base: Epoch,
    store: Store<'a, T>,
}

impl<T, E, K> Work<'_, T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Whether the local token is still the one this refresh started from
    /// (no `sign_in`, `sign_out` or `forget` meanwhile). Under the session
    /// lock.
    fn is_current(&self, signed_out: bool) -> bool {
        !signed_out && self.core.flights.epoch(self.key) == self.base
    }

    /// Takes the store's token as this process's: no refresh.
    fn adopt(&self, snapshot: Snapshot<T>) -> Result<T, AuthError<E>> {
        self.take_from_store(snapshot, true)
    }

    /// Takes the store's token; `adopted`: another process's (counted).
    fn take_from_store(&self, snapshot: Snapshot<T>, adopted: bool) -> Result<T, AuthError<E>> {
        if let Err(e) = snapshot.usable() {
            return Err(self.refused(e, snapshot.generation));
        }
        let token = snapshot.token.ok_or(CoordError::Protocol {
            reason: "a usable record without a token",
        })?;
        let failure = self.session.locked(|session| {
            if !self.is_current(session.is_signed_out()) {
                return None;
            }
            session.set_generation(Some(snapshot.generation));
            session.set_fleet(Fleet::In);
            session.set_failure(None)
        });
        drop(failure);
        if adopted {
            count(|c| &c.adopted, &self.session.counters, &self.core.counters);
        }
        Ok(token)
    }

    /// The store refused: for the fleet's verdicts (signed out, lost) this
    /// session ends too, until the fleet signs in again.
    fn refused(&self, error: CoordError, g: Generation) -> AuthError<E> {
        let fleet = match &error {
            CoordError::SignedOut => Fleet::SignedOut,
            CoordError::Lost { .. } => Fleet::Lost,
            _ => return error.into(),
        };
        let (removed, ended_now) = self.session.locked(|session| {
            if !self.is_current(session.is_signed_out()) {
                return (None, false);
            }
            session.set_generation(Some(g));
            let ended_now = session.set_fleet(fleet);
            (self.core.flights.take(self.key), ended_now)
        });
        drop(removed);
        if ended_now {
            self.core.signed_out(self.session, self.key);
        }
        error.into()
    }

    /// The first call of a manager made with a token: the token is offered
    /// to the store (written only if the credential was never written), and
    /// the store's token is used. With the store down, the token is used
    /// here meanwhile (valid tokens keep working) and offered again at its
    /// refresh.
    async fn register_seed(&self, seed: T) -> Result<T, AuthError<E>> {
        let expires_at = self.core.expires_at(&seed);
        let outcome = self.store.seed(&seed, expires_at).await;
        let registered = match outcome {
            Ok((written, snapshot)) => self.take_from_store(snapshot, !written),
            Err(CoordError::Unavailable { .. }) => Ok(seed),
            Err(e) => return Err(e.into()),
        };
        let core = self.core;
        let old = self.session.locked(|session| {
            self.is_current(session.is_signed_out())
                .then(|| core.coord.as_ref().and_then(Coord::take_seed))
        });
        drop(old);
        registered
    }

    /// This session was ended by the fleet: has the fleet signed in since
    /// (a newer generation)? Reads only: never a claim while ended.
    async fn ask_fleet(&self, known: Option<Generation>, fleet: Fleet) -> Result<T, AuthError<E>> {
        let snapshot = self.store.read().await?;
        if known.is_none_or(|g| snapshot.generation > g) {
            return self.adopt(snapshot);
        }
        Err(match fleet {
            Fleet::Lost => AuthError::Coordination(CoordError::Lost {
                generation: snapshot.generation,
            }),
            _ => AuthError::SignedOut,
        })
    }

    /// Claim generation `g`; adopt a newer one, wait for another process's
    /// refresh, or refresh and commit.
    async fn claim_and_refresh(&self, g: Generation, stale: Option<T>) -> Result<T, AuthError<E>> {
        let config = self.store.shared.config();
        let deadline = Instant::now() + config.lease() * 2 + config.reuse_grace() + WAIT_SLACK;
        loop {
            let outcome = match self.store.claim(g).await {
                Ok(outcome) => outcome,
                // The store lost data (restored, flushed, no AOF): offer the
                // token held here, upwards only (the newest of the fleet's
                // wins), and refresh nothing now: a process's copy may hold a
                // refresh token another process already rotated. The next
                // refresh claims whatever the store then holds.
                Err(e @ CoordError::GenerationWentBack { .. }) => {
                    if let Some(token) = &stale {
                        let expires_at = self.core.expires_at(token);
                        self.store.reseed(g, token, expires_at).await?;
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(self.refused(e, g)),
            };
            let busy = match outcome {
                ClaimOutcome::Newer(snapshot) => return self.adopt(snapshot),
                ClaimOutcome::Claimed(claim) => return self.refresh_claimed(claim).await,
                ClaimOutcome::Busy(busy) => busy,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AuthError::Coordination(CoordError::Unavailable {
                    reason: "the process refreshing this credential did not finish in time".into(),
                }));
            }
            let snapshot = match self.store.wait(&busy, left).await {
                Ok(snapshot) => snapshot,
                Err(e) => return Err(self.refused(e, g)),
            };
            if snapshot.generation > g {
                return self.adopt(snapshot);
            }
            // Still `g`: the holder's refresh was lost (re-claimed within the
            // reuse grace, or the typed error), failed (cooling down), or
            // another holder took over: the claim says which.
        }
    }

    /// This process holds the claim: refresh with the claim's token, then
    /// tell the store how it went.
    async fn refresh_claimed(&self, mut claim: Claim<T>) -> Result<T, AuthError<E>> {
        // The refresh token read from the store at the claim.
        let stale = claim.take_token();
        let result = self
            .core
            .call_refresher(self.session, self.key, stale)
            .await;
        let generation = match &result {
            Ok(token) => Some(self.commit(claim, token).await),
            Err(RefreshError::Rejected(_)) => {
                // Signs the fleet out (unless another process took over).
                // If the store cannot be told, the claim is lost at its
                // lease's end: the same for the fleet.
                let _ = self.store.reject(claim).await;
                None
            }
            Err(RefreshError::Transient(_)) => {
                let _ = self.store.fail_transient(claim, self.core.cooldown).await;
                None
            }
        };
        self.core
            .record(self.session, self.key, self.base, &result, generation);
        result.map_err(AuthError::Refresh)
    }

    /// Commits a refreshed `token`; the generation it has here.
    ///
    /// The token is valid at the server whatever the store says, and its
    /// refresh token exists nowhere else: it is used here in every case.
    /// Store down: kept as a pending commit, sent from a thread of its own
    /// once the store is back. Fenced (a `sign_in`, or a grace re-claim by
    /// another process): the store holds another value, which the next
    /// refresh here adopts (`g` still claims it). Refused otherwise (denied,
    /// a damaged record): the fleet sees this refresh as lost at the lease's
    /// end.
    async fn commit(&self, claim: Claim<T>, token: &T) -> Generation {
        let g = claim.generation();
        let next = Generation::new(g.get() + 1);
        let expires_at = self.core.expires_at(token);
        match self.store.commit(claim, token, expires_at).await {
            Ok(Committed::Stored(g)) => g,
            Ok(Committed::Pending(g)) => {
                self.store.shared.flush_in_background();
                g
            }
            Err(CoordError::GenerationWentBack { .. }) => {
                match self.store.reseed(next, token, expires_at).await {
                    Ok(_) => next,
                    Err(_) => g,
                }
            }
            Err(_) => g,
        }
    }
}
