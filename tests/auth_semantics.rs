//! The contract of `auth::TokenManager` (DESIGN §3) without HTTP: the
//! refresher is a script whose calls are counted and held at test-controlled
//! gates, so every interleaving a test claims is forced, never slept into.
//! Every async scenario runs on tokio (multi-thread) and on smol.

#[macro_use]
mod common;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{Gate, Probe, Rt, Task, until, until_blocking};
use epochflight::auth::{AuthError, RefreshError, TokenManager, Unauthorized};
use epochflight::{Epoch, Versioned};

type Refreshed<T> = Result<T, RefreshError<String>>;
type Got<T> = Result<Versioned<T>, AuthError<String>>;
type Manager = TokenManager<u32, String>;
type NextToken<T> = dyn Fn(Option<&T>) -> T + Send + Sync;

// ---------------------------------------------------------------- harness

/// A refresher whose calls are counted, whose results are queued by the
/// test, and which waits at the gate installed by [`Script::hold`].
struct Script<T> {
    calls: AtomicUsize,
    stale: Mutex<Vec<Option<T>>>,
    gate: Mutex<Arc<Gate>>,
    results: Mutex<VecDeque<Refreshed<T>>>,
    /// The result when none is queued: the next token after the stale one.
    next: Box<NextToken<T>>,
    /// Watches every refresher future: started, finished, dropped unfinished.
    probe: Arc<Probe>,
}

impl<T: Clone + Send + Sync + 'static> Script<T> {
    fn new(next: impl Fn(Option<&T>) -> T + Send + Sync + 'static) -> Arc<Self> {
        let open = Gate::new();
        open.open();
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            stale: Mutex::new(Vec::new()),
            gate: Mutex::new(open),
            results: Mutex::new(VecDeque::new()),
            next: Box::new(next),
            probe: Probe::new(),
        })
    }

    /// Refresher calls from now on wait at a new, closed gate, returned.
    fn hold(&self) -> Arc<Gate> {
        let gate = Gate::new();
        *self.gate.lock().unwrap() = gate.clone();
        gate
    }

    /// The next refresher call returns `result` (calls take results in the
    /// order they are made, before they wait at their gate).
    fn then(&self, result: Refreshed<T>) {
        self.results.lock().unwrap().push_back(result);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn stale(&self) -> Vec<Option<T>> {
        self.stale.lock().unwrap().clone()
    }

    fn refresh(self: &Arc<Self>, stale: Option<T>) -> impl Future<Output = Refreshed<T>> + use<T> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = self.results.lock().unwrap().pop_front();
        let result = result.unwrap_or_else(|| Ok((self.next)(stale.as_ref())));
        self.stale.lock().unwrap().push(stale);
        let gate = self.gate.lock().unwrap().clone();
        self.probe.watch(async move {
            gate.wait().await;
            result
        })
    }

    fn manager(self: &Arc<Self>, token: Option<T>) -> TokenManager<T, String> {
        let script = self.clone();
        let refresh = move |stale| script.refresh(stale);
        match token {
            Some(token) => TokenManager::with_token(refresh, token),
            None => TokenManager::new(refresh),
        }
    }
}

/// Tokens are numbers; a refresh returns the next one.
fn counting() -> Arc<Script<u32>> {
    Script::new(|stale| stale.map_or(1, |n| n + 1))
}

/// A response: only its status matters.
#[derive(Debug, PartialEq)]
struct Status(u16);

impl Unauthorized for Status {
    fn is_unauthorized(&self) -> bool {
        self.0 == 401
    }
}

/// A request that the "server" accepts with any token but `expired`.
fn request(expired: u32) -> impl FnMut(u32) -> std::future::Ready<Status> + Send + 'static {
    move |token| std::future::ready(Status(if token == expired { 401 } else { 200 }))
}

/// Runs `hook` each time the inner future returns `Pending`.
struct OnPending<F> {
    future: Pin<Box<F>>,
    hook: Box<dyn FnMut() + Send>,
}

impl<F: Future> Future for OnPending<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let poll = self.future.as_mut().poll(cx);
        if poll.is_pending() {
            (self.hook)();
        }
        poll
    }
}

fn on_pending<F: Future>(future: F, hook: impl FnMut() + Send + 'static) -> OnPending<F> {
    OnPending {
        future: Box::pin(future),
        hook: Box::new(hook),
    }
}

/// Counts `future` once in `parked` when it first has to wait. With the
/// refresher held at a gate, a caller that waits is waiting on the flight.
fn parked<F: Future>(future: F, parked: &Arc<AtomicUsize>) -> OnPending<F> {
    let (parked, mut counted) = (parked.clone(), false);
    on_pending(future, move || {
        if !counted {
            counted = true;
            parked.fetch_add(1, Ordering::SeqCst);
        }
    })
}

fn count(n: &AtomicUsize) -> usize {
    n.load(Ordering::SeqCst)
}

fn spawn_token<T>(rt: Rt, m: &Arc<TokenManager<T, String>>, n: &Arc<AtomicUsize>) -> Task<Got<T>>
where
    T: Clone + Send + Sync + 'static,
{
    let m = m.clone();
    rt.spawn(parked(async move { m.token().await }, n))
}

fn spawn_refresh(rt: Rt, m: &Arc<Manager>, seen: Epoch, n: &Arc<AtomicUsize>) -> Task<Got<u32>> {
    let m = m.clone();
    rt.spawn(parked(async move { m.refresh_if_current(seen).await }, n))
}

