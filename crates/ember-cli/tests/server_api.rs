//! REST API tests over real HTTP against a real `ember server` process, on
//! SQLite and on PostgreSQL: everything that does not need a host agent
//! (auth, validation, errors, scoping, keys and teams, capacity errors).
//!
//! Where a test needs a sandbox to exist it writes the row through the
//! store, as a create would have; no host agent is faked.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ember_control::model::{Host, NetworkPolicy, OnTimeout, Sandbox, SandboxState, now_ms};
use ember_control::store::Store;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

const PG_ENV: &str = "EMBER_TEST_POSTGRES_URL";

/// A database for one test: a SQLite file or a fresh PostgreSQL database.
struct TestDb {
    url: String,
    pg: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl TestDb {
    fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        TestDb {
            url: format!("sqlite://{}", dir.path().join("control.db").display()),
            pg: None,
            dir,
        }
    }

    async fn postgres() -> TestDb {
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

/// A first-start secret from the file the server named, which only its
/// owner may read.
fn read_secret(path: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{path} must be private to its owner");
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

/// A running `ember server`.
struct Server {
    child: Child,
    base: String,
    admin_key: Option<String>,
    join_token: Option<String>,
    log: mpsc::Receiver<String>,
    /// What it printed until it listened.
    startup_log: Vec<String>,
}

impl Server {
    fn start(db: &TestDb, extra: &[&str]) -> Server {
        Server::start_with_env(db, extra, &[])
    }

    fn start_with_env(db: &TestDb, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args([
                "server",
                "--no-agent",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &db.url,
            ])
            .arg("--data-dir")
            .arg(db.dir.path())
            .args(extra)
            .env("EMBER_LOG", "info")
            .env_remove("EMBER_JOIN_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut admin_key = None;
        let mut join_token = None;
        let mut startup_log = Vec::new();
        let base = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("ember server did not report its address within 60 s");
            startup_log.push(line.clone());
            if let Some(path) = line.trim().strip_prefix("EMBER_ADMIN_KEY_FILE=") {
                admin_key = Some(read_secret(path));
            }
            if let Some(path) = line.trim().strip_prefix("EMBER_JOIN_TOKEN_FILE=") {
                join_token = Some(read_secret(path));
            }
            if let Some(addr) = line.strip_prefix("ember server: listening on ") {
                break addr.trim().to_owned();
            }
        };
        Server {
            child,
            base,
            admin_key,
            join_token,
            log: rx,
            startup_log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM and wait; the exit must be clean.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        let log: Vec<String> = self.log.try_iter().collect();
        assert!(
            status.success(),
            "ember server exited with {status}; log:\n{}",
            log.join("\n")
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn call(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
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

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["code"], code, "{:?}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{:?}",
        got.1
    );
}

fn create_body() -> Value {
    json!({"template": "base", "timeout_s": 60})
}

/// A team and a key for it, made through the API with the admin key.
async fn team_with_key(s: &Server, name: &str) -> (String, String) {
    let c = client();
    let admin = s.admin_key.as_deref().unwrap();
    let (st, team) = call(
        c.post(s.url("/v1/teams"))
            .bearer_auth(admin)
            .json(&json!({"name": name})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{team}");
    let team_id = team["id"].as_str().unwrap().to_owned();
    let (st, key) = call(
        c.post(s.url("/v1/keys"))
            .bearer_auth(admin)
            .json(&json!({"name": "k", "team_id": team_id})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{key}");
    assert_eq!(key["team_id"], team_id.as_str());
    (team_id, key["key"].as_str().unwrap().to_owned())
}

/// Write a sandbox row as a create would have (with a host row for it).
async fn insert_sandbox(
    db: &TestDb,
    team_id: &str,
    state: SandboxState,
    access_token: &str,
    metadata: &[(&str, &str)],
) -> String {
    let id = ember_types::SandboxId::new().to_string();
    insert_sandbox_with_id(db, &id, team_id, state, access_token, metadata).await;
    id
}

async fn insert_sandbox_with_id(
    db: &TestDb,
    id: &str,
    team_id: &str,
    state: SandboxState,
    access_token: &str,
    metadata: &[(&str, &str)],
) {
    let store = Store::open(&db.url).await.unwrap();
    store
        .upsert_host(&Host {
            id: "host-test".into(),
            address: "http://127.0.0.1:9".into(),
            backend: "qemu".into(),
            version: "0".into(),
            vcpus_total: 2,
            memory_mib_total: 2048,
            healthy: false,
            last_error: None,
            registered_at: now_ms(),
            last_seen_at: None,
        })
        .await
        .unwrap();
    let now = now_ms();
    let sb = Sandbox {
        id: id.to_owned(),
        team_id: team_id.into(),
        state,
        host_id: Some("host-test".into()),
        template: "base".into(),
        source_build_id: None,
        build_id: None,
        vcpus: 1,
        memory_mib: 512,
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        env: BTreeMap::from([("API_SECRET".into(), "hunter2".into())]),
        network: NetworkPolicy::default(),
        timeout_s: 60,
        on_timeout: OnTimeout::Kill,
        expires_at: None,
        access_token_sha256: ember_control::auth::sha256_hex(access_token),
        failure_reason: None,
        created_at: now,
        state_changed_at: now,
        destroyed_at: None,
        last_operation: None,
        ingress: Default::default(),
    };
    assert!(store.insert_sandbox(&sb, None).await.unwrap());
    store.close().await;
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::TestDb::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                ember_testkit::require!(
                    std::env::var(super::PG_ENV).is_ok(),
                    "needs PostgreSQL: run scripts/postgres-test-db and source target/postgres-test.env ({})",
                    super::PG_ENV
                );
                super::$name(super::TestDb::postgres().await).await;
            }
        }
    )*};
}

on_both_stores!(
    first_start_prints_an_admin_key_once_and_restarts_cleanly,
    requests_without_a_valid_key_are_401,
    bad_bodies_are_rejected_naming_the_field,
    invalid_values_are_400_naming_the_field,
    create_without_any_host_is_503_no_capacity,
    unknown_ids_are_404_everywhere,
    another_teams_sandbox_is_404_never_403,
    access_tokens_open_only_their_own_sandboxes_guest_endpoints,
    state_conflicts_are_409_naming_the_state,
    file_paths_must_be_absolute,
    listing_filters_and_paginates_over_http,
    keys_and_teams_endpoints,
    host_registration_needs_the_join_token,
    health_and_metrics,
    racing_transitions_have_exactly_one_winner,
    team_quotas_refuse_naming_the_limit,
    the_storage_quota_refuses_pauses_and_snapshots,
    audit_entries_past_their_retention_are_deleted,
    key_roles_and_expiry_are_enforced_and_changes_audited,
    rate_limits_answer_429_with_retry_after,
    lifetime_limits_end_long_runs_and_old_pauses,
    the_api_over_tls_serves_clients_that_trust_it,
);

/// `--tls-cert/--tls-key`: the API answers HTTPS to clients that trust the
/// certificate (reqwest, curl, the CLI with `--ca`), refuses plain HTTP on
/// the same port, and a client that does not trust it gets a TLS error
/// that names the problem, not an answer.
async fn the_api_over_tls_serves_clients_that_trust_it(db: TestDb) {
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = db.dir.path().join("api.crt");
    let key = db.dir.path().join("api.key");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let s = Server::start(
        &db,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(s.base.starts_with("https://127.0.0.1:"), "{}", s.base);
    let admin = s.admin_key.clone().unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let (st, health) = call(trusting.get(s.url("/healthz"))).await;
    assert_eq!(st, StatusCode::OK, "{health}");
    let (st, _) = call(trusting.get(s.url("/v1/teams")).bearer_auth(&admin)).await;
    assert_eq!(st, StatusCode::OK);

    // Plain HTTP to the TLS port: no answer.
    let plain = s.base.replacen("https://", "http://", 1);
    let got = client().get(format!("{plain}/healthz")).send().await;
    assert!(got.is_err(), "plain HTTP was answered: {got:?}");
    // A client that does not trust the certificate.
    let got = client().get(s.url("/healthz")).send().await;
    let err = format!(
        "{:?}",
        got.expect_err("an untrusted certificate was accepted")
    );
    assert!(
        err.contains("certificate") || err.contains("Certificate"),
        "{err}"
    );

    // curl, trusting it.
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&cert)
        .arg(s.url("/healthz"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\""));

    // The CLI, with --ca and without.
    let cli = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["host", "list", "--api-url", &s.base])
            .args(extra)
            .env("EMBER_API_KEY", &admin)
            .env_remove("EMBER_CA")
            .env("XDG_CONFIG_HOME", db.dir.path())
            .output()
            .unwrap()
    };
    let out = cli(&["--ca", cert.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ID"));
    let out = cli(&[]);
    assert!(!out.status.success(), "an untrusted server was used");
    let missing = cli(&["--ca", "/nonexistent/ca.pem"]);
    let err = String::from_utf8_lossy(&missing.stderr).into_owned();
    assert!(err.contains("--ca /nonexistent/ca.pem"), "{err}");
    s.stop();
}

async fn first_start_prints_an_admin_key_once_and_restarts_cleanly(db: TestDb) {
    let s = Server::start(&db, &[]);
    let key = s
        .admin_key
        .clone()
        .expect("first start writes an admin key");
    assert!(key.starts_with("ember_"), "{key}");
    assert!(s.join_token.is_some(), "first start writes the join token");
    let log = &s.startup_log;
    assert!(
        log.iter().any(|l| l.contains("EMBER_ADMIN_KEY_FILE=")),
        "{log:?}"
    );
    let token = s.join_token.as_deref().unwrap();
    assert!(
        log.iter().all(|l| !l.contains(&key) && !l.contains(token)),
        "first-start secrets are never printed: {log:?}"
    );
    let (st, _) = call(client().get(s.url("/v1/teams")).bearer_auth(&key)).await;
    assert_eq!(st, StatusCode::OK);
    s.stop();
    let s = Server::start(&db, &[]);
    assert_eq!(
        s.admin_key, None,
        "the admin key is made only on the first start"
    );
    assert_eq!(
        s.join_token, None,
        "the join token is written only when generated"
    );
    let (st, teams) = call(client().get(s.url("/v1/teams")).bearer_auth(&key)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(teams["teams"][0]["name"], "default");
    assert_eq!(teams["teams"][0]["admin"], true);
    s.stop();
}

async fn requests_without_a_valid_key_are_401(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let resp = c.get(s.url("/v1/sandboxes")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    for bad in [
        "nonsense",
        "ember_abcdefgh_0123456789012345678901234567890123456789",
        &format!("{}x", s.admin_key.as_deref().unwrap()),
    ] {
        assert_error(
            &call(c.get(s.url("/v1/sandboxes")).bearer_auth(bad)).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
    }
    // A valid prefix with the wrong secret.
    let admin = s.admin_key.clone().unwrap();
    let mut forged = admin[..15].to_owned();
    forged.push_str(&"A".repeat(40));
    assert_error(
        &call(c.get(s.url("/v1/sandboxes")).bearer_auth(&forged)).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &call(
            c.get(s.url("/v1/sandboxes"))
                .header("authorization", format!("Basic {admin}")),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &call(c.post(s.url("/v1/sandboxes")).json(&create_body())).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    s.stop();
}

async fn bad_bodies_are_rejected_naming_the_field(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let key = s.admin_key.clone().unwrap();
    let post = |body: String| {
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
    };
    assert_error(
        &call(post("{\"template\": ".into())).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &call(post("{\"template\" \"base\"}".into())).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    // Valid JSON of the wrong shape is a data error, not a syntax error.
    assert_error(
        &call(post("[1, 2]".into())).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let unknown = call(post(
        json!({"template": "base", "timeout_s": 60, "vcpu": 2}).to_string(),
    ))
    .await;
    assert_error(&unknown, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(unknown.1["field"], "vcpu", "{:?}", unknown.1);
    let nested = call(post(
        json!({"template": "base", "timeout_s": 60, "network": {"allow": []}}).to_string(),
    ))
    .await;
    assert_error(&nested, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(nested.1["field"], "network.allow", "{:?}", nested.1);
    let missing = call(post(json!({"template": "base"}).to_string())).await;
    assert_eq!(missing.1["field"], "timeout_s", "{:?}", missing.1);
    let wrong_type = call(post(
        json!({"template": "base", "timeout_s": "60"}).to_string(),
    ))
    .await;
    assert_error(&wrong_type, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(wrong_type.1["field"], "timeout_s", "{:?}", wrong_type.1);
    let bad_enum = call(post(
        json!({"template": "base", "timeout_s": 60, "on_timeout": "explode"}).to_string(),
    ))
    .await;
    assert_eq!(bad_enum.1["field"], "on_timeout", "{:?}", bad_enum.1);
    // Not JSON at all.
    let plain = call(
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(&key)
            .body("template=base"),
    )
    .await;
    assert_error(
        &plain,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // A huge body is refused before it is parsed.
    let huge = format!(
        "{{\"template\": \"base\", \"timeout_s\": 60, \"metadata\": {{\"x\": \"{}\"}}}}",
        "a".repeat(2 << 20)
    );
    // Its own connection: the server answers without reading the rest of the
    // body and then closes the connection, which a pooled client would reuse.
    let alone = client()
        .post(s.url("/v1/sandboxes"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(huge);
    assert_error(
        &call(alone).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // Same rules on other endpoints.
    let k = call(
        c.post(s.url("/v1/keys"))
            .bearer_auth(&key)
            .json(&json!({"name": "x", "admin": true})),
    )
    .await;
    assert_eq!(k.1["field"], "admin", "{:?}", k.1);
    s.stop();
}

async fn invalid_values_are_400_naming_the_field(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let key = s.admin_key.clone().unwrap();
    for (body, field) in [
        (
            json!({"template": "base", "timeout_s": 60, "vcpus": 0}),
            "vcpus",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "vcpus": 1000}),
            "vcpus",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "memory_mib": 16}),
            "memory_mib",
        ),
        (json!({"template": "base", "timeout_s": 0}), "timeout_s"),
        (
            json!({"template": "base", "timeout_s": 999999}),
            "timeout_s",
        ),
        (
            json!({"template": "Not A Name", "timeout_s": 60}),
            "template",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "env": {"1BAD": "x"}}),
            "env.1BAD",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "metadata": {"a=b": "x"}}),
            "metadata",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "network": {"allow_out": ["10.0.0.0/8", "nope"]}}),
            "network.allow_out[1]",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "network": {"deny_out": ["10.0.0.0/40"]}}),
            "network.deny_out[0]",
        ),
        // What no host could apply is refused here, before anything is placed.
        (
            json!({"template": "base", "timeout_s": 60, "network": {"deny_out": ["::/0"]}}),
            "network.deny_out[0]",
        ),
        (
            json!({"template": "base", "timeout_s": 60, "network": {"allow_out": ["10.1.0.0/8"]}}),
            "network.allow_out[0]",
        ),
        (
            json!({"template": "base", "timeout_s": 60,
                   "network": {"allow_out": (0..65).map(|i| format!("10.0.{i}.0/24")).collect::<Vec<_>>()}}),
            "network.allow_out",
        ),
    ] {
        let got = call(c.post(s.url("/v1/sandboxes")).bearer_auth(&key).json(&body)).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(got.1["field"], field, "{body}: {:?}", got.1);
    }
    for (query, field) in [
        ("state=sleeping", "state"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("page_token=zzz", "page_token"),
        ("colour=red", "colour"),
    ] {
        let got = call(
            c.get(s.url(&format!("/v1/sandboxes?{query}")))
                .bearer_auth(&key),
        )
        .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(got.1["field"], field, "{query}: {:?}", got.1);
    }
    let got = call(
        c.post(s.url("/v1/teams"))
            .bearer_auth(&key)
            .json(&json!({"name": "../etc"})),
    )
    .await;
    assert_eq!(got.1["field"], "name", "{:?}", got.1);
    // Exec requests are checked before the sandbox is even looked up.
    let ghost = ember_types::SandboxId::new();
    for (body, field) in [
        (json!({"cmd": "ls", "args": ["a\0b"]}), "args[0]"),
        (json!({"cmd": "ls", "env": {"NO-DASH": "1"}}), "env.NO-DASH"),
        (json!({"cmd": "ls", "tag": "x\ny"}), "tag"),
        (json!({"cmd": "ls", "user": "root; rm"}), "user"),
    ] {
        let got = call(
            c.post(s.url(&format!("/v1/sandboxes/{ghost}/exec")))
                .bearer_auth(&key)
                .json(&body),
        )
        .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(got.1["field"], field, "{body}: {:?}", got.1);
    }
    s.stop();
}

async fn team_quotas_refuse_naming_the_limit(db: TestDb) {
    let config = db.dir.path().join("limits.toml");
    std::fs::write(
        &config,
        "[team_limits]\nrunning_sandboxes = 2\npaused_sandboxes = 1\n",
    )
    .unwrap();
    let s = Server::start(&db, &["--config", config.to_str().unwrap()]);
    let c = client();
    let (team, key) = team_with_key(&s, "quota").await;
    let (_, other_key) = team_with_key(&s, "other").await;
    let running = insert_sandbox(&db, &team, SandboxState::Running, "t1", &[]).await;
    insert_sandbox(&db, &team, SandboxState::Running, "t2", &[]).await;
    let paused = insert_sandbox(&db, &team, SandboxState::Paused, "t3", &[]).await;

    // A third running sandbox: refused, naming the limit, nothing placed.
    let got = call(
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(&key)
            .json(&create_body()),
    )
    .await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    let msg = got.1["message"].as_str().unwrap();
    assert!(
        msg.contains("running sandboxes would be 3 of at most 2"),
        "{msg}"
    );
    assert!(msg.contains("team_limits.running_sandboxes"), "{msg}");
    let (_, list) = call(
        c.get(s.url("/v1/sandboxes?state=creating,failed"))
            .bearer_auth(&key),
    )
    .await;
    assert_eq!(list["sandboxes"], json!([]), "nothing placed");
    // Resuming is running one more too.
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{paused}/resume")))
            .bearer_auth(&key),
    )
    .await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    // A second paused one is over paused_sandboxes; the sandbox runs on.
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{running}/pause")))
            .bearer_auth(&key),
    )
    .await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap()
            .contains("paused_sandboxes"),
        "{:?}",
        got.1
    );
    let (_, sb) = call(
        c.get(s.url(&format!("/v1/sandboxes/{running}")))
            .bearer_auth(&key),
    )
    .await;
    assert_eq!(sb["state"], "running");
    // Another team's use is its own: it meets the hosts (none here), not a quota.
    let got = call(
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(&other_key)
            .json(&create_body()),
    )
    .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    // E2B's API says the same with its own status.
    let (st, body) = call(
        c.post(s.url("/sandboxes"))
            .header("x-api-key", &key)
            .json(&json!({"templateID": "base"})),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // Usage against the limits: the team's own, `me`, or any team for an admin.
    let (st, usage) = call(c.get(s.url("/v1/teams/me/usage")).bearer_auth(&key)).await;
    assert_eq!(st, StatusCode::OK, "{usage}");
    assert_eq!(usage["team_id"], team.as_str());
    assert_eq!(usage["running_sandboxes"]["limit"], 2, "{usage}");
    assert_eq!(usage["paused_sandboxes"]["limit"], 1, "{usage}");
    assert!(
        usage["vcpus"].get("limit").is_none(),
        "no vCPU limit: {usage}"
    );
    assert!(
        usage["running_sandboxes"]["used"].as_u64().unwrap() >= 1,
        "{usage}"
    );
    let (st, by_id) = call(
        c.get(s.url(&format!("/v1/teams/{team}/usage")))
            .bearer_auth(s.admin_key.as_deref().unwrap()),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(by_id["paused_sandboxes"], usage["paused_sandboxes"]);
    assert_error(
        &call(
            c.get(s.url(&format!("/v1/teams/{team}/usage")))
                .bearer_auth(&other_key),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    s.stop();
}

/// `storage_mib` bounds the snapshots a team holds: once its paused
/// sandboxes' and templates' builds reach it, a pause or a snapshot is
/// refused naming the limit, and the sandbox runs on.
async fn the_storage_quota_refuses_pauses_and_snapshots(db: TestDb) {
    let config = db.dir.path().join("limits.toml");
    std::fs::write(&config, "[team_limits]\nstorage_mib = 2\n").unwrap();
    let s = Server::start(&db, &["--config", config.to_str().unwrap()]);
    let c = client();
    let (team, key) = team_with_key(&s, "storage").await;
    let running = insert_sandbox(&db, &team, SandboxState::Running, "t1", &[]).await;
    let (st, usage) = call(c.get(s.url("/v1/teams/me/usage")).bearer_auth(&key)).await;
    assert_eq!(st, StatusCode::OK, "{usage}");
    assert_eq!(usage["storage_mib"], json!({"used": 0, "limit": 2}));
    // A paused sandbox holding a 3 MiB build puts the team over it.
    let paused = insert_sandbox(&db, &team, SandboxState::Paused, "t2", &[]).await;
    let store = Store::open(&db.url).await.unwrap();
    let build = ember_control::model::Build {
        id: ember_types::BuildId::new().to_string(),
        team_id: team.clone(),
        host_id: "host-test".into(),
        kind: ember_control::model::BuildKind::Pause,
        source_sandbox_id: Some(paused.clone()),
        vcpus: 1,
        memory_mib: 512,
        stored_bytes: 3 << 20,
        created_at: now_ms(),
        released_at: None,
    };
    store.insert_build(&build).await.unwrap();
    sqlx::query("UPDATE sandboxes SET build_id = $1 WHERE id = $2")
        .bind(&build.id)
        .bind(&paused)
        .execute(&mut sqlx::AnyConnection::connect(&db.url).await.unwrap())
        .await
        .unwrap();
    store.close().await;
    let (_, usage) = call(c.get(s.url("/v1/teams/me/usage")).bearer_auth(&key)).await;
    assert_eq!(usage["storage_mib"], json!({"used": 3, "limit": 2}));
    for (path, body) in [
        (format!("/v1/sandboxes/{running}/pause"), json!({})),
        (
            format!("/v1/sandboxes/{running}/snapshots"),
            json!({"name": "kept"}),
        ),
    ] {
        let got = call(c.post(s.url(&path)).bearer_auth(&key).json(&body)).await;
        assert_error(&got, StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
        let msg = got.1["message"].as_str().unwrap();
        assert!(msg.contains("team_limits.storage_mib"), "{path}: {msg}");
        assert!(msg.contains("would be 3 of at most 2"), "{path}: {msg}");
    }
    let (_, sb) = call(
        c.get(s.url(&format!("/v1/sandboxes/{running}")))
            .bearer_auth(&key),
    )
    .await;
    assert_eq!(sb["state"], "running", "refused before anything changed");
    s.stop();
}

/// `audit_retention_s` bounds the audit log: entries go once that old.
async fn audit_entries_past_their_retention_are_deleted(db: TestDb) {
    let config = db.dir.path().join("audit.toml");
    std::fs::write(&config, "audit_retention_s = 2\n").unwrap();
    let s = Server::start(&db, &["--config", config.to_str().unwrap()]);
    let admin = s.admin_key.clone().unwrap();
    let c = client();
    let (st, team) = call(
        c.post(s.url("/v1/teams"))
            .bearer_auth(&admin)
            .json(&json!({"name": "audited"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{team}");
    let (_, log) = call(c.get(s.url("/v1/audit")).bearer_auth(&admin)).await;
    let entries = log["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["route"] == "/v1/teams"),
        "recorded first: {log}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, log) = call(c.get(s.url("/v1/audit")).bearer_auth(&admin)).await;
        if log["entries"] == json!([]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still kept after its retention: {log}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.stop();
}

async fn create_without_any_host_is_503_no_capacity(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let key = s.admin_key.clone().unwrap();
    let got = call(
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(&key)
            .json(&create_body()),
    )
    .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    // Nothing was left behind by the refused create.
    let (st, list) = call(
        c.get(s.url("/v1/sandboxes?state=creating,failed,destroyed"))
            .bearer_auth(&key),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["sandboxes"], json!([]));
    // An unknown template is 404 naming the field, before capacity is considered.
    let got = call(
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(&key)
            .json(&json!({"template": "nope", "timeout_s": 60})),
    )
    .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(got.1["field"], "template");
    s.stop();
}

async fn unknown_ids_are_404_everywhere(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let key = s.admin_key.clone().unwrap();
    let id = ember_types::SandboxId::new().to_string();
    let checks = [
        c.get(s.url(&format!("/v1/sandboxes/{id}"))),
        c.delete(s.url(&format!("/v1/sandboxes/{id}"))),
        c.post(s.url(&format!("/v1/sandboxes/{id}/pause"))),
        c.post(s.url(&format!("/v1/sandboxes/{id}/resume"))),
        c.post(s.url(&format!("/v1/sandboxes/{id}/timeout")))
            .json(&json!({"timeout_s": 30})),
        c.post(s.url(&format!("/v1/sandboxes/{id}/snapshots")))
            .json(&json!({"name": "x"})),
        c.post(s.url(&format!("/v1/sandboxes/{id}/exec")))
            .json(&json!({"cmd": "true"})),
        c.get(s.url(&format!("/v1/sandboxes/{id}/processes"))),
        c.get(s.url(&format!("/v1/sandboxes/{id}/files?path=/etc/hosts"))),
        c.get(s.url(&format!("/v1/sandboxes/{id}/files/stat?path=/"))),
        c.get(s.url("/v1/sandboxes/not-an-id")),
        c.get(s.url("/v1/sandboxes/..%2F..%2Fetc")),
        c.get(s.url("/v1/snapshots/nope")),
        c.delete(s.url("/v1/snapshots/nope")),
        c.delete(s.url("/v1/keys/zzzzzzzz")),
        c.get(s.url("/v1/no-such-endpoint")),
    ];
    for req in checks {
        let req = req.bearer_auth(&key);
        let desc = format!(
            "{:?}",
            req.try_clone().unwrap().build().unwrap().url().path()
        );
        let got = call(req).await;
        assert_eq!(got.0, StatusCode::NOT_FOUND, "{desc}: {:?}", got.1);
        assert_eq!(got.1["code"], "not_found", "{desc}: {:?}", got.1);
    }
    s.stop();
}

async fn another_teams_sandbox_is_404_never_403(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    let (_team_b, key_b) = team_with_key(&s, "beta").await;
    let id = insert_sandbox(
        &db,
        &team_a,
        SandboxState::Paused,
        "unused",
        &[("owner", "alice")],
    )
    .await;

    let (st, own) = call(
        c.get(s.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(own["id"], id.as_str());
    assert!(own.get("env").is_none(), "env is never returned");
    assert!(
        own.get("access_token").is_none(),
        "the access token is shown only on create"
    );

    for req in [
        c.get(s.url(&format!("/v1/sandboxes/{id}"))),
        c.delete(s.url(&format!("/v1/sandboxes/{id}"))),
        c.post(s.url(&format!("/v1/sandboxes/{id}/pause"))),
        c.post(s.url(&format!("/v1/sandboxes/{id}/resume"))),
        c.post(s.url(&format!("/v1/sandboxes/{id}/timeout")))
            .json(&json!({"timeout_s": 30})),
        c.post(s.url(&format!("/v1/sandboxes/{id}/snapshots")))
            .json(&json!({"name": "stolen"})),
        c.post(s.url(&format!("/v1/sandboxes/{id}/exec")))
            .json(&json!({"cmd": "true"})),
        c.get(s.url(&format!("/v1/sandboxes/{id}/files?path=/etc/hosts"))),
        c.get(s.url(&format!("/v1/sandboxes/{id}/processes"))),
    ] {
        let got = call(req.bearer_auth(&key_b)).await;
        assert_eq!(got.0, StatusCode::NOT_FOUND, "{:?}", got.1);
        assert!(
            !got.1.to_string().contains("alice"),
            "no data of the other team leaks: {:?}",
            got.1
        );
    }
    let (st, list) = call(
        c.get(s.url("/v1/sandboxes?metadata.owner=alice"))
            .bearer_auth(&key_b),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["sandboxes"], json!([]));
    // And the row is untouched by all of that.
    let (_, still) = call(
        c.get(s.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_eq!(still["state"], "paused");
    s.stop();
}

async fn access_tokens_open_only_their_own_sandboxes_guest_endpoints(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let (team_a, _key_a) = team_with_key(&s, "alpha").await;
    let real = ember_types::SandboxId::new().to_string();
    // Not derived from this server's key: accepted by its stored digest,
    // as a token minted before tokens were derived is.
    let token = ember_control::auth::access_token(b"not the server's key", &real);
    insert_sandbox_with_id(&db, &real, &team_a, SandboxState::Paused, &token, &[]).await;
    let other = insert_sandbox(&db, &team_a, SandboxState::Paused, "x", &[]).await;

    // Its own guest endpoints: authenticated (the paused sandbox then answers 409).
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{real}/exec")))
            .bearer_auth(&token)
            .json(&json!({"cmd": "true"})),
    )
    .await;
    assert_error(&got, StatusCode::CONFLICT, "conflict");
    let got = call(
        c.get(s.url(&format!("/v1/sandboxes/{real}/files/list?path=/")))
            .bearer_auth(&token),
    )
    .await;
    assert_error(&got, StatusCode::CONFLICT, "conflict");
    // Anything else: forbidden.
    for req in [
        c.get(s.url(&format!("/v1/sandboxes/{real}"))),
        c.delete(s.url(&format!("/v1/sandboxes/{real}"))),
        c.post(s.url(&format!("/v1/sandboxes/{real}/resume"))),
        c.get(s.url("/v1/sandboxes")),
        c.get(s.url("/v1/keys")),
        c.post(s.url(&format!("/v1/sandboxes/{other}/exec")))
            .json(&json!({"cmd": "true"})),
        c.post(s.url(&format!(
            "/v1/sandboxes/{}/exec",
            ember_types::SandboxId::new()
        )))
        .json(&json!({"cmd": "true"})),
    ] {
        assert_error(
            &call(req.bearer_auth(&token)).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
    }
    // A token with the right shape but the wrong secret is not a credential.
    let forged = format!(
        "{}{real}_{}",
        ember_control::auth::ACCESS_TOKEN_PREFIX,
        "B".repeat(40)
    );
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{real}/exec")))
            .bearer_auth(&forged)
            .json(&json!({"cmd": "true"})),
    )
    .await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    s.stop();
}

async fn state_conflicts_are_409_naming_the_state(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    let paused = insert_sandbox(&db, &team_a, SandboxState::Paused, "x", &[]).await;
    for (req, state) in [
        (
            c.post(s.url(&format!("/v1/sandboxes/{paused}/pause"))),
            "paused",
        ),
        (
            c.post(s.url(&format!("/v1/sandboxes/{paused}/timeout")))
                .json(&json!({"timeout_s": 30})),
            "paused",
        ),
        (
            c.post(s.url(&format!("/v1/sandboxes/{paused}/snapshots")))
                .json(&json!({"name": "t1"})),
            "paused",
        ),
        (
            c.post(s.url(&format!("/v1/sandboxes/{paused}/exec")))
                .json(&json!({"cmd": "true"})),
            "paused",
        ),
    ] {
        let got = call(req.bearer_auth(&key_a)).await;
        assert_error(&got, StatusCode::CONFLICT, "conflict");
        assert!(
            got.1["message"].as_str().unwrap().contains(state),
            "{:?}",
            got.1
        );
    }
    let creating = insert_sandbox(&db, &team_a, SandboxState::Creating, "x", &[]).await;
    for req in [
        c.delete(s.url(&format!("/v1/sandboxes/{creating}"))),
        c.post(s.url(&format!("/v1/sandboxes/{creating}/resume"))),
    ] {
        let got = call(req.bearer_auth(&key_a)).await;
        assert_error(&got, StatusCode::CONFLICT, "conflict");
        assert!(
            got.1["message"].as_str().unwrap().contains("creating"),
            "{:?}",
            got.1
        );
    }
    // Resume of a paused sandbox whose host is unknown to this server: 503, and it stays paused.
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{paused}/resume")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    let (_, row) = call(
        c.get(s.url(&format!("/v1/sandboxes/{paused}")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_eq!(row["state"], "paused");
    // A resume body with an unknown field is still a 400 naming it.
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{paused}/resume")))
            .bearer_auth(&key_a)
            .json(&json!({"timeout": 5})),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(got.1["field"], "timeout");
    s.stop();
}

async fn file_paths_must_be_absolute(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    let id = insert_sandbox(&db, &team_a, SandboxState::Running, "x", &[]).await;
    for path in ["../../etc/passwd", "etc/passwd", "", "%2Fetc%00passwd"] {
        for req in [
            c.get(s.url(&format!("/v1/sandboxes/{id}/files?path={path}"))),
            c.put(s.url(&format!("/v1/sandboxes/{id}/files?path={path}")))
                .body("data"),
            c.delete(s.url(&format!("/v1/sandboxes/{id}/files?path={path}"))),
            c.get(s.url(&format!("/v1/sandboxes/{id}/files/stat?path={path}"))),
            c.get(s.url(&format!("/v1/sandboxes/{id}/files/list?path={path}"))),
        ] {
            let got = call(req.bearer_auth(&key_a)).await;
            assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
            assert_eq!(got.1["field"], "path", "{path}: {:?}", got.1);
        }
    }
    let got = call(
        c.get(s.url(&format!("/v1/sandboxes/{id}/files")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(got.1["field"], "path", "{:?}", got.1);
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{id}/files/mkdir")))
            .bearer_auth(&key_a)
            .json(&json!({"path": "tmp/x"})),
    )
    .await;
    assert_eq!(got.1["field"], "path", "{:?}", got.1);
    let got = call(
        c.post(s.url(&format!("/v1/sandboxes/{id}/exec")))
            .bearer_auth(&key_a)
            .json(&json!({"cmd": "ls", "cwd": "tmp"})),
    )
    .await;
    assert_eq!(got.1["field"], "cwd", "{:?}", got.1);
    // A valid path on a sandbox whose host is gone: the host's failure, not the caller's.
    let got = call(
        c.get(s.url(&format!("/v1/sandboxes/{id}/files/stat?path=/etc")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_error(&got, StatusCode::BAD_GATEWAY, "host_error");
    s.stop();
}

async fn listing_filters_and_paginates_over_http(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let state = if i < 3 {
            SandboxState::Paused
        } else {
            SandboxState::Failed
        };
        ids.push(
            insert_sandbox(
                &db,
                &team_a,
                state,
                "x",
                &[("owner", owner), ("i", &i.to_string())],
            )
            .await,
        );
    }
    let mut seen = Vec::new();
    let mut url = s.url("/v1/sandboxes?limit=3");
    loop {
        let (st, page) = call(c.get(&url).bearer_auth(&key_a)).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        let batch = page["sandboxes"].as_array().unwrap();
        assert!(batch.len() <= 3);
        seen.extend(batch.iter().map(|s| s["id"].as_str().unwrap().to_owned()));
        match page["next_page_token"].as_str() {
            Some(t) => url = s.url(&format!("/v1/sandboxes?limit=3&page_token={t}")),
            None => break,
        }
    }
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    assert_eq!(sorted_seen, sorted_ids, "every sandbox exactly once");
    let count = |q: &'static str| {
        let c = c.clone();
        let url = s.url(&format!("/v1/sandboxes?{q}"));
        let key = key_a.clone();
        async move {
            let (st, v) = call(c.get(url).bearer_auth(key)).await;
            assert_eq!(st, StatusCode::OK, "{q}: {v}");
            v["sandboxes"].as_array().unwrap().len()
        }
    };
    assert_eq!(count("state=paused").await, 3);
    assert_eq!(count("state=failed").await, 4);
    assert_eq!(count("state=paused,failed").await, 7);
    assert_eq!(count("metadata.owner=alice").await, 4);
    assert_eq!(count("metadata.owner=alice&state=paused").await, 2);
    assert_eq!(count("metadata.owner=alice&metadata.i=2").await, 1);
    assert_eq!(count("template=base").await, 7);
    assert_eq!(count("template=py").await, 0);
    s.stop();
}

async fn keys_and_teams_endpoints(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let admin = s.admin_key.clone().unwrap();
    let (team_b, key_b) = team_with_key(&s, "beta").await;
    assert_error(
        &call(
            c.post(s.url("/v1/teams"))
                .bearer_auth(&admin)
                .json(&json!({"name": "beta"})),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    // A normal key cannot administer.
    assert_error(
        &call(
            c.post(s.url("/v1/teams"))
                .bearer_auth(&key_b)
                .json(&json!({"name": "gamma"})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &call(c.get(s.url("/v1/teams")).bearer_auth(&key_b)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &call(c.get(s.url("/v1/hosts")).bearer_auth(&key_b)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (st, teams) = call(c.get(s.url("/v1/teams")).bearer_auth(&admin)).await;
    assert_eq!(st, StatusCode::OK);
    let admin_team = teams["teams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "default")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_error(
        &call(
            c.post(s.url("/v1/keys"))
                .bearer_auth(&key_b)
                .json(&json!({"name": "x", "team_id": admin_team})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &call(
            c.get(s.url(&format!("/v1/keys?team_id={admin_team}")))
                .bearer_auth(&key_b),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let got = call(
        c.post(s.url("/v1/keys"))
            .bearer_auth(&admin)
            .json(&json!({"name": "x", "team_id": "team-nosuchteam0000000000"})),
    )
    .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    // A normal key manages its own team's keys.
    let (st, second) = call(
        c.post(s.url("/v1/keys"))
            .bearer_auth(&key_b)
            .json(&json!({"name": "second"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{second}");
    assert_eq!(second["team_id"], team_b.as_str());
    let second_key = second["key"].as_str().unwrap().to_owned();
    let second_id = second["id"].as_str().unwrap().to_owned();
    let (st, keys) = call(c.get(s.url("/v1/keys")).bearer_auth(&key_b)).await;
    assert_eq!(st, StatusCode::OK);
    let listed = keys["keys"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|k| k["team_id"] == team_b.as_str() && k.get("key").is_none())
    );
    assert!(
        !keys.to_string().contains(&second_key),
        "listing never shows keys"
    );
    // Another team's key is not found (not forbidden); the admin's key survives.
    let (_, admin_keys) = call(c.get(s.url("/v1/keys")).bearer_auth(&admin)).await;
    let admin_key_id = admin_keys["keys"][0]["id"].as_str().unwrap().to_owned();
    assert_error(
        &call(
            c.delete(s.url(&format!("/v1/keys/{admin_key_id}")))
                .bearer_auth(&key_b),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(
        call(c.get(s.url("/v1/teams")).bearer_auth(&admin)).await.0,
        StatusCode::OK
    );
    // Revocation works at once.
    assert_eq!(
        call(c.get(s.url("/v1/keys")).bearer_auth(&second_key))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(
            c.delete(s.url(&format!("/v1/keys/{second_id}")))
                .bearer_auth(&key_b)
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &call(c.get(s.url("/v1/keys")).bearer_auth(&second_key)).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (_, keys) = call(c.get(s.url("/v1/keys")).bearer_auth(&key_b)).await;
    let revoked = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == second_id.as_str())
        .unwrap()
        .clone();
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    // An admin may revoke any team's key and list any team's keys.
    let (st, b_keys) = call(
        c.get(s.url(&format!("/v1/keys?team_id={team_b}")))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b_keys["keys"].as_array().unwrap().len(), 2);
    let (st, hosts) = call(c.get(s.url("/v1/hosts")).bearer_auth(&admin)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(hosts["hosts"], json!([]));
    s.stop();
}

async fn host_registration_needs_the_join_token(db: TestDb) {
    let s = Server::start_with_env(&db, &[], &[("EMBER_JOIN_TOKEN", "emberjoin_testtoken")]);
    assert_eq!(s.join_token, None, "a given token is not printed");
    let c = client();
    let body = json!({"address": "http://127.0.0.1:9"});
    assert_error(
        &call(c.post(s.url("/internal/v1/hosts")).json(&body)).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &call(
            c.post(s.url("/internal/v1/hosts"))
                .bearer_auth("emberjoin_wrong")
                .json(&body),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &call(
            c.post(s.url("/internal/v1/hosts"))
                .bearer_auth(s.admin_key.as_deref().unwrap())
                .json(&body),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let got = call(
        c.post(s.url("/internal/v1/hosts"))
            .bearer_auth("emberjoin_testtoken")
            .json(&json!({"address": "not a url"})),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(got.1["field"], "address");
    // Each field is checked, and named when wrong.
    let host_id = ember_types::HostId::new().to_string();
    let well_formed = |address: &str| {
        json!({
            "address": address,
            "host_id": host_id,
            "control_token": format!("embercontrol_{}", "x".repeat(43)),
        })
    };
    for (body, field) in [
        (well_formed("http://10.0.0.2:7001"), "address"),
        (well_formed("https://10.0.0.2:7001"), "tls_cert"),
        (
            json!({"address": "http://127.0.0.1:9", "host_id": "sb-x", "control_token": "x".repeat(40)}),
            "host_id",
        ),
        (
            json!({"address": "http://127.0.0.1:9", "host_id": host_id, "control_token": "short"}),
            "control_token",
        ),
    ] {
        let got = call(
            c.post(s.url("/internal/v1/hosts"))
                .bearer_auth("emberjoin_testtoken")
                .json(&body),
        )
        .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(got.1["field"], field, "{body}");
    }
    // A well-formed address where no agent listens: the server tried to dial it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let got = call(
        c.post(s.url("/internal/v1/hosts"))
            .bearer_auth("emberjoin_testtoken")
            .json(&well_formed(&format!("http://{dead}"))),
    )
    .await;
    assert_error(&got, StatusCode::BAD_GATEWAY, "host_error");
    let (_, hosts) = call(
        c.get(s.url("/v1/hosts"))
            .bearer_auth(s.admin_key.as_deref().unwrap()),
    )
    .await;
    assert_eq!(
        hosts["hosts"],
        json!([]),
        "a host that never answered is not registered"
    );
    s.stop();
}

async fn health_and_metrics(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let (st, h) = call(c.get(s.url("/healthz"))).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["status"], "ok");
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    insert_sandbox(&db, &team_a, SandboxState::Paused, "x", &[]).await;
    // Metrics cover every team: no key, or a tenant's, is refused.
    assert_error(
        &call(c.get(s.url("/metrics"))).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &call(c.get(s.url("/metrics")).bearer_auth(&key_a)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // A read-only key of the admin team is what a scraper needs.
    let admin = s.admin_key.as_deref().unwrap();
    let (st, scraper) = call(
        c.post(s.url("/v1/keys"))
            .bearer_auth(admin)
            .json(&json!({"name": "prometheus", "role": "read_only"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{scraper}");
    let resp = c
        .get(s.url("/metrics"))
        .bearer_auth(scraper["key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("ember_sandboxes{state=\"paused\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ember_sandboxes{state=\"running\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("ember_sandbox_operation_seconds_count{operation=\"create\"} 0"),
        "{text}"
    );
    assert!(text.contains("ember_hosts "), "{text}");
    s.stop();
}

/// Roles: a read-only key reads and changes nothing (REST and E2B), never
/// reaches into a guest; only admin keys mint admin keys. Expiry: an expired
/// key is refused, saying so. Audit: every authenticated change is logged
/// with its actor, route, target and status, and only admins read the log.
async fn key_roles_and_expiry_are_enforced_and_changes_audited(db: TestDb) {
    let s = Server::start(&db, &[]);
    let c = client();
    let admin = s.admin_key.clone().unwrap();
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    let sb = insert_sandbox(&db, &team_a, SandboxState::Running, "x", &[]).await;
    let mint = |by: String, body: Value| {
        let c = c.clone();
        let url = s.url("/v1/keys");
        async move { call(c.post(url).bearer_auth(by).json(&body)).await }
    };

    // A member mints a read-only key for its team; it is listed with its role.
    let (st, ro) = mint(key_a.clone(), json!({"name": "dash", "role": "read_only"})).await;
    assert_eq!(st, StatusCode::CREATED, "{ro}");
    assert_eq!(ro["role"], "read_only");
    let ro_key = ro["key"].as_str().unwrap().to_owned();
    let ro_id = ro["id"].as_str().unwrap().to_owned();
    let (st, list) = call(c.get(s.url("/v1/keys")).bearer_auth(&key_a)).await;
    assert_eq!(st, StatusCode::OK);
    let roles: Vec<_> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roles, ["member", "read_only"], "{list}");

    // Read-only reads ...
    let (st, listed) = call(c.get(s.url("/v1/sandboxes")).bearer_auth(&ro_key)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(listed["sandboxes"][0]["id"], sb.as_str());
    let (st, _) = call(
        c.get(s.url(&format!("/v1/sandboxes/{sb}")))
            .bearer_auth(&ro_key),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    // ... and changes nothing, reaches into no guest, mints no key.
    for req in [
        c.post(s.url("/v1/sandboxes")).json(&create_body()),
        c.delete(s.url(&format!("/v1/sandboxes/{sb}"))),
        c.post(s.url(&format!("/v1/sandboxes/{sb}/pause"))),
        c.post(s.url(&format!("/v1/sandboxes/{sb}/exec")))
            .json(&json!({"cmd": ["id"]})),
        c.get(s.url(&format!("/v1/sandboxes/{sb}/files?path=/etc/passwd"))),
        c.get(s.url(&format!("/v1/sandboxes/{sb}/processes"))),
        c.post(s.url("/v1/keys")).json(&json!({"name": "more"})),
        c.delete(s.url(&format!("/v1/keys/{ro_id}"))),
    ] {
        let got = call(req.bearer_auth(&ro_key)).await;
        assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
        assert!(
            got.1["message"].as_str().unwrap().contains("read-only"),
            "{got:?}"
        );
    }
    // The E2B adapter holds read-only keys to the same rule.
    let (st, e2b_list) = call(c.get(s.url("/sandboxes")).header("x-api-key", &ro_key)).await;
    assert_eq!(st, StatusCode::OK, "{e2b_list}");
    let (st, body) = call(
        c.post(s.url("/sandboxes"))
            .header("x-api-key", &ro_key)
            .json(&json!({"templateID": "base"})),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, _) = call(
        c.post(s.url(&format!("/sandboxes/{sb}/pause")))
            .header("x-api-key", &ro_key),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(
        call(
            c.get(s.url(&format!("/v1/sandboxes/{sb}")))
                .bearer_auth(&key_a)
        )
        .await
        .1["state"],
        "running",
        "nothing a read-only key asked for happened"
    );

    // Only admin keys mint admin keys, and only for admin teams.
    let got = mint(key_a.clone(), json!({"name": "root", "role": "admin"})).await;
    assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
    let got = mint(
        admin.clone(),
        json!({"name": "root", "role": "admin", "team_id": team_a}),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(got.1["field"], "role");
    let (st, admin2) = mint(admin.clone(), json!({"name": "ops", "role": "admin"})).await;
    assert_eq!(st, StatusCode::CREATED, "{admin2}");
    let admin2 = admin2["key"].as_str().unwrap().to_owned();
    assert_eq!(
        call(c.get(s.url("/v1/teams")).bearer_auth(&admin2)).await.0,
        StatusCode::OK
    );
    // A member key of the admin team is no admin.
    let (_, member) = mint(admin.clone(), json!({"name": "dev"})).await;
    assert_eq!(member["role"], "member");
    assert_error(
        &call(
            c.get(s.url("/v1/teams"))
                .bearer_auth(member["key"].as_str().unwrap()),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let got = mint(key_a.clone(), json!({"name": "x", "role": "owner"})).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    let got = mint(key_a.clone(), json!({"name": "x", "expires_in_s": 0})).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(got.1["field"], "expires_in_s");

    // An expiring key works until it expires, then says it expired.
    let (st, short) = mint(key_a.clone(), json!({"name": "short", "expires_in_s": 2})).await;
    assert_eq!(st, StatusCode::CREATED, "{short}");
    assert!(short["expires_at"].is_string(), "{short}");
    let short_key = short["key"].as_str().unwrap().to_owned();
    assert_eq!(
        call(c.get(s.url("/v1/sandboxes")).bearer_auth(&short_key))
            .await
            .0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let got = call(c.get(s.url("/v1/sandboxes")).bearer_auth(&short_key)).await;
    assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        got.1["message"].as_str().unwrap().contains("expired"),
        "{got:?}"
    );

    // The audit log: every authenticated change, refused ones included,
    // newest first; reads are not in it.
    let (st, _) = call(
        c.post(s.url(&format!("/v1/sandboxes/{sb}/timeout")))
            .bearer_auth(&key_a)
            .json(&json!({"timeout_s": 120})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let got = call(
        c.get(s.url(&format!("/v1/audit?team_id={team_a}")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
    let (st, log) = call(
        c.get(s.url(&format!("/v1/audit?team_id={team_a}&limit=1000")))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{log}");
    let entries = log["entries"].as_array().unwrap();
    let a_prefix = &key_a["ember_".len().."ember_".len() + 8];
    let ro_prefix = &ro_id;
    let find = |actor: &str, method: &str, route: &str| {
        entries
            .iter()
            .find(|e| {
                e["actor"] == format!("key:{actor}") && e["method"] == method && e["route"] == route
            })
            .cloned()
    };
    let timeout = find(a_prefix, "POST", "/v1/sandboxes/{id}/timeout").expect("the timeout change");
    assert_eq!(timeout["target"], sb.as_str());
    assert_eq!(timeout["status"], 200);
    assert_eq!(timeout["team_id"], team_a.as_str());
    let minted = find(a_prefix, "POST", "/v1/keys").expect("the read-only key's minting");
    assert_eq!(minted["status"], 201);
    let refused = find(ro_prefix, "DELETE", "/v1/sandboxes/{id}").expect("the refused delete");
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["target"], sb.as_str());
    assert!(
        find(ro_prefix, "POST", "/sandboxes").is_some(),
        "E2B adapter calls are audited too: {log}"
    );
    assert!(
        entries.iter().all(|e| e["method"] != "GET"),
        "reads are not audited: {log}"
    );
    assert!(
        entries[0]["route"] == "/v1/sandboxes/{id}/timeout",
        "newest first: {log}"
    );
    // By target, and paged.
    let (_, by_sb) = call(
        c.get(s.url(&format!("/v1/audit?target={sb}")))
            .bearer_auth(&admin),
    )
    .await;
    let by_sb = by_sb["entries"].as_array().unwrap().clone();
    assert!(by_sb.len() >= 3, "{by_sb:?}");
    assert!(by_sb.iter().all(|e| e["target"] == sb.as_str()));
    let (_, page1) = call(
        c.get(s.url(&format!("/v1/audit?target={sb}&limit=2")))
            .bearer_auth(&admin),
    )
    .await;
    let next = page1["next_before"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, page2) = call(
        c.get(s.url(&format!("/v1/audit?target={sb}&limit=2&before={next}")))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(page2["entries"][0]["id"], by_sb[2]["id"], "{page2}");
    s.stop();
}

/// Per-key rate limit: a burst passes, the next request is 429
/// `rate_limited` with `Retry-After`, other keys are unaffected, and after
/// the wait the key works again; the E2B adapter says the same.
async fn rate_limits_answer_429_with_retry_after(db: TestDb) {
    let config = db.dir.path().join("rate.toml");
    std::fs::write(
        &config,
        "[rate_limits]\nrequests_per_second = 1\nburst = 4\n",
    )
    .unwrap();
    let s = Server::start(&db, &["--config", config.to_str().unwrap()]);
    let c = client();
    let (_, key) = team_with_key(&s, "busy").await;
    let (_, other) = team_with_key(&s, "calm").await;
    for i in 0..4 {
        let (st, body) = call(c.get(s.url("/v1/sandboxes")).bearer_auth(&key)).await;
        assert_eq!(st, StatusCode::OK, "request {i}: {body}");
    }
    let resp = c
        .get(s.url("/v1/sandboxes"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("1 per second"),
        "{body}"
    );
    // Another key has its own allowance.
    let (st, _) = call(c.get(s.url("/v1/sandboxes")).bearer_auth(&other)).await;
    assert_eq!(st, StatusCode::OK);
    // E2B's clients get the same status and header.
    let resp = c
        .get(s.url("/sandboxes"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    tokio::time::sleep(Duration::from_secs(retry + 1)).await;
    let (st, _) = call(c.get(s.url("/v1/sandboxes")).bearer_auth(&key)).await;
    assert_eq!(st, StatusCode::OK, "the key works again after Retry-After");
    s.stop();
}

/// The server-wide limits: a sandbox running longer than `max_running_s`
/// gets its on_timeout even though its own expiry is far off, and one
/// paused longer than `paused_retention_s` is destroyed; younger ones are
/// left alone.
async fn lifetime_limits_end_long_runs_and_old_pauses(db: TestDb) {
    let config = db.dir.path().join("lifetime.toml");
    std::fs::write(
        &config,
        "max_running_s = 600\npaused_retention_s = 600\nttl_interval_s = 1\n",
    )
    .unwrap();
    let s = Server::start(&db, &["--config", config.to_str().unwrap()]);
    let c = client();
    let (team, key) = team_with_key(&s, "lifetime").await;
    let old_running = insert_sandbox(&db, &team, SandboxState::Running, "a", &[]).await;
    let young_running = insert_sandbox(&db, &team, SandboxState::Running, "b", &[]).await;
    let old_paused = insert_sandbox(&db, &team, SandboxState::Paused, "c", &[]).await;
    let young_paused = insert_sandbox(&db, &team, SandboxState::Paused, "d", &[]).await;
    {
        let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        let hour_ago = now_ms() - 3600 * 1000;
        for id in [&old_running, &old_paused] {
            // Far-off expiry: only the server's limits can end them.
            sqlx::query(
                "UPDATE sandboxes SET state_changed_at = $1, running_since = $1, expires_at = $2 WHERE id = $3",
            )
            .bind(hour_ago)
            .bind(now_ms() + 24 * 3600 * 1000)
            .bind(id.as_str())
            .execute(&mut conn)
            .await
            .unwrap();
        }
        conn.close().await.ok();
    }
    let state = |id: String| {
        let c = c.clone();
        let url = s.url(&format!("/v1/sandboxes/{id}"));
        let key = key.clone();
        async move { call(c.get(url).bearer_auth(key)).await.1["state"].clone() }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (r, p) = (
            state(old_running.clone()).await,
            state(old_paused.clone()).await,
        );
        // The kill (on_timeout) and the destroy start; the fake host at
        // 127.0.0.1:9 cannot finish them, so `destroying` is as far as
        // they get here.
        if r != "running" && p != "paused" {
            assert!(r == "destroying" || r == "destroyed", "{r}");
            assert!(p == "destroying" || p == "destroyed", "{p}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the limits never applied: running {r}, paused {p}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(state(young_running).await, "running");
    assert_eq!(state(young_paused).await, "paused");
    s.stop();
}

/// Concurrent transitions over HTTP: of many DELETEs and pauses racing on
/// one sandbox, exactly one gets past the compare-and-set; the rest are 409.
async fn racing_transitions_have_exactly_one_winner(db: TestDb) {
    let s = Server::start(&db, &[]);
    let (team_a, key_a) = team_with_key(&s, "alpha").await;
    let id = insert_sandbox(&db, &team_a, SandboxState::Paused, "x", &[]).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = client();
        let url = if i % 3 == 0 {
            s.url(&format!("/v1/sandboxes/{id}/resume"))
        } else {
            s.url(&format!("/v1/sandboxes/{id}"))
        };
        let key = key_a.clone();
        tasks.push(tokio::spawn(async move {
            let req = if i % 3 == 0 {
                c.post(url)
            } else {
                c.delete(url)
            };
            call(req.bearer_auth(key)).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // Resumes cannot start (its host is not serving): 503, without touching the row.
    // Of the deletes, one moves the row to `destroying` (then fails to reach
    // the host: 502, left for the reconciler); every other one is 409.
    let deletes: Vec<_> = results
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, r)| r)
        .collect();
    let winners = deletes
        .iter()
        .filter(|r| r.0 != StatusCode::CONFLICT)
        .count();
    assert_eq!(winners, 1, "{deletes:?}");
    let winner = deletes
        .iter()
        .find(|r| r.0 != StatusCode::CONFLICT)
        .unwrap();
    assert_error(winner, StatusCode::BAD_GATEWAY, "host_error");
    for r in results.iter().filter(|r| r.0 == StatusCode::CONFLICT) {
        assert_error(r, StatusCode::CONFLICT, "conflict");
    }
    let (_, row) = call(
        client()
            .get(s.url(&format!("/v1/sandboxes/{id}")))
            .bearer_auth(&key_a),
    )
    .await;
    assert_eq!(row["state"], "destroying");
    s.stop();
}

/// Two replicas on one PostgreSQL database: exactly one mints the first
/// admin key, and each serves what the other wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_postgres_database() {
    ember_testkit::require!(
        std::env::var(PG_ENV).is_ok(),
        "needs PostgreSQL: run scripts/postgres-test-db and source target/postgres-test.env ({PG_ENV})"
    );
    let db = TestDb::postgres().await;
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| Server::start(&db, &[]));
        let b = scope.spawn(|| Server::start(&db, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let keys: Vec<&String> = [&a.admin_key, &b.admin_key].into_iter().flatten().collect();
    assert_eq!(
        keys.len(),
        1,
        "exactly one replica prints the first admin key"
    );
    assert_eq!(
        [&a.join_token, &b.join_token].into_iter().flatten().count(),
        1,
        "and exactly one generates the join token"
    );
    let admin = keys[0].clone();
    let c = client();
    let (st, team) = call(
        c.post(a.url("/v1/teams"))
            .bearer_auth(&admin)
            .json(&json!({"name": "shared"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{team}");
    let (st, teams) = call(c.get(b.url("/v1/teams")).bearer_auth(&admin)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        teams["teams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "shared")
    );
    a.stop();
    b.stop();
}

/// Settings from a TOML file apply; flags override it; a typo in it is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_settings_apply_and_typos_are_errors() {
    let db = TestDb::sqlite();
    let config = db.dir.path().join("ember.toml");
    let data = db.dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\njoin_token = \"emberjoin_fromfile\"\nlisten = \"127.0.0.1:1\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    // --listen on the command line beats the file's unusable port; the
    // database defaults to SQLite in the file's data_dir.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "server",
            "--no-agent",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .env_remove("EMBER_JOIN_TOKEN")
        .env_remove("EMBER_DATA_DIR")
        .env_remove("EMBER_DATABASE_URL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let base = lines
        .find_map(|l| {
            l.strip_prefix("ember server: listening on ")
                .map(str::to_owned)
        })
        .expect("server starts");
    assert!(
        data.join("control.db").exists(),
        "SQLite lives in the configured data_dir"
    );
    let body = json!({"address": "not a url"});
    let got = call(
        client()
            .post(format!("{base}/internal/v1/hosts"))
            .bearer_auth("emberjoin_fromfile")
            .json(&body),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request"); // authenticated: the file's token is in force
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    assert!(child.wait().unwrap().success());

    std::fs::write(&config, "listn = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["server", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listn"),
        "the error names the unknown setting: {err}"
    );
}

/// Tenants' `allow_out` opens none of the private and special ranges (the
/// cloud metadata service above all) unless the operator granted it — in
/// Ember's API and in E2B's alike; a bad grant stops the server at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_out_stays_under_the_operators_ceiling() {
    let c = client();
    let create = |s: &Server, key: &str, allow: &str| {
        c.post(s.url("/v1/sandboxes"))
            .bearer_auth(key)
            .json(&json!({"template": "base", "timeout_s": 60, "network": {"allow_out": [allow]}}))
    };
    let e2b_create = |s: &Server, key: &str, allow: &str| {
        c.post(s.url("/sandboxes"))
            .header("x-api-key", key)
            .json(&json!({"templateID": "base", "network": {"allowOut": [allow]}}))
    };

    let db = TestDb::sqlite();
    let s = Server::start(&db, &[]);
    let key = s.admin_key.clone().unwrap();
    for beyond in [
        "169.254.169.254",
        "10.9.1.0/24",
        "192.168.0.0/16",
        "0.0.0.0/0",
    ] {
        let got = call(create(&s, &key, beyond)).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(
            got.1["field"], "network.allow_out[0]",
            "{beyond}: {:?}",
            got.1
        );
        let msg = got.1["message"].as_str().unwrap();
        assert!(msg.contains("--egress-grant"), "{beyond}: {msg}");
        let (st, body) = call(e2b_create(&s, &key, beyond)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "E2B {beyond}: {body}");
        assert!(body.to_string().contains("allowOut[0]"), "{body}");
    }
    let got = call(create(&s, &key, "169.254.169.254")).await;
    assert!(
        got.1["message"].as_str().unwrap().contains("metadata"),
        "{:?}",
        got.1
    );
    // Public addresses need no grant: validation passes (no host here).
    let got = call(create(&s, &key, "8.8.8.8")).await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    s.stop();

    let db = TestDb::sqlite();
    let s = Server::start(&db, &["--egress-grant", "10.9.0.0/16,169.254.169.254/32"]);
    let key = s.admin_key.clone().unwrap();
    for granted in ["10.9.1.0/24", "169.254.169.254"] {
        let got = call(create(&s, &key, granted)).await;
        assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    }
    for beyond in ["10.8.0.0/16", "169.254.0.0/16"] {
        let got = call(create(&s, &key, beyond)).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    }
    s.stop();

    // A grant for one team (by name) widens that team's ceiling only.
    let db = TestDb::sqlite();
    let config = db.dir.path().join("grants.toml");
    std::fs::write(
        &config,
        "egress_grants = [\"10.9.0.0/16\"]\n[team_egress_grants]\nlab = [\"10.50.0.0/16\"]\n",
    )
    .unwrap();
    let s = Server::start(&db, &["--config", config.to_str().unwrap()]);
    let (_, lab) = team_with_key(&s, "lab").await;
    let (_, other) = team_with_key(&s, "other").await;
    for (key, cidr, allowed) in [
        (&lab, "10.50.1.0/24", true),
        (&lab, "10.9.1.0/24", true),
        (&lab, "10.51.0.0/16", false),
        (&other, "10.50.1.0/24", false),
        (&other, "10.9.1.0/24", true),
    ] {
        let got = call(create(&s, key, cidr)).await;
        if allowed {
            assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
        } else {
            assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        }
        let (st, body) = call(e2b_create(&s, key, cidr)).await;
        let want = if allowed {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(st, want, "E2B {cidr}: {body}");
    }
    s.stop();

    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["server", "--no-agent", "--egress-grant", "10.0.0.1/8"])
        .env_remove("EMBER_EGRESS_GRANTS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--egress-grant") && err.contains("10.0.0.0/8"),
        "{err}"
    );
}

/// Secrets come from files (never only argv), and an agent reachable from
/// the network does not serve without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_from_files_and_an_open_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg("agent")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("EMBER_JOIN_TOKEN")
            .env_remove("EMBER_JOIN_TOKEN_FILE")
            .env_remove("EMBER_CONTROL_PLANE")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = agent(&["--listen", "0.0.0.0:0"]);
    assert!(
        err.contains("reachable from the network") && err.contains("--token-file"),
        "{err}"
    );
    let err = agent(&["--control-plane", "http://127.0.0.1:9"]);
    assert!(
        err.contains("--control-plane needs the join token"),
        "{err}"
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let err = agent(&["--token-file", empty.to_str().unwrap()]);
    assert!(err.contains("is empty"), "{err}");
    // A secret on the command line, readable in /proc by every local
    // user, is refused, by the agent and by the server.
    let err = agent(&["--token", "emberjoin_onargv"]);
    assert!(
        err.contains("visible to every local user") && err.contains("--token-file"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["server", "--no-agent", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("server-data"))
        .arg("--join-token=emberjoin_onargv")
        .env_remove("EMBER_JOIN_TOKEN")
        .env_remove("EMBER_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("visible to every local user") && err.contains("--join-token-file"),
        "{err}"
    );

    // The server takes its join token from a file.
    let db = TestDb::sqlite();
    let file = db.dir.path().join("join-token");
    std::fs::write(&file, "emberjoin_fromafile\n").unwrap();
    let s = Server::start(&db, &["--join-token-file", file.to_str().unwrap()]);
    let body = json!({"address": "not a url"});
    let got = call(
        client()
            .post(s.url("/internal/v1/hosts"))
            .bearer_auth("emberjoin_fromafile")
            .json(&body),
    )
    .await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request"); // authenticated
    s.stop();
}

/// A host that lacks what the agent needs is told so at start, in one
/// error naming everything to install, by `ember agent` and by `ember
/// server` (whose embedded agent checks the same), not at the first create.
#[test]
fn missing_host_tools_stop_the_agent_and_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-firecracker");
    for cmd in ["agent", "server"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg(cmd)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join(format!("data-{cmd}")))
            .arg("--run-dir")
            .arg(dir.path().join(format!("run-{cmd}")))
            .arg("--memory-dir")
            .arg(dir.path().join(format!("mem-{cmd}")))
            .args(["--backend", "firecracker", "--firecracker-bin"])
            .arg(&missing)
            .env_remove("EMBER_DATABASE_URL")
            .env_remove("EMBER_JOIN_TOKEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ember {cmd} started: {stderr}");
        assert!(
            stderr.contains("this host lacks what Ember needs")
                && stderr.contains(&format!(
                    "{} (build Firecracker and pass --firecracker-bin)",
                    missing.display()
                ))
                && stderr.contains("scripts/setup-host"),
            "ember {cmd}: {stderr}"
        );
        assert!(
            !stderr.contains("listening on"),
            "ember {cmd} served before failing: {stderr}"
        );
    }
}
