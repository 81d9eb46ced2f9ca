//! A keyed `auth::TokenManager` (one credential per key, DESIGN §3): each
//! key has the semantics of a manager of one credential (epochs, sign-out,
//! cool-down, refresh ahead, hooks, counters), and keys do not wait on each
//! other. The refresher is a script per key whose calls are counted and held
//! at test-controlled gates; every async scenario runs on tokio and smol.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use common::{Gate, Rt, Task, until, until_blocking};
use epochflight::auth::{AuthError, AuthStats, RefreshError, TokenManager, Unauthorized};
use epochflight::{Epoch, Versioned};

type Key = &'static str;
type Refreshed = Result<u32, RefreshError<String>>;
type Got = Result<Versioned<u32>, AuthError<String>>;
type Manager = TokenManager<u32, String, Key>;

/// Per key: calls made (with the stale token each got), a gate the calls
/// wait at, and queued results (otherwise the next number).
#[derive(Default)]
struct Script {
    calls: Mutex<Vec<(Key, Option<u32>)>>,
    gates: Mutex<HashMap<Key, Arc<Gate>>>,
    results: Mutex<HashMap<Key, Vec<Refreshed>>>,
}

impl Script {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Calls for `key` from now on wait at a new, closed gate, returned.
    fn hold(&self, key: Key) -> Arc<Gate> {
        let gate = Gate::new();
        self.gates.lock().unwrap().insert(key, gate.clone());
        gate
    }

    fn then(&self, key: Key, result: Refreshed) {
        let mut results = self.results.lock().unwrap();
        results.entry(key).or_default().insert(0, result);
    }

    fn calls(&self, key: Key) -> Vec<Option<u32>> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, s)| *s)
            .collect()
    }

    fn refresh(&self, key: Key, stale: Option<u32>) -> impl Future<Output = Refreshed> + use<> {
        self.calls.lock().unwrap().push((key, stale));
        let queued = self
            .results
            .lock()
            .unwrap()
            .get_mut(key)
            .and_then(|r| r.pop());
        let result = queued.unwrap_or(Ok(stale.map_or(1, |n| n + 1)));
        let gate = self.gates.lock().unwrap().get(key).cloned();
        async move {
            if let Some(gate) = gate {
                gate.wait().await;
            }
            result
        }
    }

    fn manager(self: &Arc<Self>) -> Manager {
        let script = self.clone();
        TokenManager::keyed(move |key, stale| script.refresh(key, stale))
    }
}

#[derive(Debug, PartialEq)]
struct Status(u16);

impl Unauthorized for Status {
    fn is_unauthorized(&self) -> bool {
        self.0 == 401
    }
}

/// Counts a future's `Pending`s: a caller seen waiting.
async fn parked<F: Future>(future: F, parked: Arc<AtomicUsize>) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut counted = false;
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Pending => {
            if !counted {
                counted = true;
                parked.fetch_add(1, Ordering::SeqCst);
            }
            Poll::Pending
        }
        ready => ready,
    })
    .await
}

fn spawn_refresh(
    rt: Rt,
    m: &Arc<Manager>,
    key: Key,
    seen: Epoch,
    n: &Arc<AtomicUsize>,
) -> Task<Got> {
    let (m, n) = (m.clone(), n.clone());
    rt.spawn(parked(
        async move { m.for_key(&key).refresh_if_current(seen).await },
        n,
    ))
}

fn spawn_token(rt: Rt, m: &Arc<Manager>, key: Key, n: &Arc<AtomicUsize>) -> Task<Got> {
    let (m, n) = (m.clone(), n.clone());
    rt.spawn(parked(async move { m.for_key(&key).token().await }, n))
}

async fn join_all<T: Send + 'static>(tasks: Vec<Task<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(
            task.join()
                .await
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        );
    }
    out
}

fn count(n: &AtomicUsize) -> usize {
    n.load(Ordering::SeqCst)
}

fn rejected() -> AuthError<String> {
    AuthError::Refresh(RefreshError::Rejected("invalid_grant".into()))
}

