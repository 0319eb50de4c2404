//! How this agent confines what it runs for each sandbox: the sandbox's
//! own uid (from its network slot), its cgroup and limits, and the jail
//! settings its VMM, page server and `qemu-img` runs share.
//!
//! The mechanisms are `ember-jail`'s; this module holds the agent's
//! policy: which uid, which cgroup, which limits, and how leftovers of a
//! crash are reclaimed. Also the agent's own process settings (umask, OOM
//! score) and the checks of its directories.

use std::path::{Path, PathBuf};

use ember_jail::cgroup::{Cgroup, CgroupPlan, IoLimits, Layout, Limits};
use ember_jail::{Confinement, Identity};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::AgentError;

/// The agent's confinement settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfineConfig {
    /// Sandboxes run as uid (and gid) `uid_base + slot index`: each its
    /// own, never root, never a login user's (the default range is far
    /// above any distribution's).
    pub uid_base: u32,
    /// MiB a sandbox's cgroup may use beyond its guest memory: the VMM's
    /// own code, heap and TCG translation cache, and the page server.
    pub vmm_overhead_mib: u64,
    /// Processes and threads per sandbox (a VMM has a few dozen).
    pub pids: u32,
    /// Disk bandwidth and IOPS per sandbox on the device holding the data
    /// directory; `None` leaves it unlimited.
    pub disk_bps: Option<u64>,
    pub disk_iops: Option<u64>,
}

impl Default for ConfineConfig {
    fn default() -> Self {
        ConfineConfig {
            uid_base: 900_000_000,
            vmm_overhead_mib: 384,
            pids: 512,
            disk_bps: Some(256 << 20),
            disk_iops: Some(20_000),
        }
    }
}

/// What the agent knows about confining on this host.
#[derive(Debug)]
pub struct Confiner {
    config: ConfineConfig,
    /// An empty directory every jail's root is mounted on (each in its own
    /// mount namespace).
    mountpoint: PathBuf,
    /// `None` when the host offers no cgroup controllers (sandboxes then
    /// run unlimited, which start-up warns about).
    layout: Option<Layout>,
    /// This agent's cgroups: `ember/<net prefix>/<sandbox>`.
    parent: PathBuf,
    /// `major:minor` of the device holding the data directory.
    disk_device: Option<(u32, u32)>,
}

impl Confiner {
    pub fn new(
        config: ConfineConfig,
        run_dir: &Path,
        net_prefix: &str,
        data_dir: &Path,
    ) -> Result<Confiner, AgentError> {
        let mountpoint = run_dir.join("jail");
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| AgentError::io(format!("create {}", mountpoint.display()), e))?;
        // Traversable (a jailed process's root is mounted here), not listable.
        set_mode(&mountpoint, 0o711)?;
        let layout = Layout::detect();
        match &layout {
            Some(l) => info!(cgroups = %l.describe(), "sandboxes get cgroups"),
            None => warn!(
                "no cgroup controllers on this host: sandboxes run without CPU, memory and \
                 process limits"
            ),
        }
        let disk_device = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(data_dir).ok().map(|m| {
                let dev = m.dev();
                (libc::major(dev), libc::minor(dev))
            })
        };
        Ok(Confiner {
            config,
            mountpoint,
            layout,
            parent: Path::new("ember").join(net_prefix),
            disk_device,
        })
    }

    pub fn config(&self) -> &ConfineConfig {
        &self.config
    }

    /// The uid and gid of the sandbox in slot `slot`.
    pub fn identity(&self, slot: u32) -> Identity {
        let id = self.config.uid_base.saturating_add(slot);
        Identity { uid: id, gid: id }
    }

    /// The limits of a sandbox of this shape.
    pub fn limits(&self, vcpus: u32, memory_mib: u32) -> Limits {
        let io = self
            .disk_device
            .filter(|_| self.config.disk_bps.is_some() || self.config.disk_iops.is_some())
            .map(|device| IoLimits {
                device,
                read_bps: self.config.disk_bps,
                write_bps: self.config.disk_bps,
                read_iops: self.config.disk_iops,
                write_iops: self.config.disk_iops,
            });
        Limits {
            cpu_percent: Some(vcpus.saturating_mul(100)),
            memory_bytes: Some((u64::from(memory_mib) + self.config.vmm_overhead_mib) << 20),
            pids: Some(self.config.pids),
            io,
        }
    }

    /// Make the sandbox's cgroup (none when the host has no controllers).
    pub fn cgroup(
        &self,
        sandbox: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Option<Cgroup>, AgentError> {
        let Some(layout) = &self.layout else {
            return Ok(None);
        };
        let plan = CgroupPlan::new(
            layout,
            &self.parent,
            sandbox,
            &self.limits(vcpus, memory_mib),
        );
        Cgroup::create(&plan)
            .map(Some)
            .map_err(|e| AgentError::io(format!("create the cgroup of sandbox {sandbox}"), e))
    }

    /// The confinement of the sandbox in `slot`, in `cgroup`.
    pub fn confinement(&self, slot: u32, cgroup: Option<&Cgroup>) -> Confinement {
        Confinement {
            identity: self.identity(slot),
            jail_mountpoint: self.mountpoint.clone(),
            cgroup_procs: cgroup.map(|c| c.procs.clone()).unwrap_or_default(),
        }
    }

    /// Remove this agent's cgroups that belong to none of `live` (left by
    /// a crash), killing whatever is still in them.
    pub fn reclaim(&self, live: &std::collections::HashSet<String>) {
        let Some(layout) = &self.layout else { return };
        let roots: Vec<PathBuf> = match layout {
            Layout::V2 { root, .. } => vec![root.join(&self.parent)],
            Layout::V1 { mounts } => mounts.values().map(|m| m.join(&self.parent)).collect(),
        };
        for root in roots {
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !e.path().is_dir() || live.contains(&name) {
                    continue;
                }
                let procs =
                    std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    crate::runtime::kill_pid(pid);
                }
                match std::fs::remove_dir(e.path()) {
                    Ok(()) => info!(cgroup = %e.path().display(), "stale cgroup removed"),
                    Err(err) => {
                        warn!(cgroup = %e.path().display(), error = %err, "stale cgroup left")
                    }
                }
            }
        }
    }
}

