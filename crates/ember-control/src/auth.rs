//! Credentials: API keys (team-scoped), per-sandbox access tokens, the
//! cluster join token, and guest tokens; how they are made, stored and checked.
//!
//! Keys are stored as the SHA-256 of the whole key. A slow password hash
//! (argon2) protects low-entropy secrets chosen by people against offline
//! guessing; these keys carry ~238 random bits, so guessing is hopeless
//! whatever the hash and a fast hash costs nothing per request. The public
//! prefix finds the row; the digest is compared in constant time.
//!
//! Not here: deciding what a caller may do (the API's handlers do, with the
//! [`Caller`] this module resolves).

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PREFIX_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// Characters in a key's public prefix.
pub const KEY_PREFIX_LEN: usize = 8;
/// Random characters in a key's secret part (40 × log2(62) ≈ 238 bits).
pub const KEY_SECRET_LEN: usize = 40;
/// How access tokens start, so they are told apart from API keys at a glance.
pub const ACCESS_TOKEN_PREFIX: &str = "embersb_";

fn random_chars(alphabet: &[u8], n: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..n)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

/// Hex SHA-256 of a secret, as stored.
pub fn sha256_hex(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compare a presented secret against a stored digest in constant time.
pub fn digest_matches(secret: &str, stored_hex: &str) -> bool {
    let presented = sha256_hex(secret);
    presented.as_bytes().ct_eq(stored_hex.as_bytes()).into()
}

/// A freshly minted API key: the full key (shown once) and what is stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key: String,
    pub prefix: String,
    pub secret_sha256: String,
}

/// Mint an API key `ember_<prefix>_<secret>`.
pub fn new_api_key() -> NewKey {
    let prefix = random_chars(PREFIX_ALPHABET, KEY_PREFIX_LEN);
    let secret = random_chars(BASE62, KEY_SECRET_LEN);
    let key = format!("ember_{prefix}_{secret}");
    NewKey {
        secret_sha256: sha256_hex(&key),
        prefix,
        key,
    }
}

/// The prefix of something shaped like an API key, or `None`.
pub fn api_key_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("ember_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let prefix_ok = prefix.len() == KEY_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (prefix_ok && secret_ok).then_some(prefix)
}

/// Mint a per-sandbox access token `embersb_<sandbox id>_<secret>`. It names
/// its sandbox, so a request carrying it finds the one row to check.
pub fn new_access_token(sandbox_id: &str) -> String {
    format!(
        "{ACCESS_TOKEN_PREFIX}{sandbox_id}_{}",
        random_chars(BASE62, KEY_SECRET_LEN)
    )
}

/// The sandbox ID inside something shaped like an access token, or `None`.
pub fn access_token_sandbox(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(ACCESS_TOKEN_PREFIX)?;
    let (id, secret) = rest.rsplit_once('_')?;
    let ok = id.parse::<ember_types::SandboxId>().is_ok()
        && secret.len() >= 32
        && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then_some(id)
}

/// Mint a token for the host agent to present to a sandbox's guest agent.
/// It goes to the host and is never stored or returned by the control plane.
pub fn new_guest_token() -> String {
    random_chars(BASE62, KEY_SECRET_LEN)
}

/// Mint a cluster join token (host agents present it to register; the
/// control plane presents it when it calls them).
pub fn new_join_token() -> String {
    format!("emberjoin_{}", random_chars(BASE62, KEY_SECRET_LEN))
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An API key of a team.
    Team {
        team_id: String,
        is_admin: bool,
        key_prefix: String,
    },
    /// A sandbox's access token: exec and files of that sandbox only.
    Sandbox { sandbox_id: String, team_id: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape_and_parse_back() {
        let k = new_api_key();
        assert!(k.key.starts_with("ember_"));
        assert_eq!(api_key_prefix(&k.key), Some(k.prefix.as_str()));
        assert_eq!(
            k.key.len(),
            "ember_".len() + KEY_PREFIX_LEN + 1 + KEY_SECRET_LEN
        );
        assert_eq!(k.secret_sha256, sha256_hex(&k.key));
        assert!(!k.secret_sha256.contains(&k.key[15..]));
    }

    #[test]
    fn two_keys_differ() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_ne!(a.key, b.key);
        assert_ne!(a.prefix, b.prefix);
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        for bad in [
            "",
            "ember_",
            "ember_abc_0123456789012345678901234567890123",
            "ember_ABCDEFGH_0123456789012345678901234567890123",
            "ember_abcdefgh_short",
            "ember_abcdefgh_0123456789012345678901234567890!23",
            "xember_abcdefgh_0123456789012345678901234567890123",
            "embersb_0123456789012345678901234567890123",
        ] {
            assert_eq!(api_key_prefix(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn digests_match_only_the_same_secret() {
        let k = new_api_key();
        assert!(digest_matches(&k.key, &k.secret_sha256));
        let mut other = k.key.clone();
        other.pop();
        other.push('!');
        assert!(!digest_matches(&other, &k.secret_sha256));
        assert!(!digest_matches(&k.key, ""));
    }

    #[test]
    fn bearer_extracts_the_token_case_insensitively() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn access_and_join_tokens_are_distinct_kinds() {
        let id = ember_types::SandboxId::new().to_string();
        let t = new_access_token(&id);
        assert!(t.starts_with(ACCESS_TOKEN_PREFIX));
        assert_eq!(access_token_sandbox(&t), Some(id.as_str()));
        assert_eq!(api_key_prefix(&t), None);
        assert_eq!(
            access_token_sandbox("embersb_sb-bad_0123456789012345678901234567890123"),
            None
        );
        assert_eq!(access_token_sandbox(&new_api_key().key), None);
        assert!(new_join_token().starts_with("emberjoin_"));
        assert_ne!(new_guest_token(), new_guest_token());
    }
}
