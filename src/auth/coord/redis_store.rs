//! [`RedisStore`]: processes on many hosts coordinate through Redis.
//!
//! Per credential `name`, two keys in one hash slot (hash tag
//! `{prefix:name}`): `{prefix:name}:rec`, a hash with the record, and
//! `{prefix:name}:ev`, a stream with one entry per change. Every operation
//! is one call of one Lua script (`coord.lua`), atomic on the server and
//! timed with the server's `TIME`. Waiters block in `XREAD BLOCK` on the
//! stream from the last entry they saw (read in the same script call as the
//! record, so no change is missed): the commit's entry wakes them, and the
//! server ends the wait at its timeout.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, Connection, ErrorKind, RedisError, ServerErrorKind, Value,
};
use parking_lot::Mutex;

use super::record::{Op, Record, Verdict, field_name};
use super::store::{Applied, BoxFuture, Cursor, Sealed, Slot, SlotHandle, Store};
use super::{ConfigError, CoordError, Corruption};

const SCRIPT: &str = include_str!("coord.lua");

/// Settings of a [`RedisStore`].
///
/// `Debug` does not show the URL (it may hold a password).
#[derive(Clone)]
pub struct RedisConfig {
    url: String,
    prefix: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    max_wait: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

impl RedisConfig {
    /// The server at `url` (`redis://[user:password@]host:port/[db]`), key
    /// prefix `epochflight`, connect timeout 1 s, I/O timeout 2 s, waits
    /// of at most 60 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "epochflight".into(),
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(2),
            max_wait: Duration::from_secs(60),
        }
    }

    /// The key prefix: credential `name` lives in `{prefix:name}:rec` and
    /// `{prefix:name}:ev`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidPrefix`] unless `prefix` is 1 to 64 bytes of
    /// `A-Z a-z 0-9 . _ - :` (no `{`, `}`, `*` or spaces, which would break
    /// the hash tag or the ACL pattern).
    pub fn prefix(mut self, prefix: &str) -> Result<Self, ConfigError> {
        let ok = (1..=64).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
        if !ok {
            return Err(ConfigError::InvalidPrefix);
        }
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// How long connecting may take before [`CoordError::Unavailable`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a command may take before [`CoordError::Unavailable`].
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// The longest single wait in the server (longer waits return early and
    /// the caller reads again).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }
}

/// A store for processes on many hosts: one Redis (7.0 or later).
///
/// **Redis must persist with AOF** (`appendonly yes`, and `appendfsync
/// always` to lose nothing, `everysec` to lose at most a second). Without
/// it a restart loses records: a commit the fleet already relies on may
/// vanish, a generation goes back (reported as
/// [`CoordError::GenerationWentBack`], counted, re-seeded upwards only), and
/// in the gap a process may present a refresh token the server already
/// rotated, which revokes the session. A replica promoted after a failover
/// can lose the last writes the same way.
///
/// A Redis user limited to the prefix `epochflight` and the commands used:
///
/// ```text
/// ACL SETUSER epochflight on >PASSWORD resetkeys ~{epochflight:* resetchannels -@all +evalsha +script|load +xread +time +type +exists +hgetall +hset +del +xadd +xrevrange
/// ```
///
/// One connection serves the blocking calls of all credentials, one the
/// async calls; each wait takes a connection of its own from a small pool.
/// A connection found broken is replaced, and the call sent once more (every
/// operation is safe to repeat: a repeated claim is the same claim, a
/// repeated commit is fenced and the caller adopts what it wrote).
///
/// Needs Rust 1.88 (the `redis` crate's MSRV).
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: Client,
    config: RedisConfig,
    sha: String,
    blocking: Mutex<Option<Connection>>,
    blocking_waiters: Mutex<Vec<Connection>>,
    nonblocking: Mutex<Option<MultiplexedConnection>>,
    nonblocking_waiters: Mutex<Vec<MultiplexedConnection>>,
}

/// Idle wait connections kept per kind.
const POOL: usize = 4;

fn classify(e: RedisError) -> CoordError {
    let reason = e.to_string();
    let denied = matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || reason.contains("NOPERM")
        || reason.contains("WRONGPASS")
        || reason.contains("NOAUTH");
    if denied {
        CoordError::Denied { reason }
    } else {
        CoordError::Unavailable { reason }
    }
}

