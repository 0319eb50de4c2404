//! Ingress proxy benchmark: a real `ember server` and `ember agent` (with
//! its own ingress, a real microVM) with a Python HTTP server in the guest.
//! Every number is printed beside a baseline measured in the same run:
//!
//! - small requests (GET of 23 bytes, one connection per request): latency
//!   p50/p99 through the control plane's proxy (path form, then gRPC
//!   `OpenPort`) and through the host agent's own ingress (header form) vs
//!   a direct connection from the host to the guest's slot address;
//! - a 100 MiB download and upload: MB/s through each vs direct;
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

/// One way to the guest's server: its name, base URL and headers.
type Path<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

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
async fn small_requests(url: &str, headers: &[(&str, &str)], n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut req = client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
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

async fn download(url: &str, headers: &[(&str, &str)]) -> Duration {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    let took = started.elapsed();
    assert_eq!(got.len(), BIG);
    took
}

async fn upload(url: &str, headers: &[(&str, &str)], data: &[u8]) -> Duration {
    let client = reqwest::Client::new();
    let mut req = client.post(url).body(data.to_vec());
    for (k, v) in headers {
        req = req.header(*k, *v);
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
    let spec = ServerSpec::new(&db, None);
    let server = spec.start();
    let mut home = AgentHome::new();
    home.token = spec.join_token.clone();
    let ingress_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _agent = home.start_with(&[
        "--control-plane",
        &server.base,
        "--ingress-listen",
        &format!("127.0.0.1:{ingress_port}"),
        "--ingress-domain",
        "http://h1.bench",
    ]);
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
    let host = format!("http://127.0.0.1:{ingress_port}");
    let with_token = [("x-ember-traffic-token", token.as_str())];
    let host_headers = [
        ("x-ember-traffic-token", token.as_str()),
        ("x-ember-sandbox-id", id.as_str()),
        ("x-ember-port", "8000"),
    ];
    // (name, base URL, headers) of each path, the baseline first.
    let paths: [Path; 3] = [
        ("direct", &direct, &[]),
        ("control plane", &proxied, &with_token),
        ("host ingress", &host, &host_headers),
    ];

    println!("ingress bench (QEMU backend; a Python http.server in a 512 MiB guest)");
    let mut small = Vec::new();
    for (_, base, headers) in paths {
        small_requests(&format!("{base}/hello"), headers, 5).await; // warm
        small.push(small_requests(&format!("{base}/hello"), headers, SMALL_REQUESTS).await);
    }
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let base = percentile(&mut small[0], q);
        for (i, (path, _, _)) in paths.iter().enumerate().skip(1) {
            let t = percentile(&mut small[i], q);
            println!(
                "  small GET {name}: direct {:.2} ms, through the {path} {:.2} ms ({:.2}x, +{:.2} ms)",
                ms(base),
                ms(t),
                t.as_secs_f64() / base.as_secs_f64(),
                ms(t.saturating_sub(base))
            );
        }
    }

    let data: Vec<u8> = (0..BIG).map(|i| (i * 31 + i / 977) as u8).collect();
    let mut downs = Vec::new();
    let mut ups = Vec::new();
    for (_, base, headers) in paths {
        downs.push(download(&format!("{base}/big"), headers).await);
        ups.push(upload(&format!("{base}/upload"), headers, &data).await);
    }
    for (what, times) in [("download", &downs), ("upload", &ups)] {
        for (i, (path, _, _)) in paths.iter().enumerate().skip(1) {
            println!(
                "  100 MiB {what}: direct {:.1} MB/s, through the {path} {:.1} MB/s ({:.2}x the time)",
                mb_per_s(BIG, times[0]),
                mb_per_s(BIG, times[i]),
                times[i].as_secs_f64() / times[0].as_secs_f64()
            );
        }
    }

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
        small_requests(&format!("{proxied}/hello"), &with_token, 1).await;
        woken.push(started.elapsed());

        let (st, v) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
        assert_eq!(st, 200, "{v}");
        let started = Instant::now();
        let (st, v) = a.post_empty(&format!("/v1/sandboxes/{id}/resume")).await;
        assert_eq!(st, 200, "{v}");
        small_requests(&format!("{proxied}/hello"), &with_token, 1).await;
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
