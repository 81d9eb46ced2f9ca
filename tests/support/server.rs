//! A loopback OAuth-style API server with rotating refresh tokens, for tests and examples.
//!
//! Included by path (`#[path = "support/server.rs"] mod server;`), so it names only
//! external crates (tokio, hyper, hyper-util, http-body-util, bytes) and `std`.
//!
//! The server runs on its own tokio runtime on a background thread, so clients on tokio,
//! on smol or on plain threads can all use it. Dropping the [`TestServer`] stops it.
//!
//! # Endpoints
//! - `POST /token`, body `application/x-www-form-urlencoded`
//!   `grant_type=refresh_token&refresh_token=<rt>`. Success: 200
//!   `{"access_token":"..","refresh_token":"..","expires_in":N,"token_type":"Bearer"}`;
//!   the presented refresh token becomes *used* (rotation). Presenting a used refresh
//!   token again is *reuse*: the whole session is revoked (its access tokens and its
//!   current refresh token) and the answer is 400 `{"error":"invalid_grant",..}`, as it
//!   is for unknown or revoked refresh tokens.
//! - `POST /cookie/refresh`: the same rules, with the refresh token read from
//!   `Cookie: refresh=<rt>`; success is 200 `{"expires_in":N}` with
//!   `Set-Cookie: access=<at>; HttpOnly; Path=/` and `Set-Cookie: refresh=<rt>; HttpOnly; Path=/`.
//!   A failure clears both cookies (`Max-Age=0`).
//! - Protected (any method): `/resource` and `/resource/<anything>` answer 200 with a small
//!   JSON body if the access token (`Authorization: Bearer <at>`, else the `access` cookie)
//!   is known, unexpired and its session not revoked; otherwise 401 with
//!   `WWW-Authenticate: Bearer error="invalid_token"`. `/always401` always answers that
//!   401, `/forbidden` always 403, `/scope` always 401 with
//!   `WWW-Authenticate: Bearer error="insufficient_scope"`.
//!
//! Reuse grace ([`ServerConfig::reuse_grace`], as Auth0, Cognito and Hydra offer): a
//! session's *previous* refresh token is accepted once more within the grace after its
//! rotation (counted in [`Counters::grace_reuses`], apart from reuse detections); any
//! later presentation is reuse.
//!
//! Hold mode ([`TestServer::hold_refresh_responses`]): the token endpoint rotates on
//! arrival and holds its response until [`TestServer::release_held_responses`], so a
//! client killed meanwhile surely loses the new token ([`Counters::held_responses`]
//! tells the test the rotation happened).
//!
//! Holding 401s ([`TestServer::hold_unauthorized`]): a protected request's 401 is held
//! after its verdict until [`TestServer::release_held_unauthorized`]
//! ([`Counters::held_unauthorized`] counts them), so a test decides when a client sees
//! its late 401.
//!
//! The verdict of a protected request is fixed when it *arrives*; a 401 is then held back
//! for `unauthorized_delay` (a "late 401"), so it stays a 401 even if a refresh completes
//! meanwhile. A request counts as arrived (see [`TestServer::wait_for_arrivals`]) once its
//! verdict is fixed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, oneshot};

/// Settings fixed at start; the `set_*` methods of [`TestServer`] change them later.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Lifetime of issued access tokens (reported as whole seconds in `expires_in`).
    pub expires_in: Duration,
    /// Time the token endpoints take before deciding (both endpoints).
    pub refresh_latency: Duration,
    /// Time a 401 from a protected endpoint is held back after its verdict.
    pub unauthorized_delay: Duration,
    /// If true, a successful refresh also invalidates the session's older access tokens.
    /// Default false: like JWTs, old access tokens stay valid until they expire.
    pub revoke_old_access_on_refresh: bool,
    /// How long after a rotation the previous refresh token is accepted once more.
    /// Default zero: no grace, any second presentation is reuse.
    pub reuse_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            expires_in: Duration::from_secs(3600),
            refresh_latency: Duration::ZERO,
            unauthorized_delay: Duration::ZERO,
            revoke_old_access_on_refresh: false,
            reuse_grace: Duration::ZERO,
        }
    }
}

