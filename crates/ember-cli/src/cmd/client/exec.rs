//! Running one command in a sandbox through the API and relaying it here:
//! its NDJSON event stream to our stdout and stderr, our stdin to it
//! (`POST …/processes/{pid}/stdin`), our signals to it, and its exit status
//! to our exit code. Shared by `ember sandbox exec` and `ember run`'s server
//! mode.
//!
//! A stream that breaks mid-command is resumed from the last event seen
//! (`GET …/processes/{pid}/events?after=SEQ`), so a hiccup between here and
//! the server loses no output. With a terminal (`-it`) the command gets a
//! PTY in the guest sized like ours, resized when ours is (SIGWINCH →
//! `POST …/processes/{pid}/resize`), and our terminal is raw while it runs.

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use ember_control::wire::{ExecEvent, ExecRequest, PtySize, SignalRequest, StdinRequest};
use futures::{Stream, StreamExt};
use reqwest::Method;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::api::{Api, ClientError, encode};
use super::exit;
use super::terminal::{self, RawTerminal};

/// Reconnects to a broken event stream before giving up.
const RECONNECTS: u32 = 3;
/// How long a signal forwarded on our way out may take.
const LAST_WORD: Duration = Duration::from_secs(3);

/// What to do on Ctrl-C (SIGINT) when the terminal is not raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Send SIGINT to the command and keep relaying; a second Ctrl-C
    /// stops relaying (the command is killed) and exits 130.
    Forward,
    /// Stop relaying at once and return 130 (`ember run` then tears the
    /// sandbox down).
    Return,
}

/// How our stdin reaches the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The command's stdin is empty.
    None,
    /// Our stdin is forwarded until it ends, then the command's is closed.
    Forward,
    /// A PTY in the guest; our stdin is forwarded and, when it is a
    /// terminal, put in raw mode.
    Terminal,
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct Command {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub timeout_s: Option<u64>,
    pub input: Input,
    pub on_interrupt: OnInterrupt,
    pub tag: Option<String>,
}

impl Command {
    fn request(&self) -> ExecRequest {
        let pty = (self.input == Input::Terminal).then(|| {
            let (rows, cols) = terminal::window_size().unwrap_or((24, 80));
            PtySize { rows, cols }
        });
        ExecRequest {
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            env: self.env.iter().cloned().collect(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            timeout_ms: self.timeout_s.map_or(0, |s| s.saturating_mul(1000)),
            stdin: self.input != Input::None,
            pty,
            background: false,
            tag: self.tag.clone(),
        }
    }
}

/// Run `command` in sandbox `id`, relaying its I/O; returns the exit code
/// to exit with (the command's own, 128+N for signal N, 124 when its
/// timeout killed it, 130 when interrupted). An error means Ember failed.
pub async fn run(api: &Api, id: &str, command: &Command) -> anyhow::Result<u8> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut winch = signal(SignalKind::window_change())?;

    let path = format!("/v1/sandboxes/{}/exec", encode(id));
    let resp = api
        .send(api.request(Method::POST, &path).json(&command.request()))
        .await?;
    // Raw only once the command exists, so errors above print normally.
    let _raw = if command.input == Input::Terminal {
        RawTerminal::enable()?
    } else {
        None
    };
    let mut relay = Relay {
        api,
        id,
        pid: None,
        last_seq: 0,
        stdin: None,
    };
    let mut events = EventLines::new(resp.bytes_stream());
    let mut reconnects = 0;
    let mut interrupted = false;
    let code = loop {
        let next = tokio::select! {
            ev = events.next() => ev,
            _ = interrupt.recv() => {
                match (command.on_interrupt, interrupted, relay.pid) {
                    (OnInterrupt::Forward, false, Some(_)) => {
                        interrupted = true;
                        relay.signal("INT").await;
                        continue;
                    }
                    (OnInterrupt::Forward, _, _) => {
                        relay.signal("KILL").await;
                        break exit::INTERRUPTED;
                    }
                    (OnInterrupt::Return, _, _) => break exit::INTERRUPTED,
                }
            }
            _ = terminate.recv() => {
                relay.signal("TERM").await;
                break 128 + libc::SIGTERM as u8;
            }
            _ = hangup.recv() => {
                relay.signal("HUP").await;
                break 128 + libc::SIGHUP as u8;
            }
            _ = winch.recv(), if command.input == Input::Terminal => {
                relay.resize().await;
                continue;
            }
        };
        let failure = match next {
            Some(Ok(ev)) => match relay.event(ev, command.input) {
                Ok(Some(code)) => break code,
                Ok(None) => continue,
                Err(broke) => broke,
            },
            Some(Err(e)) => format!("{e:#}"),
            None => "the stream ended before the command exited".to_owned(),
        };
        let Some(pid) = relay.pid else {
            anyhow::bail!("lost the command's output stream: {failure}");
        };
        if reconnects == RECONNECTS {
            anyhow::bail!(
                "lost the command's output stream ({failure}); process {pid} may still run in {id}"
            );
        }
        reconnects += 1;
        warn!(%failure, pid, after = relay.last_seq, "output stream broke; reconnecting");
        tokio::time::sleep(Duration::from_millis(300 * u64::from(reconnects))).await;
        let path = format!(
            "/v1/sandboxes/{}/processes/{pid}/events?after={}",
            encode(id),
            relay.last_seq
        );
        match api.send(api.request(Method::GET, &path)).await {
            Ok(resp) => events = EventLines::new(resp.bytes_stream()),
            Err(e @ ClientError::Api { .. }) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "lost the command's output stream ({failure}) and could not reconnect"
                )));
            }
            Err(e) => debug!(error = %e, "reconnect failed; retrying"),
        }
    };
    if let Some(task) = relay.stdin.take() {
        task.abort();
    }
    Ok(code)
}

