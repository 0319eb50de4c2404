//! One running QEMU VM: pause, resume, snapshot, incoming restore, shutdown.
//!
//! A snapshot is the migration stream of a paused VM written to a file whose
//! descriptor is handed to QEMU with `getfd`. Guest RAM is not in that stream:
//! it lives in the `share=on` memory file, and the `x-ignore-shared`
//! capability tells QEMU to skip it, so the stream holds only device and vCPU
//! state (tens of KiB) and a snapshot takes milliseconds. A restore starts
//! the same machine over a copy of that memory file with `-incoming defer`,
//! feeds the stream back with `migrate-incoming`, and waits for completion.
//!
//! Every wait has a deadline and also watches the process, so a QEMU that
//! dies (a corrupt stream makes QEMU 7.2 exit) surfaces as
//! [`VmmError::Exited`] with its log tail rather than as a hang or a bare
//! socket error.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::RunPaths;
use super::process::{Process, log_tail};
use super::qmp::{
    CapabilityState, CloseFd, Command, Cont, Event, Migrate, MigrateIncoming,
    MigrateSetCapabilities, MigrateSetParameters, MigrationCapability, MigrationStatus, Qmp,
    QmpError, QmpEvent, QueryMigrate, QueryStatus, Quit, RunState, Stop, SystemPowerdown,
};
use crate::{MemoryDump, Result, SnapshotKind, SnapshotOutput, SnapshotRequest, Vm, VmmError};

/// Lines of QEMU's log quoted in [`VmmError::Exited`].
const LOG_TAIL_LINES: usize = 12;

/// Device state is small; an uncapped stream finishes in milliseconds.
const MAX_BANDWIDTH: u64 = 1 << 40;

/// How long a killed QEMU gets to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub command: Duration,
    pub migration: Duration,
}

/// A QEMU VM started, restored or adopted by [`super::Qemu`].
#[derive(Debug)]
pub struct QemuVm {
    vm_id: String,
    paths: RunPaths,
    /// The guest RAM file: what a snapshot returns as its memory.
    memory_file: PathBuf,
    /// False for a private (copy-on-write) restore: guest memory is then in
    /// no file and cannot be snapshotted.
    memory_shared: bool,
    process: Process,
    qmp: Qmp,
    timeouts: Timeouts,
    detached: bool,
    /// Filled by the VMM's boot or restore (see `Vm::start_phases`).
    pub(crate) start_phases: Vec<(&'static str, Duration)>,
    fd_names: AtomicU64,
}

impl QemuVm {
    pub(super) fn new(
        vm_id: String,
        paths: RunPaths,
        memory_file: PathBuf,
        memory_shared: bool,
        process: Process,
        qmp: Qmp,
        timeouts: Timeouts,
    ) -> QemuVm {
        QemuVm {
            vm_id,
            paths,
            memory_file,
            memory_shared,
            process,
            qmp,
            timeouts,
            detached: false,
            start_phases: Vec::new(),
            fd_names: AtomicU64::new(0),
        }
    }

    /// The QMP connection, for commands this type does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The guest RAM file.
    pub fn memory_file(&self) -> &Path {
        &self.memory_file
    }

    /// QEMU's run state.
    pub async fn run_state(&self) -> Result<RunState> {
        Ok(self.run(&QueryStatus).await?.status)
    }

    /// Run a command; if it failed because QEMU died, say so with its log.
    async fn run<C: Command>(&self, command: &C) -> Result<C::Response> {
        match self.qmp.execute(command).await {
            Ok(response) => Ok(response),
            Err(e) => Err(self.explain(e).await),
        }
    }

    async fn explain(&self, error: QmpError) -> VmmError {
        let grace = match error {
            QmpError::Refused { .. } => return error.into(),
            QmpError::Timeout { .. } => Duration::ZERO,
            // A dropped or garbled connection usually means a dying QEMU;
            // give it a moment to be reaped so the error can say why.
            QmpError::Connection { .. } | QmpError::Protocol { .. } => Duration::from_secs(1),
        };
        match self.process.wait_timeout(grace).await {
            Some(status) => self.exited(status),
            None => error.into(),
        }
    }

    fn exited(&self, status: String) -> VmmError {
        VmmError::Exited {
            status,
            log_tail: log_tail(&self.paths.log, LOG_TAIL_LINES),
        }
    }

