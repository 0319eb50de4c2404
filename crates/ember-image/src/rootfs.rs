//! The root filesystem in two stages with separate caches:
//!
//! - the *root tree*: `debootstrap` plus the configuration every guest
//!   shares (user, hostname, hosts, empty machine-id, no apt caches). Slow
//!   (a minute or more, from the network), keyed by suite and package list;
//! - the *pack*: a hard-linked copy of the tree with `ember-guest` as
//!   `/sbin/init`, written into a sparse ext4 image with `mkfs.ext4 -d`.
//!   Seconds, and no root mount needed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ember_types::guest::GUEST_HOSTNAME;

use crate::host::{self, CHROOT, CP, DEBOOTSTRAP, MKFS_EXT4};
use crate::progress::StepTimer;
use crate::{Error, Result};

/// The unprivileged account sandboxes run their commands as.
pub(crate) const GUEST_USER: &str = "user";
pub(crate) const GUEST_UID: u32 = 1000;

/// debootstrap `suite` with `packages` into `target` (which must not exist)
/// and configure it. Needs root (debootstrap chroots).
pub(crate) fn build_tree(
    target: &Path,
    suite: &str,
    mirror: &str,
    packages: &[String],
    timer: &mut StepTimer<'_>,
) -> Result<()> {
    let mut cmd = DEBOOTSTRAP.command()?;
    cmd.arg("--variant=minbase").arg("--components=main");
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(suite).arg(target).arg(mirror);
    DEBOOTSTRAP
        .stream(cmd, |line| {
            tracing::debug!(target: "ember_image::debootstrap", "{line}");
            timer.detail(line);
        })
        .map_err(|e| host::mirror_hint(e, mirror))?;
    timer.detail("configuring");
    configure(target)
}

fn configure(root: &Path) -> Result<()> {
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        // Replace rather than write through: debootstrap may have left a
        // symlink or the host's copy there.
        let _ = fs::remove_file(&path);
        fs::write(&path, text).map_err(Error::io("write", &path))
    };
    let mut cmd = CHROOT.command()?;
    cmd.arg(root).args([
        "useradd",
        "--create-home",
        "--uid",
        &GUEST_UID.to_string(),
        "--user-group",
        "--shell",
        "/bin/bash",
        GUEST_USER,
    ]);
    CHROOT.output(&mut cmd)?;
    write("etc/hostname", &format!("{GUEST_HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    // Empty, not absent: every VM from this image must not share one ID,
    // and an empty file tells systemd-style tools to treat it as unset.
    write("etc/machine-id", "")?;
    let _ = fs::remove_file(root.join("var/lib/dbus/machine-id"));
    // debootstrap copies the build host's resolver configuration in.
    write(
        "etc/resolv.conf",
        "# ember-guest configures name resolution at boot\n",
    )?;
    clean(root)?;
    slim(root)
}

/// dpkg configuration that keeps documentation and translations out of
/// packages users install later, as the build leaves them out now.
const DPKG_SLIM: &str = "\
# Ember guest images leave out documentation and translations.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
";

/// Remove documentation, manual pages and message translations (about a
/// quarter of the tree, and no `man` to read them) but keep each package's
/// copyright file.
fn slim(root: &Path) -> Result<()> {
    let config = root.join("etc/dpkg/dpkg.cfg.d/01-ember-slim");
    fs::write(&config, DPKG_SLIM).map_err(Error::io("write", &config))?;
    let remove = |path: &Path| -> Result<()> {
        let result = if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(path)
        } else {
            fs::remove_file(path)
        };
        result.map_err(Error::io("remove", path))
    };
    let entries = |dir: &Path| -> Vec<std::path::PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    for doc in entries(&root.join("usr/share/doc")) {
        if doc.is_dir() && !doc.is_symlink() {
            for file in entries(&doc).iter().filter(|f| !f.ends_with("copyright")) {
                remove(file)?;
            }
        } else {
            remove(&doc)?;
        }
    }
    for dir in ["usr/share/man", "usr/share/info"] {
        for entry in entries(&root.join(dir)) {
            remove(&entry)?;
        }
    }
    for entry in entries(&root.join("usr/share/locale"))
        .iter()
        .filter(|e| !e.ends_with("locale.alias"))
    {
        remove(entry)?;
    }
    Ok(())
}

/// Drop what only served the build: downloaded packages, apt's indexes
/// (a user runs `apt-get update` first anyway) and logs.
fn clean(root: &Path) -> Result<()> {
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log",
    ] {
        let dir = root.join(dir);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let keep = path.file_name().is_some_and(|n| n == "lock");
            if kind.is_file() && !keep {
                fs::remove_file(&path).map_err(Error::io("remove", &path))?;
            }
        }
    }
    Ok(())
}

/// Pack `tree` with `guest` as `/sbin/init` into a `size`-byte sparse ext4
/// image at `out`, staging in `work`.
pub(crate) fn pack(
    tree: &Path,
    guest: &Path,
    work: &Path,
    out: &Path,
    size: u64,
    timer: &mut StepTimer<'_>,
) -> Result<()> {
    let stage = work.join("root");
    // Hard links: the stage costs no data copy, and replacing /sbin/init
    // below unlinks rather than writes, so the cached tree is never touched.
    let mut cmd = CP.command()?;
    cmd.arg("-a").arg("-l").arg(tree).arg(&stage);
    CP.output(&mut cmd)?;
    install_init(&stage, guest)?;
    make_ext4(&stage, out, size, timer)
}

