//! REST API v1 wire types: the JSON bodies of requests and responses, with
//! their OpenAPI schemas. Requests reject unknown fields, so a typo is a 400
//! naming the field instead of a silently ignored option.
//!
//! Only shapes live here; validation and meaning live in [`crate::api`].
//! Timestamps are RFC 3339 strings in UTC.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use crate::model::{OnTimeout, SandboxState};

/// Every error: a stable machine-readable `code` and a message saying what to change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// One of: `invalid_request`, `invalid_json`, `unsupported_media_type`,
    /// `payload_too_large`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `template_locked`, `no_capacity`, `quota_exceeded` (429:
    /// the team's limit, named in the message), `rate_limited` (429 with
    /// `Retry-After`: the caller's request rate or concurrency), `host_error`,
    /// `internal`.
    pub code: String,
    pub message: String,
    /// The request field (or query parameter) at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Egress rules, as IPv4 CIDRs (`10.0.0.0/8`, or a single address).
/// Public addresses are open by default; private, link-local (cloud
/// metadata), loopback, multicast and reserved ranges are closed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Closed ranges to open. Only what the operator granted (`ember server
    /// --egress-grant CIDR`) may be opened: anything else is refused (400).
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// Destinations never allowed; evaluated first.
    #[serde(default)]
    pub deny_out: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// A template name of your team, or `base` to boot the base image.
    pub template: String,
    /// Defaults to the template's (1 for `base`). A template's value is locked.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Defaults to the template's (512 for `base`). A template's value is locked.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Seconds of inactivity before `on_timeout` applies; exec and process
    /// connections push the deadline to now + `timeout_s`. 1 to 86400.
    pub timeout_s: u64,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Environment for every process in the sandbox. Stored, never returned.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub network: NetworkPolicy,
    /// With `base`: boot the image instead of forking the host's warm base
    /// (the image booted once and snapshotted before any tenant saw it).
    /// Slower; for comparisons and for a guest with its own boot.
    #[serde(default)]
    pub cold: bool,
    /// Its ports are reachable through the ingress proxy without a traffic
    /// token (by default a request needs the sandbox's `traffic_token` or an
    /// API key of its team).
    #[serde(default)]
    pub public: bool,
    /// A request to one of its ports while it is paused resumes it (and is
    /// served once the port answers). With `on_timeout: pause` it goes back
    /// to sleep when idle.
    #[serde(default)]
    pub auto_resume: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    /// The template it was created from (`base` for the base image).
    pub template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub metadata: BTreeMap<String, String>,
    pub network: NetworkPolicy,
    pub timeout_s: u64,
    pub on_timeout: OnTimeout,
    /// When `on_timeout` applies, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub state_changed_at: String,
    /// Where its last completed create, fork, resume or pause spent its time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_operation: Option<crate::model::OperationTiming>,
    /// Its ports need no traffic token.
    #[serde(default)]
    pub public: bool,
    /// Traffic to a port of it, paused, resumes it.
    #[serde(default)]
    pub auto_resume: bool,
    /// Grants access to its ports (not exec or files): header
    /// `X-Ember-Traffic-Token`. Not needed when `public`.
    #[serde(default)]
    pub traffic_token: String,
    /// The ingress domain: port P is served at `P-{id}.{domain}`. Absent
    /// when the server has none; `/v1/sandboxes/{id}/ports/{port}/` always works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Where its ports are served, with `{port}` for the port number: a
    /// full URL on the host form, else a path on this API.
    #[serde(default)]
    pub port_url: String,
    /// While it runs on a host that serves ports itself: that host's URL
    /// for them, with `{port}` (one hop fewer; takes the traffic token,
    /// not API keys, and does not wake a paused sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_port_url: Option<String>,
    /// Only in the response to the create: a token that grants exec and file
    /// access to this sandbox alone (`Authorization: Bearer <token>`). Shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    /// Pass as `page_token` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Query of `GET /v1/sandboxes`. Metadata filters are extra parameters
/// `metadata.KEY=VALUE` (all must match).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListSandboxesQuery {
    /// Only sandboxes in this state (comma-separated for several). Destroyed
    /// sandboxes are listed only when asked for.
    pub state: Option<String>,
    /// Only sandboxes created from this template.
    pub template: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// From the previous page's `next_page_token`.
    pub page_token: Option<String>,
}

/// `PUT /v1/sandboxes/{id}/ingress`: fields left out keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressUpdate {
    #[serde(default)]
    pub public: Option<bool>,
    #[serde(default)]
    pub auto_resume: Option<bool>,
}

