//! The shared record of one credential and its state machine.
//!
//! This file is the reference for the protocol: the file store runs
//! [`transition`] under its record lock, and the Redis store's Lua script
//! (`coord.lua`) implements the same rules line for line, atomically on the
//! server with the server's clock. The conformance tests run one suite
//! against both.
//!
//! A record holds a generation `g`, the encoded token (with its expiry, in
//! the store's clock) and a state:
//!
//! ```text
//!            claim(g)                 commit(g) by the owner
//!   ready ───────────────▶ sending ─────────────────────────▶ ready (g+1)
//!     ▲                     │  │ lease runs out (or, file store: the
//!     │ cool-down over      │  │ holder's process is gone)
//!  cooling ◀────────────────┘  ▼
//!            transient       lost ── commit(g) by the same owner ──▶ ready (g+1)
//!                              └──── grace re-claim (once) ──▶ sending
//!   any ── sign_out, or reject(g) by the owner ──▶ signed_out (g+1)
//!   any ── sign_in ──▶ ready (g+1 or more)
//! ```
//!
//! `lost` and the end of a cool-down are not written: they follow from the
//! stored state and the clock, so no process has to be alive to make them
//! happen.

use std::fmt;

/// Milliseconds since the Unix epoch, in the store's clock.
pub(crate) type Millis = u64;

/// Encoded token bytes: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// Who claimed a generation: a random id per claim, so a holder's commit is
/// recognised and every other process's is fenced.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Owner(pub(crate) u128);

impl Owner {
    /// A fresh id, unique across processes and hosts for all practical
    /// purposes (std's randomly keyed hasher over the process id, the time and
    /// a counter; it is an identity, not a secret).
    pub(crate) fn new() -> Owner {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let half = |salt: u64| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt);
            h.write_u64(count);
            h.write_u32(std::process::id());
            h.write_u128(nanos);
            h.finish()
        };
        Owner((u128::from(half(1)) << 64) | u128::from(half(2)))
    }

    pub(crate) fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    pub(crate) fn from_hex(hex: &[u8]) -> Option<Owner> {
        if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let text = std::str::from_utf8(hex).ok()?;
        u128::from_str_radix(text, 16).ok().map(Owner)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// The claim in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) owner: Owner,
    pub(crate) claimed_at: Millis,
    pub(crate) lease_until: Millis,
    /// This claim is the one grace re-claim of its generation: no other.
    pub(crate) grace_reclaim: bool,
}

/// The state as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Ready,
    Sending(Holder),
    Cooling { until: Millis },
    SignedOut,
}

/// The state as it stands now: `lost` and the end of a cool-down follow
/// from the stored state and the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effective {
    Ready,
    Sending(Holder),
    Lost(Holder),
    Cooling { until: Millis },
    SignedOut,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) generation: u64,
    pub(crate) token: Option<Secret>,
    pub(crate) expires_at: Option<Millis>,
    pub(crate) state: Stored,
}

impl Record {
    /// What a credential that was never written reads as: generation 0, no
    /// token, ready (the first claim fetches a token with no stale one).
    pub(crate) fn absent() -> Record {
        Record {
            generation: 0,
            token: None,
            expires_at: None,
            state: Stored::Ready,
        }
    }

    /// `holder_alive`: whether the holder's process still holds its claim
    /// (the file store knows; Redis passes `true` and relies on the lease).
    pub(crate) fn effective(&self, now: Millis, holder_alive: bool) -> Effective {
        match self.state {
            Stored::Ready => Effective::Ready,
            Stored::Sending(h) if now >= h.lease_until || !holder_alive => Effective::Lost(h),
            Stored::Sending(h) => Effective::Sending(h),
            Stored::Cooling { until } if now >= until => Effective::Ready,
            Stored::Cooling { until } => Effective::Cooling { until },
            Stored::SignedOut => Effective::SignedOut,
        }
    }
}

