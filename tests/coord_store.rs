//! Scale-out, store level: real processes (this binary re-run as children)
//! racing on a real Redis and on the file store.
//!
//! Needs `redis-server` on the PATH: without it these tests fail, they do
//! not skip (`.ci/run` installs it).
// The features under test need Rust 1.89 (`file-coordination`), as this does.
#![allow(clippy::incompatible_msrv)]

#[path = "support/child_proc.rs"]
mod child_proc;
#[path = "support/coord_child.rs"]
mod coord_child;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use coord_child::{ChildConfig, ChildProc, Mode};
use epochflight::auth::coord::{
    ClaimOutcome, CodecError, Committed, ConfigError, CoordConfig, CoordError, Coordinator,
    Corruption, Generation, RedisConfig, RedisStore, SharedCredential, codec_fn,
};
use redis_server::{RedisServer, temp_dir};

/// The children's entry point: a no-op unless run as a child.
#[test]
fn coord_child_entry() {
    coord_child::child_main();
}

const ENTRY: &str = "coord_child_entry";

enum Backend {
    File(PathBuf),
    Redis(RedisServer),
}

struct Fixture {
    backend: Backend,
    name: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Backend::File(dir) = &self.backend {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Fixture {
    fn file() -> Fixture {
        Fixture {
            backend: Backend::File(temp_dir("file-store")),
            name: "api".into(),
        }
    }

    fn redis() -> Fixture {
        Fixture {
            backend: Backend::Redis(RedisServer::start()),
            name: "api".into(),
        }
    }

    fn is_file(&self) -> bool {
        matches!(self.backend, Backend::File(_))
    }

    fn redis_server(&mut self) -> &mut RedisServer {
        match &mut self.backend {
            Backend::Redis(server) => server,
            Backend::File(_) => panic!("not a redis fixture"),
        }
    }

    fn spec(&self) -> String {
        match &self.backend {
            Backend::File(dir) => format!("file:{}", dir.display()),
            Backend::Redis(server) => format!("redis:{}", server.url()),
        }
    }

    fn child_config(&self, lease: Duration, grace: Duration) -> ChildConfig {
        ChildConfig {
            store: self.spec(),
            name: self.name.clone(),
            lease,
            grace,
        }
    }

    fn child(&self, lease: Duration, grace: Duration, mode: Mode) -> ChildProc {
        ChildProc::spawn(ENTRY, &self.child_config(lease, grace), mode)
    }

    /// A handle in this process (a process of its own, as far as the store
    /// can tell).
    fn handle(&self, lease: Duration) -> SharedCredential<String> {
        let config = CoordConfig::new(lease).unwrap();
        coord_child::open(&self.spec(), config)
            .credential(&self.name)
            .unwrap()
    }
}

const LONG: Duration = Duration::from_secs(10);

// ------------------------------------------------------------ races

/// Six processes (2 blocking, 2 tokio, 2 smol) race claims of the same
/// generation, five times: exactly one winner per generation, everybody
/// ends on its token, and each process makes at most 4 store calls per
/// round.
fn race(fx: Fixture) {
    let modes = [Mode::Blocking, Mode::Tokio, Mode::Smol];
    let mut children: Vec<ChildProc> = (0..6)
        .map(|i| fx.child(LONG, Duration::ZERO, modes[i % 3]))
        .collect();
    let seed = fx.handle(LONG);
    let first = seed
        .sign_in_blocking(&"tok-seed".into(), None)
        .unwrap()
        .generation;
    for round in 0..5u64 {
        let g = first.get() + round;
        let before: Vec<u64> = children
            .iter_mut()
            .map(|c| c.ask("calls")["calls ".len()..].parse().unwrap())
            .collect();
        for (i, child) in children.iter_mut().enumerate() {
            child.send(&format!("race {g} tok-{g}-{i}"));
        }
        let answers: Vec<String> = children.iter_mut().map(ChildProc::recv).collect();
        let winners: Vec<usize> = (0..answers.len())
            .filter(|&i| answers[i].starts_with("won "))
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {answers:?}");
        let winner = winners[0];
        assert_eq!(answers[winner], format!("won {}", g + 1));
        for (i, answer) in answers.iter().enumerate() {
            if i != winner {
                assert_eq!(
                    answer,
                    &format!("adopted g={} state=ready token=tok-{g}-{winner}", g + 1),
                    "round {round}, child {i}"
                );
            }
        }
        for (i, child) in children.iter_mut().enumerate() {
            let after: u64 = child.ask("calls")["calls ".len()..].parse().unwrap();
            assert!(
                after - before[i] <= 4,
                "round {round}: child {i} made {} store calls",
                after - before[i]
            );
        }
    }
    let end = seed.read_blocking().unwrap();
    assert_eq!(end.generation.get(), first.get() + 5);
}

#[test]
fn race_one_winner_per_generation_file() {
    race(Fixture::file());
}

#[test]
fn race_one_winner_per_generation_redis() {
    race(Fixture::redis());
}

// ------------------------------------------------------------ fencing

/// A holder whose generation moved on (a sign-in elsewhere) cannot commit.
fn fencing(fx: Fixture) {
    let mut a = fx.child(LONG, Duration::ZERO, Mode::Tokio);
    let other = fx.handle(LONG);
    let g = other
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation;
    assert_eq!(
        a.ask(&format!("claim {}", g.get())),
        format!("claimed g={} token=t1 grace=0", g.get())
    );
    let signed_in = other.sign_in_blocking(&"t-new".into(), None).unwrap();
    assert!(signed_in.generation > g);
    assert_eq!(a.ask("commit stale-write"), "err fenced");
    let now = other.read_blocking().unwrap();
    assert_eq!(
        (now.generation, now.token.as_deref()),
        (signed_in.generation, Some("t-new"))
    );
    // A claim of the old generation is answered with the new one.
    assert_eq!(
        a.ask(&format!("claim {}", g.get())),
        format!(
            "newer g={} state=ready token=t-new",
            signed_in.generation.get()
        )
    );
}

#[test]
fn stale_holder_is_fenced_file() {
    fencing(Fixture::file());
}

#[test]
fn stale_holder_is_fenced_redis() {
    fencing(Fixture::redis());
}

// ------------------------------------------------------------ holder gone

/// SIGKILL of the holder while sending: the waiting process gets `lost`
/// (file: at once, the kernel frees the lock; Redis: at the lease's end),
/// nobody can claim until `sign_in`.
fn holder_killed(fx: Fixture, lease: Duration) {
    let mut a = fx.child(lease, Duration::ZERO, Mode::Blocking);
    let mut b = fx.child(lease, Duration::ZERO, Mode::Smol);
    let handle = fx.handle(lease);
    let g = handle
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation
        .get();
    let claimed_at = Instant::now();
    assert!(a.ask(&format!("claim {g}")).starts_with("claimed"));
    assert_eq!(b.ask(&format!("claim {g}")), "busy");
    b.send("wait 30000");
    let killed_at = Instant::now();
    a.kill();
    assert_eq!(b.recv(), format!("g={g} state=lost token=-"));
    if let Backend::File(dir) = &fx.backend {
        // The kernel freed the dead holder's lock at once.
        let holders: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "holder"))
            .collect();
        assert_eq!(holders.len(), 1, "{holders:?}");
        let lock = std::fs::File::open(&holders[0]).unwrap();
        assert!(
            lock.try_lock().is_ok(),
            "the dead holder's lock is still held"
        );
        drop(lock);
        let after_kill = killed_at.elapsed();
        assert!(
            after_kill < lease / 2,
            "file store saw the dead holder after {after_kill:?}"
        );
        // The lock is free at once: a claim answers `lost` without waiting.
        assert_eq!(b.ask(&format!("claim {g}")), "err lost");
    } else {
        let waited = claimed_at.elapsed();
        assert!(
            waited <= lease + Duration::from_secs(2),
            "lost after {waited:?}"
        );
        assert_eq!(b.ask(&format!("claim {g}")), "err lost");
    }
    // `sign_in` brings the credential back.
    let back = handle
        .sign_in_blocking(&"t2".into(), None)
        .unwrap()
        .generation
        .get();
    assert!(b.ask(&format!("claim {back}")).starts_with("claimed"));
    assert_eq!(b.ask("commit t3"), format!("committed {}", back + 1));
}

