//! What a sandbox holds while its VM exists — slot, VMM process, page
//! server, disk layer, RAM file, run directory — and how to let all of it
//! go. Everything is optional so a half-built runtime (a create or resume
//! that failed part-way) tears down exactly what it got.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ember_guest_api::GuestClient;
use ember_net::Slot;
use ember_vmm::{Launch, Vm};
use tracing::{info, warn};

use crate::error::AgentError;

/// How a sandbox's root disk is layered on its build's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskLayer {
    /// A qcow2 overlay over a read-only flat image (QEMU): writes land in
    /// the overlay, so a pause reads exactly the written blocks from it.
    Qcow2 { overlay: PathBuf, base: PathBuf },
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
}

impl PageServer {
    /// Start `ember uffd` for `build` in its own session (it must outlive an
    /// agent restart, like the VM it serves) and wait for its `ready` line.
    pub async fn spawn(
        ember_bin: &Path,
        data_dir: &Path,
        run_dir: &Path,
        build: ember_types::BuildId,
    ) -> Result<PageServer, AgentError> {
        use tokio::io::AsyncBufReadExt;
        let socket = run_dir.join("page-server.sock");
        let control_socket = run_dir.join("page-server.ctl");
        let log = std::fs::File::create(run_dir.join("page-server.log"))
            .map_err(|e| AgentError::io("create page-server.log", e))?;
        let mut cmd = tokio::process::Command::new(ember_bin);
        cmd.arg("uffd")
            .arg("--socket")
            .arg(&socket)
            .arg("--build")
            .arg(build.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--record-working-set")
            .arg("--control-socket")
            .arg(&control_socket)
            .arg("--metrics-file")
            .arg(run_dir.join("page-server.metrics.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
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
                if line.trim() == "ready" {
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

    /// Stop the server; SIGTERM makes it write the working set it recorded.
    pub async fn stop(&self) {
        signal_pid(self.pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(self.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if pid_alive(self.pid) {
            kill_pid(self.pid);
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.control_socket);
    }
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
