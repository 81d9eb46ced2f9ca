//! A ready refresher for the OAuth 2 refresh-token grant (RFC 6749 §6),
//! built on the [`oauth2`] crate's request, response and error
//! types.
//!
//! [`OAuth2Refresher`] sends `grant_type=refresh_token` to the token
//! endpoint and gives [`TokenManager`] an [`OAuth2Token`]: the access token
//! with the *rotating refresh token inside it*, so the refresher always
//! presents exactly the refresh token of the token it refreshes (never one
//! kept aside), and the server's `expires_in` as an expiry the manager
//! refreshes ahead of. Its error, [`OAuth2Error`], decides between
//! [`RefreshError::Rejected`] (the session is over: `invalid_grant` and the
//! like; the manager signs out) and [`RefreshError::Transient`] (network,
//! `5xx`, `429`; the session is kept). No token ever shows in `Debug`.
//!
//! HTTP goes through the `oauth2` crate's own traits,
//! [`AsyncHttpClient`] and [`SyncHttpClient`], implemented here for
//! reqwest 0.13 ([`ReqwestClient`], feature `reqwest`) and ureq 3
//! ([`UreqAgent`], feature `ureq`); any other implementation works too
//! (the `oauth2` crate implements them for closures).
//!
//! Available with the `oauth2` feature.
//!
//! # Examples
//!
//! A login gave a token; the manager then keeps it fresh. Here the HTTP
//! client is a closure that stands in for the token endpoint:
//!
//! ```
//! use epochflight::auth::oauth2::{
//!     AccessToken, ClientId, HttpRequest, HttpResponse, OAuth2Refresher, OAuth2Token,
//!     RefreshToken, TokenUrl,
//! };
//!
//! // The token endpoint: rotates "rt-1" into a new pair.
//! let token_endpoint = |request: HttpRequest| async move {
//!     let form = String::from_utf8(request.body().clone()).unwrap();
//!     assert!(form.contains("grant_type=refresh_token&refresh_token=rt-1"));
//!     let body = br#"{"access_token":"at-2","refresh_token":"rt-2","token_type":"Bearer","expires_in":3600}"#;
//!     let mut response = HttpResponse::new(body.to_vec());
//!     response.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!     Ok::<_, std::io::Error>(response)
//! };
//!
//! let manager = OAuth2Refresher::new(
//!     token_endpoint,
//!     ClientId::new("my-app".into()),
//!     TokenUrl::new("https://auth.example/token".into()).unwrap(),
//! )
//! .manager();
//! // From the login:
//! let login = OAuth2Token::new(AccessToken::new("at-1".into()))
//!     .with_refresh_token(RefreshToken::new("rt-1".into()));
//! let epoch = manager.sign_in(login);
//!
//! # futures::executor::block_on(async {
//! // The API answered 401 to "at-1": refresh, unless someone already did.
//! let fresh = manager.refresh_if_current(epoch).await.unwrap();
//! assert_eq!(fresh.value.access_token().secret(), "at-2");
//! assert_eq!(fresh.value.refresh_token().unwrap().secret(), "rt-2"); // rotated, inside the token
//! assert!(fresh.value.expires_at().is_some()); // refreshed ahead of it from now on
//! # });
//! ```

mod error;
mod http_clients;
mod token;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ::oauth2::basic::BasicClient;
use ::oauth2::http::StatusCode;
use ::oauth2::{EndpointNotSet, EndpointSet};

use super::{RefreshError, TokenManager};
use crate::sync::{Mutex, StdArc as Arc};

pub use self::error::{OAuth2Error, OAuth2ErrorKind};
#[cfg(feature = "reqwest")]
pub use self::http_clients::ReqwestClient;
#[cfg(feature = "ureq")]
pub use self::http_clients::UreqAgent;
pub use self::token::OAuth2Token;
pub use ::oauth2::basic::{BasicErrorResponse, BasicErrorResponseType, BasicTokenResponse};
pub use ::oauth2::{
    AccessToken, AsyncHttpClient, AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse,
    RefreshToken, Scope, SyncHttpClient, TokenUrl,
};

/// How long before its expiry a token is refreshed ahead by
/// [`OAuth2Refresher::manager`], unless set with
/// [`OAuth2Refresher::refresh_ahead`].
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(30);

/// What a refresh gives the manager.
pub type OAuth2Result = Result<OAuth2Token, RefreshError<OAuth2Error>>;

/// The future of [`OAuth2Refresher::into_refresh_fn`]'s function.
pub type RefreshFuture = Pin<Box<dyn Future<Output = OAuth2Result> + Send>>;

