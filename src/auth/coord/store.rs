//! What a store does for the protocol: apply an operation atomically, and
//! wait for a record to change. The protocol ([`super::SharedCredential`])
//! is written once against this; the backends differ only here.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::CoordError;
use super::record::{Millis, Op, Record, Verdict};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Something a claim holds until it is finished (the file store's lock).
pub(crate) type HolderGuard = Box<dyn Any + Send + Sync>;

/// Where a waiter starts waiting from: the Redis stream's last entry id, or
/// the file store's holder id.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Cursor(pub(crate) String);

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({})", self.0)
    }
}

/// The result of one atomic operation.
pub(crate) struct Applied {
    pub(crate) verdict: Verdict,
    /// The store's clock when it applied the operation.
    pub(crate) now: Millis,
    /// The record after the operation (`None`: never written).
    pub(crate) record: Option<Record>,
    /// Whether the holder named by a `sending` record is still there (the
    /// file store's knowledge; Redis: always true).
    pub(crate) holder_alive: bool,
    pub(crate) cursor: Cursor,
    pub(crate) guard: Option<HolderGuard>,
}

/// One credential in one store.
pub(crate) trait Slot: Send + Sync + 'static {
    /// Applies `op` atomically.
    fn apply_blocking(&self, op: &Op) -> Result<Applied, CoordError>;

    /// Applies `op` atomically without blocking the executor.
    ///
    /// A `Claim` whose future is dropped before it returns must not leave a
    /// claim behind: if it landed, the store releases it (nobody refreshed
    /// with it).
    fn apply(self: Arc<Self>, op: Op) -> BoxFuture<Result<Applied, CoordError>>;

    /// Returns when the record may have changed since `cursor` (a commit, a
    /// holder gone), or after `timeout`; the caller reads again.
    fn wait_blocking(&self, cursor: &Cursor, timeout: Duration) -> Result<(), CoordError>;

    /// [`wait_blocking`](Self::wait_blocking) without blocking the executor.
    fn wait(
        self: Arc<Self>,
        cursor: Cursor,
        timeout: Duration,
    ) -> BoxFuture<Result<(), CoordError>>;

    /// Commands sent to the store so far.
    fn store_calls(&self) -> u64;
}

/// Proof of coming from this crate: [`Store`] cannot be implemented
/// elsewhere.
#[derive(Debug)]
pub struct Sealed(pub(crate) ());

/// An opened credential of a store (crate-internal).
pub struct SlotHandle(pub(crate) Arc<dyn Slot>);

impl fmt::Debug for SlotHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlotHandle")
    }
}

/// A store that coordinates credentials across processes:
/// [`FileStore`](super::FileStore) (one host) or
/// [`RedisStore`](super::RedisStore) (hosts). Implemented by this crate
/// only.
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// Opens credential `name` (already checked).
    #[doc(hidden)]
    fn open(&self, name: &str, sealed: Sealed) -> Result<SlotHandle, CoordError>;
}

/// The store's clock for stores on this host: the system clock.
#[cfg_attr(not(feature = "file-coordination"), allow(dead_code))]
pub(crate) fn system_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
