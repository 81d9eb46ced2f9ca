//! [`SingleFlight`]: the map from key to its latest value, its epoch and the
//! flight in progress.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};

use crate::call::{Call, TryCall};
use crate::caller::{Driver, Stage, Waiter};
use crate::epoch::{Epoch, Outcome, Versioned};
use crate::flight::{Finished, Flight, FlightId, Registration, WaitKind, WakeOnDrop};
use crate::slots::{FlightRef, Slot, SlotId, Slots};
use crate::sync::{Arc, Mutex};
use crate::work::Work;

/// A map of single flights with epochs: concurrent *and late* callers for a
/// key share one execution of the work.
///
/// For each key it holds at most one flight in progress and the latest
/// completed value, stamped with an [`Epoch`]. Callers either
///
/// - [`run`](Self::run) the work, joining the flight in progress if there is
///   one (Go's `singleflight.Do`), or
/// - [`refresh_if_current`](Self::refresh_if_current): run it only if the
///   epoch they saw is still the latest, and otherwise get the newer value
///   without running anything. This is what makes a late caller, one that
///   noticed its value was stale only after someone else refreshed it, cause
///   no second refresh.
///
/// Every operation has a blocking twin for threads (`*_blocking`), and a
/// fallible `try_*` form whose work returns `Result<T, E>`. The infallible
/// forms exist when `E` is [`Infallible`], the default.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use epochflight::{Epoch, Role, SingleFlight};
///
/// # futures::executor::block_on(async {
/// let tokens: SingleFlight<&str, String> = SingleFlight::new();
/// let refreshes = AtomicUsize::new(0);
/// let refresh = || {
///     let n = refreshes.fetch_add(1, Ordering::SeqCst) + 1;
///     async move { format!("token-{n}") }
/// };
///
/// // Get or create.
/// let first = tokens.refresh_if_current("api", Epoch::NONE, refresh).await;
/// assert_eq!(first.value, "token-1");
///
/// // The token was rejected: refresh it, once.
/// let second = tokens.refresh_if_current("api", first.epoch, refresh).await;
/// assert_eq!((second.value.as_str(), second.role), ("token-2", Role::Led));
///
/// // A late caller that still holds the first token runs nothing.
/// let late = tokens.refresh_if_current("api", first.epoch, refresh).await;
/// assert_eq!((late.value.as_str(), late.role), ("token-2", Role::Reused));
/// assert_eq!(refreshes.load(Ordering::SeqCst), 2);
/// # });
/// ```
///
/// # Liveness
///
/// Work runs only while a caller polls it: nothing is spawned. A leader whose
/// future is neither polled nor dropped stalls its followers. A leader that
/// is dropped hands its work to a follower, which continues it; a leader
/// whose work panics lets a follower start over with its own closure.
///
/// Calls register with the key **when they are made**, not when first
/// polled: the returned future is the caller's place in the flight. Poll it
/// (or drop it) promptly.
///
/// # Locks and user code
///
/// User closures, futures, and drops of `T` and `E` never run while an
/// internal lock is held, so work may call back into the same `SingleFlight`
/// (on other keys: work that waits for its own key's flight waits for
/// itself, forever, as in Go).
/// `K`'s `Hash`, `Eq`, `Clone` and `Drop`, the hasher, and `T::clone` and
/// `E::clone` may run under a lock: keep them cheap and do not call back
/// into the same `SingleFlight` from them.
///
/// # Costs
///
/// One mutex guards the map. A flight nobody joins takes it twice (to start
/// and to finish) and allocates once: its work, boxed so that a cancelled
/// leader can hand it over. A reused refresh, [`current`](Self::current) and
/// [`epoch`](Self::epoch) take it once and allocate nothing. The map checks
/// the slot it found last with `K::eq` before hashing, so the callers of a
/// hot key (a token, a config) do not hash it; any other key costs one hash.
/// A follower allocates nothing of its own: its waker waits in a slot of the
/// flight's list, and all of them are woken in one pass. The README's
/// "Performance" section has the measurements.
pub struct SingleFlight<K, T, E = Infallible, S = RandomState> {
    inner: Mutex<Slots<K, T, E, S>>,
}

