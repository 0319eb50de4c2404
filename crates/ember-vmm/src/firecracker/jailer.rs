//! Running Firecracker under its jailer (optional, off by default).
//!
//! The jailer chroots Firecracker into `<chroot base>/<exec name>/<vm id>/root`,
//! drops to a uid/gid, joins the network namespace and cgroups, and execs
//! Firecracker in place (no `--daemonize`, no new PID namespace: the PID we
//! start stays the Firecracker PID, and its stdout stays our serial log).
//! Inside the jail Firecracker can only open what is in the chroot, which the
//! stable layout already arranges: the run directory is bound at
//! `<jail root>/run/ember/vm`, so jailed and unjailed VMs see identical paths
//! and snapshots move freely between the two modes.
//!
//! Two things differ under the jailer: the run directory must be writable by
//! the jail's uid (the driver chowns it; drive files' ownership is the
//! caller's business), and snapshots are written inside the jail and then
//! moved to where the caller asked ([`move_file`]).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// How to run the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary (same version as Firecracker).
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Where jails are built; the jailer's default is `/srv/jailer`.
    pub chroot_base: PathBuf,
    /// `1` or `2`; `None` leaves the jailer's default (v1).
    pub cgroup_version: Option<u8>,
    /// `<file>=<value>` settings, e.g. `cpu.max=50000 100000`.
    pub cgroups: Vec<String>,
    pub parent_cgroup: Option<String>,
    /// `<resource>=<value>`, e.g. `no-file=1024`.
    pub resource_limits: Vec<String>,
}

impl JailerConfig {
    pub fn new(binary: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        Self {
            binary: binary.into(),
            uid,
            gid,
            chroot_base: PathBuf::from("/srv/jailer"),
            cgroup_version: None,
            cgroups: Vec::new(),
            parent_cgroup: None,
            resource_limits: Vec::new(),
        }
    }

    /// The jail of one VM: `<chroot base>/<exec file name>/<vm id>`. The
    /// jailer names it after the canonical Firecracker binary and canonical
    /// base directory, and so does this.
    pub fn jail(&self, firecracker: &Path, vm_id: &str) -> io::Result<Jail> {
        let exec = std::fs::canonicalize(firecracker)?;
        let name = exec.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no file name", exec.display()),
            )
        })?;
        let base = std::fs::canonicalize(&self.chroot_base)?;
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let parent = self
            .parent_cgroup
            .clone()
            .unwrap_or_else(|| name.to_string_lossy().into_owned());
        Ok(Jail {
            dir: base.join(name).join(vm_id),
            cgroups: self.cgroup_dirs(&mounts, &parent, vm_id),
        })
    }

    /// The cgroup directories the jailer creates for a VM: one per
    /// controller named in `cgroups` (v1), or one in the unified hierarchy
    /// (v2), each `<mount>/<parent>/<vm id>`. The jailer creates none when
    /// no `--cgroup` is given.
    fn cgroup_dirs(&self, proc_mounts: &str, parent: &str, vm_id: &str) -> Vec<PathBuf> {
        let version = self.cgroup_version.unwrap_or(1);
        let mut dirs = Vec::new();
        for setting in &self.cgroups {
            let controller = setting.split(['.', '=']).next().unwrap_or_default();
            let mount = proc_mounts.lines().find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (dir, fstype, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
                let matches = match version {
                    2 => *fstype == "cgroup2",
                    _ => *fstype == "cgroup" && options.split(',').any(|o| o == controller),
                };
                matches.then(|| PathBuf::from(dir))
            });
            if let Some(mount) = mount {
                let dir = mount.join(parent).join(vm_id);
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        dirs
    }

    /// The jailer's command line. `firecracker_args` follow `--`; the jailer
    /// adds `--id` itself.
    pub fn args(
        &self,
        firecracker: &Path,
        vm_id: &str,
        netns: Option<&Path>,
        firecracker_args: &[OsString],
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            vm_id.into(),
            "--exec-file".into(),
            firecracker.into(),
            "--uid".into(),
            self.uid.to_string().into(),
            "--gid".into(),
            self.gid.to_string().into(),
            "--chroot-base-dir".into(),
            self.chroot_base.clone().into(),
        ];
        if let Some(ns) = netns {
            args.extend(["--netns".into(), ns.into()]);
        }
        if let Some(v) = self.cgroup_version {
            args.extend(["--cgroup-version".into(), v.to_string().into()]);
        }
        for cg in &self.cgroups {
            args.extend(["--cgroup".into(), cg.into()]);
        }
        if let Some(parent) = &self.parent_cgroup {
            args.extend(["--parent-cgroup".into(), parent.into()]);
        }
        for limit in &self.resource_limits {
            args.extend(["--resource-limit".into(), limit.into()]);
        }
        args.push("--".into());
        args.extend(firecracker_args.iter().cloned());
        args
    }
}

