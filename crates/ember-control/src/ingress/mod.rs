//! Ingress: HTTP (and any TCP) into what listens inside a sandbox.
//!
//! A request reaches port P of sandbox S in one of three forms:
//! - **host**: `P-S.{domain}`, where the operator set `--ingress-domain`
//!   and points wildcard DNS at the server. The form for browsers: each
//!   port of each sandbox is its own origin.
//! - **path**: `/v1/sandboxes/S/ports/P/…` on the API's own address (no
//!   DNS needed). The guest sees the rest of the path. Responses carry
//!   `Content-Security-Policy: sandbox …`, because a page served here
//!   shares the API's origin: its scripts run in an opaque origin instead,
//!   and cookies are not accepted as credentials on this form.
//! - **header**: `X-Ember-Sandbox-Id: S` and `X-Ember-Port: P` on any path
//!   (for a front proxy that routes by itself).
//!
//! Access: a sandbox is private unless created (or later set) `public`. A
//! private sandbox's ports need its traffic token (`X-Ember-Traffic-Token`,
//! or E2B's `E2b-Traffic-Access-Token`; on the host form also the cookie a
//! one-time link sets), an API key of its team, or its access token. The
//! credential is removed before the request reaches the guest: the guest is
//! hostile and must never see a key.
//!
//! A paused sandbox with `auto_resume` is resumed by the first request,
//! which is held until the port answers; without it the answer is 409.
//! Bytes travel through the sandbox's host agent (`OpenPort`), which dials
//! the guest at its slot address: the control plane never enters a
//! sandbox's network namespace, and the sandbox's own egress rules are
//! untouched. Traffic counts as activity for the sandbox's timeout.

mod proxy;
pub mod tunnel;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use proxy::{TCP_UPGRADE, link_ticket as proxy_link_ticket, open_port, serve_tunnel};

use crate::api::AppState;

/// envd's port: host names for it belong to the E2B adapter.
pub const ENVD_PORT: u16 = 49983;
/// Headers of the header form.
pub const SANDBOX_HEADER: &str = "x-ember-sandbox-id";
pub const PORT_HEADER: &str = "x-ember-port";
/// Headers that carry a traffic token.
pub const TRAFFIC_TOKEN_HEADER: &str = "x-ember-traffic-token";
pub const E2B_TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// The cookie a one-time link sets (host form only).
pub const TRAFFIC_COOKIE: &str = "ember_traffic";
/// The query parameter that carries a one-time link's ticket.
pub const LINK_PARAM: &str = "ember_link";
/// How long a one-time link may wait to be opened.
pub const LINK_TTL: Duration = Duration::from_secs(120);

/// How the operator exposes sandbox ports.
#[derive(Debug, Clone, Default)]
pub struct IngressConfig {
    /// `P-S.{domain}` host names are sandbox ports (lower case, may end in
    /// `:port`). `None`: only the path and header forms.
    pub domain: Option<String>,
    /// `http` or `https`: how URLs of the host form are written.
    pub scheme: String,
    /// How long a guest server may take to start answering a request.
    pub response_timeout: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long a request waits for a paused sandbox to resume and its
    /// port to answer.
    pub wake_timeout: Duration,
}

impl IngressConfig {
    /// From `--ingress-domain`: `example.com`, `https://example.com` or
    /// `http://localhost:8080` (the scheme defaults to https).
    pub fn from_domain(arg: Option<&str>) -> Result<IngressConfig, String> {
        let mut config = IngressConfig {
            scheme: "https".to_owned(),
            response_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(15 * 60),
            wake_timeout: Duration::from_secs(120),
            domain: None,
        };
        let Some(arg) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
            return Ok(config);
        };
        let (scheme, domain) = match arg.split_once("://") {
            Some((s, d)) => (s.to_ascii_lowercase(), d),
            None => ("https".to_owned(), arg),
        };
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "--ingress-domain {arg:?}: the scheme must be http or https"
            ));
        }
        let domain = domain.trim_end_matches('/').to_ascii_lowercase();
        let host = domain.split(':').next().unwrap_or("");
        let valid = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            && domain
                .split_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_ok());
        if !valid {
            return Err(format!(
                "--ingress-domain {arg:?} is not a DNS name (like sandboxes.example.com, optionally with :port)"
            ));
        }
        config.scheme = scheme;
        config.domain = Some(domain);
        Ok(config)
    }

    /// The URL of `port` of sandbox `id` on the host form, if there is one.
    pub fn host_url(&self, id: &str, port: u16) -> Option<String> {
        let domain = self.domain.as_ref()?;
        Some(format!("{}://{port}-{id}.{domain}/", self.scheme))
    }
}

