//! The control plane's domain records as the store holds them: sandboxes and
//! their state machine, teams, API keys, hosts, templates and builds.
//!
//! These are not wire types (those live in [`crate::wire`]) and carry no I/O.
//! Timestamps are Unix milliseconds, the one time type both SQLite and
//! PostgreSQL store identically.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life. The database row is the truth; every change
/// is a compare-and-set from an expected state (see [`crate::store`]).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    Snapshotting,
    Destroying,
    Failed,
    Destroyed,
}

impl SandboxState {
    pub const ALL: [SandboxState; 9] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Paused,
        SandboxState::Resuming,
        SandboxState::Snapshotting,
        SandboxState::Destroying,
        SandboxState::Failed,
        SandboxState::Destroyed,
    ];

    /// States in which a VM holds (or is acquiring) vCPUs and memory on its host.
    pub const OCCUPYING: [SandboxState; 6] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Resuming,
        SandboxState::Snapshotting,
        SandboxState::Destroying,
    ];

    /// States in which an operation is in flight: another request must wait
    /// (409) and the reconciler finishes it if its owner died.
    pub const TRANSITIONAL: [SandboxState; 5] = [
        SandboxState::Creating,
        SandboxState::Pausing,
        SandboxState::Resuming,
        SandboxState::Snapshotting,
        SandboxState::Destroying,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Snapshotting => "snapshotting",
            SandboxState::Destroying => "destroying",
            SandboxState::Failed => "failed",
            SandboxState::Destroyed => "destroyed",
        }
    }

    pub fn is_transitional(self) -> bool {
        Self::TRANSITIONAL.contains(&self)
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown sandbox state {s:?}: expected one of {}",
                    SandboxState::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

/// What happens to a sandbox whose timeout passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Kill,
    Pause,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Kill => "kill",
            OnTimeout::Pause => "pause",
        }
    }
}

impl FromStr for OnTimeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(OnTimeout::Kill),
            "pause" => Ok(OnTimeout::Pause),
            other => Err(format!(
                "unknown on_timeout {other:?}: expected \"kill\" or \"pause\""
            )),
        }
    }
}

/// Egress rules for a sandbox (CIDR strings, validated at the API boundary).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
}

/// A sandbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub team_id: String,
    pub state: SandboxState,
    pub host_id: Option<String>,
    /// The template it was created from, by name at creation time (`base` for a cold boot).
    pub template: String,
    /// The build it started from (empty for the base image).
    pub source_build_id: Option<String>,
    /// Its own latest build (set once paused).
    pub build_id: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub network: NetworkPolicy,
    pub timeout_s: u64,
    pub on_timeout: OnTimeout,
    pub expires_at: Option<i64>,
    pub access_token_sha256: String,
    pub failure_reason: Option<String>,
    pub created_at: i64,
    pub state_changed_at: i64,
    pub destroyed_at: Option<i64>,
    /// Where its last completed lifecycle operation spent its time.
    pub last_operation: Option<OperationTiming>,
    pub ingress: Ingress,
}

/// How a sandbox's ports may be reached through the ingress proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingress {
    /// Anyone who knows a port's URL may reach it (no traffic token).
    #[serde(default)]
    pub public: bool,
    /// A request to a paused sandbox's port resumes it first.
    #[serde(default)]
    pub auto_resume: bool,
}

/// Where one lifecycle operation (create, fork, resume, pause) spent its
/// time, as the control plane saw it: its own phases (`control.*`), the
/// host call (`host`), and inside it the host agent's phases (`host.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperationTiming {
    /// `create`, `fork`, `resume` or `pause`.
    pub operation: String,
    /// Milliseconds from the request to the recorded outcome.
    pub total_ms: f64,
    /// In the order they ended. Phases that ran concurrently overlap, and
    /// `host.*` phases are inside `host`.
    pub phases: Vec<PhaseTiming>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseTiming {
    pub phase: String,
    pub ms: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub is_admin: bool,
    pub created_at: i64,
}

/// An API key as stored: never the key itself, only its public prefix and the
/// SHA-256 of the whole key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub prefix: String,
    pub team_id: String,
    pub name: String,
    pub secret_sha256: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub role: crate::auth::Role,
    /// Unix ms after which the key is refused; `None` never expires.
    pub expires_at: Option<i64>,
}

