//! This host's own ingress: the ports of the sandboxes running here,
//! served without a hop through the control plane.
//!
//! `ember agent --ingress-listen ADDR --ingress-domain DOMAIN` serves
//! `{port}-{sandbox_id}.{DOMAIN}` (and the header and path forms of
//! `ember_ingress`) for the sandboxes this host runs. The agent dials the
//! guest at its slot address, as for `OpenPort`: it never enters the
//! sandbox's namespace, and the sandbox's egress rules are unchanged.
//!
//! Access is the control plane's decision, pushed with each create, resume
//! and `SetIngress`: a public sandbox is open; a private one takes only its
//! traffic token (header, or the host form's `ember_traffic` cookie),
//! checked against the SHA-256 the control plane sent. This host never
//! holds a key that could mint tokens, nor verifies API keys: a request
//! with neither is refused, naming the token. A sandbox not running here
//! (paused, on another host, unknown) is a 404 pointing at the control
//! plane's URL, which also wakes paused sandboxes. Requests are activity:
//! the control plane reads the last one from `GetSandbox`/`ListSandboxes`
//! before a timeout ends the sandbox.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_ingress::relay::{self, RelayError, Strip};
use ember_ingress::{BadHost, IngressConfig, Target};
use ember_types::SandboxId;
use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::error::AgentError;

#[derive(Clone)]
struct Ingress {
    agent: Agent,
    config: IngressConfig,
}

/// Serve this host's ingress on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Agent,
    config: IngressConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = Router::new()
        .fallback(handle)
        .with_state(Ingress { agent, config });
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn handle(State(ingress): State<Ingress>, req: Request) -> Response {
    let result = match ember_ingress::route(&ingress.config, &req) {
        Some(Ok(target)) => serve_port(&ingress, target, req).await,
        Some(Err(BadHost(what))) => Err(not_a_port(&ingress.config, &what)),
        None => Err(not_a_port(&ingress.config, "this request")),
    };
    result.unwrap_or_else(error_response)
}

fn not_a_port(config: &IngressConfig, what: &str) -> RelayError {
    RelayError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "{what} names no sandbox port: this host's ingress serves \
             {{port}}-{{sandbox id}}.{}",
            config.domain.as_deref().unwrap_or("<domain>")
        ),
    )
}

async fn serve_port(
    ingress: &Ingress,
    target: Target,
    mut req: Request,
) -> Result<Response, RelayError> {
    let agent = &ingress.agent;
    let id: SandboxId = target.sandbox_id.parse().map_err(|_| {
        RelayError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} is not a sandbox ID", target.sandbox_id),
        )
    })?;
    let (access, addr) = agent
        .ingress_target(&id, target.port)
        .await
        .map_err(|e| not_here(&id, e))?;
    if !access.public {
        let presented = relay::presented_token(req.headers(), &target.form);
        let ok = presented
            .as_deref()
            .is_some_and(|t| ember_ingress::token_matches(t, &access.token_sha256));
        if !ok {
            let what = if presented.is_some() {
                "wrong traffic token"
            } else {
                "its ports are private"
            };
            return Err(RelayError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "sandbox {id}: {what}: send header {}: <traffic_token> (from GET \
                     /v1/sandboxes/{id}); this host's ingress takes no API keys",
                    ember_ingress::TRAFFIC_TOKEN_HEADER
                ),
            ));
        }
    }
    agent.note_traffic(&id);
    let stream = crate::service::connect_guest_port(&id, target.port, addr)
        .await
        .map_err(|e| match e {
            AgentError::PortClosed { .. } => RelayError::new(
                StatusCode::BAD_GATEWAY,
                "port_closed",
                format!(
                    "nothing listens on port {} in sandbox {id}: start a server there bound \
                     to 0.0.0.0 (not 127.0.0.1)",
                    target.port
                ),
            ),
            other => RelayError::new(
                StatusCode::BAD_GATEWAY,
                "port_unreachable",
                other.to_string(),
            ),
        })?;
    // The guest's bytes go through a pipe that closes after the idle time.
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(relay::splice_idle(
        theirs,
        stream,
        ingress.config.idle_timeout,
    ));
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let upgrade = relay::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let upstream = relay::upstream_request(req, &target, &Strip::default(), client_ip)?;
    let what = format!("port {} in sandbox {id}", target.port);
    let mut resp = relay::exchange(
        ours,
        upstream,
        upgrade,
        ingress.config.response_timeout,
        &what,
    )
    .await?;
    relay::finish(&target.form, &mut resp);
    Ok(resp)
}

/// Why this host cannot serve the sandbox's port.
fn not_here(id: &SandboxId, e: AgentError) -> RelayError {
    match e {
        AgentError::SandboxNotFound(_) => RelayError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "sandbox {id} does not run on this host: reach its ports through the control \
                 plane (`port_url` of GET /v1/sandboxes/{id}), which also wakes a paused sandbox"
            ),
        ),
        AgentError::IllegalTransition { state, .. } => RelayError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "sandbox {id} is {state}; its ports are served only while it runs (through \
                 the control plane's URL, traffic may wake it)"
            ),
        ),
        other => RelayError::new(StatusCode::BAD_GATEWAY, "host_error", other.to_string()),
    }
}

fn error_response(e: RelayError) -> Response {
    let body = serde_json::json!({ "code": e.code, "message": e.message });
    let mut resp = (e.status, axum::Json(body)).into_response();
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}
