//! The retry routine, the one place that knows the order of a request's
//! life: **gate → attach → send → classify → refresh if current → replay
//! once**.
//!
//! [`TokenManager::send`](super::TokenManager::send) and its blocking twin,
//! the tower layer, the reqwest middleware and the ureq middleware each
//! describe one request as an [`Exchange`] (how to send it with a token, how
//! to tell an unauthorized answer, whether it can be sent again) and hand it
//! to [`exchange`]. A blocking client runs the same routine with
//! [`Wait::Blocking`](super::wait::Wait).

use std::future::Future;
use std::hash::Hash;

use super::AuthError;
use super::credential::ForKey;
use super::wait::Wait;

/// Which attempt [`Exchange::send`] makes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Attempt {
    First,
    /// The one replay after a refresh.
    Replay,
}

/// One request, as a client sends it.
pub(super) trait Exchange<T> {
    /// What the client answers.
    type Response;
    /// How the client fails (transport errors; for some clients also
    /// statuses, see [`is_unauthorized`](Self::is_unauthorized)).
    type Error;

    /// Waits until the client can take the request (tower's `poll_ready`).
    fn ready(&mut self) -> impl Future<Output = Result<(), Self::Error>> {
        std::future::ready(Ok(()))
    }

    /// Attaches `token` to the request and sends it.
    fn send(
        &mut self,
        token: T,
        attempt: Attempt,
    ) -> impl Future<Output = Result<Self::Response, Self::Error>>;

    /// Whether the answer means "refresh the token and send again".
    fn is_unauthorized(&self, sent: &Result<Self::Response, Self::Error>) -> bool;

    /// Whether the request can be sent a second time (a copy of its body was
    /// kept before the first attempt).
    fn can_replay(&self) -> bool {
        true
    }
}

/// How a request went, when a token was there to send it.
pub(super) enum Exchanged<R, X, E> {
    /// The client's answer, not unauthorized (to the first attempt or to the
    /// replay), or its error.
    Answered(Result<R, X>),
    /// The replay was unauthorized too: never a third attempt.
    RefusedTwice(Result<R, X>),
    /// Unauthorized, and the request cannot be sent again. The token was
    /// refreshed first (if the one used was current), so the caller's own
    /// retry uses the new one; that refresh's error, if it failed.
    NotReplayable(Result<R, X>, Option<AuthError<E>>),
}

/// Runs one request through the routine.
///
/// # Errors
///
/// When there is no token to send it with: the gate failed (signed out, a
/// failed refresh, a cool-down), or the refresh after an unauthorized answer
/// failed (the answer is then dropped).
pub(super) async fn exchange<T, E, K, X>(
    credential: &ForKey<'_, T, E, K>,
    request: &mut X,
    wait: Wait,
) -> Result<Exchanged<X::Response, X::Error, E>, AuthError<E>>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    X: Exchange<T>,
{
    let token = credential.token_in(wait).await?;
    if let Err(error) = request.ready().await {
        return Ok(Exchanged::Answered(Err(error)));
    }
    let sent = request.send(token.value, Attempt::First).await;
    if !request.is_unauthorized(&sent) {
        return Ok(Exchanged::Answered(sent));
    }
    if !request.can_replay() {
        // Refresh anyway, so that the caller's own retry uses a new token.
        // The answer is returned whatever that refresh gives: never lost.
        let failed = credential.refresh_in(token.epoch, wait).await.err();
        return Ok(Exchanged::NotReplayable(sent, failed));
    }
    // Release the answer (and its connection) before waiting.
    drop(sent);
    let fresh = credential.refresh_in(token.epoch, wait).await?;
    if let Err(error) = request.ready().await {
        return Ok(Exchanged::Answered(Err(error)));
    }
    // Counted once the replay is really sent: not if the client was never
    // ready for it.
    credential.count_retry();
    let sent = request.send(fresh.value, Attempt::Replay).await;
    Ok(if request.is_unauthorized(&sent) {
        Exchanged::RefusedTwice(sent)
    } else {
        Exchanged::Answered(sent)
    })
}