/// What a caller wants when it registers.
#[derive(Clone, Copy)]
pub(crate) enum Mode {
    /// Join the flight in progress or lead one (`run`).
    Run,
    /// Reuse a value newer than `seen`; else join or lead.
    RefreshIfCurrent(Epoch),
    /// Join the flight in progress; else reuse the stored value; else lead.
    Get,
}

/// Things to drop once the map lock is released (DESIGN I8).
#[must_use]
pub(crate) struct Leftovers<K, T, E> {
    _work: Option<Work<T, E>>,
    _flight: Option<Arc<Flight<T, E>>>,
    _slot: Option<(K, Slot<T, E>)>,
    _value: Option<Versioned<T>>,
    _waker: Option<std::task::Waker>,
    /// Last, so it wakes followers after everything else is dropped.
    _wake: WakeOnDrop,
}

impl<K, T, E> Default for Leftovers<K, T, E> {
    fn default() -> Self {
        Self {
            _work: None,
            _flight: None,
            _slot: None,
            _value: None,
            _waker: None,
            _wake: WakeOnDrop::default(),
        }
    }
}

impl<K, T, E> SingleFlight<K, T, E, RandomState> {
    /// Creates an empty `SingleFlight`.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<u32, String> = SingleFlight::new();
    /// assert!(flights.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_hasher(RandomState::new())
    }
}

impl<K, T, E, S> SingleFlight<K, T, E, S> {
    /// Creates an empty `SingleFlight` that hashes keys with `hasher`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::collections::hash_map::RandomState;
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<u32, String> = SingleFlight::with_hasher(RandomState::new());
    /// assert_eq!(flights.len(), 0);
    /// ```
    pub fn with_hasher(hasher: S) -> Self {
        Self {
            inner: Mutex::new(Slots::with_hasher(hasher)),
        }
    }
}

impl<K, T, E, S: Default> Default for SingleFlight<K, T, E, S> {
    fn default() -> Self {
        Self::with_hasher(S::default())
    }
}

impl<K, T, E, S> fmt::Debug for SingleFlight<K, T, E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("SingleFlight")
            .field("keys", &inner.len())
            .field("in_flight", &inner.in_flight())
            .field("detached_in_flight", &inner.detached_len())
            .field("last_epoch", &inner.last_epoch())
            .finish()
    }
}

