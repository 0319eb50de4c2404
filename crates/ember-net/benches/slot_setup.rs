//! How long a slot takes to set up, re-police and tear down, as a ratio to
//! the cheapest thing every slot does anyway: creating and deleting a bare
//! named network namespace. Needs root; prints why it skips otherwise.
//!
//! `cargo bench -p ember-net --bench slot_setup`

use std::process::Command;
use std::time::{Duration, Instant};

use ember_net::{EgressPolicy, Ipv4Cidr, PoolConfig, SlotPool};

const ROUNDS: u32 = 20;

fn main() {
    if !ember_testkit::is_root() {
        eprintln!("SKIPPED slot_setup: needs root to create network namespaces");
        return;
    }
    let prefix = format!("b{:04x}", std::process::id() & 0xffff);
    let run_dir = tempfile::tempdir().expect("temp dir");

    let baseline = time(ROUNDS, || {
        let ns = format!("{prefix}-bare");
        run("ip", &["netns", "add", &ns]);
        run("ip", &["netns", "del", &ns]);
    });

    let pool = SlotPool::new(PoolConfig {
        prefix: prefix.clone(),
        pool: "10.209.0.0/24".parse().expect("pool"),
        run_dir: run_dir.path().to_path_buf(),
    })
    .expect("pool config");
    // Keep one slot alive so the host table is not created and removed
    // every round (the steady state of a busy host).
    let _keep = pool.acquire(EgressPolicy::default()).expect("acquire");
    let mut acquire = Duration::ZERO;
    let mut release = Duration::ZERO;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let slot = pool.acquire(EgressPolicy::default()).expect("acquire");
        acquire += start.elapsed();
        let start = Instant::now();
        slot.release().expect("release");
        release += start.elapsed();
    }
    let mut slot = pool.acquire(EgressPolicy::default()).expect("acquire");
    let deny: Ipv4Cidr = "198.51.100.0/24".parse().expect("cidr");
    let policies = [
        EgressPolicy::default(),
        EgressPolicy {
            allow_out: vec![],
            deny_out: vec![deny],
        },
    ];
    let mut i = 0;
    let set_policy = time(ROUNDS, || {
        i += 1;
        slot.set_policy(policies[i % 2].clone())
            .expect("set_policy");
    });

    let per = |d: Duration| d / ROUNDS;
    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "baseline (ip netns add + del): {:?} per round",
        per(baseline)
    );
    println!(
        "acquire:    {:?} per slot, {:.1}x baseline",
        per(acquire),
        ratio(acquire)
    );
    println!(
        "release:    {:?} per slot, {:.1}x baseline",
        per(release),
        ratio(release)
    );
    println!(
        "set_policy: {:?} per change, {:.1}x baseline",
        per(set_policy),
        ratio(set_policy)
    );
}

fn time(rounds: u32, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..rounds {
        f();
    }
    start.elapsed()
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect("spawn");
    assert!(status.success(), "{program} {args:?}");
}
