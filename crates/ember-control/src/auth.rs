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

/// Mint an API key in the shape E2B's SDKs expect, `e2b_<40 hex>`: the
/// first 8 hex digits are its public prefix (one namespace with Ember-shaped
/// keys' prefixes), the other 32 its secret (128 bits).
pub fn new_e2b_api_key() -> NewKey {
    const HEX: &[u8] = b"0123456789abcdef";
    let prefix = random_chars(HEX, KEY_PREFIX_LEN);
    let secret = random_chars(HEX, E2B_KEY_HEX_LEN - KEY_PREFIX_LEN);
    let key = format!("{E2B_KEY_PREFIX}{prefix}{secret}");
    NewKey {
        secret_sha256: sha256_hex(&key),
        prefix,
        key,
    }
}

/// How E2B-shaped API keys start.
pub const E2B_KEY_PREFIX: &str = "e2b_";
/// Hex digits after [`E2B_KEY_PREFIX`].
pub const E2B_KEY_HEX_LEN: usize = 40;

/// The prefix of something shaped like an API key (Ember's
/// `ember_<prefix>_<secret>` or E2B's `e2b_<40 hex>`), or `None`.
pub fn api_key_prefix(key: &str) -> Option<&str> {
    if let Some(hex) = key.strip_prefix(E2B_KEY_PREFIX) {
        let ok = hex.len() == E2B_KEY_HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        return ok.then(|| &hex[..KEY_PREFIX_LEN]);
    }
    let rest = key.strip_prefix("ember_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let prefix_ok = prefix.len() == KEY_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (prefix_ok && secret_ok).then_some(prefix)
}

/// A sandbox's access token `embersb_<sandbox id>_<secret>`, where the
/// secret is an HMAC-SHA256 of the sandbox ID under the server's token key
/// (40 base62 characters of it). It names its sandbox, so a request
/// carrying it finds the one row to check; and the server can show it again
/// to the sandbox's team (E2B's `connect` hands it out on every call)
/// without storing it.
pub fn access_token(token_key: &[u8], sandbox_id: &str) -> String {
    let secret = mac_base62(token_key, &[sandbox_id.as_bytes()], KEY_SECRET_LEN);
    format!("{ACCESS_TOKEN_PREFIX}{sandbox_id}_{secret}")
}

/// How traffic tokens start.
pub const TRAFFIC_TOKEN_PREFIX: &str = "embertraffic_";

/// A sandbox's traffic token: it grants access to the sandbox's ports
/// through the ingress proxy, nothing else. Derived like [`access_token`]
/// under a separate label, so one never reveals the other.
pub fn traffic_token(token_key: &[u8], sandbox_id: &str) -> String {
    let secret = mac_base62(
        token_key,
        &[b"traffic\0", sandbox_id.as_bytes()],
        KEY_SECRET_LEN,
    );
    format!("{TRAFFIC_TOKEN_PREFIX}{secret}")
}

/// The signature of a one-time browser link to `port` of `sandbox_id`,
/// valid until `expires_ms`, told apart from other links by `nonce`.
pub fn link_signature(
    token_key: &[u8],
    sandbox_id: &str,
    port: u16,
    expires_ms: i64,
    nonce: &str,
) -> String {
    let port = port.to_string();
    let expires = expires_ms.to_string();
    mac_base62(
        token_key,
        &[
            b"link\0",
            sandbox_id.as_bytes(),
            b"\0",
            port.as_bytes(),
            b"\0",
            expires.as_bytes(),
            b"\0",
            nonce.as_bytes(),
        ],
        KEY_SECRET_LEN,
    )
}

/// A random nonce for a one-time link.
pub fn new_nonce() -> String {
    random_chars(BASE62, 16)
}

/// `len` base62 digits of HMAC-SHA256(key, parts…) (~238 bits at 40).
fn mac_base62(token_key: &[u8], parts: &[&[u8]], len: usize) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(token_key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    let mut n: Vec<u8> = mac.finalize().into_bytes().to_vec();
    let mut out = String::with_capacity(len);
    for _ in 0..len {
        let mut rem = 0u32;
        for b in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / 62) as u8;
            rem = acc % 62;
        }
        out.push(BASE62[rem as usize] as char);
    }
    out
}

