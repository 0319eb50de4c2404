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

use std::path::Path;
use std::process::Command;

use ember_proto::host as pb;
use serde_json::json;
use support::agent::*;
use support::images::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
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
fn a_zstd_image_imports_like_its_gzip_twin_root() {
    require_import!();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, &busybox_layers(), "amd64");
    // skopeo recompresses every layer with zstd, as newer builders emit.
    let zstd = work.path().join("zstd");
    let out = Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "zstd", "--dest-compress"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci:{}:v1", zstd.display()))
        .output()
        .expect("skopeo is installed by setup-host");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index = std::fs::read_to_string(zstd.join("index.json")).unwrap();
    let manifest_digest = index.split("sha256:").nth(1).unwrap()[..64].to_owned();
    let manifest =
        std::fs::read_to_string(zstd.join("blobs/sha256").join(&manifest_digest)).unwrap();
    assert!(manifest.contains("tar+zstd"), "{manifest}");

    let data = work.path().join("data");
    let listing = |source: &Path| {
        let (ok, out, err) = ember(
            &data,
            &["image", "import", &format!("oci:{}:v1", source.display())],
        );
        assert!(ok, "import of {}: {err}", source.display());
        let rootfs = data
            .join("images/oci")
            .join(imported_key(&out))
            .join("rootfs.ext4");
        ["ls -l /etc", "ls -l /opt/app", "stat /bin/bb2"]
            .map(|r| {
                // Inode numbers and times may differ; names, modes and
                // link counts may not.
                debugfs(&rootfs, r)
                    .lines()
                    .filter(|l| l.contains("Links:") || l.contains('('))
                    .map(|l| {
                        // `ls -l` starts with the inode number: drop it.
                        let skip = usize::from(l.contains('('));
                        l.split_whitespace()
                            .skip(skip)
                            .filter(|w| !w.contains(':') || w.starts_with("Links"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .join("\n")
    };
    let gzip_tree = listing(&layout);
    let zstd_tree = listing(&zstd);
    assert!(
        gzip_tree.contains("upper") && gzip_tree.contains("Links: 2"),
        "{gzip_tree}"
    );
    assert_eq!(zstd_tree, gzip_tree);
}

/// Import `layers` (as an OCI layout) into `home`'s data with the real
/// `ember image import`; returns the import's key.
fn import_into(home: &AgentHome, layers: &[Vec<u8>]) -> String {
    let layout = home.dir.path().join("layout");
    write_layout(&layout, layers, "amd64");
    let (ok, out, err) = ember(
        &home.data(),
        &["image", "import", &format!("oci:{}", layout.display())],
    );
    assert!(ok, "import failed: {err}");
    imported_key(&out)
}

#[test]
fn a_sandbox_boots_an_imported_image_root_vm() {
    require_vm!();
    require_import!();
    let home = AgentHome::new();
    let key = import_into(&home, &busybox_layers());

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

/// An Alpine-style image: a dynamically linked musl binary and musl's
/// loader; no glibc, no shell.
fn musl_layers(dir: &Path) -> Vec<Vec<u8>> {
    let src = dir.join("hello.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(int c, char **v) { printf(\"musl says %s\\n\", c > 1 ? v[1] : \"nothing\"); return 0; }\n",
    )
    .unwrap();
    let bin = dir.join("hello");
    let out = Command::new("musl-gcc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("musl-gcc (musl-tools) is installed by setup-host");
    assert!(
        out.status.success(),
        "musl-gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elf = std::fs::read(&bin).unwrap();
    const LOADER: &[u8] = b"/lib/ld-musl-x86_64.so.1";
    assert!(
        elf.windows(LOADER.len()).any(|w| w == LOADER),
        "a dynamic musl binary names musl's loader"
    );
    let loader = std::fs::read("/lib/ld-musl-x86_64.so.1").expect("musl's loader (musl)");
    let mut layer = Layer::default();
    layer.dir("bin/").dir("lib/").dir("etc/");
    layer
        .file("lib/ld-musl-x86_64.so.1", 0o755, &loader)
        .file("bin/hello", 0o755, &elf)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/sbin/nologin\n",
        );
    vec![layer.bytes()]
}

#[test]
fn a_musl_image_without_a_shell_runs_its_binaries_root_vm() {
    require_vm!();
    require_import!();
    let home = AgentHome::new();
    let key = import_into(&home, &musl_layers(home.dir.path()));

    let mut agent = home.start();
    runtime().block_on(async {
        let mut c = agent.client().await;
        let id = new_id();
        let mut req = create_request(&id);
        req.image = key.clone();
        let sb = c.create_sandbox(req).await.unwrap().into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Running);
        // Its WorkingDir (/opt/app), absent from its layers, is made at
        // import, as a container runtime would at start.
        let (out, err, code) = exec(&mut c, &id, "/bin/hello", &["world"]).await;
        assert_eq!((out.as_str(), code), ("musl says world\n", 0), "{err}");
        // No shell in the image: a command needing one fails, clearly.
        let missing = c
            .exec(pb::ExecRequest {
                sandbox_id: id.clone(),
                cmd: "sh".into(),
                args: vec!["-c".into(), "true".into()],
                ..Default::default()
            })
            .await;
        let text = match missing {
            Err(status) => status.message().to_owned(),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut text = String::new();
                while let Ok(Some(ev)) = stream.message().await {
                    text.push_str(&format!("{ev:?}"));
                }
                text
            }
        };
        assert!(text.contains("sh"), "{text}");
        c.destroy_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
    });
    agent.stop();
    assert_clean(&home);
}
