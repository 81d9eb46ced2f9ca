//! [`UreqAuthMiddleware`] and [`AuthAgent`]: `401 → refresh → retry` for
//! ureq 3 agents.
//!
//! A ureq middleware can run the rest of its chain only once
//! (`MiddlewareNext::handle` takes itself), so the replay after a refresh is
//! sent through the agent again: the middleware keeps a weak handle to the
//! agent it is installed in, which is why it installs itself
//! ([`UreqAuthMiddleware::build_agent`]) rather than being added with
//! `ConfigBuilder::middleware`.

use std::fmt;
use std::io::{self, Read};
use std::ops::Deref;
// Outside every loom model: this integration is plain std.
use std::sync::Weak;

use http::{Method, request};
use ureq::config::{Config, ConfigBuilder};
use ureq::middleware::{Middleware, MiddlewareNext};
use ureq::typestate::AgentScope;
use ureq::{Agent, Body, SendBody};

use super::retry::{Attempt, Exchange, exchange};
use super::wait::{self, Wait};
use super::{Credential, SkipAuth, TokenManager, classify};
use crate::sync::StdArc as Arc;

type Response = http::Response<Body>;
type AttachFn<T> = dyn Fn(&T, &mut request::Parts) + Send + Sync;
type ClassifyFn = dyn Fn(&Response) -> bool + Send + Sync;
type SelectFn<K> = dyn Fn(&request::Parts) -> K + Send + Sync;

/// How many bytes of a request body are kept to send it again after a
/// refresh, unless set with [`UreqAuthMiddleware::replay_limit`]: 1 MiB.
#[cfg_attr(docsrs, doc(cfg(feature = "ureq")))]
pub const DEFAULT_REPLAY_LIMIT: usize = 1 << 20;

/// `401 → refresh → retry` for a ureq 3 agent: authorizes every request
/// with the current token of a [`TokenManager`], and on an unauthorized
/// answer refreshes it (only if the token used is still the current one) and
/// sends the request once more. Install it with
/// [`build_agent`](Self::build_agent), which gives an [`AuthAgent`] (a
/// `ureq::Agent` for every purpose).
///
/// Per request, on the calling thread:
///
/// 1. waits at the request gate ([`TokenManager::token`]): while a refresh
///    is in flight, requests wait for its token instead of going out with the
///    old one;
/// 2. attaches the token (by default with [`Credential`]: `Authorization:
///    Bearer <token>`, or nothing for `T = ()`; or with your function, see
///    [`with_attach`](Self::with_attach)) and runs the rest of the agent's
///    middleware chain;
/// 3. if the answer is unauthorized, refreshes with
///    [`TokenManager::refresh_if_current`] for the epoch of the token it used
///    and sends the request again with the new token **once**, through the
///    agent (its whole middleware chain runs again for the replay). The
///    answer to the replay is returned whatever it is.
///
/// A storm of `401`s from many threads, late ones included, causes one
/// refresh.
///
/// # Which answers are unauthorized
///
/// **With `http_status_as_error(true)`, ureq's default, a `401` is the error
/// `ureq::Error::StatusCode(401)` and its headers are lost.** Every such
/// error counts as unauthorized, including a `401` with `insufficient_scope`
/// that a new token will not fix (it is then refreshed and replayed once in
/// vain), and the answer can carry no [`NotReplayed`](super::NotReplayed) note. Turn it off
/// (`.http_status_as_error(false)` on the config) to classify `401`s by
/// their `WWW-Authenticate` challenge ([`classify()`], or
/// [`with_classifier`](Self::with_classifier)) and to find the notes in the
/// response's extensions.
///
/// # Replay
///
/// ureq's request bodies are readers. Before the first attempt, up to
/// [`replay_limit`](Self::replay_limit) bytes are read into memory and sent
/// from there (with a `Content-Length`), and sent again for a replay. A
/// longer body is streamed (chunked), once: its unauthorized answer is
/// returned as is, with
/// [`NotReplayed`](super::NotReplayed)`{ reason: `[`BodyNotReplayable`](super::NotReplayedReason::BodyNotReplayable)` }`
/// after the token was refreshed. Non-idempotent methods are replayed too (a
/// server that answers `401` did not act).
///
/// # The refresher's own request
///
/// If the refresher sends its token request through this same agent, mark
/// it with `.extension(`[`SkipAuth`]`)`: an unmarked one would wait for the
/// refresh it belongs to (that is detected, and panics with a message).
///
/// # Errors
///
/// When there is no token to send (signed out, or the refresh failed; see
/// [`TokenManager::token`]), the request fails with `ureq::Error::Other`
/// holding the [`AuthError<E>`](super::AuthError):
///
/// ```no_run
/// # use epochflight::auth::AuthError;
/// # fn check(agent: &ureq::Agent) {
/// match agent.get("https://api.example/items").call() {
///     Err(ureq::Error::Other(error)) => match error.downcast_ref::<AuthError<String>>() {
///         Some(AuthError::SignedOut) => { /* log in again */ }
///         Some(refresh_failed) => eprintln!("{refresh_failed}"),
///         None => eprintln!("{error}"),
///     },
///     other => { /* the server's answer, or a transport error */ }
/// }
/// # }
/// ```
///
/// # Blocking
///
/// Every request blocks its thread, for any refresh too. Do not use the
/// agent from async code: see [`TokenManager`]'s "Blocking twins in async
/// code".
///
/// Available with the `ureq` feature.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use epochflight::auth::{RefreshError, TokenManager, UreqAuthMiddleware};
///
/// let manager = Arc::new(TokenManager::with_token_blocking(
///     |_stale: Option<String>| {
///         // POST the refresh token with ureq here.
///         Ok::<_, RefreshError<String>>("fresh".to_string())
///     },
///     "initial".to_string(),
/// ));
/// let agent = UreqAuthMiddleware::new(manager)
///     .build_agent(ureq::Agent::config_builder().http_status_as_error(false));
/// // agent.get("https://api.example/items").call()?
/// # let _ = agent;
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "ureq")))]
pub struct UreqAuthMiddleware<T, E, K = ()> {
    manager: Arc<TokenManager<T, E, K>>,
    select: Arc<SelectFn<K>>,
    attach: Arc<AttachFn<T>>,
    classify: Arc<ClassifyFn>,
    replay_limit: usize,
}

