//! One exchange between a client and a guest's server: the request the
//! guest gets, the answer the client gets, upgrades spliced.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    E2B_TRAFFIC_TOKEN_HEADER, Form, PORT_HEADER, SANDBOX_HEADER, TRAFFIC_COOKIE,
    TRAFFIC_TOKEN_HEADER, Target,
};

/// What a page served on the path form may do (it shares an origin with every
/// other sandbox, so it gets an opaque one).
pub const PATH_FORM_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Credentials the request used, to be removed before the guest sees it.
#[derive(Debug, Default)]
pub struct Strip {
    /// The `Authorization` header was Ember's (an API key or access token).
    pub authorization: bool,
}

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The request as the guest's server gets it: origin-form target, HTTP/1.1,
/// no hop-by-hop headers or Ember credentials, `X-Forwarded-*` added.
pub fn upstream_request(
    req: Request,
    target: &Target,
    strip: &Strip,
    client_ip: Option<std::net::IpAddr>,
) -> Result<Request, RelayError> {
    let upgrade = is_upgrade(req.headers());
    let (parts, body) = req.into_parts();
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 4);
    let named_by_connection: Vec<String> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        let dropped = HOP_BY_HOP.contains(&n)
            || named_by_connection.iter().any(|c| c == n)
            || n == TRAFFIC_TOKEN_HEADER
            || n == E2B_TRAFFIC_TOKEN_HEADER
            || n == SANDBOX_HEADER
            || n == PORT_HEADER
            || (strip.authorization && name == header::AUTHORIZATION)
            || name == header::COOKIE;
        if !dropped {
            headers.append(name.clone(), value.clone());
        }
    }
    // Cookies go on, less the one that carries the traffic token; none on
    // the path form, where every sandbox shares the API's origin (a
    // browser would send one sandbox's cookies to all the others).
    let path_form = matches!(target.form, Form::Path { .. });
    let cookies: Vec<&str> = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split('=').next() != Some(TRAFFIC_COOKIE))
        .collect();
    if !path_form
        && !cookies.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(proto) = parts.headers.get(header::UPGRADE) {
            headers.insert(header::UPGRADE, proto.clone());
        }
    }
    if let Some(host) = &original_host {
        headers.insert(header::HOST, host.clone());
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    if let Some(ip) = client_ip {
        let forwarded_for = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => format!("{prior}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
    }
    if let Form::Path { prefix } = &target.form
        && let Ok(v) = HeaderValue::from_str(prefix)
    {
        headers.insert(HeaderName::from_static("x-forwarded-prefix"), v);
    }
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(&target.path_and_query)
        .version(Version::HTTP_11)
        .body(body)
        .map_err(|e| {
            RelayError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("not a valid request target: {e}"),
            )
        })?;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Send `req` over `stream` (a connection to the guest port) and return
/// the guest's answer; after a `101`, splice the client's upgraded
/// connection (`client_upgrade`) to the guest's. `what` names the port in
/// errors ("port 8000 in sandbox sb-…").
pub async fn exchange<S>(
    stream: S,
    req: Request,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    response_timeout: Duration,
    what: &str,
) -> Result<Response, RelayError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let no_answer = |e: &dyn std::fmt::Display| {
        RelayError::new(
            StatusCode::BAD_GATEWAY,
            "bad_upstream",
            format!("the server on {what} did not answer with HTTP: {e}"),
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| no_answer(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "ingress upstream connection ended");
        }
    });
    let mut resp = match tokio::time::timeout(response_timeout, sender.send_request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(no_answer(&e)),
        Err(_) => {
            return Err(RelayError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "the server on {what} did not answer within {}s",
                    response_timeout.as_secs()
                ),
            ));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let what = what.to_owned();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => tracing::debug!(port = %what, error = %e, "ingress upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        let mut out = Response::from_parts(parts, Body::empty());
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(out);
    }
    let (mut parts, body) = resp.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Copy bytes both ways between `a` and `b` until both directions have
