//! The Firecracker driver, end to end, as one suite run against two targets:
//!
//! - `fake::*`: `ember-fc-fake`, always (it enforces Firecracker's API rules
//!   and writes and reads snapshot files, but runs no guest code);
//! - `real::*`: the binary in `EMBER_FIRECRACKER_BIN`, booting the tiny test
//!   guest (`tests/guest/counter.S`), skipped with a reason when unset.
//!
//! Assertions about what the guest does (its counter, its memory pattern)
//! run only against the real binary; the fake run says what it skipped.
//! Every scenario needs root (the VMM runs in its own mount namespace) and
//! binutils (`as`, `ld`) to build the guest; the network scenario needs
//! iproute2. The jailer scenario also needs `EMBER_JAILER_BIN`, and then
//! `EMBER_FIRECRACKER_BIN` must be statically linked (the jail has no libc).
//! `transport::*` covers failures no VMM produces on purpose (a socket that
//! never answers, garbage answers).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_vmm::firecracker::models::{
    InstanceState, MachineConfig, PartialDrive, SnapshotCreateParams,
};
use ember_vmm::firecracker::{ApiClient, ApiTimeouts, FirecrackerVm, FirecrackerVmm};
use ember_vmm::{
    MemoryBackend, MemoryDump, NetSpec, RestoreSpec, SnapshotKind, SnapshotOutput, SnapshotRequest,
    Vm, Vmm, VmmError,
};
use support::guest;
use support::{Env, Target, assert_no_leftovers};

/// One test per scenario and target. The real-binary half skips (with a
/// reason) when `EMBER_FIRECRACKER_BIN` is unset.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod fake {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    ember_testkit::require!(ember_testkit::is_root(), "needs root: the VMM runs in its own mount namespace");
                    super::scenarios::$name(super::Target::fake()).await;
                }
            )*
        }
        mod real {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    ember_testkit::require!(ember_testkit::firecracker_bin().is_some(), "needs EMBER_FIRECRACKER_BIN (a Firecracker v1.16 binary)");
                    ember_testkit::require!(ember_testkit::is_root(), "needs root: the VMM runs in its own mount namespace");
                    super::scenarios::$name(super::Target::real().expect("checked above")).await;
                }
            )*
        }
    };
}

suite!(
    boots_with_stable_paths,
    pause_stops_the_guest_and_resume_continues,
    full_snapshot_restores_with_the_file_backend,
    diff_snapshot_holds_exactly_the_dirty_pages,
    restore_through_a_userfaultfd_page_server,
    restore_finds_drives_moved_elsewhere_in_another_netns,
    refusals_match_firecracker,
    every_endpoint_accepts_the_driver_s_bodies,
    a_failed_boot_leaves_nothing_behind,
    api_failures_are_typed,
    failed_load_ends_the_process,
    adopt_reattaches_after_an_agent_restart,
    shutdown_escalates_to_kill,
    vsock_dial_reports_what_the_guest_did,
    snapshot_targets_are_checked,
    jailed_vm_snapshots_restore_unjailed,
);

const TICK_WAIT: Duration = Duration::from_secs(30);

fn request(kind: SnapshotKind, env: &Env, name: &str) -> SnapshotRequest {
    SnapshotRequest {
        kind,
        vmstate: env.path(&format!("{name}.vmstate")),
        memory: env.path(&format!("{name}.mem")),
    }
}

fn restore_spec(snapshot: &SnapshotOutput, memory: MemoryBackend, resume: bool) -> RestoreSpec {
    RestoreSpec {
        vmstate: snapshot.vmstate.clone(),
        memory,
        track_dirty_pages: true,
        resume,
    }
}

fn memory_path(dump: &MemoryDump) -> &Path {
    match dump {
        MemoryDump::Full(p) | MemoryDump::DirtyOnly(p) => p,
    }
}

/// The checksum the fake printed on its console after `prefix`.
fn fake_checksum(serial: &Path, prefix: &str) -> String {
    let text = guest::read(serial);
    text.lines()
        .filter_map(|l| l.strip_prefix("ember-fc-fake: "))
        .filter_map(|l| l.strip_prefix(prefix))
        .next_back()
        .unwrap_or_else(|| panic!("no {prefix:?} line in {text:?}"))
        .trim()
        .to_owned()
}

async fn state(vm: &FirecrackerVm) -> InstanceState {
    vm.client().describe_instance().await.unwrap().state
}

/// Assert the restored guest `b` continues the output `before` (what the
/// original printed up to its snapshot) for at least two more ticks, with its
/// pattern intact.
fn continues(before: &str, b: &FirecrackerVm) {
    let last = guest::ticks(before)
        .last()
        .expect("ticks before the snapshot")
        .0;
    guest::wait_for_ticks(&b.serial_log(), last + 2, TICK_WAIT);
    let joined = before.to_owned() + &guest::read(&b.serial_log());
    assert!(guest::assert_continuous(&joined) >= last + 2);
}

/// Serial output up to the moment the VM was paused.
fn serial_prefix(vm: &FirecrackerVm) -> String {
    guest::read(&vm.serial_log())
}