/// The state of one relayed command.
struct Relay<'a> {
    api: &'a Api,
    id: &'a str,
    pid: Option<u32>,
    last_seq: u64,
    stdin: Option<tokio::task::JoinHandle<()>>,
}

impl Relay<'_> {
    /// Handle one event: `Ok(Some(code))` when the command exited,
    /// `Err(reason)` when the stream broke.
    fn event(&mut self, ev: ExecEvent, input: Input) -> Result<Option<u8>, String> {
        let seq = match &ev {
            ExecEvent::Started { seq, .. }
            | ExecEvent::Stdout { seq, .. }
            | ExecEvent::Stderr { seq, .. }
            | ExecEvent::Exit { seq, .. } => Some(*seq),
            ExecEvent::Error { .. } => None,
        };
        if let Some(seq) = seq {
            // A resumed stream replays from `after`; anything older is a duplicate.
            if seq <= self.last_seq {
                return Ok(None);
            }
            self.last_seq = seq;
        }
        match ev {
            ExecEvent::Started { pid, .. } => {
                self.pid = Some(pid);
                if input != Input::None && self.stdin.is_none() {
                    self.stdin = Some(tokio::spawn(forward_stdin(
                        self.api.clone(),
                        self.id.to_owned(),
                        pid,
                    )));
                }
            }
            ExecEvent::Stdout { text, data_b64, .. } => {
                write_chunk(&mut std::io::stdout().lock(), text, data_b64)
            }
            ExecEvent::Stderr { text, data_b64, .. } => {
                write_chunk(&mut std::io::stderr().lock(), text, data_b64)
            }
            ExecEvent::Exit {
                exit_code,
                signal,
                timed_out,
                ..
            } => {
                if timed_out {
                    eprintln!("ember: the command timed out and was killed\r");
                }
                return Ok(Some(exit_code_of(exit_code, signal, timed_out)));
            }
            ExecEvent::Error { code, message } => return Err(format!("{message} ({code})")),
        }
        Ok(None)
    }

    /// Send `sig` to the command, best effort and briefly: we are leaving.
    /// Give the command's terminal our window's size (best effort: a
    /// resize that fails only leaves the old size).
    async fn resize(&self) {
        let (Some(pid), Some((rows, cols))) = (self.pid, terminal::window_size()) else {
            return;
        };
        let path = format!("/v1/sandboxes/{}/processes/{pid}/resize", encode(self.id));
        if let Err(e) = self
            .api
            .call(Method::POST, &path, Some(&PtySize { rows, cols }))
            .await
        {
            debug!(error = %e, "terminal resize not passed on");
        }
    }

    async fn signal(&self, sig: &str) {
        let Some(pid) = self.pid else { return };
        let path = format!("/v1/sandboxes/{}/processes/{pid}/signal", encode(self.id));
        let body = SignalRequest {
            signal: sig.to_owned(),
        };
        let sent = tokio::time::timeout(LAST_WORD, self.api.post(&path, &body)).await;
        if let Ok(Err(e)) = sent {
            debug!(error = %e, sig, "forwarding a signal failed");
        }
    }
}

fn write_chunk(out: &mut impl Write, text: Option<String>, data_b64: Option<String>) {
    let data = match (text, data_b64) {
        (Some(t), _) => t.into_bytes(),
        (None, Some(b)) => match STANDARD.decode(b) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "undecodable output chunk");
                return;
            }
        },
        (None, None) => return,
    };
    // A closed stdout (`| head`) must not stop the command's stderr or exit code.
    let _ = out.write_all(&data);
    let _ = out.flush();
}

