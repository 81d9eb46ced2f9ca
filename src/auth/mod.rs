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
//! # What is here
//!
//! | | |
//! |---|---|
//! | [`TokenManager<T, E>`](TokenManager) | one credential: the request gate [`token`](TokenManager::token), [`refresh_if_current`](TokenManager::refresh_if_current), [`send`](TokenManager::send), sign-in and sign-out, cool-down after failures, refresh ahead of expiry, hooks, counters; blocking twins |
//! | [`TokenManager<T, E, K>`](TokenManager::keyed) | one credential per key (tenant, scope, audience), each with all of the above: [`for_key`](TokenManager::for_key) gives a key's [`ForKey`] |
//! | [`RefreshError`], [`AuthError`] | what a refresh fails with (`Rejected` ends the session, `Transient` cools down), and what a call fails with; for an error type that is not `Clone`, the manager's error type is `Arc<E>` (see [`TokenManager`]) |
//! | [`Unauthorized`] | how `send` tells a `401` from a client's answer |
//! | [`coord`], [`TokenManager::with_coordinator`] | one refresh per expiry across processes and hosts: the managers of every process share the credential through a store (a directory on one host, feature `file-coordination`; Redis, feature `redis`) |
//! | `AuthLayer` (feature `tower`), `AuthMiddleware` (feature `reqwest`), `UreqAuthMiddleware` (feature `ureq`) | the same routine as `send` for tower services (hyper), reqwest-middleware clients and ureq agents, with a credential per request for a keyed manager |
//! | `classify`, `Credential`, `SkipAuth`, `NotReplayed` (feature `http`) | which `401`s a refresh can fix, how a token goes on a request, the marker for a refresher's own request, the note on a response that was not sent again |
//!
//! Every integration runs one routine: **gate** (wait for a refresh in
//! flight) → **attach** the token → **send** → **classify** the answer →
//! **refresh if current** (only if the token used is still the current
//! one) → **replay once**.
//!
//! **A `401` the manager cannot see is never refreshed.** Each integration
//! says which answers it can see: a client that turns a `401` into an error
//! must be recognized ([`Unauthorized`]'s impl for `Result` names the ones
//! that are), and the ureq middleware cannot read the challenge of a `401`
//! that ureq reported as an error.

use std::any::Any;

pub mod coord;
mod credential;
mod error;
mod fleet;
mod fleet_store;
mod manager;
mod refresh;
mod retry;
mod send;
mod session;
mod wait;
mod work;

#[cfg(feature = "http")]
mod classify;
#[cfg(feature = "http")]
mod integration;
#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "reqwest")]
mod middleware;
#[cfg(feature = "oauth2")]
pub mod oauth2;
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
/// `auth::classify`, feature `http`). Without the feature,
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
