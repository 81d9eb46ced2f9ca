//! What a refresh, and a call through the [`TokenManager`](super::TokenManager),
//! can fail with.

use super::coord::CoordError;
use crate::sync::StdArc as Arc;
use std::error::Error;
use std::fmt;

/// Why a refresh failed, as the [refresher](super::TokenManager::new) reports it.
///
/// The distinction decides what happens next:
///
/// - [`Rejected`](Self::Rejected): the session is over (OAuth's
///   `invalid_grant`: the refresh token expired, was revoked, or was already
///   used). The manager signs out; no further refresh is attempted until
///   [`sign_in`](super::TokenManager::sign_in).
/// - [`Transient`](Self::Transient): this attempt failed for a passing reason
///   (network error, timeout, 5xx). The session is kept; a new attempt is
///   made only after the [cool-down](super::TokenManager::with_cooldown).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum RefreshError<E> {
    /// The server refused the refresh: the session is over.
    Rejected(E),
    /// The attempt failed; a later one may succeed.
    Transient(E),
}

impl<E> RefreshError<E> {
    /// Whether the session is over.
    pub fn is_rejected(&self) -> bool {
        matches!(self, RefreshError::Rejected(_))
    }

    /// The refresher's own error.
    pub fn inner(&self) -> &E {
        match self {
            RefreshError::Rejected(e) | RefreshError::Transient(e) => e,
        }
    }

    /// The refresher's own error, by value.
    pub fn into_inner(self) -> E {
        match self {
            RefreshError::Rejected(e) | RefreshError::Transient(e) => e,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for RefreshError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefreshError::Rejected(e) => f.debug_tuple("Rejected").field(e).finish(),
            RefreshError::Transient(e) => f.debug_tuple("Transient").field(e).finish(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for RefreshError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefreshError::Rejected(e) => write!(f, "token refresh rejected, session is over: {e}"),
            RefreshError::Transient(e) => write!(f, "token refresh failed: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> Error for RefreshError<E> {}

/// Shares a refresher's error: a manager whose error type is `Arc<E>` takes
/// a refresher that fails with `E`, through `?`. This is how an error that is
/// not `Clone` (`std::io::Error`, `reqwest::Error`) reaches every caller
/// waiting on the refresh (see [`TokenManager`](super::TokenManager)).
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use epochflight::auth::RefreshError;
///
/// let own: RefreshError<std::io::Error> = RefreshError::Transient(std::io::ErrorKind::TimedOut.into());
/// let shared: RefreshError<Arc<std::io::Error>> = own.into();
/// assert_eq!(shared.inner().kind(), std::io::ErrorKind::TimedOut);
/// ```
impl<E> From<RefreshError<E>> for RefreshError<Arc<E>> {
    fn from(error: RefreshError<E>) -> Self {
        match error {
            RefreshError::Rejected(e) => RefreshError::Rejected(Arc::new(e)),
            RefreshError::Transient(e) => RefreshError::Transient(Arc::new(e)),
        }
    }
}

/// Why a [`TokenManager`](super::TokenManager) call produced no response.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum AuthError<E> {
    /// The session is over (a refresh was [rejected](RefreshError::Rejected),
    /// or [`sign_out`](super::TokenManager::sign_out) was called). Returned at
    /// once, without any network call, until
    /// [`sign_in`](super::TokenManager::sign_in).
    SignedOut,
    /// The refresh this call needed failed. Every caller waiting on that
    /// refresh gets the same error; callers arriving within the cool-down
    /// after a transient failure get it too, without a new attempt.
    Refresh(RefreshError<E>),
    /// The store shared with other processes (a manager with a
    /// [coordinator](super::TokenManager::with_coordinator)) stopped this
    /// refresh before the refresher was called, or answered it with
    /// something other than a token:
    ///
    /// - [`CoordError::Unavailable`]: the store cannot be reached. A
    ///   refresh never runs without a claim, so a refresh that is needed now
    ///   fails at once; tokens already held keep working.
    /// - [`CoordError::Lost`]: another process's refresh was lost (it died
    ///   or stalled past its lease after sending it). Counts as signed out:
    ///   every call gets this, with no refresh, until a `sign_in` anywhere
    ///   in the fleet (or that holder's late commit).
    /// - [`CoordError::CoolingDown`]: a refresh failed transiently in
    ///   another process; no new attempt until its cool-down is over.
    /// - the store's faults: [`CoordError::Denied`], [`CoordError::Corrupt`],
    ///   [`CoordError::Codec`], [`CoordError::Config`] (a key that makes an
    ///   invalid credential name), [`CoordError::GenerationWentBack`] (when
    ///   re-seeding did not help), [`CoordError::Protocol`].
    ///
    /// (The fleet signed out, by `sign_out` or a rejected refresh anywhere,
    /// is [`SignedOut`](Self::SignedOut).) None of these carries token bytes.
    Coordination(CoordError),
}

impl<E: fmt::Debug> fmt::Debug for AuthError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::SignedOut => f.write_str("SignedOut"),
            AuthError::Refresh(e) => f.debug_tuple("Refresh").field(e).finish(),
            AuthError::Coordination(e) => f.debug_tuple("Coordination").field(e).finish(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for AuthError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::SignedOut => f.write_str("signed out: sign in again"),
            AuthError::Refresh(e) => e.fmt(f),
            AuthError::Coordination(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> Error for AuthError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            AuthError::Coordination(e) => Some(e),
            _ => None,
        }
    }
}

impl<E> From<CoordError> for AuthError<E> {
    /// The fleet signed out is [`AuthError::SignedOut`]; every other
    /// coordination error is [`AuthError::Coordination`].
    fn from(error: CoordError) -> Self {
        match error {
            CoordError::SignedOut => AuthError::SignedOut,
            error => AuthError::Coordination(error),
        }
    }
}

impl<E> From<RefreshError<E>> for AuthError<E> {
    fn from(error: RefreshError<E>) -> Self {
        AuthError::Refresh(error)
    }
}
