//! A real `ember agent` process for tests: its own data directory, network
//! prefix and address pool (tests run in parallel), the shared guest image,
//! and a gRPC client to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_proto::host as pb;
use ember_proto::host::host_agent_client::HostAgentClient;
use rand::Rng;
use tonic::transport::Channel;

pub type Client = HostAgentClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.0).parse().unwrap(),
        );
        Ok(req)
    }
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("EMBER_DATA_DIR").unwrap_or_else(|| "/var/lib/ember".into()))
}

pub fn image_dir() -> Option<PathBuf> {
    ember_image::Image::locate(&data_dir()).map(|i| i.dir)
}

/// Where one agent keeps everything; survives the agent process so a test
/// can restart it.
pub struct AgentHome {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub pool: String,
    pub token: String,
    pub memory_dir: PathBuf,
    pub extra_env: Vec<(String, String)>,
    /// Each agent's sandboxes get uids of their own (tests run in parallel).
    pub uid_base: u32,
    /// The backend options (`--backend qemu` unless a test says otherwise).
    pub backend: Vec<String>,
}

/// The backend the suite runs on: QEMU, or Firecracker with a real Linux
/// guest where `scripts/test-kvm` says so (`EMBER_TEST_BACKEND=firecracker`
/// with `EMBER_FIRECRACKER_BIN`, and `EMBER_JAILER_BIN` if set).
fn backend_from_env() -> Vec<String> {
    match std::env::var("EMBER_TEST_BACKEND").as_deref() {
        Ok("firecracker") => {
            let bin = std::env::var("EMBER_FIRECRACKER_BIN")
                .expect("EMBER_TEST_BACKEND=firecracker needs EMBER_FIRECRACKER_BIN");
            let mut v = vec![
                "--backend".into(),
                "firecracker".into(),
                "--firecracker-bin".into(),
                bin,
            ];
            if let Ok(jailer) = std::env::var("EMBER_JAILER_BIN") {
                v.extend(["--jailer-bin".into(), jailer]);
            }
            v
        }
        Ok("qemu") | Err(_) => vec!["--backend".into(), "qemu".into()],
        Ok(other) => panic!("EMBER_TEST_BACKEND={other:?}: expected \"qemu\" or \"firecracker\""),
    }
}

