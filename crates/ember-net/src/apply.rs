//! The applier: the only code here that changes the system. It executes
//! plans built in `plan` and reads back what it needs to check them.
//!
//! It drives the `ip` (iproute2) and `nft` commands rather than speaking
//! netlink itself. They are the reference implementations of both netlink
//! families; `nft -f` replaces a whole table in one kernel transaction from
//! the very text the plans are golden-tested as, which a hand-rolled
//! nftables netlink encoder would have to reproduce (no maintained Rust
//! crate does); and a failure is a command line anyone can re-run. The cost
//! is process spawns, kept to five per slot by batching (`ip -batch`).
//! Sysctls are written and `nft` is started from a thread that has entered
//! the slot namespace (`setns`), so no `ip netns exec` (and its mount
//! namespace juggling) is needed.
//!
//! Deleting is idempotent: each step checks whether its object exists and a
//! failed delete counts as done if the object is gone afterwards.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns};

use crate::error::{NetError, Result};
use crate::layout::NETNS_DIR;
use crate::nft::{Family, Table, delete_table_script};
use crate::plan::{HostPlan, SlotPlan, SlotTeardown, Sysctl};

/// Executes plans with `ip` and `nft`.
#[derive(Debug, Clone)]
pub struct Applier {
    ip: PathBuf,
    nft: PathBuf,
}

impl Default for Applier {
    /// `ip` and `nft` from `PATH`.
    fn default() -> Self {
        Applier {
            ip: "ip".into(),
            nft: "nft".into(),
        }
    }
}

impl Applier {
    pub fn new(ip: PathBuf, nft: PathBuf) -> Self {
        Applier { ip, nft }
    }

    /// Creates the whole slot, first removing anything left of an earlier
    /// slot with the same index (a crash mid-setup, or mid-teardown).
    pub fn apply_slot(&self, plan: &SlotPlan) -> Result<()> {
        self.teardown_slot(&plan.teardown())?;
        self.create_netns(plan)?;
        self.apply_links(plan)?;
        self.apply_slot_rules(plan)
    }

    /// `ip netns add`. Split from the rest because the pool creates the
    /// namespace under its pool-wide lock (see `pool`).
    pub fn create_netns(&self, plan: &SlotPlan) -> Result<()> {
        self.run(&self.ip, ["netns", "add", plan.netns.as_str()], None)
    }

    /// Veth, addresses, the guest link and the default route; needs the namespace.
    pub fn apply_links(&self, plan: &SlotPlan) -> Result<()> {
        self.run(&self.ip, ["-batch", "-"], Some(&plan.host_ip_batch()))?;
        self.run(
            &self.ip,
            ["-n", plan.netns.as_str(), "-batch", "-"],
            Some(&plan.ns_ip_batch()),
        )
    }

    /// The namespace's sysctls and nftables table.
    pub fn apply_slot_rules(&self, plan: &SlotPlan) -> Result<()> {
        let script = plan.ruleset.replace_script();
        in_netns(&plan.netns_path(), || {
            for sysctl in &plan.ns_sysctls {
                write_sysctl(sysctl)?;
            }
            self.run(&self.nft, ["-f", "-"], Some(&script))
        })
    }

    /// Atomically swaps a live slot's table for `table` (a policy change).
    pub fn replace_slot_ruleset(&self, netns: &Path, table: &Table) -> Result<()> {
        let script = table.replace_script();
        in_netns(netns, || self.run(&self.nft, ["-f", "-"], Some(&script)))
    }

    /// The slot's table as the kernel has it, in `nft list` form.
    pub fn read_slot_ruleset(&self, netns: &Path, table: &Table) -> Result<String> {
        let family = match table.family {
            Family::Ip => "ip",
            Family::Inet => "inet",
        };
        in_netns(netns, || {
            self.output(&self.nft, ["list", "table", family, table.name.as_str()])
        })
    }

    /// Removes a slot. Returns whether anything was there.
    pub fn teardown_slot(&self, teardown: &SlotTeardown) -> Result<bool> {
        let mut found = false;
        if link_exists(&teardown.host_link) {
            found = true;
            let done = self.run(&self.ip, ["link", "del", teardown.host_link.as_str()], None);
            if let Err(e) = done
                && link_exists(&teardown.host_link)
            {
                return Err(e);
            }
        }
        let path = Path::new(NETNS_DIR).join(&teardown.netns);
        if path.exists() {
            found = true;
            // Also unmounts; the namespace dies with its last user.
            let done = self.run(&self.ip, ["netns", "del", teardown.netns.as_str()], None);
            if let Err(e) = done
                && path.exists()
            {
                return Err(e);
            }
        }
        Ok(found)
    }

