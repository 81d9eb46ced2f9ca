//! [`FileStore`]: processes on one host coordinate through a directory.
//!
//! Per credential `name`, three kinds of files (all mode 0600):
//!
//! - `name.record`: the record. Replaced whole: written to a temporary file,
//!   `fsync`ed, renamed over the old one, and the directory `fsync`ed, so a
//!   reader sees the old record or the new one, never a mix, even after a
//!   crash.
//! - `name.lock`: an OS lock (`flock`) taken around every read-modify-write
//!   of the record. It is a separate file because a lock on the record
//!   itself would die at the first rename.
//! - `name.<owner>.holder`: created and locked by a claim's holder for as
//!   long as it holds the claim. The kernel frees the lock when the holder's
//!   process dies, so a dead holder is seen at once (its refresh reads as
//!   lost without waiting for the lease), and waiters block on this lock:
//!   they are woken by the holder's commit (or death) with no polling.
//!
//! Every wait is bounded: a lock another process keeps is waited for on a
//! helper thread, which the caller leaves after its timeout (the thread
//! ends when that lock is released, at the latest when its holder exits).
//! Async calls run on [`blocking`]'s thread pool, so they never block the
//! executor.
//!
//! A waiter wakes when the holder finishes (commit, reject, failure, exit)
//! or at the lease's end; a `sign_in` or `sign_out` by a third process
//! meanwhile is seen then (the holder's commit is fenced by it).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::task::{Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;

use super::record::{Op, Owner, Record, Stored, Verdict, transition};
use super::store::{
    Applied, BoxFuture, Cursor, HolderGuard, Sealed, Slot, SlotHandle, Store, system_millis,
};
use super::{ConfigError, CoordError, Corruption};

/// How long a call waits, by default, for another process to finish its
/// read-modify-write of a record (normally microseconds).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A store for processes on one host: one directory, one record file per
/// credential (see the [module docs](super) for the protocol).
///
/// Unix only (it relies on `flock` and on renaming over an open file).
/// Needs Rust 1.89 (`std::fs::File::lock`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use epochflight::auth::coord::{ClaimOutcome, CoordConfig, Coordinator, FileStore, Generation, Utf8Codec};
///
/// # let dir = std::env::temp_dir().join(format!("epochflight-doc-{}", std::process::id()));
/// let store = FileStore::open(&dir)?;
/// let coordinator = Coordinator::new(store, Utf8Codec, CoordConfig::new(Duration::from_secs(10))?);
/// let api = coordinator.credential("api")?;
/// api.sign_in_blocking(&"token-1".to_string(), None)?;
/// let seen = api.read_blocking()?.generation;
/// let ClaimOutcome::Claimed(claim) = api.claim_blocking(seen)? else { unreachable!() };
/// assert_eq!(claim.token().map(String::as_str), Some("token-1"));
/// let committed = api.commit_blocking(claim, &"token-2".to_string(), None)?;
/// assert!(committed.generation() > seen);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
    lock_timeout: Duration,
}

impl FileStore {
    /// The store in `dir`, created (mode 0700) if missing.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidDirectory`] if `dir` cannot be created or is
    /// not a directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CoordError> {
        let dir = dir.as_ref().to_path_buf();
        let invalid = |e: io::Error| ConfigError::InvalidDirectory {
            reason: e.to_string(),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(invalid)?;
        if !fs::metadata(&dir).map_err(invalid)?.is_dir() {
            return Err(ConfigError::InvalidDirectory {
                reason: "not a directory".into(),
            }
            .into());
        }
        Ok(Self {
            dir,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        })
    }

    /// How long a call waits for another process's read-modify-write of a
    /// record before it fails with [`CoordError::Unavailable`] (a process
    /// stopped, not killed, while holding it). Default
    /// [`DEFAULT_LOCK_TIMEOUT`].
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Store for FileStore {
    fn open(&self, name: &str, _: Sealed) -> Result<SlotHandle, CoordError> {
        Ok(SlotHandle(Arc::new(FileSlot {
            dir: self.dir.clone(),
            name: name.to_owned(),
            lock_timeout: self.lock_timeout,
            calls: AtomicU64::new(0),
        })))
    }
}

struct FileSlot {
    dir: PathBuf,
    name: String,
    lock_timeout: Duration,
    calls: AtomicU64,
}

/// A claim's lock on its holder file, released when the claim is finished
/// or dropped (or the process dies).
struct HolderLock {
    _file: File,
}

fn io_error(context: &str, e: io::Error) -> CoordError {
    match e.kind() {
        io::ErrorKind::PermissionDenied => CoordError::Denied {
            reason: format!("{context}: {e}"),
        },
        _ => CoordError::Unavailable {
            reason: format!("{context}: {e}"),
        },
    }
}

fn create_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).mode(0o600);
    options
}