impl AgentHome {
    pub fn new() -> AgentHome {
        let mut rng = rand::thread_rng();
        let prefix: String = std::iter::once('t')
            .chain((0..4).map(|_| (b'a' + rng.gen_range(0..26)) as char))
            .collect();
        let pool = format!(
            "10.{}.{}.0/24",
            rng.gen_range(100..250),
            rng.gen_range(0..256)
        );
        let dir = tempfile::Builder::new()
            .prefix("ember-agent-")
            .tempdir()
            .unwrap();
        AgentHome {
            memory_dir: PathBuf::from(format!("/dev/shm/{prefix}")),
            dir,
            prefix,
            pool,
            token: format!("tok-{}", rng.r#gen::<u64>()),
            extra_env: Vec::new(),
            uid_base: 1_000_000_000 + rng.gen_range(0..100_000) * 1000,
            backend: backend_from_env(),
        }
    }

    /// A home whose agent drives Firecracker's API through `ember-fc-fake`
    /// (built with the workspace), whose guests have no guest agent: a
    /// guest is up when the fake says `guest running` on its console.
    #[allow(dead_code)]
    pub fn fake_firecracker() -> AgentHome {
        let fake = Path::new(env!("CARGO_BIN_EXE_ember")).with_file_name("ember-fc-fake");
        assert!(
            fake.is_file(),
            "{} is missing: build the workspace (cargo build --workspace --bins)",
            fake.display()
        );
        let mut home = AgentHome::new();
        home.backend = vec![
            "--backend".into(),
            "firecracker".into(),
            "--firecracker-bin".into(),
            fake.display().to_string(),
            "--guest-ready-serial".into(),
            "guest running".into(),
        ];
        home
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The builds of the agent's warm bases (`<data>/warm/*.json`): kept
    /// like the base image's build, whatever happens to sandboxes.
    pub fn warm_builds(&self) -> Vec<String> {
        std::fs::read_dir(self.data().join("warm"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let w: serde_json::Value =
                            serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                        Some(w["build"].as_str()?.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The agent options (`AgentOptions`) that keep this home apart from
    /// every other: backend, run, memory and image directories, network
    /// prefix and pool. `ember agent` and `ember server` both take them.
    pub fn agent_options(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = self.backend.iter().map(Into::into).collect();
        v.extend(["--run-dir".into(), self.run_dir().into_os_string()]);
        v.extend([
            "--memory-dir".into(),
            self.memory_dir.clone().into_os_string(),
        ]);
        v.extend([
            "--image-dir".into(),
            image_dir().expect("guest image").into_os_string(),
        ]);
        v.extend(["--net-prefix".into(), self.prefix.clone().into()]);
        v.extend(["--net-pool".into(), self.pool.clone().into()]);
        v.extend(["--vm-uid-base".into(), self.uid_base.to_string().into()]);
        v
    }

    pub fn start(&self) -> AgentProc {
        self.start_with(&[])
    }

    /// Start `ember agent` with extra arguments (e.g. `--control-plane URL`,
    /// `--capacity-memory-mib N`).
    pub fn start_with(&self, extra: &[&str]) -> AgentProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(["agent", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.data())
            .args(self.agent_options())
            .args(extra)
            .env("EMBER_LOG", "info,ember_agent=debug")
            .env_remove("EMBER_CONTROL_PLANE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A token goes through the environment, never argv (refused there).
        if self.token.is_empty() {
            cmd.env_remove("EMBER_JOIN_TOKEN");
        } else {
            cmd.env("EMBER_JOIN_TOKEN", &self.token);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ember agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_path = self.dir.path().join(format!("agent-{}.log", child.id()));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = std::fs::File::create(&log_path).unwrap();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(rest) = line.split("serving gRPC on ").nth(1) {
                    let _ = tx.send(rest.trim().to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("ember agent did not start; log:\n{}", self.logs());
            }
        };
        let joined = extra.contains(&"--control-plane");
        AgentProc {
            child: Some(child),
            addr,
            token: self.token.clone(),
            identity: joined.then(|| self.data().join("identity")),
        }
    }

    /// Everything the agent processes of this home logged.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("agent-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Network namespaces of this home's pool that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        list_names("/run/netns", &format!("{}-", self.prefix))
    }

    /// Host links of this home's pool.
    pub fn links(&self) -> Vec<String> {
        list_names("/sys/class/net", &format!("{}h", self.prefix))
    }

    /// This home's sandbox processes (VMMs, page servers): those running
    /// as one of its sandboxes' uids (confined ones name only paths inside
    /// their jails), and any whose command line mentions its directory.
    pub fn processes(&self) -> Vec<u32> {
        let mut pids = processes_mentioning(self.dir.path());
        pids.extend(processes_with_uid_in(self.uid_base..self.uid_base + 1000));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// This home's processes (VMM, page server) of one sandbox.
    pub fn processes_of(&self, sandbox_id: &str) -> Vec<u32> {
        self.processes()
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(sandbox_id))
            })
            .collect()
    }

    pub fn memory_files(&self) -> Vec<String> {
        list_names(self.memory_dir.to_str().unwrap(), "")
    }
}

impl Drop for AgentHome {
    fn drop(&mut self) {
        // Last resort for a failed test: nothing of it may outlive it.
        for pid in self.processes() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for ns in self.namespaces() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
        for l in self.links() {
            let _ = Command::new("ip")
                .args(["link", "del", &l])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.prefix])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.memory_dir);
    }
}

fn list_names(dir: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes whose real uid is in `uids`.
pub fn processes_with_uid_in(uids: std::ops::Range<u32>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(p.path().join("status")).ok()?;
            // A zombie holds nothing; reaping it is its new parent's job.
            if status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains("Z"))
            {
                return None;
            }
            let uid: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            uids.contains(&uid).then_some(pid)
        })
        .collect()
}

pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|p| {
                    let pid: u32 = p.file_name().to_str()?.parse().ok()?;
                    if pid == me {
                        return None;
                    }
                    let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd);
                    (cmd.contains(&needle)
                        && !cmd.contains("ember\0agent")
                        && !cmd.contains("ember\0server")
                        && !cmd.starts_with("ember"))
                    .then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A TLS client of the joined agent at `address` (`https://…`), trusting
/// the certificate in its `identity` directory, that presents `token`.
#[allow(dead_code)]
pub async fn tls_client(address: &str, identity: &Path, token: &str) -> Client {
    let cert = std::fs::read_to_string(identity.join("tls.crt")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert))
        .domain_name(ember_proto::AGENT_TLS_NAME);
    let channel = Channel::from_shared(address.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("connect to ember agent over TLS");
    HostAgentClient::with_interceptor(channel, Bearer(token.to_owned()))
        .max_decoding_message_size(64 << 20)
}

/// The client the control plane has of a joined agent (or `ember
/// server`'s own): TLS, with the control token in `identity`.
#[allow(dead_code)]
pub async fn joined_client(address: &str, identity: &Path) -> Client {
    let token = std::fs::read_to_string(identity.join("control.token")).unwrap();
    tls_client(address, identity, token.trim()).await
}

pub struct AgentProc {
    child: Option<Child>,
    pub addr: String,
    pub token: String,
    /// A joined agent's identity directory: it serves TLS with the
    /// certificate there and takes only the control token there.
    pub identity: Option<std::path::PathBuf>,
}

impl AgentProc {
    /// A client as the control plane has one: over TLS to the pinned
    /// certificate with the control token for a joined agent, plain with
    /// `--token` for a standalone one.
    pub async fn client(&self) -> Client {
        if let Some(dir) = &self.identity {
            return joined_client(&format!("https://{}", self.addr), dir).await;
        }
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to ember agent");
        HostAgentClient::with_interceptor(channel, Bearer(self.token.clone()))
            .max_decoding_message_size(64 << 20)
    }

    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: a crash. Its VMs keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop. Its VMs keep running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn create_request(id: &str) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox_id: id.to_owned(),
        guest_token: format!("guest-{id}"),
        ..Default::default()
    }
}