/// ended, either side fails, or nothing moved for `idle`. Half-closes are
/// passed on.
pub async fn splice_idle<A, B>(a: A, b: B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut abuf, mut bbuf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let (mut a_open, mut b_open) = (true, true);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    while a_open || b_open {
        tokio::select! {
            n = ar.read(&mut abuf), if a_open => match n {
                Ok(0) => {
                    a_open = false;
                    let _ = bw.shutdown().await;
                }
                Ok(n) => {
                    if bw.write_all(&abuf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            n = br.read(&mut bbuf), if b_open => match n {
                Ok(0) => {
                    b_open = false;
                    let _ = aw.shutdown().await;
                }
                Ok(n) => {
                    if aw.write_all(&bbuf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            _ = &mut timer => {
                tracing::debug!("closing an idle port connection");
                return;
            }
        }
        timer.as_mut().reset(tokio::time::Instant::now() + idle);
    }
}

/// What every answer on `form` gets before it goes back: on the path form
/// (an origin shared with every other sandbox) no cookie from the guest,
/// and a CSP that gives its pages an opaque origin.
pub fn finish(form: &Form, resp: &mut Response) {
    if matches!(form, Form::Path { .. }) {
        resp.headers_mut().remove(header::SET_COOKIE);
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PATH_FORM_CSP),
        );
    }
}

/// The traffic token a request presents: a header, or on the host form
/// the cookie a one-time link set.
pub fn presented_token(headers: &HeaderMap, form: &Form) -> Option<String> {
    [TRAFFIC_TOKEN_HEADER, E2B_TRAFFIC_TOKEN_HEADER]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .map(str::to_owned)
        .or_else(|| {
            (*form == Form::Host)
                .then(|| cookie(headers, TRAFFIC_COOKIE))
                .flatten()
        })
}

/// Why an exchange could not be relayed: an HTTP status, a stable code and
/// a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl RelayError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> RelayError {
        RelayError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for RelayError {}

pub fn query_param(path_and_query: &str, name: &str) -> Option<String> {
    let (_, query) = path_and_query.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub fn without_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| kv.split('=').next() != Some(name))
        .collect();
    if rest.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", rest.join("&"))
    }
}

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LINK_PARAM;

    #[test]
    fn query_params_are_found_and_removed() {
        assert_eq!(
            query_param("/a?x=1&ember_link=t.n.s", LINK_PARAM).as_deref(),
            Some("t.n.s")
        );
        assert_eq!(query_param("/a", LINK_PARAM), None);
        assert_eq!(without_param("/a?ember_link=z", LINK_PARAM), "/a");
        assert_eq!(
            without_param("/a?x=1&ember_link=z&y=2", LINK_PARAM),
            "/a?x=1&y=2"
        );
    }

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().uri("http://h/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn the_guest_never_sees_ember_credentials_or_hop_headers() {
        let target = Target {
            sandbox_id: "sb-x".into(),
            port: 80,
            form: Form::Path {
                prefix: "/v1/sandboxes/sb-x/ports/80".into(),
            },
            path_and_query: "/x?y=1".into(),
        };
        let req = request(&[
            ("host", "api.example"),
            ("authorization", "Bearer ember_abcdefgh_secret"),
            (TRAFFIC_TOKEN_HEADER, "embertraffic_x"),
            (E2B_TRAFFIC_TOKEN_HEADER, "embertraffic_x"),
            ("cookie", "a=1; ember_traffic=secret; b=2"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("x-app", "kept"),
        ]);
        let strip = Strip {
            authorization: true,
        };
        let host_target = Target {
            form: Form::Host,
            ..target.clone()
        };
        let cookie_req = request(&[("cookie", "a=1; ember_traffic=secret; b=2")]);
        let out = upstream_request(cookie_req, &host_target, &Strip::default(), None).unwrap();
        assert_eq!(out.headers()["cookie"], "a=1; b=2");
        let out = upstream_request(req, &target, &strip, Some([10, 0, 0, 9].into())).unwrap();
        let h = out.headers();
        for gone in [
            "authorization",
            TRAFFIC_TOKEN_HEADER,
            E2B_TRAFFIC_TOKEN_HEADER,
            "connection",
            "x-private",
            "keep-alive",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded: {h:?}");
        }
        assert!(
            !h.contains_key("cookie"),
            "no cookies on the path form: {h:?}"
        );
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h["host"], "api.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-prefix"], "/v1/sandboxes/sb-x/ports/80");
        assert_eq!(out.uri(), "/x?y=1");
        assert_eq!(out.version(), Version::HTTP_11);

        // An Authorization that was not Ember's goes to the app.
        let req = request(&[
            ("authorization", "Basic dXNlcjpwdw=="),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
        ]);
        let out = upstream_request(req, &target, &Strip::default(), None).unwrap();
        assert_eq!(out.headers()["authorization"], "Basic dXNlcjpwdw==");
        assert_eq!(out.headers()["upgrade"], "websocket");
        assert_eq!(out.headers()["connection"], "upgrade");
    }
}
