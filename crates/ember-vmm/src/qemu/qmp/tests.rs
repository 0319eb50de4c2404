//! The QMP codec against a scripted peer on a socketpair: framing,
//! demultiplexing of replies and events, fd passing, and each failure kind.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

const T: Duration = Duration::from_secs(5);

/// QEMU's side of the socket, driven by the test script on a plain thread.
struct FakeQemu {
    sock: StdUnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl FakeQemu {
    fn send(&mut self, v: Value) {
        self.send_raw(format!("{v}\r\n").as_bytes());
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// Next message from the client, collecting any descriptors it carried.
    fn recv(&mut self) -> Value {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let mut chunk = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let (n, fds) = {
                let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(
                    self.sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                )
                .unwrap();
                let mut fds = Vec::new();
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors
                        // in our table for us; nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                (msg.bytes, fds)
            };
            assert!(n > 0, "client closed the socket");
            self.fds.extend(fds);
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Block until the client drops its end, reading nothing further.
    fn wait_for_close(&mut self) {
        let mut rest = Vec::new();
        self.sock.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "client sent {rest:?} after a protocol error"
        );
    }

    /// Expect a command named `name`; return its id and arguments.
    fn expect(&mut self, name: &str) -> (Value, Value) {
        let m = self.recv();
        assert_eq!(m["execute"], name, "{m}");
        (
            m["id"].clone(),
            m.get("arguments").cloned().unwrap_or(Value::Null),
        )
    }

    fn greet_and_negotiate(&mut self) {
        self.send(
            json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
            "package": "Debian"}, "capabilities": ["oob"]}}),
        );
        let (id, args) = self.expect("qmp_capabilities");
        assert_eq!(args, Value::Null);
        self.send(json!({"return": {}, "id": id}));
    }
}

/// A connected client and a peer thread running `script`.
async fn connect<F>(script: F) -> (Result<Qmp, QmpError>, std::thread::JoinHandle<()>)
where
    F: FnOnce(FakeQemu) + Send + 'static,
{
    connect_within(T, script).await
}

async fn connect_within<F>(
    timeout: Duration,
    script: F,
) -> (Result<Qmp, QmpError>, std::thread::JoinHandle<()>)
where
    F: FnOnce(FakeQemu) + Send + 'static,
{
    let (ours, theirs) = StdUnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let peer = std::thread::spawn(move || {
        script(FakeQemu {
            sock: theirs,
            buf: Vec::new(),
            fds: Vec::new(),
        })
    });
    let stream = UnixStream::from_std(ours).unwrap();
    (Qmp::handshake(stream, timeout).await, peer)
}

#[tokio::test]
async fn replies_and_events_are_demultiplexed() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let (id, _) = q.expect("query-status");
        // Events arrive before and between replies.
        q.send(json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}));
        q.send(json!({"event": "MIGRATION", "data": {"status": "active"},
            "timestamp": {"seconds": 1, "microseconds": 3}}));
        q.send(json!({"return": {"status": "paused", "running": false, "singlestep": false}, "id": id}));
    })
    .await;
    let qmp = qmp.unwrap();
    assert_eq!(qmp.greeting().version.qemu.to_string(), "7.2.22");
    let mut events = qmp.subscribe();
    let status = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(status.status, RunState::Paused);
    assert!(!status.running);
    assert_eq!(events.recv().await.unwrap().event, Event::Stop);
    assert_eq!(
        events.recv().await.unwrap().event,
        Event::Migration(MigrationStatus::Active)
    );
    peer.join().unwrap();
}

#[tokio::test]
async fn concurrent_commands_get_their_own_replies() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let (a, _) = q.recv_pair();
        let (b, _) = q.recv_pair();
        // Answer in reverse order; ids route them.
        q.send(json!({"return": {"which": b.1}, "id": b.0}));
        q.send(json!({"return": {"which": a.1}, "id": a.0}));
    })
    .await;
    let qmp = qmp.unwrap();
    let (x, y) = tokio::join!(
        qmp.execute_raw("first", None, T),
        qmp.execute_raw("second", None, T)
    );
    assert_eq!(x.unwrap()["which"], "first");
    assert_eq!(y.unwrap()["which"], "second");
    peer.join().unwrap();
}

impl FakeQemu {
    /// Next command as ((id, name), arguments).
    fn recv_pair(&mut self) -> ((Value, String), Value) {
        let m = self.recv();
        (
            (m["id"].clone(), m["execute"].as_str().unwrap().to_owned()),
            m.get("arguments").cloned().unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn refusals_keep_class_description_and_command() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let (id, args) = q.expect("migrate-incoming");
        assert_eq!(args, json!({"uri": "fd:x"}));
        q.send(json!({"id": id, "error": {"class": "GenericError",
            "desc": "'-incoming' was not specified on the command line"}}));
        // An error for a request QEMU could not parse has no id.
        let _ = q.recv();
        q.send(json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}));
    })
    .await;
    let qmp = qmp.unwrap();
    let err = qmp
        .execute(&MigrateIncoming { uri: "fd:x".into() })
        .await
        .unwrap_err();
    match &err {
        QmpError::Refused {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "migrate-incoming");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("-incoming"));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    match VmmError::from(err) {
        VmmError::Refused { call, message } => {
            assert_eq!(call, "migrate-incoming");
            assert!(
                message.contains("'-incoming' was not specified")
                    && message.contains("GenericError")
            );
        }
        other => panic!("expected VmmError::Refused, got {other:?}"),
    }
    let err = qmp.execute(&Cont).await.unwrap_err();
    assert!(matches!(err, QmpError::Refused { ref desc, .. } if desc == "JSON parse error"));
    peer.join().unwrap();
}

