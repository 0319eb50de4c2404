//! The ingress proxy end to end: a real `ember server` (embedded agent, a
//! real QEMU microVM), Python servers inside the sandbox, and real clients
//! outside it — reqwest, `curl`, a raw WebSocket client, and `ember sandbox
//! port-forward` — over the host, path and header forms.
//!
//! Needs root and a built guest image, like every VM test.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::agent::{AgentHome, free_port};
use support::server::{Api, ServerSpec, TestDb, assert_error, metric};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const DOMAIN: &str = "sandboxes.test";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The server's address, from its base URL.
fn server_addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

fn host_name(port: u16, id: &str) -> String {
    format!("{port}-{id}.{DOMAIN}")
}

/// A client that resolves `host` to the server (wildcard DNS, in effect)
/// and does not follow redirects.
fn client_for(host: &str, server: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .resolve(host, server)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn host_url(port: u16, id: &str, server: SocketAddr, path: &str) -> String {
    format!("http://{}:{}{path}", host_name(port, id), server.port())
}

async fn text(resp: reqwest::Response) -> (StatusCode, String) {
    let st = resp.status();
    (st, resp.text().await.unwrap())
}

async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let st = resp.status();
    let body = resp.text().await.unwrap();
    (
        st,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// A WebSocket handshake and one echoed text frame over `stream`.
async fn websocket_echo(
    mut stream: tokio::net::TcpStream,
    host: &str,
    path: &str,
    extra_headers: &str,
    message: &str,
) -> String {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "no upgrade: {status:?}");
    let mut accept = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("sec-websocket-accept")
        {
            accept = Some(v.trim().to_owned());
        }
    }
    // RFC 6455's example key and its accept value.
    assert_eq!(accept.as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let payload: Vec<u8> = message
        .bytes()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend_from_slice(&payload);
    let mut stream = reader.into_inner();
    stream.write_all(&frame).await.unwrap();
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x81, "a final text frame");
    let mut data = vec![0u8; usize::from(head[1] & 0x7f)];
    stream.read_exact(&mut data).await.unwrap();
    String::from_utf8(data).unwrap()
}

#[test]
fn ports_are_reached_through_every_form_with_real_clients_root_vm() {
    require_vm!();
    ember_testkit::require!(
        Command::new("curl").arg("--version").output().is_ok(),
        "needs curl (scripts/setup-host installs it)"
    );
    runtime().block_on(ports_through_every_form(TestDb::sqlite()));
}

