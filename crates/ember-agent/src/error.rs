//! The host agent's errors, and how each maps to a gRPC status.

use std::path::PathBuf;

use ember_types::{BuildId, SandboxId};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("nothing listens on port {port} in sandbox {id}")]
    PortClosed { id: SandboxId, port: u16 },
    #[error("port {port} in sandbox {id} did not answer: {reason}")]
    PortUnreachable {
        id: SandboxId,
        port: u16,
        reason: String,
    },
    #[error("sandbox {0} not found on this host")]
    SandboxNotFound(SandboxId),
    #[error("sandbox {0} already exists on this host")]
    SandboxExists(SandboxId),
    #[error("cannot {operation} sandbox {id}: it is {state}")]
    IllegalTransition {
        id: SandboxId,
        operation: &'static str,
        state: String,
    },
    #[error("build {0} is not on this host")]
    BuildNotFound(BuildId),
    #[error(
        "no imported image `{0}` on this host: import it with `ember image import`, and name it by the key or digest that printed"
    )]
    ImageNotFound(String),
    /// Pulling or importing a container image failed (the message says what to change).
    #[error(transparent)]
    ImageImport(ember_image::Error),
    #[error(
        "template build {build} has {template_vcpus} vCPUs and {template_memory_mib} MiB of memory baked in; \
         omit vcpus and memory_mib or pass exactly those values (asked for {asked_vcpus} vCPUs, {asked_memory_mib} MiB)"
    )]
    TemplateShapeMismatch {
        build: BuildId,
        template_vcpus: u32,
        template_memory_mib: u32,
        asked_vcpus: u32,
        asked_memory_mib: u32,
    },
    #[error("build {build} was made by the {made_by} backend; this host runs {runs}")]
    BackendMismatch {
        build: BuildId,
        made_by: String,
        runs: String,
    },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error(
        "not enough capacity: asked for {vcpus} vCPUs and {memory_mib} MiB, {free_vcpus} vCPUs and {free_memory_mib} MiB free"
    )]
    NoCapacity {
        vcpus: u32,
        memory_mib: u32,
        free_vcpus: u32,
        free_memory_mib: u64,
    },
    #[error(
        "the host is short of memory: {available_mib} MiB of {resource} available, {reserve_mib} MiB of it kept free and about {need_mib} MiB needed for this sandbox; pause or destroy sandboxes, or start the agent with a smaller --memory-reserve-mib"
    )]
    MemoryPressure {
        resource: String,
        available_mib: u64,
        reserve_mib: u64,
        need_mib: u64,
    },
    #[error("sandbox {id}: {operation} failed")]
    Operation {
        id: SandboxId,
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("guest agent of sandbox {id}")]
    Guest {
        id: SandboxId,
        #[source]
        source: ember_guest_api::GuestError,
    },
    #[error("{0}")]
    PageServer(String),
    #[error(
        "sandbox {id}: no line holding {text:?} on the guest's serial console within {waited_ms} ms"
    )]
    SerialNotReady {
        id: SandboxId,
        text: String,
        waited_ms: u64,
    },
    #[error(
        "sandbox {0} runs a test guest without Ember's guest agent (this agent was started with \
         --guest-ready-serial): it cannot run commands or move files"
    )]
    NoGuestAgent(SandboxId),
    #[error("{source}; guest console: {console}")]
    StartFailed {
        console: String,
        #[source]
        source: Box<AgentError>,
    },
    #[error("the {backend} backend cannot be used")]
    Backend {
        backend: &'static str,
        #[source]
        source: ember_vmm::VmmError,
    },
    #[error(
        "this host lacks what Ember needs: {}; run scripts/setup-host as root to install it all",
        missing.join(", ")
    )]
    HostTools { missing: Vec<String> },
    #[error("guest image")]
    Image(#[source] ember_image::Error),
    #[error("build store")]
    Store(#[source] ember_snapshot::SnapshotError),
    #[error("network slot")]
    Net(#[source] ember_net::NetError),
    #[error("corrupt record {path}: {detail}")]
    CorruptRecord { path: PathBuf, detail: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> AgentError {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn operation(
        id: &SandboxId,
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> AgentError {
        AgentError::Operation {
            id: id.clone(),
            operation,
            source: Box::new(source),
        }
    }
}

/// The full chain of causes, one line: "pause failed: write build: No space left on device".
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// gRPC metadata key carrying a machine-readable error code next to the
/// status, so the control plane can answer with the precise REST error
/// (e.g. the guest's `not_found` for a missing file vs. an unknown sandbox).
pub const ERROR_CODE_METADATA: &str = "ember-error-code";

impl AgentError {
    /// `(gRPC code, Ember error code)` for this error.
    pub fn codes(&self) -> (tonic::Code, String) {
        use tonic::Code;
        let simple = |c: Code, s: &str| (c, s.to_owned());
        match self {
            AgentError::SandboxNotFound(_) => simple(Code::NotFound, "sandbox_not_found"),
            AgentError::BuildNotFound(_) => simple(Code::NotFound, "build_not_found"),
            AgentError::ImageNotFound(_) => simple(Code::NotFound, "image_not_found"),
            AgentError::ImageImport(_) => simple(Code::FailedPrecondition, "image_import_failed"),
            AgentError::SandboxExists(_) => simple(Code::AlreadyExists, "already_exists"),
            AgentError::IllegalTransition { .. } => simple(Code::FailedPrecondition, "conflict"),
            AgentError::NoGuestAgent(_) => simple(Code::FailedPrecondition, "no_guest_agent"),
            AgentError::PortClosed { .. } => simple(Code::FailedPrecondition, "port_closed"),
            AgentError::PortUnreachable { .. } => simple(Code::Unavailable, "port_unreachable"),
            AgentError::BackendMismatch { .. } => {
                simple(Code::FailedPrecondition, "backend_mismatch")
            }
            AgentError::TemplateShapeMismatch { .. } => {
                simple(Code::InvalidArgument, "template_shape_mismatch")
            }
            AgentError::InvalidArgument(_) => simple(Code::InvalidArgument, "bad_request"),
            AgentError::NoCapacity { .. } | AgentError::MemoryPressure { .. } => {
                simple(Code::ResourceExhausted, "no_capacity")
            }
            AgentError::Guest { source, .. } => match source {
                ember_guest_api::GuestError::Api { status, code, .. } => {
                    let grpc = match status {
                        400 => Code::InvalidArgument,
                        403 => Code::PermissionDenied,
                        404 => Code::NotFound,
                        409 => Code::FailedPrecondition,
                        503 => Code::Unavailable,
                        507 => Code::ResourceExhausted,
                        _ => Code::Internal,
                    };
                    (grpc, format!("guest_{}", code.as_str()))
                }
                e if e.is_unreachable() => simple(Code::Unavailable, "guest_unreachable"),
                _ => simple(Code::Internal, "guest_error"),
            },
            _ => simple(Code::Internal, "internal"),
        }
    }
}

impl From<AgentError> for tonic::Status {
    fn from(err: AgentError) -> tonic::Status {
        let (code, ember_code) = err.codes();
        let mut status = tonic::Status::new(code, chain(&err));
        if let Ok(v) = ember_code.parse() {
            status.metadata_mut().insert(ERROR_CODE_METADATA, v);
        }
        status
    }
}
