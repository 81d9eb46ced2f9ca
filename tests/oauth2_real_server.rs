//! The OAuth 2 refresher (`auth::oauth2`) against a real authorization
//! server: django-oauth-toolkit with refresh-token rotation, reuse
//! protection (a used refresh token presented again revokes the whole
//! family) and no grace period (tests/oauth_server/server.py, started by
//! tests/support/oauth_server.rs).
//!
//! Every scenario runs through three clients: reqwest with `AuthMiddleware`,
//! hyper-util's client behind the tower `AuthLayer`, and ureq from 8 threads
//! through `UreqAuthMiddleware`'s agent; the three tenants share one keyed
//! manager, which picks each request's credential from its URL. Counts come from the server's own
//! counters. Nothing is ordered by sleeping: the server expires tokens on
//! request, holds the 401 answers it is told to hold and says when its
//! counters reach a value; every wait fails loudly after a deadline.

mod common;
#[path = "support/oauth_server.rs"]
mod oauth_server;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use epochflight::auth::oauth2::{
    AuthType, OAuth2Error, OAuth2Refresher, OAuth2Token, ReqwestClient, Scope, UreqAgent,
};
use epochflight::auth::{
    AuthAgent, AuthError, AuthLayer, AuthMiddleware, AuthService, RefreshError,
};
use epochflight::auth::{ReplayBuffered, ServiceError, TokenManager, UreqAuthMiddleware};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use oauth_server::{AuthServer, Counters, Tenant, WAIT};
use reqwest_middleware::ClientWithMiddleware;
use tower::{Layer, ServiceExt};

use common::with_timeout;

type Manager<K = ()> = Arc<TokenManager<OAuth2Token, OAuth2Error, K>>;
type Hyper = HyperClient<HttpConnector, Full<Bytes>>;

/// Threads of the blocking (ureq) client.
const THREADS: usize = 8;

/// The clients under test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// reqwest 0.13 + `AuthMiddleware`, refresher over `ReqwestClient`.
    Reqwest,
    /// hyper-util's client behind `AuthLayer`, refresher over `ReqwestClient`.
    Tower,
    /// ureq 3 from 8 threads through `UreqAuthMiddleware`'s agent, blocking
    /// refresher over `UreqAgent`.
    Ureq,
}

