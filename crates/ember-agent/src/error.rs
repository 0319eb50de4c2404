//! The host agent's errors, and how each maps to a gRPC status.

use std::path::PathBuf;

use ember_types::{BuildId, SandboxId};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
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
        source: ember_guest_api::ClientError,
    },
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

impl From<AgentError> for tonic::Status {
    fn from(err: AgentError) -> tonic::Status {
        use tonic::Code;
        let code = match &err {
            AgentError::SandboxNotFound(_) | AgentError::BuildNotFound(_) => Code::NotFound,
            AgentError::SandboxExists(_) => Code::AlreadyExists,
            AgentError::IllegalTransition { .. } | AgentError::BackendMismatch { .. } => {
                Code::FailedPrecondition
            }
            AgentError::TemplateShapeMismatch { .. } | AgentError::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            AgentError::NoCapacity { .. } => Code::ResourceExhausted,
            AgentError::Guest { source, .. } => source.grpc_code(),
            AgentError::Operation { .. } | AgentError::CorruptRecord { .. } | AgentError::Io { .. } => {
                Code::Internal
            }
        };
        tonic::Status::new(code, chain(&err))
    }
}
