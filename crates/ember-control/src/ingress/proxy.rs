//! The reverse proxy: authorise, wake if asked to, open the guest port
//! through the sandbox's host, and relay one HTTP exchange (or an upgraded
//! connection: WebSocket and any other `Upgrade`) over it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;

use super::tunnel::{self, OpenError};
use super::{
    E2B_TRAFFIC_TOKEN_HEADER, Form, LINK_PARAM, PORT_HEADER, SANDBOX_HEADER, TRAFFIC_COOKIE,
    TRAFFIC_TOKEN_HEADER, Target,
};
use crate::api::{ApiError, AppState};
use crate::auth::{self, Caller};
use crate::error::Error;
use crate::model::{Sandbox, SandboxState, now_ms};

/// How often a waiting request looks at a resuming sandbox's row.
const WAKE_POLL: Duration = Duration::from_millis(50);
/// After a wake, how long a refused port is retried (the guest's server
/// may still be accepting its restored listen socket's backlog).
const WOKEN_PORT_RETRY: Duration = Duration::from_secs(10);
/// The upgrade protocol of `GET /v1/sandboxes/{id}/tunnel/{port}`.
pub const TCP_UPGRADE: &str = "ember-tcp";
/// What a page served on the path form may do (it shares the API's origin,
/// so it gets an opaque one).
const PATH_FORM_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
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

/// Serve one request for a sandbox port.
pub async fn serve(state: AppState, target: Target, req: Request) -> Response {
    let started = Instant::now();
    let result = serve_inner(&state, &target, req, started).await;
    let outcome = match &result {
        Ok(resp) => resp.status().as_u16().to_string(),
        Err(e) => e.status.as_u16().to_string(),
    };
    state.metrics.ingress_request(&outcome);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn serve_inner(
    state: &AppState,
    target: &Target,
    mut req: Request,
    started: Instant,
) -> Result<Response, ApiError> {
    let sb = visible(state, &target.sandbox_id).await?;
    if target.form == Form::Host
        && let Some(ticket) = query_param(&target.path_and_query, LINK_PARAM)
    {
        return redeem_link(state, &sb, target, &ticket);
    }
    let strip = authorize(state, &sb, target, req.headers()).await?;
    let (sb, woke) = ensure_running(state, sb).await?;
    let pipe = open_port(state, &sb, target.port, woke.is_some()).await?;
    touch(state, &sb).await;
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upstream_req = upstream_request(req, target, &strip, client_ip)?;
    let mut resp = exchange(state, &sb, target.port, pipe, upstream_req, upgrade).await?;
    if let Some(woke) = woke {
        let ms = woke.as_millis().to_string();
        if let Ok(v) = HeaderValue::from_str(&ms) {
            resp.headers_mut().insert("x-ember-woke-ms", v);
        }
        state
            .metrics
            .observe("wake_first_response", started.elapsed().as_secs_f64());
    }
    if matches!(target.form, Form::Path { .. }) {
        // Shared origin: a guest sets no cookie there either.
        resp.headers_mut().remove(header::SET_COOKIE);
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PATH_FORM_CSP),
        );
    }
    Ok(resp)
}

/// The sandbox, unless it does not exist or is destroyed (404 either way).
async fn visible(state: &AppState, id: &str) -> Result<Sandbox, ApiError> {
    state
        .store
        .sandbox(None, id)
        .await?
        .filter(|sb| sb.state != SandboxState::Destroyed)
        .ok_or_else(|| Error::SandboxNotFound { id: id.to_owned() }.into())
}

/// Credentials the request used, to be removed before the guest sees it.
#[derive(Debug, Default)]
struct Strip {
    authorization: bool,
}

