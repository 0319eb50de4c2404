//! Measurements of the control plane with a real host (ignored by default;
//! it prints numbers and asserts nothing about time):
//!
//!   cargo nextest run -p ember-cli --test control_bench --run-ignored only --no-capture
//!   (or: cargo test -p ember-cli --test control_bench -- --ignored --nocapture)
//!
//! Against `ember server` with its embedded agent (QEMU; TCG here):
//! - API overhead of a create: the latency a client sees minus the host's
//!   own time for it (`last_operation_ms` the agent reports), for cold boots
//!   and for creates from a template;
//! - p50/p99 of 100 creates from a template, one at a time and 4 at a time
//!   (each destroyed as soon as it answered, so the machine copes);
//! - every figure beside `GET /healthz` (auth-free, one trivial query)
//!   measured in the same run, as the baseline.
//!
//! `EMBER_BENCH_CREATES` changes the 100; `EMBER_BENCH_STORE=postgres`
//! (with `EMBER_TEST_POSTGRES_URL`) runs on PostgreSQL.
//!
//! And requests per second of `GET /v1/sandboxes` with 1,000 rows against
//! a real `ember server --no-agent` process, beside `GET /healthz`.

mod support;

use std::time::{Duration, Instant};

use ember_proto::host as pb;
use ember_testkit::{is_root, require};
use reqwest::StatusCode;
use serde_json::json;
use support::agent::{AgentHome, Bearer, image_dir};
use support::server::{Api, ServerSpec, TestDb};

type Grpc = pb::host_agent_client::HostAgentClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// What the client saw, ms.
    api: f64,
    /// What the host reported for the operation, ms.
    host: f64,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (values.len() as f64 - 1.0)).round() as usize;
    values[rank.min(values.len() - 1)]
}

struct Summary {
    n: usize,
    api50: f64,
    api99: f64,
    host50: f64,
    over50: f64,
    over99: f64,
}

fn summarise(samples: &[Sample]) -> Summary {
    let mut api: Vec<f64> = samples.iter().map(|s| s.api).collect();
    let mut host: Vec<f64> = samples.iter().map(|s| s.host).collect();
    let mut over: Vec<f64> = samples.iter().map(|s| s.api - s.host).collect();
    Summary {
        n: samples.len(),
        api50: percentile(&mut api, 50.0),
        api99: percentile(&mut api, 99.0),
        host50: percentile(&mut host, 50.0),
        over50: percentile(&mut over, 50.0),
        over99: percentile(&mut over, 99.0),
    }
}