/// An operation on a record. Durations are in milliseconds; expiries are
/// given as "expires in" and stored in the store's clock.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Read,
    Claim {
        seen: u64,
        owner: Owner,
        lease_ms: u64,
        grace_ms: u64,
    },
    Commit {
        generation: u64,
        owner: Owner,
        token: Secret,
        expires_in_ms: Option<u64>,
    },
    Reject {
        generation: u64,
        owner: Owner,
    },
    /// Also the release of an unused claim (`cooldown_ms == 0`).
    Transient {
        generation: u64,
        owner: Owner,
        cooldown_ms: u64,
    },
    SignIn {
        token: Secret,
        expires_in_ms: Option<u64>,
        min_generation: u64,
    },
    SignOut {
        min_generation: u64,
    },
    Seed {
        token: Secret,
        expires_in_ms: Option<u64>,
        min_generation: u64,
    },
    Reseed {
        generation: u64,
        token: Secret,
        expires_in_ms: Option<u64>,
    },
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl Op {
    /// The name the Lua script dispatches on (`ARGV[1]`).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Claim { .. } => "claim",
            Op::Commit { .. } => "commit",
            Op::Reject { .. } => "reject",
            Op::Transient { .. } => "transient",
            Op::SignIn { .. } => "sign_in",
            Op::SignOut { .. } => "sign_out",
            Op::Seed { .. } => "seed",
            Op::Reseed { .. } => "reseed",
        }
    }
}

/// What an operation decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Read, or a write that landed.
    Done,
    Claimed {
        grace: bool,
    },
    /// The store holds a newer generation than the one named.
    Newer,
    /// The store holds an older generation than the one named: data lost.
    Behind,
    Busy,
    Cooling,
    SignedOut,
    Lost,
    /// The caller does not hold the claim of this generation.
    Fenced,
    /// `seed`/`reseed` found a record it must not replace.
    Exists,
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl Verdict {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verdict::Done => "done",
            Verdict::Claimed { grace: false } => "claimed",
            Verdict::Claimed { grace: true } => "claimed-grace",
            Verdict::Newer => "newer",
            Verdict::Behind => "behind",
            Verdict::Busy => "busy",
            Verdict::Cooling => "cooling",
            Verdict::SignedOut => "signed-out",
            Verdict::Lost => "lost",
            Verdict::Fenced => "fenced",
            Verdict::Exists => "exists",
        }
    }

    pub(crate) fn parse(text: &[u8]) -> Option<Verdict> {
        [
            Verdict::Done,
            Verdict::Claimed { grace: false },
            Verdict::Claimed { grace: true },
            Verdict::Newer,
            Verdict::Behind,
            Verdict::Busy,
            Verdict::Cooling,
            Verdict::SignedOut,
            Verdict::Lost,
            Verdict::Fenced,
            Verdict::Exists,
        ]
        .into_iter()
        .find(|v| v.as_str().as_bytes() == text)
    }
}

