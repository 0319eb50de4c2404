//! The client's typed errors against real sockets: nothing listening, a
//! server that never answers, answers that do not follow the protocol, and
//! streams cut short. (The agent itself is exercised by ember-guest's tests.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ember_guest_api::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves every connection with `response` (after reading the request head)
/// and then closes it.
async fn canned_server(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = conn.write_all(response).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_and_wait_ready_times_out() {
    let client = GuestClient::new(unused_addr());
    let err = client.health().await.unwrap_err();
    assert!(matches!(err, GuestError::Connect { .. }), "{err:?}");
    assert!(err.is_unreachable());
    let started = Instant::now();
    let err = client
        .wait_ready(Instant::now() + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            GuestError::Timeout {
                operation: "wait_ready",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let client = GuestClient::new(addr).with_timeout(Duration::from_millis(200));
    let err = client.list_processes().await.unwrap_err();
    assert!(
        matches!(
            err,
            GuestError::Timeout {
                operation: "list_processes",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn wait_ready_returns_once_the_agent_answers() {
    let addr = unused_addr();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = TcpListener::bind(addr).await.unwrap();
        let body = r#"{"version":"0.1.0","protocol":1,"capabilities":["process"],"uptime_ms":3,"initialized":false}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(response.as_bytes()).await;
        }
    });
    let health = GuestClient::new(addr)
        .wait_ready(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(health.protocol, 1);
    assert!(health.supports("process") && !health.supports("files"));
}

#[tokio::test]
async fn answers_outside_the_protocol_are_malformed() {
    let no_error_body = canned_server(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\nconnection: close\r\n\r\noops!",
    )
    .await;
    let err = GuestClient::new(no_error_body).health().await.unwrap_err();
    assert!(matches!(err, GuestError::Malformed { .. }), "{err:?}");

    let not_json =
        canned_server(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nnot json")
            .await;
    let err = GuestClient::new(not_json).health().await.unwrap_err();
    assert!(matches!(err, GuestError::Malformed { .. }), "{err:?}");
}

#[tokio::test]
async fn unknown_error_codes_are_kept_verbatim() {
    let addr = canned_server(
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 49\r\nconnection: close\r\n\r\n{\"code\":\"quota_exceeded\",\"message\":\"slow down!!\"}",
    )
    .await;
    match GuestClient::new(addr).stat("/x", None).await.unwrap_err() {
        GuestError::Api {
            status,
            code,
            message,
            operation,
        } => {
            assert_eq!(status, 429);
            assert_eq!(code, ErrorCode::Other("quota_exceeded".into()));
            assert_eq!(message, "slow down!!");
            assert_eq!(operation, "stat");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_event_stream_cut_short_is_a_disconnect() {
    // A start event, then the connection closes without the final chunk.
    let addr = canned_server(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n24\r\n{\"seq\":1,\"type\":\"start\",\"pid\":4242}\n\r\n",
    )
    .await;
    let client = GuestClient::new(addr);
    let events = client
        .start_process(&StartProcess {
            cmd: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.pid(), 4242);
    let err = events.wait().await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
}

#[tokio::test]
async fn a_stream_that_does_not_start_with_start_is_malformed() {
    let addr = canned_server(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: 38\r\nconnection: close\r\n\r\n{\"seq\":1,\"type\":\"lost\",\"first_seq\":1}\n",
    )
    .await;
    let err = GuestClient::new(addr)
        .start_process(&StartProcess {
            cmd: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, GuestError::Malformed { .. }), "{err:?}");
}
