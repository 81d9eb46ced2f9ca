//! A real OAuth 2 authorization server for tests: django-oauth-toolkit,
//! run from tests/oauth_server/server.py (its docstring lists the endpoints),
//! with refresh-token rotation and reuse protection on.
//!
//! [`AuthServer::shared`] starts one server per test process on 127.0.0.1
//! (a free port) and provisions its Python venv first if needed
//! (tests/oauth_server/provision.sh, under `target/tmp`). It stops when the
//! test process ends: the server exits when its stdin closes. Each test makes
//! its own [`Tenant`] (client, user, token family, counters), so tests that
//! run in parallel never see each other's counts.
//!
//! If Python or the packages cannot be installed, the tests fail with the
//! command that fixes it; they never skip.
//!
//! Included by path; names only `std`, `serde_json`, `ureq` and the crate.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use epochflight::auth::oauth2::{
    ClientId, ClientSecret, OAuth2Refresher, OAuth2Token, TokenUrl, UreqAgent,
};

/// The longest any wait on the server's counters may take.
pub const WAIT: Duration = Duration::from_secs(30);

const PROVISION: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/oauth_server/provision.sh"
);
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oauth_server/server.py");

fn venv() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("oauth-server-venv")
}

/// A running authorization server.
pub struct AuthServer {
    base: String,
    agent: ureq::Agent,
    /// Held so that the server's stdin stays open: it exits when it closes.
    _stdin: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

impl AuthServer {
    /// The server of this test process, started on first use.
    pub fn shared() -> &'static AuthServer {
        static SERVER: OnceLock<AuthServer> = OnceLock::new();
        SERVER.get_or_init(AuthServer::start)
    }

    fn start() -> AuthServer {
        provision();
        let python = venv().join("bin/python");
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oauth-server.log");
        let log_file = std::fs::File::create(&log).expect("create the server's log file");
        let mut child = Command::new(&python)
            .arg(SERVER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", python.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut first_line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("read the server's port");
        let port = serde_json::from_str::<serde_json::Value>(&first_line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "the test authorization server did not start (first line {first_line:?}).\n\
                     Its log ({}):\n{log}",
                    Path::new(env!("CARGO_TARGET_TMPDIR"))
                        .join("oauth-server.log")
                        .display()
                )
            });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(WAIT + Duration::from_secs(5)))
            .build()
            .into();
        AuthServer {
            base: format!("http://127.0.0.1:{port}"),
            agent,
            _stdin: Mutex::new(stdin),
            _child: Mutex::new(child),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn token_url(&self) -> String {
        self.url("/o/token/")
    }

    /// A new tenant whose access tokens live `access_seconds`.
    pub fn tenant(&'static self, name: &str, access_seconds: u64) -> Tenant {
        let spec = serde_json::json!({ "name": name, "access_seconds": access_seconds });
        let created = self.post_json("/test/tenants", &spec.to_string());
        let field = |key: &str| created[key].as_str().expect(key).to_string();
        Tenant {
            server: self,
            name: name.to_string(),
            client_id: field("client_id"),
            client_secret: field("client_secret"),
            username: field("username"),
            password: field("password"),
        }
    }

    fn post_json(&self, path: &str, body: &str) -> serde_json::Value {
        let mut response = self
            .agent
            .post(self.url(path))
            .header("content-type", "application/json")
            .send(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("body");
        assert_eq!(status, 200, "POST {path}: {text}");
        serde_json::from_str(&text).expect("JSON answer")
    }

    fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let mut response = self
            .agent
            .get(self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("body");
        (status, serde_json::from_str(&text).expect("JSON answer"))
    }
}

/// Installs the server's venv if it is missing or stale (once per process;
/// the script itself locks against other processes).
fn provision() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let output = Command::new("bash")
            .arg(PROVISION)
            .arg(venv())
            .output()
            .unwrap_or_else(|e| panic!("could not run bash {PROVISION}: {e}"));
        if !output.status.success() {
            panic!(
                "the test authorization server (django-oauth-toolkit) could not be installed.\n\
                 Fix: install python3 with venv (Debian: apt-get install -y python3 python3-venv), \
                 then run `bash tests/oauth_server/provision.sh {}`.\n\
                 stdout: {}\nstderr: {}",
                venv().display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }
    });
}

