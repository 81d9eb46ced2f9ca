//! I1 (one flight): concurrent callers of one key run the user work once.
#![cfg(loom)]

use epochflight::{Epoch, Role};
use epochflight_loom_tests::{Counter, K, Sf, check, pending_times};
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;

/// I1 with get-or-create: three callers (the main thread and two spawned
/// threads) call `refresh_if_current(K, Epoch::NONE, _)` on an empty map at
/// once. In every interleaving the work runs exactly once, exactly one caller
/// reports `Led`, the others `Joined` (arrived while it ran) or `Reused`
/// (arrived after it finished), and all three hold the same value and epoch.
/// Covers every order of registration (the map lock), waker registration
/// and completion.
#[test]
fn three_callers_get_or_create_run_the_work_once() {
    check("I1 get-or-create x3", None, || {
        let sf = Arc::new(Sf::new());
        let starts = Counter::new();
        let call = {
            let (sf, starts) = (sf.clone(), starts.clone());
            move || {
                block_on(sf.refresh_if_current(K, Epoch::NONE, || {
                    let n = starts.bump() as u32;
                    async move { n }
                }))
            }
        };
        let a = thread::spawn(call.clone());
        let b = thread::spawn(call.clone());
        let c = call();
        let outcomes = [a.join().unwrap(), b.join().unwrap(), c];

        assert_eq!(starts.get(), 1, "the work ran more than once");
        let led = outcomes.iter().filter(|o| o.role == Role::Led).count();
        assert_eq!(led, 1, "{outcomes:?}");
        for o in &outcomes {
            assert_eq!((o.value, o.epoch), (1, outcomes[0].epoch), "{outcomes:?}");
        }
        assert_eq!(sf.epoch(&K), outcomes[0].epoch);
        assert!(!sf.is_in_flight(&K));
        assert_eq!(sf.len(), 1);
    });
}

/// I1 with `run` (Go's `Do`): two callers race; the work needs two polls
/// (it is `Pending` once), so the second caller can arrive while it is in
/// progress. While one flight's work is in progress no other flight's work
/// starts (an "active" counter inside the work is never above 1). Either the
/// second caller joined (one start, same value and epoch, roles Led/Joined),
/// or it arrived after completion and led its own flight (two starts, two
/// different epochs, both Led).
#[test]
fn two_runs_never_overlap_their_work() {
    check("I1 run x2", None, || {
        let sf = Arc::new(Sf::new());
        let starts = Counter::new();
        let active = Counter::new();
        let call = {
            let (sf, starts, active) = (sf.clone(), starts.clone(), active.clone());
            move || {
                block_on(sf.run(K, || {
                    let n = starts.bump() as u32;
                    async move {
                        assert_eq!(active.bump(), 1, "two flights' work in progress at once");
                        pending_times(1).await;
                        active.drop_one();
                        n
                    }
                }))
            }
        };
        let other = thread::spawn(call.clone());
        let mine = call();
        let theirs = other.join().unwrap();

        match (mine.role, theirs.role) {
            (Role::Led, Role::Led) => {
                assert_eq!(starts.get(), 2);
                assert_ne!(mine.epoch, theirs.epoch);
                assert_ne!(mine.value, theirs.value);
            }
            (Role::Led, Role::Joined) | (Role::Joined, Role::Led) => {
                assert_eq!(starts.get(), 1);
                assert_eq!((mine.value, mine.epoch), (theirs.value, theirs.epoch));
            }
            roles => panic!("unexpected roles {roles:?}"),
        }
        assert_eq!(sf.epoch(&K), mine.epoch.max(theirs.epoch));
        assert!(!sf.is_in_flight(&K));
    });
}
