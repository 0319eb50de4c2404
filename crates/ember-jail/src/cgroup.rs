//! One cgroup per sandbox, holding its VMM and page server: CPU quota,
//! memory limit, process count and block-I/O limits, and the usage figures
//! the per-sandbox metrics read back.
//!
//! Hosts come in two layouts and both are supported: pure cgroup v2 (every
//! controller in one hierarchy, most hosts today) and v1/hybrid (each
//! controller its own hierarchy, e.g. `/sys/fs/cgroup/memory`, with an empty
//! v2 hierarchy beside them, as on Ember's CI machines). [`Layout::detect`]
//! finds, per controller, where it is mounted; [`CgroupPlan`] is the
//! directories to make and the files to write, as data (unit-tested without
//! root); [`Cgroup::create`] applies it.
//!
//! Not here: who joins the cgroup (a jailed process joins itself, see
//! [`crate::jail`]) or what the limits are (the host agent decides).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The controllers Ember limits and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Cpu,
    /// v1 only: CPU usage figures (v2 reports them in `cpu.stat`).
    Cpuacct,
    Memory,
    Pids,
    /// `io` in v2, `blkio` in v1.
    Io,
}

impl Controller {
    const ALL: [Controller; 5] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Memory,
        Controller::Pids,
        Controller::Io,
    ];

    fn v1_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Io => "blkio",
        }
    }

    fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Cpu | Controller::Cpuacct => Some("cpu"),
            Controller::Memory => Some("memory"),
            Controller::Pids => Some("pids"),
            Controller::Io => Some("io"),
        }
    }
}

/// Where this host's controllers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One hierarchy, mounted here, with these controllers available.
    V2 {
        root: PathBuf,
        controllers: Vec<Controller>,
    },
    /// A hierarchy per controller.
    V1 {
        mounts: BTreeMap<Controller, PathBuf>,
    },
}

