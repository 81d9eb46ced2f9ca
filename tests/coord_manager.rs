//! Scale-out through `TokenManager` (issue 14's proofs): real processes
//! (this binary re-run as children: tokio, smol and blocking), a real Redis
//! per test or a file store, and the loopback OAuth-style server with
//! rotating refresh tokens and reuse detection (tests/support/server.rs).
//!
//! The harness drives every step (expire the tokens, fire a wave, wait for
//! a counter, kill a process); nothing is ordered by sleeping, every wait is
//! bounded and fails loudly. Needs `redis-server` on the PATH: without it
//! these tests fail, they do not skip (`.ci/run` installs it).
// The features under test need Rust 1.89 (`file-coordination`), as this does.
#![allow(clippy::incompatible_msrv)]

#[path = "support/child_proc.rs"]
mod child_proc;
mod common;
#[path = "support/manager_child.rs"]
mod manager_child;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/server.rs"]
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use epochflight::auth::coord::{
    ClaimOutcome, CodecError, ConfigError, CoordConfig, CoordError, Coordinator, Corruption,
    FileStore, Generation, RedisConfig, RedisStore, SharedCredential, SharedState, codec_fn,
};
use epochflight::auth::{AuthError, RefreshError, TokenManager};
use manager_child::{ChildConfig, ChildProc, Lines, Manager, Mode, Stats, Tokens};
use redis_server::{RedisServer, temp_dir};
use server::{ServerConfig, TestServer};

/// The children's entry point: a no-op unless run as a child.
#[test]
fn manager_child_entry() {
    manager_child::child_main();
}

const ENTRY: &str = "manager_child_entry";

/// A lease no test reaches.
const LONG: Duration = Duration::from_secs(30);

/// The longest any wait on the server's counters may take.
const LIMIT: Duration = Duration::from_secs(20);

/// The fleet: 4 tokio, 2 smol, 2 blocking processes.
const EIGHT: [Mode; 8] = [
    Mode::Tokio,
    Mode::Smol,
    Mode::Blocking,
    Mode::Tokio,
    Mode::Tokio,
    Mode::Smol,
    Mode::Blocking,
    Mode::Tokio,
];

enum Backend {
    File(PathBuf),
    Redis(RedisServer),
    /// No coordinator (the baseline).
    None,
}

impl Backend {
    fn file() -> Backend {
        Backend::File(temp_dir("mgr-file"))
    }

    fn redis() -> Backend {
        Backend::Redis(RedisServer::start())
    }
}

/// A test server, a store, and child processes sharing one credential.
struct Fleet {
    server: TestServer,
    backend: Backend,
    lease: Duration,
    grace: Duration,
    cooldown: Duration,
    children: Vec<ChildProc>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.children.clear(); // killed first
        if let Backend::File(dir) = &self.backend {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Fleet {
    fn new(backend: Backend, lease: Duration, grace: Duration, server: ServerConfig) -> Fleet {
        Fleet {
            server: TestServer::start(server),
            backend,
            lease,
            grace,
            cooldown: epochflight::auth::DEFAULT_COOLDOWN,
            children: Vec::new(),
        }
    }

    fn spec(&self) -> String {
        match &self.backend {
            Backend::File(dir) => format!("file:{}", dir.display()),
            Backend::Redis(server) => format!("redis:{}", server.url()),
            Backend::None => "none".into(),
        }
    }

    fn redis(&mut self) -> &mut RedisServer {
        match &mut self.backend {
            Backend::Redis(server) => server,
            _ => panic!("not a Redis fleet"),
        }
    }

    fn config(&self, spawner: bool) -> ChildConfig {
        ChildConfig {
            server: self.server.base_url(),
            store: self.spec(),
            name: "api".into(),
            lease: self.lease,
            grace: self.grace,
            spawner,
            cooldown: self.cooldown,
        }
    }

    /// Starts one child per mode (all at once: they start in parallel).
    fn spawn(&mut self, modes: &[Mode]) {
        let config = self.config(false);
        let started: Vec<_> = modes
            .iter()
            .map(|&mode| {
                let config = config.clone();
                std::thread::spawn(move || ChildProc::spawn(ENTRY, &config, mode))
            })
            .collect();
        self.children.extend(
            started
                .into_iter()
                .map(|t| t.join().expect("child started")),
        );
    }

    /// The parent's own handle on the credential (a process of its own, as
    /// far as the store can tell).
    fn handle(&self) -> SharedCredential<Tokens> {
        let config = CoordConfig::new(self.lease)
            .unwrap()
            .with_reuse_grace(self.grace);
        manager_child::open_shared(&self.spec(), "api", config)
    }

    /// Child 0 signs the fleet in with the server's session; every child
    /// then takes the token at its first call (the request gate).
    fn sign_in(&mut self) {
        let (access, refresh) = self.server.initial_tokens();
        assert_eq!(
            self.children[0].ask(&format!("sign_in {access} {refresh}")),
            "ok"
        );
        for child in &mut self.children {
            assert_eq!(child.ask("gate"), format!("access={access}"));
        }
    }

    /// Every child runs a wave of `n` requests; their answers.
    fn wave(&mut self, n: u64) -> Vec<Stats> {
        for child in &mut self.children {
            child.send(&format!("wave {n}"));
        }
        self.children
            .iter_mut()
            .map(|c| Stats::parse(&c.recv()))
            .collect()
    }

    fn stats(&mut self) -> Vec<Stats> {
        self.children.iter_mut().map(ChildProc::stats).collect()
    }

    fn wait_server(&self, what: &str, pred: impl Fn(&server::Counters) -> bool) {
        assert!(
            self.server.wait_until(pred, LIMIT),
            "server never got {what}: {:?}",
            self.server.counters()
        );
    }
}

/// Every request of a wave answered `outcome`.
fn all(answers: &[Stats], n: u64, outcome: &str, context: &str) {
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(
            (answer.get(outcome), answer.0.len()),
            (n, 1),
            "{context}: child {i} answered {answer:?}"
        );
    }
}

fn run(name: &str, test: impl FnOnce() + Send + 'static) {
    common::with_timeout(name, test);
}

// ------------------------------------------------------------ 1. waves

/// 8 processes x `n` concurrent requests x 5 expiries: every request
/// succeeds, exactly one refresh per expiry and no reuse detection; per
/// process and expiry at most one won claim and 4 store commands.
fn waves(backend: Backend, n: u64) {
    let mut fleet = Fleet::new(backend, LONG, Duration::ZERO, ServerConfig::default());
    fleet.spawn(&EIGHT);
    fleet.sign_in();
    let mut successes = 0;
    for expiry in 1..=5 {
        fleet.server.expire_access_tokens();
        let before = fleet.stats();
        let answers = fleet.wave(n);
        all(&answers, n, "ok", &format!("expiry {expiry}"));
        successes += answers.iter().map(|a| a.get("ok")).sum::<u64>();
        let after = fleet.stats();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let won = a.get("claims_won") - b.get("claims_won");
            let calls = a.get("store_calls") - b.get("store_calls");
            assert!(
                won <= 1 && calls <= 4,
                "expiry {expiry}, child {i}: {won} claims won, {calls} store commands"
            );
        }
        let most = before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.get("store_calls") - b.get("store_calls"))
            .max();
        eprintln!("expiry {expiry}: at most {most:?} store commands in a process");
        let won: u64 = after.iter().map(|a| a.get("claims_won")).sum();
        assert_eq!(won, expiry, "one claim won per expiry, fleet-wide");
        assert_eq!(fleet.server.refresh_calls(), expiry, "expiry {expiry}");
    }
    assert_eq!(successes, 8 * n * 5);
    let counters = fleet.server.counters();
    assert_eq!(
        (
            counters.refresh_calls,
            counters.successful_refreshes,
            counters.reuse_detections
        ),
        (5, 5, 0),
        "{counters:?}"
    );
    let stats = fleet.stats();
    let refreshes: u64 = stats.iter().map(|s| s.get("refresh_calls")).sum();
    assert_eq!(refreshes, 5, "refresher calls over the fleet");
}