/// `POST /v1/sandboxes/{id}/links`: a browser link to a private port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    pub port: u16,
    /// Path (and query) on the guest's server to open; `/` by default.
    #[serde(default)]
    pub path: Option<String>,
}

/// A one-time link: opening it in a browser sets a cookie for the port's
/// host name and redirects to `path`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Link {
    pub url: String,
    /// RFC 3339; the link is refused after this (and after its first use).
    pub expires_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// A new timeout (seconds); defaults to the sandbox's current one.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Environment merged into the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// The sandbox now expires `timeout_s` seconds from now, and this becomes its timeout.
    pub timeout_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// Template name, unique within your team: 1–63 of `a-z 0-9 . _ -`,
    /// starting with a letter or digit. `base` is reserved.
    pub name: String,
}

/// Build a template from a container image or a Dockerfile (`POST
/// /v1/templates`). Give `image`, or `dockerfile` (and, for its COPY/ADD,
/// `context_tar_base64`). The build runs in a sandbox; the template is its
/// memory snapshot taken once the start command is ready, so sandboxes
/// made from it start with the service already running.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateRequest {
    /// Template name, as for snapshots: 1–63 of `a-z 0-9 . _ -`.
    pub name: String,
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`, pulled on the build's host.
    #[serde(default)]
    pub image: Option<String>,
    /// A Dockerfile's text: one stage; FROM (an image, a template of
    /// yours, or `base`), RUN, COPY/ADD, ENV, ARG, WORKDIR, USER, CMD,
    /// ENTRYPOINT, LABEL, EXPOSE.
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// The build context: a tar (or .tar.gz) of files COPY reads, base64.
    /// At most 48 MiB before encoding.
    #[serde(default)]
    pub context_tar_base64: Option<String>,
    /// Values for the Dockerfile's ARGs.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// A shell command started (in the background) before the snapshot;
    /// defaults to the Dockerfile's ENTRYPOINT/CMD.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// The service is ready when this shell command exits 0.
    #[serde(default)]
    pub ready_cmd: Option<String>,
    /// The service is ready when this port accepts connections.
    #[serde(default)]
    pub ready_port: Option<u16>,
    /// How long to wait for the ready check (default 300 s, at most 3600).
    #[serde(default)]
    pub ready_timeout_s: Option<u64>,
    /// The template's vCPUs and memory (defaults 1 and 512).
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Credentials for the image's registry: used for this build's pulls,
    /// never stored.
    #[serde(default)]
    pub registry_username: Option<String>,
    #[serde(default)]
    pub registry_password: Option<String>,
}

/// A template build job and its log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuild {
    pub build_id: String,
    pub name: String,
    /// `queued`, `running`, `ready` or `failed`.
    pub status: String,
    /// `image docker://…` or `Dockerfile`.
    pub source: String,
    /// The step running (1-based) of `steps_total`, and its instruction.
    pub step: u32,
    pub steps_total: u32,
    pub step_text: String,
    /// Leading steps skipped because the step cache held them.
    pub cached_steps: u32,
    /// Why it failed: the step, its command, exit code and last output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The log from `offset` (the query parameter) on.
    pub log: String,
    /// Pass this as `offset` to get only what follows.
    pub log_offset: u64,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildList {
    pub builds: Vec<TemplateBuild>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BuildLogQuery {
    /// Log bytes already seen: the reply carries only what follows.
    #[serde(default)]
    pub offset: u64,
}

/// A named template: a build frozen from a sandbox. New sandboxes from it
/// inherit its vCPUs and memory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    pub build_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sandbox_id: Option<String>,
    /// Bytes this build stores itself.
    pub size_bytes: u64,
    pub created_at: String,
    /// What its sandboxes inherit, for a template built from an image or
    /// a Dockerfile (absent for a snapshot of a sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<TemplateDefaults>,
}

/// A built template's defaults: environment variables (names only: values
/// are never returned), and the working directory and user of an exec that
/// names none, and the command that was serving when it was frozen.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateDefaults {
    pub env_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub start: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// The name is gone at once; the data goes when nothing depends on it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeletedSnapshot {
    pub name: String,
    pub build_id: String,
    /// False while paused sandboxes, sandboxes started from it, or other
    /// builds still use its data; the host frees it when the last one goes.
    pub data_freed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub rows: u32,
    pub cols: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program to run (looked up in `PATH` when not absolute).
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Kill the process after this long (0 = no limit).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Keep stdin open; write to it with `POST …/processes/{pid}/stdin`.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Return `{pid}` at once instead of streaming; reconnect with
    /// `GET …/processes/{pid}/events`.
    #[serde(default)]
    pub background: bool,
    /// A label shown in the process list.
    #[serde(default)]
    pub tag: Option<String>,
}

