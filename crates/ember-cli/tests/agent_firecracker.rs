//! The host agent on its Firecracker backend, end to end over gRPC: boot,
//! pause (a Full build, then Diff builds of only the pages dirtied since),
//! resume through a page server the agent spawned and confined, five
//! generations with guest memory intact, an agent crash that re-adopts a
//! live page server, and a page server killed under a running VM.
//!
//! Linux guests cannot run under this machine's KVM, so the VMM is
//! `ember-fc-fake`: Firecracker's API, snapshot files and userfaultfd
//! handshake for real (a real userfaultfd handed to the real page server
//! over SCM_RIGHTS), a simulated vCPU that walks and dirties guest pages,
//! and memory checksums on its console when it snapshots and restores.
//! Its guests have no guest agent, so the agent runs with the test-only
//! `--guest-ready-serial` readiness. `scripts/test-kvm` runs the real
//! suites with Firecracker and a Linux guest where KVM allows.

mod support;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use ember_proto::host as pb;
use ember_testkit::require;
use support::agent::{AgentHome, Client, assert_clean, create_request, new_id, state};

fn preconditions() -> bool {
    ember_testkit::is_root() && support::agent::image_dir().is_some()
}

/// A sandbox's serial console, read through a descriptor that outlives
/// the run directory (a pause removes it).
struct Console {
    file: std::fs::File,
    seen: String,
}

impl Console {
    fn open(home: &AgentHome, id: &str) -> Console {
        let path = home.run_dir().join("vms").join(id).join("serial.log");
        Console {
            file: std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
            seen: String::new(),
        }
    }

    /// Everything written since the console was opened.
    fn text(&mut self) -> &str {
        let mut more = String::new();
        self.file.read_to_string(&mut more).unwrap();
        self.seen.push_str(&more);
        &self.seen
    }

    /// The checksum on the last line that starts with `prefix`.
    fn checksum(&mut self, prefix: &str) -> Option<String> {
        self.text()
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("ember-fc-fake: "))
            .filter_map(|l| l.strip_prefix(prefix))
            .find_map(|rest| rest.rsplit(' ').next())
            .map(str::to_owned)
    }
}

async fn create(client: &mut Client) -> String {
    let id = new_id();
    let mut req = create_request(&id);
    req.cold = true;
    req.memory_mib = 128;
    let sb = client
        .create_sandbox(req)
        .await
        .expect("create")
        .into_inner();
    assert_eq!(state(&sb), pb::SandboxState::Running, "{sb:?}");
    id
}

fn sref(id: &str) -> pb::SandboxRef {
    pb::SandboxRef {
        sandbox_id: id.to_owned(),
    }
}

async fn pause(client: &mut Client, id: &str) -> pb::Sandbox {
    let sb = client
        .pause_sandbox(sref(id))
        .await
        .expect("pause")
        .into_inner();
    assert_eq!(state(&sb), pb::SandboxState::Paused, "{sb:?}");
    sb
}

async fn resume(client: &mut Client, id: &str) -> pb::Sandbox {
    let sb = client
        .resume_sandbox(pb::ResumeSandboxRequest {
            sandbox_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(state(&sb), pb::SandboxState::Running, "{sb:?}");
    sb
}

/// Bytes a build's memory file holds on disk (its allocated blocks).
fn memory_bytes_held(home: &AgentHome, build: &str) -> u64 {
    let path = home.data().join("builds").join(build).join("memfile");
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .blocks()
        * 512
}

/// This home's page server processes (`ember uffd`).
fn page_servers(home: &AgentHome) -> Vec<u32> {
    home.processes()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"uffd"))
        })
        .collect()
}

