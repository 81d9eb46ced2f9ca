//! What the store answers: generations, snapshots, claims.

use std::fmt;
use std::time::{Duration, Instant};

use super::CoordError;
use super::record::Owner;
use super::store::{Cursor, HolderGuard};

/// The shared generation of a credential: how many times its token was
/// replaced fleet-wide (commits, sign-ins, sign-outs). Apart from the
/// in-process [`Epoch`](crate::Epoch): every process has its own epochs, all
/// of them share generations. A commit of `g` makes `g + 1`; the generation
/// is the fencing token of the claims.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(u64);

impl Generation {
    /// The generation of a credential never written: no token yet.
    pub const INITIAL: Generation = Generation(0);

    /// The generation numbered `n`.
    pub const fn new(n: u64) -> Self {
        Generation(n)
    }

    /// Its number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "generation {}", self.0)
    }
}

/// The state of a credential's record as a snapshot saw it.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedState {
    /// Nobody is refreshing: the token is current.
    Ready,
    /// A process holds the claim and is refreshing; the token is still the
    /// previous one.
    Sending {
        /// When the holder's lease ends (local clock).
        lease_ends: Instant,
    },
    /// The holder's refresh was lost ([`CoordError::Lost`]).
    Lost,
    /// A refresh failed transiently; no new attempt until `until`.
    CoolingDown {
        /// When the cool-down ends (local clock).
        until: Instant,
    },
    /// Signed out fleet-wide.
    SignedOut,
}

/// A credential's record as read from the store.
#[non_exhaustive]
pub struct Snapshot<T> {
    /// Its shared generation.
    pub generation: Generation,
    /// Its token, decoded; `None` if there is none yet, and when the state is
    /// [`Lost`](SharedState::Lost) or [`SignedOut`](SharedState::SignedOut)
    /// (so that nobody presents a lost refresh token).
    pub token: Option<T>,
    /// When the token expires, converted from the store's clock to this
    /// process's (so clocks of different hosts need not agree).
    pub expires_at: Option<Instant>,
    /// Its state.
    pub state: SharedState,
}

impl<T> Snapshot<T> {
    /// `Ok` if the token may be used (the state is not lost or signed out).
    ///
    /// # Errors
    ///
    /// [`CoordError::Lost`] or [`CoordError::SignedOut`].
    pub fn usable(&self) -> Result<(), CoordError> {
        match self.state {
            SharedState::Lost => Err(CoordError::Lost {
                generation: self.generation,
            }),
            SharedState::SignedOut => Err(CoordError::SignedOut),
            _ => Ok(()),
        }
    }
}

impl<T> fmt::Debug for Snapshot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("expires_at", &self.expires_at)
            .field("state", &self.state)
            .finish()
    }
}

/// The claim of a generation: this process may refresh it now.
///
/// Finish it with exactly one of
/// [`commit`](super::SharedCredential::commit),
/// [`reject`](super::SharedCredential::reject),
/// [`fail_transient`](super::SharedCredential::fail_transient) or
/// [`release`](super::SharedCredential::release) (or their blocking twins).
/// Dropping it unfinished counts as "the refresh may have been sent": the
/// record becomes [`Lost`](SharedState::Lost) once the lease ends (with the
/// file store: at once), and only this claim's late commit, or a
/// `sign_in`, brings it back.
#[must_use = "a claim must be committed, rejected, failed or released"]
pub struct Claim<T> {
    pub(crate) generation: Generation,
    pub(crate) owner: Owner,
    pub(crate) token: Option<T>,
    pub(crate) expires_at: Option<Instant>,
    pub(crate) lease_ends: Instant,
    pub(crate) grace_reclaim: bool,
    /// The file store's claim lock: held (never read) until the claim is
    /// finished, released by its drop.
    #[allow(dead_code)]
    pub(crate) guard: Option<HolderGuard>,
}

