//! Host→guest connections through Firecracker's hybrid vsock.
//!
//! Firecracker proxies the guest's virtio-vsock device to a Unix socket on
//! the host. To reach guest port P, connect to that socket and send
//! `CONNECT P\n`; Firecracker answers `OK <host port>\n` once the guest
//! accepted, and from then on the socket is the connection. If nothing
//! listens on P, the guest resets the connection and Firecracker closes the
//! socket without a word. A guest without a vsock driver never answers, so
//! every dial has a deadline.
//!
//! Guest→host connections (Firecracker connecting to `<uds>_<port>`) are the
//! listener's business, not this module's.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{Result, VmmError};

/// A connection to a guest vsock port.
#[derive(Debug)]
pub struct VsockStream {
    pub stream: UnixStream,
    /// The host-side port Firecracker assigned to this connection.
    pub host_port: u32,
}

/// The longest acknowledgement line Firecracker sends: `OK 4294967295\n`.
const MAX_ACK: usize = 16;

/// Connect to guest vsock `port` through the hybrid vsock socket `uds`.
pub async fn dial(uds: &Path, port: u32, timeout: Duration) -> Result<VsockStream> {
    let call = format!("vsock CONNECT {port} via {}", uds.display());
    tokio::time::timeout(timeout, handshake(uds, port, &call))
        .await
        .map_err(|_| VmmError::Timeout {
            call: call.clone(),
            after: timeout,
        })?
}

async fn handshake(uds: &Path, port: u32, call: &str) -> Result<VsockStream> {
    let connection_error = |source| VmmError::Connection {
        call: call.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(uds).await.map_err(connection_error)?;
    // One write: Firecracker parses the request from what one read returns.
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(connection_error)?;

    // Read byte by byte so nothing the guest sends after the acknowledgement
    // is swallowed.
    let mut line = Vec::with_capacity(MAX_ACK);
    loop {
        let mut byte = [0u8; 1];
        let n = match stream.read(&mut byte).await {
            Ok(n) => n,
            // A reset is how some kernels report the VMM dropping the socket.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(connection_error(e)),
        };
        if n == 0 {
            return Err(if line.is_empty() {
                VmmError::Refused {
                    call: call.to_owned(),
                    message: format!(
                        "nothing in the guest accepted vsock port {port} (the VMM closed the connection)"
                    ),
                }
            } else {
                VmmError::Protocol {
                    call: call.to_owned(),
                    detail: format!(
                        "connection closed after a partial answer {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                }
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_ACK {
            return Err(VmmError::Protocol {
                call: call.to_owned(),
                detail: format!(
                    "answer too long to be an acknowledgement: {:?}…",
                    String::from_utf8_lossy(&line)
                ),
            });
        }
    }
    let host_port = parse_ack(&line).ok_or_else(|| VmmError::Protocol {
        call: call.to_owned(),
        detail: format!(
            "expected \"OK <port>\", got {:?}",
            String::from_utf8_lossy(&line)
        ),
    })?;
    Ok(VsockStream { stream, host_port })
}

fn parse_ack(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("OK ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    /// A stand-in for Firecracker's side of the handshake that answers with
    /// `answer` (or closes, when it is `None`); after an `OK` it echoes five
    /// bytes, after anything else it closes.
    async fn peer(answer: Option<&'static [u8]>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"CONNECT 52\n");
            let Some(answer) = answer else { return };
            s.write_all(answer).await.unwrap();
            if !answer.ends_with(b"hello") {
                return;
            }
            let mut rest = [0u8; 5];
            if s.read_exact(&mut rest).await.is_ok() {
                s.write_all(&rest).await.unwrap();
            }
            // Hold the connection open until the dialer is done.
            let _ = s.read(&mut buf).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn ok_answer_yields_a_connection_and_nothing_is_swallowed() {
        let (_dir, path) = peer(Some(b"OK 1073741824\nhello")).await;
        let mut conn = dial(&path, 52, Duration::from_secs(5)).await.unwrap();
        assert_eq!(conn.host_port, 1_073_741_824);
        let mut greeting = [0u8; 5];
        conn.stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"hello");
        conn.stream.write_all(b"12345").await.unwrap();
        let mut echo = [0u8; 5];
        conn.stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"12345");
    }

    #[tokio::test]
    async fn closed_connection_means_nothing_listens() {
        let (_dir, path) = peer(None).await;
        let err = dial(&path, 52, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(&err, VmmError::Refused { message, .. } if message.contains("port 52")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn malformed_answers_are_protocol_errors() {
        for answer in [
            &b"NOPE\n"[..],
            b"OK port\n",
            b"OK 12",
            b"OK 1111111111111111111111\n",
        ] {
            let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
            let (_dir, path) = peer(Some(answer)).await;
            let err = dial(&path, 52, Duration::from_secs(5)).await.unwrap_err();
            assert!(
                matches!(err, VmmError::Protocol { .. }),
                "{answer:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn silence_hits_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = dial(&path, 52, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connection_error() {
        let err = dial(Path::new("/nonexistent/v.sock"), 52, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Connection { .. }), "{err}");
    }
}
