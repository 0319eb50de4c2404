//! The error body every non-2xx response carries, its codes, and the
//! client's error type. The table of codes and statuses is in the crate docs.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The machine-readable part of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    Conflict,
    DiskFull,
    Unavailable,
    Internal,
    /// A code this crate does not know (from a newer agent), kept verbatim.
    Other(String),
}

impl ErrorCode {
    const KNOWN: &[(ErrorCode, &'static str, u16)] = &[
        (ErrorCode::BadRequest, "bad_request", 400),
        (ErrorCode::Unauthorized, "unauthorized", 401),
        (ErrorCode::PermissionDenied, "permission_denied", 403),
        (ErrorCode::NotFound, "not_found", 404),
        (ErrorCode::AlreadyExists, "already_exists", 409),
        (ErrorCode::NotADirectory, "not_a_directory", 409),
        (ErrorCode::IsADirectory, "is_a_directory", 409),
        (ErrorCode::DirectoryNotEmpty, "directory_not_empty", 409),
        (ErrorCode::Conflict, "conflict", 409),
        (ErrorCode::DiskFull, "disk_full", 507),
        (ErrorCode::Unavailable, "unavailable", 503),
        (ErrorCode::Internal, "internal", 500),
    ];

    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            known => Self::KNOWN
                .iter()
                .find(|(c, _, _)| c == known)
                .map(|(_, s, _)| *s)
                .unwrap_or("internal"),
        }
    }

    /// The HTTP status the agent answers with for this code (500 for codes
    /// this crate does not know).
    pub fn http_status(&self) -> u16 {
        Self::KNOWN
            .iter()
            .find(|(c, _, _)| c == self)
            .map(|(_, _, s)| *s)
            .unwrap_or(500)
    }

    pub fn parse(s: &str) -> ErrorCode {
        Self::KNOWN
            .iter()
            .find(|(_, name, _)| *name == s)
            .map(|(c, _, _)| c.clone())
            .unwrap_or_else(|| ErrorCode::Other(s.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

/// `{"code": "...", "message": "..."}`, the body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// What went wrong talking to a guest agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The agent answered with an error body; kept as it sent it.
    #[error("guest agent refused {operation} ({status} {code}): {message}")]
    Api {
        operation: &'static str,
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// No TCP connection could be made (agent not up yet, VM gone, wrong address).
    #[error("cannot connect to the guest agent at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection failed after it was made (reset, closed mid-response).
    #[error("connection to the guest agent at {addr} failed during {operation}")]
    Disconnected {
        addr: SocketAddr,
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The agent did not answer in time.
    #[error("guest agent at {addr} did not answer {operation} within {after:?}")]
    Timeout {
        addr: SocketAddr,
        operation: &'static str,
        after: Duration,
    },
    /// The agent answered something that does not follow the protocol.
    #[error("malformed response from the guest agent to {operation}: {detail}")]
    Malformed {
        operation: &'static str,
        detail: String,
    },
    /// The request could not be built from what the caller gave.
    #[error("cannot send {operation}: {detail}")]
    Request {
        operation: &'static str,
        detail: String,
    },
    /// Reading the local data to upload failed.
    #[error("reading the data to send for {operation} failed")]
    Source {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl GuestError {
    /// The agent's error code, when the agent answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            GuestError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The agent could not be reached or did not answer: worth retrying
    /// while a guest boots or restores.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            GuestError::Connect { .. }
                | GuestError::Timeout { .. }
                | GuestError::Disconnected { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_kept() {
        for (code, name, status) in ErrorCode::KNOWN {
            assert_eq!(code.as_str(), *name);
            assert_eq!(ErrorCode::parse(name), *code);
            assert_eq!(code.http_status(), *status);
        }
        let body: ErrorBody =
            serde_json::from_str(r#"{"code":"quota_exceeded","message":"m"}"#).unwrap();
        assert_eq!(body.code, ErrorCode::Other("quota_exceeded".into()));
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"quota_exceeded","message":"m"}"#
        );
        assert_eq!(body.code.http_status(), 500);
    }

    #[test]
    fn required_codes_exist() {
        for name in [
            "bad_request",
            "unauthorized",
            "not_found",
            "permission_denied",
            "already_exists",
            "not_a_directory",
            "is_a_directory",
            "conflict",
            "internal",
        ] {
            assert!(
                !matches!(ErrorCode::parse(name), ErrorCode::Other(_)),
                "{name} must be a known code"
            );
        }
    }
}