impl<T, E> UreqAuthMiddleware<T, E> {
    /// A middleware that attaches tokens with their [`Credential`] impl
    /// (`Authorization: Bearer <token>` for strings, nothing for `()`).
    pub fn new(manager: Arc<TokenManager<T, E>>) -> Self
    where
        T: Credential,
    {
        Self::keyed(manager, |_: &request::Parts| ())
    }

    /// A middleware that attaches tokens with `attach`, which gets the token
    /// and the head of the request (before each attempt, as the caller built
    /// it).
    pub fn with_attach<F>(manager: Arc<TokenManager<T, E>>, attach: F) -> Self
    where
        F: Fn(&T, &mut request::Parts) + Send + Sync + 'static,
    {
        Self::keyed_with_attach(manager, |_: &request::Parts| (), attach)
    }
}

impl<T, E, K> UreqAuthMiddleware<T, E, K> {
    /// A middleware over a keyed manager: `select` picks each request's key
    /// from its head (a header, the host, an extension set with
    /// `.extension(…)` on the request), and the request is authorized with
    /// that key's credential.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{RefreshError, TokenManager, UreqAuthMiddleware};
    ///
    /// #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    /// struct Tenant(u32);
    ///
    /// let tenants = Arc::new(TokenManager::keyed_blocking(|tenant: Tenant, _stale: Option<String>| {
    ///     Ok::<_, RefreshError<String>>(format!("token-{}", tenant.0))
    /// }));
    /// let agent = UreqAuthMiddleware::keyed(tenants, |head: &http::request::Parts| {
    ///     head.extensions.get::<Tenant>().copied().unwrap_or(Tenant(0))
    /// })
    /// .build_agent(ureq::Agent::config_builder());
    /// // agent.get(url).extension(Tenant(7)).call()?
    /// # let _ = agent;
    /// ```
    pub fn keyed<F>(manager: Arc<TokenManager<T, E, K>>, select: F) -> Self
    where
        T: Credential,
        F: Fn(&request::Parts) -> K + Send + Sync + 'static,
    {
        Self::keyed_with_attach(manager, select, |token: &T, head: &mut request::Parts| {
            token.apply(&mut head.headers)
        })
    }

    /// A middleware over a keyed manager that picks each request's key with
    /// `select` (see [`keyed`](Self::keyed)) and attaches its token with
    /// `attach` (see [`with_attach`](UreqAuthMiddleware::with_attach)).
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
            classify: Arc::new(|response: &Response| {
                classify(response.status(), response.headers()).is_refresh()
            }),
            replay_limit: DEFAULT_REPLAY_LIMIT,
        }
    }

    /// Replaces the test for "unauthorized: refresh and send again" of a
    /// response, by default [`classify()`]. (An error `StatusCode(401)` always
    /// counts as unauthorized: see [Which answers are
    /// unauthorized](Self#which-answers-are-unauthorized).)
    pub fn with_classifier<F>(mut self, classifier: F) -> Self
    where
        F: Fn(&Response) -> bool + Send + Sync + 'static,
    {
        self.classify = Arc::new(classifier);
        self
    }

    /// Sets how many bytes of a request body are kept to send it again;
    /// longer bodies are streamed once. Default: [`DEFAULT_REPLAY_LIMIT`].
    /// `0` replays only requests without a body.
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }

    /// The token manager.
    pub fn manager(&self) -> &Arc<TokenManager<T, E, K>> {
        &self.manager
    }
}

