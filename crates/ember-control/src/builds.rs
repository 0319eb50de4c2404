//! Template builds: a container image or a Dockerfile made into a template
//! whose memory snapshot was taken with its start command already serving.
//!
//! A build is a sandbox driven through the same operations a user has:
//! created from the `FROM` (a `docker://` image the host pulls, an Ember
//! template, or `base`), then each `RUN` executed in it (never on a host),
//! each `COPY` written into it from the build context, then the start
//! command started, the ready check passed, and the sandbox snapshotted
//! under the template's name. The build sandbox is destroyed whatever
//! happens, and a failed build makes no template.
//!
//! **Step cache.** Every `RUN` and `COPY` gets a key: the hash of the key
//! before it and of everything that step depends on (its expanded command,
//! environment, working directory and user; for `COPY` the bytes it copies).
//! After such a step runs, the sandbox is snapshotted as the team's hidden
//! template `.cache-<key>`; a later build whose steps up to there hash the
//! same starts from the newest such snapshot and skips them.
//!
//! The job's progress and log live in its `template_builds` row, so any
//! control-plane replica can answer for it.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_proto::host as pb;
use sha2::{Digest, Sha256};

use crate::dockerfile::{self, Command, Dockerfile, Instruction, Kind};
use crate::error::Error;
use crate::hosts::HostClient;
use crate::lifecycle::{BASE_TEMPLATE, CreateSpec, ImageSource, Operations};
use crate::model::{Ingress, NetworkPolicy, OnTimeout, TemplateBuild, TemplateDefaults, now_ms};

/// The newest bytes of a build's log that are kept.
pub const LOG_KEPT: usize = 256 * 1024;
/// Lines of the log tail a failure message carries.
const TAIL_LINES: usize = 20;
/// How long one `RUN` may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes of one output line held before it is logged unfinished.
const MAX_LINE: usize = 16 * 1024;
/// Prefix of the hidden templates the step cache keeps.
pub const CACHE_PREFIX: &str = ".cache-";

/// Where a build starts from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`.
    Image(String),
    /// A Dockerfile and its build context (a tar, possibly gzip'd).
    Dockerfile {
        dockerfile: Dockerfile,
        context: Vec<u8>,
    },
}

/// When the started service counts as up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// A shell command that exits 0.
    Command(String),
    /// A TCP port that accepts connections.
    Port(u16),
}

/// Everything a build needs.
#[derive(Clone)]
pub struct BuildSpec {
    pub team_id: String,
    pub name: String,
    pub source: Source,
    /// Shell form; defaults to the Dockerfile's `ENTRYPOINT`/`CMD`.
    pub start_cmd: Option<String>,
    pub ready: Option<Ready>,
    pub ready_timeout: Duration,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub build_args: BTreeMap<String, String>,
    pub registry_username: Option<String>,
    pub registry_password: Option<String>,
}

impl std::fmt::Debug for BuildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildSpec")
            .field("team_id", &self.team_id)
            .field("name", &self.name)
            .field("start_cmd", &self.start_cmd)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl BuildSpec {
    /// The instructions the build follows: the Dockerfile's, or one `FROM`.
    pub fn instructions(&self) -> Vec<Instruction> {
        match &self.source {
            Source::Image(reference) => vec![Instruction {
                line: 0,
                kind: Kind::From(reference.clone()),
                text: format!("FROM {reference}"),
            }],
            Source::Dockerfile { dockerfile, .. } => dockerfile.instructions.clone(),
        }
    }

    /// What the job row shows as the source.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Image(r) => format!("image {r}"),
            Source::Dockerfile { .. } => "Dockerfile".to_owned(),
        }
    }
}

/// A new job row for `spec`, queued.
pub fn new_job(spec: &BuildSpec) -> TemplateBuild {
    TemplateBuild {
        id: format!("tb-{}", uuid::Uuid::new_v4().simple()),
        team_id: spec.team_id.clone(),
        name: spec.name.clone(),
        status: "queued".to_owned(),
        source: spec.describe(),
        step: 0,
        steps_total: spec.instructions().len() as u32 + 1,
        step_text: String::new(),
        error: None,
        log: String::new(),
        log_dropped: 0,
        sandbox_id: None,
        cached_steps: 0,
        created_at: now_ms(),
        heartbeat_at: now_ms(),
        finished_at: None,
    }
}

/// How often a running build's row is marked alive, and how old a mark may
/// be before the build counts as orphaned (its control plane died).
const HEARTBEAT: Duration = Duration::from_secs(10);
const HEARTBEAT_STALE: Duration = Duration::from_secs(60);

