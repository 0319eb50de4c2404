//! The host agent's gRPC service (`ember.host.v1.HostAgent`): a thin
//! translation between protobuf messages and [`Agent`] calls, plus the
//! guest proxy (exec and files reach the guest agent through this host,
//! since only this host can enter the sandbox's network namespace).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use ember_guest_api::{
    FileInfo, FileKind, MkdirRequest, ProcessEvent, ProcessEvents, ProcessExit, PtySize,
    RenameRequest, SignalRequest, SignalSpec, StartProcess, UserSpec, WriteOptions,
};
use ember_net::{EgressPolicy, Ipv4Cidr};
use ember_proto::host as pb;
use ember_proto::host::host_agent_server::HostAgent;
use ember_types::{BuildId, SandboxId};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::agent::{Agent, CreateRequest, now_rfc3339};
use crate::error::AgentError;
use crate::state::{IngressRecord, SandboxRecord, SandboxState};

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ExecEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::FileChunk, Status>> + Send>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type PortStream = Pin<Box<dyn Stream<Item = Result<pb::PortFrame, Status>> + Send>>;

/// How long a guest port has to accept a connection.
const PORT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from a guest port per `OpenPort` reply message.
const PORT_CHUNK: usize = 64 * 1024;

/// Requires `authorization: Bearer <token>` on every call when a token is
/// configured (it always is outside tests of a loopback-only agent).
#[derive(Clone, Debug)]
pub struct TokenCheck {
    expected: Option<String>,
}

impl TokenCheck {
    pub fn new(token: Option<String>) -> TokenCheck {
        TokenCheck { expected: token }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        use subtle::ConstantTimeEq;
        if given.as_bytes().ct_eq(expected.as_bytes()).into() {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong host token (authorization: Bearer <token>)",
            ))
        }
    }
}

/// Run a lifecycle operation to its end even if the caller goes away: a
/// gRPC handler is dropped when its client disconnects (a control plane
/// that crashed or timed out), and an operation dropped half way would
/// leave its sandbox in a transitional state for ever.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::spawn(op).await.map_err(|e| {
        AgentError::io(
            "lifecycle operation task",
            std::io::Error::other(e.to_string()),
        )
    })?
}

#[derive(Debug, Clone)]
pub struct HostService {
    agent: Agent,
}

impl HostService {
    pub fn new(agent: Agent) -> HostService {
        HostService { agent }
    }

    /// The tonic server for this service, behind the token check.
    pub fn into_server(
        self,
        token: Option<String>,
    ) -> tonic::service::interceptor::InterceptedService<
        pb::host_agent_server::HostAgentServer<HostService>,
        TokenCheck,
    > {
        pb::host_agent_server::HostAgentServer::with_interceptor(self, TokenCheck::new(token))
    }

    /// A sandbox as the control plane sees it, with what only the live
    /// agent knows (its last ingress traffic).
    fn reply(&self, r: &SandboxRecord) -> pb::Sandbox {
        let mut p = to_proto(r);
        p.last_traffic_unix_ms = self.agent.last_traffic_ms(&r.id);
        p
    }
}

fn sandbox_id(s: &str) -> Result<SandboxId, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("sandbox_id: {e}")))
}

fn build_id(s: &str) -> Result<BuildId, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("build_id: {e}")))
}

fn policy(p: Option<pb::NetworkPolicy>) -> Result<EgressPolicy, Status> {
    let p = p.unwrap_or_default();
    let parse = |field: &str, v: &[String]| -> Result<Vec<Ipv4Cidr>, Status> {
        v.iter()
            .map(|c| {
                c.parse()
                    .map_err(|e| Status::invalid_argument(format!("network.{field}: {c:?}: {e}")))
            })
            .collect()
    };
    Ok(EgressPolicy {
        allow_out: parse("allow_out", &p.allow_out)?,
        deny_out: parse("deny_out", &p.deny_out)?,
    })
}

