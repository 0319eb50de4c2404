//! Processes the agent runs: spawning (user, cwd, PTY, session), the process
//! table, the single reaper, output capture into each process's
//! [`EventLog`], stdin, signals, timeouts, and the NDJSON event streams.
//!
//! One reaper owns all waiting. As PID 1 (or a subreaper in tests) the agent
//! inherits orphans, and a `waitpid(-1)` loop would steal the exit status of
//! the agent's own children from whoever waited for them by pid. So no other
//! code here waits: processes are spawned with `std::process::Command` and
//! their `Child` handles dropped unwaited, and [`ProcessTable::reap`] hands
//! each status to the process it belongs to. Spawning and reaping both hold
//! the table lock, so a child cannot be reaped before it is registered (nor
//! can std's own wait for a child whose exec failed be raced), and signals
//! are sent under the same lock, so a pid is never signalled after it was
//! reaped and possibly reused.
//!
//! It does not own HTTP: `api` turns requests into calls here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use ember_guest_api::{
    EventRecord, ProcessEvent, ProcessExit, ProcessInfo, PtySize, StartProcess, encode_event_line,
};
use futures::{Stream, StreamExt};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::error::AgentError;
use crate::eventlog::EventLog;
use crate::fsid;
use crate::users::{Identity, UserDb};