impl<T, E, K> UreqAuthMiddleware<T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + fmt::Debug + fmt::Display + 'static,
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    /// An agent built from `config` with this middleware installed last
    /// (closest to the network, after the middleware already in `config`).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use epochflight::auth::{TokenManager, UreqAuthMiddleware};
    ///
    /// let manager: Arc<TokenManager<String, String>> =
    ///     Arc::new(TokenManager::new_blocking(|_| Ok("t".into())));
    /// let agent = UreqAuthMiddleware::new(manager).build_agent(
    ///     ureq::Agent::config_builder()
    ///         .http_status_as_error(false)
    ///         .timeout_global(Some(std::time::Duration::from_secs(10))),
    /// );
    /// # let _ = agent;
    /// ```
    pub fn build_agent(self, config: ConfigBuilder<AgentScope>) -> AuthAgent {
        self.build_agent_with(config, Agent::new_with_config)
    }

    /// As [`build_agent`](Self::build_agent), with your own way to make the
    /// agent from its config (`ureq::Agent::with_parts` with a connector and
    /// a resolver, say).
    pub fn build_agent_with(
        self,
        config: ConfigBuilder<AgentScope>,
        make: impl FnOnce(Config) -> Agent,
    ) -> AuthAgent {
        let agent = Arc::new_cyclic(|agent: &Weak<Agent>| {
            make(
                config
                    .middleware(Installed {
                        config: self,
                        agent: agent.clone(),
                    })
                    .build(),
            )
        });
        AuthAgent { agent }
    }
}

impl<T, E, K> Clone for UreqAuthMiddleware<T, E, K> {
    fn clone(&self) -> Self {
        Self {
            manager: self.manager.clone(),
            select: self.select.clone(),
            attach: self.attach.clone(),
            classify: self.classify.clone(),
            replay_limit: self.replay_limit,
        }
    }
}

impl<T, E, K> fmt::Debug for UreqAuthMiddleware<T, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UreqAuthMiddleware")
            .field("replay_limit", &self.replay_limit)
            .finish_non_exhaustive()
    }
}

/// A `ureq::Agent` with a [`UreqAuthMiddleware`] installed, from
/// [`UreqAuthMiddleware::build_agent`]. Use it as the agent (it dereferences
/// to one): `agent.get(url).call()`. Clones share the agent.
///
/// Keep the `AuthAgent` (or a clone) for as long as requests are sent: the
/// middleware replays through it, and a clone of the inner `ureq::Agent`
/// alone does not keep it (a request sent once the last `AuthAgent` is gone
/// is not replayed; its unauthorized answer comes back with
/// [`NotReplayed`](super::NotReplayed)).
///
/// Available with the `ureq` feature.
#[cfg_attr(docsrs, doc(cfg(feature = "ureq")))]
#[derive(Clone)]
pub struct AuthAgent {
    agent: Arc<Agent>,
}

impl Deref for AuthAgent {
    type Target = Agent;

    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl fmt::Debug for AuthAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthAgent").finish_non_exhaustive()
    }
}

/// Marks a replay sent through the agent: it passes the middleware as is.
#[derive(Clone, Copy)]
struct Replaying;

/// The middleware as installed in its agent.
struct Installed<T, E, K> {
    config: UreqAuthMiddleware<T, E, K>,
    agent: Weak<Agent>,
}

impl<T, E, K> Middleware for Installed<T, E, K>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + fmt::Debug + fmt::Display + 'static,
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    fn handle(
        &self,
        request: http::Request<SendBody<'_>>,
        next: MiddlewareNext<'_>,
    ) -> Result<Response, ureq::Error> {
        let extensions = request.extensions();
        if extensions.get::<SkipAuth>().is_some() || extensions.get::<Replaying>().is_some() {
            return next.handle(request);
        }
        let config = &self.config;
        let (head, body) = request.into_parts();
        let key = (config.select)(&head);
        let body = Kept::read(body, config.replay_limit).map_err(ureq::Error::Io)?;
        let mut attempts = Attempts {
            config,
            // Upgraded for this request only: a strong handle kept in the
            // middleware would keep its own agent alive forever.
            agent: self.agent.upgrade(),
            next: Some(next),
            replay_head: head.clone(),
            first_head: Some(head),
            body,
        };
        let credential = config.manager.for_key(&key);
        wait::blocking(exchange(&credential, &mut attempts, Wait::Blocking))
            .map_err(|error| ureq::Error::Other(Box::new(error)))?
            .into_answer(http::Response::extensions_mut)
    }
}