async fn ports_through_every_form(db: TestDb) {
    let home = AgentHome::new();
    let spec = ServerSpec::new(&db, Some(&home))
        .arg("--ingress-domain")
        .arg(&format!("http://{DOMAIN}"))
        .arg("--capacity-vcpus")
        .arg("4")
        .arg("--capacity-memory-mib")
        .arg("1024");
    let server = spec.start();
    let admin = server.api(server.admin_key.as_deref().unwrap());
    let (_, key_a) = admin.team_with_key("alpha").await;
    let (_, key_b) = admin.team_with_key("beta").await;
    let a = admin.with_key(&key_a);
    let b = admin.with_key(&key_b);
    admin.wait_healthy_hosts(1, Duration::from_secs(30)).await;
    let addr = server_addr(&server.base);

    let sb = a
        .create(
            json!({"template": "base", "memory_mib": 256, "timeout_s": 900, "on_timeout": "pause"}),
        )
        .await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let token = sb["traffic_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("embertraffic_"), "{sb}");
    assert_eq!(
        (sb["public"].clone(), sb["auto_resume"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(sb["domain"], DOMAIN);
    assert_eq!(sb["port_url"], format!("http://{{port}}-{id}.{DOMAIN}/"));
    a.start_ingress_test_servers(&id, &token).await;
    let path = |p: &str| a.url(&format!("/v1/sandboxes/{id}/ports/8000{p}"));

    // ---- private by default: no credential, a wrong one, another team's
    let anon = reqwest::Client::new();
    let got = json_of(anon.get(path("/hello")).send().await.unwrap()).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap()
            .contains("x-ember-traffic-token")
    );
    let got = json_of(
        anon.get(path("/hello"))
            .header("x-ember-traffic-token", "embertraffic_wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    let host = host_name(8000, &id);
    let hc = client_for(&host, addr);
    let got = json_of(
        hc.get(host_url(8000, &id, addr, "/hello"))
            .bearer_auth(&key_b)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    // A sandbox of beta's: its token opens its own ports, not alpha's.
    let other = b
        .create(json!({"template": "base", "memory_mib": 256, "timeout_s": 900}))
        .await;
    let other_id = other["id"].as_str().unwrap().to_owned();
    let got = json_of(
        hc.get(host_url(8000, &id, addr, "/hello"))
            .header(
                "x-ember-traffic-token",
                other["traffic_token"].as_str().unwrap(),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    let (st, _) = b.delete(&format!("/v1/sandboxes/{other_id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // ---- the path form with the traffic token; what the guest sees
    let (st, body) = text(
        anon.get(path("/hello"))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "hello from the sandbox\n")
    );
    let resp = anon
        .get(path("/headers?x=1"))
        .header("x-ember-traffic-token", &token)
        .header(COOKIE, "app=1; ember_traffic=secret")
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("sandbox"),
        "path-form pages get an opaque origin"
    );
    let (_, seen) = json_of(resp).await;
    assert_eq!(seen["path"], "/headers?x=1");
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(
        h["x-forwarded-prefix"],
        format!("/v1/sandboxes/{id}/ports/8000")
    );
    assert!(
        h.get("cookie").is_none(),
        "no cookies on the shared origin of the path form: {seen}"
    );
    assert!(
        h.get("x-ember-traffic-token").is_none(),
        "token leaked: {seen}"
    );

    // ---- the host form with an API key (curl; the key never reaches the guest)
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--resolve"])
        .arg(format!("{host}:{}:127.0.0.1", addr.port()))
        .arg("-H")
        .arg(format!("Authorization: Bearer {key_a}"))
        .args(["-H", "Cookie: app=1"])
        .arg(host_url(8000, &id, addr, "/headers"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        seen["headers"].get("authorization").is_none(),
        "key leaked: {seen}"
    );
    assert_eq!(seen["headers"]["host"], format!("{host}:{}", addr.port()));
    assert_eq!(
        seen["headers"]["cookie"], "app=1",
        "the host form keeps the app's cookies"
    );
    // HTTP/2 from the client (h2c); HTTP/1.1 to the guest.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_version} %{http_code}", "--resolve"])
        .arg(format!("{host}:{}:127.0.0.1", addr.port()))
        .arg("-H")
        .arg(format!("x-ember-traffic-token: {token}"))
        .arg(host_url(8000, &id, addr, "/hello"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{out:?}");

    // ---- the header form
    let (st, body) = text(
        anon.get(a.url("/anything/hello"))
            .header("x-ember-sandbox-id", &id)
            .header("x-ember-port", "8000")
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "the guest answered for /anything/hello"
    );
    assert_eq!(body, "no such page\n");

    // ---- a large upload (streamed, chunked) and a download, byte for byte
    let size = 48usize << 20;
    let upload: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4093) as u8).collect();
    let resp = anon
        .post(path("/upload"))
        .header("x-ember-traffic-token", &token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(
            upload
                .chunks(1 << 20)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        )))
        .send()
        .await
        .unwrap();
    let (st, digest) = json_of(resp).await;
    assert_eq!(st, StatusCode::OK, "{digest}");
    assert_eq!(digest["bytes"], size as u64);
    assert_eq!(digest["sha256"], sha256_hex(&upload));
    let made = a
        .sh(
            &id,
            "head -c 41943040 /dev/urandom > /tmp/big && sha256sum /tmp/big",
        )
        .await;
    assert_eq!(made.exit_code, Some(0), "{made:?}");
    let guest_sum = made.stdout.split_whitespace().next().unwrap().to_owned();
    let resp = anon
        .get(path("/big"))
        .header("x-ember-traffic-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.bytes().await.unwrap();
    assert_eq!(got.len(), 40 << 20);
    assert_eq!(sha256_hex(&got), guest_sum);

    // ---- Server-Sent Events arrive while the response is still open
    let mut resp = anon
        .get(path("/sse"))
        .header("x-ember-traffic-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
        .await
        .expect("the first event comes before the stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    assert_eq!(a.sh(&id, "touch /tmp/sse-go").await.exit_code, Some(0));
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"data: two\n\n");

    // ---- WebSocket through the host form (cookie-less: a token header)
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let echoed = websocket_echo(
        stream,
        &host,
        "/ws",
        &format!("x-ember-traffic-token: {token}\r\n"),
        "hello over ws",
    )
    .await;
    assert_eq!(echoed, "echo: hello over ws");

    // ---- nothing listens → 502 naming the port; unknown sandbox → 404
    let got = json_of(
        anon.get(a.url(&format!("/v1/sandboxes/{id}/ports/9/")))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::BAD_GATEWAY, "port_closed");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap()
            .contains(&format!("nothing listens on port 9 in sandbox {id}")),
        "{}",
        got.1
    );
    let ghost = ember_types::SandboxId::new().to_string();
    let got = json_of(
        anon.get(a.url(&format!("/v1/sandboxes/{ghost}/ports/80/")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");

    // ---- `ember sandbox url` and a one-time browser link
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["sandbox", "url", &id, "8000"])
        .env("EMBER_API_URL", &server.base)
        .env("EMBER_API_KEY", &key_a)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("http://{host}/")
    );
    let (st, link) = a
        .post(
            &format!("/v1/sandboxes/{id}/links"),
            json!({"port": 8000, "path": "/hello"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{link}");
    let link_url = link["url"].as_str().unwrap().to_owned();
    assert!(
        link_url.starts_with(&format!("http://{host}/hello?ember_link=")),
        "{link}"
    );
    let with_port = link_url.replacen(DOMAIN, &format!("{DOMAIN}:{}", addr.port()), 1);
    let resp = hc.get(&with_port).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/hello");
    let cookie = resp.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let cookie_pair = cookie.split(';').next().unwrap().to_owned();
    let (st, body) = text(
        hc.get(host_url(8000, &id, addr, "/hello"))
            .header(COOKIE, &cookie_pair)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "hello from the sandbox\n")
    );
    let got = json_of(hc.get(&with_port).send().await.unwrap()).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    // The cookie is no credential on the path form (it shares the API's origin).
    let got = json_of(
        anon.get(path("/hello"))
            .header(COOKIE, &cookie_pair)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");

    // ---- port-forward: raw TCP with a half-close, through `ember`
    let mut forward = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["sandbox", "port-forward", &id, "0:7000"])
        .env("EMBER_API_URL", &server.base)
        .env("EMBER_API_KEY", &key_a)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(forward.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let local: SocketAddr = line
        .strip_prefix("forwarding ")
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    for round in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(local).await.unwrap();
        let msg = format!("select {round} from the sandbox;");
        conn.write_all(msg.as_bytes()).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut back = String::new();
        tokio::time::timeout(Duration::from_secs(60), conn.read_to_string(&mut back))
            .await
            .expect("the guest closes after our half-close")
            .unwrap();
        assert_eq!(
            back,
            format!("{}\nbytes: {}\n", msg.to_uppercase(), msg.len())
        );
    }
    let _ = forward.kill();
    let _ = forward.wait();

    // ---- public: no credential needed
    let (st, sb) = call_put(
        &a,
        &format!("/v1/sandboxes/{id}/ingress"),
        json!({"public": true}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{sb}");
    assert_eq!(sb["public"], true);
    let (st, body) = text(anon.get(path("/hello")).send().await.unwrap()).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "hello from the sandbox\n")
    );

    // ---- paused: 409 without auto_resume; woken by a request with it
    let (st, paused) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
    assert!(
        st == StatusCode::OK || st == StatusCode::ACCEPTED,
        "{paused}"
    );
    a.wait_state(&id, "paused", Duration::from_secs(300)).await;
    let got = json_of(anon.get(path("/hello")).send().await.unwrap()).await;
    assert_error(&got, StatusCode::CONFLICT, "sandbox_paused");
    assert!(got.1["message"].as_str().unwrap().contains("auto_resume"));
    let (st, sb) = call_put(
        &a,
        &format!("/v1/sandboxes/{id}/ingress"),
        json!({"auto_resume": true}),
    )
    .await;
    assert_eq!(
        (st, sb["auto_resume"].clone()),
        (StatusCode::OK, json!(true)),
        "{sb}"
    );
    let started = Instant::now();
    let resp = anon.get(path("/hello")).send().await.unwrap();
    let woke_total = started.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    let woke_ms: u64 = resp.headers()["x-ember-woke-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "hello from the sandbox\n");
    assert_eq!(a.sandbox(&id).await["state"], "running");
    eprintln!(
        "wake on traffic: resumed in {woke_ms} ms, first response after {} ms",
        woke_total.as_millis()
    );
    // Idle past its timeout it goes back to sleep; the next request wakes it again.
    let (st, v) = a
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 2}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    a.wait_state(&id, "paused", Duration::from_secs(120)).await;
    let resp = anon.get(path("/hello")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-ember-woke-ms"));
    assert_eq!(resp.text().await.unwrap(), "hello from the sandbox\n");
    a.wait_state(&id, "paused", Duration::from_secs(120)).await;
    let metrics = admin.metrics().await;
    assert!(
        metric(&metrics, "ember_ingress_requests_total{status=\"200\"}").unwrap_or(0.0) >= 8.0,
        "{metrics}"
    );

    let (st, _) = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let got = json_of(anon.get(path("/hello")).send().await.unwrap()).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    drop(server);
}

async fn call_put(a: &Api, path: &str, body: Value) -> (StatusCode, Value) {
    let resp = a
        .http
        .put(a.url(path))
        .header(AUTHORIZATION, format!("Bearer {}", a.key))
        .json(&body)
        .send()
        .await
        .unwrap();
    json_of(resp).await
}

#[test]
fn a_host_agent_serves_its_sandboxes_ports_directly_root_vm() {
    require_vm!();
    runtime().block_on(ports_served_by_the_host(TestDb::sqlite()));
}

/// `ember agent --ingress-listen`: the sandbox's host serves its ports
/// itself, with the control plane's access decisions (pushed to it), and
/// its traffic keeps the sandbox alive until it stops.
async fn ports_served_by_the_host(db: TestDb) {
    let spec = ServerSpec::new(&db, None)
        .arg("--ingress-domain")
        .arg(&format!("http://{DOMAIN}"));
    let server = spec.start();
    let admin = server.api(server.admin_key.as_deref().unwrap());
    let (_, key) = admin.team_with_key("alpha").await;
    let a = admin.with_key(&key);
    let mut home = AgentHome::new();
    home.token = spec.join_token.clone();
    let port = free_port();
    let host_domain = format!("h1.test:{port}");
    let agent = home.start_with(&[
        "--control-plane",
        &server.base,
        "--ingress-listen",
        &format!("127.0.0.1:{port}"),
        "--ingress-domain",
        &format!("http://{host_domain}"),
        "--capacity-memory-mib",
        "1024",
    ]);
    admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
    let direct_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let sb = a
        .create(
            json!({"template": "base", "memory_mib": 256, "timeout_s": 12, "on_timeout": "pause"}),
        )
        .await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let token = sb["traffic_token"].as_str().unwrap().to_owned();
    assert_eq!(
        sb["direct_port_url"],
        format!("http://{{port}}-{id}.{host_domain}/"),
        "{sb}"
    );
    // The control plane's own URL stays the stable one.
    assert_eq!(sb["port_url"], format!("http://{{port}}-{id}.{DOMAIN}/"));
    a.start_ingress_test_servers(&id, &token).await;
    let host = format!("8000-{id}.h1.test");
    let direct = client_for(&host, direct_addr);
    let url = |p: &str| format!("http://{host}:{port}{p}");

    // Private: the token opens it, nothing else does (the host takes no API key).
    let got = text(
        direct
            .get(url("/hello"))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        got,
        (StatusCode::OK, "hello from the sandbox\n".into()),
        "{}",
        home.logs()
    );
    let got = json_of(direct.get(url("/hello")).send().await.unwrap()).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap()
            .contains("x-ember-traffic-token"),
        "{got:?}"
    );
    let got = json_of(
        direct
            .get(url("/hello"))
            .header("x-ember-traffic-token", format!("{token}x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    let got = json_of(
        direct
            .get(url("/hello"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    // The guest never sees the token; it sees who asked and through what.
    let (st, headers) = json_of(
        direct
            .get(url("/headers"))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let seen = headers.to_string().to_ascii_lowercase();
    assert!(!seen.contains(&token.to_ascii_lowercase()), "{seen}");
    assert!(seen.contains("x-forwarded-for"), "{seen}");
    assert!(seen.contains(&format!("8000-{id}.h1.test")), "{seen}");

    // A WebSocket through the host's ingress.
    let stream = tokio::net::TcpStream::connect(direct_addr).await.unwrap();
    let echoed = websocket_echo(
        stream,
        &format!("{host}:{port}"),
        "/ws",
        &format!("X-Ember-Traffic-Token: {token}\r\n"),
        "direct",
    )
    .await;
    assert_eq!(echoed, "echo: direct");

    // Nothing on the port; an unknown sandbox; a name that is no port.
    let closed = format!("9-{id}.h1.test");
    let got = json_of(
        client_for(&closed, direct_addr)
            .get(format!("http://{closed}:{port}/"))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::BAD_GATEWAY, "port_closed");
    let other = format!("8000-{}.h1.test", ember_types::SandboxId::new());
    let got = json_of(
        client_for(&other, direct_addr)
            .get(format!("http://{other}:{port}/"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap()
            .contains("does not run on this host"),
        "{got:?}"
    );

    // Access changes reach the host: public, then private again.
    let (st, body) = call_put(
        &a,
        &format!("/v1/sandboxes/{id}/ingress"),
        json!({"public": true}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let got = text(direct.get(url("/hello")).send().await.unwrap()).await;
    assert_eq!(got.0, StatusCode::OK, "public: {got:?}");
    let (st, _) = call_put(
        &a,
        &format!("/v1/sandboxes/{id}/ingress"),
        json!({"public": false}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let got = json_of(direct.get(url("/hello")).send().await.unwrap()).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");

    // Traffic to the host is activity: past its 12 s timeout it still runs
    // while requests keep coming, and its expiry moved.
    let first_expiry = a.sandbox(&id).await["expires_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let st = direct
            .get(url("/hello"))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, StatusCode::OK, "{}", home.logs());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let now = a.sandbox(&id).await;
    assert_eq!(now["state"], "running", "traffic kept it alive: {now}");
    assert!(
        now["expires_at"].as_str().unwrap() > first_expiry.as_str(),
        "{now} vs {first_expiry}"
    );
    // Without traffic it times out (pauses); the host then sends clients
    // to the control plane's URL, which wakes it.
    a.wait_state(&id, "paused", Duration::from_secs(60)).await;
    let got = json_of(
        direct
            .get(url("/hello"))
            .header("x-ember-traffic-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::CONFLICT, "conflict");
    assert!(
        got.1["message"].as_str().unwrap().contains("paused"),
        "{got:?}"
    );
    assert!(a.sandbox(&id).await.get("direct_port_url").is_none());
    drop(agent);
    drop(server);
}