/// An `oauth2` client with its token endpoint set.
type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// The refresh-token grant (RFC 6749 §6) as a [`TokenManager`] refresher,
/// over an HTTP client `C` that implements the `oauth2` crate's
/// [`AsyncHttpClient`] (for [`manager`](Self::manager)) or
/// [`SyncHttpClient`] (for [`blocking_manager`](Self::blocking_manager)).
///
/// Each refresh presents the refresh token of the token being refreshed
/// (the stale token the manager hands over; for the very first refresh,
/// the one given to [`refresh_token`](Self::refresh_token)), with the
/// configured [scopes](Self::scopes) and client authentication, and turns
/// the answer into an [`OAuth2Token`]:
///
/// - a new refresh token in the response replaces the old one; a response
///   without one keeps the old one (RFC 6749 §6: the server *may* rotate);
/// - `expires_in` becomes [`OAuth2Token::expires_at`], counted from when
///   the request was sent;
/// - a response without `scope` keeps the requested scopes, or the
///   previous token's if none were requested.
///
/// A failure is an [`OAuth2Error`], reported as
/// [`Rejected`](RefreshError::Rejected) or
/// [`Transient`](RefreshError::Transient) by the rules on that type.
///
/// # Examples
///
/// See the [module](self) docs, and [`ReqwestClient`] (feature `reqwest`)
/// for a refresher behind [`AuthMiddleware`](crate::auth::AuthMiddleware).
pub struct OAuth2Refresher<C> {
    http: C,
    client: TokenClient,
    /// Kept to redact it from error text (the client holds its own copy).
    client_secret: Option<ClientSecret>,
    scopes: Vec<Scope>,
    first_refresh_token: Option<RefreshToken>,
    refresh_ahead: Duration,
}

impl<C> OAuth2Refresher<C> {
    /// A refresher for the client `client_id` of the authorization server
    /// whose token endpoint is `token_url`, sending its requests with
    /// `http`. A public client (no secret) sends its `client_id` in the
    /// request body.
    pub fn new(http: C, client_id: ClientId, token_url: TokenUrl) -> Self {
        Self {
            http,
            client: BasicClient::new(client_id).set_token_uri(token_url),
            client_secret: None,
            scopes: Vec::new(),
            first_refresh_token: None,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
        }
    }

    /// Authenticates the client with `secret`: in an `Authorization: Basic`
    /// header by default (RFC 6749 §2.3.1), or in the request body with
    /// [`auth_type`](Self::auth_type)`(AuthType::RequestBody)`.
    pub fn client_secret(mut self, secret: ClientSecret) -> Self {
        self.client = self.client.set_client_secret(secret.clone());
        self.client_secret = Some(secret);
        self
    }

    /// Where the client credentials go: [`AuthType::BasicAuth`] (the
    /// default) or [`AuthType::RequestBody`] (`client_id` and
    /// `client_secret` as form fields, for servers that do not accept
    /// Basic authentication).
    pub fn auth_type(mut self, auth_type: AuthType) -> Self {
        self.client = self.client.set_auth_type(auth_type);
        self
    }

    /// Asks for `scopes` on every refresh (RFC 6749 §6: at most the scopes
    /// originally granted). Without, the server keeps the original scope.
    pub fn scopes(mut self, scopes: impl IntoIterator<Item = Scope>) -> Self {
        self.scopes = scopes.into_iter().collect();
        self
    }

    /// The refresh token for a refresh with no stale token (the first call
    /// to a manager that has no token yet), e.g. one saved by an earlier
    /// run. Later refreshes present the refresh token of the token they
    /// refresh. Without it, such a refresh is
    /// [`Rejected`](RefreshError::Rejected) with
    /// [`OAuth2ErrorKind::NoRefreshToken`]: sign in with a token first.
    pub fn refresh_token(mut self, refresh_token: RefreshToken) -> Self {
        self.first_refresh_token = Some(refresh_token);
        self
    }

    /// How long before its expiry [`manager`](Self::manager) and
    /// [`blocking_manager`](Self::blocking_manager) refresh a token ahead
    /// (one caller refreshes while the others keep using it). Default
    /// [`DEFAULT_REFRESH_AHEAD`] (30 s). Keep it well under the tokens'
    /// lifetime: a token that is always inside the window is refreshed
    /// ahead each time it is used.
    pub fn refresh_ahead(mut self, window: Duration) -> Self {
        self.refresh_ahead = window;
        self
    }

