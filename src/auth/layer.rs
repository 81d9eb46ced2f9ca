//! [`AuthLayer`]: `401 → refresh → retry` as tower middleware, for any
//! [`Service`] over [`http`] requests (hyper-util's client,
//! `tower::ServiceBuilder` stacks).

use crate::sync::StdArc as Arc;
use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, request, response};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Either, Empty, Full, StreamBody};
use tower_layer::Layer;
use tower_service::Service;

use super::retry::{Attempt, Exchange, exchange};
use super::wait::Wait;
use super::{AuthError, Credential, SkipAuth, TokenManager, classify};

type AttachFn<T> = dyn Fn(&T, &mut request::Parts) + Send + Sync;
type ClassifyFn = dyn Fn(&response::Parts) -> bool + Send + Sync;
type SelectFn<K> = dyn Fn(&request::Parts) -> K + Send + Sync;

/// A tower [`Layer`] that authorizes every request with the current token of
/// a [`TokenManager`], and on an unauthorized response refreshes it (only if
/// the token used is still the current one) and sends the request once more.
///
/// Per request, the [`AuthService`] it builds:
///
/// 1. waits at the request gate ([`TokenManager::token`]): while a refresh is
///    in flight, requests wait for its token instead of going out with the
///    old one;
/// 2. attaches the token (by default with [`Credential`]: `Authorization:
///    Bearer <token>`, or nothing for `T = ()`; or with your function, see
///    [`with_attach`](Self::with_attach)) and calls the inner service;
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
/// audience), [`keyed`](Self::keyed) picks each request's credential from
/// its head (a header, the host, an extension your code inserted).
///
/// # Replay
///
/// - The request is rebuilt from its head as it was before the token was
///   attached, and a copy of its body taken before the first attempt
///   ([`ReplayBody`]). A body that cannot be copied (a stream) is sent once:
///   its unauthorized response is returned as is, with
///   [`NotReplayed`](super::NotReplayed)`{ reason: `[`BodyNotReplayable`](super::NotReplayedReason::BodyNotReplayable)` }`
///   in its extensions. The token is still refreshed first (if the one used
///   was current), so sending the request again with a new body uses the new
///   token; if that refresh failed, its [`AuthError`] is in the extensions
///   too.
/// - **Non-idempotent methods are replayed too** (`POST`, `PATCH`, …): a
///   server that answers `401` rejected the request before acting on it.
///   If your server acts first and checks the token afterwards, classify its
///   responses yourself.
/// - An unauthorized response to the replay is returned with
///   [`NotReplayed`](super::NotReplayed)`{ reason: `[`AlreadyReplayed`](super::NotReplayedReason::AlreadyReplayed)` }`.
///
/// # The refresher's own request
///
/// If the refresher sends its token request through this same layered
/// service, mark that request with [`SkipAuth`] (in its extensions): an
/// unmarked one would wait at the request gate for the refresh it belongs to
/// and never return.
///
/// # Errors
///
/// The service fails with [`ServiceError::Auth`] when there is no token to
/// send (signed out, or the refresh failed; see [`TokenManager::token`]),
/// including the refresh after an unauthorized response (whose response is
/// then dropped), and with [`ServiceError::Service`] when the inner service
/// fails.
///
/// Available with the `tower` feature.
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use std::sync::Arc;
/// use epochflight::auth::{AuthLayer, RefreshError, TokenManager};
/// use tower::{Layer, ServiceExt};
///
/// // Stands in for an HTTP client: accepts only "Bearer fresh".
/// let client = tower::service_fn(|request: http::Request<String>| async move {
///     let ok = request.headers()["authorization"] == "Bearer fresh";
///     let status = if ok { 200 } else { 401 };
///     Ok::<_, Infallible>(http::Response::builder().status(status).body(()).unwrap())
/// });
///
/// let manager = Arc::new(TokenManager::with_token(
///     |_stale: Option<String>| async { Ok::<_, RefreshError<String>>("fresh".to_string()) },
///     "expired".to_string(),
/// ));
/// let service = AuthLayer::new(manager.clone()).layer(client);
///
/// # futures::executor::block_on(async {
/// let request = http::Request::post("http://api.example/items").body("{}".to_string()).unwrap();
/// let response = service.oneshot(request).await.unwrap();
/// assert_eq!(response.status(), 200);
/// assert_eq!((manager.stats().refresh_calls, manager.stats().retries), (1, 1));
/// # });
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub struct AuthLayer<T, E, R = ReplayBuffered, K = ()> {
    manager: Arc<TokenManager<T, E, K>>,
    select: Arc<SelectFn<K>>,
    attach: Arc<AttachFn<T>>,
    classify: Arc<ClassifyFn>,
    replay: R,
}