/// Snapshot of the server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Every HTTP request, any path.
    pub requests_total: u64,
    /// Calls to `/token` or `/cookie/refresh`, counted on arrival (before the latency).
    pub refresh_calls: u64,
    /// Refreshes that rotated the tokens.
    pub successful_refreshes: u64,
    /// Times a used refresh token was presented (each revoked a session).
    pub reuse_detections: u64,
    /// Previous refresh tokens accepted within the reuse grace (not reuse detections).
    pub grace_reuses: u64,
    /// Token-endpoint responses that were held (rotation done, response not sent yet).
    pub held_responses: u64,
    /// 401s from protected endpoints that were held (verdict fixed, response not sent yet).
    pub held_unauthorized: u64,
    /// Requests to protected endpoints whose verdict is fixed.
    pub arrivals: u64,
    /// 200s from protected endpoints.
    pub resource_ok: u64,
    /// 401s from protected endpoints (counted at the verdict, before any delay).
    pub resource_unauthorized: u64,
}

struct AccessToken {
    session: u64,
    expires_at: Instant,
}

struct RefreshToken {
    session: u64,
    used: bool,
    /// When it was rotated (first presented with success).
    used_at: Option<Instant>,
    /// Whether its one presentation within the reuse grace happened.
    grace_used: bool,
}

/// Everything mutable, behind one mutex.
struct State {
    cfg: ServerConfig,
    fail_refresh: Option<u16>,
    reject_refresh: bool,
    hold_responses: bool,
    /// Bumped by `release_held_responses`: a held response waits for a bump.
    releases: u64,
    hold_unauthorized: bool,
    /// Bumped by `release_held_unauthorized`.
    unauthorized_releases: u64,
    /// session id -> its previous refresh token (the one rotated last).
    previous: HashMap<u64, String>,
    next_id: u64,
    /// session id -> revoked?
    sessions: HashMap<u64, bool>,
    access: HashMap<String, AccessToken>,
    refresh: HashMap<String, RefreshToken>,
    initial: (String, String),
    counters: Counters,
    hits: HashMap<String, u64>,
}

impl State {
    fn new_session(&mut self) -> (String, String) {
        self.next_id += 1;
        let session = self.next_id;
        self.sessions.insert(session, false);
        self.issue(session)
    }

    /// Issues a fresh (access, refresh) pair for `session`.
    fn issue(&mut self, session: u64) -> (String, String) {
        self.next_id += 1;
        let n = self.next_id;
        let (at, rt) = (format!("at-s{session}-{n}"), format!("rt-s{session}-{n}"));
        let expires_at = Instant::now() + self.cfg.expires_in;
        self.access.insert(
            at.clone(),
            AccessToken {
                session,
                expires_at,
            },
        );
        self.refresh.insert(
            rt.clone(),
            RefreshToken {
                session,
                used: false,
                used_at: None,
                grace_used: false,
            },
        );
        (at, rt)
    }

    fn session_live(&self, session: u64) -> bool {
        self.sessions.get(&session) == Some(&false)
    }

    fn access_valid(&self, at: &str) -> bool {
        self.access
            .get(at)
            .is_some_and(|t| Instant::now() < t.expires_at && self.session_live(t.session))
    }

    /// The rotation / reuse-detection rules. `Err` carries the error description.
    fn rotate(&mut self, rt: &str) -> Result<(String, String), &'static str> {
        let Some(tok) = self.refresh.get_mut(rt) else {
            return Err("unknown refresh token");
        };
        let session = tok.session;
        if self.sessions.get(&session) != Some(&false) {
            return Err("session revoked");
        }
        let grace = self.cfg.reuse_grace;
        if tok.used
            && !tok.grace_used
            && self.previous.get(&session).map(String::as_str) == Some(rt)
            && tok.used_at.is_some_and(|at| at.elapsed() < grace)
        {
            tok.grace_used = true;
            self.counters.grace_reuses += 1;
            self.counters.successful_refreshes += 1;
            return Ok(self.issue(session));
        }
        if tok.used {
            self.sessions.insert(session, true);
            self.counters.reuse_detections += 1;
            return Err("refresh token reuse detected; session revoked");
        }
        tok.used = true;
        tok.used_at = Some(Instant::now());
        self.previous.insert(session, rt.to_owned());
        if self.cfg.revoke_old_access_on_refresh {
            self.access.retain(|_, t| t.session != session);
        }
        self.counters.successful_refreshes += 1;
        Ok(self.issue(session))
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken on every counter change: `changed` for blocking waiters, `notify` for async.
    changed: Condvar,
    notify: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then wakes every waiter.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.notify_all();
        self.notify.notify_waiters();
        r
    }
}

