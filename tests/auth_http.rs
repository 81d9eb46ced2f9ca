//! `auth::TokenManager` end to end (issue 4): real HTTP clients against the
//! loopback OAuth-style server of `tests/support/server.rs`, whose rotating
//! refresh tokens revoke the whole session when one is presented twice.
//!
//! Clients: reqwest on tokio (bearer tokens, and HttpOnly cookies with
//! `T = ()`), a small HTTP/1.1 client on smol's own sockets, and ureq with
//! `send_blocking` from plain threads. The baselines at the end run the naive
//! "on 401 refresh and retry" clients against the same server and storms and
//! show that the server catches what the manager prevents.
//!
//! Concurrency is forced, never slept into: a `Storm` holds every request of
//! a burst until all of them hold their token, a `Valve` holds the refresh
//! request until every 401 has arrived, and the server's own counters
//! (`wait_until_async`, `wait_for_arrivals_async`) say when they have. The
//! only timed hold is the server's `unauthorized_delay`, which makes a 401
//! late; each such test asserts that the 401 really was still held back when
//! the refresh completed.

mod common;
#[path = "support/server.rs"]
mod server;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Gate, Rt, with_timeout};
use epochflight::auth::{AuthError, RefreshError, TokenManager, Unauthorized};
use server::{ServerConfig, TestServer};

/// The longest any single wait on the server may take.
const LIMIT: Duration = Duration::from_secs(30);
/// How long the server holds back a late 401: far longer than a refresh on
/// loopback takes. Each test using it checks that the 401 was still held.
const LATE: Duration = Duration::from_millis(1500);

// ------------------------------------------------------------------ types

/// What the client keeps: the access token it sends and the rotating refresh
/// token the refresher must present next.
#[derive(Clone, Debug, PartialEq)]
struct Tokens {
    access: String,
    refresh: String,
}

/// A client's response, reduced to what the tests look at.
#[derive(Clone, Debug, PartialEq)]
struct Resp {
    status: u16,
    body: String,
}

impl Unauthorized for Resp {
    fn is_unauthorized(&self) -> bool {
        self.status == 401
    }
}

type Refreshed<T> = Result<T, RefreshError<String>>;
type Sent = Result<Resp, AuthError<String>>;
type Manager = TokenManager<Tokens, String>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// ---------------------------------------------------------------- forcing

/// Holds the requests of a burst until the test fires it: each caller
/// arrives (counted) and waits; the test fires once all have arrived.
struct Storm {
    arrived: AtomicUsize,
    gate: Arc<Gate>,
    /// Callers of the burst that got their first response and now wait on
    /// the refresh (see [`track`]).
    parked: AtomicUsize,
}

impl Storm {
    fn new() -> Arc<Self> {
        Arc::new(Storm {
            arrived: AtomicUsize::new(0),
            gate: Gate::new(),
            parked: AtomicUsize::new(0),
        })
    }

    async fn arrive(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        self.gate.wait().await;
    }

    fn arrive_blocking(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        self.gate.wait_blocking();
    }

    fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Waits until `n` callers have arrived, then lets them all go.
    async fn fire_at(&self, n: usize) {
        wait_for(|| self.arrived() == n).await;
        self.gate.open();
    }

    fn fire_at_blocking(&self, n: usize) {
        common::until_blocking(|| self.arrived() == n);
        self.gate.open();
    }
}

/// Runs `hook` each time the inner future returns `Pending`.
struct OnPending<F> {
    future: Pin<Box<F>>,
    hook: Box<dyn FnMut() + Send>,
}

impl<F: Future> Future for OnPending<F> {
    type Output = F::Output;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let poll = self.future.as_mut().poll(cx);
        if poll.is_pending() {
            (self.hook)();
        }
        poll
    }
}

/// Wraps a `send` of a burst: once its first response is in (`answered`),
/// the first time it has to wait it is waiting on the refresh (as its leader,
/// at the valve, or as a follower), and it is counted in `storm.parked`.
/// With the valve held, no newer token exists, so nothing else can make it
/// wait before its retry.
fn track<F: Future>(
    storm: Option<&Arc<Storm>>,
    answered: &Arc<AtomicBool>,
    future: F,
) -> OnPending<F> {
    let (storm, answered, mut counted) = (storm.cloned(), answered.clone(), false);
    OnPending {
        future: Box::pin(future),
        hook: Box::new(move || {
            if let Some(storm) = &storm {
                if !counted && answered.load(Ordering::SeqCst) {
                    counted = true;
                    storm.parked.fetch_add(1, Ordering::SeqCst);
                }
            }
        }),
    }
}

/// The gate the refresher passes before it sends the refresh request. Open
/// unless the test holds it.
struct Valve(Mutex<Arc<Gate>>);

impl Valve {
    fn new() -> Arc<Self> {
        let open = Gate::new();
        open.open();
        Arc::new(Valve(Mutex::new(open)))
    }

    /// Refresh requests from now on wait until the returned gate is opened.
    fn hold(&self) -> Arc<Gate> {
        let gate = Gate::new();
        *self.0.lock().unwrap() = gate.clone();
        gate
    }

    fn current(&self) -> Arc<Gate> {
        self.0.lock().unwrap().clone()
    }

    async fn pass(&self) {
        self.current().wait().await
    }

    fn pass_blocking(&self) {
        self.current().wait_blocking()
    }
}

/// Polls `condition` (every millisecond, on a timer that works on any
/// executor) until it holds; the test's timeout catches one that never does.
async fn wait_for(mut condition: impl FnMut() -> bool) {
    while !condition() {
        smol::Timer::after(Duration::from_millis(1)).await;
    }
}

async fn server_reaches(s: &TestServer, pred: impl Fn(&server::Counters) -> bool + Send + 'static) {
    assert!(
        s.wait_until_async(pred, LIMIT).await,
        "server counters: {:?}",
        s.counters()
    );
}

