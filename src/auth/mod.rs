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

pub mod coord;
mod error;
mod manager;

#[cfg(feature = "http")]
mod classify;
#[cfg(feature = "http")]
mod integration;
#[cfg(feature = "tower")]
mod layer;
#[cfg(feature = "reqwest")]
mod middleware;

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

/// Tells whether a response means "the credential was not accepted" (HTTP
/// `401`), the signal for [`TokenManager::send`] to refresh and retry once.
///
/// Implement it for your client's response type (or a wrapper of it).
pub trait Unauthorized {
    /// Whether the request was rejected for its credential.
    fn is_unauthorized(&self) -> bool;
}

/// A transport error is not an authorization failure: `Err` is never retried.
impl<R: Unauthorized, X> Unauthorized for Result<R, X> {
    fn is_unauthorized(&self) -> bool {
        matches!(self, Ok(response) if response.is_unauthorized())
    }
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