/// Processes whose command line carries `--id <vm_id>`.
fn processes_of(vm_id: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--id" && w[1] == vm_id.as_bytes())
        })
        .filter(|pid| {
            !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .collect()
}

mod scenarios {
    use super::*;

    pub async fn boots_with_stable_paths(t: Target) {
        let env = Env::new();
        let launch = env.launch("boot");
        let vmm = t.vmm();
        assert_eq!(vmm.version().await.unwrap(), "1.16.1");

        let started = Instant::now();
        let vm = vmm.boot_vm(&launch).await.unwrap();
        eprintln!("{t:?}: boot took {:?}", started.elapsed());
        let info = vm.client().describe_instance().await.unwrap();
        assert_eq!(info.id, launch.vm_id);
        assert_eq!(info.state, InstanceState::Running);

        // Firecracker was only ever told stable paths…
        let config = vm.client().vm_config().await.unwrap();
        let boot = config.boot_source.unwrap();
        assert_eq!(
            boot.kernel_image_path,
            Path::new("/run/ember/vm/boot/kernel")
        );
        assert_eq!(
            config.drives[0].path_on_host.as_deref(),
            Some(Path::new("/run/ember/vm/drives/root"))
        );
        assert_eq!(
            config.vsock.unwrap().uds_path,
            Path::new("/run/ember/vm/vsock.sock")
        );
        // …which are the run directory's entries seen from the host.
        assert!(vm.vsock_socket().exists());
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", vm.pid())).unwrap();
        assert!(mounts.contains(" /run/ember/vm "), "{mounts}");
        assert!(mounts.contains(" /run/ember/vm/drives/root "), "{mounts}");

        if t.is_real() {
            guest::wait_for_ticks(&vm.serial_log(), 2, TICK_WAIT);
            guest::assert_continuous(&guest::read(&vm.serial_log()));
        }
        t.note_skipped("that the guest boots, fills its pattern and counts");

        let (pid, run_dir) = (vm.pid(), launch.run_dir.clone());
        vm.kill().await.unwrap();
        assert!(vm.exit_status().unwrap().contains("SIGKILL"));
        assert_no_leftovers(&run_dir, pid);
    }

    pub async fn pause_stops_the_guest_and_resume_continues(t: Target) {
        let env = Env::new();
        let launch = env.launch("pause");
        let vm = t.vmm().boot_vm(&launch).await.unwrap();
        if t.is_real() {
            guest::wait_for_ticks(&vm.serial_log(), 1, TICK_WAIT);
        }
        let started = Instant::now();
        vm.pause().await.unwrap();
        eprintln!("{t:?}: pause took {:?}", started.elapsed());
        assert_eq!(state(&vm).await, InstanceState::Paused);
        let at_pause = guest::read(&vm.serial_log());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            guest::read(&vm.serial_log()),
            at_pause,
            "guest ran while paused"
        );

        let started = Instant::now();
        vm.resume().await.unwrap();
        eprintln!("{t:?}: resume took {:?}", started.elapsed());
        assert_eq!(state(&vm).await, InstanceState::Running);
        if t.is_real() {
            let last = guest::ticks(&at_pause).last().unwrap().0;
            guest::wait_for_ticks(&vm.serial_log(), last + 2, TICK_WAIT);
            guest::assert_continuous(&guest::read(&vm.serial_log()));
        }
        t.note_skipped("that the counter continues after resume");

        // A running VM cannot be snapshotted: the driver says so itself…
        let err = vm
            .snapshot(&request(SnapshotKind::Full, &env, "running"))
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::InvalidState { .. }), "{err}");
        // …and so does the VMM when asked directly.
        let err = vm
            .client()
            .create_snapshot(&SnapshotCreateParams {
                snapshot_type: None,
                snapshot_path: env.path("direct.vmstate"),
                mem_file_path: env.path("direct.mem"),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { call, message } if call == "PUT /snapshot/create" && message.contains("while running")),
            "{err}"
        );

        let (pid, run_dir) = (vm.pid(), launch.run_dir.clone());
        drop(vm);
        assert_no_leftovers(&run_dir, pid);
    }

    pub async fn full_snapshot_restores_with_the_file_backend(t: Target) {
        let env = Env::new();
        let vmm = t.vmm();
        let a_launch = env.launch("a");
        let a = vmm.boot_vm(&a_launch).await.unwrap();
        if t.is_real() {
            guest::wait_for_ticks(&a.serial_log(), 2, TICK_WAIT);
        }
        a.pause().await.unwrap();
        let before = serial_prefix(&a);
        let started = Instant::now();
        let snapshot = a
            .snapshot(&request(SnapshotKind::Full, &env, "full"))
            .await
            .unwrap();
        eprintln!("{t:?}: full snapshot took {:?}", started.elapsed());
        assert_eq!(snapshot.memory, MemoryDump::Full(env.path("full.mem")));
        assert_eq!(
            std::fs::metadata(env.path("full.mem")).unwrap().len(),
            u64::from(guest::MEMORY_MIB) << 20
        );
        // The original runs on and diverges; the restore must not see that.
        a.resume().await.unwrap();
        if t.is_real() {
            let last = guest::ticks(&before).last().unwrap().0;
            guest::wait_for_ticks(&a.serial_log(), last + 2, TICK_WAIT);
        }
        let a_serial = a.serial_log();
        let (a_pid, a_run) = (a.pid(), a_launch.run_dir.clone());
        a.kill().await.unwrap();

        // A launch that asks for another machine than the snapshot's is
        // refused, and the process it started is gone.
        let mut wrong = env.launch("wrong-shape");
        wrong.config.machine.memory_mib *= 2;
        let err = vmm
            .restore_vm(
                &wrong,
                &restore_spec(&snapshot, MemoryBackend::File(env.path("full.mem")), false),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Config(m) if m.contains("MiB")),
            "{err}"
        );
        assert!(processes_of(&wrong.vm_id).is_empty());
        assert_no_leftovers(&wrong.run_dir, 0);

        let b_launch = env.launch("b");
        let started = Instant::now();
        let b = vmm
            .restore_vm(
                &b_launch,
                &restore_spec(&snapshot, MemoryBackend::File(env.path("full.mem")), false),
            )
            .await
            .unwrap();
        eprintln!("{t:?}: restore (File backend) took {:?}", started.elapsed());
        assert_eq!(state(&b).await, InstanceState::Paused);
        b.resume().await.unwrap();
        if t.is_real() {
            continues(&before, &b);
        } else {
            assert_eq!(
                fake_checksum(&a_serial, "snapshot Full memory checksum"),
                fake_checksum(&b.serial_log(), "restored memory checksum")
            );
        }
        t.note_skipped(
            "that the restored guest continues from its counter with its pattern intact",
        );
        let (b_pid, b_run) = (b.pid(), b_launch.run_dir.clone());
        b.kill().await.unwrap();
        assert_no_leftovers(&a_run, a_pid);
        assert_no_leftovers(&b_run, b_pid);
    }

    pub async fn diff_snapshot_holds_exactly_the_dirty_pages(t: Target) {
        let env = Env::new();
        let vmm = t.vmm();
        let a_launch = env.launch("a");
        let a = vmm.boot_vm(&a_launch).await.unwrap();
        if t.is_real() {
            guest::wait_for_ticks(&a.serial_log(), 2, TICK_WAIT);
        }
        a.pause().await.unwrap();
        let base = a
            .snapshot(&request(SnapshotKind::Full, &env, "base"))
            .await
            .unwrap();
        a.resume().await.unwrap();
        if t.is_real() {
            let last = guest::ticks(&serial_prefix(&a)).last().unwrap().0;
            guest::wait_for_ticks(&a.serial_log(), last + 2, TICK_WAIT);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.pause().await.unwrap();
        let started = Instant::now();
        let diff = a
            .snapshot(&request(SnapshotKind::Diff, &env, "diff"))
            .await
            .unwrap();
        eprintln!("{t:?}: diff snapshot took {:?}", started.elapsed());
        // The same paused moment, in full, to compare against.
        let now = a
            .snapshot(&request(SnapshotKind::Full, &env, "now"))
            .await
            .unwrap();
        let a_serial = serial_prefix(&a);
        let (a_pid, a_run) = (a.pid(), a_launch.run_dir.clone());
        a.kill().await.unwrap();

        let MemoryDump::DirtyOnly(diff_mem) = &diff.memory else {
            panic!("a diff snapshot must be DirtyOnly: {:?}", diff.memory);
        };
        let size = u64::from(guest::MEMORY_MIB) << 20;
        assert_eq!(std::fs::metadata(diff_mem).unwrap().len(), size);
        let extents = support::data_extents(diff_mem);
        eprintln!("{t:?}: diff data extents {extents:x?}");
        assert!(extents.iter().all(|(o, l)| o % 4096 == 0 && l % 4096 == 0));
        let in_diff = |page: u64| extents.iter().any(|(o, l)| page >= *o && page < o + l);

        let base_mem = std::fs::read(memory_path(&base.memory)).unwrap();
        let now_mem = std::fs::read(memory_path(&now.memory)).unwrap();
        let diff_bytes = std::fs::read(diff_mem).unwrap();
        let changed: Vec<u64> = (0..size)
            .step_by(4096)
            .filter(|&p| base_mem[p as usize..][..4096] != now_mem[p as usize..][..4096])
            .collect();
        eprintln!("{t:?}: pages changed between the snapshots {changed:x?}");
        assert!(
            !changed.is_empty(),
            "the guest wrote nothing between the snapshots"
        );
        for page in &changed {
            assert!(
                in_diff(*page),
                "changed page {page:#x} missing from the diff"
            );
        }
        for (offset, len) in &extents {
            let range = *offset as usize..(*offset + *len) as usize;
            assert_eq!(
                diff_bytes[range.clone()],
                now_mem[range],
                "diff data at {offset:#x} is stale"
            );
        }
        // Beyond the changed pages, only a few the guest wrote without
        // changing them (the fake's walk always changes what it writes).
        let data: u64 = extents.iter().map(|(_, l)| l).sum();
        let changed_bytes = changed.len() as u64 * 4096;
        assert!(
            data <= changed_bytes + 64 * 1024,
            "diff holds {data} bytes: more than the {changed_bytes} bytes of dirty pages"
        );
        if t.is_real() {
            assert!(
                in_diff(guest::COUNTER_PAGE),
                "the counter page is not in the diff"
            );
            let pattern = guest::PATTERN_BASE..guest::PATTERN_BASE + guest::PATTERN_BYTES;
            assert!(
                extents
                    .iter()
                    .all(|(o, l)| o + l <= pattern.start || *o >= pattern.end),
                "unchanged pattern pages are in the diff"
            );
        }

        // Base + diff is the memory at the diff's moment, and restores to it.
        let merged = env.path("merged.mem");
        support::merge(memory_path(&base.memory), diff_mem, &merged);
        assert!(
            std::fs::read(&merged).unwrap() == now_mem,
            "base + diff != memory"
        );
        let b_launch = env.launch("b");
        let b = vmm
            .restore_vm(
                &b_launch,
                &restore_spec(&diff, MemoryBackend::File(merged.clone()), true),
            )
            .await
            .unwrap();
        if t.is_real() {
            continues(&a_serial, &b);
        } else {
            assert_eq!(
                fake_checksum(&a_run.join("serial.log"), "snapshot Diff memory checksum"),
                fake_checksum(&b.serial_log(), "restored memory checksum")
            );
        }
        t.note_skipped("that the guest restored from base + diff continues");

        // The next generation, as a paused sandbox makes it: a diff of the
        // restored VM holds only what it wrote since the restore, and goes
        // on top of the memory it was restored from.
        if t.is_real() {
            let last = guest::ticks(&guest::read(&b.serial_log()))
                .last()
                .unwrap()
                .0;
            guest::wait_for_ticks(&b.serial_log(), last + 2, TICK_WAIT);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.pause().await.unwrap();
        let gen2 = b
            .snapshot(&request(SnapshotKind::Diff, &env, "gen2"))
            .await
            .unwrap();
        let gen2_extents = support::data_extents(memory_path(&gen2.memory));
        eprintln!("{t:?}: second-generation diff extents {gen2_extents:x?}");
        let gen2_data: u64 = gen2_extents.iter().map(|(_, l)| l).sum();
        // The fake dirties its tick page and the pages of a 64-page walk.
        let bound = if t.is_real() { 64 * 1024 } else { 65 * 4096 };
        assert!(gen2_data > 0 && gen2_data <= bound, "{gen2_data} bytes");
        let b_serial = a_serial.clone() + &guest::read(&b.serial_log());
        let (b_pid, b_run) = (b.pid(), b_launch.run_dir.clone());
        b.kill().await.unwrap();
        let merged2 = env.path("merged2.mem");
        support::merge(&merged, memory_path(&gen2.memory), &merged2);
        let server = support::uffd::PageServer::start(&env.path("gen2.sock"), &merged2);
        let c_launch = env.launch("c");
        let c = vmm
            .restore_vm(
                &c_launch,
                &restore_spec(&gen2, MemoryBackend::Uffd(server.socket().to_owned()), true),
            )
            .await
            .unwrap();
        if t.is_real() {
            continues(&b_serial, &c);
        } else {
            assert_eq!(
                fake_checksum(&b_run.join("serial.log"), "snapshot Diff memory checksum"),
                fake_checksum(&c.serial_log(), "restored memory checksum")
            );
        }
        let (c_pid, c_run) = (c.pid(), c_launch.run_dir.clone());
        c.kill().await.unwrap();
        drop(server);
        assert_no_leftovers(&a_run, a_pid);
        assert_no_leftovers(&b_run, b_pid);
        assert_no_leftovers(&c_run, c_pid);
    }

    pub async fn restore_through_a_userfaultfd_page_server(t: Target) {
        let env = Env::new();
        let vmm = t.vmm();
        let a_launch = env.launch("a");
        let a = vmm.boot_vm(&a_launch).await.unwrap();
        if t.is_real() {
            guest::wait_for_ticks(&a.serial_log(), 2, TICK_WAIT);
        }
        a.pause().await.unwrap();
        let snapshot = a
            .snapshot(&request(SnapshotKind::Full, &env, "full"))
            .await
            .unwrap();
        let before = serial_prefix(&a);
        let (a_pid, a_run) = (a.pid(), a_launch.run_dir.clone());
        a.kill().await.unwrap();

        let server = support::uffd::PageServer::start(
            &env.path("page-server.sock"),
            memory_path(&snapshot.memory),
        );
        let b_launch = env.launch("b");
        let started = Instant::now();
        let b = vmm
            .restore_vm(
                &b_launch,
                &restore_spec(
                    &snapshot,
                    MemoryBackend::Uffd(server.socket().to_owned()),
                    true,
                ),
            )
            .await
            .unwrap();
        eprintln!("{t:?}: restore (Uffd backend) took {:?}", started.elapsed());
        if t.is_real() {
            continues(&before, &b);
        } else {
            assert_eq!(
                fake_checksum(&a_run.join("serial.log"), "snapshot Full memory checksum"),
                fake_checksum(&b.serial_log(), "restored memory checksum")
            );
        }
        t.note_skipped("that the guest continues on pages served by userfaultfd");
        eprintln!("{t:?}: page server served {} faults", server.faults());
        assert!(
            server.faults() > 0,
            "no page was served through userfaultfd"
        );
        let (b_pid, b_run) = (b.pid(), b_launch.run_dir.clone());
        b.kill().await.unwrap();
        drop(server);
        assert_no_leftovers(&a_run, a_pid);
        assert_no_leftovers(&b_run, b_pid);
    }

    pub async fn restore_finds_drives_moved_elsewhere_in_another_netns(t: Target) {
        let env = Env::new();
        let vmm = t.vmm();
        let first = support::NetNs::new("tap0");
        let mut a_launch = env.launch("a");
        a_launch.config.net = Some(NetSpec {
            tap: "tap0".into(),
            guest_mac: "06:00:ac:10:00:02".into(),
            netns: Some(first.path()),
        });
        let a = vmm.boot_vm(&a_launch).await.unwrap();
        let ns = std::fs::metadata(format!("/proc/{}/ns/net", a.pid())).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&ns), first.inode());
        if t.is_real() {
            guest::wait_for_ticks(&a.serial_log(), 1, TICK_WAIT);
        }
        a.pause().await.unwrap();
        let snapshot = a
            .snapshot(&request(SnapshotKind::Full, &env, "full"))
            .await
            .unwrap();
        let before = serial_prefix(&a);
        let (a_pid, a_run) = (a.pid(), a_launch.run_dir.clone());
        a.kill().await.unwrap();

        // Another host: the disk lives somewhere else, the old path is gone,
        // and the VM gets another network namespace (with the same TAP name).
        let moved = env.path("elsewhere/disk.img");
        std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
        std::fs::rename(&env.root_drive, &moved).unwrap();
        let second = support::NetNs::new("tap0");
        let mut b_launch = env.launch("b");
        b_launch.config.drives[0].host_path = moved;
        b_launch.config.net = Some(NetSpec {
            tap: "tap0".into(),
            guest_mac: "06:00:ac:10:00:02".into(),
            netns: Some(second.path()),
        });
        let b = vmm
            .restore_vm(
                &b_launch,
                &restore_spec(&snapshot, MemoryBackend::File(env.path("full.mem")), true),
            )
            .await
            .unwrap();
        let ns = std::fs::metadata(format!("/proc/{}/ns/net", b.pid())).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&ns), second.inode());
        if t.is_real() {
            continues(&before, &b);
        }
        t.note_skipped("that the guest continues after the move");
        let (b_pid, b_run) = (b.pid(), b_launch.run_dir.clone());
        b.kill().await.unwrap();
        assert_no_leftovers(&a_run, a_pid);
        assert_no_leftovers(&b_run, b_pid);
    }

    /// The rules and words the driver relies on, asked of a bare process.
    pub async fn refusals_match_firecracker(t: Target) {
        let env = Env::new();
        let bare = support::BareVmm::start(&t, env.dir.path(), "refusals").await;
        let socket = bare.socket.clone();
        let kernel = env.kernel.to_str().unwrap();
        let cases: Vec<(&str, &str, String, u16, &str)> = vec![
            ("PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":32,"bogus":1}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: unknown field `bogus`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, `cpu_template`, `track_dirty_pages`, `huge_pages` at line 1 column 41."),
            ("PUT", "/machine-config", r#"{"vcpu_count":1}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: missing field `mem_size_mib` at line 1 column 16."),
            ("PUT", "/machine-config", r#"{"vcpu_count":0,"mem_size_mib":32}"#.into(), 400,
             "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."),
            ("PATCH", "/machine-config", "{}".into(), 400, "Empty PATCH request."),
            ("PUT", "/actions", r#"{"action_type":"Bogus"}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: unknown variant `Bogus`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel` at line 1 column 22."),
            ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#.into(), 400,
             "Start microvm error: Cannot start microvm without kernel configuration."),
            ("PATCH", "/vm", r#"{"state":"Paused"}"#.into(), 400,
             "The requested operation is not supported before starting the microVM."),
            ("PUT", "/foo", "{}".into(), 400, "Invalid request method and/or path: PUT foo."),
            ("PUT", "/drives/r-1", r#"{"drive_id":"r-1","is_root_device":true}"#.into(), 400,
             "API Resource IDs can only contain alphanumeric characters and underscores."),
            ("PUT", "/drives/root", r#"{"drive_id":"other","is_root_device":true}"#.into(), 400,
             "The id from the path does not match the id from the body!"),
            ("PUT", "/boot-source", r#"{"kernel_image_path":"/nonexistent"}"#.into(), 400,
             "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"),
            ("PUT", "/network-interfaces/eth0", r#"{"iface_id":"eth0","host_dev_name":"tapx","guest_mac":"zz"}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: The provided MAC address is invalid. at line 1 column 59."),
            ("PUT", "/snapshot/load", r#"{"snapshot_path":"/s"}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: missing field: either `mem_backend` or `mem_file_path` is required."),
            ("PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":32}"#.into(), 204, ""),
            ("PUT", "/snapshot/load", r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#.into(), 400,
             "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."),
            ("PUT", "/boot-source", format!(r#"{{"kernel_image_path":"{kernel}"}}"#), 204, ""),
            ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#.into(), 204, ""),
            ("PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":32}"#.into(), 400,
             "The requested operation is not supported after starting the microVM."),
            ("PUT", "/snapshot/create", r#"{"snapshot_path":"/tmp/never","mem_file_path":"/tmp/never.mem"}"#.into(), 400,
             "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running"),
            ("PATCH", "/vm", r#"{"state":"Running"}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: unknown variant `Running`, expected `Paused` or `Resumed` at line 1 column 18."),
            ("PATCH", "/vm", r#"{"state":"Paused"}"#.into(), 204, ""),
            ("PUT", "/snapshot/create", r#"{"snapshot_path":"/tmp/never"}"#.into(), 400,
             "An error occurred when deserializing the json body of a request: missing field `mem_file_path` at line 1 column 30."),
        ];
        let mut mismatches = Vec::new();
        for (method, path, body, status, message) in &cases {
            let (got_status, got_body) = support::raw_request(&socket, method, path, body).await;
            let got_message = serde_json::from_str::<serde_json::Value>(&got_body)
                .ok()
                .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if got_status != *status || got_message != *message {
                mismatches.push(format!(
                    "{method} {path} {body}\n  want {status} {message:?}\n  got  {got_status} {got_message:?}"
                ));
            }
        }
        assert_eq!(
            bare.client.describe_instance().await.unwrap().state,
            InstanceState::Paused
        );
        assert!(mismatches.is_empty(), "{t:?}:\n{}", mismatches.join("\n"));
    }

    /// Every typed call, with every optional field the driver can send,
    /// accepted by the VMM (so the models' field names are right), and read
    /// back through `GET /vm/config`.
    pub async fn every_endpoint_accepts_the_driver_s_bodies(t: Target) {
        use ember_vmm::firecracker::models::*;
        let env = Env::new();
        let bare = support::BareVmm::start(&t, env.dir.path(), "endpoints").await;
        let api = &bare.client;
        let bucket = TokenBucket {
            size: 1 << 20,
            refill_time: 100,
            one_time_burst: Some(1 << 20),
        };
        let limiter = RateLimiter {
            bandwidth: Some(bucket),
            ops: Some(TokenBucket {
                size: 1000,
                refill_time: 1000,
                one_time_burst: None,
            }),
        };

        api.put_logger(&Logger {
            log_path: Some(env.path("fc.log")),
            level: Some(LogLevel::Debug),
            show_level: Some(true),
            show_log_origin: Some(false),
            module: None,
        })
        .await
        .unwrap();
        api.put_metrics(&Metrics {
            metrics_path: env.path("metrics.json"),
        })
        .await
        .unwrap();
        api.put_machine_config(&MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 64,
            smt: Some(false),
            track_dirty_pages: Some(true),
            huge_pages: Some(HugePages::None),
        })
        .await
        .unwrap();
        api.patch_machine_config(&MachineConfigUpdate {
            mem_size_mib: Some(guest::MEMORY_MIB as usize),
            ..Default::default()
        })
        .await
        .unwrap();
        api.put_boot_source(&BootSource {
            kernel_image_path: env.kernel.clone(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: None,
        })
        .await
        .unwrap();
        api.put_drive(&Drive {
            drive_id: "root".into(),
            path_on_host: Some(env.root_drive.clone()),
            is_root_device: true,
            is_read_only: Some(false),
            partuuid: None,
            cache_type: Some(CacheType::Writeback),
            io_engine: Some(IoEngine::Sync),
            rate_limiter: Some(limiter),
        })
        .await
        .unwrap();
        std::fs::write(env.path("data.img"), vec![0u8; 4096]).unwrap();
        api.put_drive(&Drive {
            drive_id: "data".into(),
            path_on_host: Some(env.path("data.img")),
            is_root_device: false,
            is_read_only: Some(true),
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        })
        .await
        .unwrap();
        api.put_vsock(&Vsock {
            guest_cid: 3,
            uds_path: env.path("v.sock"),
        })
        .await
        .unwrap();
        api.put_balloon(&Balloon {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: Some(1),
        })
        .await
        .unwrap();
        assert_eq!(
            api.balloon().await.unwrap().stats_polling_interval_s,
            Some(1)
        );
        api.put_entropy(&EntropyDevice {
            rate_limiter: Some(limiter),
        })
        .await
        .unwrap();
        api.put_serial(&SerialDevice::default()).await.unwrap();

        let config = api.vm_config().await.unwrap();
        assert_eq!(
            config.machine_config.as_ref().unwrap().mem_size_mib,
            guest::MEMORY_MIB as usize
        );
        assert_eq!(
            config.machine_config.as_ref().unwrap().track_dirty_pages,
            Some(true)
        );
        assert_eq!(config.drives.len(), 2);
        let root = config.drives.iter().find(|d| d.drive_id == "root").unwrap();
        assert_eq!(root.rate_limiter, Some(limiter));
        assert_eq!(root.cache_type, Some(CacheType::Writeback));
        assert_eq!(config.vsock.as_ref().unwrap().uds_path, env.path("v.sock"));
        assert_eq!(config.balloon.unwrap().amount_mib, 0);
        assert!(config.entropy.is_some());

        api.action(ActionType::InstanceStart).await.unwrap();
        api.patch_drive(&PartialDrive {
            drive_id: "data".into(),
            path_on_host: Some(env.path("data.img")),
            rate_limiter: None,
        })
        .await
        .unwrap();
        api.action(ActionType::FlushMetrics).await.unwrap();
        api.action(ActionType::SendCtrlAltDel).await.unwrap();
        api.patch_vm(VmState::Paused).await.unwrap();
        api.patch_vm(VmState::Resumed).await.unwrap();
        assert_eq!(
            api.describe_instance().await.unwrap().state,
            InstanceState::Running
        );
        assert_eq!(api.version().await.unwrap().firecracker_version, "1.16.1");
        // The tiny guest has no balloon driver: the device is there but was
        // never activated.
        let err = api
            .patch_balloon(&BalloonUpdate { amount_mib: 1 })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { message, .. } if message == "Balloon update error: Balloon: Device not activated yet."),
            "{err}"
        );
        let stats = api.balloon_stats().await.unwrap();
        assert_eq!(
            (stats.target_mib, stats.actual_mib, stats.free_memory),
            (0, 0, None)
        );
        api.patch_balloon_stats(&BalloonStatsUpdate {
            stats_polling_interval_s: 2,
        })
        .await
        .unwrap();
        let metrics = std::fs::read_to_string(env.path("metrics.json")).unwrap();
        assert!(!metrics.trim().is_empty(), "FlushMetrics wrote nothing");
        assert!(
            std::fs::metadata(env.path("fc.log")).unwrap().len() > 0,
            "nothing logged"
        );
    }

    pub async fn api_failures_are_typed(t: Target) {
        let env = Env::new();
        let launch = env.launch("errors");
        let vm = t.vmm().boot_vm(&launch).await.unwrap();

        let err = vm
            .client()
            .put_machine_config(&MachineConfig {
                vcpu_count: 1,
                mem_size_mib: 64,
                smt: None,
                track_dirty_pages: None,
                huge_pages: None,
            })
            .await
            .unwrap_err();
        match err {
            VmmError::Refused { call, message } => {
                assert_eq!(call, "PUT /machine-config");
                assert!(message.contains("after starting"), "{message}");
            }
            other => panic!("expected a refusal, got {other}"),
        }
        let err = vm
            .client()
            .patch_drive(&PartialDrive {
                drive_id: "nope".into(),
                path_on_host: Some(PathBuf::from("/nonexistent")),
                rate_limiter: None,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { call, .. } if call == "PATCH /drives/nope"),
            "{err}"
        );

        // The process dies under us: the socket file stays, nobody listens.
        // SAFETY: signalling a process we started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
        let status = vm.wait().await;
        assert!(status.contains("SIGKILL"), "{status}");
        let err = vm.client().describe_instance().await.unwrap_err();
        assert!(matches!(err, VmmError::Connection { .. }), "{err}");
        let err = vm.pause().await.unwrap_err();
        assert!(matches!(err, VmmError::Exited { .. }), "{err}");

        let (pid, run_dir) = (vm.pid(), launch.run_dir.clone());
        vm.kill().await.unwrap();
        assert_no_leftovers(&run_dir, pid);
        // Socket removed: connecting fails outright.
        let err = vm.client().describe_instance().await.unwrap_err();
        assert!(matches!(err, VmmError::Connection { .. }), "{err}");
    }

    pub async fn a_failed_boot_leaves_nothing_behind(t: Target) {
        let env = Env::new();
        let vmm = t.vmm();
        // Firecracker refuses a kernel that is not an ELF at InstanceStart,
        // after the process is up: the driver must kill it and clean up.
        let mut launch = env.launch("not-elf");
        launch.config.kernel = env.root_drive.clone();
        let err = vmm.boot_vm(&launch).await.unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { call, message } if call == "PUT /actions" && message.contains("Invalid Elf magic number")),
            "{err}"
        );
        assert!(processes_of(&launch.vm_id).is_empty(), "VMM left running");
        assert_no_leftovers(&launch.run_dir, 0);

        // Refused before anything starts: a missing drive, a missing netns.
        let mut launch = env.launch("no-drive");
        launch.config.drives[0].host_path = env.path("missing.img");
        let err = vmm.boot_vm(&launch).await.unwrap_err();
        assert!(
            matches!(&err, VmmError::Config(m) if m.contains("missing.img")),
            "{err}"
        );
        let mut launch = env.launch("no-netns");
        launch.config.net = Some(NetSpec {
            tap: "tap0".into(),
            guest_mac: "06:00:ac:10:00:02".into(),
            netns: Some("/run/netns/ember-test-does-not-exist".into()),
        });
        let err = vmm.boot_vm(&launch).await.unwrap_err();
        assert!(matches!(err, VmmError::Io { .. }), "{err}");
        assert_no_leftovers(&launch.run_dir, 0);

        // A run directory a live VMM still serves is not taken over.
        let launch = env.launch("busy");
        let vm = vmm.boot_vm(&launch).await.unwrap();
        let err = vmm.boot_vm(&launch).await.unwrap_err();
        assert!(matches!(err, VmmError::InvalidState { .. }), "{err}");
        assert_eq!(state(&vm).await, InstanceState::Running);
        let pid = vm.pid();
        drop(vm);
        assert_no_leftovers(&launch.run_dir, pid);
    }

    pub async fn failed_load_ends_the_process(t: Target) {
        let env = Env::new();
        let vmstate = env.path("garbage.vmstate");
        std::fs::write(&vmstate, b"not a snapshot").unwrap();
        let memory = env.path("garbage.mem");
        std::fs::write(&memory, vec![0u8; (guest::MEMORY_MIB as usize) << 20]).unwrap();
        let launch = env.launch("garbage");
        let err = t
            .vmm()
            .restore_vm(
                &launch,
                &RestoreSpec {
                    vmstate,
                    memory: MemoryBackend::File(memory),
                    track_dirty_pages: false,
                    resume: true,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { call, message } if call == "PUT /snapshot/load" && message.starts_with("Load snapshot error")),
            "{err}"
        );
        let started = Instant::now();
        while !processes_of(&launch.vm_id).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "VMM still running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_no_leftovers(&launch.run_dir, 0);
    }

    pub async fn adopt_reattaches_after_an_agent_restart(t: Target) {
        let env = Env::new();
        let launch = env.launch("adopt");
        let vmm = t.vmm();
        let mut first = vmm.boot_vm(&launch).await.unwrap();
        let pid = first.pid();
        first.detach();
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            processes_of(&launch.vm_id),
            vec![pid],
            "detached VM is not running"
        );

        let mut wrong = launch.clone();
        wrong.vm_id = "t-someone-else".into();
        let err = vmm.adopt(&wrong, pid).await.unwrap_err();
        assert!(matches!(err, VmmError::Config(_)), "{err}");
        let err = vmm.adopt(&launch, std::process::id()).await.unwrap_err();
        assert!(matches!(err, VmmError::Config(_)), "{err}");

        let vm = vmm.adopt_vm(&launch, pid).await.unwrap();
        assert_eq!(vm.state(), InstanceState::Running);
        vm.pause().await.unwrap();
        assert_eq!(state(&vm).await, InstanceState::Paused);
        vm.resume().await.unwrap();
        vm.kill().await.unwrap();
        assert!(vm.exit_status().is_some());
        assert_no_leftovers(&launch.run_dir, pid);
        let err = vmm.adopt(&launch, pid).await.unwrap_err();
        assert!(matches!(err, VmmError::Exited { .. }), "{err}");
    }

    pub async fn shutdown_escalates_to_kill(t: Target) {
        let env = Env::new();
        let vmm = t.vmm();
        // The tiny guest ignores Ctrl+Alt+Del, so the grace period runs out.
        let launch = env.launch("stubborn");
        let vm = vmm.boot_vm(&launch).await.unwrap();
        let started = Instant::now();
        vm.shutdown(Duration::from_millis(500)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert!(vm.exit_status().unwrap().contains("SIGKILL"));
        assert_no_leftovers(&launch.run_dir, vm.pid());

        if t.is_real() {
            t.note_skipped("a guest that powers off on Ctrl+Alt+Del");
            return;
        }
        // The fake's guest can be told to power off, as Linux would.
        let mut launch = env.launch("polite");
        launch.config.kernel_args += " ember_fake.ctrl_alt_del=exit";
        let vm = vmm.boot_vm(&launch).await.unwrap();
        vm.shutdown(Duration::from_secs(10)).await.unwrap();
        assert_eq!(vm.exit_status().as_deref(), Some("exit status: 0"));
        assert_no_leftovers(&launch.run_dir, vm.pid());
    }

    pub async fn vsock_dial_reports_what_the_guest_did(t: Target) {
        let env = Env::new();
        let mut launch = env.launch("vsock");
        launch.config.kernel_args += " ember_fake.vsock_listen=5000";
        let vm = t.vmm().boot_vm(&launch).await.unwrap();
        if t.is_real() {
            // The tiny guest has no vsock driver: nobody ever answers.
            let err = vm
                .dial_vsock(5000, Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(matches!(err, VmmError::Timeout { .. }), "{err}");
            t.note_skipped("a guest that accepts or resets vsock connections");
        } else {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut conn = vm.dial_vsock(5000, Duration::from_secs(5)).await.unwrap();
            assert!(conn.host_port >= 1 << 30);
            conn.stream.write_all(b"ping").await.unwrap();
            let mut echo = [0u8; 4];
            conn.stream.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, b"ping");
            let err = vm
                .dial_vsock(5001, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, VmmError::Refused { message, .. } if message.contains("5001")),
                "{err}"
            );
            vm.pause().await.unwrap();
            let err = vm
                .dial_vsock(5000, Duration::from_millis(300))
                .await
                .unwrap_err();
            assert!(matches!(err, VmmError::Timeout { .. }), "{err}");
        }
        let (pid, run_dir) = (vm.pid(), launch.run_dir.clone());
        vm.kill().await.unwrap();
        assert_no_leftovers(&run_dir, pid);
    }

    pub async fn snapshot_targets_are_checked(t: Target) {
        let env = Env::new();
        let launch = env.launch("targets");
        let vm = t.vmm().boot_vm(&launch).await.unwrap();
        vm.pause().await.unwrap();
        std::fs::write(env.path("taken.mem"), b"precious").unwrap();
        let bad = [
            SnapshotRequest {
                kind: SnapshotKind::Diff,
                vmstate: env.path("x.vmstate"),
                memory: env.path("taken.mem"),
            },
            SnapshotRequest {
                kind: SnapshotKind::Full,
                vmstate: env.path("missing-dir/x.vmstate"),
                memory: env.path("x.mem"),
            },
            SnapshotRequest {
                kind: SnapshotKind::Full,
                vmstate: "/run/ember/vm/x.vmstate".into(),
                memory: env.path("x.mem"),
            },
        ];
        for request in &bad {
            let err = vm.snapshot(request).await.unwrap_err();
            assert!(matches!(err, VmmError::Config(_)), "{request:?}: {err}");
        }
        assert_eq!(std::fs::read(env.path("taken.mem")).unwrap(), b"precious");
        assert!(!env.path("x.vmstate").exists() && !env.path("x.mem").exists());
        let (pid, run_dir) = (vm.pid(), launch.run_dir.clone());
        vm.kill().await.unwrap();
        assert_no_leftovers(&run_dir, pid);
    }

    pub async fn jailed_vm_snapshots_restore_unjailed(t: Target) {
        let Some(jailer) = std::env::var_os("EMBER_JAILER_BIN").map(PathBuf::from) else {
            ember_testkit::report_skip(
                module_path!(),
                "needs EMBER_JAILER_BIN (a jailer matching EMBER_FIRECRACKER_BIN, which must be statically linked)",
            );
            return;
        };
        if !t.is_real() {
            // The jailer execs its binary inside an empty chroot, where the
            // fake (dynamically linked) cannot run.
            eprintln!("fake target: not checking the jailer (it needs a statically linked VMM)");
            return;
        }
        let env = Env::new();
        let chroot_base = env.path("jails");
        std::fs::create_dir(&chroot_base).unwrap();
        // An unprivileged jail user: the driver hands it the run directory;
        // the disk is the caller's to share.
        const NOBODY: u32 = 65534;
        std::os::unix::fs::chown(&env.root_drive, Some(NOBODY), Some(NOBODY)).unwrap();
        let mut config = t.config();
        config.jailer = Some(ember_vmm::firecracker::jailer::JailerConfig {
            chroot_base: chroot_base.clone(),
            ..ember_vmm::firecracker::jailer::JailerConfig::new(jailer, NOBODY, NOBODY)
        });
        let jailed = FirecrackerVmm::new(config);
        let a_launch = env.launch("jailed");
        let a = jailed.boot_vm(&a_launch).await.unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
            "the VMM does not run as the jail's user: {status}"
        );
        // Its root is the jail: the stable tree is there, the host's is not.
        let root = PathBuf::from(format!("/proc/{}/root", a.pid()));
        assert!(root.join("run/ember/vm/api.sock").exists());
        assert!(!root.join("etc/passwd").exists(), "not chrooted");
        guest::wait_for_ticks(&a.serial_log(), 1, TICK_WAIT);
        a.pause().await.unwrap();
        let snapshot = a
            .snapshot(&request(SnapshotKind::Full, &env, "jailed"))
            .await
            .unwrap();
        let before = serial_prefix(&a);
        let (a_pid, a_run) = (a.pid(), a_launch.run_dir.clone());
        a.kill().await.unwrap();
        assert_no_leftovers(&a_run, a_pid);
        let jails: Vec<_> = walk(&chroot_base);
        assert!(
            jails.iter().all(|p| !p.ends_with(&a_launch.vm_id)),
            "jail left behind: {jails:?}"
        );

        let b_launch = env.launch("free");
        let b = t
            .vmm()
            .restore_vm(
                &b_launch,
                &restore_spec(&snapshot, MemoryBackend::File(env.path("jailed.mem")), true),
            )
            .await
            .unwrap();
        continues(&before, &b);
        let (b_pid, b_run) = (b.pid(), b_launch.run_dir.clone());
        b.kill().await.unwrap();
        assert_no_leftovers(&b_run, b_pid);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }
}