/// Waits until `deadline` (to let a cool-down pass; never to order events).
async fn wait_until_instant(deadline: Instant) {
    wait_for(|| Instant::now() >= deadline).await;
}

// ------------------------------------------------------- token endpoint

fn form(refresh_token: &str) -> String {
    format!("grant_type=refresh_token&refresh_token={refresh_token}")
}

/// The string value of `"key":"value"` in a flat JSON object.
fn field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = json[start..].find('"')?;
    Some(json[start..start + len].to_owned())
}

/// What a token endpoint's answer means: new tokens; `invalid_grant` (any
/// 4xx) ends the session; a 5xx is passing.
fn refresh_outcome(status: u16, body: String) -> Refreshed<String> {
    match status {
        200 => Ok(body),
        400..=499 => Err(RefreshError::Rejected(body)),
        _ => Err(RefreshError::Transient(format!("{status} {body}"))),
    }
}

fn tokens_from(body: &str) -> Refreshed<Tokens> {
    match (field(body, "access_token"), field(body, "refresh_token")) {
        (Some(access), Some(refresh)) => Ok(Tokens { access, refresh }),
        _ => Err(RefreshError::Transient(format!(
            "unreadable token response {body}"
        ))),
    }
}

fn transport<E: std::fmt::Display>(error: E) -> RefreshError<String> {
    RefreshError::Transient(error.to_string())
}

fn initial(s: &TestServer) -> Tokens {
    let (access, refresh) = s.initial_tokens();
    Tokens { access, refresh }
}

// ----------------------------------------------------------------- reqwest

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The client's refresh call: POST /token with the stale refresh token.
async fn reqwest_refresh(
    client: reqwest::Client,
    url: String,
    valve: Arc<Valve>,
    stale: Option<Tokens>,
) -> Refreshed<Tokens> {
    let stale = stale.ok_or_else(|| RefreshError::Rejected("no refresh token".to_string()))?;
    valve.pass().await;
    let r = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&stale.refresh))
        .send()
        .await
        .map_err(transport)?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(transport)?;
    tokens_from(&refresh_outcome(status, body)?)
}

fn reqwest_manager(s: &TestServer, client: &reqwest::Client, valve: &Arc<Valve>) -> Manager {
    let (client, url, valve) = (client.clone(), s.url("/token"), valve.clone());
    TokenManager::with_token(
        move |stale| reqwest_refresh(client.clone(), url.clone(), valve.clone(), stale),
        initial(s),
    )
}

async fn reqwest_get(client: &reqwest::Client, url: &str, access: &str) -> Resp {
    let r = client
        .get(url)
        .bearer_auth(access)
        .send()
        .await
        .expect("GET");
    let status = r.status().as_u16();
    let body = r.text().await.expect("body");
    Resp { status, body }
}

/// One `send` of GET `path` on its own tokio task. Its first attempt waits in
/// `storm` (if any) before it is sent. Returns the result and the access
/// token each attempt used.
fn spawn_get(
    m: &Arc<Manager>,
    client: &reqwest::Client,
    url: String,
    storm: Option<&Arc<Storm>>,
) -> tokio::task::JoinHandle<(Sent, Vec<String>)> {
    let (m, client) = (m.clone(), client.clone());
    let answered = Arc::new(AtomicBool::new(false));
    let (mut first, done) = (storm.cloned(), answered.clone());
    let used = Arc::new(Mutex::new(Vec::new()));
    let log = used.clone();
    let send = async move {
        let sent = m
            .send(move |tokens: Tokens| {
                log.lock().unwrap().push(tokens.access.clone());
                let (client, url, storm, done) =
                    (client.clone(), url.clone(), first.take(), done.clone());
                async move {
                    if let Some(storm) = storm {
                        storm.arrive().await;
                    }
                    let resp = reqwest_get(&client, &url, &tokens.access).await;
                    done.store(true, Ordering::SeqCst);
                    resp
                }
            })
            .await;
        let used = used.lock().unwrap().clone();
        (sent, used)
    };
    tokio::spawn(track(storm, &answered, send))
}

async fn join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("task panicked"));
    }
    out
}

fn ok(resp: &Sent) -> bool {
    matches!(resp, Ok(Resp { status: 200, .. }))
}

// ------------------------------------------------------------ 1. storm

/// 200 concurrent requests after the token expired: all 200 are sent with
/// the expired token and refused, and the refresh is held until every 401 has
/// arrived. One refresh, 200 successes, no reuse detection.
#[test]
fn storm_of_200_after_expiry_refreshes_once() {
    Rt::Tokio.run("storm_of_200", || async {
        let s = TestServer::start(ServerConfig::default());
        let client = client();
        let valve = Valve::new();
        let m = Arc::new(reqwest_manager(&s, &client, &valve));
        let first = m.token().await.unwrap();
        s.expire_access_tokens();
        let refresh = valve.hold();
        let storm = Storm::new();
        let tasks: Vec<_> = (0..200)
            .map(|_| spawn_get(&m, &client, s.url("/resource"), Some(&storm)))
            .collect();
        storm.fire_at(200).await;
        server_reaches(&s, |c| c.resource_unauthorized == 200).await;
        wait_for(|| m.stats().refresh_calls == 1).await;
        wait_for(|| storm.parked() == 200).await; // every 401 is in, waiting on the refresh
        assert!(m.is_refreshing());
        assert_eq!(
            s.refresh_calls(),
            0,
            "the refresh request is held at the valve"
        );
        refresh.open();

        let results = join(tasks).await;
        for (sent, used) in &results {
            assert!(ok(sent), "{sent:?}");
            assert_eq!(used.len(), 2, "each request is sent twice");
            assert_eq!(used[0], first.value.access);
        }
        let fresh = m.token().await.unwrap();
        assert!(fresh.epoch > first.epoch);
        assert!(
            results
                .iter()
                .all(|(_, used)| used[1] == fresh.value.access)
        );

        let c = s.counters();
        assert_eq!(c.refresh_calls, 1, "{c:?}");
        assert_eq!(c.successful_refreshes, 1);
        assert_eq!(c.reuse_detections, 0);
        assert_eq!((c.resource_unauthorized, c.resource_ok), (200, 200));
        let stats = m.stats();
        assert_eq!((stats.refresh_calls, stats.refreshes_succeeded), (1, 1));
        assert_eq!((stats.retries, stats.sign_outs), (200, 0));
    });
}