/// One line of the audit log: who changed what, when, and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: String,
    pub at: i64,
    /// The caller's team (`None` for calls made by no team, such as a host
    /// registering).
    pub team_id: Option<String>,
    /// `key:<prefix>` or `sandbox:<id>` (an access token).
    pub actor: String,
    pub method: String,
    /// The route as declared, e.g. `/v1/sandboxes/{id}/pause`.
    pub route: String,
    /// The sandbox, template, key or team acted on, where there is one.
    pub target: Option<String>,
    pub status: u16,
}

/// A host's own credentials (see `ember_agent::identity`): what it proves
/// itself with when it registers, what replicas present when they call it,
/// and its pinned TLS certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct HostCredential {
    pub host_id: String,
    /// SHA-256 (hex) of the credential issued at the host's first join;
    /// `None` for an agent embedded in `ember server`.
    pub credential_hash: Option<String>,
    /// What every gRPC call to the host carries (`authorization: Bearer`).
    pub control_token: String,
    /// The host's self-signed certificate (PEM); `None` for a plain
    /// loopback agent.
    pub tls_cert: Option<String>,
    pub issued_at: i64,
    /// Set by `ember host revoke`: the host is refused until removed.
    pub revoked_at: Option<i64>,
}

impl std::fmt::Debug for HostCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCredential")
            .field("host_id", &self.host_id)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// A one-time join token (`ember host join-token create`); the token itself
/// is shown once and kept only as its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub token_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// The admin key that made it.
    pub created_by: Option<String>,
    pub used_at: Option<i64>,
    /// The host it admitted (and the only one it still admits, until it
    /// expires, for a retry of that host's join).
    pub used_by_host: Option<String>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: String,
    /// gRPC endpoint, e.g. `http://10.0.0.2:7001`.
    pub address: String,
    pub backend: String,
    pub version: String,
    pub vcpus_total: u32,
    pub memory_mib_total: u64,
    pub healthy: bool,
    pub last_error: Option<String>,
    pub registered_at: i64,
    pub last_seen_at: Option<i64>,
}

/// vCPUs and memory reserved on one host by sandboxes in occupying states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    pub vcpus: u64,
    pub memory_mib: u64,
}

/// Why a build exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildKind {
    /// Frozen from a running sandbox under a template name.
    Template,
    /// Written when a sandbox paused.
    Pause,
}

impl BuildKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildKind::Template => "template",
            BuildKind::Pause => "pause",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub id: String,
    pub team_id: String,
    /// Builds live on the host that wrote them (v1 does not move them).
    pub host_id: String,
    pub kind: BuildKind,
    pub source_sandbox_id: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub stored_bytes: u64,
    pub created_at: i64,
    /// Set when nothing in the control plane names it any more; the host frees
    /// its data once no other build or sandbox depends on it.
    pub released_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub build_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub source_sandbox_id: Option<String>,
    pub size_bytes: u64,
    pub created_at: i64,
    /// What its sandboxes inherit; `None` for a plain snapshot.
    pub defaults: Option<TemplateDefaults>,
}

/// What a template built from an image or Dockerfile hands its sandboxes:
/// environment under the caller's, and (recorded) the working directory,
/// user and start command the build used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateDefaults {
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub start: Vec<String>,
}

/// A template build job (`POST /v1/templates`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateBuild {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// `queued`, `running`, `ready` or `failed`.
    pub status: String,
    /// `image docker://…` or `Dockerfile`.
    pub source: String,
    pub step: u32,
    pub steps_total: u32,
    pub step_text: String,
    pub error: Option<String>,
    /// The newest part of the log; `log_dropped` bytes came before it.
    pub log: String,
    pub log_dropped: u64,
    pub sandbox_id: Option<String>,
    pub cached_steps: u32,
    pub created_at: i64,
    /// Written every few seconds by the control plane running the build.
    pub heartbeat_at: i64,
    pub finished_at: Option<i64>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) for a Unix-milliseconds timestamp.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Parse an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
        }
        assert!(
            "sleeping"
                .parse::<SandboxState>()
                .unwrap_err()
                .contains("running")
        );
    }

    #[test]
    fn timestamps_round_trip_through_rfc3339() {
        let ms = 1_700_000_000_123;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
    }
}