/// What one request came back with (`Failed`: the client's own error, shown
/// when an assertion fails).
#[derive(Debug)]
enum Outcome {
    Status(u16),
    Auth(AuthError<OAuth2Error>),
    Failed(#[allow(dead_code)] String),
}

impl Outcome {
    fn is_ok(&self) -> bool {
        matches!(self, Outcome::Status(200))
    }
}

enum Api<K = ()> {
    Reqwest(ClientWithMiddleware),
    Tower(AuthService<Hyper, OAuth2Token, OAuth2Error, ReplayBuffered, K>),
    Ureq(AuthAgent),
}

/// One client: a manager signed in with the logins of its tenants (one, or
/// several through a keyed manager), the HTTP client around it, and a
/// runtime for the async ones.
struct Subject<K = ()> {
    kind: Kind,
    manager: Manager<K>,
    api: Arc<Api<K>>,
    url: String,
    runtime: tokio::runtime::Runtime,
}

/// Requests in flight: async tasks, or the ureq threads' results.
enum Wave {
    Tasks(Vec<tokio::task::JoinHandle<Outcome>>),
    Threads(mpsc::Receiver<Vec<Outcome>>, usize),
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn token_client() -> ReqwestClient {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .expect("reqwest client");
    ReqwestClient::new(client)
}

fn ureq_config() -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder()
        // Statuses as responses: the middleware then classifies a 401 by
        // its challenge (with ureq's default it sees every 401 alike).
        .http_status_as_error(false)
        .timeout_global(Some(WAIT))
}

fn ureq_agent() -> ureq::Agent {
    ureq_config().build().into()
}

/// The tenant a request is for: its URL is `/api/<tenant>/resource`.
fn tenant_of(path: &str) -> String {
    let tenant = path
        .strip_prefix("/api/")
        .and_then(|rest| rest.split('/').next());
    tenant.expect("a tenant's resource URL").to_string()
}

impl Subject {
    fn new(kind: Kind, tenant: &Tenant) -> Subject {
        // Between them, the three exercise both ways of client
        // authentication and a narrower scope on refresh.
        let manager = Arc::new(match kind {
            Kind::Reqwest => tenant.refresher(token_client()).manager(),
            Kind::Tower => tenant
                .refresher(token_client())
                .scopes([Scope::new("read".into())])
                .manager(),
            Kind::Ureq => tenant
                .refresher(UreqAgent::new(ureq_agent()))
                .auth_type(AuthType::RequestBody)
                .blocking_manager(),
        });
        manager.sign_in(tenant.login());
        let runtime = runtime();
        let api = match kind {
            Kind::Reqwest => Api::Reqwest(
                reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
                    .with(AuthMiddleware::new(manager.clone()))
                    .build(),
            ),
            Kind::Tower => {
                let hyper: Hyper = {
                    let _entered = runtime.enter();
                    HyperClient::builder(TokioExecutor::new()).build_http()
                };
                Api::Tower(AuthLayer::new(manager.clone()).layer(hyper))
            }
            Kind::Ureq => {
                Api::Ureq(UreqAuthMiddleware::new(manager.clone()).build_agent(ureq_config()))
            }
        };
        Subject {
            kind,
            manager,
            api: Arc::new(api),
            url: tenant.resource_url(),
            runtime,
        }
    }
}

impl Subject<String> {
    /// One keyed manager for `tenants` (the key is the tenant's name), and a
    /// client that picks each request's credential from its URL.
    fn keyed(kind: Kind, tenants: &[Tenant]) -> Subject<String> {
        fn by_name<C>(
            tenants: &[Tenant],
            http: impl Fn() -> C,
        ) -> Arc<HashMap<String, OAuth2Refresher<C>>> {
            let refreshers = tenants
                .iter()
                .map(|t| (t.name.clone(), t.refresher(http())));
            Arc::new(refreshers.collect())
        }
        let manager = Arc::new(match kind {
            Kind::Reqwest | Kind::Tower => {
                let refreshers = by_name(tenants, token_client);
                TokenManager::keyed(move |tenant: String, stale: Option<OAuth2Token>| {
                    let refreshers = refreshers.clone();
                    async move { refreshers[&tenant].refresh(stale.as_ref()).await }
                })
            }
            Kind::Ureq => {
                let refreshers = by_name(tenants, || UreqAgent::new(ureq_agent()));
                TokenManager::keyed_blocking(move |tenant: String, stale: Option<OAuth2Token>| {
                    refreshers[&tenant].refresh_blocking(stale.as_ref())
                })
            }
        });
        for tenant in tenants {
            manager.for_key(&tenant.name).sign_in(tenant.login());
        }
        let runtime = runtime();
        let api = match kind {
            Kind::Reqwest => Api::Reqwest(
                reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
                    .with(AuthMiddleware::keyed(manager.clone(), |request, _| {
                        tenant_of(request.url().path())
                    }))
                    .build(),
            ),
            Kind::Tower => {
                let hyper: Hyper = {
                    let _entered = runtime.enter();
                    HyperClient::builder(TokioExecutor::new()).build_http()
                };
                let select = |head: &http::request::Parts| tenant_of(head.uri.path());
                Api::Tower(AuthLayer::keyed(manager.clone(), select).layer(hyper))
            }
            Kind::Ureq => {
                let select = |head: &http::request::Parts| tenant_of(head.uri.path());
                let middleware = UreqAuthMiddleware::keyed(manager.clone(), select);
                Api::Ureq(middleware.build_agent(ureq_config()))
            }
        };
        Subject {
            kind,
            manager,
            api: Arc::new(api),
            url: tenants[0].resource_url(),
            runtime,
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Subject<K> {
    /// How many of `n` requests are in flight at once.
    fn concurrency(&self, n: usize) -> usize {
        match self.kind {
            Kind::Ureq => n.min(THREADS),
            Kind::Reqwest | Kind::Tower => n,
        }
    }

    /// Starts `n` requests to the tenant's resource: all at once for the
    /// async clients, spread over 8 threads for ureq.
    fn fire(&self, n: usize) -> Wave {
        self.fire_at(&self.url, n)
    }

    /// Starts `n` requests to `url`.
    fn fire_at(&self, url: &str, n: usize) -> Wave {
        match &*self.api {
            Api::Ureq(_) => {
                let (done, results) = mpsc::channel();
                let threads = self.concurrency(n);
                for thread in 0..threads {
                    let (api, url) = (self.api.clone(), url.to_string());
                    let done = done.clone();
                    let mine = (thread..n).step_by(threads).count();
                    std::thread::spawn(move || {
                        let Api::Ureq(agent) = &*api else {
                            unreachable!()
                        };
                        let outcomes = (0..mine).map(|_| ureq_get(agent, &url)).collect();
                        let _ = done.send(outcomes);
                    });
                }
                Wave::Threads(results, threads)
            }
            Api::Reqwest(_) | Api::Tower(_) => Wave::Tasks(
                (0..n)
                    .map(|_| {
                        let (api, url) = (self.api.clone(), url.to_string());
                        self.runtime
                            .spawn(async move { async_get(&api, &url).await })
                    })
                    .collect(),
            ),
        }
    }

    /// Every outcome of `wave`; fails loudly if it is not done within [`WAIT`].
    fn join(&self, wave: Wave) -> Vec<Outcome> {
        let deadline = Instant::now() + WAIT;
        match wave {
            Wave::Tasks(tasks) => self.runtime.block_on(async {
                let all = futures::future::join_all(tasks);
                let joined = tokio::time::timeout(WAIT, all).await.unwrap_or_else(|_| {
                    panic!("{:?}: requests not done within {WAIT:?}", self.kind)
                });
                joined
                    .into_iter()
                    .map(|r| r.expect("request task"))
                    .collect()
            }),
            Wave::Threads(results, threads) => (0..threads)
                .flat_map(|_| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    results
                        .recv_timeout(left)
                        .unwrap_or_else(|_| panic!("ureq threads not done within {WAIT:?}"))
                })
                .collect(),
        }
    }

    fn run(&self, n: usize) -> Vec<Outcome> {
        let wave = self.fire(n);
        self.join(wave)
    }
}

async fn async_get<K: Hash + Eq + Clone + Send + Sync + 'static>(
    api: &Api<K>,
    url: &str,
) -> Outcome {
    match api {
        Api::Reqwest(client) => match client.get(url).send().await {
            Ok(response) => Outcome::Status(response.status().as_u16()),
            Err(reqwest_middleware::Error::Middleware(error)) => {
                match error.downcast::<AuthError<OAuth2Error>>() {
                    Ok(auth) => Outcome::Auth(auth),
                    Err(other) => Outcome::Failed(other.to_string()),
                }
            }
            Err(error) => Outcome::Failed(error.to_string()),
        },
        Api::Tower(service) => {
            let request = http::Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("request");
            match service.clone().oneshot(request).await {
                Ok(response) => Outcome::Status(response.status().as_u16()),
                Err(ServiceError::Auth(auth)) => Outcome::Auth(auth),
                Err(ServiceError::Service(error)) => Outcome::Failed(error.to_string()),
            }
        }
        Api::Ureq(_) => unreachable!("ureq is blocking"),
    }
}

fn ureq_get(agent: &AuthAgent, url: &str) -> Outcome {
    match agent.get(url).call() {
        Ok(response) => Outcome::Status(response.status().as_u16()),
        Err(ureq::Error::Other(error)) => match error.downcast::<AuthError<OAuth2Error>>() {
            Ok(auth) => Outcome::Auth(*auth),
            Err(other) => Outcome::Failed(other.to_string()),
        },
        Err(error) => Outcome::Failed(error.to_string()),
    }
}

fn assert_all_ok(kind: Kind, outcomes: &[Outcome]) {
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.is_ok()).collect();
    assert!(
        failed.is_empty(),
        "{kind:?}: {} of {} failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
}

fn tenant(kind: Kind, scenario: &str, access_seconds: u64) -> Tenant {
    let name = format!("{scenario}-{kind:?}").to_lowercase();
    AuthServer::shared().tenant(&name, access_seconds)
}

/// Long enough that no token expires by itself during a test: expiry is
/// driven by the server's control.
const LONG_LIVED: u64 = 600;

// ---------------------------------------------------------------- scenarios

/// 200 concurrent requests after the access token expired on the server:
/// one refresh, no failure, no revocation. A naive client on another tenant
/// of the same server, in the same test, trips reuse protection.
fn storm(kind: Kind) {
    let tenant = tenant(kind, "storm", LONG_LIVED);
    let subject = Subject::new(kind, &tenant);
    assert_all_ok(kind, &subject.run(1));
    tenant.expire_access_tokens();

    let outcomes = subject.run(200);

    assert_all_ok(kind, &outcomes);
    let c = tenant.counters();
    assert_eq!((c.refresh_calls, c.refresh_ok), (1, 1), "{kind:?}: {c:?}");
    assert_eq!(c.family_revocations, 0, "{kind:?}: {c:?}");
    assert!(
        c.resource_unauthorized >= 1,
        "{kind:?}: the token had expired: {c:?}"
    );
    assert_eq!(subject.manager.stats().refresh_calls, 1);
    let scopes = subject.manager.current().expect("a token").value;
    let scopes: Vec<&str> = scopes
        .scopes()
        .unwrap_or_default()
        .iter()
        .map(|s| s.as_str())
        .collect();
    match kind {
        Kind::Tower => assert_eq!(scopes, ["read"], "the narrower scope asked for"),
        Kind::Reqwest | Kind::Ureq => assert_eq!(scopes, ["read", "write"], "the login's scope"),
    }

    naive_client_trips_reuse_protection(kind);
}

/// The control: on a 401, refresh with the token pair the request was sent
/// with and retry once, as naive clients do. Its late 401s present a
/// refresh token that was already rotated: the server revokes the family.
fn naive_client_trips_reuse_protection(kind: Kind) {
    const N: u64 = 20;
    let tenant = tenant(kind, "naive", LONG_LIVED);
    let refresher = Arc::new(tenant.refresher(token_client()));
    let tokens = Arc::new(std::sync::Mutex::new(tenant.login()));
    let (runtime, http, url) = (runtime(), reqwest::Client::new(), tenant.resource_url());
    tenant.expire_access_tokens();
    tenant.hold_unauthorized(N - 1);

    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (refresher, tokens, http, url) =
                (refresher.clone(), tokens.clone(), http.clone(), url.clone());
            runtime.spawn(async move {
                let sent_with = tokens.lock().unwrap().clone();
                let get = |token: &OAuth2Token| {
                    http.get(&url)
                        .bearer_auth(token.access_token().secret())
                        .send()
                };
                let first = get(&sent_with).await.expect("response").status().as_u16();
                if first != 401 {
                    return first;
                }
                match refresher.refresh(Some(&sent_with)).await {
                    Ok(fresh) => {
                        *tokens.lock().unwrap() = fresh.clone();
                        get(&fresh).await.expect("response").status().as_u16()
                    }
                    Err(_) => first,
                }
            })
        })
        .collect();
    // The one answer not held refreshed (rotating the pair all 20 were sent
    // with) and retried; then the 19 late 401s arrive.
    tenant.wait_until("held", N - 1);
    tenant.wait_until("refresh_ok", 1);
    tenant.wait_until("resource_ok", 1);
    tenant.release();
    let statuses: Vec<u16> = runtime.block_on(async {
        let all = futures::future::join_all(tasks);
        let joined = tokio::time::timeout(WAIT, all)
            .await
            .expect("naive requests done");
        joined.into_iter().map(|r| r.expect("task")).collect()
    });