// --------------------------------------------------------- 2. late 401

/// Requests sent with the old token whose 401s arrive after the refresh
/// completed (held back by the server): each is retried with the new token,
/// and there is still exactly one refresh.
#[test]
fn late_401_after_the_refresh_retries_with_the_new_token() {
    Rt::Tokio.run("late_401", || async {
        let s = TestServer::start(ServerConfig::default());
        let client = client();
        let m = Arc::new(reqwest_manager(&s, &client, &Valve::new()));
        s.expire_access_tokens();
        s.set_unauthorized_delay(LATE);
        let late: Vec<_> = (0..20)
            .map(|_| spawn_get(&m, &client, s.url("/resource"), None))
            .collect();
        // All 20 verdicts are fixed (401), their answers held back.
        assert!(s.wait_for_arrivals_async(20, LIMIT).await);
        s.set_unauthorized_delay(Duration::ZERO);

        // Another request meets the expiry and refreshes, start to finish.
        let (sent, used) = spawn_get(&m, &client, s.url("/resource"), None)
            .await
            .unwrap();
        assert!(ok(&sent), "{sent:?}");
        assert_eq!(used.len(), 2);
        assert!(s.wait_for_refresh_calls_async(1, LIMIT).await);
        assert_eq!(s.successful_refreshes(), 1);
        assert!(
            late.iter().all(|t| !t.is_finished()),
            "the late 401s were still held back when the refresh completed"
        );

        for (sent, used) in join(late).await {
            assert!(ok(&sent), "{sent:?}");
            assert_eq!(used.len(), 2, "retried once, with the new token");
        }
        let c = s.counters();
        assert_eq!(c.refresh_calls, 1, "the late 401s refreshed nothing: {c:?}");
        assert_eq!(c.reuse_detections, 0);
        assert_eq!((c.resource_unauthorized, c.resource_ok), (21, 21));
        let stats = m.stats();
        assert_eq!((stats.refresh_calls, stats.retries), (1, 21));
    });
}

// ------------------------------------------------------------ 3. waves

/// Five expiries, each met by 100 concurrent requests: exactly five
/// refreshes, each presenting the refresh token the previous one issued.
#[test]
fn five_waves_of_100_refresh_exactly_five_times() {
    Rt::Tokio.run("five_waves", || async {
        let s = TestServer::start(ServerConfig::default());
        let client = client();
        let valve = Valve::new();
        let m = Arc::new(reqwest_manager(&s, &client, &valve));
        let mut epoch = m.epoch();
        for wave in 1..=5u64 {
            s.expire_access_tokens();
            let refresh = valve.hold();
            let storm = Storm::new();
            let tasks: Vec<_> = (0..100)
                .map(|_| spawn_get(&m, &client, s.url("/resource"), Some(&storm)))
                .collect();
            storm.fire_at(100).await;
            server_reaches(&s, move |c| c.resource_unauthorized == 100 * wave).await;
            wait_for(|| m.stats().refresh_calls == wave).await;
            wait_for(|| storm.parked() == 100).await; // every 401 is in, waiting on the refresh
            assert_eq!(s.refresh_calls(), wave - 1);
            refresh.open();
            for (sent, used) in join(tasks).await {
                assert!(ok(&sent), "wave {wave}: {sent:?}");
                assert_eq!(used.len(), 2);
            }
            let c = s.counters();
            assert_eq!(c.refresh_calls, wave, "one refresh per wave: {c:?}");
            assert_eq!(c.successful_refreshes, wave);
            assert_eq!(c.resource_ok, 100 * wave);
            assert!(m.epoch() > epoch);
            epoch = m.epoch();
        }
        assert_eq!(s.reuse_detections(), 0);
        let stats = m.stats();
        assert_eq!((stats.refresh_calls, stats.refreshes_succeeded), (5, 5));
        assert_eq!(stats.retries, 500);
    });
}

// ---------------------------------------------------------- 4. rejected

