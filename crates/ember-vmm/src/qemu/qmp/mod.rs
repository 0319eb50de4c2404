//! An asynchronous QMP client over a Unix socket.
//!
//! QMP is newline-delimited JSON. After QEMU's greeting and the
//! `qmp_capabilities` handshake, every command Ember sends carries an `id`;
//! QEMU answers each with `return` or `error` echoing that id, and in between
//! it may emit `event` messages at any time. One reader task demultiplexes
//! the stream: replies go to the caller waiting on that id, events to every
//! subscriber. Commands may therefore be in flight concurrently and a slow
//! one (a migration start) never hides an event.
//!
//! Failures stay distinct: QEMU refusing a command ([`QmpError::Refused`],
//! keeping its error class and description), no reply in time
//! ([`QmpError::Timeout`]), the socket failing or closing
//! ([`QmpError::Connection`]) and a message that is not QMP
//! ([`QmpError::Protocol`]). After a connection or protocol failure the
//! client is dead: every pending and later command fails the same way.
//!
//! This module knows nothing about VMs; it does not start QEMU or interpret
//! run states.

mod messages;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

pub use messages::*;

use crate::VmmError;

/// The longest message Ember accepts. QMP replies Ember asks for are a few
/// KiB; anything near this is a peer that lost its framing.
const MAX_MESSAGE: u64 = 1 << 20;

/// Events buffered per subscriber before the oldest are dropped.
const EVENT_BUFFER: usize = 256;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("{command} refused: {desc} ({class})")]
    Refused {
        command: String,
        /// QMP error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        desc: String,
    },
    #[error("{command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP connection failed during {command}")]
    Connection {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed QMP message during {command}: {detail}")]
    Protocol { command: String, detail: String },
}

impl From<QmpError> for VmmError {
    fn from(e: QmpError) -> VmmError {
        match e {
            QmpError::Refused {
                command,
                class,
                desc,
            } => VmmError::Refused {
                call: command,
                message: format!("{desc} ({class})"),
            },
            QmpError::Timeout { command, after } => VmmError::Timeout {
                call: command,
                after,
            },
            QmpError::Connection { command, source } => VmmError::Connection {
                call: command,
                source,
            },
            QmpError::Protocol { command, detail } => VmmError::Protocol {
                call: command,
                detail,
            },
        }
    }
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    events: broadcast::Sender<QmpEvent>,
    reader: JoinHandle<()>,
    next_id: AtomicU64,
    greeting: Greeting,
    timeout: Duration,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once the connection is unusable; later commands fail with it.
    dead: Option<Dead>,
}

#[derive(Debug, Clone)]
enum Dead {
    Io(io::ErrorKind, String),
    Malformed(String),
}

/// What the reader hands a waiting command.
#[derive(Debug)]
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
    Malformed(String),
    Dead(Dead),
}

impl Dead {
    fn into_error(self, command: &str) -> QmpError {
        match self {
            Dead::Io(kind, message) => QmpError::Connection {
                command: command.to_owned(),
                source: io::Error::new(kind, message),
            },
            Dead::Malformed(detail) => QmpError::Protocol {
                command: command.to_owned(),
                detail,
            },
        }
    }
}