/// May this request reach the sandbox's ports?
async fn authorize(
    state: &AppState,
    sb: &Sandbox,
    target: &Target,
    headers: &HeaderMap,
) -> Result<Strip, ApiError> {
    if sb.ingress.public {
        return Ok(Strip::default());
    }
    let expected = state.ops.traffic_token(&sb.id);
    let presented = [TRAFFIC_TOKEN_HEADER, E2B_TRAFFIC_TOKEN_HEADER]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .map(str::to_owned)
        .or_else(|| {
            (target.form == Form::Host)
                .then(|| cookie(headers, TRAFFIC_COOKIE))
                .flatten()
        });
    if let Some(token) = presented {
        return if auth::secret_eq(&token, &expected) {
            Ok(Strip::default())
        } else {
            Err(ApiError::unauthorized(format!(
                "wrong traffic token for sandbox {}: use the `traffic_token` of GET /v1/sandboxes/{}",
                sb.id, sb.id
            )))
        };
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
        .filter(|t| auth::api_key_prefix(t).is_some() || auth::access_token_sandbox(t).is_some());
    if let Some(token) = bearer {
        let allowed = match crate::api::authenticate(state, token).await? {
            Caller::Team { team_id, .. } => team_id == sb.team_id,
            Caller::Sandbox { sandbox_id, .. } => sandbox_id == sb.id,
        };
        return if allowed {
            Ok(Strip {
                authorization: true,
            })
        } else {
            // As for any other of another team's sandboxes.
            Err(Error::SandboxNotFound { id: sb.id.clone() }.into())
        };
    }
    Err(ApiError::unauthorized(format!(
        "sandbox {id}'s ports are private: send header {TRAFFIC_TOKEN_HEADER}: <traffic_token> \
         (from GET /v1/sandboxes/{id}) or an API key of its team, or make them public with \
         PUT /v1/sandboxes/{id}/ingress {{\"public\": true}}",
        id = sb.id
    )))
}

/// The running sandbox, resumed first if it is paused and may be woken
/// (with how long that took).
async fn ensure_running(
    state: &AppState,
    sb: Sandbox,
) -> Result<(Sandbox, Option<Duration>), ApiError> {
    let wake = state.ingress.config.wake_timeout;
    match sb.state {
        SandboxState::Running => Ok((sb, None)),
        SandboxState::Paused | SandboxState::Pausing | SandboxState::Resuming
            if sb.ingress.auto_resume =>
        {
            let started = Instant::now();
            let deadline = started + wake;
            let mut sb = sb;
            loop {
                match sb.state {
                    SandboxState::Running => break,
                    SandboxState::Paused => {
                        tracing::info!(sandbox = %sb.id, "traffic wakes a paused sandbox");
                        match state
                            .ops
                            .resume(&sb.team_id, &sb.id, None, Default::default())
                            .await
                        {
                            Ok(resumed) => sb = resumed,
                            // Someone else resumed it first: wait for them.
                            Err(Error::StateConflict { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    SandboxState::Pausing | SandboxState::Resuming => {}
                    other => {
                        return Err(not_serving(&sb.id, other));
                    }
                }
                if sb.state == SandboxState::Running {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "wake_timeout",
                        format!(
                            "sandbox {} did not resume within {}s",
                            sb.id,
                            wake.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(WAKE_POLL).await;
                sb = visible(state, &sb.id).await?;
            }
            let took = started.elapsed();
            state.metrics.observe("wake", took.as_secs_f64());
            Ok((sb, Some(took)))
        }
        SandboxState::Paused | SandboxState::Pausing => Err(ApiError::new(
            StatusCode::CONFLICT,
            "sandbox_paused",
            format!(
                "sandbox {id} is paused: resume it (POST /v1/sandboxes/{id}/resume, or \
                 `ember sandbox resume {id}`), or let traffic wake it with \
                 PUT /v1/sandboxes/{id}/ingress {{\"auto_resume\": true}}",
                id = sb.id
            ),
        )),
        other => Err(not_serving(&sb.id, other)),
    }
}

fn not_serving(id: &str, state: SandboxState) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!("sandbox {id} is {state}; its ports are served only while it runs"),
    )
}

/// Open `port` of a running sandbox: 502 naming the port if nothing
/// listens there (retried for a moment after a wake).
pub async fn open_port(
    state: &AppState,
    sb: &Sandbox,
    port: u16,
    just_woken: bool,
) -> Result<DuplexStream, ApiError> {
    let host_id = sb.host_id.clone().unwrap_or_default();
    let mut client = state.hosts.client(&host_id)?;
    let retry_until = Instant::now() + WOKEN_PORT_RETRY;
    loop {
        match tunnel::open(&mut client, &sb.id, port, state.ingress.config.idle_timeout).await {
            Ok(pipe) => return Ok(pipe),
            Err(OpenError::Closed) if just_woken && Instant::now() < retry_until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(OpenError::Closed) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "port_closed",
                    format!(
                        "nothing listens on port {port} in sandbox {}: start a server there \
                         bound to 0.0.0.0 (not 127.0.0.1)",
                        sb.id
                    ),
                ));
            }
            Err(OpenError::Host(status)) => {
                if status.code() == tonic::Code::Unavailable
                    && status
                        .metadata()
                        .contains_key(crate::hosts::AGENT_ERROR_CODE)
                {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "port_unreachable",
                        status.message().to_owned(),
                    ));
                }
                return Err(
                    crate::api::processes::guest_error(state, sb, "OpenPort", status).await,
                );
            }
        }
    }
}