/// One line of an exec or process-events stream (`application/x-ndjson`).
///
/// Output is `text` when the chunk is valid UTF-8, else `data_b64`
/// (standard base64); exactly one of them is present. `seq` increases by
/// one per event and is what `?after=` takes to resume a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    Started {
        seq: u64,
        pid: u32,
    },
    Stdout {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    Stderr {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    Exit {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        timed_out: bool,
    },
    /// The stream broke (the host or guest failed); the process may live on.
    Error {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackgroundProcess {
    pub pid: u32,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Replay events with `seq` greater than this (default 0: everything buffered).
    pub after: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinRequest {
    /// Text to write.
    #[serde(default)]
    pub text: Option<String>,
    /// Bytes to write, base64 (instead of `text`).
    #[serde(default)]
    pub data_b64: Option<String>,
    /// Close stdin after writing.
    #[serde(default)]
    pub close: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// `TERM`, `KILL`, `INT`, `HUP`, `QUIT`, `USR1`, `USR2`, or a number.
    pub signal: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Process {
    pub pid: u32,
    pub cmd: String,
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub running: bool,
    pub background: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    pub started_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Act as this guest user (default: the sandbox's default user).
    pub user: Option<String>,
    /// For writes: the new file's mode, octal (e.g. `644`).
    pub mode: Option<String>,
    /// For deletes: remove a directory and everything in it.
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDirRequest {
    pub path: String,
    #[serde(default)]
    pub parents: bool,
    /// Octal mode, e.g. `755`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// Query of `GET /v1/sandboxes/{id}/files/watch`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Absolute path of the directory to watch.
    pub path: String,
    /// Also every directory below it, including ones made later.
    #[serde(default)]
    pub recursive: bool,
    /// Watch as this guest user (what they may read).
    pub user: Option<String>,
}

/// What happened in a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WatchEventType {
    /// First line: the watch is in place; changes from here on are reported.
    Started,
    Create,
    Write,
    Remove,
    /// Moved away (a new name inside the watch comes as `create`).
    Rename,
    Chmod,
    /// Changes were lost (the guest's queue overflowed): list again.
    Overflow,
}

/// One line of a watch's NDJSON stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub event_type: WatchEventType,
    /// Path relative to the watched directory (empty for `started`, `overflow`).
    pub name: String,
    pub is_dir: bool,
}

/// Move or rename a file or directory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    /// Absolute path of what to move.
    pub from: String,
    /// Absolute path it moves to.
    pub to: String,
    /// Replace what is at `to` (default: refuse with 409).
    #[serde(default)]
    pub overwrite: bool,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Directory,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileStat {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits, octal string (e.g. `644`).
    pub mode: String,
    pub modified_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub entries: Vec<FileStat>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A label for people ("ci", "alice's laptop").
    pub name: String,
    /// The team the key belongs to; only admin keys may name another team.
    #[serde(default)]
    pub team_id: Option<String>,
    /// Mint the key in E2B's shape, `e2b_` and 40 hex digits, for E2B SDKs
    /// that check a key's shape before sending it. It works like any other key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub e2b: bool,
    /// What the key may do: `member` (the default), `read_only`, or
    /// `admin` (only an admin key mints one, and only for an admin team).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::auth::Role>,
    /// Seconds until the key stops working (at most ten years); without it
    /// the key works until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    /// The key's public prefix; also what `DELETE /v1/keys/{id}` takes.
    pub id: String,
    pub name: String,
    pub team_id: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    pub role: crate::auth::Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// A new key. `key` is shown only here; the server keeps a hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    pub key: String,
    #[serde(flatten)]
    pub info: ApiKey,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<ApiKey>,
}

/// One quantity a team holds, and the server's limit for it (absent: none).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct UsageItem {
    pub used: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// What a team holds against its limits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TeamUsage {
    pub team_id: String,
    /// Sandboxes holding host resources (creating, running, resuming, …).
    pub running_sandboxes: UsageItem,
    /// vCPUs and MiB of memory of those sandboxes.
    pub vcpus: UsageItem,
    pub memory_mib: UsageItem,
    pub paused_sandboxes: UsageItem,
    /// Named snapshots the team holds.
    pub templates: UsageItem,
    /// MiB of the snapshots (builds) its paused sandboxes and templates
    /// hold on hosts; each counts the blocks it wrote itself. Checked
    /// before a pause or snapshot: under the limit, one more may be taken.
    pub storage_mib: UsageItem,
    /// Each key's (and access token's) request allowance; 0 means none.
    pub requests_per_second: f64,
    pub request_burst: u32,
    pub concurrent_requests: u32,
    /// How long a sandbox runs between a create or resume before its
    /// `on_timeout` applies, whatever its timeout; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_s: Option<u64>,
    /// How long a paused sandbox is kept; absent: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_retention_s: Option<u64>,
}

/// One audit log entry: who changed what, when, and the HTTP status it got.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    /// `key:<key ID>` or `sandbox:<sandbox ID>` (a sandbox access token).
    pub actor: String,
    pub method: String,
    /// The route as declared, e.g. `/v1/sandboxes/{id}/pause`.
    pub route: String,
    /// The sandbox, template, key or team acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this team's entries.
    pub team_id: Option<String>,
    /// Only entries about this sandbox, template, key or team.
    pub target: Option<String>,
    /// Only entries older than the entry with this ID (from `next_before`).
    pub before: Option<String>,
    /// At most this many entries (1–1000, default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeysQuery {
    /// Admin keys only: list another team's keys.
    pub team_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamRequest {
    /// Unique: 1–63 of `a-z 0-9 . _ -`.
    pub name: String,
    /// Admin teams' keys manage every team.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub admin: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TeamList {
    pub teams: Vec<Team>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: String,
    /// The agent's gRPC endpoint.
    pub address: String,
    /// `firecracker` or `qemu`.
    pub backend: String,
    /// What separates its guests from it: `kvm` (hardware virtualisation)
    /// or `tcg` (QEMU's software emulation: not a security boundary).
    /// Absent until the host has answered once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    pub version: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub vcpus_total: u32,
    pub memory_mib_total: u64,
    /// Reserved by this control plane's sandboxes on the host.
    pub vcpus_used: u64,
    pub memory_mib_used: u64,
    pub registered_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<String>,
    /// When an admin revoked the host's credentials (`ember host revoke`):
    /// it is no longer called and cannot register until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// One moment of a sandbox's use.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MetricSample {
    /// RFC 3339.
    pub timestamp: String,
    /// Share of one host core over the last interval (100 = one core).
    pub cpu_percent: f64,
    /// CPU time used since the VM started.
    pub cpu_seconds: f64,
    /// Memory the VM's processes hold on the host (guest RAM it touched,
    /// plus the VMM's own).
    pub memory_bytes: u64,
    /// Its cgroup's ceiling (guest memory plus VMM overhead).
    pub memory_limit_bytes: u64,
    /// Bytes its disk layer holds on the host (what it wrote).
    pub disk_bytes: u64,
    /// Bytes received and sent since it started.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Processes and threads of its VMM.
    pub pids: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxMetrics {
    /// Oldest first: every 5 seconds over the last 10 minutes, at most.
    pub samples: Vec<MetricSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<Host>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterHostRequest {
    /// Where the control plane reaches the agent's gRPC API over TLS, e.g.
    /// `https://10.0.0.2:7001` (`http://` only on loopback).
    pub address: String,
    /// The ID the agent answers `HostInfo` with.
    #[serde(default)]
    pub host_id: String,
    /// What the control plane is to present on every gRPC call to this
    /// host (the agent's own; see `ember_agent::identity`).
    #[serde(default)]
    pub control_token: String,
    /// The agent's self-signed certificate (PEM), pinned for `https://`.
    #[serde(default)]
    pub tls_cert: Option<String>,
}

/// A registered host, with the credential issued to it when this
/// registration was its first (or a retry of its first).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostRegistration {
    #[serde(flatten)]
    pub host: Host,
    /// The host's own credential: it presents this, not the join token,
    /// from now on. Only in the answer to a join with the join token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinTokenRequest {
    /// Seconds the token admits a host for (60–604800; default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<u64>,
}

/// A one-time join token (never the token itself once created).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// What `DELETE /v1/hosts/join-tokens/{id}` takes.
    pub id: String,
    /// `unused`, `used`, `expired` or `revoked`.
    pub state: String,
    pub created_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<String>,
    /// The host it admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedJoinToken {
    /// The token (`emberjoin_…`), shown only now: `ember agent
    /// --token-file` on the machine that is to join.
    pub token: String,
    #[serde(flatten)]
    pub info: JoinToken,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenList {
    /// Newest first: the usable ones and those used, expired or revoked
    /// in the last 30 days.
    pub tokens: Vec<JoinToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` when the database answers.
    pub status: String,
    pub version: String,
}
