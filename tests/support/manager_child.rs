//! Child processes for the manager-level scale-out tests: the test binary
//! re-run as a child (`EPOCHFLIGHT_MGR_SERVER` set), each holding one
//! `TokenManager` on the credential the parent names (a coordinator on a
//! file or Redis store, or none for the baseline), and sending requests to
//! the parent's loopback test server (tests/support/server.rs) through
//! `TokenManager::send` with a tiny HTTP/1.1 client of its runtime: tokio,
//! smol, or blocking threads.
//!
//! Driven line by line over stdin, each command answered with one line
//! starting with `@@ ` on stdout, so the parent decides every step (fire a
//! wave here, kill that one) and nothing is ordered by sleeping. A wave is
//! fired in the background (`fire N`), so the parent can look at counters
//! (`stats`, `await`) and kill processes while it runs, then `collect`ed.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::child_proc::ANSWER_TIMEOUT;
use epochflight::auth::coord::{
    CodecError, CoordConfig, CoordError, Coordinator, FileStore, RedisConfig, RedisStore,
    SharedCredential, TokenCodec,
};
use epochflight::auth::{AuthError, RefreshError, TokenManager, Unauthorized};

/// How a child sends requests and waits.
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

/// The token pair, crossing processes as `access\nrefresh`. `Debug` shows
/// no token bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    pub access: String,
    pub refresh: String,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tokens(<redacted>)")
    }
}

/// `access\nrefresh`.
pub struct Lines;

impl TokenCodec<Tokens> for Lines {
    fn encode(&self, t: &Tokens) -> Result<Vec<u8>, CodecError> {
        Ok(format!("{}\n{}", t.access, t.refresh).into_bytes())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Tokens, CodecError> {
        let text = std::str::from_utf8(bytes).map_err(|_| CodecError::new("not UTF-8"))?;
        let (access, refresh) = text
            .split_once('\n')
            .ok_or(CodecError::new("not a token pair"))?;
        Ok(Tokens {
            access: access.into(),
            refresh: refresh.into(),
        })
    }
}

pub type Manager = TokenManager<Tokens, String>;

/// What the parent tells a child.
#[derive(Clone, Debug)]
pub struct ChildConfig {
    /// The test server's base URL, `http://127.0.0.1:port`.
    pub server: String,
    /// `file:<dir>`, `redis:<url>`, or `none` (no coordinator).
    pub store: String,
    pub name: String,
    pub lease: Duration,
    pub grace: Duration,
    /// Sets `tokio::spawn` as the manager's spawner (tokio children only).
    pub spawner: bool,
    /// The manager's cool-down after a transient failure (also the fleet's).
    pub cooldown: Duration,
}

/// A running child.
pub type ChildProc = crate::child_proc::ChildProc<Mode>;

impl ChildProc {
    /// Starts the test binary's `entry` test as a child.
    pub fn spawn(entry: &str, config: &ChildConfig, mode: Mode) -> ChildProc {
        let mut command = ChildProc::command(entry);
        command
            .env("EPOCHFLIGHT_MGR_SERVER", &config.server)
            .env("EPOCHFLIGHT_MGR_STORE", &config.store)
            .env("EPOCHFLIGHT_MGR_NAME", &config.name)
            .env(
                "EPOCHFLIGHT_MGR_LEASE_MS",
                config.lease.as_millis().to_string(),
            )
            .env(
                "EPOCHFLIGHT_MGR_GRACE_MS",
                config.grace.as_millis().to_string(),
            )
            .env(
                "EPOCHFLIGHT_MGR_SPAWNER",
                u8::from(config.spawner).to_string(),
            )
            .env(
                "EPOCHFLIGHT_MGR_COOLDOWN_MS",
                config.cooldown.as_millis().to_string(),
            )
            .env("EPOCHFLIGHT_MGR_MODE", mode.as_str());
        ChildProc::start(command, mode)
    }

