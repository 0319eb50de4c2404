//! Chaos: sandboxes that hold files and a process's memory, driven through
//! random create/exec/pause/resume/snapshot/destroy while the harness kills
//! the host agent (at its failure points and at random moments), a VMM, or
//! the control plane, and restarts each. After every step it checks what a
//! user is promised:
//!
//! - every sandbox acknowledged as paused resumes with its file and its
//!   process's memory (checked whenever it is resumed, and at the end);
//! - every running sandbox answers exec, with its file and process intact;
//! - no sandbox is failed unless its VM really died (the harness killed it);
//! - every template the control plane lists spawns sandboxes carrying the
//!   state it was frozen with;
//! - at the end nothing is left: no VMM process, namespace, host link, RAM
//!   file, mount, run directory, disk layer, sandbox record or build.
//!
//! `EMBER_CHAOS_SEED` replays a run (the seed is printed); `EMBER_CHAOS_STEPS`
//! sets its length. The page server is not in this run: the QEMU backend
//! (all these machines can boot) has none; `firecracker_uffd` kills it.

use std::collections::BTreeMap;
use std::fmt;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::support::server::{ExecOutput, ServerProc, TestDb};

const LIVE: usize = 3;
const DEFAULT_STEPS: usize = 14;
const SETTLE: Duration = Duration::from_secs(120);

/// One run per suite: the seed picks the store (odd seeds use PostgreSQL
/// when `EMBER_TEST_POSTGRES_URL` is set), so runs cover both
/// without doubling the suite's time; the printed line says which.
#[test]
fn chaos_root_vm() {
    require_vm!();
    runtime().block_on(async {
        let seed = chaos_seed();
        let pg = std::env::var(crate::support::server::PG_ENV).is_ok();
        let db = if seed % 2 == 1 && pg {
            TestDb::postgres().await
        } else {
            TestDb::sqlite()
        };
        chaos(db, seed).await
    });
}

fn chaos_seed() -> u64 {
    std::env::var("EMBER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// One sandbox as the harness knows it.
#[derive(Debug, Clone)]
struct Tracked {
    id: String,
    /// Acknowledged contents of /root/counter, and a write whose reply was
    /// lost (it may or may not have happened).
    counter: u64,
    unsure: Option<u64>,
    /// What the holder process keeps in its memory (its environment).
    marker: String,
    expect: Expect,
    /// The harness SIGKILLed its VMM: `failed` is the right outcome.
    vm_killed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Running,
    Paused,
    /// A call whose reply was lost: either is right.
    RunningOrPaused,
}

#[derive(Debug, Clone)]
struct TemplateInfo {
    name: String,
    marker: String,
    counters: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Exec,
    Pause,
    Resume,
    Snapshot,
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// The agent aborts at this failure point.
    AgentAt(&'static str),
    /// SIGKILL the agent this many ms into the call.
    AgentKill,
    /// SIGKILL the control plane this many ms into the call.
    ServerKill,
    /// SIGKILL a running sandbox's VMM (before the call).
    VmmKill,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::AgentAt(p) => write!(f, "agent abort at {p}"),
            Fault::AgentKill => f.write_str("agent SIGKILL at a random moment"),
            Fault::ServerKill => f.write_str("control plane SIGKILL at a random moment"),
            Fault::VmmKill => f.write_str("VMM SIGKILL"),
        }
    }
}

fn failure_points(op: Op) -> &'static [&'static str] {
    match op {
        Op::Exec => &[],
        Op::Pause => &["pause.before", "pause.committed", "pause.after"],
        Op::Resume => &["resume.before", "resume.after"],
        Op::Snapshot => &["snapshot.before", "snapshot.committed", "snapshot.after"],
        Op::Replace => &[
            "destroy.before",
            "destroy.after",
            "create.before",
            "create.after",
        ],
    }
}

/// The processes under test and how to bring each back.
struct World<'a> {
    spec: ServerSpec<'a>,
    server: ServerProc,
    home: AgentHome,
    agent: support::agent::AgentProc,
    admin_key: String,
    key: String,
}