/// Handle to a running server. Thread-safe; dropping it stops the server.
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` and serves on a background thread; one session is signed in
    /// (see [`TestServer::initial_tokens`]).
    pub fn start(config: ServerConfig) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let mut state = State {
            cfg: config,
            fail_refresh: None,
            reject_refresh: false,
            hold_responses: false,
            releases: 0,
            hold_unauthorized: false,
            unauthorized_releases: 0,
            previous: HashMap::new(),
            next_id: 0,
            sessions: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            initial: (String::new(), String::new()),
            counters: Counters::default(),
            hits: HashMap::new(),
        };
        state.initial = state.new_session();
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            notify: Notify::new(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        let runtime = rt.handle().clone();
        let (tx, rx) = oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("epochflight-test-server".into())
            .spawn(move || {
                rt.block_on(serve(listener, s, rx));
                // Dropping the runtime here cancels every connection task.
            })
            .expect("spawn server thread");
        TestServer {
            addr,
            shared,
            runtime,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url() + path`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// The (access, refresh) pair issued at start. Valid until rotated, expired or revoked.
    pub fn initial_tokens(&self) -> (String, String) {
        self.shared.lock().initial.clone()
    }

    /// Alias of [`TestServer::initial_tokens`].
    pub fn session(&self) -> (String, String) {
        self.initial_tokens()
    }

    /// Signs in a new, independent session and returns its (access, refresh) pair.
    pub fn sign_in_new_session(&self) -> (String, String) {
        self.shared.update(|s| s.new_session())
    }

    /// Revokes every session: all access and refresh tokens issued so far become invalid.
    pub fn revoke_session(&self) {
        self.shared
            .update(|s| s.sessions.values_mut().for_each(|r| *r = true));
    }

    /// Every access token issued so far becomes expired; refresh tokens stay valid.
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        self.shared
            .update(|s| s.access.values_mut().for_each(|t| t.expires_at = now));
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_expires_in(&self, d: Duration) {
        self.shared.update(|s| s.cfg.expires_in = d);
    }

    pub fn set_refresh_latency(&self, d: Duration) {
        self.shared.update(|s| s.cfg.refresh_latency = d);
    }

    /// Holds back every 401 from protected endpoints by `d` (the verdict is taken first).
    pub fn set_unauthorized_delay(&self, d: Duration) {
        self.shared.update(|s| s.cfg.unauthorized_delay = d);
    }

    /// While `Some(status)`, both token endpoints answer `status` with
    /// `{"error":"temporarily_unavailable"}` and rotate nothing.
    pub fn fail_refresh_with(&self, status: Option<u16>) {
        self.shared.update(|s| s.fail_refresh = status);
    }

    /// While true, both token endpoints answer 400 invalid_grant and change nothing.
    pub fn reject_refresh(&self, reject: bool) {
        self.shared.update(|s| s.reject_refresh = reject);
    }

    /// While true, the token endpoints rotate on arrival (before any latency) and hold
    /// their response until [`TestServer::release_held_responses`] or until hold mode
    /// is turned off; each held response counts in [`Counters::held_responses`] once
    /// its rotation is done.
    pub fn hold_refresh_responses(&self, hold: bool) {
        self.shared.update(|s| s.hold_responses = hold);
    }

    /// Sends every response held so far.
    pub fn release_held_responses(&self) {
        self.shared.update(|s| s.releases += 1);
    }

    /// While true, every 401 from a protected endpoint is held after its verdict until
    /// [`TestServer::release_held_unauthorized`] or until this mode is turned off; each
    /// counts in [`Counters::held_unauthorized`].
    pub fn hold_unauthorized(&self, hold: bool) {
        self.shared.update(|s| s.hold_unauthorized = hold);
    }

    /// Sends every 401 held so far.
    pub fn release_held_unauthorized(&self) {
        self.shared.update(|s| s.unauthorized_releases += 1);
    }

    /// Lets the previous refresh token of a session be accepted once more within `d`
    /// of its rotation (applies to rotations already made too).
    pub fn set_reuse_grace(&self, d: Duration) {
        self.shared.update(|s| s.cfg.reuse_grace = d);
    }

    pub fn grace_reuses(&self) -> u64 {
        self.counters().grace_reuses
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters
    }
    pub fn requests_total(&self) -> u64 {
        self.counters().requests_total
    }
    pub fn refresh_calls(&self) -> u64 {
        self.counters().refresh_calls
    }
    pub fn successful_refreshes(&self) -> u64 {
        self.counters().successful_refreshes
    }
    pub fn reuse_detections(&self) -> u64 {
        self.counters().reuse_detections
    }
    pub fn arrivals(&self) -> u64 {
        self.counters().arrivals
    }
    pub fn resource_ok(&self) -> u64 {
        self.counters().resource_ok
    }
    pub fn resource_unauthorized(&self) -> u64 {
        self.counters().resource_unauthorized
    }

    /// Requests received for exactly this path (any method, query excluded).
    pub fn hits(&self, path: &str) -> u64 {
        self.shared.lock().hits.get(path).copied().unwrap_or(0)
    }

    /// Blocks until `pred(counters)` holds; false on timeout. Blocks the calling thread:
    /// from async code use [`TestServer::wait_until_async`].
    pub fn wait_until(&self, pred: impl Fn(&Counters) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if pred(&st.counters) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Async twin of [`TestServer::wait_until`], for any executor (tokio, smol, ...): the
    /// waiting and the timer run on the server's runtime.
    pub fn wait_until_async(
        &self,
        pred: impl Fn(&Counters) -> bool + Send + 'static,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let wait = async move {
                loop {
                    let notified = shared.notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable(); // register before checking: no lost wake-up
                    if pred(&shared.lock().counters) {
                        return;
                    }
                    notified.await;
                }
            };
            let _ = tx.send(tokio::time::timeout(timeout, wait).await.is_ok());
        });
        async move { rx.await.unwrap_or(false) }
    }

    /// Blocks until at least `n` protected requests have arrived (verdict fixed).
    pub fn wait_for_arrivals(&self, n: u64, timeout: Duration) -> bool {
        self.wait_until(move |c| c.arrivals >= n, timeout)
    }

    pub fn wait_for_arrivals_async(
        &self,
        n: u64,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send + 'static {
        self.wait_until_async(move |c| c.arrivals >= n, timeout)
    }

    /// Blocks until at least `n` token-endpoint calls have arrived (before their latency).
    pub fn wait_for_refresh_calls(&self, n: u64, timeout: Duration) -> bool {
        self.wait_until(move |c| c.refresh_calls >= n, timeout)
    }

    pub fn wait_for_refresh_calls_async(
        &self,
        n: u64,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send + 'static {
        self.wait_until_async(move |c| c.refresh_calls >= n, timeout)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- serving

type Resp = Response<Full<Bytes>>;

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await; // e.g. out of fds
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    // Keep-alive is hyper's default for HTTP/1.1.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_owned();
    shared.update(|s| {
        s.counters.requests_total += 1;
        *s.hits.entry(path.clone()).or_default() += 1;
    });
    let resp = match path.as_str() {
        "/token" | "/cookie/refresh" if req.method() != Method::POST => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#.into(),
        ),
        "/token" => token_endpoint(&shared, req, false).await,
        "/cookie/refresh" => token_endpoint(&shared, req, true).await,
        "/resource" | "/always401" | "/forbidden" | "/scope" => protected(&shared, &req).await,
        p if p.starts_with("/resource/") => protected(&shared, &req).await,
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#.into()),
    };
    Ok(resp)
}