    fn fd_name(&self, purpose: &str) -> String {
        format!("{purpose}{}", self.fd_names.fetch_add(1, Ordering::Relaxed))
    }

    /// Skip shared RAM in the stream, report state changes as events, and
    /// lift the bandwidth cap. Both ends of a snapshot need the same
    /// capabilities.
    async fn configure_migration(&self) -> Result<()> {
        let capabilities = [
            MigrationCapability::XIgnoreShared,
            MigrationCapability::Events,
        ]
        .into_iter()
        .map(|capability| CapabilityState {
            capability,
            state: true,
        })
        .collect();
        self.run(&MigrateSetCapabilities { capabilities }).await?;
        self.run(&MigrateSetParameters {
            max_bandwidth: Some(MAX_BANDWIDTH),
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    /// Wait for the migration started after `events` was subscribed to end.
    async fn wait_migration(
        &self,
        events: &mut broadcast::Receiver<QmpEvent>,
        call: &str,
    ) -> Result<()> {
        let limit = self.timeouts.migration;
        let deadline = tokio::time::Instant::now() + limit;
        // Events are the fast path; polling covers a lagged subscriber.
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        poll.tick().await;
        let finished = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(QmpEvent { event: Event::Migration(status), .. }) if status.is_final() => {
                        break status;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The client is gone only when QEMU's socket is; the
                    // process branch reports that.
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = poll.tick() => {
                    let info = self.run(&QueryMigrate).await?;
                    if let Some(status) = info.status.filter(|s| s.is_final()) {
                        break status;
                    }
                }
                status = self.process.wait() => return Err(self.exited(status)),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(VmmError::Timeout { call: call.to_owned(), after: limit });
                }
            }
        };
        if finished == MigrationStatus::Completed {
            return Ok(());
        }
        let detail = match self.qmp.execute(&QueryMigrate).await {
            Ok(info) => info.error_desc,
            Err(_) => None,
        };
        // An incoming migration that fails makes QEMU exit; its log says why.
        if let Some(status) = self.process.wait_timeout(Duration::from_secs(1)).await {
            return Err(self.exited(status));
        }
        Err(VmmError::Refused {
            call: call.to_owned(),
            message: format!(
                "migration {}: {}",
                if finished == MigrationStatus::Failed {
                    "failed"
                } else {
                    "cancelled"
                },
                detail.unwrap_or_else(|| "QEMU gave no reason".into())
            ),
        })
    }

    /// Load device state from `vmstate` into a VM started with
    /// `-incoming defer`, leaving it paused.
    pub(super) async fn load_incoming(&self, vmstate: &File) -> Result<()> {
        self.configure_migration().await?;
        let mut events = self.qmp.subscribe();
        let fdname = self.fd_name("incoming");
        if let Err(e) = self.qmp.send_fd(&fdname, vmstate.as_fd()).await {
            return Err(self.explain(e).await);
        }
        if let Err(e) = self
            .run(&MigrateIncoming {
                uri: format!("fd:{fdname}"),
            })
            .await
        {
            let _ = self.qmp.execute(&CloseFd { fdname }).await;
            return Err(e);
        }
        self.wait_migration(&mut events, "restore").await
    }

    fn remove_sockets(&self) {
        match std::fs::remove_file(&self.paths.qmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.paths.qmp.display(), error = %e, "cannot remove QMP socket")
            }
        }
        let _ = crate::layout::RunLayout::new(&self.paths.run_dir).remove_transient();
    }

    async fn kill_and_wait(&self) -> Result<String> {
        self.process.kill().map_err(|source| VmmError::Io {
            context: format!("killing QEMU (pid {})", self.process.pid()),
            source,
        })?;
        match self.process.wait_timeout(KILL_WAIT).await {
            Some(status) => Ok(status),
            None => Err(VmmError::Timeout {
                call: "kill".into(),
                after: KILL_WAIT,
            }),
        }
    }
}