/// A connection that fails like this is replaced.
fn is_broken(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

impl RedisStore {
    /// Connects, and loads the script.
    ///
    /// # Blocking
    ///
    /// Blocks while connecting (at most the connect timeout, then the I/O
    /// timeout).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidUrl`]; [`CoordError::Unavailable`] if Redis
    /// cannot be reached; [`CoordError::Denied`] if it refuses the user or
    /// the script.
    pub fn connect(config: RedisConfig) -> Result<Self, CoordError> {
        let client = Client::open(config.url.as_str()).map_err(|_| ConfigError::InvalidUrl)?;
        let sha = ::redis::Script::new(SCRIPT).get_hash().to_owned();
        let shared = Shared {
            client,
            config,
            sha,
            blocking: Mutex::new(None),
            blocking_waiters: Mutex::new(Vec::new()),
            nonblocking: Mutex::new(None),
            nonblocking_waiters: Mutex::new(Vec::new()),
        };
        let mut conn = shared.connect_blocking(shared.config.io_timeout)?;
        load_cmd().query::<String>(&mut conn).map_err(classify)?;
        *shared.blocking.lock() = Some(conn);
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.shared.config.prefix
    }
}

fn load_cmd() -> Cmd {
    let mut cmd = ::redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(SCRIPT);
    cmd
}

impl Shared {
    fn connect_blocking(&self, read_timeout: Duration) -> Result<Connection, CoordError> {
        let conn = self
            .client
            .get_connection_with_timeout(self.config.connect_timeout)
            .map_err(classify)?;
        conn.set_read_timeout(Some(read_timeout))
            .map_err(classify)?;
        conn.set_write_timeout(Some(self.config.io_timeout))
            .map_err(classify)?;
        Ok(conn)
    }

    async fn connect_nonblocking(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, CoordError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(classify)
    }
}

impl Store for RedisStore {
    fn open(&self, name: &str, _: Sealed) -> Result<SlotHandle, CoordError> {
        let tag = format!("{{{}:{name}}}", self.shared.config.prefix);
        Ok(SlotHandle(Arc::new(RedisSlot {
            shared: self.shared.clone(),
            name: name.to_owned(),
            record_key: format!("{tag}:rec"),
            events_key: format!("{tag}:ev"),
            calls: AtomicU64::new(0),
        })))
    }
}

struct RedisSlot {
    shared: Arc<Shared>,
    name: String,
    record_key: String,
    events_key: String,
    calls: AtomicU64,
}

fn expires_arg(expires_in_ms: &Option<u64>) -> String {
    expires_in_ms.map(|ms| ms.to_string()).unwrap_or_default()
}

impl RedisSlot {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    fn eval_cmd(&self, op: &Op) -> Cmd {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(&self.shared.sha)
            .arg(2)
            .arg(&self.record_key)
            .arg(&self.events_key)
            .arg(op.name());
        match op {
            Op::Read => {}
            Op::Claim {
                seen,
                owner,
                lease_ms,
                grace_ms,
            } => {
                cmd.arg(seen)
                    .arg(owner.to_hex())
                    .arg(lease_ms)
                    .arg(grace_ms);
            }
            Op::Commit {
                generation,
                owner,
                token,
                expires_in_ms,
            } => {
                cmd.arg(generation)
                    .arg(owner.to_hex())
                    .arg(token.0.as_slice())
                    .arg(expires_arg(expires_in_ms));
            }
            Op::Reject { generation, owner } => {
                cmd.arg(generation).arg(owner.to_hex());
            }
            Op::Transient {
                generation,
                owner,
                cooldown_ms,
            } => {
                cmd.arg(generation).arg(owner.to_hex()).arg(cooldown_ms);
            }
            Op::SignIn {
                token,
                expires_in_ms,
                min_generation,
            }
            | Op::Seed {
                token,
                expires_in_ms,
                min_generation,
            } => {
                cmd.arg(token.0.as_slice())
                    .arg(expires_arg(expires_in_ms))
                    .arg(min_generation);
            }
            Op::SignOut { min_generation } => {
                cmd.arg(min_generation);
            }
            Op::Reseed {
                generation,
                token,
                expires_in_ms,
            } => {
                cmd.arg(generation)
                    .arg(token.0.as_slice())
                    .arg(expires_arg(expires_in_ms));
            }
        }
        cmd
    }

    fn corrupt(&self, problem: Corruption) -> CoordError {
        CoordError::Corrupt {
            credential: self.name.clone(),
            problem,
        }
    }

    /// Reads the script's reply (see `coord.lua`).
    fn parse(&self, value: Value) -> Result<Applied, CoordError> {
        let protocol = |reason| CoordError::Protocol { reason };
        let Value::Array(items) = value else {
            return Err(protocol("the script's reply is not an array"));
        };
        let bytes = |v: &Value| match v {
            Value::BulkString(b) => Some(b.clone()),
            Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        };
        let head = items.first().and_then(bytes).unwrap_or_default();
        match head.as_slice() {
            b"corrupt" => {
                let code = items.get(1).and_then(bytes).unwrap_or_default();
                return Err(self.corrupt(corruption(&code)));
            }
            b"bad-request" => return Err(protocol("the script refused its arguments")),
            _ => {}
        }
        let verdict = Verdict::parse(&head).ok_or(protocol("unknown verdict"))?;
        let (Some(Value::Int(now)), Some(cursor), Some(Value::Array(flat))) =
            (items.get(1), items.get(2).and_then(bytes), items.get(3))
        else {
            return Err(protocol("malformed script reply"));
        };
        let record = if flat.is_empty() {
            None
        } else {
            let fields: Vec<Vec<u8>> = flat
                .iter()
                .map(bytes)
                .collect::<Option<_>>()
                .ok_or(protocol("malformed record fields"))?;
            if !fields.len().is_multiple_of(2) {
                return Err(protocol("odd number of record fields"));
            }
            let pairs = fields
                .chunks(2)
                .map(|pair| (pair[0].as_slice(), pair[1].as_slice()));
            Some(Record::from_fields(pairs).map_err(|p| self.corrupt(p))?)
        };
        Ok(Applied {
            verdict,
            now: u64::try_from(*now).unwrap_or(0),
            record,
            holder_alive: true,
            cursor: Cursor(String::from_utf8_lossy(&cursor).into_owned()),
            guard: None,
        })
    }

    fn xread_cmd(&self, cursor: &Cursor, timeout: Duration) -> Cmd {
        // `BLOCK 0` would wait forever: at least 1 ms.
        let ms = timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u64;
        let mut cmd = ::redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms)
            .arg("STREAMS")
            .arg(&self.events_key)
            .arg(&cursor.0);
        cmd
    }

    fn wait_error(&self, e: RedisError) -> CoordError {
        if e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
            && e.to_string().contains("WRONGTYPE")
        {
            return self.corrupt(Corruption::WrongType);
        }
        classify(e)
    }

    /// Runs `cmd` on the shared blocking connection; a broken reused
    /// connection is replaced and the command sent once more.
    fn eval_blocking(&self, cmd: &Cmd) -> Result<Value, CoordError> {
        let mut slot = self.shared.blocking.lock();
        for attempt in 0..2 {
            let fresh = slot.is_none();
            if fresh {
                *slot = Some(
                    self.shared
                        .connect_blocking(self.shared.config.io_timeout)?,
                );
            }
            let conn = slot.as_mut().expect("connected above");
            self.count();
            let mut result = cmd.query::<Value>(conn);
            if result.as_ref().is_err_and(is_noscript) {
                self.count();
                result = load_cmd().query::<String>(conn).and_then(|_| {
                    self.count();
                    cmd.query::<Value>(conn)
                });
            }
            match result {
                Err(e) if is_broken(&e) => {
                    *slot = None;
                    if fresh || attempt == 1 {
                        return Err(classify(e));
                    }
                }
                other => return other.map_err(classify),
            }
        }
        unreachable!("the second attempt returns")
    }

    async fn eval_nonblocking(&self, cmd: &Cmd) -> Result<Value, CoordError> {
        for attempt in 0..2 {
            let existing = self.shared.nonblocking.lock().clone();
            let fresh = existing.is_none();
            let mut conn = match existing {
                Some(conn) => conn,
                None => {
                    let conn = self
                        .shared
                        .connect_nonblocking(self.shared.config.io_timeout)
                        .await?;
                    *self.shared.nonblocking.lock() = Some(conn.clone());
                    conn
                }
            };
            self.count();
            let mut result = cmd.query_async::<Value>(&mut conn).await;
            if result.as_ref().is_err_and(is_noscript) {
                self.count();
                result = match load_cmd().query_async::<String>(&mut conn).await {
                    Ok(_) => {
                        self.count();
                        cmd.query_async::<Value>(&mut conn).await
                    }
                    Err(e) => Err(e),
                };
            }
            match result {
                Err(e) if is_broken(&e) => {
                    *self.shared.nonblocking.lock() = None;
                    if fresh || attempt == 1 {
                        return Err(classify(e));
                    }
                }
                other => return other.map_err(classify),
            }
        }
        unreachable!("the second attempt returns")
    }
}

