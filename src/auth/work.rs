//! A credential's flight work: one refresh of a key's token, by the
//! refresher, or with a coordinator by the claim, refresh and commit of
//! `fleet.rs`; and what its result means for the key's session.

use std::future::Future;
use std::hash::Hash;

use super::AuthError;
use super::fleet;
use super::refresh::Core;
use super::session::{Session, count};
use super::wait::{RefreshPolls, Wait};
use crate::Epoch;
use crate::sync::Arc;

/// A flight's work: one call to the refresher for `key` (with a coordinator,
/// the claim, refresh, commit of [`fleet::refresh`]), and what its result
/// means for the key's session. `wait` says how its store calls wait.
pub(super) fn refresh<T, E, K>(
    core: Arc<Core<T, E, K>>,
    session: Arc<Session<E>>,
    key: K,
    seen: Epoch,
    wait: Wait,
) -> impl Future<Output = Result<T, AuthError<E>>> + Send + 'static
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let watched = session.clone();
    RefreshPolls::new(watched, async move {
        // Decided under the session lock, which orders this with `sign_in`,
        // `sign_out` and the recording of earlier results.
        let decided = session.locked(|session| {
            if session.is_signed_out() {
                // Signed out after this call was admitted: no network call.
                return Err(AuthError::SignedOut);
            }
            // Checked again here: a caller admitted just before a transient
            // failure was recorded must not make a new attempt inside the
            // cool-down.
            let cooling = session.cooling(core.cooldown).cloned();
            let shared = (session.generation(), session.fleet());
            Ok((core.flights.current(&key), cooling, shared))
        });
        let (stale, cooling, (generation, fleet)) = decided?;
        let base = stale.as_ref().map_or(Epoch::NONE, |s| s.epoch);
        if base > seen {
            // `sign_in` stored a newer token after this refresh was asked
            // for. Refreshing now would rotate the new session's refresh
            // token.
            return Ok(stale.expect("a newer epoch has a value").value);
        }
        if let Some(failure) = cooling {
            count(|c| &c.cooled_down, &session.counters, &core.counters);
            return Err(AuthError::Refresh(failure));
        }
        let stale = stale.map(|s| s.value);
        if core.coord.is_some() {
            let shared = fleet::Shared {
                generation,
                fleet,
                wait,
            };
            return fleet::refresh(&core, &session, key, base, stale, shared).await;
        }
        let result = core.call_refresher(&session, &key, stale).await;
        core.record(&session, &key, base, &result, None);
        result.map_err(AuthError::Refresh)
    })
}
