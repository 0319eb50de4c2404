//! A real `ember server` process for tests (with its embedded host agent or
//! `--no-agent`), the database it runs on (a SQLite file or a fresh
//! PostgreSQL database), and a small REST client that speaks its JSON and
//! NDJSON.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

use super::agent::AgentHome;

pub const PG_ENV: &str = "EMBER_TEST_POSTGRES_URL";

/// The servers an ingress test runs in its sandbox (HTTP on 8000, TCP echo on 7000).
pub const INGRESS_GUEST_SERVER: &str = include_str!("../ingress/guest_server.py");

/// A database for one test: a SQLite file or a fresh PostgreSQL database.
pub struct TestDb {
    pub url: String,
    pg: Option<(String, String)>,
    pub dir: tempfile::TempDir,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        TestDb {
            url: format!("sqlite://{}", dir.path().join("control.db").display()),
            pg: None,
            dir,
        }
    }

    pub async fn postgres() -> TestDb {
        let admin = std::env::var(PG_ENV).unwrap();
        sqlx::any::install_default_drivers();
        let name = format!(
            "ember_t_{}",
            ember_types::SandboxId::new().as_str().replace('-', "_")
        );
        let mut conn = sqlx::AnyConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        let base = admin.rsplit_once('/').unwrap().0;
        TestDb {
            url: format!("{base}/{name}"),
            pg: Some((admin, name)),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::AnyConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Run a VM test body once per store: SQLite always, PostgreSQL when
/// `EMBER_TEST_POSTGRES_URL` is set (else it skips with the reason).
#[macro_export]
macro_rules! on_both_stores_with_vms {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite_root_vm() {
                require_vm!();
                super::runtime().block_on(super::$name($crate::support::server::TestDb::sqlite()));
            }

            #[test]
            fn postgres_root_vm() {
                require_vm!();
                ember_testkit::require!(
                    std::env::var($crate::support::server::PG_ENV).is_ok(),
                    "needs PostgreSQL: run scripts/postgres-test-db and source target/postgres-test.env ({})",
                    $crate::support::server::PG_ENV
                );
                let rt = super::runtime();
                let db = rt.block_on($crate::support::server::TestDb::postgres());
                rt.block_on(super::$name(db));
            }
        }
    )*};
}

/// How to start a server.
pub struct ServerSpec<'a> {
    pub db: &'a TestDb,
    /// Run the embedded host agent with this home's directories and network
    /// pool (its data directory is the server's); `None` = `--no-agent`.
    pub agent: Option<&'a AgentHome>,
    /// The cluster join token (`--join-token`); empty: none given.
    pub join_token: String,
    /// Lines of the `--config` TOML file (reconcile_interval_s = 1, …).
    pub config: Vec<String>,
    pub extra: Vec<String>,
    /// Serve the API over TLS with a certificate made for this test.
    pub tls: bool,
}

