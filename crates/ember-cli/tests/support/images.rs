//! Container images for tests: OCI image layouts written entry by entry
//! (so a test can write what a hostile image would), a busybox root tree,
//! and a real registry (Debian's `docker-registry`) on loopback that
//! `skopeo` pushes to.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::agent::free_port;

pub fn static_guest() -> Option<PathBuf> {
    std::env::var_os("EMBER_STATIC_GUEST_BIN").map(PathBuf::from)
}

pub fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One tar layer, entry by entry, with raw names (so the test can write
/// what a hostile image would).
#[derive(Default)]
pub struct Layer(pub Option<tar::Builder<Vec<u8>>>);

impl Layer {
    pub fn add(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        link: &str,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.0
            .get_or_insert_with(|| tar::Builder::new(Vec::new()))
            .append(&h, data)
            .unwrap();
        self
    }
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.add(path, tar::EntryType::Directory, 0o755, "", b"")
    }
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.add(path, tar::EntryType::Regular, mode, "", data)
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, tar::EntryType::Symlink, 0o777, target, b"")
    }
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, tar::EntryType::Link, 0o644, target, b"")
    }
    pub fn bytes(&mut self) -> Vec<u8> {
        self.0.take().unwrap().into_inner().unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A busybox root: the base layer, then one that deletes, links and adds.
pub fn busybox_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed by setup-host");
    let mut base = Layer::default();
    base.dir("bin/").dir("etc/").dir("opt/").dir("opt/app/");
    base.file("bin/busybox", 0o755, &busybox);
    for applet in [
        "sh", "cat", "stat", "ls", "test", "echo", "sleep", "sync", "mkdir", "wget", "grep",
    ] {
        base.symlink(&format!("bin/{applet}"), "busybox");
    }
    base.file("etc/hello", 0o644, b"hello from the image\n")
        .file("etc/old", 0o644, b"deleted by the next layer\n")
        .file("opt/app/lower", 0o644, b"hidden by an opaque marker\n")
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    let mut top = Layer::default();
    top.file("etc/.wh.old", 0o644, b"")
        .hardlink("bin/bb2", "bin/busybox")
        .dir("opt/app/")
        .file("opt/app/.wh..wh..opq", 0o644, b"")
        .file("opt/app/upper", 0o644, b"from the top layer\n")
        .file("etc/new", 0o600, b"new\n");
    vec![base.bytes(), top.bytes()]
}

pub fn config(arch: &str, diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=from-image"],
            "WorkingDir": "/opt/app",
            "Cmd": ["sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// Write an OCI image layout of `layers` (the second gzipped) at `dir`,
/// named `v1`; returns the layer blobs' paths.
pub fn write_layout(dir: &Path, layers: &[Vec<u8>], arch: &str) -> Vec<PathBuf> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize, PathBuf) {
        let hex = sha(bytes);
        let path = blobs.join(&hex);
        std::fs::write(&path, bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len(), path)
    };
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect();
    let (config_digest, config_size, _) = put(&config(arch, &diff_ids));
    let mut descriptors = Vec::new();
    let mut paths = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let (stored, media) = if i == 1 {
            (gzip(layer), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (layer.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        let (digest, size, path) = put(&stored);
        descriptors.push(json!({"mediaType": media, "digest": digest, "size": size}));
        paths.push(path);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors,
    }))
    .unwrap();
    let (manifest_digest, manifest_size, _) = put(&manifest);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    paths
}

/// A Distribution registry (Debian's `docker-registry`) on loopback, with
/// TLS and htpasswd auth, or plain HTTP and anonymous; killed on drop.
pub struct Registry {
    pub child: std::process::Child,
    /// `127.0.0.1:PORT`
    pub address: String,
    pub _dir: tempfile::TempDir,
    /// The CA to trust (TLS registries only).
    pub ca: Option<PathBuf>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
            dir.path().join("store").display()
        );
        let mut ca = None;
        if let Some((user, password)) = auth {
            let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
            let cert = dir.path().join("cert.pem");
            let key = dir.path().join("key.pem");
            std::fs::write(&cert, made.cert.pem()).unwrap();
            std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
            let htpasswd = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is installed by setup-host");
            assert!(htpasswd.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, htpasswd.stdout).unwrap();
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: ember-test\n    path: {}\n",
                cert.display(),
                key.display(),
                file.display()
            );
            ca = Some(cert);
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is installed by setup-host");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Registry {
            child,
            address,
            _dir: dir,
            ca,
        }
    }

    /// Push an OCI layout's `v1` with skopeo (a real client of the registry).
    pub fn push(&self, layout: &Path, name: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{}/{name}", self.address))
            .output()
            .expect("skopeo is installed by setup-host");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