/// Failures no VMM produces on purpose, against stand-in sockets.
mod transport {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn client(socket: &Path, call: Duration) -> ApiClient {
        ApiClient::new(
            socket,
            ApiTimeouts {
                call,
                snapshot: call,
            },
        )
    }

    /// Serve each connection with `answer` (after reading the request).
    fn answering(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(answer);
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn a_socket_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = client(&path, Duration::from_millis(300))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Timeout { call, after } if call == "GET /" && *after == Duration::from_millis(300)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (_dir, path) = answering(b"SSH-2.0-OpenSSH\r\n\r\n");
        let err = client(&path, Duration::from_secs(5))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Protocol { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_error_without_fault_message_is_a_protocol_error() {
        let (_dir, path) = answering(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nnope!");
        let err = client(&path, Duration::from_secs(5))
            .version()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Protocol { call, detail } if call == "GET /version" && detail.contains("nope!")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_refusal_keeps_the_fault_message_and_the_call() {
        let (_dir, path) = answering(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 29\r\n\r\n{\"fault_message\":\"no, sorry\"}",
        );
        let err = client(&path, Duration::from_secs(5))
            .patch_vm(ember_vmm::firecracker::models::VmState::Paused)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { call, message } if call == "PATCH /vm" && message == "no, sorry"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_wrong_body_on_success_is_a_protocol_error() {
        let (_dir, path) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"id\":1");
        let err = client(&path, Duration::from_secs(5))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Protocol { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_closed_connection_is_a_connection_error() {
        let (_dir, path) = answering(b"");
        let err = client(&path, Duration::from_secs(5))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Connection { .. }), "{err}");
    }

    #[tokio::test]
    async fn no_socket_is_a_connection_error() {
        let err = client(Path::new("/nonexistent/api.sock"), Duration::from_secs(5))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Connection { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_missing_binary_is_reported_before_anything_starts() {
        let env_dir = tempfile::tempdir().unwrap();
        let vmm = FirecrackerVmm::new(ember_vmm::firecracker::FirecrackerConfig {
            binary: Some(env_dir.path().join("no-firecracker")),
            ..Default::default()
        });
        let err = vmm.version().await.unwrap_err();
        assert!(matches!(err, VmmError::BinaryMissing { .. }), "{err}");
    }
}

/// Processes that are not a working VMM.
mod startup {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(env: &Env, name: &str, body: &str) -> PathBuf {
        let path = env.path(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn vmm(binary: PathBuf, startup: Duration) -> FirecrackerVmm {
        FirecrackerVmm::new(ember_vmm::firecracker::FirecrackerConfig {
            binary: Some(binary),
            startup_timeout: startup,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_vmm_that_dies_at_once_reports_its_status_and_log() {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root: the VMM runs in its own mount namespace"
        );
        let env = Env::new();
        let binary = script(&env, "dies", "echo 'no KVM here' >&2; exit 3");
        let launch = env.launch("dies");
        let err = vmm(binary, Duration::from_secs(10))
            .boot_vm(&launch)
            .await
            .unwrap_err();
        match err {
            VmmError::Exited { status, log_tail } => {
                assert_eq!(status, "exit status: 3");
                assert!(log_tail.contains("no KVM here"), "{log_tail}");
            }
            other => panic!("expected Exited, got {other}"),
        }
        assert_no_leftovers(&launch.run_dir, 0);
    }

    #[tokio::test]
    async fn a_vmm_that_never_opens_its_socket_is_killed_after_the_deadline() {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root: the VMM runs in its own mount namespace"
        );
        let env = Env::new();
        let binary = script(&env, "silent", "exec /bin/sleep 60");
        let launch = env.launch("silent");
        let err = vmm(binary, Duration::from_millis(300))
            .boot_vm(&launch)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VmmError::SocketTimeout { path, .. } if path.ends_with("api.sock")),
            "{err}"
        );
        assert!(
            processes_of(&launch.vm_id).is_empty(),
            "sleeper left running"
        );
        assert_no_leftovers(&launch.run_dir, 0);
    }
}
