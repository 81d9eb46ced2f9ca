//! Three processes share one credential through Redis, each with its own
//! `TokenManager`: the token "expires" in all of them at once (each refreshes
//! the token it holds), and exactly one calls its refresher; the others take
//! its token from the store without refreshing.
//!
//! ```sh
//! redis-server --port 6390 --appendonly yes --appendfsync always --dir /tmp &
//! cargo run --example coord_redis --features redis -- redis://127.0.0.1:6390/
//! ```
//!
//! The program starts itself three times as a worker (`... URL worker N`).

use std::process::Command;
use std::time::Duration;

use epochflight::auth::coord::{CoordConfig, Coordinator, RedisConfig, RedisStore, Utf8Codec};
use epochflight::auth::{RefreshError, TokenManager};

/// A worker's exit code when its refresher was called.
const REFRESHED: i32 = 10;

/// A manager of the credential `api` shared through Redis at `url`; its
/// refresher stands in for the token endpoint.
fn manager(url: &str, worker: &str) -> TokenManager<String, String> {
    let config = RedisConfig::new(url).prefix("example").expect("prefix");
    let store = RedisStore::connect(config).unwrap_or_else(|e| {
        eprintln!("cannot use Redis at {url}: {e}");
        std::process::exit(2)
    });
    // The refresher must finish well within the lease.
    let lease = CoordConfig::new(Duration::from_secs(10)).expect("lease");
    let shared = Coordinator::new(store, Utf8Codec, lease)
        .credential("api")
        .expect("credential");
    let worker = worker.to_owned();
    TokenManager::new_blocking(move |stale: Option<String>| {
        // POST the refresh token read from the store at the claim (`stale`)
        // to the token endpoint here.
        std::thread::sleep(Duration::from_millis(200));
        let stale = stale.ok_or(RefreshError::Rejected("no token".to_string()))?;
        Ok(format!(
            "token-2 (refreshed by worker {worker} from {stale})"
        ))
    })
    .with_coordinator(shared)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    match args.next().as_deref() {
        Some("worker") => worker(&url, &args.next().expect("worker number")),
        _ => parent(&url),
    }
}

fn parent(url: &str) {
    let manager = manager(url, "parent");
    // A login: the whole fleet is signed in with it.
    manager
        .sign_in_shared_blocking("token-1".to_string())
        .expect("sign in");
    println!("signed in: the fleet holds token-1");
    let workers: Vec<_> = (1..=3)
        .map(|n| {
            Command::new(std::env::current_exe().expect("this program"))
                .args([url, "worker", &n.to_string()])
                .spawn()
                .expect("start a worker")
        })
        .collect();
    let refreshes = workers
        .into_iter()
        .map(|mut w| w.wait().expect("worker"))
        .filter(|status| status.code() == Some(REFRESHED))
        .count();
    // The parent's token is stale too: it takes the fleet's, no refresh.
    let seen = manager.epoch();
    let end = manager.refresh_if_current_blocking(seen).expect("refresh");
    println!(
        "3 processes, {refreshes} refresh; the fleet holds {} (the parent adopted it: {} refresh call)",
        end.value,
        manager.stats().refresh_calls
    );
    assert_eq!(refreshes, 1, "exactly one refresh");
}

/// The token expired here too: refresh it, unless another process does (or
/// did).
fn worker(url: &str, n: &str) {
    let manager = manager(url, n);
    let token = manager.token_blocking().expect("token"); // token-1, from the store
    // The server answered 401 to `token`: refresh if it is still current.
    let fresh = manager
        .refresh_if_current_blocking(token.epoch)
        .expect("refresh");
    let stats = manager.stats();
    if stats.refresh_calls == 1 {
        println!("worker {n}: refreshed: {}", fresh.value);
        std::process::exit(REFRESHED);
    }
    println!("worker {n}: took the fleet's token without refreshing");
}
