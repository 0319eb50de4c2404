//! One Firecracker VM: the [`Vm`] handle over its process and API.
//!
//! The handle keeps its own view of the VM's state (running or paused) so a
//! snapshot of a running VM is refused before Firecracker is asked. It owns
//! the process: dropping the handle kills it and removes its sockets and
//! mount points, unless it was detached.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::ApiClient;
use super::jailer::{self, Jail};
use super::models::{ActionType, InstanceState, SnapshotCreateParams, SnapshotType, VmState};
use super::process::VmmProcess;
use super::vsock::{self, VsockStream};
use crate::layout::{RunLayout, STABLE_DIR, entry};
use crate::{MemoryDump, Result, SnapshotKind, SnapshotOutput, SnapshotRequest, Vm, VmmError};

/// A running Firecracker VM.
#[derive(Debug)]
pub struct FirecrackerVm {
    vm_id: String,
    layout: RunLayout,
    client: ApiClient,
    process: VmmProcess,
    jail: Option<Jail>,
    /// Runs in a jail (Firecracker's jailer or Ember's own) and so sees
    /// only its run directory: snapshots are written there, then moved.
    confined: bool,
    state: Mutex<InstanceState>,
    detached: bool,
    /// Filled by the VMM's boot or restore (see `Vm::start_phases`).
    pub(crate) start_phases: Vec<(&'static str, Duration)>,
}

impl FirecrackerVm {
    pub(super) fn new(
        launch: &crate::Launch,
        layout: RunLayout,
        client: ApiClient,
        process: VmmProcess,
        jail: Option<Jail>,
    ) -> Self {
        Self {
            vm_id: launch.vm_id.clone(),
            layout,
            client,
            process,
            // A jailed or confined VMM sees its run directory, not the
            // host's paths.
            confined: jail.is_some() || launch.confinement.is_some(),
            jail,
            state: Mutex::new(InstanceState::NotStarted),
            detached: false,
            start_phases: Vec::new(),
        }
    }

    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// The API client, for calls the [`Vm`] trait does not cover (balloon,
    /// metrics, drive updates).
    pub fn client(&self) -> &ApiClient {
        &self.client
    }

    pub fn layout(&self) -> &RunLayout {
        &self.layout
    }

    /// The host side of the VM's hybrid vsock.
    pub fn vsock_socket(&self) -> PathBuf {
        self.layout.host(entry::VSOCK_SOCKET)
    }

    /// Connect to a port the guest listens on over vsock.
    pub async fn dial_vsock(&self, port: u32, timeout: Duration) -> Result<VsockStream> {
        vsock::dial(&self.vsock_socket(), port, timeout).await
    }

    /// The state as this handle last saw it.
    pub fn state(&self) -> InstanceState {
        *self.state.lock().expect("state lock")
    }

    pub(super) fn set_state(&self, state: InstanceState) {
        *self.state.lock().expect("state lock") = state;
    }

    pub(super) fn process(&self) -> &VmmProcess {
        &self.process
    }

    /// The VMM's own log and its stderr, for error messages.
    pub(super) fn log_paths(&self) -> [PathBuf; 2] {
        [
            self.layout.host(entry::STDERR_LOG),
            self.layout.host(entry::VMM_LOG),
        ]
    }

    fn log_tail(&self) -> String {
        let logs = self.log_paths();
        super::process::log_tail(&[&logs[0], &logs[1]])
    }

    /// Turn a failed call on a process that died into "it died", which is
    /// what the caller needs to know.
    fn explain(&self, err: VmmError) -> VmmError {
        match (&err, self.process.exit_status()) {
            (VmmError::Connection { .. } | VmmError::Timeout { .. }, Some(status)) => {
                VmmError::Exited {
                    status,
                    log_tail: self.log_tail(),
                }
            }
            _ => err,
        }
    }

    /// Remove what the exited process left in the run directory, and its jail.
    fn clean_up(&self) {
        if let Err(e) = self.layout.remove_transient() {
            tracing::warn!(vm_id = %self.vm_id, error = %e, "could not remove VMM sockets");
        }
        if let Some(jail) = &self.jail {
            remove_jail(&self.vm_id, jail);
        }
    }

    fn snapshot_targets(&self, request: &SnapshotRequest) -> Result<()> {
        for path in [&request.vmstate, &request.memory] {
            if path.starts_with(STABLE_DIR) {
                return Err(VmmError::Config(format!(
                    "snapshot path {} is inside {STABLE_DIR}, which the VMM sees as its run directory",
                    path.display()
                )));
            }
            if std::fs::symlink_metadata(path).is_ok() {
                // Firecracker would merge a diff into an existing memory file
                // and overwrite anything else.
                return Err(VmmError::Config(format!(
                    "snapshot file {} already exists; choose a new path",
                    path.display()
                )));
            }
            let parent_ok = path
                .parent()
                .is_some_and(|p| p.as_os_str().is_empty() || p.is_dir());
            if !path.is_absolute() || !parent_ok {
                return Err(VmmError::Config(format!(
                    "snapshot path {} must be absolute, in an existing directory",
                    path.display()
                )));
            }
        }
        if request.vmstate == request.memory {
            return Err(VmmError::Config(
                "the vmstate and memory files must differ".into(),
            ));
        }
        Ok(())
    }