#[cfg_attr(not(all(feature = "file-coordination", unix)), allow(dead_code))]
/// Applies `op` to `record` (`None`: never written) at store time `now`.
/// Returns the verdict and the record to write, if any.
pub(crate) fn transition(
    record: Option<&Record>,
    op: &Op,
    now: Millis,
    holder_alive: bool,
) -> (Verdict, Option<Record>) {
    let absent = Record::absent();
    let cur = record.unwrap_or(&absent);
    let g = cur.generation;
    let expiry = |expires_in: &Option<u64>| expires_in.map(|ms| now.saturating_add(ms));
    // The claim of generation `generation` is `owner`'s (live or lost).
    let holds = |generation: u64, owner: Owner| -> Result<(), Verdict> {
        if g > generation {
            return Err(Verdict::Newer);
        }
        if g < generation {
            return Err(Verdict::Behind);
        }
        match cur.state {
            Stored::Sending(h) if h.owner == owner => Ok(()),
            _ => Err(Verdict::Fenced),
        }
    };
    match op {
        Op::Read => (Verdict::Done, None),
        Op::Claim {
            seen,
            owner,
            lease_ms,
            grace_ms,
        } => {
            if g > *seen {
                return (Verdict::Newer, None);
            }
            if g < *seen {
                return (Verdict::Behind, None);
            }
            let sending = |grace_reclaim| Record {
                state: Stored::Sending(Holder {
                    owner: *owner,
                    claimed_at: now,
                    lease_until: now.saturating_add(*lease_ms),
                    grace_reclaim,
                }),
                ..cur.clone()
            };
            match cur.effective(now, holder_alive) {
                Effective::Ready => (Verdict::Claimed { grace: false }, Some(sending(false))),
                // The same claim again (a retry whose first reply was lost).
                Effective::Sending(h) if h.owner == *owner => (
                    Verdict::Claimed {
                        grace: h.grace_reclaim,
                    },
                    None,
                ),
                Effective::Sending(_) => (Verdict::Busy, None),
                Effective::Cooling { .. } => (Verdict::Cooling, None),
                Effective::SignedOut => (Verdict::SignedOut, None),
                Effective::Lost(h)
                    if *grace_ms > 0
                        && !h.grace_reclaim
                        && now < h.claimed_at.saturating_add(*grace_ms) =>
                {
                    (Verdict::Claimed { grace: true }, Some(sending(true)))
                }
                Effective::Lost(_) => (Verdict::Lost, None),
            }
        }
        Op::Commit {
            generation,
            owner,
            token,
            expires_in_ms,
        } => match holds(*generation, *owner) {
            // A newer generation is fencing too: the commit must not land.
            Err(Verdict::Newer) => (Verdict::Fenced, None),
            Err(verdict) => (verdict, None),
            Ok(()) => (
                Verdict::Done,
                Some(Record {
                    generation: g + 1,
                    token: Some(token.clone()),
                    expires_at: expiry(expires_in_ms),
                    state: Stored::Ready,
                }),
            ),
        },
        Op::Reject { generation, owner } => match holds(*generation, *owner) {
            Err(verdict) => (verdict, None),
            Ok(()) => (
                Verdict::SignedOut,
                Some(Record {
                    generation: g + 1,
                    token: None,
                    expires_at: None,
                    state: Stored::SignedOut,
                }),
            ),
        },
        Op::Transient {
            generation,
            owner,
            cooldown_ms,
        } => match holds(*generation, *owner) {
            Err(verdict) => (verdict, None),
            Ok(()) => {
                let state = match cur.state {
                    // The grace re-claim presented a refresh token the server
                    // had seen already: no attempt after it (lost at once).
                    Stored::Sending(h) if h.grace_reclaim => Stored::Sending(Holder {
                        lease_until: now,
                        ..h
                    }),
                    _ if *cooldown_ms == 0 => Stored::Ready,
                    _ => Stored::Cooling {
                        until: now.saturating_add(*cooldown_ms),
                    },
                };
                (
                    Verdict::Done,
                    Some(Record {
                        state,
                        ..cur.clone()
                    }),
                )
            }
        },
        Op::SignIn {
            token,
            expires_in_ms,
            min_generation,
        } => (
            Verdict::Done,
            Some(Record {
                generation: (g + 1).max(*min_generation),
                token: Some(token.clone()),
                expires_at: expiry(expires_in_ms),
                state: Stored::Ready,
            }),
        ),
        Op::SignOut { min_generation } => (
            Verdict::Done,
            Some(Record {
                generation: (g + 1).max(*min_generation),
                token: None,
                expires_at: None,
                state: Stored::SignedOut,
            }),
        ),
        Op::Seed {
            token,
            expires_in_ms,
            min_generation,
        } => match record {
            Some(_) => (Verdict::Exists, None),
            None => (
                Verdict::Done,
                Some(Record {
                    generation: (*min_generation).max(1),
                    token: Some(token.clone()),
                    expires_at: expiry(expires_in_ms),
                    state: Stored::Ready,
                }),
            ),
        },
        Op::Reseed {
            generation,
            token,
            expires_in_ms,
        } => {
            if g >= *generation {
                return (Verdict::Exists, None);
            }
            (
                Verdict::Done,
                Some(Record {
                    generation: *generation,
                    token: Some(token.clone()),
                    expires_at: expiry(expires_in_ms),
                    state: Stored::Ready,
                }),
            )
        }
    }
}

// ------------------------------------------------------------ the fields

/// What is wrong with a stored record (see [`super::Corruption`]).
pub(crate) use super::error::Corruption;

/// Every field a record may have, in the order they are written.
pub(crate) const FIELDS: [&str; 10] = ["v", "g", "st", "tok", "exp", "own", "at", "lu", "rg", "cu"];

/// The record format's version (field `v`).
const VERSION: &[u8] = b"1";

/// A field name as a static string, for error messages.
pub(crate) fn field_name(name: &[u8]) -> &'static str {
    FIELDS
        .into_iter()
        .find(|f| f.as_bytes() == name)
        .unwrap_or("unknown field")
}

