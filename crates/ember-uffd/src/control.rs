//! The control socket: how the host agent asks a running page server for
//! its metrics, the pages the guest dirtied, or to write the working set.
//!
//! Protocol: a Unix stream socket; the client writes one JSON object per
//! line and reads one JSON object per line back, any number of times, then
//! closes. Requests:
//!
//! | request | response |
//! |---|---|
//! | `{"op":"metrics"}` | `{"ok":true,"metrics":{…MetricsSnapshot…}}` |
//! | `{"op":"dirty"}` | `{"ok":true,"ranges":[[offset,length],…]}` — image byte ranges written or given back since the restore, sorted; needs dirty tracking |
//! | `{"op":"write-working-set"}` | `{"ok":true,"path":"…","ranges":N,"bytes":B}` — the working set recorded so far, written now |
//!
//! Errors: `{"ok":false,"error":"…"}`. One client is served at a time;
//! a client idle for 10 s is dropped.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::warn;

use crate::Error;
use crate::server::SessionHandle;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Metrics,
    Dirty,
    WriteWorkingSet,
}

/// Bind the control socket, replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if UnixStream::connect(path).is_ok() {
        return Err(Error::SocketInUse(path.to_owned()));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| Error::Io {
        what: format!("binding control socket {}", path.display()),
        source: e,
    })
}

/// Serve control clients until the session stops; then remove the socket.
pub(crate) fn serve(listener: UnixListener, path: &Path, handle: &SessionHandle) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: handle.stop_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents != 0
            && let Ok((stream, _)) = listener.accept()
            && let Err(e) = serve_client(stream, handle)
        {
            warn!(build = handle.build(), error = %e, "control client failed");
        }
    }
    let _ = std::fs::remove_file(path);
}

fn serve_client(stream: UnixStream, handle: &SessionHandle) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, handle),
            Err(e) => {
                json!({"ok": false, "error": format!("bad request: {e}; send {{\"op\":\"metrics\"}}, {{\"op\":\"dirty\"}} or {{\"op\":\"write-working-set\"}}")})
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        writer.write_all(&out)?;
    }
    Ok(())
}

fn answer(req: Request, handle: &SessionHandle) -> serde_json::Value {
    match req {
        Request::Metrics => json!({"ok": true, "metrics": handle.metrics()}),
        Request::Dirty if !handle.dirty_tracking() => {
            json!({"ok": false, "error": Error::DirtyTrackingOff.to_string()})
        }
        Request::Dirty => match handle.dirty_ranges() {
            Ok(ranges) => {
                let pairs: Vec<[u64; 2]> =
                    ranges.iter().map(|r| [r.start, r.end - r.start]).collect();
                json!({"ok": true, "ranges": pairs})
            }
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Request::WriteWorkingSet => match handle.write_working_set() {
            Ok(Some((path, ws))) => {
                json!({"ok": true, "path": path, "ranges": ws.ranges.len(), "bytes": ws.bytes()})
            }
            Ok(None) => {
                json!({"ok": false, "error": "working-set recording is off; start the page server with --record-working-set"})
            }
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
    }
}

/// A client for the control protocol (for the host agent and tests).
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> std::io::Result<ControlClient> {
        Self::connect_with_timeout(path, Duration::from_secs(30))
    }

    /// Connect; each answer must come within `timeout`.
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> std::io::Result<ControlClient> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(ControlClient {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Send `req`; the response object (check its `ok`).
    pub fn request(&mut self, req: &Request) -> std::io::Result<serde_json::Value> {
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        assert_eq!(
            serde_json::to_string(&Request::Metrics).unwrap(),
            r#"{"op":"metrics"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Dirty).unwrap(),
            r#"{"op":"dirty"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::WriteWorkingSet).unwrap(),
            r#"{"op":"write-working-set"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }
}