#[test]
fn killed_holder_is_lost_at_once_file() {
    holder_killed(Fixture::file(), LONG);
}

#[test]
fn killed_holder_is_lost_at_lease_end_redis() {
    holder_killed(Fixture::redis(), Duration::from_millis(1500));
}

/// A slow holder (alive, lease over) is reported lost, but its late commit
/// still lands and everybody adopts it.
fn late_commit(fx: Fixture) {
    let lease = Duration::from_millis(600);
    let mut a = fx.child(lease, Duration::ZERO, Mode::Tokio);
    let mut b = fx.child(lease, Duration::ZERO, Mode::Blocking);
    let handle = fx.handle(lease);
    let g = handle
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation
        .get();
    assert!(a.ask(&format!("claim {g}")).starts_with("claimed"));
    assert_eq!(b.ask(&format!("claim {g}")), "busy");
    // Bounded by the lease: returns when it ends, without a commit.
    assert_eq!(b.ask("wait 30000"), format!("g={g} state=lost token=-"));
    assert_eq!(a.ask("commit late"), format!("committed {}", g + 1));
    assert_eq!(b.ask("read"), format!("g={} state=ready token=late", g + 1));
}

#[test]
fn late_commit_by_the_holder_lands_file() {
    late_commit(Fixture::file());
}

