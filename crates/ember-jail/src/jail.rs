//! Confinement of every process Ember starts on a guest's behalf — a VMM, a
//! page server, `qemu-img` — so that a guest that takes over its VMM holds
//! an unprivileged process that sees nothing but its own VM's files.
//!
//! A [`JailPlan`] says, as data, who the process runs as and what it sees;
//! it is unit-tested without root. [`JailPlan::prepare`] turns it into C
//! strings and open descriptors in the parent, and [`PreparedJail::enter`]
//! runs in the forked child just before `exec`, making system calls only
//! (no allocation, no locks), in this order:
//!
//! 1. join the process's cgroups (descriptors opened by the parent) and set
//!    its OOM score; make its TAP device its own (owner and group), so it
//!    can attach without `CAP_NET_ADMIN`; no core dumps (they would hold
//!    guest memory);
//! 2. enter a private mount namespace and mount a fresh tmpfs on
//!    [`JailPlan::mountpoint`], an empty host directory: the jail's root,
//!    which the host never sees;
//! 3. build the root from the plan's entries: directories, symlinks, bind
//!    mounts (the system's `/usr` read-only for dynamically linked programs,
//!    the VM's own files) and device nodes made for this process only;
//!    then remount the root read-only and `chroot` into it;
//! 4. drop to the plan's uid and gid with no supplementary groups, which
//!    clears every capability, and set `no_new_privs`.
//!
//! Not here: choosing uids and cgroup limits (the host agent), creating the
//! cgroups ([`crate::cgroup`]), seccomp (QEMU's `-sandbox`, Firecracker's
//! own filters, the page server's in-process filter).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a process Ember starts for a guest is confined: the settings a VMM
/// launch, a page server or a helper carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// The sandbox's own unprivileged uid and gid.
    pub identity: Identity,
    /// An empty host directory the jail's root is mounted on.
    pub jail_mountpoint: PathBuf,
    /// `cgroup.procs` files of the sandbox's cgroup (see [`crate::cgroup`]).
    pub cgroup_procs: Vec<PathBuf>,
}

impl Confinement {
    /// A jail plan for this confinement, with the system's programs.
    pub fn plan(&self) -> JailPlan {
        JailPlan::new(&self.jail_mountpoint, self.identity).cgroup(self.cgroup_procs.clone())
    }
}

/// Who a confined process runs as: an unprivileged uid and gid of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    pub fn is_root(&self) -> bool {
        self.uid == 0 || self.gid == 0
    }
}

/// Who may open a device node the jail makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAccess {
    /// Mode 0666, as the host has it (`/dev/null`, `/dev/net/tun`).
    Everyone,
    /// Mode 0600, owned by the jail's identity (`/dev/kvm`,
    /// `/dev/userfaultfd`): only this process may use it.
    Owner,
}

/// A character device the jail's `/dev` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    pub name: &'static str,
    pub major: u32,
    pub minor: u32,
    pub access: DeviceAccess,
}

impl Device {
    /// The device number the host's `/dev` node has, else the usual one:
    /// misc devices such as `userfaultfd` get their minor when the driver
    /// registers (10:126 on some kernels, 10:257 on others).
    pub fn host_number(&self) -> libc::dev_t {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        std::fs::metadata(Path::new("/dev").join(self.name))
            .ok()
            .filter(|m| m.file_type().is_char_device())
            .map(|m| m.rdev() as libc::dev_t)
            .unwrap_or_else(|| libc::makedev(self.major, self.minor))
    }
}

