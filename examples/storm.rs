//! A 401 storm, three ways, against a real HTTP server on loopback.
//!
//! The embedded server behaves as real authorization servers do: it issues
//! access tokens and *rotating* refresh tokens with reuse detection
//! (presenting a refresh token that was already used revokes the whole
//! session, OAuth 2.1, RFC 9700 §4.14), and a refresh ends the access tokens
//! issued before it. Requests take a while to reach the API and their 401s a
//! while to come back (network latency), so some requests sent with the old
//! token are rejected after the first refresh finished: late 401s.
//!
//! Each client sends the same storm of requests with an expired token:
//!
//! - **naive retry**: on 401, refresh and retry. Every 401 refreshes.
//! - **isRefreshing flag**: concurrent 401s share one refresh (the usual
//!   fix: a flag and a queue, or RxJS `shareReplay`), but a late 401, arriving
//!   after the refresh finished, starts another. That refresh ends the access
//!   token the other requests were just retried with: their retries fail.
//! - **epochflight**: `TokenManager::send` refreshes only if the token the
//!   request used is still current; late 401s get the newer token.
//!
//! Run: `cargo run --example storm` (no set-up; a few seconds).

#[path = "../tests/support/server.rs"]
mod server;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epochflight::auth::{RefreshError, TokenManager, Unauthorized};
use futures::future::{FutureExt, Shared};
use server::{ServerConfig, TestServer};

const REQUESTS: usize = 200;
/// Requests are sent over this long, so that some go out after the first 401
/// came back and some only after the first refresh finished.
const SPREAD: Duration = Duration::from_millis(120);
const REFRESH_LATENCY: Duration = Duration::from_millis(30);
/// How long a request takes to reach the API, and a 401 to come back.
const UPLINK: Duration = Duration::from_millis(50);
const LATE_401: Duration = Duration::from_millis(40);

#[derive(Clone, Debug)]
struct Tokens {
    access: String,
    refresh: String,
}

/// One HTTP response, as the clients see it.
struct Response {
    status: u16,
}

impl Unauthorized for Response {
    fn is_unauthorized(&self) -> bool {
        self.status == 401
    }
}

/// `POST /token` with the refresh token: the client side of rotation.
async fn refresh_call(
    http: &reqwest::Client,
    url: &str,
    refresh: &str,
) -> Result<Tokens, RefreshError<String>> {
    let body = format!("grant_type=refresh_token&refresh_token={refresh}");
    let response = http
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| RefreshError::Transient(e.to_string()))?;
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .map_err(|e| RefreshError::Transient(e.to_string()))?;
    match status {
        200 => Ok(Tokens {
            access: json_field(&text, "access_token"),
            refresh: json_field(&text, "refresh_token"),
        }),
        400..=499 => Err(RefreshError::Rejected(text)),
        _ => Err(RefreshError::Transient(text)),
    }
}

/// `GET url` with `access`, after the network latency to the API.
async fn get(http: &reqwest::Client, url: &str, access: &str) -> Response {
    tokio::time::sleep(UPLINK).await;
    match http.get(url).bearer_auth(access).send().await {
        Ok(r) => Response {
            status: r.status().as_u16(),
        },
        Err(_) => Response { status: 0 },
    }
}

/// Naive: on 401, refresh with the refresh token we have, retry once.
struct Naive {
    http: reqwest::Client,
    tokens: Mutex<Tokens>,
    token_url: String,
}

impl Naive {
    async fn request(&self, url: &str) -> Response {
        let tokens = self.tokens.lock().unwrap().clone();
        let first = get(&self.http, url, &tokens.access).await;
        if first.status != 401 {
            return first;
        }
        let latest = self.tokens.lock().unwrap().refresh.clone();
        match refresh_call(&self.http, &self.token_url, &latest).await {
            Ok(new) => {
                *self.tokens.lock().unwrap() = new.clone();
                get(&self.http, url, &new.access).await
            }
            Err(_) => first,
        }
    }
}

type SharedRefresh =
    Shared<Pin<Box<dyn Future<Output = Result<Tokens, RefreshError<String>>> + Send>>>;

/// The usual fix: while a refresh is in flight, 401s wait for it instead of
/// starting their own. Once it finished, the next 401 starts a new one.
struct Flag {
    http: reqwest::Client,
    tokens: Mutex<Tokens>,
    refreshing: Mutex<Option<SharedRefresh>>,
    token_url: String,
}

impl Flag {
    async fn request(self: &Arc<Self>, url: &str) -> Response {
        let tokens = self.tokens.lock().unwrap().clone();
        let first = get(&self.http, url, &tokens.access).await;
        if first.status != 401 {
            return first;
        }
        let refresh = {
            let mut refreshing = self.refreshing.lock().unwrap();
            refreshing
                .get_or_insert_with(|| {
                    let this = self.clone();
                    let latest = self.tokens.lock().unwrap().refresh.clone();
                    let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                        let result = refresh_call(&this.http, &this.token_url, &latest).await;
                        if let Ok(new) = &result {
                            *this.tokens.lock().unwrap() = new.clone();
                        }
                        *this.refreshing.lock().unwrap() = None; // "isRefreshing = false"
                        result
                    });
                    fut.shared()
                })
                .clone()
        };
        match refresh.await {
            Ok(new) => get(&self.http, url, &new.access).await,
            Err(_) => first,
        }
    }
}

struct Row {
    client: &'static str,
    ok: usize,
    failed: usize,
    /// 401s the server answered (each made the client refresh or wait).
    unauthorized: u64,
    refresh_calls: u64,
    reuse_detected: u64,
    elapsed: Duration,
}