impl<K, T, E, S> SingleFlight<K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    /// Registers a caller: reuse, lead or join. Runs no user code.
    fn enter(&self, key: K, mode: Mode, kind: WaitKind) -> Stage<'_, K, T, E, S> {
        let mut inner = self.inner.lock();
        let id = inner.next_flight();
        let at = if let Some((at, slot)) = inner.get_mut(&key) {
            if let Some(stored) = &slot.value {
                let reuse = match mode {
                    Mode::Run => false,
                    Mode::RefreshIfCurrent(seen) => stored.epoch > seen,
                    Mode::Get => slot.flight.is_none(),
                };
                if reuse {
                    return Stage::Reused(Some(stored.clone()));
                }
            }
            if let Some(flight) = &mut slot.flight {
                let flight = flight.share();
                flight.add_waiter(kind);
                return Stage::Join(Waiter::new(self, key, at, flight, kind, mode));
            }
            slot.flight = Some(FlightRef::Solo(id));
            at
        } else {
            let slot = Slot {
                value: None,
                flight: Some(FlightRef::Solo(id)),
            };
            inner.insert(key, slot)
        };
        drop(inner);
        Stage::Drive(Driver::new(self, at, id, None, None))
    }

    /// A driver's result: stamps it, stores it if the flight is still the
    /// key's, unhooks the flight, sets `done` (the driver has nothing left to
    /// hand on), and publishes the result to the followers.
    ///
    /// Returns the stamped result alone (two words for a small `T`): a
    /// bigger return value costs a stall on the uncontended path.
    pub(crate) fn complete_flight(
        &self,
        at: SlotId,
        id: FlightId,
        own: Option<&Arc<Flight<T, E>>>,
        result: Result<T, E>,
        done: &mut bool,
    ) -> Finished<T, E> {
        // Every user clone happens before anything changes, so that a panic
        // in `T::clone` or `E::clone` leaves the flight as it was, and its
        // unfinished driver hands it on. The stored copy is made unlocked.
        let copy = result.as_ref().ok().cloned();
        let mut replaced = None;
        let mut removed = None;
        let mut inner = self.inner.lock();
        let finished = result.map(|value| (value, inner.next_epoch()));
        // The followers' copy, only if there are followers (never on the
        // uncontended path); `T::clone` under the map lock is documented.
        let publish = inner
            .find_flight(at, id)
            .or_else(|| own.cloned())
            .map(|flight| (flight, finished.clone()));
        let found = inner.take_flight(at, id);
        if found.attached {
            let slot = inner.at_mut(at).expect("an attached flight has its slot");
            match (&finished, copy) {
                (Ok((_, stamp)), Some(value)) => {
                    let epoch = Epoch::from(*stamp);
                    replaced = slot.value.replace(Versioned { value, epoch });
                }
                _ => removed = inner.prune(at),
            }
        }
        drop(inner);
        *done = true;
        if let Some((flight, published)) = publish {
            flight.complete(published);
        }
        drop((replaced, removed, found.shared));
        finished
    }

    /// A driver gave up (cancelled or panicked): hand the flight to a
    /// follower, or free the key if none is left.
    pub(crate) fn abandon_flight(
        &self,
        at: SlotId,
        id: FlightId,
        own: Option<Arc<Flight<T, E>>>,
        work: Option<Work<T, E>>,
    ) -> Leftovers<K, T, E> {
        let mut leftovers = Leftovers::default();
        let mut inner = self.inner.lock();
        let flight = inner.find_flight(at, id).or(own);
        let orphan = match &flight {
            Some(flight) => flight.hand_off(work),
            None => Err(work),
        };
        match orphan {
            Ok(wake) => leftovers._wake = wake,
            Err(work) => {
                leftovers._work = work;
                self.unhook(&mut inner, at, id, &mut leftovers);
            }
        }
        drop(inner);
        drop(flight);
        leftovers
    }

    /// For a promoted follower: the stored value its own call would reuse
    /// now (a `set` may have stored one since it joined; DESIGN I3).
    pub(crate) fn reusable(&self, key: &K, mode: Mode) -> Option<Versioned<T>> {
        let inner = self.inner.lock();
        let stored = inner.get(key)?.value.as_ref()?;
        match mode {
            Mode::Run => None,
            Mode::RefreshIfCurrent(seen) => (stored.epoch > seen).then(|| stored.clone()),
            Mode::Get => Some(stored.clone()),
        }
    }

    /// A follower left without its result.
    pub(crate) fn leave_flight(
        &self,
        at: SlotId,
        flight: &Arc<Flight<T, E>>,
        kind: WaitKind,
        registration: Registration,
    ) -> Leftovers<K, T, E> {
        let mut leftovers = Leftovers::default();
        let mut inner = self.inner.lock();
        let left = flight.leave(kind, registration);
        leftovers._waker = left.waker;
        leftovers._wake = left.wake;
        if let Some(work) = left.abandoned {
            leftovers._work = work;
            self.unhook(&mut inner, at, flight.id, &mut leftovers);
        }
        drop(inner);
        leftovers
    }

    /// Unhooks a flight nobody will finish, freeing its key.
    fn unhook(
        &self,
        inner: &mut Slots<K, T, E, S>,
        at: SlotId,
        id: FlightId,
        leftovers: &mut Leftovers<K, T, E>,
    ) {
        let found = inner.take_flight(at, id);
        if found.attached {
            leftovers._slot = inner.prune(at);
        }
        leftovers._flight = found.shared;
    }

    /// Runs `f` as the flight for `key`, or joins the flight in progress.
    /// Go's `singleflight.Do`, with a result that may fail.
    ///
    /// `Ok` is stored as the key's latest value with a new epoch. `Err` is
    /// handed (cloned) to this flight's leader and every follower, and
    /// changes neither the stored value nor the epoch; the next call starts
    /// a new flight. Nothing is retried.
    ///
    /// The caller registers when this method is called; `f` is called on the
    /// first poll if this caller leads.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future of a follower withdraws it; the flight goes on.
    /// Dropping the future of the caller that is running the work while
    /// followers wait hands the work, as it is, to one of them, which
    /// continues polling it: the work is never restarted. With no follower
    /// left the work is dropped and the key is free.
    ///
    /// # Panics
    ///
    /// A panic in `f` or its future propagates to the caller polling it. The
    /// key is not poisoned: one waiting follower runs its own `f` instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Role, SingleFlight};
    ///
    /// # futures::executor::block_on(async {
    /// let flights: SingleFlight<&str, u32, String> = SingleFlight::new();
    /// let err = flights.try_run("k", || async { Err("down".to_string()) }).await;
    /// assert_eq!(err, Err("down".to_string()));
    /// assert_eq!(flights.current("k"), None); // failures store nothing
    ///
    /// let ok = flights.try_run("k", || async { Ok(7) }).await.unwrap();
    /// assert_eq!((ok.value, ok.role), (7, Role::Led));
    /// # });
    /// ```
    pub fn try_run<F, Fut>(&self, key: K, f: F) -> TryCall<'_, K, T, E, S, F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        TryCall::new(self.enter(key, Mode::Run, WaitKind::Async), f)
    }

    /// Runs `f` only if `seen` is still the key's latest epoch; otherwise
    /// returns the newer value without running anything.
    ///
    /// - The stored epoch is newer than `seen`: the stored value is returned
    ///   at once with [`Role::Reused`](crate::Role::Reused), even while a
    ///   flight runs.
    /// - Otherwise (`seen` is current, or newer, or [`Epoch::NONE`] with
    ///   nothing stored): join the flight in progress, or lead one.
    ///
    /// `Epoch::NONE` as `seen` means "get, or create if missing".
    /// Failures behave as in [`try_run`](Self::try_run).
    ///
    /// # Cancel safety
    ///
    /// As [`try_run`](Self::try_run): a dropped follower withdraws, a dropped
    /// driver hands its work to a follower, which continues it.
    ///
    /// # Panics
    ///
    /// As [`try_run`](Self::try_run).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Epoch, Role, SingleFlight};
    ///
    /// # futures::executor::block_on(async {
    /// let flights: SingleFlight<(), u32, &str> = SingleFlight::new();
    /// let v1 = flights.try_refresh_if_current((), Epoch::NONE, || async { Ok(1) }).await?;
    /// let v2 = flights.try_refresh_if_current((), v1.epoch, || async { Ok(2) }).await?;
    /// // Someone still holding v1 is handed v2; the closure is not called.
    /// let late = flights
    ///     .try_refresh_if_current((), v1.epoch, || async { Err("not called") })
    ///     .await?;
    /// assert_eq!((late.value, late.epoch, late.role), (2, v2.epoch, Role::Reused));
    /// # Ok::<(), &str>(())
    /// # }).unwrap();
    /// ```
    pub fn try_refresh_if_current<F, Fut>(
        &self,
        key: K,
        seen: Epoch,
        f: F,
    ) -> TryCall<'_, K, T, E, S, F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        TryCall::new(
            self.enter(key, Mode::RefreshIfCurrent(seen), WaitKind::Async),
            f,
        )
    }

    /// Blocking [`try_run`](Self::try_run): runs `f` on this thread as the
    /// flight for `key`, or waits for the flight in progress.
    ///
    /// # Blocking
    ///
    /// Blocks the current thread until the flight completes. Do not call it
    /// from async code. If this thread inherits the work of a cancelled
    /// async leader, it polls that future here, on this thread: this works
    /// for futures that need no runtime reactor (a future doing tokio I/O
    /// cannot be driven here). Async followers are preferred for that
    /// hand-off when there are any.
    ///
    /// # Panics
    ///
    /// A panic in `f` propagates to this caller; one waiting follower runs
    /// its own closure instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<u8, String, std::io::ErrorKind> = SingleFlight::new();
    /// let out = flights.try_run_blocking(1, || Ok("config".to_string())).unwrap();
    /// assert_eq!(out.value, "config");
    /// ```
    pub fn try_run_blocking<F>(&self, key: K, f: F) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.enter(key, Mode::Run, WaitKind::Blocking)
            .resolve_blocking(f)
    }

    /// Blocking [`try_refresh_if_current`](Self::try_refresh_if_current).
    ///
    /// # Blocking
    ///
    /// As [`try_run_blocking`](Self::try_run_blocking). Returns at once when
    /// a value newer than `seen` is stored.
    ///
    /// # Panics
    ///
    /// As [`try_run_blocking`](Self::try_run_blocking).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Epoch, Role, SingleFlight};
    ///
    /// let flights: SingleFlight<(), u32, ()> = SingleFlight::new();
    /// let v1 = flights.try_refresh_if_current_blocking((), Epoch::NONE, || Ok(1)).unwrap();
    /// let again = flights.try_refresh_if_current_blocking((), Epoch::NONE, || Ok(2)).unwrap();
    /// assert_eq!((again.value, again.role), (1, Role::Reused));
    /// # let _ = v1;
    /// ```
    pub fn try_refresh_if_current_blocking<F>(
        &self,
        key: K,
        seen: Epoch,
        f: F,
    ) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.enter(key, Mode::RefreshIfCurrent(seen), WaitKind::Blocking)
            .resolve_blocking(f)
    }

    /// The key's value once no flight is in progress: joins the flight in
    /// progress if there is one, returns the stored value
    /// ([`Role::Reused`](crate::Role::Reused)) if there is none, and leads `f`
    /// if there is neither.
    ///
    /// This is a *request gate*: while a refresh is in flight, callers wait
    /// for its result instead of using the value it is replacing.
    ///
    /// # Cancel safety
    ///
    /// As [`try_run`](Self::try_run).
    ///
    /// # Panics
    ///
    /// As [`try_run`](Self::try_run).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Role, SingleFlight};
    ///
    /// # futures::executor::block_on(async {
    /// let flights: SingleFlight<(), u32, ()> = SingleFlight::new();
    /// let created = flights.try_get((), || async { Ok(1) }).await.unwrap();
    /// let stored = flights.try_get((), || async { Ok(2) }).await.unwrap();
    /// assert_eq!((created.role, stored.value, stored.role), (Role::Led, 1, Role::Reused));
    ///
    /// // While a refresh is in flight, `try_get` waits for it.
    /// let refresh = flights.try_run((), || async { Ok(3) });
    /// let gated = flights.try_get((), || async { Ok(4) });
    /// let (_, gated) = futures::join!(refresh, gated);
    /// assert_eq!(gated.unwrap().value, 3);
    /// # });
    /// ```
    pub fn try_get<F, Fut>(&self, key: K, f: F) -> TryCall<'_, K, T, E, S, F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        TryCall::new(self.enter(key, Mode::Get, WaitKind::Async), f)
    }

    /// Blocking [`try_get`](Self::try_get).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread while a flight is in progress; see
    /// [`try_run_blocking`](Self::try_run_blocking).
    ///
    /// # Panics
    ///
    /// As [`try_run_blocking`](Self::try_run_blocking).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Role, SingleFlight};
    ///
    /// let flights: SingleFlight<(), u32, ()> = SingleFlight::new();
    /// assert_eq!(flights.try_get_blocking((), || Ok(1)).unwrap().role, Role::Led);
    /// assert_eq!(flights.try_get_blocking((), || Ok(2)).unwrap().value, 1);
    /// ```
    pub fn try_get_blocking<F>(&self, key: K, f: F) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.enter(key, Mode::Get, WaitKind::Blocking)
            .resolve_blocking(f)
    }

    /// The latest completed value for `key` and its epoch, without waiting.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// assert!(flights.current("k").is_none());
    /// let epoch = flights.set("k", 5);
    /// let v = flights.current("k").unwrap();
    /// assert_eq!((v.value, v.epoch), (5, epoch));
    /// ```
    pub fn current<Q>(&self, key: &Q) -> Option<Versioned<T>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.inner.lock();
        inner.get(key)?.value.clone()
    }

    /// The latest epoch for `key`, [`Epoch::NONE`] if no value is stored.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Epoch, SingleFlight};
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// assert_eq!(flights.epoch("k"), Epoch::NONE);
    /// let e = flights.set("k", 1);
    /// assert_eq!(flights.epoch("k"), e);
    /// ```
    pub fn epoch<Q>(&self, key: &Q) -> Epoch
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.inner.lock();
        match inner.get(key) {
            Some(Slot {
                value: Some(stored),
                ..
            }) => stored.epoch,
            _ => Epoch::NONE,
        }
    }

    /// Drops the value stored for `key`. A flight in progress finishes for its
    /// own callers only, and its result is not stored; callers arriving after
    /// `forget` start a new flight (Go's `Forget`).
    ///
    /// Epochs are never reissued: the next value stored for `key` gets an
    /// epoch newer than the forgotten one.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Epoch, SingleFlight};
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// let old = flights.set("k", 1);
    /// flights.forget("k");
    /// assert_eq!(flights.epoch("k"), Epoch::NONE);
    /// assert!(flights.set("k", 2) > old);
    /// ```
    pub fn forget<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        drop(self.take(key));
    }

    /// [`forget`](Self::forget), returning the removed value for the caller
    /// to drop outside its own locks.
    pub(crate) fn take<Q>(&self, key: &Q) -> Option<Versioned<T>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut inner = self.inner.lock();
        let (removed_key, mut removed) = inner.remove(key)?;
        inner.keep_detached(removed.flight.take());
        drop(inner);
        drop(removed_key);
        removed.value.take()
    }

    /// Whether a flight for `key` is in progress. A flight detached by
    /// [`forget`](Self::forget) or [`set`](Self::set) no longer counts,
    /// though it still runs for its own callers.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// let pending = flights.run("k", || async { 1 });
    /// assert!(flights.is_in_flight("k")); // registered when called
    /// # futures::executor::block_on(pending);
    /// assert!(!flights.is_in_flight("k"));
    /// ```
    pub fn is_in_flight<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.inner.lock();
        inner.get(key).is_some_and(|s| s.flight.is_some())
    }

    /// How many followers wait on `key`'s flight in progress (0 if none;
    /// followers of a detached flight are not counted).
    ///
    /// Useful to release a gate once every expected caller has joined.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// let leader = flights.run("k", || async { 1 });
    /// let follower = flights.run("k", || async { 2 });
    /// assert_eq!(flights.waiters("k"), 1);
    /// drop(follower);
    /// assert_eq!(flights.waiters("k"), 0);
    /// # drop(leader);
    /// ```
    pub fn waiters<Q>(&self, key: &Q) -> usize
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.inner.lock();
        inner
            .get(key)
            .and_then(|slot| slot.flight.as_ref()?.shared().map(|f| f.waiters()))
            .unwrap_or(0)
    }

    /// Stores `value` for `key` directly, with a new epoch, and returns the
    /// epoch (for example after a login).
    ///
    /// A flight in progress is detached as by [`forget`](Self::forget): its
    /// callers get its result, which is not stored, so it cannot overwrite
    /// the newer value.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// let e1 = flights.set("k", 1);
    /// let e2 = flights.set("k", 2);
    /// assert!(e2 > e1);
    /// assert_eq!(flights.current("k").unwrap().value, 2);
    /// ```
    pub fn set(&self, key: K, value: T) -> Epoch {
        let (epoch, replaced) = self.replace(key, value);
        drop(replaced);
        epoch
    }

    /// [`set`](Self::set), returning the replaced value for the caller to
    /// drop outside its own locks.
    pub(crate) fn replace(&self, key: K, value: T) -> (Epoch, Option<Versioned<T>>) {
        let mut inner = self.inner.lock();
        let epoch = Epoch::from(inner.next_epoch());
        let stored = Versioned { value, epoch };
        let replaced = match inner.get_mut(&key) {
            Some((_, slot)) => {
                let cut_loose = slot.flight.take();
                let replaced = slot.value.replace(stored);
                inner.keep_detached(cut_loose);
                replaced
            }
            None => {
                let slot = Slot {
                    value: Some(stored),
                    flight: None,
                };
                inner.insert(key, slot);
                None
            }
        };
        drop(inner);
        (epoch, replaced)
    }

    /// The number of keys that hold a value or a flight in progress.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether no key holds a value or a flight in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The infallible forms, for work that cannot fail.