impl<T, E> AuthLayer<T, E> {
    /// A layer that attaches tokens with their [`Credential`] impl
    /// (`Authorization: Bearer <token>` for strings, nothing for `()`).
    pub fn new(manager: Arc<TokenManager<T, E>>) -> Self
    where
        T: Credential,
    {
        Self::with_attach(manager, |token: &T, request: &mut request::Parts| {
            token.apply(&mut request.headers)
        })
    }

    /// A layer that attaches tokens with `attach`, which gets the token and
    /// the head of the request (before each attempt, so a replay starts from
    /// the head as the caller built it).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthLayer, TokenManager};
    ///
    /// #[derive(Clone)]
    /// struct ApiKey(String);
    ///
    /// let manager: Arc<TokenManager<ApiKey, String>> =
    ///     Arc::new(TokenManager::new_blocking(|_| Ok(ApiKey("k".into()))));
    /// let layer = AuthLayer::with_attach(manager, |key: &ApiKey, request: &mut http::request::Parts| {
    ///     if let Ok(value) = key.0.parse() {
    ///         request.headers.insert("x-api-key", value);
    ///     }
    /// });
    /// # let _ = layer;
    /// ```
    pub fn with_attach<F>(manager: Arc<TokenManager<T, E>>, attach: F) -> Self
    where
        F: Fn(&T, &mut request::Parts) + Send + Sync + 'static,
    {
        Self::keyed_with_attach(manager, |_: &request::Parts| (), attach)
    }
}

impl<T, E, K> AuthLayer<T, E, ReplayBuffered, K> {
    /// A layer over a keyed manager: `select` picks each request's key from
    /// its head, and the request is authorized with that key's credential
    /// (attached with its [`Credential`] impl).
    ///
    /// `select` runs once per request, before the request gate. Keys are
    /// credentials: map request data onto the set of keys you serve rather
    /// than passing it through unchecked (see [`TokenManager::keyed`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthLayer, RefreshError, TokenManager};
    /// use tower::{Layer, ServiceExt};
    ///
    /// /// Which tenant a request is for, put there by the caller.
    /// #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    /// struct Tenant(u32);
    ///
    /// let tenants = Arc::new(TokenManager::keyed(|tenant: Tenant, _stale: Option<String>| async move {
    ///     Ok::<_, RefreshError<String>>(format!("token-{}", tenant.0))
    /// }));
    /// let client = tower::service_fn(|request: http::Request<String>| async move {
    ///     let authorization = request.headers()["authorization"].to_str().unwrap().to_string();
    ///     Ok::<_, Infallible>(http::Response::new(authorization))
    /// });
    /// let service = AuthLayer::keyed(tenants.clone(), |head: &http::request::Parts| {
    ///     head.extensions.get::<Tenant>().copied().unwrap_or(Tenant(0))
    /// })
    /// .layer(client);
    ///
    /// # futures::executor::block_on(async {
    /// let mut request = http::Request::get("http://api.example/items").body(String::new()).unwrap();
    /// request.extensions_mut().insert(Tenant(7));
    /// let response = service.oneshot(request).await.unwrap();
    /// assert_eq!(response.body(), "Bearer token-7");
    /// assert_eq!(tenants.for_key(&Tenant(7)).stats().refresh_calls, 1);
    /// # });
    /// ```
    pub fn keyed<F>(manager: Arc<TokenManager<T, E, K>>, select: F) -> Self
    where
        T: Credential,
        F: Fn(&request::Parts) -> K + Send + Sync + 'static,
    {
        Self::keyed_with_attach(
            manager,
            select,
            |token: &T, request: &mut request::Parts| token.apply(&mut request.headers),
        )
    }