    /// The refresh token to present for `stale`.
    fn refresh_token_for<'a>(
        &'a self,
        stale: Option<&'a OAuth2Token>,
    ) -> Result<&'a RefreshToken, RefreshError<OAuth2Error>> {
        let presented = match stale {
            Some(stale) => stale.refresh_token(),
            None => self.first_refresh_token.as_ref(),
        };
        presented.ok_or_else(|| RefreshError::Rejected(OAuth2Error::no_refresh_token()))
    }

    /// Turns the `oauth2` crate's answer into the manager's.
    fn finish<RE>(
        &self,
        answer: Result<BasicTokenResponse, ::oauth2::basic::BasicRequestTokenError<RE>>,
        sent: Sent<'_>,
        stale: Option<&OAuth2Token>,
    ) -> OAuth2Result
    where
        RE: std::error::Error + Send + Sync + 'static,
    {
        match answer {
            Ok(response) => Ok(OAuth2Token::received(&response, sent.at).carry_over(
                sent.refresh_token,
                stale,
                &self.scopes,
            )),
            Err(error) => {
                let mut secrets = vec![sent.refresh_token.secret().as_str()];
                if let Some(secret) = &self.client_secret {
                    secrets.push(secret.secret());
                }
                let status = *sent.status.lock();
                Err(OAuth2Error::from_request_error(error, status, &secrets).into_refresh_error())
            }
        }
    }
}

/// One token request on its way: what it presented, when it left, and the
/// status it got (if it got an answer), which the `oauth2` crate's error
/// does not keep.
struct Sent<'a> {
    refresh_token: &'a RefreshToken,
    at: Instant,
    status: Mutex<Option<StatusCode>>,
}

impl<'a> Sent<'a> {
    fn new(refresh_token: &'a RefreshToken) -> Self {
        Self {
            refresh_token,
            at: Instant::now(),
            status: Mutex::new(None),
        }
    }

    fn record(&self, response: &::oauth2::HttpResponse) {
        *self.status.lock() = Some(response.status());
    }
}

/// The HTTP client of a refresh, recording the status it gets.
struct Recording<'a, C> {
    http: &'a C,
    sent: &'a Sent<'a>,
}

type BoxedResponse<'c, E> = Pin<Box<dyn Future<Output = Result<HttpResponse, E>> + Send + 'c>>;

impl<'c, C> AsyncHttpClient<'c> for Recording<'_, C>
where
    C: AsyncHttpClient<'c>,
    C::Future: Send,
{
    type Error = C::Error;
    type Future = RecordStatus<'c, C::Error>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        RecordStatus {
            response: Box::pin(self.http.call(request)),
            sent: self.sent,
        }
    }
}

/// A response future that records the response's status. A plain future
/// rather than an `async` block: the compiler cannot prove an `async`
/// block holding `C`'s future `Send` for the higher-ranked lifetime it
/// checks it at, though it is for every lifetime.
struct RecordStatus<'c, E> {
    response: BoxedResponse<'c, E>,
    sent: &'c Sent<'c>,
}

impl<E> Future for RecordStatus<'_, E> {
    type Output = Result<HttpResponse, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = std::task::ready!(self.response.as_mut().poll(cx));
        if let Ok(response) = &answer {
            self.sent.record(response);
        }
        Poll::Ready(answer)
    }
}

impl<C> OAuth2Refresher<C>
where
    C: for<'c> AsyncHttpClient<'c> + Send + Sync + 'static,
    for<'c> <C as AsyncHttpClient<'c>>::Future: Send,
    for<'c> <C as AsyncHttpClient<'c>>::Error: Send + Sync,
{
    /// Refreshes `stale` (or, with `None`, the [first refresh
    /// token](Self::refresh_token)): one refresh-token grant request.
    ///
    /// # Errors
    ///
    /// As [`OAuth2Error`] describes; [`Rejected`](RefreshError::Rejected)
    /// with [`OAuth2ErrorKind::NoRefreshToken`], without a request, if
    /// there is no refresh token to present.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the request. If it had reached the
    /// server, the server may have rotated the refresh token, which the
    /// answer would have carried: the session may then need a new sign-in.
    pub async fn refresh(&self, stale: Option<&OAuth2Token>) -> OAuth2Result {
        let refresh_token = self.refresh_token_for(stale)?;
        let sent = Sent::new(refresh_token);
        let http = Recording {
            http: &self.http,
            sent: &sent,
        };
        let answer = self
            .client
            .exchange_refresh_token(refresh_token)
            .add_scopes(self.scopes.iter().cloned())
            .request_async(&http)
            .await;
        self.finish(answer, sent, stale)
    }

    /// This refresher as the function [`TokenManager::new`] and
    /// [`TokenManager::with_token`] take.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use epochflight::auth::TokenManager;
    /// use epochflight::auth::oauth2::{ClientId, HttpRequest, HttpResponse, OAuth2Refresher, TokenUrl};
    ///
    /// # let http = |_: HttpRequest| async { Err::<HttpResponse, _>(std::io::Error::other("offline")) };
    /// let refresher = OAuth2Refresher::new(
    ///     http,
    ///     ClientId::new("my-app".into()),
    ///     TokenUrl::new("https://auth.example/token".into()).unwrap(),
    /// );
    /// // A manager configured by hand (the same as `refresher.manager()`, with a cool-down).
    /// let manager = TokenManager::new(refresher.into_refresh_fn())
    ///     .with_expiry(|token| token.expires_at(), Duration::from_secs(60))
    ///     .with_cooldown(Duration::from_secs(5));
    /// # let _ = manager;
    /// ```
    pub fn into_refresh_fn(
        self,
    ) -> impl Fn(Option<OAuth2Token>) -> RefreshFuture + Send + Sync + 'static {
        let this = Arc::new(self);
        move |stale| -> RefreshFuture {
            let this = this.clone();
            Box::pin(async move { this.refresh(stale.as_ref()).await })
        }
    }

    /// A [`TokenManager`] that refreshes with this refresher, and ahead of
    /// each token's expiry (by [`refresh_ahead`](Self::refresh_ahead),
    /// wired to [`OAuth2Token::expires_at`] with
    /// [`TokenManager::with_expiry`]).
    ///
    /// It starts without a token: [`sign_in`](TokenManager::sign_in) with
    /// the token of a login, or give the refresher a saved
    /// [`refresh_token`](Self::refresh_token) and the first call fetches
    /// one. The manager's other settings (cool-down, hooks) chain on the
    /// result.
    ///
    /// # Examples
    ///
    /// See the [module](self) docs.
    pub fn manager(self) -> TokenManager<OAuth2Token, OAuth2Error> {
        let ahead = self.refresh_ahead;
        TokenManager::new(self.into_refresh_fn()).with_expiry(OAuth2Token::expires_at, ahead)
    }
}