/// Pause, check the build and the checksum the fake wrote at the
/// snapshot; resume and check the same memory came back through the page
/// server. Returns the console of the resumed VM.
async fn generation(
    home: &AgentHome,
    client: &mut Client,
    id: &str,
    mut console: Console,
    generation: usize,
) -> Console {
    let paused = pause(client, id).await;
    let kind = if generation == 0 { "Full" } else { "Diff" };
    let at_snapshot = console
        .checksum(&format!("snapshot {kind} memory checksum"))
        .unwrap_or_else(|| {
            panic!(
                "generation {generation}: no {kind} snapshot on the console:\n{}",
                console.text()
            )
        });
    let held = memory_bytes_held(home, &paused.build_id);
    if generation > 0 {
        // The fake's vCPU dirties at most 65 pages between snapshots; the
        // rest of the 128 MiB comes from the builds below.
        assert!(
            held <= 1 << 20,
            "generation {generation}: a diff build holds {held} bytes of memory"
        );
    }
    let resumed = resume(client, id).await;
    eprintln!(
        "generation {generation}: {kind} build holds {} KiB of memory; resume {} ms ({})",
        held >> 10,
        resumed.last_operation_ms,
        resumed
            .phases
            .iter()
            .map(|p| format!("{} {} ms", p.name, p.micros / 1000))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        resumed.phases.iter().any(|p| p.name == "page_server"),
        "a resume on Firecracker starts a page server: {:?}",
        resumed.phases
    );
    assert_eq!(page_servers(home).len(), 1, "one page server serves the VM");
    // What it served, asked live: the fake read every page back.
    let served = client
        .get_sandbox_metrics(sref(id))
        .await
        .expect("sandbox metrics")
        .into_inner()
        .page_server
        .expect("a restored Firecracker VM has page server metrics");
    assert!(
        served.bytes_copied >= 128 << 20,
        "the page server handed the guest all of its memory: {served:?}"
    );
    assert_eq!(
        served.first_fault_us.is_some(),
        served.faults > 0,
        "the first fault's time is known once there was one: {served:?}"
    );
    if generation > 0 {
        // The pause filed the working set the last run recorded into the
        // new build; this resume prefetched it.
        assert!(
            served.pages_prefetched > 0 && served.prefetch_done_us.is_some(),
            "generation {generation}: the recorded working set was prefetched: {served:?}"
        );
    }
    eprintln!(
        "generation {generation}: page server: {} faults, {} MiB copied, first fault after {} us, \
         prefetch done after {:?} us",
        served.faults,
        served.bytes_copied >> 20,
        served.first_fault_us.unwrap_or_default(),
        served.prefetch_done_us
    );
    let mut console = Console::open(home, id);
    let restored = console
        .checksum("restored memory checksum")
        .expect("the fake reports the memory it restored");
    assert_eq!(
        restored, at_snapshot,
        "generation {generation}: memory came back different"
    );
    console
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_sandboxes_pause_as_diffs_and_resume_through_the_page_server_root() {
    require!(preconditions(), "needs root and the guest image");
    let home = AgentHome::fake_firecracker();
    let agent = home.start();
    let mut client = agent.client().await;

    let info = client
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.backend, "firecracker");
    let capacity = info.slots_free;
    assert!(capacity > 1, "a pool has slots: {info:?}");

    let id = create(&mut client).await;
    let mut console = Console::open(&home, &id);
    assert!(console.text().contains("guest running"));
    let info = client
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.slots_free,
        capacity - 1,
        "a running sandbox holds a slot"
    );

    // A test guest has no agent: commands are refused with the reason.
    let err = client
        .exec(pb::ExecRequest {
            sandbox_id: id.clone(),
            cmd: "true".into(),
            ..Default::default()
        })
        .await
        .expect_err("no guest agent to run commands");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("--guest-ready-serial"), "{err:?}");

    let mut builds = Vec::new();
    for g in 0..5 {
        console = generation(&home, &mut client, &id, console, g).await;
        let sb = client.get_sandbox(sref(&id)).await.unwrap().into_inner();
        builds.push(sb.build_id);
    }
    builds.dedup();
    assert_eq!(builds.len(), 5, "each pause made a build: {builds:?}");

    // The page servers' work shows in the host's metrics.
    let info = client
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let m = info.metrics.expect("host metrics");
    assert!(
        m.page_faults_served > 0 && m.page_server_bytes_copied > 0,
        "five restores' page faults and bytes are counted: {m:?}"
    );

    client.destroy_sandbox(sref(&id)).await.expect("destroy");
    assert_clean(&home);
    let info = client
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.slots_free, capacity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_crash_keeps_the_live_page_server_and_the_vm_it_serves_root() {
    require!(preconditions(), "needs root and the guest image");
    let home = AgentHome::fake_firecracker();
    let mut agent = home.start();
    let mut client = agent.client().await;
    let id = create(&mut client).await;
    let console = Console::open(&home, &id);
    let console = generation(&home, &mut client, &id, console, 0).await;
    let servers = page_servers(&home);
    assert_eq!(servers.len(), 1);

    agent.kill();
    let agent = home.start();
    let mut client = agent.client().await;
    let sb = client.get_sandbox(sref(&id)).await.unwrap().into_inner();
    assert_eq!(state(&sb), pb::SandboxState::Running, "{sb:?}");
    assert_eq!(
        page_servers(&home),
        servers,
        "the page server lives on and is adopted, not replaced"
    );
    // The adopted page server is stopped properly by the next pause, and
    // the memory makes the round trip again.
    generation(&home, &mut client, &id, console, 1).await;
    client.destroy_sandbox(sref(&id)).await.expect("destroy");
    assert_clean(&home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_page_server_stops_its_vm_and_fails_the_sandbox_cleanly_root() {
    require!(preconditions(), "needs root and the guest image");
    let home = AgentHome::fake_firecracker();
    let agent = home.start();
    let mut client = agent.client().await;
    let id = create(&mut client).await;
    let console = Console::open(&home, &id);
    generation(&home, &mut client, &id, console, 0).await;
    let [server] = page_servers(&home)[..] else {
        panic!("one page server")
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(server as i32, libc::SIGKILL) };

    let deadline = Instant::now() + Duration::from_secs(20);
    let sb = loop {
        let sb = client.get_sandbox(sref(&id)).await.unwrap().into_inner();
        if state(&sb) == pb::SandboxState::Failed || Instant::now() > deadline {
            break sb;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state(&sb), pb::SandboxState::Failed, "{sb:?}");
    assert!(
        sb.failure_reason.contains("page server"),
        "the reason names the page server: {}",
        sb.failure_reason
    );
    assert_eq!(
        home.processes(),
        Vec::<u32>::new(),
        "the VMM went with its page server"
    );
    // The last paused build is still there to look at or start from.
    assert!(
        home.data().join("builds").join(&sb.build_id).is_dir(),
        "the sandbox's last build is kept"
    );
    client.destroy_sandbox(sref(&id)).await.expect("destroy");
    assert_clean(&home);
}

/// Proportional and resident set size of a process, KiB.
fn pss_rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Rss:"))
}

/// The VMM (the fake) of one sandbox.
fn vmm_of(home: &AgentHome, id: &str) -> u32 {
    let pids: Vec<u32> = home
        .processes_of(id)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ember-fc-fake"))
        })
        .collect();
    assert_eq!(pids.len(), 1, "one VMM for {id}: {pids:?}");
    pids[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_bases_and_templates_fork_through_page_servers_root() {
    require!(preconditions(), "needs root and the guest image");
    let home = AgentHome::fake_firecracker();
    let agent = home.start();
    let mut client = agent.client().await;
    let plain = |id: &str| {
        let mut req = create_request(id);
        req.memory_mib = 128;
        req
    };

    // The first plain create boots and makes its shape's warm base.
    let first = new_id();
    let sb = client
        .create_sandbox(plain(&first))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&sb), pb::SandboxState::Running, "{sb:?}");
    assert_eq!(home.warm_builds().len(), 1, "a warm base was made");
    let warm = Console::open(&home, &first)
        .checksum("snapshot Full memory checksum")
        .expect("the warm base snapshot on the first console");

    // The next forks from it, through a page server.
    let second = new_id();
    let sb = client
        .create_sandbox(plain(&second))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&sb), pb::SandboxState::Running, "{sb:?}");
    assert!(sb.phases.iter().any(|p| p.name == "page_server"), "{sb:?}");
    let mut console = Console::open(&home, &second);
    assert_eq!(console.checksum("restored memory checksum"), Some(warm));

    // A template of the fork (a Diff over the warm base), and three forks
    // of the template, each with the template's memory.
    let template = client
        .create_snapshot(pb::CreateSnapshotRequest {
            sandbox_id: second.clone(),
        })
        .await
        .expect("snapshot")
        .into_inner();
    let at_template = console
        .checksum("snapshot Diff memory checksum")
        .expect("the template is a diff of the warm base");
    let mut forks = Vec::new();
    for _ in 0..3 {
        let id = new_id();
        let mut req = create_request(&id);
        req.build_id = template.build_id.clone();
        let sb = client.create_sandbox(req).await.expect("fork").into_inner();
        assert_eq!(state(&sb), pb::SandboxState::Running, "{sb:?}");
        let restored = Console::open(&home, &id).checksum("restored memory checksum");
        assert_eq!(restored.as_deref(), Some(at_template.as_str()));
        forks.push(id);
    }
    // What the forks cost: a page server copies every page it serves into
    // its VM, so forks share no guest memory (reported, not asserted).
    let (mut pss, mut rss) = (0, 0);
    for id in &forks {
        let (p, r) = pss_rss_kib(vmm_of(&home, id));
        pss += p;
        rss += r;
    }
    eprintln!(
        "3 forks of a 128 MiB template: VMM PSS {} MiB, RSS {} MiB in all",
        pss >> 10,
        rss >> 10
    );
    assert_eq!(
        page_servers(&home).len(),
        4,
        "one page server per restored VM"
    );

    for id in forks.iter().chain([&first, &second]) {
        client.destroy_sandbox(sref(id)).await.expect("destroy");
    }
    client
        .delete_snapshot(pb::DeleteSnapshotRequest {
            build_id: template.build_id.clone(),
        })
        .await
        .expect("delete template");
    assert_clean(&home);
}