impl World<'_> {
    fn api(&self) -> Api {
        self.server.api(&self.key)
    }

    fn admin(&self) -> Api {
        self.server.api(&self.admin_key)
    }

    /// (Re)start the agent with these failure points armed, and wait until
    /// the control plane reaches it at its new address.
    async fn restart_agent(&mut self, failpoints: &str) {
        self.agent.kill();
        self.home.extra_env.retain(|(k, _)| k != "EMBER_FAILPOINTS");
        self.home
            .extra_env
            .push(("EMBER_FAILPOINTS".into(), failpoints.into()));
        self.agent = self
            .home
            .start_with(&["--control-plane", &self.server.base]);
        self.wait_host().await;
    }

    async fn wait_host(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (_, hosts) = self.admin().get("/v1/hosts").await;
            let ready = hosts["hosts"].as_array().is_some_and(|h| {
                h.iter().any(|h| {
                    h["healthy"] == true
                        && h["address"]
                            .as_str()
                            .is_some_and(|a| a.contains(&self.agent.addr))
                })
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come back: {hosts}\n{}",
                self.home.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn restart_server(&mut self) {
        // Drop kills (SIGKILL) the old one.
        self.server = self.spec.start();
        self.wait_host().await;
    }
}

/// An HTTP call that reports a broken connection instead of panicking.
async fn try_call(req: reqwest::RequestBuilder) -> Result<(StatusCode, Value), String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

async fn try_post(a: &Api, path: &str, body: Value) -> Result<(StatusCode, Value), String> {
    try_call(a.http.post(a.url(path)).bearer_auth(&a.key).json(&body)).await
}

async fn try_sh(a: &Api, id: &str, script: &str) -> Result<ExecOutput, String> {
    let req = a
        .http
        .post(a.url(&format!("/v1/sandboxes/{id}/exec")))
        .bearer_auth(&a.key)
        .timeout(Duration::from_secs(60))
        .json(&json!({"cmd": "sh", "args": ["-c", script]}));
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(format!("{status}: {text}"));
    }
    if text.contains("\"type\":\"error\"") {
        return Err(text);
    }
    Ok(ExecOutput::from_ndjson(&text))
}

/// The state a sandbox settles in once nothing is in flight for it.
async fn settle(a: &Api, id: &str) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (st, sb) = a.get(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{id}: {sb}");
        if matches!(sb["state"].as_str(), Some("running" | "paused" | "failed")) {
            return sb;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not settle within {SETTLE:?}: {sb}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const HOLD: &str = "CHAOS_MARK";

/// Give a fresh sandbox its file and its memory-holding process.
async fn prepare(a: &Api, id: &str, marker: &str) {
    let script = format!(
        "echo 0 > /root/counter && ({HOLD}={marker} exec sleep 1000000) \
         </dev/null >/dev/null 2>&1 & echo $! > /root/holder.pid && sync"
    );
    let out = a.sh(id, &script).await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
}

/// What a running sandbox holds: its counter file and its holder's memory.
async fn observe(a: &Api, id: &str) -> Result<(u64, String), String> {
    let out = try_sh(
        a,
        id,
        &format!(
            "cat /root/counter; tr '\\0' '\\n' < /proc/$(cat /root/holder.pid)/environ | grep '^{HOLD}='"
        ),
    )
    .await?;
    let mut lines = out.stdout.lines();
    let counter = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("no counter: {out:?}"))?;
    let marker = lines
        .next()
        .and_then(|l| l.strip_prefix(&format!("{HOLD}=")))
        .ok_or_else(|| format!("the holder process is gone: {out:?}"))?;
    Ok((counter, marker.to_owned()))
}

#[derive(Default)]
struct Counts {
    ops: BTreeMap<String, usize>,
    acked: usize,
    faults: BTreeMap<String, usize>,
    checks: usize,
    failed_by_vm_kill: usize,
}

async fn chaos(db: TestDb, seed: u64) {
    let steps: usize = std::env::var("EMBER_CHAOS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_STEPS);
    let store = if db.url.starts_with("sqlite") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    eprintln!("chaos: seed {seed} (EMBER_CHAOS_SEED replays it), {steps} steps, {store}");
    let mut rng = StdRng::seed_from_u64(seed);

    let spec = ServerSpec::new(&db, None)
        .config("orphan_grace_s = 5")
        .config("stuck_after_s = 5");
    let server = spec.start();
    let admin_key = server.admin_key.clone().unwrap();
    let (_, key) = server.api(&admin_key).team_with_key("chaos").await;
    let mut home = AgentHome::new();
    home.token = spec.join_token.clone();
    let agent = home.start_with(&["--control-plane", &server.base]);
    let mut w = World {
        spec,
        server,
        home,
        agent,
        admin_key,
        key,
    };
    w.wait_host().await;

    let mut counts = Counts::default();
    let mut live: Vec<Tracked> = Vec::new();
    let mut templates: Vec<TemplateInfo> = Vec::new();
    let mut next_value = 1u64;

    // A template to fork from, frozen with its own file and process.
    {
        let a = w.api();
        let src = a.create(base(json!({}))).await;
        let src_id = src["id"].as_str().unwrap().to_owned();
        prepare(&a, &src_id, "tpl0").await;
        let (st, t) = a
            .post(
                &format!("/v1/sandboxes/{src_id}/snapshots"),
                json!({"name": "chaos-tpl0"}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t}");
        templates.push(TemplateInfo {
            name: "chaos-tpl0".into(),
            marker: "tpl0".into(),
            counters: vec![0],
        });
        let (st, b) = a.delete(&format!("/v1/sandboxes/{src_id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    }
    for i in 0..LIVE {
        let t = spawn(&w.api(), &templates, i % 2 == 1, &mut rng).await;
        live.push(t);
    }

    for step in 0..steps {
        let i = rng.gen_range(0..live.len());
        let ops: &[Op] = if live[i].expect == Expect::Paused {
            &[Op::Resume, Op::Resume, Op::Replace]
        } else {
            &[Op::Exec, Op::Pause, Op::Pause, Op::Snapshot, Op::Replace]
        };
        let op = *ops.choose(&mut rng).unwrap();
        let fault = match rng.gen_range(0..100) {
            0..40 => None,
            40..65 if !failure_points(op).is_empty() => {
                Some(Fault::AgentAt(failure_points(op).choose(&mut rng).unwrap()))
            }
            40..80 => Some(Fault::AgentKill),
            80..90 => Some(Fault::ServerKill),
            _ => Some(Fault::VmmKill),
        };
        let label = format!("{op:?}");
        eprintln!(
            "chaos step {step}: {label} on {} ({:?}) with {}",
            live[i].id,
            live[i].expect,
            fault.as_ref().map_or("no fault".into(), |f| f.to_string())
        );
        *counts.ops.entry(label).or_default() += 1;
        if let Some(f) = &fault {
            let kind = match f {
                Fault::AgentAt(_) => f.to_string(),
                Fault::AgentKill => "agent SIGKILL".into(),
                Fault::ServerKill => "control plane SIGKILL".into(),
                Fault::VmmKill => "VMM SIGKILL".into(),
            };
            *counts.faults.entry(kind).or_default() += 1;
        }

        if fault == Some(Fault::VmmKill) {
            kill_vmm(&w, &mut live[i], &mut rng, &mut counts).await;
        } else {
            if let Some(Fault::AgentAt(p)) = &fault {
                w.restart_agent(&format!("{p}=abort")).await;
            }
            let kill_at = Duration::from_millis(rng.gen_range(0..2500));
            let a = w.api();
            let value = next_value;
            next_value += 1;
            let acked = {
                let run = run_op(&a, op, &mut live[i], &mut templates, value);
                match &fault {
                    Some(Fault::AgentKill) => {
                        let (acked, ()) = tokio::join!(run, async {
                            tokio::time::sleep(kill_at).await;
                            w.agent.kill();
                        });
                        acked
                    }
                    Some(Fault::ServerKill) => {
                        let pid = w.server.pid();
                        let (acked, ()) = tokio::join!(run, async {
                            tokio::time::sleep(kill_at).await;
                            // SAFETY: kill has no memory-safety preconditions.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        });
                        acked
                    }
                    _ => run.await,
                }
            };
            if acked {
                counts.acked += 1;
            } else {
                assert!(
                    fault.is_some(),
                    "step {step}: {op:?} failed without a fault injected\n{}",
                    w.server.logs()
                );
            }
            match &fault {
                Some(Fault::AgentAt(_)) | Some(Fault::AgentKill) => w.restart_agent("").await,
                Some(Fault::ServerKill) => w.restart_server().await,
                _ => {}
            }
            if op == Op::Replace {
                replace(
                    &w,
                    &mut live,
                    i,
                    value,
                    acked,
                    &templates,
                    &mut rng,
                    &mut counts,
                )
                .await;
            }
            if op == Op::Snapshot && !acked {
                // The reply was lost: the template exists if the control
                // plane recorded it, and then it must work.
                let name = format!("chaos-tpl{}", templates.len());
                let (st, _) = w.api().get(&format!("/v1/snapshots/{name}")).await;
                if st == StatusCode::OK {
                    let (counter, unsure) = (live[i].counter, live[i].unsure);
                    templates.push(TemplateInfo {
                        name,
                        marker: live[i].marker.clone(),
                        counters: [Some(counter), unsure].into_iter().flatten().collect(),
                    });
                }
            }
        }
        check_all(&w, &mut live, &templates, &mut counts).await;
    }

    // The end: every paused sandbox resumes whole, every template spawns
    // what it froze, and then nothing is left.
    let a = w.api();
    for t in &mut live {
        if settle(&a, &t.id).await["state"] == "paused" {
            let (st, r) = a
                .post_empty(&format!("/v1/sandboxes/{}/resume", t.id))
                .await;
            assert_eq!(st, StatusCode::OK, "{r}\n{}", w.server.logs());
            t.expect = Expect::Running;
        }
    }
    check_all(&w, &mut live, &templates, &mut counts).await;
    for tpl in &templates {
        let sb = a
            .create(json!({"template": tpl.name, "timeout_s": 600}))
            .await;
        let id = sb["id"].as_str().unwrap();
        let (counter, marker) = observe(&a, id).await.unwrap();
        assert!(tpl.counters.contains(&counter), "{}: {counter}", tpl.name);
        assert_eq!(marker, tpl.marker, "{}", tpl.name);
        counts.checks += 1;
        let (st, b) = a.delete(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    }
    for t in &live {
        let (st, b) = a.delete(&format!("/v1/sandboxes/{}", t.id)).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    }
    for tpl in &templates {
        let (st, b) = a.delete(&format!("/v1/snapshots/{}", tpl.name)).await;
        assert_eq!(st, StatusCode::OK, "{b}");
    }
    wait_clean(&w.home, Duration::from_secs(60)).await;
    // Templates the control plane never recorded (an agent that died after
    // saving one) are swept by the reconciler after the grace period.
    let deadline = Instant::now() + Duration::from_secs(60);
    while build_count(&w.home) > 1 + w.home.warm_builds().len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_nothing_left(&w.home);

    eprintln!(
        "chaos: seed {seed}: {} operations ({:?}), {} acknowledged; faults {:?}; \
         {} invariant checks; {} sandboxes failed, all by a killed VMM; 0 lost",
        counts.ops.values().sum::<usize>(),
        counts.ops,
        counts.acked,
        counts.faults,
        counts.checks,
        counts.failed_by_vm_kill,
    );
}

/// Create a sandbox (cold, or from a random template) and prepare it.
async fn spawn(
    a: &Api,
    templates: &[TemplateInfo],
    from_template: bool,
    rng: &mut StdRng,
) -> Tracked {
    if from_template && let Some(tpl) = templates.choose(rng) {
        let sb = a
            .create(json!({"template": tpl.name, "timeout_s": 600}))
            .await;
        let id = sb["id"].as_str().unwrap().to_owned();
        let (counter, marker) = observe(a, &id).await.unwrap();
        assert!(tpl.counters.contains(&counter), "{}: {counter}", tpl.name);
        assert_eq!(marker, tpl.marker);
        return Tracked {
            id,
            counter,
            unsure: None,
            marker,
            expect: Expect::Running,
            vm_killed: false,
        };
    }
    let sb = a.create(base(json!({}))).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let marker = format!("m{}", rng.r#gen::<u32>());
    prepare(a, &id, &marker).await;
    Tracked {
        id,
        counter: 0,
        unsure: None,
        marker,
        expect: Expect::Running,
        vm_killed: false,
    }
}

/// Run one operation; whether its success was acknowledged.
async fn run_op(
    a: &Api,
    op: Op,
    t: &mut Tracked,
    templates: &mut Vec<TemplateInfo>,
    value: u64,
) -> bool {
    let id = t.id.clone();
    match op {
        Op::Exec if t.expect == Expect::Running => {
            t.unsure = Some(value);
            match try_sh(a, &id, &format!("echo {value} > /root/counter && sync")).await {
                Ok(o) if o.exit_code == Some(0) => {
                    t.counter = value;
                    t.unsure = None;
                    true
                }
                _ => false,
            }
        }
        Op::Pause if t.expect == Expect::Running => {
            match try_post(a, &format!("/v1/sandboxes/{id}/pause"), json!({})).await {
                Ok((StatusCode::OK, _)) => {
                    t.expect = Expect::Paused;
                    true
                }
                _ => {
                    t.expect = Expect::RunningOrPaused;
                    false
                }
            }
        }
        Op::Resume if t.expect == Expect::Paused => {
            match try_post(a, &format!("/v1/sandboxes/{id}/resume"), json!({})).await {
                Ok((StatusCode::OK, _)) => {
                    t.expect = Expect::Running;
                    true
                }
                _ => {
                    t.expect = Expect::RunningOrPaused;
                    false
                }
            }
        }
        Op::Snapshot if t.expect == Expect::Running && templates.len() < 3 => {
            let name = format!("chaos-tpl{}", templates.len());
            match try_post(
                a,
                &format!("/v1/sandboxes/{id}/snapshots"),
                json!({"name": name}),
            )
            .await
            {
                Ok((StatusCode::CREATED, _)) => {
                    templates.push(TemplateInfo {
                        name,
                        marker: t.marker.clone(),
                        counters: [Some(t.counter), t.unsure].into_iter().flatten().collect(),
                    });
                    true
                }
                _ => false,
            }
        }
        // Destroy it and create another (tagged, so that a create whose
        // reply is lost can be found); `replace` finishes the job.
        Op::Replace => {
            let deleted = try_call(
                a.http
                    .delete(a.url(&format!("/v1/sandboxes/{id}")))
                    .bearer_auth(&a.key),
            )
            .await;
            let created = try_post(
                a,
                "/v1/sandboxes",
                base(json!({"metadata": {"chaos": format!("n{value}")}})),
            )
            .await;
            matches!(deleted, Ok((StatusCode::NO_CONTENT, _)))
                && matches!(created, Ok((StatusCode::CREATED, _)))
        }
        // A snapshot past the template limit: read the sandbox instead.
        _ => try_call(
            a.http
                .get(a.url(&format!("/v1/sandboxes/{id}")))
                .bearer_auth(&a.key),
        )
        .await
        .is_ok_and(|(st, _)| st == StatusCode::OK),
    }
}

/// Finish a replace whose destroy and create a fault may have hit: the old
/// sandbox is destroyed (again, if the reply was lost), the one the create
/// made (found by its tag) is running if the create was acknowledged, and
/// is destroyed; then a fresh sandbox takes the slot. Nothing may be left.
#[allow(clippy::too_many_arguments)]
async fn replace(
    w: &World<'_>,
    live: &mut [Tracked],
    i: usize,
    value: u64,
    acked: bool,
    templates: &[TemplateInfo],
    rng: &mut StdRng,
    counts: &mut Counts,
) {
    let a = w.api();
    // 204, or 409 saying it is destroyed already if the faulted destroy
    // went through, or being destroyed while the reconciler finishes an
    // interrupted one.
    let deadline = Instant::now() + SETTLE;
    loop {
        let (st, b) = a.delete(&format!("/v1/sandboxes/{}", live[i].id)).await;
        let msg = b["message"].as_str().unwrap_or_default();
        if st == StatusCode::NO_CONTENT
            || (st == StatusCode::CONFLICT && msg.contains("is destroyed"))
        {
            break;
        }
        assert!(
            st == StatusCode::CONFLICT
                && msg.contains("is destroying")
                && Instant::now() < deadline,
            "{st} {b}\n{}",
            w.server.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (st, b) = a.get(&format!("/v1/sandboxes/{}", live[i].id)).await;
    assert!(
        st == StatusCode::NOT_FOUND || b["state"] == "destroyed",
        "{st} {b}"
    );
    counts.checks += 1;
    let (st, all) = a.get("/v1/sandboxes").await;
    assert_eq!(st, StatusCode::OK, "{all}");
    let tag = format!("n{value}");
    let made: Vec<String> = all["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|sb| sb["metadata"]["chaos"] == tag.as_str())
        .map(|sb| sb["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(made.len() <= 1, "one create made {made:?}");
    if acked {
        assert_eq!(made.len(), 1, "an acknowledged create is listed: {all}");
    }
    for id in made {
        let sb = settle(&a, &id).await;
        if acked {
            assert_eq!(sb["state"], "running", "{sb}");
        } else {
            // A create whose caller saw it fail may have failed, with a reason.
            assert!(
                sb["state"] == "running" || sb["failure_reason"].is_string(),
                "{sb}"
            );
        }
        counts.checks += 1;
        let (st, b) = a.delete(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    }
    let from_template = rng.gen_bool(0.5);
    live[i] = spawn(&a, templates, from_template, rng).await;
}

/// SIGKILL a running sandbox's VMM: the sandbox is failed (its VM really
/// died), with a reason; it is then replaced.
async fn kill_vmm(w: &World<'_>, t: &mut Tracked, rng: &mut StdRng, counts: &mut Counts) {
    let a = w.api();
    if settle(&a, &t.id).await["state"] != "running" {
        return;
    }
    let pids = w.home.processes_of(&t.id);
    assert!(!pids.is_empty(), "no VMM found for {}", t.id);
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    t.vm_killed = true;
    let sb = a.wait_state(&t.id, "failed", Duration::from_secs(90)).await;
    assert!(
        sb["failure_reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{sb}"
    );
    counts.failed_by_vm_kill += 1;
    counts.checks += 1;
    let (st, b) = a.delete(&format!("/v1/sandboxes/{}", t.id)).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    *t = spawn(&a, &[], false, rng).await;
}

/// The invariants, for every sandbox and template.
async fn check_all(
    w: &World<'_>,
    live: &mut [Tracked],
    templates: &[TemplateInfo],
    counts: &mut Counts,
) {
    let a = w.api();
    for t in live.iter_mut() {
        let sb = settle(&a, &t.id).await;
        let state = sb["state"].as_str().unwrap().to_owned();
        counts.checks += 1;
        assert!(
            state != "failed" || t.vm_killed,
            "{} is failed although its VM was not killed: {sb}\n{}",
            t.id,
            w.server.logs()
        );
        match (t.expect, state.as_str()) {
            (Expect::Running, "running")
            | (Expect::Paused, "paused")
            | (Expect::RunningOrPaused, _) => {}
            (want, got) => panic!(
                "{} should be {want:?} but is {got}: {sb}\n{}",
                t.id,
                w.server.logs()
            ),
        }
        t.expect = if state == "running" {
            Expect::Running
        } else {
            Expect::Paused
        };
        if state == "running" {
            let (counter, marker) = observe(&a, &t.id)
                .await
                .unwrap_or_else(|e| panic!("{} runs but does not answer: {e}", t.id));
            assert!(
                counter == t.counter || Some(counter) == t.unsure,
                "{}: counter {counter}, acknowledged {} (unsure {:?})",
                t.id,
                t.counter,
                t.unsure
            );
            t.counter = counter;
            t.unsure = None;
            assert_eq!(marker, t.marker, "{}: the process lost its memory", t.id);
            counts.checks += 1;
        }
    }
    for tpl in templates {
        let (st, body) = a.get(&format!("/v1/snapshots/{}", tpl.name)).await;
        assert_eq!(st, StatusCode::OK, "template {} is gone: {body}", tpl.name);
        counts.checks += 1;
    }
}

fn build_count(home: &AgentHome) -> usize {
    std::fs::read_dir(home.data().join("builds"))
        .map(|d| d.flatten().filter(|e| e.file_name() != ".lock").count())
        .unwrap_or(0)
}

/// Beyond `wait_clean`: no mount, run directory, disk layer, sandbox
/// record or build of the run is left (the base image's build and the warm
/// bases stay).
fn assert_nothing_left(home: &AgentHome) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = home.dir.path().to_string_lossy().into_owned();
    let ours: Vec<_> = mounts.lines().filter(|l| l.contains(&dir)).collect();
    assert!(ours.is_empty(), "mounts left: {ours:?}");
    let entries = |p: PathBuf| -> Vec<String> {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(entries(home.run_dir().join("vms")), Vec::<String>::new());
    assert_eq!(entries(home.data().join("sandboxes")), Vec::<String>::new());
    let builds: Vec<String> = entries(home.data().join("builds"))
        .into_iter()
        .filter(|n| n != ".lock")
        .collect();
    let warm = home.warm_builds();
    let others: Vec<&String> = builds.iter().filter(|b| !warm.contains(b)).collect();
    assert_eq!(
        others.len(),
        1,
        "only the base image's build and the warm bases {warm:?} stay: {builds:?}"
    );
    assert!(!others[0].starts_with('.'), "{builds:?}");
    assert_eq!(
        builds.len(),
        1 + warm.len(),
        "a warm record without its build: {builds:?}"
    );
}

use std::path::PathBuf;