/// Fail builds whose control plane stopped running them (see the table's
/// migration); called before builds are read.
pub async fn fail_orphans(store: &crate::store::Store) -> crate::Result<()> {
    let now = now_ms();
    let n = store
        .fail_orphaned_template_builds(now - HEARTBEAT_STALE.as_millis() as i64, now)
        .await?;
    if n > 0 {
        tracing::warn!(
            builds = n,
            "failed template builds whose control plane stopped"
        );
    }
    Ok(())
}

// ------------------------------------------------------------ the context

/// One file or directory of the build context.
#[derive(Debug, Clone)]
pub struct ContextEntry {
    /// Relative, `/`-separated, no `.`/`..` components.
    pub path: String,
    pub mode: u32,
    /// `None` for a directory.
    pub data: Option<Vec<u8>>,
}

/// Read a build context (tar, gzip'd or not). Entries must stay inside it:
/// an absolute path or a `..` component is refused, naming the entry.
/// Symlinks and special files are refused too (COPY writes file contents).
pub fn read_context(bytes: &[u8]) -> Result<Vec<ContextEntry>, String> {
    let reader: Box<dyn Read + '_> = if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("the build context is not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the build context's tar is damaged: {e}"))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(format!(
                        "context entry {raw:?} climbs out of the context with `..`"
                    ));
                }
                p => parts.push(p),
            }
        }
        if raw.starts_with('/') {
            return Err(format!(
                "context entry {raw:?} is an absolute path; tar the context relative to its root"
            ));
        }
        if parts.is_empty() {
            continue;
        }
        let path = parts.join("/");
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let kind = entry.header().entry_type();
        let data = if kind.is_dir() {
            None
        } else if kind.is_file() {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("reading context entry {path:?}: {e}"))?;
            Some(data)
        } else {
            return Err(format!(
                "context entry {path:?} is a {kind:?}: a build context holds only files and directories"
            ));
        };
        out.push(ContextEntry { path, mode, data });
    }
    Ok(out)
}

/// `*` and `?` within one path component.
fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && n[0] != b'/' && go(p, &n[1..])),
            (Some(b'?'), Some(c)) if *c != b'/' => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// A file to write into the sandbox.
#[derive(Debug, Clone)]
struct CopyFile {
    dest: String,
    mode: u32,
    data: Option<Vec<u8>>,
}

/// What `COPY sources dest` writes, with Docker's rules: a directory's
/// contents go under `dest`; several sources, or a `dest` ending in `/`,
/// make `dest` a directory.
fn plan_copy(
    context: &[ContextEntry],
    sources: &[String],
    dest: &str,
    workdir: &str,
) -> Result<Vec<CopyFile>, String> {
    let dest = if dest.starts_with('/') {
        dest.to_owned()
    } else {
        format!("{}/{dest}", workdir.trim_end_matches('/'))
    };
    let into_dir = dest.ends_with('/') || sources.len() > 1;
    let dest = dest.trim_end_matches('/').to_owned();
    let dest = if dest.is_empty() {
        "/".to_owned()
    } else {
        dest
    };
    let join = |a: &str, b: &str| {
        if a == "/" {
            format!("/{b}")
        } else {
            format!("{a}/{b}")
        }
    };
    let mut out = Vec::new();
    for source in sources {
        let clean = source
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect::<Vec<_>>()
            .join("/");
        if source.split('/').any(|p| p == "..") {
            return Err(format!(
                "COPY {source}: a source cannot leave the build context"
            ));
        }
        let mut matched = false;
        for e in context {
            let rel = if clean.is_empty() {
                // `.`: the whole context, under dest.
                Some(e.path.clone())
            } else if e.path == clean || wildcard(&clean, &e.path) {
                if e.data.is_some() {
                    let name = e.path.rsplit('/').next().unwrap_or(&e.path).to_owned();
                    matched = true;
                    let target = if into_dir || clean.contains(['*', '?']) {
                        join(&dest, &name)
                    } else {
                        dest.clone()
                    };
                    out.push(CopyFile {
                        dest: target,
                        mode: e.mode,
                        data: e.data.clone(),
                    });
                    continue;
                }
                None
            } else {
                e.path
                    .strip_prefix(&format!("{clean}/"))
                    .map(str::to_owned)
                    .or_else(|| {
                        // A wildcard matching a directory: its contents.
                        let (head, tail) = e.path.split_once('/')?;
                        wildcard(&clean, head).then(|| tail.to_owned())
                    })
            };
            if let Some(rel) = rel {
                matched = true;
                out.push(CopyFile {
                    dest: join(&dest, &rel),
                    mode: e.mode,
                    data: e.data.clone(),
                });
            } else if e.path == clean {
                matched = true;
            }
        }
        if !matched {
            return Err(format!(
                "COPY {source}: no such file or directory in the build context"
            ));
        }
    }
    Ok(out)
}