    /// A layer over a keyed manager that picks each request's key with
    /// `select` (see [`keyed`](Self::keyed)) and attaches its token with
    /// `attach` (see [`with_attach`](AuthLayer::with_attach)).
    pub fn keyed_with_attach<F, A>(
        manager: Arc<TokenManager<T, E, K>>,
        select: F,
        attach: A,
    ) -> Self
    where
        F: Fn(&request::Parts) -> K + Send + Sync + 'static,
        A: Fn(&T, &mut request::Parts) + Send + Sync + 'static,
    {
        Self {
            manager,
            select: Arc::new(select),
            attach: Arc::new(attach),
            classify: Arc::new(|head: &response::Parts| {
                classify(head.status, &head.headers).is_refresh()
            }),
            replay: ReplayBuffered,
        }
    }
}

impl<T, E, R, K> AuthLayer<T, E, R, K> {
    /// Never replays: for any body type, including ones this crate cannot
    /// implement [`ReplayBody`] for (tonic's, hyper's `Incoming`, axum's).
    /// An unauthorized response is returned with
    /// [`NotReplayed`](super::NotReplayed)`{ reason: `[`BodyNotReplayable`](super::NotReplayedReason::BodyNotReplayable)` }`,
    /// after the token was refreshed, so the caller's own retry uses the new
    /// token.
    ///
    /// For gRPC, pair it with a classifier: tonic reports `UNAUTHENTICATED`
    /// as `grpc-status: 16` on an HTTP 200, e.g.
    /// `.with_classifier(|head| head.headers.get("grpc-status").is_some_and(|s| s == "16"))`.
    pub fn never_replay(self) -> AuthLayer<T, E, NeverReplay, K> {
        self.replay_policy(NeverReplay)
    }

    /// Replays with `copy`, which makes a copy of a body to send again, or
    /// `None` if it cannot. For body types that do not implement
    /// [`ReplayBody`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthLayer, TokenManager};
    ///
    /// /// A body type from another crate, say.
    /// struct Payload(bytes::Bytes);
    ///
    /// let manager: Arc<TokenManager<String, String>> =
    ///     Arc::new(TokenManager::new_blocking(|_| Ok("t".into())));
    /// let layer = AuthLayer::new(manager).replay_with(|body: &Payload| Some(Payload(body.0.clone())));
    /// # let _ = layer;
    /// ```
    pub fn replay_with<B, F>(self, copy: F) -> AuthLayer<T, E, ReplayWith<F>, K>
    where
        F: Fn(&B) -> Option<B> + Send + Sync + 'static,
    {
        self.replay_policy(ReplayWith(Arc::new(copy)))
    }

    fn replay_policy<P>(self, replay: P) -> AuthLayer<T, E, P, K> {
        AuthLayer {
            manager: self.manager,
            select: self.select,
            attach: self.attach,
            classify: self.classify,
            replay,
        }
    }

    /// Replaces the test for "unauthorized: refresh and send again", by
    /// default [`classify()`]. It gets the head of each response.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{AuthLayer, TokenManager};
    ///
    /// let manager: Arc<TokenManager<String, String>> =
    ///     Arc::new(TokenManager::new_blocking(|_| Ok("t".into())));
    /// // This API says "token expired" with a 419.
    /// let layer = AuthLayer::new(manager).with_classifier(|head| head.status.as_u16() == 419);
    /// # let _ = layer;
    /// ```
    pub fn with_classifier<F>(mut self, classifier: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.classify = Arc::new(classifier);
        self
    }

