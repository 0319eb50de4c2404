//! Requests per second of `GET /v1/sandboxes` over real HTTP with 1,000 rows
//! in the store, against `GET /healthz` (one trivial query) measured in the
//! same run as the baseline. Prints ratios; asserts nothing about time.
//!
//!   cargo bench -p ember-control --bench list_sandboxes
//!   EMBER_BENCH_DATABASE_URL=postgres://… cargo bench -p ember-control --bench list_sandboxes

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ember_control::model::{Host, NetworkPolicy, OnTimeout, Sandbox, SandboxState, now_ms};
use ember_control::server::{ControlPlane, ServerConfig};
use tokio_util::sync::CancellationToken;

const ROWS: usize = 1000;
const CONCURRENCY: usize = 8;
const REQUESTS: usize = 400;

async fn rps(client: &reqwest::Client, url: &str, key: &str, requests: usize) -> f64 {
    let started = Instant::now();
    let per_worker = requests / CONCURRENCY;
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let url = url.to_owned();
        let key = key.to_owned();
        workers.push(tokio::spawn(async move {
            for _ in 0..per_worker {
                let resp = client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("request");
                assert!(resp.status().is_success(), "{}", resp.status());
                let _ = resp.bytes().await.expect("body");
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    (per_worker * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = std::env::var("EMBER_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let plane = ControlPlane::open(ServerConfig::new(url.clone()))
        .await
        .expect("open");
    let key = plane
        .first_start
        .admin_key
        .clone()
        .expect("fresh store: admin key");
    let store = plane.store().clone();
    let team = store.team_by_name("default").await.unwrap().unwrap();
    store
        .upsert_host(&Host {
            id: "host-bench".into(),
            address: "http://127.0.0.1:9".into(),
            backend: "qemu".into(),
            version: "0".into(),
            vcpus_total: 4096,
            memory_mib_total: 1 << 30,
            healthy: true,
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
            state: if i % 4 == 0 {
                SandboxState::Paused
            } else {
                SandboxState::Running
            },
            host_id: Some("host-bench".into()),
            template: "base".into(),
            source_build_id: None,
            build_id: None,
            vcpus: 1,
            memory_mib: 512,
            metadata: BTreeMap::from([
                ("owner".into(), format!("user{}", i % 10)),
                ("job".into(), i.to_string()),
            ]),
            env: BTreeMap::new(),
            network: NetworkPolicy::default(),
            timeout_s: 3600,
            on_timeout: OnTimeout::Kill,
            expires_at: Some(base + 3_600_000),
            access_token_sha256: "00".repeat(32),
            failure_reason: None,
            created_at: base + i as i64,
            state_changed_at: base,
            destroyed_at: None,
            last_operation: None,
            ingress: Default::default(),
        };
        store.insert_sandbox(&sb, None).await.unwrap();
    }
    // The store alone, without HTTP, auth or JSON: where a list request's time goes.
    let loops = 20;
    store
        .list_sandboxes(&team.id, &Default::default(), None, ROWS as u32)
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..loops {
        let rows = store
            .list_sandboxes(&team.id, &Default::default(), None, ROWS as u32)
            .await
            .unwrap();
        assert_eq!(rows.len(), ROWS);
    }
    let store_rows_per_s = (loops * ROWS) as f64 / started.elapsed().as_secs_f64();
    // The same rows through sqlx's native SQLite driver versus `sqlx::Any`
    // (which the store uses so one SQL text serves both databases).
    let driver_rows = if url.starts_with("sqlite") {
        use sqlx::Row;
        let q = "SELECT id, team_id, state, metadata, env, network FROM sandboxes";
        let native = sqlx::SqlitePool::connect(&url).await.unwrap();
        // Warm both (page cache, statement caches) before timing either.
        sqlx::query(q).fetch_all(&native).await.unwrap();
        sqlx::query(q)
            .fetch_all(store.pool_for_bench())
            .await
            .unwrap();
        let started = Instant::now();
        for _ in 0..loops {
            let rows = sqlx::query(q).fetch_all(&native).await.unwrap();
            assert_eq!(
                rows.iter()
                    .filter(|r| !r.get::<String, _>(0).is_empty())
                    .count(),
                ROWS
            );
        }
        let native_rps = (loops * ROWS) as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..loops {
            let rows = sqlx::query(q)
                .fetch_all(store.pool_for_bench())
                .await
                .unwrap();
            assert_eq!(
                rows.iter()
                    .filter(|r| !r.get::<String, _>(0).is_empty())
                    .count(),
                ROWS
            );
        }
        let any_rps = (loops * ROWS) as f64 / started.elapsed().as_secs_f64();
        native.close().await;
        Some((native_rps, any_rps))
    } else {
        None
    };
    let listener = ember_control::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(plane.serve(listener, shutdown.clone()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base_url = format!("http://{addr}");

    // Warm up connections and caches.
    rps(
        &client,
        &format!("{base_url}/v1/sandboxes?limit=10"),
        &key,
        CONCURRENCY * 4,
    )
    .await;
    let health = rps(&client, &format!("{base_url}/healthz"), &key, REQUESTS).await;
    let page1 = rps(
        &client,
        &format!("{base_url}/v1/sandboxes?limit=1"),
        &key,
        REQUESTS,
    )
    .await;
    let page100 = rps(&client, &format!("{base_url}/v1/sandboxes"), &key, REQUESTS).await;
    let page1000 = rps(
        &client,
        &format!("{base_url}/v1/sandboxes?limit=1000"),
        &key,
        REQUESTS / 4,
    )
    .await;
    let filtered = rps(
        &client,
        &format!("{base_url}/v1/sandboxes?metadata.owner=user3&state=running"),
        &key,
        REQUESTS,
    )
    .await;
    let backend = if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    println!(
        "list_sandboxes ({backend}, {ROWS} rows, {CONCURRENCY} concurrent clients, loopback HTTP)"
    );
    println!("  GET /healthz (baseline)                         {health:8.0} req/s  1.00x");
    println!(
        "  GET /v1/sandboxes?limit=1 (auth + one row)      {page1:8.0} req/s  {:.2}x",
        page1 / health
    );
    println!(
        "  GET /v1/sandboxes (page of 100)                 {page100:8.0} req/s  {:.2}x",
        page100 / health
    );
    println!(
        "  GET /v1/sandboxes?limit=1000 (all rows)         {page1000:8.0} req/s  {:.2}x",
        page1000 / health
    );
    println!(
        "  GET /v1/sandboxes?metadata.owner=…&state=…      {filtered:8.0} req/s  {:.2}x",
        filtered / health
    );
    println!(
        "  store.list_sandboxes alone, rows decoded        {store_rows_per_s:8.0} rows/s (HTTP limit=1000 serves {:.0} rows/s)",
        page1000 * ROWS as f64
    );
    if let Some((native, any)) = driver_rows {
        println!("  6 text columns, native sqlite driver            {native:8.0} rows/s  1.00x");
        println!(
            "  6 text columns, sqlx::Any over sqlite           {any:8.0} rows/s  {:.2}x",
            any / native
        );
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
