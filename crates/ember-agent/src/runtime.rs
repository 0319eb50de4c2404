//! What a sandbox holds while its VM exists — slot, VMM process, page
//! server, disk layer, RAM file, run directory — and how to let all of it
//! go. Everything is optional so a half-built runtime (a create or resume
//! that failed part-way) tears down exactly what it got.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ember_guest_api::GuestClient;
use ember_net::Slot;
use ember_uffd::metrics::MetricsSnapshot;
use ember_vmm::{Launch, Vm};
use tracing::{info, warn};

use crate::error::AgentError;

/// How a sandbox's root disk is layered on its build's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskLayer {
    /// A qcow2 overlay over read-only layers (QEMU): writes land in the
    /// overlay, so a pause reads exactly the written blocks from it.
    /// `below` is the chain under it, top first, each with its format, as
    /// Ember made it: the VMM is given it explicitly, and no header is read.
    Qcow2 {
        overlay: PathBuf,
        below: Vec<ember_vmm::BackingFile>,
    },
    /// A private raw copy (Firecracker, which needs raw files): reflinked
    /// where the file system can, else a sparse copy.
    Raw { path: PathBuf },
}

impl DiskLayer {
    pub fn path(&self) -> &Path {
        match self {
            DiskLayer::Qcow2 { overlay, .. } => overlay,
            DiskLayer::Raw { path } => path,
        }
    }

    /// The format the VMM opens it in.
    pub fn format(&self) -> ember_types::DiskFormat {
        match self {
            DiskLayer::Qcow2 { .. } => ember_types::DiskFormat::Qcow2,
            DiskLayer::Raw { .. } => ember_types::DiskFormat::Raw,
        }
    }
}

/// A userfaultfd page server process (`ember uffd`) serving one VM.
#[derive(Debug)]
pub struct PageServer {
    pub pid: u32,
    pub socket: PathBuf,
    pub control_socket: PathBuf,
    /// Where its counters go when it ends.
    pub totals: Arc<PageServerTotals>,
    /// Where the working set it records goes when it ends: the build it
    /// serves, when that build has none yet (the first restore of a
    /// template records what its forks will prefetch).
    pub file_working_set: Option<PathBuf>,
}

/// What the host's page servers that have ended served (the live ones
/// are asked over their control sockets).
#[derive(Debug, Default)]
pub struct PageServerTotals {
    pub faults: AtomicU64,
    pub pages_prefetched: AtomicU64,
    pub bytes_copied: AtomicU64,
}

impl PageServerTotals {
    pub fn add(&self, m: &MetricsSnapshot) {
        self.faults.fetch_add(m.faults, Ordering::Relaxed);
        self.pages_prefetched
            .fetch_add(m.pages_prefetched, Ordering::Relaxed);
        self.bytes_copied
            .fetch_add(m.bytes_copied, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.faults.load(Ordering::Relaxed),
            self.pages_prefetched.load(Ordering::Relaxed),
            self.bytes_copied.load(Ordering::Relaxed),
        )
    }
}

/// The page server's metrics file in its VM's run directory (written when
/// it ends).
const METRICS_FILE: &str = "page-server.metrics.json";

/// Where a jailed page server sees its VM's run directory and the store.
const PS_RUN: &str = "/run/ember/ps";
const PS_DATA: &str = "/data";
/// The working set the page server reads (to prefetch) and records, in
/// the VM's run directory: a jailed page server cannot write the build.
pub const WORKING_SET: &str = "working-set";

