//! [`TokenManager`]: one credential, refreshed through a single flight.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::{AuthError, RefreshError, Unauthorized};
use crate::block_on::block_on;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};
use crate::{Epoch, SingleFlight, Versioned};

type RefreshResult<T, E> = Result<T, RefreshError<E>>;
type BoxFuture<O> = Pin<Box<dyn Future<Output = O> + Send>>;
type AsyncRefresh<T, E> = dyn Fn(Option<T>) -> BoxFuture<RefreshResult<T, E>> + Send + Sync;
type BlockingRefresh<T, E> = dyn Fn(Option<T>) -> RefreshResult<T, E> + Send + Sync;
type RefreshHook<T, E> = dyn Fn(&RefreshResult<T, E>) + Send + Sync;
type ExpiresAt<T> = dyn Fn(&T) -> Option<Instant> + Send + Sync;

/// How long after a transient refresh failure callers get that failure at
/// once instead of a new attempt, unless set with
/// [`TokenManager::with_cooldown`].
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

/// One credential and its refresh: the request gate, epoch-checked refresh,
/// and `401 → refresh → retry once`.
///
/// - [`token`](Self::token) is the *request gate*: it returns the current
///   token and its epoch, waits while a refresh is in flight, and fetches a
///   token (once, however many callers ask) if there is none.
/// - [`refresh_if_current`](Self::refresh_if_current) refreshes only if the
///   epoch a caller saw is still current; otherwise it returns the newer
///   token without a network call.
/// - [`send`](Self::send) does both around a request: on an unauthorized
///   response it refreshes if the token it used is still current, and sends
///   the request again **once** with the new token. A second unauthorized
///   response is returned as is.
///
/// A refresh that is [`Rejected`](RefreshError::Rejected) signs the session
/// out, but only if it was refreshing the current token: a stale failure never
/// signs out a newer session set by [`sign_in`](Self::sign_in). While signed
/// out, every call returns [`AuthError::SignedOut`] at once, with no network
/// call. A [`Transient`](RefreshError::Transient) failure keeps the session;
/// callers within the [cool-down](Self::with_cooldown) after it get the same
/// error at once instead of a new attempt.
///
/// The token type may be `()` for clients that cannot read their credential
/// (HttpOnly cookies in the client's cookie store): epochs alone decide.
///
/// # Examples
///
/// ```
/// use epochflight::auth::{AuthError, RefreshError, TokenManager};
///
/// # futures::executor::block_on(async {
/// let manager: TokenManager<String, String> =
///     TokenManager::new(|_stale| async { Ok("token-1".to_string()) });
/// let token = manager.token().await?; // fetched once, however many callers ask
/// assert_eq!(token.value, "token-1");
///
/// // The server rejected it: refresh, unless someone already did.
/// let fresh = manager.refresh_if_current(token.epoch).await?;
/// assert!(fresh.epoch > token.epoch);
/// let late = manager.refresh_if_current(token.epoch).await?; // no second refresh
/// assert_eq!(late.epoch, fresh.epoch);
/// assert_eq!(manager.stats().refresh_calls, 2);
/// # Ok::<(), AuthError<String>>(())
/// # }).unwrap();
/// ```
pub struct TokenManager<T, E> {
    core: Arc<Core<T, E>>,
    cooldown: Duration,
    expiry: Option<Expiry<T>>,
}

/// What the refresh work needs: it is `'static` (it may outlive the caller
/// that started it, handed to a follower), so it holds the core by `Arc`.
struct Core<T, E> {
    flights: SingleFlight<(), T, AuthError<E>>,
    refresher: Refresher<T, E>,
    /// Orders sign-in, sign-out and the decisions of refresh work.
    session: Mutex<Session<E>>,
    counters: Counters,
    on_refresh: Option<Box<RefreshHook<T, E>>>,
    on_sign_out: Option<Box<dyn Fn() + Send + Sync>>,
}

enum Refresher<T, E> {
    Async(Box<AsyncRefresh<T, E>>),
    Blocking(Box<BlockingRefresh<T, E>>),
}

struct Session<E> {
    signed_out: bool,
    /// The last transient failure, cleared by a success or `sign_in`.
    last_failure: Option<(Instant, RefreshError<E>)>,
    /// The epoch a caller is refreshing ahead of expiry; others keep using
    /// the still-valid token meanwhile.
    refreshing_ahead: Option<Epoch>,
}