fn spawn_send(
    rt: Rt,
    m: &Arc<Manager>,
    expired: u32,
    n: &Arc<AtomicUsize>,
) -> Task<Result<Status, AuthError<String>>> {
    let m = m.clone();
    rt.spawn(parked(async move { m.send(request(expired)).await }, n))
}

async fn join_all<T: Send + 'static>(tasks: Vec<Task<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(
            task.join()
                .await
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        );
    }
    out
}

/// Waits for a moment in time: polls a runtime-independent timer. Used only
/// to let a cool-down pass, never to order concurrent events.
async fn wait_until_instant(deadline: Instant) {
    while Instant::now() < deadline {
        smol::Timer::after(Duration::from_millis(5)).await;
    }
}

/// A blocking call on its own thread; `until` then waits for it without
/// blocking the runtime.
struct Thread<R>(std::thread::JoinHandle<R>);

impl<R: Send + 'static> Thread<R> {
    fn spawn(f: impl FnOnce() -> R + Send + 'static) -> Self {
        Thread(std::thread::spawn(f))
    }

    async fn join(self) -> R {
        until(|| self.0.is_finished()).await;
        self.0
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

fn rejected() -> AuthError<String> {
    AuthError::Refresh(RefreshError::Rejected("invalid_grant".into()))
}

fn transient() -> AuthError<String> {
    AuthError::Refresh(RefreshError::Transient("503".into()))
}

// ---------------------------------------------------------- request gate

/// `token()` is the request gate: callers arriving while a refresh is in
/// flight wait for it (they are seen parked) and get the new token, never
/// the old one.
fn token_callers_wait_for_the_refresh_in_flight(rt: Rt) {
    rt.run("token_callers_wait", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let e1 = m.epoch();
        let gate = script.hold();
        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;
        assert!(m.is_refreshing());

        let waiting = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..20).map(|_| spawn_token(rt, &m, &waiting)).collect();
        until(|| count(&waiting) == 20).await;
        assert!(
            m.is_refreshing(),
            "nothing finished while the gate is closed"
        );
        gate.open();

        let fresh = leader.join().await.unwrap().unwrap();
        assert_eq!(fresh.value, 2);
        assert!(fresh.epoch > e1);
        for got in join_all(callers).await {
            assert_eq!(got.unwrap(), fresh, "every caller got the new token");
        }
        assert_eq!(script.calls(), 1);
        assert_eq!(script.stale(), vec![Some(1)]);
        let stats = m.stats();
        assert_eq!((stats.refresh_calls, stats.refreshes_succeeded), (1, 1));
    });
}

/// A manager with no token fetches one, once, however many callers ask.
fn first_token_is_fetched_once(rt: Rt) {
    rt.run("first_token_is_fetched_once", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(None));
        assert_eq!(m.epoch(), Epoch::NONE);
        let gate = script.hold();
        let waiting = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..20).map(|_| spawn_token(rt, &m, &waiting)).collect();
        until(|| count(&waiting) == 20).await;
        gate.open();
        let got = join_all(callers).await;
        assert!(got.iter().all(|g| g.as_ref().unwrap().value == 1));
        assert_eq!(script.calls(), 1);
        assert_eq!(script.stale(), vec![None]);
    });
}

/// A late 401 (sent with token 1, answered after the refresh to token 2)
/// retries with token 2 and refreshes nothing.
fn late_401_reuses_the_newer_token(rt: Rt) {
    rt.run("late_401_reuses_the_newer_token", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let answer = Gate::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let late = {
            let (m, answer, seen) = (m.clone(), answer.clone(), seen.clone());
            rt.spawn(async move {
                m.send(move |token| {
                    let (answer, seen) = (answer.clone(), seen.clone());
                    async move {
                        seen.lock().unwrap().push(token);
                        answer.wait().await; // the 401 is on its way
                        Status(if token == 1 { 401 } else { 200 })
                    }
                })
                .await
            })
        };
        until(|| seen.lock().unwrap().len() == 1).await;
        // Another request's 401 refreshes meanwhile.
        let other = m.send(request(1)).await.unwrap();
        assert_eq!(other, Status(200));
        assert_eq!(script.calls(), 1);
        answer.open();
        assert_eq!(late.join().await.unwrap().unwrap(), Status(200));
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
        assert_eq!(script.calls(), 1, "the late 401 refreshed nothing");
        assert_eq!(m.stats().retries, 2);
    });
}

// -------------------------------------------------------------- rejected