#[test]
fn waves_of_100_redis() {
    run("waves_of_100_redis", || waves(Backend::redis(), 100));
}

#[test]
fn waves_of_100_file() {
    run("waves_of_100_file", || waves(Backend::file(), 100));
}

#[test]
fn waves_of_10_redis() {
    run("waves_of_10_redis", || waves(Backend::redis(), 10));
}

#[test]
fn waves_of_10_file() {
    run("waves_of_10_file", || waves(Backend::file(), 10));
}

// ------------------------------------------------------------ 2. late 401

/// A's requests carry generation g; their 401s are held by the server until
/// B refreshed: A adopts g+1 from the store, still one refresh.
fn late_401(backend: Backend) {
    let mut fleet = Fleet::new(backend, LONG, Duration::ZERO, ServerConfig::default());
    fleet.spawn(&[Mode::Tokio, Mode::Blocking, Mode::Smol]);
    fleet.sign_in();
    let before = fleet.stats();
    fleet.server.expire_access_tokens();
    fleet.server.hold_unauthorized(true);
    assert_eq!(fleet.children[0].ask("fire 50"), "fired");
    assert_eq!(fleet.children[2].ask("fire 50"), "fired");
    fleet.wait_server("A's 100 late 401s", |c| c.held_unauthorized >= 100);
    let refreshed = fleet.children[1].ask("refresh");
    assert!(refreshed.starts_with("access="), "{refreshed}");
    assert_eq!(fleet.server.refresh_calls(), 1);
    fleet.server.hold_unauthorized(false);
    for a in [0, 2] {
        let answer = Stats::parse(&fleet.children[a].ask("collect"));
        assert_eq!((answer.get("ok"), answer.0.len()), (50, 1), "{answer:?}");
        let stats = fleet.children[a].stats();
        let delta = |key: &str| stats.get(key) - before[a].get(key);
        assert_eq!(
            (
                delta("refresh_calls"),
                delta("adopted"),
                delta("adopted_newer"),
                delta("claims_won"),
                delta("store_calls")
            ),
            (0, 1, 1, 0, 1),
            "A adopted g+1 at its late 401, with one store command: {stats:?}"
        );
        assert_eq!(fleet.children[a].ask("token"), refreshed);
    }
    let counters = fleet.server.counters();
    assert_eq!(
        (counters.refresh_calls, counters.reuse_detections),
        (1, 0),
        "{counters:?}"
    );
}

#[test]
fn late_401_adopts_the_newer_generation_redis() {
    run("late_401_redis", || late_401(Backend::redis()));
}

#[test]
fn late_401_adopts_the_newer_generation_file() {
    run("late_401_file", || late_401(Backend::file()));
}

// ------------------------------------------------------------ 3. baseline