/// The refresh is rejected (`invalid_grant`): every waiter gets the same
/// error, the manager signs out, the next call makes no HTTP request at all,
/// and `sign_in` restores it.
#[test]
fn rejected_refresh_signs_out_and_sign_in_restores() {
    Rt::Tokio.run("rejected_refresh", || async {
        let s = TestServer::start(ServerConfig::default());
        let client = client();
        let valve = Valve::new();
        let sign_outs = Arc::new(AtomicUsize::new(0));
        let m = {
            let n = sign_outs.clone();
            reqwest_manager(&s, &client, &valve).on_sign_out(move || {
                n.fetch_add(1, Ordering::SeqCst);
            })
        };
        let m = Arc::new(m);
        s.expire_access_tokens();
        s.reject_refresh(true);
        let refresh = valve.hold();
        let storm = Storm::new();
        let tasks: Vec<_> = (0..50)
            .map(|_| spawn_get(&m, &client, s.url("/resource"), Some(&storm)))
            .collect();
        storm.fire_at(50).await;
        server_reaches(&s, |c| c.resource_unauthorized == 50).await;
        wait_for(|| m.stats().refresh_calls == 1).await;
        wait_for(|| storm.parked() == 50).await; // every 401 is in, waiting on the refresh
        refresh.open();

        let results = join(tasks).await;
        let first = results[0].0.clone().unwrap_err();
        match &first {
            AuthError::Refresh(RefreshError::Rejected(body)) => {
                assert_eq!(field(body, "error").as_deref(), Some("invalid_grant"))
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        for (sent, used) in &results {
            assert_eq!(
                sent.as_ref().unwrap_err(),
                &first,
                "every waiter, the same error"
            );
            assert_eq!(used.len(), 1, "no retry after a failed refresh");
        }
        assert!(m.is_signed_out());
        assert_eq!(sign_outs.load(Ordering::SeqCst), 1);
        let stats = m.stats();
        assert_eq!((stats.refresh_calls, stats.refreshes_rejected), (1, 1));
        assert_eq!((stats.sign_outs, stats.retries), (1, 0));
        assert_eq!(s.refresh_calls(), 1);

        // Signed out: no HTTP request at all.
        let before = s.counters();
        let (sent, used) = spawn_get(&m, &client, s.url("/resource"), None)
            .await
            .unwrap();
        assert_eq!(sent, Err(AuthError::SignedOut));
        assert!(used.is_empty(), "no request was built");
        assert_eq!(m.token().await, Err(AuthError::SignedOut));
        assert_eq!(
            m.refresh_if_current(m.epoch()).await,
            Err(AuthError::SignedOut)
        );
        assert_eq!(s.counters(), before, "the server saw nothing");

        // A new login restores the manager.
        s.reject_refresh(false);
        let (access, refresh) = s.sign_in_new_session();
        m.sign_in(Tokens { access, refresh });
        assert!(!m.is_signed_out());
        let (sent, used) = spawn_get(&m, &client, s.url("/resource"), None)
            .await
            .unwrap();
        assert!(ok(&sent), "{sent:?}");
        assert_eq!(used.len(), 1);
        // ...and it refreshes the new session's tokens.
        s.expire_access_tokens();
        let (sent, used) = spawn_get(&m, &client, s.url("/resource"), None)
            .await
            .unwrap();
        assert!(ok(&sent), "{sent:?}");
        assert_eq!(used.len(), 2);
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (2, 1, 0)
        );
        assert_eq!(sign_outs.load(Ordering::SeqCst), 1);
    });
}

// --------------------------------------------------------- 5. transient

const COOLDOWN: Duration = Duration::from_millis(1000);

/// The token endpoint answers 503: every waiter gets the same error, the
/// session is kept, a request inside the cool-down gets that error without a
/// refresh request, and after the cool-down the next one recovers.
#[test]
fn transient_refresh_failure_cools_down_then_recovers() {
    Rt::Tokio.run("transient_refresh", || async {
        let s = TestServer::start(ServerConfig::default());
        let client = client();
        let valve = Valve::new();
        let m = Arc::new(reqwest_manager(&s, &client, &valve).with_cooldown(COOLDOWN));
        let old = m.token().await.unwrap();
        s.expire_access_tokens();
        s.fail_refresh_with(Some(503));
        let refresh = valve.hold();
        let storm = Storm::new();
        let tasks: Vec<_> = (0..50)
            .map(|_| spawn_get(&m, &client, s.url("/resource"), Some(&storm)))
            .collect();
        storm.fire_at(50).await;
        server_reaches(&s, |c| c.resource_unauthorized == 50).await;
        wait_for(|| m.stats().refresh_calls == 1).await;
        wait_for(|| storm.parked() == 50).await; // every 401 is in, waiting on the refresh
        let opened = Instant::now(); // the failure is recorded after this...
        refresh.open();

        let results = join(tasks).await;
        let failed = Instant::now(); // ...and before this
        let first = results[0].0.clone().unwrap_err();
        assert!(
            matches!(&first, AuthError::Refresh(RefreshError::Transient(e)) if e.starts_with("503")),
            "{first:?}"
        );
        for (sent, _) in &results {
            assert_eq!(sent.as_ref().unwrap_err(), &first);
        }
        assert!(!m.is_signed_out(), "a transient failure keeps the session");
        assert_eq!(m.current(), Some(old.clone()));
        assert_eq!(s.refresh_calls(), 1);
        assert_eq!(m.stats().refreshes_failed, 1);

        // Inside the cool-down: the request is refused, no refresh request.
        let (sent, used) = spawn_get(&m, &client, s.url("/resource"), None).await.unwrap();
        assert_eq!(sent.unwrap_err(), first, "the same error, at once");
        assert_eq!(used, vec![old.value.access.clone()]);
        assert_eq!(m.token().await.unwrap(), old, "the session is kept");
        assert_eq!(s.refresh_calls(), 1, "no refresh inside the cool-down");
        assert_eq!(m.stats().cooled_down, 1);
        assert!(opened.elapsed() < COOLDOWN, "the checks above ran inside the cool-down");

        // After it: recovery.
        s.fail_refresh_with(None);
        wait_until_instant(failed + COOLDOWN).await;
        let (sent, used) = spawn_get(&m, &client, s.url("/resource"), None).await.unwrap();
        assert!(ok(&sent), "{sent:?}");
        assert_eq!(used.len(), 2);
        let c = s.counters();
        assert_eq!((c.refresh_calls, c.successful_refreshes, c.reuse_detections), (2, 1, 0));
        let stats = m.stats();
        assert_eq!((stats.refreshes_succeeded, stats.cooled_down, stats.sign_outs), (1, 1, 0));
    });
}

// ------------------------------------------------------ 6. always 401

/// A resource that always answers 401: each request is sent at most twice
/// and its second 401 returned; refreshes never exceed the number of
/// distinct tokens (epochs) the first attempts were sent with.
#[test]
fn always_401_is_retried_once_and_refreshes_stay_bounded() {
    Rt::Tokio.run("always_401", || async {
        let s = TestServer::start(ServerConfig::default());
        let client = client();
        let valve = Valve::new();
        let m = Arc::new(reqwest_manager(&s, &client, &valve));

        // Forced rounds: all first attempts of a round share one epoch.
        for round in 1..=3u64 {
            let refresh = valve.hold();
            let storm = Storm::new();
            let tasks: Vec<_> = (0..50)
                .map(|_| spawn_get(&m, &client, s.url("/always401"), Some(&storm)))
                .collect();
            storm.fire_at(50).await;
            server_reaches(&s, move |c| c.arrivals == 100 * (round - 1) + 50).await;
            wait_for(|| m.stats().refresh_calls == round).await;
            wait_for(|| storm.parked() == 50).await; // every 401 is in, waiting on the refresh
            refresh.open();
            for (sent, used) in join(tasks).await {
                assert_eq!(
                    sent.unwrap().status,
                    401,
                    "the second 401 is returned as is"
                );
                assert_eq!(used.len(), 2, "retried exactly once");
                assert_ne!(used[0], used[1], "the retry used the new token");
            }
            assert_eq!(s.hits("/always401"), 100 * round);
            assert_eq!(s.refresh_calls(), round, "one epoch, one refresh");
        }

        // Free for all: no forcing at all.
        let before = s.counters();
        let tasks: Vec<_> = (0..100)
            .map(|_| spawn_get(&m, &client, s.url("/always401"), None))
            .collect();
        let mut first_tokens = HashSet::new();
        for (sent, used) in join(tasks).await {
            assert_eq!(sent.unwrap().status, 401);
            assert_eq!(used.len(), 2);
            first_tokens.insert(used[0].clone());
        }
        let refreshes = s.refresh_calls() - before.refresh_calls;
        assert!(
            (1..=first_tokens.len() as u64).contains(&refreshes),
            "{refreshes} refreshes for {} distinct first tokens",
            first_tokens.len()
        );
        assert_eq!(s.hits("/always401"), 300 + 200);
        assert_eq!(s.reuse_detections(), 0);
        assert_eq!(s.successful_refreshes(), s.refresh_calls());
        assert_eq!(m.stats().retries, 250);
        assert!(!m.is_signed_out());
    });
}

// ------------------------------------------------------ 7. cookie mode

/// The client's refresh call in cookie mode: POST /cookie/refresh; the
/// cookie store sends the refresh cookie and keeps the rotated ones.
async fn cookie_refresh(client: reqwest::Client, url: String, valve: Arc<Valve>) -> Refreshed<()> {
    valve.pass().await;
    let r = client.post(url).send().await.map_err(transport)?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(transport)?;
    refresh_outcome(status, body).map(drop)
}

/// HttpOnly cookies (`T = ()`): the same storm of 200 causes one refresh,
/// and the rotated refresh cookie serves the next expiry.
#[test]
fn cookie_mode_storm_refreshes_once() {
    Rt::Tokio.run("cookie_storm", || async {
        let s = TestServer::start(ServerConfig::default());
        let (access, refresh) = s.initial_tokens();
        let jar = Arc::new(reqwest::cookie::Jar::default());
        let base: reqwest::Url = s.base_url().parse().unwrap();
        jar.add_cookie_str(&format!("access={access}; HttpOnly; Path=/"), &base);
        jar.add_cookie_str(&format!("refresh={refresh}; HttpOnly; Path=/"), &base);
        let client = reqwest::Client::builder()
            .no_proxy()
            .cookie_provider(jar)
            .build()
            .unwrap();
        let valve = Valve::new();
        let m: Arc<TokenManager<(), String>> = {
            let (client, url, valve) = (client.clone(), s.url("/cookie/refresh"), valve.clone());
            Arc::new(TokenManager::with_token(
                move |_stale: Option<()>| {
                    cookie_refresh(client.clone(), url.clone(), valve.clone())
                },
                (),
            ))
        };
        let get = |storm: Option<Arc<Storm>>| {
            let (m, client, url) = (m.clone(), client.clone(), s.url("/resource"));
            let answered = Arc::new(AtomicBool::new(false));
            let (mut first, done) = (storm.clone(), answered.clone());
            let send = async move {
                m.send(move |()| {
                    let (client, url, storm, done) =
                        (client.clone(), url.clone(), first.take(), done.clone());
                    async move {
                        if let Some(storm) = storm {
                            storm.arrive().await;
                        }
                        let r = client.get(url).send().await.expect("GET");
                        let status = r.status().as_u16();
                        let resp = Resp {
                            status,
                            body: r.text().await.expect("body"),
                        };
                        done.store(true, Ordering::SeqCst);
                        resp
                    }
                })
                .await
            };
            tokio::spawn(track(storm.as_ref(), &answered, send))
        };
        assert!(ok(&get(None).await.unwrap()), "the seeded cookie is sent");

        s.expire_access_tokens();
        let held = valve.hold();
        let storm = Storm::new();
        let tasks: Vec<_> = (0..200).map(|_| get(Some(storm.clone()))).collect();
        storm.fire_at(200).await;
        server_reaches(&s, |c| c.resource_unauthorized == 200).await;
        wait_for(|| m.stats().refresh_calls == 1).await;
        wait_for(|| storm.parked() == 200).await; // every 401 is in, waiting on the refresh
        assert_eq!(s.refresh_calls(), 0);
        held.open();
        for sent in join(tasks).await {
            assert!(ok(&sent), "{sent:?}");
        }
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (1, 1, 0)
        );
        assert_eq!(c.resource_ok, 201);
        assert_eq!(m.stats().retries, 200);

        // The next expiry presents the rotated refresh cookie.
        s.expire_access_tokens();
        assert!(ok(&get(None).await.unwrap()));
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (2, 2, 0)
        );
    });
}