fn transient() -> AuthError<String> {
    AuthError::Refresh(RefreshError::Transient("503".into()))
}

/// A storm of 401s on two keys: one refresh per key, each with its own
/// stale token; key `b` refreshes and answers while key `a`'s refresh is
/// still held (keys do not wait on each other); late 401s refresh nothing.
fn each_key_refreshes_once_and_independently(rt: Rt) {
    rt.run("each_key_refreshes_once", move || async move {
        let script = Script::new();
        let m = Arc::new(script.manager());
        let ea = m.for_key(&"a").sign_in(10);
        let eb = m.for_key(&"b").sign_in(20);
        let held_a = script.hold("a");
        let (waiting_a, waiting_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let storm_a: Vec<_> = (0..20)
            .map(|_| spawn_refresh(rt, &m, "a", ea, &waiting_a))
            .collect();
        until(|| script.calls("a").len() == 1 && count(&waiting_a) == 20).await;

        let storm_b: Vec<_> = (0..20)
            .map(|_| spawn_refresh(rt, &m, "b", eb, &waiting_b))
            .collect();
        let fresh_b = join_all(storm_b).await;
        let first_b = fresh_b[0].clone().unwrap();
        assert_eq!(first_b.value, 21);
        assert!(fresh_b.iter().all(|g| g.as_ref() == Ok(&first_b)));
        assert!(m.for_key(&"a").is_refreshing(), "a's refresh is still held");

        held_a.open();
        let fresh_a = join_all(storm_a).await;
        let first_a = fresh_a[0].clone().unwrap();
        assert_eq!(first_a.value, 11);
        assert!(fresh_a.iter().all(|g| g.as_ref() == Ok(&first_a)));
        assert_ne!(first_a.epoch, first_b.epoch, "epochs are never reissued");

        // Late 401s, sent with the old tokens: reuse, no refresh.
        assert_eq!(m.for_key(&"a").refresh_if_current(ea).await, Ok(first_a));
        assert_eq!(m.for_key(&"b").refresh_if_current_blocking(eb), Ok(first_b));
        assert_eq!(script.calls("a"), vec![Some(10)]);
        assert_eq!(script.calls("b"), vec![Some(20)]);
        assert_eq!(m.for_key(&"a").stats().refresh_calls, 1);
        assert_eq!(m.stats().refresh_calls, 2, "the manager's totals");
    });
}

/// A rejected refresh signs out its own key only: the other keys keep their
/// sessions, the sign-out hook gets the key, counters are per key.
fn rejection_signs_out_its_key_only(rt: Rt) {
    rt.run("rejection_signs_out_its_key_only", move || async move {
        let script = Script::new();
        let signed_out = Arc::new(Mutex::new(Vec::new()));
        let m = {
            let log = signed_out.clone();
            Arc::new(
                script
                    .manager()
                    .on_key_sign_out(move |key: &Key| log.lock().unwrap().push(*key)),
            )
        };
        let ea = m.for_key(&"a").sign_in(10);
        m.for_key(&"b").sign_in(20);
        let held = script.hold("a");
        script.then("a", Err(RefreshError::Rejected("invalid_grant".into())));
        let waiting = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..10)
            .map(|_| spawn_refresh(rt, &m, "a", ea, &waiting))
            .collect();
        until(|| count(&waiting) == 10).await;
        held.open();
        for got in join_all(callers).await {
            assert_eq!(got, Err(rejected()));
        }
        assert!(m.for_key(&"a").is_signed_out());
        assert_eq!(m.for_key(&"a").token().await, Err(AuthError::SignedOut));
        assert_eq!(m.for_key(&"a").current(), None);
        assert!(!m.for_key(&"b").is_signed_out());
        assert_eq!(m.for_key(&"b").token().await.unwrap().value, 20);
        assert_eq!(*signed_out.lock().unwrap(), vec!["a"]);
        let a = m.for_key(&"a").stats();
        assert_eq!(
            (a.refresh_calls, a.refreshes_rejected, a.sign_outs),
            (1, 1, 1)
        );
        assert_eq!(m.for_key(&"b").stats(), AuthStats::default());
        assert_eq!(m.stats().sign_outs, 1);

        // `sign_in` restores only that key.
        m.for_key(&"a").sign_in(30);
        assert_eq!(m.for_key(&"a").token().await.unwrap().value, 30);
        assert_eq!(
            script.calls("a").len(),
            1,
            "no refresher call while signed out"
        );
    });
}

