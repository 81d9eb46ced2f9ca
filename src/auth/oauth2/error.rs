//! [`OAuth2Error`]: why a refresh-token grant failed, and whether the
//! session survives it.

use std::error::Error;
use std::fmt;

use ::oauth2::basic::{BasicErrorResponse, BasicErrorResponseType};
use ::oauth2::http::StatusCode;
use ::oauth2::{RequestTokenError, StandardErrorResponse};

use crate::auth::RefreshError;
use crate::sync::StdArc as Arc;

type BoxError = Box<dyn Error + Send + Sync>;

/// Why a refresh-token grant failed: the refresher's error type, inside a
/// [`RefreshError`] that says whether the session is over.
///
/// It keeps what the token endpoint said (its status, and the RFC 6749 §5.2
/// error response with any copy of a presented secret in its text
/// redacted), never the response body: neither `Debug` nor `Display` can
/// show a token. Cheap to clone (the failure is shared).
///
/// # Which failures end the session
///
/// [`RefreshError::Transient`] (the session is kept; the manager tries again
/// after its cool-down):
///
/// - no answer: connection refused or reset, timeout, TLS failure;
/// - HTTP `5xx`, `429 Too Many Requests` and `408 Request Timeout`, whatever
///   the body says: the server did not get to judge the grant;
/// - the error codes `temporarily_unavailable` and `server_error` (defined
///   for the authorization endpoint, RFC 6749 §4.1.2.1, and sent by some
///   token endpoints with a `400`).
///
/// [`RefreshError::Rejected`] (the manager signs out; no further token
/// request is made until `sign_in`): every other answer, namely
///
/// - `invalid_grant`: the refresh token is expired, revoked, or was already
///   used (with rotation and reuse detection the server has just revoked the
///   whole family);
/// - the other RFC 6749 §5.2 codes, `invalid_request`, `invalid_client`,
///   `unauthorized_client`, `unsupported_grant_type`, `invalid_scope`, and
///   codes unknown to RFC 6749 on a `4xx`: each says the server judged *this
///   request* and refused it. The refresher would send the very same request
///   next time (same refresh token, same client credentials, same scopes),
///   so a retry cannot succeed; as `Transient` they would only repeat the
///   refused request once per cool-down, for ever. Misconfiguration (a
///   rotated client secret, a scope the grant does not cover) surfaces once,
///   as a sign-out with this error, instead of as a hot loop;
/// - a `2xx` that is not a token response (not JSON, or a required field
///   missing): the server accepted the grant and may have rotated the
///   refresh token, which is then spent. Presenting it again would trip
///   reuse detection and revoke the whole family; signing out is the safe
///   end;
/// - other statuses (`3xx`, `4xx`) with a body that is not an OAuth error;
/// - no refresh token to present ([`OAuth2ErrorKind::NoRefreshToken`]).
///
/// # Examples
///
/// ```
/// use epochflight::auth::oauth2::{OAuth2Error, OAuth2ErrorKind};
///
/// fn explain(error: &OAuth2Error) -> String {
///     match error.kind() {
///         OAuth2ErrorKind::ErrorResponse => format!(
///             "the server said {}",
///             error.error_response().map_or("?", |r| r.error().as_ref())
///         ),
///         OAuth2ErrorKind::Network => "no answer; try later".into(),
///         _ => error.to_string(),
///     }
/// }
/// # let _ = explain;
/// ```
#[derive(Clone)]
pub struct OAuth2Error(Arc<Failure>);

struct Failure {
    status: Option<StatusCode>,
    cause: Cause,
}

enum Cause {
    NoRefreshToken,
    Network(BoxError),
    ErrorResponse(BasicErrorResponse),
    /// What could not be read, described without the body.
    Unreadable(String),
}

/// What kind of failure an [`OAuth2Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OAuth2ErrorKind {
    /// There was no refresh token to present: the stale token has none,
    /// and the refresher was given none for a first refresh.
    NoRefreshToken,
    /// No answer from the token endpoint (the HTTP client failed).
    Network,
    /// The token endpoint answered with an OAuth 2 error response
    /// ([`OAuth2Error::error_response`]).
    ErrorResponse,
    /// The token endpoint answered with something that is neither a token
    /// response nor an OAuth 2 error response.
    UnreadableResponse,
}

impl OAuth2Error {
    pub(crate) fn no_refresh_token() -> Self {
        Self::new(None, Cause::NoRefreshToken)
    }