// ------------------------------------------------------------ smol client

/// A minimal HTTP/1.1 client on smol's own sockets (`Connection: close`):
/// a client that runs on smol, with no tokio anywhere on its side.
mod smol_http {
    use super::Resp;
    use smol::io::{AsyncReadExt, AsyncWriteExt};
    use std::net::SocketAddr;

    pub async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> std::io::Result<Resp> {
        let mut stream = smol::net::TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(body);
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw);
        let bad = || std::io::Error::other(format!("bad response: {text:?}"));
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let (_, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
        Ok(Resp {
            status,
            body: body.to_owned(),
        })
    }

    pub async fn get(addr: SocketAddr, path: &str, access: &str) -> Resp {
        let auth = [("Authorization", format!("Bearer {access}"))];
        request(addr, "GET", path, &auth, "").await.expect("GET")
    }
}

fn smol_manager(s: &TestServer, valve: &Arc<Valve>) -> Manager {
    let (addr, valve) = (s.addr(), valve.clone());
    TokenManager::with_token(
        move |stale: Option<Tokens>| {
            let valve = valve.clone();
            async move {
                let stale =
                    stale.ok_or_else(|| RefreshError::Rejected("no refresh token".into()))?;
                valve.pass().await;
                let form_type = [(
                    "Content-Type",
                    "application/x-www-form-urlencoded".to_string(),
                )];
                let r =
                    smol_http::request(addr, "POST", "/token", &form_type, &form(&stale.refresh))
                        .await
                        .map_err(transport)?;
                tokens_from(&refresh_outcome(r.status, r.body)?)
            }
        },
        initial(s),
    )
}