    /// The token manager.
    pub fn manager(&self) -> &Arc<TokenManager<T, E, K>> {
        &self.manager
    }
}

impl<T, E, R: Clone, K> Clone for AuthLayer<T, E, R, K> {
    fn clone(&self) -> Self {
        Self {
            manager: self.manager.clone(),
            select: self.select.clone(),
            attach: self.attach.clone(),
            classify: self.classify.clone(),
            replay: self.replay.clone(),
        }
    }
}

impl<T, E, R, K> fmt::Debug for AuthLayer<T, E, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer").finish_non_exhaustive()
    }
}

impl<S, T, E, R: Clone, K> Layer<S> for AuthLayer<T, E, R, K> {
    type Service = AuthService<S, T, E, R, K>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// The [`Service`] an [`AuthLayer`] wraps around an inner service; see
/// [`AuthLayer`] for what it does.
///
/// Readiness: `poll_ready` is always ready; each call clones the inner
/// service and polls *that* ready after the request gate, before each attempt.
/// A reservation of the inner service (a `ConcurrencyLimit` permit, a
/// `Buffer` slot) is therefore never held while a request waits for a
/// refresh, which may itself need one (a refresher sending through the same
/// stack with [`SkipAuth`]). The cost: the inner service's
/// backpressure shows in the response future, not in this `poll_ready`. The
/// inner service must be [`Clone`] (hyper-util's client and
/// `tower::buffer::Buffer` are).
///
/// Available with the `tower` feature.
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub struct AuthService<S, T, E, R = ReplayBuffered, K = ()> {
    inner: S,
    config: Arc<AuthLayer<T, E, R, K>>,
}

impl<S, T, E, R, K> AuthService<S, T, E, R, K> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The token manager.
    pub fn manager(&self) -> &Arc<TokenManager<T, E, K>> {
        &self.config.manager
    }
}

impl<S: Clone, T, E, R, K> Clone for AuthService<S, T, E, R, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, T, E, R, K> fmt::Debug for AuthService<S, T, E, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, T, E, R, K, B, ResBody> Service<Request<B>> for AuthService<S, T, E, R, K>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Replay<B> + Send + Sync + 'static,
    ResBody: Send + 'static,
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Response = Response<ResBody>;
    type Error = ServiceError<S::Error, E>;
    type Future = ResponseFuture<Response<ResBody>, ServiceError<S::Error, E>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the inner service is awaited in the future, after the
        // request gate: a reservation (permit, buffer slot) must not be held
        // while waiting for a refresh that may need one itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        if request.extensions().get::<SkipAuth>().is_some() {
            return ResponseFuture::new(async move {
                std::future::poll_fn(|cx| inner.poll_ready(cx))
                    .await
                    .map_err(ServiceError::Service)?;
                inner.call(request).await.map_err(ServiceError::Service)
            });
        }
        ResponseFuture::new(authorized(inner, self.config.clone(), request))
    }
}

/// One request through the layer: the retry routine with this service as
/// the client, and the notes an unreplayed response carries.
async fn authorized<S, T, E, R, K, B, ResBody>(
    inner: S,
    config: Arc<AuthLayer<T, E, R, K>>,
    request: Request<B>,
) -> Result<Response<ResBody>, ServiceError<S::Error, E>>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    R: Replay<B>,
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let (head, body) = request.into_parts();
    let key = (config.select)(&head);
    let replay = config
        .replay
        .try_copy(&body)
        .map(|copy| (head.clone(), copy));
    let mut request = Attempts {
        inner,
        config: &config,
        first: Some((head, body)),
        replay,
    };
    let credential = config.manager.for_key(&key);
    let exchanged = exchange(&credential, &mut request, Wait::Async).await?;
    let (head, body) = exchanged
        .into_answer(|(head, _)| &mut head.extensions)
        .map_err(ServiceError::Service)?;
    Ok(Response::from_parts(head, body))
}