struct Expiry<T> {
    expires_at: Box<ExpiresAt<T>>,
    refresh_ahead: Duration,
}

#[derive(Default)]
struct Counters {
    refresh_calls: AtomicU64,
    refreshes_succeeded: AtomicU64,
    refreshes_rejected: AtomicU64,
    refreshes_failed: AtomicU64,
    sign_outs: AtomicU64,
    retries: AtomicU64,
    cooled_down: AtomicU64,
}

/// Counts of what a [`TokenManager`] did, from [`TokenManager::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthStats {
    /// Calls made to the refresher (network refreshes).
    pub refresh_calls: u64,
    /// Refreshes that produced a new token.
    pub refreshes_succeeded: u64,
    /// Refreshes that failed with [`RefreshError::Rejected`].
    pub refreshes_rejected: u64,
    /// Refreshes that failed with [`RefreshError::Transient`].
    pub refreshes_failed: u64,
    /// Times the session went from signed in to signed out.
    pub sign_outs: u64,
    /// Requests sent a second time after an unauthorized response.
    pub retries: u64,
    /// Calls answered with the last transient failure during its cool-down,
    /// instead of a new refresh attempt.
    pub cooled_down: u64,
}

/// What a token request does, decided without waiting.
enum Plan<T, E> {
    /// Use this token now.
    Use(Versioned<T>),
    /// The request gate: join a refresh in flight, or take the stored token,
    /// or fetch one.
    Gate,
    /// The stored token is known to have expired: refresh it before use.
    Refresh(Epoch),
    /// The stored token expires soon: this caller refreshes it; others keep
    /// using it until the refresh lands.
    RefreshAhead(Versioned<T>, AheadClaim<T, E>),
}

/// This caller's claim to refresh `epoch` ahead of expiry; released on drop,
/// so a cancelled caller does not leave others waiting for nothing.
struct AheadClaim<T, E> {
    core: Arc<Core<T, E>>,
    epoch: Epoch,
}

impl<T, E> Drop for AheadClaim<T, E> {
    fn drop(&mut self) {
        let mut session = self.core.session.lock();
        if session.refreshing_ahead == Some(self.epoch) {
            session.refreshing_ahead = None;
        }
    }
}

