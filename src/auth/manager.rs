//! [`TokenManager`]: credentials, each refreshed through a single flight.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::coord::{Coordinator, SharedCredential};
use super::credential::ForKey;
use super::fleet_store::Coord;
use super::refresh::{Core, Expiry, Refresher};
use super::session::{Session, Sessions};
use super::{AuthError, RefreshError, Unauthorized};
use crate::sync::{Arc, Mutex};
use crate::{Epoch, Versioned};

/// How long after a transient refresh failure callers get that failure at
/// once instead of a new attempt, unless set with
/// [`TokenManager::with_cooldown`].
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

/// Credentials and their refresh: the request gate, epoch-checked refresh,
/// and `401 → refresh → retry once`.
///
/// A `TokenManager<T, E>` holds **one credential**: a token of type `T`,
/// refreshed by a function whose error is `E`. A `TokenManager<T, E, K>`
/// (made with [`keyed`](Self::keyed)) holds **one credential per key** `K`
/// (a tenant, a scope, an audience): each key has its own token, epochs,
/// sign-out, cool-down, refresh ahead of expiry and counters, exactly as a
/// manager of one credential, and a refresh of one key never waits on
/// another. [`for_key`](Self::for_key) gives a key's operations, under the
/// same names as the methods below.
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
/// # Errors that are not `Clone`
///
/// Every caller waiting on a failed refresh gets the same error, so `E` is
/// `Clone`. For an error type that is not (`std::io::Error`,
/// `reqwest::Error`, most client errors), make the manager's error type
/// `Arc<YourError>` and let the refresher return its own error:
/// [`RefreshError<E>`] converts into `RefreshError<Arc<E>>`, so `?` shares it
/// (as moka's `try_get_with` hands out `Arc<E>`):
///
/// ```
/// use std::sync::Arc;
/// use epochflight::auth::{AuthError, RefreshError, TokenManager};
///
/// fn read_token() -> std::io::Result<String> {
///     Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no token file"))
/// }
///
/// let manager: TokenManager<String, Arc<std::io::Error>> = TokenManager::new(|_stale| async {
///     let token = read_token().map_err(RefreshError::Transient)?; // io::Error, shared by `?`
///     Ok(token)
/// });
/// match manager.token_blocking() {
///     Err(AuthError::Refresh(RefreshError::Transient(error))) => {
///         assert_eq!(error.kind(), std::io::ErrorKind::NotFound)
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
///
/// # Costs
///
/// On a valid token, [`token`](Self::token) reads the session's flags (plain
/// atomic loads, no lock) and then the stored token through the core's reuse
/// path; the session's lock is taken only when a refresh may start. A keyed
/// manager also looks its key's session up in a map under a lock held for
/// that lookup. `T::clone` and `E::clone` may run while an internal lock is
/// held; keep them cheap.
///
/// # Blocking twins in async code
///
/// The `_blocking` methods park their thread while a refresh is in flight.
/// Never call them from async code: a blocking call on an executor thread
/// whose task drives the same credential's refresh would never return. That
/// case is detected and panics with a message, as is a call made from inside
/// the credential's own refresh (the refresher or a hook); a blocking call
/// that waits on a refresh driven by a task of another thread only blocks
/// that executor thread for the refresh's duration, which no check can tell
/// apart from legitimate use.
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
///
/// One credential per tenant:
///
/// ```
/// use epochflight::auth::{AuthError, RefreshError, TokenManager};
///
/// # futures::executor::block_on(async {
/// let tenants: TokenManager<String, String, &str> = TokenManager::keyed(|tenant, _stale| async move {
///     Ok(format!("token-of-{tenant}")) // POST to this tenant's token endpoint here
/// });
/// let acme = tenants.for_key(&"acme").token().await?;
/// let globex = tenants.for_key(&"globex").token().await?;
/// assert_eq!((acme.value.as_str(), globex.value.as_str()), ("token-of-acme", "token-of-globex"));
///
/// tenants.for_key(&"acme").sign_out(); // only acme's session ends
/// assert_eq!(tenants.for_key(&"acme").token().await, Err(AuthError::SignedOut));
/// assert_eq!(tenants.for_key(&"globex").token().await?.value, "token-of-globex");
/// # Ok::<(), AuthError<String>>(())
/// # }).unwrap();
/// ```
pub struct TokenManager<T, E, K = ()> {
    pub(super) core: Arc<Core<T, E, K>>,
}

