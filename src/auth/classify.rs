//! Which unauthorized responses a refresh can fix: the classification shared
//! by [`TokenManager::send`](super::TokenManager::send) (through
//! [`Unauthorized`] for [`http::Response`]), the tower layer and the reqwest
//! middleware.

use http::header::WWW_AUTHENTICATE;
use http::{HeaderMap, StatusCode};

use super::Unauthorized;

/// What to do with a response: refresh the token and send the request again,
/// or return the response as it is. From [`classify`].
///
/// Available with the `http` feature.
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The server rejected the token itself (expired, revoked, unknown): a
    /// new token may be accepted.
    Refresh,
    /// Anything else, including `401`s that a new token would not fix
    /// (`insufficient_scope`) and every `403`.
    Return,
}

impl Verdict {
    /// Whether the verdict is [`Verdict::Refresh`].
    pub fn is_refresh(self) -> bool {
        self == Verdict::Refresh
    }
}

/// Classifies a response by its status and headers.
///
/// [`Verdict::Refresh`] for a `401 Unauthorized` whose `WWW-Authenticate`
/// challenges blame the token or give no reason:
///
/// - `Bearer error="invalid_token"` (RFC 6750 §3.1: expired, revoked,
///   malformed);
/// - a challenge without an `error` parameter (`Bearer realm="api"`, or the
///   bare `Bearer` a server sends when the request had no token at all);
/// - no `WWW-Authenticate` header at all (cookie-based APIs often send none).
///
/// [`Verdict::Return`] for everything else, in particular:
///
/// - a `401` with any challenge whose `error` is not `invalid_token`
///   (`insufficient_scope`: the token is valid but not allowed; a new one
///   would be refused too; `invalid_request`: the request is malformed);
/// - `403 Forbidden`, whatever its headers: the server knows who the caller
///   is and refuses anyway;
/// - every other status.
///
/// The header is parsed as RFC 9110 §11.6.1 defines it: several challenges
/// in one header value or spread over several headers, case-insensitive
/// schemes and parameter names, quoted values with escapes, and `token68`
/// credentials. Error codes are compared case-insensitively. A header value
/// that cannot be parsed contributes the challenges read before the error.
///
/// Available with the `http` feature.
///
/// # Examples
///
/// ```
/// use epochflight::auth::{Verdict, classify};
/// use http::{HeaderMap, HeaderValue, StatusCode};
///
/// let challenge = |value: &'static str| {
///     let mut headers = HeaderMap::new();
///     headers.insert("www-authenticate", HeaderValue::from_static(value));
///     headers
/// };
/// let unauthorized = StatusCode::UNAUTHORIZED;
/// let expired = challenge(r#"Bearer realm="api", error="invalid_token""#);
/// let scope = challenge(r#"Bearer error="insufficient_scope", scope="admin""#);
/// assert_eq!(classify(unauthorized, &expired), Verdict::Refresh);
/// assert_eq!(classify(unauthorized, &HeaderMap::new()), Verdict::Refresh);
/// assert_eq!(classify(unauthorized, &scope), Verdict::Return);
/// assert_eq!(classify(StatusCode::FORBIDDEN, &expired), Verdict::Return);
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Verdict {
    if status != StatusCode::UNAUTHORIZED {
        return Verdict::Return;
    }
    let mut challenges = Vec::new();
    for value in headers.get_all(WWW_AUTHENTICATE) {
        parse_challenges(&String::from_utf8_lossy(value.as_bytes()), &mut challenges);
    }
    let not_the_token = challenges.iter().any(|challenge| {
        challenge
            .error()
            .is_some_and(|error| !error.eq_ignore_ascii_case("invalid_token"))
    });
    if not_the_token {
        Verdict::Return
    } else {
        Verdict::Refresh
    }
}

/// [`classify`] for a whole [`http::Response`].
///
/// Available with the `http` feature.
///
/// # Examples
///
/// ```
/// use epochflight::auth::{Verdict, classify_response};
///
/// let response = http::Response::builder()
///     .status(401)
///     .header("WWW-Authenticate", r#"bearer error="invalid_token""#)
///     .body(())
///     .unwrap();
/// assert_eq!(classify_response(&response), Verdict::Refresh);
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub fn classify_response<B>(response: &http::Response<B>) -> Verdict {
    classify(response.status(), response.headers())
}