fn state(s: SandboxState) -> pb::SandboxState {
    use pb::SandboxState as P;
    match s {
        SandboxState::Creating => P::Creating,
        SandboxState::Running => P::Running,
        SandboxState::Pausing => P::Pausing,
        SandboxState::Paused => P::Paused,
        SandboxState::Resuming => P::Resuming,
        SandboxState::Snapshotting => P::Snapshotting,
        SandboxState::Destroying => P::Destroying,
        SandboxState::Failed => P::Failed,
        SandboxState::Destroyed => P::Destroyed,
    }
}

/// A sandbox's port access from the control plane's message (absent:
/// private, and no token opens it).
fn ingress_record(p: Option<pb::IngressPolicy>) -> Result<IngressRecord, Status> {
    let p = p.unwrap_or_default();
    if !p.traffic_token_sha256.is_empty() && p.traffic_token_sha256.len() != 32 {
        return Err(Status::invalid_argument(format!(
            "ingress.traffic_token_sha256 must be 32 bytes (a SHA-256), not {}",
            p.traffic_token_sha256.len()
        )));
    }
    Ok(IngressRecord {
        public: p.public,
        token_sha256: p.traffic_token_sha256,
    })
}

pub fn to_proto(r: &SandboxRecord) -> pb::Sandbox {
    pb::Sandbox {
        sandbox_id: r.id.to_string(),
        state: state(r.state) as i32,
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        source_build_id: r.source_build.map(|b| b.to_string()).unwrap_or_default(),
        build_id: r.build.map(|b| b.to_string()).unwrap_or_default(),
        metadata: r.metadata.clone().into_iter().collect(),
        failure_reason: r.failure_reason.clone().unwrap_or_default(),
        created_at: r.created_at.clone(),
        state_changed_at: r.state_changed_at.clone(),
        last_operation_ms: r.last_operation_ms,
        phases: r
            .last_operation_phases
            .iter()
            .map(|p| pb::Phase {
                name: p.name.clone(),
                micros: p.micros,
            })
            .collect(),
        network: Some(pb::NetworkPolicy {
            allow_out: r.network.allow_out.iter().map(|c| c.to_string()).collect(),
            deny_out: r.network.deny_out.iter().map(|c| c.to_string()).collect(),
        }),
        last_traffic_unix_ms: 0,
        ingress_public: r.ingress.public,
        build_stored_bytes: r.build_stored_bytes,
        image: r.image_defaults.as_ref().map(|d| pb::ImageConfig {
            env: d.env.clone(),
            working_dir: d.working_dir.clone().unwrap_or_default(),
            user: d.user.clone().unwrap_or_default(),
            entrypoint: d.entrypoint.clone(),
            cmd: d.cmd.clone(),
        }),
    }
}

fn user(s: &str) -> Option<UserSpec> {
    (!s.is_empty()).then(|| UserSpec::name(s))
}

fn guest_err(id: &SandboxId) -> impl Fn(ember_guest_api::GuestError) -> Status + '_ {
    move |source| {
        AgentError::Guest {
            id: id.clone(),
            source,
        }
        .into()
    }
}

