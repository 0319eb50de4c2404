//! Starts the real `ember-guest` binary as an ordinary process on a random
//! loopback port, and talks to it with `GuestClient`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_guest_api::{ErrorCode, GuestClient, GuestError, InitRequest};

pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember-guest"));
        cmd.args(["--listen", "127.0.0.1:0", "--no-system-setup"])
            .args(extra)
            .env("EMBER_GUEST_LOG", "ember_guest=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: prctl in the forked child before exec, no allocation.
        unsafe {
            cmd.pre_exec(|| {
                // If the test dies, the agent stops (and stops its processes).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start ember-guest");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the agent's address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Agent { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client without a token.
    pub fn client(&self) -> GuestClient {
        GuestClient::new(self.addr)
    }

    /// A client that has initialised the agent with a fresh token.
    pub async fn init(&self) -> GuestClient {
        let client = self.client();
        client
            .wait_ready(Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        client
            .init(&InitRequest {
                token: format!("token-{}", rand::random::<u64>()),
                ..Default::default()
            })
            .await
            .unwrap();
        client
    }

    /// Peak resident memory of the agent, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:")
    }

    /// Whether the agent process has exited (reaping it if so).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Zombie children of the agent right now.
    pub fn zombie_children(&self) -> Vec<u32> {
        let mut zombies = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() > 1 && fields[0] == "Z" && fields[1] == self.pid().to_string() {
                zombies.push(pid);
            }
        }
        zombies
    }
}

pub fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `result` is the agent's error with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, GuestError>, code: ErrorCode) {
    match result {
        Err(GuestError::Api {
            code: got, status, ..
        }) => {
            assert_eq!(got, code, "wrong code");
            assert_eq!(status, code.http_status(), "status must match the code");
        }
        other => panic!("expected {code}, got {other:?}"),
    }
}

/// Sends one raw HTTP/1.1 request (for what the typed client cannot say)
/// and returns the status and body.
pub async fn raw_request(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nHost: agent\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
