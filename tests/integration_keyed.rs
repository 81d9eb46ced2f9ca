//! A keyed `auth::TokenManager` behind the tower layer and the reqwest
//! middleware, each request choosing its credential: three tenants (three
//! sessions of the loopback OAuth-style server, tests/support/server.rs, each
//! with its own rotating refresh token) share one manager and one client.
//! After expiry a storm over all tenants refreshes each tenant once, and
//! every request is answered for its own tenant's session.
//!
//! The refreshes are held at a valve until the server has answered every
//! first attempt with a 401, so each tenant's storm is a real storm.
#![cfg(all(feature = "tower", feature = "reqwest"))]

#[path = "support/server.rs"]
mod server;

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Gate, Rt, until};
use epochflight::auth::{AuthLayer, AuthMiddleware, Credential, RefreshError, TokenManager};
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use server::{ServerConfig, TestServer};
use tower::{Layer, ServiceExt};

const TENANTS: usize = 3;
const PER_TENANT: usize = 30;

/// A tenant is one session of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tenant(u64);

#[derive(Clone, Debug)]
struct Tokens {
    access: String,
    refresh: String,
}

impl Credential for Tokens {
    fn apply(&self, headers: &mut HeaderMap) {
        self.access.apply(headers);
    }
}

type Manager = Arc<TokenManager<Tokens, String, Tenant>>;

/// Refreshes wait here while the test holds it.
#[derive(Default)]
struct Valve(Mutex<Option<Arc<Gate>>>);

impl Valve {
    fn hold(&self) -> Arc<Gate> {
        let gate = Gate::new();
        *self.0.lock().unwrap() = Some(gate.clone());
        gate
    }

    async fn pass(&self) {
        let gate = self.0.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.wait().await;
        }
    }
}

fn field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[start..].trim_start_matches('"');
    let end = rest.find(['"', ',', '}'])?;
    Some(rest[..end].to_string())
}

/// The server's session id in an access token `at-s<session>-<n>`.
fn session_of(access: &str) -> u64 {
    let rest = access.strip_prefix("at-s").expect("an access token");
    rest[..rest.find('-').expect("at-s<session>-<n>")]
        .parse()
        .expect("a session id")
}

/// A keyed manager whose refresher posts each tenant's own refresh token
/// (carried in its stale `Tokens`) with a plain reqwest client.
fn manager(s: &TestServer, valve: &Arc<Valve>) -> Manager {
    let (client, url, valve) = (reqwest::Client::new(), s.url("/token"), valve.clone());
    Arc::new(TokenManager::keyed(
        move |_tenant: Tenant, stale: Option<Tokens>| {
            let (client, url, valve) = (client.clone(), url.clone(), valve.clone());
            async move {
                let stale =
                    stale.ok_or_else(|| RefreshError::Rejected("no refresh token".into()))?;
                valve.pass().await;
                let transient = |e: reqwest::Error| RefreshError::Transient(e.to_string());
                let response = client
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(format!(
                        "grant_type=refresh_token&refresh_token={}",
                        stale.refresh
                    ))
                    .send()
                    .await
                    .map_err(transient)?;
                let status = response.status().as_u16();
                let body = response.text().await.map_err(transient)?;
                match (
                    status,
                    field(&body, "access_token"),
                    field(&body, "refresh_token"),
                ) {
                    (200, Some(access), Some(refresh)) => Ok(Tokens { access, refresh }),
                    (400..=499, _, _) => Err(RefreshError::Rejected(body)),
                    _ => Err(RefreshError::Transient(body)),
                }
            }
        },
    ))
}

/// Three sessions on the server, each signed in as a tenant.
fn tenants(s: &TestServer, m: &Manager) -> Vec<Tenant> {
    let mut sessions = vec![s.initial_tokens()];
    sessions.extend((1..TENANTS).map(|_| s.sign_in_new_session()));
    sessions
        .into_iter()
        .map(|(access, refresh)| {
            let tenant = Tenant(session_of(&access));
            m.for_key(&tenant).sign_in(Tokens { access, refresh });
            tenant
        })
        .collect()
}

