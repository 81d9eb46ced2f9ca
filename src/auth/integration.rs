//! What the HTTP integrations (the tower layer, the reqwest middleware) share:
//! how a token goes on a request, the marker that bypasses them, and the
//! note they leave on an unauthorized response they did not send again.

use crate::sync::StdArc as Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

/// A token that knows how to put itself on a request: what `AuthLayer::new`
/// (feature `tower`) and `AuthMiddleware::new` (feature `reqwest`) use to
/// attach the current token.
///
/// | token type | what [`apply`](Self::apply) does |
/// |---|---|
/// | `String`, `str`, `Arc<str>`, `Box<str>`, `&str` | sets `Authorization: Bearer <token>` |
/// | [`HeaderValue`] | sets `Authorization: <value>` as is (`Basic …`, `DPoP …`, …) |
/// | `()` | nothing: the credential travels on its own, like an HttpOnly cookie in the client's cookie store |
///
/// The header value is marked [sensitive](HeaderValue::set_sensitive), and
/// replaces any `Authorization` the request already had. A token that is not
/// a valid header value (it contains a control character) is not sent: the
/// request goes without `Authorization`, the server answers `401`, and the
/// token is refreshed.
///
/// Implement it for your own token type (which usually carries a refresh
/// token and an expiry as well), or give the layer or middleware a function
/// instead (`AuthLayer::with_attach`, `AuthMiddleware::with_attach`).
///
/// Available with the `http` feature.
///
/// # Examples
///
/// ```
/// use epochflight::auth::Credential;
/// use http::HeaderMap;
///
/// #[derive(Clone)]
/// struct Tokens { access: String, refresh: String }
///
/// impl Credential for Tokens {
///     fn apply(&self, headers: &mut HeaderMap) {
///         self.access.apply(headers); // Authorization: Bearer <access>
///     }
/// }
///
/// let mut headers = HeaderMap::new();
/// Tokens { access: "at-1".into(), refresh: "rt-1".into() }.apply(&mut headers);
/// assert_eq!(headers["authorization"], "Bearer at-1");
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub trait Credential {
    /// Puts this credential on a request's headers.
    fn apply(&self, headers: &mut HeaderMap);
}