/// The ingress's state in a server: its configuration and the one-time
/// links already used (per replica: a link is also bounded by its expiry).
#[derive(Debug, Default)]
pub struct Ingress {
    pub config: IngressConfig,
    used_links: Mutex<HashMap<String, i64>>,
}

impl Ingress {
    pub fn new(config: IngressConfig) -> Ingress {
        Ingress {
            config,
            used_links: Mutex::default(),
        }
    }

    /// Mark a link's nonce used; false if it already was.
    fn use_link(&self, nonce: &str, expires_ms: i64, now_ms: i64) -> bool {
        let mut used = self.used_links.lock().expect("link set lock");
        used.retain(|_, exp| *exp > now_ms);
        used.insert(nonce.to_owned(), expires_ms).is_none()
    }
}

/// Which form named the port, and what the guest's server is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
    pub form: Form,
    /// Origin-form request target for the guest (`/path?query`).
    pub path_and_query: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    Host,
    /// With the prefix the guest does not see (`/v1/sandboxes/S/ports/P`).
    Path {
        prefix: String,
    },
    Header,
}

/// A request that names a host-form host that is not a sandbox port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHost(pub String);

/// The host a request was sent to (HTTP/1 `Host`, or HTTP/2's authority).
fn request_host(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
        .map(|h| h.to_ascii_lowercase())
}

/// Is this request for a sandbox port, and which?
pub fn route(config: &IngressConfig, req: &Request) -> Option<Result<Target, BadHost>> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    if let Some(domain) = &config.domain
        && let Some(host) = request_host(req)
        && let Some(label) = host_label(&host, domain)
    {
        return match parse_label(label) {
            Some((port, _)) if port == ENVD_PORT => None,
            Some((port, id)) => Some(Ok(Target {
                sandbox_id: id,
                port,
                form: Form::Host,
                path_and_query,
            })),
            None => Some(Err(BadHost(host))),
        };
    }
    if let Some(target) = path_form(&path_and_query) {
        return Some(Ok(target));
    }
    header_form(req.headers(), path_and_query)
}

/// The first label of `host` when the rest is `domain` (a port on the host
/// is ignored when the domain has none).
fn host_label<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let (label, rest) = host.split_once('.')?;
    let matches =
        rest == domain || (!domain.contains(':') && rest.split(':').next() == Some(domain));
    matches.then_some(label)
}

/// `P-S` → (P, S).
fn parse_label(label: &str) -> Option<(u16, String)> {
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let id = id.parse::<ember_types::SandboxId>().ok()?;
    Some((port, id.to_string()))
}

