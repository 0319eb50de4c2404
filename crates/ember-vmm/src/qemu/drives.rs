//! Where a QEMU VM sees its drives: `<run_dir>/drives/<id>`, a symlink to
//! wherever [`DriveSpec::host_path`](crate::DriveSpec) really is today.
//!
//! QEMU does not record drive paths in its migration stream (a restore's
//! command line names them again), so a symlink suffices where Firecracker
//! needs a private mount namespace. The rule is the same for both backends:
//! the VMM is only told a per-VM name derived from the drive's `id` (the same
//! `drives/<id>` entry as the Firecracker layout), so nothing about a VM,
//! its command line or its snapshot depends on where the disk lives.
//!
//! One consequence: a qcow2 overlay's *relative* backing-file name resolves
//! against the link's directory, so overlays must name their backing file by
//! absolute path.
//!
//! This module owns the links; it does not own the disks or the run
//! directory itself (the caller creates it).

use std::path::{Path, PathBuf};

use crate::{DriveSpec, Result, VmmError};

/// Directory under the run directory that holds one link per drive.
const DRIVES_DIR: &str = "drives";

/// Where a VM sees drive `id`.
pub fn drive_link(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(DRIVES_DIR).join(id)
}

/// Drive IDs become file names and VMM option values: keep them to
/// `[a-z0-9_]+` so neither needs quoting.
pub fn validate_drive_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(VmmError::Config(format!(
            "drive id {id:?} must be 1 to 32 characters of [a-z0-9_]"
        )))
    }
}

/// Point `<run_dir>/drives/<id>` at each drive's real path, replacing links
/// left by an earlier VM in the same run directory. Returns the link paths in
/// the order of `drives`.
pub fn link_drives(run_dir: &Path, drives: &[DriveSpec]) -> Result<Vec<PathBuf>> {
    let dir = run_dir.join(DRIVES_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| VmmError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    let mut links = Vec::with_capacity(drives.len());
    let mut seen = std::collections::HashSet::new();
    for drive in drives {
        validate_drive_id(&drive.id)?;
        if !seen.insert(drive.id.as_str()) {
            return Err(VmmError::Config(format!(
                "drive id {:?} is used twice",
                drive.id
            )));
        }
        let target = std::path::absolute(&drive.host_path).map_err(|source| VmmError::Io {
            context: format!("resolving drive path {}", drive.host_path.display()),
            source,
        })?;
        if !target.is_file() {
            return Err(VmmError::Config(format!(
                "drive {:?}: {} is not a file",
                drive.id,
                target.display()
            )));
        }
        let link = drive_link(run_dir, &drive.id);
        remove_if_present(&link)?;
        std::os::unix::fs::symlink(&target, &link).map_err(|source| VmmError::Io {
            context: format!("linking {} to {}", link.display(), target.display()),
            source,
        })?;
        links.push(link);
    }
    Ok(links)
}

/// Remove the drive links of a VM (its disks are untouched).
pub fn unlink_drives(run_dir: &Path) {
    let dir = run_dir.join(DRIVES_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    let _ = std::fs::remove_dir(&dir);
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::Io {
            context: format!("removing stale {}", path.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, path: &Path) -> DriveSpec {
        DriveSpec {
            id: id.into(),
            host_path: path.into(),
            read_only: false,
            root: id == "root",
            format: crate::DiskFormat::Raw,
        }
    }

    #[test]
    fn links_point_at_real_disks_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();

        let links = link_drives(&run, &[drive("root", &a)]).unwrap();
        assert_eq!(links, vec![run.join("drives/root")]);
        assert_eq!(std::fs::read(&links[0]).unwrap(), b"a");

        // A restore in the same run directory re-points the same name.
        let links = link_drives(&run, &[drive("root", &b)]).unwrap();
        assert_eq!(std::fs::read(&links[0]).unwrap(), b"b");

        unlink_drives(&run);
        assert!(!run.join("drives").exists());
        assert!(a.exists() && b.exists());
    }

    #[test]
    fn bad_ids_and_missing_disks_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, b"d").unwrap();
        for id in ["", "Root", "a/b", "../x", "a,b", &"x".repeat(33)] {
            assert!(
                matches!(validate_drive_id(id), Err(VmmError::Config(_))),
                "{id:?}"
            );
        }
        let missing = link_drives(dir.path(), &[drive("root", &dir.path().join("nope"))]);
        assert!(matches!(missing, Err(VmmError::Config(m)) if m.contains("not a file")));
        let twice = link_drives(dir.path(), &[drive("data", &disk), drive("data", &disk)]);
        assert!(matches!(twice, Err(VmmError::Config(m)) if m.contains("twice")));
    }
}
