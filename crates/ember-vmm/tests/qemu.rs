//! The QEMU backend against real QEMU and a real Linux guest (TCG here).
//!
//! Needs `qemu-system-x86_64`, a static busybox and `EMBER_TEST_KERNEL` (an
//! uncompressed vmlinux); each test skips with the reason when one is
//! missing. The network-namespace test also needs root. Every test ends by
//! checking that no QEMU process and no socket is left behind.

mod linux_guest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_vmm::qemu::qmp::QmpError;
use ember_vmm::qemu::{Accel, Qemu, QemuConfig, QemuVm, RestoreMemory};
use ember_vmm::{
    DiskFormat, DriveSpec, MemoryBackend, MemoryDump, NetSpec, RestoreSpec, SnapshotKind,
    SnapshotRequest, Vm, Vmm, VmmError,
};
use linux_guest::{
    Console, Workspace, copy_sparse, pid_exists, qemu_pids_for, sockets_in, wait_console,
};

/// Generous: two cores are shared with other builds and TCG is slow.
const BOOT: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(60);

macro_rules! guest_or_skip {
    () => {
        match linux_guest::guest_prerequisites() {
            Ok(kernel) => Workspace::new(kernel),
            Err(why) => {
                ember_testkit::report_skip(module_path!(), &why);
                return;
            }
        }
    };
}

fn qemu() -> Qemu {
    Qemu::new(QemuConfig::default()).expect("QEMU backend configures on this host")
}

/// The VM is gone for good: process reaped, no socket in its run directory.
async fn assert_gone(vm: &QemuVm, run_dir: &Path) {
    let pid = vm.pid();
    assert!(vm.exit_status().is_some(), "VM {pid} still running");
    for _ in 0..100 {
        if !pid_exists(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_exists(pid), "process {pid} left behind");
    assert_eq!(
        sockets_in(run_dir),
        Vec::<PathBuf>::new(),
        "sockets left behind"
    );
}

/// Boot, let the guest write its pattern and count a while, pause, snapshot,
/// kill. Returns the snapshot's files and what the console showed.
struct Snapshot {
    vmstate: PathBuf,
    ram: PathBuf,
    console: Console,
}

async fn boot_and_snapshot(qemu: &Qemu, ws: &Workspace, vm_id: &str, memory_mib: u32) -> Snapshot {
    let launch = ws.launch(vm_id, memory_mib);
    let vm = qemu.boot_vm(&launch).await.unwrap();
    wait_console(&vm.serial_log(), BOOT, |c| !c.sums.is_empty()).await;
    vm.pause().await.unwrap();
    let request = SnapshotRequest {
        kind: SnapshotKind::Full,
        vmstate: ws.path().join(format!("{vm_id}.vmstate")),
        memory: ws.path().join(format!("{vm_id}.unused-memory")),
    };
    let out = vm.snapshot(&request).await.unwrap();
    let ram = launch.memory_file.clone().unwrap();
    assert_eq!(out.vmstate, request.vmstate);
    assert_eq!(out.memory, MemoryDump::Full(ram.clone()));
    assert!(
        !request.memory.exists(),
        "QEMU must not write a second memory file"
    );
    let size = std::fs::metadata(&out.vmstate).unwrap().len();
    assert!(size > 1000, "vmstate holds device state ({size} bytes)");
    assert!(
        size < 16 << 20,
        "vmstate must not hold guest RAM ({size} bytes)"
    );
    let console = Console::read(&vm.serial_log());
    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
    Snapshot {
        vmstate: out.vmstate,
        ram,
        console,
    }
}

/// The restored guest continued counting from where it stopped and its
/// in-memory file still has the checksum it had before the snapshot.
async fn assert_continues(vm: &QemuVm, before: &Console) {
    let last = before.last_tick().expect("counted before the snapshot");
    let pattern = before.pattern.clone().expect("pattern printed at boot");
    let after = wait_console(&vm.serial_log(), SETTLE, |c| {
        c.ticks.len() >= 12 && !c.sums.is_empty()
    })
    .await;
    let first = after.ticks[0];
    assert!(
        (last..=last + 2).contains(&first),
        "restored counter starts at {first}, snapshot stopped at {last}"
    );
    assert!(after.pattern.is_none(), "the restored guest booted again");
    for (tick, sum) in &after.sums {
        assert_eq!(
            sum, &pattern,
            "memory pattern changed (checksum at tick {tick})"
        );
    }
}

#[tokio::test]
async fn boots_and_counts_on_the_serial_console() {
    let ws = guest_or_skip!();
    let qemu = qemu();
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(qemu.accel().accel, Accel::Tcg, "{}", qemu.accel());
    }
    let version = qemu.version().await.unwrap();
    assert!(version.starts_with("QEMU emulator version"), "{version}");
    assert!(
        version.contains(&format!("accel {}", qemu.accel().accel)),
        "{version}"
    );

    let mut launch = ws.launch("boot", 256);
    let disk = ws.path().join("root.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    launch.config.drives.push(DriveSpec {
        id: "root".into(),
        host_path: disk.clone(),
        read_only: false,
        root: true,
        format: DiskFormat::Raw,
        backing: Vec::new(),
    });
    let vm = qemu.boot_vm(&launch).await.unwrap();
    let console = wait_console(&vm.serial_log(), BOOT, |c| c.ticks.len() >= 5).await;
    assert_eq!(&console.ticks[..5], &[0, 1, 2, 3, 4]);
    assert!(console.pattern.is_some());

    // QEMU opened the drive at its stable path, not the real one.
    let blocks = vm
        .qmp()
        .execute_raw("query-block", None, Duration::from_secs(5))
        .await
        .unwrap();
    let file = blocks[0]["inserted"]["file"].as_str().unwrap();
    assert_eq!(Path::new(file), Path::new("/run/ember/vm/drives/root"));
    assert_eq!(blocks[0]["inserted"]["drv"], "raw");

    // Its own session, so a Ctrl-C at Ember's terminal does not reach it.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", vm.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        vm.pid().to_string(),
        "QEMU leads its own session"
    );

    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
    assert!(disk.exists(), "killing a VM leaves its disk alone");
    assert!(!launch.run_dir.join("drives").exists());
}