/// The same 8 processes without a coordinator: each refreshes with its own
/// copy of the refresh token, and the server detects the reuse.
#[test]
fn baseline_without_a_coordinator_reuses_refresh_tokens() {
    run("baseline", || {
        let mut fleet = Fleet::new(Backend::None, LONG, Duration::ZERO, ServerConfig::default());
        fleet.spawn(&EIGHT);
        let (access, refresh) = fleet.server.initial_tokens();
        for child in &mut fleet.children {
            assert_eq!(
                child.ask(&format!("sign_in_local {access} {refresh}")),
                "ok"
            );
        }
        fleet.server.expire_access_tokens();
        let answers = fleet.wave(100);
        let ok: u64 = answers.iter().map(|a| a.get("ok")).sum();
        let counters = fleet.server.counters();
        assert!(
            counters.refresh_calls > 1 && counters.reuse_detections >= 1,
            "{counters:?}"
        );
        assert!(ok < 800, "the revoked session failed requests: {answers:?}");
    });
}

// ------------------------------------------------------------ fleet-wide verdicts

/// A transient failure cools the whole fleet down, a rejected refresh of
/// the current generation signs the whole fleet out, and `sign_in` brings
/// it back: each with one refresh call fleet-wide.
fn reject_and_cooldown(backend: Backend) {
    let mut fleet = Fleet::new(backend, LONG, Duration::ZERO, ServerConfig::default());
    // Long enough that no step below outlives it.
    fleet.cooldown = Duration::from_secs(60);
    fleet.spawn(&[Mode::Tokio, Mode::Blocking, Mode::Smol]);
    fleet.sign_in();
    let n = 10;
    let wave = |child: &mut ChildProc, outcome: &str, context: &str| {
        all(
            &[Stats::parse(&child.ask(&format!("wave {n}")))],
            n,
            outcome,
            context,
        );
    };

    fleet.server.fail_refresh_with(Some(503));
    fleet.server.expire_access_tokens();
    wave(
        &mut fleet.children[0],
        "err:transient",
        "the failed refresh",
    );
    wave(
        &mut fleet.children[1],
        "err:cooling",
        "the fleet cools down",
    );
    wave(
        &mut fleet.children[2],
        "err:cooling",
        "the fleet cools down",
    );
    wave(
        &mut fleet.children[0],
        "err:transient",
        "the local cool-down",
    );
    assert_eq!(fleet.server.refresh_calls(), 1);

    fleet.server.fail_refresh_with(None);
    fleet.server.reject_refresh(true);
    let (access, refresh) = fleet.server.sign_in_new_session();
    assert_eq!(
        fleet.children[0].ask(&format!("sign_in {access} {refresh}")),
        "ok"
    );
    for other in [1, 2] {
        // Adopted from the store, no refresh.
        assert_eq!(
            fleet.children[other].ask("refresh"),
            format!("access={access}")
        );
    }
    fleet.server.expire_access_tokens();
    wave(
        &mut fleet.children[1],
        "err:rejected",
        "the rejected refresh",
    );
    wave(
        &mut fleet.children[0],
        "err:signed_out",
        "the fleet signed out",
    );
    wave(
        &mut fleet.children[2],
        "err:signed_out",
        "the fleet signed out",
    );
    assert_eq!(fleet.server.refresh_calls(), 2);
    for child in &mut fleet.children {
        assert_eq!(child.stats().get("signed_out"), 1);
    }

    fleet.server.reject_refresh(false);
    let (access, refresh) = fleet.server.sign_in_new_session();
    assert_eq!(
        fleet.children[2].ask(&format!("sign_in {access} {refresh}")),
        "ok"
    );
    fleet.server.expire_access_tokens();
    all(&fleet.wave(n), n, "ok", "signed in again");
    let counters = fleet.server.counters();
    assert_eq!(
        (counters.refresh_calls, counters.reuse_detections),
        (3, 0),
        "{counters:?}"
    );
}

#[test]
fn reject_and_cooldown_are_fleet_wide_redis() {
    run("reject_and_cooldown_redis", || {
        reject_and_cooldown(Backend::redis())
    });
}

#[test]
fn reject_and_cooldown_are_fleet_wide_file() {
    run("reject_and_cooldown_file", || {
        reject_and_cooldown(Backend::file())
    });
}

// ------------------------------------------------------------ 4. holder killed

/// The holder (child 0) is SIGKILLed after its refresh reached the server
/// (which rotated and holds the response), while the others wait for it.
/// Returns the time of the kill.
fn kill_the_holder(fleet: &mut Fleet, n: u64) -> Instant {
    fleet.sign_in();
    fleet.server.hold_refresh_responses(true);
    fleet.server.expire_access_tokens();
    assert_eq!(fleet.children[0].ask(&format!("fire {n}")), "fired");
    fleet.wait_server("the holder's refresh", |c| c.held_responses >= 1);
    for survivor in &mut fleet.children[1..] {
        assert_eq!(survivor.ask(&format!("fire {n}")), "fired");
        assert_eq!(survivor.ask("await waits 1"), "ok", "a survivor waits");
    }
    let killed_at = Instant::now();
    fleet.children[0].kill();
    fleet.children.remove(0);
    killed_at
}

