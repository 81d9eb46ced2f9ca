//! Child processes for the scale-out tests: the test binary re-run as a
//! child (`EPOCHFLIGHT_CHILD_STORE` set), driven line by line over stdin, so
//! the parent decides every step (claim here, wait there, kill that one) and
//! nothing is ordered by sleeping.
//!
//! The child opens one credential and answers each command with one line
//! starting with `@@ ` on stdout (other lines, libtest's, are skipped).
#![allow(dead_code)]

use std::io::BufRead;
use std::time::{Duration, Instant};

use epochflight::auth::coord::{
    Busy, Claim, ClaimOutcome, CoordConfig, CoordError, Coordinator, SharedCredential, SharedState,
    Snapshot, Utf8Codec,
};

/// How the child calls the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Blocking,
    Tokio,
    Smol,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking",
            Mode::Tokio => "tokio",
            Mode::Smol => "smol",
        }
    }
}

/// Which store, lease and grace the children use.
#[derive(Clone, Debug)]
pub struct ChildConfig {
    /// `file:<dir>` or `redis:<url>`.
    pub store: String,
    pub name: String,
    pub lease: Duration,
    pub grace: Duration,
}

/// A running child.
pub type ChildProc = crate::child_proc::ChildProc<Mode>;

impl ChildProc {
    /// Starts the test binary's `entry` test as a child.
    pub fn spawn(entry: &str, config: &ChildConfig, mode: Mode) -> ChildProc {
        let mut command = ChildProc::command(entry);
        command
            .env("EPOCHFLIGHT_CHILD_STORE", &config.store)
            .env("EPOCHFLIGHT_CHILD_NAME", &config.name)
            .env(
                "EPOCHFLIGHT_CHILD_LEASE_MS",
                config.lease.as_millis().to_string(),
            )
            .env(
                "EPOCHFLIGHT_CHILD_GRACE_MS",
                config.grace.as_millis().to_string(),
            )
            .env("EPOCHFLIGHT_CHILD_MODE", mode.as_str());
        ChildProc::start(command, mode)
    }
}

// ------------------------------------------------------------ child side

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// Opens the credential the parent configured.
pub fn open_from_env() -> SharedCredential<String> {
    let lease = Duration::from_millis(env("EPOCHFLIGHT_CHILD_LEASE_MS").parse().unwrap());
    let grace = Duration::from_millis(env("EPOCHFLIGHT_CHILD_GRACE_MS").parse().unwrap());
    let config = CoordConfig::new(lease).unwrap().with_reuse_grace(grace);
    let store = env("EPOCHFLIGHT_CHILD_STORE");
    let name = env("EPOCHFLIGHT_CHILD_NAME");
    open(&store, config)
        .credential(&name)
        .expect("open credential")
}

/// A coordinator for `file:<dir>` or `redis:<url>`.
pub fn open(store: &str, config: CoordConfig) -> Coordinator<String> {
    if let Some(dir) = store.strip_prefix("file:") {
        let store = epochflight::auth::coord::FileStore::open(dir).expect("file store");
        Coordinator::new(store, Utf8Codec, config)
    } else if let Some(url) = store.strip_prefix("redis:") {
        let config_redis = epochflight::auth::coord::RedisConfig::new(url)
            .prefix("test")
            .unwrap();
        let store =
            epochflight::auth::coord::RedisStore::connect(config_redis).expect("redis store");
        Coordinator::new(store, Utf8Codec, config)
    } else {
        panic!("unknown store {store}")
    }
}

/// The child's main loop: runs only when the parent set the environment.
pub fn child_main() {
    if std::env::var("EPOCHFLIGHT_CHILD_STORE").is_err() {
        return;
    }
    let mode = match env("EPOCHFLIGHT_CHILD_MODE").as_str() {
        "blocking" => Mode::Blocking,
        "tokio" => Mode::Tokio,
        "smol" => Mode::Smol,
        other => panic!("unknown mode {other}"),
    };
    let credential = open_from_env();
    let mut state = ChildState::default();
    let tokio = (mode == Mode::Tokio).then(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    println!("\n@@ ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line == "exit" {
            break;
        }
        let blocking = mode == Mode::Blocking;
        let work = exec(&credential, blocking, &mut state, &line);
        let answer = match (&tokio, mode) {
            (Some(rt), _) => rt.block_on(work),
            (None, Mode::Smol) => smol::block_on(work),
            // Blocking calls inside: the future never waits on anything.
            (None, _) => futures::executor::block_on(work),
        };
        println!("@@ {answer}");
    }
    std::process::exit(0);
}

#[derive(Default)]
struct ChildState {
    claim: Option<Claim<String>>,
    busy: Option<Busy>,
}

/// The short name of an error kind, as the parent checks it.
pub fn kind(e: &CoordError) -> String {
    match e {
        CoordError::Unavailable { .. } => "unavailable".into(),
        CoordError::SignedOut => "signed_out".into(),
        CoordError::Lost { .. } => "lost".into(),
        CoordError::CoolingDown { .. } => "cooling".into(),
        CoordError::Fenced { .. } => "fenced".into(),
        CoordError::GenerationWentBack { .. } => "went_back".into(),
        CoordError::Corrupt { problem, .. } => format!("corrupt:{problem}"),
        CoordError::Denied { .. } => "denied".into(),
        CoordError::Codec(_) => "codec".into(),
        CoordError::Config(_) => "config".into(),
        CoordError::Protocol { .. } => "protocol".into(),
        _ => "other".into(),
    }
}

