//! The guest's system setup as PID 1 — mounts, hostname, network, resolver —
//! planned as data ([`boot_plan`]) and applied by one small applier
//! ([`apply`]), plus the effects of `/init` (clock, entropy) and power-off.
//!
//! The plan is unit-tested without root; the applier is exercised for real
//! in private mount and network namespaces by tests that need root. Every
//! step's failure is logged loudly and setup continues: a guest with a
//! missing mount is still worth reaching over the network.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use ember_types::guest::{GATEWAY_IP, GUEST_HOSTNAME, GUEST_IP, GUEST_PREFIX_LEN};
use nix::mount::MsFlags;

/// One mount of the boot plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountStep {
    pub source: &'static str,
    pub target: PathBuf,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

/// One network configuration step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStep {
    Up {
        dev: &'static str,
    },
    Address {
        dev: &'static str,
        addr: Ipv4Addr,
        prefix_len: u8,
    },
    DefaultRoute {
        dev: &'static str,
        via: Ipv4Addr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemPlan {
    pub mounts: Vec<MountStep>,
    /// Symlinks `(link, target)` that devtmpfs does not provide.
    pub symlinks: Vec<(PathBuf, &'static str)>,
    pub hostname: &'static str,
    pub links: Vec<LinkStep>,
    pub resolv_conf: PathBuf,
    pub nameservers: Vec<IpAddr>,
}

pub const DEFAULT_NAMESERVERS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
    IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
];

/// What PID 1 sets up, relative to `root` (`/` in the VM).
pub fn boot_plan(root: &Path) -> SystemPlan {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let m = |source, target: &str, fstype, flags, data| MountStep {
        source,
        target: at(target),
        fstype,
        flags,
        data,
    };
    SystemPlan {
        mounts: vec![
            m("proc", "/proc", "proc", hardened, None),
            m("sysfs", "/sys", "sysfs", hardened, None),
            m(
                "devtmpfs",
                "/dev",
                "devtmpfs",
                MsFlags::MS_NOSUID,
                Some("mode=0755"),
            ),
            m(
                "devpts",
                "/dev/pts",
                "devpts",
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("gid=5,mode=0620,ptmxmode=0666"),
            ),
            m(
                "tmpfs",
                "/dev/shm",
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=1777"),
            ),
            m(
                "tmpfs",
                "/tmp",
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=1777"),
            ),
            m(
                "tmpfs",
                "/run",
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            ),
        ],
        symlinks: vec![
            (at("/dev/fd"), "/proc/self/fd"),
            (at("/dev/stdin"), "/proc/self/fd/0"),
            (at("/dev/stdout"), "/proc/self/fd/1"),
            (at("/dev/stderr"), "/proc/self/fd/2"),
        ],
        hostname: GUEST_HOSTNAME,
        links: vec![
            LinkStep::Up { dev: "lo" },
            LinkStep::Address {
                dev: "eth0",
                addr: GUEST_IP,
                prefix_len: GUEST_PREFIX_LEN,
            },
            LinkStep::Up { dev: "eth0" },
            LinkStep::DefaultRoute {
                dev: "eth0",
                via: GATEWAY_IP,
            },
        ],
        resolv_conf: at("/etc/resolv.conf"),
        nameservers: DEFAULT_NAMESERVERS.to_vec(),
    }
}

pub fn resolv_conf_text(nameservers: &[IpAddr]) -> String {
    let mut text = String::from("# Written by ember-guest.\n");
    for ns in nameservers {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    text
}

/// How many steps failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    pub failed: usize,
}

/// Applies `plan`; what fails is logged and skipped. `mounted` lists mount
/// points that already exist (the kernel may have mounted `/dev`).
pub fn apply_mounts(plan: &SystemPlan) -> ApplyReport {
    let mut report = ApplyReport::default();
    for step in &plan.mounts {
        if let Err(e) = apply_mount(step) {
            report.failed += 1;
            tracing::error!(target_dir = %step.target.display(), fstype = step.fstype, error = %e, "MOUNT FAILED");
        }
    }
    for (link, target) in &plan.symlinks {
        if link.symlink_metadata().is_err()
            && let Err(e) = std::os::unix::fs::symlink(target, link)
        {
            report.failed += 1;
            tracing::error!(link = %link.display(), error = %e, "cannot create symlink");
        }
    }
    report
}

fn apply_mount(step: &MountStep) -> io::Result<()> {
    if is_mount_point(&step.target) {
        tracing::info!(target_dir = %step.target.display(), "already mounted");
        return Ok(());
    }
    std::fs::create_dir_all(&step.target)?;
    nix::mount::mount(
        Some(step.source),
        &step.target,
        Some(step.fstype),
        step.flags,
        step.data,
    )?;
    tracing::debug!(target_dir = %step.target.display(), fstype = step.fstype, "mounted");
    Ok(())
}

/// A directory is a mount point when its device differs from its parent's
/// (works before /proc is mounted, unlike reading mountinfo).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) = (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    here.dev() != parent.dev()
}