/// Rejected: every waiter (`refresh_if_current`, `token`, `send`) gets the
/// same error, the session is signed out once, and nothing after that calls
/// the refresher until `sign_in`.
fn rejected_reaches_every_waiter_and_signs_out_once(rt: Rt) {
    rt.run("rejected_reaches_every_waiter", move || async move {
        let script = counting();
        let sign_outs = Arc::new(AtomicUsize::new(0));
        let m = {
            let n = sign_outs.clone();
            script.manager(Some(1)).on_sign_out(move || {
                n.fetch_add(1, Ordering::SeqCst);
            })
        };
        let m = Arc::new(m);
        let e1 = m.epoch();
        let gate = script.hold();
        script.then(Err(RefreshError::Rejected("invalid_grant".into())));
        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_send(rt, &m, 1, &none);
        until(|| script.calls() == 1).await;

        let waiting = Arc::new(AtomicUsize::new(0));
        let mut waiters: Vec<Task<Got<u32>>> = Vec::new();
        for _ in 0..10 {
            waiters.push(spawn_refresh(rt, &m, e1, &waiting));
            waiters.push(spawn_token(rt, &m, &waiting));
        }
        let senders: Vec<_> = (0..10).map(|_| spawn_send(rt, &m, 1, &waiting)).collect();
        until(|| count(&waiting) == 30).await;
        assert_eq!(count(&sign_outs), 0);
        gate.open();

        assert_eq!(leader.join().await.unwrap(), Err(rejected()));
        for got in join_all(waiters).await {
            assert_eq!(got, Err(rejected()));
        }
        for got in join_all(senders).await {
            assert_eq!(got, Err(rejected()));
        }
        assert!(m.is_signed_out());
        assert_eq!(m.current(), None, "the token is dropped");
        assert_eq!(count(&sign_outs), 1, "on_sign_out fired exactly once");
        let stats = m.stats();
        assert_eq!(stats.refresh_calls, 1);
        assert_eq!(stats.refreshes_rejected, 1);
        assert_eq!(stats.refreshes_succeeded, 0);
        assert_eq!(stats.sign_outs, 1);
        assert_eq!(stats.retries, 0, "no request was sent a second time");

        // Signed out: every call fails at once, without the refresher.
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = |sent: &Arc<AtomicUsize>| {
            let sent = sent.clone();
            move |_: u32| {
                sent.fetch_add(1, Ordering::SeqCst);
                Status(200)
            }
        };
        let f = counted(&sent);
        assert_eq!(m.token().await, Err(AuthError::SignedOut));
        assert_eq!(m.refresh_if_current(e1).await, Err(AuthError::SignedOut));
        assert_eq!(
            m.refresh_if_current(Epoch::NONE).await,
            Err(AuthError::SignedOut)
        );
        let f_async = counted(&sent);
        let send = m.send(move |t| std::future::ready(f_async(t))).await;
        assert_eq!(send, Err(AuthError::SignedOut));
        assert_eq!(m.token_blocking(), Err(AuthError::SignedOut));
        assert_eq!(m.send_blocking(f), Err(AuthError::SignedOut));
        assert_eq!(count(&sent), 0, "no request was built");
        assert_eq!(script.calls(), 1, "no refresher call while signed out");
        m.sign_out();
        assert_eq!(count(&sign_outs), 1, "already signed out: no second hook");
        assert_eq!(m.stats().sign_outs, 1);

        // sign_in restores the session.
        let e2 = m.sign_in(7);
        assert!(!m.is_signed_out());
        assert!(e2 > e1);
        assert_eq!(
            m.token().await.unwrap(),
            Versioned {
                value: 7,
                epoch: e2
            }
        );
        assert_eq!(m.send(request(7)).await.unwrap(), Status(200));
        assert_eq!(script.calls(), 2);
        assert_eq!(script.stale().last(), Some(&Some(7)));
        assert_eq!(m.token().await.unwrap().value, 8);
    });
}

/// `sign_in` while a refresh is in flight, and that refresh is then
/// rejected: its callers get the rejection, but the new session stays.
fn sign_in_during_refresh_then_rejected_keeps_the_new_session(rt: Rt) {
    rt.run("sign_in_during_rejected_refresh", move || async move {
        let script = counting();
        let sign_outs = Arc::new(AtomicUsize::new(0));
        let m = {
            let n = sign_outs.clone();
            script.manager(Some(1)).on_sign_out(move || {
                n.fetch_add(1, Ordering::SeqCst);
            })
        };
        let m = Arc::new(m);
        let e1 = m.epoch();
        let gate = script.hold();
        script.then(Err(RefreshError::Rejected("invalid_grant".into())));
        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let follower = spawn_token(rt, &m, &waiting);
        until(|| count(&waiting) == 1).await;

        let e2 = m.sign_in(100);
        assert!(!m.is_refreshing(), "the old refresh is detached");
        let signed_in = Versioned {
            value: 100,
            epoch: e2,
        };
        assert_eq!(m.token().await.unwrap(), signed_in);
        gate.open();

        assert_eq!(leader.join().await.unwrap(), Err(rejected()));
        assert_eq!(follower.join().await.unwrap(), Err(rejected()));
        assert!(!m.is_signed_out(), "a stale rejection never signs out");
        assert_eq!(m.current(), Some(signed_in.clone()));
        assert_eq!(m.token().await.unwrap(), signed_in);
        assert_eq!(count(&sign_outs), 0);
        let stats = m.stats();
        assert_eq!((stats.refreshes_rejected, stats.sign_outs), (1, 0));
        // And the new session refreshes normally.
        assert_eq!(m.send(request(100)).await.unwrap(), Status(200));
        assert_eq!(script.stale(), vec![Some(1), Some(100)]);
        assert_eq!(m.token().await.unwrap().value, 101);
    });
}