/// A request body, read before the first attempt.
enum Kept<'a> {
    /// Read whole, within the replay limit: sent from memory, as often as
    /// needed.
    Whole(Vec<u8>),
    /// Longer than the limit: what was read, then the rest of the reader;
    /// sent once. `None` once sent.
    Stream(Option<(Vec<u8>, Box<dyn Read + 'a>)>),
}

impl<'a> Kept<'a> {
    fn read(body: SendBody<'a>, limit: usize) -> io::Result<Self> {
        let mut reader = body.into_reader();
        let mut read = Vec::new();
        // One byte past the limit tells "exactly at the limit" from "more".
        let past_limit = u64::try_from(limit).map_or(u64::MAX, |limit| limit.saturating_add(1));
        (&mut reader).take(past_limit).read_to_end(&mut read)?;
        if read.len() <= limit {
            Ok(Kept::Whole(read))
        } else {
            Ok(Kept::Stream(Some((read, Box::new(reader)))))
        }
    }
}

/// A request through the middleware, as the retry routine sends it.
struct Attempts<'c, 'n, 'b, T, E, K> {
    config: &'c UreqAuthMiddleware<T, E, K>,
    agent: Option<Arc<Agent>>,
    next: Option<MiddlewareNext<'n>>,
    first_head: Option<request::Parts>,
    replay_head: request::Parts,
    body: Kept<'b>,
}

impl<T, E, K> Attempts<'_, '_, '_, T, E, K> {
    fn send_now(&mut self, token: T, attempt: Attempt) -> Result<Response, ureq::Error> {
        let mut head = match attempt {
            Attempt::First => self.first_head.take(),
            Attempt::Replay => Some(self.replay_head.clone()),
        }
        .expect("each attempt is sent once");
        (self.config.attach)(&token, &mut head);
        match &mut self.body {
            Kept::Whole(bytes) => {
                let carries_a_body = !bytes.is_empty()
                    || [Method::POST, Method::PUT, Method::PATCH].contains(&head.method);
                if !carries_a_body {
                    return self.dispatch(attempt, head, SendBody::none());
                }
                let framed = head.headers.contains_key(http::header::CONTENT_LENGTH)
                    || head.headers.contains_key(http::header::TRANSFER_ENCODING);
                if !framed {
                    head.headers
                        .insert(http::header::CONTENT_LENGTH, bytes.len().into());
                }
                // Out of `self` while it is sent, then back for a replay.
                let kept = std::mem::take(bytes);
                let mut unsent: &[u8] = &kept;
                let sent = self.dispatch(attempt, head, SendBody::from_reader(&mut unsent));
                self.body = Kept::Whole(kept);
                sent
            }
            Kept::Stream(kept) => {
                let (read, rest) = kept.take().expect("a stream is sent once");
                let mut stream = io::Cursor::new(read).chain(rest);
                self.dispatch(attempt, head, SendBody::from_reader(&mut stream))
            }
        }
    }

    fn dispatch(
        &mut self,
        attempt: Attempt,
        mut head: request::Parts,
        body: SendBody<'_>,
    ) -> Result<Response, ureq::Error> {
        match attempt {
            Attempt::First => {
                let next = self.next.take().expect("the chain runs once");
                next.handle(http::Request::from_parts(head, body))
            }
            Attempt::Replay => {
                head.extensions.insert(Replaying);
                let agent = self
                    .agent
                    .as_ref()
                    .expect("replayed only through its agent");
                agent.run(http::Request::from_parts(head, body))
            }
        }
    }
}

impl<T, E, K> Exchange<T> for Attempts<'_, '_, '_, T, E, K> {
    type Response = Response;
    type Error = ureq::Error;

    fn send(
        &mut self,
        token: T,
        attempt: Attempt,
    ) -> impl Future<Output = Result<Response, ureq::Error>> {
        std::future::ready(self.send_now(token, attempt))
    }

    fn is_unauthorized(&self, sent: &Result<Response, ureq::Error>) -> bool {
        match sent {
            Ok(response) => (self.config.classify)(response),
            Err(error) => matches!(error, ureq::Error::StatusCode(401)),
        }
    }

    fn can_replay(&self) -> bool {
        matches!(self.body, Kept::Whole(_)) && self.agent.is_some()
    }
}
