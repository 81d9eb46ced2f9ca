//! [`TokenManager`]: one credential, refreshed through a single flight.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
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
type RefreshHook<T, E> = dyn Fn(&RefreshEvent<'_, T, E>) + Send + Sync;
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
/// `T::clone` and `E::clone` may run while an internal lock is held; keep
/// them cheap.
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
    cooldown: Duration,
    on_refresh: Option<Box<RefreshHook<T, E>>>,
    on_sign_out: Option<Box<dyn Fn() + Send + Sync>>,
    /// A panic caught in a hook that ran inside a refresh, re-raised in a
    /// caller once the refresh's result is stored (see `run_hook`).
    hook_panic: Mutex<Option<Box<dyn Any + Send>>>,
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

/// A refresh attempt, as an [`on_refresh`](TokenManager::on_refresh) hook
/// sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct RefreshEvent<'a, T, E> {
    /// What the refresher returned.
    pub result: &'a RefreshResult<T, E>,
    /// Whether the refresh was for the session's current token. `false` when
    /// [`sign_in`](TokenManager::sign_in) or
    /// [`sign_out`](TokenManager::sign_out) superseded it while it ran: a
    /// successful result then goes to the callers that waited for it but is
    /// not stored, and must not be persisted as the session's credential.
    pub current: bool,
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
    /// or a [`RefreshError`]. It is called once per refresh that is needed,
    /// however many callers need it, concurrent or late; it is called again
    /// for the same stale token only after that attempt failed transiently
    /// (once the cool-down passed) or panicked.
    ///
    /// With rotating refresh tokens, carry the refresh token inside `T` (a
    /// struct with the access and the refresh token): the refresher then
    /// rotates exactly the token it was handed, and a `sign_in` racing a
    /// refresh cannot make it rotate the new session's token.
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
            cooldown: DEFAULT_COOLDOWN,
            on_refresh: None,
            on_sign_out: None,
            hook_panic: Mutex::new(None),
        };
        if let Some(token) = token {
            core.flights.set((), token);
        }
        Self {
            core: Arc::new(core),
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
        self.core_mut().cooldown = cooldown;
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
    /// refresh, outside every lock, but *inside* the refresh: the callers
    /// waiting for it are released after the hook returns. So the hook must
    /// not wait on this manager ([`token`](Self::token), [`send`](Self::send)
    /// and their twins would wait for the refresh that is running the hook);
    /// reading [`stats`](Self::stats) or [`current`](Self::current) is fine.
    ///
    /// Persist only results with [`current`](RefreshEvent::current) set: a
    /// refresh superseded by `sign_in` or `sign_out` while it ran reports
    /// `false`. (A `sign_in` that lands between the hook and the result being
    /// stored still supersedes it; sign in from the same place that persists.)
    ///
    /// A panic in the hook is caught, so that the refresh's result is kept
    /// (a panic there must not cause a second refresh with a refresh token
    /// the server already rotated); it is re-raised in a caller of that
    /// refresh once the result is stored.
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::TokenManager;
    ///
    /// let manager: TokenManager<String, String> = TokenManager::new_blocking(|_| Ok("t".into()))
    ///     .on_refresh(|event| {
    ///         if let (Ok(token), true) = (event.result, event.current) {
    ///             println!("persist {token}");
    ///         }
    ///     });
    /// # let _ = manager;
    /// ```
    pub fn on_refresh<F>(mut self, hook: F) -> Self
    where
        F: Fn(&RefreshEvent<'_, T, E>) + Send + Sync + 'static,
    {
        self.core_mut().on_refresh = Some(Box::new(hook));
        self
    }

    /// Calls `hook` each time the session goes from signed in to signed out
    /// (a rejected refresh of the current token, or
    /// [`sign_out`](Self::sign_out)), outside every lock. After a rejected
    /// refresh it runs inside that refresh, with the same rules as
    /// [`on_refresh`](Self::on_refresh): it must not wait on this manager,
    /// and a panic in it is caught and re-raised once the refresh completed.
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
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
    ///
    /// # Panics
    ///
    /// A panic in the refresher propagates to the caller polling it; a caller
    /// that was waiting for that refresh then makes a new one. A panic in a
    /// hook is re-raised here once the refresh's result is stored (see
    /// [`on_refresh`](Self::on_refresh)).
    pub async fn token(&self) -> Result<Versioned<T>, AuthError<E>> {
        match self.plan()? {
            Plan::Use(token) => Ok(token),
            Plan::Gate => {
                // With no token stored the gate may start the first fetch,
                // which the cool-down after a failed one holds back too.
                self.check_may_refresh(Epoch::NONE, Ahead::No)?;
                let core = &self.core;
                let got = core
                    .flights
                    .try_get((), || refresh(core.clone(), Epoch::NONE))
                    .await;
                core.resume_hook_panic();
                Ok(got?.into_versioned())
            }
            Plan::Refresh(seen) => self.refresh_if_current(seen).await,
            Plan::RefreshAhead(token, claim) => {
                let refreshed = self.refresh(token.epoch, Ahead::Yes).await;
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
    ///
    /// # Panics
    ///
    /// As [`token`](Self::token).
    pub fn token_blocking(&self) -> Result<Versioned<T>, AuthError<E>> {
        match self.plan()? {
            Plan::Use(token) => Ok(token),
            Plan::Gate => {
                // With no token stored the gate may start the first fetch,
                // which the cool-down after a failed one holds back too.
                self.check_may_refresh(Epoch::NONE, Ahead::No)?;
                let core = &self.core;
                let got = core
                    .flights
                    .try_get_blocking((), || block_on(refresh(core.clone(), Epoch::NONE)));
                core.resume_hook_panic();
                Ok(got?.into_versioned())
            }
            Plan::Refresh(seen) => self.refresh_if_current_blocking(seen),
            Plan::RefreshAhead(token, claim) => {
                let refreshed = self.refresh_blocking(token.epoch, Ahead::Yes);
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
    ///
    /// # Panics
    ///
    /// A panic in the refresher propagates to the caller polling it; a caller
    /// that was waiting for that refresh then makes a new one. A panic in a
    /// hook is re-raised here once the refresh's result is stored (see
    /// [`on_refresh`](Self::on_refresh)).
    pub async fn refresh_if_current(&self, seen: Epoch) -> Result<Versioned<T>, AuthError<E>> {
        self.refresh(seen, Ahead::No).await
    }

    async fn refresh(&self, seen: Epoch, ahead: Ahead) -> Result<Versioned<T>, AuthError<E>> {
        self.check_may_refresh(seen, ahead)?;
        let core = &self.core;
        let refreshed = core
            .flights
            .try_refresh_if_current((), seen, || refresh(core.clone(), seen))
            .await;
        core.resume_hook_panic();
        Ok(refreshed?.into_versioned())
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
    ///
    /// # Panics
    ///
    /// As [`refresh_if_current`](Self::refresh_if_current).
    pub fn refresh_if_current_blocking(&self, seen: Epoch) -> Result<Versioned<T>, AuthError<E>> {
        self.refresh_blocking(seen, Ahead::No)
    }

    fn refresh_blocking(&self, seen: Epoch, ahead: Ahead) -> Result<Versioned<T>, AuthError<E>> {
        self.check_may_refresh(seen, ahead)?;
        let core = &self.core;
        let refreshed = core
            .flights
            .try_refresh_if_current_blocking((), seen, || block_on(refresh(core.clone(), seen)));
        core.resume_hook_panic();
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
    /// # Panics
    ///
    /// A panic in the refresher propagates to the caller polling it; a caller
    /// that was waiting for that refresh then makes a new one. A panic in a
    /// hook is re-raised here once the refresh's result is stored (see
    /// [`on_refresh`](Self::on_refresh)).
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
    /// # Panics
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
            self.core.counters.sign_outs.fetch_add(1, Ordering::Relaxed);
            if let Some(hook) = &self.core.on_sign_out {
                hook();
            }
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
        if expires_at.saturating_duration_since(now) > expiry.refresh_ahead {
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
    fn check_may_refresh(&self, seen: Epoch, ahead: Ahead) -> Result<(), AuthError<E>> {
        let core = &self.core;
        let session = core.session.lock();
        if session.signed_out {
            return Err(AuthError::SignedOut);
        }
        let flights = &core.flights;
        let would_start_a_refresh = flights.epoch(&()) <= seen && !flights.is_in_flight(&());
        let cooling = match session.cooling(core.cooldown) {
            Some(failure) if would_start_a_refresh => failure.clone(),
            _ => return Ok(()),
        };
        drop(session);
        // A caller refreshing ahead falls back on its still-valid token: it
        // is not answered with the failure.
        if ahead == Ahead::No {
            core.counters.cooled_down.fetch_add(1, Ordering::Relaxed);
        }
        Err(AuthError::Refresh(cooling))
    }
}

/// Whether a refresh is made ahead of expiry, with a valid token to fall
/// back on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ahead {
    Yes,
    No,
}

impl<E> Session<E> {
    /// The last transient failure, if it is within the cool-down.
    fn cooling(&self, cooldown: Duration) -> Option<&RefreshError<E>> {
        let (failed_at, failure) = self.last_failure.as_ref()?;
        (failed_at.elapsed() < cooldown).then_some(failure)
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
    // Decided under the session lock, which orders this with `sign_in`,
    // `sign_out` and the recording of earlier results.
    let (stale, cooling) = {
        let session = core.session.lock();
        if session.signed_out {
            // Signed out after this call was admitted: no network call.
            return Err(AuthError::SignedOut);
        }
        let stale = core.flights.current(&());
        // Checked again here: a caller admitted just before a transient
        // failure was recorded must not make a new attempt inside the
        // cool-down.
        let cooling = session.cooling(core.cooldown).cloned();
        (stale, cooling)
    };
    let base = stale.as_ref().map_or(Epoch::NONE, |s| s.epoch);
    if base > seen {
        // `sign_in` stored a newer token after this refresh was asked for.
        // Refreshing now would rotate the new session's refresh token.
        return Ok(stale.expect("a newer epoch has a value").value);
    }
    if let Some(failure) = cooling {
        core.counters.cooled_down.fetch_add(1, Ordering::Relaxed);
        return Err(AuthError::Refresh(failure));
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
    /// is still current. Then tells the hooks.
    fn record(&self, base: Epoch, result: &RefreshResult<T, E>)
    where
        T: Clone + 'static,
        E: 'static,
    {
        let counters = &self.counters;
        let mut removed = None;
        let failure = match result {
            Err(RefreshError::Transient(e)) => {
                Some((Instant::now(), RefreshError::Transient(e.clone())))
            }
            _ => None,
        };
        let mut session = self.session.lock();
        // A result for an older token, superseded by `sign_in` or `sign_out`
        // while the refresh ran, says nothing about the current session.
        let current = !session.signed_out && self.flights.epoch(&()) == base;
        let old_failure = match result {
            Ok(_) => {
                counters.refreshes_succeeded.fetch_add(1, Ordering::Relaxed);
                session.last_failure.take()
            }
            Err(RefreshError::Transient(_)) => {
                counters.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                if current {
                    std::mem::replace(&mut session.last_failure, failure)
                } else {
                    failure
                }
            }
            Err(RefreshError::Rejected(_)) => {
                counters.refreshes_rejected.fetch_add(1, Ordering::Relaxed);
                if current {
                    session.signed_out = true;
                    removed = Some(self.flights.take(&()));
                }
                None
            }
        };
        drop(session);
        let signed_out_now = removed.is_some();
        drop((removed, old_failure));
        if let Some(hook) = &self.on_refresh {
            self.run_hook(|| hook(&RefreshEvent { result, current }));
        }
        if signed_out_now {
            counters.sign_outs.fetch_add(1, Ordering::Relaxed);
            if let Some(hook) = &self.on_sign_out {
                self.run_hook(hook);
            }
        }
    }

    /// Runs a hook inside a refresh. A panic there must not look like a
    /// panic of the refresh: that would drop a result the server already
    /// committed to (a rotated refresh token) and let a follower refresh
    /// again with the used one. So it is caught here and re-raised by
    /// [`resume_hook_panic`](Self::resume_hook_panic) once the result is
    /// stored.
    fn run_hook(&self, hook: impl FnOnce()) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(hook)) {
            let mut slot = self.hook_panic.lock();
            let extra = if slot.is_none() {
                *slot = Some(panic);
                None
            } else {
                Some(panic)
            };
            drop(slot);
            drop(extra);
        }
    }

    /// Re-raises a hook's panic in a caller of the refresh it ran in.
    fn resume_hook_panic(&self) {
        let panic = self.hook_panic.lock().take();
        if let Some(panic) = panic {
            resume_unwind(panic);
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
            .field("cooldown", &self.core.cooldown)
            .field(
                "refresh_ahead",
                &self.expiry.as_ref().map(|e| e.refresh_ahead),
            )
            .field("stats", &self.stats())
            .finish()
    }
}