/// A rejection of an older refresh, arriving after a newer session has
/// already refreshed successfully, signs nothing out and keeps the newer
/// token.
fn stale_rejection_after_a_newer_refresh_does_not_sign_out(rt: Rt) {
    rt.run("stale_rejection", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let e1 = m.epoch();
        let old_gate = script.hold();
        script.then(Err(RefreshError::Rejected("invalid_grant".into())));
        let none = Arc::new(AtomicUsize::new(0));
        let old = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;

        let e2 = m.sign_in(10);
        let new_gate = script.hold();
        let new = spawn_refresh(rt, &m, e2, &none);
        until(|| script.calls() == 2).await;
        assert!(m.is_refreshing());
        new_gate.open();
        let fresh = new.join().await.unwrap().unwrap();
        assert_eq!(fresh.value, 11);
        assert!(fresh.epoch > e2);

        old_gate.open();
        assert_eq!(old.join().await.unwrap(), Err(rejected()));
        assert!(!m.is_signed_out());
        assert_eq!(m.current(), Some(fresh.clone()));
        assert_eq!(m.token().await.unwrap(), fresh);
        assert_eq!(script.stale(), vec![Some(1), Some(10)]);
        assert_eq!(m.stats().sign_outs, 0);
    });
}

/// `sign_out` while a refresh is in flight: the refresh's success is not
/// stored and the session stays signed out.
fn sign_out_during_refresh_stays_signed_out(rt: Rt) {
    rt.run("sign_out_during_refresh", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let e1 = m.epoch();
        let gate = script.hold();
        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;
        m.sign_out();
        gate.open();
        let _ = leader.join().await.unwrap();
        assert!(m.is_signed_out());
        assert_eq!(m.current(), None, "the refresh did not sign back in");
        assert_eq!(m.token().await, Err(AuthError::SignedOut));
        assert_eq!(script.calls(), 1);
        assert_eq!(m.stats().sign_outs, 1);
    });
}

// ------------------------------------------------------------- transient

const COOLDOWN: Duration = Duration::from_millis(300);

/// Transient: every waiter gets the error, the session is kept; within the
/// cool-down a refresh is answered with the same error at once (counted in
/// `cooled_down`) and the refresher is not called; after it, a refresh
/// recovers.
fn transient_failure_cools_down_then_recovers(rt: Rt) {
    rt.run("transient_cool_down", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)).with_cooldown(COOLDOWN));
        let e1 = m.epoch();
        let gate = script.hold();
        script.then(Err(RefreshError::Transient("503".into())));
        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_send(rt, &m, 1, &none);
        until(|| script.calls() == 1).await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..10)
            .map(|_| spawn_refresh(rt, &m, e1, &waiting))
            .collect();
        until(|| count(&waiting) == 10).await;
        let opened = Instant::now(); // the failure is recorded after this
        gate.open();

        assert_eq!(leader.join().await.unwrap(), Err(transient()));
        for got in join_all(waiters).await {
            assert_eq!(got, Err(transient()));
        }
        let failed = Instant::now(); // ... and before this
        assert!(!m.is_signed_out(), "a transient failure keeps the session");
        assert_eq!(m.current().unwrap().value, 1);
        let stats = m.stats();
        assert_eq!((stats.refreshes_failed, stats.cooled_down), (1, 0));

        // Inside the cool-down.
        assert_eq!(m.refresh_if_current(e1).await, Err(transient()));
        assert_eq!(m.stats().cooled_down, 1);
        assert_eq!(m.send(request(1)).await, Err(transient()));
        assert_eq!(m.stats().cooled_down, 2);
        assert_eq!(m.refresh_if_current_blocking(e1), Err(transient()));
        assert_eq!(m.stats().cooled_down, 3);
        assert_eq!(
            m.token().await.unwrap().value,
            1,
            "the request gate still hands out the kept token"
        );
        assert_eq!(script.calls(), 1, "no refresh inside the cool-down");
        assert!(
            opened.elapsed() < COOLDOWN,
            "the checks above ran inside the cool-down"
        );

        // After it.
        wait_until_instant(failed + COOLDOWN).await;
        let fresh = m.refresh_if_current(e1).await.unwrap();
        assert_eq!(fresh.value, 2);
        assert_eq!(script.calls(), 2);
        let stats = m.stats();
        assert_eq!(stats.refreshes_succeeded, 1);
        assert_eq!(stats.cooled_down, 3);
        // A success ends the cool-down: a new failure is needed for another.
        assert_eq!(m.send(request(2)).await.unwrap(), Status(200));
        assert_eq!(script.calls(), 3);
    });
}

/// A transient failure of a refresh that `sign_in` detached belongs to the
/// old session: its callers get it, but it starts no cool-down for the new
/// session (as a stale rejection signs nothing out).
fn stale_transient_failure_does_not_cool_down_a_new_session(rt: Rt) {
    rt.run("stale_transient", move || async move {
        let script = counting();
        let m = Arc::new(
            script
                .manager(Some(1))
                .with_cooldown(Duration::from_secs(30)),
        );
        let e1 = m.epoch();
        let gate = script.hold();
        script.then(Err(RefreshError::Transient("503".into())));
        let none = Arc::new(AtomicUsize::new(0));
        let old = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;
        let e2 = m.sign_in(10);
        gate.open();
        assert_eq!(old.join().await.unwrap(), Err(transient()));
        assert_eq!(m.current().unwrap().epoch, e2);
        let fresh = m.refresh_if_current(e2).await;
        assert_eq!(fresh.map(|v| v.value), Ok(11), "the new session refreshes");
        assert_eq!(m.stats().cooled_down, 0);
        assert_eq!(script.calls(), 2);
    });
}