impl<T> Claim<T> {
    /// The generation claimed: the commit makes the next one.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The token of the claimed generation, read from the store at the
    /// claim (never a process-local copy): refresh with *this* one. `None`
    /// when the credential has no token yet (the first fetch).
    pub fn token(&self) -> Option<&T> {
        self.token.as_ref()
    }

    /// Takes the token out (for a refresher that wants it by value).
    pub fn take_token(&mut self) -> Option<T> {
        self.token.take()
    }

    /// When the claimed token expires (local clock).
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// When the lease ends (local clock): the refresh must be committed
    /// well before.
    pub fn lease_ends(&self) -> Instant {
        self.lease_ends
    }

    /// Whether this is the one re-claim within the reuse grace of a lost
    /// refresh (the refresher presents a refresh token the server has seen).
    pub fn is_grace_reclaim(&self) -> bool {
        self.grace_reclaim
    }
}

impl<T> fmt::Debug for Claim<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("generation", &self.generation)
            .field("owner", &self.owner)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("lease_ends", &self.lease_ends)
            .field("grace_reclaim", &self.grace_reclaim)
            .finish()
    }
}

/// Another process holds the claim: [`wait`](super::SharedCredential::wait)
/// for its commit.
#[derive(Clone, Debug)]
pub struct Busy {
    pub(crate) generation: Generation,
    pub(crate) lease_ends: Instant,
    pub(crate) cursor: Cursor,
}

impl Busy {
    /// The generation being refreshed.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// When the holder's lease ends (local clock); its refresh is lost then.
    pub fn lease_ends(&self) -> Instant {
        self.lease_ends
    }
}

/// The answer to [`claim`](super::SharedCredential::claim).
#[derive(Debug)]
pub enum ClaimOutcome<T> {
    /// This process holds the claim: refresh with [`Claim::token`] now.
    Claimed(Claim<T>),
    /// The store already holds a newer generation (refreshed elsewhere):
    /// adopt it, refresh nothing.
    Newer(Snapshot<T>),
    /// Another process is refreshing this generation: wait for it.
    Busy(Busy),
}

/// The answer to [`commit`](super::SharedCredential::commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// The store holds the new token as this generation.
    Stored(Generation),
    /// The store is unreachable: the commit is kept in this process and
    /// sent before its next call to the store (or by
    /// [`flush`](super::SharedCredential::flush)). Use the new token
    /// meanwhile; it is this generation once stored.
    Pending(Generation),
}

impl Committed {
    /// The generation of the committed token.
    pub fn generation(self) -> Generation {
        match self {
            Committed::Stored(g) | Committed::Pending(g) => g,
        }
    }
}

/// Counts of what one [`SharedCredential`](super::SharedCredential) did.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoordStats {
    /// Commands sent to the store (Redis round trips, file record
    /// operations and claim-lock waits).
    pub store_calls: u64,
    /// Claims won (grace re-claims included).
    pub claims_won: u64,
    /// Grace re-claims won.
    pub grace_reclaims: u64,
    /// Claims answered with [`ClaimOutcome::Busy`].
    pub claims_busy: u64,
    /// Claims answered with [`ClaimOutcome::Newer`] (adopted without a
    /// refresh).
    pub adopted_newer: u64,
    /// Commits stored (pending ones once flushed included).
    pub commits: u64,
    /// Commits kept locally while the store was unreachable.
    pub commits_pending: u64,
    /// Pending commits that were fenced when finally sent.
    pub pending_fenced: u64,
    /// Calls answered with [`CoordError::Fenced`].
    pub fenced: u64,
    /// Waits for another process's commit.
    pub waits: u64,
    /// Times the store was found behind this process
    /// ([`CoordError::GenerationWentBack`]).
    pub generation_regressions: u64,
    /// Re-seeds that wrote the store.
    pub reseeds: u64,
    /// Calls that failed with [`CoordError::Unavailable`].
    pub unavailable: u64,
}

/// How long after a lease ends a waiter looks again, so that it sees the
/// lease's end (a read just after it) rather than just before.
pub(crate) const LEASE_MARGIN: Duration = Duration::from_millis(20);