#[test]
fn late_commit_by_the_holder_lands_redis() {
    late_commit(Fixture::redis());
}

/// Reuse grace: after the holder is gone, one survivor re-claims (with the
/// same refresh token) and commits; a live old holder is fenced from then on.
fn grace(fx: Fixture) {
    let lease = Duration::from_millis(500);
    let grace = Duration::from_secs(30);
    let mut a = fx.child(lease, grace, Mode::Blocking);
    let mut b = fx.child(lease, grace, Mode::Tokio);
    let mut c = fx.child(lease, grace, Mode::Smol);
    let handle = fx.handle(lease);
    let g = handle
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation
        .get();
    assert!(a.ask(&format!("claim {g}")).starts_with("claimed"));
    a.kill();
    // Redis sees the holder gone at its lease's end: wait for that.
    let mut answer = b.ask(&format!("claim {g}"));
    if answer == "busy" {
        assert_eq!(b.ask("wait 30000"), format!("g={g} state=lost token=-"));
        answer = b.ask(&format!("claim {g}"));
    }
    assert_eq!(answer, format!("claimed g={g} token=t1 grace=1"));
    // One re-claim only.
    assert_eq!(c.ask(&format!("claim {g}")), "busy");
    assert_eq!(b.ask("commit t2"), format!("committed {}", g + 1));
    assert_eq!(c.ask("read"), format!("g={} state=ready token=t2", g + 1));

    // A live old holder: its lease ends, C re-claims, the old holder's
    // commit is fenced and C's lands.
    let g = g + 1;
    let mut old = fx.child(lease, grace, Mode::Tokio);
    assert!(old.ask(&format!("claim {g}")).starts_with("claimed"));
    assert_eq!(c.ask(&format!("claim {g}")), "busy");
    assert_eq!(c.ask("wait 30000"), format!("g={g} state=lost token=-"));
    assert_eq!(
        c.ask(&format!("claim {g}")),
        format!("claimed g={g} token=t2 grace=1")
    );
    assert_eq!(old.ask("commit from-old"), "err fenced");
    assert_eq!(c.ask("commit from-c"), format!("committed {}", g + 1));
    assert_eq!(
        b.ask("read"),
        format!("g={} state=ready token=from-c", g + 1)
    );
}

#[test]
fn grace_reclaim_file() {
    grace(Fixture::file());
}

#[test]
fn grace_reclaim_redis() {
    grace(Fixture::redis());
}

/// Reject and transient failures act fleet-wide.
fn reject_and_cooldown(fx: Fixture) {
    let mut a = fx.child(LONG, Duration::ZERO, Mode::Smol);
    let mut b = fx.child(LONG, Duration::ZERO, Mode::Blocking);
    let handle = fx.handle(LONG);
    let g = handle
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation
        .get();
    assert!(a.ask(&format!("claim {g}")).starts_with("claimed"));
    assert_eq!(
        a.ask("transient 60000"),
        format!("g={g} state=cooling token=t1")
    );
    assert_eq!(b.ask(&format!("claim {g}")), "err cooling");
    let g = handle
        .sign_in_blocking(&"t2".into(), None)
        .unwrap()
        .generation
        .get();
    assert!(b.ask(&format!("claim {g}")).starts_with("claimed"));
    assert_eq!(
        b.ask("reject"),
        format!("g={} state=signed_out token=-", g + 1)
    );
    assert_eq!(a.ask(&format!("claim {}", g + 1)), "err signed_out");
    assert_eq!(
        a.ask("read"),
        format!("g={} state=signed_out token=-", g + 1)
    );
}

#[test]
fn reject_and_cooldown_are_fleet_wide_file() {
    reject_and_cooldown(Fixture::file());
}

#[test]
fn reject_and_cooldown_are_fleet_wide_redis() {
    reject_and_cooldown(Fixture::redis());
}

// ------------------------------------------------------------ Redis outage