/// With no token yet, a transient failure of the first fetch also starts the
/// cool-down: `token()` within it returns the error at once instead of
/// calling the refresher again (DESIGN §3: "no hot loop").
fn transient_first_fetch_is_cooled_down(rt: Rt) {
    rt.run("transient_first_fetch", move || async move {
        let script = counting();
        let m = script.manager(None).with_cooldown(Duration::from_secs(30));
        script.then(Err(RefreshError::Transient("503".into())));
        assert_eq!(m.token().await, Err(transient()));
        assert_eq!(script.calls(), 1);
        assert_eq!(m.token().await, Err(transient()), "cooled down");
        assert_eq!(m.stats().cooled_down, 1);
        assert_eq!(script.calls(), 1, "no second fetch inside the cool-down");
    });
}

// ------------------------------------------------------ refresh-ahead

#[derive(Clone, Debug, PartialEq)]
struct Expiring {
    n: u32,
    expires_at: Instant,
}

fn expiring(n: u32, expires_in: Duration) -> Expiring {
    Expiring {
        n,
        expires_at: Instant::now() + expires_in,
    }
}

const WINDOW: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(3600);

/// Refreshes return a token valid for an hour.
fn expiring_script() -> Arc<Script<Expiring>> {
    Script::new(|stale: Option<&Expiring>| expiring(stale.map_or(1, |t| t.n + 1), LONG))
}

fn expiring_manager(
    script: &Arc<Script<Expiring>>,
    token: Expiring,
) -> Arc<TokenManager<Expiring, String>> {
    Arc::new(
        script
            .manager(Some(token))
            .with_expiry(|t: &Expiring| Some(t.expires_at), WINDOW)
            .with_cooldown(Duration::from_secs(30)),
    )
}

/// A token inside the refresh-ahead window: exactly one caller refreshes it
/// (held at the gate) while concurrent callers get the still-valid token at
/// once.
fn refresh_ahead_one_caller_refreshes_others_use_the_old_token(rt: Rt) {
    rt.run("refresh_ahead", move || async move {
        let script = expiring_script();
        let old = expiring(1, Duration::from_secs(30));
        let m = expiring_manager(&script, old.clone());
        let e1 = m.epoch();
        let gate = script.hold();
        let none = Arc::new(AtomicUsize::new(0));
        let refresher = spawn_token(rt, &m, &none);
        until(|| script.calls() == 1).await;

        let others: Vec<_> = (0..20).map(|_| spawn_token(rt, &m, &none)).collect();
        for got in join_all(others).await {
            assert_eq!(
                got.unwrap(),
                Versioned {
                    value: old.clone(),
                    epoch: e1
                }
            );
        }
        assert_eq!(m.token_blocking().unwrap().value, old);
        assert!(m.is_refreshing(), "the refresh is still held");
        assert_eq!(script.calls(), 1, "exactly one caller refreshes ahead");
        gate.open();

        let fresh = refresher.join().await.unwrap().unwrap();
        assert_eq!(fresh.value.n, 2);
        assert!(fresh.epoch > e1);
        let again = m.token().await.unwrap();
        assert_eq!(again, fresh, "outside the window: no refresh");
        assert_eq!(script.calls(), 1);
        assert_eq!(script.stale(), vec![Some(old)]);
    });
}

/// An expired token is refreshed before use: concurrent callers all wait
/// for one refresh, and `send` never sends the expired token.
fn expired_token_is_refreshed_before_use(rt: Rt) {
    rt.run("expired_token_refreshed_first", move || async move {
        let script = expiring_script();
        let m = expiring_manager(&script, expiring(1, Duration::ZERO));
        let gate = script.hold();
        let waiting = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..10).map(|_| spawn_token(rt, &m, &waiting)).collect();
        until(|| count(&waiting) == 10 && script.calls() == 1).await;
        gate.open();
        let got = join_all(callers).await;
        let first = got[0].clone().unwrap();
        assert_eq!(first.value.n, 2);
        assert!(got.iter().all(|g| g.as_ref().unwrap() == &first));
        assert_eq!(script.calls(), 1);

        // Expired again (by sign-in): `send` refreshes before sending.
        m.sign_in(expiring(5, Duration::ZERO));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        let status = m
            .send(move |t: Expiring| {
                log.lock().unwrap().push(t.n);
                std::future::ready(Status(200))
            })
            .await;
        assert_eq!(status.unwrap(), Status(200));
        assert_eq!(
            *sent.lock().unwrap(),
            vec![6],
            "the expired token was never sent"
        );
        assert_eq!(script.calls(), 2);
    });
}