/// Counts of what a [`TokenManager`] did, from [`TokenManager::stats`] (all
/// keys) or [`ForKey::stats`] (one key).
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
    /// Times a session went from signed in to signed out.
    pub sign_outs: u64,
    /// Requests sent a second time after an unauthorized response.
    pub retries: u64,
    /// Calls answered with the last transient failure during its cool-down,
    /// instead of a new refresh attempt.
    pub cooled_down: u64,
    /// Refreshes answered with a token another process refreshed (or signed
    /// in), taken from the store instead of calling the refresher (with a
    /// [coordinator](TokenManager::with_coordinator) only).
    pub adopted: u64,
}

/// A refresh attempt, as an [`on_refresh`](TokenManager::on_refresh) hook
/// sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct RefreshEvent<'a, T, E, K = ()> {
    /// What the refresher returned.
    pub result: &'a Result<T, RefreshError<E>>,
    /// Whether the refresh was for the session's current token. `false` when
    /// [`sign_in`](TokenManager::sign_in) or
    /// [`sign_out`](TokenManager::sign_out) superseded it while it ran: a
    /// successful result then goes to the callers that waited for it but is
    /// not stored, and must not be persisted as the session's credential.
    pub current: bool,
    /// The credential's key (`()` for a manager of one credential).
    pub key: &'a K,
}

