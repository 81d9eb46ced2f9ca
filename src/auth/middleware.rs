//! [`AuthMiddleware`]: `401 → refresh → retry` as a `reqwest-middleware`
//! middleware.

use crate::sync::StdArc as Arc;
use std::fmt;
use std::future::Future;
use std::hash::Hash;

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use super::retry::{Attempt, Exchange, exchange};
use super::wait::Wait;
use super::{Credential, SkipAuth, TokenManager, Unauthorized, classify};

type AttachFn<T> = dyn Fn(&T, &mut Request) + Send + Sync;
type ClassifyFn = dyn Fn(&Response) -> bool + Send + Sync;
type SelectFn<K> = dyn Fn(&Request, &Extensions) -> K + Send + Sync;

/// A [`reqwest_middleware::Middleware`] that authorizes every request with
/// the current token of a [`TokenManager`], and on an unauthorized response
/// refreshes it (only if the token used is still the current one) and sends
/// the request once more.
///
/// Per request:
///
/// 1. waits at the request gate ([`TokenManager::token`]): while a refresh is
///    in flight, requests wait for its token instead of going out with the
///    old one;
/// 2. attaches the token (by default with [`Credential`]: `Authorization:
///    Bearer <token>`, or nothing for `T = ()`, where the client's cookie
///    store carries the credential; or with your function, see
///    [`with_attach`](Self::with_attach)) and runs the rest of the chain;
/// 3. if the response is unauthorized (by default [`classify()`]: a `401` that
///    blames the token, never a `403` or an `insufficient_scope`; see
///    [`with_classifier`](Self::with_classifier)), drops it, calls
///    [`TokenManager::refresh_if_current`] with the epoch of the token it
///    used, and sends the request again with the new token **once**. The
///    response to the replay is returned whatever it is.
///
/// A storm of `401`s, late ones included, causes one refresh.
///
/// With a keyed [`TokenManager`] (one credential per tenant, scope or
/// audience), [`keyed`](Self::keyed) picks each request's credential from the
/// request and its middleware extensions
/// (`client.get(url).with_extension(tenant)`).
///
/// # Replay
///
/// - The request is copied with [`Request::try_clone`] before the token is
///   attached. A request whose body is a stream cannot be copied: it is sent
///   once, and its unauthorized response is returned as is, with
///   [`NotReplayed`](super::NotReplayed)`{ reason: `[`BodyNotReplayable`](super::NotReplayedReason::BodyNotReplayable)` }`
///   in [`Response::extensions`]. The token is still refreshed first (if the
///   one used was current), so sending it again with a new body uses the new
///   token; if that refresh failed, its [`AuthError`](super::AuthError) is
///   in the extensions too.
/// - **Non-idempotent methods are replayed too** (`POST`, `PATCH`, …): a
///   server that answers `401` rejected the request before acting on it.
///   If your server acts first and checks the token afterwards, classify its
///   responses yourself.
/// - An unauthorized response to the replay is returned with
///   [`NotReplayed`](super::NotReplayed)`{ reason: `[`AlreadyReplayed`](super::NotReplayedReason::AlreadyReplayed)` }`.
///
/// # The refresher's own request
///
/// If the refresher sends its token request through the same
/// `ClientWithMiddleware`, mark it with
/// `.with_extension(`[`SkipAuth`]`)`: an unmarked one would wait at the
/// request gate for the refresh it belongs to and never return.
///
/// # Errors
///
/// When there is no token to send (signed out, or the refresh failed; see
/// [`TokenManager::token`]), including the refresh after an unauthorized
/// response (whose response is then dropped), the request fails with
/// [`reqwest_middleware::Error::Middleware`] holding the
/// [`AuthError<E>`](super::AuthError). Match that variant first, then
/// downcast its `anyhow::Error`:
///
/// ```
/// use std::sync::Arc;
/// use epochflight::auth::{AuthError, AuthMiddleware, TokenManager};
///
/// # futures::executor::block_on(async {
/// let manager: Arc<TokenManager<String, String>> =
///     Arc::new(TokenManager::new_blocking(|_| Ok("t".into())));
/// manager.sign_out();
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(AuthMiddleware::new(manager))
///     .build();
/// // Signed out: the request fails at once, before anything is sent.
/// let error = client.get("http://api.invalid/items").send().await.unwrap_err();
/// match &error {
///     reqwest_middleware::Error::Middleware(inner) => {
///         match inner.downcast_ref::<AuthError<String>>() {
///             Some(AuthError::SignedOut) => { /* ask the user to log in again */ }
///             Some(AuthError::Refresh(failed)) => eprintln!("refresh failed: {failed}"),
///             Some(_) | None => eprintln!("{inner}"),
///         }
///     }
///     reqwest_middleware::Error::Reqwest(transport) => eprintln!("{transport}"),
/// }
/// # assert!(matches!(&error, reqwest_middleware::Error::Middleware(e)
/// #     if e.downcast_ref::<AuthError<String>>() == Some(&AuthError::SignedOut)));
/// # });
/// ```
///
/// # Cancel safety
///
/// Dropping the request's future drops the request in progress, or
/// withdraws from the request gate or the refresh it waits on, as
/// [`TokenManager::token`] describes: a refresh another caller waits on is
/// continued by that caller, not sent twice; one nobody waits on finishes on
/// the manager's spawner if it has one
/// ([`TokenManager::with_spawner`]).
///
/// Available with the `reqwest` feature.
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use epochflight::auth::{AuthMiddleware, RefreshError, SkipAuth, TokenManager};
/// use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
///
/// # async fn run() -> Result<(), reqwest_middleware::Error> {
/// let slot: Arc<std::sync::OnceLock<ClientWithMiddleware>> = Default::default();
/// let refresher_client = slot.clone();
/// let manager = Arc::new(TokenManager::new(move |_stale: Option<String>| {
///     let client = refresher_client.get().cloned().expect("client built");
///     async move {
///         // The token request goes through the same client: mark it.
///         let response = client
///             .post("https://auth.example/token")
///             .with_extension(SkipAuth)
///             .send()
///             .await
///             .map_err(|e| RefreshError::Transient(e.to_string()))?;
///         let token = response.text().await.map_err(|e| RefreshError::Transient(e.to_string()))?;
///         Ok::<_, RefreshError<String>>(token)
///     }
/// }));
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(AuthMiddleware::new(manager))
///     .build();
/// let _ = slot.set(client.clone());
///
/// let response = client.get("https://api.example/items").send().await?;
/// println!("{}", response.status());
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub struct AuthMiddleware<T, E, K = ()> {
    manager: Arc<TokenManager<T, E, K>>,
    select: Arc<SelectFn<K>>,
    attach: Arc<AttachFn<T>>,
    classify: Arc<ClassifyFn>,
}

