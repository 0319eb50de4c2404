//! The agent's error type, its mapping to the protocol's error codes and
//! HTTP statuses, and the errno table behind file and process errors.

use std::io;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ember_guest_api::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed; the message says what to change.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error(
        "no such endpoint: {0} (an older agent? check GET /health's protocol and capabilities)"
    )]
    NoSuchEndpoint(String),
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("unknown user {0:?}: not in the guest's /etc/passwd")]
    NoSuchUser(String),
    #[error("program {program:?} not found (searched {searched})")]
    ProgramNotFound { program: String, searched: String },
    /// The request does not fit the current state of its object.
    #[error("{0}")]
    Conflict(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// A system call failed; the code follows the errno.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::InvalidRequest(_) => ErrorCode::BadRequest,
            AgentError::Unauthorized(_) => ErrorCode::Unauthorized,
            AgentError::NoSuchProcess(_)
            | AgentError::NoSuchEndpoint(_)
            | AgentError::NoSuchUser(_)
            | AgentError::ProgramNotFound { .. } => ErrorCode::NotFound,
            AgentError::Conflict(_) => ErrorCode::Conflict,
            AgentError::ShuttingDown => ErrorCode::Unavailable,
            AgentError::Io { source, .. } => match source.raw_os_error() {
                Some(errno) => errno_code(errno),
                None if source.kind() == io::ErrorKind::NotFound => ErrorCode::NotFound,
                None => ErrorCode::Internal,
            },
            AgentError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code(),
            message: self.to_string(),
        }
    }
}

/// The protocol's code for a failed system call's errno.
pub fn errno_code(errno: i32) -> ErrorCode {
    match errno {
        libc::ENOENT | libc::ESRCH => ErrorCode::NotFound,
        libc::EACCES | libc::EPERM | libc::EROFS => ErrorCode::PermissionDenied,
        libc::EEXIST => ErrorCode::AlreadyExists,
        libc::ENOTDIR => ErrorCode::NotADirectory,
        libc::EISDIR => ErrorCode::IsADirectory,
        libc::ENOTEMPTY => ErrorCode::DirectoryNotEmpty,
        libc::ENOSPC | libc::EDQUOT => ErrorCode::DiskFull,
        libc::EXDEV | libc::EBUSY | libc::ETXTBSY | libc::EPIPE => ErrorCode::Conflict,
        libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP | libc::ENOEXEC | libc::E2BIG => {
            ErrorCode::BadRequest
        }
        _ => ErrorCode::Internal,
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let body = self.body();
        let status = StatusCode::from_u16(body.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = %body.code, message = %body.message, "request failed");
        } else {
            tracing::debug!(code = %body.code, message = %body.message, "request refused");
        }
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table() {
        let cases = [
            (libc::ENOENT, ErrorCode::NotFound, 404),
            (libc::EACCES, ErrorCode::PermissionDenied, 403),
            (libc::EPERM, ErrorCode::PermissionDenied, 403),
            (libc::EEXIST, ErrorCode::AlreadyExists, 409),
            (libc::ENOTDIR, ErrorCode::NotADirectory, 409),
            (libc::EISDIR, ErrorCode::IsADirectory, 409),
            (libc::ENOTEMPTY, ErrorCode::DirectoryNotEmpty, 409),
            (libc::ENOSPC, ErrorCode::DiskFull, 507),
            (libc::EXDEV, ErrorCode::Conflict, 409),
            (libc::ENAMETOOLONG, ErrorCode::BadRequest, 400),
            (libc::EIO, ErrorCode::Internal, 500),
        ];
        for (errno, code, status) in cases {
            assert_eq!(errno_code(errno), code, "errno {errno}");
            assert_eq!(code.http_status(), status);
        }
    }

    #[test]
    fn io_errors_keep_their_context_in_the_message() {
        let e = AgentError::io("open /x", io::Error::from_raw_os_error(libc::ENOENT));
        let body = e.body();
        assert_eq!(body.code, ErrorCode::NotFound);
        assert!(body.message.starts_with("open /x: "), "{}", body.message);
    }
}