impl<T, E> TokenManager<T, E>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A manager with no token yet: the first call fetches one with `refresh`.
    ///
    /// `refresh` gets the stale token, if there is one, and returns a new one
    /// or a [`RefreshError`]. It is called at most once per epoch, however
    /// many callers need a refresh.
    ///
    /// Blocking callers of a manager with an async refresher
    /// ([`token_blocking`](Self::token_blocking), …) poll the refresher's
    /// future on their own thread: that works for futures that need no
    /// runtime reactor. Use [`new_blocking`](Self::new_blocking) for blocking
    /// clients.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// let manager: TokenManager<String, std::io::ErrorKind> = TokenManager::new(|stale| async move {
    ///     // POST the refresh token to the token endpoint here.
    ///     let _ = stale;
    ///     Err(RefreshError::Transient(std::io::ErrorKind::TimedOut))
    /// });
    /// # let _ = manager;
    /// ```
    pub fn new<F, Fut>(refresh: F) -> Self
    where
        F: Fn(Option<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RefreshResult<T, E>> + Send + 'static,
    {
        let refresh = move |stale| -> BoxFuture<RefreshResult<T, E>> { Box::pin(refresh(stale)) };
        Self::from_refresher(Refresher::Async(Box::new(refresh)), None)
    }

    /// A manager that starts signed in with `token`.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// let manager = TokenManager::with_token(
    ///     |_stale: Option<String>| async { Ok::<_, RefreshError<()>>("next".into()) },
    ///     "initial".to_string(),
    /// );
    /// assert_eq!(manager.token_blocking().unwrap().value, "initial");
    /// ```
    pub fn with_token<F, Fut>(refresh: F, token: T) -> Self
    where
        F: Fn(Option<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RefreshResult<T, E>> + Send + 'static,
    {
        let refresh = move |stale| -> BoxFuture<RefreshResult<T, E>> { Box::pin(refresh(stale)) };
        Self::from_refresher(Refresher::Async(Box::new(refresh)), Some(token))
    }

    /// A manager whose refresher blocks (for blocking HTTP clients).
    ///
    /// Async callers of such a manager ([`token`](Self::token),
    /// [`send`](Self::send), …) work too: the refresher then runs inside the
    /// poll of the caller that leads the refresh, blocking that executor
    /// thread for the refresh's duration.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// let manager: TokenManager<String, String> =
    ///     TokenManager::new_blocking(|_stale| Ok("token".to_string()));
    /// assert_eq!(manager.token_blocking().unwrap().value, "token");
    /// ```
    pub fn new_blocking<F>(refresh: F) -> Self
    where
        F: Fn(Option<T>) -> RefreshResult<T, E> + Send + Sync + 'static,
    {
        Self::from_refresher(Refresher::Blocking(Box::new(refresh)), None)
    }

    /// A manager with a blocking refresher that starts signed in with `token`.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// let manager = TokenManager::with_token_blocking(
    ///     |_stale: Option<u32>| Err::<u32, _>(RefreshError::Rejected("invalid_grant")),
    ///     1,
    /// );
    /// assert_eq!(manager.token_blocking().unwrap().value, 1);
    /// ```
    pub fn with_token_blocking<F>(refresh: F, token: T) -> Self
    where
        F: Fn(Option<T>) -> RefreshResult<T, E> + Send + Sync + 'static,
    {
        Self::from_refresher(Refresher::Blocking(Box::new(refresh)), Some(token))
    }

    fn from_refresher(refresher: Refresher<T, E>, token: Option<T>) -> Self {
        let core = Core {
            flights: SingleFlight::new(),
            refresher,
            session: Mutex::new(Session {
                signed_out: false,
                last_failure: None,
                refreshing_ahead: None,
            }),
            counters: Counters::default(),
            on_refresh: None,
            on_sign_out: None,
        };
        if let Some(token) = token {
            core.flights.set((), token);
        }
        Self {
            core: Arc::new(core),
            cooldown: DEFAULT_COOLDOWN,
            expiry: None,
        }
    }

    /// Sets how long after a transient refresh failure callers get that
    /// failure at once instead of a new attempt. Default: [`DEFAULT_COOLDOWN`]
    /// (1 s). `Duration::ZERO` lets the next caller try again at once.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use epochflight::auth::TokenManager;
    ///
    /// let manager: TokenManager<String, ()> =
    ///     TokenManager::new_blocking(|_| Ok("t".into())).with_cooldown(Duration::from_secs(5));
    /// # let _ = manager;
    /// ```
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Refreshes ahead of expiry: `expires_at` tells when a token expires
    /// (`None`: unknown), and a token within `refresh_ahead` of its expiry is
    /// refreshed by one caller, through the same single flight as a reactive
    /// refresh, while other callers keep using it until it actually expires.
    /// An expired token is refreshed before use.
    ///
    /// If the refresh ahead fails transiently, the caller that made it uses
    /// the still-valid token; the next attempt waits for the cool-down.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use epochflight::auth::TokenManager;
    ///
    /// #[derive(Clone)]
    /// struct Token { secret: String, expires_at: Instant }
    ///
    /// let manager: TokenManager<Token, String> = TokenManager::new_blocking(|_| {
    ///     Ok(Token { secret: "s".into(), expires_at: Instant::now() + Duration::from_secs(300) })
    /// })
    /// .with_expiry(|t: &Token| Some(t.expires_at), Duration::from_secs(30));
    /// # let _ = manager;
    /// ```
    pub fn with_expiry<F>(mut self, expires_at: F, refresh_ahead: Duration) -> Self
    where
        F: Fn(&T) -> Option<Instant> + Send + Sync + 'static,
    {
        self.expiry = Some(Expiry {
            expires_at: Box::new(expires_at),
            refresh_ahead,
        });
        self
    }

    /// Calls `hook` after every refresh attempt with its result (for example,
    /// to persist a rotated refresh token, or to log). It runs once per
    /// refresh, on the thread that completed it, outside every lock.
    ///
    /// # Panics
    ///
    /// If called while a refresh of this manager is in progress.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::TokenManager;
    ///
    /// let manager: TokenManager<String, String> = TokenManager::new_blocking(|_| Ok("t".into()))
    ///     .on_refresh(|result| println!("refreshed: {}", result.is_ok()));
    /// # let _ = manager;
    /// ```
    pub fn on_refresh<F>(mut self, hook: F) -> Self
    where
        F: Fn(&RefreshResult<T, E>) + Send + Sync + 'static,
    {
        self.core_mut().on_refresh = Some(Box::new(hook));
        self
    }

    /// Calls `hook` each time the session goes from signed in to signed out
    /// (a rejected refresh of the current token, or
    /// [`sign_out`](Self::sign_out)), outside every lock.
    ///
    /// # Panics
    ///
    /// If called while a refresh of this manager is in progress.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::TokenManager;
    ///
    /// let manager: TokenManager<String, String> = TokenManager::new_blocking(|_| Ok("t".into()))
    ///     .on_sign_out(|| println!("please log in again"));
    /// # let _ = manager;
    /// ```
    pub fn on_sign_out<F>(mut self, hook: F) -> Self
    where
        F: Fn() + Send + Sync + 'static,
    {
        self.core_mut().on_sign_out = Some(Box::new(hook));
        self
    }

    fn core_mut(&mut self) -> &mut Core<T, E> {
        Arc::get_mut(&mut self.core).expect("configure a TokenManager before a refresh starts")
    }

    /// The current token and its epoch: the request gate.
    ///
    /// Waits while a refresh is in flight and returns its result; fetches a
    /// token (single-flight) if there is none. With
    /// [`with_expiry`](Self::with_expiry), an expired token is refreshed
    /// first, and a token close to expiry is refreshed by one caller while
    /// others get it at once.
    ///
    /// # Errors
    ///
    /// [`AuthError::SignedOut`] at once while signed out;
    /// [`AuthError::Refresh`] if the refresh this call waited on failed, or
    /// during the cool-down after a transient failure.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future withdraws this caller. If it was running the
    /// refresh and others wait, one of them continues that refresh (it is not
    /// sent twice). If nobody else waits, the refresh is dropped: with
    /// rotating refresh tokens, a refresh cancelled after its request was
    /// sent can leave the session needing a new sign-in, so avoid timeouts
    /// shorter than the refresh itself.
    pub async fn token(&self) -> Result<Versioned<T>, AuthError<E>> {
        match self.plan()? {
            Plan::Use(token) => Ok(token),
            Plan::Gate => {
                // With no token stored the gate may start the first fetch,
                // which the cool-down after a failed one holds back too.
                self.check_may_refresh(Epoch::NONE)?;
                let core = &self.core;
                let got = core
                    .flights
                    .try_get((), || refresh(core.clone(), Epoch::NONE));
                Ok(got.await?.into_versioned())
            }
            Plan::Refresh(seen) => self.refresh_if_current(seen).await,
            Plan::RefreshAhead(token, claim) => {
                let refreshed = self.refresh_if_current(token.epoch).await;
                drop(claim);
                fall_back_ahead(refreshed, token)
            }
        }
    }

    /// Blocking [`token`](Self::token).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread while a refresh is in flight. With an async
    /// refresher, the refresher's future is polled on this thread (it must
    /// not need a runtime reactor); see [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token).
    pub fn token_blocking(&self) -> Result<Versioned<T>, AuthError<E>> {
        match self.plan()? {
            Plan::Use(token) => Ok(token),
            Plan::Gate => {
                // With no token stored the gate may start the first fetch,
                // which the cool-down after a failed one holds back too.
                self.check_may_refresh(Epoch::NONE)?;
                let core = &self.core;
                let got = core
                    .flights
                    .try_get_blocking((), || block_on(refresh(core.clone(), Epoch::NONE)));
                Ok(got?.into_versioned())
            }
            Plan::Refresh(seen) => self.refresh_if_current_blocking(seen),
            Plan::RefreshAhead(token, claim) => {
                let refreshed = self.refresh_if_current_blocking(token.epoch);
                drop(claim);
                fall_back_ahead(refreshed, token)
            }
        }
    }

    /// Refreshes the token if `seen` is still the current epoch; otherwise
    /// returns the newer token without a network call.
    ///
    /// Concurrent callers share one refresh; callers holding an older epoch
    /// get the token that replaced it.
    ///
    /// # Errors
    ///
    /// [`AuthError::SignedOut`] at once while signed out;
    /// [`AuthError::Refresh`] if the refresh failed, or at once during the
    /// cool-down after a transient failure.
    ///
    /// # Cancel safety
    ///
    /// As [`token`](Self::token).
    pub async fn refresh_if_current(&self, seen: Epoch) -> Result<Versioned<T>, AuthError<E>> {
        self.check_may_refresh(seen)?;
        let core = &self.core;
        let refreshed = core
            .flights
            .try_refresh_if_current((), seen, || refresh(core.clone(), seen));
        Ok(refreshed.await?.into_versioned())
    }

    /// Blocking [`refresh_if_current`](Self::refresh_if_current).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread for the refresh; see
    /// [`token_blocking`](Self::token_blocking).
    ///
    /// # Errors
    ///
    /// As [`refresh_if_current`](Self::refresh_if_current).
    pub fn refresh_if_current_blocking(&self, seen: Epoch) -> Result<Versioned<T>, AuthError<E>> {
        self.check_may_refresh(seen)?;
        let core = &self.core;
        let refreshed = core
            .flights
            .try_refresh_if_current_blocking((), seen, || block_on(refresh(core.clone(), seen)));
        Ok(refreshed?.into_versioned())
    }

    /// Sends a request with the current token and retries it once after a
    /// refresh if the response is unauthorized.
    ///
    /// `f` gets an owned clone of the token, builds and sends the request,
    /// and returns the response. If [`is_unauthorized`](Unauthorized) says so,
    /// the response is dropped, the token is refreshed if the one used is
    /// still current (otherwise the newer token is taken, with no refresh),
    /// and `f` is called once more. Its response is returned whatever it is:
    /// never a loop.
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token) and
    /// [`refresh_if_current`](Self::refresh_if_current). Transport errors are
    /// `f`'s own output, returned as is.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the request in progress, or withdraws from
    /// the refresh as described in [`token`](Self::token).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager, Unauthorized};
    ///
    /// struct Status(u16);
    /// impl Unauthorized for Status {
    ///     fn is_unauthorized(&self) -> bool { self.0 == 401 }
    /// }
    ///
    /// # futures::executor::block_on(async {
    /// let manager = TokenManager::with_token(
    ///     |_| async { Ok::<u32, RefreshError<()>>(2) },
    ///     1,
    /// );
    /// // The server accepts only token 2: the first try is refused, the retry passes.
    /// let status = manager.send(|token| async move { Status(if token == 2 { 200 } else { 401 }) });
    /// assert_eq!(status.await.unwrap().0, 200);
    /// assert_eq!(manager.stats().retries, 1);
    /// # });
    /// ```
    pub async fn send<F, Fut, R>(&self, mut f: F) -> Result<R, AuthError<E>>
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = R>,
        R: Unauthorized,
    {
        let token = self.token().await?;
        let response = f(token.value).await;
        if !response.is_unauthorized() {
            return Ok(response);
        }
        // Release the response (and its connection) before waiting.
        drop(response);
        let fresh = self.refresh_if_current(token.epoch).await?;
        self.core.counters.retries.fetch_add(1, Ordering::Relaxed);
        Ok(f(fresh.value).await)
    }

    /// Blocking [`send`](Self::send), for blocking HTTP clients.
    ///
    /// # Blocking
    ///
    /// Blocks the current thread for `f` and for any refresh; see
    /// [`token_blocking`](Self::token_blocking).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager, Unauthorized};
    ///
    /// struct Status(u16);
    /// impl Unauthorized for Status {
    ///     fn is_unauthorized(&self) -> bool { self.0 == 401 }
    /// }
    ///
    /// let manager = TokenManager::with_token_blocking(|_| Ok::<u32, RefreshError<()>>(2), 1);
    /// let status = manager.send_blocking(|token| Status(if token == 2 { 200 } else { 401 }));
    /// assert_eq!(status.unwrap().0, 200);
    /// ```
    pub fn send_blocking<F, R>(&self, mut f: F) -> Result<R, AuthError<E>>
    where
        F: FnMut(T) -> R,
        R: Unauthorized,
    {
        let token = self.token_blocking()?;
        let response = f(token.value);
        if !response.is_unauthorized() {
            return Ok(response);
        }
        drop(response);
        let fresh = self.refresh_if_current_blocking(token.epoch)?;
        self.core.counters.retries.fetch_add(1, Ordering::Relaxed);
        Ok(f(fresh.value))
    }

    /// Counts a request sent a second time after an unauthorized response,
    /// for the HTTP integrations, which retry outside [`send`](Self::send).
    #[cfg(any(feature = "tower", feature = "reqwest"))]
    pub(crate) fn count_retry(&self) {
        self.core.counters.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores `token` as the current one (after a login) and returns its
    /// epoch. Ends a signed-out state and any cool-down.
    ///
    /// A refresh in flight is detached: its callers get its result, which is
    /// not stored, so it cannot overwrite this token; and if it is rejected,
    /// it does not sign this session out.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{AuthError, TokenManager};
    ///
    /// let manager: TokenManager<String, String> = TokenManager::new_blocking(|_| Ok("t".into()));
    /// manager.sign_out();
    /// assert_eq!(manager.token_blocking(), Err(AuthError::SignedOut));
    /// let epoch = manager.sign_in("from-login".to_string());
    /// assert_eq!(manager.token_blocking().unwrap().epoch, epoch);
    /// ```
    pub fn sign_in(&self, token: T) -> Epoch {
        let mut session = self.core.session.lock();
        let (epoch, replaced) = self.core.flights.replace((), token);
        session.signed_out = false;
        let failure = session.last_failure.take();
        drop(session);
        drop((replaced, failure));
        epoch
    }

    /// Signs out: drops the token; every call returns
    /// [`AuthError::SignedOut`] at once, without a network call, until
    /// [`sign_in`](Self::sign_in).
    pub fn sign_out(&self) {
        let mut session = self.core.session.lock();
        let was_signed_in = !std::mem::replace(&mut session.signed_out, true);
        let removed = self.core.flights.take(&());
        drop(session);
        drop(removed);
        if was_signed_in {
            self.core.signed_out();
        }
    }

    /// Whether the session is signed out.
    pub fn is_signed_out(&self) -> bool {
        self.core.session.lock().signed_out
    }

    /// The current token and epoch, without waiting or fetching.
    pub fn current(&self) -> Option<Versioned<T>> {
        self.core.flights.current(&())
    }

    /// The current epoch ([`Epoch::NONE`] with no token). Cheap.
    pub fn epoch(&self) -> Epoch {
        self.core.flights.epoch(&())
    }

    /// Whether a refresh is in flight.
    pub fn is_refreshing(&self) -> bool {
        self.core.flights.is_in_flight(&())
    }

    /// Counts of refreshes, retries and sign-outs so far.
    pub fn stats(&self) -> AuthStats {
        let c = &self.core.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        AuthStats {
            refresh_calls: load(&c.refresh_calls),
            refreshes_succeeded: load(&c.refreshes_succeeded),
            refreshes_rejected: load(&c.refreshes_rejected),
            refreshes_failed: load(&c.refreshes_failed),
            sign_outs: load(&c.sign_outs),
            retries: load(&c.retries),
            cooled_down: load(&c.cooled_down),
        }
    }

    /// Decides what a token request does, without waiting.
    fn plan(&self) -> Result<Plan<T, E>, AuthError<E>> {
        if self.is_signed_out() {
            return Err(AuthError::SignedOut);
        }
        let Some(expiry) = &self.expiry else {
            return Ok(Plan::Gate);
        };
        let Some(current) = self.core.flights.current(&()) else {
            return Ok(Plan::Gate);
        };
        let Some(expires_at) = (expiry.expires_at)(&current.value) else {
            return Ok(Plan::Gate);
        };
        let now = Instant::now();
        if now >= expires_at {
            return Ok(Plan::Refresh(current.epoch));
        }
        if now + expiry.refresh_ahead < expires_at {
            return Ok(Plan::Gate);
        }
        let mut session = self.core.session.lock();
        if session.refreshing_ahead == Some(current.epoch) {
            drop(session);
            return Ok(Plan::Use(current));
        }
        session.refreshing_ahead = Some(current.epoch);
        drop(session);
        let claim = AheadClaim {
            core: self.core.clone(),
            epoch: current.epoch,
        };
        Ok(Plan::RefreshAhead(current, claim))
    }

    /// Refuses a refresh while signed out, or during the cool-down after a
    /// transient failure (unless a newer token or a flight makes the refresh
    /// cost nothing).
    fn check_may_refresh(&self, seen: Epoch) -> Result<(), AuthError<E>> {
        let session = self.core.session.lock();
        if session.signed_out {
            return Err(AuthError::SignedOut);
        }
        let Some((failed_at, failure)) = &session.last_failure else {
            return Ok(());
        };
        let flights = &self.core.flights;
        let would_start_a_refresh = flights.epoch(&()) <= seen && !flights.is_in_flight(&());
        if failed_at.elapsed() >= self.cooldown || !would_start_a_refresh {
            return Ok(());
        }
        let failure = failure.clone();
        drop(session);
        self.core
            .counters
            .cooled_down
            .fetch_add(1, Ordering::Relaxed);
        Err(AuthError::Refresh(failure))
    }
}

/// A refresh ahead of expiry that failed transiently leaves a token that is
/// still valid: use it.
fn fall_back_ahead<T, E>(
    refreshed: Result<Versioned<T>, AuthError<E>>,
    still_valid: Versioned<T>,
) -> Result<Versioned<T>, AuthError<E>> {
    match refreshed {
        Err(AuthError::Refresh(RefreshError::Transient(_))) => Ok(still_valid),
        other => other,
    }
}

/// A flight's work: one call to the refresher, and what its result means for
/// the session. It runs exactly once per flight, even when handed to another
/// caller, so its effects happen once.
async fn refresh<T, E>(core: Arc<Core<T, E>>, seen: Epoch) -> Result<T, AuthError<E>>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    let stale = {
        let session = core.session.lock();
        if session.signed_out {
            // Signed out after this call was admitted: no network call.
            return Err(AuthError::SignedOut);
        }
        core.flights.current(&())
    };
    let base = stale.as_ref().map_or(Epoch::NONE, |s| s.epoch);
    if base > seen {
        // `sign_in` stored a newer token after this refresh was asked for.
        // Refreshing now would rotate the new session's refresh token.
        return Ok(stale.expect("a newer epoch has a value").value);
    }
    core.counters.refresh_calls.fetch_add(1, Ordering::Relaxed);
    let stale = stale.map(|s| s.value);
    let result = match &core.refresher {
        Refresher::Async(refresh) => refresh(stale).await,
        Refresher::Blocking(refresh) => refresh(stale),
    };
    core.record(base, &result);
    result.map_err(AuthError::Refresh)
}

