//! The stable view of a VM's files that every VMM process is given.
//!
//! A snapshot records the paths its VMM had open: drive files, the vsock
//! socket, the TAP device's name. A restore must find them again, on whatever
//! host and slot it runs, wherever the sandbox's disk really is by then. So
//! every VMM process runs in a private mount namespace in which its own run
//! directory is bind-mounted at [`STABLE_DIR`], and every outside file it opens
//! (a drive, the kernel, the snapshot being restored, a page server's socket)
//! is bind-mounted onto a placeholder inside that directory. The VMM is only
//! ever told paths under [`STABLE_DIR`], so two VMs record identical paths and
//! "drive not found" on restore cannot happen as long as the caller names the
//! drive's current host path in its [`DriveSpec`](crate::DriveSpec).
//!
//! The run directory (host path on the left, what the VMM sees on the right):
//!
//! ```text
//! <run_dir>/api.sock                  /run/ember/vm/api.sock       VMM control socket
//! <run_dir>/vsock.sock                /run/ember/vm/vsock.sock     hybrid vsock (Firecracker)
//! <run_dir>/vmm.log                   /run/ember/vm/vmm.log        the VMM's own log
//! <run_dir>/serial.log                (the VMM's stdout)           guest serial console
//! <run_dir>/vmm.stderr                (the VMM's stderr)           panics, early errors
//! <run_dir>/drives/<id>               /run/ember/vm/drives/<id>    bind of DriveSpec::host_path
//! <run_dir>/boot/kernel               /run/ember/vm/boot/kernel    bind of VmConfig::kernel
//! <run_dir>/boot/initrd               /run/ember/vm/boot/initrd    bind of VmConfig::initrd
//! <run_dir>/restore/vmstate           /run/ember/vm/restore/vmstate       bind, restores only
//! <run_dir>/restore/memory            /run/ember/vm/restore/memory        bind, File backend
//! <run_dir>/restore/page-server.sock  /run/ember/vm/restore/page-server.sock  bind, Uffd backend
//! <run_dir>/snapshot/{vmstate,memory} /run/ember/vm/snapshot/...   jailed snapshots, moved out
//! ```
//!
//! Under a jailer the same tree appears at `<jail root>/run/ember/vm`, so the
//! jailed VMM sees the same paths.
//!
//! This module owns the names, the mount plan (pure data, unit-tested without
//! root) and the one small applier that runs in the forked child. It does not
//! create the run directory (the caller does) or decide what goes into a
//! snapshot.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::VmmError;

/// Where a VMM process sees its run directory.
pub const STABLE_DIR: &str = "/run/ember/vm";

/// Names of the entries in a run directory, relative to it.
pub mod entry {
    pub const API_SOCKET: &str = "api.sock";
    pub const VSOCK_SOCKET: &str = "vsock.sock";
    pub const VMM_LOG: &str = "vmm.log";
    pub const SERIAL_LOG: &str = "serial.log";
    pub const STDERR_LOG: &str = "vmm.stderr";
    pub const DRIVES_DIR: &str = "drives";
    pub const BOOT_DIR: &str = "boot";
    pub const KERNEL: &str = "boot/kernel";
    pub const INITRD: &str = "boot/initrd";
    pub const RESTORE_DIR: &str = "restore";
    pub const RESTORE_VMSTATE: &str = "restore/vmstate";
    pub const RESTORE_MEMORY: &str = "restore/memory";
    pub const PAGE_SERVER_SOCKET: &str = "restore/page-server.sock";
    /// Where a jailed VMM writes a snapshot before it is moved out of the jail.
    pub const SNAPSHOT_DIR: &str = "snapshot";
    /// QEMU: its QMP socket, its own log, and the guest RAM file.
    pub const QMP_SOCKET: &str = "qmp.sock";
    pub const QEMU_LOG: &str = "qemu.log";
    pub const MEMORY: &str = "memory";

    /// A drive's entry: `drives/<id>`.
    pub fn drive(id: &str) -> String {
        format!("{DRIVES_DIR}/{id}")
    }
}

/// One VM's run directory and the names in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    run_dir: PathBuf,
}

