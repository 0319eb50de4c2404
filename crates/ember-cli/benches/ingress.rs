//! Ingress proxy benchmark: a real `ember server` (embedded agent, a real
//! microVM) with a Python HTTP server in the guest. Every number is printed
//! beside a baseline measured in the same run:
//!
//! - small requests (GET of 23 bytes, one connection per request): latency
//!   p50/p99 through the proxy (path form) vs a direct connection from the
//!   host to the guest's slot address;
//! - a 100 MiB download and upload: MB/s through the proxy vs direct;
//! - wake on traffic: a paused sandbox's first served request vs a plain
//!   resume followed by the same request.
//!
//! Needs root and a built guest image. Run:
//! `cargo bench -p ember-cli --bench ingress`. Under QEMU TCG the guest's
//! own network stack and Python dominate; the ratios are what to compare.

#[path = "../tests/support/agent.rs"]
#[allow(dead_code)]
mod agent;
#[path = "../tests/support/server.rs"]
#[allow(dead_code)]
mod server;

use std::process::Command;
use std::time::{Duration, Instant};

use agent::{AgentHome, image_dir};
use serde_json::json;
use server::{ServerSpec, TestDb};

const SMALL_REQUESTS: usize = 200;
const BIG: usize = 100 << 20;
const WAKES: usize = 3;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// The guest's address as the host reaches it: the namespace end of the
/// only slot of this home's pool.
fn slot_address(home: &AgentHome) -> String {
    let ns = home.namespaces();
    assert_eq!(ns.len(), 1, "one sandbox expected: {ns:?}");
    let out = Command::new("ip")
        .args(["-n", &ns[0], "-4", "-o", "addr", "show", "dev", "veth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no address on veth0 in {}: {text}", ns[0]))
        .to_owned()
}

/// `n` GETs of `url`, each on a fresh connection; their latencies.
async fn small_requests(url: &str, token: Option<&str>, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut req = client.get(url);
        if let Some(t) = token {
            req = req.header("x-ember-traffic-token", t);
        }
        let started = Instant::now();
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await.unwrap();
        out.push(started.elapsed());
        assert_eq!(&body[..], b"hello from the sandbox\n");
    }
    out
}

async fn download(url: &str, token: Option<&str>) -> Duration {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.header("x-ember-traffic-token", t);
    }
    let started = Instant::now();
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    let took = started.elapsed();
    assert_eq!(got.len(), BIG);
    took
}

async fn upload(url: &str, token: Option<&str>, data: &[u8]) -> Duration {
    let client = reqwest::Client::new();
    let mut req = client.post(url).body(data.to_vec());
    if let Some(t) = token {
        req = req.header("x-ember-traffic-token", t);
    }
    let started = Instant::now();
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    let took = started.elapsed();
    assert_eq!(v["bytes"], BIG as u64);
    took
}

fn main() {
    if !ember_testkit::is_root() || image_dir().is_none() {
        eprintln!("ingress bench: needs root and a built guest image (ember image build); skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let db = TestDb::sqlite();
    let home = AgentHome::new();
    let server = ServerSpec::new(&db, Some(&home)).start();
    let a = server.api(server.admin_key.as_deref().unwrap());
    a.wait_healthy_hosts(1, Duration::from_secs(60)).await;
    let (st, sb) = a
        .post(
            "/v1/sandboxes",
            json!({"template": "base", "memory_mib": 512, "timeout_s": 3600}),
        )
        .await;
    assert_eq!(st, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_owned();
    let token = sb["traffic_token"].as_str().unwrap().to_owned();
    a.start_ingress_test_servers(&id, &token).await;
    let made = a
        .sh(&id, &format!("head -c {BIG} /dev/urandom > /tmp/big"))
        .await;
    assert_eq!(made.exit_code, Some(0));
    let direct = format!("http://{}:8000", slot_address(&home));
    let proxied = a.url(&format!("/v1/sandboxes/{id}/ports/8000"));

    println!("ingress bench (QEMU backend; a Python http.server in a 512 MiB guest)");
    // Warm both paths once.
    small_requests(&format!("{direct}/hello"), None, 5).await;
    small_requests(&format!("{proxied}/hello"), Some(&token), 5).await;
    let mut d = small_requests(&format!("{direct}/hello"), None, SMALL_REQUESTS).await;
    let mut p = small_requests(&format!("{proxied}/hello"), Some(&token), SMALL_REQUESTS).await;
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (dd, pp) = (percentile(&mut d, q), percentile(&mut p, q));
        println!(
            "  small GET {name}: direct {:.2} ms, through the proxy {:.2} ms ({:.2}x, +{:.2} ms)",
            ms(dd),
            ms(pp),
            pp.as_secs_f64() / dd.as_secs_f64(),
            ms(pp.saturating_sub(dd))
        );
    }

    let dd = download(&format!("{direct}/big"), None).await;
    let pd = download(&format!("{proxied}/big"), Some(&token)).await;
    println!(
        "  100 MiB download: direct {:.1} MB/s, through the proxy {:.1} MB/s ({:.2}x the time)",
        mb_per_s(BIG, dd),
        mb_per_s(BIG, pd),
        pd.as_secs_f64() / dd.as_secs_f64()
    );
    let data: Vec<u8> = (0..BIG).map(|i| (i * 31 + i / 977) as u8).collect();
    let du = upload(&format!("{direct}/upload"), None, &data).await;
    let pu = upload(&format!("{proxied}/upload"), Some(&token), &data).await;
    println!(
        "  100 MiB upload: direct {:.1} MB/s, through the proxy {:.1} MB/s ({:.2}x the time)",
        mb_per_s(BIG, du),
        mb_per_s(BIG, pu),
        pu.as_secs_f64() / du.as_secs_f64()
    );

    // Wake on traffic vs a plain resume then the same request.
    let resp = a
        .http
        .put(a.url(&format!("/v1/sandboxes/{id}/ingress")))
        .bearer_auth(&a.key)
        .json(&json!({"auto_resume": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut woken = Vec::new();
    let mut resumed = Vec::new();
    for _ in 0..WAKES {
        let (st, v) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
        assert_eq!(st, 200, "{v}");
        let started = Instant::now();
        small_requests(&format!("{proxied}/hello"), Some(&token), 1).await;
        woken.push(started.elapsed());

        let (st, v) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
        assert_eq!(st, 200, "{v}");
        let started = Instant::now();
        let (st, v) = a.post_empty(&format!("/v1/sandboxes/{id}/resume")).await;
        assert_eq!(st, 200, "{v}");
        small_requests(&format!("{proxied}/hello"), Some(&token), 1).await;
        resumed.push(started.elapsed());
    }
    let (w, r) = (percentile(&mut woken, 0.5), percentile(&mut resumed, 0.5));
    println!(
        "  paused → first response (median of {WAKES}): woken by the request {:.0} ms, \
         resume call + request {:.0} ms ({:.2}x)",
        ms(w),
        ms(r),
        w.as_secs_f64() / r.as_secs_f64()
    );
    let (st, _) = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, 204);
}
