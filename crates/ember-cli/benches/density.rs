//! Density: idle 512 MiB sandboxes started one after another on a real
//! `ember agent` with its default capacity settings, until the first
//! refusal (or `EMBER_DENSITY_MAX`, default 48). Reports how many, the
//! host memory and CPU each idle sandbox really costs (against its nominal
//! 512 MiB and one core, measured in the same run), and the exec latency
//! of the first and the last sandbox.
//!
//! Needs root and a built guest image. Run:
//! `cargo bench -p ember-cli --bench density`
//! (`EMBER_DENSITY_ARGS="--cpu-oversubscription 16"` passes agent flags).

#[path = "../tests/support/agent.rs"]
#[allow(dead_code)]
mod agent;

use std::time::{Duration, Instant};

use agent::*;
use ember_proto::host as pb;

const NOMINAL_MIB: u32 = 512;

/// (busy, total) jiffies of all host CPUs.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn exec_ms(c: &mut Client, id: &str) -> f64 {
    let t = Instant::now();
    let (_, err, code) = sh(c, id, "true").await;
    assert_eq!(code, 0, "{err}");
    ms(t.elapsed())
}

fn main() {
    if !ember_testkit::is_root() || image_dir().is_none() {
        eprintln!("density bench: needs root and a built guest image (ember image build); skipped");
        return;
    }
    let max: usize = std::env::var("EMBER_DENSITY_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let extra = std::env::var("EMBER_DENSITY_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let home = AgentHome::new();
    let agent = home.start_with(&extra);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = agent.client().await;
        let info = c
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        println!(
            "density bench (QEMU backend; capacity {} vCPUs, {} MiB nominal; agent flags {:?})",
            info.vcpus_total, info.memory_mib_total, extra
        );
        let used_before = host_used_mib();
        let mut ids = Vec::new();
        let mut create_exec = Vec::new();
        let stopped = loop {
            if ids.len() == max {
                break format!("EMBER_DENSITY_MAX={max} reached");
            }
            let id = new_id();
            let mut req = create_request(&id);
            req.memory_mib = NOMINAL_MIB;
            let t = Instant::now();
            if let Err(s) = c.create_sandbox(req).await {
                break format!("refused: {}", s.message());
            }
            let (_, err, code) = sh(&mut c, &id, "true").await;
            assert_eq!(code, 0, "{err}");
            create_exec.push(ms(t.elapsed()));
            ids.push(id);
            if ids.len() % 8 == 0 {
                println!("  {} sandboxes, host memory used +{:.0} MiB", ids.len(), host_used_mib() - used_before);
            }
        };
        let n = ids.len();
        assert!(n > 0, "no sandbox started: {stopped}");
        // Idle: nothing runs in them for ten seconds.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (b0, t0) = cpu_jiffies();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (b1, t1) = cpu_jiffies();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy_cores = (b1 - b0) as f64 / (t1 - t0) as f64 * cpus;
        let per_sandbox_mib = (host_used_mib() - used_before) / n as f64;
        let per_sandbox_cpu = busy_cores / n as f64 * 100.0;
        let first_exec = exec_ms(&mut c, &ids[0]).await;
        let last_exec = exec_ms(&mut c, &ids[n - 1]).await;
        println!();
        println!("idle 512 MiB sandboxes started: {n} ({stopped})");
        println!(
            "  host memory per idle sandbox  {per_sandbox_mib:>8.0} MiB   {:.3} of its nominal {NOMINAL_MIB} MiB",
            per_sandbox_mib / f64::from(NOMINAL_MIB)
        );
        println!(
            "  host CPU per idle sandbox     {per_sandbox_cpu:>8.2} %     of one core ({busy_cores:.2} cores busy in all, agent included)"
        );
        println!(
            "  create + exec, first / last   {:>8.0} / {:.0} ms   ratio {:.2}",
            create_exec[0],
            create_exec[n - 1],
            create_exec[n - 1] / create_exec[0]
        );
        println!(
            "  exec when all idle, first / last {:>5.0} / {last_exec:.0} ms   ratio {:.2}",
            first_exec,
            last_exec / first_exec
        );
        for id in ids {
            c.destroy_sandbox(pb::SandboxRef { sandbox_id: id })
                .await
                .unwrap();
        }
    });
}