impl<T, E: Clone> Core<T, E> {
    /// Applies a refresh result to the session: clears or starts the
    /// cool-down, or signs out if the rejected refresh was for the token that
    /// is still current.
    fn record(&self, base: Epoch, result: &RefreshResult<T, E>)
    where
        T: Clone + 'static,
        E: 'static,
    {
        let counters = &self.counters;
        let mut signed_out_now = false;
        let mut removed = None;
        let failure = match result {
            Err(RefreshError::Transient(e)) => {
                Some((Instant::now(), RefreshError::Transient(e.clone())))
            }
            _ => None,
        };
        let mut session = self.session.lock();
        let old_failure = match result {
            Ok(_) => {
                counters.refreshes_succeeded.fetch_add(1, Ordering::Relaxed);
                session.last_failure.take()
            }
            Err(RefreshError::Transient(_)) => {
                counters.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                // Like a rejection, a stale failure says nothing about a
                // newer session: only the current token's refresh cools down.
                if self.flights.epoch(&()) == base {
                    std::mem::replace(&mut session.last_failure, failure)
                } else {
                    failure
                }
            }
            Err(RefreshError::Rejected(_)) => {
                counters.refreshes_rejected.fetch_add(1, Ordering::Relaxed);
                // A stale failure never signs out a newer session.
                if !session.signed_out && self.flights.epoch(&()) == base {
                    session.signed_out = true;
                    removed = self.flights.take(&());
                    signed_out_now = true;
                }
                None
            }
        };
        drop(session);
        drop((removed, old_failure));
        if let Some(hook) = &self.on_refresh {
            hook(result);
        }
        if signed_out_now {
            self.signed_out();
        }
    }

    fn signed_out(&self) {
        self.counters.sign_outs.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.on_sign_out {
            hook();
        }
    }
}

impl<T, E> fmt::Debug for TokenManager<T, E>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManager")
            .field("epoch", &self.epoch())
            .field("signed_out", &self.is_signed_out())
            .field("refreshing", &self.is_refreshing())
            .field("cooldown", &self.cooldown)
            .field(
                "refresh_ahead",
                &self.expiry.as_ref().map(|e| e.refresh_ahead),
            )
            .field("stats", &self.stats())
            .finish()
    }
}
