//! What a host agent proves itself with once it joins a control plane,
//! kept in `<data_dir>/identity/` (mode 0700; every file 0600):
//!
//! - `tls.key`, `tls.crt`: a self-signed certificate for the gRPC listener,
//!   named [`AGENT_TLS_NAME`]. The control plane pins it when the host
//!   registers, so it needs no CA and a certificate from any other host
//!   (or any public CA) does not pass for this one.
//! - `control.token`: the bearer token the control plane presents on every
//!   gRPC call. It is this host's alone: a stolen copy drives this host,
//!   never another, and the cluster's join token drives no host at all.
//! - `host.credential`: what the control plane issued when this host first
//!   joined. Later registrations (restarts, a new address) present it
//!   instead of the join token; `ember host revoke` makes it worthless.
//!
//! The files survive restarts: the pinned certificate, the token and the
//! credential stay valid until an operator revokes the host.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use ember_proto::AGENT_TLS_NAME;

/// Prefix of control tokens (`embercontrol_…`).
pub const CONTROL_TOKEN_PREFIX: &str = "embercontrol_";

/// Prefix of the credentials a control plane issues to hosts (`emberhost_…`).
pub const HOST_CREDENTIAL_PREFIX: &str = "emberhost_";

/// An agent's identity, loaded or made on first use.
#[derive(Clone)]
pub struct Identity {
    dir: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    pub control_token: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity in `<data_dir>/identity/`, made (certificate, key,
    /// control token) the first time.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Identity> {
        let dir = data_dir.join("identity");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let cert_path = dir.join("tls.crt");
        let key_path = dir.join("tls.key");
        if !cert_path.exists() || !key_path.exists() {
            let made = rcgen::generate_simple_self_signed(vec![AGENT_TLS_NAME.to_owned()])
                .map_err(|e| std::io::Error::other(format!("making a TLS certificate: {e}")))?;
            write_private(&key_path, made.signing_key.serialize_pem().as_bytes())?;
            write_private(&cert_path, made.cert.pem().as_bytes())?;
        }
        let token_path = dir.join("control.token");
        if !token_path.exists() {
            write_private(&token_path, new_secret(CONTROL_TOKEN_PREFIX).as_bytes())?;
        }
        Ok(Identity {
            cert_pem: std::fs::read_to_string(&cert_path)?,
            key_pem: read_private(&key_path)?,
            control_token: read_private(&token_path)?.trim().to_owned(),
            dir,
        })
    }

    /// The credential this host was issued when it joined, if it has one.
    pub fn credential(&self) -> std::io::Result<Option<String>> {
        match read_private(&self.credential_path()) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keep the credential a control plane just issued.
    pub fn store_credential(&self, credential: &str) -> std::io::Result<()> {
        write_private(&self.credential_path(), credential.as_bytes())
    }

    pub fn credential_path(&self) -> PathBuf {
        self.dir.join("host.credential")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A fresh random secret: `prefix` + 43 characters (256 bits).
pub fn new_secret(prefix: &str) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Write `bytes` to `path` as 0600, atomically (a crash leaves the old
/// file or the new one, never half of one).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Read a secret, refusing one other local users could read too.
fn read_private(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is readable by other users (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_kept_private() {
        let data = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(data.path()).unwrap();
        assert!(first.control_token.starts_with(CONTROL_TOKEN_PREFIX));
        assert!(first.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(first.key_pem.contains("PRIVATE KEY"));
        let again = Identity::load_or_create(data.path()).unwrap();
        assert_eq!(again.control_token, first.control_token);
        assert_eq!(again.cert_pem, first.cert_pem);
        for f in ["tls.key", "tls.crt", "control.token"] {
            let mode = std::fs::metadata(first.dir().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert_eq!(first.credential().unwrap(), None);
        first.store_credential("emberhost_abc").unwrap();
        assert_eq!(
            again.credential().unwrap().as_deref(),
            Some("emberhost_abc")
        );
    }

    #[test]
    fn a_secret_others_can_read_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(data.path()).unwrap();
        let token = id.dir().join("control.token");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_create(data.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