/// Remove a sandbox's cgroup once its processes are gone, killing any that
/// are left (a VMM's helper, a page server that outlived its VM).
pub async fn remove_cgroup(cgroup: &Cgroup) -> Result<(), String> {
    for _ in 0..50 {
        let pids = cgroup.pids();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            crate::runtime::kill_pid(pid);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cgroup.remove().map_err(|e| e.to_string())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| AgentError::io(format!("chmod {}", path.display()), e))
}

/// Make `dir` (and its missing parents) a private directory of this user:
/// created 0700, or, if it exists, owned by us and made 0700. A directory
/// owned by another user is refused: whoever owns it could swap its
/// contents (a symlink race on guest RAM files or sockets).
pub fn private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| AgentError::io(format!("stat {}", dir.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(AgentError::InvalidArgument(format!(
            "{} is {} owned by uid {}, not a directory of uid {me}: remove it or choose \
             another directory",
            dir.display(),
            if meta.is_dir() {
                "a directory"
            } else {
                "not a directory but"
            },
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        set_mode(dir, 0o700)?;
    }
    Ok(())
}

/// The agent's own process: new files private to it (umask 077), and the
/// OOM killer takes a VMM long before the agent (when `lower_oom_score`;
/// that needs CAP_SYS_RESOURCE, which containers often drop).
pub fn harden_self(lower_oom_score: bool) {
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    if !lower_oom_score || !nix::unistd::geteuid().is_root() {
        return;
    }
    if let Err(e) = std::fs::write(
        "/proc/self/oom_score_adj",
        ember_jail::jail::AGENT_OOM_SCORE_ADJ.to_string(),
    ) {
        warn!(
            error = %e,
            "cannot lower this process's OOM score (no CAP_SYS_RESOURCE?); \
             under memory pressure the kernel may kill it before a VMM"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_sandbox_shape() {
        let c = Confiner {
            config: ConfineConfig::default(),
            mountpoint: "/run/ember/agent/jail".into(),
            layout: None,
            parent: "ember/ember".into(),
            disk_device: Some((254, 0)),
        };
        let l = c.limits(2, 512);
        assert_eq!(l.cpu_percent, Some(200));
        assert_eq!(l.memory_bytes, Some((512 + 384) << 20));
        assert_eq!(l.io.unwrap().device, (254, 0));
        assert_eq!(
            c.identity(7),
            Identity {
                uid: 900_000_007,
                gid: 900_000_007
            }
        );
    }

    #[test]
    fn private_dirs_are_made_0700_and_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        private_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err(), "a file is not a directory");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        ember_testkit::require!(ember_testkit::is_root(), "needs root to chown");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("theirs");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(4242), Some(4242)).unwrap();
        let err = private_dir(&d).unwrap_err().to_string();
        assert!(err.contains("owned by uid 4242"), "{err}");
    }
}