    let c = tenant.counters();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert!(c.family_revocations >= 1, "reuse protection is on: {c:?}");
    assert_eq!(
        failed as u64,
        N - 1,
        "every late 401 failed: {statuses:?}, {c:?}"
    );
    assert_eq!(
        c.refresh_calls, N,
        "the naive client refreshed on every 401: {c:?}"
    );
}

/// 5 waves of 100 requests, each after an expiry, each with late 401s: the
/// answers of all but one request sent with the old token are held until
/// the refresh is done and its request retried. One refresh per wave.
fn waves_with_late_401s(kind: Kind) {
    const WAVES: u64 = 5;
    const REQUESTS: usize = 100;
    let tenant = tenant(kind, "waves", LONG_LIVED);
    let subject = Subject::new(kind, &tenant);
    // Held: every request in flight with the old token but one, whose 401
    // (the last verdict) starts the refresh.
    let late = subject.concurrency(REQUESTS) as u64 - 1;

    for wave in 1..=WAVES {
        let before = tenant.counters();
        tenant.expire_access_tokens();
        tenant.hold_unauthorized(late);

        let requests = subject.fire(REQUESTS);
        tenant.wait_until("held", late);
        tenant.wait_until("refresh_ok", wave);
        tenant.wait_until("resource_ok", before.resource_ok + 1);
        tenant.release();
        let outcomes = subject.join(requests);

        assert_all_ok(kind, &outcomes);
        let c = tenant.counters();
        assert_eq!(c.refresh_calls, wave, "{kind:?} wave {wave}: {c:?}");
        assert_eq!(c.held_total, late * wave, "{kind:?} wave {wave}: {c:?}");
    }
    let c = tenant.counters();
    assert_eq!(
        (c.refresh_calls, c.refresh_ok),
        (WAVES, WAVES),
        "{kind:?}: {c:?}"
    );
    assert_eq!(c.family_revocations, 0, "{kind:?}: {c:?}");
    assert_eq!(subject.manager.stats().refresh_calls, WAVES);
}