// ------------------------------------------------------------ the plan

/// Where the first sandbox comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum From {
    Base,
    Template(String),
    Image(String),
}

/// One instruction, resolved against the build's state at that point.
#[derive(Debug, Clone)]
enum Action {
    Run {
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        /// `None`: the image's (or template's) default, else `/` and root.
        cwd: Option<String>,
        user: Option<String>,
    },
    Copy(Vec<CopyFile>),
    Mkdir {
        path: String,
    },
    /// ENV, ARG, USER, CMD, LABEL…: shapes later steps, runs nothing.
    Nothing,
}

#[derive(Debug, Clone)]
struct Step {
    text: String,
    line: usize,
    action: Action,
    /// The step cache's key after this step.
    key: String,
}

#[derive(Debug)]
struct Plan {
    from: From,
    steps: Vec<Step>,
    /// The Dockerfile's ENV (ARGs are for the build only).
    env: BTreeMap<String, String>,
    /// Set by WORKDIR / USER; `None` leaves the image's.
    workdir: Option<String>,
    user: Option<String>,
    start: Option<Vec<String>>,
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("{:x}", h.finalize())
}

/// Resolve every instruction in order: variables expanded, COPY sources
/// matched, each step's cache key chained from the last.
async fn plan(ops: &Operations, spec: &BuildSpec) -> Result<Plan, String> {
    let context = match &spec.source {
        Source::Dockerfile { context, .. } => read_context(context)?,
        Source::Image(_) => Vec::new(),
    };
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut workdir: Option<String> = None;
    let mut user: Option<String> = None;
    let mut from = None;
    let mut key = String::new();
    let mut steps = Vec::new();
    let (mut cmd, mut entrypoint): (Option<Command>, Option<Command>) = (None, None);
    for ins in spec.instructions() {
        let vars: BTreeMap<String, String> = args
            .iter()
            .chain(env.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let x = |s: &str| dockerfile::expand(s, &vars);
        let action = match &ins.kind {
            Kind::From(image) => {
                let image = x(image);
                let target = if image == BASE_TEMPLATE {
                    From::Base
                } else if image.starts_with("docker://") {
                    From::Image(image.clone())
                } else if let Some(t) = ops
                    .store
                    .template(&spec.team_id, &image)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    // The template's build ID: a replaced template is a new base.
                    key = hash(&[b"template", t.build_id.as_bytes()]);
                    From::Template(image.clone())
                } else if image.contains('/') || image.contains(':') {
                    From::Image(format!("docker://{image}"))
                } else {
                    return Err(format!(
                        "FROM {image}: no template of yours has that name; use `base`, a template \
                         name, or an image reference such as docker://HOST:PORT/{image}:TAG"
                    ));
                };
                let shape = format!("{:?}/{:?}", spec.vcpus, spec.memory_mib);
                key = hash(&[
                    b"ember-build-v1",
                    key.as_bytes(),
                    format!("{target:?}").as_bytes(),
                    shape.as_bytes(),
                ]);
                from = Some(target);
                Action::Nothing
            }
            Kind::Arg { name, default } => {
                let value = spec
                    .build_args
                    .get(name)
                    .cloned()
                    .or_else(|| default.as_ref().map(|d| x(d)))
                    .unwrap_or_default();
                args.insert(name.clone(), value);
                Action::Nothing
            }
            Kind::Env(pairs) => {
                for (k, v) in pairs {
                    let v = x(v);
                    env.insert(k.clone(), v);
                }
                Action::Nothing
            }
            Kind::Workdir(dir) => {
                let dir = x(dir);
                let dir = if dir.starts_with('/') {
                    dir
                } else {
                    format!(
                        "{}/{dir}",
                        workdir.as_deref().unwrap_or("").trim_end_matches('/')
                    )
                };
                workdir = Some(dir.clone());
                Action::Mkdir { path: dir }
            }
            Kind::User(u) => {
                user = Some(x(u));
                Action::Nothing
            }
            Kind::Run(c) => {
                let mut run_env = args.clone();
                run_env.extend(env.clone());
                Action::Run {
                    argv: c.argv(),
                    env: run_env,
                    cwd: workdir.clone(),
                    user: user.clone(),
                }
            }
            Kind::Copy { sources, dest } => {
                let sources: Vec<String> = sources.iter().map(|s| x(s)).collect();
                let base = workdir.as_deref().unwrap_or("/");
                Action::Copy(plan_copy(&context, &sources, &x(dest), base)?)
            }
            Kind::Cmd(c) => {
                cmd = Some(c.clone());
                Action::Nothing
            }
            Kind::Entrypoint(c) => {
                entrypoint = Some(c.clone());
                Action::Nothing
            }
            Kind::Noted(_) => Action::Nothing,
        };
        match &action {
            Action::Run {
                argv,
                env,
                cwd,
                user,
            } => {
                let canon = serde_json::json!({"run": argv, "env": env, "cwd": cwd, "user": user});
                key = hash(&[key.as_bytes(), canon.to_string().as_bytes()]);
            }
            Action::Copy(files) => {
                let mut h = Sha256::new();
                for f in files {
                    h.update(f.dest.as_bytes());
                    h.update(f.mode.to_le_bytes());
                    match &f.data {
                        Some(d) => {
                            h.update((d.len() as u64).to_le_bytes());
                            h.update(d);
                        }
                        None => h.update(b"dir"),
                    }
                }
                key = hash(&[key.as_bytes(), b"copy", &h.finalize()]);
            }
            Action::Mkdir { path } => {
                key = hash(&[key.as_bytes(), b"mkdir", path.as_bytes()]);
            }
            Action::Nothing => {}
        }
        steps.push(Step {
            text: ins.text.clone(),
            line: ins.line,
            action,
            key: key.clone(),
        });
    }
    let start = match (&spec.start_cmd, entrypoint, cmd) {
        (Some(s), _, _) => Some(Command::Shell(s.clone()).argv()),
        (None, Some(e), c) => {
            let mut argv = e.argv();
            if let (Command::Exec(_), Some(Command::Exec(more))) = (&e, c) {
                argv.extend(more);
            }
            Some(argv)
        }
        (None, None, Some(c)) => Some(c.argv()),
        (None, None, None) => None,
    };
    Ok(Plan {
        from: from.ok_or("no FROM")?,
        steps,
        env,
        workdir,
        user,
        start,
    })
}