/// Constant-time equality of two secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A fresh random token key for [`access_token`] (hex, 256 bits).
pub fn new_token_key() -> String {
    let mut rng = rand::rngs::OsRng;
    (0..32)
        .map(|_| format!("{:02x}", rng.r#gen::<u8>()))
        .collect()
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

/// Mint a cluster join token: a host agent presents it once, at its first
/// registration, and is issued a credential of its own
/// ([`new_host_credential`]). It drives no host.
pub fn new_join_token() -> String {
    format!("emberjoin_{}", random_chars(BASE62, KEY_SECRET_LEN))
}

/// Mint a one-time join token (`ember host join-token create`): its ID
/// (what lists and revocation name) and the token (shown once, kept as
/// its SHA-256). It admits one host.
pub fn new_one_time_join_token() -> (String, String) {
    (
        format!("jt_{}", random_chars(BASE62, 12)),
        format!("emberjoin_{}", random_chars(BASE62, KEY_SECRET_LEN)),
    )
}

/// How host credentials start.
pub const HOST_CREDENTIAL_PREFIX: &str = "emberhost_";

/// Mint one host's credential (stored only as its SHA-256).
pub fn new_host_credential() -> String {
    format!(
        "{HOST_CREDENTIAL_PREFIX}{}",
        random_chars(BASE62, KEY_SECRET_LEN)
    )
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// What an API key may do within its team.
///
/// - `admin`: everything, for every team (only keys of an admin team can
///   hold it, and only admin keys mint admin keys);
/// - `member`: everything for its own team: sandboxes, exec and files,
///   templates, the team's keys;
/// - `read_only`: list and read the team's sandboxes, templates and keys;
///   nothing that changes state and nothing that reaches into a guest
///   (exec, files, ports), since a guest's contents are the tenant's data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Member,
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::ReadOnly => "read_only",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            "read_only" | "read-only" => Ok(Role::ReadOnly),
            other => Err(format!(
                "unknown role {other:?}: use admin, member or read_only"
            )),
        }
    }
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An API key of a team.
    Team {
        team_id: String,
        /// An admin key of an admin team: may act on every team.
        is_admin: bool,
        role: Role,
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
    fn roles_parse_from_their_names_and_nothing_else() {
        for r in [Role::Admin, Role::Member, Role::ReadOnly] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert_eq!("read-only".parse::<Role>(), Ok(Role::ReadOnly));
        let err = "owner".parse::<Role>().unwrap_err();
        assert!(err.contains("admin, member or read_only"), "{err}");
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
    fn e2b_shaped_keys_parse_to_their_prefix() {
        let k = new_e2b_api_key();
        assert!(k.key.starts_with("e2b_") && k.key.len() == 44, "{}", k.key);
        assert_eq!(api_key_prefix(&k.key), Some(k.prefix.as_str()));
        assert!(digest_matches(&k.key, &k.secret_sha256));
        assert_eq!(api_key_prefix("e2b_0123"), None);
        assert_eq!(api_key_prefix(&format!("e2b_{}", "G".repeat(40))), None);
        assert_eq!(api_key_prefix(&format!("e2b_{}", "A".repeat(40))), None);
    }

    #[test]
    fn access_tokens_are_derived_from_the_key_and_the_sandbox() {
        let id = ember_types::SandboxId::new().to_string();
        let other = ember_types::SandboxId::new().to_string();
        let t = access_token(b"key one", &id);
        assert_eq!(t, access_token(b"key one", &id), "the same token again");
        assert_ne!(t, access_token(b"key two", &id));
        assert_ne!(
            t.rsplit_once('_').unwrap().1,
            access_token(b"key one", &other).rsplit_once('_').unwrap().1
        );
        assert_eq!(t.rsplit_once('_').unwrap().1.len(), KEY_SECRET_LEN);
        assert!(new_token_key().len() == 64 && new_token_key() != new_token_key());
    }

    #[test]
    fn access_and_join_tokens_are_distinct_kinds() {
        let id = ember_types::SandboxId::new().to_string();
        let t = access_token(b"test key", &id);
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