impl RunLayout {
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
        }
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// An entry's path on the host.
    pub fn host(&self, entry: impl AsRef<Path>) -> PathBuf {
        self.run_dir.join(entry)
    }

    /// An entry's path as the VMM sees it.
    pub fn vmm(entry: impl AsRef<Path>) -> PathBuf {
        Path::new(STABLE_DIR).join(entry)
    }

    /// Entries the VMM creates or that are bound into the run directory: what
    /// must go when the VMM is gone. Logs and the serial console stay for
    /// post-mortems; the caller removes the run directory.
    fn transient_entries() -> [&'static str; 8] {
        [
            entry::API_SOCKET,
            entry::QMP_SOCKET,
            entry::MEMORY,
            entry::VSOCK_SOCKET,
            entry::DRIVES_DIR,
            entry::BOOT_DIR,
            entry::RESTORE_DIR,
            entry::SNAPSHOT_DIR,
        ]
    }

    /// Remove the sockets and bind placeholders a dead VMM left behind.
    /// Missing entries are fine; this also reclaims what a crash left.
    pub fn remove_transient(&self) -> io::Result<()> {
        for name in Self::transient_entries() {
            let path = self.host(name);
            let result = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reclaim a run directory a crashed VMM left behind: if its control
    /// socket still answers, a live VMM owns the directory and nothing is
    /// touched; otherwise stale sockets and placeholders are removed.
    pub fn reclaim(&self) -> crate::Result<()> {
        let api = self.host(entry::API_SOCKET);
        if std::os::unix::net::UnixStream::connect(&api).is_ok() {
            return Err(VmmError::InvalidState {
                operation: "reclaiming a run directory",
                state: format!("still served by a live VMM at {}", api.display()),
            });
        }
        self.remove_transient().map_err(|source| VmmError::Io {
            context: format!("removing stale VMM files in {}", self.run_dir.display()),
            source,
        })
    }
}

/// An outside file made visible inside the run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundFile {
    /// The real file (or socket, or block device) on the host.
    pub source: PathBuf,
    /// Its entry in the run directory, e.g. `drives/root`.
    pub entry: PathBuf,
    /// Bound read-only inside a jail (kernels, backing files, snapshots).
    pub read_only: bool,
}

/// The mount namespace a VMM process gets, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewPlan {
    /// The run directory on the host.
    pub run_dir: PathBuf,
    /// Where the run directory appears in the VMM's namespace: [`STABLE_DIR`],
    /// or the same path inside a jail root.
    pub mount_point: PathBuf,
    pub files: Vec<BoundFile>,
}

/// One step of entering a [`ViewPlan`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountStep {
    /// Make every mount in the new namespace private, so nothing done here
    /// propagates back to the host's namespace.
    MakeRootPrivate,
    Bind {
        source: PathBuf,
        target: PathBuf,
    },
}

/// Something that must exist on the host before the binds can be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// A directory (and its parents) to mount onto.
    Dir(PathBuf),
    /// An empty file (and its parent directories) to mount a file onto.
    File(PathBuf),
}