impl PageServer {
    /// Start `ember uffd` for `build` in its own session (it must outlive an
    /// agent restart, like the VM it serves) and wait for its `ready` line.
    /// Confined, it runs as the sandbox's uid in a jail that holds the
    /// `ember` binary, the builds `build`'s memory reads from (read-only)
    /// and the VM's run directory, and joins the sandbox's cgroup.
    pub async fn spawn(
        ember_bin: &Path,
        store: &ember_snapshot::BuildStore,
        run_dir: &Path,
        build: ember_types::BuildId,
        confinement: Option<&ember_jail::Confinement>,
        totals: Arc<PageServerTotals>,
    ) -> Result<PageServer, AgentError> {
        use tokio::io::AsyncBufReadExt;
        let socket = run_dir.join("page-server.sock");
        let control_socket = run_dir.join("page-server.ctl");
        let log = std::fs::File::create(run_dir.join("page-server.log"))
            .map_err(|e| AgentError::io("create page-server.log", e))?;
        // The build's recorded working set, for the server to prefetch and
        // to extend; the agent files it back into the build afterwards.
        let ws = run_dir.join(WORKING_SET);
        let _ = std::fs::copy(store.build_dir(build).join(WORKING_SET), &ws);
        let (program, data_dir, run_inside, jail) = match confinement {
            None => (
                ember_bin.to_path_buf(),
                store
                    .root()
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .to_path_buf(),
                run_dir.to_path_buf(),
                None,
            ),
            Some(c) => {
                let header = store
                    .open_header(build, ember_snapshot::ImageKind::Memory)
                    .map_err(AgentError::Store)?;
                let mut plan = c.plan();
                let program = plan.executable(ember_bin);
                for b in header.referenced_builds().into_iter().chain([build]) {
                    let dir = store.build_dir(b);
                    servable(&dir).map_err(|e| {
                        AgentError::io(format!("open {} to page servers", dir.display()), e)
                    })?;
                    plan.push(ember_jail::jail::JailEntry::Bind {
                        source: store.build_dir(b),
                        path: Path::new(PS_DATA).join("builds").join(b.to_string()),
                        writable: false,
                    });
                }
                plan.push(ember_jail::jail::JailEntry::Bind {
                    source: run_dir.to_path_buf(),
                    path: PS_RUN.into(),
                    writable: true,
                });
                for path in [run_dir, ws.as_path()] {
                    if path.exists() {
                        ember_jail::jail::give(path, c.identity).map_err(|e| {
                            AgentError::io(format!("hand {} to the sandbox", path.display()), e)
                        })?;
                    }
                }
                let jail = plan
                    .prepare()
                    .map_err(|e| AgentError::io("prepare the page server's jail", e))?;
                (program, PS_DATA.into(), PathBuf::from(PS_RUN), Some(jail))
            }
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.arg("uffd")
            .arg("--socket")
            .arg(run_inside.join("page-server.sock"))
            .arg("--build")
            .arg(build.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--record-working-set")
            .arg("--working-set")
            .arg(run_inside.join(WORKING_SET))
            .arg("--control-socket")
            .arg(run_inside.join("page-server.ctl"))
            .arg("--metrics-file")
            .arg(run_inside.join(METRICS_FILE))
            .env_clear()
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches only the child; the
        // jail's `enter` makes system calls only, on data prepared above.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                match &jail {
                    Some(j) => j.enter(),
                    None => Ok(()),
                }
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| AgentError::io(format!("start {} uffd", ember_bin.display()), e))?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                // `ready socket=<path>`
                if line.split_whitespace().next() == Some("ready") {
                    return Ok(true);
                }
            }
            Ok::<bool, std::io::Error>(false)
        })
        .await;
        // The child is reaped by a detached task so it never lingers as a
        // zombie while this agent lives; after an agent restart, init reaps it.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        match ready {
            Ok(Ok(true)) => Ok(PageServer {
                pid,
                socket,
                control_socket,
                totals,
                file_working_set: Some(store.build_dir(build).join(WORKING_SET))
                    .filter(|p| !p.exists()),
            }),
            other => {
                kill_pid(pid);
                let tail = tail_of(&run_dir.join("page-server.log"));
                Err(AgentError::PageServer(format!(
                    "page server for build {build} did not become ready ({}): {tail}",
                    match other {
                        Err(_) => "timed out".to_owned(),
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(_)) => "exited".to_owned(),
                    }
                )))
            }
        }
    }

    /// What a page server has served so far, asked over its control socket
    /// at `path` (`None` if it does not answer within a second). Takes the
    /// path, not the server, so no lock is held while it answers.
    pub async fn metrics_at(path: PathBuf) -> Option<MetricsSnapshot> {
        tokio::task::spawn_blocking(move || {
            let mut client = ember_uffd::control::ControlClient::connect_with_timeout(
                &path,
                Duration::from_secs(1),
            )
            .ok()?;
            let mut answer = client
                .request(&ember_uffd::control::Request::Metrics)
                .ok()?;
            serde_json::from_value(answer.get_mut("metrics")?.take()).ok()
        })
        .await
        .ok()
        .flatten()
    }

    /// Stop the server; SIGTERM makes it write the working set it recorded
    /// and its metrics, which go into the host's totals.
    pub async fn stop(&self) {
        signal_pid(self.pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(self.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if pid_alive(self.pid) {
            kill_pid(self.pid);
        }
        if let Some(dir) = self.socket.parent()
            && let Ok(bytes) = read_untrusted(&dir.join(METRICS_FILE), 1 << 20)
            && let Ok(m) = serde_json::from_slice::<MetricsSnapshot>(&bytes)
        {
            self.totals.add(&m);
        }
        if let Some(to) = &self.file_working_set
            && !to.exists()
        {
            self.file_working_set_into(to);
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.control_socket);
    }
}

/// Wait until a line holding `text` is in the serial log at `path` (the
/// file grows as the guest writes); false at `deadline`.
pub async fn wait_for_serial(path: &Path, text: &str, deadline: Instant) -> bool {
    let mut seen = 0usize;
    let mut pending = String::new();
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && bytes.len() > seen
        {
            pending.push_str(&String::from_utf8_lossy(&bytes[seen..]));
            seen = bytes.len();
            if pending.lines().any(|l| l.contains(text)) {
                return true;
            }
            // Keep only the unfinished last line.
            if let Some(end) = pending.rfind('\n') {
                pending.drain(..=end);
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Let a confined VMM and page server (another uid) read a build's VM
/// state and memory: the agent makes everything private to itself (umask
/// 077), and the data directory above stays 0700, so only what a jail binds
/// in is reachable.
pub fn servable(build_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(build_dir, std::fs::Permissions::from_mode(0o711))?;
    for entry in std::fs::read_dir(build_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name.starts_with("memfile") || name == "vmstate") && entry.file_type()?.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

impl PageServer {
    /// Copy the working set this (stopped) server recorded to `to`, a
    /// build's `working-set`, atomically; the next restore of that build
    /// prefetches it. Best effort: without it a restore is only lazier.
    pub fn file_working_set_into(&self, to: &Path) {
        let Some(from) = self.socket.parent().map(|d| d.join(WORKING_SET)) else {
            return;
        };
        if !from.is_file() {
            return;
        }
        let tmp = to.with_extension("tmp");
        let filed = read_untrusted(&from, WORKING_SET_MAX)
            .and_then(|bytes| {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, to));
        match filed {
            Ok(()) => info!(working_set = %to.display(), "working set filed for the next restore"),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                warn!(working_set = %to.display(), error = %e, "working set not filed");
            }
        }
    }
}

/// Largest working set filed into a build (a 64 GiB guest's every page,
/// as ranges, is far less).
const WORKING_SET_MAX: u64 = 64 << 20;

/// Read a file a confined process wrote, in a directory its uid owns: it
/// may have swapped the file for a link to a host file, or made it huge.
/// Links are not followed, only regular files are read, and at most `max`
/// bytes (more is an error).
fn read_untrusted(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // A zombie still answers kill(0); read its state to tell.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal_pid(pid: u32, sig: nix::sys::signal::Signal) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

pub fn kill_pid(pid: u32) {
    signal_pid(pid, nix::sys::signal::Signal::SIGKILL);
}

pub fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// A sandbox's VM and everything it holds.
#[derive(Debug, Default)]
pub struct Runtime {
    pub slot: Option<Slot>,
    pub vm: Option<Box<dyn Vm>>,
    pub launch: Option<Launch>,
    pub page_server: Option<PageServer>,
    pub disk: Option<DiskLayer>,
    /// QEMU's RAM file.
    pub memory_file: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub guest: Option<GuestClient>,
    /// The sandbox's cgroup (its VMM and page server are in it).
    pub cgroup: Option<ember_jail::cgroup::Cgroup>,
}

impl Runtime {
    /// Let everything go: the VMM first (nothing may still use the disk or
    /// the namespace), then the page server, slot, disk layer, RAM file and
    /// run directory. Keeps going past failures and reports them.
    pub async fn teardown(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(vm) = self.vm.take()
            && let Err(e) = vm.kill().await
        {
            problems.push(format!("kill VMM: {e}"));
        }
        if let Some(ps) = self.page_server.take() {
            ps.stop().await;
        }
        if let Some(slot) = self.slot.take() {
            let index = slot.index();
            match tokio::task::spawn_blocking(move || slot.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(format!("release network slot {index}: {e}")),
                Err(e) => problems.push(format!("release network slot {index}: {e}")),
            }
        }
        if let Some(disk) = self.disk.take() {
            remove_file(disk.path(), &mut problems);
        }
        if let Some(mem) = self.memory_file.take() {
            remove_file(&mem, &mut problems);
        }
        if let Some(dir) = self.run_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove {}: {e}", dir.display()));
        }
        if let Some(cgroup) = self.cgroup.take()
            && let Err(e) = crate::confine::remove_cgroup(&cgroup).await
        {
            problems.push(format!("remove cgroup: {e}"));
        }
        if problems.is_empty() {
            info!("sandbox resources released");
        } else {
            warn!(?problems, "sandbox resources released with problems");
        }
        problems
    }

    /// Hand the VM, page server and slot over to whoever starts next (the
    /// agent is shutting down but sandboxes keep running).
    pub fn detach(mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.detach();
        }
        if let Some(slot) = self.slot.take() {
            slot.detach();
        }
    }
}

fn remove_file(path: &Path, problems: &mut Vec<String>) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("remove {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_files_are_read_bounded_and_never_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host-secret");
        std::fs::write(&host, b"secret").unwrap();
        let planted = dir.path().join("page-server.metrics.json");
        std::os::unix::fs::symlink(&host, &planted).unwrap();
        assert!(
            read_untrusted(&planted, 1 << 20).is_err(),
            "a link planted by the page server is not followed"
        );
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(
            read_untrusted(&fifo, 1 << 20).is_err(),
            "only regular files"
        );
        let big = dir.path().join("working-set");
        std::fs::write(&big, vec![0u8; 4097]).unwrap();
        assert!(read_untrusted(&big, 4096).is_err(), "bounded");
        assert_eq!(read_untrusted(&big, 4097).unwrap().len(), 4097);
    }
}