impl<'a> ServerSpec<'a> {
    pub fn new(db: &'a TestDb, agent: Option<&'a AgentHome>) -> ServerSpec<'a> {
        ServerSpec {
            db,
            agent,
            join_token: format!("emberjoin_test{}", rand::random::<u64>()),
            config: vec![
                "reconcile_interval_s = 1".into(),
                "ttl_interval_s = 1".into(),
            ],
            extra: Vec::new(),
            tls: false,
        }
    }

    /// Serve the API over TLS (`--tls-cert/--tls-key`) with a certificate
    /// for 127.0.0.1 made here; [`ServerProc::ca`] is the file clients trust.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn config(mut self, line: &str) -> Self {
        self.config.push(line.to_owned());
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_owned());
        self
    }

    fn data_dir(&self) -> PathBuf {
        match self.agent {
            Some(home) => home.data(),
            None => self.db.dir.path().join("server-data"),
        }
    }

    fn log_dir(&self) -> PathBuf {
        match self.agent {
            Some(home) => home.dir.path().to_path_buf(),
            None => self.db.dir.path().to_path_buf(),
        }
    }

    /// Start it and wait until it listens.
    pub fn start(&self) -> ServerProc {
        let config = self.log_dir().join("ember-server.toml");
        std::fs::write(&config, self.config.join("\n") + "\n").unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(["server", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(&self.db.url)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--config")
            .arg(&config);

        match self.agent {
            Some(home) => {
                cmd.args(home.agent_options());
            }
            None => {
                cmd.arg("--no-agent");
            }
        }
        let ca = self.tls.then(|| {
            let (cert, key) = test_certificate(&self.log_dir());
            cmd.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(key);
            cert
        });
        cmd.args(&self.extra)
            .env("EMBER_LOG", "info,ember_control=debug,ember_agent=debug")
            .env_remove("EMBER_DATA_DIR")
            .env_remove("EMBER_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The join token goes through the environment (argv is refused).
        if self.join_token.is_empty() {
            cmd.env_remove("EMBER_JOIN_TOKEN");
        } else {
            cmd.env("EMBER_JOIN_TOKEN", &self.join_token);
        }
        let mut child = cmd.spawn().expect("spawn ember server");
        let stderr = child.stderr.take().unwrap();
        let log_path = self.log_dir().join(format!("server-{}.log", child.id()));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = std::fs::File::create(&log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                let _ = tx.send(line);
            }
        });
        let mut admin_key = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        let base = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!(
                    "ember server did not start; log:\n{}",
                    logs_in(&self.log_dir())
                );
            };
            if let Some(path) = line.trim().strip_prefix("EMBER_ADMIN_KEY_FILE=") {
                admin_key = Some(
                    std::fs::read_to_string(path)
                        .expect("the admin key file the server named")
                        .trim()
                        .to_owned(),
                );
            }
            if let Some(addr) = line.strip_prefix("ember server: listening on ") {
                break addr.trim().to_owned();
            }
        };
        ServerProc {
            child: Some(child),
            base,
            admin_key,
            log_dir: self.log_dir(),
            ca,
        }
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost in `dir`:
/// (certificate, key) PEM files.
pub fn test_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let (cert, key) = (dir.join("api-cert.pem"), dir.join("api-key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

fn logs_in(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("server-") || name.starts_with("agent-") {
                out.push_str(&format!("--- {name}\n"));
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    out
}

/// A running `ember server`.
pub struct ServerProc {
    child: Option<Child>,
    pub base: String,
    /// Printed on the first start only.
    pub admin_key: Option<String>,
    log_dir: PathBuf,
    /// The certificate to trust when it serves TLS.
    pub ca: Option<PathBuf>,
}

impl ServerProc {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's process ID (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn api(&self, key: &str) -> Api {
        Api {
            base: self.base.clone(),
            key: key.to_owned(),
            http: self.client(),
        }
    }

    /// An HTTP client for this server (trusting its certificate).
    pub fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(300));
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    /// Everything the servers (and agents) of this test logged.
    pub fn logs(&self) -> String {
        logs_in(&self.log_dir)
    }

    /// SIGTERM and wait; the exit must be clean. VMs of the embedded agent
    /// keep running (the next start adopts them).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "ember server exited with {status}; log:\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

pub async fn call(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["code"], code, "{:?}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{:?}",
        got.1
    );
}

/// What an exec stream carried.
#[derive(Debug, Default)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    pub events: Vec<Value>,
}

impl ExecOutput {
    pub fn from_ndjson(text: &str) -> ExecOutput {
        let mut out = ExecOutput::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let ev: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not an NDJSON event: {line:?}: {e}"));
            match ev["type"].as_str() {
                Some("stdout") => out.stdout.push_str(ev["text"].as_str().unwrap_or("")),
                Some("stderr") => out.stderr.push_str(ev["text"].as_str().unwrap_or("")),
                Some("exit") => out.exit_code = ev["exit_code"].as_i64().map(|c| c as i32),
                Some("error") => panic!("the stream broke: {ev}"),
                _ => {}
            }
            out.events.push(ev);
        }
        out
    }
}