    /// `stats`, parsed.
    pub fn stats(&mut self) -> Stats {
        Stats::parse(&self.ask("stats"))
    }
}

/// `key=value` pairs of an answer (`stats`, `collect`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub BTreeMap<String, u64>);

impl Stats {
    pub fn parse(line: &str) -> Stats {
        Stats(
            line.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(u64::MAX)))
                .collect(),
        )
    }

    /// The value of `key`, 0 if absent.
    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
}

// ------------------------------------------------------------ child side

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// The credential for `file:<dir>` or `redis:<url>` (key prefix `test`).
pub fn open_shared(store: &str, name: &str, config: CoordConfig) -> SharedCredential<Tokens> {
    let coordinator = if let Some(dir) = store.strip_prefix("file:") {
        Coordinator::new(FileStore::open(dir).expect("file store"), Lines, config)
    } else if let Some(url) = store.strip_prefix("redis:") {
        let redis = RedisConfig::new(url).prefix("test").expect("prefix");
        Coordinator::new(
            RedisStore::connect(redis).expect("redis store"),
            Lines,
            config,
        )
    } else {
        panic!("unknown store {store}")
    };
    coordinator.credential(name).expect("open credential")
}

/// A response, as `send` sees it.
#[derive(Debug)]
pub struct Status(pub u16);

impl Unauthorized for Status {
    fn is_unauthorized(&self) -> bool {
        self.0 == 401
    }
}

/// The server's address without the scheme.
fn host(server: &str) -> &str {
    server.trim_start_matches("http://")
}

fn request(host: &str, method: &str, path: &str, bearer: Option<&str>, body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        out.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        out.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// Status and body of a whole response (read to the end: `Connection:
/// close`); status 0 for a transport failure.
fn response(raw: std::io::Result<Vec<u8>>) -> (u16, String) {
    let Ok(raw) = raw else {
        return (0, String::new());
    };
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

/// One HTTP exchange on a blocking socket.
fn http_blocking(host: &str, raw: &[u8]) -> (u16, String) {
    response((|| {
        let mut stream = std::net::TcpStream::connect(host)?;
        stream.write_all(raw)?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out)?;
        Ok(out)
    })())
}

/// One HTTP exchange on the async runtime of `mode`.
async fn http(mode: Mode, host: &str, raw: Vec<u8>) -> (u16, String) {
    match mode {
        Mode::Blocking => http_blocking(host, &raw),
        Mode::Tokio => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let result = async {
                let mut stream = tokio::net::TcpStream::connect(host).await?;
                stream.write_all(&raw).await?;
                let mut out = Vec::new();
                stream.read_to_end(&mut out).await?;
                Ok(out)
            };
            response(result.await)
        }
        Mode::Smol => {
            use smol::io::{AsyncReadExt, AsyncWriteExt};
            let result = async {
                let mut stream = smol::net::TcpStream::connect(host).await?;
                stream.write_all(&raw).await?;
                let mut out = Vec::new();
                stream.read_to_end(&mut out).await?;
                Ok(out)
            };
            response(result.await)
        }
    }
}

/// The refresh-token grant's request.
fn grant(host: &str, stale: &Tokens) -> Vec<u8> {
    let body = format!("grant_type=refresh_token&refresh_token={}", stale.refresh);
    request(host, "POST", "/token", None, &body)
}

/// The token endpoint's answer.
fn granted((status, body): (u16, String)) -> Result<Tokens, RefreshError<String>> {
    match status {
        200 => {
            let json: serde_json::Value = serde_json::from_str(&body)
                .map_err(|_| RefreshError::Transient("bad json".into()))?;
            let field = |name: &str| json[name].as_str().unwrap_or_default().to_owned();
            Ok(Tokens {
                access: field("access_token"),
                refresh: field("refresh_token"),
            })
        }
        400 => Err(RefreshError::Rejected("status 400".into())),
        other => Err(RefreshError::Transient(format!("status {other}"))),
    }
}