fn path_form(path_and_query: &str) -> Option<Target> {
    let rest = path_and_query.strip_prefix("/v1/sandboxes/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("ports/")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (port, tail) = rest.split_at(end);
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let id = id.parse::<ember_types::SandboxId>().ok()?.to_string();
    let prefix = format!("/v1/sandboxes/{id}/ports/{port}");
    let path_and_query = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    Some(Target {
        sandbox_id: id,
        port,
        form: Form::Path { prefix },
        path_and_query,
    })
}

fn header_form(headers: &HeaderMap, path_and_query: String) -> Option<Result<Target, BadHost>> {
    let id = headers.get(SANDBOX_HEADER)?.to_str().ok()?.trim();
    let port = headers.get(PORT_HEADER)?.to_str().ok()?.trim();
    let parsed = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .zip(id.parse::<ember_types::SandboxId>().ok());
    Some(match parsed {
        Some((port, id)) => Ok(Target {
            sandbox_id: id.to_string(),
            port,
            form: Form::Header,
            path_and_query,
        }),
        None => Err(BadHost(format!(
            "{SANDBOX_HEADER}: {id}, {PORT_HEADER}: {port}"
        ))),
    })
}

/// Send sandbox-port requests to the proxy; everything else goes on.
pub async fn dispatch(state: AppState, req: Request, next: Next) -> Response {
    match route(&state.ingress.config, &req) {
        Some(Ok(target)) => proxy::serve(state, target, req).await,
        Some(Err(BadHost(what))) => crate::api::ApiError::not_found(format!(
            "{what} names no sandbox port: use {{port}}-{{sandbox id}}.{} or /v1/sandboxes/{{id}}/ports/{{port}}/",
            state.ingress.config.domain.as_deref().unwrap_or("<domain>")
        ))
        .into_response(),
        None => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, uri: &str) -> Request {
        axum::http::Request::builder()
            .uri(uri)
            .header(header::HOST, host)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    fn config(domain: &str) -> IngressConfig {
        IngressConfig::from_domain(Some(domain)).unwrap()
    }

    #[test]
    fn domains_parse_with_a_scheme_and_port_or_are_refused() {
        let c = config("http://Localhost:8080/");
        assert_eq!(c.domain.as_deref(), Some("localhost:8080"));
        assert_eq!(c.scheme, "http");
        let c = config("sandboxes.example.com");
        assert_eq!(c.scheme, "https");
        assert_eq!(
            c.host_url("sb-abc", 8000).as_deref(),
            Some("https://8000-sb-abc.sandboxes.example.com/")
        );
        for bad in ["ftp://x.com", "exa mple.com", "x..com", "x.com:port", "://"] {
            let err = IngressConfig::from_domain(Some(bad)).unwrap_err();
            assert!(err.contains("--ingress-domain"), "{bad}: {err}");
        }
        assert_eq!(IngressConfig::from_domain(None).unwrap().domain, None);
    }

    #[test]
    fn the_three_forms_route_and_envd_and_api_paths_do_not() {
        let id = ember_types::SandboxId::new().to_string();
        let c = config("box.test");
        let t = route(&c, &req(&format!("8000-{id}.box.test"), "/a/b?c=d"))
            .unwrap()
            .unwrap();
        assert_eq!((t.port, t.form.clone()), (8000, Form::Host));
        assert_eq!(
            (t.sandbox_id.as_str(), t.path_and_query.as_str()),
            (id.as_str(), "/a/b?c=d")
        );
        // The host's port is ignored when the domain has none.
        let t = route(&c, &req(&format!("8000-{id}.box.test:443"), "/")).unwrap();
        assert!(t.is_ok());
        // envd's port is the E2B adapter's; other hosts are the API's.
        assert!(route(&c, &req(&format!("{ENVD_PORT}-{id}.box.test"), "/")).is_none());
        assert!(route(&c, &req("api.example.com", "/v1/sandboxes")).is_none());
        assert!(route(&c, &req("nota-port.box.test", "/")).unwrap().is_err());

        let t = route(
            &c,
            &req("api", &format!("/v1/sandboxes/{id}/ports/3000/x/y?q=1")),
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.path_and_query, "/x/y?q=1");
        assert_eq!(
            t.form,
            Form::Path {
                prefix: format!("/v1/sandboxes/{id}/ports/3000")
            }
        );
        let t = route(
            &c,
            &req("api", &format!("/v1/sandboxes/{id}/ports/3000?q=1")),
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.path_and_query, "/?q=1");
        assert!(route(&c, &req("api", &format!("/v1/sandboxes/{id}/ports/0/"))).is_none());
        assert!(route(&c, &req("api", &format!("/v1/sandboxes/{id}/files"))).is_none());

        let mut r = req("anything", "/p");
        r.headers_mut().insert(SANDBOX_HEADER, id.parse().unwrap());
        r.headers_mut().insert(PORT_HEADER, "81".parse().unwrap());
        let t = route(&c, &r).unwrap().unwrap();
        assert_eq!(
            (t.port, t.form, t.path_and_query.as_str()),
            (81, Form::Header, "/p")
        );
        r.headers_mut().insert(PORT_HEADER, "http".parse().unwrap());
        assert!(route(&c, &r).unwrap().is_err());
    }

    #[test]
    fn one_time_links_are_used_once() {
        let ingress = Ingress::new(IngressConfig::default());
        assert!(ingress.use_link("n1", 2_000, 1_000));
        assert!(!ingress.use_link("n1", 2_000, 1_500));
        // Expired entries are forgotten (the expiry check refuses the link).
        assert!(ingress.use_link("n1", 4_000, 3_000));
    }
}