/// A REST client holding one key (or access token).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        call(self.http.get(self.url(path)).bearer_auth(&self.key)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        call(self.http.delete(self.url(path)).bearer_auth(&self.key)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        call(
            self.http
                .post(self.url(path))
                .bearer_auth(&self.key)
                .json(&body),
        )
        .await
    }

    /// POST without a body.
    pub async fn post_empty(&self, path: &str) -> (StatusCode, Value) {
        call(self.http.post(self.url(path)).bearer_auth(&self.key)).await
    }

    /// Create a sandbox; panics unless 201.
    pub async fn create(&self, body: Value) -> Value {
        let (st, sb) = self.post("/v1/sandboxes", body.clone()).await;
        assert_eq!(st, StatusCode::CREATED, "create {body}: {sb}");
        assert_eq!(sb["state"], "running", "{sb}");
        sb
    }

    pub async fn sandbox(&self, id: &str) -> Value {
        let (st, sb) = self.get(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{sb}");
        sb
    }

    /// Run a command to its end through the NDJSON exec stream.
    pub async fn exec(&self, id: &str, body: Value) -> ExecOutput {
        let resp = self
            .http
            .post(self.url(&format!("/v1/sandboxes/{id}/exec")))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = resp.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "exec {body}: {text}");
        assert_eq!(ct, "application/x-ndjson", "{text}");
        ExecOutput::from_ndjson(&text)
    }

    pub async fn sh(&self, id: &str, script: &str) -> ExecOutput {
        self.exec(id, json!({"cmd": "sh", "args": ["-c", script]}))
            .await
    }

    /// Poll until the sandbox is in `state` (panics after `within`).
    pub async fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let sb = self.sandbox(id).await;
            if sb["state"] == state {
                return sb;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox {id} is {} after {within:?}, not {state}: {sb}",
                sb["state"]
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A team and a key for it (needs an admin key).
    pub async fn team_with_key(&self, name: &str) -> (String, String) {
        let (st, team) = self.post("/v1/teams", json!({"name": name})).await;
        assert_eq!(st, StatusCode::CREATED, "{team}");
        let team_id = team["id"].as_str().unwrap().to_owned();
        let (st, key) = self
            .post("/v1/keys", json!({"name": "k", "team_id": team_id}))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{key}");
        (team_id, key["key"].as_str().unwrap().to_owned())
    }

    /// Poll `GET /v1/hosts` until `n` hosts are healthy; returns them.
    pub async fn wait_healthy_hosts(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let (st, hosts) = self.get("/v1/hosts").await;
            assert_eq!(st, StatusCode::OK, "{hosts}");
            let list = hosts["hosts"].as_array().cloned().unwrap_or_default();
            if list.iter().filter(|h| h["healthy"] == true).count() == n {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "{n} healthy hosts expected: {hosts}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Start `tests/ingress/guest_server.py` in sandbox `id` and wait until
    /// its port 8000 answers through the ingress proxy (with `token`).
    pub async fn start_ingress_test_servers(&self, id: &str, token: &str) {
        let resp = self
            .http
            .put(self.url(&format!(
                "/v1/sandboxes/{id}/files?path=/tmp/guest_server.py"
            )))
            .bearer_auth(&self.key)
            .body(INGRESS_GUEST_SERVER)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let (st, started) = self
            .post(
                &format!("/v1/sandboxes/{id}/exec"),
                json!({"cmd": "python3", "args": ["/tmp/guest_server.py"], "background": true}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{started}");
        assert!(started["pid"].as_u64().is_some(), "{started}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let resp = self
                .http
                .get(self.url(&format!("/v1/sandboxes/{id}/ports/8000/hello")))
                .header("x-ember-traffic-token", token)
                .send()
                .await
                .unwrap();
            if resp.status() == StatusCode::OK {
                return;
            }
            assert_eq!(
                resp.status(),
                StatusCode::BAD_GATEWAY,
                "{:?}",
                resp.text().await
            );
            assert!(
                Instant::now() < deadline,
                "the guest's server never listened"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `/metrics` as text (this must be a key of an admin team).
    pub async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }
}

/// The value of one Prometheus sample line `name{labels} value` (exact
/// series text before the value), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

/// Milliseconds since the epoch of an RFC 3339 field of a JSON object.
pub fn ms(v: &Value, field: &str) -> i64 {
    let s = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing: {v}"));
    ember_control::model::parse_rfc3339(s).unwrap_or_else(|| panic!("{field} = {s:?}"))
}
