//! What a QEMU process sees of the host: its run directory at
//! [`STABLE_DIR`](crate::layout::STABLE_DIR), and in it each drive, each file
//! under a qcow2 drive, the kernel, the initrd and the RAM file, bound onto
//! placeholders (the same [`ViewPlan`] as Firecracker's). QEMU is only ever
//! told those paths, so nothing about a VM's command line depends on where
//! its files really are, and a jailed QEMU sees nothing else.
//!
//! A qcow2 drive's backing chain is bound file by file (`drives/<id>.1`,
//! `drives/<id>.2`, …) and given to QEMU explicitly, each with the format
//! the caller states: QEMU never opens a path a qcow2 header names.
//!
//! This module owns the entries and their validation; it does not own the
//! disks or the run directory (the caller creates it).

use std::path::{Path, PathBuf};

use super::cmdline::{PlannedBacking, PlannedDrive};
use crate::layout::{RunLayout, ViewPlan, entry};
use crate::{DiskFormat, DriveSpec, Result, VmConfig, VmmError};

/// The view a QEMU process gets, and what its command line names.
#[derive(Debug, Clone)]
pub struct QemuView {
    pub plan: ViewPlan,
    pub drives: Vec<PlannedDrive>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub memory: PathBuf,
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

/// The view of `config`'s files and `memory_file` from `run_dir`.
pub fn view(run_dir: &Path, config: &VmConfig, memory_file: &Path) -> Result<QemuView> {
    let mut plan = ViewPlan::new(run_dir)
        .bind_read_only(&config.kernel, entry::KERNEL)
        .bind(memory_file, entry::MEMORY);
    if let Some(initrd) = &config.initrd {
        plan = plan.bind_read_only(initrd, entry::INITRD);
    }
    let mut drives = Vec::with_capacity(config.drives.len());
    let mut seen = std::collections::HashSet::new();
    for drive in &config.drives {
        validate_drive_id(&drive.id)?;
        if !seen.insert(drive.id.as_str()) {
            return Err(VmmError::Config(format!(
                "drive id {:?} is used twice",
                drive.id
            )));
        }
        check_file(drive, &drive.host_path)?;
        let name = entry::drive(&drive.id);
        plan = if drive.read_only {
            plan.bind_read_only(&drive.host_path, &name)
        } else {
            plan.bind(&drive.host_path, &name)
        };
        let mut backing = Vec::with_capacity(drive.backing.len());
        for (i, file) in drive.backing.iter().enumerate() {
            check_file(drive, &file.path)?;
            let below = format!("{name}.{}", i + 1);
            plan = plan.bind_read_only(&file.path, &below);
            backing.push(PlannedBacking {
                path: RunLayout::vmm(&below),
                format: file.format,
            });
        }
        if drive.format == DiskFormat::Raw && !backing.is_empty() {
            return Err(VmmError::Config(format!(
                "drive {:?} is raw but names backing files",
                drive.id
            )));
        }
        drives.push(PlannedDrive {
            id: drive.id.clone(),
            path: RunLayout::vmm(&name),
            format: drive.format,
            read_only: drive.read_only,
            backing,
        });
    }
    plan.validate().map_err(VmmError::Config)?;
    Ok(QemuView {
        plan,
        drives,
        kernel: RunLayout::vmm(entry::KERNEL),
        initrd: config
            .initrd
            .as_ref()
            .map(|_| RunLayout::vmm(entry::INITRD)),
        memory: RunLayout::vmm(entry::MEMORY),
    })
}

fn check_file(drive: &DriveSpec, path: &Path) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(VmmError::Config(format!(
        "drive {:?}: {} is not a file",
        drive.id,
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackingFile, MachineSpec};

    fn config(dir: &Path) -> VmConfig {
        for f in ["k", "i", "top", "mid", "base"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        VmConfig {
            machine: MachineSpec {
                vcpus: 1,
                memory_mib: 128,
            },
            kernel: dir.join("k"),
            initrd: Some(dir.join("i")),
            kernel_args: String::new(),
            drives: vec![DriveSpec {
                id: "root".into(),
                host_path: dir.join("top"),
                read_only: false,
                root: true,
                format: DiskFormat::Qcow2,
                backing: vec![
                    BackingFile {
                        path: dir.join("mid"),
                        format: DiskFormat::Qcow2,
                    },
                    BackingFile {
                        path: dir.join("base"),
                        format: DiskFormat::Raw,
                    },
                ],
            }],
            net: None,
        }
    }

    #[test]
    fn every_file_of_a_chain_is_bound_and_named_by_its_stable_path() {
        let dir = tempfile::tempdir().unwrap();
        let v = view(dir.path(), &config(dir.path()), &dir.path().join("k")).unwrap();
        let d = &v.drives[0];
        assert_eq!(d.path, Path::new("/run/ember/vm/drives/root"));
        assert_eq!(
            d.backing,
            [
                PlannedBacking {
                    path: "/run/ember/vm/drives/root.1".into(),
                    format: DiskFormat::Qcow2
                },
                PlannedBacking {
                    path: "/run/ember/vm/drives/root.2".into(),
                    format: DiskFormat::Raw
                },
            ]
        );
        let entries: Vec<_> = v
            .plan
            .files
            .iter()
            .map(|f| (f.entry.to_string_lossy().into_owned(), f.read_only))
            .collect();
        assert!(entries.contains(&("drives/root".into(), false)));
        assert!(entries.contains(&("drives/root.2".into(), true)));
        assert!(entries.contains(&("boot/kernel".into(), true)));
        assert!(entries.contains(&("memory".into(), false)));
    }

    #[test]
    fn bad_drives_are_refused_naming_the_drive() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.drives[0].backing[1].path = dir.path().join("missing");
        let err = view(dir.path(), &c, &dir.path().join("k")).unwrap_err();
        assert!(err.to_string().contains("\"root\""), "{err}");
        let mut c = config(dir.path());
        c.drives[0].format = DiskFormat::Raw;
        let err = view(dir.path(), &c, &dir.path().join("k")).unwrap_err();
        assert!(err.to_string().contains("raw but names backing"), "{err}");
        let mut c = config(dir.path());
        c.drives.push(c.drives[0].clone());
        assert!(view(dir.path(), &c, &dir.path().join("k")).is_err());
        assert!(validate_drive_id("Root").is_err());
    }
}