fn cache_name(key: &str) -> String {
    format!("{CACHE_PREFIX}{}", &key[..32])
}

// ------------------------------------------------------------ the job

/// A running job: its row, written back as it changes.
struct Job {
    ops: Arc<Operations>,
    row: TemplateBuild,
    flushed: Instant,
}

impl Job {
    fn log(&mut self, text: &str) {
        self.row.log.push_str(text);
        if !text.ends_with('\n') {
            self.row.log.push('\n');
        }
        if self.row.log.len() > LOG_KEPT {
            let mut cut = self.row.log.len() - LOG_KEPT;
            while !self.row.log.is_char_boundary(cut) {
                cut += 1;
            }
            self.row.log.drain(..cut);
            self.row.log_dropped += cut as u64;
        }
    }

    /// Write the row now, or at most once a second unless `now`.
    async fn flush(&mut self, now: bool) {
        if !now && self.flushed.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.flushed = Instant::now();
        self.row.heartbeat_at = now_ms();
        if let Err(e) = self.ops.store.update_template_build(&self.row).await {
            tracing::warn!(build = %self.row.id, error = %e, "recording build progress failed");
        }
    }

    fn tail(&self) -> String {
        let lines: Vec<&str> = self.row.log.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }
}

/// Run a build to its end; its row says how it went.
pub async fn run(ops: Arc<Operations>, spec: BuildSpec, row: TemplateBuild) {
    let mut job = Job {
        ops,
        row,
        flushed: Instant::now(),
    };
    job.row.status = "running".to_owned();
    job.flush(true).await;
    let heartbeat = {
        let (store, id) = (job.ops.store.clone(), job.row.id.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                if let Err(e) = store.heartbeat_template_build(&id, now_ms()).await {
                    tracing::warn!(build = %id, error = %e, "build heartbeat failed");
                }
            }
        })
    };
    let started = Instant::now();
    let mut sandbox = None;
    let result = build(&mut job, &spec, &mut sandbox).await;
    if let Some(id) = &sandbox
        && let Err(e) = job.ops.destroy(Some(&spec.team_id), id).await
    {
        tracing::warn!(build = %job.row.id, sandbox = %id, error = %e, "destroying the build sandbox failed; the reconciler will retry");
    }
    match result {
        Ok(()) => {
            job.row.status = "ready".to_owned();
            let msg = format!(
                "template {} is ready ({:.1} s)",
                spec.name,
                started.elapsed().as_secs_f64()
            );
            job.log(&msg);
            job.ops
                .metrics
                .observe("template_build", started.elapsed().as_secs_f64());
        }
        Err(e) => {
            job.log(&format!("error: {e}"));
            job.row.status = "failed".to_owned();
            job.row.error = Some(e);
        }
    }
    heartbeat.abort();
    job.row.finished_at = Some(now_ms());
    job.flush(true).await;
    tracing::info!(build = %job.row.id, template = %spec.name, status = %job.row.status, "template build ended");
}

