//! Pulling an image from a registry (the OCI distribution API, through the
//! `oci-client` crate) into a local OCI image layout, which
//! [`crate::oci::import`] then verifies and unpacks like any other layout.
//! Nothing pulled is trusted before that check: the layout holds each blob
//! under the digest the manifest names, and the import hashes every byte.

use std::path::{Path, PathBuf};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::oci::{ImportedImage, Source, host_architecture, import_labelled};
use crate::progress::{Progress, Step};
use crate::{Error, Result};

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Basic credentials (exchanged for a token where the registry asks).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Speak plain HTTP (a registry on loopback or a trusted network).
    pub plain_http: bool,
    /// PEM certificates to trust besides the system's (a private CA).
    pub ca_certificates: Vec<PathBuf>,
}

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn pull_error(reference: &str, reason: impl Into<String>) -> Error {
    Error::ImageImport {
        image: format!("docker://{reference}"),
        reason: reason.into(),
    }
}

/// Say what went wrong in the user's terms: which of reach, credentials,
/// name or tag to change.
fn explain(reference: &Reference, e: OciDistributionError) -> String {
    let registry = reference.registry();
    match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => format!(
            "the registry {registry} refused the credentials ({e}): set EMBER_REGISTRY_USERNAME and EMBER_REGISTRY_PASSWORD"
        ),
        OciDistributionError::ImageManifestNotFoundError(_) => format!(
            "the registry {registry} has no {}:{} ({e}): check the repository and tag",
            reference.repository(),
            reference.tag().unwrap_or("latest")
        ),
        OciDistributionError::RequestError(inner) if inner.is_connect() || inner.is_timeout() => {
            format!(
                "cannot reach the registry {registry} ({e}): check the address, or --plain-http for a registry without TLS"
            )
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                )
            }) =>
        {
            format!(
                "the registry {registry} has no {}:{}: check the repository and tag",
                reference.repository(),
                reference.tag().unwrap_or("latest")
            )
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            format!(
                "the registry {registry} refused access ({e}): set EMBER_REGISTRY_USERNAME and EMBER_REGISTRY_PASSWORD"
            )
        }
        _ => format!("the registry {registry} answered: {e}"),
    }
}

/// Pull `reference` (`host[:port]/repository[:tag|@digest]`) into a new OCI
/// image layout at `dir`: its manifest (and the index above it, if any),
/// config and layers. Returns the number of bytes fetched.
pub async fn pull(
    reference: &str,
    options: &RegistryOptions,
    dir: &Path,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<u64> {
    let parsed: Reference = reference.parse().map_err(|e| {
        pull_error(
            reference,
            format!("not an image reference ({e}): write HOST[:PORT]/REPOSITORY[:TAG]"),
        )
    })?;
    let mut certificates = Vec::new();
    for path in &options.ca_certificates {
        let data = std::fs::read(path).map_err(Error::io("read", path))?;
        certificates.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        });
    }
    let client = Client::new(ClientConfig {
        protocol: if options.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        extra_root_certificates: certificates,
        ..ClientConfig::default()
    });
    let auth = match (&options.username, &options.password) {
        (Some(user), Some(password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        (Some(_), None) | (None, Some(_)) => {
            return Err(pull_error(
                reference,
                "give both a registry username and a password, or neither",
            ));
        }
        (None, None) => RegistryAuth::Anonymous,
    };
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(Error::io("create", &blobs))?;
    let put = |digest: &str, bytes: &[u8]| -> Result<()> {
        let hex = blob_hex(reference, digest)?;
        let path = blobs.join(hex);
        std::fs::write(&path, bytes).map_err(Error::io("write", &path))
    };

    let (top, top_digest) = client
        .pull_manifest_raw(&parsed, &auth, MANIFEST_TYPES)
        .await
        .map_err(|e| pull_error(reference, explain(&parsed, e)))?;
    put(&top_digest, &top)?;
    let mut fetched = top.len() as u64;
    let top_json: serde_json::Value = serde_json::from_slice(&top)
        .map_err(|e| pull_error(reference, format!("the manifest is not JSON: {e}")))?;
    let manifest = if top_json.get("manifests").is_some() {
        let arch = host_architecture();
        let pick = top_json["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| pull_error(reference, format!("the image has no linux/{arch} variant")))?
            .to_owned();
        let (bytes, digest) = client
            .pull_manifest_raw(&parsed.clone_with_digest(pick), &auth, MANIFEST_TYPES)
            .await
            .map_err(|e| pull_error(reference, explain(&parsed, e)))?;
        put(&digest, &bytes)?;
        fetched += bytes.len() as u64;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| pull_error(reference, format!("the manifest is not JSON: {e}")))?
    } else {
        top_json.clone()
    };
    let mut wanted: Vec<(String, u64)> = Vec::new();
    for d in std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten())
    {
        let digest = d["digest"]
            .as_str()
            .ok_or_else(|| pull_error(reference, "a manifest descriptor has no digest"))?;
        wanted.push((digest.to_owned(), d["size"].as_u64().unwrap_or(0)));
    }
    let total: u64 = wanted.iter().map(|(_, s)| s).sum();
    for (i, (digest, size)) in wanted.iter().enumerate() {
        let path = blobs.join(blob_hex(reference, digest)?);
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(Error::io("create", &path))?;
        let mut out = tokio::io::BufWriter::new(file);
        client
            .pull_blob(&parsed, digest.as_str(), &mut out)
            .await
            .map_err(|e| pull_error(reference, explain(&parsed, e)))?;
        out.flush().await.map_err(Error::io("write", &path))?;
        fetched += size;
        progress(format!(
            "blob {}/{}: {} ({} of {} MiB)",
            i + 1,
            wanted.len(),
            &digest[..digest.len().min(19)],
            fetched >> 20,
            total >> 20
        ));
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(Error::io("write", dir.join("oci-layout")))?;
    let media_type = top_json["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": top_digest,
            "size": top.len(),
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }],
    });
    let path = dir.join("index.json");
    std::fs::write(&path, serde_json::to_vec(&index).expect("index serialises"))
        .map_err(Error::io("write", &path))?;
    Ok(fetched)
}