/// Parses a non-negative decimal of at most 15 digits (exact in the Lua
/// script's doubles).
fn int(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

impl Record {
    /// The record as (field, value) pairs: the Redis hash, and the file
    /// format's body.
    #[cfg_attr(not(all(feature = "file-coordination", unix)), allow(dead_code))]
    pub(crate) fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let num = |n: u64| n.to_string().into_bytes();
        let mut fields = vec![
            ("v", VERSION.to_vec()),
            ("g", num(self.generation)),
            (
                "st",
                match self.state {
                    Stored::Ready => b"ready".to_vec(),
                    Stored::Sending(_) => b"sending".to_vec(),
                    Stored::Cooling { .. } => b"cooling".to_vec(),
                    Stored::SignedOut => b"signed_out".to_vec(),
                },
            ),
        ];
        if let Some(token) = &self.token {
            fields.push(("tok", token.0.clone()));
        }
        if let Some(exp) = self.expires_at {
            fields.push(("exp", num(exp)));
        }
        match self.state {
            Stored::Sending(h) => {
                fields.push(("own", h.owner.to_hex().into_bytes()));
                fields.push(("at", num(h.claimed_at)));
                fields.push(("lu", num(h.lease_until)));
                fields.push(("rg", if h.grace_reclaim { b"1" } else { b"0" }.to_vec()));
            }
            Stored::Cooling { until } => fields.push(("cu", num(until))),
            Stored::Ready | Stored::SignedOut => {}
        }
        fields
    }

    /// Parses and checks a record's fields (the same checks as the Lua
    /// script's `load`).
    pub(crate) fn from_fields<'a>(
        pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Record, Corruption> {
        let mut values: [Option<&[u8]>; FIELDS.len()] = [None; FIELDS.len()];
        for (name, value) in pairs {
            let index = FIELDS.iter().position(|f| f.as_bytes() == name).ok_or(
                Corruption::Undecodable {
                    field: field_name(name),
                },
            )?;
            if values[index].replace(value).is_some() {
                return Err(Corruption::Undecodable {
                    field: FIELDS[index],
                });
            }
        }
        let get = |name: &'static str| values[FIELDS.iter().position(|f| *f == name).unwrap()];
        let required =
            |name: &'static str| get(name).ok_or(Corruption::Truncated { missing: name });
        let number = |name: &'static str| {
            int(required(name)?).ok_or(Corruption::Undecodable { field: name })
        };
        if required("v")? != VERSION {
            return Err(Corruption::UnsupportedVersion);
        }
        let generation = number("g")?;
        let state_name = required("st")?;
        let expires_at = match get("exp") {
            None => None,
            Some(_) => Some(number("exp")?),
        };
        let state = match state_name {
            b"ready" => Stored::Ready,
            b"signed_out" => Stored::SignedOut,
            b"cooling" => Stored::Cooling {
                until: number("cu")?,
            },
            b"sending" => {
                let owner = Owner::from_hex(required("own")?)
                    .ok_or(Corruption::Undecodable { field: "own" })?;
                let grace_reclaim = match required("rg")? {
                    b"0" => false,
                    b"1" => true,
                    _ => return Err(Corruption::Undecodable { field: "rg" }),
                };
                Stored::Sending(Holder {
                    owner,
                    claimed_at: number("at")?,
                    lease_until: number("lu")?,
                    grace_reclaim,
                })
            }
            _ => return Err(Corruption::UnknownState),
        };
        // A field of another state is as wrong as a missing one.
        let allowed: &[&str] = match state {
            Stored::Sending(_) => &["own", "at", "lu", "rg"],
            Stored::Cooling { .. } => &["cu"],
            Stored::Ready | Stored::SignedOut => &[],
        };
        for name in ["own", "at", "lu", "rg", "cu"] {
            if get(name).is_some() && !allowed.contains(&name) {
                return Err(Corruption::Undecodable { field: name });
            }
        }
        Ok(Record {
            generation,
            token: get("tok").map(|t| Secret(t.to_vec())),
            expires_at,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(seen: u64, owner: Owner, grace_ms: u64) -> Op {
        Op::Claim {
            seen,
            owner,
            lease_ms: 1_000,
            grace_ms,
        }
    }

    fn commit(generation: u64, owner: Owner) -> Op {
        Op::Commit {
            generation,
            owner,
            token: Secret(b"new".to_vec()),
            expires_in_ms: Some(60_000),
        }
    }

    /// Applies `op` and keeps the written record.
    fn step(record: &mut Option<Record>, op: &Op, now: Millis) -> Verdict {
        let (verdict, write) = transition(record.as_ref(), op, now, true);
        if let Some(w) = write {
            *record = Some(w);
        }
        verdict
    }

    #[test]
    fn claim_commit_fences_everyone_else() {
        let (a, b) = (Owner::new(), Owner::new());
        assert_ne!(a, b);
        let mut r = None;
        assert_eq!(
            step(&mut r, &claim(0, a, 0), 10),
            Verdict::Claimed { grace: false }
        );
        assert_eq!(step(&mut r, &claim(0, b, 0), 11), Verdict::Busy);
        // A retried claim is the same claim, written once.
        assert_eq!(
            transition(r.as_ref(), &claim(0, a, 0), 11, true),
            (Verdict::Claimed { grace: false }, None)
        );
        assert_eq!(step(&mut r, &commit(0, b), 12), Verdict::Fenced);
        assert_eq!(step(&mut r, &commit(0, a), 13), Verdict::Done);
        let rec = r.clone().unwrap();
        assert_eq!(
            (rec.generation, rec.state, rec.expires_at),
            (1, Stored::Ready, Some(60_013))
        );
        // A stale claim or commit of generation 0 is answered with the newer one.
        assert_eq!(step(&mut r, &claim(0, b, 0), 14), Verdict::Newer);
        assert_eq!(step(&mut r, &commit(0, a), 15), Verdict::Fenced);
        assert_eq!(step(&mut r, &claim(5, b, 0), 16), Verdict::Behind);
    }

    #[test]
    fn lease_expiry_is_lost_and_the_holder_may_still_commit() {
        let (a, b) = (Owner::new(), Owner::new());
        let mut r = None;
        step(&mut r, &claim(0, a, 0), 0);
        assert_eq!(step(&mut r, &claim(0, b, 0), 999), Verdict::Busy);
        assert_eq!(step(&mut r, &claim(0, b, 0), 1_000), Verdict::Lost);
        assert_eq!(step(&mut r, &commit(0, b), 1_001), Verdict::Fenced);
        assert_eq!(step(&mut r, &commit(0, a), 5_000), Verdict::Done);
        assert_eq!(r.unwrap().generation, 1);
    }

    #[test]
    fn a_dead_holder_is_lost_at_once_when_the_store_knows() {
        let (a, b) = (Owner::new(), Owner::new());
        let mut r = None;
        step(&mut r, &claim(0, a, 0), 0);
        let (verdict, _) = transition(r.as_ref(), &claim(0, b, 0), 1, false);
        assert_eq!(verdict, Verdict::Lost);
    }

    #[test]
    fn one_grace_reclaim_then_the_old_holder_is_fenced() {
        let (a, b, c) = (Owner::new(), Owner::new(), Owner::new());
        let mut r = None;
        step(&mut r, &claim(0, a, 5_000), 0);
        assert_eq!(
            step(&mut r, &claim(0, b, 5_000), 1_500),
            Verdict::Claimed { grace: true }
        );
        assert_eq!(step(&mut r, &claim(0, c, 5_000), 1_600), Verdict::Busy);
        assert_eq!(step(&mut r, &commit(0, a), 1_700), Verdict::Fenced);
        // b's lease runs out too: no second grace.
        assert_eq!(step(&mut r, &claim(0, c, 5_000), 2_600), Verdict::Lost);
        assert_eq!(step(&mut r, &commit(0, b), 2_700), Verdict::Done);
    }

    #[test]
    fn a_failed_grace_reclaim_is_lost_at_once() {
        let (a, b, c) = (Owner::new(), Owner::new(), Owner::new());
        let mut r = None;
        step(&mut r, &claim(0, a, 5_000), 0);
        assert_eq!(
            step(&mut r, &claim(0, b, 5_000), 1_500),
            Verdict::Claimed { grace: true }
        );
        let transient = Op::Transient {
            generation: 0,
            owner: b,
            cooldown_ms: 0,
        };
        assert_eq!(step(&mut r, &transient, 1_600), Verdict::Done);
        assert_eq!(step(&mut r, &claim(0, c, 5_000), 1_600), Verdict::Lost);
    }

    #[test]
    fn grace_is_counted_from_the_lost_claim() {
        let (a, b) = (Owner::new(), Owner::new());
        let mut r = None;
        step(&mut r, &claim(0, a, 3_000), 0);
        assert_eq!(step(&mut r, &claim(0, b, 3_000), 3_000), Verdict::Lost);
    }

    #[test]
    fn reject_signs_out_transient_cools_down() {
        let a = Owner::new();
        let mut r = None;
        step(&mut r, &claim(0, a, 0), 0);
        let transient = Op::Transient {
            generation: 0,
            owner: a,
            cooldown_ms: 500,
        };
        assert_eq!(step(&mut r, &transient, 10), Verdict::Done);
        assert_eq!(step(&mut r, &claim(0, a, 0), 509), Verdict::Cooling);
        assert_eq!(
            step(&mut r, &claim(0, a, 0), 510),
            Verdict::Claimed { grace: false }
        );
        let reject = Op::Reject {
            generation: 0,
            owner: a,
        };
        assert_eq!(step(&mut r, &reject, 511), Verdict::SignedOut);
        let rec = r.clone().unwrap();
        assert_eq!(
            (rec.generation, rec.state, rec.token),
            (1, Stored::SignedOut, None)
        );
        assert_eq!(step(&mut r, &claim(1, a, 0), 512), Verdict::SignedOut);
    }

    #[test]
    fn sign_in_and_reseed_only_go_up() {
        let mut r = None;
        let sign_in = Op::SignIn {
            token: Secret(b"t".to_vec()),
            expires_in_ms: None,
            min_generation: 7,
        };
        step(&mut r, &sign_in, 0);
        assert_eq!(r.as_ref().unwrap().generation, 7);
        step(&mut r, &sign_in, 0);
        assert_eq!(r.as_ref().unwrap().generation, 8);
        let reseed = |generation| Op::Reseed {
            generation,
            token: Secret(b"r".to_vec()),
            expires_in_ms: None,
        };
        assert_eq!(step(&mut r, &reseed(8), 0), Verdict::Exists);
        assert_eq!(step(&mut r, &reseed(9), 0), Verdict::Done);
        let seed = Op::Seed {
            token: Secret(b"s".to_vec()),
            expires_in_ms: None,
            min_generation: 0,
        };
        assert_eq!(step(&mut r, &seed, 0), Verdict::Exists);
        assert_eq!(transition(None, &seed, 0, true).1.unwrap().generation, 1);
    }

    #[test]
    fn fields_round_trip_and_are_checked() {
        let rec = Record {
            generation: 42,
            token: Some(Secret(vec![0, 255, b'\n'])),
            expires_at: Some(123),
            state: Stored::Sending(Holder {
                owner: Owner::new(),
                claimed_at: 1,
                lease_until: 2,
                grace_reclaim: true,
            }),
        };
        let fields = rec.to_fields();
        let parse = |fields: &[(&str, Vec<u8>)]| {
            Record::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())))
        };
        assert_eq!(parse(&fields), Ok(rec));
        let without = |name| {
            fields
                .iter()
                .filter(|(k, _)| *k != name)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            parse(&without("lu")),
            Err(Corruption::Truncated { missing: "lu" })
        );
        assert_eq!(
            parse(&without("v")),
            Err(Corruption::Truncated { missing: "v" })
        );
        let with = |name, value: &[u8]| {
            let mut f = without(name);
            f.push((name, value.to_vec()));
            f
        };
        assert_eq!(parse(&with("st", b"flying")), Err(Corruption::UnknownState));
        assert_eq!(
            parse(&with("g", b"-1")),
            Err(Corruption::Undecodable { field: "g" })
        );
        assert_eq!(parse(&with("v", b"2")), Err(Corruption::UnsupportedVersion));
        assert_eq!(
            parse(&with("st", b"ready")),
            Err(Corruption::Undecodable { field: "own" })
        );
        let mut extra = fields.clone();
        extra.push(("zz", b"1".to_vec()));
        assert_eq!(
            parse(&extra),
            Err(Corruption::Undecodable {
                field: "unknown field"
            })
        );
    }

    #[test]
    fn debug_hides_token_bytes() {
        let rec = Record {
            token: Some(Secret(b"s3cr3t".to_vec())),
            ..Record::absent()
        };
        assert!(!format!("{rec:?}").contains("s3cr3t"));
    }
}
