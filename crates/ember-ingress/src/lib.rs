//! HTTP into sandbox ports, shared by `ember server` and each `ember agent`.
//!
//! A request reaches port P of sandbox S in one of three forms:
//! - **host**: `P-S.{domain}`, where the operator set an ingress domain
//!   and points wildcard DNS at the server or agent. The form for browsers:
//!   each port of each sandbox is its own origin.
//! - **path**: `/v1/sandboxes/S/ports/P/…` (no DNS needed). The guest sees
//!   the rest of the path. Responses carry `Content-Security-Policy:
//!   sandbox …`, because a page served here shares an origin with every
//!   other sandbox: its scripts run in an opaque origin instead, and
//!   cookies are neither accepted as credentials nor passed either way.
//! - **header**: `X-Ember-Sandbox-Id: S` and `X-Ember-Port: P` on any path
//!   (for a front proxy that routes by itself).
//!
//! [`route`] says which form (if any) a request uses; [`relay`] turns it
//! into the request the guest's server gets (no hop-by-hop headers, no
//! Ember credential: the guest is hostile and must never see a key) and
//! carries one exchange, or an upgraded connection, over any byte stream
//! to the guest port. Who may reach a port, and how the stream is opened,
//! is the caller's: the control plane through the host agent's `OpenPort`,
//! an agent by dialling the guest itself.

pub mod relay;

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

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

/// What a host agent keeps of a traffic token: its SHA-256. An agent
/// checks tokens without holding a key that could mint them.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// Does `token` hash to `digest`? (Constant time in the digest.)
pub fn token_matches(token: &str, digest: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    digest.len() == 32 && bool::from(token_digest(token).ct_eq(digest))
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
    fn tokens_match_their_digest_only() {
        let d = token_digest("embertraffic_abc");
        assert!(token_matches("embertraffic_abc", &d));
        assert!(token_matches(" embertraffic_abc ", &d));
        assert!(!token_matches("embertraffic_abd", &d));
        assert!(!token_matches("embertraffic_abc", &d[..31]));
        assert!(!token_matches("", &[]));
    }
}