/// Create, read the host's own time for it, destroy.
async fn create_once(a: &Api, grpc: &mut Grpc, body: &serde_json::Value) -> Sample {
    let started = Instant::now();
    let (st, sb) = a.post("/v1/sandboxes", body.clone()).await;
    let api = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(st, StatusCode::CREATED, "{sb}");
    let id = sb["id"].as_str().unwrap().to_owned();
    let host = grpc
        .get_sandbox(pb::SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_operation_ms as f64;
    let (st, body) = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    Sample { api, host }
}

async fn healthz_p50(a: &Api, n: usize) -> f64 {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = a.http.get(a.url("/healthz")).send().await.unwrap();
        assert!(resp.status().is_success());
        let _ = resp.bytes().await.unwrap();
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    percentile(&mut v, 50.0)
}

fn print(label: &str, s: &Summary, health: f64) {
    println!(
        "  {label:<34} n={:<3} client p50 {:7.1} ms  p99 {:7.1} ms | host p50 {:7.1} ms | API overhead p50 {:6.1} ms ({:4.1}% of p50)  p99 {:6.1} ms | p50 = {:.0}x /healthz",
        s.n,
        s.api50,
        s.api99,
        s.host50,
        s.over50,
        100.0 * s.over50 / s.api50,
        s.over99,
        s.api50 / health
    );
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn create_latency_and_api_overhead_root_vm() {
    require!(
        is_root(),
        "needs root for network namespaces and TAP devices"
    );
    require!(
        image_dir().is_some(),
        "no guest image: run `ember image build` first"
    );
    let creates: usize = std::env::var("EMBER_BENCH_CREATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = bench_db().await;
        let store = if db.is_postgres() { "postgres" } else { "sqlite" };
        let home = AgentHome::new();
        let mut spec = ServerSpec::new(&db, Some(&home))
            .arg("--capacity-vcpus")
            .arg("16")
            .arg("--capacity-memory-mib")
            .arg("8192");
        spec.join_token = home.token.clone();
        let mut server = spec.start();
        let a = server.api(server.admin_key.as_deref().unwrap());
        let hosts = a.wait_healthy_hosts(1, Duration::from_secs(30)).await;
        let grpc = support::agent::joined_client(
            hosts[0]["address"].as_str().unwrap(),
            &home.data().join("identity"),
        )
        .await;
        let health = healthz_p50(&a, 200).await;

        // Cold boots of the base image (few: each takes seconds under TCG).
        let cold_body = json!({"template": "base", "memory_mib": 256, "timeout_s": 600});
        let mut g = grpc.clone();
        create_once(&a, &mut g, &cold_body).await; // warm-up
        let mut cold = Vec::new();
        for _ in 0..5 {
            cold.push(create_once(&a, &mut g, &cold_body).await);
        }

        // A small template to fork from.
        let src = a.create(cold_body.clone()).await;
        let src_id = src["id"].as_str().unwrap().to_owned();
        let (st, t) = a
            .post(&format!("/v1/sandboxes/{src_id}/snapshots"), json!({"name": "bench"}))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t}");
        let fork_body = json!({"template": "bench", "timeout_s": 600});
        create_once(&a, &mut g, &fork_body).await; // warm-up
        let mut seq = Vec::new();
        for _ in 0..creates {
            seq.push(create_once(&a, &mut g, &fork_body).await);
        }
        let health_mid = healthz_p50(&a, 200).await;
        let workers = 4;
        let started = Instant::now();
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let a = a.clone();
                let mut g = grpc.clone();
                let body = fork_body.clone();
                let n = creates / workers + usize::from(w < creates % workers);
                tokio::spawn(async move {
                    let mut v = Vec::new();
                    for _ in 0..n {
                        v.push(create_once(&a, &mut g, &body).await);
                    }
                    v
                })
            })
            .collect();
        let mut par = Vec::new();
        for t in tasks {
            par.extend(t.await.unwrap());
        }
        let par_wall = started.elapsed().as_secs_f64();
        let health = (health + health_mid) / 2.0;

        println!();
        println!(
            "control plane create latency ({store}; ember server + embedded qemu agent; loopback HTTP and gRPC)"
        );
        println!("  GET /healthz p50 (baseline)        {health:.2} ms");
        print("create, cold boot of base", &summarise(&cold), health);
        let s = summarise(&seq);
        print("create from template, 1 at a time", &s, health);
        let p = summarise(&par);
        print(&format!("create from template, {workers} at a time"), &p, health);
        println!(
            "  {workers} at a time: {:.1} creates/s over {:.1} s ({:.2}x the sequential rate); client p50 {:.2}x the sequential p50",
            par.len() as f64 / par_wall,
            par_wall,
            (par.len() as f64 / par_wall) / (1000.0 / s.api50),
            p.api50 / s.api50
        );
        let (st, _) = a.delete(&format!("/v1/sandboxes/{src_id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _) = a.delete("/v1/snapshots/bench").await;
        assert_eq!(st, StatusCode::OK);
        server.stop();
    });
}