const INVALID_TOKEN: &str = r#"Bearer error="invalid_token""#;
const INSUFFICIENT_SCOPE: &str = r#"Bearer error="insufficient_scope""#;

/// Protected endpoints: verdict on arrival, then (for 401s) the configured delay.
async fn protected(shared: &Shared, req: &Request<Incoming>) -> Resp {
    let path = req.uri().path();
    let token = bearer(req).or_else(|| cookie(req, "access"));
    let (status, challenge, delay, session, hold) = shared.update(|s| {
        let token = token.as_deref();
        let session = token.and_then(|t| s.access.get(t)).map(|t| t.session);
        let valid = token.is_some_and(|t| s.access_valid(t));
        let (status, challenge) = match path {
            "/forbidden" => (StatusCode::FORBIDDEN, None),
            "/scope" => (StatusCode::UNAUTHORIZED, Some(INSUFFICIENT_SCOPE)),
            "/always401" => (StatusCode::UNAUTHORIZED, Some(INVALID_TOKEN)),
            _ if valid => (StatusCode::OK, None),
            _ => (StatusCode::UNAUTHORIZED, Some(INVALID_TOKEN)),
        };
        s.counters.arrivals += 1;
        match status {
            StatusCode::OK => s.counters.resource_ok += 1,
            StatusCode::UNAUTHORIZED => s.counters.resource_unauthorized += 1,
            _ => {}
        }
        let hold = (status == StatusCode::UNAUTHORIZED && s.hold_unauthorized).then(|| {
            s.counters.held_unauthorized += 1;
            s.unauthorized_releases
        });
        (status, challenge, s.cfg.unauthorized_delay, session, hold)
    });
    if status == StatusCode::UNAUTHORIZED && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(releases) = hold {
        loop {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable(); // register before checking: no lost wake-up
            {
                let s = shared.lock();
                if !s.hold_unauthorized || s.unauthorized_releases > releases {
                    break;
                }
            }
            notified.await;
        }
    }
    let body = match status {
        StatusCode::OK => format!(
            r#"{{"resource":"{path}","session":{}}}"#,
            session.unwrap_or(0)
        ),
        StatusCode::FORBIDDEN => r#"{"error":"forbidden"}"#.into(),
        _ => r#"{"error":"unauthorized"}"#.into(),
    };
    let mut resp = json(status, body);
    if let Some(c) = challenge {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
    }
    resp
}