fn smol_spawn_get(
    m: &Arc<Manager>,
    s: &TestServer,
    storm: Option<&Arc<Storm>>,
) -> smol::Task<(Sent, usize)> {
    let (m, addr) = (m.clone(), s.addr());
    let answered = Arc::new(AtomicBool::new(false));
    let (mut first, done) = (storm.cloned(), answered.clone());
    let send = async move {
        let attempts = Arc::new(AtomicUsize::new(0));
        let n = attempts.clone();
        let sent = m
            .send(move |tokens: Tokens| {
                n.fetch_add(1, Ordering::SeqCst);
                let (storm, done) = (first.take(), done.clone());
                async move {
                    if let Some(storm) = storm {
                        storm.arrive().await;
                    }
                    let resp = smol_http::get(addr, "/resource", &tokens.access).await;
                    done.store(true, Ordering::SeqCst);
                    resp
                }
            })
            .await;
        (sent, attempts.load(Ordering::SeqCst))
    };
    smol::spawn(track(storm, &answered, send))
}

/// The storm of 200 with a client on smol: one refresh, 200 successes.
#[test]
fn smol_client_storm_refreshes_once() {
    Rt::Smol.run("smol_storm", || async {
        let s = TestServer::start(ServerConfig::default());
        let valve = Valve::new();
        let m = Arc::new(smol_manager(&s, &valve));
        assert!(ok(&smol_spawn_get(&m, &s, None).await.0));
        s.expire_access_tokens();
        let refresh = valve.hold();
        let storm = Storm::new();
        let tasks: Vec<_> = (0..200)
            .map(|_| smol_spawn_get(&m, &s, Some(&storm)))
            .collect();
        storm.fire_at(200).await;
        server_reaches(&s, |c| c.resource_unauthorized == 200).await;
        wait_for(|| m.stats().refresh_calls == 1).await;
        wait_for(|| storm.parked() == 200).await; // every 401 is in, waiting on the refresh
        assert_eq!(s.refresh_calls(), 0);
        refresh.open();
        for task in tasks {
            let (sent, attempts) = task.await;
            assert!(ok(&sent), "{sent:?}");
            assert_eq!(attempts, 2);
        }
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (1, 1, 0)
        );
        assert_eq!((c.resource_unauthorized, c.resource_ok), (200, 201));
        assert_eq!(m.stats().retries, 200);
    });
}

/// Late 401s with the client on smol: retried with the new token, one
/// refresh.
#[test]
fn smol_client_late_401_refreshes_once() {
    Rt::Smol.run("smol_late_401", || async {
        let s = TestServer::start(ServerConfig::default());
        let m = Arc::new(smol_manager(&s, &Valve::new()));
        s.expire_access_tokens();
        s.set_unauthorized_delay(LATE);
        let late: Vec<_> = (0..20).map(|_| smol_spawn_get(&m, &s, None)).collect();
        assert!(s.wait_for_arrivals_async(20, LIMIT).await);
        s.set_unauthorized_delay(Duration::ZERO);
        let (sent, attempts) = smol_spawn_get(&m, &s, None).await;
        assert!(ok(&sent), "{sent:?}");
        assert_eq!(attempts, 2);
        assert!(
            late.iter().all(|t| !t.is_finished()),
            "the late 401s were still held back"
        );
        for task in late {
            let (sent, attempts) = task.await;
            assert!(ok(&sent), "{sent:?}");
            assert_eq!(attempts, 2);
        }
        let c = s.counters();
        assert_eq!((c.refresh_calls, c.reuse_detections), (1, 0));
        assert_eq!(c.resource_ok, 21);
    });
}

// -------------------------------------------------- ureq, send_blocking

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn ureq_manager(s: &TestServer, valve: &Arc<Valve>) -> Manager {
    let (agent, url, valve) = (agent(), s.url("/token"), valve.clone());
    TokenManager::with_token_blocking(
        move |stale: Option<Tokens>| {
            let stale = stale.ok_or_else(|| RefreshError::Rejected("no refresh token".into()))?;
            valve.pass_blocking();
            let mut r = agent
                .post(&url)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .send(form(&stale.refresh))
                .map_err(transport)?;
            let status = r.status().as_u16();
            let body = r.body_mut().read_to_string().map_err(transport)?;
            tokens_from(&refresh_outcome(status, body)?)
        },
        initial(s),
    )
}