/// Redis SIGKILLed and restarted on the same port and directory: calls fail
/// fast with `unavailable` meanwhile; a commit made meanwhile is kept and
/// lands after the restart; the state is intact.
#[test]
fn redis_outage_and_restart() {
    let mut fx = Fixture::redis();
    let lease = Duration::from_secs(10);
    let holder = fx.handle(lease);
    let other = fx.handle(lease);
    let g = holder
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation;
    let ClaimOutcome::Claimed(claim) = holder.claim_blocking(g).unwrap() else {
        panic!("not claimed")
    };
    fx.redis_server().kill();

    let started = Instant::now();
    assert!(matches!(
        other.read_blocking(),
        Err(CoordError::Unavailable { .. })
    ));
    assert!(matches!(
        other.claim_blocking(g),
        Err(CoordError::Unavailable { .. })
    ));
    let async_read = futures::executor::block_on(other.read());
    assert!(
        matches!(async_read, Err(CoordError::Unavailable { .. })),
        "{async_read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "not fast: {:?}",
        started.elapsed()
    );
    // The refresh happened (the server rotated): keep it.
    let committed = holder.commit_blocking(claim, &"t2".into(), None).unwrap();
    assert_eq!(committed, Committed::Pending(Generation::new(g.get() + 1)));
    assert!(holder.has_pending_commit());
    assert!(other.stats().unavailable >= 3);

    fx.redis_server().restart();
    // Intact: still generation g, claimed by the holder.
    let during = other.read_blocking().unwrap();
    assert_eq!(during.generation, g);
    assert!(matches!(
        during.state,
        epochflight::auth::coord::SharedState::Sending { .. }
    ));
    // The holder's next call sends its commit first.
    let after = holder.read_blocking().unwrap();
    assert_eq!(
        (after.generation.get(), after.token.as_deref()),
        (g.get() + 1, Some("t2"))
    );
    assert!(!holder.has_pending_commit());
    let seen = other.read_blocking().unwrap();
    assert_eq!(
        (seen.generation.get(), seen.token.as_deref()),
        (g.get() + 1, Some("t2"))
    );
    // And the next refresh claims normally.
    assert!(matches!(
        other.claim_blocking(seen.generation).unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

// ------------------------------------------------------------ bad input

fn expect_corrupt<T: std::fmt::Debug>(result: Result<T, CoordError>, problem: Corruption) {
    match result {
        Err(CoordError::Corrupt { problem: p, .. }) => assert_eq!(p, problem),
        other => panic!("expected {problem:?}, got {other:?}"),
    }
}

#[test]
fn redis_bad_records_are_typed_errors_and_left_alone() {
    let mut fx = Fixture::redis();
    let handle = fx.handle(LONG);
    let server = fx.redis_server();
    let rec = b"{test:api}:rec".as_slice();
    let ev = b"{test:api}:ev".as_slice();
    let reset = |server: &RedisServer| {
        server.cmd(&[b"DEL", rec, ev]).unwrap();
    };

    server.cmd(&[b"SET", rec, b"not a hash"]).unwrap();
    expect_corrupt(handle.read_blocking(), Corruption::WrongType);
    expect_corrupt(
        handle.claim_blocking(Generation::INITIAL),
        Corruption::WrongType,
    );
    expect_corrupt(
        handle.sign_in_blocking(&"t".into(), None),
        Corruption::WrongType,
    );
    let kept: String = redis::cmd("GET")
        .arg(rec)
        .query(&mut server.admin())
        .unwrap();
    assert_eq!(kept, "not a hash", "a corrupt record is never overwritten");

    reset(server);
    server.cmd(&[b"SET", ev, b"not a stream"]).unwrap();
    expect_corrupt(
        handle.sign_in_blocking(&"t".into(), None),
        Corruption::WrongType,
    );

    let cases: [(&[&[u8]], Corruption); 6] = [
        (
            &[b"v", b"1", b"g", b"abc", b"st", b"ready"],
            Corruption::Undecodable { field: "g" },
        ),
        (
            &[b"v", b"1", b"g", b"3"],
            Corruption::Truncated { missing: "st" },
        ),
        (
            &[
                b"v",
                b"1",
                b"g",
                b"3",
                b"st",
                b"sending",
                b"own",
                b"0123456789abcdef0123456789abcdef",
                b"rg",
                b"0",
                b"at",
                b"1",
            ],
            Corruption::Truncated { missing: "lu" },
        ),
        (
            &[b"v", b"1", b"g", b"3", b"st", b"flying"],
            Corruption::UnknownState,
        ),
        (
            &[b"v", b"2", b"g", b"3", b"st", b"ready"],
            Corruption::UnsupportedVersion,
        ),
        (
            &[b"v", b"1", b"g", b"3", b"st", b"ready", b"zz", b"1"],
            Corruption::Undecodable {
                field: "unknown field",
            },
        ),
    ];
    for (fields, problem) in cases {
        reset(server);
        let mut args: Vec<&[u8]> = vec![b"HSET", rec];
        args.extend_from_slice(fields);
        server.cmd(&args).unwrap();
        expect_corrupt(handle.read_blocking(), problem);
        expect_corrupt(handle.claim_blocking(Generation::new(3)), problem);
        let len: usize = redis::cmd("HLEN")
            .arg(rec)
            .query(&mut server.admin())
            .unwrap();
        assert_eq!(len * 2, fields.len(), "left as it was");
    }
}

/// The store lost data: reported, counted, re-seeded upwards only.
fn generation_went_back(fx: &Fixture, lose: impl Fn()) {
    let a = fx.handle(LONG);
    let b = fx.handle(LONG);
    a.sign_in_blocking(&"t1".into(), None).unwrap();
    for token in ["t2", "t3"] {
        let g = a.read_blocking().unwrap().generation;
        let ClaimOutcome::Claimed(claim) = a.claim_blocking(g).unwrap() else {
            panic!("not claimed")
        };
        a.commit_blocking(claim, &token.to_string(), None).unwrap();
    }
    let newest = a.read_blocking().unwrap().generation;
    assert_eq!(b.read_blocking().unwrap().generation, newest);
    lose();
    match a.read_blocking() {
        Err(CoordError::GenerationWentBack { store, seen }) => {
            assert_eq!((store, seen), (Generation::INITIAL, newest))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.claim_blocking(newest),
        Err(CoordError::GenerationWentBack { .. })
    ));
    assert_eq!(a.stats().generation_regressions, 2);
    // A process with an older token re-seeds first; the newest wins after.
    let older = Generation::new(newest.get() - 1);
    let c = fx.handle(LONG);
    assert_eq!(
        c.reseed_blocking(older, &"t2".into(), None)
            .unwrap()
            .generation,
        older
    );
    let reseeded = b.reseed_blocking(newest, &"t3".into(), None).unwrap();
    assert_eq!(
        (reseeded.generation, reseeded.token.as_deref()),
        (newest, Some("t3"))
    );
    // Upwards only: a lower re-seed changes nothing.
    let kept = c.reseed_blocking(older, &"t2".into(), None).unwrap();
    assert_eq!(
        (kept.generation, kept.token.as_deref()),
        (newest, Some("t3"))
    );
    assert_eq!((b.stats().reseeds, c.stats().reseeds), (1, 1));
    assert_eq!(a.read_blocking().unwrap().token.as_deref(), Some("t3"));
}

#[test]
fn generation_went_back_redis() {
    let mut fx = Fixture::redis();
    let url = fx.redis_server().url();
    generation_went_back(&fx, move || {
        let mut admin = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("FLUSHALL").query::<()>(&mut admin).unwrap();
    });
}

#[test]
fn generation_went_back_file() {
    let fx = Fixture::file();
    let Backend::File(dir) = &fx.backend else {
        unreachable!()
    };
    let record = dir.join("api.record");
    generation_went_back(&fx, move || std::fs::remove_file(&record).unwrap());
}

#[test]
fn file_bad_records_are_typed_errors() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::file();
    let Backend::File(dir) = &fx.backend else {
        unreachable!()
    };
    let handle = fx.handle(LONG);
    handle.sign_in_blocking(&"t1".into(), None).unwrap();
    let record = dir.join("api.record");
    let good = std::fs::read(&record).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&record), 0o600);
    assert_eq!(mode(&dir.join("api.lock")), 0o600);

    let cases: [(Vec<u8>, Corruption); 3] = [
        (b"hello".to_vec(), Corruption::Undecodable { field: "file" }),
        (
            good[..good.len() - 2].to_vec(),
            Corruption::Truncated { missing: "end" },
        ),
        (
            String::from_utf8(good.clone())
                .unwrap()
                .replace("st 5\nready", "st 6\nflying")
                .into_bytes(),
            Corruption::UnknownState,
        ),
    ];
    for (bytes, problem) in cases {
        std::fs::write(&record, &bytes).unwrap();
        expect_corrupt(handle.read_blocking(), problem);
        expect_corrupt(handle.claim_blocking(Generation::new(1)), problem);
        expect_corrupt(handle.sign_in_blocking(&"t".into(), None), problem);
        assert_eq!(std::fs::read(&record).unwrap(), bytes, "left as it was");
    }
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir(&record).unwrap();
    expect_corrupt(fx.handle(LONG).read_blocking(), Corruption::WrongType);

    let fresh = temp_dir("file-mode").join("new");
    epochflight::auth::coord::FileStore::open(&fresh).unwrap();
    assert_eq!(mode(&fresh), 0o700);
}