/// Write `tree` into a new `size`-byte sparse ext4 image at `out`
/// (read-only once written: overlays stack on it).
pub(crate) fn make_ext4(
    stage: &Path,
    out: &Path,
    size: u64,
    timer: &mut StepTimer<'_>,
) -> Result<()> {
    let file = fs::File::create(out).map_err(Error::io("create", out))?;
    file.set_len(size).map_err(Error::io("size", out))?;
    drop(file);
    let mut cmd = MKFS_EXT4.command()?;
    cmd.args(["-q", "-F", "-L", "ember-root", "-m", "0"])
        // The file is new and sparse, so the journal already reads as zeros;
        // writing them would allocate 64 MiB per image for nothing.
        .args(["-E", "lazy_journal_init=1", "-d"])
        .arg(stage)
        .arg(out);
    MKFS_EXT4
        .stream(cmd, |line| timer.detail(line))
        .map_err(|e| match e {
            Error::CommandFailed { ref output, .. }
                if output.contains("Could not allocate block")
                    || output.contains("No space left") =>
            {
                Error::DiskTooSmall { size }
            }
            other => other,
        })?;
    fs::File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(Error::io("sync", out))?;
    // A base image under copy-on-write overlays must never change.
    fs::set_permissions(out, fs::Permissions::from_mode(0o444)).map_err(Error::io("chmod", out))
}

fn install_init(stage: &Path, guest: &Path) -> Result<()> {
    // `sbin` is a symlink to `usr/sbin` on a merged-/usr system; the join
    // follows it inside the stage.
    let init = stage.join("sbin/init");
    match fs::remove_file(&init) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("replace", &init)(e));
        }
        _ => {}
    }
    fs::copy(guest, &init).map_err(Error::io("copy ember-guest to", &init))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(Error::io("chmod", &init))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_init_replaces_a_hard_link_without_touching_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", tree.join("sbin")).unwrap();
        fs::write(tree.join("usr/sbin/init"), b"old init").unwrap();
        let stage = dir.path().join("stage");
        let mut cmd = CP.command().unwrap();
        cmd.arg("-a").arg("-l").arg(&tree).arg(&stage);
        CP.output(&mut cmd).unwrap();
        let guest = dir.path().join("ember-guest");
        fs::write(&guest, b"#!/bin/sh\necho new\n").unwrap();

        install_init(&stage, &guest).unwrap();
        assert_eq!(
            fs::read(stage.join("usr/sbin/init")).unwrap(),
            b"#!/bin/sh\necho new\n"
        );
        assert_eq!(fs::read(tree.join("usr/sbin/init")).unwrap(), b"old init");
        let mode = fs::metadata(stage.join("sbin/init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn slim_keeps_copyright_files_and_locale_alias() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "etc/dpkg/dpkg.cfg.d",
            "usr/share/doc/bash/examples",
            "usr/share/man/man1",
            "usr/share/locale/de/LC_MESSAGES",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "usr/share/doc/bash/copyright",
            "usr/share/doc/bash/changelog.gz",
            "usr/share/doc/bash/examples/x",
            "usr/share/man/man1/bash.1.gz",
            "usr/share/locale/locale.alias",
            "usr/share/locale/de/LC_MESSAGES/bash.mo",
        ] {
            fs::write(root.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink("bash", root.join("usr/share/doc/sh")).unwrap();
        slim(root).unwrap();
        let left = |d: &str| {
            let mut names: Vec<_> = fs::read_dir(root.join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(left("usr/share/doc"), ["bash"]);
        assert_eq!(left("usr/share/doc/bash"), ["copyright"]);
        assert!(left("usr/share/man").is_empty());
        assert_eq!(left("usr/share/locale"), ["locale.alias"]);
        let config = fs::read_to_string(root.join("etc/dpkg/dpkg.cfg.d/01-ember-slim")).unwrap();
        assert!(config.contains("path-exclude=/usr/share/doc/*"));
    }

    #[test]
    fn clean_keeps_directories_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "var/cache/apt/archives/partial",
            "var/lib/apt/lists/partial",
            "var/log/apt",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "var/cache/apt/archives/a.deb",
            "var/cache/apt/pkgcache.bin",
            "var/lib/apt/lists/x_Packages",
            "var/log/dpkg.log",
        ] {
            fs::write(root.join(f), b"x").unwrap();
        }
        fs::write(root.join("var/lib/apt/lists/lock"), b"").unwrap();
        clean(root).unwrap();
        assert!(!root.join("var/cache/apt/archives/a.deb").exists());
        assert!(!root.join("var/cache/apt/pkgcache.bin").exists());
        assert!(!root.join("var/lib/apt/lists/x_Packages").exists());
        assert!(!root.join("var/log/dpkg.log").exists());
        assert!(root.join("var/lib/apt/lists/lock").exists());
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert!(root.join("var/log/apt").is_dir());
    }
}