/// One tenant of the server: a confidential client with its own user,
/// token families, counters and controls.
pub struct Tenant {
    server: &'static AuthServer,
    pub name: String,
    pub client_id: String,
    pub client_secret: String,
    username: String,
    password: String,
}

/// The server's counters for one tenant (see tests/oauth_server/server.py).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub token_calls: u64,
    pub refresh_calls: u64,
    pub refresh_ok: u64,
    pub refresh_rejected: u64,
    pub family_revocations: u64,
    pub resource_ok: u64,
    pub resource_unauthorized: u64,
    pub held: u64,
    pub held_total: u64,
}

impl Counters {
    fn from_json(json: &serde_json::Value) -> Counters {
        let n = |key: &str| {
            json[key]
                .as_u64()
                .unwrap_or_else(|| panic!("counter {key}"))
        };
        Counters {
            token_calls: n("token_calls"),
            refresh_calls: n("refresh_calls"),
            refresh_ok: n("refresh_ok"),
            refresh_rejected: n("refresh_rejected"),
            family_revocations: n("family_revocations"),
            resource_ok: n("resource_ok"),
            resource_unauthorized: n("resource_unauthorized"),
            held: n("held"),
            held_total: n("held_total"),
        }
    }
}

impl Tenant {
    /// The protected resource of this tenant.
    pub fn resource_url(&self) -> String {
        self.server.url(&format!("/api/{}/resource", self.name))
    }

    /// Logs in (the password grant, through the `oauth2` crate): the first
    /// token of a new token family.
    pub fn login(&self) -> OAuth2Token {
        use epochflight::auth::oauth2::{BasicTokenResponse, HttpRequest, SyncHttpClient};
        let client = oauth2::basic::BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.client_secret.clone()))
            .set_token_uri(TokenUrl::new(self.server.token_url()).expect("token URL"));
        let http = UreqAgent::new(self.server.agent.clone());
        // Through the trait, as the refresher uses it.
        let http = |request: HttpRequest| http.call(request);
        let response: BasicTokenResponse = client
            .exchange_password(
                &oauth2::ResourceOwnerUsername::new(self.username.clone()),
                &oauth2::ResourceOwnerPassword::new(self.password.clone()),
            )
            .request(&http)
            .unwrap_or_else(|e| panic!("login of tenant {}: {e:?}", self.name));
        OAuth2Token::from_response(&response)
    }

    /// The OAuth 2 refresher for this tenant's client over `http`.
    pub fn refresher<C>(&self, http: C) -> OAuth2Refresher<C> {
        OAuth2Refresher::new(
            http,
            ClientId::new(self.client_id.clone()),
            TokenUrl::new(self.server.token_url()).expect("token URL"),
        )
        .client_secret(ClientSecret::new(self.client_secret.clone()))
    }

    pub fn counters(&self) -> Counters {
        let (status, json) = self
            .server
            .get_json(&format!("/test/{}/counters", self.name));
        assert_eq!(status, 200);
        Counters::from_json(&json)
    }

    /// Waits (on the server) until `counter` reaches `at_least`; fails the
    /// test loudly if it has not within [`WAIT`].
    pub fn wait_until(&self, counter: &str, at_least: u64) -> Counters {
        let path = format!(
            "/test/{}/counters?until={counter}&at_least={at_least}&timeout={}",
            self.name,
            WAIT.as_secs()
        );
        let (status, json) = self.server.get_json(&path);
        let counters = Counters::from_json(&json);
        assert_eq!(
            status, 200,
            "tenant {}: {counter} did not reach {at_least} within {WAIT:?}: {counters:?}",
            self.name
        );
        counters
    }

    /// Every access token of this tenant expires now (refresh tokens stay).
    pub fn expire_access_tokens(&self) {
        self.server
            .post_json(&format!("/test/{}/expire", self.name), "{}");
    }

    /// Revokes every token family of this tenant, as an administrator would.
    pub fn revoke_families(&self) {
        self.server
            .post_json(&format!("/test/{}/revoke", self.name), "{}");
    }

    /// The next `count` 401 answers of the resource are held until
    /// [`release`](Self::release).
    pub fn hold_unauthorized(&self, count: u64) {
        self.server
            .post_json(&format!("/test/{}/hold?count={count}", self.name), "{}");
    }

    /// Sends every held answer.
    pub fn release(&self) {
        self.server
            .post_json(&format!("/test/{}/release", self.name), "{}");
    }
}
