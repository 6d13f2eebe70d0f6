//! A small client of the public SHERS API, shared by the demo simulators and the load
//! generator: JSON over HTTP with a bearer token, and WebSockets with the same token.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket to SHERS.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One principal's view of the API: a base URL and a bearer token. Cheap to clone (the
/// connection pool is shared).
#[derive(Clone, Debug)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// A non-2xx answer: the status and the problem+json body (or the raw text).
#[derive(Debug, thiserror::Error)]
#[error("{method} {path} answered {status}: {body}")]
pub struct ApiStatusError {
    /// Request method.
    pub method: &'static str,
    /// Request path.
    pub path: String,
    /// Response status.
    pub status: StatusCode,
    /// Response body.
    pub body: String,
}

impl Api {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8080`) acting with `token`.
    pub fn new(base_url: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// The same server and connection pool, acting with another token.
    pub fn with_token(&self, token: &str) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            token: token.to_owned(),
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The underlying HTTP client (shared pool).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET path` → JSON; a non-2xx status is an [`ApiStatusError`].
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        Self::json("GET", path, resp).await
    }

    /// `POST path` with a JSON body → JSON (`null` for an empty body); non-2xx is an error.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self.post_raw(path, body).await?;
        Self::json("POST", path, resp).await
    }

    /// `POST path` with a JSON body, returning the response whatever its status.
    pub async fn post_raw(&self, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))
    }

    async fn json(
        method: &'static str,
        path: &str,
        resp: reqwest::Response,
    ) -> anyhow::Result<Value> {
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("{method} {path}: reading the body"))?;
        if !status.is_success() {
            return Err(ApiStatusError {
                method,
                path: path.to_owned(),
                status,
                body: text,
            }
            .into());
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: body is not JSON"))
    }

    /// Opens a WebSocket at `path` (which may carry a query string), authenticated with the
    /// bearer token in the `Authorization` header.
    pub async fn ws(&self, path: &str) -> anyhow::Result<Ws> {
        let url = format!("{}{path}", self.base.replacen("http", "ws", 1));
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("WebSocket URL {path}"))?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.token))
            .context("token is not a valid header value")?;
        request.headers_mut().insert("authorization", auth);
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .with_context(|| format!("connecting the WebSocket {path}"))?;
        Ok(ws)
    }
}