/// Exited processes remembered for `GET /processes` and late readers...
const EXITED_KEPT: usize = 64;
/// ...as long as their buffered events stay under this much (or one
/// process's buffer, if that is larger): a small VM must not fill up with
/// the output of processes nobody reads.
const EXITED_EVENTS_BUDGET: u64 = 16 << 20;
/// Between `SIGTERM` and `SIGKILL` when a timeout or shutdown kills a process.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// After the process exits, output still arriving (from children that kept
/// its stdout) is collected until the pipes are quiet this long.
const DRAIN_IDLE: Duration = Duration::from_millis(200);
const READ_CHUNK: usize = 64 << 10;
/// The most bytes of events sent to a reader in one HTTP chunk.
const STREAM_BATCH: u64 = 256 << 10;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ProcessTable {
    inner: Mutex<TableInner>,
    users: UserDb,
    default_env: RwLock<BTreeMap<String, String>>,
    buffer_limit: usize,
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable")
            .field("buffer_limit", &self.buffer_limit)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct TableInner {
    procs: HashMap<i32, Arc<Process>>,
    exited: VecDeque<i32>,
}

/// One process the agent started.
pub struct Process {
    pub pid: i32,
    cmd: String,
    args: Vec<String>,
    tag: Option<String>,
    pub background: bool,
    pty: Option<Arc<PtyMaster>>,
    started_unix_ms: u64,
    /// At most a quarter of the buffer, so the buffer always holds the
    /// newest few reads.
    read_chunk: usize,
    log: Mutex<EventLog>,
    /// Bumped on every append: event streams wait on it.
    appended: watch::Sender<u64>,
    /// Bumped when a reader takes events or detaches: output capture waits on
    /// it while the log is full.
    progress: watch::Sender<u64>,
    stdin: tokio::sync::Mutex<Option<StdinSink>>,
    stdin_open: AtomicBool,
    state: Mutex<RunState>,
}

#[derive(Default)]
struct RunState {
    /// Set by the reaper (under the table lock).
    reaped: Option<WaitStatus>,
    status_tx: Option<oneshot::Sender<WaitStatus>>,
    timed_out: bool,
    exit: Option<ProcessExit>,
}

enum StdinSink {
    Pipe(tokio::net::unix::pipe::Sender),
    Pty(Arc<PtyMaster>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Process {
    fn running(&self) -> bool {
        lock(&self.state).reaped.is_none()
    }

    fn append(&self, event: ProcessEvent) -> u64 {
        let seq = lock(&self.log).append(event);
        self.appended.send_replace(seq);
        seq
    }

    pub fn info(&self) -> ProcessInfo {
        let state = lock(&self.state);
        ProcessInfo {
            pid: self.pid as u32,
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            tag: self.tag.clone(),
            background: self.background,
            pty: self.pty.is_some(),
            stdin_open: self.stdin_open.load(Ordering::Relaxed),
            started_unix_ms: self.started_unix_ms,
            running: state.exit.is_none(),
            exit: state.exit,
            last_seq: lock(&self.log).last_seq(),
        }
    }

    /// Waits until the log may take more output (see [`EventLog::has_room`]).
    async fn room(&self) {
        let mut rx = self.progress.subscribe();
        loop {
            rx.borrow_and_update();
            if lock(&self.log).has_room() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl ProcessTable {
    pub fn new(users: UserDb, buffer_limit: usize) -> Self {
        ProcessTable {
            inner: Mutex::new(TableInner::default()),
            users,
            default_env: RwLock::new(BTreeMap::new()),
            buffer_limit,
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn users(&self) -> &UserDb {
        &self.users
    }

    pub fn set_default_env(&self, env: BTreeMap<String, String>) {
        *self.default_env.write().unwrap_or_else(|p| p.into_inner()) = env;
    }

    pub fn get(&self, pid: u32) -> Result<Arc<Process>, AgentError> {
        i32::try_from(pid)
            .ok()
            .and_then(|p| lock(&self.inner).procs.get(&p).cloned())
            .ok_or(AgentError::NoSuchProcess(pid))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let procs: Vec<Arc<Process>> = lock(&self.inner).procs.values().cloned().collect();
        let mut infos: Vec<ProcessInfo> = procs.iter().map(|p| p.info()).collect();
        infos.sort_by_key(|i| (i.started_unix_ms, i.pid));
        infos
    }

    /// Reaps every child that has exited, handing statuses to their
    /// processes; orphans are just reaped. Called on every `SIGCHLD`.
    pub fn reap(&self) {
        let table = lock(&self.inner);
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    match table.procs.get(&pid.as_raw()) {
                        Some(p) if p.running() => {
                            let mut state = lock(&p.state);
                            state.reaped = Some(status);
                            if let Some(tx) = state.status_tx.take() {
                                let _ = tx.send(status);
                            }
                        }
                        _ => tracing::debug!(pid = pid.as_raw(), ?status, "reaped an orphan"),
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }

    /// Signals a running process (or its group). Under the table lock, so
    /// the pid cannot have been reaped and reused meanwhile.
    pub fn signal(&self, pid: u32, signal: Signal, group: bool) -> Result<(), AgentError> {
        let table = lock(&self.inner);
        let process = i32::try_from(pid)
            .ok()
            .and_then(|p| table.procs.get(&p))
            .ok_or(AgentError::NoSuchProcess(pid))?;
        if !process.running() {
            return Err(AgentError::Conflict(format!(
                "process {pid} has already exited"
            )));
        }
        let target = if group { -process.pid } else { process.pid };
        kill(Pid::from_raw(target), signal)
            .map_err(|e| AgentError::io(format!("kill {target}"), e.into()))
    }

    /// Signals the process group if the process still runs; returns whether
    /// it did. `timed_out` marks the exit as caused by the timeout.
    fn signal_group_if_running(&self, process: &Process, signal: Signal, timed_out: bool) -> bool {
        let _table = lock(&self.inner);
        let mut state = lock(&process.state);
        if state.reaped.is_some() {
            return false;
        }
        if timed_out {
            state.timed_out = true;
        }
        drop(state);
        if let Err(e) = kill(Pid::from_raw(-process.pid), signal) {
            tracing::warn!(pid = process.pid, %signal, error = %e, "cannot signal the process group");
        }
        true
    }

    /// Starts a process and returns it; output capture, the timeout and the
    /// exit bookkeeping then run on their own tasks.
    pub async fn start(self: &Arc<Self>, req: StartProcess) -> Result<Arc<Process>, AgentError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(AgentError::ShuttingDown);
        }
        validate(&req)?;
        let identity = self.users.resolve(req.user.as_ref())?;
        let env = self.environment(&identity, &req);
        let cwd = match &req.cwd {
            Some(cwd) => crate::files::absolute_path(cwd)?,
            None if Path::new(&identity.home).is_dir() => PathBuf::from(&identity.home),
            None => PathBuf::from("/"),
        };
        let search = env.get("PATH").cloned().unwrap_or_default();
        let (program, cwd) = {
            let (cmd, cwd, is_root) = (req.cmd.clone(), cwd.clone(), identity.is_root());
            fsid::run_as(&identity, move || {
                check_cwd(&cwd, is_root)?;
                Ok((resolve_program(&cmd, &cwd, &search)?, cwd))
            })
            .await?
        };
        let table = self.clone();
        let spawned = tokio::task::spawn_blocking(move || {
            table.spawn_registered(&req, &identity, &env, &program, &cwd)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("spawn task failed: {e}")))??;
        let process = spawned.process.clone();
        tokio::spawn(self.clone().supervise(spawned));
        Ok(process)
    }

    fn environment(&self, id: &Identity, req: &StartProcess) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), id.home.clone());
        if let Some(name) = &id.name {
            env.insert("USER".into(), name.clone());
            env.insert("LOGNAME".into(), name.clone());
        }
        env.insert("SHELL".into(), id.shell.clone());
        env.insert("LANG".into(), "C.UTF-8".into());
        if req.pty.is_some() {
            env.insert("TERM".into(), "xterm-256color".into());
        }
        let defaults = self.default_env.read().unwrap_or_else(|p| p.into_inner());
        env.extend(defaults.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// Forks and registers the child under the table lock (see module docs).
    fn spawn_registered(
        &self,
        req: &StartProcess,
        id: &Identity,
        env: &BTreeMap<String, String>,
        program: &Path,
        cwd: &Path,
    ) -> Result<Spawned, AgentError> {
        let mut table = lock(&self.inner);
        // Descriptors are made under the lock too: every fork happens under
        // it, so none can inherit a descriptor before it is close-on-exec.
        let io = ChildIo::new(req.stdin, req.pty, id.uid)?;
        let mut cmd = Command::new(program);
        cmd.arg0(&req.cmd)
            .args(&req.args)
            .env_clear()
            .envs(env)
            .stdin(io.child_stdin()?)
            .stdout(io.child_stdout()?)
            .stderr(io.child_stderr()?);
        let cwd_c = CString::new(cwd.as_os_str().as_bytes())
            .map_err(|_| AgentError::InvalidRequest("cwd contains NUL".into()))?;
        let (uid, gid, groups) = (id.uid, id.gid, id.groups.clone());
        let controlling_tty = req.pty.is_some();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe raw system calls on data prepared before
        // the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || child_setup(controlling_tty, uid, gid, &groups, &cwd_c));
        }
        let child = cmd
            .spawn()
            .map_err(|e| AgentError::io(format!("cannot start {}", program.display()), e))?;
        drop(cmd);
        let pid = child.id() as i32;
        // Dropping the handle does not wait: the reaper owns that.
        drop(child);

        let (status_tx, status_rx) = oneshot::channel();
        let (stdin, outputs, pty) = io.into_parent_side()?;
        let process = Arc::new(Process {
            pid,
            cmd: req.cmd.clone(),
            args: req.args.clone(),
            tag: req.tag.clone(),
            background: req.background,
            pty,
            started_unix_ms: now_unix_ms(),
            read_chunk: (self.buffer_limit / 4).clamp(512, READ_CHUNK),
            log: Mutex::new(EventLog::new(self.buffer_limit)),
            appended: watch::channel(0).0,
            progress: watch::channel(0).0,
            stdin_open: AtomicBool::new(stdin.is_some()),
            stdin: tokio::sync::Mutex::new(stdin),
            state: Mutex::new(RunState {
                status_tx: Some(status_tx),
                ..RunState::default()
            }),
        });
        process.append(ProcessEvent::Start { pid: pid as u32 });
        table.procs.insert(pid, process.clone());
        tracing::info!(pid, cmd = %req.cmd, user = id.uid, background = req.background, pty = controlling_tty, "process started");
        Ok(Spawned {
            process,
            outputs,
            status_rx,
            timeout: req.timeout_ms.map(Duration::from_millis),
        })
    }

    /// Captures output, enforces the timeout, and records the exit.
    async fn supervise(self: Arc<Self>, spawned: Spawned) {
        let Spawned {
            process,
            outputs,
            status_rx,
            timeout,
        } = spawned;
        let mut readers = JoinSet::new();
        for output in outputs {
            readers.spawn(capture(process.clone(), output));
        }
        let timer = timeout.map(|after| {
            let (table, process) = (self.clone(), process.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if table.signal_group_if_running(&process, Signal::SIGTERM, true) {
                    tracing::info!(pid = process.pid, ?after, "process timed out");
                    tokio::time::sleep(KILL_GRACE).await;
                    table.signal_group_if_running(&process, Signal::SIGKILL, true);
                }
            })
        });
        let status = status_rx.await.ok();
        if let Some(timer) = timer {
            timer.abort();
        }
        let mut last = lock(&process.log).appended();
        loop {
            match tokio::time::timeout(DRAIN_IDLE, readers.join_next()).await {
                Ok(None) => break,
                Ok(Some(_)) => continue,
                Err(_) => {
                    let (now, room) = {
                        let log = lock(&process.log);
                        (log.appended(), log.has_room())
                    };
                    if now == last && room {
                        tracing::debug!(
                            pid = process.pid,
                            "output still open after exit; closing it"
                        );
                        readers.abort_all();
                        break;
                    }
                    last = now;
                }
            }
        }
        *process.stdin.lock().await = None;
        process.stdin_open.store(false, Ordering::Relaxed);
        let exit = {
            let mut state = lock(&process.state);
            let exit = exit_of(status, state.timed_out);
            state.exit = Some(exit);
            exit
        };
        process.append(ProcessEvent::Exit(exit));
        tracing::info!(pid = process.pid, ?exit, "process exited");
        self.retire(process.pid);
    }

    fn retire(&self, pid: i32) {
        let budget = EXITED_EVENTS_BUDGET.max(self.buffer_limit as u64);
        let mut table = lock(&self.inner);
        table.exited.push_back(pid);
        loop {
            let held: u64 = table
                .exited
                .iter()
                .filter_map(|p| table.procs.get(p))
                .map(|p| lock(&p.log).retained())
                .sum();
            let too_many = table.exited.len() > EXITED_KEPT;
            let too_big = held > budget && table.exited.len() > 1;
            if !(too_many || too_big) {
                break;
            }
            let Some(old) = table.exited.pop_front() else {
                break;
            };
            // A pid the kernel reused for a new process is no longer ours to drop.
            if table.procs.get(&old).is_some_and(|p| !p.running()) {
                table.procs.remove(&old);
            }
        }
    }

    /// Writes a request body to the process's stdin.
    pub async fn write_stdin<S>(&self, process: &Process, mut body: S) -> Result<u64, AgentError>
    where
        S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    {
        let mut sink = process.stdin.lock().await;
        let Some(target) = sink.as_mut() else {
            return Err(AgentError::Conflict(format!(
                "process {} has no open stdin (start it with \"stdin\": true, and do not close it first)",
                process.pid
            )));
        };
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| AgentError::InvalidRequest(format!("reading the body: {e}")))?;
            let result = match target {
                StdinSink::Pipe(pipe) => pipe.write_all(&chunk).await,
                StdinSink::Pty(master) => master.write_all(&chunk).await,
            };
            result.map_err(|e| match e.raw_os_error() {
                Some(libc::EPIPE) => {
                    AgentError::Conflict(format!("process {} closed its stdin", process.pid))
                }
                _ => AgentError::io("writing stdin", e),
            })?;
            written += chunk.len() as u64;
        }
        Ok(written)
    }

    /// Closes stdin (a PTY gets ^D instead: its terminal stays open).
    pub async fn close_stdin(&self, process: &Process) -> Result<(), AgentError> {
        let mut sink = process.stdin.lock().await;
        match sink.as_ref() {
            None => Err(AgentError::Conflict(format!(
                "process {} has no open stdin",
                process.pid
            ))),
            Some(StdinSink::Pty(master)) => master
                .write_all(&[0x04])
                .await
                .map_err(|e| AgentError::io("writing end-of-file to the terminal", e)),
            Some(StdinSink::Pipe(_)) => {
                *sink = None;
                process.stdin_open.store(false, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    pub fn resize(&self, process: &Process, size: PtySize) -> Result<(), AgentError> {
        let Some(master) = &process.pty else {
            return Err(AgentError::Conflict(format!(
                "process {} has no terminal; start it with \"pty\"",
                process.pid
            )));
        };
        master.resize(size)
    }

    /// Refuses new processes, then kills every running one: `SIGTERM` to each
    /// group (and, as PID 1, to everything), `SIGKILL` after the grace.
    pub async fn kill_all(&self, everything: bool) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let running = |table: &ProcessTable| -> Vec<Arc<Process>> {
            lock(&table.inner)
                .procs
                .values()
                .filter(|p| p.running())
                .cloned()
                .collect()
        };
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            for p in running(self) {
                self.signal_group_if_running(&p, signal, false);
            }
            if everything {
                // SAFETY: kill(-1) signals every process but PID 1; no memory involved.
                unsafe { libc::kill(-1, signal as i32) };
            }
            let deadline = tokio::time::Instant::now() + KILL_GRACE;
            while !running(self).is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The NDJSON event stream of `process` after `after`. With
    /// `kill_on_drop`, dropping the stream before the exit (the client went
    /// away) kills the process group.
    pub fn events(
        self: &Arc<Self>,
        process: Arc<Process>,
        after: u64,
        kill_on_drop: bool,
    ) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
        let reader = lock(&process.log).attach(after);
        let subscription = Subscription {
            table: self.clone(),
            appended: process.appended.subscribe(),
            process,
            reader,
            kill_on_drop,
        };
        futures::stream::unfold(subscription, |mut sub| async move {
            loop {
                sub.appended.borrow_and_update();
                let (batch, done) = {
                    let mut log = lock(&sub.process.log);
                    let batch = log.read(sub.reader, STREAM_BATCH);
                    (batch, log.done_for(sub.reader))
                };
                if !batch.is_empty() {
                    sub.process.progress.send_modify(|n| *n += 1);
                    return Some((Ok(encode_batch(&batch)), sub));
                }
                if done || sub.appended.changed().await.is_err() {
                    return None;
                }
            }
        })
    }
}

struct Spawned {
    process: Arc<Process>,
    outputs: Vec<Output>,
    status_rx: oneshot::Receiver<WaitStatus>,
    timeout: Option<Duration>,
}

/// A reader attached to a process's log; detaches (and, for the client of a
/// foreground process, kills it) when the HTTP response is dropped.
struct Subscription {
    table: Arc<ProcessTable>,
    process: Arc<Process>,
    appended: watch::Receiver<u64>,
    reader: u64,
    kill_on_drop: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.process.log).detach(self.reader);
        self.process.progress.send_modify(|n| *n += 1);
        if self.kill_on_drop
            && self
                .table
                .signal_group_if_running(&self.process, Signal::SIGKILL, false)
        {
            tracing::info!(
                pid = self.process.pid,
                "client of a foreground process went away; killed it"
            );
        }
    }
}

fn encode_batch(batch: &[EventRecord]) -> Bytes {
    let mut out = BytesMut::new();
    for record in batch {
        out.extend_from_slice(&encode_event_line(record));
    }
    out.freeze()
}

fn validate(req: &StartProcess) -> Result<(), AgentError> {
    if req.cmd.is_empty() {
        return Err(AgentError::InvalidRequest("cmd is empty".into()));
    }
    let nul = |s: &str| s.contains('\0');
    if nul(&req.cmd) || req.args.iter().any(|a| nul(a)) {
        return Err(AgentError::InvalidRequest(
            "cmd and args must not contain NUL bytes".into(),
        ));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || nul(k) || nul(v) {
            return Err(AgentError::InvalidRequest(format!(
                "bad environment variable {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    if let Some(size) = req.pty
        && (size.rows == 0 || size.cols == 0)
    {
        return Err(AgentError::InvalidRequest(
            "pty rows and cols must be positive".into(),
        ));
    }
    Ok(())
}

fn check_cwd(cwd: &Path, is_root: bool) -> Result<(), AgentError> {
    let context = || format!("working directory {}", cwd.display());
    let meta = std::fs::metadata(cwd).map_err(|e| AgentError::io(context(), e))?;
    if !meta.is_dir() {
        return Err(AgentError::io(
            context(),
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    if !is_root {
        // Runs on a thread with the user's identity and its own fs context
        // (fsid), so this checks the user's search permission for real.
        nix::unistd::chdir(cwd).map_err(|e| AgentError::io(context(), e.into()))?;
    }
    Ok(())
}

/// The executable `cmd` names: a path (relative to `cwd`) when it has a
/// `/`, else the first executable file of that name in `search` (`PATH`).
pub fn resolve_program(cmd: &str, cwd: &Path, search: &str) -> Result<PathBuf, AgentError> {
    if cmd.contains('/') {
        let path = cwd.join(cmd);
        return match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Err(AgentError::io(
                format!("program {}", path.display()),
                io::Error::from_raw_os_error(libc::EISDIR),
            )),
            Ok(_) => Ok(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AgentError::ProgramNotFound {
                program: cmd.into(),
                searched: format!("{}", path.display()),
            }),
            Err(e) => Err(AgentError::io(format!("program {}", path.display()), e)),
        };
    }
    for dir in search.split(':').filter(|d| !d.is_empty()) {
        let candidate = cwd.join(dir).join(cmd);
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(AgentError::ProgramNotFound {
        program: cmd.into(),
        searched: format!("PATH={search}"),
    })
}

/// In the forked child, before exec: own session (and controlling terminal),
/// the user's groups and ids, the working directory. Raw syscalls only: libc's
/// set*id wrappers coordinate threads the child no longer has.
fn child_setup(
    controlling_tty: bool,
    uid: u32,
    gid: u32,
    groups: &[libc::gid_t],
    cwd: &CString,
) -> io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: async-signal-safe system calls with valid arguments; `groups`
    // and `cwd` were allocated before the fork and stay alive.
    unsafe {
        check(libc::setsid() as libc::c_long)?;
        if controlling_tty {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0) as libc::c_long)?;
        }
        check(libc::syscall(
            libc::SYS_setgroups,
            groups.len(),
            groups.as_ptr(),
        ))?;
        check(libc::syscall(libc::SYS_setgid, gid))?;
        check(libc::syscall(libc::SYS_setuid, uid))?;
        check(libc::chdir(cwd.as_ptr()) as libc::c_long)?;
    }
    Ok(())
}

/// One output of a process the agent reads.
enum Output {
    Stdout(tokio::net::unix::pipe::Receiver),
    Stderr(tokio::net::unix::pipe::Receiver),
    Pty(Arc<PtyMaster>),
}

/// Copies one output into the log, waiting for room while a reader is behind.
async fn capture(process: Arc<Process>, output: Output) {
    let chunk = process.read_chunk;
    let mut buf = BytesMut::with_capacity(chunk);
    let (mut pipe, pty, is_stderr) = match output {
        Output::Stdout(p) => (Some(p), None, false),
        Output::Stderr(p) => (Some(p), None, true),
        Output::Pty(m) => (None, Some(m), false),
    };
    loop {
        process.room().await;
        buf.reserve(chunk);
        let n = match (&mut pipe, &pty) {
            (Some(pipe), _) => pipe.read_buf(&mut (&mut buf).limit(chunk)).await,
            (None, Some(master)) => master.read_buf(&mut buf, chunk).await,
            (None, None) => return,
        };
        match n {
            Ok(0) => return,
            Ok(_) => {
                let data = buf.split().freeze();
                process.append(if is_stderr {
                    ProcessEvent::Stderr { data }
                } else {
                    ProcessEvent::Stdout { data }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EIO is how a PTY master reports that the terminal closed.
                if e.raw_os_error() != Some(libc::EIO) {
                    tracing::warn!(pid = process.pid, error = %e, "reading process output failed");
                }
                return;
            }
        }
    }
}

/// The descriptors of a child being spawned.
struct ChildIo {
    stdin: Option<(OwnedFd, OwnedFd)>,
    stdout: Option<(OwnedFd, OwnedFd)>,
    stderr: Option<(OwnedFd, OwnedFd)>,
    pty: Option<(OwnedFd, OwnedFd)>,
}

impl ChildIo {
    /// Pipes are (read end, write end); the PTY is (master, slave).
    fn new(stdin: bool, pty: Option<PtySize>, uid: u32) -> Result<Self, AgentError> {
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| AgentError::io("pipe", e.into()))
        };
        if let Some(size) = pty {
            let winsize = libc::winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pair = nix::pty::openpty(Some(&winsize), None)
                .map_err(|e| AgentError::io("openpty", e.into()))?;
            for fd in [&pair.master, &pair.slave] {
                set_cloexec(fd).map_err(|e| AgentError::io("fcntl", e))?;
            }
            // The terminal belongs to its user, as login programs arrange,
            // so that tools that reopen or check it work.
            nix::unistd::fchown(
                pair.slave.as_raw_fd(),
                Some(nix::unistd::Uid::from_raw(uid)),
                None,
            )
            .map_err(|e| AgentError::io("chown of the terminal", e.into()))?;
            return Ok(ChildIo {
                stdin: None,
                stdout: None,
                stderr: None,
                pty: Some((pair.master, pair.slave)),
            });
        }
        Ok(ChildIo {
            stdin: if stdin { Some(pipe()?) } else { None },
            stdout: Some(pipe()?),
            stderr: Some(pipe()?),
            pty: None,
        })
    }

    fn child_end(fd: &OwnedFd) -> Result<Stdio, AgentError> {
        Ok(Stdio::from(
            fd.try_clone().map_err(|e| AgentError::io("dup", e))?,
        ))
    }

    fn child_stdin(&self) -> Result<Stdio, AgentError> {
        match (&self.pty, &self.stdin) {
            (Some((_, slave)), _) => Self::child_end(slave),
            (None, Some((read, _))) => Self::child_end(read),
            (None, None) => Ok(Stdio::null()),
        }
    }

    fn child_stdout(&self) -> Result<Stdio, AgentError> {
        match (&self.pty, &self.stdout) {
            (Some((_, slave)), _) => Self::child_end(slave),
            (None, Some((_, write))) => Self::child_end(write),
            (None, None) => Ok(Stdio::null()),
        }
    }

    fn child_stderr(&self) -> Result<Stdio, AgentError> {
        match (&self.pty, &self.stderr) {
            (Some((_, slave)), _) => Self::child_end(slave),
            (None, Some((_, write))) => Self::child_end(write),
            (None, None) => Ok(Stdio::null()),
        }
    }

    /// Keeps the agent's ends and closes the child's (so EOF arrives when
    /// the child's copies close).
    #[allow(clippy::type_complexity)]
    fn into_parent_side(
        self,
    ) -> Result<(Option<StdinSink>, Vec<Output>, Option<Arc<PtyMaster>>), AgentError> {
        let receiver = |fd: OwnedFd| {
            tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                .map_err(|e| AgentError::io("registering an output pipe", e))
        };
        if let Some((master, _slave)) = self.pty {
            let master = Arc::new(PtyMaster::new(master)?);
            return Ok((
                Some(StdinSink::Pty(master.clone())),
                vec![Output::Pty(master.clone())],
                Some(master),
            ));
        }
        let stdin = match self.stdin {
            Some((_read, write)) => Some(StdinSink::Pipe(
                tokio::net::unix::pipe::Sender::from_owned_fd(write)
                    .map_err(|e| AgentError::io("registering the stdin pipe", e))?,
            )),
            None => None,
        };
        let mut outputs = Vec::new();
        if let Some((read, _write)) = self.stdout {
            outputs.push(Output::Stdout(receiver(read)?));
        }
        if let Some((read, _write)) = self.stderr {
            outputs.push(Output::Stderr(receiver(read)?));
        }
        Ok((stdin, outputs, None))
    }
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The agent's side of a PTY: read output, write input, resize.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> Result<Self, AgentError> {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(AgentError::io("fcntl", io::Error::last_os_error()));
            }
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor
        // stays open and the same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| AgentError::io("registering the PTY", e.into_parts().1))?;
        Ok(PtyMaster { fd })
    }

    async fn read_buf(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let spare = buf.spare_capacity_mut();
            let len = max.min(spare.len());
            let spare = &mut spare[..len];
            let result = guard.try_io(|fd| {
                // SAFETY: reads into the spare capacity of `buf`, whose length
                // bounds the write; the bytes are marked filled only after.
                let n =
                    unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    // SAFETY: the kernel initialised `n` bytes of the spare capacity.
                    unsafe { buf.set_len(buf.len() + n) };
                    return Ok(n);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: writes from a live slice of the given length.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                    return Err(io::Error::from_raw_os_error(libc::EPIPE));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, size: PtySize) -> Result<(), AgentError> {
        if size.rows == 0 || size.cols == 0 {
            return Err(AgentError::InvalidRequest(
                "rows and cols must be positive".into(),
            ));
        }
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live local.
        if unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &winsize) } < 0 {
            return Err(AgentError::io(
                "resizing the terminal",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

fn exit_of(status: Option<WaitStatus>, timed_out: bool) -> ProcessExit {
    match status {
        Some(WaitStatus::Exited(_, code)) => ProcessExit {
            exit_code: Some(code),
            signal: None,
            core_dumped: false,
            timed_out,
        },
        Some(WaitStatus::Signaled(_, signal, core_dumped)) => ProcessExit {
            exit_code: None,
            signal: Some(signal as i32),
            core_dumped,
            timed_out,
        },
        // The reaper only reports terminations; anything else means the
        // status was lost, which the caller sees as "killed".
        _ => ProcessExit {
            exit_code: None,
            signal: Some(libc::SIGKILL),
            core_dumped: false,
            timed_out,
        },
    }
}

/// `"TERM"`, `"SIGTERM"`, `"term"` or a number.
pub fn parse_signal(spec: &ember_guest_api::SignalSpec) -> Result<Signal, AgentError> {
    use ember_guest_api::SignalSpec;
    let bad = || {
        AgentError::InvalidRequest(format!(
            "unknown signal {spec:?}: use a name such as \"TERM\" or \"KILL\", or a number"
        ))
    };
    match spec {
        SignalSpec::Number(n) => Signal::try_from(*n).map_err(|_| bad()),
        SignalSpec::Name(name) => {
            let upper = name.to_ascii_uppercase();
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            full.parse::<Signal>().map_err(|_| bad())
        }
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_guest_api::SignalSpec;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(
            parse_signal(&SignalSpec::name("TERM")).unwrap(),
            Signal::SIGTERM
        );
        assert_eq!(
            parse_signal(&SignalSpec::name("sigkill")).unwrap(),
            Signal::SIGKILL
        );
        assert_eq!(
            parse_signal(&SignalSpec::Number(2)).unwrap(),
            Signal::SIGINT
        );
        assert!(parse_signal(&SignalSpec::name("NOPE")).is_err());
        assert!(parse_signal(&SignalSpec::Number(0)).is_err());
        assert!(parse_signal(&SignalSpec::Number(1000)).is_err());
    }

    #[test]
    fn programs_resolve_through_path_or_as_paths() {
        let root = Path::new("/");
        assert_eq!(
            resolve_program("sh", root, "/nonexistent:/bin").unwrap(),
            Path::new("/bin/sh")
        );
        assert!(matches!(
            resolve_program("definitely-not-a-program", root, "/bin:/usr/bin"),
            Err(AgentError::ProgramNotFound { .. })
        ));
        assert_eq!(
            resolve_program("bin/sh", root, "").unwrap(),
            Path::new("/bin/sh")
        );
        assert!(matches!(
            resolve_program("/no/such", root, ""),
            Err(AgentError::ProgramNotFound { .. })
        ));
    }

    #[test]
    fn exit_statuses_map_to_events() {
        let pid = Pid::from_raw(5);
        let e = exit_of(Some(WaitStatus::Exited(pid, 3)), false);
        assert_eq!((e.exit_code, e.signal), (Some(3), None));
        let e = exit_of(
            Some(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            true,
        );
        assert_eq!((e.exit_code, e.signal, e.timed_out), (None, Some(15), true));
    }
}