impl<T, E> AuthMiddleware<T, E> {
    /// A middleware that attaches tokens with their [`Credential`] impl
    /// (`Authorization: Bearer <token>` for strings, nothing for `()`).
    pub fn new(manager: Arc<TokenManager<T, E>>) -> Self
    where
        T: Credential,
    {
        Self::with_attach(manager, |token: &T, request: &mut Request| {
            token.apply(request.headers_mut())
        })
    }

    /// A middleware that attaches tokens with `attach`, which gets the token
    /// and the request (a fresh copy for a replay, as the caller built it).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthMiddleware, TokenManager};
    ///
    /// let manager: Arc<TokenManager<String, String>> =
    ///     Arc::new(TokenManager::new_blocking(|_| Ok("k".into())));
    /// let middleware = AuthMiddleware::with_attach(manager, |key: &String, request: &mut reqwest::Request| {
    ///     request.headers_mut().insert("x-api-key", key.parse().unwrap());
    /// });
    /// # let _ = middleware;
    /// ```
    pub fn with_attach<F>(manager: Arc<TokenManager<T, E>>, attach: F) -> Self
    where
        F: Fn(&T, &mut Request) + Send + Sync + 'static,
    {
        Self::keyed_with_attach(manager, |_: &Request, _: &Extensions| (), attach)
    }
}

impl<T, E, K> AuthMiddleware<T, E, K> {
    /// A middleware over a keyed manager: `select` picks each request's key
    /// from the request and the middleware extensions, and the request is
    /// authorized with that key's credential (attached with its
    /// [`Credential`] impl).
    ///
    /// `select` runs once per request, before the request gate. Keys are
    /// credentials: map request data onto the set of keys you serve rather
    /// than passing it through unchecked (see [`TokenManager::keyed`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthMiddleware, RefreshError, TokenManager};
    ///
    /// #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    /// struct Tenant(String);
    ///
    /// # async fn run() -> Result<(), reqwest_middleware::Error> {
    /// let tenants = Arc::new(TokenManager::keyed(|tenant: Tenant, _stale: Option<String>| async move {
    ///     Ok::<_, RefreshError<String>>(format!("token-of-{}", tenant.0)) // this tenant's refresh
    /// }));
    /// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    ///     .with(AuthMiddleware::keyed(tenants, |_request, extensions| {
    ///         extensions.get::<Tenant>().cloned().unwrap_or(Tenant("default".into()))
    ///     }))
    ///     .build();
    /// let response = client
    ///     .get("https://api.example/items")
    ///     .with_extension(Tenant("acme".into()))
    ///     .send()
    ///     .await?;
    /// # let _ = response;
    /// # Ok(())
    /// # }
    /// ```
    pub fn keyed<F>(manager: Arc<TokenManager<T, E, K>>, select: F) -> Self
    where
        T: Credential,
        F: Fn(&Request, &Extensions) -> K + Send + Sync + 'static,
    {
        Self::keyed_with_attach(manager, select, |token: &T, request: &mut Request| {
            token.apply(request.headers_mut())
        })
    }