/// A transient failure of a refresh ahead of expiry: the caller that made it
/// falls back to the still-valid token; during the cool-down the next
/// caller does too, without calling the refresher. An expired token is not
/// handed out on failure.
fn refresh_ahead_transient_failure_falls_back_to_the_old_token(rt: Rt) {
    rt.run("refresh_ahead_transient", move || async move {
        let script = expiring_script();
        let old = expiring(1, Duration::from_secs(30));
        let m = expiring_manager(&script, old.clone());
        let e1 = m.epoch();
        let gate = script.hold();
        script.then(Err(RefreshError::Transient("503".into())));
        let none = Arc::new(AtomicUsize::new(0));
        let refresher = spawn_token(rt, &m, &none);
        until(|| script.calls() == 1).await;
        let other = spawn_token(rt, &m, &none).join().await.unwrap();
        assert_eq!(
            other.unwrap().value,
            old,
            "others use the old token meanwhile"
        );
        gate.open();

        let fell_back = refresher.join().await.unwrap().unwrap();
        assert_eq!(
            fell_back,
            Versioned {
                value: old.clone(),
                epoch: e1
            }
        );
        assert_eq!(m.stats().refreshes_failed, 1);
        assert_eq!(m.token().await.unwrap().value, old);
        // Held back by the cool-down, but answered with the still-valid
        // token, not with the failure: not counted as `cooled_down`.
        assert_eq!(m.stats().cooled_down, 0);
        assert_eq!(script.calls(), 1, "no new attempt inside the cool-down");

        // An expired token has nothing to fall back to.
        m.sign_in(expiring(9, Duration::ZERO));
        script.then(Err(RefreshError::Transient("503".into())));
        assert_eq!(m.token().await, Err(transient()));
        assert_eq!(script.calls(), 2);
    });
}

// ------------------------------------------------------------------ send

/// `send` retries once with the new token, and returns the second 401 as
/// is: never a loop. A transport error is not retried.
fn send_retries_once_and_returns_the_second_401(rt: Rt) {
    rt.run("send_retries_once", move || async move {
        let script = counting();
        let m = script.manager(Some(1));
        let used = Arc::new(Mutex::new(Vec::new()));
        let always_401 = |used: &Arc<Mutex<Vec<u32>>>| {
            let used = used.clone();
            move |token: u32| {
                used.lock().unwrap().push(token);
                std::future::ready(Status(401))
            }
        };
        assert_eq!(m.send(always_401(&used)).await.unwrap(), Status(401));
        assert_eq!(
            *used.lock().unwrap(),
            vec![1, 2],
            "sent twice: once, then once more"
        );
        assert_eq!(script.calls(), 1);
        assert_eq!(m.stats().retries, 1);
        // Another call: the token it uses (2) is current, so one refresh.
        assert_eq!(
            m.send_blocking(|t| always_401(&used)(t).into_inner())
                .unwrap(),
            Status(401)
        );
        assert_eq!(*used.lock().unwrap(), vec![1, 2, 2, 3]);
        assert_eq!((script.calls(), m.stats().retries), (2, 2));

        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let failed = m
            .send(move |_| {
                t.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Err::<Status, _>("connection reset"))
            })
            .await;
        assert_eq!(failed, Ok(Err("connection reset")));
        assert_eq!((count(&tries), script.calls()), (1, 2), "not retried");
    });
}

/// A `send` that leads the refresh is cancelled while another `send` waits
/// on it: the waiting one continues the same refresh (the refresher is
/// called once, its future is not dropped) and retries with its result.
fn cancelled_send_leader_hands_the_refresh_on(rt: Rt) {
    rt.run("cancelled_send_leader", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let gate = script.hold();

        // The follower sends first; its 401 is held until the refresh runs.
        let answer = Gate::new();
        let first_done = Arc::new(AtomicBool::new(false));
        let parked_after_401 = Arc::new(AtomicBool::new(false));
        let used = Arc::new(Mutex::new(Vec::new()));
        let follower = {
            let (m, answer, done, used) =
                (m.clone(), answer.clone(), first_done.clone(), used.clone());
            let (d, p) = (first_done.clone(), parked_after_401.clone());
            let send = async move {
                m.send(move |token| {
                    let (answer, done, used) = (answer.clone(), done.clone(), used.clone());
                    async move {
                        used.lock().unwrap().push(token);
                        if token == 1 {
                            answer.wait().await;
                            done.store(true, Ordering::SeqCst);
                            Status(401)
                        } else {
                            Status(200)
                        }
                    }
                })
                .await
            };
            rt.spawn(on_pending(send, move || {
                if d.load(Ordering::SeqCst) {
                    p.store(true, Ordering::SeqCst);
                }
            }))
        };
        until(|| used.lock().unwrap().len() == 1).await;

        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_send(rt, &m, 1, &none);
        until(|| script.calls() == 1).await;
        answer.open();
        until(|| parked_after_401.load(Ordering::SeqCst)).await;

        leader.abort().await;
        assert!(m.is_refreshing(), "the refresh survives its leader");
        gate.open();
        assert_eq!(follower.join().await.unwrap().unwrap(), Status(200));
        assert_eq!(*used.lock().unwrap(), vec![1, 2]);
        assert_eq!(script.calls(), 1, "the refresh was not sent twice");
        let probe = &script.probe;
        assert_eq!(
            (probe.started(), probe.finished()),
            (1, 1),
            "continued, not restarted"
        );
        assert_eq!(probe.dropped_unfinished(), 0);
        assert_eq!(m.token().await.unwrap().value, 2);
        assert_eq!(m.stats().refreshes_succeeded, 1);
    });
}

// ------------------------------------------------------------ T = ()