/// One VM's jail: its directory and cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<chroot base>/<exec name>/<vm id>`: removed with the VM.
    pub dir: PathBuf,
    /// Cgroup directories the jailer makes for the VM: removed with it.
    pub cgroups: Vec<PathBuf>,
}

impl Jail {
    /// The directory the jailer chroots into.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Remove the jail (the jailer's copy of the binary, device nodes, mount
    /// points) and its cgroups, once the VM's process is gone. Already gone
    /// is fine.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for cgroup in &self.cgroups {
            // A cgroup is removed with rmdir (its files are not real files).
            match std::fs::remove_dir(cgroup) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Move a file, keeping holes when it must be copied across filesystems
/// (a diff snapshot's memory file is mostly holes).
pub fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() != Some(libc::EXDEV) => return Err(e),
        Err(_) => {}
    }
    copy_sparse(from, to)?;
    std::fs::remove_file(from)
}

/// Copy `from` to a new file `to`, writing only `from`'s data extents.
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    use std::fs::OpenOptions;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    let mut src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    dst.set_len(len)?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while offset < len {
        let Some(data) = seek(src.as_raw_fd(), offset, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(src.as_raw_fd(), data, libc::SEEK_HOLE)?.unwrap_or(len);
        src.seek(SeekFrom::Start(data))?;
        dst.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let chunk = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            src.read_exact(&mut buf[..chunk])?;
            dst.write_all(&buf[..chunk])?;
            left -= chunk as u64;
        }
        offset = hole;
    }
    dst.sync_all()
}

/// `lseek` with SEEK_DATA/SEEK_HOLE; `None` when there is no more data.
fn seek(fd: i32, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor we hold open; no memory is passed.
    let at = unsafe { libc::lseek(fd, offset, whence) };
    if at < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(at as u64))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn command_line_puts_firecracker_args_after_the_separator() {
        let mut cfg = JailerConfig::new("/usr/bin/jailer", 123, 100);
        cfg.cgroup_version = Some(2);
        cfg.cgroups = vec!["cpu.max=50000 100000".into()];
        cfg.resource_limits = vec!["no-file=1024".into()];
        let args = cfg.args(
            Path::new("/usr/bin/firecracker"),
            "sb-1",
            Some(Path::new("/run/netns/sb-1")),
            &["--api-sock".into(), "/run/ember/vm/api.sock".into()],
        );
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--id",
                "sb-1",
                "--exec-file",
                "/usr/bin/firecracker",
                "--uid",
                "123",
                "--gid",
                "100",
                "--chroot-base-dir",
                "/srv/jailer",
                "--netns",
                "/run/netns/sb-1",
                "--cgroup-version",
                "2",
                "--cgroup",
                "cpu.max=50000 100000",
                "--resource-limit",
                "no-file=1024",
                "--",
                "--api-sock",
                "/run/ember/vm/api.sock",
            ]
        );
    }

    #[test]
    fn jail_is_named_after_the_canonical_binary_and_base() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("firecracker-v1");
        std::fs::write(&bin, b"").unwrap();
        let link = dir.path().join("fc");
        std::os::unix::fs::symlink(&bin, &link).unwrap();
        let mut cfg = JailerConfig::new("/usr/bin/jailer", 0, 0);
        cfg.chroot_base = dir.path().join(".");
        let jail = cfg.jail(&link, "sb-1").unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(jail.dir, base.join("firecracker-v1").join("sb-1"));
        assert_eq!(jail.root(), base.join("firecracker-v1/sb-1/root"));
    }

    #[test]
    fn cgroup_dirs_follow_the_jailers_layout() {
        let mounts = "\
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
        let mut cfg = JailerConfig::new("/usr/bin/jailer", 0, 0);
        assert!(cfg.cgroup_dirs(mounts, "firecracker", "sb-1").is_empty());
        cfg.cgroups = vec![
            "cpu.shares=512".into(),
            "memory.limit_in_bytes=1".into(),
            "cpu.cfs_quota_us=1".into(),
        ];
        assert_eq!(
            cfg.cgroup_dirs(mounts, "firecracker", "sb-1"),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu/firecracker/sb-1"),
                PathBuf::from("/sys/fs/cgroup/memory/firecracker/sb-1"),
            ]
        );
        cfg.cgroup_version = Some(2);
        cfg.cgroups = vec!["cpu.max=50000 100000".into(), "memory.max=1G".into()];
        assert_eq!(
            cfg.cgroup_dirs(mounts, "ember", "sb-1"),
            vec![PathBuf::from("/sys/fs/cgroup/unified/ember/sb-1")]
        );
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 4096).unwrap();
        f.write_all_at(&[9u8; 8192], 32 << 20).unwrap();
        drop(f);
        let to = dir.path().join("to");
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&to).unwrap());
        assert!(
            blocks * 512 < 1 << 20,
            "copy is not sparse: {blocks} blocks"
        );
    }
}