    /// Host sysctls and the pool's host table (replaced atomically, so this
    /// is also how a table lost to a host firewall reload comes back).
    pub fn apply_host(&self, plan: &HostPlan) -> Result<()> {
        for sysctl in &plan.sysctls {
            if read_sysctl(sysctl)? != sysctl.value {
                write_sysctl(sysctl)?;
                tracing::info!(
                    sysctl = sysctl.key,
                    value = sysctl.value,
                    "set host sysctl for sandbox networking"
                );
            }
        }
        self.run(&self.nft, ["-f", "-"], Some(&plan.table.replace_script()))
    }

    /// Removes the pool's host table if present; host sysctls stay.
    pub fn teardown_host(&self, plan: &HostPlan) -> Result<()> {
        let t = &plan.table;
        self.run(
            &self.nft,
            ["-f", "-"],
            Some(&delete_table_script(t.family, &t.name)),
        )
    }

    /// Whether the host namespace has the pool's host table.
    pub fn host_table_exists(&self, plan: &HostPlan) -> Result<bool> {
        let listing = self.output(&self.nft, ["list", "tables", "ip"])?;
        let wanted = format!("table ip {}", plan.table.name);
        Ok(listing.lines().any(|l| l.trim() == wanted))
    }

    /// The first part of a set-up slot that is missing, if any.
    pub fn find_missing(&self, plan: &SlotPlan) -> Result<Option<String>> {
        let path = plan.netns_path();
        if !path.exists() {
            return Ok(Some(format!("namespace {}", path.display())));
        }
        if !link_exists(&plan.host_link.name) {
            return Ok(Some(format!("host link {}", plan.host_link.name)));
        }
        let inside = [plan.ns_link.name.clone(), plan.guest_link.name.clone()];
        in_netns(&path, || {
            Ok(inside
                .iter()
                .find(|name| !link_exists(name))
                .map(|name| format!("link {name} in {}", plan.netns)))
        })
    }

    fn run<I, S>(&self, program: &Path, args: I, stdin: Option<&str>) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec(program, args, stdin).map(drop)
    }

    fn output<I, S>(&self, program: &Path, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec(program, args, None)
    }

    fn exec<I, S>(&self, program: &Path, args: I, stdin: Option<&str>) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = describe(&cmd);
        let spawn_err = |source| NetError::Spawn {
            program: program.display().to_string(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // The tools read all input before acting, so a write error means
            // they died early; their exit status below says why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(NetError::CommandFailed {
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        tracing::debug!(%command, "applied");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `f` on a fresh thread that has joined the network namespace at
/// `netns`. Network sysctls, sockets, interface lookups and child processes
/// started there all belong to that namespace; the thread ends with `f`, so
/// no other code ever runs in the wrong namespace.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = File::open(netns).map_err(|e| NetError::io("cannot open namespace", netns, e))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::EnterNetns {
                    path: netns.to_path_buf(),
                    source,
                })?;
                f()
            })
            .join()
            .map_err(|_| NetError::WorkerPanicked)?
    })
}

fn read_sysctl(sysctl: &Sysctl) -> Result<String> {
    let path = sysctl.path();
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_string())
        .map_err(|e| NetError::io("cannot read sysctl", path, e))
}

fn write_sysctl(sysctl: &Sysctl) -> Result<()> {
    let path = sysctl.path();
    std::fs::write(&path, sysctl.value).map_err(|e| NetError::io("cannot write sysctl", path, e))
}

/// Whether an interface of this name exists in the calling thread's namespace.
pub fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Every interface name in the calling thread's namespace.
pub fn link_names() -> Result<Vec<String>> {
    let interfaces = nix::net::if_::if_nameindex().map_err(NetError::HostAddresses)?;
    Ok(interfaces
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect())
}

/// Every IPv4 address on every interface of the calling thread's namespace.
pub fn host_ipv4_addrs() -> Result<Vec<Ipv4Addr>> {
    let mut addrs: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map_err(NetError::HostAddresses)?
        .filter_map(|ifa| ifa.address?.as_sockaddr_in().map(|sin| sin.ip()))
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    Ok(addrs)
}