/// Cookie-style credential the client cannot read: `T = ()`. A storm of
/// `send`s with an expired cookie causes one refresh; epochs alone decide.
fn unit_token_storm_refreshes_once(rt: Rt) {
    rt.run("unit_token_storm", move || async move {
        // The client's cookie jar and the cookie the "server" accepts.
        let jar = Arc::new(AtomicU32::new(1));
        let valid = Arc::new(AtomicU32::new(0)); // expired
        let script = Script::new(|_: Option<&()>| ());
        let m: Arc<TokenManager<(), String>> = {
            let (s, jar, valid) = (script.clone(), jar.clone(), valid.clone());
            Arc::new(TokenManager::with_token(
                move |stale| {
                    let (jar, valid) = (jar.clone(), valid.clone());
                    let refreshed = s.refresh(stale);
                    async move {
                        let result = refreshed.await;
                        // The response sets a new cookie, which the server accepts.
                        let next = jar.fetch_add(1, Ordering::SeqCst) + 1;
                        valid.store(next, Ordering::SeqCst);
                        result
                    }
                },
                (),
            ))
        };
        let e1 = m.epoch();
        let gate = script.hold();
        let fire = Gate::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (m, jar, valid, fire, sent) = (
                    m.clone(),
                    jar.clone(),
                    valid.clone(),
                    fire.clone(),
                    sent.clone(),
                );
                rt.spawn(async move {
                    m.send(move |()| {
                        let fire = fire.clone();
                        // The verdict is taken when the request arrives; the
                        // answers are held until every request has arrived.
                        let cookie = jar.load(Ordering::SeqCst);
                        let ok = cookie == valid.load(Ordering::SeqCst);
                        sent.fetch_add(1, Ordering::SeqCst);
                        async move {
                            fire.wait().await;
                            Status(if ok { 200 } else { 401 })
                        }
                    })
                    .await
                })
            })
            .collect();
        // Every request holds the expired cookie before any is answered.
        until(|| count(&sent) == 50).await;
        fire.open();
        until(|| script.calls() == 1).await;
        gate.open();
        for got in join_all(tasks).await {
            assert_eq!(got.unwrap(), Status(200));
        }
        assert_eq!(script.calls(), 1);
        assert_eq!(script.stale(), vec![Some(())]);
        assert_eq!(m.stats().retries, 50);
        assert!(m.epoch() > e1);
        assert_eq!(m.token().await.unwrap().epoch, m.epoch());
    });
}

// ------------------------------------------------------------- blocking

/// Blocking callers on plain threads (`send_blocking`, `token_blocking`)
/// share one refresh with async callers, led by an async caller.
fn blocking_callers_join_an_async_refresh(rt: Rt) {
    rt.run("blocking_join_async", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let e1 = m.epoch();
        let gate = script.hold();

        // send_blocking threads: their first 401 is held until the refresh runs.
        let answer = Gate::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let (m, answer, sent) = (m.clone(), answer.clone(), sent.clone());
                Thread::spawn(move || {
                    let mut used = Vec::new();
                    let status = m.send_blocking(|token| {
                        used.push(token);
                        if token == 1 {
                            sent.fetch_add(1, Ordering::SeqCst);
                            answer.wait_blocking();
                            Status(401)
                        } else {
                            Status(200)
                        }
                    });
                    (status, used)
                })
            })
            .collect();
        until(|| count(&sent) == 4).await;

        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;
        let entered = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (m, entered) = (m.clone(), entered.clone());
                Thread::spawn(move || {
                    entered.fetch_add(1, Ordering::SeqCst);
                    m.token_blocking()
                })
            })
            .collect();
        let waiting = Arc::new(AtomicUsize::new(0));
        let async_readers: Vec<_> = (0..4).map(|_| spawn_token(rt, &m, &waiting)).collect();
        answer.open();
        until(|| count(&entered) == 4 && count(&waiting) == 4).await;
        assert!(m.is_refreshing());
        gate.open();

        let fresh = leader.join().await.unwrap().unwrap();
        assert_eq!(fresh.value, 2);
        for sender in senders {
            let (status, used) = sender.join().await;
            assert_eq!(status.unwrap(), Status(200));
            assert_eq!(used, vec![1, 2]);
        }
        for reader in readers {
            assert_eq!(reader.join().await.unwrap(), fresh);
        }
        for got in join_all(async_readers).await {
            assert_eq!(got.unwrap(), fresh);
        }
        assert_eq!(
            script.calls(),
            1,
            "one refresh for async and blocking callers"
        );
        assert_eq!(m.stats().retries, 4);
    });
}

/// A blocking caller leads the refresh (the async refresher is polled on its
/// thread); async callers and a blocking `send_blocking` join it.
fn async_callers_join_a_blocking_refresh(rt: Rt) {
    rt.run("async_join_blocking", move || async move {
        let script = counting();
        let m = Arc::new(script.manager(Some(1)));
        let e1 = m.epoch();
        let gate = script.hold();
        let leader = {
            let m = m.clone();
            Thread::spawn(move || m.refresh_if_current_blocking(e1))
        };
        until(|| script.calls() == 1).await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..10)
            .map(|i| match i % 2 {
                0 => spawn_token(rt, &m, &waiting),
                _ => spawn_refresh(rt, &m, e1, &waiting),
            })
            .collect();
        let sender = {
            let m = m.clone();
            Thread::spawn(move || m.send_blocking(|t| Status(if t == 1 { 401 } else { 200 })))
        };
        until(|| count(&waiting) == 10).await;
        gate.open();
        let fresh = leader.join().await.unwrap();
        assert_eq!(fresh.value, 2);
        for got in join_all(callers).await {
            assert_eq!(got.unwrap(), fresh);
        }
        assert_eq!(sender.join().await.unwrap(), Status(200));
        assert_eq!(script.calls(), 1);
    });
}

