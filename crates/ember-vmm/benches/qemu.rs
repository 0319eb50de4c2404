//! QEMU backend timings with the real guest: cold boot to the first serial
//! line, snapshot (device state only), and restore to running, for 256 and
//! 1024 MiB guests. Prints medians and each against the cold boot measured in
//! the same run (the machine is shared, so only ratios compare across runs).
//!
//! `EMBER_TEST_KERNEL=/path/to/vmlinux cargo bench -p ember-vmm --bench qemu`
//! (`EMBER_BENCH_ROUNDS` sets the rounds per size, default 5).

#[path = "../tests/linux_guest/mod.rs"]
mod linux_guest;

use std::path::Path;
use std::time::{Duration, Instant};

use ember_vmm::qemu::{Qemu, QemuConfig};
use ember_vmm::{MemoryBackend, RestoreSpec, SnapshotKind, SnapshotRequest, Vm};
use linux_guest::{Console, Workspace, copy_sparse};

#[derive(Default)]
struct Samples {
    first_line: Vec<Duration>,
    init: Vec<Duration>,
    first_tick: Vec<Duration>,
    snapshot: Vec<Duration>,
    copy: Vec<Duration>,
    restore_running: Vec<Duration>,
    restore_tick: Vec<Duration>,
}

fn main() {
    let kernel = match linux_guest::guest_prerequisites() {
        Ok(kernel) => kernel,
        Err(why) => {
            eprintln!("SKIPPED qemu bench: {why}");
            return;
        }
    };
    let rounds: usize = std::env::var("EMBER_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let qemu = Qemu::new(QemuConfig::default()).unwrap();
        println!("accelerator: {}", qemu.accel());
        let ws = Workspace::new(kernel);
        for memory_mib in [256, 1024] {
            let mut s = Samples::default();
            for round in 0..rounds {
                measure(&qemu, &ws, memory_mib, round, &mut s).await;
            }
            report(memory_mib, &s);
        }
    });
}

async fn measure(qemu: &Qemu, ws: &Workspace, memory_mib: u32, round: usize, s: &mut Samples) {
    let id = format!("b{memory_mib}-{round}");
    let launch = ws.launch(&id, memory_mib);
    let started = Instant::now();
    let vm = qemu.boot_vm(&launch).await.unwrap();
    let serial = vm.serial_log();
    s.first_line.push(poll(started, || has_line(&serial)).await);
    s.init
        .push(poll(started, || Console::read(&serial).init).await);
    s.first_tick
        .push(poll(started, || !Console::read(&serial).ticks.is_empty()).await);
    // Let the pattern and a checksum exist, as the tests do.
    poll(started, || !Console::read(&serial).sums.is_empty()).await;

    vm.pause().await.unwrap();
    let vmstate = ws.path().join(format!("{id}.vmstate"));
    let request = SnapshotRequest {
        kind: SnapshotKind::Full,
        vmstate: vmstate.clone(),
        memory: ws.path().join(format!("{id}.unused")),
    };
    let t = Instant::now();
    vm.snapshot(&request).await.unwrap();
    s.snapshot.push(t.elapsed());
    let ram = launch.memory_file.clone().unwrap();
    vm.kill().await.unwrap();

    let copy = ws.path().join(format!("{id}.restore.ram"));
    let t = Instant::now();
    copy_sparse(&ram, &copy);
    s.copy.push(t.elapsed());
    let restored = ws.launch(&format!("{id}-r"), memory_mib);
    let t = Instant::now();
    let vm = qemu
        .restore_vm(
            &restored,
            &RestoreSpec {
                vmstate,
                memory: MemoryBackend::File(copy.clone()),
                track_dirty_pages: false,
                resume: true,
            },
        )
        .await
        .unwrap();
    s.restore_running.push(t.elapsed());
    let serial = vm.serial_log();
    s.restore_tick
        .push(poll(t, || !Console::read(&serial).ticks.is_empty()).await);
    vm.kill().await.unwrap();
    for f in [&ram, &copy] {
        let _ = std::fs::remove_file(f);
    }
}

fn has_line(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.contains(&b'\n'))
}

async fn poll(since: Instant, done: impl Fn() -> bool) -> Duration {
    let limit = Duration::from_secs(120);
    loop {
        if done() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "guest made no progress in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn report(memory_mib: u32, s: &Samples) {
    let base = median(&s.first_line);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\n{memory_mib} MiB guest, median of {} rounds",
        s.first_line.len()
    );
    let rows = [
        ("cold boot → first serial line (baseline)", &s.first_line),
        ("cold boot → /init's first line", &s.init),
        (
            "cold boot → first tick (after 1 MiB urandom)",
            &s.first_tick,
        ),
        ("snapshot (device state only)", &s.snapshot),
        ("copy RAM file (data extents)", &s.copy),
        ("restore → running (cont done)", &s.restore_running),
        ("restore → first tick on console", &s.restore_tick),
    ];
    for (name, samples) in rows {
        let m = median(samples);
        println!(
            "  {name:<46} {:>9.1} ms   {:>7.4}× baseline   (min {:.1}, max {:.1})",
            ms(m),
            m.as_secs_f64() / base.as_secs_f64(),
            ms(*samples.iter().min().unwrap()),
            ms(*samples.iter().max().unwrap()),
        );
    }
}
