//! The crate's error type. The API turns each variant into a status and a
//! `{code, message}` body ([`crate::api`]): outcomes a caller can act on
//! (not found, state conflict, locked template, no capacity) are 4xx/503 with
//! a message saying what to change; the rest are the machine's fault (5xx).

/// What went wrong inside the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database URL {0:?} is not supported: use sqlite://PATH or postgres://USER@HOST/DB")]
    DatabaseUrl(String),
    #[error("database query failed")]
    Database(#[from] sqlx::Error),
    #[error("applying migration {version} ({name}) failed")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database has migration {0}, newer than this ember knows: upgrade ember")]
    SchemaTooNew(i64),
    #[error("stored {what} is corrupt: {detail}")]
    CorruptRow { what: &'static str, detail: String },
    #[error("host {host} is not registered")]
    UnknownHost { host: String },
    #[error("host address {address:?} is not a valid gRPC endpoint URL")]
    HostAddress {
        address: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("host {host}: {call} failed")]
    HostCall {
        host: String,
        call: &'static str,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("host {host} sent an invalid reply to {call}: {detail}")]
    HostReply {
        host: String,
        call: &'static str,
        detail: String,
    },
    #[error(
        "host ID {id} is registered at {registered}, and the agent there still answers as {id}: \
         a second agent cannot take its ID over (stop that agent, or give this one its own data directory)"
    )]
    HostIdTaken { id: String, registered: String },
    #[error("no sandbox {id}")]
    SandboxNotFound { id: String },
    #[error("sandbox {id} is {state}; it cannot {action} now")]
    StateConflict {
        id: String,
        state: crate::model::SandboxState,
        action: &'static str,
    },
    #[error("sandbox {id} is not running (it is {state})")]
    NotRunning {
        id: String,
        state: crate::model::SandboxState,
    },
    #[error("no template named {name:?}")]
    TemplateNotFound { name: String },
    #[error("a template named {name:?} already exists")]
    TemplateExists { name: String },
    #[error(
        "template {name:?} is locked to {vcpus} vCPUs and {memory_mib} MiB; omit vcpus and memory_mib or ask for those values"
    )]
    TemplateLocked {
        name: String,
        vcpus: u32,
        memory_mib: u32,
    },
    #[error("{0}")]
    NoCapacity(crate::scheduler::NoCapacity),
    #[error(
        "team quota: {what} would be {would} of at most {max}: {remedy}, or ask the operator to raise team_limits.{setting}"
    )]
    QuotaExceeded {
        what: &'static str,
        setting: &'static str,
        would: u64,
        max: u64,
        remedy: &'static str,
    },
    #[error("binding the API listener on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the API")]
    Serve(#[source] std::io::Error),
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
