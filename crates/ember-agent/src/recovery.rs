//! What a starting agent does with what the previous one left: re-adopt
//! VMs that still run, fail the ones that died, finish or undo operations
//! a crash interrupted, and reclaim stale sockets, namespaces, processes
//! and files.
//!
//! Order matters: slots of VMs being adopted are re-taken before stale
//! slots are reclaimed (a free lock means "abandoned" to the slot pool).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use ember_guest_api::GuestClient;
use ember_types::SandboxId;
use tracing::{debug, info, warn};

use crate::agent::{Agent, blocking};
use crate::error::{AgentError, chain};
use crate::runtime::{PageServer, Runtime, kill_pid, pid_alive};
use crate::state::{RuntimeRecord, SandboxRecord, SandboxState};

/// What became of one sandbox.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Adopted,
    Kept,
    /// A pause whose build was committed, finished: the sandbox is paused.
    Finished,
    Failed(String),
    Reverted,
    Destroyed,
}

pub async fn recover(agent: &Agent) -> Result<(), AgentError> {
    let inner = agent.inner();
    let mut adopted_slots = HashSet::new();
    let mut live_vms = HashSet::new();
    for loaded in inner.records.load_all()? {
        let record = match loaded {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %chain(&e), "unreadable sandbox record left for an operator");
                continue;
            }
        };
        let id = record.id.clone();
        let outcome = recover_one(agent, record, &mut adopted_slots).await;
        match &outcome {
            Ok(Outcome::Adopted) => {
                live_vms.insert(id.to_string());
            }
            Ok(o) => info!(sandbox = %id, outcome = ?o, "recovered"),
            Err(e) => warn!(sandbox = %id, error = %chain(e), "recovery failed"),
        }
    }
    reclaim(agent, &live_vms).await;
    Ok(())
}

async fn recover_one(
    agent: &Agent,
    record: SandboxRecord,
    adopted_slots: &mut HashSet<u32>,
) -> Result<Outcome, AgentError> {
    let id = record.id.clone();
    match record.state {
        SandboxState::Paused | SandboxState::Failed => {
            let entry = agent.insert_entry(record, None);
            let rec = entry.record();
            if rec.state == SandboxState::Paused
                && !rec.build.is_some_and(|b| agent.inner().store.exists(b))
            {
                agent
                    .fail(
                        &entry,
                        "paused, but its build is missing from this host".into(),
                    )
                    .await?;
                return Ok(Outcome::Failed("build missing".into()));
            }
            Ok(Outcome::Kept)
        }
        SandboxState::Destroying | SandboxState::Destroyed => {
            if let Some(rt) = &record.runtime {
                kill_leftovers(rt);
            }
            agent.inner().records.remove(&id)?;
            Ok(Outcome::Destroyed)
        }
        SandboxState::Resuming if record.runtime.is_none() => {
            // The crash came before the VM was recorded: the build is intact,
            // so the sandbox is paused again; leftovers are reclaimed below.
            let mut r = record;
            r.state = SandboxState::Paused;
            r.failure_reason = Some("the host agent restarted during a resume".into());
            agent.inner().records.save(&r)?;
            agent.insert_entry(r, None);
            Ok(Outcome::Reverted)
        }
        SandboxState::Pausing
            if record
                .pending_build
                .is_some_and(|b| agent.inner().store.exists(b)) =>
        {
            // The pause's build was committed before the crash: it holds the
            // paused VM's whole state, so the pause is finished, not undone.
            if let Some(rt) = &record.runtime {
                kill_leftovers(rt);
            }
            let mut r = record;
            r.state = SandboxState::Paused;
            r.build = r.pending_build.take();
            r.runtime = None;
            agent.inner().records.save(&r)?;
            agent.insert_entry(r, None);
            Ok(Outcome::Finished)
        }
        SandboxState::Creating
        | SandboxState::Running
        | SandboxState::Pausing
        | SandboxState::Resuming
        | SandboxState::Snapshotting => {
            // A build the crash left uncommitted is gone (the store removes
            // half-written builds); a committed snapshot that no template
            // names yet is discarded: its caller saw the call fail. Either
            // way the VM goes on running, and gc reclaims the build.
            let mut record = record;
            if let Some(b) = record.pending_build.take() {
                info!(sandbox = %id, build = %b, "discarding a build the restart interrupted");
                agent.inner().records.save(&record)?;
            }
            let Some(rt_record) = record.runtime.clone() else {
                let entry = agent.insert_entry(record, None);
                agent
                    .fail(
                        &entry,
                        "the host agent restarted before the VM was started".into(),
                    )
                    .await?;
                return Ok(Outcome::Failed("no VM recorded".into()));
            };
            match adopt(agent, &record, &rt_record).await {
                Ok(rt) => {
                    adopted_slots.insert(rt_record.slot);
                    agent.reserve_unchecked(record.vcpus, record.memory_mib);
                    let entry = agent.insert_entry(record, Some(rt));
                    agent.update(&entry, |r| r.state = SandboxState::Running)?;
                    info!(sandbox = %id, pid = rt_record.vmm_pid, "VM re-adopted");
                    Ok(Outcome::Adopted)
                }
                Err(e) => {
                    kill_leftovers(&rt_record);
                    let reason = format!(
                        "the VM did not survive the host agent's restart: {}",
                        chain(&e)
                    );
                    let entry = agent.insert_entry(record, None);
                    agent.fail(&entry, reason.clone()).await?;
                    Ok(Outcome::Failed(reason))
                }
            }
        }
    }
}