pub fn apply_network(plan: &SystemPlan) -> ApplyReport {
    let mut report = ApplyReport::default();
    let sock = match inet_socket() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "NETWORK SETUP FAILED: no socket for interface ioctls");
            report.failed = plan.links.len();
            return report;
        }
    };
    for step in &plan.links {
        if let Err(e) = apply_link(&sock, step) {
            report.failed += 1;
            tracing::error!(?step, error = %e, "NETWORK SETUP STEP FAILED");
        } else {
            tracing::debug!(?step, "network step applied");
        }
    }
    report
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(dev: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= req.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and any
    // bit pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: callers pass a pointer to a live struct of the type `request`
    // expects (ifreq or rtentry).
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn apply_link(sock: &OwnedFd, step: &LinkStep) -> io::Result<()> {
    match step {
        LinkStep::Up { dev } => {
            let mut req = ifreq_for(dev)?;
            ioctl(sock, libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
            // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
            unsafe {
                req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            }
            ioctl(sock, libc::SIOCSIFFLAGS, (&raw mut req).cast())
        }
        LinkStep::Address {
            dev,
            addr,
            prefix_len,
        } => {
            let mut req = ifreq_for(dev)?;
            req.ifr_ifru.ifru_addr = sockaddr_in(*addr);
            ioctl(sock, libc::SIOCSIFADDR, (&raw mut req).cast())?;
            let mut req = ifreq_for(dev)?;
            req.ifr_ifru.ifru_netmask = sockaddr_in(netmask(*prefix_len));
            ioctl(sock, libc::SIOCSIFNETMASK, (&raw mut req).cast())
        }
        LinkStep::DefaultRoute { dev, via } => {
            let mut name: Vec<libc::c_char> = dev.bytes().map(|b| b as libc::c_char).collect();
            name.push(0);
            // SAFETY: rtentry is plain old data; all-zero is a valid value.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr_in(*via);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            rt.rt_dev = name.as_mut_ptr();
            match ioctl(sock, libc::SIOCADDRT, (&raw mut rt).cast()) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                other => other,
            }
        }
    }
}

/// Writes resolv.conf atomically (temp file + rename), replacing a symlink.
pub fn write_resolv_conf(path: &Path, nameservers: &[IpAddr]) -> io::Result<()> {
    let tmp = path.with_extension("ember-tmp");
    std::fs::write(&tmp, resolv_conf_text(nameservers))?;
    std::fs::rename(&tmp, path)
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io::Error::from)
}

