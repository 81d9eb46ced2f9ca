//! What coordination through a store can fail with.
//!
//! No error here carries token bytes: messages name states, generations,
//! fields and the store's own (transport or permission) message, never a
//! record's content.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::time::Duration;

use super::Generation;

/// Why a coordination call failed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CoordError {
    /// The store could not be reached, or did not answer in time. No refresh
    /// may start without a claim, so a refresh that is needed now fails with
    /// this at once; tokens already held keep working.
    Unavailable {
        /// The store's or the operating system's message.
        reason: String,
    },
    /// The credential is signed out fleet-wide (`sign_out`, or a refresh of
    /// the current generation was rejected). Until `sign_in`.
    SignedOut,
    /// A holder's lease ran out while it was refreshing (or, with the file
    /// store, its process is gone): the server may have rotated the refresh
    /// token already, so nobody presents it again. Counts as signed out
    /// until `sign_in`, or until that holder's late commit lands.
    Lost {
        /// The generation whose refresh was lost.
        generation: Generation,
    },
    /// A refresh of this credential failed transiently somewhere in the
    /// fleet; no new attempt until the cool-down is over.
    CoolingDown {
        /// How long the cool-down still runs (store clock).
        remaining: Duration,
    },
    /// This call does not hold the claim it names: another holder re-claimed
    /// the generation, or the record moved on (`sign_in`, a commit).
    /// Nothing was written; read the store and adopt its value.
    Fenced {
        /// The store's generation.
        generation: Generation,
    },
    /// The store holds an older generation than this process has seen: it
    /// lost data (Redis without AOF, a restored backup, a deleted key).
    /// Nothing was written. Re-seed upwards only
    /// ([`SharedCredential::reseed`](super::SharedCredential::reseed)).
    GenerationWentBack {
        /// What the store holds.
        store: Generation,
        /// The newest generation this process has seen.
        seen: Generation,
    },
    /// The stored record cannot be read; it is left as it is, for a person
    /// to look at.
    Corrupt {
        /// The credential's name.
        credential: String,
        /// What is wrong.
        problem: Corruption,
    },
    /// The store refused the call (Redis ACL or authentication, file
    /// permissions).
    Denied {
        /// The store's or the operating system's message.
        reason: String,
    },
    /// The token codec failed.
    Codec(CodecError),
    /// The configuration is invalid.
    Config(ConfigError),
    /// The store answered something this version does not understand (a
    /// foreign script or a newer writer).
    Protocol {
        /// What was unexpected.
        reason: &'static str,
    },
}

impl fmt::Display for CoordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoordError::Unavailable { reason } => {
                write!(f, "credential store unavailable: {reason}")
            }
            CoordError::SignedOut => f.write_str("signed out fleet-wide: sign in again"),
            CoordError::Lost { generation } => write!(
                f,
                "refresh of {generation} lost (its holder's lease ran out): sign in again"
            ),
            CoordError::CoolingDown { remaining } => {
                write!(
                    f,
                    "refresh failed in the fleet; cooling down for {remaining:?}"
                )
            }
            CoordError::Fenced { generation } => {
                write!(f, "claim fenced: the store is at {generation}")
            }
            CoordError::GenerationWentBack { store, seen } => write!(
                f,
                "the store went back from {seen} to {store}: it lost data"
            ),
            CoordError::Corrupt {
                credential,
                problem,
            } => write!(
                f,
                "stored record of `{credential}` is unreadable: {problem}"
            ),
            CoordError::Denied { reason } => write!(f, "credential store refused: {reason}"),
            CoordError::Codec(e) => e.fmt(f),
            CoordError::Config(e) => e.fmt(f),
            CoordError::Protocol { reason } => {
                write!(f, "unexpected answer from the store: {reason}")
            }
        }
    }
}

impl Error for CoordError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            CoordError::Codec(e) => Some(e),
            CoordError::Config(e) => Some(e),
            _ => None,
        }
    }
}

/// What is wrong with a stored record.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Corruption {
    /// The key holds another type (Redis), or the path is not a file.
    WrongType,
    /// A required field is missing (or the file ends early).
    Truncated {
        /// The missing field.
        missing: &'static str,
    },
    /// A field's value cannot be parsed, appears twice, belongs to another
    /// state, or the field is unknown.
    Undecodable {
        /// The field.
        field: &'static str,
    },
    /// The state is none of `ready`, `sending`, `cooling`, `signed_out`.
    UnknownState,
    /// The record was written by a format version this one cannot read.
    UnsupportedVersion,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::WrongType => f.write_str("wrong type"),
            Corruption::Truncated { missing } => write!(f, "truncated (no `{missing}`)"),
            Corruption::Undecodable { field } => write!(f, "undecodable field `{field}`"),
            Corruption::UnknownState => f.write_str("unknown state"),
            Corruption::UnsupportedVersion => f.write_str("unsupported format version"),
        }
    }
}

/// A [`TokenCodec`](super::TokenCodec) failure. Carries a message only: a
/// codec must not put token bytes in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CodecError {
    message: Cow<'static, str>,
}

impl CodecError {
    /// An error with this message (which must not contain token bytes).
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token codec failed: {}", self.message)
    }
}

impl Error for CodecError {}

/// An invalid configuration.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConfigError {
    /// The lease must be longer than zero.
    ZeroLease,
    /// A credential name must be 1 to 128 bytes of `A-Z a-z 0-9 . _ -`, not
    /// starting with `.` (it becomes part of a Redis key and a file name).
    InvalidName,
    /// A Redis key prefix must be 1 to 64 bytes of `A-Z a-z 0-9 . _ - :`.
    InvalidPrefix,
    /// The Redis URL cannot be parsed (the URL itself is not repeated: it
    /// may hold a password).
    InvalidUrl,
    /// The file store's directory cannot be used.
    InvalidDirectory {
        /// The operating system's message.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroLease => f.write_str("the lease must be longer than zero"),
            ConfigError::InvalidName => f.write_str(
                "invalid credential name: 1 to 128 bytes of A-Z a-z 0-9 . _ -, not starting with .",
            ),
            ConfigError::InvalidPrefix => {
                f.write_str("invalid key prefix: 1 to 64 bytes of A-Z a-z 0-9 . _ - :")
            }
            ConfigError::InvalidUrl => f.write_str("invalid Redis URL"),
            ConfigError::InvalidDirectory { reason } => {
                write!(f, "unusable store directory: {reason}")
            }
        }
    }
}

impl Error for ConfigError {}

impl From<CodecError> for CoordError {
    fn from(e: CodecError) -> Self {
        CoordError::Codec(e)
    }
}

impl From<ConfigError> for CoordError {
    fn from(e: ConfigError) -> Self {
        CoordError::Config(e)
    }
}

/// Checks a credential name (see [`ConfigError::InvalidName`]).
pub(crate) fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidName)
    }
}