/// A transient failure cools its own key down: during the cool-down that
/// key's callers get the failure without a refresher call, while another
/// key refreshes at once.
fn cool_down_is_per_key(rt: Rt) {
    rt.run("cool_down_is_per_key", move || async move {
        let script = Script::new();
        let m = Arc::new(script.manager().with_cooldown(Duration::from_secs(3600)));
        script.then("a", Err(RefreshError::Transient("503".into())));
        assert_eq!(m.for_key(&"a").token().await, Err(transient()));
        assert_eq!(m.for_key(&"a").token().await, Err(transient()));
        assert_eq!(m.for_key(&"a").stats().cooled_down, 1);
        assert_eq!(script.calls("a"), vec![None]);
        assert_eq!(m.for_key(&"b").token().await.unwrap().value, 1);
        assert_eq!(m.for_key(&"b").stats().cooled_down, 0);
    });
}

/// Refresh ahead of expiry, per key: a key inside its window is refreshed
/// by one caller while the others use its still-valid token; a key outside
/// its window is not refreshed.
fn refresh_ahead_is_per_key(rt: Rt) {
    rt.run("refresh_ahead_is_per_key", move || async move {
        let script = Script::new();
        let soon = Instant::now() + Duration::from_secs(30);
        let later = Instant::now() + Duration::from_secs(3600);
        // Token 10 expires soon; every other token much later.
        let m = Arc::new(script.manager().with_expiry(
            move |token: &u32| Some(if *token == 10 { soon } else { later }),
            Duration::from_secs(60),
        ));
        let ea = m.for_key(&"a").sign_in(10);
        m.for_key(&"b").sign_in(20);
        let held = script.hold("a");
        let none = Arc::new(AtomicUsize::new(0));
        let refresher = spawn_token(rt, &m, "a", &none);
        until(|| script.calls("a").len() == 1).await;
        let others = (0..10).map(|_| spawn_token(rt, &m, "a", &none)).collect();
        for got in join_all(others).await {
            assert_eq!(
                got,
                Ok(Versioned {
                    value: 10,
                    epoch: ea
                })
            );
        }
        assert_eq!(m.for_key(&"b").token().await.unwrap().value, 20);
        held.open();
        assert_eq!(refresher.join().await.unwrap().unwrap().value, 11);
        assert_eq!(script.calls("a"), vec![Some(10)]);
        assert!(script.calls("b").is_empty());
    });
}

/// `on_refresh` sees each key's result once, with its key.
fn on_refresh_sees_the_key(rt: Rt) {
    rt.run("on_refresh_sees_the_key", move || async move {
        let script = Script::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let m = {
            let seen = seen.clone();
            script.manager().on_refresh(move |event| {
                seen.lock()
                    .unwrap()
                    .push((*event.key, event.result.clone(), event.current))
            })
        };
        m.for_key(&"a").token().await.unwrap();
        m.for_key(&"b").token().await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![("a", Ok(1), true), ("b", Ok(1), true)]
        );
    });
}

