//! Generation numbers and the values they stamp.

use std::fmt;
use std::num::NonZeroU64;

/// The generation of a stored value.
///
/// Every successful flight, and every [`set`](crate::SingleFlight::set), is
/// stamped with an epoch strictly greater than every epoch the same
/// [`SingleFlight`](crate::SingleFlight) issued before, for any key. An epoch
/// is never reissued, not even after [`forget`](crate::SingleFlight::forget).
///
/// Epochs are opaque: compare them, store them, print them. [`Epoch::NONE`]
/// sorts before every issued epoch and means "I have seen no value".
///
/// # Examples
///
/// ```
/// use epochflight::Epoch;
///
/// assert!(Epoch::NONE.is_none());
/// assert_eq!(Epoch::default(), Epoch::NONE);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub(crate) u64);

impl Epoch {
    /// "No value seen": older than every epoch a `SingleFlight` issues.
    ///
    /// Passing it as `seen` to
    /// [`refresh_if_current`](crate::SingleFlight::refresh_if_current) means
    /// "get the value, or create it if there is none".
    pub const NONE: Epoch = Epoch(0);

    /// Whether this is [`Epoch::NONE`].
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            f.write_str("Epoch(NONE)")
        } else {
            write!(f, "Epoch({})", self.0)
        }
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            f.write_str("none")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// An issued epoch, as flights carry it internally: never [`Epoch::NONE`],
/// so `Poll<Result<(T, Stamp), E>>` needs no tag of its own and a small
/// result travels back from the work in two registers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stamp(NonZeroU64);

impl Stamp {
    /// The epoch numbered `n`, which is not 0.
    #[inline]
    pub(crate) fn issued(n: u64) -> Self {
        Stamp(NonZeroU64::new(n).expect("issued epochs start at 1"))
    }
}

/// A value as the map stores it, with the stamp of its epoch: for a small
/// `T`, `Option<Stamped<T>>` is no bigger than `Stamped<T>`.
#[derive(Clone, Debug)]
pub(crate) struct Stamped<T> {
    pub(crate) value: T,
    pub(crate) stamp: Stamp,
}

impl<T: Clone> Stamped<T> {
    pub(crate) fn versioned(&self) -> Versioned<T> {
        Versioned {
            value: self.value.clone(),
            epoch: self.stamp.into(),
        }
    }
}

impl<T> From<Stamped<T>> for Versioned<T> {
    fn from(stamped: Stamped<T>) -> Self {
        Versioned {
            value: stamped.value,
            epoch: stamped.stamp.into(),
        }
    }
}

impl From<Stamp> for Epoch {
    fn from(stamp: Stamp) -> Self {
        Epoch(stamp.0.get())
    }
}

/// How a caller obtained its [`Outcome`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Role {
    /// This caller ran its own closure: it started the flight, or it was
    /// promoted because the flight's previous driver panicked, or was dropped
    /// before its first poll.
    Led,
    /// This caller waited on a flight that another caller started. It may
    /// have finished polling that flight's work after the leader was
    /// cancelled; the work was still the flight's, not its own.
    Joined,
    /// A stored value answered the call without running or joining
    /// anything: a value newer than the caller's `seen` epoch
    /// (`refresh_if_current`), or the stored value when no flight was in
    /// progress (`get`).
    Reused,
}

/// A stored value and the epoch it was stamped with.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// The epoch the value was stored with.
    pub epoch: Epoch,
}

/// What a call to a [`SingleFlight`](crate::SingleFlight) operation returned.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Outcome<T> {
    /// The value.
    pub value: T,
    /// The value's epoch; pass it back as `seen` to
    /// [`refresh_if_current`](crate::SingleFlight::refresh_if_current) to say
    /// "this value went stale".
    pub epoch: Epoch,
    /// Whether this caller ran the work, joined another caller's flight, or
    /// reused a newer stored value.
    pub role: Role,
}

impl<T> Outcome<T> {
    pub(crate) fn new(value: T, epoch: Epoch, role: Role) -> Self {
        Self { value, epoch, role }
    }

    /// The value and its epoch, without the role.
    pub fn into_versioned(self) -> Versioned<T> {
        Versioned {
            value: self.value,
            epoch: self.epoch,
        }
    }
}

impl<T> From<Outcome<T>> for Versioned<T> {
    fn from(outcome: Outcome<T>) -> Self {
        outcome.into_versioned()
    }
}