/// A registry-given digest's hex, checked (it becomes a file name).
fn blob_hex<'a>(reference: &str, digest: &'a str) -> Result<&'a str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| pull_error(reference, format!("`{digest}` is not a sha256 digest")))
}

/// A pull's scratch layout, removed however the import ends.
struct PullDir(PathBuf);

impl Drop for PullDir {
    fn drop(&mut self) {
        if let Err(e) = crate::store::remove_tree(&self.0) {
            tracing::warn!(path = %self.0.display(), %e, "could not remove a pulled layout");
        }
    }
}

/// The registry (`HOST[:PORT]`) a reference pulls from, as the pull will
/// resolve it (a name without one is Docker Hub's).
pub fn registry_of(reference: &str) -> Result<String> {
    let parsed: Reference = reference.parse().map_err(|e| {
        pull_error(
            reference,
            format!("not an image reference ({e}): write HOST[:PORT]/REPOSITORY[:TAG]"),
        )
    })?;
    Ok(parsed.resolve_registry().to_owned())
}

/// Why `ip` is not a public address, if it is not: a registry there is
/// inside the host's network, which the API must not lend to callers.
pub fn private_kind(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => {
                let seg = v6.segments()[0];
                return if v6.is_loopback() {
                    Some("loopback")
                } else if v6.is_unspecified() {
                    Some("unspecified")
                } else if v6.is_multicast() {
                    Some("multicast")
                } else if seg & 0xfe00 == 0xfc00 {
                    Some("unique local (private)")
                } else if seg & 0xffc0 == 0xfe80 {
                    Some("link-local")
                } else {
                    None
                };
            }
        },
    };
    let [a, b, ..] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local (cloud metadata lives here)")
    } else if v4.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// Refuse a registry whose name resolves to a non-public address. Checked
/// before the pull connects; a name whose answers change between the
/// check and the pull (DNS rebinding) is not caught here.
pub async fn check_public(registry: &str) -> Result<()> {
    let with_port = if registry.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit())
    }) {
        registry.to_owned()
    } else {
        format!("{registry}:443")
    };
    let addrs = tokio::net::lookup_host(&with_port).await.map_err(|e| {
        pull_error(
            registry,
            format!("cannot resolve the registry {registry}: {e}"),
        )
    })?;
    for addr in addrs {
        if let Some(kind) = private_kind(addr.ip()) {
            return Err(pull_error(
                registry,
                format!(
                    "the registry {registry} resolves to {}, a {kind} address: this host pulls from \
                     public registries only, unless its operator lists the registry with \
                     --insecure-registry or --private-registry",
                    addr.ip()
                ),
            ));
        }
    }
    Ok(())
}

