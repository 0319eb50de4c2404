//! A TCP connection to a guest port, as a local byte stream: the host
//! agent's `OpenPort` gRPC stream pumped into one end of an in-memory
//! duplex pipe, the other end handed to the caller (the HTTP proxy's client
//! connection, or a port-forward's upgraded connection).

use std::time::Duration;

use ember_proto::host as pb;
use pb::port_frame::Part;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use crate::hosts::{AGENT_ERROR_CODE, HostClient};

/// Bytes buffered in the pipe each way, and read per message.
const PIPE_BYTES: usize = 256 * 1024;
const CHUNK: usize = 64 * 1024;

/// Why a port could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The guest refused: nothing listens on the port.
    Closed,
    /// The host answered something else (or could not be reached).
    Host(tonic::Status),
}

/// Connect to `port` of `sandbox_id` through its host. The connection is
/// closed after `idle` without a byte either way.
pub async fn open(
    client: &mut HostClient,
    sandbox_id: &str,
    port: u16,
    idle: Duration,
) -> Result<DuplexStream, OpenError> {
    let (tx, rx) = mpsc::channel::<pb::PortFrame>(8);
    let open = pb::PortFrame {
        part: Some(Part::Open(pb::OpenPort {
            sandbox_id: sandbox_id.to_owned(),
            port: u32::from(port),
        })),
    };
    tx.send(open)
        .await
        .expect("the receiver is alive until the call below");
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = match client.open_port(outbound).await {
        Ok(reply) => reply.into_inner(),
        Err(status) => return Err(classify(status)),
    };
    match inbound.message().await {
        Ok(Some(pb::PortFrame {
            part: Some(Part::Opened(_)),
        })) => {}
        Ok(_) => {
            return Err(OpenError::Host(tonic::Status::internal(
                "the host's OpenPort reply did not start with `opened`",
            )));
        }
        Err(status) => return Err(classify(status)),
    }
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(pump(theirs, tx, inbound, idle));
    Ok(ours)
}

fn classify(status: tonic::Status) -> OpenError {
    let code = status
        .metadata()
        .get(AGENT_ERROR_CODE)
        .and_then(|v| v.to_str().ok());
    if code == Some("port_closed") {
        OpenError::Closed
    } else {
        OpenError::Host(status)
    }
}

/// Move bytes between the pipe and the gRPC streams until both directions
/// have ended, either side fails, or nothing moved for `idle`.
async fn pump(
    pipe: DuplexStream,
    tx: mpsc::Sender<pb::PortFrame>,
    mut inbound: tonic::Streaming<pb::PortFrame>,
    idle: Duration,
) {
    let (mut from_caller, mut to_caller) = tokio::io::split(pipe);
    let mut tx = Some(tx);
    let mut guest_done = false;
    let mut buf = vec![0u8; CHUNK];
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        if tx.is_none() && guest_done {
            return;
        }
        tokio::select! {
            read = from_caller.read(&mut buf), if tx.is_some() => match read {
                Ok(0) | Err(_) => tx = None, // half-close towards the guest
                Ok(n) => {
                    let frame = pb::PortFrame { part: Some(Part::Data(buf[..n].to_vec())) };
                    let sender = tx.as_ref().expect("checked by the guard");
                    if sender.send(frame).await.is_err() {
                        return;
                    }
                }
            },
            frame = inbound.message(), if !guest_done => match frame {
                Ok(Some(pb::PortFrame { part: Some(Part::Data(data)) })) => {
                    if to_caller.write_all(&data).await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    guest_done = true;
                    let _ = to_caller.shutdown().await;
                }
                Err(_) => return,
            },
            _ = &mut idle_timer => {
                tracing::debug!("closing an idle port connection");
                return;
            }
        }
        idle_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + idle);
    }
}