#[tokio::test]
async fn a_slow_reply_times_out_and_the_connection_stays_usable() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let (slow, _) = q.expect("stop");
        let (next, _) = q.expect("cont");
        // The late reply to the timed-out command must not be mistaken for
        // the next one's.
        q.send(json!({"return": {}, "id": slow}));
        q.send(json!({"return": {}, "id": next}));
    })
    .await;
    let qmp = qmp.unwrap();
    let err = qmp
        .execute_within(&Stop, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QmpError::Timeout { ref command, after } if command == "stop" && after == Duration::from_millis(100)),
        "{err:?}"
    );
    assert!(matches!(VmmError::from(err), VmmError::Timeout { .. }));
    qmp.execute(&Cont).await.unwrap();
    peer.join().unwrap();
}

#[tokio::test]
async fn a_closed_socket_fails_pending_and_later_commands_as_connection_errors() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let _ = q.expect("query-migrate");
        drop(q);
    })
    .await;
    let qmp = qmp.unwrap();
    let err = qmp.execute(&QueryMigrate).await.unwrap_err();
    assert!(
        matches!(err, QmpError::Connection { ref command, .. } if command == "query-migrate"),
        "{err:?}"
    );
    let err = qmp.execute(&Stop).await.unwrap_err();
    assert!(
        matches!(err, QmpError::Connection { ref command, .. } if command == "stop"),
        "{err:?}"
    );
    assert!(matches!(VmmError::from(err), VmmError::Connection { .. }));
    peer.join().unwrap();
}

#[tokio::test]
async fn a_malformed_message_is_a_protocol_error() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let _ = q.expect("query-status");
        q.send_raw(b"{\"return\": {\"status\": \r\n");
        // Hold the socket open: the failure must come from the bytes, not EOF.
        q.wait_for_close();
    })
    .await;
    let qmp = qmp.unwrap();
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(
        matches!(err, QmpError::Protocol { ref detail, .. } if detail.contains("not JSON")),
        "{err:?}"
    );
    let err = qmp.execute(&Stop).await.unwrap_err();
    assert!(matches!(VmmError::from(err), VmmError::Protocol { .. }));
    drop(qmp);
    peer.join().unwrap();
}

#[tokio::test]
async fn a_well_formed_reply_of_the_wrong_shape_is_a_protocol_error() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let (id, _) = q.expect("query-status");
        q.send(json!({"return": {"status": 3}, "id": id}));
        let (id, _) = q.expect("stop");
        q.send(json!({"return": {}, "id": id}));
    })
    .await;
    let qmp = qmp.unwrap();
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(
        matches!(err, QmpError::Protocol { ref command, .. } if command == "query-status"),
        "{err:?}"
    );
    // Only that reply was bad; the stream is still in sync.
    qmp.execute(&Stop).await.unwrap();
    peer.join().unwrap();
}

#[tokio::test]
async fn send_fd_passes_the_descriptor_with_getfd() {
    let (qmp, peer) = connect(|mut q| {
        q.greet_and_negotiate();
        let (id, args) = q.expect("getfd");
        assert_eq!(args, json!({"fdname": "vmstate"}));
        assert_eq!(q.fds.len(), 1, "getfd must carry exactly one descriptor");
        let mut file = std::fs::File::from(q.fds.pop().unwrap());
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "device state");
        q.send(json!({"return": {}, "id": id}));
    })
    .await;
    let qmp = qmp.unwrap();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(b"device state").unwrap();
    qmp.send_fd("vmstate", file.as_fd()).await.unwrap();
    peer.join().unwrap();
}

#[tokio::test]
async fn a_peer_that_is_not_qmp_fails_the_handshake() {
    let (qmp, peer) = connect(|mut q| {
        q.send(json!({"hello": "world"}));
    })
    .await;
    let err = qmp.unwrap_err();
    assert!(
        matches!(err, QmpError::Protocol { ref command, .. } if command == "greeting"),
        "{err:?}"
    );
    peer.join().unwrap();

    let (qmp, peer) = connect_within(Duration::from_millis(200), |q| {
        // Says nothing; the handshake must give up, not hang.
        std::thread::sleep(Duration::from_millis(700));
        drop(q);
    })
    .await;
    assert!(matches!(qmp.unwrap_err(), QmpError::Timeout { .. }));
    peer.join().unwrap();
}