impl<K, T, S> SingleFlight<K, T, Infallible, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    S: BuildHasher,
{
    /// Runs `f` as the flight for `key`, or joins the flight in progress
    /// (Go's `singleflight.Do`). The result is stored as the key's latest
    /// value with a new epoch.
    ///
    /// The caller registers when this method is called; `f` is called on the
    /// first poll if this caller leads.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future of a follower withdraws it; the flight goes on.
    /// Dropping the future of the caller that is running the work while
    /// followers wait hands the work, as it is, to one of them, which
    /// continues polling it: the work is never restarted. With no follower
    /// left the work is dropped and the key is free.
    ///
    /// # Panics
    ///
    /// A panic in `f` or its future propagates to the caller polling it. The
    /// key is not poisoned: one waiting follower runs its own `f` instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Role, SingleFlight};
    ///
    /// # futures::executor::block_on(async {
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// let leader = flights.run("k", || async { 1 });
    /// let follower = flights.run("k", || async { 2 }); // joins: its closure never runs
    /// let (a, b) = futures::join!(leader, follower);
    /// assert_eq!((a.value, a.role), (1, Role::Led));
    /// assert_eq!((b.value, b.role, b.epoch), (1, Role::Joined, a.epoch));
    /// # });
    /// ```
    pub fn run<F, Fut>(&self, key: K, f: F) -> Call<'_, K, T, S, F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        Call::new(self.enter(key, Mode::Run, WaitKind::Async), f)
    }

    /// Runs `f` only if `seen` is still the key's latest epoch; otherwise
    /// returns the newer value with [`Role::Reused`](crate::Role::Reused)
    /// without running anything. See
    /// [`try_refresh_if_current`](Self::try_refresh_if_current).
    ///
    /// # Cancel safety
    ///
    /// As [`run`](Self::run).
    ///
    /// # Panics
    ///
    /// As [`run`](Self::run).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Epoch, Role, SingleFlight};
    ///
    /// # futures::executor::block_on(async {
    /// let flights: SingleFlight<(), u32> = SingleFlight::new();
    /// let first = flights.refresh_if_current((), Epoch::NONE, || async { 1 }).await;
    /// let stale = first.epoch;
    /// let fresh = flights.refresh_if_current((), stale, || async { 2 }).await;
    /// let late = flights.refresh_if_current((), stale, || async { 3 }).await;
    /// assert_eq!((fresh.value, late.value, late.role), (2, 2, Role::Reused));
    /// # });
    /// ```
    pub fn refresh_if_current<F, Fut>(&self, key: K, seen: Epoch, f: F) -> Call<'_, K, T, S, F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        Call::new(
            self.enter(key, Mode::RefreshIfCurrent(seen), WaitKind::Async),
            f,
        )
    }

    /// Blocking [`run`](Self::run).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread until the flight completes; see
    /// [`try_run_blocking`](Self::try_run_blocking).
    ///
    /// # Panics
    ///
    /// A panic in `f` propagates to this caller; one waiting follower runs
    /// its own closure instead.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new();
    /// std::thread::scope(|s| {
    ///     let a = s.spawn(|| flights.run_blocking("k", || 1).value);
    ///     let b = s.spawn(|| flights.run_blocking("k", || 1).value);
    ///     assert_eq!((a.join().unwrap(), b.join().unwrap()), (1, 1));
    /// });
    /// ```
    pub fn run_blocking<F>(&self, key: K, f: F) -> Outcome<T>
    where
        F: FnOnce() -> T,
    {
        unwrap_infallible(self.try_run_blocking(key, || Ok(f())))
    }

    /// Blocking [`refresh_if_current`](Self::refresh_if_current).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread until the flight completes; see
    /// [`try_run_blocking`](Self::try_run_blocking).
    ///
    /// # Panics
    ///
    /// As [`run_blocking`](Self::run_blocking).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::{Epoch, Role, SingleFlight};
    ///
    /// let flights: SingleFlight<(), u32> = SingleFlight::new();
    /// let v = flights.refresh_if_current_blocking((), Epoch::NONE, || 1);
    /// assert_eq!(v.role, Role::Led);
    /// let again = flights.refresh_if_current_blocking((), Epoch::NONE, || 2);
    /// assert_eq!((again.value, again.role), (1, Role::Reused));
    /// ```
    pub fn refresh_if_current_blocking<F>(&self, key: K, seen: Epoch, f: F) -> Outcome<T>
    where
        F: FnOnce() -> T,
    {
        unwrap_infallible(self.try_refresh_if_current_blocking(key, seen, || Ok(f())))
    }

    /// Infallible [`try_get`](Self::try_get): joins the flight in progress,
    /// else returns the stored value, else leads `f`.
    ///
    /// # Cancel safety
    ///
    /// As [`run`](Self::run).
    ///
    /// # Panics
    ///
    /// As [`run`](Self::run).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// # futures::executor::block_on(async {
    /// let config: SingleFlight<&str, String> = SingleFlight::new();
    /// let loaded = config.get("app", || async { "v1".to_string() }).await;
    /// assert_eq!(config.get("app", || async { "v2".to_string() }).await.value, loaded.value);
    /// # });
    /// ```
    pub fn get<F, Fut>(&self, key: K, f: F) -> Call<'_, K, T, S, F>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        Call::new(self.enter(key, Mode::Get, WaitKind::Async), f)
    }

    /// Blocking [`get`](Self::get).
    ///
    /// # Blocking
    ///
    /// Blocks the current thread while a flight is in progress; see
    /// [`try_run_blocking`](Self::try_run_blocking).
    ///
    /// # Panics
    ///
    /// As [`run_blocking`](Self::run_blocking).
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let config: SingleFlight<&str, u32> = SingleFlight::new();
    /// assert_eq!(config.get_blocking("app", || 1).value, 1);
    /// assert_eq!(config.get_blocking("app", || 2).value, 1);
    /// ```
    pub fn get_blocking<F>(&self, key: K, f: F) -> Outcome<T>
    where
        F: FnOnce() -> T,
    {
        unwrap_infallible(self.try_get_blocking(key, || Ok(f())))
    }
}

fn unwrap_infallible<T>(result: Result<T, Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}