/// `send` on a key: the retry routine with that key's credential.
fn send_on_a_key_retries_with_that_keys_token(rt: Rt) {
    rt.run("send_on_a_key", move || async move {
        let script = Script::new();
        let m = script.manager();
        m.for_key(&"a").sign_in(10);
        m.for_key(&"b").sign_in(20);
        let used = Arc::new(Mutex::new(Vec::new()));
        let log = used.clone();
        let status = m
            .for_key(&"b")
            .send(move |token| {
                log.lock().unwrap().push(token);
                std::future::ready(Status(if token == 21 { 200 } else { 401 }))
            })
            .await;
        assert_eq!(status, Ok(Status(200)));
        assert_eq!(*used.lock().unwrap(), vec![20, 21]);
        assert_eq!(m.for_key(&"b").stats().retries, 1);
        assert_eq!(m.for_key(&"a").stats().retries, 0);
        assert!(script.calls("a").is_empty());
    });
}

on_every_runtime!(
    each_key_refreshes_once_and_independently,
    rejection_signs_out_its_key_only,
    cool_down_is_per_key,
    refresh_ahead_is_per_key,
    on_refresh_sees_the_key,
    send_on_a_key_retries_with_that_keys_token,
);

/// `forget` drops a key's token and session: a signed-out key starts over,
/// fetching a token as for a key never seen; its own counters restart,
/// the manager's totals keep counting.
#[test]
fn forget_starts_a_key_over() {
    common::with_timeout("forget_starts_a_key_over", || {
        let script = Script::new();
        let m = script.manager();
        m.for_key(&"a").sign_in(10);
        script.then("a", Err(RefreshError::Rejected("invalid_grant".into())));
        let e = m.for_key(&"a").epoch();
        assert_eq!(
            m.for_key(&"a").refresh_if_current_blocking(e),
            Err(rejected())
        );
        assert_eq!(m.for_key(&"a").token_blocking(), Err(AuthError::SignedOut));
        m.for_key(&"a").forget();
        assert!(!m.for_key(&"a").is_signed_out());
        assert_eq!(m.for_key(&"a").stats(), AuthStats::default());
        assert_eq!(m.for_key(&"a").token_blocking().unwrap().value, 1);
        assert_eq!(script.calls("a"), vec![Some(10), None]);
        assert_eq!(m.stats().refresh_calls, 2);
    });
}

/// A keyed manager with a blocking refresher, from plain threads: a storm
/// on each of three keys refreshes each key once.
#[test]
fn blocking_storm_on_three_keys_refreshes_each_once() {
    common::with_timeout("blocking_storm_on_three_keys", || {
        const KEYS: [Key; 3] = ["a", "b", "c"];
        const THREADS: usize = 8;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate::new();
        let m: Arc<Manager> = {
            let (calls, gate) = (calls.clone(), gate.clone());
            Arc::new(TokenManager::keyed_blocking(
                move |key: Key, stale: Option<u32>| {
                    calls.lock().unwrap().push((key, stale));
                    gate.wait_blocking();
                    Ok(stale.map_or(1, |n| n + 1))
                },
            ))
        };
        for key in KEYS {
            m.for_key(&key).sign_in(10);
        }
        // Every first attempt is answered only once all were sent: each
        // thread has a 401 with the old token in hand.
        let all_sent = Arc::new(std::sync::Barrier::new(THREADS * KEYS.len()));
        let threads: Vec<_> = (0..THREADS * KEYS.len())
            .map(|i| {
                let (m, key, all_sent) = (m.clone(), KEYS[i % KEYS.len()], all_sent.clone());
                std::thread::spawn(move || {
                    m.for_key(&key).send_blocking(|token| {
                        if token == 10 {
                            all_sent.wait();
                            Status(401)
                        } else {
                            Status(200)
                        }
                    })
                })
            })
            .collect();
        until_blocking(|| calls.lock().unwrap().len() == KEYS.len());
        gate.open();
        for thread in threads {
            assert_eq!(thread.join().unwrap(), Ok(Status(200)));
        }
        let mut calls = calls.lock().unwrap().clone();
        calls.sort();
        assert_eq!(
            calls,
            vec![("a", Some(10)), ("b", Some(10)), ("c", Some(10))]
        );
        for key in KEYS {
            assert_eq!(m.for_key(&key).current().unwrap().value, 11);
            assert_eq!(m.for_key(&key).stats().retries, THREADS as u64);
        }
    });
}
