//! `auth::oauth2::OAuth2Refresher` against a scripted token endpoint (the
//! `oauth2` crate's HTTP-client traits are implemented for closures): what
//! it sends, what it keeps from the answer, how it classifies failures, and
//! that no token reaches `Debug` or `Display`. The same refresher against a
//! real authorization server: tests/oauth2_real_server.rs.

use std::collections::VecDeque;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epochflight::auth::oauth2::{
    AccessToken, AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse, OAuth2Error,
    OAuth2ErrorKind, OAuth2Refresher, OAuth2Token, RefreshToken, Scope, TokenUrl,
};
use epochflight::auth::{AuthError, RefreshError};
use futures::executor::block_on;

const SECRET: &str = "client-s3cret";

/// A scripted token endpoint: answers from a queue, records every request.
#[derive(Clone, Default)]
struct Endpoint {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    requests: Arc<Mutex<Vec<HttpRequest>>>,
}

#[derive(Clone)]
enum Answer {
    Http(u16, &'static str, String),
    NetworkError,
}

fn json(status: u16, body: &str) -> Answer {
    Answer::Http(status, "application/json", body.to_string())
}

fn tokens(access: &str, refresh: Option<&str>, extra: &str) -> Answer {
    let refresh = refresh.map_or(String::new(), |r| format!(r#","refresh_token":"{r}""#));
    json(
        200,
        &format!(r#"{{"access_token":"{access}","token_type":"Bearer"{refresh}{extra}}}"#),
    )
}

impl Endpoint {
    fn answering(answers: impl IntoIterator<Item = Answer>) -> Self {
        let endpoint = Endpoint::default();
        endpoint.answers.lock().unwrap().extend(answers);
        endpoint
    }

    fn answer(&self, request: HttpRequest) -> Result<HttpResponse, std::io::Error> {
        self.requests.lock().unwrap().push(request);
        let answer = self.answers.lock().unwrap().pop_front();
        match answer.expect("the test scripted an answer for every request") {
            Answer::NetworkError => Err(std::io::Error::other("connection reset")),
            Answer::Http(status, content_type, body) => {
                let mut response = HttpResponse::new(body.into_bytes());
                *response.status_mut() = status.try_into().unwrap();
                response
                    .headers_mut()
                    .insert("content-type", content_type.parse().unwrap());
                Ok(response)
            }
        }
    }

    /// As the `oauth2` crate's `AsyncHttpClient` (a closure).
    fn client(
        &self,
    ) -> impl Fn(HttpRequest) -> Ready<Result<HttpResponse, std::io::Error>> + use<> {
        let endpoint = self.clone();
        move |request| ready(endpoint.answer(request))
    }

    /// As the `oauth2` crate's `SyncHttpClient` (a closure).
    fn blocking_client(
        &self,
    ) -> impl Fn(HttpRequest) -> Result<HttpResponse, std::io::Error> + use<> {
        let endpoint = self.clone();
        move |request| endpoint.answer(request)
    }

    fn calls(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// The form fields of request `i`.
    fn form(&self, i: usize) -> Vec<(String, String)> {
        let body = self.requests.lock().unwrap()[i].body().clone();
        url_decode_form(&String::from_utf8(body).unwrap())
    }

    fn header(&self, i: usize, name: &str) -> Option<String> {
        let requests = self.requests.lock().unwrap();
        let value = requests[i].headers().get(name)?;
        Some(value.to_str().unwrap().to_string())
    }
}

fn url_decode_form(form: &str) -> Vec<(String, String)> {
    form.split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| s.replace('+', " ").replace("%3A", ":");
            (decode(k), decode(v))
        })
        .collect()
}

fn field(form: &[(String, String)], name: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn refresher<C>(http: C) -> OAuth2Refresher<C> {
    OAuth2Refresher::new(
        http,
        ClientId::new("app-1".into()),
        TokenUrl::new("https://auth.example/token".into()).unwrap(),
    )
}

fn login(access: &str, refresh: &str) -> OAuth2Token {
    OAuth2Token::new(AccessToken::new(access.into()))
        .with_refresh_token(RefreshToken::new(refresh.into()))
}

fn refresh_once(answer: Answer) -> (Result<OAuth2Token, RefreshError<OAuth2Error>>, Endpoint) {
    let endpoint = Endpoint::answering([answer]);
    let refresher = refresher(endpoint.client()).client_secret(ClientSecret::new(SECRET.into()));
    let stale = login("at-old", "rt-old");
    let result = block_on(refresher.refresh(Some(&stale)));
    (result, endpoint)
}

#[test]
fn rotation_the_new_refresh_token_travels_in_the_token_and_is_presented_next() {
    let endpoint = Endpoint::answering([
        tokens("at-2", Some("rt-2"), r#","expires_in":600"#),
        tokens("at-3", Some("rt-3"), r#","expires_in":600"#),
    ]);
    let manager = refresher(endpoint.client()).manager();
    let first = manager.sign_in(login("at-1", "rt-1"));
    block_on(async {
        let second = manager.refresh_if_current(first).await.unwrap();
        assert_eq!(second.value.access_token().secret(), "at-2");
        assert_eq!(second.value.refresh_token().unwrap().secret(), "rt-2");
        let third = manager.refresh_if_current(second.epoch).await.unwrap();
        assert_eq!(third.value.refresh_token().unwrap().secret(), "rt-3");
        // A late caller with the first epoch gets the newest token, no request.
        let late = manager.refresh_if_current(first).await.unwrap();
        assert_eq!(late.epoch, third.epoch);
    });
    assert_eq!(endpoint.calls(), 2);
    for (i, presented) in [(0, "rt-1"), (1, "rt-2")] {
        let form = endpoint.form(i);
        assert_eq!(field(&form, "grant_type").as_deref(), Some("refresh_token"));
        assert_eq!(field(&form, "refresh_token").as_deref(), Some(presented));
    }
}

#[test]
fn a_response_without_a_refresh_token_keeps_the_presented_one() {
    let endpoint = Endpoint::answering([tokens("at-2", None, ""), tokens("at-3", None, "")]);
    let refresher = refresher(endpoint.client());
    let second = block_on(refresher.refresh(Some(&login("at-1", "rt-1")))).unwrap();
    assert_eq!(second.refresh_token().unwrap().secret(), "rt-1");
    let third = block_on(refresher.refresh(Some(&second))).unwrap();
    assert_eq!(third.access_token().secret(), "at-3");
    assert_eq!(
        field(&endpoint.form(1), "refresh_token").as_deref(),
        Some("rt-1")
    );
}

#[test]
fn expires_in_counts_from_the_request_and_drives_refresh_ahead() {
    let endpoint = Endpoint::answering([
        tokens("at-2", Some("rt-2"), r#","expires_in":5"#),
        tokens("at-3", Some("rt-3"), r#","expires_in":3600"#),
    ]);
    let manager = refresher(endpoint.client())
        .refresh_ahead(Duration::from_secs(30))
        .manager();
    let before = Instant::now();
    let epoch = manager.sign_in(login("at-1", "rt-1"));
    let short = block_on(manager.refresh_if_current(epoch)).unwrap();
    let expires_at = short.value.expires_at().expect("expires_in was given");
    assert!(expires_at >= before + Duration::from_secs(5));
    assert!(expires_at <= Instant::now() + Duration::from_secs(5));
    // 5 s left, inside the 30 s window: the next use refreshes ahead, with
    // no 401 and no code of the caller's.
    let used = block_on(manager.token()).unwrap();
    assert_eq!(endpoint.calls(), 2);
    assert_eq!(used.value.access_token().secret(), "at-3");
    // 3600 s left: used as is.
    let again = block_on(manager.token()).unwrap();
    assert_eq!((again.epoch, endpoint.calls()), (used.epoch, 2));
}

#[test]
fn scopes_are_requested_and_kept_when_the_response_omits_them() {
    let endpoint = Endpoint::answering([
        tokens("at-2", Some("rt-2"), ""),
        tokens("at-3", Some("rt-3"), r#","scope":"read""#),
    ]);
    let refresher = refresher(endpoint.client())
        .scopes([Scope::new("read".into()), Scope::new("write".into())]);
    let second = block_on(refresher.refresh(Some(&login("at-1", "rt-1")))).unwrap();
    assert_eq!(
        field(&endpoint.form(0), "scope").as_deref(),
        Some("read write")
    );
    let scopes: Vec<_> = second
        .scopes()
        .unwrap()
        .iter()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(scopes, ["read", "write"]);
    let third = block_on(refresher.refresh(Some(&second))).unwrap();
    let scopes: Vec<_> = third.scopes().unwrap().iter().map(|s| s.as_str()).collect();
    assert_eq!(scopes, ["read"], "the server's narrower grant wins");
}

#[test]
fn client_authentication_basic_by_default_or_in_the_body() {
    let endpoint = Endpoint::answering([
        tokens("at-2", Some("rt-2"), ""),
        tokens("at-3", Some("rt-3"), ""),
    ]);
    let basic = refresher(endpoint.client()).client_secret(ClientSecret::new(SECRET.into()));
    block_on(basic.refresh(Some(&login("a", "r")))).unwrap();
    let body = refresher(endpoint.client())
        .client_secret(ClientSecret::new(SECRET.into()))
        .auth_type(AuthType::RequestBody);
    block_on(body.refresh(Some(&login("a", "r")))).unwrap();

    // base64("app-1:client-s3cret")
    let expected = "Basic YXBwLTE6Y2xpZW50LXMzY3JldA==";
    assert_eq!(
        endpoint.header(0, "authorization").as_deref(),
        Some(expected)
    );
    assert_eq!(field(&endpoint.form(0), "client_secret"), None);
    assert_eq!(endpoint.header(1, "authorization"), None);
    let form = endpoint.form(1);
    assert_eq!(field(&form, "client_id").as_deref(), Some("app-1"));
    assert_eq!(field(&form, "client_secret").as_deref(), Some(SECRET));
}

/// RFC 6749 §5.2's codes and the other answers, as `OAuth2Error` documents.
#[test]
fn failures_are_rejected_or_transient_by_the_documented_rules() {
    use OAuth2ErrorKind::*;
    let error = |code: &str| format!(r#"{{"error":"{code}"}}"#);
    let cases: Vec<(Answer, bool, OAuth2ErrorKind)> = vec![
        // (answer, transient, kind)
        (json(400, &error("invalid_grant")), false, ErrorResponse),
        (json(400, &error("invalid_request")), false, ErrorResponse),
        (json(401, &error("invalid_client")), false, ErrorResponse),
        (
            json(400, &error("unauthorized_client")),
            false,
            ErrorResponse,
        ),
        (
            json(400, &error("unsupported_grant_type")),
            false,
            ErrorResponse,
        ),
        (json(400, &error("invalid_scope")), false, ErrorResponse),
        (json(400, &error("some_extension")), false, ErrorResponse),
        (
            json(400, &error("temporarily_unavailable")),
            true,
            ErrorResponse,
        ),
        (json(400, &error("server_error")), true, ErrorResponse),
        (json(503, &error("invalid_grant")), true, ErrorResponse),
        (json(429, &error("slow_down")), true, ErrorResponse),
        (json(500, ""), true, UnreadableResponse),
        (
            Answer::Http(502, "text/html", "<h1>Bad Gateway</h1>".into()),
            true,
            UnreadableResponse,
        ),
        (
            Answer::Http(408, "text/plain", "timeout".into()),
            true,
            UnreadableResponse,
        ),
        (
            Answer::Http(404, "text/html", "<h1>Not Found</h1>".into()),
            false,
            UnreadableResponse,
        ),
        (
            Answer::Http(302, "text/html", "moved".into()),
            false,
            UnreadableResponse,
        ),
        (
            json(200, r#"{"token_type":"Bearer"}"#),
            false,
            UnreadableResponse,
        ),
        (
            Answer::Http(200, "text/html", "<p>captive portal</p>".into()),
            false,
            UnreadableResponse,
        ),
        (Answer::NetworkError, true, Network),
    ];
    for (answer, transient, kind) in cases {
        let described = match &answer {
            Answer::Http(status, _, body) => format!("{status} {body}"),
            Answer::NetworkError => "network error".into(),
        };
        let (result, _) = refresh_once(answer);
        let failure = result.expect_err(&described);
        assert_eq!(
            failure.is_rejected(),
            !transient,
            "{described}: {failure:?}"
        );
        assert_eq!(failure.inner().is_transient(), transient, "{described}");
        assert_eq!(failure.inner().kind(), kind, "{described}");
    }
}

#[test]
fn the_error_keeps_the_status_and_the_error_response() {
    let (result, _) = refresh_once(json(
        400,
        r#"{"error":"invalid_grant","error_description":"Token has been revoked"}"#,
    ));
    let error = result.unwrap_err().into_inner();
    assert_eq!(error.status().map(|s| s.as_u16()), Some(400));
    let response = error.error_response().unwrap();
    assert_eq!(response.error().as_ref(), "invalid_grant");
    assert_eq!(
        response.error_description().map(String::as_str),
        Some("Token has been revoked")
    );
    assert_eq!(
        error.to_string(),
        "token endpoint answered 400 invalid_grant: Token has been revoked"
    );
}

/// Secrets that could reach `Debug` or `Display`: the tokens of the stale
/// and the fresh token, the client secret, echoed in a description, or
/// inside a body that failed to parse.
#[test]
fn debug_and_display_never_show_a_token_or_secret() {
    let secrets = ["at-old", "rt-old", "at-leak", "rt-leak", SECRET];
    let check = |shown: String| {
        for secret in secrets {
            assert!(!shown.contains(secret), "{secret} shown in: {shown}");
        }
    };
    let echoes = [
        // The description echoes the presented refresh token and the secret.
        json(
            400,
            &format!(
                r#"{{"error":"invalid_grant","error_description":"rt-old is spent ({SECRET})","error_uri":"https://x/rt-old"}}"#
            ),
        ),
        // A success body that fails to parse, holding fresh tokens.
        json(
            200,
            r#"{"access_token":"at-leak","refresh_token":"rt-leak","token_type":"Bearer","expires_in":"at-leak"}"#,
        ),
        json(
            200,
            r#"{"access_token":"at-leak","refresh_token":"rt-leak"}"#,
        ),
        Answer::Http(
            200,
            "text/plain",
            "access_token=at-leak&refresh_token=rt-leak".into(),
        ),
        json(
            500,
            &format!(r#"{{"error":"server_error","error_description":"rt-old, {SECRET}"}}"#),
        ),
    ];
    for answer in echoes {
        let (result, _) = refresh_once(answer);
        let failure = result.unwrap_err();
        check(format!("{failure:?}"));
        check(format!("{failure}"));
        check(format!("{:?}", AuthError::Refresh(failure.clone())));
        let mut source = std::error::Error::source(failure.inner());
        while let Some(cause) = source {
            check(format!("{cause} {cause:?}"));
            source = cause.source();
        }
    }

    let (fresh, _) = refresh_once(tokens("at-leak", Some("rt-leak"), r#","expires_in":60"#));
    let fresh = fresh.unwrap();
    assert_eq!(fresh.access_token().secret(), "at-leak");
    check(format!("{fresh:?}"));
    check(format!("{:?}", login("at-old", "rt-old")));
    let refresher = refresher(Endpoint::default().client())
        .client_secret(ClientSecret::new(SECRET.into()))
        .refresh_token(RefreshToken::new("rt-old".into()));
    check(format!("{refresher:?}"));
    let manager = refresher.manager();
    manager.sign_in(login("at-old", "rt-old"));
    check(format!("{manager:?} {:?}", manager.current()));
}

#[test]
fn invalid_grant_signs_the_manager_out_and_no_request_follows() {
    let endpoint = Endpoint::answering([json(400, r#"{"error":"invalid_grant"}"#)]);
    let manager = refresher(endpoint.client()).manager();
    let epoch = manager.sign_in(login("at-1", "rt-1"));
    match block_on(manager.refresh_if_current(epoch)) {
        Err(AuthError::Refresh(RefreshError::Rejected(e))) => {
            assert_eq!(
                e.error_response().unwrap().error().as_ref(),
                "invalid_grant"
            )
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(manager.is_signed_out());
    assert!(matches!(
        block_on(manager.token()),
        Err(AuthError::SignedOut)
    ));
    assert_eq!(endpoint.calls(), 1);
}

#[test]
fn a_transient_failure_keeps_the_session() {
    let endpoint = Endpoint::answering([
        json(503, r#"{"error":"temporarily_unavailable"}"#),
        tokens("at-2", Some("rt-2"), ""),
    ]);
    let manager = refresher(endpoint.client())
        .manager()
        .with_cooldown(Duration::ZERO);
    let epoch = manager.sign_in(login("at-1", "rt-1"));
    let failed = block_on(manager.refresh_if_current(epoch)).unwrap_err();
    assert!(matches!(
        failed,
        AuthError::Refresh(RefreshError::Transient(_))
    ));
    assert!(!manager.is_signed_out());
    let fresh = block_on(manager.refresh_if_current(epoch)).unwrap();
    assert_eq!(fresh.value.access_token().secret(), "at-2");
    assert_eq!(
        field(&endpoint.form(1), "refresh_token").as_deref(),
        Some("rt-1")
    );
}

#[test]
fn first_refresh_uses_the_given_refresh_token_or_is_rejected_without_a_request() {
    let endpoint = Endpoint::answering([tokens("at-2", Some("rt-2"), "")]);
    let without = refresher(endpoint.client()).manager();
    match block_on(without.token()) {
        Err(AuthError::Refresh(RefreshError::Rejected(e))) => {
            assert_eq!(e.kind(), OAuth2ErrorKind::NoRefreshToken)
        }
        other => panic!("expected NoRefreshToken, got {other:?}"),
    }
    assert_eq!(endpoint.calls(), 0);

    let with = refresher(endpoint.client())
        .refresh_token(RefreshToken::new("rt-saved".into()))
        .manager();
    let token = block_on(with.token()).unwrap();
    assert_eq!(token.value.access_token().secret(), "at-2");
    assert_eq!(
        field(&endpoint.form(0), "refresh_token").as_deref(),
        Some("rt-saved")
    );
}

#[test]
fn blocking_manager_refreshes_through_a_sync_http_client() {
    let endpoint = Endpoint::answering([
        tokens("at-2", Some("rt-2"), r#","expires_in":600"#),
        json(400, r#"{"error":"invalid_grant"}"#),
    ]);
    let manager = refresher(endpoint.blocking_client()).blocking_manager();
    let epoch = manager.sign_in(login("at-1", "rt-1"));
    let fresh = manager.refresh_if_current_blocking(epoch).unwrap();
    assert_eq!(fresh.value.refresh_token().unwrap().secret(), "rt-2");
    let rejected = manager
        .refresh_if_current_blocking(fresh.epoch)
        .unwrap_err();
    assert!(matches!(
        rejected,
        AuthError::Refresh(RefreshError::Rejected(_))
    ));
    assert!(manager.is_signed_out());
    assert_eq!(
        field(&endpoint.form(1), "refresh_token").as_deref(),
        Some("rt-2")
    );
}