pub fn new_id() -> String {
    ember_types::SandboxId::new().to_string()
}

/// Run `sh -c script` in the sandbox; (stdout, stderr, exit code).
pub async fn sh(client: &mut Client, id: &str, script: &str) -> (String, String, i32) {
    exec(client, id, "sh", &["-c", script]).await
}

pub async fn exec(
    client: &mut Client,
    id: &str,
    cmd: &str,
    args: &[&str],
) -> (String, String, i32) {
    let mut stream = client
        .exec(pb::ExecRequest {
            sandbox_id: id.to_owned(),
            cmd: cmd.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("exec {cmd} {args:?}: {s:?}"))
        .into_inner();
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = stream.message().await.expect("exec stream") {
        match ev.event {
            Some(pb::exec_event::Event::Stdout(d)) => out.extend(d),
            Some(pb::exec_event::Event::Stderr(d)) => err.extend(d),
            Some(pb::exec_event::Event::Exit(e)) => {
                code = Some(e.exit_code.unwrap_or(128 + e.signal.unwrap_or(0)))
            }
            _ => {}
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        code.expect("an exit event"),
    )
}

pub fn state(sb: &pb::Sandbox) -> pb::SandboxState {
    pb::SandboxState::try_from(sb.state).unwrap()
}

/// Nothing of `home`'s sandboxes remains (the agent itself may still run).
pub fn assert_clean(home: &AgentHome) {
    assert_eq!(home.processes(), Vec::<u32>::new(), "processes left");
    assert_eq!(home.namespaces(), Vec::<String>::new(), "namespaces left");
    assert_eq!(home.links(), Vec::<String>::new(), "host links left");
    assert_eq!(home.memory_files(), Vec::<String>::new(), "RAM files left");
    let vms = home.run_dir().join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run directories left: {left:?}");
    let sandboxes = home.data().join("sandboxes");
    let disks: Vec<_> = std::fs::read_dir(&sandboxes)
        .map(|d| {
            d.flatten()
                .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
                .map(|f| f.path())
                .filter(|p| p.extension().is_some_and(|x| x == "qcow2" || x == "raw"))
                .collect()
        })
        .unwrap_or_default();
    assert!(disks.is_empty(), "disk layers left: {disks:?}");
}

/// MiB of memory the host has handed out (MemTotal - MemAvailable), for
/// the benchmarks' before/after figures.
pub fn host_used_mib() -> f64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> f64 {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap()
            / 1024.0
    };
    field("MemTotal:") - field("MemAvailable:")
}