    /// A middleware over a keyed manager that picks each request's key with
    /// `select` (see [`keyed`](Self::keyed)) and attaches its token with
    /// `attach` (see [`with_attach`](AuthMiddleware::with_attach)).
    pub fn keyed_with_attach<F, A>(
        manager: Arc<TokenManager<T, E, K>>,
        select: F,
        attach: A,
    ) -> Self
    where
        F: Fn(&Request, &Extensions) -> K + Send + Sync + 'static,
        A: Fn(&T, &mut Request) + Send + Sync + 'static,
    {
        Self {
            manager,
            select: Arc::new(select),
            attach: Arc::new(attach),
            classify: Arc::new(|response: &Response| {
                classify(response.status(), response.headers()).is_refresh()
            }),
        }
    }

    /// Replaces the test for "unauthorized: refresh and send again", by
    /// default [`classify()`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthMiddleware, TokenManager};
    ///
    /// let manager: Arc<TokenManager<String, String>> =
    ///     Arc::new(TokenManager::new_blocking(|_| Ok("t".into())));
    /// // This API says "token expired" with a 419.
    /// let middleware = AuthMiddleware::new(manager)
    ///     .with_classifier(|response| response.status().as_u16() == 419);
    /// # let _ = middleware;
    /// ```
    pub fn with_classifier<F>(mut self, classifier: F) -> Self
    where
        F: Fn(&Response) -> bool + Send + Sync + 'static,
    {
        self.classify = Arc::new(classifier);
        self
    }

    /// The token manager.
    pub fn manager(&self) -> &Arc<TokenManager<T, E, K>> {
        &self.manager
    }
}

impl<T, E, K> Clone for AuthMiddleware<T, E, K> {
    fn clone(&self) -> Self {
        Self {
            manager: self.manager.clone(),
            select: self.select.clone(),
            attach: self.attach.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<T, E, K> fmt::Debug for AuthMiddleware<T, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthMiddleware").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl<T, E, K> Middleware for AuthMiddleware<T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + fmt::Debug + fmt::Display + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if extensions.get::<SkipAuth>().is_some() {
            return next.run(request, extensions).await;
        }
        let key = (self.select)(&request, extensions);
        let replay = request.try_clone();
        let mut request = Attempts {
            next,
            extensions,
            config: self,
            first: Some(request),
            replay,
        };
        let credential = self.manager.for_key(&key);
        exchange(&credential, &mut request, Wait::Async)
            .await
            .map_err(reqwest_middleware::Error::middleware)?
            .into_answer(reqwest::Response::extensions_mut)
    }
}

/// A request through the middleware, as the retry routine sends it: the
/// rest of the chain, the request as the caller built it, and its copy for a
/// replay.
struct Attempts<'a, 'n, T, E, K> {
    next: Next<'n>,
    extensions: &'a mut Extensions,
    config: &'a AuthMiddleware<T, E, K>,
    first: Option<Request>,
    replay: Option<Request>,
}

impl<T, E, K> Exchange<T> for Attempts<'_, '_, T, E, K> {
    type Response = Response;
    type Error = reqwest_middleware::Error;

    fn send(
        &mut self,
        token: T,
        attempt: Attempt,
    ) -> impl Future<Output = reqwest_middleware::Result<Response>> {
        let request = match attempt {
            Attempt::First => self.first.take(),
            Attempt::Replay => self.replay.take(),
        };
        let mut request = request.expect("each attempt is sent once");
        (self.config.attach)(&token, &mut request);
        self.next.clone().run(request, self.extensions)
    }

    fn is_unauthorized(&self, sent: &reqwest_middleware::Result<Response>) -> bool {
        matches!(sent, Ok(response) if (self.config.classify)(response))
    }

    fn can_replay(&self) -> bool {
        self.replay.is_some()
    }
}

/// A [`reqwest::Response`] is unauthorized when [`classify()`] says
/// [`Refresh`](super::Verdict::Refresh): a `401` that blames the token, not a
/// `403` nor an `insufficient_scope` `401`. With the blanket impl for
/// `Result`, `reqwest::Result<Response>` and
/// `reqwest_middleware::Result<Response>` work with
/// [`TokenManager::send`] as they are.
///
/// Available with the `reqwest` feature.
impl Unauthorized for Response {
    fn is_unauthorized(&self) -> bool {
        classify(self.status(), self.headers()).is_refresh()
    }
}
