//! Typed identifiers. Each kind has a short prefix so an ID pasted in the wrong
//! place is caught at the boundary instead of deep inside a lookup.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{kind} ID {value:?} must start with {prefix:?}")]
    Prefix {
        kind: &'static str,
        prefix: &'static str,
        value: String,
    },
    #[error("{kind} ID {value:?} must be {prefix:?} followed by {len} lowercase letters or digits")]
    Body {
        kind: &'static str,
        prefix: &'static str,
        len: usize,
        value: String,
    },
    #[error("build ID {0:?} is not a UUID")]
    Build(String),
}

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 20;

fn random_body() -> String {
    let mut rng = rand::thread_rng();
    (0..RANDOM_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

macro_rules! prefixed_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random ID.
            pub fn new() -> Self {
                Self(format!("{}{}", $prefix, random_body()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let Some(body) = s.strip_prefix($prefix) else {
                    return Err(IdError::Prefix { kind: $kind, prefix: $prefix, value: s.to_owned() });
                };
                let ok = body.len() == RANDOM_LEN
                    && body.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                if !ok {
                    return Err(IdError::Body { kind: $kind, prefix: $prefix, len: RANDOM_LEN, value: s.to_owned() });
                }
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

prefixed_id!(
    /// A sandbox: one microVM and everything it owns, running or paused.
    SandboxId, "sandbox", "sb-"
);
prefixed_id!(
    /// A named template (snapshot) a team can spawn sandboxes from.
    TemplateId, "template", "tpl-"
);
prefixed_id!(
    /// A machine running a host agent.
    HostId, "host", "host-"
);
prefixed_id!(
    /// A tenant. Every sandbox, template and key belongs to exactly one team.
    TeamId, "team", "team-"
);

/// An immutable set of snapshot files. A UUID, because headers store it as 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BuildId(pub uuid::Uuid);

impl BuildId {
    /// The nil build: mappings that point at it read as zeros.
    pub const NIL: BuildId = BuildId(uuid::Uuid::nil());

    pub fn new() -> Self {
        BuildId(uuid::Uuid::now_v7())
    }

    pub fn is_nil(&self) -> bool {
        self.0.is_nil()
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        BuildId(uuid::Uuid::from_bytes(bytes))
    }
}

impl Default for BuildId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for BuildId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        uuid::Uuid::parse_str(s)
            .map(BuildId)
            .map_err(|_| IdError::Build(s.to_owned()))
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_hyphenated())
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_round_trip_through_their_string_form() {
        let id = SandboxId::new();
        assert!(id.as_str().starts_with("sb-"));
        assert_eq!(id.as_str().parse::<SandboxId>().unwrap(), id);
        let b = BuildId::new();
        assert_eq!(b.to_string().parse::<BuildId>().unwrap(), b);
    }

    #[test]
    fn ids_with_the_wrong_prefix_or_body_are_rejected_with_what_to_fix() {
        let err = "tpl-aaaaaaaaaaaaaaaaaaaa".parse::<SandboxId>().unwrap_err();
        assert!(err.to_string().contains("must start with \"sb-\""), "{err}");
        let err = "sb-short".parse::<SandboxId>().unwrap_err();
        assert!(err.to_string().contains("20 lowercase"), "{err}");
        let err = "sb-AAAAAAAAAAAAAAAAAAAA".parse::<SandboxId>().unwrap_err();
        assert!(matches!(err, IdError::Body { .. }));
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let ok: SandboxId = serde_json::from_str("\"sb-0123456789abcdefghij\"").unwrap();
        assert_eq!(ok.as_str(), "sb-0123456789abcdefghij");
        assert!(serde_json::from_str::<SandboxId>("\"../etc/passwd\"").is_err());
    }

    #[test]
    fn nil_build_is_all_zero_bytes() {
        assert!(BuildId::NIL.is_nil());
        assert_eq!(BuildId::NIL.as_bytes(), &[0u8; 16]);
        assert!(!BuildId::new().is_nil());
    }
}