    /// Converts the `oauth2` crate's error, given the status the token
    /// endpoint answered with, if it answered. `secrets` (the refresh token
    /// and client secret that were sent) are redacted from the error text.
    pub(crate) fn from_request_error<RE>(
        error: RequestTokenError<RE, BasicErrorResponse>,
        status: Option<StatusCode>,
        secrets: &[&str],
    ) -> Self
    where
        RE: Error + Send + Sync + 'static,
    {
        let cause = match error {
            RequestTokenError::Request(e) => Cause::Network(Box::new(e)),
            RequestTokenError::ServerResponse(response) => {
                Cause::ErrorResponse(redact_response(response, secrets))
            }
            RequestTokenError::Parse(e, _body) => {
                // serde's message can quote a value of the body: keep only
                // where it failed and what kind of failure it was.
                let (path, category) = (e.path().to_string(), e.inner().classify());
                Cause::Unreadable(format!("{category:?} error at `{path}`"))
            }
            RequestTokenError::Other(message) => Cause::Unreadable(redact(&message, secrets)),
        };
        Self::new(status, cause)
    }

    fn new(status: Option<StatusCode>, cause: Cause) -> Self {
        Self(Arc::new(Failure { status, cause }))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> OAuth2ErrorKind {
        match self.0.cause {
            Cause::NoRefreshToken => OAuth2ErrorKind::NoRefreshToken,
            Cause::Network(_) => OAuth2ErrorKind::Network,
            Cause::ErrorResponse(_) => OAuth2ErrorKind::ErrorResponse,
            Cause::Unreadable(_) => OAuth2ErrorKind::UnreadableResponse,
        }
    }

    /// The HTTP status the token endpoint answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        self.0.status
    }

    /// The OAuth 2 error response (RFC 6749 §5.2: `error`,
    /// `error_description`, `error_uri`), if the server sent one. Any copy
    /// of the presented refresh token or client secret in its text is
    /// replaced by `[redacted]`.
    pub fn error_response(&self) -> Option<&BasicErrorResponse> {
        match &self.0.cause {
            Cause::ErrorResponse(response) => Some(response),
            _ => None,
        }
    }

    /// Whether a later attempt may succeed: the refresher reports the
    /// failure as [`RefreshError::Transient`] if so, as
    /// [`RefreshError::Rejected`] otherwise (see the [rules](Self)).
    pub fn is_transient(&self) -> bool {
        let status = self.0.status;
        let overloaded = status.is_some_and(|s| {
            s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT
        });
        match &self.0.cause {
            Cause::NoRefreshToken => false,
            Cause::Network(_) => true,
            Cause::ErrorResponse(response) => {
                overloaded
                    || matches!(
                        response.error(),
                        BasicErrorResponseType::Extension(code)
                            if code == "temporarily_unavailable" || code == "server_error"
                    )
            }
            Cause::Unreadable(_) => overloaded,
        }
    }

    /// This error as the refresher reports it.
    pub(crate) fn into_refresh_error(self) -> RefreshError<OAuth2Error> {
        if self.is_transient() {
            RefreshError::Transient(self)
        } else {
            RefreshError::Rejected(self)
        }
    }
}

fn redact(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(text.to_string(), |text, secret| {
            text.replace(secret, "[redacted]")
        })
}

fn redact_response(response: BasicErrorResponse, secrets: &[&str]) -> BasicErrorResponse {
    let scrub = |text: Option<&String>| text.map(|t| redact(t, secrets));
    StandardErrorResponse::new(
        response.error().clone(),
        scrub(response.error_description()),
        scrub(response.error_uri()),
    )
}

impl fmt::Debug for OAuth2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("OAuth2Error");
        s.field("kind", &self.kind());
        s.field("status", &self.0.status.map(|s| s.as_u16()));
        match &self.0.cause {
            Cause::NoRefreshToken => {}
            Cause::Network(e) => {
                s.field("error", &format_args!("{e}"));
            }
            Cause::ErrorResponse(r) => {
                s.field("error", &r.error().as_ref());
                s.field("description", &r.error_description());
            }
            Cause::Unreadable(what) => {
                s.field("error", what);
            }
        }
        s.finish()
    }
}

impl fmt::Display for OAuth2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.0.status.map(|s| s.as_u16()).unwrap_or_default();
        match &self.0.cause {
            Cause::NoRefreshToken => f.write_str("no refresh token to present: sign in again"),
            Cause::Network(e) => write!(f, "token request failed: {e}"),
            Cause::ErrorResponse(r) => {
                write!(f, "token endpoint answered {status} {}", r.error().as_ref())?;
                match r.error_description() {
                    Some(description) => write!(f, ": {description}"),
                    None => Ok(()),
                }
            }
            Cause::Unreadable(what) => write!(
                f,
                "token endpoint answered {status} with neither a token nor an OAuth error ({what})"
            ),
        }
    }
}

impl Error for OAuth2Error {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.0.cause {
            Cause::Network(e) => Some(&**e),
            _ => None,
        }
    }
}