/// No reuse grace: every waiting survivor gets the typed "lost" error
/// within lease + 2 s, with no further refresh call and no reuse
/// detection; after `sign_in`, two more waves refresh once each.
fn holder_killed(backend: Backend, lease: Duration) {
    let mut fleet = Fleet::new(backend, lease, Duration::ZERO, ServerConfig::default());
    fleet.spawn(&EIGHT);
    let n = 20;
    let killed_at = kill_the_holder(&mut fleet, n);
    for (i, survivor) in fleet.children.iter_mut().enumerate() {
        let answer = Stats::parse(&survivor.ask("collect"));
        assert_eq!(
            (answer.get("err:lost"), answer.0.len()),
            (n, 1),
            "survivor {i}: {answer:?}"
        );
    }
    let took = killed_at.elapsed();
    assert!(
        took <= lease + Duration::from_secs(2),
        "lost after {took:?}"
    );
    if let Backend::File(dir) = &fleet.backend {
        // The kernel freed the dead holder's lock at once.
        assert!(
            took < lease / 2,
            "file store saw the dead holder after {took:?}"
        );
        let holders: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "holder"))
            .collect();
        assert_eq!(holders.len(), 1, "{holders:?}");
        let lock = std::fs::File::open(&holders[0]).unwrap();
        assert!(lock.try_lock().is_ok(), "the dead holder's lock is held");
    }
    fleet.server.hold_refresh_responses(false);
    let counters = fleet.server.counters();
    assert_eq!(
        (counters.refresh_calls, counters.reuse_detections),
        (1, 0),
        "{counters:?}"
    );
    for survivor in &mut fleet.children {
        let stats = survivor.stats();
        assert_eq!(
            (stats.get("signed_out"), stats.get("refresh_calls")),
            (1, 0),
            "{stats:?}"
        );
        // Still lost, without a refresh: every call asks the store.
        assert_eq!(survivor.ask("gate"), "err:lost");
    }
    let (access, refresh) = fleet.server.sign_in_new_session();
    assert_eq!(
        fleet.children[0].ask(&format!("sign_in {access} {refresh}")),
        "ok"
    );
    for wave in 1..=2 {
        fleet.server.expire_access_tokens();
        let answers = fleet.wave(n);
        all(&answers, n, "ok", &format!("wave {wave} after sign_in"));
        assert_eq!(fleet.server.refresh_calls(), 1 + wave);
    }
    assert_eq!(fleet.server.reuse_detections(), 0);
}

#[test]
fn killed_holder_is_lost_redis() {
    run("killed_holder_is_lost_redis", || {
        holder_killed(Backend::redis(), Duration::from_millis(1500))
    });
}

#[test]
fn killed_holder_is_lost_file() {
    run("killed_holder_is_lost_file", || {
        holder_killed(Backend::file(), Duration::from_secs(10))
    });
}