pub const DEV_NULL: Device = Device {
    name: "null",
    major: 1,
    minor: 3,
    access: DeviceAccess::Everyone,
};
pub const DEV_ZERO: Device = Device {
    name: "zero",
    major: 1,
    minor: 5,
    access: DeviceAccess::Everyone,
};
pub const DEV_RANDOM: Device = Device {
    name: "random",
    major: 1,
    minor: 8,
    access: DeviceAccess::Everyone,
};
pub const DEV_URANDOM: Device = Device {
    name: "urandom",
    major: 1,
    minor: 9,
    access: DeviceAccess::Everyone,
};
pub const DEV_TUN: Device = Device {
    name: "net/tun",
    major: 10,
    minor: 200,
    access: DeviceAccess::Everyone,
};
pub const DEV_KVM: Device = Device {
    name: "kvm",
    major: 10,
    minor: 232,
    access: DeviceAccess::Owner,
};
pub const DEV_USERFAULTFD: Device = Device {
    name: "userfaultfd",
    major: 10,
    minor: 126,
    access: DeviceAccess::Owner,
};

/// One thing in the jail's root. Paths are absolute, as the jailed process
/// sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailEntry {
    Dir(PathBuf),
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    /// A host file or directory bind-mounted at `path` (always `nosuid`,
    /// `nodev`; read-only unless `writable`).
    Bind {
        source: PathBuf,
        path: PathBuf,
        writable: bool,
    },
    Device(Device),
}

/// What a confined process is and sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    /// An empty host directory the jail's root is mounted on, in the
    /// process's private mount namespace (the host's stays empty).
    pub mountpoint: PathBuf,
    pub identity: Identity,
    pub entries: Vec<JailEntry>,
    /// `cgroup.procs` (v2) or `cgroup.procs` of each v1 hierarchy the
    /// process joins before it drops privileges.
    pub cgroup_procs: Vec<PathBuf>,
    /// `/proc/self/oom_score_adj`: VMMs are killed before the host agent.
    pub oom_score_adj: Option<i32>,
    /// A TAP device (in the process's network namespace, which the caller
    /// enters first) to give to the identity.
    pub tap: Option<String>,
}

/// The OOM score of every process Ember runs for a guest: the kernel's OOM
/// killer takes a VMM long before the host agent or control plane (which
/// set themselves to [`AGENT_OOM_SCORE_ADJ`]).
pub const VMM_OOM_SCORE_ADJ: i32 = 500;
/// The host agent's and control plane's own OOM score.
pub const AGENT_OOM_SCORE_ADJ: i32 = -900;

impl JailPlan {
    /// A root holding the system's programs and libraries (read-only) and
    /// a minimal `/dev`, for `identity`.
    pub fn new(mountpoint: impl Into<PathBuf>, identity: Identity) -> JailPlan {
        let mut plan = JailPlan {
            mountpoint: mountpoint.into(),
            identity,
            entries: Vec::new(),
            cgroup_procs: Vec::new(),
            oom_score_adj: Some(VMM_OOM_SCORE_ADJ),
            tap: None,
        };
        plan.push(JailEntry::Bind {
            source: "/usr".into(),
            path: "/usr".into(),
            writable: false,
        });
        // Mirror the host's top-level program directories: symlinks into
        // /usr on merged-/usr systems (Debian 12), else their own binds.
        for dir in ["/bin", "/sbin", "/lib", "/lib64"] {
            match std::fs::read_link(dir) {
                Ok(target) => plan.push(JailEntry::Symlink {
                    path: dir.into(),
                    target,
                }),
                Err(_) if Path::new(dir).is_dir() => plan.push(JailEntry::Bind {
                    source: dir.into(),
                    path: dir.into(),
                    writable: false,
                }),
                Err(_) => {}
            }
        }
        // The dynamic linker finds Debian's multiarch libraries through it.
        if Path::new("/etc/ld.so.cache").is_file() {
            plan.push(JailEntry::Bind {
                source: "/etc/ld.so.cache".into(),
                path: "/etc/ld.so.cache".into(),
                writable: false,
            });
        }
        for dev in [DEV_NULL, DEV_ZERO, DEV_RANDOM, DEV_URANDOM] {
            plan.push(JailEntry::Device(dev));
        }
        plan
    }