// ----------------------------------------------------------------- hooks

/// `on_refresh` sees every refresh result exactly once, however many callers
/// shared it; reused (late) callers and cooled-down calls fire nothing.
fn on_refresh_sees_each_result_once(rt: Rt) {
    rt.run("on_refresh_once", move || async move {
        let script = counting();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let m = {
            let seen = seen.clone();
            script
                .manager(Some(1))
                .with_cooldown(Duration::from_secs(30))
                .on_refresh(move |event| seen.lock().unwrap().push(event.result.clone()))
        };
        let m = Arc::new(m);

        // A shared success.
        let e1 = m.epoch();
        let gate = script.hold();
        let none = Arc::new(AtomicUsize::new(0));
        let leader = spawn_refresh(rt, &m, e1, &none);
        until(|| script.calls() == 1).await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let followers: Vec<_> = (0..10)
            .map(|_| spawn_refresh(rt, &m, e1, &waiting))
            .collect();
        until(|| count(&waiting) == 10).await;
        gate.open();
        let e2 = leader.join().await.unwrap().unwrap().epoch;
        join_all(followers).await;
        assert_eq!(m.refresh_if_current(e1).await.unwrap().epoch, e2, "reused");
        assert_eq!(*seen.lock().unwrap(), vec![Ok(2)]);

        // A shared transient failure, then cooled-down calls.
        let gate = script.hold();
        script.then(Err(RefreshError::Transient("503".into())));
        let leader = spawn_refresh(rt, &m, e2, &none);
        until(|| script.calls() == 2).await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let followers: Vec<_> = (0..10)
            .map(|_| spawn_refresh(rt, &m, e2, &waiting))
            .collect();
        until(|| count(&waiting) == 10).await;
        gate.open();
        assert_eq!(leader.join().await.unwrap(), Err(transient()));
        join_all(followers).await;
        assert_eq!(m.refresh_if_current(e2).await, Err(transient()));
        assert_eq!(m.stats().cooled_down, 1);

        // sign_in ends the cool-down; then a rejection.
        let e3 = m.sign_in(10);
        script.then(Err(RefreshError::Rejected("invalid_grant".into())));
        assert_eq!(m.refresh_if_current(e3).await, Err(rejected()));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                Ok(2),
                Err(RefreshError::Transient("503".into())),
                Err(RefreshError::Rejected("invalid_grant".into())),
            ]
        );
        assert_eq!(m.stats().refresh_calls, 3);
        assert_eq!(script.calls(), 3);
    });
}

on_every_runtime!(
    token_callers_wait_for_the_refresh_in_flight,
    first_token_is_fetched_once,
    late_401_reuses_the_newer_token,
    rejected_reaches_every_waiter_and_signs_out_once,
    sign_in_during_refresh_then_rejected_keeps_the_new_session,
    stale_rejection_after_a_newer_refresh_does_not_sign_out,
    sign_out_during_refresh_stays_signed_out,
    transient_failure_cools_down_then_recovers,
    refresh_ahead_one_caller_refreshes_others_use_the_old_token,
    expired_token_is_refreshed_before_use,
    refresh_ahead_transient_failure_falls_back_to_the_old_token,
    send_retries_once_and_returns_the_second_401,
    cancelled_send_leader_hands_the_refresh_on,
    unit_token_storm_refreshes_once,
    blocking_callers_join_an_async_refresh,
    async_callers_join_a_blocking_refresh,
    on_refresh_sees_each_result_once,
    stale_transient_failure_does_not_cool_down_a_new_session,
    transient_first_fetch_is_cooled_down,
);

/// Blocking clients only: a blocking refresher, 16 threads whose requests were
/// all sent with the expired token and are all rejected before the refresh
/// is let through. One refresher call; every retry uses the new token.
#[test]
fn send_blocking_storm_from_threads_refreshes_once() {
    common::with_timeout("send_blocking_storm_from_threads_refreshes_once", || {
        const THREADS: usize = 16;
        let refresh_gate = Gate::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let m: Manager = {
            let (gate, calls) = (refresh_gate.clone(), calls.clone());
            TokenManager::with_token_blocking(
                move |stale: Option<u32>| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.wait_blocking();
                    Ok(stale.unwrap_or(0) + 1)
                },
                1,
            )
        };
        let valid = AtomicU32::new(2); // the server accepts only token 2 now
        let rejected = AtomicUsize::new(0);
        // All first attempts are in flight with token 1 together, before any
        // 401 comes back (else late threads would wait at the request gate).
        let all_sent = std::sync::Barrier::new(THREADS);
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        m.send_blocking(|token| {
                            if token == valid.load(Ordering::SeqCst) {
                                Status(200)
                            } else {
                                rejected.fetch_add(1, Ordering::SeqCst);
                                all_sent.wait();
                                Status(401)
                            }
                        })
                        .expect("no auth error")
                        .0
                    })
                })
                .collect();
            // Every thread got its 401 with token 1; one of them refreshes.
            until_blocking(|| rejected.load(Ordering::SeqCst) == THREADS);
            until_blocking(|| calls.load(Ordering::SeqCst) == 1);
            refresh_gate.open();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one refresh for {THREADS} 401s"
        );
        assert_eq!(m.current().unwrap().value, 2);
        assert_eq!(m.stats().retries, THREADS as u64);
    });
}