/// A fresh server with an expired session, and its resource URL.
fn expired_server() -> (TestServer, Tokens) {
    let server = TestServer::start(ServerConfig {
        refresh_latency: REFRESH_LATENCY,
        unauthorized_delay: LATE_401,
        // Real servers end the old access token when they rotate.
        revoke_old_access_on_refresh: true,
        ..ServerConfig::default()
    });
    let (access, refresh) = server.initial_tokens();
    server.expire_access_tokens();
    (server, Tokens { access, refresh })
}

/// Sends the storm: request `i` leaves at `i * SPREAD / REQUESTS`.
async fn storm<F, Fut>(send: F) -> (usize, usize, Duration)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Response> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let request = send(i);
            tokio::spawn(async move {
                tokio::time::sleep(SPREAD * i as u32 / REQUESTS as u32).await;
                request.await
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await.expect("request task").status == 200 {
            ok += 1;
        }
    }
    (ok, REQUESTS - ok, started.elapsed())
}

async fn run_naive(http: &reqwest::Client) -> Row {
    let (server, tokens) = expired_server();
    let client = Arc::new(Naive {
        http: http.clone(),
        tokens: Mutex::new(tokens),
        token_url: server.url("/token"),
    });
    let url = server.url("/resource");
    let (ok, failed, elapsed) = storm(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move { client.request(&url).await }
    })
    .await;
    row("naive retry", &server, ok, failed, elapsed)
}

async fn run_flag(http: &reqwest::Client) -> Row {
    let (server, tokens) = expired_server();
    let client = Arc::new(Flag {
        http: http.clone(),
        tokens: Mutex::new(tokens),
        refreshing: Mutex::new(None),
        token_url: server.url("/token"),
    });
    let url = server.url("/resource");
    let (ok, failed, elapsed) = storm(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move { client.request(&url).await }
    })
    .await;
    row("isRefreshing flag", &server, ok, failed, elapsed)
}

async fn run_epochflight(http: &reqwest::Client) -> Row {
    let (server, tokens) = expired_server();
    let token_url = server.url("/token");
    let refresher_http = http.clone();
    let manager = Arc::new(TokenManager::with_token(
        move |stale: Option<Tokens>| {
            let (http, url) = (refresher_http.clone(), token_url.clone());
            async move {
                let stale = stale.expect("signed in with a token");
                refresh_call(&http, &url, &stale.refresh).await
            }
        },
        tokens,
    ));
    let url = server.url("/resource");
    let (ok, failed, elapsed) = storm(|_| {
        let (manager, http, url) = (manager.clone(), http.clone(), url.clone());
        async move {
            let sent = manager.send(|tokens| {
                let (http, url) = (http.clone(), url.clone());
                async move { get(&http, &url, &tokens.access).await }
            });
            sent.await.unwrap_or(Response { status: 0 })
        }
    })
    .await;
    assert_eq!(manager.stats().refresh_calls, server.refresh_calls());
    row("epochflight", &server, ok, failed, elapsed)
}

fn row(
    client: &'static str,
    server: &TestServer,
    ok: usize,
    failed: usize,
    elapsed: Duration,
) -> Row {
    Row {
        client,
        ok,
        failed,
        unauthorized: server.resource_unauthorized(),
        refresh_calls: server.refresh_calls(),
        reuse_detected: server.reuse_detections(),
        elapsed,
    }
}

#[tokio::main]
async fn main() {
    let http = reqwest::Client::new();
    println!(
        "{REQUESTS} requests with an expired token, sent over {SPREAD:?}; a request takes \
         {UPLINK:?} to reach the API, a 401 {LATE_401:?} more to come back; a refresh takes \
         {REFRESH_LATENCY:?}.\nThe server rotates refresh tokens, revokes the session on \
         reuse, and ends the old access tokens at each refresh.\n"
    );
    let rows = [
        run_naive(&http).await,
        run_flag(&http).await,
        run_epochflight(&http).await,
    ];
    println!(
        "{:<18} {:>8} {:>6} {:>7} {:>6} {:>14} {:>15} {:>9}",
        "client", "requests", "ok", "failed", "401s", "refresh calls", "reuse detected", "time"
    );
    for r in &rows {
        println!(
            "{:<18} {:>8} {:>6} {:>7} {:>6} {:>14} {:>15} {:>7}ms",
            r.client,
            REQUESTS,
            r.ok,
            r.failed,
            r.unauthorized,
            r.refresh_calls,
            r.reuse_detected,
            r.elapsed.as_millis()
        );
    }
    let (naive, flag, ours) = (&rows[0], &rows[1], &rows[2]);
    println!(
        "\nnaive retry: every 401 refreshed; the second refresh presented a used refresh \
         token and the server revoked the session: {} failed.",
        naive.failed
    );
    println!(
        "isRefreshing flag: late 401s started {} more refresh(es) after the first; each ended \
         the access token that requests had just been retried with: {} failed.",
        flag.refresh_calls.saturating_sub(1),
        flag.failed
    );
    println!(
        "epochflight: {} refresh for {} 401s (late ones took the new token), {} reuse \
         detections, {} failures.",
        ours.refresh_calls, ours.unauthorized, ours.reuse_detected, ours.failed
    );
    assert_eq!(
        (ours.refresh_calls, ours.reuse_detected, ours.failed),
        (1, 0, 0)
    );
}

/// The string value of `"field":"..."` in a flat JSON object.
fn json_field(json: &str, field: &str) -> String {
    let key = format!("\"{field}\":\"");
    let start = json.find(&key).map(|i| i + key.len()).unwrap_or(json.len());
    let end = json[start..].find('"').map_or(json.len(), |i| start + i);
    json[start..end].to_string()
}
