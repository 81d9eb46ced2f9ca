//! Keys with their hash computed once, before any lock is taken.
//!
//! The user's [`BuildHasher`](std::hash::BuildHasher) runs outside every lock
//! (a `Hash` that panics then leaves nothing half-done), and once per call:
//! the maps behind a `SingleFlight` store each key's hash beside it and hash
//! with [`PassThrough`], which hands the stored number back, also when a
//! table grows.
//!
//! Borrowed lookups (`current(&Q)`, `forget(&Q)`, …) go through
//! `dyn Lookup<Q>`: [`Hashed<K>`] borrows as it, so a `&Q` and its hash can
//! find a `Hashed<K>` without building one.

use std::borrow::Borrow;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// A key and the hash the `SingleFlight`'s hasher gave it.
#[derive(Clone, Debug)]
pub(crate) struct Hashed<K> {
    pub(crate) hash: u64,
    pub(crate) key: K,
}

impl<K: Eq> PartialEq for Hashed<K> {
    fn eq(&self, other: &Self) -> bool {
        // Different hashes are different keys: `K::eq` runs only on a match.
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq> Eq for Hashed<K> {}

impl<K> Hash for Hashed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Hashes a precomputed hash to itself.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, _: &[u8]) {
        unreachable!("the maps hash precomputed hashes only");
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the maps hash with.
pub(crate) type BuildPassThrough = BuildHasherDefault<PassThrough>;

/// A key of type `Q` with its hash: a stored `Hashed<K>` or a borrowed probe.
pub(crate) trait Lookup<Q: ?Sized> {
    fn hash(&self) -> u64;
    fn key(&self) -> &Q;
}

/// A borrowed key and its hash, to look up a `Hashed<K>` with.
pub(crate) struct Probe<'q, Q: ?Sized> {
    pub(crate) hash: u64,
    pub(crate) key: &'q Q,
}

impl<K: Borrow<Q>, Q: ?Sized> Lookup<Q> for Hashed<K> {
    fn hash(&self) -> u64 {
        self.hash
    }

    fn key(&self) -> &Q {
        self.key.borrow()
    }
}

impl<Q: ?Sized> Lookup<Q> for Probe<'_, Q> {
    fn hash(&self) -> u64 {
        self.hash
    }

    fn key(&self) -> &Q {
        self.key
    }
}

impl<Q: ?Sized + Eq> PartialEq for dyn Lookup<Q> + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.hash() == other.hash() && self.key() == other.key()
    }
}

impl<Q: ?Sized + Eq> Eq for dyn Lookup<Q> + '_ {}

impl<Q: ?Sized> Hash for dyn Lookup<Q> + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(Lookup::hash(self));
    }
}

impl<'a, K: Borrow<Q> + 'a, Q: ?Sized + 'a> Borrow<dyn Lookup<Q> + 'a> for Hashed<K> {
    fn borrow(&self) -> &(dyn Lookup<Q> + 'a) {
        self
    }
}

impl<'q, Q: ?Sized> Probe<'q, Q> {
    /// As the maps look it up.
    pub(crate) fn as_lookup(&self) -> &(dyn Lookup<Q> + 'q) {
        self
    }
}
