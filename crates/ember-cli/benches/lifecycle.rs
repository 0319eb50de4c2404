//! Host-agent lifecycle benchmark: a real `ember agent` with real microVMs.
//! Prints ratios against baselines measured in the same run:
//!
//! - resume → first exec vs cold boot → first exec (median of 5 each);
//! - what the pause's fsync'd intent record adds to a pause;
//! - pause time against memory size (idle guest, and after the guest filled
//!   64 MiB of its memory), with the bytes each build stored;
//! - the size of a diff build after a small change vs the first build;
//! - host memory of 10 sandboxes forked from one template vs 10 cold-booted.
//!
//! Needs root and a built guest image. Run:
//! `cargo bench -p ember-cli --bench lifecycle`.

#[path = "../tests/support/agent.rs"]
#[allow(dead_code)]
mod agent;

use std::time::{Duration, Instant};

use agent::*;
use ember_proto::host as pb;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Bytes a build stores itself (its data files, headers, vmstate).
fn build_bytes(home: &AgentHome, build: &str) -> u64 {
    let meta = std::fs::read(home.data().join("builds").join(build).join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    meta["files"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f["size"].as_u64().unwrap())
        .sum()
}

async fn create(c: &mut Client, memory_mib: u32, build: &str) -> String {
    create_timed(c, memory_mib, build).await.sandbox_id
}

/// Create, returning the agent's answer (with its phases). Without a
/// build it is a cold boot: what every other number is compared against.
async fn create_timed(c: &mut Client, memory_mib: u32, build: &str) -> pb::Sandbox {
    let id = new_id();
    let mut req = create_request(&id);
    req.memory_mib = if build.is_empty() { memory_mib } else { 0 };
    req.build_id = build.to_owned();
    req.cold = build.is_empty();
    c.create_sandbox(req).await.expect("create").into_inner()
}

/// A plain create as users make it: forked from the warm base once there
/// is one (the first create of a shape boots and makes it).
async fn create_plain(c: &mut Client, memory_mib: u32) -> pb::Sandbox {
    let id = new_id();
    let mut req = create_request(&id);
    req.memory_mib = memory_mib;
    c.create_sandbox(req).await.expect("create").into_inner()
}

/// Phase timings of many runs of each operation, printed as one table of
/// medians (ms): a row per phase, a column per operation.
#[derive(Default)]
struct PhaseTable {
    columns: Vec<(&'static str, Vec<pb::Sandbox>)>,
}

impl PhaseTable {
    fn add(&mut self, op: &'static str, answer: pb::Sandbox) {
        match self.columns.iter_mut().find(|(name, _)| *name == op) {
            Some((_, runs)) => runs.push(answer),
            None => self.columns.push((op, vec![answer])),
        }
    }

    fn print(&self) {
        let mut phases: Vec<String> = Vec::new();
        for (_, runs) in &self.columns {
            for p in runs.iter().flat_map(|r| &r.phases) {
                if p.name != "total" && !phases.contains(&p.name) {
                    phases.push(p.name.clone());
                }
            }
        }
        phases.push("total".to_owned());
        print!("  {:<16}", "phase (ms)");
        for (op, runs) in &self.columns {
            print!(" {:>12}", format!("{op} ({})", runs.len()));
        }
        println!();
        for phase in &phases {
            print!("  {phase:<16}");
            for (_, runs) in &self.columns {
                let times: Vec<Duration> = runs
                    .iter()
                    .filter_map(|r| r.phases.iter().find(|p| &p.name == phase))
                    .map(|p| Duration::from_micros(p.micros))
                    .collect();
                if times.is_empty() {
                    print!(" {:>12}", "-");
                } else {
                    print!(" {:>12.1}", ms(median(times)));
                }
            }
            println!();
        }
    }
}

async fn destroy(c: &mut Client, id: &str) {
    c.destroy_sandbox(pb::SandboxRef {
        sandbox_id: id.to_owned(),
    })
    .await
    .expect("destroy");
}

async fn pause(c: &mut Client, id: &str) -> pb::Sandbox {
    c.pause_sandbox(pb::SandboxRef {
        sandbox_id: id.to_owned(),
    })
    .await
    .expect("pause")
    .into_inner()
}

async fn resume(c: &mut Client, id: &str) -> pb::Sandbox {
    c.resume_sandbox(pb::ResumeSandboxRequest {
        sandbox_id: id.to_owned(),
        ..Default::default()
    })
    .await
    .expect("resume")
    .into_inner()
}

fn main() {
    if !ember_testkit::is_root() || image_dir().is_none() {
        eprintln!(
            "lifecycle bench: needs root and a built guest image (ember image build); skipped"
        );
        return;
    }
    let mut home = AgentHome::new();
    // EMBER_BENCH_LOG=FILE: keep the agent's debug log there.
    let keep_log = std::env::var_os("EMBER_BENCH_LOG");
    if keep_log.is_some() {
        home.extra_env.push((
            "EMBER_LOG".into(),
            "info,ember_agent=debug,ember_guest_api=debug".into(),
        ));
    }
    // Room for the ten forks and ten cold boots of part 4 on a small host.
    let agent = home.start_with(&["--capacity-vcpus", "64"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = agent.client().await;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("lifecycle bench (QEMU backend; load average {})", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));

        // 1. Cold boot vs resume vs fork, each to the first exec's exit,
        // with the agent's phases of each operation.
        let mut table = PhaseTable::default();
        let mut cold = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let sb = create_timed(&mut c, 512, "").await;
            sh(&mut c, &sb.sandbox_id, "true").await;
            cold.push(t.elapsed());
            destroy(&mut c, &sb.sandbox_id).await;
            table.add("cold", sb);
        }
        // Plain creates: the first boots and makes the warm base, the
        // later ones fork from it.
        let t = Instant::now();
        let sb = create_plain(&mut c, 512).await;
        sh(&mut c, &sb.sandbox_id, "true").await;
        let warm_first = t.elapsed();
        destroy(&mut c, &sb.sandbox_id).await;
        table.add("create, makes warm", sb);
        let mut plain = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let sb = create_plain(&mut c, 512).await;
            sh(&mut c, &sb.sandbox_id, "true").await;
            plain.push(t.elapsed());
            destroy(&mut c, &sb.sandbox_id).await;
            table.add("create (warm)", sb);
        }
        let id = create(&mut c, 512, "").await;
        // The record this sandbox's pause writes its intent into, read while
        // it runs, for part 1b.
        let running_record: ember_agent::SandboxRecord = serde_json::from_slice(
            &std::fs::read(home.data().join("sandboxes").join(&id).join("state.json")).unwrap(),
        )
        .unwrap();
        let mut warm = Vec::new();
        let mut pauses = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            table.add("pause", pause(&mut c, &id).await);
            pauses.push(t.elapsed());
            let t = Instant::now();
            let sb = resume(&mut c, &id).await;
            sh(&mut c, &id, "true").await;
            warm.push(t.elapsed());
            table.add("resume", sb);
        }
        // Forks of a template made from this sandbox: the first fork and
        // the later ones separately (the first must not pay for preparing
        // the template).
        let snap = c
            .create_snapshot(pb::CreateSnapshotRequest { sandbox_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        destroy(&mut c, &id).await;
        let mut first_fork = Duration::ZERO;
        let mut forks = Vec::new();
        for i in 0..6 {
            let t = Instant::now();
            let sb = create_timed(&mut c, 0, &snap.build_id).await;
            sh(&mut c, &sb.sandbox_id, "true").await;
            let took = t.elapsed();
            destroy(&mut c, &sb.sandbox_id).await;
            if i == 0 {
                first_fork = took;
                table.add("first fork", sb);
            } else {
                forks.push(took);
                table.add("fork", sb);
            }
        }
        c.delete_snapshot(pb::DeleteSnapshotRequest { build_id: snap.build_id })
            .await
            .unwrap();
        let (cold, warm, fork) = (median(cold), median(warm), median(forks));
        let plain = median(plain);
        println!();
        println!("to first exec (median of 5)    ms      ratio");
        println!("  cold boot + exec          {:>8.0}    1.00", ms(cold));
        println!("  create (makes warm base)  {:>8.0}    {:.3}", ms(warm_first), ms(warm_first) / ms(cold));
        println!("  create (warm base) + exec {:>8.0}    {:.3} (plain create is {:.1}x faster)", ms(plain), ms(plain) / ms(cold), ms(cold) / ms(plain));
        println!("  resume + exec             {:>8.0}    {:.3} (resume is {:.1}x faster)", ms(warm), ms(warm) / ms(cold), ms(cold) / ms(warm));
        println!("  first fork + exec         {:>8.0}    {:.3} (first fork is {:.1}x faster)", ms(first_fork), ms(first_fork) / ms(cold), ms(cold) / ms(first_fork));
        println!("  later fork + exec         {:>8.0}    {:.3} (fork is {:.1}x faster)", ms(fork), ms(fork) / ms(cold), ms(cold) / ms(fork));
        let pause_med = median(pauses);
        println!("  pause (same sandbox)      {:>8.0}    {:.3}", ms(pause_med), ms(pause_med) / ms(cold));
        println!();
        println!("where the host agent's time goes (median per phase; concurrent phases overlap)");
        table.print();
        if std::env::var_os("EMBER_BENCH_QUICK").is_some() {
            println!("(EMBER_BENCH_QUICK set: the other parts skipped)");
            if let Some(path) = &keep_log {
                std::fs::write(path, home.logs()).unwrap();
            }
            return;
        }

        // 1b. What durability adds to a pause: the build's intent is one more
        // fsync'd record write (record + directory) before the build begins;
        // clearing it rides on the write that marks the sandbox paused, and
        // resume adds nothing on a clean start. Timed here on the same
        // filesystem, against the pause measured above.
        let scratch = home.data().parent().unwrap().join("intent-bench");
        let records = ember_agent::records::Records::open(&scratch).unwrap();
        let mut writes = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            records.save(&running_record).unwrap();
            writes.push(t.elapsed());
        }
        let write_med = median(writes);
        let without = pause_med.saturating_sub(write_med);
        println!();
        println!("durability cost of a pause         ms      ratio");
        println!("  pause without the intent write {:>7.1}    1.000", ms(without));
        println!("  pause with it (measured)       {:>7.1}    {:.3}", ms(pause_med), ms(pause_med) / ms(without));
        println!("  the intent write (median of 21) {:>6.2}", ms(write_med));
        let _ = std::fs::remove_dir_all(&scratch);

        // 2. Pause time against memory size.
        println!();
        println!("pause vs memory size   idle: ms   stored MiB | after filling 64 MiB: ms   stored MiB");
        for mem in [256u32, 512, 1024, 2048] {
            let id = create(&mut c, mem, "").await;
            let t = Instant::now();
            let idle = pause(&mut c, &id).await;
            let idle_ms = ms(t.elapsed());
            let idle_mib = build_bytes(&home, &idle.build_id) as f64 / 1048576.0;
            resume(&mut c, &id).await;
            let (_, err, code) = sh(
                &mut c,
                &id,
                "python3 -c \"import os; open('/dev/shm/fill','wb').write(os.urandom(64<<20))\"",
            )
            .await;
            assert_eq!(code, 0, "{err}");
            let t = Instant::now();
            let full = pause(&mut c, &id).await;
            let full_ms = ms(t.elapsed());
            let full_mib = build_bytes(&home, &full.build_id) as f64 / 1048576.0;
            println!(
                "  {mem:>5} MiB             {idle_ms:>8.0}   {idle_mib:>10.1} |                     {full_ms:>8.0}   {full_mib:>10.1}"
            );
            destroy(&mut c, &id).await;
        }

        // 3. Diff build after a small change vs the first build.
        let id = create(&mut c, 512, "").await;
        let first = pause(&mut c, &id).await;
        resume(&mut c, &id).await;
        sh(&mut c, &id, "head -c 1048576 /dev/urandom > /home/user/small && sync").await;
        let second = pause(&mut c, &id).await;
        let (a, b) = (build_bytes(&home, &first.build_id), build_bytes(&home, &second.build_id));
        println!();
        println!("build sizes                      MiB     ratio");
        println!("  first pause (full)        {:>8.1}     1.000", a as f64 / 1048576.0);
        println!("  after writing 1 MiB       {:>8.1}     {:.3}", b as f64 / 1048576.0, b as f64 / a as f64);
        println!("  nominal memory + disk     {:>8.1}", 512.0 + 2048.0);
        destroy(&mut c, &id).await;

        // 4. Host memory: 10 forks of one template vs 10 cold boots.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let base = host_used_mib();
        let mut ids = Vec::new();
        for _ in 0..10 {
            ids.push(create(&mut c, 256, "").await);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cold_mib = host_used_mib() - base;
        for id in ids.drain(..) {
            destroy(&mut c, &id).await;
        }
        let src = create(&mut c, 256, "").await;
        let snap = c
            .create_snapshot(pb::CreateSnapshotRequest { sandbox_id: src.clone() })
            .await
            .unwrap()
            .into_inner();
        destroy(&mut c, &src).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let base = host_used_mib();
        let t = Instant::now();
        for _ in 0..10 {
            ids.push(create(&mut c, 0, &snap.build_id).await);
        }
        let fork_time = t.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let fork_mib = host_used_mib() - base;
        for id in ids.drain(..) {
            destroy(&mut c, &id).await;
        }
        println!();
        println!("host memory of 10 sandboxes (256 MiB each)   MiB used   ratio");
        println!("  10 cold-booted                            {cold_mib:>8.0}    1.00");
        println!("  10 forked from one template               {fork_mib:>8.0}    {:.2}", fork_mib / cold_mib);
        println!("  (10 forks created in {:.1} s)", fork_time.as_secs_f64());
        c.delete_snapshot(pb::DeleteSnapshotRequest { build_id: snap.build_id })
            .await
            .unwrap();
    });
    if let Some(path) = &keep_log {
        std::fs::write(path, home.logs()).unwrap();
    }
}