/// The family revoked on the server: the refresh is `Rejected`
/// (`invalid_grant`), the manager signs out, and no token request follows.
fn revoked_family(kind: Kind) {
    let tenant = tenant(kind, "revoked", LONG_LIVED);
    let subject = Subject::new(kind, &tenant);
    assert_all_ok(kind, &subject.run(1));
    tenant.revoke_families();

    let outcomes = subject.run(20);

    let mut rejected = 0;
    for outcome in &outcomes {
        match outcome {
            Outcome::Auth(AuthError::Refresh(RefreshError::Rejected(e))) => {
                let code = e.error_response().map(|r| r.error().as_ref().to_string());
                assert_eq!(code.as_deref(), Some("invalid_grant"), "{e:?}");
                rejected += 1;
            }
            Outcome::Auth(AuthError::SignedOut) => {}
            other => panic!("{kind:?}: expected Rejected or SignedOut, got {other:?}"),
        }
    }
    assert!(rejected >= 1, "{kind:?}: {outcomes:?}");
    assert!(subject.manager.is_signed_out());
    let after = tenant.counters();
    assert_eq!(
        (after.refresh_calls, after.refresh_rejected),
        (1, 1),
        "{after:?}"
    );
    assert_eq!(
        after.family_revocations, 0,
        "an administrator's revocation is not reuse"
    );

    // Signed out: no network call at all, token endpoint or resource.
    let later = subject.run(10);
    assert!(
        later
            .iter()
            .all(|o| matches!(o, Outcome::Auth(AuthError::SignedOut))),
        "{later:?}"
    );
    let c = tenant.counters();
    assert_eq!(
        c.token_calls, after.token_calls,
        "no token call after sign-out"
    );
    assert_eq!(
        c.resource_ok + c.resource_unauthorized,
        after.resource_ok + after.resource_unauthorized,
        "no request after sign-out"
    );
}