async fn build(
    job: &mut Job,
    spec: &BuildSpec,
    sandbox: &mut Option<String>,
) -> Result<(), String> {
    let plan = plan(&job.ops, spec).await?;
    // The newest cached step this build can start from.
    let mut resume_at = None;
    for (i, step) in plan.steps.iter().enumerate().rev() {
        if matches!(step.action, Action::Run { .. } | Action::Copy(_)) {
            let name = cache_name(&step.key);
            if job
                .ops
                .store
                .template(&spec.team_id, &name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                resume_at = Some((i, name));
                break;
            }
        }
    }
    let (template, image, vcpus, memory_mib) = match (&resume_at, &plan.from) {
        (Some((_, name)), _) => (name.clone(), None, None, None),
        (None, From::Base) => (BASE_TEMPLATE.to_owned(), None, spec.vcpus, spec.memory_mib),
        (None, From::Template(t)) => (t.clone(), None, None, None),
        (None, From::Image(r)) => (
            BASE_TEMPLATE.to_owned(),
            Some(ImageSource {
                reference: r.clone(),
                username: spec.registry_username.clone(),
                password: spec.registry_password.clone(),
            }),
            spec.vcpus,
            spec.memory_mib,
        ),
    };
    job.row.step = 1;
    job.row.step_text = plan
        .steps
        .first()
        .map(|s| s.text.clone())
        .unwrap_or_default();
    match &resume_at {
        Some((i, _)) => {
            job.row.cached_steps = *i as u32 + 1;
            job.log(&format!(
                "step 1/{}: {} (steps 1 to {} cached)",
                job.row.steps_total,
                job.row.step_text,
                i + 1
            ));
        }
        None => job.log(&format!(
            "step 1/{}: {}",
            job.row.steps_total, job.row.step_text
        )),
    }
    job.flush(true).await;
    let t = Instant::now();
    let mut metadata = BTreeMap::new();
    metadata.insert("ember.template_build".to_owned(), job.row.id.clone());
    let (sb, _token, image_config) = job
        .ops
        .create_reporting_image(CreateSpec {
            team_id: spec.team_id.clone(),
            template,
            vcpus,
            memory_mib,
            timeout_s: 3600,
            on_timeout: OnTimeout::Kill,
            metadata,
            env: BTreeMap::new(),
            network: NetworkPolicy::default(),
            cold: false,
            ingress: Ingress::default(),
            image,
        })
        .await
        .map_err(|e| format!("starting the build sandbox: {}", describe(e)))?;
    *sandbox = Some(sb.id.clone());
    job.row.sandbox_id = Some(sb.id.clone());
    job.log(&format!(
        "  sandbox {} up in {:.1} s",
        sb.id,
        t.elapsed().as_secs_f64()
    ));
    // What the image (or the template built on it) asks of processes: the
    // steps' defaults, kept with every cache entry so a build resumed from
    // one knows them without the image.
    let base = match image_config {
        Some(c) => image_defaults(&c),
        None => job
            .ops
            .store
            .template(&spec.team_id, &sb.template)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|t| t.defaults)
            .unwrap_or_default(),
    };
    let cwd_of = |cwd: &Option<String>| {
        cwd.clone()
            .or_else(|| base.workdir.clone())
            .unwrap_or_else(|| "/".to_owned())
    };
    let user_of = |user: &Option<String>| {
        user.clone()
            .or_else(|| base.user.clone())
            .unwrap_or_default()
    };
    let first = resume_at.as_ref().map_or(1, |(i, _)| i + 1);
    for (i, step) in plan.steps.iter().enumerate().skip(first.max(1)) {
        job.row.step = i as u32 + 1;
        job.row.step_text = step.text.clone();
        job.log(&format!(
            "step {}/{}: {}",
            i + 1,
            job.row.steps_total,
            step.text
        ));
        job.flush(true).await;
        let (_, mut client) = job
            .ops
            .running(&spec.team_id, &sb.id)
            .await
            .map_err(|e| format!("the build sandbox is gone: {}", describe(e)))?;
        let t = Instant::now();
        match &step.action {
            Action::Nothing => continue,
            Action::Mkdir { path } => {
                make_dir(&mut client, &sb.id, path, "")
                    .await
                    .map_err(|e| failed(step, &e))?;
                continue;
            }
            Action::Run {
                argv,
                env,
                cwd,
                user,
            } => {
                let (cwd, user) = (cwd_of(cwd), user_of(user));
                let exit = exec(
                    job,
                    &mut client,
                    &sb.id,
                    argv,
                    env,
                    &cwd,
                    &user,
                    RUN_TIMEOUT,
                )
                .await
                .map_err(|e| failed(step, &e))?;
                if let Some(why) = exit_failure(&exit) {
                    return Err(format!(
                        "step {} (line {}) `{}` {why}; the last lines of its output:\n{}",
                        i + 1,
                        step.line,
                        step.text,
                        job.tail()
                    ));
                }
            }
            Action::Copy(files) => {
                let mut bytes = 0;
                for f in files {
                    write(&mut client, &sb.id, f)
                        .await
                        .map_err(|e| failed(step, &e))?;
                    bytes += f.data.as_ref().map_or(0, Vec::len);
                }
                job.log(&format!("  copied {} entries, {bytes} bytes", files.len()));
            }
        }
        job.log(&format!("  done in {:.1} s", t.elapsed().as_secs_f64()));
        // Cache the sandbox as it is now (it keeps running).
        let name = cache_name(&step.key);
        let t = Instant::now();
        match job
            .ops
            .snapshot_with(&spec.team_id, &sb.id, &name, Some(base.clone()))
            .await
        {
            Ok(_) => job.log(&format!(
                "  cached as {name} in {:.1} s",
                t.elapsed().as_secs_f64()
            )),
            Err(Error::TemplateExists { .. }) => {}
            Err(e) => job.log(&format!("  not cached: {}", describe(e))),
        }
    }
    let (_, mut client) = job
        .ops
        .running(&spec.team_id, &sb.id)
        .await
        .map_err(|e| format!("the build sandbox is gone: {}", describe(e)))?;
    job.row.step = job.row.steps_total;
    job.row.step_text = "start and snapshot".to_owned();
    // What the template's sandboxes inherit: the image's defaults under the
    // Dockerfile's, and the start command (the request's, the Dockerfile's
    // ENTRYPOINT/CMD, else the image's).
    let mut env = base.env.clone();
    env.extend(plan.env.clone());
    let start_argv = plan
        .start
        .clone()
        .or_else(|| (!base.start.is_empty()).then(|| base.start.clone()));
    let defaults = TemplateDefaults {
        env,
        workdir: Some(cwd_of(&plan.workdir)),
        user: plan.user.clone().or_else(|| base.user.clone()),
        start: start_argv.clone().unwrap_or_default(),
    };
    if let Some(argv) = &start_argv {
        job.log(&format!(
            "step {}/{}: start {}",
            job.row.steps_total,
            job.row.steps_total,
            shell_words(argv)
        ));
        job.flush(true).await;
        start(&mut client, &sb.id, argv, &defaults).await?;
    } else {
        job.log(&format!(
            "step {}/{}: snapshot (no start command)",
            job.row.steps_total, job.row.steps_total
        ));
    }
    if let Some(ready) = &spec.ready {
        let t = Instant::now();
        wait_ready(
            job,
            &mut client,
            &sb.id,
            ready,
            spec.ready_timeout,
            &defaults,
        )
        .await?;
        job.log(&format!("  ready in {:.1} s", t.elapsed().as_secs_f64()));
    }
    job.flush(true).await;
    let t = Instant::now();
    let template = job
        .ops
        .snapshot_with(&spec.team_id, &sb.id, &spec.name, Some(defaults))
        .await
        .map_err(|e| format!("snapshotting the template: {}", describe(e)))?;
    job.log(&format!(
        "  snapshot {} ({} MiB) in {:.1} s",
        template.build_id,
        template.size_bytes >> 20,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// An image's config as template defaults (`NAME=value` pairs to a map;
/// Entrypoint then Cmd as the start command).
fn image_defaults(c: &pb::ImageConfig) -> TemplateDefaults {
    TemplateDefaults {
        env: c
            .env
            .iter()
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        workdir: (!c.working_dir.is_empty()).then(|| c.working_dir.clone()),
        user: (!c.user.is_empty()).then(|| c.user.clone()),
        start: c.entrypoint.iter().chain(&c.cmd).cloned().collect(),
    }
}

/// An operation's error as the API would show it to the team.
fn describe(e: Error) -> String {
    crate::api::ApiError::from(e).body.message
}

fn failed(step: &Step, e: &str) -> String {
    format!("step (line {}) `{}` failed: {e}", step.line, step.text)
}

fn exit_failure(exit: &pb::ExitStatus) -> Option<String> {
    if exit.timed_out {
        return Some("timed out".to_owned());
    }
    match (exit.exit_code, exit.signal) {
        (Some(0), _) => None,
        (Some(c), _) => Some(format!("exited with code {c}")),
        (None, Some(s)) => Some(format!("was killed by signal {s}")),
        (None, None) => Some("ended without an exit status".to_owned()),
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[allow(clippy::too_many_arguments)]
async fn exec(
    job: &mut Job,
    client: &mut HostClient,
    sandbox: &str,
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: &str,
    user: &str,
    timeout: Duration,
) -> Result<pb::ExitStatus, String> {
    let req = pb::ExecRequest {
        sandbox_id: sandbox.to_owned(),
        cmd: argv[0].clone(),
        args: argv[1..].to_vec(),
        env: env.clone().into_iter().collect(),
        cwd: cwd.to_owned(),
        user: user.to_owned(),
        timeout_ms: timeout.as_millis() as u64,
        stdin: false,
        pty: None,
        background: false,
        tag: String::new(),
    };
    let mut stream = client
        .exec(req)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut pending = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.event {
                Some(pb::exec_event::Event::Stdout(b) | pb::exec_event::Event::Stderr(b)) => {
                    pending.extend_from_slice(&b);
                    // A step's output is the tenant's: a line that never
                    // ends is logged in pieces, never held whole.
                    let end = pending
                        .iter()
                        .rposition(|&c| c == b'\n')
                        .or((pending.len() > MAX_LINE).then(|| pending.len() - 1));
                    if let Some(end) = end {
                        let text = String::from_utf8_lossy(&pending[..=end]).into_owned();
                        for line in text.lines() {
                            job.log(&format!("  | {line}"));
                        }
                        pending.drain(..=end);
                        job.flush(false).await;
                    }
                }
                Some(pb::exec_event::Event::Exit(exit)) => {
                    if !pending.is_empty() {
                        job.log(&format!("  | {}", String::from_utf8_lossy(&pending)));
                    }
                    return Ok(exit);
                }
                _ => {}
            },
            Ok(None) => {
                return Err("the command's output stream ended without an exit status".to_owned());
            }
            Err(s) => return Err(s.message().to_owned()),
        }
    }
}

async fn make_dir(
    client: &mut HostClient,
    sandbox: &str,
    path: &str,
    user: &str,
) -> Result<(), String> {
    client
        .make_dir(pb::MakeDirRequest {
            sandbox_id: sandbox.to_owned(),
            path: path.to_owned(),
            user: user.to_owned(),
            mode: None,
            parents: true,
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("creating {path}: {}", s.message()))
}

async fn write(client: &mut HostClient, sandbox: &str, f: &CopyFile) -> Result<(), String> {
    let Some(data) = &f.data else {
        return make_dir(client, sandbox, &f.dest, "").await;
    };
    if let Some((parent, _)) = f.dest.rsplit_once('/')
        && !parent.is_empty()
    {
        make_dir(client, sandbox, parent, "").await?;
    }
    let header = pb::WriteFileRequest {
        part: Some(pb::write_file_request::Part::Header(pb::WriteFileHeader {
            sandbox_id: sandbox.to_owned(),
            path: f.dest.clone(),
            user: String::new(),
            mode: Some(f.mode),
        })),
    };
    let chunks: Vec<pb::WriteFileRequest> = data
        .chunks(256 * 1024)
        .map(|c| pb::WriteFileRequest {
            part: Some(pb::write_file_request::Part::Data(c.to_vec())),
        })
        .collect();
    let upload = futures::stream::iter(std::iter::once(header).chain(chunks));
    client
        .write_file(upload)
        .await
        .map(|_| ())
        .map_err(|s| format!("writing {}: {}", f.dest, s.message()))
}

const START_TAG: &str = "ember-start";

async fn start(
    client: &mut HostClient,
    sandbox: &str,
    argv: &[String],
    defaults: &TemplateDefaults,
) -> Result<(), String> {
    let req = pb::ExecRequest {
        sandbox_id: sandbox.to_owned(),
        cmd: argv[0].clone(),
        args: argv[1..].to_vec(),
        env: defaults.env.clone().into_iter().collect(),
        cwd: defaults.workdir.clone().unwrap_or_default(),
        user: defaults.user.clone().unwrap_or_default(),
        timeout_ms: 0,
        stdin: false,
        pty: None,
        background: true,
        tag: START_TAG.to_owned(),
    };
    let mut stream = client
        .exec(req)
        .await
        .map_err(|s| format!("starting {}: {}", shell_words(argv), s.message()))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(pb::ExecEvent {
                event: Some(pb::exec_event::Event::StartedPid(_)),
                ..
            })) => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) => return Err(format!("{} did not start", shell_words(argv))),
            Err(s) => return Err(format!("starting {}: {}", shell_words(argv), s.message())),
        }
    }
}

