//! Epoch-checked `401 → refresh → retry` for any HTTP client.
//!
//! A [`TokenManager`] holds one credential (an access token, or `()` when
//! the client cannot read it, as with HttpOnly cookies) and the function that
//! refreshes it. [`TokenManager::send`] builds and sends a request with the
//! current token; if the response is unauthorized, it refreshes **only if the
//! token it used is still the current one** and sends the request once more.
//! A storm of `401`s, including late ones that arrive after the refresh
//! finished, causes exactly one refresh, so a rotating refresh token is never
//! presented twice.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use epochflight::auth::{RefreshError, TokenManager, Unauthorized};
//!
//! /// What the HTTP client returns; here a stand-in.
//! struct Response { status: u16 }
//! impl Unauthorized for Response {
//!     fn is_unauthorized(&self) -> bool { self.status == 401 }
//! }
//!
//! # futures::executor::block_on(async {
//! let refreshes = AtomicU32::new(0);
//! let manager = TokenManager::with_token(
//!     |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("fresh".to_string()) },
//!     "expired".to_string(),
//! );
//! let response = manager
//!     .send(|token| {
//!         // Build and send the request with `token` here.
//!         let status = if token == "fresh" { 200 } else { 401 };
//!         async move { Response { status } }
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(response.status, 200);
//! assert_eq!(manager.stats().refresh_calls, 1);
//! # let _ = refreshes.load(Ordering::SeqCst);
//! # });
//! ```
//!
//! For several credentials (one per tenant, say), use
//! [`SingleFlight`](crate::SingleFlight) directly with one key per credential.

use std::any::Any;

mod credential;
mod error;
mod manager;
mod refresh;
mod retry;
mod session;
mod wait;

#[cfg(feature = "http")]
mod classify;
#[cfg(feature = "http")]
mod integration;
#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "reqwest")]
mod middleware;
#[cfg(feature = "ureq")]
mod ureq_agent;

pub use credential::ForKey;
pub use error::{AuthError, RefreshError};
pub use manager::{AuthStats, DEFAULT_COOLDOWN, RefreshEvent, TokenManager};

#[cfg(feature = "http")]
pub use classify::{Verdict, classify, classify_response};
#[cfg(feature = "http")]
pub use integration::{Credential, NotReplayed, NotReplayedReason, SkipAuth};
#[cfg(feature = "tower")]
pub use layer::{
    AuthLayer, AuthService, NeverReplay, Replay, ReplayBody, ReplayBuffered, ReplayWith,
    ResponseFuture, ServiceError,
};
#[cfg(feature = "reqwest")]
pub use middleware::AuthMiddleware;
#[cfg(feature = "ureq")]
pub use ureq_agent::{AuthAgent, DEFAULT_REPLAY_LIMIT, UreqAuthMiddleware};

/// Tells whether a response means "the credential was not accepted" (HTTP
/// `401`), the signal for [`TokenManager::send`] to refresh and retry once.
///
/// Implement it for your client's response type (or a wrapper of it).
///
/// **A `401` the manager cannot see is never refreshed**: if your client
/// reports it as an error that is not recognized below, `send` returns it
/// as a transport error, and nothing refreshes. Either return the response
/// for a `401`, or wrap the client's result in a type of yours that says
/// what it is.
pub trait Unauthorized {
    /// Whether the request was rejected for its credential.
    fn is_unauthorized(&self) -> bool;
}

/// A client's result: `Ok` answers for itself; `Err` is a transport error,
/// never retried, **except** an error in which a client reports an HTTP `401`
/// status:
///
/// | client | error counted as unauthorized | feature |
/// |---|---|---|
/// | ureq 3 | `ureq::Error::StatusCode(401)` (`http_status_as_error`, ureq's default) | `ureq` |
/// | reqwest | a `reqwest::Error` whose `status()` is `401` (from `error_for_status`), also inside `reqwest_middleware::Error::Reqwest` | `reqwest` |
///
/// Such an error has lost the response's `WWW-Authenticate` header, so every
/// one of them counts, like a `401` without a challenge (see
/// [`classify`](crate::auth::classify), feature `http`). Without the feature,
/// the error is a transport error. Other clients' errors are not inspected.
impl<R: Unauthorized, X: 'static> Unauthorized for Result<R, X> {
    fn is_unauthorized(&self) -> bool {
        match self {
            Ok(response) => response.is_unauthorized(),
            Err(error) => status_error_is_unauthorized(error),
        }
    }
}

/// Whether a client's error is a `401` status reported as an error. The
/// type is known when `Result`'s impl is compiled for it: each check is a
/// comparison of type ids, resolved per error type.
fn status_error_is_unauthorized(error: &dyn Any) -> bool {
    #[cfg(feature = "ureq")]
    if let Some(error) = error.downcast_ref::<::ureq::Error>() {
        return matches!(error, ::ureq::Error::StatusCode(401));
    }
    #[cfg(feature = "reqwest")]
    {
        let unauthorized =
            |error: &::reqwest::Error| error.status() == Some(::reqwest::StatusCode::UNAUTHORIZED);
        if let Some(error) = error.downcast_ref::<::reqwest::Error>() {
            return unauthorized(error);
        }
        if let Some(::reqwest_middleware::Error::Reqwest(error)) =
            error.downcast_ref::<::reqwest_middleware::Error>()
        {
            return unauthorized(error);
        }
    }
    let _ = error;
    false
}

impl<R: Unauthorized + ?Sized> Unauthorized for Box<R> {
    fn is_unauthorized(&self) -> bool {
        (**self).is_unauthorized()
    }
}

impl<R: Unauthorized + ?Sized> Unauthorized for &R {
    fn is_unauthorized(&self) -> bool {
        (**self).is_unauthorized()
    }
}