/// Three tenants through one keyed manager (a credential per tenant, picked
/// per request from the URL), storms on all three at once after each expiry:
/// one refresh per tenant per expiry.
fn three_tenants(kind: Kind) {
    const ROUNDS: u64 = 2;
    let tenants: Vec<Tenant> = (1..=3)
        .map(|i| tenant(kind, &format!("tenant{i}"), LONG_LIVED))
        .collect();
    let subject = Subject::keyed(kind, &tenants);
    for round in 1..=ROUNDS {
        tenants.iter().for_each(Tenant::expire_access_tokens);
        let waves: Vec<Wave> = tenants
            .iter()
            .map(|tenant| subject.fire_at(&tenant.resource_url(), 60))
            .collect();
        for wave in waves {
            assert_all_ok(kind, &subject.join(wave));
        }
        for tenant in &tenants {
            let c: Counters = tenant.counters();
            assert_eq!(
                c.refresh_calls, round,
                "{kind:?} {} round {round}: {c:?}",
                tenant.name
            );
            assert_eq!(c.family_revocations, 0, "{kind:?} {}: {c:?}", tenant.name);
            let stats = subject.manager.for_key(&tenant.name).stats();
            assert_eq!(stats.refresh_calls, round, "{kind:?} {}", tenant.name);
        }
    }
}