/// With a reuse grace (store and server): one survivor re-claims and
/// retries with the same refresh token within lease + grace; the session
/// is kept: 1 grace reuse, 0 reuse detections.
fn holder_killed_grace(backend: Backend, lease: Duration) {
    let grace = Duration::from_secs(20);
    let server = ServerConfig {
        reuse_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    let mut fleet = Fleet::new(backend, lease, grace, server);
    fleet.spawn(&EIGHT);
    let n = 20;
    let killed_at = kill_the_holder(&mut fleet, n);
    // Reaped: the held response goes nowhere.
    fleet.server.hold_refresh_responses(false);
    for (i, survivor) in fleet.children.iter_mut().enumerate() {
        let answer = Stats::parse(&survivor.ask("collect"));
        assert_eq!(
            (answer.get("ok"), answer.0.len()),
            (n, 1),
            "survivor {i}: {answer:?}"
        );
    }
    let took = killed_at.elapsed();
    assert!(took <= lease + grace, "finished after {took:?}");
    let counters = fleet.server.counters();
    assert_eq!(
        (
            counters.refresh_calls,
            counters.grace_reuses,
            counters.reuse_detections
        ),
        (2, 1, 0),
        "{counters:?}"
    );
    let stats = fleet.stats();
    let sum = |key: &str| stats.iter().map(|s| s.get(key)).sum::<u64>();
    assert_eq!((sum("grace_reclaims"), sum("refresh_calls")), (1, 1));
    // The session is kept: the next expiry refreshes once.
    fleet.server.expire_access_tokens();
    all(&fleet.wave(n), n, "ok", "after the grace");
    let counters = fleet.server.counters();
    assert_eq!(
        (counters.refresh_calls, counters.reuse_detections),
        (3, 0),
        "{counters:?}"
    );
}

#[test]
fn killed_holder_grace_redis() {
    run("killed_holder_grace_redis", || {
        holder_killed_grace(Backend::redis(), Duration::from_millis(1500))
    });
}

#[test]
fn killed_holder_grace_file() {
    run("killed_holder_grace_file", || {
        holder_killed_grace(Backend::file(), Duration::from_secs(10))
    });
}

// ------------------------------------------------------------ 5. Redis down

/// Redis SIGKILLed while idle, restarted 2 s later on the same port and
/// directory: valid tokens keep working, refreshes fail fast with
/// "unavailable", then the session is intact and the next wave refreshes
/// once.
#[test]
fn redis_outage_while_idle() {
    run("redis_outage_while_idle", || {
        let mut fleet = Fleet::new(
            Backend::redis(),
            LONG,
            Duration::ZERO,
            ServerConfig::default(),
        );
        fleet.spawn(&[Mode::Tokio, Mode::Smol, Mode::Blocking, Mode::Tokio]);
        fleet.sign_in();
        let handle = fleet.handle();
        let before = handle.read_blocking().unwrap();
        let calls: Vec<u64> = fleet.stats().iter().map(|s| s.get("store_calls")).collect();

        fleet.redis().kill();
        let killed_at = Instant::now();
        all(&fleet.wave(20), 20, "ok", "valid tokens, Redis down");
        let after: Vec<u64> = fleet.stats().iter().map(|s| s.get("store_calls")).collect();
        assert_eq!(calls, after, "a valid token needs no store call");
        fleet.server.expire_access_tokens();
        let started = Instant::now();
        all(
            &fleet.wave(20),
            20,
            "err:unavailable",
            "refresh, Redis down",
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not fast: {:?}",
            started.elapsed()
        );
        assert_eq!(
            fleet.server.refresh_calls(),
            0,
            "never a refresh without a claim"
        );
        // The outage lasts 2 s (its length, not an ordering: every step
        // above is already done).
        std::thread::sleep(Duration::from_secs(2).saturating_sub(killed_at.elapsed()));
        fleet.redis().restart();

        let intact = handle.read_blocking().unwrap();
        assert_eq!(
            (intact.generation, intact.state, intact.token),
            (before.generation, SharedState::Ready, before.token)
        );
        all(&fleet.wave(20), 20, "ok", "after the restart");
        let counters = fleet.server.counters();
        assert_eq!(
            (counters.refresh_calls, counters.reuse_detections),
            (1, 0),
            "{counters:?}"
        );
    });
}

/// Redis SIGKILLed between the server's rotation and the holder's commit:
/// the holder uses its token meanwhile and commits after the restart; no
/// reuse detection, every process ends on its token.
#[test]
fn redis_outage_between_rotation_and_commit() {
    run("redis_outage_between_rotation_and_commit", || {
        let mut fleet = Fleet::new(
            Backend::redis(),
            LONG,
            Duration::ZERO,
            ServerConfig::default(),
        );
        fleet.spawn(&[Mode::Tokio, Mode::Smol, Mode::Blocking, Mode::Tokio]);
        fleet.sign_in();
        let handle = fleet.handle();
        let g = handle.read_blocking().unwrap().generation;
        fleet.server.hold_refresh_responses(true);
        fleet.server.expire_access_tokens();
        assert_eq!(fleet.children[0].ask("fire 20"), "fired");
        fleet.wait_server("the holder's refresh", |c| c.held_responses >= 1);
        fleet.redis().kill();
        fleet.server.hold_refresh_responses(false);
        let answer = Stats::parse(&fleet.children[0].ask("collect"));
        assert_eq!((answer.get("ok"), answer.0.len()), (20, 1), "{answer:?}");
        let stats = fleet.children[0].stats();
        assert_eq!((stats.get("pending"), stats.get("commits_pending")), (1, 1));
        let token = fleet.children[0].ask("token");

        fleet.redis().restart();
        // Woken by the holder's commit (sent from its background flush).
        let committed = match handle.claim_blocking(g).unwrap() {
            ClaimOutcome::Busy(busy) => handle.wait_blocking(&busy, LIMIT).unwrap(),
            ClaimOutcome::Newer(snapshot) => snapshot,
            ClaimOutcome::Claimed(_) => panic!("the holder's claim is gone"),
        };
        assert_eq!(committed.generation.get(), g.get() + 1);
        assert_eq!(format!("access={}", committed.token.unwrap().access), token);
        let stats = fleet.children[0].stats();
        assert_eq!((stats.get("pending"), stats.get("commits")), (0, 1));

        fleet.children.remove(0);
        all(&fleet.wave(20), 20, "ok", "the others adopt");
        for child in &mut fleet.children {
            assert_eq!(child.ask("token"), token);
        }
        let counters = fleet.server.counters();
        assert_eq!(
            (counters.refresh_calls, counters.reuse_detections),
            (1, 0),
            "{counters:?}"
        );
    });
}

// ------------------------------------------------------------ cancelled holder

/// A holder whose callers were all cancelled (its requests timed out)
/// still commits, on its spawner: the fleet adopts its token.
fn cancelled_holder(backend: Backend) {
    let mut fleet = Fleet::new(backend, LONG, Duration::ZERO, ServerConfig::default());
    let config = fleet.config(true);
    fleet
        .children
        .push(ChildProc::spawn(ENTRY, &config, Mode::Tokio));
    fleet.spawn(&[Mode::Smol, Mode::Blocking]);
    fleet.sign_in();
    let handle = fleet.handle();
    let g = handle.read_blocking().unwrap().generation;
    fleet.server.hold_refresh_responses(true);
    fleet.server.expire_access_tokens();
    assert_eq!(fleet.children[0].ask("fire 20"), "fired");
    fleet.wait_server("the holder's refresh", |c| c.held_responses >= 1);
    assert_eq!(fleet.children[0].ask("abort"), "aborted");
    let answer = Stats::parse(&fleet.children[0].ask("collect"));
    assert_eq!(answer.get("aborted"), 20, "{answer:?}");
    fleet.server.hold_refresh_responses(false);
    let committed = match handle.claim_blocking(g).unwrap() {
        ClaimOutcome::Busy(busy) => handle.wait_blocking(&busy, LIMIT).unwrap(),
        ClaimOutcome::Newer(snapshot) => snapshot,
        ClaimOutcome::Claimed(_) => panic!("the holder's claim is gone"),
    };
    assert_eq!(committed.generation.get(), g.get() + 1);
    let token = format!("access={}", committed.token.unwrap().access);
    assert_eq!(fleet.children[0].ask("await refreshes_succeeded 1"), "ok");
    assert_eq!(fleet.children[0].ask("token"), token);
    all(&fleet.wave(20), 20, "ok", "after the cancelled refresh");
    for child in &mut fleet.children {
        assert_eq!(child.ask("token"), token);
    }
    let counters = fleet.server.counters();
    assert_eq!(
        (counters.refresh_calls, counters.reuse_detections),
        (1, 0),
        "{counters:?}"
    );
}

#[test]
fn cancelled_holder_commits_on_its_spawner_redis() {
    run("cancelled_holder_redis", || {
        cancelled_holder(Backend::redis())
    });
}

#[test]
fn cancelled_holder_commits_on_its_spawner_file() {
    run(
        "cancelled_holder_file",
        || cancelled_holder(Backend::file()),
    );
}

// ------------------------------------------------------------ 6. bad input

/// A manager in this process on `store` (`file:` or `redis:`), whose
/// refresher counts its calls and returns `next-N` tokens.
fn manager_on(
    store: &str,
    name: &str,
    calls: &Arc<AtomicUsize>,
) -> (Manager, SharedCredential<Tokens>) {
    let shared = manager_child::open_shared(store, name, CoordConfig::new(LONG).unwrap());
    let counted = calls.clone();
    let manager = TokenManager::new_blocking(move |stale: Option<Tokens>| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = stale;
        Ok::<_, RefreshError<String>>(Tokens {
            access: format!("SECRET-access-{n}"),
            refresh: format!("SECRET-refresh-{n}"),
        })
    })
    .with_coordinator(shared.clone());
    (manager, shared)
}

