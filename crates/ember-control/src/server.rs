//! `ember server`'s engine: open the store (migrating it), bootstrap the
//! first admin key and the cluster join token, then serve the API and run the
//! host probes, the reconciler and the TTL sweeper until shutdown.
//!
//! The seam for host agents is [`ControlPlane::hosts`]: remote agents
//! register through `POST /internal/v1/hosts`; an agent embedded in the same
//! process is attached with [`crate::hosts::HostRegistry::register_client`]
//! (or `register_address` with its loopback gRPC address) before or after
//! [`ControlPlane::serve`] starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::error::{Error, Result};
use crate::hosts::{self, HostRegistry};
use crate::lifecycle::Operations;
use crate::metrics::Metrics;
use crate::model::{Team, now_ms};
use crate::store::Store;
use crate::{auth, reconciler, ttl};

/// Name of the team created on first start; its keys are admin keys.
pub const DEFAULT_TEAM: &str = "default";
const JOIN_TOKEN_SETTING: &str = "join_token";
/// The key sandboxes' access tokens are derived from (shared by replicas).
const TOKEN_KEY_SETTING: &str = "access_token_key";

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// Use this join token instead of the stored (or a generated) one.
    pub join_token: Option<String>,
    /// Accept the cluster join token at all (`false`: hosts join only with
    /// one-time tokens, `ember host join-token create`).
    pub cluster_join_token: bool,
    pub probe_interval: Duration,
    pub reconcile_interval: Duration,
    pub ttl_interval: Duration,
    pub reconciler: reconciler::Params,
    /// How long a pause or resume request waits for its host before it is
    /// answered `202 Accepted` with the sandbox still `pausing`/`resuming`;
    /// the operation goes on to its end either way.
    pub answer_within: Duration,
    /// How sandbox ports are exposed (see [`crate::ingress`]).
    pub ingress: crate::ingress::IngressConfig,
    /// The private and special ranges tenants' `allow_out` may open.
    pub egress: ember_types::cidr::EgressCeiling,
    /// More ranges for some teams (by name), on top of `egress`.
    pub team_egress: std::collections::HashMap<String, ember_types::cidr::EgressCeiling>,
    /// What each team may hold at once (`[team_limits]` in the config file).
    pub quota: crate::store::TeamQuota,
    /// Maximum running time and paused retention, server-wide.
    pub lifetime: crate::ttl::Lifetime,
    /// Per-caller request rate and concurrency (`[rate_limits]`).
    pub rate_limits: crate::ratelimit::RateLimits,
    /// Serve the API over TLS with this (`--tls-cert`/`--tls-key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServerConfig {
    pub fn new(database_url: impl Into<String>) -> ServerConfig {
        ServerConfig {
            database_url: database_url.into(),
            join_token: None,
            cluster_join_token: true,
            probe_interval: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(5),
            ttl_interval: Duration::from_secs(1),
            reconciler: reconciler::Params::default(),
            answer_within: Duration::from_secs(60),
            ingress: crate::ingress::IngressConfig::from_domain(None)
                .expect("no domain is a valid ingress configuration"),
            egress: Default::default(),
            team_egress: Default::default(),
            tls: None,
            quota: Default::default(),
            lifetime: Default::default(),
            rate_limits: Default::default(),
        }
    }
}

/// Secrets created by this start, to show the operator once.
#[derive(Debug, Clone)]
pub struct FirstStart {
    /// The first admin key, when this start created it (empty store).
    pub admin_key: Option<String>,
    /// The cluster join token, when this start generated it.
    pub new_join_token: Option<String>,
}

/// An opened control plane, ready to serve.
#[derive(Debug)]
pub struct ControlPlane {
    state: AppState,
    config: ServerConfig,
    pub first_start: FirstStart,
}