impl Layout {
    /// Read `/proc/self/mountinfo`. A controller enabled in a v2 hierarchy
    /// is used there; the rest come from v1 mounts. `None` when neither
    /// offers memory and CPU (no cgroups to speak of).
    pub fn detect() -> Option<Layout> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let v2_root = mountinfo.lines().find_map(|l| {
            let (fields, rest) = l.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let point = fields.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(point))
        });
        if let Some(root) = &v2_root {
            let available =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let controllers = Layout::v2_controllers(&available);
            if controllers.contains(&Controller::Memory) && controllers.contains(&Controller::Cpu) {
                return Some(Layout::V2 {
                    root: root.clone(),
                    controllers,
                });
            }
        }
        let mounts = Layout::v1_mounts(&mountinfo);
        (mounts.contains_key(&Controller::Memory) && mounts.contains_key(&Controller::Cpu))
            .then_some(Layout::V1 { mounts })
    }

    fn v2_controllers(available: &str) -> Vec<Controller> {
        let names: Vec<&str> = available.split_whitespace().collect();
        Controller::ALL
            .into_iter()
            .filter(|c| c.v2_name().is_some_and(|n| names.contains(&n)))
            .collect()
    }

    /// v1 hierarchies from mountinfo lines (`... - cgroup cgroup rw,memory`).
    fn v1_mounts(mountinfo: &str) -> BTreeMap<Controller, PathBuf> {
        let mut mounts = BTreeMap::new();
        for line in mountinfo.lines() {
            let Some((fields, rest)) = line.split_once(" - ") else {
                continue;
            };
            let mut rest = rest.split_whitespace();
            if rest.next() != Some("cgroup") {
                continue;
            }
            let options = rest.nth(1).unwrap_or("");
            let Some(point) = fields.split_whitespace().nth(4) else {
                continue;
            };
            for c in Controller::ALL {
                if options.split(',').any(|o| o == c.v1_name()) {
                    mounts.entry(c).or_insert_with(|| PathBuf::from(point));
                }
            }
        }
        mounts
    }

    pub fn describe(&self) -> String {
        match self {
            Layout::V2 { root, .. } => format!("cgroup v2 at {}", root.display()),
            Layout::V1 { mounts } => format!(
                "cgroup v1 ({})",
                mounts
                    .keys()
                    .map(|c| c.v1_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// What a sandbox's cgroup allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time per period, in hundredths of a core (100 = one core).
    pub cpu_percent: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u32>,
    pub io: Option<IoLimits>,
}

/// Bandwidth and IOPS ceilings on the block device that holds the disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// `major:minor` of the device.
    pub device: (u32, u32),
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

/// The CFS period quotas are expressed in.
const CPU_PERIOD_US: u64 = 100_000;

/// Directories to make and files to write for one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// Parents first.
    pub dirs: Vec<PathBuf>,
    /// In order (v2: enable controllers in each parent before the child's
    /// limits).
    pub writes: Vec<(PathBuf, String)>,
    /// `cgroup.procs` of each hierarchy, for the jail to join.
    pub procs: Vec<PathBuf>,
    /// The cgroup's directory in each hierarchy, for usage and removal.
    pub leaves: BTreeMap<Controller, PathBuf>,
}

impl CgroupPlan {
    /// The plan for cgroup `parent/name` under `layout` with `limits`.
    /// `parent` is relative (e.g. `ember/agent-1`).
    pub fn new(layout: &Layout, parent: &Path, name: &str, limits: &Limits) -> CgroupPlan {
        let mut plan = CgroupPlan {
            dirs: Vec::new(),
            writes: Vec::new(),
            procs: Vec::new(),
            leaves: BTreeMap::new(),
        };
        let rel = parent.join(name);
        match layout {
            Layout::V2 { root, controllers } => {
                let enable: Vec<String> = controllers
                    .iter()
                    .filter_map(|c| c.v2_name())
                    .fold(Vec::new(), |mut v, n| {
                        if !v.contains(&n) {
                            v.push(n);
                        }
                        v
                    })
                    .into_iter()
                    .map(|n| format!("+{n}"))
                    .collect();
                let enable = enable.join(" ");
                // Controllers must be enabled in every ancestor's
                // subtree_control, from the root down to the parent.
                let mut at = root.clone();
                plan.writes
                    .push((at.join("cgroup.subtree_control"), enable.clone()));
                for part in parent.components() {
                    at = at.join(part);
                    plan.dirs.push(at.clone());
                    plan.writes
                        .push((at.join("cgroup.subtree_control"), enable.clone()));
                }
                let leaf = root.join(&rel);
                plan.dirs.push(leaf.clone());
                if let Some(pct) = limits.cpu_percent {
                    let quota = CPU_PERIOD_US * u64::from(pct) / 100;
                    plan.writes
                        .push((leaf.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}")));
                }
                if let Some(bytes) = limits.memory_bytes {
                    plan.writes
                        .push((leaf.join("memory.max"), bytes.to_string()));
                    plan.writes.push((leaf.join("memory.swap.max"), "0".into()));
                    // One VM is one unit: on OOM, kill all of it, not a thread.
                    plan.writes
                        .push((leaf.join("memory.oom.group"), "1".into()));
                }
                if let Some(pids) = limits.pids {
                    plan.writes.push((leaf.join("pids.max"), pids.to_string()));
                }
                if let Some(io) = &limits.io {
                    let mut line = format!("{}:{}", io.device.0, io.device.1);
                    for (key, v) in [
                        ("rbps", io.read_bps),
                        ("wbps", io.write_bps),
                        ("riops", io.read_iops),
                        ("wiops", io.write_iops),
                    ] {
                        if let Some(v) = v {
                            line.push_str(&format!(" {key}={v}"));
                        }
                    }
                    if controllers.contains(&Controller::Io) {
                        plan.writes.push((leaf.join("io.max"), line));
                    }
                }
                plan.procs.push(leaf.join("cgroup.procs"));
                for c in controllers {
                    plan.leaves.insert(*c, leaf.clone());
                }
            }
            Layout::V1 { mounts } => {
                for (c, mount) in mounts {
                    let mut at = mount.clone();
                    for part in parent.components() {
                        at = at.join(part);
                        if !plan.dirs.contains(&at) {
                            plan.dirs.push(at.clone());
                        }
                    }
                    let leaf = mount.join(&rel);
                    if plan.leaves.values().any(|l| *l == leaf) {
                        // Controllers co-mounted (cpu,cpuacct): one directory.
                        plan.leaves.insert(*c, leaf);
                        continue;
                    }
                    plan.dirs.push(leaf.clone());
                    match c {
                        Controller::Cpu => {
                            if let Some(pct) = limits.cpu_percent {
                                plan.writes.push((
                                    leaf.join("cpu.cfs_period_us"),
                                    CPU_PERIOD_US.to_string(),
                                ));
                                plan.writes.push((
                                    leaf.join("cpu.cfs_quota_us"),
                                    (CPU_PERIOD_US * u64::from(pct) / 100).to_string(),
                                ));
                            }
                        }
                        Controller::Memory => {
                            if let Some(bytes) = limits.memory_bytes {
                                plan.writes
                                    .push((leaf.join("memory.limit_in_bytes"), bytes.to_string()));
                            }
                        }
                        Controller::Pids => {
                            if let Some(pids) = limits.pids {
                                plan.writes.push((leaf.join("pids.max"), pids.to_string()));
                            }
                        }
                        Controller::Io => {
                            if let Some(io) = &limits.io {
                                let dev = format!("{}:{}", io.device.0, io.device.1);
                                for (file, v) in [
                                    ("blkio.throttle.read_bps_device", io.read_bps),
                                    ("blkio.throttle.write_bps_device", io.write_bps),
                                    ("blkio.throttle.read_iops_device", io.read_iops),
                                    ("blkio.throttle.write_iops_device", io.write_iops),
                                ] {
                                    if let Some(v) = v {
                                        plan.writes.push((leaf.join(file), format!("{dev} {v}")));
                                    }
                                }
                            }
                        }
                        Controller::Cpuacct => {}
                    }
                    plan.procs.push(leaf.join("cgroup.procs"));
                    plan.leaves.insert(*c, leaf);
                }
            }
        }
        plan
    }
}

/// A sandbox's cgroup, made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    /// Its directory in each hierarchy (one under v2).
    pub leaves: BTreeMap<String, PathBuf>,
    pub procs: Vec<PathBuf>,
}

/// What a sandbox's processes use, read from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time consumed since the cgroup was made.
    pub cpu_usage: Duration,
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub pids: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

impl Cgroup {
    /// Make the cgroup and set its limits. An existing cgroup of the same
    /// name (left by a crash) is reused and its limits rewritten.
    pub fn create(plan: &CgroupPlan) -> io::Result<Cgroup> {
        for dir in &plan.dirs {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("mkdir {}: {e}", dir.display()),
                    ));
                }
            }
        }
        for (file, value) in &plan.writes {
            if let Err(e) = std::fs::write(file, value) {
                // Optional knobs a kernel may lack (memory.swap.max without
                // swap accounting) are skipped; limits that fail are errors.
                let optional = file
                    .file_name()
                    .is_some_and(|n| n == "memory.swap.max" || n == "memory.oom.group");
                let enabling = file
                    .file_name()
                    .is_some_and(|n| n == "cgroup.subtree_control");
                if optional || (enabling && e.raw_os_error() == Some(libc::EBUSY)) {
                    tracing::debug!(file = %file.display(), error = %e, "cgroup knob skipped");
                    continue;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("write {value:?} to {}: {e}", file.display()),
                ));
            }
        }
        Ok(Cgroup {
            leaves: plan
                .leaves
                .iter()
                .map(|(c, p)| (format!("{c:?}").to_lowercase(), p.clone()))
                .collect(),
            procs: plan.procs.clone(),
        })
    }

    fn leaf(&self, c: Controller) -> Option<&Path> {
        self.leaves
            .get(&format!("{c:?}").to_lowercase())
            .map(PathBuf::as_path)
    }

    /// Current usage; figures a hierarchy does not offer read as zero.
    pub fn usage(&self) -> Usage {
        let read = |c: Controller, file: &str| -> Option<String> {
            std::fs::read_to_string(self.leaf(c)?.join(file)).ok()
        };
        let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
        let mut u = Usage::default();
        let v2 = read(Controller::Cpu, "cpu.stat").filter(|s| s.contains("usage_usec"));
        if let Some(stat) = v2 {
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            u.cpu_usage = Duration::from_micros(usec);
            u.memory_bytes = num(read(Controller::Memory, "memory.current")).unwrap_or(0);
            u.memory_limit_bytes = num(read(Controller::Memory, "memory.max"));
            if let Some(stat) = read(Controller::Io, "io.stat") {
                for field in stat.split_whitespace() {
                    if let Some(v) = field.strip_prefix("rbytes=") {
                        u.io_read_bytes += v.parse::<u64>().unwrap_or(0);
                    } else if let Some(v) = field.strip_prefix("wbytes=") {
                        u.io_write_bytes += v.parse::<u64>().unwrap_or(0);
                    }
                }
            }
        } else {
            let ns = num(read(Controller::Cpuacct, "cpuacct.usage")).unwrap_or(0);
            u.cpu_usage = Duration::from_nanos(ns);
            u.memory_bytes = num(read(Controller::Memory, "memory.usage_in_bytes")).unwrap_or(0);
            u.memory_limit_bytes =
                num(read(Controller::Memory, "memory.limit_in_bytes")).filter(|&l| l < (1 << 62));
            if let Some(stat) = read(Controller::Io, "blkio.throttle.io_service_bytes") {
                for line in stat.lines() {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    if f.len() == 3 {
                        let v = f[2].parse::<u64>().unwrap_or(0);
                        match f[1] {
                            "Read" => u.io_read_bytes += v,
                            "Write" => u.io_write_bytes += v,
                            _ => {}
                        }
                    }
                }
            }
        }
        u.pids = num(read(Controller::Pids, "pids.current")).unwrap_or(0);
        u
    }

    /// Processes still in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for p in &self.procs {
            if let Ok(s) = std::fs::read_to_string(p) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Remove the cgroup's directories. Fails (EBUSY) while processes are
    /// in it: the caller stops them first.
    pub fn remove(&self) -> io::Result<()> {
        let mut first_err = None;
        for leaf in self.leaves.values() {
            match std::fs::remove_dir(leaf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    first_err.get_or_insert(io::Error::new(
                        e.kind(),
                        format!("rmdir {}: {e}", leaf.display()),
                    ));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/cpuacct rw,nosuid - cgroup cgroup rw,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/blkio rw,nosuid - cgroup cgroup rw,blkio
";

    fn limits() -> Limits {
        Limits {
            cpu_percent: Some(150),
            memory_bytes: Some(768 << 20),
            pids: Some(256),
            io: Some(IoLimits {
                device: (254, 0),
                read_bps: Some(100 << 20),
                write_bps: None,
                read_iops: None,
                write_iops: Some(5000),
            }),
        }
    }

    #[test]
    fn v1_mounts_are_found_per_controller() {
        let m = Layout::v1_mounts(HYBRID);
        assert_eq!(m[&Controller::Memory], Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(m[&Controller::Io], Path::new("/sys/fs/cgroup/blkio"));
        assert_eq!(m[&Controller::Cpuacct], Path::new("/sys/fs/cgroup/cpuacct"));
        // Co-mounted controllers share one mount point.
        let co = "32 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let m = Layout::v1_mounts(co);
        assert_eq!(m[&Controller::Cpu], m[&Controller::Cpuacct]);
    }

    #[test]
    fn v1_plan_writes_each_limit_in_its_hierarchy() {
        let layout = Layout::V1 {
            mounts: Layout::v1_mounts(HYBRID),
        };
        let plan = CgroupPlan::new(&layout, Path::new("ember/a1"), "sb-1", &limits());
        let w: BTreeMap<_, _> = plan.writes.iter().cloned().collect();
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/cpu/ember/a1/sb-1/cpu.cfs_quota_us")],
            "150000"
        );
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/memory/ember/a1/sb-1/memory.limit_in_bytes")],
            (768u64 << 20).to_string()
        );
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/pids/ember/a1/sb-1/pids.max")],
            "256"
        );
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/blkio/ember/a1/sb-1/blkio.throttle.read_bps_device")],
            format!("254:0 {}", 100u64 << 20)
        );
        assert!(
            !w.keys()
                .any(|k| k.ends_with("blkio.throttle.write_bps_device")),
            "unset limits are not written"
        );
        // Parents before children, and a procs file per hierarchy.
        let pos = |p: &str| plan.dirs.iter().position(|d| d == Path::new(p)).unwrap();
        assert!(pos("/sys/fs/cgroup/memory/ember") < pos("/sys/fs/cgroup/memory/ember/a1/sb-1"));
        assert_eq!(plan.procs.len(), 5);
    }

    #[test]
    fn v2_plan_enables_controllers_down_the_tree_then_limits() {
        let layout = Layout::V2 {
            root: "/sys/fs/cgroup".into(),
            controllers: Layout::v2_controllers("cpuset cpu io memory hugetlb pids rdma"),
        };
        let plan = CgroupPlan::new(&layout, Path::new("ember"), "sb-1", &limits());
        assert_eq!(
            plan.writes[0],
            (
                PathBuf::from("/sys/fs/cgroup/cgroup.subtree_control"),
                "+cpu +memory +pids +io".to_owned()
            )
        );
        let w: BTreeMap<_, _> = plan.writes.iter().cloned().collect();
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/ember/sb-1/cpu.max")],
            "150000 100000"
        );
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/ember/sb-1/io.max")],
            format!("254:0 rbps={} wiops=5000", 100u64 << 20)
        );
        assert_eq!(
            w[Path::new("/sys/fs/cgroup/ember/sb-1/memory.oom.group")],
            "1"
        );
        assert_eq!(
            plan.procs,
            [PathBuf::from("/sys/fs/cgroup/ember/sb-1/cgroup.procs")]
        );
    }

    #[test]
    fn an_empty_v2_hierarchy_beside_v1_is_not_used() {
        assert!(Layout::v2_controllers("").is_empty());
        assert_eq!(
            Layout::v2_controllers("memory pids"),
            [Controller::Memory, Controller::Pids]
        );
    }
}
