//! [`SingleFlight`]: the public API. The map protocol is in `registry.rs`,
//! the life of a flight in `flight.rs`.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;

use crate::call::{Call, CallState, TryCall};
use crate::driver::finish_on_spawner;
use crate::epoch::{Epoch, Outcome, Stamped, Versioned};
use crate::flight::WaitKind;
use crate::registry::{Mode, Registry};
use crate::spawner::Spawner;
use crate::sync::StdArc;

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
/// # The work: `Send + 'static`
///
/// The future a closure returns must be `Send + 'static`: it may outlive the
/// caller that started it (a cancelled leader hands it to a follower, or to
/// the [spawner](Self::with_spawner)), so it cannot borrow from the caller's
/// stack. Move what it needs into it (`move || { let client = client.clone();
/// async move { .. } }`), or share it in an `Arc`. The closure itself runs
/// in place and may borrow.
///
/// # Liveness
///
/// Work runs only while a caller polls it, unless a
/// [spawner](Self::with_spawner) is set. A leader whose future is neither
/// polled nor dropped stalls its followers. A leader that is dropped hands
/// its work to a follower, which continues it; a leader whose work panics
/// lets a follower start over with its own closure.
///
/// Calls register with the key **when they are made**, not when first
/// polled: the returned future is the caller's place in the flight. Poll it
/// (or drop it) promptly.
///
/// # Locks and user code
///
/// User closures, futures, and drops of `T` and `E` never run while an
/// internal lock is held, so work may call back into the same `SingleFlight`.
/// Not into its own key's flight, though: work that waits for its own key's
/// flight waits for itself. Go deadlocks there; here a blocking twin that
/// would do so panics, and an async call made inside the work joins as a
/// follower that is never handed that work (if the work awaits it, it waits
/// forever, as in Go; if the work is cancelled, it is dropped, not kept).
///
/// The hasher runs before any lock is taken. `K`'s `Eq`, `Clone` and
/// `Drop`, and `T::clone` and `E::clone`, may run under a lock: keep them
/// cheap and do not call back into the same `SingleFlight` from them.
///
/// # Epochs
///
/// Epochs are issued per `SingleFlight`. An [`Epoch`] from another instance
/// is accepted without complaint and compared as a number: pass back only
/// epochs this instance gave you.
///
/// # Costs
///
/// One mutex guards the map; the hasher runs once per call, before it. A
/// flight nobody joins takes the lock twice (to start and to finish) and
/// allocates once: its work, boxed so that a cancelled leader can hand it
/// over. Stored values live in one table (the key, its hash, the value and
/// its epoch), probed once per call; flights in progress in a small one.
///
/// Readers don't queue: each reader thread keeps its own copy of the last
/// key it read twice in a row (a token, a config) and answers repeated
/// [`current`](Self::current), [`epoch`](Self::epoch) and reused calls from
/// it without the map lock, until the map changes; so two threads reading
/// one hot key go about twice as fast as one. That copy is dropped when the
/// slot is next filled, on [`forget`](Self::forget), and with the
/// `SingleFlight`.
///
/// A follower allocates nothing of its own: its waker waits in a slot of the
/// flight's list, and all of them are woken in one pass. As keys are
/// forgotten, the table of values shrinks on its own once it is a quarter
/// full; [`shrink_to_fit`](Self::shrink_to_fit) returns all spare memory at
/// once. `benches/README.md` has the measurements.
pub struct SingleFlight<K, T, E = Infallible, S = RandomState> {
    registry: StdArc<Registry<K, T, E, S>>,
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
            registry: StdArc::new(Registry::new(hasher)),
        }
    }

    /// Whether [`with_spawner`](Self::with_spawner) set a spawner.
    pub fn has_spawner(&self) -> bool {
        self.registry.has_spawner()
    }
}

