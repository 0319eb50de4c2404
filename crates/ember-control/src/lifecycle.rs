//! Sandbox lifecycle operations: the one place that moves a sandbox through
//! its state machine, for the API, the TTL sweeper and the reconciler alike.
//!
//! Every operation has the same shape: compare-and-set the row into a
//! transitional state (409 naming the current state if that is not allowed,
//! so exactly one of N concurrent callers proceeds), call the host, then
//! compare-and-set into the result state. When the host call fails, the
//! host's own report decides (a refused or timed-out pause leaves a running
//! VM running; a failed resume leaves the build paused): a transport error
//! never fails a sandbox. If the host cannot be asked, or this process dies
//! between the steps, the row sits in a transitional state and the
//! reconciler finishes it from what the host reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use ember_proto::host as pb;

use crate::error::{Error, Result};
use crate::hosts::{
    HostClient, HostRegistry, INFO_TIMEOUT, LIFECYCLE_TIMEOUT, LONG_OPERATION_TIMEOUT,
    is_unreachable, status_reason,
};
use crate::metrics::Metrics;
use crate::model::{
    Build, BuildKind, NetworkPolicy, OnTimeout, OperationTiming, PhaseTiming, Sandbox,
    SandboxState, Template, now_ms, parse_rfc3339,
};
use crate::reconciler::{self, Action, HostView, Observed};
use crate::scheduler::{self, Demand, NoCapacity};
use crate::store::{CapacityCheck, Changes, Store, TeamUsage};
use crate::{auth, ttl};

/// The template name that means "boot the base image".
pub const BASE_TEMPLATE: &str = "base";
/// Defaults for a sandbox booted from the base image.
pub const BASE_VCPUS: u32 = 1;
pub const BASE_MEMORY_MIB: u32 = 512;
/// How long destroyed rows are kept before they are purged.
pub const DESTROYED_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// What a new sandbox should be (validated by the API).
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub team_id: String,
    pub template: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub timeout_s: u64,
    pub on_timeout: OnTimeout,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub network: NetworkPolicy,
    /// Boot `base` rather than fork the host's warm base.
    pub cold: bool,
    pub ingress: crate::model::Ingress,
    /// With `base`: boot this container image (`docker://…`) instead of
    /// the base image. Template builds use it.
    pub image: Option<ImageSource>,
}