/// Poll the ready check every 250 ms until it passes, the start command
/// dies, or `timeout` passes.
async fn wait_ready(
    job: &mut Job,
    client: &mut HostClient,
    sandbox: &str,
    ready: &Ready,
    timeout: Duration,
    defaults: &TemplateDefaults,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let what = match ready {
        Ready::Port(p) => format!("port {p} accepts connections"),
        Ready::Command(c) => format!("`{c}` exits 0"),
    };
    job.log(&format!("  waiting until {what}"));
    job.flush(true).await;
    loop {
        let ok = match ready {
            Ready::Port(port) => {
                crate::ingress::tunnel::open(client, sandbox, *port, Duration::from_secs(5))
                    .await
                    .is_ok()
            }
            Ready::Command(c) => {
                let req = pb::ExecRequest {
                    sandbox_id: sandbox.to_owned(),
                    cmd: "/bin/sh".to_owned(),
                    args: vec!["-c".to_owned(), c.clone()],
                    env: defaults.env.clone().into_iter().collect(),
                    cwd: defaults.workdir.clone().unwrap_or_default(),
                    user: defaults.user.clone().unwrap_or_default(),
                    timeout_ms: 10_000,
                    ..Default::default()
                };
                match client.exec(req).await {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        let mut code = None;
                        while let Ok(Some(ev)) = s.message().await {
                            if let Some(pb::exec_event::Event::Exit(e)) = ev.event {
                                code = e.exit_code;
                            }
                        }
                        code == Some(0)
                    }
                    Err(_) => false,
                }
            }
        };
        if ok {
            return Ok(());
        }
        if let Some(exit) = start_exit(client, sandbox).await {
            return Err(format!(
                "the start command {} before {what}",
                exit_failure(&exit).unwrap_or_else(|| "exited (code 0)".to_owned())
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not ready after {} s: waited until {what}; raise ready_timeout_s or fix the start command",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The start command's exit status, if it has ended.
async fn start_exit(client: &mut HostClient, sandbox: &str) -> Option<pb::ExitStatus> {
    let list = client
        .list_processes(pb::SandboxRef {
            sandbox_id: sandbox.to_owned(),
        })
        .await
        .ok()?
        .into_inner();
    list.processes
        .into_iter()
        .find(|p| p.tag == START_TAG && !p.running)
        .and_then(|p| p.exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn copy_follows_dockers_rules() {
        let ctx = read_context(&tar(&[
            ("app.py", Some(b"print(1)")),
            ("lib/", None),
            ("lib/a.py", Some(b"a")),
            ("dist/x-1.whl", Some(b"w")),
            ("dist/y-1.whl", Some(b"v")),
        ]))
        .unwrap();
        let dests = |sources: &[&str], dest: &str| -> Vec<String> {
            let s: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
            plan_copy(&ctx, &s, dest, "/work")
                .unwrap()
                .into_iter()
                .map(|f| f.dest)
                .collect()
        };
        assert_eq!(dests(&["app.py"], "/srv/main.py"), ["/srv/main.py"]);
        assert_eq!(dests(&["app.py"], "/srv/"), ["/srv/app.py"]);
        assert_eq!(dests(&["app.py"], "rel/"), ["/work/rel/app.py"]);
        assert_eq!(dests(&["lib"], "/srv"), ["/srv/a.py"]);
        assert_eq!(
            dests(&["dist/*.whl"], "/tmp/"),
            ["/tmp/x-1.whl", "/tmp/y-1.whl"]
        );
        assert_eq!(
            dests(&["."], "/app"),
            [
                "/app/app.py",
                "/app/lib",
                "/app/lib/a.py",
                "/app/dist/x-1.whl",
                "/app/dist/y-1.whl"
            ]
        );
        let missing = plan_copy(&ctx, &["nope".into()], "/x", "/").unwrap_err();
        assert!(missing.contains("no such file"), "{missing}");
        let up = plan_copy(&ctx, &["../etc/passwd".into()], "/x", "/").unwrap_err();
        assert!(up.contains("cannot leave"), "{up}");
    }

    #[test]
    fn contexts_that_escape_are_refused_naming_the_entry() {
        // The tar crate refuses to *write* `..`; build the header by hand.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..12].copy_from_slice(b"../etc/x.txt");
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 512]);
        raw.extend_from_slice(&[0; 1024]);
        let e = read_context(&raw).unwrap_err();
        assert!(e.contains("../etc/x.txt") && e.contains(".."), "{e}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", "/etc/shadow").unwrap();
        let e = read_context(&b.into_inner().unwrap()).unwrap_err();
        assert!(e.contains("\"link\"") && e.contains("only files"), "{e}");
        assert!(
            read_context(
                b"not a tar at all, clearly, and long enough to be read as a header block"
            )
            .is_err()
        );
    }

    #[test]
    fn wildcards_stay_within_one_component() {
        assert!(wildcard("*.whl", "x-1.whl"));
        assert!(wildcard("dist/*.whl", "dist/x.whl"));
        assert!(!wildcard("*.whl", "dist/x.whl"));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("a?c", "a/c"));
    }
}