/// A claim whose future was dropped while the script was on its way: the
/// claim is released by a script sent after it on the same connection (so
/// it cannot overtake it), from a thread of its own.
struct ReleaseIfDropped {
    slot: Option<Arc<RedisSlot>>,
    generation: u64,
    owner: super::record::Owner,
}

impl Drop for ReleaseIfDropped {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let Some(mut conn) = slot.shared.nonblocking.lock().clone() else {
            return;
        };
        let cmd = slot.eval_cmd(&Op::Transient {
            generation: self.generation,
            owner: self.owner,
            cooldown_ms: 0,
        });
        let _ = std::thread::Builder::new()
            .name("epochflight-redis-release".into())
            .spawn(move || {
                let _ = crate::block_on::block_on(cmd.query_async::<Value>(&mut conn));
                slot.count(); // once answered: the claim before it has landed too
            });
    }
}

impl Slot for RedisSlot {
    fn apply_blocking(&self, op: &Op) -> Result<Applied, CoordError> {
        let value = self.eval_blocking(&self.eval_cmd(op))?;
        self.parse(value)
    }

    fn apply(self: Arc<Self>, op: Op) -> BoxFuture<Result<Applied, CoordError>> {
        Box::pin(async move {
            let mut release = match op {
                Op::Claim { seen, owner, .. } => Some(ReleaseIfDropped {
                    slot: Some(self.clone()),
                    generation: seen,
                    owner,
                }),
                _ => None,
            };
            let result = self.eval_nonblocking(&self.eval_cmd(&op)).await;
            if let Some(release) = &mut release {
                release.slot = None; // answered: the caller gets the claim
            }
            self.parse(result?)
        })
    }

