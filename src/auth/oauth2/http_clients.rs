//! The `oauth2` crate's HTTP-client traits for the clients this crate
//! integrates with: [`ReqwestClient`] (reqwest 0.13; `oauth2` 5 implements
//! its trait only for reqwest 0.12) and [`UreqAgent`] (ureq 3; `oauth2` 5
//! knows ureq 2).

#[cfg(feature = "reqwest")]
pub use self::reqwest_client::ReqwestClient;
#[cfg(feature = "ureq")]
pub use self::ureq_agent::UreqAgent;

#[cfg(feature = "reqwest")]
mod reqwest_client {
    use std::future::Future;
    use std::pin::Pin;

    use ::oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};

    /// A [`reqwest::Client`] (0.13) as the `oauth2` crate's
    /// [`AsyncHttpClient`], for [`OAuth2Refresher`](super::super::OAuth2Refresher)
    /// or for any `oauth2` request (`request_async(&client)`).
    ///
    /// Give the token requests a client of their own, not one behind
    /// [`AuthMiddleware`](crate::auth::AuthMiddleware) (a token request
    /// there would wait at the request gate for the refresh it belongs to).
    /// Build it without redirects, as the `oauth2` crate advises against
    /// SSRF, and with a timeout shorter than your callers' patience: a
    /// refresh cancelled after its request left can cost a rotated refresh
    /// token. `https` token URLs need one of reqwest's TLS features, enabled
    /// in your own `reqwest` dependency.
    ///
    /// Available with the `oauth2` and `reqwest` features.
    ///
    /// # Examples
    ///
    /// An API client whose requests carry the access token, refreshed with
    /// the refresh-token grant when it expires or is refused:
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use epochflight::auth::AuthMiddleware;
    /// use epochflight::auth::oauth2::{
    ///     ClientId, ClientSecret, OAuth2Refresher, OAuth2Token, ReqwestClient, Scope, TokenUrl,
    /// };
    ///
    /// # async fn run(login: OAuth2Token) -> Result<(), Box<dyn std::error::Error>> {
    /// let token_client = reqwest::Client::builder()
    ///     .redirect(reqwest::redirect::Policy::none())
    ///     .timeout(Duration::from_secs(10))
    ///     .build()?;
    /// let manager = Arc::new(
    ///     OAuth2Refresher::new(
    ///         ReqwestClient::new(token_client),
    ///         ClientId::new("my-app".into()),
    ///         TokenUrl::new("https://auth.example/token".into())?,
    ///     )
    ///     .client_secret(ClientSecret::new("s3cret".into()))
    ///     .scopes([Scope::new("read".into())])
    ///     .manager(),
    /// );
    /// manager.sign_in(login); // the token of the login (authorization code exchange)
    /// let api = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    ///     .with(AuthMiddleware::new(manager))
    ///     .build();
    /// let items = api.get("https://api.example/items").send().await?;
    /// println!("{}", items.status());
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Clone, Debug)]
    pub struct ReqwestClient(reqwest::Client);

    impl ReqwestClient {
        /// Wraps `client`.
        pub fn new(client: reqwest::Client) -> Self {
            Self(client)
        }

        /// The wrapped client.
        pub fn client(&self) -> &reqwest::Client {
            &self.0
        }
    }

    impl From<reqwest::Client> for ReqwestClient {
        fn from(client: reqwest::Client) -> Self {
            Self(client)
        }
    }

    type ResponseFuture<'c> =
        Pin<Box<dyn Future<Output = Result<HttpResponse, reqwest::Error>> + Send + 'c>>;

    impl<'c> AsyncHttpClient<'c> for ReqwestClient {
        type Error = reqwest::Error;
        type Future = ResponseFuture<'c>;

        fn call(&'c self, request: HttpRequest) -> Self::Future {
            Box::pin(async move {
                let response = self.0.execute(request.try_into()?).await?;
                let (status, version) = (response.status(), response.version());
                let headers = response.headers().clone();
                let mut converted = HttpResponse::new(response.bytes().await?.to_vec());
                *converted.status_mut() = status;
                *converted.version_mut() = version;
                *converted.headers_mut() = headers;
                Ok(converted)
            })
        }
    }
}

#[cfg(feature = "ureq")]
mod ureq_agent {
    use ::oauth2::{HttpRequest, HttpResponse, SyncHttpClient};

    /// A [`ureq::Agent`] (ureq 3) as the `oauth2` crate's
    /// [`SyncHttpClient`], for
    /// [`OAuth2Refresher::blocking_manager`](super::super::OAuth2Refresher::blocking_manager)
    /// or for any `oauth2` request (`request(&agent)`).
    ///
    /// Each token request is sent with ureq's `http_status_as_error` off (an
    /// error response such as `400 invalid_grant` is read, not turned into
    /// `Err(StatusCode(400))`) and without following redirects. Timeouts
    /// and TLS come from the agent's configuration; `https` token URLs need
    /// one of ureq's TLS features, enabled in your own `ureq` dependency.
    ///
    /// Available with the `oauth2` and `ureq` features.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use epochflight::auth::oauth2::UreqAgent;
    ///
    /// let agent: ureq::Agent = ureq::Agent::config_builder()
    ///     .timeout_global(Some(Duration::from_secs(10)))
    ///     .build()
    ///     .into();
    /// let http = UreqAgent::new(agent);
    /// # let _ = http;
    /// ```
    #[derive(Clone, Debug)]
    pub struct UreqAgent(ureq::Agent);

    impl UreqAgent {
        /// Wraps `agent`.
        pub fn new(agent: ureq::Agent) -> Self {
            Self(agent)
        }

        /// The wrapped agent.
        pub fn agent(&self) -> &ureq::Agent {
            &self.0
        }
    }

    impl From<ureq::Agent> for UreqAgent {
        fn from(agent: ureq::Agent) -> Self {
            Self(agent)
        }
    }

    impl SyncHttpClient for UreqAgent {
        type Error = ureq::Error;

        fn call(&self, request: HttpRequest) -> Result<HttpResponse, ureq::Error> {
            let request = self
                .0
                .configure_request(request)
                .http_status_as_error(false)
                .max_redirects(0)
                .build();
            let (head, mut body) = self.0.run(request)?.into_parts();
            let body = body.read_to_vec()?;
            Ok(HttpResponse::from_parts(head, body))
        }
    }
}