/// The exit code that stands for a command's exit status.
pub fn exit_code_of(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> u8 {
    if timed_out {
        exit::TIMED_OUT
    } else if let Some(code) = exit_code {
        code.clamp(0, 255) as u8
    } else {
        128 + signal.unwrap_or(0).clamp(0, 127) as u8
    }
}

/// Read our stdin on a thread of its own (a blocking read must not hold a
/// runtime thread, and a terminal read never ends by itself) and post it
/// to the process, coalescing what arrived while the last post was under
/// way. The end of our stdin closes the process's.
async fn forward_stdin(api: Api, id: String, pid: u32) {
    let (tx, mut rx) = mpsc::channel::<Option<Vec<u8>>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let chunk = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = chunk.is_none();
            if tx.blocking_send(chunk).is_err() || end {
                return;
            }
        }
    });
    let path = format!("/v1/sandboxes/{}/processes/{pid}/stdin", encode(&id));
    while let Some(first) = rx.recv().await {
        let mut data = Vec::new();
        let mut close = false;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Some(chunk) => data.extend_from_slice(&chunk),
                None => close = true,
            }
            if close || data.len() >= 256 * 1024 {
                break;
            }
            next = rx.try_recv().ok();
        }
        let body = StdinRequest {
            text: None,
            data_b64: (!data.is_empty()).then(|| STANDARD.encode(&data)),
            close,
        };
        if let Err(e) = api.post(&path, &body).await {
            // The process exited or closed its stdin: nothing more to send.
            debug!(error = %e, "stdin forwarding stopped");
            return;
        }
        if close {
            return;
        }
    }
}

/// Events from an NDJSON body, one per line; lines this ember cannot
/// read (a newer server's event types) are skipped.
struct EventLines<S> {
    body: S,
    buf: Vec<u8>,
    done: bool,
}

impl<S, E> EventLines<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    fn new(body: S) -> Self {
        EventLines {
            body,
            buf: Vec::new(),
            done: false,
        }
    }

    async fn next(&mut self) -> Option<anyhow::Result<ExecEvent>> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                match parse_line(&line) {
                    Some(ev) => return Some(Ok(ev)),
                    None => continue,
                }
            }
            if self.done {
                return None;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(anyhow::Error::new(e)));
                }
                None => {
                    self.done = true;
                    // A last line without its newline means the body was cut.
                    if !self.buf.is_empty() {
                        self.buf.clear();
                        return Some(Err(anyhow::anyhow!("the stream was cut mid-line")));
                    }
                    return None;
                }
            }
        }
    }
}

fn parse_line(line: &[u8]) -> Option<ExecEvent> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    match serde_json::from_slice(line) {
        Ok(ev) => Some(ev),
        Err(e) => {
            warn!(error = %e, line = %String::from_utf8_lossy(line), "skipping an event this ember does not know");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&str]) -> Vec<Result<ExecEvent, String>> {
        let body = futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from(c.to_string())))
                .collect::<Vec<_>>(),
        );
        let mut ev = EventLines::new(body);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut out = Vec::new();
            while let Some(e) = ev.next().await {
                out.push(e.map_err(|e| e.to_string()));
            }
            out
        })
    }

    #[test]
    fn events_split_across_chunks_are_reassembled_and_unknown_ones_skipped() {
        let got = lines(&[
            "{\"type\":\"started\",\"seq\":1,\"pid\":7}\n{\"type\":\"std",
            "out\",\"seq\":2,\"text\":\"hi\\n\"}\n\n{\"type\":\"wave\",\"seq\":3}\n",
            "{\"type\":\"exit\",\"seq\":4,\"exit_code\":3,\"timed_out\":false}\n",
        ]);
        assert_eq!(
            got,
            vec![
                Ok(ExecEvent::Started { seq: 1, pid: 7 }),
                Ok(ExecEvent::Stdout {
                    seq: 2,
                    text: Some("hi\n".into()),
                    data_b64: None
                }),
                Ok(ExecEvent::Exit {
                    seq: 4,
                    exit_code: Some(3),
                    signal: None,
                    timed_out: false
                }),
            ]
        );
    }

    #[test]
    fn a_stream_cut_mid_line_is_an_error_not_an_end() {
        let got = lines(&["{\"type\":\"started\",\"seq\":1,\"pid\":7}\n{\"type\":"]);
        assert_eq!(got.len(), 2);
        assert!(got[1].as_ref().is_err_and(|e| e.contains("cut")));
    }

    #[test]
    fn exit_statuses_become_exit_codes() {
        assert_eq!(exit_code_of(Some(0), None, false), 0);
        assert_eq!(exit_code_of(Some(3), None, false), 3);
        assert_eq!(exit_code_of(Some(300), None, false), 255);
        assert_eq!(exit_code_of(None, Some(9), false), 137);
        assert_eq!(exit_code_of(None, Some(15), true), 124);
    }
}