/// An [`http::Response`] is unauthorized when [`classify_response`] says
/// [`Verdict::Refresh`]: a `401` that blames the token, not a `403` nor an
/// `insufficient_scope` `401`.
///
/// Available with the `http` feature.
impl<B> Unauthorized for http::Response<B> {
    fn is_unauthorized(&self) -> bool {
        classify_response(self).is_refresh()
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    /// Parameter names are lowercased (they are case-insensitive).
    params: Vec<(String, String)>,
}

impl Challenge {
    fn error(&self) -> Option<&str> {
        self.params
            .iter()
            .find(|(name, _)| name == "error")
            .map(|(_, value)| value.as_str())
    }
}

/// Appends the challenges of one header value to `out`:
///
/// ```text
/// WWW-Authenticate = #challenge
/// challenge  = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
/// auth-param = token BWS "=" BWS ( token / quoted-string )
/// token68    = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
/// ```
///
/// Commas separate both challenges and parameters: a token followed by `=`
/// is a parameter of the current challenge, any other token starts the next
/// challenge. Malformed parameters are skipped (see `Cursor::params`).
fn parse_challenges(value: &str, out: &mut Vec<Challenge>) {
    let mut p = Cursor {
        s: value.as_bytes(),
        i: 0,
    };
    loop {
        p.skip_list_separators();
        if p.at_end() {
            return;
        }
        let Some(scheme) = p.token() else {
            return;
        };
        let mut challenge = Challenge {
            scheme: scheme.to_owned(),
            params: Vec::new(),
        };
        let spaced = p.skip_ws();
        let ends_here = matches!(p.peek(), None | Some(b','));
        if spaced && !ends_here && !p.token68() {
            p.params(&mut challenge.params);
        }
        out.push(challenge);
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Skips spaces and tabs; whether there were any.
    fn skip_ws(&mut self) -> bool {
        let start = self.i;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
        self.i > start
    }

    /// Skips whitespace and empty list elements (`, ,`).
    fn skip_list_separators(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        if found {
            self.i += 1;
        }
        found
    }

    /// A `token` (RFC 9110 `tchar`s).
    fn token(&mut self) -> Option<&'a str> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        // Only ASCII `tchar`s were consumed: always valid UTF-8.
        (self.i > start).then(|| std::str::from_utf8(&self.s[start..self.i]).unwrap_or(""))
    }

    /// Consumes a `token68` if one stands here and ends the challenge (is
    /// followed by the end or a comma); otherwise consumes nothing.
    fn token68(&mut self) -> bool {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
        {
            self.i += 1;
        }
        let body = self.i > start;
        while self.eat(b'=') {}
        self.skip_ws();
        if body && matches!(self.peek(), None | Some(b',')) {
            return true;
        }
        self.i = start;
        false
    }

    /// `#auth-param`, up to the next challenge (or the end). Lenient, since
    /// a misread `error` would refresh (and rotate a refresh token) for a
    /// response that does not blame the token: a malformed parameter is
    /// skipped up to the next comma, and a parameter that follows another
    /// without a comma is still read.
    fn params(&mut self, params: &mut Vec<(String, String)>) {
        loop {
            let start = self.i;
            let Some(name) = self.token() else {
                if self.resync() {
                    continue;
                }
                return;
            };
            self.skip_ws();
            if !self.eat(b'=') {
                // Not a parameter: the scheme of the next challenge.
                self.i = start;
                return;
            }
            self.skip_ws();
            let value = if self.peek() == Some(b'"') {
                self.quoted_string().ok()
            } else {
                self.token().map(str::to_owned)
            };
            match value {
                Some(value) => params.push((name.to_ascii_lowercase(), value)),
                None if self.resync() => continue,
                None => return,
            }
            self.skip_ws();
            if self.eat(b',') {
                self.skip_list_separators();
            } else if !self.at_end() && !self.parameter_follows() && !self.resync() {
                return;
            }
            if self.at_end() {
                return;
            }
        }
    }

    /// Whether `token =` stands here (consumes nothing).
    fn parameter_follows(&mut self) -> bool {
        let start = self.i;
        let follows = self.token().is_some() && {
            self.skip_ws();
            self.peek() == Some(b'=')
        };
        self.i = start;
        follows
    }

    /// Skips past the next comma outside a quoted string; `false` if there is
    /// none (the rest of the value is unreadable).
    fn resync(&mut self) -> bool {
        let mut quoted = false;
        while let Some(byte) = self.peek() {
            self.i += 1;
            match byte {
                b'\\' if quoted => self.i += 1,
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    self.skip_list_separators();
                    return !self.at_end();
                }
                _ => {}
            }
        }
        false
    }