    /// Add an entry, and a directory entry for each missing parent.
    pub fn push(&mut self, entry: JailEntry) {
        let path = match &entry {
            JailEntry::Dir(p) | JailEntry::Symlink { path: p, .. } => p.clone(),
            JailEntry::Bind { path, .. } => path.clone(),
            JailEntry::Device(d) => Path::new("/dev").join(d.name),
        };
        let mut parents: Vec<PathBuf> = path
            .ancestors()
            .skip(1)
            .filter(|p| *p != Path::new("/") && !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .collect();
        parents.reverse();
        for p in parents {
            if !self.covers(&p) {
                self.entries.push(JailEntry::Dir(p));
            }
        }
        self.entries.push(entry);
    }

    /// Is `path` already a directory of the plan (or inside a bound one)?
    fn covers(&self, path: &Path) -> bool {
        self.entries.iter().any(|e| match e {
            JailEntry::Dir(p) => p == path,
            JailEntry::Bind { path: p, .. } => path.starts_with(p),
            _ => false,
        })
    }

    pub fn bind(
        mut self,
        source: impl Into<PathBuf>,
        path: impl Into<PathBuf>,
        writable: bool,
    ) -> Self {
        self.push(JailEntry::Bind {
            source: source.into(),
            path: path.into(),
            writable,
        });
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.push(JailEntry::Device(device));
        self
    }

    pub fn tap(mut self, name: impl Into<String>) -> Self {
        self.tap = Some(name.into());
        self
    }

    pub fn cgroup(mut self, procs: Vec<PathBuf>) -> Self {
        self.cgroup_procs = procs;
        self
    }

    /// Where a program outside `/usr` (the `ember` binary, a Firecracker
    /// build) is bound so the jail can run it: `/.ember/exe/<name>`.
    pub fn executable(&mut self, program: &Path) -> PathBuf {
        if program.starts_with("/usr/") {
            return program.to_path_buf();
        }
        let name = program
            .file_name()
            .map_or_else(|| "program".into(), |n| n.to_os_string());
        let inside = Path::new("/.ember/exe").join(name);
        self.push(JailEntry::Bind {
            source: program.to_path_buf(),
            path: inside.clone(),
            writable: false,
        });
        inside
    }

    /// Refuse plans that would run as root, escape the root, or bind what
    /// does not exist.
    pub fn validate(&self) -> Result<(), String> {
        if self.identity.is_root() {
            return Err("a jailed process must not run as root (uid or gid 0)".into());
        }
        if !self.mountpoint.is_absolute() {
            return Err(format!(
                "jail mount point {} must be an absolute path",
                self.mountpoint.display()
            ));
        }
        for e in &self.entries {
            let path = match e {
                JailEntry::Dir(p) | JailEntry::Symlink { path: p, .. } => p,
                JailEntry::Bind { path, .. } => path,
                JailEntry::Device(d) => &Path::new("/dev").join(d.name),
            };
            let clean = path.is_absolute()
                && path
                    .components()
                    .skip(1)
                    .all(|c| matches!(c, Component::Normal(_)));
            if !clean {
                return Err(format!(
                    "jail path {} must be absolute without . or ..",
                    path.display()
                ));
            }
            if let JailEntry::Bind { source, .. } = e
                && std::fs::symlink_metadata(source).is_err()
            {
                return Err(format!("{} does not exist", source.display()));
            }
        }
        Ok(())
    }

    /// Everything the child needs, as C strings and descriptors.
    pub fn prepare(&self) -> io::Result<PreparedJail> {
        self.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let root = c_path(&self.mountpoint)?;
        let inside = |p: &Path| -> io::Result<CString> {
            c_path(&self.mountpoint.join(p.strip_prefix("/").unwrap_or(p)))
        };
        let mut steps = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            steps.push(match e {
                JailEntry::Dir(p) => Step::Mkdir(inside(p)?),
                JailEntry::Symlink { path, target } => Step::Symlink {
                    path: inside(path)?,
                    target: c_path(target)?,
                },
                JailEntry::Bind {
                    source,
                    path,
                    writable,
                } => Step::Bind {
                    is_dir: std::fs::metadata(source)?.is_dir(),
                    source: c_path(source)?,
                    target: inside(path)?,
                    writable: *writable,
                },
                JailEntry::Device(d) => Step::Mknod {
                    path: inside(&Path::new("/dev").join(d.name))?,
                    dev: d.host_number(),
                    owner: d.access == DeviceAccess::Owner,
                },
            });
        }
        let cgroup_procs = self
            .cgroup_procs
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map(OwnedFd::from)
                    .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let tap = match &self.tap {
            Some(name) => {
                let bytes = name.as_bytes();
                if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("TAP name {name:?} must be 1 to 15 bytes"),
                    ));
                }
                let mut ifr = IfReq::default();
                ifr.name[..bytes.len()].copy_from_slice(bytes);
                ifr.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
                Some(ifr)
            }
            None => None,
        };
        Ok(PreparedJail {
            root,
            steps,
            identity: self.identity,
            cgroup_procs,
            oom_score_adj: self.oom_score_adj.map(|v| {
                let mut buf = [0u8; 16];
                let text = v.to_string();
                buf[..text.len()].copy_from_slice(text.as_bytes());
                (buf, text.len())
            }),
            tap,
            tun: c"/dev/net/tun".to_owned(),
            oom_file: c"/proc/self/oom_score_adj".to_owned(),
            tmpfs_opts: c"mode=0755,size=4m".to_owned(),
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

#[derive(Debug)]
enum Step {
    Mkdir(CString),
    Symlink {
        path: CString,
        target: CString,
    },
    Bind {
        source: CString,
        target: CString,
        is_dir: bool,
        writable: bool,
    },
    Mknod {
        path: CString,
        dev: libc::dev_t,
        owner: bool,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// A [`JailPlan`] ready for the child.
#[derive(Debug)]
pub struct PreparedJail {
    root: CString,
    steps: Vec<Step>,
    identity: Identity,
    cgroup_procs: Vec<OwnedFd>,
    oom_score_adj: Option<([u8; 16], usize)>,
    tap: Option<IfReq>,
    tun: CString,
    oom_file: CString,
    tmpfs_opts: CString,
}

/// `Err(last OS error)` when a libc call returned -1.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl PreparedJail {
    /// Confine the calling process. Runs in a forked child before `exec`:
    /// system calls only, on data prepared by [`JailPlan::prepare`]. The
    /// caller has already entered the network namespace.
    pub fn enter(&self) -> io::Result<()> {
        // What the jailed process creates (sockets, logs) is its own alone.
        // SAFETY: umask only changes this process's file-creation mask.
        unsafe { libc::umask(0o077) };
        self.join_cgroups()?;
        self.set_oom_score()?;
        self.give_tap()?;
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the struct above and nothing else.
        check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) })?;
        self.build_root()?;
        self.drop_privileges()
    }

    fn join_cgroups(&self) -> io::Result<()> {
        for fd in &self.cgroup_procs {
            // "0" moves the writing process itself.
            // SAFETY: writes two bytes from a static buffer to an open fd.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0\n".as_ptr().cast(), 2) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn set_oom_score(&self) -> io::Result<()> {
        let Some((buf, len)) = &self.oom_score_adj else {
            return Ok(());
        };
        // SAFETY: a NUL-terminated path prepared by the parent.
        let fd = unsafe { libc::open(self.oom_file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        check(fd)?;
        // SAFETY: writes `len` bytes of `buf`, which holds at least that many.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), *len) };
        let err = io::Error::last_os_error();
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(fd) };
        if n < 0 { Err(err) } else { Ok(()) }
    }

    /// Make the persistent TAP device the identity's: a jailed VMM attaches
    /// to it without `CAP_NET_ADMIN`, and no other uid can.
    fn give_tap(&self) -> io::Result<()> {
        let Some(ifr) = &self.tap else {
            return Ok(());
        };
        // SAFETY: a NUL-terminated path prepared by the parent.
        let fd = unsafe { libc::open(self.tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        check(fd)?;
        let mut req = *ifr;
        // SAFETY: TUNSETIFF reads and may update the ifreq-sized struct;
        // TUNSETOWNER/TUNSETGROUP take integers by value.
        let result = unsafe {
            check(libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq)).and_then(|()| {
                check(libc::ioctl(
                    fd,
                    TUNSETOWNER,
                    self.identity.uid as libc::c_ulong,
                ))
            })
        }
        .and_then(|()| {
            // SAFETY: as above.
            check(unsafe { libc::ioctl(fd, TUNSETGROUP, self.identity.gid as libc::c_ulong) })
        });
        // SAFETY: closes the descriptor opened above; the device persists.
        unsafe { libc::close(fd) };
        result
    }

    fn build_root(&self) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: each call passes NUL-terminated strings prepared by the
        // parent (or null where the kernel allows it) and reads nothing else.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                self.tmpfs_opts.as_ptr().cast(),
            ))?;
        }
        for step in &self.steps {
            self.apply(step)?;
        }
        // SAFETY: as above.
        unsafe {
            check(libc::mount(
                none,
                self.root.as_ptr(),
                none,
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::chroot(c".".as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        Ok(())
    }

    fn apply(&self, step: &Step) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: NUL-terminated strings prepared by the parent; the kernel
        // reads nothing else.
        unsafe {
            match step {
                Step::Mkdir(path) => {
                    if libc::mkdir(path.as_ptr(), 0o755) == -1 {
                        let err = io::Error::last_os_error();
                        if err.raw_os_error() != Some(libc::EEXIST) {
                            return Err(err);
                        }
                    } else {
                        // Exactly 0755 whatever the umask: the jailed uid
                        // must traverse the root's directories.
                        check(libc::chmod(path.as_ptr(), 0o755))?;
                    }
                }
                Step::Symlink { path, target } => {
                    check(libc::symlink(target.as_ptr(), path.as_ptr()))?;
                }
                Step::Bind {
                    source,
                    target,
                    is_dir,
                    writable,
                } => {
                    if *is_dir {
                        if libc::mkdir(target.as_ptr(), 0o755) == -1 {
                            let err = io::Error::last_os_error();
                            if err.raw_os_error() != Some(libc::EEXIST) {
                                return Err(err);
                            }
                        } else {
                            check(libc::chmod(target.as_ptr(), 0o755))?;
                        }
                    } else {
                        let fd = libc::open(
                            target.as_ptr(),
                            libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                            0o600,
                        );
                        check(fd)?;
                        libc::close(fd);
                    }
                    check(libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    let mut flags =
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
                    if !writable {
                        flags |= libc::MS_RDONLY;
                    }
                    check(libc::mount(
                        none,
                        target.as_ptr(),
                        none,
                        flags,
                        std::ptr::null(),
                    ))?;
                }
                Step::Mknod { path, dev, owner } => {
                    let mode = if *owner { 0o600 } else { 0o666 };
                    check(libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, *dev))?;
                    // mknod's mode is masked by the umask: set it exactly.
                    check(libc::chmod(path.as_ptr(), mode))?;
                    if *owner {
                        check(libc::chown(
                            path.as_ptr(),
                            self.identity.uid,
                            self.identity.gid,
                        ))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn drop_privileges(&self) -> io::Result<()> {
        let Identity { uid, gid } = self.identity;
        // SAFETY: plain system calls on integers; setgroups reads one gid.
        unsafe {
            // Empty the bounding and ambient sets while still root, so no
            // exec can ever regain a capability.
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ))?;
            check(libc::setgroups(1, &gid))?;
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))?;
            // Leaving uid 0 cleared every capability; make sure nothing
            // (a setuid binary, file capabilities) can bring one back.
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// Hand a file a confined process writes (a VM's RAM file, its disk layer,
/// its run directory) to its identity, readable by nobody else.
pub fn give(path: &Path, identity: Identity) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(identity.uid), Some(identity.gid))
        .map_err(|e| io::Error::new(e.kind(), format!("chown {}: {e}", path.display())))?;
    let mode = if path.is_dir() { 0o700 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Identity = Identity {
        uid: 900_000_001,
        gid: 900_000_001,
    };

    #[test]
    fn device_numbers_come_from_the_host_node() {
        use std::os::unix::fs::MetadataExt;
        // /dev/null is 1:3 everywhere; a device the host lacks keeps its
        // usual number.
        let null = std::fs::metadata("/dev/null").unwrap().rdev() as libc::dev_t;
        assert_eq!(DEV_NULL.host_number(), null);
        let absent = Device {
            name: "ember-no-such-device",
            major: 10,
            minor: 99,
            access: DeviceAccess::Owner,
        };
        assert_eq!(absent.host_number(), libc::makedev(10, 99));
        if let Ok(m) = std::fs::metadata("/dev/userfaultfd") {
            assert_eq!(DEV_USERFAULTFD.host_number(), m.rdev() as libc::dev_t);
        }
    }

    #[test]
    fn a_plan_has_the_system_a_minimal_dev_and_parents_before_children() {
        let plan = JailPlan::new("/run/ember/jail", ME)
            .bind("/tmp", "/run/ember/vm", true)
            .device(DEV_KVM);
        assert!(plan.entries.contains(&JailEntry::Bind {
            source: "/usr".into(),
            path: "/usr".into(),
            writable: false
        }));
        assert!(
            plan.entries
                .iter()
                .any(|e| matches!(e, JailEntry::Device(d) if d.name == "urandom"))
        );
        // /run and /run/ember are made before the bind onto /run/ember/vm.
        let pos = |want: &JailEntry| plan.entries.iter().position(|e| e == want).unwrap();
        let run = pos(&JailEntry::Dir("/run".into()));
        let ember = pos(&JailEntry::Dir("/run/ember".into()));
        let vm = pos(&JailEntry::Bind {
            source: "/tmp".into(),
            path: "/run/ember/vm".into(),
            writable: true,
        });
        assert!(run < ember && ember < vm);
        // /dev exists once, before its nodes.
        let devs = plan
            .entries
            .iter()
            .filter(|e| **e == JailEntry::Dir("/dev".into()))
            .count();
        assert_eq!(devs, 1);
        assert_eq!(plan.validate(), Ok(()));
    }

    #[test]
    fn files_inside_a_bound_directory_need_no_directories_of_their_own() {
        let plan = JailPlan::new("/j", ME)
            .bind("/tmp", "/run/ember/vm", true)
            .bind("/etc/hostname", "/run/ember/vm/drives/root", true);
        assert!(
            !plan
                .entries
                .contains(&JailEntry::Dir("/run/ember/vm/drives".into())),
            "inside the bound run directory: its placeholder is the caller's"
        );
    }

    #[test]
    fn root_escapes_and_missing_sources_are_refused() {
        let root = JailPlan::new("/j", Identity { uid: 0, gid: 5 });
        assert!(root.validate().unwrap_err().contains("root"));
        let escape = JailPlan::new("/j", ME).bind("/tmp", "/run/../etc", true);
        assert!(escape.validate().unwrap_err().contains(".."));
        let missing = JailPlan::new("/j", ME).bind("/nonexistent/x", "/x", false);
        assert!(missing.validate().unwrap_err().contains("does not exist"));
        let relative = JailPlan::new("j", ME);
        assert!(relative.validate().unwrap_err().contains("absolute"));
    }

    #[test]
    fn programs_outside_usr_are_bound_in() {
        let mut plan = JailPlan::new("/j", ME);
        assert_eq!(
            plan.executable(Path::new("/usr/bin/qemu-system-x86_64")),
            PathBuf::from("/usr/bin/qemu-system-x86_64")
        );
        let exe = plan.executable(Path::new("/opt/fc/firecracker"));
        assert_eq!(exe, PathBuf::from("/.ember/exe/firecracker"));
        assert!(plan.entries.contains(&JailEntry::Bind {
            source: "/opt/fc/firecracker".into(),
            path: exe,
            writable: false
        }));
    }
}