/// Traffic is activity: push the sandbox's expiry out (at most one write
/// every few seconds per sandbox).
async fn touch(state: &AppState, sb: &Sandbox) {
    let next = crate::ttl::extended_expiry(sb.expires_at, sb.timeout_s, now_ms());
    if sb.expires_at.is_none_or(|e| next - e > 5_000) {
        state.ops.touch(sb).await;
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
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
fn upstream_request(
    req: Request,
    target: &Target,
    strip: &Strip,
    client_ip: Option<std::net::IpAddr>,
) -> Result<Request, ApiError> {
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
        .map_err(|e| ApiError::invalid("path", format!("not a valid request target: {e}")))?;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Send the request over `pipe` and turn the guest's answer into ours;
/// after a `101`, splice the two upgraded connections together.
async fn exchange(
    state: &AppState,
    sb: &Sandbox,
    port: u16,
    pipe: DuplexStream,
    req: Request,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response, ApiError> {
    let no_answer = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "bad_upstream",
            format!(
                "the server on port {port} in sandbox {} did not answer with HTTP: {e}",
                sb.id
            ),
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(pipe))
        .await
        .map_err(|e| no_answer(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "ingress upstream connection ended");
        }
    });
    let timeout = state.ingress.config.response_timeout;
    let mut resp = match tokio::time::timeout(timeout, sender.send_request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(no_answer(&e)),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "the server on port {port} in sandbox {} did not answer within {}s",
                    sb.id,
                    timeout.as_secs()
                ),
            ));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let id = sb.id.clone();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => tracing::debug!(sandbox = %id, error = %e, "ingress upgrade failed"),
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

/// A one-time link's ticket: `{expires_ms}.{nonce}.{signature}`.
pub fn link_ticket(state: &AppState, sandbox_id: &str, port: u16, expires_ms: i64) -> String {
    let nonce = auth::new_nonce();
    let sig = state
        .ops
        .link_signature(sandbox_id, port, expires_ms, &nonce);
    format!("{expires_ms}.{nonce}.{sig}")
}

/// Open a one-time link: set the traffic cookie for this host and send the
/// browser on to the same URL without the ticket.
fn redeem_link(
    state: &AppState,
    sb: &Sandbox,
    target: &Target,
    ticket: &str,
) -> Result<Response, ApiError> {
    let refused = || {
        ApiError::unauthorized(format!(
            "this link to sandbox {} is invalid, expired or already used: ask for a new one \
             (`ember sandbox url {} {} --link`)",
            sb.id, sb.id, target.port
        ))
    };
    let mut parts = ticket.splitn(3, '.');
    let (Some(expires), Some(nonce), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refused());
    };
    let expires_ms: i64 = expires.parse().map_err(|_| refused())?;
    let expected = state
        .ops
        .link_signature(&sb.id, target.port, expires_ms, nonce);
    let now = now_ms();
    if !auth::secret_eq(sig, &expected) || expires_ms <= now {
        return Err(refused());
    }
    if !state.ingress.use_link(nonce, expires_ms, now) {
        return Err(refused());
    }
    let secure = if state.ingress.config.scheme == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{TRAFFIC_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age=86400{secure}",
        state.ops.traffic_token(&sb.id)
    );
    let location = without_param(&target.path_and_query, LINK_PARAM);
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(|_| refused())?,
    );
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| refused())?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn query_param(path_and_query: &str, name: &str) -> Option<String> {
    let (_, query) = path_and_query.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn without_param(path_and_query: &str, name: &str) -> String {
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

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// `GET /v1/sandboxes/{id}/tunnel/{port}` after authentication: answer
/// `101` and splice the upgraded connection to the guest port.
pub async fn serve_tunnel(
    state: &AppState,
    sb: Sandbox,
    port: u16,
    mut req: Request,
) -> Result<Response, ApiError> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(TCP_UPGRADE));
    if !wants || !is_upgrade(req.headers()) {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!(
                "send `Connection: Upgrade` and `Upgrade: {TCP_UPGRADE}` (`ember sandbox \
                 port-forward` does)"
            ),
        ));
    }
    let (sb, woke) = ensure_running(state, sb).await?;
    let mut pipe = open_port(state, &sb, port, woke.is_some()).await?;
    touch(state, &sb).await;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let id = sb.id.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut pipe).await;
            }
            Err(e) => tracing::debug!(sandbox = %id, error = %e, "tunnel upgrade failed"),
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(TCP_UPGRADE));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

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