/// `g=<n> state=<s> token=<t|->`
pub fn describe(s: &Snapshot<String>) -> String {
    let state = match s.state {
        SharedState::Ready => "ready",
        SharedState::Sending { .. } => "sending",
        SharedState::Lost => "lost",
        SharedState::CoolingDown { .. } => "cooling",
        SharedState::SignedOut => "signed_out",
        _ => "other",
    };
    format!(
        "g={} state={state} token={}",
        s.generation.get(),
        s.token.as_deref().unwrap_or("-")
    )
}

fn err(e: CoordError) -> String {
    format!("err {}", kind(&e))
}

macro_rules! call {
    ($blocking:expr, $sync:expr, $async:expr) => {
        if $blocking { $sync } else { $async.await }
    };
}

async fn exec(
    cred: &SharedCredential<String>,
    b: bool,
    state: &mut ChildState,
    line: &str,
) -> String {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("");
    let arg = words.next().unwrap_or("").to_owned();
    let arg2 = words.next().unwrap_or("").to_owned();
    let generation = |s: &str| epochflight::auth::coord::Generation::new(s.parse().unwrap_or(0));
    let ms = |s: &str| Duration::from_millis(s.parse().unwrap_or(0));
    let snapshot = |r: Result<Snapshot<String>, CoordError>| r.map_or_else(err, |s| describe(&s));
    match command {
        "read" => snapshot(call!(b, cred.read_blocking(), cred.read())),
        "claim" => match call!(
            b,
            cred.claim_blocking(generation(&arg)),
            cred.claim(generation(&arg))
        ) {
            Ok(ClaimOutcome::Claimed(claim)) => {
                let answer = format!(
                    "claimed g={} token={} grace={}",
                    claim.generation().get(),
                    claim.token().map_or("-", String::as_str),
                    u8::from(claim.is_grace_reclaim())
                );
                state.claim = Some(claim);
                answer
            }
            Ok(ClaimOutcome::Newer(s)) => format!("newer {}", describe(&s)),
            Ok(ClaimOutcome::Busy(busy)) => {
                state.busy = Some(busy);
                "busy".into()
            }
            Err(e) => err(e),
        },
        "commit" => {
            let claim = state.claim.take().expect("commit without a claim");
            match call!(
                b,
                cred.commit_blocking(claim, &arg, None),
                cred.commit(claim, &arg, None)
            ) {
                Ok(epochflight::auth::coord::Committed::Stored(g)) => {
                    format!("committed {}", g.get())
                }
                Ok(epochflight::auth::coord::Committed::Pending(g)) => {
                    format!("pending {}", g.get())
                }
                Err(e) => err(e),
            }
        }
        "wait" => {
            let busy = state.busy.clone().expect("wait without busy");
            snapshot(call!(
                b,
                cred.wait_blocking(&busy, ms(&arg)),
                cred.wait(&busy, ms(&arg))
            ))
        }
        "reject" => {
            let claim = state.claim.take().expect("reject without a claim");
            snapshot(call!(b, cred.reject_blocking(claim), cred.reject(claim)))
        }
        "transient" => {
            let claim = state.claim.take().expect("transient without a claim");
            snapshot(call!(
                b,
                cred.fail_transient_blocking(claim, ms(&arg)),
                cred.fail_transient(claim, ms(&arg))
            ))
        }
        "sign_in" => snapshot(call!(
            b,
            cred.sign_in_blocking(&arg, None),
            cred.sign_in(&arg, None)
        )),
        "sign_out" => snapshot(call!(b, cred.sign_out_blocking(), cred.sign_out())),
        "calls" => format!("calls {}", cred.stats().store_calls),
        "stats" => format!("stats {:?}", cred.stats()),
        // Claim `g`; the winner commits `arg2`, the others wait for it.
        "race" => {
            let started = Instant::now();
            match call!(
                b,
                cred.claim_blocking(generation(&arg)),
                cred.claim(generation(&arg))
            ) {
                Ok(ClaimOutcome::Claimed(claim)) => {
                    match call!(
                        b,
                        cred.commit_blocking(claim, &arg2, None),
                        cred.commit(claim, &arg2, None)
                    ) {
                        Ok(c) => format!("won {}", c.generation().get()),
                        Err(e) => err(e),
                    }
                }
                Ok(ClaimOutcome::Newer(s)) => format!("adopted {}", describe(&s)),
                Ok(ClaimOutcome::Busy(busy)) => {
                    let left = Duration::from_secs(20).saturating_sub(started.elapsed());
                    match call!(b, cred.wait_blocking(&busy, left), cred.wait(&busy, left)) {
                        Ok(s) => format!("adopted {}", describe(&s)),
                        Err(e) => err(e),
                    }
                }
                Err(e) => err(e),
            }
        }
        other => format!("unknown command {other}"),
    }
}
