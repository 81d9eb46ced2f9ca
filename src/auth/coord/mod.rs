//! One refresh per expiry **across processes and hosts**: a shared record
//! per credential, claimed before every refresh.
//!
//! A [`TokenManager`](super::TokenManager) coalesces refreshes inside its
//! process. Processes sharing a credential (CLI runs and workers on one
//! host, replicas on many) would each refresh, and with rotating refresh
//! tokens the second one presents a used token and the server revokes the
//! session (RFC 9700 §4.14.2). A store shared by the processes prevents it:
//! [`FileStore`] (feature `file-coordination`, one host) or [`RedisStore`]
//! (feature `redis`, hosts).
//!
//! # The protocol
//!
//! Each credential has one record in the store: a **generation** `g` (apart
//! from the in-process [`Epoch`](crate::Epoch): shared by all processes),
//! the token as bytes (through a [`TokenCodec`], so it can be encrypted at
//! rest), its expiry in the store's clock, and a state:
//!
//! - [`claim(g)`](SharedCredential::claim) moves `ready -> sending{owner,
//!   lease}` atomically and returns the token **read from the store at the
//!   claim**: the refresher uses that refresh token, never a local copy. If
//!   the store already holds a newer generation, the answer is
//!   [`ClaimOutcome::Newer`] (adopt it, refresh nothing); if another
//!   process is sending, [`ClaimOutcome::Busy`].
//! - [`commit`](SharedCredential::commit) moves `g -> g+1`, checked
//!   against the generation and the claim's owner: the generation is the
//!   fencing token, so a paused or cut-off holder cannot overwrite a newer
//!   value ([`CoordError::Fenced`]).
//! - [`wait`](SharedCredential::wait): others wait for the commit, woken by
//!   it (no polling), bounded by a timeout and by the holder's lease.
//! - [`reject`](SharedCredential::reject) signs out fleet-wide (if the
//!   claim is the current generation's); [`fail_transient`](SharedCredential::fail_transient)
//!   starts a fleet-wide cool-down; [`sign_in`](SharedCredential::sign_in)
//!   and [`sign_out`](SharedCredential::sign_out) act fleet-wide.
//!
//! **Holder gone while sending.** When a lease runs out while `sending`, the
//! server may have rotated the refresh token already. The record then reads
//! as **lost**: every process gets [`CoordError::Lost`] and counts as signed
//! out; nobody presents that refresh token again. The holder's late commit
//! (it was only slow) still lands, as does `sign_in`. With the file store a
//! dead holder is seen at once (the kernel frees its lock); with Redis at
//! the lease's end. Opt-in [reuse grace](CoordConfig::with_reuse_grace), for
//! servers that accept the previous refresh token for a while: **one**
//! survivor re-claims within the grace and retries; from then on the old
//! holder's commit is fenced.
//!
//! **The lease.** The token server cannot check the fence: the refresher
//! must finish well within the [lease](CoordConfig::new) (give its HTTP
//! client a timeout of at most half the lease).
//!
//! **Store down.** Never a refresh without a claim: a refresh that is needed
//! fails fast with [`CoordError::Unavailable`]; tokens already held keep
//! working. A refresh that succeeded but could not be committed is kept
//! ([`Committed::Pending`]) and committed before the next call once the
//! store is back.
//!
//! **Cookie mode stays in-process.** A token the client cannot read
//! (`T = ()`, HttpOnly cookies in each process's own cookie jar) cannot
//! cross processes: coordinate only tokens you hold as values.
//!
//! # With a `TokenManager`
//!
//! [`TokenManager::with_coordinator`](super::TokenManager::with_coordinator)
//! (one credential) and
//! [`with_keyed_coordinator`](super::TokenManager::with_keyed_coordinator)
//! (one credential per key) run this protocol inside the manager's refresh:
//! nothing else changes for its callers. Two levels of single flight: local
//! callers join the manager's own flight, and only that flight talks to the
//! store, so store calls per expiry do not grow with requests (per process
//! and expiry: one claim, one commit or one wait and one read).
//!
//! # Without a manager
//!
//! Sketch of what the manager's refresh does, for a local token of shared
//! generation `g` (the blocking twins are the same with `_blocking`):
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use epochflight::auth::coord::{ClaimOutcome, CoordError, Generation, SharedCredential, SharedState};
//!
//! # async fn refresher(_stale: Option<String>) -> Result<(String, Option<Instant>), bool> { unimplemented!() }
//! /// Runs inside the manager's single flight: local callers wait on it.
//! async fn refresh(shared: &SharedCredential<String>, g: Generation)
//!     -> Result<(Generation, String), CoordError>
//! {
//!     let busy = match shared.claim(g).await? {
//!         // Refreshed elsewhere (a late 401 seen here): adopt, no refresh.
//!         ClaimOutcome::Newer(snapshot) => {
//!             snapshot.usable()?;
//!             return Ok((snapshot.generation, snapshot.token.expect("a committed token")));
//!         }
//!         ClaimOutcome::Busy(busy) => busy,
//!         ClaimOutcome::Claimed(mut claim) => {
//!             // The refresh token read from the store at the claim.
//!             let stale = claim.take_token();
//!             return match refresher(stale).await {
//!                 Ok((token, expires_at)) => {
//!                     // Pending (store down) counts as committed: use the token.
//!                     let committed = shared.commit(claim, &token, expires_at).await?;
//!                     Ok((committed.generation(), token))
//!                 }
//!                 Err(rejected) if rejected => {
//!                     shared.reject(claim).await?;
//!                     Err(CoordError::SignedOut)
//!                 }
//!                 Err(_) => {
//!                     shared.fail_transient(claim, Duration::from_secs(1)).await?;
//!                     Err(CoordError::CoolingDown { remaining: Duration::from_secs(1) })
//!                 }
//!             };
//!         }
//!     };
//!     // Another process is refreshing: wait for its commit and adopt it.
//!     let snapshot = shared.wait(&busy, Duration::from_secs(30)).await?;
//!     snapshot.usable()?; // Lost, SignedOut: typed errors
//!     match (snapshot.state, snapshot.token) {
//!         (SharedState::Ready, Some(token)) if snapshot.generation > g => Ok((snapshot.generation, token)),
//!         (SharedState::CoolingDown { .. }, _) => Err(CoordError::CoolingDown { remaining: Duration::ZERO }),
//!         _ => Err(CoordError::Unavailable { reason: "no commit in time".into() }),
//!     }
//! }
//! ```
//!
//! At its first call a manager made with a token [`seed`](SharedCredential::seed)s
//! it (written only if the credential was never written) and adopts what the
//! store holds; `sign_in`/`sign_out` go to the store first. On
//! [`CoordError::GenerationWentBack`] it [`reseed`](SharedCredential::reseed)s
//! the token it holds (upwards only) and refreshes nothing in that call.
//!
//! # Blocking and async
//!
//! Every operation has an async form, which never blocks the executor (on
//! tokio, smol or any other), and a `_blocking` twin, which needs no
//! runtime.

// Without a store feature the protocol has nobody to talk to.
#![cfg_attr(
    not(any(all(feature = "file-coordination", unix), feature = "redis")),
    allow(dead_code)
)]

mod codec;
mod config;
mod credential;
mod error;
mod outcome;
mod record;
mod store;

// Each store feature has its own MSRV (see the README).
#[cfg(all(feature = "file-coordination", unix))]
#[clippy::msrv = "1.89"] // std's `File::lock`
mod file;
#[cfg(feature = "redis")]
#[clippy::msrv = "1.88"] // the `redis` crate's
mod redis_store;

pub use codec::{BytesCodec, FnCodec, TokenCodec, Utf8Codec, codec_fn};
pub use config::CoordConfig;
pub use credential::{Coordinator, SharedCredential};
pub use error::{CodecError, ConfigError, CoordError, Corruption};
pub use outcome::{
    Busy, Claim, ClaimOutcome, Committed, CoordStats, Generation, SharedState, Snapshot,
};
pub use store::Store;

#[cfg(all(feature = "file-coordination", unix))]
pub use file::{DEFAULT_LOCK_TIMEOUT, FileStore};
#[cfg(feature = "redis")]
pub use redis_store::{RedisConfig, RedisStore};