/// `send_blocking` of GET /resource with ureq on `threads` plain threads,
/// whose first attempts wait in `storm`. Each returns its result and the
/// number of attempts.
fn ureq_storm(
    m: &Arc<Manager>,
    s: &TestServer,
    storm: &Arc<Storm>,
    threads: usize,
) -> Vec<std::thread::JoinHandle<(Sent, usize)>> {
    (0..threads)
        .map(|_| {
            let (m, url, storm, agent) = (m.clone(), s.url("/resource"), storm.clone(), agent());
            std::thread::spawn(move || {
                let mut attempts = 0;
                let sent = m.send_blocking(|tokens: Tokens| {
                    attempts += 1;
                    if attempts == 1 {
                        storm.arrive_blocking();
                    }
                    let mut r = agent
                        .get(&url)
                        .header("Authorization", format!("Bearer {}", tokens.access))
                        .call()
                        .expect("GET");
                    let status = r.status().as_u16();
                    let body = r.body_mut().read_to_string().expect("body");
                    if attempts == 1 {
                        // In hand; a blocking waiter cannot be seen waiting.
                        storm.parked.fetch_add(1, Ordering::SeqCst);
                    }
                    Resp { status, body }
                });
                (sent, attempts)
            })
        })
        .collect()
}

/// The storm from 100 plain threads with ureq and `send_blocking`.
#[test]
fn ureq_send_blocking_storm_refreshes_once() {
    with_timeout("ureq_storm", || {
        let s = TestServer::start(ServerConfig::default());
        let valve = Valve::new();
        let m = Arc::new(ureq_manager(&s, &valve));
        s.expire_access_tokens();
        let refresh = valve.hold();
        let storm = Storm::new();
        let threads = ureq_storm(&m, &s, &storm, 100);
        storm.fire_at_blocking(100);
        assert!(s.wait_until(|c| c.resource_unauthorized == 100, LIMIT));
        common::until_blocking(|| m.stats().refresh_calls == 1 && storm.parked() == 100);
        assert_eq!(s.refresh_calls(), 0);
        refresh.open();
        for thread in threads {
            let (sent, attempts) = thread.join().unwrap();
            assert!(ok(&sent), "{sent:?}");
            assert_eq!(attempts, 2);
        }
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (1, 1, 0)
        );
        assert_eq!(c.resource_ok, 100);
        let stats = m.stats();
        assert_eq!((stats.refresh_calls, stats.retries), (1, 100));
    });
}

/// A rejected refresh seen from 50 plain threads: the same error for all,
/// signed out, no request afterwards, `sign_in` restores.
#[test]
fn ureq_send_blocking_rejected_signs_out() {
    with_timeout("ureq_rejected", || {
        let s = TestServer::start(ServerConfig::default());
        let valve = Valve::new();
        let m = Arc::new(ureq_manager(&s, &valve));
        s.expire_access_tokens();
        s.reject_refresh(true);
        let refresh = valve.hold();
        let storm = Storm::new();
        let threads = ureq_storm(&m, &s, &storm, 50);
        storm.fire_at_blocking(50);
        assert!(s.wait_until(|c| c.resource_unauthorized == 50, LIMIT));
        common::until_blocking(|| m.stats().refresh_calls == 1 && storm.parked() == 50);
        refresh.open();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Every thread has its 401 in hand, but a blocking caller cannot be
        // seen waiting: one that reached the manager only after the session
        // ended is told so (SignedOut). The async tests force every caller
        // to wait and check that all get the rejection.
        let first = results
            .iter()
            .find_map(|(sent, _)| match sent {
                Err(e @ AuthError::Refresh(RefreshError::Rejected(_))) => Some(e.clone()),
                _ => None,
            })
            .expect("the rejection reached its waiters");
        for (sent, attempts) in &results {
            let error = sent.as_ref().unwrap_err();
            assert!(
                error == &first || error == &AuthError::SignedOut,
                "{error:?}"
            );
            assert_eq!(*attempts, 1, "no retry after a failed refresh");
        }
        assert_eq!(s.refresh_calls(), 1);
        assert!(m.is_signed_out());
        assert_eq!(m.stats().sign_outs, 1);

        let before = s.counters();
        let mut built = 0;
        let sent = m.send_blocking(|_| {
            built += 1;
            Resp {
                status: 200,
                body: String::new(),
            }
        });
        assert_eq!(sent, Err(AuthError::SignedOut));
        assert_eq!(m.token_blocking(), Err(AuthError::SignedOut));
        assert_eq!(built, 0);
        assert_eq!(s.counters(), before, "no HTTP request while signed out");

        s.reject_refresh(false);
        let (access, refresh) = s.sign_in_new_session();
        m.sign_in(Tokens { access, refresh });
        s.expire_access_tokens();
        let storm = Storm::new();
        let threads = ureq_storm(&m, &s, &storm, 10);
        storm.fire_at_blocking(10);
        for thread in threads {
            let (sent, _) = thread.join().unwrap();
            assert!(ok(&sent), "{sent:?}");
        }
        let c = s.counters();
        assert_eq!(
            (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
            (2, 1, 0)
        );
    });
}

// -------------------------------------------------------------- baselines

/// The naive client of seed 000: on a 401, refresh with the stored refresh
/// token and retry. No coalescing.
struct Naive {
    client: reqwest::Client,
    token_url: String,
    tokens: Mutex<Tokens>,
}

impl Naive {
    async fn get(&self, url: &str, fire: &Storm, herd: &Storm) -> Resp {
        let access = self.tokens.lock().unwrap().access.clone();
        fire.arrive().await;
        let resp = reqwest_get(&self.client, url, &access).await;
        if resp.status != 401 {
            return resp;
        }
        // The interceptor: read the stored refresh token and refresh. The
        // herd holds the refresh requests until every 401 is in hand, as when
        // N responses fail together.
        let refresh = self.tokens.lock().unwrap().refresh.clone();
        herd.arrive().await;
        let refreshed = reqwest_refresh(
            self.client.clone(),
            self.token_url.clone(),
            Valve::new(),
            Some(Tokens { access, refresh }),
        )
        .await;
        match refreshed {
            Ok(tokens) => {
                let access = tokens.access.clone();
                *self.tokens.lock().unwrap() = tokens;
                reqwest_get(&self.client, url, &access).await
            }
            Err(_) => resp, // "logout"
        }
    }
}

/// Baseline for test 1: the naive client, the same server, the same storm of
/// 200. Every 401 refreshes, the refresh token is presented 200 times, the
/// server detects the reuse and revokes the session.
#[test]
fn baseline_naive_client_storm_trips_reuse_detection() {
    Rt::Tokio.run("baseline_naive_storm", || async {
        let s = TestServer::start(ServerConfig::default());
        let naive = Arc::new(Naive {
            client: client(),
            token_url: s.url("/token"),
            tokens: Mutex::new(initial(&s)),
        });
        s.expire_access_tokens();
        let (fire, herd) = (Storm::new(), Storm::new());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (naive, url, fire, herd) = (
                    naive.clone(),
                    s.url("/resource"),
                    fire.clone(),
                    herd.clone(),
                );
                tokio::spawn(async move { naive.get(&url, &fire, &herd).await })
            })
            .collect();
        fire.fire_at(200).await;
        herd.fire_at(200).await;
        let oks = join(tasks).await.iter().filter(|r| r.status == 200).count();
        let c = s.counters();
        assert_eq!(c.refresh_calls, 200, "one refresh per 401: {c:?}");
        assert!(c.refresh_calls > 1);
        assert_eq!(
            c.reuse_detections, 1,
            "the second presentation revoked the session"
        );
        assert_eq!(c.successful_refreshes, 1);
        assert!(oks <= 1, "the session is gone: {oks} requests succeeded");
    });
}