/// After the storm: one refresh per tenant, no reuse, every request
/// answered for its own tenant.
fn assert_one_refresh_per_tenant(s: &TestServer, m: &Manager, tenants: &[Tenant]) {
    let c = s.counters();
    assert_eq!(
        (c.refresh_calls, c.successful_refreshes, c.reuse_detections),
        (TENANTS as u64, TENANTS as u64, 0)
    );
    assert_eq!(c.resource_ok, (TENANTS * PER_TENANT) as u64);
    let mut retries = 0;
    for tenant in tenants {
        let stats = m.for_key(tenant).stats();
        assert_eq!(stats.refresh_calls, 1);
        // The requests that were answered 401 were sent once more; the
        // others waited at the gate for the new token.
        assert!(
            (1..=PER_TENANT as u64).contains(&stats.retries),
            "{stats:?}"
        );
        retries += stats.retries;
        let current = m.for_key(tenant).current().unwrap().value;
        assert_eq!(
            session_of(&current.access),
            tenant.0,
            "refreshed within its session"
        );
    }
    assert_eq!(c.resource_unauthorized, retries);
}

/// The reqwest middleware picks each request's tenant from its middleware
/// extensions.
#[test]
fn reqwest_keyed_storm_refreshes_each_tenant_once() {
    Rt::Tokio.run("reqwest_keyed_storm", || async {
        let s = TestServer::start(ServerConfig::default());
        let valve = Arc::new(Valve::default());
        let m = manager(&s, &valve);
        let tenants = tenants(&s, &m);
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(AuthMiddleware::keyed(m.clone(), |_request, extensions| {
                *extensions
                    .get::<Tenant>()
                    .expect("every request names its tenant")
            }))
            .build();
        s.expire_access_tokens();
        let held = valve.hold();
        let requests: Vec<_> = (0..TENANTS * PER_TENANT)
            .map(|i| {
                let (client, url, tenant) =
                    (client.clone(), s.url("/resource"), tenants[i % TENANTS]);
                tokio::spawn(async move {
                    let response = client.get(url).with_extension(tenant).send().await.unwrap();
                    (
                        tenant,
                        response.status().as_u16(),
                        response.text().await.unwrap(),
                    )
                })
            })
            .collect();
        // Every tenant's refresh has started and is held: a request answered
        // 401 before it waits on that refresh, one that asks for its token
        // after it waits at the gate (which of the two depends on scheduling).
        until(|| m.stats().refresh_calls == TENANTS as u64).await;
        held.open();
        for request in requests {
            let (tenant, status, body) = request.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(field(&body, "session"), Some(tenant.0.to_string()));
        }
        assert_one_refresh_per_tenant(&s, &m, &tenants);
    });
}

/// The tower layer picks each request's tenant from its extensions.
#[test]
fn tower_keyed_storm_refreshes_each_tenant_once() {
    Rt::Tokio.run("tower_keyed_storm", || async {
        let s = TestServer::start(ServerConfig::default());
        let valve = Arc::new(Valve::default());
        let m = manager(&s, &valve);
        let tenants = tenants(&s, &m);
        let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let service = AuthLayer::keyed(m.clone(), |head: &http::request::Parts| {
            *head
                .extensions
                .get::<Tenant>()
                .expect("every request names its tenant")
        })
        .layer(hyper);
        s.expire_access_tokens();
        let held = valve.hold();
        let requests: Vec<_> = (0..TENANTS * PER_TENANT)
            .map(|i| {
                let (service, url, tenant) =
                    (service.clone(), s.url("/resource"), tenants[i % TENANTS]);
                tokio::spawn(async move {
                    let mut request = http::Request::get(url).body(Full::default()).unwrap();
                    request.extensions_mut().insert(tenant);
                    let response = service.oneshot(request).await.unwrap();
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    (tenant, status, String::from_utf8(body.to_vec()).unwrap())
                })
            })
            .collect();
        // Every tenant's refresh has started and is held: a request answered
        // 401 before it waits on that refresh, one that asks for its token
        // after it waits at the gate (which of the two depends on scheduling).
        until(|| m.stats().refresh_calls == TENANTS as u64).await;
        held.open();
        for request in requests {
            let (tenant, status, body) = request.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(field(&body, "session"), Some(tenant.0.to_string()));
        }
        assert_one_refresh_per_tenant(&s, &m, &tenants);
    });
}
