//! The bearer token: none at cold boot, set by the first `/init`, rotated
//! by later ones. Only a SHA-256 digest is kept, and presented tokens are
//! compared by digest in constant time, so neither content nor length leaks
//! through timing.

use std::sync::RwLock;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::AgentError;

#[derive(Debug, Default)]
pub struct TokenState {
    digest: RwLock<Option<[u8; 32]>>,
}

/// The outcome of checking a request's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Accepted,
    /// No token has been set yet (before the first `/init`).
    NotInitialized,
    Rejected,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenState {
    pub fn initialized(&self) -> bool {
        self.digest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub fn check(&self, presented: Option<&str>) -> Check {
        let current = *self.digest.read().unwrap_or_else(|p| p.into_inner());
        match (current, presented) {
            (None, _) => Check::NotInitialized,
            (Some(_), None) => Check::Rejected,
            (Some(want), Some(token)) => {
                if bool::from(digest(token).ct_eq(&want)) {
                    Check::Accepted
                } else {
                    Check::Rejected
                }
            }
        }
    }

    /// Sets the token; returns whether it differs from the previous one.
    pub fn set(&self, token: &str) -> bool {
        let new = digest(token);
        let mut current = self.digest.write().unwrap_or_else(|p| p.into_inner());
        let rotated = current.is_some_and(|old| !bool::from(old.ct_eq(&new)));
        *current = Some(new);
        rotated
    }
}

/// The token of `Authorization: Bearer <token>`, if well formed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A token must be usable in a header: 1–4096 visible ASCII characters.
pub fn validate_token(token: &str) -> Result<(), AgentError> {
    if token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AgentError::InvalidRequest(
            "token must be 1 to 4096 visible ASCII characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn lifecycle() {
        let t = TokenState::default();
        assert_eq!(t.check(None), Check::NotInitialized);
        assert_eq!(t.check(Some("x")), Check::NotInitialized);
        assert!(!t.set("first"), "the first token rotates nothing");
        assert_eq!(t.check(Some("first")), Check::Accepted);
        assert_eq!(t.check(Some("firsT")), Check::Rejected);
        assert_eq!(t.check(Some("first-and-more")), Check::Rejected);
        assert_eq!(t.check(None), Check::Rejected);
        assert!(!t.set("first"));
        assert!(t.set("second"));
        assert_eq!(t.check(Some("first")), Check::Rejected);
        assert_eq!(t.check(Some("second")), Check::Accepted);
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn token_format() {
        assert!(validate_token("abc-123_XYZ").is_ok());
        assert!(validate_token("").is_err());
        assert!(validate_token("has space").is_err());
        assert!(validate_token("naïve").is_err());
        assert!(validate_token(&"a".repeat(4097)).is_err());
    }
}