/// A request through the layer, as the retry routine sends it: the inner
/// service, the request as the caller built it, and its copy for a replay.
struct Attempts<'a, S, T, E, R, K, B> {
    inner: S,
    config: &'a AuthLayer<T, E, R, K>,
    first: Option<(request::Parts, B)>,
    replay: Option<(request::Parts, B)>,
}

impl<S, T, E, R, K, B, ResBody> Exchange<T> for Attempts<'_, S, T, E, R, K, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = (response::Parts, ResBody);
    type Error = S::Error;

    fn ready(&mut self) -> impl Future<Output = Result<(), S::Error>> {
        std::future::poll_fn(|cx| self.inner.poll_ready(cx))
    }

    fn send(
        &mut self,
        token: T,
        attempt: Attempt,
    ) -> impl Future<Output = Result<Self::Response, S::Error>> {
        let copy = match attempt {
            Attempt::First => self.first.take(),
            Attempt::Replay => self.replay.take(),
        };
        let (mut head, body) = copy.expect("each attempt is sent once");
        (self.config.attach)(&token, &mut head);
        let response = self.inner.call(Request::from_parts(head, body));
        async move { Ok(response.await?.into_parts()) }
    }

    fn is_unauthorized(&self, sent: &Result<Self::Response, S::Error>) -> bool {
        matches!(sent, Ok((head, _)) if (self.config.classify)(head))
    }

    fn can_replay(&self) -> bool {
        self.replay.is_some()
    }
}

/// The future of an [`AuthService`] call: the response, or why there is
/// none.
///
/// It is `Send` and `'static` (the service requires its inputs to be).
///
/// # Cancel safety
///
/// Dropping it drops the request in progress (first attempt or replay), or
/// withdraws from the request gate or the refresh it waits on, as
/// [`TokenManager::token`] describes: a refresh another caller waits on is
/// continued by that caller, not sent twice; one nobody waits on finishes on
/// the manager's spawner if it has one
/// ([`TokenManager::with_spawner`]).
///
/// Available with the `tower` feature.
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub struct ResponseFuture<R, X> {
    inner: Pin<Box<dyn Future<Output = Result<R, X>> + Send>>,
}

impl<R, X> ResponseFuture<R, X> {
    fn new(future: impl Future<Output = Result<R, X>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<R, X> Future for ResponseFuture<R, X> {
    type Output = Result<R, X>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R, X> fmt::Debug for ResponseFuture<R, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Why an [`AuthService`] call produced no response.
///
/// Its `Display` and `source` are those of the error it holds.
///
/// Available with the `tower` feature.
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceError<S, E> {
    /// No token to send: signed out, or the refresh failed (see
    /// [`TokenManager::token`]).
    Auth(AuthError<E>),
    /// The inner service failed.
    Service(S),
}

impl<S, E> From<AuthError<E>> for ServiceError<S, E> {
    fn from(error: AuthError<E>) -> Self {
        ServiceError::Auth(error)
    }
}

impl<S: fmt::Display, E: fmt::Display> fmt::Display for ServiceError<S, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceError::Auth(e) => e.fmt(f),
            ServiceError::Service(e) => e.fmt(f),
        }
    }
}

/// `S` needs only `Debug + Display`, so that an inner `BoxError` (what most
/// tower middleware returns, and which is not itself an `Error`) works, and
/// this layer can sit under `Timeout` or `Buffer`. The inner error's message
/// is in this error's `Display`.
impl<S, E> Error for ServiceError<S, E>
where
    S: fmt::Debug + fmt::Display,
    E: fmt::Debug + fmt::Display + 'static,
{
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ServiceError::Auth(e) => e.source(),
            ServiceError::Service(_) => None,
        }
    }
}

/// How an [`AuthService`] copies a request body to send it again; chosen on
/// the layer: [`ReplayBuffered`] (the default), [`NeverReplay`]
/// ([`AuthLayer::never_replay`]) or [`ReplayWith`]
/// ([`AuthLayer::replay_with`]).
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub trait Replay<B> {
    /// A copy of `body` to send again, or `None` if it cannot be copied.
    fn try_copy(&self, body: &B) -> Option<B>;
}