pub fn set_clock(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: reads one timespec from a live local.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `entropy` into the kernel pool; with `credit`, also counts it
/// (`RNDADDENTROPY`), which unblocks readers of fresh randomness after a
/// restore.
pub fn add_entropy(entropy: &[u8], credit: bool) -> io::Result<()> {
    use std::io::Write;
    let mut random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    if !credit {
        return random.write_all(entropy);
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    info.resize(info.len().next_multiple_of(4), 0);
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
    // SAFETY: `info` is a live buffer laid out as rand_pool_info with
    // buf_size bytes of payload following the header.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Crediting entropy does not reseed the CRNG on 6.x kernels until its
    // next scheduled reseed (up to a minute): forks of one snapshot would
    // hand out the same getrandom() bytes until then. Force it now.
    // RNDRESEEDCRNG = _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Syncs and powers the VM off. Only for PID 1; never returns on success.
pub fn power_off() -> io::Error {
    nix::unistd::sync();
    // SAFETY: reboot(2) takes a command constant only.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// Makes Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`) arrive as `SIGINT`.
pub fn disable_ctrl_alt_del() -> io::Result<()> {
    // SAFETY: reboot(2) takes a command constant only.
    if unsafe { libc::reboot(libc::RB_DISABLE_CAD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// As PID 1 the kernel may start us without usable stdio (no /dev/console
/// in the rootfs); once devtmpfs is up, point 0–2 at the console.
pub fn ensure_console_stdio() {
    // SAFETY: fcntl(F_GETFD) only queries descriptor 2.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0 {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which are unused.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_mounts_what_a_guest_needs_in_order() {
        let plan = boot_plan(Path::new("/"));
        let targets: Vec<&str> = plan
            .mounts
            .iter()
            .map(|m| m.target.to_str().unwrap())
            .collect();
        assert_eq!(
            targets,
            [
                "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/tmp", "/run"
            ]
        );
        let devpts = &plan.mounts[3];
        assert_eq!(devpts.fstype, "devpts");
        assert!(devpts.data.unwrap().contains("ptmxmode=0666"));
        assert!(plan.mounts[0].flags.contains(MsFlags::MS_NOSUID));
        assert_eq!(plan.hostname, "ember");
        assert_eq!(plan.resolv_conf, Path::new("/etc/resolv.conf"));
    }

    #[test]
    fn plan_under_another_root() {
        let plan = boot_plan(Path::new("/tmp/r"));
        assert_eq!(plan.mounts[0].target, Path::new("/tmp/r/proc"));
        assert_eq!(plan.symlinks[0].0, Path::new("/tmp/r/dev/fd"));
    }

    #[test]
    fn plan_configures_the_fixed_address_and_route() {
        let plan = boot_plan(Path::new("/"));
        assert_eq!(
            plan.links,
            [
                LinkStep::Up { dev: "lo" },
                LinkStep::Address {
                    dev: "eth0",
                    addr: GUEST_IP,
                    prefix_len: GUEST_PREFIX_LEN
                },
                LinkStep::Up { dev: "eth0" },
                LinkStep::DefaultRoute {
                    dev: "eth0",
                    via: GATEWAY_IP
                },
            ]
        );
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn resolv_conf_lists_nameservers() {
        assert_eq!(
            resolv_conf_text(&DEFAULT_NAMESERVERS),
            "# Written by ember-guest.\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n"
        );
    }

    /// The applier for real, in a private network namespace holding an
    /// `eth0` (one end of a veth pair; namespaces are per thread, so the test thread's view only).
    #[test]
    fn network_applier_configures_a_real_interface_as_root() {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root to create a network namespace"
        );
        ember_testkit::require!(
            Path::new("/usr/sbin/ip").exists() || Path::new("/sbin/ip").exists(),
            "needs iproute2's ip to create a veth pair"
        );
        std::thread::spawn(|| {
            // SAFETY: detaches only this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let ip = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            };
            ip(&[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0-peer",
            ]);
            let report = apply_network(&boot_plan(Path::new("/")));
            assert_eq!(report.failed, 0);
            let addr = ip(&["-4", "addr", "show", "dev", "eth0"]);
            assert!(addr.contains("169.254.0.21/30"), "{addr}");
            assert!(ip(&["link", "show", "lo"]).contains("UP"));
            let route = ip(&["route", "show", "default"]);
            assert!(route.contains("via 169.254.0.22 dev eth0"), "{route}");
        })
        .join()
        .unwrap();
    }

    /// The mount applier for real, in a private mount namespace, under a temporary root.
    #[test]
    fn mount_applier_mounts_under_a_root_as_root() {
        ember_testkit::require!(ember_testkit::is_root(), "needs root to mount");
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().to_path_buf();
        std::thread::spawn(move || {
            // SAFETY: detaches only this thread's mount namespace and fs context.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            let plan = boot_plan(&root_path);
            assert_eq!(apply_mounts(&plan).failed, 0);
            let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            for step in &plan.mounts {
                let t = step.target.to_str().unwrap();
                assert!(mountinfo.contains(&format!(" {t} ")), "{t} not mounted");
            }
            assert!(root_path.join("proc/self").exists());
            assert!(root_path.join("dev/pts/ptmx").exists());
            assert_eq!(
                std::fs::read_link(root_path.join("dev/fd")).unwrap(),
                Path::new("/proc/self/fd")
            );
            // Applying again finds everything mounted and changes nothing.
            assert_eq!(apply_mounts(&plan).failed, 0);
            let again = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            assert_eq!(again.lines().count(), mountinfo.lines().count());
        })
        .join()
        .unwrap();
    }
}
