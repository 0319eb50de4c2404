//! A sandbox's egress policy: which destinations it may reach beyond the
//! defaults. How the policy becomes nftables rules lives in `plan`.

use serde::{Deserialize, Serialize};

use crate::cidr::Ipv4Cidr;

/// Per-sandbox egress rules on top of the default ones.
///
/// Evaluation order for every packet the guest sends:
/// 1. always refused, whatever the policy: the host's own addresses and the
///    slot pool (other sandboxes) — no policy exposes the host's services
///    or another sandbox;
/// 2. `deny_out` — refused (`["0.0.0.0/0"]` isolates fully);
/// 3. `allow_out` — accepted, before the default denies (so
///    `["10.9.0.0/16"]` opens that private range);
/// 4. default denies: private and special-purpose ranges;
/// 5. everything else is accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    #[serde(default)]
    pub allow_out: Vec<Ipv4Cidr>,
    #[serde(default)]
    pub deny_out: Vec<Ipv4Cidr>,
}

impl EgressPolicy {
    /// Nothing leaves the sandbox (host→guest connections still work).
    pub fn isolated() -> Self {
        EgressPolicy {
            allow_out: Vec::new(),
            deny_out: vec![Ipv4Cidr::new_unchecked(std::net::Ipv4Addr::UNSPECIFIED, 0)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_from_json_with_defaults_and_refuses_typos() {
        let p: EgressPolicy = serde_json::from_str(r#"{"allow_out":["10.9.0.0/16"]}"#).unwrap();
        assert_eq!(p.allow_out, vec!["10.9.0.0/16".parse().unwrap()]);
        assert!(p.deny_out.is_empty());
        assert_eq!(
            serde_json::from_str::<EgressPolicy>(r#"{"deny_out":["0.0.0.0/0"]}"#).unwrap(),
            EgressPolicy::isolated()
        );
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"allow":["10.0.0.0/8"]}"#).is_err());
        let err = serde_json::from_str::<EgressPolicy>(r#"{"deny_out":["10.0.0.1/8"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("write 10.0.0.0/8"), "{err}");
    }
}
