//! Single-flight with epochs: concurrent **and late** callers share one
//! execution of the work that refreshes a value.
//!
//! A [`SingleFlight`] maps each key to at most one flight in progress and the
//! latest value, stamped with an [`Epoch`]. Like Go's `singleflight`, callers
//! that arrive while the work runs share its result. Unlike it, a caller can
//! say *refresh only if the value I saw is still current*
//! ([`SingleFlight::refresh_if_current`]): a caller that learns its value is
//! stale after someone else already refreshed it gets the newer value and runs
//! nothing. That is the difference between one token refresh per expiry and a
//! second refresh that, with rotating refresh tokens, revokes the session.
//!
//! ```
//! use epochflight::{Epoch, Role, SingleFlight};
//!
//! # futures::executor::block_on(async {
//! let tokens: SingleFlight<(), String> = SingleFlight::new();
//! let t1 = tokens.refresh_if_current((), Epoch::NONE, || async { "t1".to_string() }).await;
//!
//! // Two requests sent with t1 are both rejected. The first refreshes...
//! let a = tokens.refresh_if_current((), t1.epoch, || async { "t2".to_string() }).await;
//! // ...the second, arriving after the refresh finished, reuses its result.
//! let b = tokens.refresh_if_current((), t1.epoch, || async { "t3".to_string() }).await;
//! assert_eq!((a.value.as_str(), a.role), ("t2", Role::Led));
//! assert_eq!((b.value.as_str(), b.role), ("t2", Role::Reused));
//! # });
//! ```
//!
//! The crate is runtime-agnostic: it spawns nothing and has no timers; work
//! runs while its caller polls it. Async and blocking callers can share a key.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(loom, allow(dead_code, unreachable_pub))]

pub mod auth;
mod block_on;
mod call;
mod caller;
mod epoch;
mod flight;
mod single_flight;
mod slots;
mod sync;
mod work;

pub use call::{Call, TryCall};
pub use epoch::{Epoch, Outcome, Role, Versioned};
pub use single_flight::SingleFlight;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