/// A drive is opened in the format its spec states: a qcow2 file as qcow2,
/// and a raw disk as raw even when its first bytes are a qcow2 header (a
/// guest writes those bytes; were they probed, the header's backing file —
/// any host path — would be opened by QEMU).
#[tokio::test]
async fn drives_open_in_their_stated_format_never_a_probed_one() {
    let ws = guest_or_skip!();
    ember_testkit::require!(
        Path::new("/usr/bin/qemu-img").exists(),
        "qemu-img is not installed (apt-get install qemu-utils)"
    );
    let disk = ws.path().join("data.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .unwrap();
    assert!(status.success());
    // A raw disk holding a valid qcow2 image (with a backing file) as data.
    let secret = ws.path().join("host-secret");
    std::fs::write(&secret, vec![b'S'; 1 << 20]).unwrap();
    let hostile = ws.path().join("hostile.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&hostile)
        .status()
        .unwrap();
    assert!(status.success());
    let mut launch = ws.launch("qcow", 128);
    launch.config.drives.push(DriveSpec {
        id: "data".into(),
        host_path: disk,
        read_only: true,
        root: false,
        format: DiskFormat::Qcow2,
        backing: Vec::new(),
    });
    launch.config.drives.push(DriveSpec {
        id: "hostile".into(),
        host_path: hostile,
        read_only: true,
        root: false,
        format: DiskFormat::Raw,
        backing: Vec::new(),
    });
    let vm = qemu().boot_vm(&launch).await.unwrap();
    let blocks = vm
        .qmp()
        .execute_raw("query-block", None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(blocks[0]["inserted"]["drv"], "qcow2");
    assert_eq!(blocks[0]["inserted"]["ro"], true);
    assert_eq!(blocks[1]["inserted"]["drv"], "raw");
    assert!(
        blocks[1]["inserted"].get("backing_file").is_none(),
        "a raw drive has no backing file: {}",
        blocks[1]
    );
    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
}

#[tokio::test]
async fn a_vm_runs_on_after_a_snapshot_and_snapshots_again() {
    let ws = guest_or_skip!();
    let qemu = qemu();
    let mut launch = ws.launch("template", 128);
    let disk = ws.path().join("template.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    launch.config.drives.push(DriveSpec {
        id: "root".into(),
        host_path: disk,
        read_only: false,
        root: true,
        format: DiskFormat::Raw,
        backing: Vec::new(),
    });
    let vm = qemu.boot_vm(&launch).await.unwrap();
    let log = vm.serial_log();
    wait_console(&log, BOOT, |c| !c.sums.is_empty()).await;
    let request = |n: u32| SnapshotRequest {
        kind: SnapshotKind::Full,
        vmstate: ws.path().join(format!("template-{n}.vmstate")),
        memory: ws.path().join("unused"),
    };

    vm.pause().await.unwrap();
    vm.snapshot(&request(1)).await.unwrap();
    // A second snapshot of the same paused VM also works.
    vm.snapshot(&request(2)).await.unwrap();
    let first = Console::read(&log).last_tick().unwrap();

    // A template keeps running after its snapshot (disks reactivated).
    vm.resume().await.unwrap();
    assert_eq!(vm.run_state().await.unwrap().as_str(), "running");
    wait_console(&log, SETTLE, |c| c.last_tick() >= Some(first + 15)).await;
    vm.pause().await.unwrap();
    let out = vm.snapshot(&request(3)).await.unwrap();
    let later = Console::read(&log);
    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;

    // The latest snapshot restores to the latest point, not the first one.
    let copy = ws.path().join("later.ram");
    copy_sparse(&launch.memory_file.clone().unwrap(), &copy);
    let mut restored = ws.launch("later", 128);
    restored.config.drives = launch.config.drives.clone();
    let vm = qemu
        .restore_vm(
            &restored,
            &RestoreSpec {
                vmstate: out.vmstate,
                memory: MemoryBackend::File(copy),
                track_dirty_pages: false,
                resume: true,
            },
        )
        .await
        .unwrap();
    assert_continues(&vm, &later).await;
    vm.kill().await.unwrap();
    assert_gone(&vm, &restored.run_dir).await;
}

#[tokio::test]
async fn two_restores_from_one_snapshot_run_at_once() {
    let ws = guest_or_skip!();
    let qemu = qemu();
    let snap = boot_and_snapshot(&qemu, &ws, "template", 256).await;

    let restore = |name: &'static str, resume: bool| {
        let copy = ws.path().join(format!("{name}.ram"));
        copy_sparse(&snap.ram, &copy);
        let launch = ws.launch(name, 256);
        let spec = RestoreSpec {
            vmstate: snap.vmstate.clone(),
            memory: MemoryBackend::File(copy),
            track_dirty_pages: false,
            resume,
        };
        (launch, spec)
    };
    let (la, sa) = restore("fork-a", true);
    let (lb, sb) = restore("fork-b", false);
    let (a, b) = tokio::join!(qemu.restore_vm(&la, &sa), qemu.restore_vm(&lb, &sb));
    let (a, b) = (a.unwrap(), b.unwrap());

    // Restored without `resume`: loaded but paused.
    assert_eq!(b.run_state().await.unwrap().as_str(), "paused");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Console::read(&b.serial_log()).ticks.is_empty());
    b.resume().await.unwrap();

    tokio::join!(
        assert_continues(&a, &snap.console),
        assert_continues(&b, &snap.console)
    );
    for (vm, launch) in [(&a, &la), (&b, &lb)] {
        vm.kill().await.unwrap();
        assert_gone(vm, &launch.run_dir).await;
    }
}