/// A container image for a create, with the credentials to pull it.
#[derive(Clone)]
pub struct ImageSource {
    pub reference: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSource")
            .field("reference", &self.reference)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The key access tokens are derived from; its `Debug` shows no secret.
#[derive(Clone)]
pub struct TokenKey(pub Arc<str>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// The lifecycle, over the store and the hosts.
#[derive(Debug)]
pub struct Operations {
    pub store: Store,
    pub hosts: Arc<HostRegistry>,
    pub metrics: Arc<Metrics>,
    /// Sandboxes with a lifecycle call in flight in this process.
    pub in_flight: InFlight,
    /// Signs sandboxes' access tokens (the `access_token_key` setting).
    pub token_key: TokenKey,
    /// What tenants' `allow_out` may open of the private and special ranges.
    pub egress: ember_types::cidr::EgressCeiling,
    /// What each team may hold at once.
    pub quota: crate::store::TeamQuota,
    /// Server-wide limits on running and paused time.
    pub lifetime: ttl::Lifetime,
    /// Teams (by name) whose ceiling is wider than `egress`: the server's
    /// grants plus their own.
    pub team_egress: std::collections::HashMap<String, ember_types::cidr::EgressCeiling>,
}

/// The sandboxes this process is creating, pausing, resuming, snapshotting
/// or destroying right now. The reconciler leaves them to the call that owns
/// them, however long it takes: a transitional row it sees is settled from
/// the host only when no call here owns it (its owner died, or gave up on a
/// host that did not answer).
#[derive(Debug, Default)]
pub struct InFlight(std::sync::Mutex<HashMap<String, usize>>);

/// A claim on a sandbox in [`InFlight`], released on drop.
#[must_use]
#[derive(Debug)]
pub struct InFlightClaim<'a> {
    set: &'a InFlight,
    id: String,
}

impl InFlight {
    pub fn claim(&self, id: &str) -> InFlightClaim<'_> {
        *self
            .0
            .lock()
            .expect("in-flight lock")
            .entry(id.to_owned())
            .or_default() += 1;
        InFlightClaim {
            set: self,
            id: id.to_owned(),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0.lock().expect("in-flight lock").contains_key(id)
    }
}

impl Drop for InFlightClaim<'_> {
    fn drop(&mut self) {
        let mut map = self.set.0.lock().expect("in-flight lock");
        if let Some(n) = map.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

fn proto_state(state: pb::SandboxState) -> Option<SandboxState> {
    Some(match state {
        pb::SandboxState::Unspecified => return None,
        pb::SandboxState::Creating => SandboxState::Creating,
        pb::SandboxState::Running => SandboxState::Running,
        pb::SandboxState::Pausing => SandboxState::Pausing,
        pb::SandboxState::Paused => SandboxState::Paused,
        pb::SandboxState::Resuming => SandboxState::Resuming,
        pb::SandboxState::Snapshotting => SandboxState::Snapshotting,
        pb::SandboxState::Destroying => SandboxState::Destroying,
        pb::SandboxState::Failed => SandboxState::Failed,
        pb::SandboxState::Destroyed => SandboxState::Destroyed,
    })
}

/// The rules a host gets: `allow_out` rules beyond the operator's ceiling
/// are left out (the API refuses them; this catches rules stored before a
/// grant was withdrawn).
fn proto_network(
    n: &NetworkPolicy,
    ceiling: &ember_types::cidr::EgressCeiling,
) -> pb::NetworkPolicy {
    let allow_out = n
        .allow_out
        .iter()
        .filter(|rule| match ceiling.check(rule) {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(%rule, %reason, "allow_out rule beyond the egress ceiling left out");
                false
            }
        })
        .cloned()
        .collect();
    pb::NetworkPolicy {
        allow_out,
        deny_out: n.deny_out.clone(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn expiry(timeout_s: u64, now: i64) -> i64 {
    ttl::extended_expiry(None, timeout_s, now)
}

fn with_timeout<T>(msg: T, timeout: std::time::Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

impl Operations {
    /// The access token of sandbox `id` (see [`auth::access_token`]).
    pub fn access_token(&self, id: &str) -> String {
        auth::access_token(self.token_key.0.as_bytes(), id)
    }

    /// The traffic token of sandbox `id` (see [`auth::traffic_token`]).
    pub fn traffic_token(&self, id: &str) -> String {
        auth::traffic_token(self.token_key.0.as_bytes(), id)
    }

    /// Would one more sandbox of this size keep team `team_id` within its
    /// quota? (The insert or transition checks again, atomically; this
    /// names the limit.)
    pub async fn check_quota(&self, team_id: &str, vcpus: u32, memory_mib: u32) -> Result<()> {
        let q = self.quota;
        if q.running_sandboxes.is_none() && q.vcpus.is_none() && q.memory_mib.is_none() {
            return Ok(());
        }
        let used = self.store.team_usage(team_id).await?;
        let remedy = "destroy or pause one of its sandboxes first";
        for (what, setting, would, max) in [
            (
                "running sandboxes",
                "running_sandboxes",
                used.running_sandboxes + 1,
                q.running_sandboxes,
            ),
            ("vCPUs", "vcpus", used.vcpus + u64::from(vcpus), q.vcpus),
            (
                "memory (MiB)",
                "memory_mib",
                used.memory_mib + u64::from(memory_mib),
                q.memory_mib,
            ),
        ] {
            if let Some(max) = max
                && would > max
            {
                return Err(Error::QuotaExceeded {
                    what,
                    setting,
                    would,
                    max,
                    remedy,
                });
            }
        }
        Ok(())
    }

    /// Would one more paused sandbox keep team `team_id` within its quota?
    async fn check_paused_quota(&self, team_id: &str) -> Result<()> {
        if self.quota.paused_sandboxes.is_none() && self.quota.storage_mib.is_none() {
            return Ok(());
        }
        let usage = self.store.team_usage(team_id).await?;
        if let Some(max) = self.quota.paused_sandboxes {
            let would = usage.paused_sandboxes + 1;
            if would > max {
                return Err(Error::QuotaExceeded {
                    what: "paused sandboxes",
                    setting: "paused_sandboxes",
                    would,
                    max,
                    remedy: "destroy one of its paused sandboxes first (this one keeps running)",
                });
            }
        }
        self.check_storage_quota(&usage)
    }

    /// Is there room left in the team's storage quota for another build?
    /// A build's size is known only once written, so the check is that
    /// the team is under its limit now; the last build may overrun it.
    fn check_storage_quota(&self, usage: &TeamUsage) -> Result<()> {
        let Some(max) = self.quota.storage_mib else {
            return Ok(());
        };
        let used = usage.storage_mib();
        if used >= max {
            return Err(Error::QuotaExceeded {
                what: "MiB of paused sandboxes' and templates' snapshots",
                setting: "storage_mib",
                would: used,
                max,
                remedy: "delete templates or destroy paused sandboxes first (the sandbox keeps running)",
            });
        }
        Ok(())
    }

    /// What sandbox `id`'s host needs to serve its ports itself: the
    /// public flag and the SHA-256 of the traffic token (never the token
    /// or the key it comes from).
    pub fn ingress_policy(&self, id: &str, ingress: &crate::model::Ingress) -> pb::IngressPolicy {
        pb::IngressPolicy {
            public: ingress.public,
            traffic_token_sha256: ember_ingress::token_digest(&self.traffic_token(id)).to_vec(),
        }
    }

    /// Tell sandbox `sb`'s host who may now reach its ports. A host that
    /// cannot be told is repaired by the reconciler (it compares the
    /// public flag the host reports).
    pub async fn push_ingress(&self, sb: &Sandbox) {
        let Some(host_id) = sb.host_id.as_deref() else {
            return;
        };
        if !matches!(sb.state, SandboxState::Running | SandboxState::Resuming) {
            return;
        }
        let req = pb::SetIngressRequest {
            sandbox_id: sb.id.clone(),
            ingress: Some(self.ingress_policy(&sb.id, &sb.ingress)),
        };
        let result = match self.hosts.client(host_id) {
            Ok(mut client) => client
                .set_ingress(with_timeout(req, INFO_TIMEOUT))
                .await
                .map(|_| ())
                .map_err(|s| s.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = result {
            tracing::warn!(sandbox = %sb.id, host = host_id, %error,
                "telling the host about new port access failed; the reconciler retries");
        }
    }

    /// The signature of a one-time link (see [`auth::link_signature`]).
    pub fn link_signature(&self, id: &str, port: u16, expires_ms: i64, nonce: &str) -> String {
        auth::link_signature(self.token_key.0.as_bytes(), id, port, expires_ms, nonce)
    }

    /// Turn a failed host call into an error, marking the host unhealthy if
    /// it could not be reached at all.
    async fn host_error(&self, host_id: &str, call: &'static str, status: tonic::Status) -> Error {
        if is_unreachable(&status) {
            self.hosts
                .mark_unreachable(host_id, &status_reason(&status))
                .await;
        }
        Error::HostCall {
            host: host_id.to_owned(),
            call,
            source: Box::new(status),
        }
    }

    /// After a lost CAS: why? (404 if the row is not in scope, else 409.)
    async fn conflict(&self, team_id: Option<&str>, id: &str, action: &'static str) -> Error {
        match self.store.sandbox(team_id, id).await {
            Ok(Some(sb)) => Error::StateConflict {
                id: id.to_owned(),
                state: sb.state,
                action,
            },
            Ok(None) => Error::SandboxNotFound { id: id.to_owned() },
            Err(e) => e,
        }
    }

    async fn load(&self, team_id: Option<&str>, id: &str) -> Result<Sandbox> {
        self.store
            .sandbox(team_id, id)
            .await?
            .ok_or_else(|| Error::SandboxNotFound { id: id.to_owned() })
    }

    fn host_of(sb: &Sandbox) -> Result<&str> {
        sb.host_id.as_deref().ok_or_else(|| Error::CorruptRow {
            what: "sandbox",
            detail: format!("{} has no host", sb.id),
        })
    }

    /// Create a sandbox: place it, reserve its row, boot it on the host.
    /// Returns the row and the access token (shown once).
    pub async fn create(&self, spec: CreateSpec) -> Result<(Sandbox, String)> {
        let (sb, token, _) = self.create_reporting_image(spec).await?;
        Ok((sb, token))
    }

    /// [`Operations::create`], also returning the config of the container
    /// image it booted (when `spec.image` was given).
    pub async fn create_reporting_image(
        &self,
        mut spec: CreateSpec,
    ) -> Result<(Sandbox, String, Option<pb::ImageConfig>)> {
        let started = Instant::now();
        let mut timer = Timer::start(if spec.template == BASE_TEMPLATE {
            "create"
        } else {
            "fork"
        });
        let mut exec_defaults: (Option<String>, Option<String>) = (None, None);
        let (build_id, vcpus, memory_mib) = if spec.template == BASE_TEMPLATE {
            (
                None,
                spec.vcpus.unwrap_or(BASE_VCPUS),
                spec.memory_mib.unwrap_or(BASE_MEMORY_MIB),
            )
        } else {
            let t = self
                .store
                .template(&spec.team_id, &spec.template)
                .await?
                .ok_or_else(|| Error::TemplateNotFound {
                    name: spec.template.clone(),
                })?;
            let locked = spec.vcpus.is_some_and(|v| v != t.vcpus)
                || spec.memory_mib.is_some_and(|m| m != t.memory_mib);
            if locked {
                return Err(Error::TemplateLocked {
                    name: t.name,
                    vcpus: t.vcpus,
                    memory_mib: t.memory_mib,
                });
            }
            // The template's environment (its image's and Dockerfile's)
            // under the caller's; its working directory and user for execs.
            if let Some(defaults) = &t.defaults {
                for (k, v) in &defaults.env {
                    spec.env.entry(k.clone()).or_insert_with(|| v.clone());
                }
                exec_defaults = (defaults.workdir.clone(), defaults.user.clone());
            }
            (Some(t.build_id), t.vcpus, t.memory_mib)
        };
        let image = spec.image.filter(|_| spec.template == BASE_TEMPLATE);
        let usage = self.store.host_usage().await?;
        let mut snapshots = self.hosts.snapshots(&usage);
        if let Some(build) = &build_id {
            // The database knows where a template's build was written (v1
            // never moves builds); the hosts' build lists are only as fresh
            // as their last probe, which may predate a template made a moment ago.
            if let Some(row) = self.store.build(build).await? {
                for snap in snapshots.iter_mut().filter(|s| s.id == row.host_id) {
                    snap.builds.insert(build.clone());
                }
            }
        }
        let demand = Demand {
            vcpus,
            memory_mib,
            build_id: build_id.clone(),
        };
        self.check_quota(&spec.team_id, vcpus, memory_mib).await?;
        let candidates = scheduler::candidates(&snapshots, &demand).map_err(Error::NoCapacity)?;
        timer.lap("control.schedule");

        let now = now_ms();
        let id = ember_types::SandboxId::new().to_string();
        let _claim = self.in_flight.claim(&id);
        let access_token = self.access_token(&id);
        let mut row = Sandbox {
            id: id.clone(),
            team_id: spec.team_id.clone(),
            state: SandboxState::Creating,
            host_id: None,
            template: spec.template.clone(),
            source_build_id: build_id.clone(),
            build_id: None,
            vcpus,
            memory_mib,
            metadata: spec.metadata,
            env: spec.env,
            network: spec.network,
            timeout_s: spec.timeout_s,
            on_timeout: spec.on_timeout,
            expires_at: None,
            access_token_sha256: auth::sha256_hex(&access_token),
            failure_reason: None,
            created_at: now,
            state_changed_at: now,
            destroyed_at: None,
            last_operation: None,
            ingress: spec.ingress,
        };
        let mut placed = None;
        for host_id in candidates {
            let Some(snap) = snapshots.iter().find(|s| s.id == host_id) else {
                continue;
            };
            row.host_id = Some(host_id.clone());
            let cap = CapacityCheck {
                host_id: host_id.clone(),
                vcpus_total: snap.vcpus_total,
                memory_mib_total: snap.memory_mib_total,
                team_id: spec.team_id.clone(),
                quota: self.quota,
            };
            if self.store.insert_sandbox(&row, Some(&cap)).await? {
                placed = Some(host_id);
                break;
            }
        }
        let Some(host_id) = placed else {
            // The team's quota or the hosts' room: which one refused?
            self.check_quota(&spec.team_id, vcpus, memory_mib).await?;
            return Err(Error::NoCapacity(NoCapacity::Full { vcpus, memory_mib }));
        };
        let mut client = match self.hosts.client(&host_id) {
            Ok(c) => c,
            Err(err) => {
                self.fail(&id, SandboxState::Creating, &err.to_string())
                    .await;
                return Err(err);
            }
        };
        let req = pb::CreateSandboxRequest {
            sandbox_id: id.clone(),
            build_id: build_id.unwrap_or_default(),
            vcpus,
            memory_mib,
            env: row.env.clone().into_iter().collect(),
            metadata: row.metadata.clone().into_iter().collect(),
            network: Some(proto_network(
                &row.network,
                &self.egress_for(&row.team_id).await?,
            )),
            guest_token: auth::new_guest_token(),
            cold: spec.cold,
            ingress: Some(self.ingress_policy(&id, &row.ingress)),
            image: image
                .as_ref()
                .map(|i| i.reference.clone())
                .unwrap_or_default(),
            registry_username: image
                .as_ref()
                .and_then(|i| i.username.clone())
                .unwrap_or_default(),
            registry_password: image
                .as_ref()
                .and_then(|i| i.password.clone())
                .unwrap_or_default(),
            default_cwd: exec_defaults.0.unwrap_or_default(),
            default_user: exec_defaults.1.unwrap_or_default(),
        };
        // A pull can take long; a plain boot cannot.
        let deadline = if image.is_some() {
            LONG_OPERATION_TIMEOUT
        } else {
            LIFECYCLE_TIMEOUT
        };
        timer.lap("control.intent");
        match client.create_sandbox(with_timeout(req, deadline)).await {
            Ok(reply) => {
                timer.host(reply.get_ref());
                let timing = timer.finish();
                let now = now_ms();
                let changes = Changes {
                    expires_at: Some(Some(expiry(row.timeout_s, now))),
                    last_operation: Some(timing.clone()),
                    ..Changes::default()
                };
                self.store
                    .transition(
                        None,
                        &id,
                        &[SandboxState::Creating],
                        SandboxState::Running,
                        &changes,
                        now,
                        None,
                    )
                    .await?;
                self.metrics
                    .observe("create", started.elapsed().as_secs_f64());
                self.metrics.observe_phases(&timing);
                let image = reply.into_inner().image;
                let row = self.load(None, &id).await?;
                Ok((row, access_token, image))
            }
            Err(status) => {
                let reason = format!(
                    "create failed on host {host_id}: {}",
                    status_reason(&status)
                );
                self.fail(&id, SandboxState::Creating, &reason).await;
                Err(self.host_error(&host_id, "CreateSandbox", status).await)
            }
        }
    }

    async fn fail(&self, id: &str, from: SandboxState, reason: &str) {
        // The tenant reads the reason; the log keeps the host's details.
        tracing::warn!(sandbox = %id, reason, "sandbox failed");
        let changes = Changes {
            failure_reason: Some(crate::redact::host_detail(reason)),
            expires_at: Some(None),
            ..Changes::default()
        };
        if let Err(err) = self
            .store
            .transition(
                None,
                id,
                &[from],
                SandboxState::Failed,
                &changes,
                now_ms(),
                None,
            )
            .await
        {
            tracing::error!(sandbox = %id, error = %err, "recording a failure failed; the reconciler will retry");
        }
        tracing::warn!(sandbox = %id, reason, "sandbox failed");
    }

    /// Destroy a sandbox (running, paused or failed) and everything it holds on its host.
    pub async fn destroy(&self, team_id: Option<&str>, id: &str) -> Result<()> {
        let _claim = self.in_flight.claim(id);
        let from = [
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Failed,
        ];
        let now = now_ms();
        if !self
            .store
            .transition(
                team_id,
                id,
                &from,
                SandboxState::Destroying,
                &Changes::default(),
                now,
                None,
            )
            .await?
        {
            // 409 for one already destroyed (clients read it as gone) or
            // being destroyed (by another call, or by the reconciler after
            // an interrupted destroy).
            return Err(self.conflict(team_id, id, "be destroyed").await);
        }
        let sb = self.load(None, id).await?;
        self.destroy_on_host(&sb).await?;
        self.finish_destroy(&sb, SandboxState::Destroying).await
    }

    async fn destroy_on_host(&self, sb: &Sandbox) -> Result<()> {
        let host_id = Self::host_of(sb)?;
        let mut client = self.hosts.client(host_id)?;
        let req = pb::SandboxRef {
            sandbox_id: sb.id.clone(),
        };
        match client
            .destroy_sandbox(with_timeout(req, LIFECYCLE_TIMEOUT))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            // The row stays `destroying`; the reconciler retries when the host answers.
            Err(s) => Err(self.host_error(host_id, "DestroySandbox", s).await),
        }
    }

    async fn finish_destroy(&self, sb: &Sandbox, from: SandboxState) -> Result<()> {
        let now = now_ms();
        let changes = Changes {
            destroyed_at: Some(now),
            expires_at: Some(None),
            ..Changes::default()
        };
        self.store
            .transition(
                None,
                &sb.id,
                &[from],
                SandboxState::Destroyed,
                &changes,
                now,
                None,
            )
            .await?;
        if let Some(build) = &sb.build_id {
            self.store.release_build(build, now).await?;
        }
        Ok(())
    }

    /// Pause a running sandbox into a build on its host.
    pub async fn pause(&self, team_id: Option<&str>, id: &str) -> Result<Sandbox> {
        let _claim = self.in_flight.claim(id);
        let started = Instant::now();
        let mut timer = Timer::start("pause");
        // A team's own pause counts against its paused quota; a timeout's
        // (no team) does not: refusing it would leave the sandbox running.
        if let Some(team) = team_id {
            self.check_paused_quota(team).await?;
        }
        let now = now_ms();
        if !self
            .store
            .transition(
                team_id,
                id,
                &[SandboxState::Running],
                SandboxState::Pausing,
                &Changes::default(),
                now,
                None,
            )
            .await?
        {
            return Err(self.conflict(team_id, id, "pause").await);
        }
        let sb = self.load(None, id).await?;
        let host_id = Self::host_of(&sb)?.to_owned();
        let mut client = self.hosts.client(&host_id)?;
        let req = pb::SandboxRef {
            sandbox_id: id.to_owned(),
        };
        timer.lap("control.intent");
        match client
            .pause_sandbox(with_timeout(req, LONG_OPERATION_TIMEOUT))
            .await
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                timer.host(&reply);
                let Some(build_id) = non_empty(&reply.build_id) else {
                    let reason = format!("host {host_id} paused the sandbox but named no build");
                    self.fail(id, SandboxState::Pausing, &reason).await;
                    return Err(Error::HostReply {
                        host: host_id,
                        call: "PauseSandbox",
                        detail: "empty build_id".into(),
                    });
                };
                let timing = timer.finish();
                self.record_pause(
                    &sb,
                    &host_id,
                    &build_id,
                    reply.build_stored_bytes,
                    SandboxState::Pausing,
                    Some(timing.clone()),
                )
                .await?;
                self.metrics
                    .observe("pause", started.elapsed().as_secs_f64());
                self.metrics.observe_phases(&timing);
                self.load(None, id).await
            }
            Err(status) => {
                // What the host did counts, not what the call returned.
                let settled = self
                    .settle_from_host(&sb, &host_id, SandboxState::Pausing, None)
                    .await;
                if settled == Some(SandboxState::Paused) {
                    self.metrics
                        .observe("pause", started.elapsed().as_secs_f64());
                    return self.load(None, id).await;
                }
                Err(self.host_error(&host_id, "PauseSandbox", status).await)
            }
        }
    }

    /// A pause or resume call to the host failed — refused, timed out, or
    /// its connection reset. The sandbox is whatever its host now says it
    /// is: ask, and move the row (still in `from`) there. A host that still
    /// holds the VM or the paused build never loses the sandbox to a
    /// transport error; only the host's own word fails it. A host that does
    /// not answer leaves the row transitional, for the reconciler to settle
    /// from the host's report once it answers again. Returns the state the
    /// row was settled into, if any.
    async fn settle_from_host(
        &self,
        sb: &Sandbox,
        host_id: &str,
        from: SandboxState,
        resume_timeout_s: Option<u64>,
    ) -> Option<SandboxState> {
        let id = sb.id.as_str();
        let asked = match self.hosts.client(host_id) {
            Ok(mut client) => {
                client
                    .get_sandbox(with_timeout(
                        pb::SandboxRef {
                            sandbox_id: id.to_owned(),
                        },
                        INFO_TIMEOUT,
                    ))
                    .await
            }
            Err(_) => return None,
        };
        let mut stored_bytes = 0;
        let observed = match asked {
            Ok(reply) => {
                let o = reply.into_inner();
                stored_bytes = o.build_stored_bytes;
                let state = pb::SandboxState::try_from(o.state)
                    .ok()
                    .and_then(proto_state);
                (state, non_empty(&o.build_id), non_empty(&o.failure_reason))
            }
            Err(status) if status.code() == tonic::Code::NotFound => (None, None, None),
            Err(status) => {
                tracing::warn!(
                    sandbox = %id, host = %host_id, error = %status_reason(&status),
                    "cannot ask the host what became of the sandbox; the reconciler will settle it"
                );
                return None;
            }
        };
        let now = now_ms();
        let to = match (from, observed) {
            (_, (Some(SandboxState::Running), _, _)) => {
                let changes = Changes {
                    expires_at: resume_timeout_s.map(|t| Some(expiry(t, now))),
                    ..Changes::default()
                };
                self.store
                    .transition(
                        None,
                        id,
                        &[from],
                        SandboxState::Running,
                        &changes,
                        now,
                        None,
                    )
                    .await
                    .ok()?
                    .then_some(SandboxState::Running)
            }
            (SandboxState::Pausing, (Some(SandboxState::Paused), Some(build), _)) => self
                .record_pause(sb, host_id, &build, stored_bytes, from, None)
                .await
                .ok()?
                .then_some(SandboxState::Paused),
            // The resume did not happen (or was undone): the build is intact.
            (SandboxState::Resuming, (Some(SandboxState::Paused) | None, _, _)) => self
                .store
                .transition(
                    None,
                    id,
                    &[from],
                    SandboxState::Paused,
                    &Changes::default(),
                    now,
                    None,
                )
                .await
                .ok()?
                .then_some(SandboxState::Paused),
            (_, (Some(SandboxState::Failed), _, reason)) => {
                let reason = reason.unwrap_or_else(|| format!("host {host_id} reports it failed"));
                self.fail(id, from, &reason).await;
                Some(SandboxState::Failed)
            }
            (_, (None, _, _)) => {
                let reason = format!("{from} interrupted and host {host_id} has no sandbox left");
                self.fail(id, from, &reason).await;
                Some(SandboxState::Failed)
            }
            // Still busy on the host, or an answer that settles nothing:
            // the reconciler finishes it from the host's later reports.
            _ => None,
        };
        if let Some(to) = to {
            tracing::info!(sandbox = %id, host = %host_id, %from, %to, "settled from the host's report after a failed call");
        }
        to
    }

    async fn record_pause(
        &self,
        sb: &Sandbox,
        host_id: &str,
        build_id: &str,
        stored_bytes: u64,
        from: SandboxState,
        timing: Option<OperationTiming>,
    ) -> Result<bool> {
        let now = now_ms();
        self.store
            .insert_build(&Build {
                id: build_id.to_owned(),
                team_id: sb.team_id.clone(),
                host_id: host_id.to_owned(),
                kind: BuildKind::Pause,
                source_sandbox_id: Some(sb.id.clone()),
                vcpus: sb.vcpus,
                memory_mib: sb.memory_mib,
                stored_bytes,
                created_at: now,
                released_at: None,
            })
            .await?;
        let changes = Changes {
            build_id: Some(build_id.to_owned()),
            expires_at: Some(None),
            last_operation: timing,
            ..Changes::default()
        };
        let moved = self
            .store
            .transition(
                None,
                &sb.id,
                &[from],
                SandboxState::Paused,
                &changes,
                now,
                None,
            )
            .await?;
        if moved && let Some(old) = sb.build_id.as_deref().filter(|b| *b != build_id) {
            self.store.release_build(old, now).await?;
        }
        Ok(moved)
    }

    /// Resume a paused sandbox on the host that holds its build.
    pub async fn resume(
        &self,
        team_id: &str,
        id: &str,
        timeout_s: Option<u64>,
        env: BTreeMap<String, String>,
    ) -> Result<Sandbox> {
        let _claim = self.in_flight.claim(id);
        let started = Instant::now();
        let mut timer = Timer::start("resume");
        let sb = self
            .store
            .sandbox(Some(team_id), id)
            .await?
            .ok_or_else(|| Error::SandboxNotFound { id: id.to_owned() })?;
        if sb.state != SandboxState::Paused {
            return Err(Error::StateConflict {
                id: id.to_owned(),
                state: sb.state,
                action: "resume",
            });
        }
        // The team's own limit first: no host can lift it.
        self.check_quota(team_id, sb.vcpus, sb.memory_mib).await?;
        let host_id = Self::host_of(&sb)?.to_owned();
        let usage = self.store.host_usage().await?;
        let snap = self
            .hosts
            .snapshots(&usage)
            .into_iter()
            .find(|s| s.id == host_id)
            .ok_or_else(|| {
                Error::NoCapacity(NoCapacity::HostDown {
                    host_id: host_id.clone(),
                })
            })?;
        scheduler::resume_fits(&snap, sb.vcpus, sb.memory_mib).map_err(Error::NoCapacity)?;
        let cap = CapacityCheck {
            host_id: host_id.clone(),
            vcpus_total: snap.vcpus_total,
            memory_mib_total: snap.memory_mib_total,
            team_id: sb.team_id.clone(),
            quota: self.quota,
        };
        timer.lap("control.schedule");
        let now = now_ms();
        if !self
            .store
            .transition(
                Some(team_id),
                id,
                &[SandboxState::Paused],
                SandboxState::Resuming,
                &Changes::default(),
                now,
                Some(&cap),
            )
            .await?
        {
            let err = self.conflict(Some(team_id), id, "resume").await;
            return Err(match err {
                // Still paused: the quota or capacity check lost a race.
                Error::StateConflict {
                    state: SandboxState::Paused,
                    ..
                } => match self.check_quota(team_id, sb.vcpus, sb.memory_mib).await {
                    Err(quota) => quota,
                    Ok(()) => Error::NoCapacity(NoCapacity::Full {
                        vcpus: sb.vcpus,
                        memory_mib: sb.memory_mib,
                    }),
                },
                other => other,
            });
        }
        if let Some(t) = timeout_s {
            self.store.set_timeout(team_id, id, t).await?;
        }
        let timeout_s = timeout_s.unwrap_or(sb.timeout_s);
        let mut client = self.hosts.client(&host_id)?;
        let req = pb::ResumeSandboxRequest {
            sandbox_id: id.to_owned(),
            env: env.into_iter().collect(),
            guest_token: auth::new_guest_token(),
            ingress: Some(self.ingress_policy(id, &sb.ingress)),
            network: Some(proto_network(
                &sb.network,
                &self.egress_for(&sb.team_id).await?,
            )),
        };
        timer.lap("control.intent");
        match client
            .resume_sandbox(with_timeout(req, LONG_OPERATION_TIMEOUT))
            .await
        {
            Ok(reply) => {
                timer.host(reply.get_ref());
                let timing = timer.finish();
                let now = now_ms();
                let changes = Changes {
                    expires_at: Some(Some(expiry(timeout_s, now))),
                    last_operation: Some(timing.clone()),
                    ..Changes::default()
                };
                self.store
                    .transition(
                        None,
                        id,
                        &[SandboxState::Resuming],
                        SandboxState::Running,
                        &changes,
                        now,
                        None,
                    )
                    .await?;
                self.metrics
                    .observe("resume", started.elapsed().as_secs_f64());
                self.metrics.observe_phases(&timing);
                self.load(None, id).await
            }
            Err(status) => {
                let settled = self
                    .settle_from_host(&sb, &host_id, SandboxState::Resuming, Some(timeout_s))
                    .await;
                if settled == Some(SandboxState::Running) {
                    self.metrics
                        .observe("resume", started.elapsed().as_secs_f64());
                    return self.load(None, id).await;
                }
                Err(self.host_error(&host_id, "ResumeSandbox", status).await)
            }
        }
    }

    /// Freeze a running sandbox into a named template; the sandbox keeps running.
    pub async fn snapshot(&self, team_id: &str, id: &str, name: &str) -> Result<Template> {
        self.snapshot_with(team_id, id, name, None).await
    }

    /// [`Operations::snapshot`], recording what the template's sandboxes inherit.
    pub async fn snapshot_with(
        &self,
        team_id: &str,
        id: &str,
        name: &str,
        defaults: Option<crate::model::TemplateDefaults>,
    ) -> Result<Template> {
        let _claim = self.in_flight.claim(id);
        // Both checked again atomically at insert; these save a wasted snapshot.
        if self.store.template(team_id, name).await?.is_some() {
            return Err(Error::TemplateExists {
                name: name.to_owned(),
            });
        }
        if self.quota.templates.is_some() || self.quota.storage_mib.is_some() {
            let usage = self.store.team_usage(team_id).await?;
            if let Some(max) = self.quota.templates {
                let would = usage.templates + 1;
                if would > max {
                    return Err(templates_over_quota(would, max));
                }
            }
            self.check_storage_quota(&usage)?;
        }
        let now = now_ms();
        if !self
            .store
            .transition(
                Some(team_id),
                id,
                &[SandboxState::Running],
                SandboxState::Snapshotting,
                &Changes::default(),
                now,
                None,
            )
            .await?
        {
            return Err(self.conflict(Some(team_id), id, "be snapshotted").await);
        }
        let sb = self.load(None, id).await?;
        let host_id = Self::host_of(&sb)?.to_owned();
        let mut client = self.hosts.client(&host_id)?;
        let back_to_running = || async {
            let r = self
                .store
                .transition(
                    None,
                    id,
                    &[SandboxState::Snapshotting],
                    SandboxState::Running,
                    &Changes::default(),
                    now_ms(),
                    None,
                )
                .await;
            if let Err(err) = r {
                tracing::error!(sandbox = %id, error = %err, "leaving snapshotting failed; the reconciler will retry");
            }
        };
        let req = pb::CreateSnapshotRequest {
            sandbox_id: id.to_owned(),
        };
        let snap = match client
            .create_snapshot(with_timeout(req, LONG_OPERATION_TIMEOUT))
            .await
        {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                // A failed snapshot does not stop the VM: it is still running.
                back_to_running().await;
                return Err(self.host_error(&host_id, "CreateSnapshot", status).await);
            }
        };
        let now = now_ms();
        let build = Build {
            id: snap.build_id.clone(),
            team_id: team_id.to_owned(),
            host_id: host_id.clone(),
            kind: BuildKind::Template,
            source_sandbox_id: Some(id.to_owned()),
            vcpus: sb.vcpus,
            memory_mib: sb.memory_mib,
            stored_bytes: snap.stored_bytes,
            created_at: now,
            released_at: None,
        };
        let template = Template {
            id: ember_types::TemplateId::new().to_string(),
            team_id: team_id.to_owned(),
            name: name.to_owned(),
            build_id: snap.build_id.clone(),
            vcpus: sb.vcpus,
            memory_mib: sb.memory_mib,
            source_sandbox_id: Some(id.to_owned()),
            size_bytes: snap.stored_bytes,
            created_at: now,
            defaults,
        };
        let inserted = self
            .store
            .insert_template_within(&build, &template, self.quota.templates)
            .await;
        back_to_running().await;
        match inserted {
            Ok(crate::store::TemplateInsert::Inserted) => Ok(template),
            Ok(refused) => {
                // Lost a race for the name: drop the build we just made.
                let req = pb::DeleteSnapshotRequest {
                    build_id: snap.build_id,
                };
                if let Err(s) = client
                    .delete_snapshot(with_timeout(req, INFO_TIMEOUT))
                    .await
                {
                    tracing::warn!(host = %host_id, error = %status_reason(&s), "dropping a refused template's build failed");
                }
                Err(match refused {
                    crate::store::TemplateInsert::OverQuota { would } => {
                        templates_over_quota(would, self.quota.templates.unwrap_or(0))
                    }
                    _ => Error::TemplateExists {
                        name: name.to_owned(),
                    },
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Delete a template by name. The name is free at once; the host keeps
    /// the data while anything depends on it. Returns it and whether the data went.
    pub async fn delete_template(&self, team_id: &str, name: &str) -> Result<(Template, bool)> {
        let template = self
            .store
            .delete_template(team_id, name, now_ms())
            .await?
            .ok_or_else(|| Error::TemplateNotFound {
                name: name.to_owned(),
            })?;
        let build = self.store.build(&template.build_id).await?;
        let Some(build) = build else {
            return Ok((template, false));
        };
        let mut client = match self.hosts.client(&build.host_id) {
            Ok(c) => c,
            Err(_) => return Ok((template, false)),
        };
        let req = pb::DeleteSnapshotRequest {
            build_id: build.id.clone(),
        };
        match client
            .delete_snapshot(with_timeout(req, INFO_TIMEOUT))
            .await
        {
            Ok(reply) => Ok((template, reply.into_inner().data_freed)),
            Err(status) => {
                tracing::warn!(host = %build.host_id, build = %build.id, error = %status_reason(&status), "host did not delete the template's build");
                if is_unreachable(&status) {
                    self.hosts
                        .mark_unreachable(&build.host_id, &status_reason(&status))
                        .await;
                }
                Ok((template, false))
            }
        }
    }

    /// A running sandbox of the team and a client for its host (exec, files).
    pub async fn running(&self, team_id: &str, id: &str) -> Result<(Sandbox, HostClient)> {
        let sb = self
            .store
            .sandbox(Some(team_id), id)
            .await?
            .ok_or_else(|| Error::SandboxNotFound { id: id.to_owned() })?;
        if sb.state != SandboxState::Running {
            return Err(Error::NotRunning {
                id: id.to_owned(),
                state: sb.state,
            });
        }
        let client = self.hosts.client(Self::host_of(&sb)?)?;
        Ok((sb, client))
    }

    /// Replace a running or paused sandbox's egress rules: on its host
    /// first (a running VM's filter changes at once; a paused one keeps them
    /// for its resume), then in its row.
    pub async fn set_network(
        &self,
        team_id: &str,
        id: &str,
        network: NetworkPolicy,
    ) -> Result<Sandbox> {
        let sb = self
            .store
            .sandbox(Some(team_id), id)
            .await?
            .ok_or_else(|| Error::SandboxNotFound { id: id.to_owned() })?;
        if !matches!(sb.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::StateConflict {
                id: id.to_owned(),
                state: sb.state,
                action: "change its network rules",
            });
        }
        let host_id = Self::host_of(&sb)?.to_owned();
        let mut client = self.hosts.client(&host_id)?;
        let req = pb::SetNetworkPolicyRequest {
            sandbox_id: id.to_owned(),
            network: Some(proto_network(
                &network,
                &self.egress_for(&sb.team_id).await?,
            )),
        };
        if let Err(status) = client
            .set_network_policy(with_timeout(req, INFO_TIMEOUT))
            .await
        {
            return Err(self.host_error(&host_id, "SetNetworkPolicy", status).await);
        }
        self.store.set_network(team_id, id, &network).await?;
        self.load(Some(team_id), id).await
    }

    /// Activity on a sandbox pushes its expiry out to now + its timeout.
    pub async fn touch(&self, sb: &Sandbox) {
        let now = now_ms();
        let next = ttl::extended_expiry(sb.expires_at, sb.timeout_s, now);
        if Some(next) == sb.expires_at {
            return;
        }
        if let Err(err) = self.store.set_expiry(None, &sb.id, next, true).await {
            tracing::warn!(sandbox = %sb.id, error = %err, "extending the timeout failed");
        }
    }

    /// Turn a host call failure on an open sandbox into an error, marking the host.
    pub async fn guest_call_error(
        &self,
        sb: &Sandbox,
        call: &'static str,
        status: tonic::Status,
    ) -> Error {
        let host = sb.host_id.clone().unwrap_or_default();
        self.host_error(&host, call, status).await
    }

    /// The egress ceiling for `team_id`: the server's grants, plus the
    /// team's own where the operator gave it some.
    pub async fn egress_for(&self, team_id: &str) -> Result<ember_types::cidr::EgressCeiling> {
        if self.team_egress.is_empty() {
            return Ok(self.egress.clone());
        }
        let name = self.store.team(team_id).await?.map(|t| t.name);
        Ok(name
            .and_then(|n| self.team_egress.get(&n).cloned())
            .unwrap_or_else(|| self.egress.clone()))
    }

    /// Kill or pause every running sandbox whose time is up.
    pub async fn sweep_expired(&self) -> Result<()> {
        let now = now_ms();
        let rows = self.store.expired_sandboxes(now, 200).await?;
        // Concurrently: one slow host must not hold back everyone else's timeouts.
        let rows = &rows;
        let work = ttl::decide(rows, now).into_iter().map(|action| async move {
            let id = match &action {
                ttl::TtlAction::Kill { sandbox_id } | ttl::TtlAction::Pause { sandbox_id } => {
                    sandbox_id
                }
            };
            if let Some(row) = rows.iter().find(|r| &r.id == id)
                && self.recent_host_traffic(row).await
            {
                return;
            }
            self.apply_ttl(action, "timeout").await;
        });
        futures::future::join_all(work).await;
        self.sweep_lifetime(now).await?;
        self.store
            .purge_destroyed(now - DESTROYED_RETENTION_MS)
            .await?;
        if let Some(keep) = self.lifetime.audit_retention_s {
            let gone = self.store.purge_audit(ttl::cutoff(now, keep)).await?;
            if gone > 0 {
                tracing::debug!(gone, "audit entries past their retention deleted");
            }
        }
        Ok(())
    }

    /// The server-wide limits: sandboxes running longer than the maximum
    /// get their `on_timeout` (traffic and exec do not save them); sandboxes
    /// paused longer than the retention are destroyed.
    async fn sweep_lifetime(&self, now: i64) -> Result<()> {
        let mut work = Vec::new();
        if let Some(max) = self.lifetime.max_running_s {
            for row in self
                .store
                .running_too_long(ttl::cutoff(now, max), 200)
                .await?
            {
                work.push((ttl::action(&row), "maximum running time reached"));
            }
        }
        if let Some(keep) = self.lifetime.paused_retention_s {
            for row in self
                .store
                .paused_too_long(ttl::cutoff(now, keep), 200)
                .await?
            {
                work.push((
                    ttl::TtlAction::Kill { sandbox_id: row.id },
                    "paused longer than the retention",
                ));
            }
        }
        let work = work
            .into_iter()
            .map(|(action, why)| self.apply_ttl(action, why));
        futures::future::join_all(work).await;
        Ok(())
    }

    /// Kill or pause a sandbox for a time limit (`why` says which), through
    /// the same compare-and-set operations as the API.
    async fn apply_ttl(&self, action: ttl::TtlAction, why: &'static str) {
        let result = match &action {
            ttl::TtlAction::Kill { sandbox_id } => self.destroy(None, sandbox_id).await,
            ttl::TtlAction::Pause { sandbox_id } => self.pause(None, sandbox_id).await.map(|_| ()),
        };
        match result {
            Ok(()) => tracing::info!(?action, why, "time limit applied"),
            // Another replica or a user request got there first.
            Err(Error::StateConflict { .. } | Error::SandboxNotFound { .. }) => {}
            Err(err) => tracing::warn!(?action, why, error = %err, "applying a time limit failed"),
        }
    }

    /// Before a timeout ends a sandbox whose host serves ports itself: did
    /// requests reach it there since its expiry was last pushed out? If so
    /// the expiry moves (and true: leave it running).
    async fn recent_host_traffic(&self, row: &Sandbox) -> bool {
        let Some(host_id) = row.host_id.as_deref() else {
            return false;
        };
        if self.hosts.ingress_url(host_id).is_none() {
            return false;
        }
        let Ok(mut client) = self.hosts.client(host_id) else {
            return false;
        };
        let req = pb::SandboxRef {
            sandbox_id: row.id.clone(),
        };
        match client.get_sandbox(with_timeout(req, INFO_TIMEOUT)).await {
            Ok(reply) => {
                self.note_host_traffic(row, reply.into_inner().last_traffic_unix_ms)
                    .await
            }
            Err(_) => false,
        }
    }

    /// One reconciliation pass over every known host.
    pub async fn reconcile_all(&self, params: &reconciler::Params) -> Result<()> {
        for host_id in self.hosts.host_ids() {
            if let Err(err) = self.reconcile_host(&host_id, params).await {
                tracing::warn!(host = %host_id, error = %err, "reconciling host failed");
            }
        }
        Ok(())
    }

    async fn reconcile_host(&self, host_id: &str, params: &reconciler::Params) -> Result<()> {
        let now = now_ms();
        // Rows first, then the listing (see the reconciler's module comment).
        let rows = self
            .store
            .sandboxes_on_host(host_id, now - 3600 * 1000)
            .await?;
        let mut client = self.hosts.client(host_id)?;
        let view = match client
            .list_sandboxes(with_timeout(pb::ListSandboxesRequest {}, INFO_TIMEOUT))
            .await
        {
            Ok(reply) => HostView::Listed({
                let listed = reply.into_inner().sandboxes;
                self.sync_ingress(&rows, &listed).await;
                listed
                    .into_iter()
                    .filter_map(|s| {
                        Some(Observed {
                            state: proto_state(s.state())?,
                            build_id: non_empty(&s.build_id),
                            failure_reason: non_empty(&s.failure_reason),
                            created_at: parse_rfc3339(&s.created_at),
                            id: s.sandbox_id,
                        })
                    })
                    .collect()
            }),
            Err(status) => HostView::Unreachable {
                error: status_reason(&status),
                for_ms: i64::try_from(self.hosts.unreachable_for(host_id).as_millis())
                    .unwrap_or(i64::MAX),
            },
        };
        let now = now_ms();
        for action in reconciler::decide(host_id, &rows, &view, now, params) {
            if action
                .sandbox_id()
                .is_some_and(|id| self.in_flight.contains(id))
            {
                continue; // its call here settles it
            }
            if let Err(err) = self.apply(host_id, &rows, &action, &mut client).await {
                tracing::warn!(host = %host_id, ?action, error = %err, "reconcile action failed");
            }
        }
        if matches!(view, HostView::Listed(_)) {
            self.sweep_orphan_templates(host_id, &mut client, now, params)
                .await?;
        }
        Ok(())
    }

    /// What a host's own ingress did since the last pass: requests it
    /// carried push the sandbox's timeout out, and a host whose port
    /// access disagrees with the database (a `SetIngress` that did not
    /// arrive) is told again.
    async fn sync_ingress(&self, rows: &[Sandbox], listed: &[pb::Sandbox]) {
        for s in listed {
            let Some(row) = rows
                .iter()
                .find(|r| r.id == s.sandbox_id && r.state == SandboxState::Running)
            else {
                continue;
            };
            if s.state() == pb::SandboxState::Running && s.ingress_public != row.ingress.public {
                self.push_ingress(row).await;
            }
            self.note_host_traffic(row, s.last_traffic_unix_ms).await;
        }
    }

    /// Traffic a host's ingress carried at `at_ms` is activity: extend the
    /// sandbox's expiry as a request through the control plane would.
    /// True if the sandbox now expires later than `now`.
    async fn note_host_traffic(&self, row: &Sandbox, at_ms: u64) -> bool {
        let Ok(at) = i64::try_from(at_ms) else {
            return false;
        };
        if at == 0 {
            return false;
        }
        let next = ttl::extended_expiry(row.expires_at, row.timeout_s, at);
        if row.expires_at.is_some_and(|e| next <= e) {
            return false;
        }
        if let Err(err) = self.store.set_expiry(None, &row.id, next, true).await {
            tracing::warn!(sandbox = %row.id, error = %err, "extending the timeout failed");
            return false;
        }
        next > now_ms()
    }

    /// Delete templates a host keeps that no template row names: a snapshot
    /// whose reply the control plane never recorded (it crashed, or the
    /// host's agent died after saving it), or a template deleted here while
    /// the host did not answer. Only ones older than the grace period: a
    /// young one may belong to a snapshot call whose row is being written.
    async fn sweep_orphan_templates(
        &self,
        host_id: &str,
        client: &mut HostClient,
        now: i64,
        params: &reconciler::Params,
    ) -> Result<()> {
        let Ok(reply) = client
            .list_snapshots(with_timeout(pb::ListSnapshotsRequest {}, INFO_TIMEOUT))
            .await
        else {
            return Ok(());
        };
        for snap in reply.into_inner().snapshots {
            let old = parse_rfc3339(&snap.created_at).is_some_and(|c| now - c >= params.grace_ms);
            if !old {
                continue;
            }
            let named = self
                .store
                .build(&snap.build_id)
                .await?
                .is_some_and(|b| b.released_at.is_none());
            if named {
                continue;
            }
            tracing::info!(host = %host_id, build = %snap.build_id, "deleting a template no row names");
            let req = pb::DeleteSnapshotRequest {
                build_id: snap.build_id.clone(),
            };
            if let Err(s) = client
                .delete_snapshot(with_timeout(req, INFO_TIMEOUT))
                .await
            {
                tracing::warn!(host = %host_id, build = %snap.build_id, error = %status_reason(&s), "deleting an orphan template failed");
            }
        }
        Ok(())
    }

    async fn apply(
        &self,
        host_id: &str,
        rows: &[Sandbox],
        action: &Action,
        client: &mut HostClient,
    ) -> Result<()> {
        let now = now_ms();
        let row = |id: &str| rows.iter().find(|r| r.id == id);
        match action {
            Action::HostUnreachable { error } => self.hosts.mark_unreachable(host_id, error).await,
            Action::HostReachable => self.hosts.mark_reachable(host_id).await,
            Action::MarkFailed {
                sandbox_id,
                from,
                reason,
            } => {
                tracing::warn!(sandbox = %sandbox_id, %from, reason, "reconciler: sandbox failed");
                self.fail(sandbox_id, *from, reason).await;
            }
            Action::MarkRunning { sandbox_id, from } => {
                let timeout_s = row(sandbox_id).map_or(0, |r| r.timeout_s);
                let changes = Changes {
                    expires_at: Some(Some(expiry(timeout_s, now))),
                    ..Changes::default()
                };
                self.store
                    .transition(
                        None,
                        sandbox_id,
                        &[*from],
                        SandboxState::Running,
                        &changes,
                        now,
                        None,
                    )
                    .await?;
            }
            Action::MarkPaused {
                sandbox_id,
                from,
                build_id,
            } => {
                let Some(sb) = row(sandbox_id) else {
                    return Ok(());
                };
                match build_id {
                    Some(b) => {
                        // The listing does not say the build's size: it
                        // counts as 0 against the storage quota.
                        self.record_pause(sb, host_id, b, 0, *from, None).await?;
                    }
                    None => {
                        let changes = Changes {
                            expires_at: Some(None),
                            ..Changes::default()
                        };
                        self.store
                            .transition(
                                None,
                                sandbox_id,
                                &[*from],
                                SandboxState::Paused,
                                &changes,
                                now,
                                None,
                            )
                            .await?;
                    }
                }
            }
            Action::MarkDestroyed { sandbox_id, from } => {
                if let Some(sb) = row(sandbox_id) {
                    self.finish_destroy(sb, *from).await?;
                }
            }
            Action::DestroyOnHost {
                sandbox_id,
                mark_destroyed_from,
                why,
            } => {
                tracing::info!(host = %host_id, sandbox = %sandbox_id, why, "reconciler: destroying on host");
                let req = pb::SandboxRef {
                    sandbox_id: sandbox_id.clone(),
                };
                match client
                    .destroy_sandbox(with_timeout(req, LIFECYCLE_TIMEOUT))
                    .await
                {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(self.host_error(host_id, "DestroySandbox", s).await),
                }
                if let (Some(from), Some(sb)) = (mark_destroyed_from, row(sandbox_id)) {
                    self.finish_destroy(sb, *from).await?;
                }
            }
        }
        Ok(())
    }
}

/// Where the control plane's side of one lifecycle operation went: each
/// `lap` closes a phase that began where the previous one ended; `host`
/// closes the host call and adds the host agent's own phases inside it.
struct Timer {
    operation: &'static str,
    started: Instant,
    last: Instant,
    phases: Vec<PhaseTiming>,
}

impl Timer {
    fn start(operation: &'static str) -> Timer {
        let now = Instant::now();
        Timer {
            operation,
            started: now,
            last: now,
            phases: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &str) {
        let now = Instant::now();
        self.phases.push(PhaseTiming {
            phase: phase.to_owned(),
            ms: (now - self.last).as_secs_f64() * 1e3,
        });
        self.last = now;
    }

    fn host(&mut self, reply: &pb::Sandbox) {
        self.lap("host");
        self.phases
            .extend(
                reply
                    .phases
                    .iter()
                    .filter(|p| p.name != "total")
                    .map(|p| PhaseTiming {
                        phase: format!("host.{}", p.name),
                        ms: p.micros as f64 / 1e3,
                    }),
            );
    }

    fn finish(self) -> OperationTiming {
        OperationTiming {
            operation: self.operation.to_owned(),
            total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            phases: self.phases,
        }
    }
}

fn templates_over_quota(would: u64, max: u64) -> Error {
    Error::QuotaExceeded {
        what: "templates",
        setting: "templates",
        would,
        max,
        remedy: "delete one of its templates first (the sandbox keeps running)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_only_the_rules_within_todays_ceiling() {
        let policy = NetworkPolicy {
            allow_out: vec!["10.9.0.0/16".into(), "1.1.1.0/24".into()],
            deny_out: vec!["8.8.8.8/32".into()],
        };
        let granted = ember_types::cidr::EgressCeiling::new(&["10.9.0.0/16"]).unwrap();
        let sent = proto_network(&policy, &granted);
        assert_eq!(sent.allow_out, policy.allow_out);
        assert_eq!(sent.deny_out, policy.deny_out);
        // The grant withdrawn: the private range is left out, the rest kept.
        let sent = proto_network(&policy, &Default::default());
        assert_eq!(sent.allow_out, vec!["1.1.1.0/24".to_owned()]);
        assert_eq!(sent.deny_out, policy.deny_out);
    }
}
