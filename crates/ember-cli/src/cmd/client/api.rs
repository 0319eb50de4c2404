//! The HTTP client of the REST API: authentication, error bodies turned
//! into [`ClientError`], JSON in and out. Streams (exec events, file
//! contents) are handed back as raw responses for [`super::exec`] and the
//! file commands to consume.
//!
//! No request is retried: the CLI is one call per invocation and a person or
//! script decides what to do with a failure (the Python SDK retries safe
//! calls itself).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::config::Endpoint;
use super::exit;
use ember_control::wire::ErrorBody;

/// Plain calls (create and resume boot VMs) finish within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no API key: pass --api-key, set EMBER_API_KEY, or put api_key = \"...\" in {} \
         (`ember server` prints an admin key on its first start; `ember key create` makes more)",
        config_hint(.config)
    )]
    MissingKey { config: Option<PathBuf> },
    #[error("config file {}: {detail}", path.display())]
    Config { path: PathBuf, detail: String },
    #[error("{url:?} is not an http:// or https:// URL of an Ember server")]
    BadUrl { url: String },
    #[error("--ca {}: {detail}", path.display())]
    Ca { path: PathBuf, detail: String },
    #[error(
        "cannot reach the Ember server at {url}: is `ember server` running there? (set EMBER_API_URL or --api-url)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server's `{code, message, field?}` answer.
    #[error("{message} ({code})")]
    Api {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
    #[error("the server's reply to {what} is not what this ember expects: {detail}")]
    BadReply { what: String, detail: String },
}

impl ClientError {
    /// See [`super::exit`].
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::MissingKey { .. } => exit::AUTH,
            ClientError::Config { .. } | ClientError::BadUrl { .. } | ClientError::Ca { .. } => {
                exit::INVALID
            }
            ClientError::Api { status, code, .. } => match (code.as_str(), *status) {
                ("not_found", _) | (_, 404) => exit::NOT_FOUND,
                ("unauthorized" | "forbidden", _) | (_, 401 | 403) => exit::AUTH,
                ("conflict", _) | (_, 409) => exit::CONFLICT,
                ("no_capacity", _) => exit::NO_CAPACITY,
                (_, 400..=499) => exit::INVALID,
                _ => exit::EMBER_FAILED,
            },
            ClientError::Unreachable { .. }
            | ClientError::Transport { .. }
            | ClientError::BadReply { .. } => exit::EMBER_FAILED,
        }
    }

    /// The API error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn config_hint(config: &Option<PathBuf>) -> String {
    config.as_ref().map_or_else(
        || "~/.config/ember/config.toml".to_owned(),
        |p| p.display().to_string(),
    )
}

/// A client of one server with one key.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    /// A client for `endpoint`; fails if it has no key.
    pub fn new(endpoint: &Endpoint) -> Result<Api, ClientError> {
        let key = endpoint.key()?.to_owned();
        if !endpoint.url.starts_with("http://") && !endpoint.url.starts_with("https://") {
            return Err(ClientError::BadUrl {
                url: endpoint.url.clone(),
            });
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &endpoint.ca {
            let bad = |detail: String| ClientError::Ca {
                path: path.clone(),
                detail,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("ember-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Transport {
                url: endpoint.url.clone(),
                source,
            })?;
        Ok(Api {
            http,
            base: endpoint.url.clone(),
            key,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` (starting with `/v1/`), authenticated.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Send; a non-2xx answer becomes [`ClientError::Api`]. The response
    /// body is left unread (it may be a stream).
    pub async fn send(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        let url = self.base.clone();
        let resp = req.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable { url, source }
            } else {
                ClientError::Transport { url, source }
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error_from(resp).await)
    }

    /// A JSON call: `body` is sent as JSON when present; the answer is the
    /// JSON value (`null` for 204).
    pub async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Value, ClientError> {
        let mut req = self.request(method, path).timeout(CALL_TIMEOUT);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = self.send(req).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let what = path.to_owned();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadReply {
            what,
            detail: e.to_string(),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call::<()>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Value, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Value, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call::<()>(Method::DELETE, path, None).await
    }
}

/// Read a typed value out of a JSON answer.
pub fn typed<T: DeserializeOwned>(what: &str, value: &Value) -> Result<T, ClientError> {
    T::deserialize(value).map_err(|e| ClientError::BadReply {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// Percent-encode one path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The error in a non-2xx response.
pub async fn error_from(resp: Response) -> ClientError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => ClientError::Api {
            status: status.as_u16(),
            code: b.code,
            message: b.message,
            field: b.field,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: if text.trim().is_empty() {
                format!("the server answered {status}")
            } else {
                format!("the server answered {status}: {}", text.trim())
            },
            field: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            status,
            code: code.into(),
            message: "m".into(),
            field: None,
        }
    }

    #[test]
    fn api_errors_map_to_documented_exit_codes() {
        assert_eq!(api_error(404, "not_found").exit_code(), exit::NOT_FOUND);
        assert_eq!(api_error(401, "unauthorized").exit_code(), exit::AUTH);
        assert_eq!(api_error(403, "forbidden").exit_code(), exit::AUTH);
        assert_eq!(api_error(409, "conflict").exit_code(), exit::CONFLICT);
        assert_eq!(api_error(503, "no_capacity").exit_code(), exit::NO_CAPACITY);
        assert_eq!(api_error(400, "invalid_request").exit_code(), exit::INVALID);
        assert_eq!(api_error(422, "template_locked").exit_code(), exit::INVALID);
        assert_eq!(api_error(502, "host_error").exit_code(), exit::EMBER_FAILED);
        assert_eq!(api_error(500, "internal").exit_code(), exit::EMBER_FAILED);
        assert_eq!(
            ClientError::MissingKey { config: None }.exit_code(),
            exit::AUTH
        );
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode("sb-abc_1.2~"), "sb-abc_1.2~");
        assert_eq!(encode("/a b/ü"), "%2Fa%20b%2F%C3%BC");
        assert_eq!(encode("x?y=z&w"), "x%3Fy%3Dz%26w");
    }
}
