//! [`ForKey::send`] and its blocking twin: a request given as a function of
//! the token, run through the retry routine (`retry.rs`).
//!
//! Here, not in `credential.rs`, so that the routine depends on the
//! credential and not the other way round.

use std::convert::Infallible;
use std::future::Future;
use std::hash::Hash;

#[cfg(doc)]
use super::TokenManager;
use super::retry::{Attempt, Exchange, Exchanged, exchange};
use super::wait::{self, Wait};
use super::{AuthError, ForKey, Unauthorized};

impl<T, E, K> ForKey<'_, T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Sends a request with this key's token and retries it once after a
    /// refresh if the response is unauthorized. See [`TokenManager::send`].
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token) and
    /// [`refresh_if_current`](Self::refresh_if_current). Transport errors are
    /// `f`'s own output, returned as is.
    ///
    /// # Cancel safety
    ///
    /// As [`TokenManager::send`].
    ///
    /// # Panics
    ///
    /// As [`TokenManager::token`].
    pub async fn send<F, Fut, R>(&self, f: F) -> Result<R, AuthError<E>>
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = R>,
        R: Unauthorized,
    {
        let sent = exchange(self, &mut AsyncCall(f), Wait::Async).await?;
        Ok(answer(sent))
    }

    /// Blocking [`send`](Self::send), for blocking HTTP clients.
    ///
    /// # Blocking
    ///
    /// Blocks the current thread for `f` and for any refresh; see
    /// [`TokenManager::token_blocking`].
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    ///
    /// # Panics
    ///
    /// As [`TokenManager::token_blocking`].
    pub fn send_blocking<F, R>(&self, f: F) -> Result<R, AuthError<E>>
    where
        F: FnMut(T) -> R,
        R: Unauthorized,
    {
        let sent = wait::blocking(exchange(self, &mut BlockingCall(f), Wait::Blocking))?;
        Ok(answer(sent))
    }
}

/// `send`'s answer: the response, whichever attempt gave it.
fn answer<R, E>(sent: Exchanged<R, Infallible, E>) -> R {
    let (Exchanged::Answered(Ok(response))
    | Exchanged::RefusedTwice(Ok(response))
    | Exchanged::NotReplayable(Ok(response), _)) = sent;
    response
}

/// `send`'s request: the user's function, called once per attempt.
struct AsyncCall<F>(F);

impl<T, F, Fut, R> Exchange<T> for AsyncCall<F>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = R>,
    R: Unauthorized,
{
    type Response = R;
    type Error = Infallible;

    fn send(&mut self, token: T, _: Attempt) -> impl Future<Output = Result<R, Infallible>> {
        let response = (self.0)(token);
        async move { Ok(response.await) }
    }

    fn is_unauthorized(&self, sent: &Result<R, Infallible>) -> bool {
        matches!(sent, Ok(response) if response.is_unauthorized())
    }
}

/// `send_blocking`'s request.
struct BlockingCall<F>(F);

impl<T, F, R> Exchange<T> for BlockingCall<F>
where
    F: FnMut(T) -> R,
    R: Unauthorized,
{
    type Response = R;
    type Error = Infallible;

    fn send(&mut self, token: T, _: Attempt) -> impl Future<Output = Result<R, Infallible>> {
        std::future::ready(Ok((self.0)(token)))
    }

    fn is_unauthorized(&self, sent: &Result<R, Infallible>) -> bool {
        matches!(sent, Ok(response) if response.is_unauthorized())
    }
}