/// The `isRefreshing` flag + queue client of seed 001: coalesces 401s that
/// arrive while its refresh runs, but a 401 arriving after the refresh
/// finished finds the flag down and refreshes again.
struct Flagged {
    client: reqwest::Client,
    token_url: String,
    tokens: Mutex<Tokens>,
    state: Mutex<FlagState>,
}

#[derive(Default)]
struct FlagState {
    is_refreshing: bool,
    queue: Vec<futures::channel::oneshot::Sender<Refreshed<Tokens>>>,
}

impl Flagged {
    fn get(self: &Arc<Self>, url: String) -> BoxFuture<Resp> {
        let this = self.clone();
        Box::pin(async move {
            let access = this.tokens.lock().unwrap().access.clone();
            let resp = reqwest_get(&this.client, &url, &access).await;
            if resp.status != 401 {
                return resp;
            }
            let queued = {
                let mut state = this.state.lock().unwrap();
                if state.is_refreshing {
                    let (tx, rx) = futures::channel::oneshot::channel();
                    state.queue.push(tx);
                    Some(rx)
                } else {
                    state.is_refreshing = true;
                    None
                }
            };
            let refreshed = match queued {
                Some(rx) => rx
                    .await
                    .unwrap_or_else(|_| Err(RefreshError::Transient("dropped".into()))),
                None => {
                    let stale = this.tokens.lock().unwrap().clone();
                    let refreshed = reqwest_refresh(
                        this.client.clone(),
                        this.token_url.clone(),
                        Valve::new(),
                        Some(stale),
                    )
                    .await;
                    if let Ok(tokens) = &refreshed {
                        *this.tokens.lock().unwrap() = tokens.clone();
                    }
                    let queue = {
                        let mut state = this.state.lock().unwrap();
                        state.is_refreshing = false;
                        std::mem::take(&mut state.queue)
                    };
                    for tx in queue {
                        let _ = tx.send(refreshed.clone());
                    }
                    refreshed
                }
            };
            match refreshed {
                Ok(tokens) => reqwest_get(&this.client, &url, &tokens.access).await,
                Err(_) => resp,
            }
        })
    }
}

/// Baseline for test 2: the flag client, the same server, the same late
/// 401s. The manager refreshed once; the flag client refreshes again for
/// the late 401s, because its flag cannot tell "my token is stale" from
/// "the current token was rejected".
#[test]
fn baseline_is_refreshing_flag_refreshes_again_on_late_401() {
    Rt::Tokio.run("baseline_flag_late_401", || async {
        let s = TestServer::start(ServerConfig::default());
        let flagged = Arc::new(Flagged {
            client: client(),
            token_url: s.url("/token"),
            tokens: Mutex::new(initial(&s)),
            state: Mutex::new(FlagState::default()),
        });
        s.expire_access_tokens();
        s.set_unauthorized_delay(LATE);
        let late: Vec<_> = (0..20)
            .map(|_| tokio::spawn(flagged.get(s.url("/resource"))))
            .collect();
        assert!(s.wait_for_arrivals_async(20, LIMIT).await);
        s.set_unauthorized_delay(Duration::ZERO);
        let resp = flagged.get(s.url("/resource")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(s.refresh_calls(), 1);
        assert!(
            late.iter().all(|t| !t.is_finished()),
            "the late 401s were still held back"
        );
        join(late).await;
        let c = s.counters();
        assert!(c.refresh_calls > 1, "the late 401s refreshed again: {c:?}");
    });
}