impl ControlPlane {
    /// Open the store (applying migrations) and bootstrap secrets.
    pub async fn open(config: ServerConfig) -> Result<ControlPlane> {
        let store = Store::open(&config.database_url).await?;
        let admin_key = bootstrap_admin(&store).await?;
        let (join_token, new_join_token) = match &config.join_token {
            _ if !config.cluster_join_token => (None, None),
            Some(t) => {
                store.put_setting(JOIN_TOKEN_SETTING, t).await?;
                (Some(t.clone()), None)
            }
            None => {
                let fresh = auth::new_join_token();
                let stored = store.setting_or_insert(JOIN_TOKEN_SETTING, &fresh).await?;
                let is_new = stored == fresh;
                (Some(stored), is_new.then_some(fresh))
            }
        };
        let token_key = store
            .setting_or_insert(TOKEN_KEY_SETTING, &auth::new_token_key())
            .await?;
        let hosts = HostRegistry::new(store.clone());
        hosts.load().await?;
        let metrics = Arc::new(Metrics::new());
        let ops = Arc::new(Operations {
            store: store.clone(),
            hosts: hosts.clone(),
            metrics: metrics.clone(),
            in_flight: Default::default(),
            token_key: crate::lifecycle::TokenKey(token_key.into()),
            egress: config.egress.clone(),
            team_egress: config.team_egress.clone(),
            quota: config.quota,
            lifetime: config.lifetime,
        });
        let state = AppState {
            store,
            ops,
            hosts,
            metrics,
            join_token: join_token.map(Into::into),
            answer_within: config.answer_within,
            ingress: Arc::new(crate::ingress::Ingress::new(config.ingress.clone())),
            limiter: Arc::new(crate::ratelimit::RateLimiter::new(config.rate_limits)),
        };
        Ok(ControlPlane {
            state,
            config,
            first_start: FirstStart {
                admin_key,
                new_join_token,
            },
        })
    }

    /// The host registry: where host agents are attached.
    pub fn hosts(&self) -> Arc<HostRegistry> {
        self.state.hosts.clone()
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Is the API served over TLS?
    pub fn serves_tls(&self) -> bool {
        self.config.tls.is_some()
    }

    /// The cluster join token, unless the server runs without one.
    pub fn join_token(&self) -> Option<&str> {
        self.state.join_token.as_deref()
    }

    /// Serve the API on `listener` and run the background loops until
    /// `shutdown` is cancelled; in-flight requests finish first.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let addr = listener.local_addr().map_err(Error::Serve)?;
        let loops = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(hosts::run_probes(
                self.state.hosts.clone(),
                self.config.probe_interval,
                loops.clone(),
            )),
            tokio::spawn(reconciler::run(
                self.state.ops.clone(),
                self.config.reconcile_interval,
                self.config.reconciler,
                loops.clone(),
            )),
            tokio::spawn(ttl::run(
                self.state.ops.clone(),
                self.config.ttl_interval,
                loops.clone(),
            )),
        ];
        tracing::info!(%addr, "serving the API");
        let router = api::router(self.state.clone());
        let app = router.into_make_service_with_connect_info::<SocketAddr>();
        let served = match self.config.tls.clone() {
            Some(tls) => {
                // (The no-op tap gives the peer address as ConnectInfo.)
                let listener = axum::serve::ListenerExt::tap_io(
                    crate::tls::TlsListener::new(listener, tls)?,
                    |_| {},
                );
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
            None => {
                // No Nagle: streamed output and proxied bytes go out as they come.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
        }
        .map_err(Error::Serve);
        loops.cancel();
        for t in tasks {
            let _ = t.await;
        }
        self.state.store.close().await;
        served
    }
}

/// On a store without any API key: make sure the default (admin) team
/// exists and mint its first key. Returns the key to print, once. Replicas
/// on one PostgreSQL database take turns, so exactly one of them mints it.
async fn bootstrap_admin(store: &Store) -> Result<Option<String>> {
    store
        .exclusive("ember-bootstrap", || bootstrap_admin_locked(store))
        .await
}

async fn bootstrap_admin_locked(store: &Store) -> Result<Option<String>> {
    if store.count_keys().await? > 0 {
        return Ok(None);
    }
    let team = Team {
        id: ember_types::TeamId::new().to_string(),
        name: DEFAULT_TEAM.to_owned(),
        is_admin: true,
        created_at: now_ms(),
    };
    store.insert_team(&team).await?;
    let Some(team) = store.team_by_name(DEFAULT_TEAM).await? else {
        return Ok(None);
    };
    let (key, _) =
        api::mint_key(store, &team.id, "first admin key", crate::auth::Role::Admin).await?;
    Ok(Some(key))
}

/// Bind a listener (a helper for `ember server`).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}