impl Qmp {
    /// Connect to a QMP socket and negotiate. `timeout` bounds the connect,
    /// the greeting and the handshake, and becomes the default per-command
    /// timeout.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(QmpError::Connection {
                    command: "connect".into(),
                    source,
                });
            }
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: "connect".into(),
                    after: timeout,
                });
            }
        };
        Qmp::handshake(stream, timeout).await
    }

    /// Read the greeting on an open stream, then negotiate capabilities.
    pub async fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);
        let greeting = tokio::time::timeout(timeout, read_greeting(&mut read))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                after: timeout,
            })??;

        let shared = Arc::new(Shared::default());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let reader = tokio::spawn(read_messages(read, shared.clone(), events.clone()));
        let qmp = Qmp {
            shared,
            writer: tokio::sync::Mutex::new(write),
            events,
            reader,
            next_id: AtomicU64::new(1),
            greeting,
            timeout,
        };
        qmp.execute(&QmpCapabilities).await?;
        Ok(qmp)
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Receive every event emitted from now on. Subscribe before sending the
    /// command whose events you wait for.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Run a typed command with the default timeout.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Response, QmpError> {
        self.execute_within(command, self.timeout).await
    }

    /// Run a typed command, failing with [`QmpError::Timeout`] after `timeout`.
    pub async fn execute_within<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<C::Response, QmpError> {
        let arguments = arguments_of(command)?;
        let reply = self.call(C::NAME, arguments, None, timeout).await?;
        decode::<C>(reply)
    }

    /// Send `fd` to QEMU with SCM_RIGHTS and register it under `fdname` for
    /// `fd:<fdname>` URIs. QEMU holds its own duplicate; the caller may close
    /// `fd` afterwards.
    pub async fn send_fd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let command = GetFd {
            fdname: fdname.to_owned(),
        };
        let arguments = arguments_of(&command)?;
        let reply = self
            .call(GetFd::NAME, arguments, Some(fd), self.timeout)
            .await?;
        decode::<GetFd>(reply).map(|_| ())
    }

    /// The escape hatch: any command by name, reply returned as raw JSON.
    pub async fn execute_raw(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.call(name, arguments, None, timeout).await
    }

    async fn call(
        &self,
        name: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.state.lock().expect("QMP state lock poisoned");
            if let Some(dead) = &pending.dead {
                return Err(dead.clone().into_error(name));
            }
            pending.waiters.insert(id, tx);
        }
        let mut message = json!({ "execute": name, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&message).expect("a JSON value always serialises");
        line.push(b'\n');

        let exchange = async {
            self.write(&line, fd)
                .await
                .map_err(|source| QmpError::Connection {
                    command: name.to_owned(),
                    source,
                })?;
            match rx.await {
                Ok(reply) => Ok(reply),
                // The reader is gone without saying why (it was aborted).
                Err(_) => Err(QmpError::Connection {
                    command: name.to_owned(),
                    source: io::Error::new(io::ErrorKind::BrokenPipe, "QMP reader stopped"),
                }),
            }
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        // Whatever happened, nobody waits for this id any more.
        self.shared
            .state
            .lock()
            .expect("QMP state lock poisoned")
            .waiters
            .remove(&id);
        let reply = match outcome {
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: name.to_owned(),
                    after: timeout,
                });
            }
            Ok(result) => result?,
        };
        match reply {
            Reply::Return(value) => Ok(value),
            Reply::Error { class, desc } => Err(QmpError::Refused {
                command: name.to_owned(),
                class,
                desc,
            }),
            Reply::Malformed(detail) => Err(QmpError::Protocol {
                command: name.to_owned(),
                detail,
            }),
            Reply::Dead(dead) => Err(dead.into_error(name)),
        }
    }

    async fn write(&self, line: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut writer = self.writer.lock().await;
        let mut rest = line;
        if let Some(fd) = fd {
            // The descriptor rides on the first bytes of the command; QEMU
            // collects it while reading them.
            let stream: &UnixStream = (*writer).as_ref();
            let sent = stream
                .async_io(tokio::io::Interest::WRITABLE, || {
                    send_with_fd(stream.as_raw_fd(), rest, fd.as_raw_fd())
                })
                .await?;
            rest = &rest[sent..];
        }
        writer.write_all(rest).await
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // Closes our end of the socket, so QEMU's monitor accepts the next
        // client (it serves one at a time).
        self.reader.abort();
    }
}

fn send_with_fd(socket: i32, bytes: &[u8], fd: i32) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let fds = [fd];
    let iov = [io::IoSlice::new(bytes)];
    sendmsg::<UnixAddr>(
        socket,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

fn arguments_of<C: Command>(command: &C) -> Result<Option<Value>, QmpError> {
    match serde_json::to_value(command) {
        Ok(Value::Null) => Ok(None),
        Ok(value @ Value::Object(_)) => Ok(Some(value)),
        Ok(other) => Err(QmpError::Protocol {
            command: C::NAME.into(),
            detail: format!("arguments must be an object, not {other}"),
        }),
        Err(e) => Err(QmpError::Protocol {
            command: C::NAME.into(),
            detail: format!("cannot encode arguments: {e}"),
        }),
    }
}

fn decode<C: Command>(reply: Value) -> Result<C::Response, QmpError> {
    serde_json::from_value(reply.clone()).map_err(|e| QmpError::Protocol {
        command: C::NAME.into(),
        detail: format!("unexpected reply {reply}: {e}"),
    })
}

/// Read one newline-terminated message, refusing oversized ones.
/// `Ok(None)` is a clean end of stream.
async fn read_line(read: &mut BufReader<OwnedReadHalf>) -> Result<Option<Vec<u8>>, Dead> {
    let mut line = Vec::new();
    let n = (&mut *read)
        .take(MAX_MESSAGE + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| Dead::Io(e.kind(), e.to_string()))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n as u64 > MAX_MESSAGE {
            return Err(Dead::Malformed(format!(
                "message longer than {MAX_MESSAGE} bytes"
            )));
        }
        return Err(Dead::Io(
            io::ErrorKind::UnexpectedEof,
            "QMP socket closed mid-message".into(),
        ));
    }
    Ok(Some(line))
}