macro_rules! for_every_client {
    ($($scenario:ident),* $(,)?) => {
        mod reqwest_middleware_client {
            $( #[test] fn $scenario() { super::with_timeout(stringify!($scenario), || super::$scenario(super::Kind::Reqwest)) } )*
        }
        mod tower_layer {
            $( #[test] fn $scenario() { super::with_timeout(stringify!($scenario), || super::$scenario(super::Kind::Tower)) } )*
        }
        mod ureq_8_threads {
            $( #[test] fn $scenario() { super::with_timeout(stringify!($scenario), || super::$scenario(super::Kind::Ureq)) } )*
        }
    };
}

for_every_client!(storm, waves_with_late_401s, revoked_family, three_tenants);

/// `expires_in` drives refresh-ahead with no code of the caller's: tokens
/// of 6 s, refreshed 4 s ahead, used for a while: the server never answers
/// 401, and every refresh is one the manager made ahead. (A 401 would need
/// a request slower than the 4 s margin.)
#[test]
fn expires_in_drives_refresh_ahead_without_a_401() {
    with_timeout("expires_in_drives_refresh_ahead_without_a_401", || {
        let tenant = AuthServer::shared().tenant("ahead", 6);
        let manager = Arc::new(
            tenant
                .refresher(token_client())
                .refresh_ahead(Duration::from_secs(4))
                .manager(),
        );
        manager.sign_in(tenant.login());
        let api = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(AuthMiddleware::new(manager.clone()))
            .build();
        let rt = runtime();
        let deadline = Instant::now() + WAIT;
        // Requests paced until two refreshes were made ahead (pacing only:
        // what is checked does not depend on the timing).
        while manager.stats().refresh_calls < 2 {
            assert!(
                Instant::now() < deadline,
                "no second refresh within {WAIT:?}: {:?}",
                manager.stats()
            );
            let status = rt
                .block_on(api.get(tenant.resource_url()).send())
                .expect("response")
                .status();
            assert_eq!(status, 200);
            std::thread::sleep(Duration::from_millis(50));
        }
        let c = tenant.counters();
        assert_eq!(c.resource_unauthorized, 0, "{c:?}");
        assert_eq!(c.refresh_calls, manager.stats().refresh_calls, "{c:?}");
        assert_eq!(
            (c.refresh_ok, c.family_revocations),
            (c.refresh_calls, 0),
            "{c:?}"
        );
        assert_eq!(manager.stats().retries, 0);
    });
}
