//! The protocol, client side: [`Coordinator`] and [`SharedCredential`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::config::millis;
use super::error::check_name;
use super::outcome::LEASE_MARGIN;
use super::record::{Effective, Op, Owner, Record, Secret, Verdict};
use super::store::{Applied, Sealed, Slot, Store};
use super::{
    Busy, Claim, ClaimOutcome, Committed, CoordConfig, CoordError, CoordStats, Generation,
    SharedState, Snapshot, TokenCodec,
};

/// A store, a token codec and the claims' settings: opens one
/// [`SharedCredential`] per credential name (each key of a keyed manager is
/// its own credential). Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # #[cfg(feature = "redis")] {
/// use std::time::Duration;
/// use epochflight::auth::coord::{Coordinator, CoordConfig, RedisConfig, RedisStore, Utf8Codec};
///
/// let store = RedisStore::connect(RedisConfig::new("redis://127.0.0.1:6379/").prefix("myapp")?)?;
/// let coordinator = Coordinator::new(store, Utf8Codec, CoordConfig::new(Duration::from_secs(10))?);
/// let api = coordinator.credential("api")?;
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Coordinator<T> {
    store: Arc<dyn Store>,
    codec: Arc<dyn TokenCodec<T>>,
    config: CoordConfig,
}

impl<T> Clone for Coordinator<T> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            codec: self.codec.clone(),
            config: self.config,
        }
    }
}

impl<T> fmt::Debug for Coordinator<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Coordinator<T> {
    /// Tokens of type `T`, stored through `codec` in `store`, claimed under
    /// `config`.
    pub fn new(store: impl Store, codec: impl TokenCodec<T>, config: CoordConfig) -> Self {
        Self {
            store: Arc::new(store),
            codec: Arc::new(codec),
            config,
        }
    }

    /// The credential `name` in the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidName`](super::ConfigError::InvalidName) unless
    /// `name` is 1 to 128 bytes of `A-Z a-z 0-9 . _ -` not starting with
    /// `.`; the store's errors when it cannot open it.
    pub fn credential(&self, name: &str) -> Result<SharedCredential<T>, CoordError> {
        check_name(name)?;
        let slot = self.store.open(name, Sealed(()))?.0;
        Ok(SharedCredential {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                slot,
                codec: self.codec.clone(),
                config: self.config,
                high_water: AtomicU64::new(0),
                pending: Mutex::new(None),
                flushing: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }
}

/// One credential shared by every process that opens it: the claim,
/// refresh, commit protocol (see the [module docs](super)). Cheap to clone;
/// clones share the pending commit, the newest generation seen and the
/// counters.
///
/// Every operation has an async form, which never blocks the executor, and
/// a `_blocking` twin, which needs no runtime.
pub struct SharedCredential<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    name: String,
    slot: Arc<dyn Slot>,
    codec: Arc<dyn TokenCodec<T>>,
    config: CoordConfig,
    /// The newest generation this handle has seen in the store.
    high_water: AtomicU64,
    /// A commit the store could not take, sent before the next call.
    pending: Mutex<Option<PendingCommit>>,
    /// Whether a thread is sending the pending commit
    /// ([`flush_in_background`](SharedCredential::flush_in_background)).
    flushing: AtomicBool,
    counters: Counters,
}

struct PendingCommit {
    generation: u64,
    owner: Owner,
    token: Secret,
    expires_at: Option<Instant>,
}

#[derive(Default)]
struct Counters {
    claims_won: AtomicU64,
    grace_reclaims: AtomicU64,
    claims_busy: AtomicU64,
    adopted_newer: AtomicU64,
    commits: AtomicU64,
    commits_pending: AtomicU64,
    pending_fenced: AtomicU64,
    fenced: AtomicU64,
    waits: AtomicU64,
    generation_regressions: AtomicU64,
    reseeds: AtomicU64,
    unavailable: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl<T> Clone for SharedCredential<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for SharedCredential<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCredential")
            .field("name", &self.inner.name)
            .field("config", &self.inner.config)
            .field("high_water", &self.inner.high_water.load(Ordering::Relaxed))
            .field("pending_commit", &self.inner.pending.lock().is_some())
            .finish_non_exhaustive()
    }
}

/// `ms` from `now` (store clock) as a local instant.
fn local_deadline(local_now: Instant, store_now: u64, at: u64) -> Instant {
    local_now + Duration::from_millis(at.saturating_sub(store_now))
}

