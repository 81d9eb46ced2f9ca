//! [`OAuth2Token`]: the token value a [`TokenManager`](crate::auth::TokenManager)
//! holds for the OAuth 2 refresher, rotating refresh token included.

use std::fmt;
use std::time::{Duration, Instant};

use ::oauth2::{AccessToken, RefreshToken, Scope, TokenResponse};

/// An OAuth 2 access token together with what refreshing it needs: the
/// refresh token (rotated on every refresh, so it travels inside the value
/// the manager stores, never beside it), when the access token expires, and
/// its scopes.
///
/// Cloning is cheap enough for the manager (a few short strings). Its
/// `Debug` never shows the tokens:
///
/// ```
/// use std::time::Duration;
/// use epochflight::auth::oauth2::{AccessToken, OAuth2Token, RefreshToken};
///
/// let token = OAuth2Token::new(AccessToken::new("at-secret".into()))
///     .with_refresh_token(RefreshToken::new("rt-secret".into()))
///     .with_expires_in(Duration::from_secs(300));
/// let shown = format!("{token:?}");
/// assert!(!shown.contains("secret"), "{shown}");
/// assert_eq!(token.access_token().secret(), "at-secret");
/// ```
#[derive(Clone)]
pub struct OAuth2Token {
    access_token: AccessToken,
    refresh_token: Option<RefreshToken>,
    expires_at: Option<Instant>,
    scopes: Option<Vec<Scope>>,
}

impl OAuth2Token {
    /// An access token with no refresh token, no known expiry and no scopes.
    pub fn new(access_token: AccessToken) -> Self {
        Self {
            access_token,
            refresh_token: None,
            expires_at: None,
            scopes: None,
        }
    }

    /// The token a token response carries (from a login: an authorization
    /// code, password or device-code exchange made with the `oauth2`
    /// crate), its expiry counted from now.
    ///
    /// # Examples
    ///
    /// ```
    /// use epochflight::auth::oauth2::{BasicTokenResponse, OAuth2Token};
    ///
    /// let response: BasicTokenResponse = serde_json::from_str(
    ///     r#"{"access_token":"at","token_type":"Bearer","expires_in":60,"refresh_token":"rt"}"#,
    /// ).unwrap();
    /// let token = OAuth2Token::from_response(&response);
    /// assert_eq!(token.refresh_token().unwrap().secret(), "rt");
    /// assert!(token.expires_at().is_some());
    /// ```
    pub fn from_response<R: TokenResponse>(response: &R) -> Self {
        Self::received(response, Instant::now())
    }

    /// The token of `response` to a request sent at `sent_at`: its
    /// `expires_in` counts from then, so network time shortens the token's
    /// known life rather than lengthening it.
    pub(crate) fn received<R: TokenResponse>(response: &R, sent_at: Instant) -> Self {
        Self {
            access_token: response.access_token().clone(),
            refresh_token: response.refresh_token().cloned(),
            expires_at: response.expires_in().map(|lifetime| sent_at + lifetime),
            scopes: response.scopes().cloned(),
        }
    }

    /// This token with `refresh_token`.
    pub fn with_refresh_token(mut self, refresh_token: RefreshToken) -> Self {
        self.refresh_token = Some(refresh_token);
        self
    }

    /// This token, expiring `lifetime` from now.
    pub fn with_expires_in(mut self, lifetime: Duration) -> Self {
        self.expires_at = Some(Instant::now() + lifetime);
        self
    }

    /// This token with `scopes`.
    pub fn with_scopes(mut self, scopes: Vec<Scope>) -> Self {
        self.scopes = Some(scopes);
        self
    }

    /// The access token, to send as `Authorization: Bearer <token>`.
    pub fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    /// The refresh token to present at the next refresh, if the server
    /// issued one.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    /// When the access token expires (from the server's `expires_in`), if
    /// known. [`OAuth2Refresher::manager`](super::OAuth2Refresher::manager)
    /// refreshes ahead of it.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// The scopes granted, if the server said (or as requested, when it
    /// granted exactly those and so did not say).
    pub fn scopes(&self) -> Option<&[Scope]> {
        self.scopes.as_deref()
    }

    /// Keeps what a refresh response left out (RFC 6749 §6 and §5.1): no new
    /// refresh token means the `presented` one stays valid; no `scope` means
    /// the requested scope, or the previous one when none was requested.
    pub(crate) fn carry_over(
        mut self,
        presented: &RefreshToken,
        stale: Option<&OAuth2Token>,
        requested: &[Scope],
    ) -> Self {
        if self.refresh_token.is_none() {
            self.refresh_token = Some(presented.clone());
        }
        if self.scopes.is_none() {
            self.scopes = if requested.is_empty() {
                stale.and_then(|s| s.scopes.clone())
            } else {
                Some(requested.to_vec())
            };
        }
        self
    }
}

impl fmt::Debug for OAuth2Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Token")
            .field("access_token", &Redacted)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| Redacted),
            )
            .field("expires_at", &self.expires_at)
            .field(
                "scopes",
                &self
                    .scopes
                    .as_ref()
                    .map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// `Authorization: Bearer <access token>`, marked sensitive (see
/// [`Credential`](crate::auth::Credential)), for
/// [`AuthLayer::new`](crate::auth::AuthLayer::new) and
/// [`AuthMiddleware::new`](crate::auth::AuthMiddleware::new).
///
/// Available with the `oauth2` and `http` features.
#[cfg(feature = "http")]
impl crate::auth::Credential for OAuth2Token {
    fn apply(&self, headers: &mut http::HeaderMap) {
        self.access_token.secret().apply(headers);
    }
}

/// Stands for a secret in `Debug` output.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