impl<C> OAuth2Refresher<C>
where
    C: SyncHttpClient + Send + Sync + 'static,
    C::Error: Send + Sync,
{
    /// Blocking [`refresh`](Self::refresh), over a [`SyncHttpClient`].
    ///
    /// # Blocking
    ///
    /// Blocks the current thread for the token request.
    ///
    /// # Errors
    ///
    /// As [`refresh`](Self::refresh).
    pub fn refresh_blocking(&self, stale: Option<&OAuth2Token>) -> OAuth2Result {
        let refresh_token = self.refresh_token_for(stale)?;
        let sent = Sent::new(refresh_token);
        let http = |request| {
            let response = self.http.call(request)?;
            sent.record(&response);
            Ok::<_, C::Error>(response)
        };
        let answer = self
            .client
            .exchange_refresh_token(refresh_token)
            .add_scopes(self.scopes.iter().cloned())
            .request(&http);
        self.finish(answer, sent, stale)
    }

    /// This refresher as the function [`TokenManager::new_blocking`] and
    /// [`TokenManager::with_token_blocking`] take.
    pub fn into_blocking_refresh_fn(
        self,
    ) -> impl Fn(Option<OAuth2Token>) -> OAuth2Result + Send + Sync + 'static {
        move |stale| self.refresh_blocking(stale.as_ref())
    }

    /// A [`TokenManager`] with a blocking refresher (for blocking clients
    /// such as ureq), refreshing ahead of expiry as
    /// [`manager`](Self::manager) does.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::AuthError;
    /// use epochflight::auth::oauth2::{
    ///     ClientId, HttpRequest, HttpResponse, OAuth2ErrorKind, OAuth2Refresher, TokenUrl,
    /// };
    ///
    /// // Any `SyncHttpClient`: `UreqAgent` (feature `ureq`), or a closure as here.
    /// let http = |_: HttpRequest| Err::<HttpResponse, _>(std::io::Error::other("offline"));
    /// let manager = OAuth2Refresher::new(
    ///     http,
    ///     ClientId::new("my-app".into()),
    ///     TokenUrl::new("http://127.0.0.1:9/token".into()).unwrap(),
    /// )
    /// .blocking_manager();
    /// // Neither signed in nor given a refresh token: nothing to refresh with.
    /// match manager.token_blocking() {
    ///     Err(AuthError::Refresh(e)) => {
    ///         assert!(e.is_rejected());
    ///         assert_eq!(e.inner().kind(), OAuth2ErrorKind::NoRefreshToken);
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// assert!(manager.is_signed_out());
    /// ```
    pub fn blocking_manager(self) -> TokenManager<OAuth2Token, OAuth2Error> {
        let ahead = self.refresh_ahead;
        TokenManager::new_blocking(self.into_blocking_refresh_fn())
            .with_expiry(OAuth2Token::expires_at, ahead)
    }
}

impl<C> fmt::Debug for OAuth2Refresher<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Refresher")
            .field("client_id", &self.client.client_id().as_str())
            .field("token_url", &self.client.token_uri().as_str())
            .field("auth_type", self.client.auth_type())
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| token::Redacted),
            )
            .field(
                "scopes",
                &self.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            )
            .field(
                "first_refresh_token",
                &self.first_refresh_token.as_ref().map(|_| token::Redacted),
            )
            .field("refresh_ahead", &self.refresh_ahead)
            .finish_non_exhaustive()
    }
}
