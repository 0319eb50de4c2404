//! Container images as root filesystems: images written by the test (an OCI
//! image layout and a classic `docker save` archive, with a busybox root
//! tree), imported with the real `ember image import`, and booted by a real
//! `ember agent` in a QEMU microVM (TCG here: no security boundary; see
//! MACHINE.md).
//!
//! Needs root (the import keeps file ownership), a static ember-guest
//! (`scripts/build-guest`, found through `EMBER_STATIC_GUEST_BIN`) and, for
//! the VM test, a built guest image.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use ember_proto::host as pb;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::agent::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn static_guest() -> Option<PathBuf> {
    std::env::var_os("EMBER_STATIC_GUEST_BIN").map(PathBuf::from)
}

macro_rules! require_import {
    () => {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root to keep file ownership"
        );
        ember_testkit::require!(
            static_guest().is_some_and(|p| p.is_file()),
            "no static ember-guest: run `scripts/build-guest` and set EMBER_STATIC_GUEST_BIN"
        );
    };
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One tar layer, entry by entry, with raw names (so the test can write
/// what a hostile image would).
#[derive(Default)]
struct Layer(Option<tar::Builder<Vec<u8>>>);

impl Layer {
    fn add(
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
    fn dir(&mut self, path: &str) -> &mut Self {
        self.add(path, tar::EntryType::Directory, 0o755, "", b"")
    }
    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.add(path, tar::EntryType::Regular, mode, "", data)
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, tar::EntryType::Symlink, 0o777, target, b"")
    }
    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, tar::EntryType::Link, 0o644, target, b"")
    }
    fn bytes(&mut self) -> Vec<u8> {
        self.0.take().unwrap().into_inner().unwrap()
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A busybox root: the base layer, then one that deletes, links and adds.
fn busybox_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed by setup-host");
    let mut base = Layer::default();
    base.dir("bin/").dir("etc/").dir("opt/").dir("opt/app/");
    base.file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "cat", "stat", "ls", "test", "echo", "sleep", "sync"] {
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

fn config(arch: &str, diff_ids: &[String]) -> Vec<u8> {
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
fn write_layout(dir: &Path, layers: &[Vec<u8>], arch: &str) -> Vec<PathBuf> {
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

/// A classic `docker save` archive of `layers` at `path`, tagged busy:v1.
fn write_docker_archive(path: &Path, layers: &[Vec<u8>]) {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect();
    let config = config("amd64", &diff_ids);
    let config_name = format!("{}.json", sha(&config));
    let mut out = tar::Builder::new(Vec::new());
    let mut put = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        out.append_data(&mut h, name, data).unwrap();
    };
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    put(
        "manifest.json",
        &serde_json::to_vec(
            &json!([{"Config": config_name, "RepoTags": ["busy:v1"], "Layers": names}]),
        )
        .unwrap(),
    );
    put(&config_name, &config);
    for (name, layer) in names.iter().zip(layers) {
        put(name, layer);
    }
    std::fs::write(path, out.into_inner().unwrap()).unwrap();
}

fn ember(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .env("EMBER_DATA_DIR", data)
        .env("EMBER_GUEST_BIN", static_guest().unwrap())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ember image import` prints `imported … as image KEY`.
fn imported_key(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.split_once(" as image ").map(|(_, k)| k.trim().to_owned()))
        .unwrap_or_else(|| panic!("no key in {stdout}"))
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in `dir` (none if it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn imports_keep_the_image_and_refuse_bad_ones_root() {
    require_import!();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let layers = busybox_layers();
    let layout = work.path().join("layout");
    let blobs = write_layout(&layout, &layers, "amd64");

    let (ok, out, err) = ember(
        &data,
        &["image", "import", &format!("oci:{}:v1", layout.display())],
    );
    assert!(ok, "import failed: {err}");
    let key = imported_key(&out);
    assert!(out.contains("env      GREETING=from-image"), "{out}");
    assert!(out.contains("workdir  /opt/app"), "{out}");
    assert!(
        err.contains("apply layers"),
        "progress shown per step: {err}"
    );
    let rootfs = data.join("images/oci").join(&key).join("rootfs.ext4");
    // What the layers left, read straight from the ext4 image.
    let etc = debugfs(&rootfs, "ls /etc");
    assert!(etc.contains("hello") && etc.contains("new"), "{etc}");
    assert!(!etc.contains("old"), "the whiteout removed etc/old: {etc}");
    let app = debugfs(&rootfs, "ls /opt/app");
    assert!(
        app.contains("upper") && !app.contains("lower"),
        "opaque: {app}"
    );
    let bb2 = debugfs(&rootfs, "stat /bin/bb2");
    assert!(bb2.contains("Links: 2"), "hard link kept: {bb2}");
    let new = debugfs(&rootfs, "stat /etc/new");
    assert!(new.contains("Mode:  0600"), "mode kept: {new}");
    let init = debugfs(&rootfs, "stat /.ember/init");
    assert!(init.contains("Mode:  0755"), "guest injected: {init}");

    // Importing again reuses it; the list shows it.
    let (ok, again, err) = ember(
        &data,
        &["image", "import", &format!("oci:{}", layout.display())],
    );
    assert!(ok, "{err}");
    assert_eq!(imported_key(&again), key);
    let (_, list, _) = ember(&data, &["image", "list"]);
    assert!(list.contains(&key), "{list}");

    // The same image from a `docker save` archive.
    let archive = work.path().join("busy.tar");
    write_docker_archive(&archive, &layers);
    let (ok, out, err) = ember(
        &data,
        &[
            "image",
            "import",
            &format!("docker-archive:{}:busy:v1", archive.display()),
        ],
    );
    assert!(ok, "docker archive: {err}");
    let docker_rootfs = data
        .join("images/oci")
        .join(imported_key(&out))
        .join("rootfs.ext4");
    assert!(debugfs(&docker_rootfs, "stat /bin/bb2").contains("Links: 2"));
    let imported = names_in(&data.join("images/oci")).len();

    // Bad input: each a clear error naming the problem; nothing left behind.
    let refuse = |source: String, needle: &str| {
        let (ok, out, err) = ember(&data, &["image", "import", &source]);
        assert!(!ok, "{source} was imported: {out}");
        assert!(
            err.contains(needle),
            "{source}: wanted {needle:?} in: {err}"
        );
        assert_eq!(
            names_in(&data.join("images/oci")).len(),
            imported,
            "{source} left an import"
        );
        assert_eq!(
            names_in(&data.join("images/tmp")),
            Vec::<String>::new(),
            "{source} left staging"
        );
    };
    refuse(
        format!("oci:{}:v2", layout.display()),
        "no image is named `v2`",
    );
    refuse(format!("{}", layout.display()), "oci:DIR");
    refuse(
        format!("oci:{}", work.path().join("nowhere").display()),
        "no such directory",
    );

    // A flipped byte in a layer blob (of an image not imported yet: one
    // already imported is found by its manifest digest, its layers unread).
    let tampered = work.path().join("tampered");
    let mut other = layers.clone();
    other.push(Layer::default().file("etc/extra", 0o644, b"x").bytes());
    let paths = write_layout(&tampered, &other, "amd64");
    let mut bytes = std::fs::read(&paths[0]).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&paths[0], bytes).unwrap();
    refuse(
        format!("oci:{}", tampered.display()),
        "does not match its digest",
    );
    assert!(blobs[0].is_file());

    // An image for another architecture.
    let arm = work.path().join("arm");
    write_layout(&arm, &layers, "arm64");
    refuse(format!("oci:{}", arm.display()), "linux/arm64");

    // A layer whose entry climbs out of the root.
    let evil = work.path().join("evil");
    let mut bad = Layer::default();
    bad.file("etc/../../../tmp/ember-escaped", 0o644, b"x");
    write_layout(&evil, &[bad.bytes()], "amd64");
    refuse(
        format!("oci:{}", evil.display()),
        "climbs out of the image root",
    );
    assert!(!Path::new("/tmp/ember-escaped").exists());
}

#[test]
fn a_sandbox_boots_an_imported_image_root_vm() {
    require_vm!();
    require_import!();
    let home = AgentHome::new();
    let layout = home.dir.path().join("layout");
    write_layout(&layout, &busybox_layers(), "amd64");
    let (ok, out, err) = ember(
        &home.data(),
        &["image", "import", &format!("oci:{}", layout.display())],
    );
    assert!(ok, "import failed: {err}");
    let key = imported_key(&out);

    let mut agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;

        let missing = c
            .create_sandbox(pb::CreateSandboxRequest {
                image: "0123456789abcdef".into(),
                ..create_request(&new_id())
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
        assert!(
            missing.message().contains("ember image import"),
            "{missing:?}"
        );

        let id = new_id();
        let mut req = create_request(&id);
        req.image = key.clone();
        req.env.insert("CALLER".into(), "set".into());
        let sb = c.create_sandbox(req).await.unwrap().into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Running);

        let (out, err, code) = sh(
            &mut c,
            &id,
            "cat /etc/hello; test -e /etc/old || echo no-old",
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "hello from the image\nno-old\n");
        let (out, _, _) = sh(
            &mut c,
            &id,
            "echo $GREETING $CALLER $PATH; stat -c %h /bin/busybox; ls /opt/app",
        )
        .await;
        assert_eq!(out, "from-image set /bin\n2\nupper\n");
        // The image's binaries run directly, not only through a shell.
        let (out, _, code) = exec(&mut c, &id, "/bin/cat", &["/etc/hello"]).await;
        assert_eq!((out.as_str(), code), ("hello from the image\n", 0));

        // Pause and resume: the disk is a diff over the imported image.
        let (_, err, code) = sh(&mut c, &id, "echo kept > /etc/mine && sync").await;
        assert_eq!(code, 0, "{err}");
        let paused = c
            .pause_sandbox(pb::SandboxRef {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&paused), pb::SandboxState::Paused);
        c.resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let (out, _, _) = sh(&mut c, &id, "cat /etc/mine /etc/hello").await;
        assert_eq!(out, "kept\nhello from the image\n");

        c.destroy_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
    });
    agent.stop();
    assert_clean(&home);
}

/// A Distribution registry (Debian's `docker-registry`) on loopback, with
/// TLS and htpasswd auth, or plain HTTP and anonymous; killed on drop.
struct Registry {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
    ca: Option<PathBuf>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(auth: Option<(&str, &str)>) -> Registry {
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
    fn push(&self, layout: &Path, name: &str, creds: Option<&str>) {
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

fn import_from(
    data: &Path,
    registry: &Registry,
    name: &str,
    creds: Option<(&str, &str)>,
) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args([
        "image",
        "import",
        &format!("docker://{}/{name}", registry.address),
    ])
    .env("EMBER_DATA_DIR", data)
    .env("EMBER_GUEST_BIN", static_guest().unwrap())
    .env_remove("EMBER_REGISTRY_USERNAME")
    .env_remove("EMBER_REGISTRY_PASSWORD");
    match &registry.ca {
        Some(ca) => cmd.arg("--registry-ca").arg(ca),
        None => cmd.arg("--plain-http"),
    };
    if let Some((user, password)) = creds {
        cmd.env("EMBER_REGISTRY_USERNAME", user)
            .env("EMBER_REGISTRY_PASSWORD", password);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pulls_from_a_registry_with_and_without_auth_root() {
    require_import!();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let layout = work.path().join("layout");
    write_layout(&layout, &busybox_layers(), "amd64");
    let pulls_left = || names_in(&data.join("images/pull")).len();

    // Anonymous, plain HTTP.
    let open = Registry::start(None);
    open.push(&layout, "busy:v1", None);
    let (ok, out, err) = import_from(&data, &open, "busy:v1", None);
    assert!(ok, "anonymous pull: {err}");
    assert!(err.contains("pull from registry"), "progress: {err}");
    let key = imported_key(&out);
    let rootfs = data.join("images/oci").join(&key).join("rootfs.ext4");
    assert!(debugfs(&rootfs, "ls /etc").contains("hello"));
    let (_, list, _) = ember(&data, &["image", "list"]);
    assert!(
        list.contains(&format!("docker://{}/busy:v1", open.address)),
        "{list}"
    );
    assert_eq!(pulls_left(), 0, "the pulled layout is removed");

    let (ok, _, err) = import_from(&data, &open, "busy:nope", None);
    assert!(!ok);
    assert!(err.contains("has no busy:nope"), "{err}");

    // TLS with a private CA, and htpasswd auth.
    let locked = Registry::start(Some(("ember", "s3cret")));
    locked.push(&layout, "private/busy:v1", Some("ember:s3cret"));
    let (ok, out, err) = import_from(&data, &locked, "private/busy:v1", Some(("ember", "s3cret")));
    assert!(ok, "authenticated pull: {err}");
    // The same image: found by its digest, not imported twice.
    assert_eq!(imported_key(&out), key);
    let (ok, _, err) = import_from(&data, &locked, "private/busy:v1", Some(("ember", "wrong")));
    assert!(!ok);
    assert!(
        err.contains("EMBER_REGISTRY_PASSWORD"),
        "bad credentials: {err}"
    );
    let (ok, _, err) = import_from(&data, &locked, "private/busy:v1", None);
    assert!(!ok);
    assert!(
        err.contains("EMBER_REGISTRY_PASSWORD"),
        "no credentials: {err}"
    );
    assert_eq!(pulls_left(), 0, "failed pulls leave nothing");

    // Nothing listens.
    let gone = Registry {
        child: Command::new("true").spawn().unwrap(),
        address: format!("127.0.0.1:{}", free_port()),
        _dir: tempfile::tempdir().unwrap(),
        ca: None,
    };
    let (ok, _, err) = import_from(&data, &gone, "busy:v1", None);
    assert!(!ok);
    assert!(err.contains("cannot reach the registry"), "{err}");
}