fn login() -> Tokens {
    Tokens {
        access: "SECRET-access-0".into(),
        refresh: "SECRET-refresh-0".into(),
    }
}

fn expect_coord(result: Result<impl std::fmt::Debug, AuthError<String>>, want: &str) {
    match &result {
        Err(AuthError::Coordination(e)) if format!("{e:?}").starts_with(want) => {}
        _ => panic!("expected {want}, got {result:?}"),
    }
}

/// Damaged Redis records through the manager: typed errors, the record
/// left as it is, no refresh, no hang.
#[test]
fn bad_redis_records_through_the_manager() {
    run("bad_redis_records", || {
        let server = RedisServer::start();
        let store = format!("redis:{}", server.url());
        let calls = Arc::new(AtomicUsize::new(0));
        let (manager, _) = manager_on(&store, "api", &calls);
        manager.sign_in_shared_blocking(login()).unwrap();
        let rec = b"{test:api}:rec".as_slice();
        let cases: [(&[&[u8]], Corruption); 5] = [
            (&[b"SET", rec, b"not a hash"], Corruption::WrongType),
            (
                &[b"HSET", rec, b"v", b"1", b"g", b"abc", b"st", b"ready"],
                Corruption::Undecodable { field: "g" },
            ),
            (
                &[b"HSET", rec, b"v", b"1", b"g", b"3"],
                Corruption::Truncated { missing: "st" },
            ),
            (
                &[b"HSET", rec, b"v", b"1", b"g", b"3", b"st", b"flying"],
                Corruption::UnknownState,
            ),
            (
                &[b"HSET", rec, b"v", b"2", b"g", b"3", b"st", b"ready"],
                Corruption::UnsupportedVersion,
            ),
        ];
        for (damage, problem) in cases {
            server.cmd(&[b"DEL", rec]).unwrap();
            server.cmd(damage).unwrap();
            let dump = |server: &RedisServer| server.cmd(&[b"DUMP", rec]).unwrap();
            let kept = dump(&server);
            let seen = manager.epoch();
            let want = CoordError::Corrupt {
                credential: "api".into(),
                problem,
            };
            assert_eq!(
                manager.refresh_if_current_blocking(seen),
                Err(AuthError::Coordination(want.clone()))
            );
            let async_result = futures::executor::block_on(manager.refresh_if_current(seen));
            assert_eq!(async_result, Err(AuthError::Coordination(want)));
            assert_eq!(dump(&server), kept, "{problem:?}: left as it was");
            // The token held keeps working.
            assert_eq!(manager.token_blocking().unwrap().value, login());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no refresh");
    });
}

/// A damaged record file through the manager.
#[test]
fn bad_file_records_through_the_manager() {
    run("bad_file_records", || {
        let dir = temp_dir("mgr-bad-file");
        let store = format!("file:{}", dir.display());
        let calls = Arc::new(AtomicUsize::new(0));
        let (manager, _) = manager_on(&store, "api", &calls);
        manager.sign_in_shared_blocking(login()).unwrap();
        let record = dir.join("api.record");
        let good = std::fs::read(&record).unwrap();
        let cases = [
            (
                b"garbage".to_vec(),
                Corruption::Undecodable { field: "file" },
            ),
            (
                good[..good.len() - 2].to_vec(),
                Corruption::Truncated { missing: "end" },
            ),
        ];
        for (bytes, problem) in cases {
            std::fs::write(&record, &bytes).unwrap();
            let seen = manager.epoch();
            assert_eq!(
                manager.refresh_if_current_blocking(seen),
                Err(AuthError::Coordination(CoordError::Corrupt {
                    credential: "api".into(),
                    problem
                }))
            );
            assert_eq!(std::fs::read(&record).unwrap(), bytes, "left as it was");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no refresh");
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// The store lost data (FLUSHALL): the refresh that finds it gets a typed
/// error and refreshes nothing; the token held is re-seeded upwards only
/// (counted); a process holding an older generation adopts it, and the
/// next refresh claims it.
#[test]
fn generation_gone_back_is_reseeded_upwards_only() {
    run("generation_gone_back", || {
        let server = RedisServer::start();
        let store = format!("redis:{}", server.url());
        let calls = Arc::new(AtomicUsize::new(0));
        let (a, a_shared) = manager_on(&store, "api", &calls);
        let (b, _) = manager_on(&store, "api", &calls);
        a.sign_in_shared_blocking(login()).unwrap();
        assert_eq!(b.token_blocking().unwrap().value, login()); // b at g1
        let seen = a.epoch();
        a.refresh_if_current_blocking(seen).unwrap();
        let seen = a.epoch();
        let newest = a.refresh_if_current_blocking(seen).unwrap().value; // g3
        server.cmd(&[b"FLUSHALL"]).unwrap();

        let seen = a.epoch();
        expect_coord(a.refresh_if_current_blocking(seen), "GenerationWentBack");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "no refresh");
        let stats = a_shared.stats();
        assert_eq!((stats.generation_regressions, stats.reseeds), (1, 1));
        let reseeded = a_shared.read_blocking().unwrap();
        assert_eq!(
            (reseeded.generation, reseeded.token.as_ref()),
            (Generation::new(3), Some(&newest))
        );
        // b held g1: it adopts g3, it does not re-seed downwards.
        let seen = b.epoch();
        assert_eq!(b.refresh_if_current_blocking(seen).unwrap().value, newest);
        assert_eq!(a_shared.read_blocking().unwrap().generation.get(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "no refresh");
        // The next refresh claims the re-seeded generation.
        let seen = a.epoch();
        a.refresh_if_current_blocking(seen).unwrap();
        assert_eq!(a_shared.read_blocking().unwrap().generation.get(), 4);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    });
}

/// The refresher is handed the token read from the store at the claim,
/// never this process's copy: here the store's token of the same generation
/// was changed behind the manager's back.
#[test]
fn the_refresher_gets_the_store_token_not_the_local_copy() {
    run("store_token", || {
        let server = RedisServer::start();
        let shared = manager_child::open_shared(
            &format!("redis:{}", server.url()),
            "api",
            CoordConfig::new(LONG).unwrap(),
        );
        let handed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = handed.clone();
        let manager: Manager = TokenManager::new_blocking(move |stale: Option<Tokens>| {
            seen.lock().unwrap().push(stale.clone());
            Ok(Tokens {
                access: "next".into(),
                refresh: "next-refresh".into(),
            })
        })
        .with_coordinator(shared.clone());
        manager.sign_in_shared_blocking(login()).unwrap();
        let g = shared.read_blocking().unwrap().generation;
        server
            .cmd(&[
                b"HSET",
                b"{test:api}:rec",
                b"tok",
                b"store-access\nstore-refresh",
            ])
            .unwrap();
        assert_eq!(
            manager.token_blocking().unwrap().value,
            login(),
            "the local copy"
        );
        let seen = manager.epoch();
        assert_eq!(
            manager
                .refresh_if_current_blocking(seen)
                .unwrap()
                .value
                .access,
            "next"
        );
        let store_token = Tokens {
            access: "store-access".into(),
            refresh: "store-refresh".into(),
        };
        assert_eq!(*handed.lock().unwrap(), vec![Some(store_token)]);
        assert_eq!(
            shared.read_blocking().unwrap().generation.get(),
            g.get() + 1
        );
    });
}

/// A Redis user limited to another prefix: `denied`, no refresh.
#[test]
fn acl_denial_through_the_manager() {
    run("acl_denial", || {
        let server = RedisServer::start();
        let other = "ACL SETUSER other on >other-pass resetkeys ~{elsewhere:* resetchannels -@all +evalsha +script|load +xread +time +type +exists +hgetall +hset +del +xadd +xrevrange";
        let args: Vec<&[u8]> = other.split(' ').map(str::as_bytes).collect();
        server.cmd(&args).unwrap();
        let store = format!("redis:{}", server.url_as("other", "other-pass"));
        let calls = Arc::new(AtomicUsize::new(0));
        let (manager, _) = manager_on(&store, "api", &calls);
        expect_coord(manager.token_blocking(), "Denied");
        expect_coord(futures::executor::block_on(manager.token()), "Denied");
        expect_coord(manager.sign_in_shared_blocking(login()), "Denied");
        assert!(manager.current().is_none(), "not signed in here either");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    });
}

/// Redis unreachable at start: `connect` fails fast with a typed error; a
/// manager whose Redis went away before its first call fails fast too.
#[test]
fn redis_unreachable_through_the_manager() {
    run("redis_unreachable", || {
        let port = redis_server::free_port();
        let started = Instant::now();
        let connect = RedisStore::connect(RedisConfig::new(format!("redis://127.0.0.1:{port}/")));
        assert!(
            matches!(connect, Err(CoordError::Unavailable { .. })),
            "{connect:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));

        let mut server = RedisServer::start();
        let store = format!("redis:{}", server.url());
        let calls = Arc::new(AtomicUsize::new(0));
        let (manager, _) = manager_on(&store, "api", &calls);
        server.kill();
        let started = Instant::now();
        expect_coord(manager.token_blocking(), "Unavailable");
        expect_coord(futures::executor::block_on(manager.token()), "Unavailable");
        expect_coord(manager.sign_in_shared_blocking(login()), "Unavailable");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    });
}

/// Invalid configuration: a zero lease; a key whose credential name would
/// break the key layout (typed error, no refresh, other keys unaffected).
#[test]
fn invalid_config_through_the_manager() {
    run("invalid_config", || {
        assert_eq!(
            CoordConfig::new(Duration::ZERO),
            Err(ConfigError::ZeroLease)
        );
        let dir = temp_dir("mgr-config");
        let coordinator = Coordinator::new(
            FileStore::open(&dir).unwrap(),
            Lines,
            CoordConfig::new(LONG).unwrap(),
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let tenants: TokenManager<Tokens, String, String> =
            TokenManager::keyed_blocking(move |tenant, _stale| {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(Tokens {
                    access: format!("access-{tenant}"),
                    refresh: format!("refresh-{tenant}"),
                })
            })
            .with_keyed_coordinator(coordinator, |tenant: &String| format!("tenant.{tenant}"));
        let invalid = AuthError::Coordination(CoordError::Config(ConfigError::InvalidName));
        for key in ["a}b", "a b", "a/b", "{x}", &"x".repeat(130)] {
            let key = key.to_string();
            assert_eq!(
                tenants.for_key(&key).token_blocking(),
                Err(invalid.clone()),
                "{key:?}"
            );
            assert_eq!(
                futures::executor::block_on(tenants.for_key(&key).token()),
                Err(invalid.clone())
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no refresh");
        let acme = "acme".to_string();
        assert_eq!(
            tenants
                .for_key(&acme)
                .token_blocking()
                .unwrap()
                .value
                .access,
            "access-acme"
        );
        assert!(dir.join("tenant.acme.record").exists());
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// Each key of a keyed manager is its own credential in the store: a
/// second process (a second manager) adopts one key's refresh and refreshes
/// another key on its own.
#[test]
fn keyed_managers_share_each_key_apart() {
    run("keyed", || {
        let server = RedisServer::start();
        let keyed = |calls: &Arc<AtomicUsize>, who: &'static str| {
            let config = RedisConfig::new(server.url()).prefix("test").unwrap();
            let coordinator = Coordinator::new(
                RedisStore::connect(config).unwrap(),
                Lines,
                CoordConfig::new(LONG).unwrap(),
            );
            let counted = calls.clone();
            let manager: TokenManager<Tokens, String, String> =
                TokenManager::keyed(move |tenant, _stale| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        Ok(Tokens {
                            access: format!("{tenant}-from-{who}"),
                            refresh: format!("r-{tenant}"),
                        })
                    }
                })
                .with_keyed_coordinator(coordinator, |tenant: &String| tenant.clone());
            manager
        };
        let (one_calls, two_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let one = keyed(&one_calls, "one");
        let two = keyed(&two_calls, "two");
        let (a, b) = ("a".to_string(), "b".to_string());
        futures::executor::block_on(async {
            assert_eq!(
                one.for_key(&a).token().await.unwrap().value.access,
                "a-from-one"
            );
            assert_eq!(
                two.for_key(&a).token().await.unwrap().value.access,
                "a-from-one"
            );
            assert_eq!(
                two.for_key(&b).token().await.unwrap().value.access,
                "b-from-two"
            );
            assert_eq!(
                one.for_key(&b).token().await.unwrap().value.access,
                "b-from-two"
            );
        });
        assert_eq!(
            (
                one_calls.load(Ordering::SeqCst),
                two_calls.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        assert_eq!((one.stats().adopted, two.stats().adopted), (1, 1));
        for key in [b"{test:a}:rec".as_slice(), b"{test:b}:rec"] {
            assert_eq!(server.cmd(&[b"EXISTS", key]).unwrap(), redis::Value::Int(1));
        }
        // Signing one key out fleet-wide leaves the other.
        futures::executor::block_on(one.for_key(&a).sign_out_shared()).unwrap();
        let seen = two.for_key(&a).epoch();
        assert_eq!(
            two.for_key(&a).refresh_if_current_blocking(seen),
            Err(AuthError::SignedOut)
        );
        assert!(two.for_key(&a).is_signed_out());
        assert_eq!(
            two.for_key(&b).token_blocking().unwrap().value.access,
            "b-from-two"
        );
    });
}

/// `Debug` output and errors never show token bytes.
#[test]
fn no_token_bytes_in_debug_or_errors() {
    run("no_token_bytes", || {
        let mut server = RedisServer::start();
        let store = format!("redis:{}", server.url());
        let calls = Arc::new(AtomicUsize::new(0));
        let (manager, shared) = manager_on(&store, "api", &calls);
        let mut output = Vec::new();
        manager.sign_in_shared_blocking(login()).unwrap();
        let token = manager.token_blocking().unwrap();
        output.push(format!("{manager:?} {shared:?} {:?}", manager.for_key(&())));
        output.push(format!("{:?}", token.value));
        let seen = token.epoch;
        manager.refresh_if_current_blocking(seen).unwrap();
        output.push(format!("{manager:?} {:?}", manager.stats()));
        // A codec that cannot read the store's bytes.
        let failing = codec_fn(
            |_: &Tokens| Err(CodecError::new("cannot encode")),
            |_: &[u8]| Err(CodecError::new("cannot decode")),
        );
        let config = RedisConfig::new(server.url()).prefix("test").unwrap();
        let other = Coordinator::new(
            RedisStore::connect(config).unwrap(),
            failing,
            CoordConfig::new(LONG).unwrap(),
        )
        .credential("api")
        .unwrap();
        let broken: Manager =
            TokenManager::new_blocking(|_| Err(RefreshError::Transient("x".into())))
                .with_coordinator(other);
        let codec = broken.token_blocking();
        expect_coord(codec.clone(), "Codec");
        let failed_sign_in = broken.sign_in_shared_blocking(login());
        expect_coord(failed_sign_in.clone(), "Codec");
        server
            .cmd(&[b"HSET", b"{test:api}:rec", b"zz", b"SECRET"])
            .unwrap();
        let seen = manager.epoch();
        let corrupt = manager.refresh_if_current_blocking(seen);
        expect_coord(corrupt.clone(), "Corrupt");
        server.kill();
        let down = manager.sign_in_shared_blocking(login());
        expect_coord(down.clone(), "Unavailable");
        for error in [codec.err(), failed_sign_in.err(), corrupt.err(), down.err()]
            .into_iter()
            .flatten()
        {
            output.push(format!("{error:?} {error}"));
        }
        output.push(format!("{manager:?} {broken:?}"));
        for line in &output {
            assert!(!line.contains("SECRET"), "token bytes in {line}");
        }
        assert!(output.len() >= 8);
    });
}