/// Remove the scratch layouts of pulls whose process is gone (killed
/// mid-pull: its `Drop` never ran). Names are `<pid>.<nanos>`.
fn sweep_abandoned(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.split_once('.'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new("/proc").join(p.to_string()).exists());
        if !alive {
            let path = entry.path();
            match crate::store::remove_tree(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed an abandoned pull"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), %e, "could not remove an abandoned pull")
                }
            }
        }
    }
}

/// Pull `reference` and import it (see [`crate::oci::import`]); the
/// import is recorded as coming from `docker://reference`. Call on a
/// multi-threaded runtime: the unpacking blocks its thread.
pub async fn import(
    data_dir: &Path,
    reference: &str,
    options: &RegistryOptions,
    guest: &Path,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<ImportedImage> {
    let parent = data_dir.join("images").join("pull");
    std::fs::create_dir_all(&parent).map_err(Error::io("create", &parent))?;
    sweep_abandoned(&parent);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let dir = PullDir(parent.join(format!("{}.{nanos}", std::process::id())));
    std::fs::create_dir(&dir.0).map_err(Error::io("create", &dir.0))?;
    progress(Progress::Started(Step::Pull));
    let started = std::time::Instant::now();
    let fetched = pull(reference, options, &dir.0, &mut |line| {
        progress(Progress::Detail {
            step: Step::Pull,
            line,
        })
    })
    .await?;
    progress(Progress::Detail {
        step: Step::Pull,
        line: format!("{} MiB fetched", fetched >> 20),
    });
    progress(Progress::Finished {
        step: Step::Pull,
        elapsed: started.elapsed(),
        cached: false,
    });
    let source = Source::Layout {
        dir: dir.0.clone(),
        reference: None,
    };
    let label = format!("docker://{reference}");
    tokio::task::block_in_place(|| import_labelled(data_dir, &source, &label, guest, progress))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_inside_a_network_are_told_apart_from_public_ones() {
        for (ip, kind) in [
            ("127.0.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("192.168.1.1", Some("private")),
            (
                "169.254.169.254",
                Some("link-local (cloud metadata lives here)"),
            ),
            ("100.64.0.1", Some("shared (carrier-grade NAT)")),
            ("0.0.0.0", Some("unspecified")),
            ("::1", Some("loopback")),
            ("fd00::1", Some("unique local (private)")),
            ("fe80::1", Some("link-local")),
            ("::ffff:10.0.0.1", Some("private")),
            ("93.184.216.34", None),
            ("2606:4700::1111", None),
        ] {
            assert_eq!(private_kind(ip.parse().unwrap()), kind, "{ip}");
        }
    }

    #[test]
    fn the_registry_of_a_reference_is_where_the_pull_goes() {
        assert_eq!(
            registry_of("127.0.0.1:5000/busy:v1").unwrap(),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_of("localhost/x").unwrap(), "localhost");
        assert_eq!(registry_of("python:3.12").unwrap(), "index.docker.io");
        assert!(registry_of("UPPER/Case").is_err());
    }

    #[tokio::test]
    async fn a_registry_on_loopback_is_refused_naming_the_flag() {
        let e = check_public("localhost:5000")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loopback") && e.contains("--private-registry"),
            "{e}"
        );
        let e = check_public("127.0.0.1").await.unwrap_err().to_string();
        assert!(e.contains("127.0.0.1, a loopback address"), "{e}");
    }

    #[test]
    fn abandoned_pulls_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("4000000000.1");
        let live = dir.path().join(format!("{}.2", std::process::id()));
        let junk = dir.path().join("not-a-pull");
        for d in [&dead, &live, &junk] {
            std::fs::create_dir_all(d.join("blobs")).unwrap();
        }
        sweep_abandoned(dir.path());
        assert!(!dead.exists() && !junk.exists());
        assert!(live.join("blobs").exists());
    }
}
