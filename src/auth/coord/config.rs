//! The settings every process sharing a credential must agree on.

use std::time::Duration;

use super::ConfigError;

/// Lease and reuse grace of a credential's claims.
///
/// Every process sharing a credential must use the same values: the store
/// checks each call against the values that call carries.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use epochflight::auth::coord::CoordConfig;
///
/// let config = CoordConfig::new(Duration::from_secs(10))?
///     .with_reuse_grace(Duration::from_secs(30));
/// assert_eq!(config.lease(), Duration::from_secs(10));
/// assert!(CoordConfig::new(Duration::ZERO).is_err());
/// # Ok::<(), epochflight::auth::coord::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoordConfig {
    lease: Duration,
    reuse_grace: Duration,
}

impl CoordConfig {
    /// Claims last `lease`: a holder that has not committed, rejected or
    /// failed by then is taken as gone, and its refresh as **lost**.
    ///
    /// The token server cannot check the claim's fence, so the refresher
    /// must finish well within the lease (give the refresher's HTTP client
    /// a timeout of at most half the lease): a holder that commits after its
    /// lease still lands if nobody re-claimed, but everyone else has already
    /// been told the refresh was lost.
    ///
    /// # Errors
    ///
    /// [`ConfigError::ZeroLease`] for a zero lease.
    pub fn new(lease: Duration) -> Result<Self, ConfigError> {
        if lease.is_zero() {
            return Err(ConfigError::ZeroLease);
        }
        Ok(Self {
            lease,
            reuse_grace: Duration::ZERO,
        })
    }

    /// Opt-in reuse grace, for token servers that accept the previous
    /// refresh token for a while after rotating it (Auth0, Cognito, Hydra;
    /// FAPI 2.0 requires it). When a holder's lease runs out within `grace`
    /// of its claim, **one** other process may re-claim the generation and
    /// present the same refresh token once more; from then on the old
    /// holder's commit is fenced. Set it below the server's reuse interval
    /// by at least the refresher's time to reach the server. Default: zero
    /// (no re-claim: a lost refresh stays lost).
    pub fn with_reuse_grace(mut self, grace: Duration) -> Self {
        self.reuse_grace = grace;
        self
    }

    /// The lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The reuse grace.
    pub fn reuse_grace(&self) -> Duration {
        self.reuse_grace
    }
}

/// Whole milliseconds, rounded up (a lease of 1 µs is 1 ms, not zero).
pub(crate) fn millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    u64::try_from(ms).unwrap_or(u64::MAX)
}