/// Replays bodies that implement [`ReplayBody`] (buffered ones); the default.
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayBuffered;

impl<B: ReplayBody> Replay<B> for ReplayBuffered {
    fn try_copy(&self, body: &B) -> Option<B> {
        body.try_clone_body()
    }
}

/// Never replays; works with any body type. See [`AuthLayer::never_replay`].
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct NeverReplay;

impl<B> Replay<B> for NeverReplay {
    fn try_copy(&self, _body: &B) -> Option<B> {
        None
    }
}

/// Replays with a function of yours. See [`AuthLayer::replay_with`].
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub struct ReplayWith<F>(Arc<F>);

impl<F> Clone for ReplayWith<F> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<F> fmt::Debug for ReplayWith<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWith").finish_non_exhaustive()
    }
}

impl<B, F: Fn(&B) -> Option<B>> Replay<B> for ReplayWith<F> {
    fn try_copy(&self, body: &B) -> Option<B> {
        (self.0)(body)
    }
}
/// A request body that can be copied before it is sent, so that the request
/// can be sent again after a refresh.
///
/// Implemented for the buffered bodies ([`Full`], [`Empty`], `String`,
/// `Vec<u8>`, [`Bytes`], `&'static str`, `&'static [u8]`, `Cow<'static, _>`,
/// `()`, and [`Either`] of two such), and, returning `None`, for streaming
/// ones ([`StreamBody`], [`BoxBody`], [`UnsyncBoxBody`]). A request whose
/// body returns `None` is sent once; see [`NotReplayed`](super::NotReplayed).
///
/// Implement it for your own body type. For a foreign body type you cannot
/// implement it for (hyper's `Incoming`, say), box the body
/// (`BodyExt::boxed`) to send it without replay, or collect it into a
/// [`Full`] first.
///
/// Available with the `tower` feature.
///
/// # Examples
///
/// ```
/// use bytes::Bytes;
/// use epochflight::auth::ReplayBody;
///
/// /// An upload: either in memory, or streamed from disk.
/// enum Upload { Memory(Bytes), File(std::path::PathBuf) }
///
/// impl ReplayBody for Upload {
///     fn try_clone_body(&self) -> Option<Self> {
///         match self {
///             Upload::Memory(bytes) => Some(Upload::Memory(bytes.clone())),
///             Upload::File(_) => None, // sent once; a 401 comes back as is
///         }
///     }
/// }
/// # let _ = Upload::File("x".into()).try_clone_body();
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub trait ReplayBody: Sized {
    /// A copy of the body, to send again; `None` if it cannot be copied.
    fn try_clone_body(&self) -> Option<Self>;
}

macro_rules! replay_by_clone {
    ($($body:ty),* $(,)?) => {$(
        impl ReplayBody for $body {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

replay_by_clone!(
    (),
    String,
    Vec<u8>,
    Bytes,
    &'static str,
    &'static [u8],
    Cow<'static, str>,
    Cow<'static, [u8]>,
);

impl<D: Clone> ReplayBody for Full<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayBody for Empty<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl<L: ReplayBody, R: ReplayBody> ReplayBody for Either<L, R> {
    fn try_clone_body(&self) -> Option<Self> {
        match self {
            Either::Left(body) => body.try_clone_body().map(Either::Left),
            Either::Right(body) => body.try_clone_body().map(Either::Right),
        }
    }
}

/// Never replayable: a stream is consumed by the first attempt.
impl<S> ReplayBody for StreamBody<S> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

/// Never replayable: what it boxes may be a stream.
impl<D, X> ReplayBody for BoxBody<D, X> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

/// Never replayable: what it boxes may be a stream.
impl<D, X> ReplayBody for UnsyncBoxBody<D, X> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}