/// The refresh-token grant against the test server, async.
async fn refresh(
    mode: Mode,
    host: String,
    stale: Option<Tokens>,
) -> Result<Tokens, RefreshError<String>> {
    let stale = stale.ok_or(RefreshError::Rejected("no refresh token".into()))?;
    granted(http(mode, &host, grant(&host, &stale)).await)
}

/// The refresh-token grant against the test server, blocking.
fn refresh_blocking(host: &str, stale: Option<Tokens>) -> Result<Tokens, RefreshError<String>> {
    let stale = stale.ok_or(RefreshError::Rejected("no refresh token".into()))?;
    granted(http_blocking(host, &grant(host, &stale)))
}

/// The short name of a call's outcome, as the parent counts it.
pub fn outcome(result: &Result<Status, AuthError<String>>) -> String {
    match result {
        Ok(Status(200)) => "ok".into(),
        Ok(Status(401)) => "unauthorized".into(),
        Ok(Status(other)) => format!("status{other}"),
        Err(e) => format!("err:{}", kind(e)),
    }
}

/// The short name of an error.
pub fn kind(e: &AuthError<String>) -> String {
    match e {
        AuthError::SignedOut => "signed_out".into(),
        AuthError::Refresh(RefreshError::Rejected(_)) => "rejected".into(),
        AuthError::Refresh(RefreshError::Transient(_)) => "transient".into(),
        AuthError::Coordination(c) => match c {
            CoordError::Unavailable { .. } => "unavailable".into(),
            CoordError::Lost { .. } => "lost".into(),
            CoordError::CoolingDown { .. } => "cooling".into(),
            CoordError::Denied { .. } => "denied".into(),
            CoordError::Corrupt { .. } => "corrupt".into(),
            CoordError::GenerationWentBack { .. } => "went_back".into(),
            CoordError::Config(_) => "config".into(),
            _ => "coord_other".into(),
        },
        _ => "other".into(),
    }
}

/// The child's main loop: runs only when the parent set the environment.
pub fn child_main() {
    if std::env::var("EPOCHFLIGHT_MGR_SERVER").is_err() {
        return;
    }
    let mode = match env("EPOCHFLIGHT_MGR_MODE").as_str() {
        "blocking" => Mode::Blocking,
        "tokio" => Mode::Tokio,
        "smol" => Mode::Smol,
        other => panic!("unknown mode {other}"),
    };
    let host = host(&env("EPOCHFLIGHT_MGR_SERVER")).to_owned();
    let store = env("EPOCHFLIGHT_MGR_STORE");
    let tokio = (mode == Mode::Tokio).then(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    let shared = (store != "none").then(|| {
        let ms = |name| Duration::from_millis(env(name).parse().expect("milliseconds"));
        let config = CoordConfig::new(ms("EPOCHFLIGHT_MGR_LEASE_MS"))
            .expect("lease")
            .with_reuse_grace(ms("EPOCHFLIGHT_MGR_GRACE_MS"));
        open_shared(&store, &env("EPOCHFLIGHT_MGR_NAME"), config)
    });
    let refresher_host = host.clone();
    let mut manager: Manager = match mode {
        Mode::Blocking => {
            TokenManager::new_blocking(move |stale| refresh_blocking(&refresher_host, stale))
        }
        mode => TokenManager::new(move |stale| refresh(mode, refresher_host.clone(), stale)),
    };
    let cooldown = env("EPOCHFLIGHT_MGR_COOLDOWN_MS")
        .parse()
        .expect("milliseconds");
    manager = manager.with_cooldown(Duration::from_millis(cooldown));
    if let Some(shared) = &shared {
        manager = manager.with_coordinator(shared.clone());
    }
    if env("EPOCHFLIGHT_MGR_SPAWNER") == "1" {
        let handle = tokio
            .as_ref()
            .expect("a spawner needs tokio")
            .handle()
            .clone();
        manager = manager.with_spawner(move |refresh| drop(handle.spawn(refresh)));
    }
    let child = Arc::new(ChildState {
        mode,
        host,
        manager,
        shared,
        tokio,
    });
    let mut fired = Fired::None;
    println!("\n@@ ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line == "exit" {
            break;
        }
        let answer = child.exec(&line, &mut fired);
        println!("@@ {answer}");
    }
    std::process::exit(0);
}