#[async_trait::async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn serial_log(&self) -> PathBuf {
        self.paths.serial.clone()
    }

    async fn pause(&self) -> Result<()> {
        self.run(&Stop).await?;
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.run(&Cont).await?;
        Ok(())
    }

    /// Writes device state to `request.vmstate` and returns the RAM file as
    /// the memory (`request.memory` is not written). The RAM file is all of
    /// guest memory for `Full` and `Diff` requests alike; it stays a valid
    /// snapshot only while the VM stays paused. A second snapshot without a
    /// resume in between lets the guest run for an instant first (QEMU will
    /// not migrate a VM twice from one pause).
    async fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotOutput> {
        if !self.memory_shared {
            return Err(VmmError::Unsupported(
                "snapshotting a QEMU VM restored with a private memory mapping",
            ));
        }
        let state = self.run(&QueryStatus).await?.status;
        if !matches!(state, RunState::Paused | RunState::Postmigrate) {
            return Err(VmmError::InvalidState {
                operation: "snapshot",
                state: state.to_string(),
            });
        }
        if state == RunState::Postmigrate {
            // Paused by an earlier snapshot: QEMU refuses to migrate again
            // ("paused due to previous migration") until the VM has run, so
            // it runs for an instant and the new snapshot is of that state.
            tracing::debug!(vm_id = %self.vm_id, "resuming briefly to allow another snapshot");
            self.run(&Cont).await?;
            self.run(&Stop).await?;
        }
        if request.kind == SnapshotKind::Diff {
            tracing::debug!(vm_id = %self.vm_id, "QEMU has no diff snapshots; returning the full RAM file");
        }
        let started = Instant::now();
        self.configure_migration().await?;
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&request.vmstate)
                .map_err(|source| VmmError::Io {
                    context: format!("creating {}", request.vmstate.display()),
                    source,
                })?
        };
        let written = async {
            let mut events = self.qmp.subscribe();
            let fdname = self.fd_name("vmstate");
            if let Err(e) = self.qmp.send_fd(&fdname, file.as_fd()).await {
                return Err(self.explain(e).await);
            }
            if let Err(e) = self
                .run(&Migrate {
                    uri: format!("fd:{fdname}"),
                })
                .await
            {
                let _ = self.qmp.execute(&CloseFd { fdname }).await;
                return Err(e);
            }
            if let Err(e) = self.wait_migration(&mut events, "snapshot").await {
                if matches!(e, VmmError::Timeout { .. }) {
                    let _ = self
                        .qmp
                        .execute_raw("migrate_cancel", None, self.timeouts.command)
                        .await;
                }
                return Err(e);
            }
            file.sync_all().map_err(|source| VmmError::Io {
                context: format!("syncing {}", request.vmstate.display()),
                source,
            })
        }
        .await;
        if let Err(e) = written {
            // A half-written state file must never pass for a snapshot.
            let _ = std::fs::remove_file(&request.vmstate);
            return Err(e);
        }
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        tracing::info!(
            vm_id = %self.vm_id,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            vmstate_bytes = bytes,
            "snapshot written"
        );
        Ok(SnapshotOutput {
            vmstate: request.vmstate.clone(),
            memory: MemoryDump::Full(self.memory_file.clone()),
        })
    }

    async fn shutdown(&self, grace: Duration) -> Result<()> {
        if self.process.exit_status().is_none() {
            // Without acpid the guest may ignore the button: then quit, then kill.
            if self.qmp.execute(&SystemPowerdown).await.is_ok()
                && self.process.wait_timeout(grace).await.is_some()
            {
                self.remove_sockets();
                return Ok(());
            }
            let _ = self.qmp.execute(&Quit).await;
            if self
                .process
                .wait_timeout(Duration::from_secs(2))
                .await
                .is_none()
            {
                self.kill_and_wait().await?;
            }
        }
        self.remove_sockets();
        Ok(())
    }

    async fn kill(&self) -> Result<()> {
        let result = self.kill_and_wait().await;
        self.remove_sockets();
        result.map(|_| ())
    }

    fn exit_status(&self) -> Option<String> {
        self.process.exit_status()
    }

    async fn wait(&self) -> String {
        let status = self.process.wait().await;
        if !self.detached {
            self.remove_sockets();
        }
        status
    }

    fn detach(&mut self) {
        self.detached = true;
    }

    fn start_phases(&self) -> Vec<(&'static str, Duration)> {
        self.start_phases.clone()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if self.process.exit_status().is_none()
            && let Err(e) = self.process.kill()
        {
            tracing::warn!(vm_id = %self.vm_id, pid = self.process.pid(), error = %e, "cannot kill QEMU");
        }
        self.remove_sockets();
    }
}