async fn read_greeting(read: &mut BufReader<OwnedReadHalf>) -> Result<Greeting, QmpError> {
    let command = "greeting";
    let line = match read_line(read).await {
        Ok(Some(line)) => line,
        Ok(None) => {
            return Err(QmpError::Connection {
                command: command.into(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "QMP socket closed before the greeting",
                ),
            });
        }
        Err(dead) => return Err(dead.into_error(command)),
    };
    let malformed = |detail: String| QmpError::Protocol {
        command: command.into(),
        detail,
    };
    let value: Value = serde_json::from_slice(&line)
        .map_err(|e| malformed(format!("not JSON ({e}): {}", excerpt(&line))))?;
    let body = value
        .get("QMP")
        .ok_or_else(|| malformed(format!("expected a QMP greeting, got {}", excerpt(&line))))?;
    serde_json::from_value(body.clone()).map_err(|e| malformed(format!("bad greeting: {e}")))
}

/// The reader task: route every message until the stream ends or breaks.
async fn read_messages(
    mut read: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
) {
    let dead = loop {
        let line = match read_line(&mut read).await {
            Ok(Some(line)) => line,
            Ok(None) => {
                break Dead::Io(io::ErrorKind::UnexpectedEof, "QMP socket closed".into());
            }
            Err(dead) => break dead,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match route(&line, &shared, &events) {
            Ok(()) => {}
            Err(dead) => break dead,
        }
    };
    tracing::debug!(reason = ?dead, "QMP connection closed");
    let mut pending = shared.state.lock().expect("QMP state lock poisoned");
    for (_, waiter) in pending.waiters.drain() {
        let _ = waiter.send(Reply::Dead(dead.clone()));
    }
    pending.dead = Some(dead);
}

fn route(line: &[u8], shared: &Shared, events: &broadcast::Sender<QmpEvent>) -> Result<(), Dead> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| Dead::Malformed(format!("not JSON ({e}): {}", excerpt(line))))?;
    let Value::Object(mut message) = value else {
        return Err(Dead::Malformed(format!(
            "not a JSON object: {}",
            excerpt(line)
        )));
    };
    if let Some(name) = message.get("event") {
        let Some(name) = name.as_str().map(str::to_owned) else {
            return Err(Dead::Malformed(format!(
                "event name is not a string: {}",
                excerpt(line)
            )));
        };
        let data = message.remove("data").unwrap_or(Value::Null);
        let event = QmpEvent::from_wire(&name, data, message.get("timestamp"));
        tracing::trace!(?event, "QMP event");
        // No subscriber is fine: nobody is waiting for events right now.
        let _ = events.send(event);
        return Ok(());
    }
    let reply = if let Some(value) = message.remove("return") {
        Reply::Return(value)
    } else if let Some(error) = message.remove("error") {
        let class = error.get("class").and_then(Value::as_str);
        let desc = error.get("desc").and_then(Value::as_str);
        match (class, desc) {
            (Some(class), Some(desc)) => Reply::Error {
                class: class.to_owned(),
                desc: desc.to_owned(),
            },
            _ => Reply::Malformed(format!("error without class and desc: {error}")),
        }
    } else {
        return Err(Dead::Malformed(format!(
            "neither a reply nor an event: {}",
            excerpt(line)
        )));
    };

    let mut pending = shared.state.lock().expect("QMP state lock poisoned");
    let waiter = match message.get("id") {
        Some(id) => id.as_u64().and_then(|id| pending.waiters.remove(&id)),
        // QEMU omits the id only when it could not parse the request; with
        // a single command in flight the reply is unambiguous.
        None if pending.waiters.len() == 1 => {
            let id = *pending.waiters.keys().next().expect("one waiter");
            pending.waiters.remove(&id)
        }
        None => None,
    };
    match waiter {
        Some(waiter) => {
            let _ = waiter.send(reply);
        }
        None => tracing::debug!(?reply, "QMP reply nobody waits for (timed out?)"),
    }
    Ok(())
}

fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests;