struct ChildState {
    mode: Mode,
    host: String,
    manager: Manager,
    shared: Option<SharedCredential<Tokens>>,
    tokio: Option<tokio::runtime::Runtime>,
}

/// The requests of the wave in progress.
enum Fired {
    None,
    Tokio(Vec<tokio::task::JoinHandle<String>>),
    Smol(Vec<smol::Task<String>>),
    Threads(Vec<std::thread::JoinHandle<String>>),
}

impl ChildState {
    /// Runs `future` to completion in this child's way.
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        match (&self.tokio, self.mode) {
            (Some(rt), _) => rt.block_on(future),
            (None, Mode::Smol) => smol::block_on(future),
            (None, _) => futures::executor::block_on(future),
        }
    }

    fn resource(&self, token: &Tokens) -> Vec<u8> {
        request(&self.host, "GET", "/resource", Some(&token.access), "")
    }

    /// One request to `/resource` through the manager, async.
    async fn get(self: Arc<Self>) -> String {
        let mode = self.mode;
        let result = self
            .manager
            .send(|token| {
                let raw = self.resource(&token);
                let host = self.host.clone();
                async move { Status(http(mode, &host, raw).await.0) }
            })
            .await;
        outcome(&result)
    }

    /// One request to `/resource` through the manager, blocking.
    fn get_blocking(&self) -> String {
        let result = self
            .manager
            .send_blocking(|token| Status(http_blocking(&self.host, &self.resource(&token)).0));
        outcome(&result)
    }

    fn fire(self: &Arc<Self>, n: usize) -> Fired {
        match self.mode {
            Mode::Tokio => {
                let rt = self.tokio.as_ref().expect("tokio");
                Fired::Tokio((0..n).map(|_| rt.spawn(self.clone().get())).collect())
            }
            Mode::Smol => Fired::Smol((0..n).map(|_| smol::spawn(self.clone().get())).collect()),
            Mode::Blocking => Fired::Threads(
                (0..n)
                    .map(|_| {
                        let this = self.clone();
                        std::thread::spawn(move || this.get_blocking())
                    })
                    .collect(),
            ),
        }
    }

    fn collect(&self, fired: Fired) -> String {
        let outcomes: Vec<String> = match fired {
            Fired::None => Vec::new(),
            Fired::Tokio(tasks) => self.block_on(async {
                let mut out = Vec::new();
                for task in tasks {
                    out.push(task.await.unwrap_or_else(|_| "aborted".into()));
                }
                out
            }),
            Fired::Smol(tasks) => smol::block_on(futures::future::join_all(tasks)),
            Fired::Threads(threads) => threads
                .into_iter()
                .map(|t| t.join().expect("request thread"))
                .collect(),
        };
        let mut counts = BTreeMap::<String, u64>::new();
        for outcome in outcomes {
            *counts.entry(outcome).or_default() += 1;
        }
        counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn stats(&self) -> String {
        let m = self.manager.stats();
        let mut out = format!(
            "refresh_calls={} refreshes_succeeded={} rejected={} adopted={} retries={} sign_outs={} signed_out={}",
            m.refresh_calls,
            m.refreshes_succeeded,
            m.refreshes_rejected,
            m.adopted,
            m.retries,
            m.sign_outs,
            u8::from(self.manager.is_signed_out()),
        );
        if let Some(shared) = &self.shared {
            let c = shared.stats();
            out.push_str(&format!(
                " store_calls={} claims_won={} grace_reclaims={} claims_busy={} adopted_newer={} commits={} commits_pending={} waits={} unavailable={} pending={}",
                c.store_calls,
                c.claims_won,
                c.grace_reclaims,
                c.claims_busy,
                c.adopted_newer,
                c.commits,
                c.commits_pending,
                c.waits,
                c.unavailable,
                u8::from(shared.has_pending_commit()),
            ));
        }
        out
    }

    fn exec(self: &Arc<Self>, line: &str, fired: &mut Fired) -> String {
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or("");
        let mut arg = || words.next().unwrap_or("").to_owned();
        let tokens = |access: String, refresh: String| Tokens { access, refresh };
        let blocking = self.mode == Mode::Blocking;
        match command {
            // Fire `n` concurrent requests in the background.
            "fire" => {
                assert!(matches!(fired, Fired::None), "a wave is in flight");
                *fired = self.fire(arg().parse().expect("count"));
                "fired".into()
            }
            // Wait for the wave: `outcome=count ...`.
            "collect" => self.collect(std::mem::replace(fired, Fired::None)),
            // Fire and collect.
            "wave" => {
                let wave = self.fire(arg().parse().expect("count"));
                self.collect(wave)
            }
            // Cancel the wave in flight (async children).
            "abort" => {
                match std::mem::replace(fired, Fired::None) {
                    Fired::Tokio(tasks) => {
                        for task in &tasks {
                            task.abort();
                        }
                        *fired = Fired::Tokio(tasks);
                    }
                    Fired::Smol(tasks) => drop(tasks),
                    _ => panic!("nothing to abort"),
                }
                "aborted".into()
            }
            "stats" => self.stats(),
            // Waits until stat `name` is at least `n` (bounded).
            "await" => {
                let (name, n): (String, u64) = (arg(), arg().parse().expect("count"));
                let deadline = Instant::now() + ANSWER_TIMEOUT / 2;
                loop {
                    if Stats::parse(&self.stats()).get(&name) >= n {
                        break "ok".into();
                    }
                    if Instant::now() >= deadline {
                        break format!("timeout {}", self.stats());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            // The current access token (no store call, no wait).
            "token" => match self.manager.current() {
                Some(t) => format!("access={}", t.value.access),
                None => "none".into(),
            },
            // The request gate: this process's token (adopted at the first call).
            "gate" => {
                let got = if blocking {
                    self.manager.token_blocking()
                } else {
                    self.block_on(self.manager.token())
                };
                match got {
                    Ok(t) => format!("access={}", t.value.access),
                    Err(e) => format!("err:{}", kind(&e)),
                }
            }
            // Refreshes the current token now (as a 401 would).
            "refresh" => {
                let seen = self.manager.epoch();
                let got = if blocking {
                    self.manager.refresh_if_current_blocking(seen)
                } else {
                    self.block_on(self.manager.refresh_if_current(seen))
                };
                match got {
                    Ok(t) => format!("access={}", t.value.access),
                    Err(e) => format!("err:{}", kind(&e)),
                }
            }
            "sign_in" => {
                let token = tokens(arg(), arg());
                let signed_in = if blocking {
                    self.manager.sign_in_shared_blocking(token)
                } else {
                    self.block_on(self.manager.sign_in_shared(token))
                };
                match signed_in {
                    Ok(_) => "ok".into(),
                    Err(e) => format!("err:{}", kind(&e)),
                }
            }
            // This process only (the baseline, without a coordinator).
            "sign_in_local" => {
                self.manager.sign_in(tokens(arg(), arg()));
                "ok".into()
            }
            "sign_out" => {
                let signed_out = if blocking {
                    self.manager.sign_out_shared_blocking()
                } else {
                    self.block_on(self.manager.sign_out_shared())
                };
                match signed_out {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("err:{}", kind(&e)),
                }
            }
            other => format!("unknown command {other}"),
        }
    }
}