/// Take back a running VM: its slot, its VMM process, its page server and
/// its guest agent.
async fn adopt(
    agent: &Agent,
    record: &SandboxRecord,
    rt_record: &RuntimeRecord,
) -> Result<Runtime, AgentError> {
    let inner = agent.inner();
    if !pid_alive(rt_record.vmm_pid) {
        return Err(AgentError::InvalidArgument(format!(
            "VMM process {} is gone",
            rt_record.vmm_pid
        )));
    }
    let mut rt = Runtime {
        run_dir: Some(rt_record.launch.run_dir.clone()),
        memory_file: rt_record.launch.memory_file.clone(),
        launch: Some(rt_record.launch.clone()),
        cgroup: rt_record.cgroup.clone(),
        ..Runtime::default()
    };
    let pool = inner.slots.clone();
    let (index, policy) = (rt_record.slot, record.network.clone());
    let slot = blocking(move || pool.adopt(index, policy).map_err(AgentError::Net)).await?;
    let guest_addr = slot.agent_addr();
    rt.slot = Some(slot);
    let vm = inner
        .backend
        .vmm
        .adopt(&rt_record.launch, rt_record.vmm_pid)
        .await
        .map_err(|e| AgentError::operation(&record.id, "adopt", e))?;
    rt.vm = Some(vm);
    if let Some(pid) = rt_record.page_server_pid {
        let run_dir = &rt_record.launch.run_dir;
        rt.page_server = Some(PageServer {
            pid,
            socket: run_dir.join("page-server.sock"),
            control_socket: run_dir.join("page-server.ctl"),
            totals: inner.metrics.page_servers.clone(),
            file_working_set: None,
        });
    }
    rt.disk = disk_layer_of(&rt_record.launch);
    let guest = GuestClient::new(guest_addr).with_token(record.guest_token.clone());
    // The guest must answer: a VM that runs but whose agent is gone is not
    // a sandbox anyone can use. An interrupted pause or snapshot may have
    // left the vCPUs stopped (or the VMM still writing its state, when it
    // refuses to continue), so those are continued until the guest answers;
    // the sandbox goes on running either way.
    let interrupted = matches!(
        record.state,
        SandboxState::Pausing | SandboxState::Snapshotting
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    if inner.config.guest_readiness != crate::config::GuestReadiness::Agent {
        // A test guest has no agent to ask: a live VMM, continued, is all.
        if interrupted && let Some(vm) = &rt.vm {
            let _ = vm.resume().await;
        }
        return Ok(rt);
    }
    let ready = loop {
        if interrupted
            && let Some(vm) = &rt.vm
            && let Err(e) = vm.resume().await
        {
            debug!(sandbox = %record.id, error = %e, "continuing the VM after an interrupted pause");
        }
        let attempt = (Instant::now() + Duration::from_secs(5)).min(deadline);
        match guest.wait_ready(attempt).await {
            Ok(_) => break Ok(()),
            Err(e) if Instant::now() >= deadline => break Err(e),
            Err(_) => continue,
        }
    };
    match ready {
        Ok(()) => rt.guest = Some(guest),
        Err(e) => {
            // Give back what we took without killing the VM twice.
            let vm = rt.vm.take();
            rt.teardown().await;
            if let Some(vm) = vm {
                let _ = vm.kill().await;
            }
            return Err(AgentError::Guest {
                id: record.id.clone(),
                source: e,
            });
        }
    }
    Ok(rt)
}

fn disk_layer_of(launch: &ember_vmm::Launch) -> Option<crate::runtime::DiskLayer> {
    let root = launch.config.drives.iter().find(|d| d.root)?;
    let path = root.host_path.clone();
    Some(if root.format == ember_types::DiskFormat::Qcow2 {
        crate::runtime::DiskLayer::Qcow2 {
            overlay: path,
            below: root.backing.clone(),
        }
    } else {
        crate::runtime::DiskLayer::Raw { path }
    })
}

/// Kill what a recorded runtime may still have running.
fn kill_leftovers(rt: &RuntimeRecord) {
    for pid in [Some(rt.vmm_pid), rt.page_server_pid].into_iter().flatten() {
        if pid_alive(pid) && process_mentions(pid, &rt.launch.vm_id, &rt.launch.run_dir) {
            kill_pid(pid);
        }
    }
}

/// Is `pid` still the process we think it is (not a recycled pid)?
fn process_mentions(pid: u32, vm_id: &str, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(vm_id) || cmdline.contains(&*run_dir.to_string_lossy())
}

/// Sweep what no sandbox owns: run directories, RAM files, disk layers,
/// VMM and page-server processes, network slots, half-written builds.
async fn reclaim(agent: &Agent, live_vms: &HashSet<String>) {
    let inner = agent.inner();
    let known: HashSet<String> = agent.list().iter().map(|r| r.id.to_string()).collect();
    // Processes first: a VMM of an unknown or dead sandbox still holds its
    // namespace and files. Confined ones are found by their cgroups (their
    // command lines name only paths inside their jails).
    inner.confiner.reclaim(live_vms);
    let vms_dir = inner.config.run_dir.join("vms");
    if let Ok(entries) = std::fs::read_dir(&vms_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if live_vms.contains(&name) {
                continue;
            }
            for pid in processes_mentioning(&e.path()) {
                warn!(pid, vm = %name, "killing a process left from a sandbox no longer running");
                kill_pid(pid);
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    if let Ok(entries) = std::fs::read_dir(&inner.config.memory_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name.strip_suffix(".ram").unwrap_or(&name);
            if owner.starts_with("sb-") && !live_vms.contains(owner) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Sandbox directories of records that no longer exist (destroyed while
    // the agent was down), and disk layers of sandboxes without a VM.
    let sandboxes_dir = inner.config.data_dir.join("sandboxes");
    if let Ok(entries) = std::fs::read_dir(&sandboxes_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                if e.path().join("state.json").exists() {
                    continue; // unreadable record: left for an operator
                }
                let _ = std::fs::remove_dir_all(e.path());
            } else if !live_vms.contains(&name) {
                for f in ["disk.qcow2", "disk.raw"] {
                    let _ = std::fs::remove_file(e.path().join(f));
                }
                let _ = std::fs::remove_dir_all(e.path().join("snapshot.tmp"));
            }
        }
    }
    let pool = inner.slots.clone();
    match blocking(move || pool.reclaim_stale().map_err(AgentError::Net)).await {
        Ok(n) if n > 0 => info!(slots = n, "stale network slots reclaimed"),
        Ok(_) => {}
        Err(e) => warn!(error = %chain(&e), "reclaiming network slots failed"),
    }
    let store = inner.store.clone();
    match blocking(move || store.recover().map_err(AgentError::Store)).await {
        Ok(removed) if !removed.is_empty() => info!(?removed, "half-written builds removed"),
        Ok(_) => {}
        Err(e) => warn!(error = %chain(&e), "build store recovery failed"),
    }
    agent.collect_garbage().await;
}

/// Processes whose command line names `path` (a VM's run directory) or the
/// VM's id (its directory name; Firecracker sees only stable paths): its
/// VMM and page server.
fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let id = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| needle.clone());
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            let mentions = cmdline.contains(&needle)
                || cmdline
                    .split('\0')
                    .any(|arg| arg == id || arg.ends_with(&format!("={id}")));
            mentions.then_some(pid)
        })
        .collect()
}

#[allow(dead_code)]
fn _types(_: SandboxId) {}
