//! Health, `/init` and the token lifecycle.

use std::time::{Duration, Instant};

use ember_guest_api::*;

use crate::common::{Agent, assert_code, raw_request};

#[tokio::test]
async fn fresh_agent_answers_health_and_nothing_else_until_init() {
    let agent = Agent::start();
    let client = agent.client();
    let health = client
        .wait_ready(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!health.initialized);
    assert_eq!(health.protocol, PROTOCOL_VERSION);
    for cap in capability::ALL_V2 {
        assert!(health.supports(cap), "{cap} missing");
    }
    assert_code(client.list_processes().await, ErrorCode::Unauthorized);
    assert_code(client.stat("/", None).await, ErrorCode::Unauthorized);
}

#[tokio::test]
async fn first_init_claims_and_reinit_rotates() {
    let agent = Agent::start();
    let client = agent.client();
    client
        .wait_ready(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    let first = client
        .init(&InitRequest {
            token: "first-token".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!first.token_rotated);
    assert_eq!(client.token().as_deref(), Some("first-token"));
    assert!(client.health().await.unwrap().initialized);

    // A second "first init" without the token is refused and changes nothing.
    let intruder = agent.client();
    assert_code(
        intruder
            .init(&InitRequest {
                token: "intruder".into(),
                ..Default::default()
            })
            .await,
        ErrorCode::Unauthorized,
    );
    assert_code(intruder.health().await, ErrorCode::Unauthorized);
    let wrong = agent.client().with_token("intruder");
    assert_code(wrong.health().await, ErrorCode::Unauthorized);
    client.health().await.unwrap();

    // Idempotent re-init with the same token.
    let again = client
        .init(&InitRequest {
            token: "first-token".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!again.token_rotated);

    // Rotation: the old token stops working at once.
    let old = agent.client().with_token("first-token");
    let rotated = client
        .init(&InitRequest {
            token: "second-token".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(rotated.token_rotated);
    assert_code(old.health().await, ErrorCode::Unauthorized);
    assert_code(old.list_processes().await, ErrorCode::Unauthorized);
    client.health().await.unwrap();
    client.list_processes().await.unwrap();
}

#[tokio::test]
async fn every_endpoint_rejects_missing_and_wrong_tokens() {
    let agent = Agent::start();
    let good = agent.init().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    std::fs::write(format!("{d}/existing"), b"x").unwrap();
    let running = good
        .start_process(&StartProcess {
            cmd: "sleep".into(),
            args: vec!["30".into()],
            stdin: true,
            background: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let pid = running.pid();

    for (label, client) in [
        ("missing", agent.client()),
        ("wrong", agent.client().with_token("not-the-token")),
    ] {
        let target = format!("{d}/created-by-{label}");
        let results: Vec<(&str, Result<(), GuestError>)> = vec![
            ("health", client.health().await.map(drop)),
            (
                "init",
                client
                    .init(&InitRequest {
                        token: "hijack".into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "start_process",
                client
                    .start_process(&StartProcess {
                        cmd: "touch".into(),
                        args: vec![target.clone()],
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "process_events",
                client.process_events(pid, 0).await.map(drop),
            ),
            ("list_processes", client.list_processes().await.map(drop)),
            ("process", client.process(pid).await.map(drop)),
            ("write_stdin", client.write_stdin(pid, "x").await.map(drop)),
            ("close_stdin", client.close_stdin(pid).await),
            (
                "signal",
                client
                    .signal(
                        pid,
                        &SignalRequest {
                            signal: SignalSpec::name("KILL"),
                            group: false,
                        },
                    )
                    .await,
            ),
            (
                "resize_pty",
                client.resize_pty(pid, PtySize { rows: 1, cols: 1 }).await,
            ),
            (
                "read_file",
                client
                    .read_file(&format!("{d}/existing"), None)
                    .await
                    .map(drop),
            ),
            (
                "write_file",
                client
                    .write_file(&target, &WriteOptions::default(), &b"data"[..])
                    .await
                    .map(drop),
            ),
            ("stat", client.stat(&d, None).await.map(drop)),
            ("list_dir", client.list_dir(&d, None).await.map(drop)),
            (
                "mkdir",
                client
                    .mkdir(&MkdirRequest {
                        path: target.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "remove",
                client.remove(&format!("{d}/existing"), false, None).await,
            ),
            (
                "rename",
                client
                    .rename(&RenameRequest {
                        from: format!("{d}/existing"),
                        to: target.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            ("shutdown", client.shutdown().await),
        ];
        for (endpoint, result) in results {
            match result {
                Err(GuestError::Api {
                    code: ErrorCode::Unauthorized,
                    status: 401,
                    ..
                }) => {}
                other => panic!("{endpoint} with a {label} token: expected 401, got {other:?}"),
            }
        }
        assert!(
            !std::path::Path::new(&target).exists(),
            "{label}: a refused request had an effect"
        );
    }
    // Nothing was disturbed: the process runs, the file is there, the token works.
    assert!(good.process(pid).await.unwrap().running);
    assert!(std::path::Path::new(&format!("{d}/existing")).exists());
    good.health().await.unwrap();
    good.signal(
        pid,
        &SignalRequest {
            signal: SignalSpec::name("KILL"),
            group: true,
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn init_validates_and_writes_resolv_conf() {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    let agent = Agent::start_with(&["--resolv-conf", resolv.to_str().unwrap()]);
    let client = agent.client();
    client
        .wait_ready(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    let bad = |req: InitRequest| {
        let client = client.clone();
        async move { client.init(&req).await }
    };
    assert_code(
        bad(InitRequest {
            token: "".into(),
            ..Default::default()
        })
        .await,
        ErrorCode::BadRequest,
    );
    assert_code(
        bad(InitRequest {
            token: "t".into(),
            dns: Some(vec!["not-an-ip".into()]),
            ..Default::default()
        })
        .await,
        ErrorCode::BadRequest,
    );
    assert!(
        !client.health().await.unwrap().initialized,
        "refused inits set no token"
    );
    let resp = client
        .init(&InitRequest {
            token: "t".into(),
            dns: Some(vec!["10.0.0.53".into(), "2001:db8::1".into()]),
            entropy_b64: Some(bytes::Bytes::from_static(&[7u8; 64])),
            // The test agent must leave the host's clock and hostname alone.
            time_unix_ns: Some(1),
            hostname: Some("elsewhere".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(resp.resolv_conf_written);
    assert_eq!(resp.entropy_bytes, 64);
    assert!(!resp.clock_set && !resp.hostname_set && !resp.entropy_credited);
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        "# Written by ember-guest.\nnameserver 10.0.0.53\nnameserver 2001:db8::1\n"
    );
    assert!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            > 1_000_000
    );
}

#[tokio::test]
async fn unknown_endpoints_and_bad_bodies_get_the_error_body() {
    let agent = Agent::start();
    let client = agent.init().await;
    let token = client.token().unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let (status, body) = raw_request(
        agent.addr,
        &format!("GET /v9/nothing HTTP/1.1\r\n{auth}"),
        b"",
    )
    .await;
    assert_eq!(status, 404);
    let err: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(err.code, ErrorCode::NotFound);

    let (status, body) = raw_request(
        agent.addr,
        &format!("POST /processes HTTP/1.1\r\n{auth}"),
        b"{not json",
    )
    .await;
    assert_eq!(status, 400);
    let err: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(err.code, ErrorCode::BadRequest);

    let (status, body) = raw_request(
        agent.addr,
        &format!("POST /processes/abc/signal HTTP/1.1\r\n{auth}"),
        b"{}",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Unauthenticated requests to unknown paths are refused before routing.
    let (status, _) = raw_request(agent.addr, "GET /v9/nothing HTTP/1.1", b"").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn shutdown_stops_processes_and_exits() {
    let mut agent = Agent::start();
    let client = agent.init().await;
    let sleeper = client
        .start_process(&StartProcess {
            cmd: "sleep".into(),
            args: vec!["60".into()],
            background: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let pid = sleeper.pid();
    client.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after POST /shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent's process survived shutdown"
    );
}