#[test]
fn invalid_config_is_rejected() {
    assert_eq!(
        CoordConfig::new(Duration::ZERO),
        Err(ConfigError::ZeroLease)
    );
    let dir = temp_dir("config");
    let store = epochflight::auth::coord::FileStore::open(&dir).unwrap();
    let coordinator = Coordinator::new(
        store,
        epochflight::auth::coord::Utf8Codec,
        CoordConfig::new(LONG).unwrap(),
    );
    for name in [
        "",
        "a}b",
        "a{b",
        "a:b",
        ".hidden",
        "a b",
        "a/b",
        &"x".repeat(129),
    ] {
        assert_eq!(
            coordinator.credential(name).map(|_| ()),
            Err(CoordError::Config(ConfigError::InvalidName)),
            "{name:?}"
        );
    }
    for prefix in ["", "a{b", "a}b", "a*b", "a b", &"p".repeat(65)] {
        assert_eq!(
            RedisConfig::new("redis://127.0.0.1/")
                .prefix(prefix)
                .map(|_| ())
                .unwrap_err(),
            ConfigError::InvalidPrefix
        );
    }
    let bad_url = RedisStore::connect(RedisConfig::new("nonsense://x"));
    assert_eq!(
        bad_url.map(|_| ()),
        Err(CoordError::Config(ConfigError::InvalidUrl))
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn redis_unreachable_at_start_is_a_typed_error() {
    let port = redis_server::free_port();
    let started = Instant::now();
    let result = RedisStore::connect(RedisConfig::new(format!("redis://127.0.0.1:{port}/")));
    assert!(
        matches!(result, Err(CoordError::Unavailable { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The README's ACL line, tested with a real ACL user; a user limited to
/// another prefix, or a wrong password, is `denied`.
#[test]
fn redis_acl_user() {
    let mut fx = Fixture::redis();
    let server = fx.redis_server();
    let acl = "ACL SETUSER app on >app-pass resetkeys ~{test:* resetchannels -@all +evalsha +script|load +xread +time +type +exists +hgetall +hset +del +xadd +xrevrange";
    let args: Vec<&[u8]> = acl.split(' ').map(str::as_bytes).collect();
    server.cmd(&args).unwrap();
    let other = "ACL SETUSER other on >other-pass resetkeys ~{elsewhere:* resetchannels -@all +evalsha +script|load +xread +time +type +exists +hgetall +hset +del +xadd +xrevrange";
    let args: Vec<&[u8]> = other.split(' ').map(str::as_bytes).collect();
    server.cmd(&args).unwrap();
    let config = CoordConfig::new(Duration::from_millis(500)).unwrap();
    let open = |url: String| {
        RedisStore::connect(RedisConfig::new(url).prefix("test").unwrap())
            .map(|store| Coordinator::new(store, epochflight::auth::coord::Utf8Codec, config))
    };
    let app = open(server.url_as("app", "app-pass"))
        .unwrap()
        .credential("api")
        .unwrap();
    let g = app.sign_in_blocking(&"t1".into(), None).unwrap().generation;
    let ClaimOutcome::Claimed(claim) = app.claim_blocking(g).unwrap() else {
        panic!()
    };
    let ClaimOutcome::Busy(busy) = app.claim_blocking(g).unwrap() else {
        panic!()
    };
    // The wait (XREAD) is allowed too: it ends at the lease's end, lost.
    let waited = app.wait_blocking(&busy, Duration::from_secs(5)).unwrap();
    assert_eq!(waited.state, epochflight::auth::coord::SharedState::Lost);
    assert!(matches!(
        app.commit_blocking(claim, &"t2".into(), None),
        Ok(Committed::Stored(_))
    ));
    let async_read = futures::executor::block_on(app.read()).unwrap();
    assert_eq!(async_read.token.as_deref(), Some("t2"));

    let denied = open(server.url_as("other", "other-pass"))
        .unwrap()
        .credential("api")
        .unwrap();
    assert!(matches!(
        denied.read_blocking(),
        Err(CoordError::Denied { .. })
    ));
    let wrong = open(server.url_as("app", "wrong-pass"));
    assert!(matches!(wrong, Err(CoordError::Denied { .. })), "{wrong:?}");
}

/// Tokens go through the codec (here a toy cipher: the store never holds
/// the plain token), and no `Debug` or error output shows token bytes, nor
/// the URL's password.
#[test]
fn secrets_stay_out_of_the_store_and_of_debug_output() {
    let mut fx = Fixture::redis();
    let server = fx.redis_server();
    let password = "PASSWORD-in-url";
    server
        .cmd(&[b"CONFIG", b"SET", b"requirepass", password.as_bytes()])
        .unwrap();
    let url = format!("redis://:{password}@127.0.0.1:{}/", server.port());
    let xor = |bytes: &[u8]| bytes.iter().map(|b| b ^ 0xa5).collect::<Vec<u8>>();
    let codec = codec_fn(
        move |t: &String| Ok(xor(t.as_bytes())),
        move |b: &[u8]| String::from_utf8(xor(b)).map_err(|_| CodecError::new("bad key")),
    );
    let config = RedisConfig::new(url.clone()).prefix("test").unwrap();
    let store = RedisStore::connect(config.clone()).unwrap();
    let coordinator = Coordinator::new(store.clone(), codec, CoordConfig::new(LONG).unwrap());
    let cred = coordinator.credential("api").unwrap();
    let secret = "SECRET-token-bytes";
    let mut output = Vec::new();
    let snapshot = cred.sign_in_blocking(&secret.into(), None).unwrap();
    assert_eq!(snapshot.token.as_deref(), Some(secret));
    output.push(format!("{snapshot:?}"));
    let outcome = cred.claim_blocking(snapshot.generation).unwrap();
    output.push(format!("{outcome:?}"));
    let ClaimOutcome::Claimed(claim) = outcome else {
        panic!()
    };
    output.push(format!("{claim:?}"));
    let raw: Vec<u8> = redis::cmd("HGET")
        .arg("{test:api}:rec")
        .arg("tok")
        .query(
            &mut redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains("SECRET"),
        "stored in the clear"
    );
    output.push(format!(
        "{:?}",
        cred.claim_blocking(snapshot.generation).unwrap()
    ));
    output.push(format!(
        "{:?}",
        cred.commit_blocking(claim, &"SECRET-next".into(), None)
    ));
    output.push(format!("{cred:?} {coordinator:?} {store:?} {config:?}"));
    // Errors from every kind of failure.
    let plain = coord_child::open(&format!("redis:{url}"), CoordConfig::new(LONG).unwrap())
        .credential("api")
        .unwrap();
    let codec_error = plain.read_blocking();
    assert!(
        matches!(codec_error, Err(CoordError::Codec(_))),
        "{codec_error:?}"
    );
    output.push(format!("{codec_error:?}"));
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("DEL")
        .arg("{test:api}:rec")
        .query::<()>(&mut admin)
        .unwrap();
    let stale = cred.read_blocking();
    assert!(
        matches!(stale, Err(CoordError::GenerationWentBack { .. })),
        "{stale:?}"
    );
    output.push(format!("{stale:?}"));
    server.kill();
    let down = cred.sign_in_blocking(&"SECRET-while-down".into(), None);
    assert!(
        matches!(down, Err(CoordError::Unavailable { .. })),
        "{down:?}"
    );
    output.push(format!("{down:?}"));
    for error in [codec_error.err(), stale.err(), down.err()]
        .into_iter()
        .flatten()
    {
        output.push(error.to_string());
    }
    for line in &output {
        assert!(!line.contains("SECRET"), "token bytes in {line}");
        assert!(!line.contains(password), "password in {line}");
    }
    assert!(output.len() >= 10);
}

// ------------------------------------------------------------ wake-ups, cancellation

/// A waiter is woken by the commit: with a 30 s timeout and a 30 s lease it
/// returns as soon as the holder commits.
fn woken_by_commit(fx: Fixture) {
    let lease = Duration::from_secs(30);
    let mut a = fx.child(lease, Duration::ZERO, Mode::Smol);
    let mut b = fx.child(lease, Duration::ZERO, Mode::Tokio);
    let mut c = fx.child(lease, Duration::ZERO, Mode::Blocking);
    let g = fx
        .handle(lease)
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation
        .get();
    assert!(a.ask(&format!("claim {g}")).starts_with("claimed"));
    for waiter in [&mut b, &mut c] {
        assert_eq!(waiter.ask(&format!("claim {g}")), "busy");
        waiter.send("wait 30000");
    }
    let committed_at = Instant::now();
    assert_eq!(a.ask("commit t2"), format!("committed {}", g + 1));
    for waiter in [&mut b, &mut c] {
        assert_eq!(waiter.recv(), format!("g={} state=ready token=t2", g + 1));
    }
    let woken = committed_at.elapsed();
    assert!(woken < Duration::from_secs(5), "woken after {woken:?}");
}

#[test]
fn waiters_are_woken_by_the_commit_file() {
    woken_by_commit(Fixture::file());
}

#[test]
fn waiters_are_woken_by_the_commit_redis() {
    woken_by_commit(Fixture::redis());
}

/// An async claim dropped after it was sent (held up in the store: the
/// file's record lock taken by the test, or Redis paused for writes) is
/// released in the background once it lands: the record is not left
/// `sending` (nor read as lost), and the next claim wins at once.
fn cancelled_claim(mut fx: Fixture, rt: coord_rt::Rt) {
    let cancelled = fx.handle(LONG);
    let other = fx.handle(LONG);
    let g = other
        .sign_in_blocking(&"t1".into(), None)
        .unwrap()
        .generation;
    let file_lock = rt.block_on(async {
        // Connected first, so that the claim is sent at once.
        cancelled.read().await.unwrap();
        let file_lock = match &fx.backend {
            Backend::File(dir) => {
                let lock = std::fs::File::open(dir.join("api.lock")).unwrap();
                lock.lock().unwrap();
                Some(lock)
            }
            Backend::Redis(server) => {
                server
                    .cmd(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"])
                    .unwrap();
                None
            }
        };
        let calls_before = cancelled.stats().store_calls;
        let mut claim = Box::pin(cancelled.claim(g));
        assert!(futures::poll!(&mut claim).is_pending());
        if !fx.is_file() {
            // Sent: Redis holds it back (a blocked client).
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let info: String = redis::cmd("INFO")
                    .arg("clients")
                    .query(&mut fx.redis_server().admin())
                    .unwrap();
                if info.contains("blocked_clients:1") {
                    break;
                }
                assert!(Instant::now() < until, "the claim never reached Redis");
                assert!(futures::poll!(&mut claim).is_pending());
            }
        }
        drop(claim);
        (file_lock, calls_before)
    });
    let (file_lock, calls_before) = file_lock;
    match file_lock {
        Some(lock) => drop(lock),
        None => {
            fx.redis_server().cmd(&[b"CLIENT", b"UNPAUSE"]).unwrap();
        }
    }
    // claim, release: wait until the background release is done (counted
    // once answered).
    let until = Instant::now() + Duration::from_secs(10);
    while cancelled.stats().store_calls < calls_before + 2 {
        assert!(Instant::now() < until, "{:?}", cancelled.stats());
        std::thread::yield_now();
    }
    let outcome = other.claim_blocking(g).unwrap();
    let ClaimOutcome::Claimed(claim) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(claim.token().map(String::as_str), Some("t1"));
    assert_eq!(cancelled.stats().claims_won, 0);
}

mod coord_rt {
    /// The runtimes a cancelled claim is tried on.
    #[derive(Clone, Copy)]
    pub enum Rt {
        Tokio,
        Smol,
    }

    impl Rt {
        pub fn block_on<F: Future>(self, f: F) -> F::Output {
            match self {
                Rt::Tokio => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f),
                Rt::Smol => smol::block_on(f),
            }
        }
    }
}

#[test]
fn cancelled_async_claim_is_released_file() {
    cancelled_claim(Fixture::file(), coord_rt::Rt::Smol);
}

#[test]
fn cancelled_async_claim_is_released_redis_tokio() {
    cancelled_claim(Fixture::redis(), coord_rt::Rt::Tokio);
}

#[test]
fn cancelled_async_claim_is_released_redis_smol() {
    cancelled_claim(Fixture::redis(), coord_rt::Rt::Smol);
}

// ------------------------------------------------------------ expiry

/// Expiries are stored in the store's clock and read back as this process's
/// instants: a token committed as expiring in 60 s reads so elsewhere.
fn expiry(fx: Fixture) {
    let a = fx.handle(LONG);
    let b = fx.handle(LONG);
    let in_a_minute = Instant::now() + Duration::from_secs(60);
    let g = a
        .sign_in_blocking(&"t1".into(), Some(in_a_minute))
        .unwrap()
        .generation;
    let seen = b.read_blocking().unwrap();
    let at = seen.expires_at.expect("an expiry");
    let near = |at: Instant, want: Instant| {
        let gap = if at > want { at - want } else { want - at };
        gap < Duration::from_secs(2)
    };
    assert!(near(at, in_a_minute), "{at:?} vs {in_a_minute:?}");
    let ClaimOutcome::Claimed(claim) = b.claim_blocking(g).unwrap() else {
        panic!("not claimed")
    };
    assert!(near(claim.expires_at().unwrap(), in_a_minute));
    let in_an_hour = Instant::now() + Duration::from_secs(3600);
    b.commit_blocking(claim, &"t2".into(), Some(in_an_hour))
        .unwrap();
    assert!(near(
        a.read_blocking().unwrap().expires_at.unwrap(),
        in_an_hour
    ));
}

#[test]
fn expiry_is_kept_in_the_store_clock_file() {
    expiry(Fixture::file());
}

#[test]
fn expiry_is_kept_in_the_store_clock_redis() {
    expiry(Fixture::redis());
}