    fn wait_blocking(&self, cursor: &Cursor, timeout: Duration) -> Result<(), CoordError> {
        let timeout = timeout.min(self.shared.config.max_wait);
        let read_timeout = timeout + self.shared.config.io_timeout;
        // A pooled connection may have died since (a Redis restart): then
        // once more on a fresh one.
        for attempt in 0..2 {
            let pooled = self.shared.blocking_waiters.lock().pop();
            let fresh = pooled.is_none();
            let mut conn = match pooled {
                Some(conn) => match conn.set_read_timeout(Some(read_timeout)) {
                    Ok(()) => conn,
                    Err(_) => continue,
                },
                None => self.shared.connect_blocking(read_timeout)?,
            };
            self.count();
            match self.xread_cmd(cursor, timeout).query::<Value>(&mut conn) {
                Ok(_) => {
                    let mut pool = self.shared.blocking_waiters.lock();
                    if pool.len() < POOL {
                        pool.push(conn);
                    }
                    return Ok(());
                }
                Err(e) if is_broken(&e) && !fresh && attempt == 0 => {}
                Err(e) => return Err(self.wait_error(e)),
            }
        }
        Err(CoordError::Unavailable {
            reason: "no connection for the wait".into(),
        })
    }

    fn wait(
        self: Arc<Self>,
        cursor: Cursor,
        timeout: Duration,
    ) -> BoxFuture<Result<(), CoordError>> {
        Box::pin(async move {
            let config = &self.shared.config;
            let timeout = timeout.min(config.max_wait);
            // A pooled connection may have died since (a Redis restart):
            // then once more on a fresh one.
            for attempt in 0..2 {
                let pooled = self.shared.nonblocking_waiters.lock().pop();
                let fresh = pooled.is_none();
                let mut conn = match pooled {
                    Some(conn) => conn,
                    None => {
                        self.shared
                            .connect_nonblocking(config.max_wait + config.io_timeout)
                            .await?
                    }
                };
                self.count();
                // Dropped here mid-wait, the connection goes with the future:
                // a blocked connection never returns to the pool.
                match self
                    .xread_cmd(&cursor, timeout)
                    .query_async::<Value>(&mut conn)
                    .await
                {
                    Ok(_) => {
                        let mut pool = self.shared.nonblocking_waiters.lock();
                        if pool.len() < POOL {
                            pool.push(conn);
                        }
                        return Ok(());
                    }
                    Err(e) if is_broken(&e) && !fresh && attempt == 0 => {}
                    Err(e) => return Err(self.wait_error(e)),
                }
            }
            Err(CoordError::Unavailable {
                reason: "no connection for the wait".into(),
            })
        })
    }

    fn store_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// The script's corruption code as a [`Corruption`].
fn corruption(code: &[u8]) -> Corruption {
    let field = |name: &[u8]| match name {
        b"unknown" => "unknown field",
        name => field_name(name),
    };
    match code {
        b"wrongtype" => Corruption::WrongType,
        b"unknown-state" => Corruption::UnknownState,
        b"version" => Corruption::UnsupportedVersion,
        _ => match code.iter().position(|&b| b == b':') {
            Some(i) if &code[..i] == b"truncated" => Corruption::Truncated {
                missing: field(&code[i + 1..]),
            },
            Some(i) if &code[..i] == b"undecodable" => Corruption::Undecodable {
                field: field(&code[i + 1..]),
            },
            _ => Corruption::Undecodable {
                field: "unknown field",
            },
        },
    }
}