#[tokio::test]
async fn forks_map_one_memory_file_copy_on_write() {
    let ws = guest_or_skip!();
    let qemu = qemu();
    let snap = boot_and_snapshot(&qemu, &ws, "base", 128).await;
    let pristine = std::fs::read(&snap.ram).unwrap();

    let spec = RestoreSpec {
        vmstate: snap.vmstate.clone(),
        memory: MemoryBackend::File(snap.ram.clone()),
        track_dirty_pages: false,
        resume: true,
    };
    let (la, lb) = (ws.launch("cow-a", 128), ws.launch("cow-b", 128));
    let (a, b) = tokio::join!(
        qemu.restore_vm_with(&la, &spec, RestoreMemory::PrivateMapping),
        qemu.restore_vm_with(&lb, &spec, RestoreMemory::PrivateMapping)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    tokio::join!(
        assert_continues(&a, &snap.console),
        assert_continues(&b, &snap.console)
    );
    // Their memory is in no file, so there is nothing to snapshot.
    a.pause().await.unwrap();
    let err = a
        .snapshot(&SnapshotRequest {
            kind: SnapshotKind::Full,
            vmstate: ws.path().join("cow.vmstate"),
            memory: ws.path().join("cow.mem"),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::Unsupported(_)), "{err:?}");
    for (vm, launch) in [(&a, &la), (&b, &lb)] {
        vm.kill().await.unwrap();
        assert_gone(vm, &launch.run_dir).await;
    }
    // Both guests ran and wrote memory; the shared file did not change.
    assert!(
        std::fs::read(&snap.ram).unwrap() == pristine,
        "a private restore wrote its memory file"
    );
}

#[tokio::test]
async fn a_corrupt_snapshot_is_a_clear_error_and_leaves_nothing_running() {
    let ws = guest_or_skip!();
    let qemu = qemu();
    let snap = boot_and_snapshot(&qemu, &ws, "good", 128).await;
    let bytes = std::fs::read(&snap.vmstate).unwrap();

    let truncated = ws.path().join("truncated.vmstate");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = ws.path().join("garbage.vmstate");
    std::fs::write(&garbage, bytes.iter().map(|b| b ^ 0x5a).collect::<Vec<_>>()).unwrap();

    for (name, vmstate) in [("truncated", truncated), ("garbage", garbage)] {
        let copy = ws.path().join(format!("{name}.ram"));
        copy_sparse(&snap.ram, &copy);
        let launch = ws.launch(name, 128);
        let started = std::time::Instant::now();
        let err = qemu
            .restore_vm(
                &launch,
                &RestoreSpec {
                    vmstate,
                    memory: MemoryBackend::File(copy),
                    track_dirty_pages: false,
                    resume: true,
                },
            )
            .await
            .unwrap_err();
        eprintln!("{name}: {err} ({:?})", started.elapsed());
        match &err {
            VmmError::Exited { log_tail, .. } => assert!(
                log_tail.contains("migration") || log_tail.contains("load"),
                "{name}: QEMU's reason is missing from {log_tail:?}"
            ),
            other => panic!("{name}: expected Exited with QEMU's message, got {other:?}"),
        }
        assert_eq!(
            qemu_pids_for(name),
            Vec::<u32>::new(),
            "{name}: QEMU left running"
        );
        assert_eq!(sockets_in(&launch.run_dir), Vec::<PathBuf>::new());
    }

    // A snapshot file that is not there is the caller's mistake.
    let launch = ws.launch("missing", 128);
    let copy = ws.path().join("missing.ram");
    copy_sparse(&snap.ram, &copy);
    let err = qemu
        .restore_vm(
            &launch,
            &RestoreSpec {
                vmstate: ws.path().join("nope.vmstate"),
                memory: MemoryBackend::File(copy),
                track_dirty_pages: false,
                resume: true,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, VmmError::Config(ref m) if m.contains("nope.vmstate")),
        "{err:?}"
    );
    // A memory file of the wrong size too.
    let err = qemu
        .restore_vm(
            &ws.launch("small", 64),
            &RestoreSpec {
                vmstate: snap.vmstate.clone(),
                memory: MemoryBackend::File(snap.ram.clone()),
                track_dirty_pages: false,
                resume: true,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, VmmError::Config(ref m) if m.contains("machine size")),
        "{err:?}"
    );
}

#[tokio::test]
async fn qemu_killed_from_outside_is_reported_with_its_log() {
    let ws = guest_or_skip!();
    let launch = ws.launch("victim", 128);
    let vm = qemu().boot_vm(&launch).await.unwrap();
    assert!(vm.exit_status().is_none());
    // SAFETY: kill(2) on the pid of a QEMU this test started and still owns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), vm.wait())
        .await
        .expect("wait() notices the exit");
    assert!(
        status.starts_with("exited") || status.starts_with("killed"),
        "{status}"
    );
    assert_eq!(vm.exit_status().as_deref(), Some(status.as_str()));
    match vm.pause().await.unwrap_err() {
        VmmError::Exited {
            status: s,
            log_tail,
        } => {
            assert_eq!(s, status);
            assert!(log_tail.contains("terminating on signal 15"), "{log_tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert_gone(&vm, &launch.run_dir).await;
}

#[tokio::test]
async fn qmp_refusals_surface_with_qemus_message() {
    let ws = guest_or_skip!();
    let launch = ws.launch("refusals", 128);
    let vm = qemu().boot_vm(&launch).await.unwrap();

    let err = vm
        .qmp()
        .execute_raw("no-such-command", None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QmpError::Refused { ref class, ref command, .. } if class == "CommandNotFound" && command == "no-such-command"),
        "{err:?}"
    );
    match VmmError::from(err) {
        VmmError::Refused { call, message } => {
            assert_eq!(call, "no-such-command");
            assert!(message.contains("has not been found"), "{message}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    let err = vm
        .qmp()
        .execute(&ember_vmm::qemu::qmp::MigrateIncoming {
            uri: "fd:nothing".into(),
        })
        .await
        .unwrap_err();
    match VmmError::from(err) {
        VmmError::Refused { call, message } => {
            assert_eq!(call, "migrate-incoming");
            assert!(message.contains("-incoming"), "{message}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The connection survives refusals.
    assert_eq!(vm.run_state().await.unwrap().as_str(), "running");
    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
}

#[tokio::test]
async fn a_missing_binary_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = Qemu::new(QemuConfig {
        binary: "/nonexistent/qemu-system-x86_64".into(),
        tsc_khz: Some(1_000_000),
        ..QemuConfig::default()
    })
    .unwrap();
    let err = qemu.version().await.unwrap_err();
    assert!(
        matches!(err, VmmError::BinaryMissing { ref path } if path.ends_with("qemu-system-x86_64")),
        "{err:?}"
    );

    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"never run").unwrap();
    let launch = ember_vmm::Launch {
        vm_id: "nobinary".into(),
        run_dir: dir.path().into(),
        memory_file: Some(dir.path().join("ram")),
        confinement: None,
        config: ember_vmm::VmConfig {
            machine: ember_vmm::MachineSpec {
                vcpus: 1,
                memory_mib: 16,
            },
            kernel,
            initrd: None,
            kernel_args: String::new(),
            drives: vec![],
            net: None,
        },
    };
    let err = qemu.boot(&launch).await.unwrap_err();
    assert!(matches!(err, VmmError::BinaryMissing { .. }), "{err:?}");
    assert_eq!(sockets_in(dir.path()), Vec::<PathBuf>::new());

    let err = qemu
        .restore(
            &launch,
            &RestoreSpec {
                vmstate: dir.path().join("vmstate"),
                memory: MemoryBackend::Uffd(dir.path().join("uffd.sock")),
                track_dirty_pages: false,
                resume: true,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::Unsupported(_)), "{err:?}");
}

#[tokio::test]
async fn dropping_the_handle_kills_the_vm() {
    let ws = guest_or_skip!();
    let launch = ws.launch("dropped", 128);
    let vm = qemu().boot(&launch).await.unwrap();
    let pid = vm.pid();
    drop(vm);
    // The kill is immediate; reaping happens on the runtime.
    for _ in 0..250 {
        if !pid_exists(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_exists(pid), "QEMU {pid} outlived its dropped handle");
    assert_eq!(sockets_in(&launch.run_dir), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn shutdown_ends_the_vm_even_when_the_guest_ignores_the_button() {
    let ws = guest_or_skip!();
    let launch = ws.launch("shutdown", 128);
    let vm = qemu().boot_vm(&launch).await.unwrap();
    wait_console(&vm.serial_log(), BOOT, |c| !c.ticks.is_empty()).await;
    // busybox as PID 1 has no ACPI handler: powerdown, then quit.
    vm.shutdown(Duration::from_millis(500)).await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
    // Shutting down a stopped VM is a no-op.
    vm.shutdown(Duration::from_millis(100)).await.unwrap();
}

#[tokio::test]
async fn a_detached_vm_survives_and_is_adopted() {
    let ws = guest_or_skip!();
    let qemu = qemu();
    let launch = ws.launch("adoptee", 128);
    let mut vm = qemu.boot(&launch).await.unwrap();
    let pid = vm.pid();
    wait_console(&vm.serial_log(), BOOT, |c| !c.ticks.is_empty()).await;
    vm.detach();
    drop(vm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pid_exists(pid), "a detached VM must outlive its handle");
    assert!(launch.run_dir.join("qmp.sock").exists());

    // Its run directory is taken: a second boot there is refused before it
    // touches the running VM's RAM file.
    let ram_before = std::fs::metadata(launch.memory_file.as_ref().unwrap())
        .unwrap()
        .len();
    let err = qemu.boot(&launch).await.unwrap_err();
    assert!(matches!(err, VmmError::InvalidState { .. }), "{err:?}");
    assert_eq!(
        std::fs::metadata(launch.memory_file.as_ref().unwrap())
            .unwrap()
            .len(),
        ram_before
    );
    assert!(launch.run_dir.join("qmp.sock").exists());

    // Another VM's id: refused, and the process is left alone.
    let mut other = launch.clone();
    other.vm_id = "someone-else".into();
    let err = qemu.adopt(&other, pid).await.unwrap_err();
    assert!(
        matches!(err, VmmError::Config(ref m) if m.contains("not the QEMU")),
        "{err:?}"
    );
    // Not QEMU at all.
    let err = qemu.adopt(&launch, std::process::id()).await.unwrap_err();
    assert!(matches!(err, VmmError::Config(_)), "{err:?}");
    assert!(pid_exists(pid));

    let adopted = qemu.adopt_vm(&launch, pid).await.unwrap();
    assert_eq!(adopted.pid(), pid);
    assert_eq!(
        adopted.memory_file(),
        launch.memory_file.as_deref().unwrap()
    );
    adopted.pause().await.unwrap();
    let paused_at = Console::read(&adopted.serial_log()).last_tick().unwrap();
    adopted.resume().await.unwrap();
    wait_console(&adopted.serial_log(), SETTLE, |c| {
        c.last_tick() >= Some(paused_at + 3)
    })
    .await;
    adopted.kill().await.unwrap();
    assert_gone(&adopted, &launch.run_dir).await;

    let err = qemu.adopt(&launch, pid).await.unwrap_err();
    assert!(matches!(err, VmmError::Exited { .. }), "{err:?}");
}

/// A network namespace with `tap0`, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Netns {
        let _ = ip(&["netns", "del", name]);
        assert!(ip(&["netns", "add", name]), "ip netns add {name}");
        let ns = Netns { name: name.into() };
        assert!(ip(&["-n", name, "tuntap", "add", "tap0", "mode", "tap"]));
        assert!(ip(&["-n", name, "link", "set", "tap0", "up"]));
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn tap_flags(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "tap0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn root_boots_inside_a_network_namespace_on_its_tap() {
    let ws = guest_or_skip!();
    ember_testkit::require!(
        ember_testkit::is_root(),
        "needs root to create a network namespace and TAP"
    );
    let ns = Netns::create(&format!("ember-qemu-{}", std::process::id()));
    assert!(ns.tap_flags().contains("NO-CARRIER"), "{}", ns.tap_flags());

    let mut launch = ws.launch("netns", 128);
    launch.config.net = Some(NetSpec {
        tap: "tap0".into(),
        guest_mac: "06:00:AC:10:00:02".into(),
        netns: Some(ns.path()),
    });
    let vm = qemu().boot_vm(&launch).await.unwrap();
    wait_console(&vm.serial_log(), BOOT, |c| !c.ticks.is_empty()).await;

    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(format!("/proc/{}/ns/net", vm.pid()))
        .unwrap()
        .ino();
    assert_eq!(
        theirs,
        std::fs::metadata(ns.path()).unwrap().ino(),
        "QEMU runs in the VM's namespace"
    );
    let ours = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(ours, theirs, "the test itself stays in its own namespace");
    // QEMU holds the TAP open: it has carrier now.
    assert!(!ns.tap_flags().contains("NO-CARRIER"), "{}", ns.tap_flags());
    let net = vm
        .qmp()
        .execute_raw("query-rx-filter", None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(net[0]["main-mac"], "06:00:ac:10:00:02");

    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
}

/// A confined QEMU: its own uid and gid, no capabilities, no_new_privs,
/// QEMU's seccomp filter, a root holding only /usr, a minimal /dev and its
/// own run directory, in its own cgroup with limits; it boots, snapshots
/// and restores like an unconfined one.
#[tokio::test]
async fn a_confined_vm_runs_unprivileged_in_its_own_root_and_cgroup() {
    let ws = guest_or_skip!();
    ember_testkit::require!(
        ember_testkit::is_root(),
        "needs root to make mount namespaces, cgroups and uids"
    );
    let layout = ember_vmm::cgroup::Layout::detect();
    ember_testkit::require!(layout.is_some(), "no cgroup controllers on this host");
    let layout = layout.unwrap();
    let qemu = qemu();
    let identity = ember_vmm::jail::Identity {
        uid: 910_000_000 + std::process::id() % 100_000,
        gid: 910_000_000 + std::process::id() % 100_000,
    };
    let mountpoint = ws.path().join("jail");
    std::fs::create_dir(&mountpoint).unwrap();
    let name = format!("qemu-test-{}", std::process::id());
    let plan = ember_vmm::cgroup::CgroupPlan::new(
        &layout,
        Path::new("ember-test"),
        &name,
        &ember_vmm::cgroup::Limits {
            cpu_percent: Some(100),
            memory_bytes: Some(512 << 20),
            pids: Some(128),
            io: None,
        },
    );
    let cgroup = ember_vmm::cgroup::Cgroup::create(&plan).unwrap();
    let mut launch = ws.launch("confined", 128);
    launch.confinement = Some(ember_vmm::Confinement {
        identity,
        jail_mountpoint: mountpoint.clone(),
        cgroup_procs: cgroup.procs.clone(),
    });
    let vm = qemu.boot_vm(&launch).await.unwrap();
    wait_console(&vm.serial_log(), BOOT, |c| c.ticks.len() >= 3).await;

    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let uid = identity.uid.to_string();
    assert_eq!(field("Uid"), [uid.as_str(); 4], "{status}");
    assert_eq!(field("Gid")[0], identity.gid.to_string());
    assert_eq!(field("Groups"), [identity.gid.to_string()]);
    assert_eq!(field("CapEff"), ["0000000000000000"]);
    assert_eq!(field("CapPrm"), ["0000000000000000"]);
    assert_eq!(field("CapBnd"), ["0000000000000000"]);
    assert_eq!(field("NoNewPrivs"), ["1"]);
    assert_eq!(field("Seccomp"), ["2"], "QEMU's -sandbox filter");
    // Its root is the jail: nothing of the host but what was bound.
    let root = PathBuf::from(format!("/proc/{}/root", vm.pid()));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    for host_only in ["home", "root", "var", "tmp", "proc", "sys"] {
        assert!(
            !top.contains(&host_only.to_owned()),
            "{host_only} in {top:?}"
        );
    }
    let mut devs: Vec<String> = std::fs::read_dir(root.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert_eq!(devs, ["null", "random", "urandom", "zero"]);
    assert!(root.join("run/ember/vm/qmp.sock").exists());
    // In its cgroup, under its limits.
    assert!(cgroup.pids().contains(&vm.pid()), "{:?}", cgroup.pids());
    let usage = cgroup.usage();
    assert!(
        usage.memory_bytes > 0 && usage.memory_limit_bytes == Some(512 << 20),
        "{usage:?}"
    );
    assert!(usage.pids > 0 && usage.pids <= 128, "{usage:?}");
    // The RAM file and run directory are the VM's, readable by no one else.
    use std::os::unix::fs::MetadataExt;
    let ram = std::fs::metadata(launch.memory_file.as_ref().unwrap()).unwrap();
    assert_eq!((ram.uid(), ram.mode() & 0o777), (identity.uid, 0o600));
    let run = std::fs::metadata(&launch.run_dir).unwrap();
    assert_eq!((run.uid(), run.mode() & 0o777), (identity.uid, 0o700));

    // Snapshot and restore, still confined.
    vm.pause().await.unwrap();
    let request = SnapshotRequest {
        kind: SnapshotKind::Full,
        vmstate: ws.path().join("confined.vmstate"),
        memory: ws.path().join("confined.unused"),
    };
    let out = vm.snapshot(&request).await.unwrap();
    vm.kill().await.unwrap();
    assert_gone(&vm, &launch.run_dir).await;
    let MemoryDump::Full(ram) = out.memory else {
        panic!("QEMU dumps full memory")
    };
    let copy = ws.path().join("confined-restore.ram");
    copy_sparse(&ram, &copy);
    let restored = qemu
        .restore_vm(
            &launch,
            &RestoreSpec {
                vmstate: out.vmstate,
                memory: MemoryBackend::File(copy),
                track_dirty_pages: false,
                resume: true,
            },
        )
        .await
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", restored.pid())).unwrap();
    assert!(status.contains(&format!("Uid:\t{uid}")), "{status}");
    let before = Console::read(&restored.serial_log()).ticks.len();
    wait_console(&restored.serial_log(), SETTLE, |c| {
        c.ticks.len() > before + 2
    })
    .await;
    restored.kill().await.unwrap();
    assert_gone(&restored, &launch.run_dir).await;
    cgroup.remove().unwrap();
    for parent in plan.dirs.iter().filter(|d| d.ends_with("ember-test")) {
        let _ = std::fs::remove_dir(parent);
    }
}