/// `Authorization: Bearer <token>`, marked sensitive. A token that cannot be
/// a header value (it holds control characters) is not sent: the request
/// goes out without `Authorization`, and its `401` refreshes the token as an
/// expired one would. Never a panic.
impl Credential for str {
    fn apply(&self, headers: &mut HeaderMap) {
        match HeaderValue::try_from(format!("Bearer {self}")) {
            Ok(mut value) => {
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
            Err(_) => {
                headers.remove(AUTHORIZATION);
            }
        }
    }
}

impl Credential for String {
    fn apply(&self, headers: &mut HeaderMap) {
        self.as_str().apply(headers);
    }
}

impl Credential for HeaderValue {
    fn apply(&self, headers: &mut HeaderMap) {
        let mut value = self.clone();
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
}

/// Cookie mode: the client's cookie store carries the credential.
impl Credential for () {
    fn apply(&self, _headers: &mut HeaderMap) {}
}

impl<C: Credential + ?Sized> Credential for &C {
    fn apply(&self, headers: &mut HeaderMap) {
        (**self).apply(headers);
    }
}

impl<C: Credential + ?Sized> Credential for Box<C> {
    fn apply(&self, headers: &mut HeaderMap) {
        (**self).apply(headers);
    }
}

impl<C: Credential + ?Sized> Credential for Arc<C> {
    fn apply(&self, headers: &mut HeaderMap) {
        (**self).apply(headers);
    }
}

/// Marks a request that the auth layer or middleware must pass through
/// untouched: no wait at the request gate, no token attached, no refresh, no
/// replay.
///
/// **Mark the refresher's own request with it** when the refresher sends its
/// token request through the same layered service or middleware client. An
/// unmarked token request would wait at the request gate for the very
/// refresh it is part of: a deadlock (caught by nothing but your timeout).
/// The marker cannot be inferred: the layer sees a request, not which task
/// or refresh sent it.
///
/// - tower (`AuthLayer`): insert it into the request's extensions,
///   `request.extensions_mut().insert(SkipAuth)`.
/// - reqwest (`AuthMiddleware`): add it to the middleware extensions,
///   `client.post(url).with_extension(SkipAuth)`.
///
/// Also useful for requests to public endpoints that must not carry the
/// token.
///
/// Available with the `http` feature.
///
/// # Examples
///
/// ```
/// use epochflight::auth::SkipAuth;
///
/// let mut request = http::Request::post("http://auth.example/token").body(()).unwrap();
/// request.extensions_mut().insert(SkipAuth);
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SkipAuth;

/// Left in the extensions of an unauthorized response that the layer or
/// middleware returned instead of sending the request again.
///
/// The response is otherwise the server's own. Read it with
/// `response.extensions().get::<NotReplayed>()` (tower: `http::Response`;
/// reqwest: `reqwest::Response`). A response without it was either
/// authorized, or not classified as unauthorized (`403`,
/// `insufficient_scope`, …), or bypassed with [`SkipAuth`].
///
/// Available with the `http` feature.
///
/// # Examples
///
/// ```
/// use epochflight::auth::{NotReplayed, NotReplayedReason};
///
/// # let response = http::Response::new(());
/// match response.extensions().get::<NotReplayed>().map(|n| n.reason) {
///     Some(NotReplayedReason::BodyNotReplayable) => { /* rebuild the body, send again */ }
///     Some(NotReplayedReason::AlreadyReplayed) => { /* the new token was refused too */ }
///     Some(_) | None => {}
/// }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotReplayed {
    /// Why the request was not sent again.
    pub reason: NotReplayedReason,
}

impl NotReplayed {
    #[cfg(any(feature = "tower", feature = "reqwest", feature = "ureq"))]
    pub(crate) fn new(reason: NotReplayedReason) -> Self {
        Self { reason }
    }
}

/// Why an unauthorized response was returned instead of sending the request
/// again; see [`NotReplayed`].
///
/// Available with the `http` feature.
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotReplayedReason {
    /// The request's body is a stream that was consumed by the first attempt
    /// (tower: `ReplayBody::try_clone_body` returned `None`; reqwest:
    /// `reqwest::Request::try_clone` returned `None`).
    ///
    /// A refresh was still made (only if the token used was current) before
    /// this response was returned, so sending the request again with a new
    /// body uses the new token. If that refresh failed, the response's
    /// extensions also hold its `AuthError<E>`.
    BodyNotReplayable,
    /// This is the response to the replay: the request was sent again once
    /// with a new token, and that was refused too. Never a loop.
    AlreadyReplayed,
}

impl<R, X, E> super::retry::Exchanged<R, X, E>
where
    E: Send + Sync + 'static,
{
    /// The answer an HTTP integration returns, with what its caller should
    /// know in the response's extensions: why it was not sent again
    /// ([`NotReplayed`]) and the refresh's error, if that failed.
    pub(super) fn into_answer(
        self,
        extensions: impl Fn(&mut R) -> &mut http::Extensions,
    ) -> Result<R, X>
    where
        E: Clone,
    {
        use super::retry::Exchanged;
        let (sent, reason, failed) = match self {
            Exchanged::Answered(sent) => (sent, None, None),
            Exchanged::RefusedTwice(sent) => (sent, Some(NotReplayedReason::AlreadyReplayed), None),
            Exchanged::NotReplayable(sent, failed) => {
                (sent, Some(NotReplayedReason::BodyNotReplayable), failed)
            }
        };
        let mut response = sent?;
        if let Some(failed) = failed {
            extensions(&mut response).insert(failed);
        }
        if let Some(reason) = reason {
            extensions(&mut response).insert(NotReplayed::new(reason));
        }
        Ok(response)
    }
}