impl<K, T, E, S> SingleFlight<K, T, E, S>
where
    K: Eq + Clone + Send + 'static,
    T: Clone + Send + 'static,
    E: Clone + Send + 'static,
    S: Send + Sync + 'static,
{
    /// Finishes abandoned work on `spawn`: when every caller of a flight has
    /// gone away (a timeout, a `select!`, a dropped request) after its work
    /// was first polled, the work is handed to `spawn` instead of being
    /// dropped, and its result is stored as if a caller had awaited it. A
    /// refresh whose request already reached the server then always lands.
    ///
    /// `spawn` gets a `Send + 'static` future and must run it to completion
    /// (`tokio::spawn`, `smol::spawn(..).detach()`, a thread with a
    /// `block_on`, …). It is called synchronously, in the drop of the last
    /// caller's future (so `tokio::spawn` finds its runtime), never with an
    /// internal lock held (it may call back into this `SingleFlight`).
    ///
    /// While the work finishes there, the flight is the key's: new callers
    /// join it ([`Role::Joined`](crate::Role::Joined)) and run nothing, and
    /// [`is_in_flight`](Self::is_in_flight) is true. `Ok` gets a new epoch and
    /// is stored; `Err` is stored nowhere; [`forget`](Self::forget) or
    /// [`set`](Self::set) meanwhile cut it loose as for any flight, so its
    /// result is not stored. A panic in it frees the key and reaches the
    /// spawned task; one joiner, if any, runs its own closure. If the executor
    /// drops the task unfinished (shutting down), its joiners take the work
    /// over, or the key is freed: nobody is left waiting, and it is not
    /// spawned again.
    ///
    /// Work never polled is dropped, not spawned; a cancelled leader that
    /// still has followers hands its work to one of them, as without a
    /// spawner. Without a spawner none of this costs anything.
    ///
    /// A task on the spawner keeps the map (every key's stored value) alive
    /// until it finishes, even after this `SingleFlight` is dropped; its
    /// result is then stored in a map nobody reads, and freed with it.
    ///
    /// # Panics
    ///
    /// If a flight of this `SingleFlight` is already on a spawner (only
    /// possible if a spawner was set before).
    ///
    /// # Examples
    ///
    /// On tokio:
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let flights: SingleFlight<&str, String> = SingleFlight::new().with_spawner(|task| {
    ///     tokio::spawn(task);
    /// });
    /// # let _ = flights;
    /// # });
    /// ```
    ///
    /// On smol:
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<&str, String> =
    ///     SingleFlight::new().with_spawner(|task| smol::spawn(task).detach());
    /// # let _ = flights;
    /// ```
    ///
    /// On a plain thread (any future that needs no runtime reactor). The
    /// only caller gives up after the work started; it finishes anyway:
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use epochflight::SingleFlight;
    /// use futures::channel::oneshot;
    ///
    /// let (finished, wait_finished) = mpsc::channel();
    /// let flights: SingleFlight<&str, u32> = SingleFlight::new().with_spawner(move |task| {
    ///     let finished = finished.clone();
    ///     std::thread::spawn(move || {
    ///         futures::executor::block_on(task);
    ///         finished.send(()).unwrap();
    ///     });
    /// });
    ///
    /// let (reply, response) = oneshot::channel();
    /// let mut call = flights.run("k", || async { response.await.unwrap() });
    /// let first_poll = futures::executor::block_on(async { futures::poll!(&mut call) });
    /// assert!(first_poll.is_pending());
    /// drop(call); // the caller times out: the work moves to the spawner
    /// assert!(flights.is_in_flight("k"));
    ///
    /// reply.send(7).unwrap(); // the server answers after all
    /// wait_finished.recv().unwrap();
    /// assert_eq!(flights.current("k").unwrap().value, 7);
    /// ```
    pub fn with_spawner<F>(mut self, spawn: F) -> Self
    where
        F: Fn(Pin<Box<dyn Future<Output = ()> + Send + 'static>>) + Send + Sync + 'static,
    {
        let registry = StdArc::get_mut(&mut self.registry)
            .expect("set the spawner before a flight of this SingleFlight is on a spawner");
        registry.set_spawner(Spawner::new(
            Box::new(spawn),
            finish_on_spawner::<K, T, E, S>,
        ));
        self
    }
}

impl<K, T, E, S: Default> Default for SingleFlight<K, T, E, S> {
    fn default() -> Self {
        Self::with_hasher(S::default())
    }
}

impl<K, T, E, S> fmt::Debug for SingleFlight<K, T, E, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.registry.fmt(f)
    }
}

impl<K, T, E, S> SingleFlight<K, T, E, S>
where
    K: Hash + Eq + Clone,
    T: Clone + 'static,
    E: Clone + 'static,
    S: BuildHasher,
{
    #[inline]
    fn call(&self, key: K, mode: Mode, kind: WaitKind) -> CallState<'_, K, T, E, S> {
        CallState::new(&self.registry, self.registry.enter(key, mode, kind), mode)
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
    /// continues polling it: the work is never restarted. If no follower
    /// remains, the work is dropped and the key is free, unless a spawner is
    /// set ([`with_spawner`](Self::with_spawner)): then work that was already
    /// polled finishes on it and its result is stored as if a caller had
    /// awaited it. Either way the dropped work's destructor finishes before
    /// another work for the key starts.
    ///
    /// # Panics
    ///
    /// A panic in `f` or its future propagates to the caller polling it. The
    /// key is not poisoned: one waiting follower runs its own `f` instead.
    ///
    /// A panic in `T::clone` or `E::clone` while the result is handed out
    /// reaches only the caller whose copy was being made: the result is
    /// stored and every follower gets it (a follower's own copy is made by
    /// that follower). Only if the two copies the driver makes (the stored one
    /// and the followers') both panic do the followers take the flight over
    /// as after a panic; they then find the stored value, except callers of
    /// [`try_run`](Self::try_run), which run their own `f`.
    ///
    /// A blocking twin called from inside this key's own work panics (it
    /// would wait for itself forever).
    ///
    /// # Errors
    ///
    /// The error of the flight this call led or joined: the same `E` (cloned)
    /// for its leader and every follower.
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
        TryCall::new(self.call(key, Mode::Run, WaitKind::Async), f)
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
    /// As [`try_run`](Self::try_run): a dropped follower withdraws; a dropped
    /// driver hands its work to a follower, which continues it, or, with no
    /// follower left, to the spawner if one is set; else the work is dropped.
    ///
    /// # Panics
    ///
    /// As [`try_run`](Self::try_run).
    ///
    /// # Errors
    ///
    /// The error of the flight this call led or joined.
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
        let mode = Mode::RefreshIfCurrent(seen);
        TryCall::new(self.call(key, mode, WaitKind::Async), f)
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
    /// its own closure instead. Panics if called from inside the work of this
    /// key's own flight, which it would wait for forever. As
    /// [`try_run`](Self::try_run) for panicking clones.
    ///
    /// # Errors
    ///
    /// The error of the flight this call led or joined.
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
        self.call(key, Mode::Run, WaitKind::Blocking).wait(f)
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
    /// # Errors
    ///
    /// The error of the flight this call led or joined.
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
        let mode = Mode::RefreshIfCurrent(seen);
        self.call(key, mode, WaitKind::Blocking).wait(f)
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
    /// # Errors
    ///
    /// The error of the flight this call led or joined.
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
        TryCall::new(self.call(key, Mode::Get, WaitKind::Async), f)
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
    /// # Errors
    ///
    /// The error of the flight this call led or joined.
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
        self.call(key, Mode::Get, WaitKind::Blocking).wait(f)
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
        self.registry
            .read(key, |stored| stored.map(Stamped::versioned))
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
        self.registry
            .read(key, |stored| stored.map_or(Epoch::NONE, |s| s.stamp.into()))
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
        self.registry.take(key)
    }

    /// Whether a flight for `key` is in progress. A flight cut loose by
    /// [`forget`](Self::forget) or [`set`](Self::set) no longer counts,
    /// though it still runs for its own callers; a flight finishing on the
    /// [spawner](Self::with_spawner) does.
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
        self.registry.flight_of(key).is_some()
    }

    /// How many followers wait on `key`'s flight in progress (0 if none;
    /// followers of a flight cut loose are not counted).
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
        self.registry.flight_of(key).unwrap_or(0)
    }

    /// Stores `value` for `key` directly, with a new epoch, and returns the
    /// epoch (for example after a login).
    ///
    /// A flight in progress is cut loose as by [`forget`](Self::forget): its
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
        self.registry.replace(key, value)
    }

    /// The number of keys that hold a value or a flight in progress.
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Whether no key holds a value or a flight in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the map's spare memory to the allocator now. (The table of
    /// values also shrinks on its own as keys are forgotten, once it is a
    /// quarter full; this returns the rest.)
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::SingleFlight;
    ///
    /// let flights: SingleFlight<u32, u32> = SingleFlight::new();
    /// for k in 0..10_000 {
    ///     flights.set(k, k);
    /// }
    /// for k in 0..10_000 {
    ///     flights.forget(&k);
    /// }
    /// flights.shrink_to_fit();
    /// assert!(flights.is_empty());
    /// ```
    pub fn shrink_to_fit(&self) {
        self.registry.shrink_to_fit();
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
    /// As [`try_run`](Self::try_run): a dropped follower withdraws; a dropped
    /// driver hands its work, as it is, to a follower, which continues it;
    /// with no follower left, to the spawner if one is set, else the work is
    /// dropped and the key is free.
    ///
    /// # Panics
    ///
    /// A panic in `f` or its future propagates to the caller polling it. The
    /// key is not poisoned: one waiting follower runs its own `f` instead.
    /// As [`try_run`](Self::try_run) for panicking clones.
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
        Call::new(self.call(key, Mode::Run, WaitKind::Async), f)
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
        let mode = Mode::RefreshIfCurrent(seen);
        Call::new(self.call(key, mode, WaitKind::Async), f)
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
    /// its own closure instead. As
    /// [`try_run_blocking`](Self::try_run_blocking) otherwise.
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
        Call::new(self.call(key, Mode::Get, WaitKind::Async), f)
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
