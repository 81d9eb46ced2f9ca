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
//! The crate is runtime-agnostic: it has no timers and spawns nothing unless
//! given a spawner ([`SingleFlight::with_spawner`]); work runs while its
//! caller polls it. Async and blocking callers can share a key.
//!
//! The modules, from the public API down: `single_flight` (the API), `call`
//! (its futures and blocking waits), `driver` and `follower` (a caller's part
//! in a flight), `registry` (the map protocol and its lock), `flight` (the
//! life of a flight: its states and transitions), `flight_table`,
//! `read_cache`, `wakers`, `hashed`, `work`, `spawner`, `epoch`, `sync`.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(loom, allow(dead_code, unreachable_pub))]

pub mod auth;
mod block_on;
mod call;
mod driver;
mod epoch;
mod flight;
mod flight_table;
mod follower;
mod hashed;
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_models;
mod read_cache;
mod registry;
mod single_flight;
mod spawner;
mod sync;
mod wakers;
mod work;

pub use call::{Call, TryCall};
pub use epoch::{Epoch, Outcome, Role, Versioned};
pub use single_flight::SingleFlight;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