/// Constructors and operations of a manager of one credential.
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
        Fut: Future<Output = Result<T, RefreshError<E>>> + Send + 'static,
    {
        Self::one(Refresher::new_async(move |(), stale| refresh(stale)), None)
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
        Fut: Future<Output = Result<T, RefreshError<E>>> + Send + 'static,
    {
        Self::one(
            Refresher::new_async(move |(), stale| refresh(stale)),
            Some(token),
        )
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
        F: Fn(Option<T>) -> Result<T, RefreshError<E>> + Send + Sync + 'static,
    {
        Self::one(
            Refresher::new_blocking(move |(), stale| refresh(stale)),
            None,
        )
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
        F: Fn(Option<T>) -> Result<T, RefreshError<E>> + Send + Sync + 'static,
    {
        Self::one(
            Refresher::new_blocking(move |(), stale| refresh(stale)),
            Some(token),
        )
    }

    fn one(refresher: Refresher<T, E, ()>, token: Option<T>) -> Self {
        let sessions = Sessions::One {
            session: Arc::new(Session::new()),
            key: (),
        };
        let core = Core::new(refresher, sessions);
        if let Some(token) = token {
            core.flights.set((), token);
        }
        Self {
            core: Arc::new(core),
        }
    }

    /// Calls `hook` each time the session goes from signed in to signed out
    /// (a rejected refresh of the current token, or
    /// [`sign_out`](Self::sign_out)), outside every lock. After a rejected
    /// refresh it runs inside that refresh, with the same rules as
    /// [`on_refresh`](Self::on_refresh): it must not wait on this manager,
    /// and a panic in it is caught and re-raised once the refresh completed.
    ///
    /// (A keyed manager's hook gets the key: see
    /// [`on_key_sign_out`](Self::on_key_sign_out).)
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
    pub fn on_sign_out<F>(self, hook: F) -> Self
    where
        F: Fn() + Send + Sync + 'static,
    {
        self.on_key_sign_out(move |()| hook())
    }

    /// Shares the credential with other processes (and hosts) through
    /// `shared`: one refresh per expiry across all of them, a rotated
    /// refresh token never presented twice. See [`auth::coord`](super::coord)
    /// for the protocol and the stores.
    ///
    /// Local callers still join this manager's own refresh, and only that
    /// refresh talks to the store, so store calls per expiry do not grow
    /// with requests (per process and expiry: one claim and one commit, or
    /// one claim, one wait and one read). Calls on a valid token make no
    /// store call at all. A refresh:
    ///
    /// 1. **claims** the shared generation of the token held here. If the
    ///    store holds a newer one (another process refreshed, and this one
    ///    saw a late `401`), it is adopted, **without refreshing**
    ///    ([`AuthStats::adopted`]). If another process is refreshing, this
    ///    one waits for its commit (woken by it, bounded by its lease) and
    ///    adopts it.
    /// 2. Otherwise it **refreshes** with the refresh token *read from the
    ///    store at the claim* (the refresher's `stale` argument), never this
    ///    process's copy,
    /// 3. and **commits** the new token as the next generation, fenced: a
    ///    holder whose claim was taken over cannot overwrite a newer value.
    ///
    /// A [`Rejected`](RefreshError::Rejected) refresh of the current
    /// generation signs the fleet out, a [`Transient`](RefreshError::Transient)
    /// one cools the fleet down for [this manager's cool-down](Self::with_cooldown),
    /// and [`sign_in_shared`](Self::sign_in_shared) /
    /// [`sign_out_shared`](Self::sign_out_shared) act fleet-wide. What the
    /// fleet decided reaches a process at its next refresh; a process whose
    /// session the fleet ended asks the store on every call whether it was
    /// signed in again. The errors are typed ([`AuthError::Coordination`]):
    ///
    /// - **Store down**: tokens held keep working; a refresh that is needed
    ///   fails at once with [`CoordError::Unavailable`](super::coord::CoordError::Unavailable)
    ///   (never a refresh without a claim). A refresh that succeeded but
    ///   could not be committed is used here and committed from a
    ///   background thread as soon as the store is back.
    /// - **Holder gone**: when a process dies (or stalls past its lease)
    ///   after sending its refresh, the server may have rotated the refresh
    ///   token: every process gets [`CoordError::Lost`](super::coord::CoordError::Lost)
    ///   and counts as signed out until a `sign_in` (or that holder's late
    ///   commit); nobody presents that refresh token again. With a
    ///   [reuse grace](super::coord::CoordConfig::with_reuse_grace), one
    ///   survivor retries instead.
    ///
    /// **The refresher must finish well within the
    /// [lease](super::coord::CoordConfig::new)** (give its HTTP client a
    /// timeout of at most half the lease): the token server cannot check
    /// the claim's fence, and a holder still sending at its lease's end is
    /// taken as gone. Set a [spawner](Self::with_spawner) too: a refresh
    /// whose local callers were all cancelled (timeouts) then still commits,
    /// instead of leaving the fleet with a lost refresh.
    ///
    /// If the manager was made with a token ([`with_token`](Self::with_token)),
    /// that token is a **seed**: the first call writes it to the store only
    /// if the credential was never written, and uses the store's token
    /// (until then, [`current`](Self::current) is `None`). A token from a
    /// new login goes to [`sign_in_shared`](Self::sign_in_shared).
    ///
    /// **Cookie mode stays in-process**: a token the client cannot read
    /// (`T = ()`, HttpOnly cookies in each process's own cookie jar) cannot
    /// cross processes; coordinate only tokens held as values.
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(all(feature = "file-coordination", unix))] {
    /// use std::time::Duration;
    /// use epochflight::auth::coord::{CoordConfig, Coordinator, FileStore, Utf8Codec};
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// # let dir = std::env::temp_dir().join(format!("epochflight-doc-mgr-{}", std::process::id()));
    /// let store = FileStore::open(&dir)?;
    /// let config = CoordConfig::new(Duration::from_secs(10))?;
    /// let shared = Coordinator::new(store, Utf8Codec, config).credential("api")?;
    ///
    /// // The same in every process sharing the credential:
    /// let manager: TokenManager<String, String> =
    ///     TokenManager::new_blocking(|stale: Option<String>| {
    ///         // POST `stale` (read from the store at the claim) to the token endpoint.
    ///         Ok(format!("refreshed-from-{}", stale.as_deref().unwrap_or("nothing")))
    ///     })
    ///     .with_coordinator(shared.clone());
    /// manager.sign_in_shared_blocking("from-login".to_string())?;
    /// let seen = manager.token_blocking()?;
    /// let fresh = manager.refresh_if_current_blocking(seen.epoch)?;
    /// assert_eq!(fresh.value, "refreshed-from-from-login");
    /// // Another process (here: a second manager) adopts it without refreshing.
    /// let other: TokenManager<String, String> =
    ///     TokenManager::new_blocking(|_| Err(RefreshError::Transient("not called".to_string())))
    ///         .with_coordinator(shared);
    /// assert_eq!(other.token_blocking()?.value, "refreshed-from-from-login");
    /// assert_eq!((manager.stats().refresh_calls, other.stats().adopted), (1, 1));
    /// # std::fs::remove_dir_all(&dir)?;
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_coordinator(mut self, shared: SharedCredential<T>) -> Self {
        let core = self.core_mut();
        let seed = core.flights.take(&()).map(|v| v.value);
        core.coord = Some(Coord::One {
            shared,
            seed: Mutex::new(seed),
        });
        self
    }

    fn only(&self) -> ForKey<'_, T, E, ()> {
        self.for_key(&())
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
    /// during the cool-down after a transient failure; with a
    /// [coordinator](Self::with_coordinator), [`AuthError::Coordination`]
    /// when the store stopped the refresh (unavailable, a lost refresh, the
    /// fleet cooling down, a damaged record, …).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future withdraws this caller. If it was running the
    /// refresh and others wait, one of them continues that refresh (it is not
    /// sent twice). If nobody else waits, the refresh finishes on the
    /// spawner if one is set ([`with_spawner`](TokenManager::with_spawner))
    /// and its outcome is applied as if awaited; without one it is dropped:
    /// with rotating refresh tokens, a refresh cancelled after its request
    /// was sent can then leave the session needing a new sign-in.
    ///
    /// # Panics
    ///
    /// A panic in the refresher propagates to the caller polling it; a caller
    /// that was waiting for that refresh then makes a new one. A panic in a
    /// hook is re-raised here once the refresh's result is stored (see
    /// [`on_refresh`](Self::on_refresh)). Panics if called from inside this
    /// credential's own refresh (see [Blocking twins in async
    /// code](Self#blocking-twins-in-async-code)): it would wait forever.
    pub async fn token(&self) -> Result<Versioned<T>, AuthError<E>> {
        self.only().token().await
    }

    /// Blocking [`token`](Self::token).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread while a refresh is in flight. With an async
    /// refresher, the refresher's future is polled on this thread (it must
    /// not need a runtime reactor); see [`new`](Self::new). Do not call it
    /// from async code (see [Blocking twins in async
    /// code](Self#blocking-twins-in-async-code)).
    ///
    /// # Errors
    ///
    /// As [`token`](Self::token).
    ///
    /// # Panics
    ///
    /// As [`token`](Self::token); and if called on an executor thread whose
    /// task drives this credential's refresh, which it would never let
    /// finish.
    pub fn token_blocking(&self) -> Result<Versioned<T>, AuthError<E>> {
        self.only().token_blocking()
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
    /// cool-down after a transient failure; with a coordinator,
    /// [`AuthError::Coordination`] (see [`token`](Self::token)).
    ///
    /// # Cancel safety
    ///
    /// As [`token`](Self::token).
    ///
    /// # Panics
    ///
    /// As [`token`](Self::token).
    pub async fn refresh_if_current(&self, seen: Epoch) -> Result<Versioned<T>, AuthError<E>> {
        self.only().refresh_if_current(seen).await
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
    /// As [`token_blocking`](Self::token_blocking).
    pub fn refresh_if_current_blocking(&self, seen: Epoch) -> Result<Versioned<T>, AuthError<E>> {
        self.only().refresh_if_current_blocking(seen)
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
    /// This is the same routine as the HTTP integrations' (gate, attach,
    /// send, classify, refresh if current, replay once), with `f` as the
    /// client. A client that reports a `401` as an error must be seen by
    /// [`Unauthorized`]: ureq's and reqwest's errors are (see
    /// [`Unauthorized`]'s impl for `Result`); for others, return the
    /// response, not an error, for a `401`.
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
    /// As [`token`](Self::token).
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
    pub async fn send<F, Fut, R>(&self, f: F) -> Result<R, AuthError<E>>
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = R>,
        R: Unauthorized,
    {
        self.only().send(f).await
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
    /// As [`token_blocking`](Self::token_blocking).
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
    pub fn send_blocking<F, R>(&self, f: F) -> Result<R, AuthError<E>>
    where
        F: FnMut(T) -> R,
        R: Unauthorized,
    {
        self.only().send_blocking(f)
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
    ///
    /// With a [coordinator](Self::with_coordinator) it signs the whole fleet
    /// in, as [`sign_in_shared_blocking`](Self::sign_in_shared_blocking)
    /// does, and blocks on the store for it (in async code, use
    /// [`sign_in_shared`](Self::sign_in_shared)). If the store cannot be
    /// reached, the token is used in this process only, and offered to the
    /// store as a seed (written only if the credential was never written)
    /// when it needs a refresh; call `sign_in_shared` to learn of the
    /// failure and sign the fleet in later.
    pub fn sign_in(&self, token: T) -> Epoch {
        self.only().sign_in(token)
    }

    /// Signs every process sharing the credential in with `token` (after a
    /// login): the store first ([`SharedCredential::sign_in`], a new shared
    /// generation, so a claim in progress elsewhere is fenced), then this
    /// process, as [`sign_in`](Self::sign_in). The other processes take the
    /// token at their next refresh, or at once if the fleet was signed out
    /// (they ask the store on every call then). Without a coordinator, the
    /// same as `sign_in`.
    ///
    /// # Errors
    ///
    /// [`AuthError::Coordination`] if the store refused or cannot be
    /// reached; nothing changed then, here or in the store.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the store answered, the fleet may or may not be
    /// signed in; this process is not.
    pub async fn sign_in_shared(&self, token: T) -> Result<Epoch, AuthError<E>> {
        self.only().sign_in_shared(token).await
    }

    /// Blocking [`sign_in_shared`](Self::sign_in_shared).
    ///
    /// # Blocking
    ///
    /// Blocks on the store (with a coordinator).
    ///
    /// # Errors
    ///
    /// As [`sign_in_shared`](Self::sign_in_shared).
    pub fn sign_in_shared_blocking(&self, token: T) -> Result<Epoch, AuthError<E>> {
        self.only().sign_in_shared_blocking(token)
    }

    /// Signs out: drops the token; every call returns
    /// [`AuthError::SignedOut`] at once, without a network call, until
    /// [`sign_in`](Self::sign_in).
    ///
    /// With a [coordinator](Self::with_coordinator) it signs the whole fleet
    /// out, as [`sign_out_shared_blocking`](Self::sign_out_shared_blocking)
    /// does, and blocks on the store for it (in async code, use
    /// [`sign_out_shared`](Self::sign_out_shared)).
    pub fn sign_out(&self) {
        self.only().sign_out()
    }

    /// Signs every process sharing the credential out: this process at once,
    /// then the store. The others find out at their next refresh (a claim is
    /// answered "signed out"); a claim in progress elsewhere is fenced.
    /// Afterwards each call here asks the store (one read per flight, no
    /// refresh) whether the fleet signed in again. Without a coordinator,
    /// the same as [`sign_out`](Self::sign_out).
    ///
    /// # Errors
    ///
    /// [`AuthError::Coordination`] if the store refused or cannot be
    /// reached: this process is signed out anyway, for good (until
    /// `sign_in`), and the other processes are not.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the store answered, this process is still signed in
    /// and the fleet may or may not be signed out.
    pub async fn sign_out_shared(&self) -> Result<(), AuthError<E>> {
        self.only().sign_out_shared().await
    }

    /// Blocking [`sign_out_shared`](Self::sign_out_shared).
    ///
    /// # Blocking
    ///
    /// Blocks on the store (with a coordinator).
    ///
    /// # Errors
    ///
    /// As [`sign_out_shared`](Self::sign_out_shared).
    pub fn sign_out_shared_blocking(&self) -> Result<(), AuthError<E>> {
        self.only().sign_out_shared_blocking()
    }

    /// Whether the session is signed out (with a coordinator: also when the
    /// fleet signed out, or another process's refresh was lost).
    pub fn is_signed_out(&self) -> bool {
        self.only().is_signed_out()
    }

    /// The current token and epoch, without waiting or fetching.
    pub fn current(&self) -> Option<Versioned<T>> {
        self.only().current()
    }

    /// The current epoch ([`Epoch::NONE`] with no token). Cheap.
    pub fn epoch(&self) -> Epoch {
        self.only().epoch()
    }

    /// Whether a refresh is in flight.
    pub fn is_refreshing(&self) -> bool {
        self.only().is_refreshing()
    }
}

/// Constructors of a keyed manager, and what every manager has.
impl<T, E, K> TokenManager<T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A manager of one credential per key, none fetched yet: the first call
    /// for a key fetches its token with `refresh(key, None)`.
    ///
    /// `refresh` gets the key and its stale token, if there is one, and
    /// returns a new one or a [`RefreshError`], with the same guarantees per
    /// key as [`new`](TokenManager::new)'s refresher: one call per refresh
    /// that is needed, however many callers need it. Refreshes of different
    /// keys run independently.
    ///
    /// Keys are credentials: take them from a bounded set (tenants you
    /// serve), not from unchecked request data. Each key keeps its session
    /// until [`ForKey::forget`].
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    /// enum Audience { Billing, Search }
    ///
    /// let manager: TokenManager<String, String, Audience> =
    ///     TokenManager::keyed(|audience, _stale| async move {
    ///         Ok(format!("token-for-{audience:?}")) // client-credentials grant for `audience`
    ///     });
    /// let billing = manager.for_key(&Audience::Billing).token_blocking().unwrap();
    /// assert_eq!(billing.value, "token-for-Billing");
    /// assert_eq!(manager.stats().refresh_calls, 1);
    /// ```
    pub fn keyed<F, Fut>(refresh: F) -> Self
    where
        F: Fn(K, Option<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RefreshError<E>>> + Send + 'static,
    {
        Self::per_key(Refresher::new_async(refresh))
    }

    /// A keyed manager whose refresher blocks (for blocking HTTP clients);
    /// see [`keyed`](Self::keyed) and [`new_blocking`](TokenManager::new_blocking).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// let manager: TokenManager<String, String, u32> =
    ///     TokenManager::keyed_blocking(|tenant, _stale| Ok(format!("t{tenant}")));
    /// assert_eq!(manager.for_key(&7).token_blocking().unwrap().value, "t7");
    /// ```
    pub fn keyed_blocking<F>(refresh: F) -> Self
    where
        F: Fn(K, Option<T>) -> Result<T, RefreshError<E>> + Send + Sync + 'static,
    {
        Self::per_key(Refresher::new_blocking(refresh))
    }

    fn per_key(refresher: Refresher<T, E, K>) -> Self {
        let sessions = Sessions::PerKey(Mutex::new(Default::default()));
        Self {
            core: Arc::new(Core::new(refresher, sessions)),
        }
    }

    /// The operations on `key`'s credential: the same as this manager's own
    /// methods for one credential ([`token`](ForKey::token),
    /// [`send`](ForKey::send), [`sign_in`](ForKey::sign_in), …).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::TokenManager;
    ///
    /// let manager: TokenManager<String, String, String> =
    ///     TokenManager::keyed_blocking(|tenant, _| Ok(format!("token-of-{tenant}")));
    /// let acme = "acme".to_string();
    /// manager.for_key(&acme).sign_in("from-login".to_string());
    /// assert_eq!(manager.for_key(&acme).token_blocking().unwrap().value, "from-login");
    /// ```
    pub fn for_key<'a>(&'a self, key: &'a K) -> ForKey<'a, T, E, K> {
        ForKey::new(self, key)
    }

    /// Sets how long after a transient refresh failure callers get that
    /// failure at once instead of a new attempt. Default: [`DEFAULT_COOLDOWN`]
    /// (1 s). `Duration::ZERO` lets the next caller try again at once. For a
    /// keyed manager, each key has its own cool-down.
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
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
    /// If the refresh ahead fails transiently (or, with a coordinator, the
    /// store is unavailable or the fleet cools down), the caller that made
    /// it uses the still-valid token; the next attempt waits for the
    /// cool-down.
    ///
    /// With a [coordinator](Self::with_coordinator), `expires_at` also gives
    /// the expiry stored with a committed token (in the store's clock, for
    /// other processes to read).
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
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
        self.core_mut().expiry = Some(Expiry {
            expires_at: Box::new(expires_at),
            refresh_ahead,
        });
        self
    }

    /// Shares every key's credential with other processes through
    /// `coordinator`: key `k` is the store's credential `name(&k)`, each its
    /// own record, as [`with_coordinator`](TokenManager::with_coordinator)
    /// does for a manager of one credential (see there).
    ///
    /// `name` must give the same name for a key in every process, and
    /// different names for different keys; a name is 1 to 128 bytes of
    /// `A-Z a-z 0-9 . _ -`, not starting with `.`. A key whose name is
    /// invalid fails every refresh with
    /// `AuthError::Coordination(CoordError::Config(ConfigError::InvalidName))`,
    /// without calling the refresher.
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(all(feature = "file-coordination", unix))] {
    /// use std::time::Duration;
    /// use epochflight::auth::coord::{ConfigError, CoordConfig, CoordError, Coordinator, FileStore, Utf8Codec};
    /// use epochflight::auth::{AuthError, TokenManager};
    ///
    /// # let dir = std::env::temp_dir().join(format!("epochflight-doc-keyed-{}", std::process::id()));
    /// let store = FileStore::open(&dir)?;
    /// let coordinator = Coordinator::new(store, Utf8Codec, CoordConfig::new(Duration::from_secs(10))?);
    /// let tenants: TokenManager<String, String, String> =
    ///     TokenManager::keyed_blocking(|tenant, _stale| Ok(format!("token-of-{tenant}")))
    ///         .with_keyed_coordinator(coordinator, |tenant: &String| format!("tenant-{tenant}"));
    /// assert_eq!(tenants.for_key(&"acme".into()).token_blocking()?.value, "token-of-acme");
    /// assert_eq!(
    ///     tenants.for_key(&"a b".into()).token_blocking(),
    ///     Err(AuthError::Coordination(CoordError::Config(ConfigError::InvalidName)))
    /// );
    /// # std::fs::remove_dir_all(&dir)?;
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_keyed_coordinator<F>(mut self, coordinator: Coordinator<T>, name: F) -> Self
    where
        F: Fn(&K) -> String + Send + Sync + 'static,
    {
        self.core_mut().coord = Some(Coord::PerKey {
            coordinator,
            name: Box::new(name),
            open: Mutex::new(Default::default()),
        });
        self
    }

    /// Finishes a refresh whose callers all went away on `spawn`, and applies
    /// its outcome as an awaited one would: a refresh whose request already
    /// reached the server (which may have rotated the refresh token) always
    /// lands, even when the only caller timed out.
    ///
    /// Without a spawner, a refresh whose every caller is cancelled (a request
    /// timeout, a `select!`, a dropped connection) is dropped; with rotating
    /// refresh tokens its response, carrying the new refresh token, is then
    /// lost, and the next refresh presents a token the server already
    /// rotated. With one, the new token is stored (the next call uses it, with
    /// no second refresh), a `Rejected` refresh of the current token signs
    /// out, a `Transient` one starts the cool-down, and hooks and counters see
    /// it, as for any refresh. A refresh that never started (its caller was
    /// cancelled before the first poll) is not spawned.
    ///
    /// `spawn` gets a `Send + 'static` future and must run it to completion:
    /// `tokio::spawn`, `smol::spawn(..).detach()`, a thread with a `block_on`
    /// (for a refresher that needs no runtime reactor). It is called in the
    /// drop of the last caller's future, with no lock held. See
    /// [`SingleFlight::with_spawner`](crate::SingleFlight::with_spawner),
    /// which this sets on the manager's single flight, for what it keeps
    /// alive.
    ///
    /// # Panics
    ///
    /// If a refresh of this manager is still running, which can only be the
    /// case if a future of this manager's was leaked.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::{RefreshError, TokenManager};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let manager: TokenManager<String, String> =
    ///     TokenManager::new(|_stale| async { Ok("token".to_string()) })
    ///         .with_spawner(|refresh| {
    ///             tokio::spawn(refresh);
    ///         });
    /// // On smol: `.with_spawner(|refresh| smol::spawn(refresh).detach())`.
    /// # let _ = manager;
    /// # });
    /// ```
    pub fn with_spawner<F>(mut self, spawn: F) -> Self
    where
        F: Fn(Pin<Box<dyn Future<Output = ()> + Send + 'static>>) + Send + Sync + 'static,
    {
        let core = self.core_mut();
        let flights = std::mem::take(&mut core.flights);
        core.flights = flights.with_spawner(spawn);
        self
    }

    /// Calls `hook` after every refresh attempt with its result (for example,
    /// to persist a rotated refresh token, or to log). It runs once per
    /// refresh, outside every lock, but *inside* the refresh: the callers
    /// waiting for it are released after the hook returns. So the hook must
    /// not wait on this manager ([`token`](Self::token), [`send`](Self::send)
    /// and their twins would wait for the refresh that is running the hook,
    /// and panic to say so); reading [`stats`](Self::stats) or
    /// [`current`](Self::current) is fine.
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
        F: Fn(&RefreshEvent<'_, T, E, K>) + Send + Sync + 'static,
    {
        self.core_mut().on_refresh = Some(Box::new(hook));
        self
    }

    /// Calls `hook` with the key each time a key's session goes from signed
    /// in to signed out; otherwise as [`on_sign_out`](TokenManager::on_sign_out).
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
    /// let manager: TokenManager<String, String, String> =
    ///     TokenManager::keyed_blocking(|_, _| Ok("t".into()))
    ///         .on_key_sign_out(|tenant| println!("{tenant} must log in again"));
    /// # let _ = manager;
    /// ```
    pub fn on_key_sign_out<F>(mut self, hook: F) -> Self
    where
        F: Fn(&K) + Send + Sync + 'static,
    {
        self.core_mut().on_sign_out = Some(Box::new(hook));
        self
    }

    fn core_mut(&mut self) -> &mut Core<T, E, K> {
        Arc::get_mut(&mut self.core).expect("configure a TokenManager before a refresh starts")
    }

    /// Counts of refreshes, retries and sign-outs so far, over all keys (see
    /// [`ForKey::stats`] for one key's).
    pub fn stats(&self) -> AuthStats {
        self.core.counters.snapshot()
    }
}

impl<T, E, K> fmt::Debug for TokenManager<T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("TokenManager");
        match &self.core.sessions {
            Sessions::One { key, .. } => {
                let the = self.for_key(key);
                out.field("epoch", &the.epoch())
                    .field("signed_out", &the.is_signed_out())
                    .field("refreshing", &the.is_refreshing())
            }
            Sessions::PerKey(_) => out.field("keys", &self.core.sessions.len()),
        };
        out.field("cooldown", &self.core.cooldown)
            .field(
                "refresh_ahead",
                &self.core.expiry.as_ref().map(|e| e.refresh_ahead),
            )
            .field(
                "coordinator",
                &self
                    .core
                    .coord
                    .as_ref()
                    .map(|c| c.name().unwrap_or("per key")),
            )
            .field("stats", &self.stats())
            .finish()
    }
}
