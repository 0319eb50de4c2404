//! The control plane end to end with real hosts: real `ember server` and
//! `ember agent` processes, real QEMU microVMs (TCG here), real HTTP, on
//! SQLite and (when `EMBER_TEST_POSTGRES_URL` is set) PostgreSQL.
//!
//! Needs root and a built guest image. Sandboxes are small (256 MiB) and few
//! per test; every test ends by checking that nothing of its sandboxes is
//! left on its hosts: no VMM process, namespace, host link or RAM file.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ember_proto::host as pb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::agent::AgentHome;
use support::server::{Api, ServerSpec, assert_error, metric, ms};

macro_rules! require_vm {
    () => {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root for network namespaces and TAP devices"
        );
        ember_testkit::require!(
            crate::support::agent::image_dir().is_some(),
            "no guest image under {}: run `ember image build` first",
            crate::support::agent::data_dir().display()
        );
    };
}

#[path = "control_e2e/chaos.rs"]
mod chaos;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

const MIB: u32 = 256;

fn base(extra: Value) -> Value {
    let mut body = json!({"template": "base", "memory_mib": MIB, "timeout_s": 600});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Nothing of `home`'s sandboxes remains (its agent may still run).
fn assert_clean(home: &AgentHome) {
    assert_eq!(home.processes(), Vec::<u32>::new(), "VM processes left");
    assert_eq!(home.namespaces(), Vec::<String>::new(), "namespaces left");
    assert_eq!(home.links(), Vec::<String>::new(), "host links left");
    assert_eq!(home.memory_files(), Vec::<String>::new(), "RAM files left");
}

/// Wait until `home` is clean (the reconciler cleans up asynchronously).
async fn wait_clean(home: &AgentHome, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline
        && !(home.processes().is_empty()
            && home.namespaces().is_empty()
            && home.memory_files().is_empty())
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_clean(home);
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

on_both_stores_with_vms!(
    every_endpoint_with_real_vms,
    two_hosts_spread_fail_and_recover,
    concurrent_creates_and_racing_transitions,
    reconciler_and_timeouts_with_real_vms,
    failed_host_calls_never_cost_a_sandbox,
);

/// Each host has its own credentials, and its ID is pinned to them:
/// - a joined agent serves gRPC only over TLS (a plain-HTTP client gets
///   nowhere) and only to its own control token (the join token drives
///   no host);
/// - a second agent holding the join token and a copy of the host's ID
///   cannot register under it, whether the host is alive or not, nor with
///   a made-up credential;
/// - the host itself moves to a new address with its credential;
/// - the agent reaches the API over TLS too, trusting it through `--ca`;
/// - a revoked host is refused, even with its credential, until an admin
///   removes it; then the machine joins again afresh.
#[test]
fn a_hosts_id_is_pinned_to_its_credentials_root_vm() {
    require_vm!();
    runtime().block_on(async {
        let db = support::server::TestDb::sqlite();
        let spec = ServerSpec::new(&db, None).tls();
        let server = spec.start();
        assert!(server.base.starts_with("https://"), "{}", server.base);
        let ca = server.ca.clone().unwrap();
        let ca = ca.to_str().unwrap();
        let admin = server.api(server.admin_key.as_deref().unwrap());
        let mut real = AgentHome::fake_firecracker();
        real.token = spec.join_token.clone();
        let mut real_agent = real.start_with(&["--control-plane", &server.base, "--ca", ca]);
        let hosts = admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
        let id = hosts[0]["id"].as_str().unwrap().to_owned();
        assert_eq!(
            hosts[0]["address"],
            format!("https://{}", real_agent.addr),
            "a joined agent is dialled over TLS"
        );
        let identity = real.data().join("identity");
        let credential_file = identity.join("host.credential");
        let credential = std::fs::read_to_string(&credential_file).unwrap();
        let credential = credential.trim().to_owned();
        assert!(credential.starts_with("emberhost_"), "{credential}");
        use std::os::unix::fs::PermissionsExt;
        for f in ["host.credential", "control.token", "tls.key"] {
            let mode = std::fs::metadata(identity.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }

        // Plain HTTP/2 to the agent: refused at the TLS layer.
        let plain = tonic::transport::Channel::from_shared(format!("http://{}", real_agent.addr))
            .unwrap()
            .connect()
            .await
            .expect("TCP connects");
        let mut plain = pb::host_agent_client::HostAgentClient::with_interceptor(
            plain,
            support::agent::Bearer(spec.join_token.clone()),
        );
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            plain.host_info(pb::HostInfoRequest {}),
        )
        .await
        .expect("a plain client is answered, not left hanging")
        .unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);
        // TLS with the join token: the agent does not take it.
        let mut with_join_token = support::agent::tls_client(&format!("https://{}", real_agent.addr), &identity, &spec.join_token).await;
        let err = with_join_token
            .host_info(pb::HostInfoRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert_eq!(host_id_of(&real_agent).await, id, "its control token works");

        // A thief with the join token and a copy of the ID.
        let mut thief = AgentHome::fake_firecracker();
        thief.token = spec.join_token.clone();
        std::fs::create_dir_all(thief.data()).unwrap();
        std::fs::copy(real.data().join("host-id"), thief.data().join("host-id")).unwrap();
        let thief_agent = thief.start();
        assert_eq!(host_id_of(&thief_agent).await, id, "the copy claims the ID");
        let register = |bearer: String| {
            server.client()
                .post(server.url("/internal/v1/hosts"))
                .bearer_auth(bearer)
                .json(&json!({
                    "address": format!("http://{}", thief_agent.addr),
                    "host_id": id,
                    "control_token": thief_agent.token.repeat(4),
                }))
                .send()
        };
        let refused_as_taken = |got: reqwest::Response| async move {
            assert_eq!(got.status(), StatusCode::CONFLICT);
            let body: Value = got.json().await.unwrap();
            assert!(
                body["message"].as_str().unwrap().contains("cannot take its ID over"),
                "{body}"
            );
        };
        refused_as_taken(register(spec.join_token.clone()).await.unwrap()).await;
        let forged = register("emberhost_madeup".into()).await.unwrap();
        assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
        // The real agent is gone: its ID stays pinned all the same.
        real_agent.kill();
        refused_as_taken(register(spec.join_token.clone()).await.unwrap()).await;
        let (_, hosts) = admin.get("/v1/hosts").await;
        assert_eq!(hosts["hosts"].as_array().unwrap().len(), 1);

        // The host restarts on another port: its credential moves it.
        let real_agent = real.start_with(&["--control-plane", &server.base, "--ca", ca]);
        let moved = format!("https://{}", real_agent.addr);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, hosts) = admin.get("/v1/hosts").await;
            let h = &hosts["hosts"][0];
            if h["address"] == moved.as_str() && h["healthy"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "the host did not move: {hosts}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            std::fs::read_to_string(&credential_file).unwrap().trim(),
            credential,
            "a re-registration with the credential keeps it"
        );

        // Revoked: no longer called, refused even with its credential.
        let (st, revoked) = admin.post_empty(&format!("/v1/hosts/{id}/revoke")).await;
        assert_eq!(st, StatusCode::OK, "{revoked}");
        assert!(revoked["revoked_at"].is_string(), "{revoked}");
        assert_eq!(revoked["healthy"], false, "{revoked}");
        let again = server.client()
            .post(server.url("/internal/v1/hosts"))
            .bearer_auth(&credential)
            .json(&json!({
                "address": moved,
                "host_id": id,
                "control_token": std::fs::read_to_string(identity.join("control.token")).unwrap().trim(),
                "tls_cert": std::fs::read_to_string(identity.join("tls.crt")).unwrap(),
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::FORBIDDEN);
        let body: Value = again.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("revoked"), "{body}");
        let thief_again = register(spec.join_token.clone()).await.unwrap();
        assert_eq!(thief_again.status(), StatusCode::FORBIDDEN, "revoked first");
        let (_, audit) = admin.get(&format!("/v1/audit?target=host:{id}")).await;
        assert_eq!(audit["entries"].as_array().map(Vec::len), Some(1), "{audit}");

        // Removed: the machine joins again as a new registration.
        drop(real_agent);
        let (st, _) = admin.delete(&format!("/v1/hosts/{id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (_, hosts) = admin.get("/v1/hosts").await;
        assert_eq!(hosts["hosts"], json!([]));
        let _real_agent = real.start_with(&["--control-plane", &server.base, "--ca", ca]);
        let hosts = admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
        assert_eq!(hosts[0]["id"], id.as_str());
        let fresh = std::fs::read_to_string(&credential_file).unwrap();
        assert_ne!(fresh.trim(), credential, "a fresh join is issued a fresh credential");
    });
}

/// Run the CLI against `server` with `key`; (exit success, stdout, stderr).
fn ember_cli(
    server: &support::server::ServerProc,
    key: &str,
    args: &[&str],
) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .env("EMBER_API_URL", &server.base)
        .env("EMBER_API_KEY", key)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With `--no-cluster-join-token`, machines join only with one-time tokens
/// that an admin makes (`ember host join-token create`):
/// - a token admits the first host that presents it, which then keeps
///   its own credential (it restarts without the token);
/// - a second machine with the same token is refused, told which host it
///   admitted; the cluster token is not taken; a revoked token admits nobody;
/// - removing the host revokes its token: the machine needs a new one.
#[test]
fn one_time_join_tokens_admit_one_host_each_root_vm() {
    require_vm!();
    runtime().block_on(async {
        let db = support::server::TestDb::sqlite();
        let mut spec = ServerSpec::new(&db, None).arg("--no-cluster-join-token");
        let cluster_token = std::mem::take(&mut spec.join_token);
        let server = spec.start();
        assert!(
            server.logs().contains("no cluster join token"),
            "{}",
            server.logs()
        );
        let admin_key = server.admin_key.clone().unwrap();
        let admin = server.api(&admin_key);

        let (ok, token, err) = ember_cli(
            &server,
            &admin_key,
            &["host", "join-token", "create", "--expires-in", "10m"],
        );
        assert!(ok, "{err}");
        let token = token.trim().to_owned();
        assert!(token.starts_with("emberjoin_"), "{token}");
        assert!(err.contains("shown only now"), "{err}");
        let (_, listed) = admin.get("/v1/hosts/join-tokens").await;
        let first = &listed["tokens"][0];
        assert_eq!(first["state"], "unused", "{listed}");
        assert!(!listed.to_string().contains(&token), "never listed: {listed}");
        let token_id = first["id"].as_str().unwrap().to_owned();

        // The first machine joins with it.
        let mut a = AgentHome::fake_firecracker();
        a.token = token.clone();
        let agent_a = a.start_with(&["--control-plane", &server.base]);
        let hosts = admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
        let host_a = hosts[0]["id"].as_str().unwrap().to_owned();
        let (_, listed) = admin.get("/v1/hosts/join-tokens").await;
        assert_eq!(listed["tokens"][0]["state"], "used", "{listed}");
        assert_eq!(listed["tokens"][0]["used_by_host"], host_a.as_str(), "{listed}");

        // A second machine with the same token: refused, told why.
        let mut b = AgentHome::fake_firecracker();
        b.token = token.clone();
        let agent_b = b.start();
        let identity_b = ember_agent::identity::Identity::load_or_create(&b.data()).unwrap();
        let register_b = |bearer: String| {
            let body = json!({
                "address": format!("https://{}", agent_b.addr),
                "host_id": std::fs::read_to_string(b.data().join("host-id")).unwrap_or_else(|_| ember_types::HostId::new().to_string()).trim().to_owned(),
                "control_token": identity_b.control_token.clone(),
                "tls_cert": identity_b.cert_pem.clone(),
            });
            server.client().post(server.url("/internal/v1/hosts")).bearer_auth(bearer).json(&body).send()
        };
        let refused = register_b(token.clone()).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let body: Value = refused.json().await.unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(&format!("already admitted host {host_a}")), "{body}");
        assert!(message.contains("ember host join-token create"), "{body}");
        // No cluster token either: the one the harness would have given is
        // not taken.
        let refused = register_b(cluster_token).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        // A revoked token admits nobody.
        let (ok, second, err) = ember_cli(&server, &admin_key, &["host", "join-token", "create", "--json"]);
        assert!(ok, "{err}");
        let second: Value = serde_json::from_str(&second).unwrap();
        let second_id = second["id"].as_str().unwrap();
        let (ok, _, err) = ember_cli(&server, &admin_key, &["host", "join-token", "revoke", second_id]);
        assert!(ok, "{err}");
        let refused = register_b(second["token"].as_str().unwrap().to_owned()).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let body: Value = refused.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("was revoked"), "{body}");
        let (_, hosts) = admin.get("/v1/hosts").await;
        assert_eq!(hosts["hosts"].as_array().unwrap().len(), 1, "{hosts}");
        drop(agent_b);

        // The admitted host restarts without any token: its credential
        // is enough.
        drop(agent_a);
        a.token = String::new();
        let agent_a = a.start_with(&["--control-plane", &server.base]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, hosts) = admin.get("/v1/hosts").await;
            let h = &hosts["hosts"][0];
            if h["address"] == format!("https://{}", agent_a.addr) && h["healthy"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "the host did not come back: {hosts}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        // Removed, its token no longer admits it: a new one is needed.
        drop(agent_a);
        let (st, _) = admin.post_empty(&format!("/v1/hosts/{host_a}/revoke")).await;
        assert_eq!(st, StatusCode::OK);
        let (st, _) = admin.delete(&format!("/v1/hosts/{host_a}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let identity_a = ember_agent::identity::Identity::load_or_create(&a.data()).unwrap();
        let again = server
            .client()
            .post(server.url("/internal/v1/hosts"))
            .bearer_auth(&token)
            .json(&json!({
                "address": "http://127.0.0.1:9",
                "host_id": host_a,
                "control_token": identity_a.control_token,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
        let (_, listed) = admin.get("/v1/hosts/join-tokens").await;
        let used = listed["tokens"].as_array().unwrap().iter().find(|t| t["id"] == token_id.as_str()).unwrap();
        assert_eq!(used["state"], "revoked", "{listed}");
        let (_, audit) = admin.get(&format!("/v1/audit?target=join-token:{second_id}")).await;
        assert_eq!(audit["entries"].as_array().map(Vec::len), Some(2), "create and revoke: {audit}");
    });
}

#[test]
fn slow_pause_and_resume_are_accepted_and_polled_sqlite_root_vm() {
    require_vm!();
    runtime().block_on(slow_pause_and_resume_are_accepted_and_polled(
        support::server::TestDb::sqlite(),
    ));
}

/// Every endpoint against a server with its embedded agent and real VMs,
/// and every error code: two VMs (a sandbox and a fork of it) carry it all.
async fn every_endpoint_with_real_vms(db: support::server::TestDb) {
    let home = AgentHome::new();
    let spec = ServerSpec::new(&db, Some(&home))
        .arg("--capacity-vcpus")
        .arg("4")
        .arg("--capacity-memory-mib")
        .arg("1024");
    let mut server = spec.start();
    let admin = server.api(server.admin_key.as_deref().unwrap());
    let (_, key_a) = admin.team_with_key("alpha").await;
    let (_, key_b) = admin.team_with_key("beta").await;
    let a = admin.with_key(&key_a);
    let b = admin.with_key(&key_b);
    admin.wait_healthy_hosts(1, Duration::from_secs(30)).await;

    // ---- create, get, list
    let sb = a
        .create(base(json!({
            "metadata": {"role": "primary"},
            "env": {"GREETING": "hello from env"},
        })))
        .await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let token = sb["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("embersb_"), "{sb}");
    assert_eq!(sb["memory_mib"], MIB);
    assert_eq!(sb["vcpus"], 1);
    assert!(sb["host_id"].is_string(), "{sb}");
    let got = a.sandbox(&id).await;
    assert_eq!(got["state"], "running");
    assert!(got.get("access_token").is_none(), "the token is shown once");
    assert!(got.get("env").is_none(), "env is never returned");
    let (st, list) = a.get("/v1/sandboxes?metadata.role=primary").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1, "{list}");
    let (_, list) = a.get("/v1/sandboxes?state=paused").await;
    assert_eq!(list["sandboxes"], json!([]));

    // ---- exec: stdout, stderr, exit code, env
    let out = a.sh(&id, "echo \"$GREETING\"; echo oops >&2; exit 3").await;
    assert_eq!(out.stdout, "hello from env\n");
    assert_eq!(out.stderr, "oops\n");
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.events[0]["type"], "started", "{:?}", out.events);
    let seqs: Vec<u64> = out
        .events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");

    // ---- exec extends the timeout
    let before = ms(&a.sandbox(&id).await, "expires_at");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.sh(&id, "true").await;
    let after = ms(&a.sandbox(&id).await, "expires_at");
    assert!(after >= before + 1000, "exec extends: {before} -> {after}");

    // ---- stdin through the stdin endpoint, background and reconnect
    let (st, bg) = a
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "sh", "args": ["-c", "read line; echo \"got $line\"; echo done >&2"],
                   "stdin": true, "background": true, "tag": "reader"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{bg}");
    let pid = bg["pid"].as_u64().unwrap();
    let (st, body) = a
        .post(
            &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
            json!({"text": "a line\n", "close": true}),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let events = events_until_exit(&a, &id, pid, 0).await;
    assert_eq!(events.stdout, "got a line\n");
    assert_eq!(events.stderr, "done\n");
    assert_eq!(events.exit_code, Some(0));
    // Reconnecting after a sequence number replays only what came after it.
    let first_seq = events.events[0]["seq"].as_u64().unwrap();
    let later = events_until_exit(&a, &id, pid, first_seq).await;
    assert!(
        later
            .events
            .iter()
            .all(|e| e["seq"].as_u64().unwrap() > first_seq),
        "{:?}",
        later.events
    );
    assert_eq!(later.events.len(), events.events.len() - 1);
    let (st, procs) = a.get(&format!("/v1/sandboxes/{id}/processes")).await;
    assert_eq!(st, StatusCode::OK);
    let reader = procs["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("{procs}"));
    assert_eq!(reader["tag"], "reader");
    assert_eq!(reader["running"], false);
    // A long background process, signalled.
    let (_, bg) = a
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "sleep", "args": ["300"], "background": true}),
        )
        .await;
    let sleeper = bg["pid"].as_u64().unwrap();
    let (st, body) = a
        .post(
            &format!("/v1/sandboxes/{id}/processes/{sleeper}/signal"),
            json!({"signal": "KILL"}),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let killed = events_until_exit(&a, &id, sleeper, 0).await;
    assert!(
        killed.events.last().unwrap()["signal"] == 9,
        "{:?}",
        killed.events
    );

    // ---- files: a large file streamed both ways, stat, list, mkdir, delete
    let big: Vec<u8> = (0..(6 << 20)).map(|_| rand::random::<u8>()).collect();
    let (st, dir) = a
        .post(
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            json!({"path": "/home/user/data/sub", "parents": true}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{dir}");
    assert_eq!(dir["type"], "directory");
    let resp = a
        .http
        .put(a.url(&format!(
            "/v1/sandboxes/{id}/files?path=/home/user/data/big.bin&mode=600"
        )))
        .bearer_auth(&a.key)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(
            big.chunks(256 << 10)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                .collect::<Vec<_>>(),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let stat: Value = resp.json().await.unwrap();
    assert_eq!(stat["size"], big.len() as u64, "{stat}");
    assert_eq!(stat["mode"], "600", "{stat}");
    let resp = a
        .http
        .get(a.url(&format!(
            "/v1/sandboxes/{id}/files?path=/home/user/data/big.bin"
        )))
        .bearer_auth(&a.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let back = resp.bytes().await.unwrap();
    assert_eq!(back.len(), big.len());
    assert_eq!(
        sha256_hex(&back),
        sha256_hex(&big),
        "downloaded bytes differ"
    );
    let guest_sum = a
        .sh(&id, "sha256sum /home/user/data/big.bin | cut -d' ' -f1")
        .await;
    assert_eq!(
        guest_sum.stdout.trim(),
        sha256_hex(&big),
        "the guest has other bytes"
    );
    let (st, stat) = a
        .get(&format!(
            "/v1/sandboxes/{id}/files/stat?path=/home/user/data/big.bin"
        ))
        .await;
    assert_eq!(st, StatusCode::OK, "{stat}");
    assert_eq!(stat["type"], "file");
    let (st, listing) = a
        .get(&format!(
            "/v1/sandboxes/{id}/files/list?path=/home/user/data"
        ))
        .await;
    assert_eq!(st, StatusCode::OK, "{listing}");
    let mut names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "sub"]);
    let (st, _) = a
        .delete(&format!(
            "/v1/sandboxes/{id}/files?path=/home/user/data/big.bin"
        ))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = a
        .get(&format!(
            "/v1/sandboxes/{id}/files/stat?path=/home/user/data/big.bin"
        ))
        .await;
    assert_error(&(st, body), StatusCode::NOT_FOUND, "not_found");
    let (st, body) = a
        .delete(&format!("/v1/sandboxes/{id}/files?path=/home/user/data"))
        .await;
    assert!(
        st.is_client_error(),
        "a non-empty directory needs recursive: {st} {body}"
    );
    let (st, _) = a
        .delete(&format!(
            "/v1/sandboxes/{id}/files?path=/home/user/data&recursive=true"
        ))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // ---- path traversal resolves inside the guest; the host is never touched
    let guest_passwd = a.sh(&id, "cat /etc/passwd").await.stdout;
    let resp = a
        .http
        .get(a.url(&format!(
            "/v1/sandboxes/{id}/files?path=/../../../etc/passwd"
        )))
        .bearer_auth(&a.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let read = resp.text().await.unwrap();
    assert_eq!(read, guest_passwd, "`..` above / is / inside the guest");
    assert_ne!(
        read,
        std::fs::read_to_string("/etc/passwd").unwrap(),
        "the host's /etc/passwd must never be served"
    );
    let marker = format!("ember-traversal-{}", rand::random::<u64>());
    for path in [
        format!("/../../../../tmp/{marker}"),
        format!("/home/user/../../../tmp/{marker}"),
    ] {
        let resp = a
            .http
            .put(a.url(&format!("/v1/sandboxes/{id}/files")))
            .query(&[("path", &path)])
            .bearer_auth(&a.key)
            .body("inside")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let stat: Value = resp.json().await.unwrap();
        assert_eq!(stat["name"], marker.as_str(), "{stat}");
    }
    assert!(
        !std::path::Path::new(&format!("/tmp/{marker}")).exists(),
        "a guest path reached the host's /tmp"
    );
    assert_eq!(
        a.sh(&id, &format!("cat /tmp/{marker}")).await.stdout,
        "inside"
    );
    for (path, field) in [
        (format!("/v1/sandboxes/{id}/files?path=etc/passwd"), "path"),
        (
            format!("/v1/sandboxes/{id}/files?path=../etc/passwd"),
            "path",
        ),
        (format!("/v1/sandboxes/{id}/files/list?path=home"), "path"),
    ] {
        let got = a.get(&path).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(got.1["field"], field, "{path}: {:?}", got.1);
    }
    let got = a
        .post(
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            json!({"path": "rel/dir"}),
        )
        .await;
    assert_eq!(got.1["field"], "path", "{:?}", got.1);
    let got = a
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "pwd", "cwd": "tmp"}),
        )
        .await;
    assert_eq!(got.1["field"], "cwd", "{:?}", got.1);

    // ---- request errors on real endpoints: 400, 401, 413, 415
    let exec_url = a.url(&format!("/v1/sandboxes/{id}/exec"));
    let raw = |body: &str| {
        a.http
            .post(&exec_url)
            .bearer_auth(&a.key)
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    assert_error(
        &support::server::call(raw("{\"cmd\": ")).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    let unknown = support::server::call(raw("{\"cmd\": \"true\", \"bogus\": 1}")).await;
    assert_error(&unknown, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(unknown.1["field"], "bogus");
    assert_error(
        &support::server::call(a.http.post(&exec_url).json(&json!({"cmd": "true"}))).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &support::server::call(
            a.http
                .post(&exec_url)
                .bearer_auth(&a.key)
                .header("content-type", "text/plain")
                .body("{\"cmd\": \"true\"}"),
        )
        .await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let huge = format!(
        "{{\"cmd\": \"echo\", \"args\": [\"{}\"]}}",
        "x".repeat(2 << 20)
    );
    assert_error(
        &support::server::call(
            support::server::client()
                .post(&exec_url)
                .bearer_auth(&a.key)
                .header("content-type", "application/json")
                .body(huge),
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // 503: more than the host has.
    let got = a
        .post("/v1/sandboxes", base(json!({"memory_mib": 4096})))
        .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");

    // ---- access tokens: exec and files of their own sandbox only (403 elsewhere)
    let t = a.with_key(&token);
    assert_eq!(t.sh(&id, "echo via-token").await.stdout, "via-token\n");
    for got in [
        t.get(&format!("/v1/sandboxes/{id}")).await,
        t.post_empty(&format!("/v1/sandboxes/{id}/pause")).await,
        t.delete(&format!("/v1/sandboxes/{id}")).await,
        t.get("/v1/sandboxes").await,
    ] {
        assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
    }

    // ---- snapshots: a template from a running sandbox, a fork of it
    a.sh(&id, "echo frozen > /home/user/state.txt && sync")
        .await;
    let (st, tpl) = a
        .post(
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "tpl"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{tpl}");
    assert_eq!(
        (tpl["vcpus"].as_u64(), tpl["memory_mib"].as_u64()),
        (Some(1), Some(MIB as u64))
    );
    assert_eq!(
        a.sandbox(&id).await["state"],
        "running",
        "the source keeps running"
    );
    let taken = a
        .post(
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "tpl"}),
        )
        .await;
    assert_error(&taken, StatusCode::CONFLICT, "conflict");
    let base_name = a
        .post(
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "base"}),
        )
        .await;
    assert_eq!(base_name.1["field"], "name", "{:?}", base_name.1);
    let locked = a
        .post(
            "/v1/sandboxes",
            json!({"template": "tpl", "timeout_s": 60, "memory_mib": 512}),
        )
        .await;
    assert_error(&locked, StatusCode::UNPROCESSABLE_ENTITY, "template_locked");
    let msg = locked.1["message"].as_str().unwrap();
    assert!(msg.contains(&format!("1 vCPUs and {MIB} MiB")), "{msg}");
    let locked = a
        .post(
            "/v1/sandboxes",
            json!({"template": "tpl", "timeout_s": 60, "vcpus": 2}),
        )
        .await;
    assert_error(&locked, StatusCode::UNPROCESSABLE_ENTITY, "template_locked");
    let (st, one) = a.get("/v1/snapshots/tpl").await;
    assert_eq!(st, StatusCode::OK, "{one}");
    assert_eq!(one["source_sandbox_id"], id.as_str());
    let (_, all) = a.get("/v1/snapshots").await;
    assert_eq!(all["snapshots"].as_array().unwrap().len(), 1, "{all}");
    let fork = a
        .create(json!({"template": "tpl", "timeout_s": 600, "metadata": {"role": "fork"}}))
        .await;
    let fork_id = fork["id"].as_str().unwrap().to_owned();
    assert_eq!(fork["template"], "tpl");
    assert_eq!(
        fork["memory_mib"], MIB,
        "the template's memory is inherited"
    );
    assert_eq!(
        a.sh(&fork_id, "cat /home/user/state.txt").await.stdout,
        "frozen\n"
    );
    let (_, forks) = a.get("/v1/sandboxes?template=tpl").await;
    let ids: Vec<&str> = forks["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [fork_id.as_str()]);
    let (_, listed) = a
        .get("/v1/sandboxes?metadata.role=fork&state=running")
        .await;
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 1);

    // ---- another team: 404 for everything of team alpha, never its data
    let sid = &id;
    for got in [
        b.get(&format!("/v1/sandboxes/{sid}")).await,
        b.delete(&format!("/v1/sandboxes/{sid}")).await,
        b.post_empty(&format!("/v1/sandboxes/{sid}/pause")).await,
        b.post_empty(&format!("/v1/sandboxes/{sid}/resume")).await,
        b.post(
            &format!("/v1/sandboxes/{sid}/timeout"),
            json!({"timeout_s": 5}),
        )
        .await,
        b.post(
            &format!("/v1/sandboxes/{sid}/snapshots"),
            json!({"name": "steal"}),
        )
        .await,
        b.post(
            &format!("/v1/sandboxes/{sid}/exec"),
            json!({"cmd": "cat", "args": ["/etc/hostname"]}),
        )
        .await,
        b.get(&format!("/v1/sandboxes/{sid}/processes")).await,
        b.get(&format!(
            "/v1/sandboxes/{sid}/files?path=/home/user/state.txt"
        ))
        .await,
        b.get(&format!("/v1/sandboxes/{sid}/files/list?path=/"))
            .await,
        b.get(&format!("/v1/sandboxes/{sid}/processes/{pid}/events"))
            .await,
        b.get("/v1/snapshots/tpl").await,
        b.delete("/v1/snapshots/tpl").await,
    ] {
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
        assert!(!got.1.to_string().contains("frozen"), "{:?}", got.1);
    }
    let got = b
        .post("/v1/sandboxes", json!({"template": "tpl", "timeout_s": 60}))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let (_, theirs) = b.get("/v1/sandboxes?state=running,paused").await;
    assert_eq!(theirs["sandboxes"], json!([]));
    let (_, theirs) = b.get("/v1/snapshots").await;
    assert_eq!(theirs["snapshots"], json!([]));
    assert_eq!(a.sandbox(sid).await["state"], "running", "untouched");

    // ---- pause, 409s, resume with a new timeout, timeout extension
    let (_, before) = a.get("/v1/teams/me/usage").await;
    let (st, paused) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
    assert_eq!(st, StatusCode::OK, "{paused}");
    assert_eq!(paused["state"], "paused");
    // The host reports what the pause's build takes; the team's storage
    // counts it.
    let (_, after) = a.get("/v1/teams/me/usage").await;
    assert!(
        after["storage_mib"]["used"].as_u64() > before["storage_mib"]["used"].as_u64(),
        "{before} -> {after}"
    );
    assert!(
        paused.get("expires_at").is_none(),
        "paused sandboxes do not expire"
    );
    let again = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
    assert!(
        again.1["message"].as_str().unwrap().contains("paused"),
        "{:?}",
        again.1
    );
    let exec_paused = a
        .post(&format!("/v1/sandboxes/{id}/exec"), json!({"cmd": "true"}))
        .await;
    assert_error(&exec_paused, StatusCode::CONFLICT, "conflict");
    let snap_paused = a
        .post(
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "x"}),
        )
        .await;
    assert_error(&snap_paused, StatusCode::CONFLICT, "conflict");
    let timeout_paused = a
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 30}),
        )
        .await;
    assert_error(&timeout_paused, StatusCode::CONFLICT, "conflict");
    let (_, list) = a.get("/v1/sandboxes?state=paused").await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
    let bad_resume = a
        .post(&format!("/v1/sandboxes/{id}/resume"), json!({"timeout": 5}))
        .await;
    assert_eq!(bad_resume.1["field"], "timeout", "{:?}", bad_resume.1);
    let t0 = ember_control::model::now_ms();
    let (st, resumed) = a
        .post(
            &format!("/v1/sandboxes/{id}/resume"),
            json!({"timeout_s": 1200}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["state"], "running");
    assert_eq!(resumed["timeout_s"], 1200);
    // Where the resume's time went: the control plane's phases, the host
    // call, and the host agent's phases inside it.
    let timing = &resumed["last_operation"];
    assert_eq!(timing["operation"], "resume", "{resumed}");
    let phases: Vec<&str> = timing["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases: {resumed}"))
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    for phase in [
        "control.schedule",
        "control.intent",
        "host",
        "host.vmm.load_state",
        "host.guest.init",
    ] {
        assert!(phases.contains(&phase), "no {phase} in {phases:?}");
    }
    let host_ms = timing["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "host")
        .and_then(|p| p["ms"].as_f64())
        .unwrap();
    let total_ms = timing["total_ms"].as_f64().unwrap();
    assert!(host_ms > 0.0 && host_ms <= total_ms, "{timing}");
    assert_eq!(
        a.sandbox(&id).await["last_operation"],
        *timing,
        "kept with the row"
    );
    let exp = ms(&resumed, "expires_at");
    assert!(
        (exp - t0 - 1_200_000).abs() < 120_000,
        "expires {exp} vs now {t0}"
    );
    assert_eq!(
        a.sh(&id, "cat /home/user/state.txt").await.stdout,
        "frozen\n"
    );
    let again = a.post_empty(&format!("/v1/sandboxes/{id}/resume")).await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
    let t0 = ember_control::model::now_ms();
    let (st, extended) = a
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 3000}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{extended}");
    assert_eq!(extended["timeout_s"], 3000);
    let exp = ms(&extended, "expires_at");
    assert!(
        (exp - t0 - 3_000_000).abs() < 60_000,
        "expires {exp} vs now {t0}"
    );
    let bad = a
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 0}),
        )
        .await;
    assert_eq!(bad.1["field"], "timeout_s", "{:?}", bad.1);

    // ---- DELETE /v1/snapshots both ways
    let (st, del) = a.delete("/v1/snapshots/tpl").await;
    assert_eq!(st, StatusCode::OK, "{del}");
    assert_eq!(del["data_freed"], false, "the fork still uses it: {del}");
    let (st, _) = a.get("/v1/snapshots/tpl").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_error(
        &a.delete("/v1/snapshots/tpl").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(a.sh(&fork_id, "echo alive").await.stdout, "alive\n");
    // The name is free again at once.
    let (st, solo) = a
        .post(
            &format!("/v1/sandboxes/{fork_id}/snapshots"),
            json!({"name": "tpl"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{solo}");
    let (st, _) = a.delete(&format!("/v1/sandboxes/{fork_id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, del) = a.delete("/v1/snapshots/tpl").await;
    assert_eq!(st, StatusCode::OK, "{del}");
    assert_eq!(del["data_freed"], true, "nothing used it any more: {del}");

    // ---- metrics after real operations
    let text = admin.metrics().await;
    for op in ["create", "pause", "resume"] {
        let n = metric(
            &text,
            &format!("ember_sandbox_operation_seconds_count{{operation=\"{op}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {op} histogram:\n{text}"));
        assert!(n >= 1.0, "{op}: {n}\n{text}");
    }
    for (op, phase) in [
        ("create", "host.guest.ready"),
        ("fork", "host.disk"),
        ("resume", "host"),
        ("pause", "host.build.write"),
    ] {
        let series = format!(
            "ember_sandbox_operation_phase_seconds_count{{operation=\"{op}\",phase=\"{phase}\"}}"
        );
        let n = metric(&text, &series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
        assert!(n >= 1.0, "{series}: {n}");
    }
    assert_eq!(
        metric(&text, "ember_sandboxes{state=\"running\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "ember_sandboxes{state=\"destroyed\"}"),
        Some(1.0),
        "{text}"
    );
    let host = sb["host_id"].as_str().unwrap();
    assert_eq!(
        metric(
            &text,
            &format!("ember_host_page_faults_served{{host=\"{host}\",backend=\"qemu\"}}")
        ),
        Some(0.0),
        "a qemu host serves no page faults and says which backend it is:\n{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("ember_host_up{{host=\"{host}\",backend=\"qemu\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    // The hosts' own counters are as fresh as their last probe.
    let series =
        format!("ember_host_operations{{host=\"{host}\",backend=\"qemu\",operation=\"resume\"}}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = admin.metrics().await;
        if metric(&text, &series).is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never counted the resume:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // ---- delete; deleting again is 409; the row stays readable as destroyed
    let (st, _) = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let again = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
    assert_eq!(a.sandbox(&id).await["state"], "destroyed");
    let gone = a
        .post(&format!("/v1/sandboxes/{id}/exec"), json!({"cmd": "true"}))
        .await;
    assert_error(&gone, StatusCode::CONFLICT, "conflict");
    assert_clean(&home);
    server.stop();
}

/// Events of a process from `after` to its exit.
async fn events_until_exit(a: &Api, id: &str, pid: u64, after: u64) -> support::server::ExecOutput {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = a
            .http
            .get(a.url(&format!(
                "/v1/sandboxes/{id}/processes/{pid}/events?after={after}"
            )))
            .bearer_auth(&a.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let out = support::server::ExecOutput::from_ndjson(&resp.text().await.unwrap());
        if out.events.last().is_some_and(|e| e["type"] == "exit") {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} did not exit: {:?}",
            out.events
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Host ID → the agent home it runs from.
async fn host_id_of(agent: &support::agent::AgentProc) -> String {
    agent
        .client()
        .await
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .host_id
}

/// A control plane with `--no-agent` and two `ember agent` processes:
/// placement spreads, templates and paused sandboxes stay on their host, a
/// control-plane restart keeps everything, a dead agent makes its host
/// unhealthy without touching anything (then, after `host_lost_after_s`,
/// fails its sandboxes and cleans their VMs up when it returns), and an
/// agent that restarts without its VMs gets them failed with its reason.
async fn two_hosts_spread_fail_and_recover(db: support::server::TestDb) {
    let spec = ServerSpec::new(&db, None)
        .config("orphan_grace_s = 3")
        .config("host_lost_after_s = 10");
    let mut server = spec.start();
    let admin_key = server.admin_key.clone().unwrap();
    let admin = server.api(&admin_key);
    let (_, key) = admin.team_with_key("alpha").await;
    let a = admin.with_key(&key);
    let mut homes = [AgentHome::new(), AgentHome::new()];
    for h in &mut homes {
        h.token = spec.join_token.clone();
    }
    let join = |h: &AgentHome, base: &str| {
        h.start_with(&[
            "--control-plane",
            base,
            "--capacity-vcpus",
            "4",
            "--capacity-memory-mib",
            "2048",
        ])
    };
    let mut agents = [join(&homes[0], &server.base), join(&homes[1], &server.base)];
    let host_ids = [host_id_of(&agents[0]).await, host_id_of(&agents[1]).await];
    let hosts = admin.wait_healthy_hosts(2, Duration::from_secs(60)).await;
    for h in &hosts {
        assert_eq!(h["backend"], "qemu");
        assert!(
            host_ids.contains(&h["id"].as_str().unwrap().to_owned()),
            "{h}"
        );
    }
    let home_of = |host: &Value| {
        let h = host.as_str().unwrap();
        host_ids.iter().position(|id| id == h).unwrap()
    };

    // Spread: the second sandbox goes to the emptier host.
    let s1 = a.create(base(json!({}))).await;
    let s2 = a.create(base(json!({}))).await;
    let (s1_id, s2_id) = (
        s1["id"].as_str().unwrap().to_owned(),
        s2["id"].as_str().unwrap().to_owned(),
    );
    assert_ne!(
        s1["host_id"], s2["host_id"],
        "sandboxes spread across hosts"
    );
    let (ha, hb) = (home_of(&s1["host_id"]), home_of(&s2["host_id"]));
    assert_eq!(homes[ha].processes_of(&s1_id).len(), 1);
    assert_eq!(homes[hb].processes_of(&s2_id).len(), 1);

    // A template lives where it was made; its forks land there even though
    // the other host has more room.
    let (st, _) = a
        .post(
            &format!("/v1/sandboxes/{s1_id}/snapshots"),
            json!({"name": "tpl"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let f1 = a.create(json!({"template": "tpl", "timeout_s": 600})).await;
    let f1_id = f1["id"].as_str().unwrap().to_owned();
    assert_eq!(
        f1["host_id"], s1["host_id"],
        "a fork lands on its template's host"
    );

    // Pause on one host, resume on the same.
    let (st, p) = a.post_empty(&format!("/v1/sandboxes/{s2_id}/pause")).await;
    assert_eq!(st, StatusCode::OK, "{p}");
    assert_eq!(
        homes[hb].processes_of(&s2_id),
        Vec::<u32>::new(),
        "paused = no VM"
    );
    let (st, r) = a.post_empty(&format!("/v1/sandboxes/{s2_id}/resume")).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(
        r["host_id"], s2["host_id"],
        "resumed on the host that paused it"
    );
    assert_eq!(a.sh(&s2_id, "echo back").await.stdout, "back\n");

    // Restart the control plane: sandboxes, templates, keys and hosts intact.
    server.stop();
    let server = spec.start();
    assert!(server.admin_key.is_none(), "no new admin key on a restart");
    let a = server.api(&key);
    let admin = server.api(&admin_key);
    admin.wait_healthy_hosts(2, Duration::from_secs(60)).await;
    for id in [&s1_id, &s2_id, &f1_id] {
        assert_eq!(a.sandbox(id).await["state"], "running", "{id}");
    }
    let (st, t) = a.get("/v1/snapshots/tpl").await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert_eq!(a.sh(&f1_id, "echo ok").await.stdout, "ok\n");

    // A paused sandbox on host A rides out A's outage below.
    let (st, p) = a.post_empty(&format!("/v1/sandboxes/{f1_id}/pause")).await;
    assert_eq!(st, StatusCode::OK, "{p}");

    // SIGKILL host A's agent: A is unhealthy, nothing is failed or killed
    // yet, and host B is not touched.
    let mut b_vms = homes[hb].processes();
    b_vms.sort();
    agents[ha].kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, hosts) = admin.get("/v1/hosts").await;
        let down = hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == host_ids[ha].as_str())
            .unwrap()
            .clone();
        // The health flag and the stored error may be seen a pass apart;
        // both must arrive.
        if down["healthy"] == false && down["last_error"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host A not unhealthy with a reason: {hosts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        a.sandbox(&s1_id).await["state"],
        "running",
        "an unreachable host kills nothing"
    );
    assert_eq!(homes[ha].processes_of(&s1_id).len(), 1, "its VM still runs");
    let got = a.post_empty(&format!("/v1/sandboxes/{f1_id}/resume")).await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    assert!(
        got.1["message"].as_str().unwrap().contains(&host_ids[ha]),
        "{:?}",
        got.1
    );
    assert_eq!(a.sandbox(&f1_id).await["state"], "paused");
    let text = admin.metrics().await;
    assert_eq!(metric(&text, "ember_hosts_healthy"), Some(1.0), "{text}");
    let got = a
        .post("/v1/sandboxes", json!({"template": "tpl", "timeout_s": 60}))
        .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    assert_eq!(a.sh(&s2_id, "echo still").await.stdout, "still\n");
    // After host_lost_after_s, A's running sandboxes are failed with a
    // reason; its paused one stays paused (its build is on A's disk).
    let sb = a
        .wait_state(&s1_id, "failed", Duration::from_secs(60))
        .await;
    let reason = sb["failure_reason"].as_str().unwrap();
    assert!(reason.contains("unreachable"), "{reason}");
    assert!(reason.contains(&host_ids[ha]), "{reason}");
    assert_eq!(a.sandbox(&f1_id).await["state"], "paused");
    assert_eq!(a.sandbox(&s2_id).await["state"], "running");
    let mut b_now = homes[hb].processes();
    b_now.sort();
    assert_eq!(b_now, b_vms, "host B's VMs untouched");
    // A returns with those VMs still alive: they are failed in the
    // database, so the reconciler destroys them after the grace period.
    agents[ha] = join(&homes[ha], &server.base);
    admin.wait_healthy_hosts(2, Duration::from_secs(60)).await;
    wait_clean(&homes[ha], Duration::from_secs(60)).await;
    assert_eq!(a.sandbox(&s1_id).await["state"], "failed");
    // The paused one resumes on A, its own host, now that A is back.
    let (st, r) = a.post_empty(&format!("/v1/sandboxes/{f1_id}/resume")).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["host_id"], s1["host_id"]);
    assert_eq!(a.sh(&f1_id, "echo resumed").await.stdout, "resumed\n");

    // B's agent dies, and so does its VM, and the agent comes back before
    // host_lost_after_s: the host's own account (the VM did not survive) fails it.
    agents[hb].kill();
    for pid in homes[hb].processes_of(&s2_id) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    agents[hb] = join(&homes[hb], &server.base);
    let sb = a
        .wait_state(&s2_id, "failed", Duration::from_secs(60))
        .await;
    let reason = sb["failure_reason"].as_str().unwrap();
    assert!(
        !reason.contains("unreachable"),
        "the host answered: {reason}"
    );
    assert!(reason.contains("did not survive"), "{reason}");
    wait_clean(&homes[hb], Duration::from_secs(30)).await;

    // Failed sandboxes are deleted like any other; nothing is left anywhere.
    for id in [&s1_id, &f1_id, &s2_id] {
        let (st, body) = a.delete(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{id}: {body}");
    }
    let (st, _) = a.delete("/v1/snapshots/tpl").await;
    assert_eq!(st, StatusCode::OK);
    for h in &homes {
        assert_clean(h);
    }
    drop(server);
    for ag in &mut agents {
        ag.stop();
    }
}

/// 20 concurrent creates from one template fill the host exactly; one
/// more is a clean 503. Then racing transitions on one sandbox: exactly
/// one winner each time, 409 for the rest, no VM leaked.
async fn concurrent_creates_and_racing_transitions(db: support::server::TestDb) {
    let home = AgentHome::new();
    const FORKS: u32 = 20;
    let cap_mib = (FORKS + 1) * MIB;
    let spec = ServerSpec::new(&db, Some(&home))
        .arg("--capacity-vcpus")
        .arg(&(FORKS + 1).to_string())
        .arg("--capacity-memory-mib")
        .arg(&cap_mib.to_string());
    let mut server = spec.start();
    let admin = server.api(server.admin_key.as_deref().unwrap());
    let (_, key) = admin.team_with_key("alpha").await;
    let a = admin.with_key(&key);
    admin.wait_healthy_hosts(1, Duration::from_secs(30)).await;
    let src = a.create(base(json!({}))).await;
    let src_id = src["id"].as_str().unwrap().to_owned();
    a.sh(&src_id, "echo from-template > /home/user/t.txt && sync")
        .await;
    let (st, _) = a
        .post(
            &format!("/v1/sandboxes/{src_id}/snapshots"),
            json!({"name": "small"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);

    let creates: Vec<_> = (0..FORKS)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                a.post(
                    "/v1/sandboxes",
                    json!({"template": "small", "timeout_s": 600, "metadata": {"i": i.to_string()}}),
                )
                .await
            })
        })
        .collect();
    let mut forks = Vec::new();
    for t in creates {
        let (st, body) = t.await.unwrap();
        match st {
            StatusCode::CREATED => forks.push(body["id"].as_str().unwrap().to_owned()),
            StatusCode::SERVICE_UNAVAILABLE => assert_eq!(body["code"], "no_capacity", "{body}"),
            other => panic!("create: {other} {body}\n{}", server.logs()),
        }
    }
    assert_eq!(
        forks.len(),
        FORKS as usize,
        "the host has room for all of them"
    );
    let unique: HashSet<_> = forks.iter().collect();
    assert_eq!(unique.len(), forks.len());
    let full = a
        .post(
            "/v1/sandboxes",
            json!({"template": "small", "timeout_s": 60}),
        )
        .await;
    assert_error(&full, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    let (_, running) = a.get("/v1/sandboxes?state=running&limit=100").await;
    assert_eq!(
        running["sandboxes"].as_array().unwrap().len(),
        forks.len() + 1
    );
    let (_, hosts) = admin.get("/v1/hosts").await;
    assert_eq!(hosts["hosts"][0]["memory_mib_used"], cap_mib, "{hosts}");
    for id in forks.iter().step_by(7) {
        assert_eq!(
            a.sh(id, "cat /home/user/t.txt").await.stdout,
            "from-template\n"
        );
    }
    let vms = home.processes().len();
    assert_eq!(vms, forks.len() + 1, "one VMM per sandbox");
    let deletes: Vec<_> = forks
        .iter()
        .map(|id| {
            let a = a.clone();
            let id = id.clone();
            tokio::spawn(async move { a.delete(&format!("/v1/sandboxes/{id}")).await })
        })
        .collect();
    for t in deletes {
        let (st, body) = t.await.unwrap();
        assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    }
    assert_eq!(home.processes().len(), 1, "only the source is left");

    // Racing transitions on one sandbox.
    let race = |path: String, method: &'static str, n: usize| {
        let a = a.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let a = a.clone();
                    let path = path.clone();
                    tokio::spawn(async move {
                        match method {
                            "DELETE" => a.delete(&path).await,
                            _ => a.post_empty(&path).await,
                        }
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let winners = |results: &[(StatusCode, Value)]| {
        for r in results.iter().filter(|r| !r.0.is_success()) {
            assert_error(r, StatusCode::CONFLICT, "conflict");
        }
        results.iter().filter(|r| r.0.is_success()).count()
    };
    let pauses = race(format!("/v1/sandboxes/{src_id}/pause"), "POST", 6).await;
    assert_eq!(winners(&pauses), 1, "{pauses:?}");
    assert_eq!(a.sandbox(&src_id).await["state"], "paused");
    assert!(home.processes().is_empty(), "paused: no VM");
    let resumes = race(format!("/v1/sandboxes/{src_id}/resume"), "POST", 6).await;
    assert_eq!(winners(&resumes), 1, "{resumes:?}");
    assert_eq!(a.sandbox(&src_id).await["state"], "running");
    assert_eq!(home.processes().len(), 1, "one VM after one resume");
    // Pauses and deletes at once: each transition has exactly one winner.
    let (pauses, deletes) = tokio::join!(
        race(format!("/v1/sandboxes/{src_id}/pause"), "POST", 4),
        race(format!("/v1/sandboxes/{src_id}"), "DELETE", 4),
    );
    let (p, d) = (winners(&pauses), winners(&deletes));
    assert!(
        p <= 1 && d <= 1 && p + d >= 1,
        "pauses {pauses:?} deletes {deletes:?}"
    );
    if d == 0 {
        let (st, _) = a.delete(&format!("/v1/sandboxes/{src_id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    assert_eq!(a.sandbox(&src_id).await["state"], "destroyed");
    let (st, _) = a.delete("/v1/snapshots/small").await;
    assert_eq!(st, StatusCode::OK);
    assert_clean(&home);
    let text = admin.metrics().await;
    assert_eq!(
        metric(&text, "ember_sandboxes{state=\"running\"}"),
        Some(0.0),
        "{text}"
    );
    server.stop();
}

/// The reconciler and timeouts with real VMs: a VM killed from outside is
/// failed with the host's reason; an orphan VM unknown to the database is
/// destroyed after the grace period; a timeout kills or pauses per
/// `on_timeout`; and the sweep survives a control-plane restart.
async fn reconciler_and_timeouts_with_real_vms(db: support::server::TestDb) {
    let home = AgentHome::new();
    // An orphan's age counts from the start of its create, and the test
    // must see it alive after a TCG boot that takes 3 s or more on a busy
    // machine: the grace has to outlast that.
    let mut spec = ServerSpec::new(&db, Some(&home)).config("orphan_grace_s = 8");
    spec.join_token = home.token.clone();
    let mut server = spec.start();
    let admin_key = server.admin_key.clone().unwrap();
    let admin = server.api(&admin_key);
    let (_, key) = admin.team_with_key("alpha").await;
    let a = admin.with_key(&key);
    let hosts = admin.wait_healthy_hosts(1, Duration::from_secs(30)).await;
    let address = hosts[0]["address"].as_str().unwrap().to_owned();
    // The embedded agent is called as a joined one is: over TLS, with its
    // own control token.
    let mut grpc = support::agent::joined_client(&address, &home.data().join("identity")).await;

    // An orphan: created on the host behind the control plane's back.
    let orphan = support::agent::new_id();
    let mut req = support::agent::create_request(&orphan);
    req.memory_mib = MIB;
    grpc.create_sandbox(req).await.unwrap();
    assert_eq!(home.processes_of(&orphan).len(), 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = grpc
            .get_sandbox(pb::SandboxRef {
                sandbox_id: orphan.clone(),
            })
            .await;
        match got {
            Err(s) if s.code() == tonic::Code::NotFound => break,
            other => assert!(Instant::now() < deadline, "orphan still there: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(home.processes_of(&orphan), Vec::<u32>::new());
    assert_error(
        &a.get(&format!("/v1/sandboxes/{orphan}")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // A VM killed from outside: failed with the host's reason, then deletable.
    let k = a.create(base(json!({}))).await;
    let k_id = k["id"].as_str().unwrap().to_owned();
    let vmm = home.processes_of(&k_id);
    assert_eq!(vmm.len(), 1);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(vmm[0] as i32, libc::SIGKILL) };
    let failed = a.wait_state(&k_id, "failed", Duration::from_secs(60)).await;
    let reason = failed["failure_reason"].as_str().unwrap();
    assert!(reason.contains("VMM exited"), "{reason}");
    assert!(failed.get("expires_at").is_none(), "{failed}");
    let (st, _) = a.delete(&format!("/v1/sandboxes/{k_id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_clean(&home);

    // Timeouts: kill, and pause.
    let t_kill = a.create(base(json!({"timeout_s": 3}))).await;
    let t_pause = a
        .create(base(json!({"timeout_s": 3, "on_timeout": "pause"})))
        .await;
    let (kill_id, pause_id) = (
        t_kill["id"].as_str().unwrap().to_owned(),
        t_pause["id"].as_str().unwrap().to_owned(),
    );
    a.wait_state(&kill_id, "destroyed", Duration::from_secs(60))
        .await;
    let paused = a
        .wait_state(&pause_id, "paused", Duration::from_secs(60))
        .await;
    assert!(paused.get("expires_at").is_none(), "{paused}");
    assert_eq!(home.processes().len(), 0, "killed and paused: no VM runs");
    let (st, r) = a
        .post(
            &format!("/v1/sandboxes/{pause_id}/resume"),
            json!({"timeout_s": 600}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let (st, _) = a.delete(&format!("/v1/sandboxes/{pause_id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // The sweep survives a restart: the deadline passes while the control
    // plane is down; the next one applies it.
    let r = a.create(base(json!({"timeout_s": 5}))).await;
    let r_id = r["id"].as_str().unwrap().to_owned();
    server.stop();
    assert_eq!(
        home.processes_of(&r_id).len(),
        1,
        "the VM outlives the server"
    );
    let expires = ms(&r, "expires_at");
    let wait = expires - ember_control::model::now_ms() + 1000;
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let server = spec.start();
    let a = server.api(&key);
    a.wait_state(&r_id, "destroyed", Duration::from_secs(60))
        .await;
    assert_clean(&home);
    let text = server.api(&admin_key).metrics().await;
    assert_eq!(
        metric(&text, "ember_sandboxes{state=\"destroyed\"}"),
        Some(4.0),
        "{text}"
    );
    drop(server);
}

/// A pause or resume whose call fails settles from what the host did: a
/// reply lost after the host did the work counts as done, and a call the
/// host refused leaves the sandbox as it was. Neither is ever failed or
/// destroyed for it, and its files survive. The agent fails on purpose at
/// its failure points (`EMBER_FAILPOINTS`, debug builds only).
async fn failed_host_calls_never_cost_a_sandbox(db: support::server::TestDb) {
    let spec = ServerSpec::new(&db, None).config("orphan_grace_s = 2");
    let server = spec.start();
    let admin = server.api(server.admin_key.as_deref().unwrap());
    let (_, key) = admin.team_with_key("alpha").await;
    let a = admin.with_key(&key);
    let mut home = AgentHome::new();
    home.token = spec.join_token.clone();
    let join = |home: &AgentHome, failpoints: &str| {
        let mut home_env = home.extra_env.clone();
        home_env.retain(|(k, _)| k != "EMBER_FAILPOINTS");
        home_env.push(("EMBER_FAILPOINTS".into(), failpoints.into()));
        home_env
    };
    home.extra_env = join(&home, "pause.after=error,resume.before=error");
    let mut agent = home.start_with(&["--control-plane", &server.base]);
    admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
    let sb = a.create(base(json!({}))).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_eq!(
        a.sh(&id, "echo kept > /root/f && sync").await.exit_code,
        Some(0)
    );

    // The host pauses, then the reply is lost: paused, by the host's word.
    let (st, p) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
    assert_eq!(st, StatusCode::OK, "{p}\n{}", home.logs());
    assert_eq!(p["state"], "paused", "{p}");
    assert_eq!(home.processes_of(&id), Vec::<u32>::new(), "paused = no VM");
    // The host refuses the resume: an error, and the sandbox stays paused.
    let (st, r) = a.post_empty(&format!("/v1/sandboxes/{id}/resume")).await;
    assert!(st.is_server_error(), "{st} {r}");
    assert_eq!(a.sandbox(&id).await["state"], "paused");
    // Well past the reconciler's grace period, still paused.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(a.sandbox(&id).await["state"], "paused");

    // The other way round: the host resumes and the reply is lost; the
    // host refuses a pause.
    agent.kill();
    home.extra_env = join(&home, "resume.after=error,pause.before=error");
    let agent = home.start_with(&["--control-plane", &server.base]);
    // Until the new agent registers, the control plane knows the old one's
    // address.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
        if hosts[0]["address"].as_str().unwrap().contains(&agent.addr) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not re-register: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (st, r) = a.post_empty(&format!("/v1/sandboxes/{id}/resume")).await;
    assert_eq!(st, StatusCode::OK, "{r}\n{}", home.logs());
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(a.sh(&id, "cat /root/f").await.stdout, "kept\n");
    let (st, p) = a.post_empty(&format!("/v1/sandboxes/{id}/pause")).await;
    assert!(st.is_server_error(), "{st} {p}");
    assert_eq!(a.sandbox(&id).await["state"], "running");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(a.sandbox(&id).await["state"], "running");
    assert_eq!(a.sh(&id, "cat /root/f").await.stdout, "kept\n");

    let (st, body) = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    wait_clean(&home, Duration::from_secs(30)).await;
}

/// A pause or resume that outlasts the server's `answer_within` (a large
/// sandbox; here the host stalls on purpose) is answered 202 with the
/// sandbox still `pausing`/`resuming` and a Location to poll, and goes on
/// to its end on its own. The CLI polls it to the end.
async fn slow_pause_and_resume_are_accepted_and_polled(db: support::server::TestDb) {
    let spec = ServerSpec::new(&db, None).config("answer_within_s = 1");
    let server = spec.start();
    let admin = server.api(server.admin_key.as_deref().unwrap());
    let (_, key) = admin.team_with_key("alpha").await;
    let a = admin.with_key(&key);
    let mut home = AgentHome::new();
    home.token = spec.join_token.clone();
    home.extra_env.push((
        "EMBER_FAILPOINTS".into(),
        "pause.after=sleep-5000,resume.after=sleep-5000,snapshot.after=sleep-5000".into(),
    ));
    let _agent = home.start_with(&["--control-plane", &server.base]);
    admin.wait_healthy_hosts(1, Duration::from_secs(60)).await;
    let sb = a.create(base(json!({}))).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_eq!(
        a.sh(&id, "echo kept > /root/f && sync").await.exit_code,
        Some(0)
    );

    let started = Instant::now();
    let resp = a
        .http
        .post(a.url(&format!("/v1/sandboxes/{id}/pause")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let answered = started.elapsed();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}", home.logs());
    assert_eq!(
        resp.headers()["location"].to_str().unwrap(),
        format!("/v1/sandboxes/{id}")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "pausing", "{body}");
    assert!(
        answered < Duration::from_secs(4),
        "answered after {answered:?}, not within answer_within"
    );
    // The pause goes on without its caller; polling sees it settle.
    let paused = a.wait_state(&id, "paused", Duration::from_secs(60)).await;
    assert!(paused["failure_reason"].is_null(), "{paused}");
    assert_eq!(home.processes_of(&id), Vec::<u32>::new(), "paused = no VM");

    // The CLI waits through a 202 and reports the sandbox resumed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .env("EMBER_API_URL", &server.base)
        .env("EMBER_API_KEY", &key)
        .args(["sandbox", "resume", &id, "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert_eq!(a.sh(&id, "cat /root/f").await.stdout, "kept\n");

    // A slow snapshot is answered 202 with the sandbox still snapshotting;
    // the CLI polls it and prints the template once the sandbox runs again.
    let (st, body) = a
        .post(
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "slow-api"}),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["state"], "snapshotting", "{body}");
    a.wait_state(&id, "running", Duration::from_secs(60)).await;
    let (st, snap) = a.get("/v1/snapshots/slow-api").await;
    assert_eq!(st, StatusCode::OK, "{snap}");
    assert_eq!(snap["source_sandbox_id"], id.as_str(), "{snap}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .env("EMBER_API_URL", &server.base)
        .env("EMBER_API_KEY", &key)
        .args(["snapshot", "create", &id, "slow-cli", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(snap["name"], "slow-cli", "{snap}");
    assert_eq!(a.sh(&id, "cat /root/f").await.stdout, "kept\n");

    let (st, body) = a.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    for name in ["slow-api", "slow-cli"] {
        let (st, body) = a.delete(&format!("/v1/snapshots/{name}")).await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    wait_clean(&home, Duration::from_secs(30)).await;
}