    /// A `quoted-string`, unescaped.
    fn quoted_string(&mut self) -> Result<String, ()> {
        self.i += 1; // the opening quote
        let mut value = Vec::new();
        loop {
            match self.peek().ok_or(())? {
                b'"' => {
                    self.i += 1;
                    return Ok(String::from_utf8_lossy(&value).into_owned());
                }
                b'\\' => {
                    self.i += 1;
                    value.push(self.peek().ok_or(())?);
                    self.i += 1;
                }
                byte => {
                    value.push(byte);
                    self.i += 1;
                }
            }
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(value: &str) -> Vec<Challenge> {
        let mut out = Vec::new();
        parse_challenges(value, &mut out);
        out
    }

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn verdict(status: u16, values: &[&str]) -> Verdict {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_str(value).unwrap());
        }
        classify(StatusCode::from_u16(status).unwrap(), &headers)
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(parse("Bearer"), [challenge("Bearer", &[])]);
        assert_eq!(
            parse(
                r#"Bearer realm="example", error="invalid_token", error_description="The access token expired""#
            ),
            [challenge(
                "Bearer",
                &[
                    ("realm", "example"),
                    ("error", "invalid_token"),
                    ("error_description", "The access token expired")
                ]
            )]
        );
        assert_eq!(
            parse(r#"Basic realm="a, b", BEARER Error = insufficient_scope ,scope="x y""#),
            [
                challenge("Basic", &[("realm", "a, b")]),
                challenge(
                    "BEARER",
                    &[("error", "insufficient_scope"), ("scope", "x y")]
                ),
            ]
        );
        assert_eq!(
            parse(r#"Negotiate YII/+=, Bearer, , DPoP algs="ES256", error="invalid_token""#),
            [
                challenge("Negotiate", &[]),
                challenge("Bearer", &[]),
                challenge("DPoP", &[("algs", "ES256"), ("error", "invalid_token")]),
            ]
        );
        assert_eq!(
            parse(r#"Bearer error="a\"b\\c""#),
            [challenge("Bearer", &[("error", r#"a"b\c"#)])]
        );
    }

    #[test]
    fn keeps_what_it_read_before_a_syntax_error() {
        assert_eq!(
            parse(r#"Bearer error="invalid_token", realm="unterminated"#),
            [challenge("Bearer", &[("error", "invalid_token")])]
        );
        assert_eq!(
            parse(r#"Bearer error="x" junk"#),
            [challenge("Bearer", &[("error", "x")])]
        );
        // A malformed parameter does not hide the ones after it.
        assert_eq!(
            parse(r#"Bearer realm=api.example.com/v1, error="insufficient_scope""#),
            [challenge(
                "Bearer",
                &[
                    ("realm", "api.example.com"),
                    ("error", "insufficient_scope")
                ]
            )]
        );
        assert_eq!(
            parse(r#"Bearer realm="api" error="insufficient_scope""#),
            [challenge(
                "Bearer",
                &[("realm", "api"), ("error", "insufficient_scope")]
            )]
        );
        assert_eq!(
            parse(r#"Bearer error_uri=https://x.example/e, error="insufficient_scope""#),
            [challenge(
                "Bearer",
                &[("error_uri", "https"), ("error", "insufficient_scope")]
            )]
        );
        assert_eq!(parse("\"quoted\" Bearer"), []);
    }

    #[test]
    fn refreshes_only_when_the_token_is_to_blame() {
        use Verdict::{Refresh, Return};
        assert_eq!(verdict(401, &[]), Refresh);
        assert_eq!(verdict(401, &["Bearer"]), Refresh);
        assert_eq!(verdict(401, &[r#"bearer realm="api""#]), Refresh);
        assert_eq!(verdict(401, &[r#"Bearer error="invalid_token""#]), Refresh);
        assert_eq!(verdict(401, &[r#"Bearer error="INVALID_TOKEN""#]), Refresh);
        assert_eq!(verdict(401, &["Bearer error=invalid_token"]), Refresh);
        assert_eq!(
            verdict(
                401,
                &[r#"Basic realm="x""#, r#"Bearer error="invalid_token""#]
            ),
            Refresh
        );
        assert_eq!(verdict(401, &["garbage \"unterminated"]), Refresh);

        assert_eq!(
            verdict(401, &[r#"Bearer error="insufficient_scope""#]),
            Return
        );
        assert_eq!(verdict(401, &[r#"Bearer error="invalid_request""#]), Return);
        assert_eq!(
            verdict(
                401,
                &[r#"Basic realm="x", Bearer error="insufficient_scope""#]
            ),
            Return
        );
        assert_eq!(
            verdict(
                401,
                &[
                    r#"Bearer error="invalid_token""#,
                    r#"Bearer error="insufficient_scope""#
                ]
            ),
            Return
        );
        assert_eq!(verdict(403, &[]), Return);
        assert_eq!(verdict(403, &[r#"Bearer error="invalid_token""#]), Return);
        assert_eq!(verdict(200, &[]), Return);
        assert_eq!(verdict(500, &[]), Return);
    }

    #[test]
    fn responses_are_unauthorized_when_a_refresh_may_help() {
        let response = |status: u16, challenge: Option<&'static str>| {
            let mut builder = http::Response::builder().status(status);
            if let Some(challenge) = challenge {
                builder = builder.header(WWW_AUTHENTICATE, challenge);
            }
            builder.body(()).unwrap()
        };
        assert!(response(401, None).is_unauthorized());
        assert!(response(401, Some(r#"Bearer error="invalid_token""#)).is_unauthorized());
        assert!(!response(401, Some(r#"Bearer error="insufficient_scope""#)).is_unauthorized());
        assert!(!response(403, None).is_unauthorized());
        assert!(!response(200, None).is_unauthorized());
    }
}