/// Waits for `lock` (a blocking OS lock call on `file`) at most `timeout`,
/// on a helper thread: the OS call has no timeout of its own. If the caller
/// gives up, the thread finishes later and drops the file, which releases
/// the lock at once.
fn lock_with_timeout(
    file: File,
    timeout: Duration,
    lock: fn(&File) -> io::Result<()>,
) -> Result<Option<File>, io::Error> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("epochflight-file-lock".into())
        .spawn(move || {
            let result = lock(&file).map(|()| file);
            let _ = tx.send(result);
        })?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map(Some),
        Err(_) => Ok(None),
    }
}

impl FileSlot {
    fn path(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}.{suffix}", self.name))
    }

    fn holder_path(&self, owner_hex: &str) -> PathBuf {
        self.path(&format!("{owner_hex}.holder"))
    }

    /// The record lock, held for one read-modify-write.
    fn lock_record(&self) -> Result<File, CoordError> {
        let path = self.path("lock");
        let file = create_options()
            .open(&path)
            .map_err(|e| io_error("opening the record lock", e))?;
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(io_error("locking the record", e)),
        }
        match lock_with_timeout(file, self.lock_timeout, File::lock) {
            Ok(Some(file)) => Ok(file),
            Ok(None) => Err(CoordError::Unavailable {
                reason: format!(
                    "another process kept the record lock of `{}` longer than {:?}",
                    self.name, self.lock_timeout
                ),
            }),
            Err(e) => Err(io_error("locking the record", e)),
        }
    }

    fn corrupt(&self, problem: Corruption) -> CoordError {
        CoordError::Corrupt {
            credential: self.name.clone(),
            problem,
        }
    }

    fn read_record(&self) -> Result<Option<Record>, CoordError> {
        match fs::read(self.path("record")) {
            Ok(bytes) => decode(&bytes).map(Some).map_err(|p| self.corrupt(p)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
                Err(self.corrupt(Corruption::WrongType))
            }
            Err(e) => Err(io_error("reading the record", e)),
        }
    }

    fn write_record(&self, record: &Record) -> Result<(), CoordError> {
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", self.name, Owner::new().to_hex()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&encode(record))?;
            file.sync_all()?;
            fs::rename(&tmp, self.path("record"))?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| io_error("writing the record", e))
    }

    /// Whether the process holding `owner`'s claim still holds its lock.
    fn holder_alive(&self, owner: Owner) -> Result<bool, CoordError> {
        let file = match File::open(self.holder_path(&owner.to_hex())) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("opening a holder lock", e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(TryLockError::WouldBlock) => Ok(true),
            Err(TryLockError::Error(e)) => Err(io_error("checking a holder lock", e)),
        }
    }

    fn take_holder_lock(&self, owner: Owner) -> Result<HolderLock, CoordError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.holder_path(&owner.to_hex()))
            .map_err(|e| io_error("creating the holder lock", e))?;
        // Nobody else knows this file yet: the lock is free.
        file.try_lock().map_err(|e| match e {
            TryLockError::WouldBlock => CoordError::Protocol {
                reason: "a fresh holder lock was taken",
            },
            TryLockError::Error(e) => io_error("taking the holder lock", e),
        })?;
        Ok(HolderLock { _file: file })
    }

    fn apply_locked(&self, op: &Op) -> Result<Applied, CoordError> {
        let _record_lock = self.lock_record()?;
        let record = self.read_record()?;
        let now = system_millis();
        let previous_holder = match record.as_ref().map(|r| r.state) {
            Some(Stored::Sending(h)) => Some(h.owner),
            _ => None,
        };
        let holder_alive = match previous_holder {
            Some(owner) => self.holder_alive(owner)?,
            None => true,
        };
        let (verdict, write) = transition(record.as_ref(), op, now, holder_alive);
        let mut guard: Option<HolderGuard> = None;
        if let Some(new) = &write {
            if let (Verdict::Claimed { .. }, Op::Claim { owner, .. }) = (verdict, op) {
                guard = Some(Box::new(self.take_holder_lock(*owner)?));
            }
            if let Err(e) = self.write_record(new) {
                if let Op::Claim { owner, .. } = op {
                    let _ = fs::remove_file(self.holder_path(&owner.to_hex()));
                }
                return Err(e);
            }
            // The previous holder's file is of no use once its claim is
            // replaced (its process, if alive, keeps its lock on the
            // unlinked file until it finishes).
            let still_holding =
                matches!(new.state, Stored::Sending(h) if Some(h.owner) == previous_holder);
            if let (Some(owner), false) = (previous_holder, still_holding) {
                let _ = fs::remove_file(self.holder_path(&owner.to_hex()));
            }
        }
        let record = write.or(record);
        let (cursor, holder_alive) = match record.as_ref().map(|r| r.state) {
            Some(Stored::Sending(h)) => (
                Cursor(h.owner.to_hex()),
                guard.is_some() || (Some(h.owner) == previous_holder && holder_alive),
            ),
            _ => (Cursor(String::new()), true),
        };
        Ok(Applied {
            verdict,
            now,
            record,
            holder_alive,
            cursor,
            guard,
        })
    }
}