/// `POST /token` (form body) and `POST /cookie/refresh` (cookie).
async fn token_endpoint(shared: &Shared, req: Request<Incoming>, cookie_mode: bool) -> Resp {
    let (latency, hold) = shared.update(|s| {
        s.counters.refresh_calls += 1;
        (
            s.cfg.refresh_latency,
            s.hold_responses.then_some(s.releases),
        )
    });
    let presented = if cookie_mode {
        Ok(cookie(&req, "refresh"))
    } else {
        read_form(req).await.map(|form| {
            let get = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            // A wrong grant type is answered below as a missing refresh token.
            get("grant_type")
                .filter(|g| g == "refresh_token")
                .and(get("refresh_token"))
        })
    };
    // In hold mode the decision (and rotation) is taken on arrival.
    if hold.is_none() && !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let outcome = shared.update(|s| {
        if let Some(code) = s.fail_refresh {
            return Err((code, "temporarily_unavailable", "injected failure"));
        }
        let rt = match &presented {
            Err(()) => return Err((400, "invalid_request", "unreadable body")),
            Ok(None) => {
                return Err((
                    400,
                    "invalid_request",
                    "missing grant_type=refresh_token or refresh_token",
                ));
            }
            Ok(Some(rt)) => rt,
        };
        if s.reject_refresh {
            return Err((400, "invalid_grant", "refresh rejected"));
        }
        let expires_in = s.cfg.expires_in.as_secs();
        s.rotate(rt)
            .map(|(at, rt)| (at, rt, expires_in))
            .map_err(|d| (400, "invalid_grant", d))
    });
    if let Some(releases) = hold {
        shared.update(|s| s.counters.held_responses += 1);
        loop {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable(); // register before checking: no lost wake-up
            {
                let s = shared.lock();
                if !s.hold_responses || s.releases > releases {
                    break;
                }
            }
            notified.await;
        }
    }
    match outcome {
        Ok((at, rt, expires_in)) if cookie_mode => {
            let mut resp = json(StatusCode::OK, format!(r#"{{"expires_in":{expires_in}}}"#));
            set_cookie(&mut resp, &format!("access={at}; HttpOnly; Path=/"));
            set_cookie(&mut resp, &format!("refresh={rt}; HttpOnly; Path=/"));
            resp
        }
        Ok((at, rt, expires_in)) => json(
            StatusCode::OK,
            format!(
                r#"{{"access_token":"{at}","refresh_token":"{rt}","expires_in":{expires_in},"token_type":"Bearer"}}"#
            ),
        ),
        Err((code, error, description)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = format!(r#"{{"error":"{error}","error_description":"{description}"}}"#);
            let mut resp = json(status, body);
            if cookie_mode && error == "invalid_grant" {
                set_cookie(&mut resp, "access=; HttpOnly; Path=/; Max-Age=0");
                set_cookie(&mut resp, "refresh=; HttpOnly; Path=/; Max-Age=0");
            }
            resp
        }
    }
}

// ---------------------------------------------------------------- helpers

fn json(status: StatusCode, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn set_cookie(resp: &mut Resp, value: &str) {
    let v = HeaderValue::from_str(value).expect("cookie header value");
    resp.headers_mut().append(header::SET_COOKIE, v);
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer<B>(req: &Request<B>) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// The value of cookie `name` from any `Cookie` header.
fn cookie<B>(req: &Request<B>, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Reads an `application/x-www-form-urlencoded` body into (key, value) pairs.
async fn read_form(req: Request<Incoming>) -> Result<Vec<(String, String)>, ()> {
    let body = req.into_body().collect().await.map_err(|_| ())?.to_bytes();
    let body = std::str::from_utf8(&body).map_err(|_| ())?;
    Ok(body
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect())
}

/// Form decoding: `+` is a space, `%XX` a byte; malformed escapes are kept as is.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
