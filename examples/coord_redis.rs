//! Three processes share one credential through Redis: the token "expires"
//! in all of them at once, and exactly one refreshes; the others adopt its
//! token without refreshing.
//!
//! ```sh
//! redis-server --port 6390 --appendonly yes --appendfsync always --dir /tmp &
//! cargo run --example coord_redis --features redis -- redis://127.0.0.1:6390/
//! ```
//!
//! The program starts itself three times as a worker (`... URL worker N`).

use std::process::Command;
use std::time::Duration;

use epochflight::auth::coord::{
    ClaimOutcome, CoordConfig, Coordinator, Generation, RedisConfig, RedisStore, SharedCredential,
    Utf8Codec,
};

/// A worker's exit code when it made the refresh.
const REFRESHED: i32 = 10;

fn credential(url: &str) -> SharedCredential<String> {
    let config = RedisConfig::new(url).prefix("example").expect("prefix");
    let store = RedisStore::connect(config).unwrap_or_else(|e| {
        eprintln!("cannot use Redis at {url}: {e}");
        std::process::exit(2)
    });
    let lease = CoordConfig::new(Duration::from_secs(10)).expect("lease");
    Coordinator::new(store, Utf8Codec, lease)
        .credential("api")
        .expect("credential")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    match args.next().as_deref() {
        Some("worker") => {
            let n = args.next().expect("worker number");
            let held = args
                .next()
                .and_then(|g| g.parse().ok())
                .expect("generation");
            worker(&url, &n, Generation::new(held))
        }
        _ => parent(&url),
    }
}

fn parent(url: &str) {
    let shared = credential(url);
    let start = shared
        .sign_in_blocking(&"token-1".to_string(), None)
        .expect("sign in");
    println!("signed in: {} holds token-1", start.generation);
    let workers: Vec<_> = (1..=3)
        .map(|n| {
            Command::new(std::env::current_exe().expect("this program"))
                .args([
                    url,
                    "worker",
                    &n.to_string(),
                    &start.generation.get().to_string(),
                ])
                .spawn()
                .expect("start a worker")
        })
        .collect();
    let refreshes = workers
        .into_iter()
        .map(|mut w| w.wait().expect("worker"))
        .filter(|status| status.code() == Some(REFRESHED))
        .count();
    let end = shared.read_blocking().expect("read");
    println!(
        "3 processes, {refreshes} refresh; the fleet holds {} at {}",
        end.token.as_deref().unwrap_or("-"),
        end.generation
    );
    assert_eq!(refreshes, 1, "exactly one refresh");
}

/// The token of generation `held` expired here too: refresh it, unless
/// another process does (or did).
fn worker(url: &str, n: &str, held: Generation) {
    let shared = credential(url);
    match shared.claim_blocking(held).expect("claim") {
        ClaimOutcome::Claimed(claim) => {
            // POST the claim's refresh token to the token endpoint here.
            let stale = claim.token().cloned().unwrap_or_default();
            let fresh = format!("token-2 (refreshed by worker {n} from {stale})");
            let committed = shared.commit_blocking(claim, &fresh, None).expect("commit");
            println!("worker {n}: refreshed, {}", committed.generation());
            std::process::exit(REFRESHED);
        }
        ClaimOutcome::Newer(snapshot) => {
            println!(
                "worker {n}: adopted {} without refreshing",
                snapshot.generation
            );
        }
        ClaimOutcome::Busy(busy) => {
            let snapshot = shared
                .wait_blocking(&busy, Duration::from_secs(10))
                .expect("wait");
            println!(
                "worker {n}: waited, adopted {} without refreshing",
                snapshot.generation
            );
        }
    }
}