async fn rps(a: &Api, path: &str, authed: bool, requests: usize, clients: usize) -> f64 {
    let started = Instant::now();
    let per = requests / clients;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let a = a.clone();
            let url = a.url(path);
            tokio::spawn(async move {
                for _ in 0..per {
                    let mut req = a.http.get(&url);
                    if authed {
                        req = req.bearer_auth(&a.key);
                    }
                    let resp = req.send().await.unwrap();
                    assert!(resp.status().is_success(), "{}", resp.status());
                    let _ = resp.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    (per * clients) as f64 / started.elapsed().as_secs_f64()
}

async fn bench_db() -> TestDb {
    match std::env::var(support::server::PG_ENV) {
        Ok(_) if std::env::var("EMBER_BENCH_STORE").as_deref() == Ok("postgres") => {
            TestDb::postgres().await
        }
        _ => TestDb::sqlite(),
    }
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn list_sandboxes_requests_per_second() {
    use ember_control::model::{Host, NetworkPolicy, OnTimeout, Sandbox, SandboxState, now_ms};
    const ROWS: usize = 1000;
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 800;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = bench_db().await;
        let kind = if db.is_postgres() { "postgres" } else { "sqlite" };
        let mut server = ServerSpec::new(&db, None).start();
        let a = server.api(server.admin_key.as_deref().unwrap());
        // 1,000 paused sandboxes of the admin's team, on a host that is not
        // serving: paused rows are expected absent, so the reconciler and
        // the timeout sweep leave them alone while we measure.
        let store = ember_control::store::Store::open(&db.url).await.unwrap();
        let team = store.team_by_name("default").await.unwrap().unwrap();
        store
            .upsert_host(&Host {
                id: "host-bench".into(),
                address: "http://127.0.0.1:9".into(),
                backend: "qemu".into(),
                version: "0".into(),
                vcpus_total: 4096,
                memory_mib_total: 1 << 30,
                healthy: false,
                last_error: None,
                registered_at: now_ms(),
                last_seen_at: None,
            })
            .await
            .unwrap();
        let base = now_ms();
        for i in 0..ROWS {
            let sb = Sandbox {
                id: ember_types::SandboxId::new().to_string(),
                team_id: team.id.clone(),
                state: SandboxState::Paused,
                host_id: Some("host-bench".into()),
                template: "base".into(),
                source_build_id: None,
                build_id: None,
                vcpus: 1,
                memory_mib: 512,
                metadata: std::collections::BTreeMap::from([
                    ("owner".into(), format!("user{}", i % 10)),
                    ("job".into(), i.to_string()),
                ]),
                env: Default::default(),
                network: NetworkPolicy::default(),
                timeout_s: 3600,
                on_timeout: OnTimeout::Kill,
                expires_at: None,
                access_token_sha256: "00".repeat(32),
                failure_reason: None,
                created_at: base + i as i64,
                state_changed_at: base,
                destroyed_at: None,
                last_operation: None,
                ingress: Default::default(),
            };
            assert!(store.insert_sandbox(&sb, None).await.unwrap());
        }
        store.close().await;
        let (_, all) = a.get("/v1/sandboxes?limit=1000").await;
        assert_eq!(all["sandboxes"].as_array().unwrap().len(), ROWS);
        rps(&a, "/v1/sandboxes?limit=10", true, CLIENTS * 8, CLIENTS).await; // warm-up
        let health = rps(&a, "/healthz", false, REQUESTS, CLIENTS).await;
        let one = rps(&a, "/v1/sandboxes?limit=1", true, REQUESTS, CLIENTS).await;
        let hundred = rps(&a, "/v1/sandboxes", true, REQUESTS, CLIENTS).await;
        let thousand = rps(&a, "/v1/sandboxes?limit=1000", true, REQUESTS / 8, CLIENTS).await;
        let filtered = rps(
            &a,
            "/v1/sandboxes?metadata.owner=user3&state=paused",
            true,
            REQUESTS,
            CLIENTS,
        )
        .await;
        println!();
        println!(
            "GET /v1/sandboxes against `ember server` ({kind}, {ROWS} rows, {CLIENTS} concurrent clients, loopback HTTP)"
        );
        println!("  GET /healthz (baseline)                   {health:8.0} req/s  1.00x");
        for (label, v) in [
            ("GET /v1/sandboxes?limit=1", one),
            ("GET /v1/sandboxes (page of 100)", hundred),
            ("GET /v1/sandboxes?limit=1000 (all)", thousand),
            ("GET /v1/sandboxes?metadata.owner=…&state=…", filtered),
        ] {
            println!("  {label:<41} {v:8.0} req/s  {:.2}x", v / health);
        }
        println!(
            "  rows served per second at limit=1000: {:.0}",
            thousand * ROWS as f64
        );
        server.stop();
    });
}