impl ViewPlan {
    /// The plan for a VM run directory seen at [`STABLE_DIR`].
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            mount_point: PathBuf::from(STABLE_DIR),
            files: Vec::new(),
        }
    }

    /// See the run directory at `STABLE_DIR` inside `jail_root` instead.
    pub fn inside(mut self, jail_root: &Path) -> Self {
        self.mount_point = jail_root.join(STABLE_DIR.trim_start_matches('/'));
        self
    }

    /// Bind `source` onto `entry` of the run directory.
    pub fn bind(mut self, source: impl Into<PathBuf>, entry: impl Into<PathBuf>) -> Self {
        self.files.push(BoundFile {
            source: source.into(),
            entry: entry.into(),
            read_only: false,
        });
        self
    }

    /// [`ViewPlan::bind`], read-only for a jailed VMM.
    pub fn bind_read_only(mut self, source: impl Into<PathBuf>, entry: impl Into<PathBuf>) -> Self {
        self.files.push(BoundFile {
            source: source.into(),
            entry: entry.into(),
            read_only: true,
        });
        self
    }

    /// The same view inside a jail: the run directory at [`STABLE_DIR`] of
    /// the jail's root, and each file on its placeholder there.
    pub fn into_jail(&self, mut jail: crate::jail::JailPlan) -> crate::jail::JailPlan {
        use crate::jail::JailEntry;
        jail.push(JailEntry::Bind {
            source: self.run_dir.clone(),
            path: STABLE_DIR.into(),
            writable: true,
        });
        for f in &self.files {
            jail.push(JailEntry::Bind {
                source: f.source.clone(),
                path: Path::new(STABLE_DIR).join(&f.entry),
                writable: !f.read_only,
            });
        }
        jail
    }

    /// The mount steps, in the order the child applies them. Files are bound
    /// onto their entries below the mount point, i.e. onto the placeholders
    /// the run directory holds, after the run directory itself is in place.
    pub fn steps(&self) -> Vec<MountStep> {
        let mut steps = vec![
            MountStep::MakeRootPrivate,
            MountStep::Bind {
                source: self.run_dir.clone(),
                target: self.mount_point.clone(),
            },
        ];
        steps.extend(self.files.iter().map(|f| MountStep::Bind {
            source: f.source.clone(),
            target: self.mount_point.join(&f.entry),
        }));
        steps
    }

    /// What must exist on the host before [`ViewPlan::steps`] can run.
    pub fn placeholders(&self) -> Vec<Placeholder> {
        let mut out = vec![Placeholder::Dir(self.mount_point.clone())];
        out.extend(
            self.files
                .iter()
                .map(|f| Placeholder::File(self.run_dir.join(&f.entry))),
        );
        out
    }

    /// Check the plan before anything is created: entries stay inside the
    /// run directory, sources exist.
    pub fn validate(&self) -> Result<(), String> {
        for f in &self.files {
            let escapes = f.entry.is_absolute()
                || f.entry
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)));
            if escapes {
                return Err(format!(
                    "entry {} must be a relative path inside the run directory",
                    f.entry.display()
                ));
            }
            if std::fs::metadata(&f.source).is_err() {
                return Err(format!("{} does not exist", f.source.display()));
            }
            if std::fs::metadata(&f.source).is_ok_and(|m| m.is_dir()) {
                return Err(format!(
                    "{} is a directory; only files, sockets and devices are bound",
                    f.source.display()
                ));
            }
        }
        Ok(())
    }

    /// Create the placeholders on the host (idempotent).
    pub fn create_placeholders(&self) -> io::Result<()> {
        for p in self.placeholders() {
            match p {
                Placeholder::Dir(dir) => std::fs::create_dir_all(&dir)?,
                Placeholder::File(file) => {
                    if let Some(parent) = file.parent() {
                        // Traversable whatever the umask: a jailed VMM of
                        // another uid opens the files bound here.
                        use std::os::unix::fs::DirBuilderExt;
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o755)
                            .create(parent)?;
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
                    }
                    // A stale socket or file from a previous VMM would do as
                    // a mount point too, but start from a plain empty file.
                    match std::fs::remove_file(&file) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    std::fs::File::create(&file)?;
                }
            }
        }
        Ok(())
    }

    /// Turn the plan into what the forked child needs: no allocation happens
    /// after `fork`, so every path is converted here.
    pub fn prepare(&self) -> io::Result<PreparedView> {
        let mut binds = Vec::new();
        let mut make_private = false;
        for step in self.steps() {
            match step {
                MountStep::MakeRootPrivate => make_private = true,
                MountStep::Bind { source, target } => {
                    binds.push((c_path(&source)?, c_path(&target)?));
                }
            }
        }
        Ok(PreparedView {
            make_private,
            root: CString::new("/").expect("no NUL in \"/\""),
            binds,
        })
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {} contains a NUL byte", path.display()),
        )
    })
}

/// A [`ViewPlan`] ready to enter in a forked child.
#[derive(Debug)]
pub struct PreparedView {
    make_private: bool,
    root: CString,
    binds: Vec<(CString, CString)>,
}

impl PreparedView {
    /// Enter a new mount namespace and apply the plan.
    ///
    /// Meant for `pre_exec`: it only makes system calls and does not
    /// allocate, so it is safe between `fork` and `exec`.
    pub fn enter(&self) -> io::Result<()> {
        use nix::mount::{MsFlags, mount};
        let none: Option<&std::ffi::CStr> = None;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(errno_to_io)?;
        if self.make_private {
            mount(
                none,
                self.root.as_c_str(),
                none,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                none,
            )
            .map_err(errno_to_io)?;
        }
        for (source, target) in &self.binds {
            mount(
                Some(source.as_c_str()),
                target.as_c_str(),
                none,
                MsFlags::MS_BIND,
                none,
            )
            .map_err(errno_to_io)?;
        }
        Ok(())
    }
}