impl Slot for FileSlot {
    fn apply_blocking(&self, op: &Op) -> Result<Applied, CoordError> {
        let applied = self.apply_locked(op);
        // Counted once done, so a count tells the operation happened.
        self.calls.fetch_add(1, Ordering::Relaxed);
        applied
    }

    fn apply(self: Arc<Self>, op: Op) -> BoxFuture<Result<Applied, CoordError>> {
        // A claim that lands after its caller is gone is released at once
        // (nobody will refresh with it); then its holder lock is dropped.
        let release = match op {
            Op::Claim { seen, owner, .. } => Some((seen, owner)),
            _ => None,
        };
        let slot = self.clone();
        detached(
            move || slot.apply_blocking(&op),
            Box::new(move |result: Result<Applied, CoordError>| {
                let claimed =
                    matches!(&result, Ok(a) if matches!(a.verdict, Verdict::Claimed { .. }));
                if let (Some((generation, owner)), true) = (release, claimed) {
                    let _ = self.apply_blocking(&Op::Transient {
                        generation,
                        owner,
                        cooldown_ms: 0,
                    });
                }
                drop(result);
            }),
        )
    }

    fn wait_blocking(&self, cursor: &Cursor, timeout: Duration) -> Result<(), CoordError> {
        if cursor.0.is_empty() {
            return Ok(());
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let file = match File::open(self.holder_path(&cursor.0)) {
            Ok(file) => file,
            // Finished already (the holder removes its file at its commit).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("opening a holder lock", e)),
        };
        match file.try_lock_shared() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(io_error("waiting on a holder lock", e)),
        }
        // Woken by the kernel when the holder unlocks (commit, failure,
        // exit, death); the timeout bounds a holder that is stuck.
        lock_with_timeout(file, timeout, File::lock_shared)
            .map(drop)
            .map_err(|e| io_error("waiting on a holder lock", e))
    }

    fn wait(
        self: Arc<Self>,
        cursor: Cursor,
        timeout: Duration,
    ) -> BoxFuture<Result<(), CoordError>> {
        detached(move || self.wait_blocking(&cursor, timeout), Box::new(drop))
    }

    fn store_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

// ------------------------------------------------ running off the executor

enum Handoff<R> {
    Waiting(Option<Waker>),
    Ready(R),
    Taken,
    /// The future was dropped before the result came.
    Abandoned,
}

type Abandoned<R> = Box<dyn FnOnce(R) + Send>;

struct Delivery<R: Send + 'static> {
    handoff: Arc<Mutex<Handoff<R>>>,
    abandoned: Arc<Mutex<Option<Abandoned<R>>>>,
}