/// Milliseconds from now until `at` (local clock), for the store.
fn millis_until(at: Option<Instant>) -> Option<u64> {
    at.map(|at| millis(at.saturating_duration_since(Instant::now())))
}

impl<T: Send + 'static> SharedCredential<T> {
    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The claims' settings.
    pub fn config(&self) -> CoordConfig {
        self.inner.config
    }

    /// What this handle did so far.
    pub fn stats(&self) -> CoordStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoordStats {
            store_calls: self.inner.slot.store_calls(),
            claims_won: get(&c.claims_won),
            grace_reclaims: get(&c.grace_reclaims),
            claims_busy: get(&c.claims_busy),
            adopted_newer: get(&c.adopted_newer),
            commits: get(&c.commits),
            commits_pending: get(&c.commits_pending),
            pending_fenced: get(&c.pending_fenced),
            fenced: get(&c.fenced),
            waits: get(&c.waits),
            generation_regressions: get(&c.generation_regressions),
            reseeds: get(&c.reseeds),
            unavailable: get(&c.unavailable),
        }
    }

    /// Whether a commit is waiting for the store to come back.
    pub fn has_pending_commit(&self) -> bool {
        self.inner.pending.lock().is_some()
    }

    // ------------------------------------------------ building blocks

    fn encode(&self, token: &T) -> Result<Secret, CoordError> {
        Ok(Secret(self.inner.codec.encode(token)?))
    }

    /// Counts a failure of the store.
    fn failed(&self, error: CoordError) -> CoordError {
        if matches!(error, CoordError::Unavailable { .. }) {
            bump(&self.inner.counters.unavailable);
        }
        error
    }

    /// The record `applied` left, checked against the newest generation seen.
    fn checked_record(&self, applied: &Applied) -> Result<Record, CoordError> {
        let record = applied.record.clone().unwrap_or_else(Record::absent);
        let seen = self.inner.high_water.load(Ordering::Acquire);
        if record.generation < seen {
            bump(&self.inner.counters.generation_regressions);
            return Err(CoordError::GenerationWentBack {
                store: Generation::new(record.generation),
                seen: Generation::new(seen),
            });
        }
        self.inner
            .high_water
            .fetch_max(record.generation, Ordering::AcqRel);
        Ok(record)
    }

    fn went_back(&self, applied: &Applied, seen: u64) -> CoordError {
        bump(&self.inner.counters.generation_regressions);
        CoordError::GenerationWentBack {
            store: Generation::new(applied.record.as_ref().map_or(0, |r| r.generation)),
            seen: Generation::new(seen.max(self.inner.high_water.load(Ordering::Acquire))),
        }
    }

    fn snapshot(&self, applied: &Applied) -> Result<Snapshot<T>, CoordError> {
        let record = self.checked_record(applied)?;
        let local_now = Instant::now();
        let at = |ms| local_deadline(local_now, applied.now, ms);
        let state = match record.effective(applied.now, applied.holder_alive) {
            Effective::Ready => SharedState::Ready,
            Effective::Sending(h) => SharedState::Sending {
                lease_ends: at(h.lease_until),
            },
            Effective::Lost(_) => SharedState::Lost,
            Effective::Cooling { until } => SharedState::CoolingDown { until: at(until) },
            Effective::SignedOut => SharedState::SignedOut,
        };
        let token = match (state, &record.token) {
            (SharedState::Lost | SharedState::SignedOut, _) | (_, None) => None,
            (_, Some(bytes)) => Some(self.inner.codec.decode(&bytes.0)?),
        };
        Ok(Snapshot {
            generation: Generation::new(record.generation),
            token,
            expires_at: record.expires_at.map(at),
            state,
        })
    }

    fn pending_op(&self) -> Option<(Op, Owner)> {
        let pending = self.inner.pending.lock();
        let p = pending.as_ref()?;
        let op = Op::Commit {
            generation: p.generation,
            owner: p.owner,
            token: p.token.clone(),
            expires_in_ms: millis_until(p.expires_at),
        };
        Some((op, p.owner))
    }

    /// Settles the attempt to send the pending commit of `owner`.
    fn settle_flush(
        &self,
        owner: Owner,
        result: Result<Applied, CoordError>,
    ) -> Result<Option<Generation>, CoordError> {
        let clear = || {
            let mut pending = self.inner.pending.lock();
            if pending.as_ref().is_some_and(|p| p.owner == owner) {
                *pending = None;
            }
        };
        let applied = result.map_err(|e| self.failed(e))?;
        match applied.verdict {
            Verdict::Done => {
                clear();
                bump(&self.inner.counters.commits);
                let record = self.checked_record(&applied)?;
                Ok(Some(Generation::new(record.generation)))
            }
            Verdict::Fenced | Verdict::Newer | Verdict::Behind => {
                clear();
                bump(&self.inner.counters.pending_fenced);
                Ok(None)
            }
            _ => Err(CoordError::Protocol {
                reason: "unexpected verdict for a commit",
            }),
        }
    }

    fn claim_op(&self, seen: Generation) -> (Op, Owner) {
        let owner = Owner::new();
        let op = Op::Claim {
            seen: seen.get(),
            owner,
            lease_ms: millis(self.inner.config.lease()),
            grace_ms: millis(self.inner.config.reuse_grace()),
        };
        (op, owner)
    }

    fn claim_outcome(
        &self,
        seen: Generation,
        owner: Owner,
        mut applied: Applied,
    ) -> Result<ClaimOutcome<T>, CoordError> {
        let c = &self.inner.counters;
        match applied.verdict {
            Verdict::Claimed { grace } => {
                let record = self.checked_record(&applied)?;
                let local_now = Instant::now();
                let token = match &record.token {
                    Some(bytes) => Some(self.inner.codec.decode(&bytes.0)?),
                    None => None,
                };
                bump(&c.claims_won);
                if grace {
                    bump(&c.grace_reclaims);
                }
                Ok(ClaimOutcome::Claimed(Claim {
                    generation: seen,
                    owner,
                    token,
                    expires_at: record
                        .expires_at
                        .map(|ms| local_deadline(local_now, applied.now, ms)),
                    lease_ends: local_now + self.inner.config.lease(),
                    grace_reclaim: grace,
                    guard: applied.guard.take(),
                }))
            }
            Verdict::Newer => {
                bump(&c.adopted_newer);
                self.snapshot(&applied).map(ClaimOutcome::Newer)
            }
            Verdict::Busy => {
                let record = self.checked_record(&applied)?;
                let Effective::Sending(h) = record.effective(applied.now, applied.holder_alive)
                else {
                    return Err(CoordError::Protocol {
                        reason: "busy without a holder",
                    });
                };
                bump(&c.claims_busy);
                Ok(ClaimOutcome::Busy(Busy {
                    generation: seen,
                    lease_ends: local_deadline(Instant::now(), applied.now, h.lease_until),
                    cursor: applied.cursor,
                }))
            }
            Verdict::Behind => Err(self.went_back(&applied, seen.get())),
            Verdict::Cooling => {
                let until = match applied.record.as_ref().map(|r| r.state) {
                    Some(super::record::Stored::Cooling { until }) => until,
                    _ => applied.now,
                };
                Err(CoordError::CoolingDown {
                    remaining: Duration::from_millis(until.saturating_sub(applied.now)),
                })
            }
            Verdict::SignedOut => Err(CoordError::SignedOut),
            Verdict::Lost => Err(CoordError::Lost { generation: seen }),
            _ => Err(CoordError::Protocol {
                reason: "unexpected verdict for a claim",
            }),
        }
    }

    fn commit_op(
        &self,
        claim: &Claim<T>,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<(Op, PendingCommit), CoordError> {
        let token = self.encode(token)?;
        let op = Op::Commit {
            generation: claim.generation.get(),
            owner: claim.owner,
            token: token.clone(),
            expires_in_ms: millis_until(expires_at),
        };
        let pending = PendingCommit {
            generation: claim.generation.get(),
            owner: claim.owner,
            token,
            expires_at,
        };
        Ok((op, pending))
    }

    fn commit_outcome(
        &self,
        pending: PendingCommit,
        result: Result<Applied, CoordError>,
    ) -> Result<Committed, CoordError> {
        let next = Generation::new(pending.generation + 1);
        let applied = match result {
            Err(CoordError::Unavailable { .. }) => {
                bump(&self.inner.counters.unavailable);
                bump(&self.inner.counters.commits_pending);
                *self.inner.pending.lock() = Some(pending);
                return Ok(Committed::Pending(next));
            }
            Err(e) => return Err(e),
            Ok(applied) => applied,
        };
        match applied.verdict {
            Verdict::Done => {
                bump(&self.inner.counters.commits);
                let record = self.checked_record(&applied)?;
                Ok(Committed::Stored(Generation::new(record.generation)))
            }
            Verdict::Behind => Err(self.went_back(&applied, pending.generation)),
            Verdict::Fenced | Verdict::Newer => {
                bump(&self.inner.counters.fenced);
                Err(CoordError::Fenced {
                    generation: Generation::new(applied.record.map_or(0, |r| r.generation)),
                })
            }
            _ => Err(CoordError::Protocol {
                reason: "unexpected verdict for a commit",
            }),
        }
    }

    /// After reject, transient or release: the record as it is now.
    fn finish_outcome(
        &self,
        claim: &Claim<T>,
        applied: Applied,
    ) -> Result<Snapshot<T>, CoordError> {
        match applied.verdict {
            Verdict::Done | Verdict::SignedOut | Verdict::Newer => self.snapshot(&applied),
            Verdict::Behind => Err(self.went_back(&applied, claim.generation.get())),
            Verdict::Fenced => {
                bump(&self.inner.counters.fenced);
                Err(CoordError::Fenced {
                    generation: Generation::new(applied.record.map_or(0, |r| r.generation)),
                })
            }
            _ => Err(CoordError::Protocol {
                reason: "unexpected verdict for finishing a claim",
            }),
        }
    }

    /// A seed's outcome: whether it wrote the record, and the record.
    fn seed_outcome(&self, applied: Applied) -> Result<(bool, Snapshot<T>), CoordError> {
        let written = applied.verdict == Verdict::Done;
        Ok((written, self.write_outcome(applied)?))
    }

    /// Sends the pending commit from a thread of its own, again and again
    /// while the store is unreachable (every 50 ms at first, then every
    /// second), so that it lands once the store is back even if this process
    /// makes no other call (the rest of the fleet is waiting for it). Stops
    /// when it landed, was fenced, failed otherwise, or when this thread
    /// holds the last handle of the credential.
    pub(crate) fn flush_in_background(&self) {
        if self.inner.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let handle = self.clone();
        let spawned = std::thread::Builder::new()
            .name("epochflight-coord-flush".into())
            .spawn(move || {
                let mut pause = Duration::from_millis(50);
                loop {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                    let wanted =
                        Arc::strong_count(&handle.inner) > 1 && handle.has_pending_commit();
                    let retry = wanted
                        && matches!(handle.flush_blocking(), Err(CoordError::Unavailable { .. }));
                    if retry {
                        continue;
                    }
                    handle.inner.flushing.store(false, Ordering::Release);
                    // A commit made pending meanwhile found this thread
                    // still running: take it on.
                    let more = wanted && handle.has_pending_commit();
                    if !more || handle.inner.flushing.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            });
        if spawned.is_err() {
            // No thread: the next call sends it.
            self.inner.flushing.store(false, Ordering::Release);
        }
    }

    fn write_outcome(&self, applied: Applied) -> Result<Snapshot<T>, CoordError> {
        match applied.verdict {
            Verdict::Done | Verdict::Exists => self.snapshot(&applied),
            _ => Err(CoordError::Protocol {
                reason: "unexpected verdict for a write",
            }),
        }
    }

    fn min_generation(&self) -> u64 {
        self.inner.high_water.load(Ordering::Acquire) + 1
    }

    fn wait_limit(busy: &Busy, timeout: Duration) -> Duration {
        let until_lease =
            (busy.lease_ends + LEASE_MARGIN).saturating_duration_since(Instant::now());
        timeout.min(until_lease)
    }

    fn sign_in_op(&self, token: &T, expires_at: Option<Instant>) -> Result<Op, CoordError> {
        Ok(Op::SignIn {
            token: self.encode(token)?,
            expires_in_ms: millis_until(expires_at),
            min_generation: self.min_generation(),
        })
    }

    fn session_replaced(&self, applied: Applied) -> Result<Snapshot<T>, CoordError> {
        // A pending commit is superseded by the new session.
        *self.inner.pending.lock() = None;
        self.write_outcome(applied)
    }

    fn reseed_op(
        &self,
        generation: Generation,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Op, CoordError> {
        Ok(Op::Reseed {
            generation: generation.get(),
            token: self.encode(token)?,
            expires_in_ms: millis_until(expires_at),
        })
    }

    fn reseeded(&self, applied: Applied) -> Result<Snapshot<T>, CoordError> {
        if applied.verdict == Verdict::Done {
            bump(&self.inner.counters.reseeds);
        }
        self.write_outcome(applied)
    }

    // ------------------------------------------------ blocking

    /// Sends a pending commit, if any. `Ok(Some(g))`: it landed as `g`;
    /// `Ok(None)`: there was none, or it was fenced (someone else's value
    /// is current: read it). Every other call does this first.
    ///
    /// # Blocking
    ///
    /// Blocks on the store (at most its I/O timeout).
    ///
    /// # Errors
    ///
    /// [`CoordError::Unavailable`] while the store is still unreachable (the
    /// commit stays pending), and the store's other errors.
    pub fn flush_blocking(&self) -> Result<Option<Generation>, CoordError> {
        let Some((op, owner)) = self.pending_op() else {
            return Ok(None);
        };
        let result = self.inner.slot.apply_blocking(&op);
        self.settle_flush(owner, result)
    }

    fn run_blocking(&self, op: &Op) -> Result<Applied, CoordError> {
        self.flush_blocking()?;
        self.inner
            .slot
            .apply_blocking(op)
            .map_err(|e| self.failed(e))
    }

    /// Reads the record: adopt its generation if it is newer than yours.
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// [`CoordError::Unavailable`], [`CoordError::GenerationWentBack`],
    /// [`CoordError::Corrupt`], [`CoordError::Denied`],
    /// [`CoordError::Codec`].
    pub fn read_blocking(&self) -> Result<Snapshot<T>, CoordError> {
        let applied = self.run_blocking(&Op::Read)?;
        self.snapshot(&applied)
    }

    /// Claims generation `seen` for a refresh: `ready -> sending`, atomically
    /// in the store. See [`claim`](Self::claim).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`claim`](Self::claim).
    pub fn claim_blocking(&self, seen: Generation) -> Result<ClaimOutcome<T>, CoordError> {
        let (op, owner) = self.claim_op(seen);
        let applied = self.run_blocking(&op)?;
        self.claim_outcome(seen, owner, applied)
    }

    /// Waits for the holder in `busy` to finish (commit, reject, transient
    /// failure, or gone), at most `timeout` and never past its lease end,
    /// then reads the record. See [`wait`](Self::wait).
    ///
    /// # Blocking
    ///
    /// Blocks until then.
    ///
    /// # Errors
    ///
    /// As [`read_blocking`](Self::read_blocking).
    pub fn wait_blocking(&self, busy: &Busy, timeout: Duration) -> Result<Snapshot<T>, CoordError> {
        self.flush_blocking()?;
        bump(&self.inner.counters.waits);
        let limit = Self::wait_limit(busy, timeout);
        if !limit.is_zero() {
            self.inner
                .slot
                .wait_blocking(&busy.cursor, limit)
                .map_err(|e| self.failed(e))?;
        }
        self.read_blocking()
    }

    /// Commits the refreshed `token` as the next generation. See
    /// [`commit`](Self::commit).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`commit`](Self::commit).
    pub fn commit_blocking(
        &self,
        claim: Claim<T>,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Committed, CoordError> {
        let (op, pending) = self.commit_op(&claim, token, expires_at)?;
        let result = self.inner.slot.apply_blocking(&op);
        drop(claim);
        self.commit_outcome(pending, result)
    }

    /// Reports that the server rejected the refresh. See
    /// [`reject`](Self::reject).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`reject`](Self::reject).
    pub fn reject_blocking(&self, claim: Claim<T>) -> Result<Snapshot<T>, CoordError> {
        let op = Op::Reject {
            generation: claim.generation.get(),
            owner: claim.owner,
        };
        let applied = self.run_blocking(&op)?;
        self.finish_outcome(&claim, applied)
    }

    /// Reports a transient refresh failure: the fleet cools down for
    /// `cooldown`. See [`fail_transient`](Self::fail_transient).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`fail_transient`](Self::fail_transient).
    pub fn fail_transient_blocking(
        &self,
        claim: Claim<T>,
        cooldown: Duration,
    ) -> Result<Snapshot<T>, CoordError> {
        let op = Op::Transient {
            generation: claim.generation.get(),
            owner: claim.owner,
            cooldown_ms: millis(cooldown),
        };
        let applied = self.run_blocking(&op)?;
        self.finish_outcome(&claim, applied)
    }

    /// Gives a claim back unused. See [`release`](Self::release).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`release`](Self::release).
    pub fn release_blocking(&self, claim: Claim<T>) -> Result<Snapshot<T>, CoordError> {
        self.fail_transient_blocking(claim, Duration::ZERO)
    }

    /// Signs in fleet-wide with `token`. See [`sign_in`](Self::sign_in).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`sign_in`](Self::sign_in).
    pub fn sign_in_blocking(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        let op = self.sign_in_op(token, expires_at)?;
        let applied = self
            .inner
            .slot
            .apply_blocking(&op)
            .map_err(|e| self.failed(e))?;
        self.session_replaced(applied)
    }

    /// Signs out fleet-wide. See [`sign_out`](Self::sign_out).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`sign_out`](Self::sign_out).
    pub fn sign_out_blocking(&self) -> Result<Snapshot<T>, CoordError> {
        let op = Op::SignOut {
            min_generation: self.min_generation(),
        };
        let applied = self
            .inner
            .slot
            .apply_blocking(&op)
            .map_err(|e| self.failed(e))?;
        self.session_replaced(applied)
    }

    /// Writes `token` only if the credential was never written. See
    /// [`seed`](Self::seed).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`seed`](Self::seed).
    pub fn seed_blocking(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        self.seed_written_blocking(token, expires_at)
            .map(|(_, snapshot)| snapshot)
    }

    /// [`seed_blocking`](Self::seed_blocking), and whether it wrote the
    /// record.
    pub(crate) fn seed_written_blocking(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<(bool, Snapshot<T>), CoordError> {
        let op = Op::Seed {
            token: self.encode(token)?,
            expires_in_ms: millis_until(expires_at),
            min_generation: self.min_generation() - 1,
        };
        let applied = self.run_blocking(&op)?;
        self.seed_outcome(applied)
    }

    /// Re-seeds a store that lost data. See [`reseed`](Self::reseed).
    ///
    /// # Blocking
    ///
    /// Blocks on the store.
    ///
    /// # Errors
    ///
    /// As [`reseed`](Self::reseed).
    pub fn reseed_blocking(
        &self,
        generation: Generation,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        let op = self.reseed_op(generation, token, expires_at)?;
        let applied = self
            .inner
            .slot
            .apply_blocking(&op)
            .map_err(|e| self.failed(e))?;
        self.reseeded(applied)
    }

    // ------------------------------------------------ async

    /// Async twin of [`flush_blocking`](Self::flush_blocking).
    ///
    /// # Cancel safety
    ///
    /// Dropped before the store answered, the commit stays pending or has
    /// landed; the next call sends it again and is fenced harmlessly in the
    /// second case (counted as `pending_fenced`).
    ///
    /// # Errors
    ///
    /// As [`flush_blocking`](Self::flush_blocking).
    pub async fn flush(&self) -> Result<Option<Generation>, CoordError> {
        let Some((op, owner)) = self.pending_op() else {
            return Ok(None);
        };
        let result = self.inner.slot.clone().apply(op).await;
        self.settle_flush(owner, result)
    }

    async fn run(&self, op: Op) -> Result<Applied, CoordError> {
        self.flush().await?;
        self.inner
            .slot
            .clone()
            .apply(op)
            .await
            .map_err(|e| self.failed(e))
    }

    /// Reads the record: adopt its generation if it is newer than yours,
    /// without refreshing.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a read changes nothing.
    ///
    /// # Errors
    ///
    /// [`CoordError::Unavailable`] (fast: no refresh without the store),
    /// [`CoordError::GenerationWentBack`] when the store lost data,
    /// [`CoordError::Corrupt`], [`CoordError::Denied`],
    /// [`CoordError::Codec`].
    pub async fn read(&self) -> Result<Snapshot<T>, CoordError> {
        let applied = self.run(Op::Read).await?;
        self.snapshot(&applied)
    }

    /// Claims generation `seen` (the generation of the token this process
    /// holds, [`Generation::INITIAL`] if none) for a refresh.
    ///
    /// - [`ClaimOutcome::Claimed`]: the store moved `ready -> sending` for
    ///   this process. Refresh with the claim's token (read from the store
    ///   now, never a local copy), then finish the claim.
    /// - [`ClaimOutcome::Newer`]: someone already refreshed: adopt.
    /// - [`ClaimOutcome::Busy`]: someone is refreshing: [`wait`](Self::wait).
    ///
    /// # Cancel safety
    ///
    /// Dropped before it returns, a claim that landed is released in the
    /// background (nobody refreshed with it), so nobody sees it as lost.
    ///
    /// # Errors
    ///
    /// [`CoordError::SignedOut`], [`CoordError::Lost`],
    /// [`CoordError::CoolingDown`], [`CoordError::GenerationWentBack`]
    /// (`seen` is ahead of the store), and the errors of
    /// [`read`](Self::read).
    pub async fn claim(&self, seen: Generation) -> Result<ClaimOutcome<T>, CoordError> {
        let (op, owner) = self.claim_op(seen);
        let applied = self.run(op).await?;
        self.claim_outcome(seen, owner, applied)
    }

    /// Waits for the holder in `busy` to finish (commit, reject, transient
    /// failure, or gone), woken by its commit, at most `timeout` and never
    /// past its lease end (plus a few milliseconds, so that an expired
    /// lease reads as [`Lost`](SharedState::Lost)); then reads the record.
    /// A snapshot still [`Sending`](SharedState::Sending) means the timeout
    /// came first.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a wait changes nothing.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    pub async fn wait(&self, busy: &Busy, timeout: Duration) -> Result<Snapshot<T>, CoordError> {
        self.flush().await?;
        bump(&self.inner.counters.waits);
        let limit = Self::wait_limit(busy, timeout);
        if !limit.is_zero() {
            let cursor = busy.cursor.clone();
            self.inner
                .slot
                .clone()
                .wait(cursor, limit)
                .await
                .map_err(|e| self.failed(e))?;
        }
        self.read().await
    }

    /// Commits the refreshed `token` (expiring at `expires_at`, stored in
    /// the store's clock) as the claim's generation + 1, checked against the
    /// generation and the claim's owner.
    ///
    /// Lands also after the lease ran out, unless another process
    /// re-claimed within the reuse grace or the record moved on. If the
    /// store is unreachable, the commit is kept ([`Committed::Pending`]) and
    /// sent before this handle's next call.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the store answered, the commit may or may not have
    /// landed; the claim is dropped with it (see [`Claim`]).
    ///
    /// # Errors
    ///
    /// [`CoordError::Fenced`]: nothing was written, another value is
    /// current (read and adopt it; do not use `token`'s refresh token
    /// again); [`CoordError::GenerationWentBack`], [`CoordError::Codec`],
    /// [`CoordError::Corrupt`], [`CoordError::Denied`].
    pub async fn commit(
        &self,
        claim: Claim<T>,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Committed, CoordError> {
        let (op, pending) = self.commit_op(&claim, token, expires_at)?;
        let result = self.inner.slot.clone().apply(op).await;
        drop(claim);
        self.commit_outcome(pending, result)
    }

    /// Reports that the server rejected the refresh (`invalid_grant`): the
    /// credential is signed out fleet-wide, if the claim is still the
    /// current generation's. Returns the record after it:
    /// [`SignedOut`](SharedState::SignedOut), or a newer generation to adopt.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the store answered, the sign-out may or may not have
    /// landed; if not, the claim is lost at its lease's end.
    ///
    /// # Errors
    ///
    /// [`CoordError::Fenced`] (another process re-claimed: its result
    /// decides), and the errors of [`read`](Self::read).
    pub async fn reject(&self, claim: Claim<T>) -> Result<Snapshot<T>, CoordError> {
        let op = Op::Reject {
            generation: claim.generation.get(),
            owner: claim.owner,
        };
        let applied = self.run(op).await?;
        self.finish_outcome(&claim, applied)
    }

    /// Reports a transient refresh failure (network, 5xx): the token is
    /// kept, and the whole fleet gets [`CoordError::CoolingDown`] from
    /// claims for `cooldown` (none at all with `Duration::ZERO`).
    ///
    /// After a grace re-claim ([`Claim::is_grace_reclaim`]) the record is
    /// left [`Lost`](SharedState::Lost) instead: that refresh token was
    /// presented twice already, a third time would be reuse.
    ///
    /// # Cancel safety
    ///
    /// As [`reject`](Self::reject).
    ///
    /// # Errors
    ///
    /// As [`reject`](Self::reject).
    pub async fn fail_transient(
        &self,
        claim: Claim<T>,
        cooldown: Duration,
    ) -> Result<Snapshot<T>, CoordError> {
        let op = Op::Transient {
            generation: claim.generation.get(),
            owner: claim.owner,
            cooldown_ms: millis(cooldown),
        };
        let applied = self.run(op).await?;
        self.finish_outcome(&claim, applied)
    }

    /// Gives a claim back unused: **only** if its token was never sent to
    /// the server (e.g. the refresh was cancelled before it started).
    ///
    /// # Cancel safety
    ///
    /// As [`reject`](Self::reject).
    ///
    /// # Errors
    ///
    /// As [`reject`](Self::reject).
    pub async fn release(&self, claim: Claim<T>) -> Result<Snapshot<T>, CoordError> {
        self.fail_transient(claim, Duration::ZERO).await
    }

    /// Signs in fleet-wide with `token`: a new generation, above every one
    /// this handle has seen. A claim in progress is fenced; a pending commit
    /// is dropped.
    ///
    /// # Cancel safety
    ///
    /// Dropped before the store answered, the sign-in may or may not have
    /// landed.
    ///
    /// # Errors
    ///
    /// [`CoordError::Unavailable`], [`CoordError::Codec`],
    /// [`CoordError::Corrupt`], [`CoordError::Denied`].
    pub async fn sign_in(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        let op = self.sign_in_op(token, expires_at)?;
        let applied = self
            .inner
            .slot
            .clone()
            .apply(op)
            .await
            .map_err(|e| self.failed(e))?;
        self.session_replaced(applied)
    }

    /// Signs out fleet-wide: every process gets [`CoordError::SignedOut`]
    /// until `sign_in`. A claim in progress is fenced.
    ///
    /// # Cancel safety
    ///
    /// As [`sign_in`](Self::sign_in).
    ///
    /// # Errors
    ///
    /// As [`sign_in`](Self::sign_in).
    pub async fn sign_out(&self) -> Result<Snapshot<T>, CoordError> {
        let op = Op::SignOut {
            min_generation: self.min_generation(),
        };
        let applied = self
            .inner
            .slot
            .clone()
            .apply(op)
            .await
            .map_err(|e| self.failed(e))?;
        self.session_replaced(applied)
    }

    /// Writes `token` only if the credential was never written (a process
    /// starting with a token must not overwrite the fleet's newer one), and
    /// returns the record as it is then: adopt it.
    ///
    /// # Cancel safety
    ///
    /// As [`sign_in`](Self::sign_in).
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    pub async fn seed(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        let (_, snapshot) = self.seed_written(token, expires_at).await?;
        Ok(snapshot)
    }

    /// [`seed`](Self::seed), and whether it wrote the record.
    pub(crate) async fn seed_written(
        &self,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<(bool, Snapshot<T>), CoordError> {
        let op = Op::Seed {
            token: self.encode(token)?,
            expires_in_ms: millis_until(expires_at),
            min_generation: self.min_generation() - 1,
        };
        let applied = self.run(op).await?;
        self.seed_outcome(applied)
    }

    /// After [`CoordError::GenerationWentBack`]: writes this process's
    /// newest `token` as `generation` **only if the store is below it**
    /// (upwards only, counted in [`CoordStats::reseeds`]). When every
    /// process re-seeds what it holds, the store ends at the newest one.
    /// Until then a process may still adopt an older token: data loss in the
    /// store is why Redis needs AOF.
    ///
    /// # Cancel safety
    ///
    /// As [`sign_in`](Self::sign_in).
    ///
    /// # Errors
    ///
    /// As [`sign_in`](Self::sign_in).
    pub async fn reseed(
        &self,
        generation: Generation,
        token: &T,
        expires_at: Option<Instant>,
    ) -> Result<Snapshot<T>, CoordError> {
        let op = self.reseed_op(generation, token, expires_at)?;
        let applied = self
            .inner
            .slot
            .clone()
            .apply(op)
            .await
            .map_err(|e| self.failed(e))?;
        self.reseeded(applied)
    }
}