fn errno_to_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_and_sockets_have_fixed_vmm_paths() {
        assert_eq!(
            RunLayout::vmm(entry::drive("root")),
            PathBuf::from("/run/ember/vm/drives/root")
        );
        assert_eq!(
            RunLayout::vmm(entry::API_SOCKET),
            PathBuf::from("/run/ember/vm/api.sock")
        );
        let layout = RunLayout::new("/var/lib/ember/run/sb-1");
        assert_eq!(
            layout.host(entry::VSOCK_SOCKET),
            PathBuf::from("/var/lib/ember/run/sb-1/vsock.sock")
        );
    }

    #[test]
    fn plan_binds_run_dir_first_then_files_onto_placeholders() {
        let plan = ViewPlan::new("/run/x")
            .bind("/disks/a.img", "drives/root")
            .bind("/k/vmlinux", entry::KERNEL);
        assert_eq!(
            plan.steps(),
            vec![
                MountStep::MakeRootPrivate,
                MountStep::Bind {
                    source: "/run/x".into(),
                    target: "/run/ember/vm".into()
                },
                MountStep::Bind {
                    source: "/disks/a.img".into(),
                    target: "/run/ember/vm/drives/root".into()
                },
                MountStep::Bind {
                    source: "/k/vmlinux".into(),
                    target: "/run/ember/vm/boot/kernel".into()
                },
            ]
        );
        assert_eq!(
            plan.placeholders(),
            vec![
                Placeholder::Dir("/run/ember/vm".into()),
                Placeholder::File("/run/x/drives/root".into()),
                Placeholder::File("/run/x/boot/kernel".into()),
            ]
        );
    }

    #[test]
    fn jailed_plan_mounts_inside_the_jail_root() {
        let plan = ViewPlan::new("/run/x")
            .inside(Path::new("/srv/jailer/firecracker/sb-1/root"))
            .bind("/d", "drives/root");
        assert_eq!(
            plan.steps()[1],
            MountStep::Bind {
                source: "/run/x".into(),
                target: "/srv/jailer/firecracker/sb-1/root/run/ember/vm".into()
            }
        );
        assert_eq!(
            plan.steps()[2],
            MountStep::Bind {
                source: "/d".into(),
                target: "/srv/jailer/firecracker/sb-1/root/run/ember/vm/drives/root".into()
            }
        );
    }

    #[test]
    fn entries_escaping_the_run_dir_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f");
        std::fs::write(&src, b"x").unwrap();
        for bad in ["../etc/passwd", "/etc/passwd", "drives/../../x"] {
            let plan = ViewPlan::new(dir.path()).bind(&src, bad);
            assert!(plan.validate().is_err(), "{bad} accepted");
        }
        let plan = ViewPlan::new(dir.path()).bind(dir.path().join("missing"), "drives/x");
        assert!(plan.validate().unwrap_err().contains("does not exist"));
        let plan = ViewPlan::new(dir.path()).bind(&src, "drives/x");
        plan.validate().unwrap();
    }

    #[test]
    fn remove_transient_keeps_logs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path());
        let plan = ViewPlan::new(dir.path()).bind("/dev/null", entry::drive("root"));
        // Placeholders only, not the mount point (which is a host-wide path).
        for p in plan.placeholders().into_iter().skip(1) {
            let Placeholder::File(f) = p else { panic!() };
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b"").unwrap();
        }
        std::fs::write(layout.host(entry::API_SOCKET), b"").unwrap();
        std::fs::write(layout.host(entry::SERIAL_LOG), b"hello").unwrap();
        layout.remove_transient().unwrap();
        assert!(!layout.host(entry::DRIVES_DIR).exists());
        assert!(!layout.host(entry::API_SOCKET).exists());
        assert!(layout.host(entry::SERIAL_LOG).exists());
        layout.remove_transient().unwrap();
    }

    #[test]
    fn reclaim_refuses_a_live_socket_and_removes_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new(dir.path());
        let sock = layout.host(entry::API_SOCKET);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(matches!(
            layout.reclaim(),
            Err(VmmError::InvalidState { .. })
        ));
        assert!(sock.exists());
        drop(listener);
        layout.reclaim().unwrap();
        assert!(!sock.exists());
    }
}

/// Where a child process is put before `exec`: into the stable view of its
/// run directory only (unconfined: the drivers' own tests), or into a jail
/// (which holds the same view).
#[derive(Debug)]
pub enum Placement {
    View(PreparedView),
    Jail(ember_jail::PreparedJail),
}

impl Placement {
    /// Runs in the forked child: system calls only.
    pub fn enter(&self) -> io::Result<()> {
        match self {
            Placement::View(v) => v.enter(),
            Placement::Jail(j) => j.enter(),
        }
    }
}