    async fn write_snapshot(&self, request: &SnapshotRequest) -> Result<()> {
        let snapshot_type = Some(match request.kind {
            SnapshotKind::Full => SnapshotType::Full,
            SnapshotKind::Diff => SnapshotType::Diff,
        });
        if !self.confined {
            return self
                .client
                .create_snapshot(&SnapshotCreateParams {
                    snapshot_type,
                    snapshot_path: request.vmstate.clone(),
                    mem_file_path: request.memory.clone(),
                })
                .await;
        }
        // Confined: write inside the VMM's view (the run directory), then
        // move out.
        let dir = self.layout.host(entry::SNAPSHOT_DIR);
        let io = |context: String| move |source| VmmError::Io { context, source };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let meta = std::fs::metadata(self.layout.run_dir())
            .map_err(io(format!("reading {}", self.layout.run_dir().display())))?;
        std::os::unix::fs::chown(
            &dir,
            Some(std::os::unix::fs::MetadataExt::uid(&meta)),
            Some(std::os::unix::fs::MetadataExt::gid(&meta)),
        )
        .map_err(io(format!("handing {} to the jail's user", dir.display())))?;
        let inside = |name: &str| Path::new(entry::SNAPSHOT_DIR).join(name);
        let result = self
            .client
            .create_snapshot(&SnapshotCreateParams {
                snapshot_type,
                snapshot_path: RunLayout::vmm(inside("vmstate")),
                mem_file_path: RunLayout::vmm(inside("memory")),
            })
            .await;
        let moved = result.and_then(|()| {
            for (name, to) in [("vmstate", &request.vmstate), ("memory", &request.memory)] {
                let from = self.layout.host(inside(name));
                jailer::move_file(&from, to).map_err(io(format!(
                    "moving {} to {}",
                    from.display(),
                    to.display()
                )))?;
            }
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&dir);
        moved
    }
}

#[async_trait::async_trait]
impl Vm for FirecrackerVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn serial_log(&self) -> PathBuf {
        self.layout.host(entry::SERIAL_LOG)
    }

    async fn pause(&self) -> Result<()> {
        let started = Instant::now();
        self.client
            .patch_vm(VmState::Paused)
            .await
            .map_err(|e| self.explain(e))?;
        self.set_state(InstanceState::Paused);
        tracing::debug!(vm_id = %self.vm_id, took = ?started.elapsed(), "paused");
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let started = Instant::now();
        self.client
            .patch_vm(VmState::Resumed)
            .await
            .map_err(|e| self.explain(e))?;
        self.set_state(InstanceState::Running);
        tracing::debug!(vm_id = %self.vm_id, took = ?started.elapsed(), "resumed");
        Ok(())
    }

    async fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotOutput> {
        let state = self.state();
        if state != InstanceState::Paused {
            return Err(VmmError::InvalidState {
                operation: "snapshot",
                state: state.to_string(),
            });
        }
        self.snapshot_targets(request)?;
        let started = Instant::now();
        if let Err(e) = self.write_snapshot(request).await {
            // Leave nothing half-written behind: these paths did not exist.
            let _ = std::fs::remove_file(&request.vmstate);
            let _ = std::fs::remove_file(&request.memory);
            return Err(self.explain(e));
        }
        tracing::info!(vm_id = %self.vm_id, kind = ?request.kind, took = ?started.elapsed(), "snapshot written");
        Ok(SnapshotOutput {
            vmstate: request.vmstate.clone(),
            memory: match request.kind {
                SnapshotKind::Full => MemoryDump::Full(request.memory.clone()),
                SnapshotKind::Diff => MemoryDump::DirtyOnly(request.memory.clone()),
            },
        })
    }

    async fn shutdown(&self, grace: Duration) -> Result<()> {
        // Only a running guest can react; a paused one is killed at once. The
        // guest may also ignore the request (or have no keyboard controller
        // driver): the kill after the grace period covers that.
        let running =
            self.process.exit_status().is_none() && self.state() == InstanceState::Running;
        let asked = running
            && match self.client.action(ActionType::SendCtrlAltDel).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(vm_id = %self.vm_id, error = %e, "SendCtrlAltDel failed");
                    false
                }
            };
        let grace = if asked { grace } else { Duration::ZERO };
        if self.process.wait_timeout(grace).await.is_none() {
            self.process.kill().map_err(|source| VmmError::Io {
                context: format!("killing VMM process {}", self.process.pid()),
                source,
            })?;
            self.process.wait().await;
        }
        self.clean_up();
        Ok(())
    }

    async fn kill(&self) -> Result<()> {
        self.process.kill().map_err(|source| VmmError::Io {
            context: format!("killing VMM process {}", self.process.pid()),
            source,
        })?;
        self.process.wait().await;
        self.clean_up();
        Ok(())
    }

    fn exit_status(&self) -> Option<String> {
        self.process.exit_status()
    }

    async fn wait(&self) -> String {
        self.process.wait().await
    }

    fn detach(&mut self) {
        self.detached = true;
    }

    fn start_phases(&self) -> Vec<(&'static str, Duration)> {
        self.start_phases.clone()
    }
}

fn remove_jail(vm_id: &str, jail: &Jail) {
    if let Err(e) = jail.remove() {
        tracing::warn!(vm_id, jail = %jail.dir.display(), error = %e, "could not remove jail");
    }
}

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.process.kill() {
            tracing::warn!(vm_id = %self.vm_id, pid = self.process.pid(), error = %e, "could not kill VMM on drop");
        }
        // Sockets and mount points can go now; the jail (and its cgroups,
        // which cannot be removed while the process is in them) once the
        // process is gone.
        if let Err(e) = self.layout.remove_transient() {
            tracing::warn!(vm_id = %self.vm_id, error = %e, "could not remove VMM sockets");
        }
        let Some(jail) = self.jail.take() else {
            return;
        };
        let exited = self.process.exit_watch();
        let vm_id = self.vm_id.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let mut exited = exited;
                    let _ = exited.wait_for(Option::is_some).await;
                    remove_jail(&vm_id, &jail);
                });
            }
            Err(_) => remove_jail(&vm_id, &jail),
        }
    }
}