/// Runs `work` on `blocking`'s thread pool. Its result goes to the returned
/// future; if that future was dropped first, to `abandoned` instead (so a
/// result holding a claim is never silently dropped).
fn detached<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
    abandoned: Abandoned<R>,
) -> BoxFuture<R> {
    let handoff = Arc::new(Mutex::new(Handoff::Waiting(None)));
    let abandoned = Arc::new(Mutex::new(Some(abandoned)));
    let delivery = Delivery {
        handoff: handoff.clone(),
        abandoned: abandoned.clone(),
    };
    blocking::unblock(move || {
        let result = work();
        let mut state = handoff.lock();
        match std::mem::replace(&mut *state, Handoff::Taken) {
            Handoff::Waiting(waker) => {
                *state = Handoff::Ready(result);
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            _ => {
                drop(state);
                if let Some(f) = abandoned.lock().take() {
                    f(result);
                }
            }
        }
    })
    .detach();
    Box::pin(delivery)
}

impl<R: Send + 'static> std::future::Future for Delivery<R> {
    type Output = R;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<R> {
        let mut state = self.handoff.lock();
        match std::mem::replace(&mut *state, Handoff::Taken) {
            Handoff::Ready(result) => Poll::Ready(result),
            Handoff::Waiting(_) => {
                *state = Handoff::Waiting(Some(cx.waker().clone()));
                Poll::Pending
            }
            Handoff::Taken | Handoff::Abandoned => panic!("polled after completion"),
        }
    }
}

impl<R: Send + 'static> Drop for Delivery<R> {
    fn drop(&mut self) {
        let mut state = self.handoff.lock();
        match std::mem::replace(&mut *state, Handoff::Abandoned) {
            Handoff::Ready(result) => {
                drop(state);
                if let Some(f) = self.abandoned.lock().take() {
                    // Store I/O: not on the executor's thread.
                    blocking::unblock(move || f(result)).detach();
                }
            }
            Handoff::Taken => *state = Handoff::Taken,
            Handoff::Waiting(_) | Handoff::Abandoned => {}
        }
    }
}

// ------------------------------------------------ the file format

const HEADER: &[u8] = b"epochflight-record\n";
const FOOTER: &[u8] = b"end\n";

/// `epochflight-record\n`, then per field `name length\n` + the value +
/// `\n`, then `end\n`: a truncated file is recognised.
fn encode(record: &Record) -> Vec<u8> {
    let mut out = HEADER.to_vec();
    for (name, value) in record.to_fields() {
        out.extend_from_slice(format!("{name} {}\n", value.len()).as_bytes());
        out.extend_from_slice(&value);
        out.push(b'\n');
    }
    out.extend_from_slice(FOOTER);
    out
}

fn decode(bytes: &[u8]) -> Result<Record, Corruption> {
    let truncated = Corruption::Truncated { missing: "end" };
    let undecodable = Corruption::Undecodable { field: "file" };
    let mut rest = bytes
        .strip_prefix(HEADER)
        .ok_or(if HEADER.starts_with(bytes) {
            truncated
        } else {
            undecodable
        })?;
    let mut fields = Vec::new();
    loop {
        if rest == FOOTER {
            break;
        }
        let line_end = rest.iter().position(|&b| b == b'\n').ok_or(truncated)?;
        let (line, after) = (&rest[..line_end], &rest[line_end + 1..]);
        if line == b"end" {
            return Err(undecodable); // bytes after the footer
        }
        let space = line.iter().position(|&b| b == b' ').ok_or(undecodable)?;
        let (name, len) = (&line[..space], &line[space + 1..]);
        let len: usize = std::str::from_utf8(len)
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or(undecodable)?;
        if after.len() < len + 1 {
            return Err(truncated);
        }
        if after[len] != b'\n' {
            return Err(undecodable);
        }
        fields.push((name, &after[..len]));
        rest = &after[len + 1..];
    }
    Record::from_fields(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::coord::record::Secret;

    #[test]
    fn format_round_trips_and_truncation_is_seen() {
        let record = Record {
            token: Some(Secret(b"tok\nwith newline".to_vec())),
            expires_at: Some(5),
            ..Record::absent()
        };
        let bytes = encode(&record);
        assert_eq!(decode(&bytes), Ok(record));
        for cut in [1, 10, HEADER.len() + 3, bytes.len() - 1] {
            assert_eq!(
                decode(&bytes[..cut]),
                Err(Corruption::Truncated { missing: "end" }),
                "cut at {cut}"
            );
        }
        assert_eq!(
            decode(b"garbage"),
            Err(Corruption::Undecodable { field: "file" })
        );
    }
}