/// Connect to a guest port: refused means nothing listens there.
pub(crate) async fn connect_guest_port(
    id: &SandboxId,
    port: u16,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream, AgentError> {
    let unreachable = |reason: String| AgentError::PortUnreachable {
        id: id.clone(),
        port,
        reason,
    };
    match tokio::time::timeout(PORT_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(AgentError::PortClosed {
                id: id.clone(),
                port,
            })
        }
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            PORT_CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

fn exit(e: ProcessExit) -> pb::ExitStatus {
    pb::ExitStatus {
        exit_code: e.exit_code,
        signal: e.signal,
        timed_out: e.timed_out,
    }
}

fn file_stat(f: FileInfo) -> pb::FileStat {
    let kind = match f.kind {
        FileKind::File => pb::FileType::File,
        FileKind::Dir => pb::FileType::Directory,
        FileKind::Symlink => pb::FileType::Symlink,
        _ => pb::FileType::Other,
    };
    let modified = UNIX_EPOCH + Duration::from_nanos(f.mtime_unix_ns.max(0) as u64);
    pb::FileStat {
        path: f.path,
        name: f.name,
        r#type: kind as i32,
        size: f.size,
        mode: f.mode,
        modified_at: humantime::format_rfc3339_millis(modified).to_string(),
        symlink_target: f.symlink_target.unwrap_or_default(),
        uid: f.uid,
        gid: f.gid,
    }
}

/// Turn the guest's event stream into gRPC events. A broken stream after
/// the start (the VM paused or died) ends the gRPC stream with an error
/// that says so; the caller may reconnect after a resume.
fn event_stream(id: SandboxId, events: ProcessEvents) -> EventStream {
    let stream = events.map(move |r| match r {
        Ok(rec) => {
            let event = match rec.event {
                ProcessEvent::Start { pid } => Some(pb::exec_event::Event::StartedPid(pid)),
                ProcessEvent::Stdout { data } => Some(pb::exec_event::Event::Stdout(data.to_vec())),
                ProcessEvent::Stderr { data } => Some(pb::exec_event::Event::Stderr(data.to_vec())),
                ProcessEvent::Exit(e) => Some(pb::exec_event::Event::Exit(exit(e))),
                _ => None,
            };
            Ok(pb::ExecEvent {
                seq: rec.seq,
                event,
            })
        }
        Err(e) => Err(Status::from(AgentError::Guest {
            id: id.clone(),
            source: e,
        })),
    });
    Box::pin(stream)
}

#[tonic::async_trait]
impl HostAgent for HostService {
    async fn host_info(
        &self,
        _req: Request<pb::HostInfoRequest>,
    ) -> Result<Response<pb::HostInfoReply>, Status> {
        let a = &self.agent;
        let cfg = a.config();
        let (vcpus_used, memory_used) = a.usage();
        let records = a.list();
        let count = |s: SandboxState| records.iter().filter(|r| r.state == s).count() as u32;
        let m = a.metrics();
        let totals = a.usage_totals();
        let builds = a.builds_on_disk().await;
        let (faults, prefetched, bytes_copied) = a.page_server_metrics().await;
        Ok(Response::new(pb::HostInfoReply {
            host_id: cfg.host_id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            backend: a.backend().kind.to_string(),
            backend_detail: a.backend().detail.clone(),
            vcpus_total: cfg.capacity_vcpus,
            memory_mib_total: a.memory_capacity_mib(),
            vcpus_used,
            memory_mib_used: memory_used,
            sandboxes_running: count(SandboxState::Running),
            sandboxes_paused: count(SandboxState::Paused),
            slots_free: a.slots_free(),
            isolation: a.backend().isolation.as_str().to_owned(),
            ingress_url: cfg
                .ingress
                .as_ref()
                .and_then(|i| Some(format!("{}://{}", i.scheme, i.domain.as_ref()?)))
                .unwrap_or_default(),
            builds: builds.iter().map(|b| b.to_string()).collect(),
            metrics: Some(pb::HostMetrics {
                page_faults_served: faults,
                pages_prefetched: prefetched,
                page_server_bytes_copied: bytes_copied,
                creates: m.creates.load(Ordering::Relaxed),
                pauses: m.pauses.load(Ordering::Relaxed),
                resumes: m.resumes.load(Ordering::Relaxed),
                sandboxes_cpu_percent: totals.cpu_percent,
                sandboxes_memory_bytes: totals.memory_bytes,
                sandboxes_disk_bytes: totals.disk_bytes,
                sandboxes_net_rx_bytes: totals.net_rx_bytes,
                sandboxes_net_tx_bytes: totals.net_tx_bytes,
            }),
        }))
    }

    async fn create_sandbox(
        &self,
        req: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let r = req.into_inner();
        let req = CreateRequest {
            id: sandbox_id(&r.sandbox_id)?,
            build: if r.build_id.is_empty() {
                None
            } else {
                Some(build_id(&r.build_id)?)
            },
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            env: r.env.into_iter().collect(),
            metadata: r.metadata.into_iter().collect(),
            network: policy(r.network)?,
            guest_token: r.guest_token,
            cold: r.cold,
            ingress: ingress_record(r.ingress)?,
            image: (!r.image.is_empty()).then_some(r.image),
            registry: crate::agent::RegistryCredentials {
                username: (!r.registry_username.is_empty()).then_some(r.registry_username),
                password: (!r.registry_password.is_empty()).then_some(r.registry_password),
            },
            exec_cwd: (!r.default_cwd.is_empty()).then_some(r.default_cwd),
            exec_user: (!r.default_user.is_empty()).then_some(r.default_user),
        };
        crate::failpoint::hit("create.before").await?;
        let agent = self.agent.clone();
        let rec = detached(async move { agent.create(req).await }).await?;
        crate::failpoint::hit("create.after").await?;
        Ok(Response::new(to_proto(&rec)))
    }

    async fn get_sandbox(
        &self,
        req: Request<pb::SandboxRef>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let id = sandbox_id(&req.into_inner().sandbox_id)?;
        Ok(Response::new(self.reply(&self.agent.get(&id)?)))
    }

    async fn list_sandboxes(
        &self,
        _req: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesReply>, Status> {
        Ok(Response::new(pb::ListSandboxesReply {
            sandboxes: self.agent.list().iter().map(|r| self.reply(r)).collect(),
        }))
    }

    async fn destroy_sandbox(
        &self,
        req: Request<pb::SandboxRef>,
    ) -> Result<Response<pb::DestroySandboxReply>, Status> {
        let id = sandbox_id(&req.into_inner().sandbox_id)?;
        crate::failpoint::hit("destroy.before").await?;
        let (agent, id2) = (self.agent.clone(), id.clone());
        detached(async move { agent.destroy(&id2).await }).await?;
        crate::failpoint::hit("destroy.after").await?;
        Ok(Response::new(pb::DestroySandboxReply {}))
    }

    async fn pause_sandbox(
        &self,
        req: Request<pb::SandboxRef>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let id = sandbox_id(&req.into_inner().sandbox_id)?;
        crate::failpoint::hit("pause.before").await?;
        let (agent, id2) = (self.agent.clone(), id.clone());
        let rec = detached(async move { agent.pause(&id2).await }).await?;
        crate::failpoint::hit("pause.after").await?;
        Ok(Response::new(to_proto(&rec)))
    }

    async fn resume_sandbox(
        &self,
        req: Request<pb::ResumeSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let token = (!r.guest_token.is_empty()).then_some(r.guest_token);
        crate::failpoint::hit("resume.before").await?;
        let (agent, id2) = (self.agent.clone(), id.clone());
        let env = r.env.into_iter().collect();
        let ingress = r.ingress.map(|i| ingress_record(Some(i))).transpose()?;
        let network = r.network.map(|n| policy(Some(n))).transpose()?;
        let rec =
            detached(async move { agent.resume(&id2, env, token, ingress, network).await }).await?;
        crate::failpoint::hit("resume.after").await?;
        Ok(Response::new(to_proto(&rec)))
    }

    async fn set_network_policy(
        &self,
        req: Request<pb::SetNetworkPolicyRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let rec = self
            .agent
            .set_network_policy(&id, policy(r.network)?)
            .await?;
        Ok(Response::new(to_proto(&rec)))
    }

    async fn set_ingress(
        &self,
        req: Request<pb::SetIngressRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let rec = self.agent.set_ingress(&id, ingress_record(r.ingress)?)?;
        Ok(Response::new(self.reply(&rec)))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let id = sandbox_id(&req.into_inner().sandbox_id)?;
        crate::failpoint::hit("snapshot.before").await?;
        let (agent, id2) = (self.agent.clone(), id.clone());
        let t = detached(async move { agent.create_snapshot(&id2).await }).await?;
        crate::failpoint::hit("snapshot.after").await?;
        Ok(Response::new(self.agent.snapshot_info(&t).await))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotReply>, Status> {
        let b = build_id(&req.into_inner().build_id)?;
        let data_freed = self.agent.delete_snapshot(b).await?;
        Ok(Response::new(pb::DeleteSnapshotReply { data_freed }))
    }

    async fn list_snapshots(
        &self,
        _req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
        let mut snapshots = Vec::new();
        for t in self.agent.templates()? {
            snapshots.push(self.agent.snapshot_info(&t).await);
        }
        Ok(Response::new(pb::ListSnapshotsReply { snapshots }))
    }

    type ExecStream = EventStream;

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd must not be empty"));
        }
        let guest = self.agent.guest(&id).await?;
        // The sandbox's defaults (its template's or image's) for what the
        // caller left out.
        let record = self.agent.get(&id)?;
        let cwd = if r.cwd.is_empty() {
            record.exec_cwd
        } else {
            Some(r.cwd)
        };
        let user_name = if r.user.is_empty() {
            record.exec_user.unwrap_or_default()
        } else {
            r.user
        };
        let start = StartProcess {
            cmd: r.cmd,
            args: r.args,
            env: r.env.into_iter().collect::<BTreeMap<_, _>>(),
            cwd,
            user: user(&user_name),
            timeout_ms: (r.timeout_ms > 0).then_some(r.timeout_ms),
            stdin: r.stdin,
            pty: r.pty.map(|p| PtySize {
                rows: p.rows.min(u16::MAX as u32) as u16,
                cols: p.cols.min(u16::MAX as u32) as u16,
            }),
            background: r.background,
            tag: (!r.tag.is_empty()).then_some(r.tag),
        };
        let events = guest.start_process(&start).await.map_err(guest_err(&id))?;
        Ok(Response::new(event_stream(id, events)))
    }

    type ConnectProcessStream = EventStream;

    async fn connect_process(
        &self,
        req: Request<pb::ConnectProcessRequest>,
    ) -> Result<Response<Self::ConnectProcessStream>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let events = guest
            .process_events(r.pid, r.after_seq)
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(event_stream(id, events)))
    }

    async fn write_stdin(
        &self,
        req: Request<pb::WriteStdinRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        if !r.data.is_empty() {
            guest
                .write_stdin(r.pid, Bytes::from(r.data))
                .await
                .map_err(guest_err(&id))?;
        }
        if r.close {
            guest.close_stdin(r.pid).await.map_err(guest_err(&id))?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn signal_process(
        &self,
        req: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let signal = match r.signal.parse::<i32>() {
            Ok(n) => SignalSpec::Number(n),
            Err(_) => SignalSpec::name(r.signal),
        };
        guest
            .signal(
                r.pid,
                &SignalRequest {
                    signal,
                    group: false,
                },
            )
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn resize_pty(
        &self,
        req: Request<pb::ResizePtyRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let size = r
            .size
            .ok_or_else(|| Status::invalid_argument("size is required"))?;
        let guest = self.agent.guest(&id).await?;
        guest
            .resize_pty(
                r.pid,
                PtySize {
                    rows: size.rows.min(u16::MAX as u32) as u16,
                    cols: size.cols.min(u16::MAX as u32) as u16,
                },
            )
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_sandbox_metrics(
        &self,
        req: Request<pb::SandboxRef>,
    ) -> Result<Response<pb::SandboxMetrics>, Status> {
        let id = sandbox_id(&req.into_inner().sandbox_id)?;
        let samples = self.agent.usage_of(&id).await?;
        let page_server = self
            .agent
            .page_server_of(&id)
            .await
            .map(|m| pb::PageServerMetrics {
                faults: m.faults,
                pages_copied: m.pages_copied,
                pages_zeroed: m.pages_zeroed,
                pages_prefetched: m.pages_prefetched,
                bytes_copied: m.bytes_copied,
                fault_latency_mean_us: m.fault_latency_mean_us,
                first_fault_us: m.first_fault_us,
                prefetch_done_us: m.prefetch_done_us,
            });
        Ok(Response::new(pb::SandboxMetrics {
            page_server,
            samples: samples
                .into_iter()
                .map(|s| pb::UsageSample {
                    at_unix_ms: s.at_unix_ms,
                    cpu_percent: s.cpu_percent,
                    cpu_seconds: s.cpu_seconds,
                    memory_bytes: s.memory_bytes,
                    memory_limit_bytes: s.memory_limit_bytes,
                    disk_bytes: s.disk_bytes,
                    net_rx_bytes: s.net_rx_bytes,
                    net_tx_bytes: s.net_tx_bytes,
                    pids: s.pids,
                })
                .collect(),
        }))
    }

    async fn list_processes(
        &self,
        req: Request<pb::SandboxRef>,
    ) -> Result<Response<pb::ListProcessesReply>, Status> {
        let id = sandbox_id(&req.into_inner().sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let list = guest.list_processes().await.map_err(guest_err(&id))?;
        let processes = list
            .into_iter()
            .map(|p| pb::ProcessInfo {
                pid: p.pid,
                cmd: p.cmd,
                args: p.args,
                tag: p.tag.unwrap_or_default(),
                running: p.running,
                exit: p.exit.map(exit),
                background: p.background,
                started_at: humantime::format_rfc3339_millis(
                    UNIX_EPOCH + Duration::from_millis(p.started_unix_ms),
                )
                .to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListProcessesReply { processes }))
    }

    type WatchDirStream = WatchStream;

    async fn watch_dir(
        &self,
        req: Request<pb::WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        use ember_guest_api::WatchEventKind as K;
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let health = guest.health().await.map_err(guest_err(&id))?;
        if !health.supports(ember_guest_api::capability::FILES_WATCH) {
            return Err(Status::failed_precondition(format!(
                "sandbox {id}'s guest agent (protocol {}) predates directory watching; \
                 a sandbox made from a current image can watch",
                health.protocol
            )));
        }
        let events = guest
            .watch(&r.path, r.recursive, user(&r.user).as_ref())
            .await
            .map_err(guest_err(&id))?;
        let kind = |k: K| match k {
            K::Started => pb::WatchEventKind::Started,
            K::Create => pb::WatchEventKind::Create,
            K::Write => pb::WatchEventKind::Write,
            K::Remove => pb::WatchEventKind::Remove,
            K::Rename => pb::WatchEventKind::Rename,
            K::Chmod => pb::WatchEventKind::Chmod,
            K::Overflow => pb::WatchEventKind::Overflow,
            K::Unknown => pb::WatchEventKind::Unspecified,
        };
        let started = futures::stream::once(async {
            Ok(pb::WatchEvent {
                kind: pb::WatchEventKind::Started as i32,
                name: String::new(),
                is_dir: false,
            })
        });
        let rest = events.map(move |ev| match ev {
            Ok(ev) => Ok(pb::WatchEvent {
                kind: kind(ev.kind) as i32,
                name: ev.name,
                is_dir: ev.is_dir,
            }),
            Err(e) => Err(Status::from(AgentError::Guest {
                id: id.clone(),
                source: e,
            })),
        });
        Ok(Response::new(Box::pin(started.chain(rest))))
    }

    type OpenPortStream = PortStream;

    async fn open_port(
        &self,
        req: Request<Streaming<pb::PortFrame>>,
    ) -> Result<Response<Self::OpenPortStream>, Status> {
        use pb::port_frame::Part;
        let mut incoming = req.into_inner();
        let open = match incoming.message().await? {
            Some(pb::PortFrame {
                part: Some(Part::Open(open)),
            }) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "the first OpenPort message must be `open`",
                ));
            }
        };
        let id = sandbox_id(&open.sandbox_id)?;
        let port = u16::try_from(open.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {} is not a TCP port (1-65535)", open.port))
            })?;
        let addr = self.agent.guest_port(&id, port).await?;
        let stream = connect_guest_port(&id, port, addr).await?;
        let (mut from_guest, mut to_guest) = stream.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<pb::PortFrame, Status>>(8);
        let opened = pb::PortFrame {
            part: Some(Part::Opened(pb::PortOpened {})),
        };
        let _ = tx.send(Ok(opened)).await;
        // Guest → caller, until the guest closes or the caller goes away.
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; PORT_CHUNK];
            loop {
                let n = tokio::select! {
                    _ = tx.closed() => return,
                    read = from_guest.read(&mut buf) => read,
                };
                let frame = match n {
                    Ok(0) => return,
                    Ok(n) => Ok(pb::PortFrame {
                        part: Some(Part::Data(buf[..n].to_vec())),
                    }),
                    Err(e) => Err(Status::aborted(format!("reading from the guest: {e}"))),
                };
                let failed = frame.is_err();
                if tx.send(frame).await.is_err() || failed {
                    return;
                }
            }
        });
        // Caller → guest; the end of the caller's stream half-closes.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok(Some(frame)) = incoming.message().await {
                if let Some(Part::Data(data)) = frame.part
                    && to_guest.write_all(&data).await.is_err()
                {
                    return;
                }
            }
            let _ = to_guest.shutdown().await;
        });
        let replies = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(replies)))
    }

    type ReadFileStream = ChunkStream;

    async fn read_file(
        &self,
        req: Request<pb::FileRef>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let content = guest
            .read_file(&r.path, user(&r.user).as_ref())
            .await
            .map_err(guest_err(&id))?;
        let stream = content.map(move |c| match c {
            Ok(data) => Ok(pb::FileChunk {
                data: data.to_vec(),
            }),
            Err(e) => Err(Status::from(AgentError::Guest {
                id: id.clone(),
                source: e,
            })),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::FileStat>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::WriteFileRequest {
                part: Some(pb::write_file_request::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first WriteFile message must be the header",
                ));
            }
        };
        let id = sandbox_id(&header.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let data = stream.map(|m| match m {
            Ok(pb::WriteFileRequest {
                part: Some(pb::write_file_request::Part::Data(d)),
            }) => Ok(Bytes::from(d)),
            Ok(_) => Err(std::io::Error::other("a second WriteFile header")),
            Err(status) => Err(std::io::Error::other(status.message().to_owned())),
        });
        let opts = WriteOptions {
            mode: header.mode,
            parents: None,
            user: user(&header.user),
        };
        let info = guest
            .write_file_stream(&header.path, &opts, data)
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(file_stat(info)))
    }

    async fn stat_file(&self, req: Request<pb::FileRef>) -> Result<Response<pb::FileStat>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let info = guest
            .stat(&r.path, user(&r.user).as_ref())
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(file_stat(info)))
    }

    async fn list_dir(
        &self,
        req: Request<pb::FileRef>,
    ) -> Result<Response<pb::ListDirReply>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let entries = guest
            .list_dir(&r.path, user(&r.user).as_ref())
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(pb::ListDirReply {
            entries: entries.into_iter().map(file_stat).collect(),
        }))
    }

    async fn make_dir(
        &self,
        req: Request<pb::MakeDirRequest>,
    ) -> Result<Response<pb::FileStat>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let info = guest
            .mkdir(&MkdirRequest {
                path: r.path,
                mode: r.mode,
                parents: r.parents,
                user: user(&r.user),
            })
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(file_stat(info)))
    }

    async fn remove_file(
        &self,
        req: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        guest
            .remove(&r.path, r.recursive, user(&r.user).as_ref())
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn rename_file(
        &self,
        req: Request<pb::RenameFileRequest>,
    ) -> Result<Response<pb::FileStat>, Status> {
        let r = req.into_inner();
        let id = sandbox_id(&r.sandbox_id)?;
        let guest = self.agent.guest(&id).await?;
        let info = guest
            .rename(&RenameRequest {
                from: r.from,
                to: r.to,
                overwrite: r.overwrite,
                user: user(&r.user),
            })
            .await
            .map_err(guest_err(&id))?;
        Ok(Response::new(file_stat(info)))
    }
}

#[allow(dead_code)]
fn _now() -> String {
    now_rfc3339()
}
