//! The client commands (`ember sandbox|snapshot|host|key`, `ember run` in
//! server mode) as a user runs them: the real `ember` binary against a real
//! `ember server` — with its embedded host agent booting real VMs for the
//! `_root_vm` tests, without one for the rest. Output is read the way
//! scripts read it (`--json`, exit codes).

mod support;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::image_dir;
use support::cli_server::CliServer as ServerProc;

fn vm_ready() -> bool {
    ember_testkit::is_root() && image_dir().is_some()
}

macro_rules! require_vm {
    () => {
        ember_testkit::require!(
            ember_testkit::is_root(),
            "needs root: the server's host agent creates network namespaces"
        );
        ember_testkit::require!(
            vm_ready(),
            "needs a built guest image (run `ember image build`)"
        );
    };
}

/// What one `ember` invocation did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// `ember ARGS` against `server` with `key`, and no config file.
fn ember(server: &ServerProc, key: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
    c.env("EMBER_API_URL", &server.url)
        .env("EMBER_API_KEY", key)
        .env("XDG_CONFIG_HOME", "/nonexistent/ember-client-test")
        .env("EMBER_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn run(mut cmd: Command, input: Option<&[u8]>) -> Out {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn ember");
    if let Some(data) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run `ember args…` as the admin; assert it exits `code`.
fn expect(server: &ServerProc, args: &[&str], code: i32) -> Out {
    expect_as(server, &server.admin_key, args, code)
}

fn expect_as(server: &ServerProc, key: &str, args: &[&str], code: i32) -> Out {
    let mut c = ember(server, key);
    c.args(args);
    let out = run(c, None);
    assert_eq!(
        out.code,
        code,
        "ember {args:?}: {out:?}\nserver log tail:\n{}",
        tail(&server.logs())
    );
    out
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn create_sandbox(server: &ServerProc, extra: &[&str]) -> String {
    let mut args = vec!["sandbox", "create", "--json"];
    args.extend_from_slice(extra);
    let out = expect(server, &args, 0);
    let sb = out.json();
    assert_eq!(sb["state"], "running", "{sb}");
    assert!(
        sb["access_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("embersb_")),
        "--json shows the access token once: {sb}"
    );
    sb["id"].as_str().unwrap().to_owned()
}

fn state_of(server: &ServerProc, id: &str) -> String {
    let out = expect(server, &["sandbox", "get", id, "--json"], 0);
    out.json()["state"].as_str().unwrap().to_owned()
}

// ------------------------------------------------------------ without VMs

#[test]
fn keys_hosts_and_api_errors_have_documented_exit_codes() {
    let s = ServerProc::without_agent();

    // A new key is printed alone on stdout, works, and stops working when revoked.
    let created = expect(&s, &["key", "create", "ci"], 0);
    let key = created.stdout.trim().to_owned();
    assert!(key.starts_with("ember_"), "{created:?}");
    assert!(created.stderr.contains("shown only now"), "{created:?}");
    let keys = expect_as(&s, &key, &["key", "list", "--json"], 0).json();
    let id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "ci")
        .expect("the new key is listed")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(key.contains(&id), "the ID is the key's prefix");
    let table = expect(&s, &["key", "list"], 0).stdout;
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&id), "{table}");
    expect(&s, &["key", "revoke", &id], 0);
    let out = expect_as(&s, &key, &["sandbox", "list"], 4);
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
    let out = expect(&s, &["key", "revoke", &id], 3);
    assert!(out.stderr.contains("no live key"), "{out:?}");

    // Hosts are for admin keys only; this server has none.
    assert_eq!(
        expect(&s, &["host", "list", "--json"], 0).json(),
        Value::Array(vec![])
    );
    let user_key = expect(&s, &["key", "create", "user"], 0)
        .stdout
        .trim()
        .to_owned();
    expect_as(&s, &user_key, &["key", "list"], 0);

    // Not found, invalid, no capacity, conflict-free listing.
    let out = expect(&s, &["sandbox", "get", "sb-00000000000000000000"], 3);
    assert!(out.stderr.contains("not_found"), "{out:?}");
    expect(&s, &["sandbox", "get", "not-an-id"], 3);
    let out = expect(&s, &["sandbox", "create", "--vcpus", "999"], 2);
    assert!(out.stderr.contains("vcpus"), "{out:?}");
    let out = expect(&s, &["sandbox", "create"], 6);
    assert!(out.stderr.contains("no_capacity"), "{out:?}");
    expect(&s, &["snapshot", "get", "nope"], 3);
    assert_eq!(
        expect(&s, &["sandbox", "list", "--json"], 0).json(),
        Value::Array(vec![])
    );
    assert_eq!(
        expect(&s, &["snapshot", "list", "--json"], 0).json(),
        Value::Array(vec![])
    );

    // exec reserves its codes for the command: every Ember failure is 125.
    let out = expect(
        &s,
        &["sandbox", "exec", "sb-00000000000000000000", "--", "true"],
        125,
    );
    assert!(out.stderr.contains("not_found"), "{out:?}");

    // No key at all: a clear error saying how to set one.
    let mut c = ember(&s, "");
    c.env_remove("EMBER_API_KEY").args(["sandbox", "list"]);
    let out = run(c, None);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("EMBER_API_KEY"), "{out:?}");

    // Nobody listening: 125, naming the URL.
    let mut c = ember(&s, &s.admin_key);
    c.env("EMBER_API_URL", "http://127.0.0.1:9")
        .args(["sandbox", "list"]);
    let out = run(c, None);
    assert_eq!(out.code, 125, "{out:?}");
    assert!(out.stderr.contains("cannot reach"), "{out:?}");
    assert!(out.stderr.contains("127.0.0.1:9"), "{out:?}");
}

#[test]
fn config_file_environment_and_flags_choose_the_server_in_that_order() {
    let s = ServerProc::without_agent();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("ember")).unwrap();
    let config = home.path().join("ember/config.toml");
    std::fs::write(
        &config,
        format!("api_url = \"{}\"\napi_key = \"{}\"\n", s.url, s.admin_key),
    )
    .unwrap();
    let bare = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
        c.env_remove("EMBER_API_URL")
            .env_remove("EMBER_API_KEY")
            .env("XDG_CONFIG_HOME", home.path())
            .stdin(Stdio::null());
        c
    };

    let mut c = bare();
    c.args(["key", "list", "--json"]);
    let out = run(c, None);
    assert_eq!(out.code, 0, "the file alone is enough: {out:?}");
    assert!(out.json().as_array().is_some_and(|k| !k.is_empty()));

    let mut c = bare();
    c.env("EMBER_API_KEY", "ember_wrong_key")
        .args(["key", "list"]);
    assert_eq!(run(c, None).code, 4, "the environment overrides the file");

    let mut c = bare();
    c.env("EMBER_API_KEY", "ember_wrong_key")
        .args(["key", "list", "--api-key", &s.admin_key]);
    assert_eq!(run(c, None).code, 0, "a flag overrides the environment");

    let mut c = bare();
    c.env("EMBER_API_URL", "http://127.0.0.1:9")
        .args(["key", "list"]);
    assert_eq!(run(c, None).code, 125, "the environment's URL wins");

    std::fs::write(&config, "api_key = 3\n").unwrap();
    let mut c = bare();
    c.args(["key", "list"]);
    let out = run(c, None);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("config.toml"), "{out:?}");
}

// ------------------------------------------------------------ with VMs

#[test]
fn sandbox_lifecycle_exec_and_files_through_the_cli_root_vm() {
    require_vm!();
    let s = ServerProc::with_agent();
    let id = create_sandbox(
        &s,
        &[
            "-m",
            "suite=cli",
            "-m",
            "owner=me",
            "-e",
            "GREETING=hello",
            "--timeout",
            "10m",
        ],
    );

    // Listing: filtered by metadata, as JSON and as a table.
    let listed = expect(&s, &["sandbox", "list", "--json", "-m", "suite=cli"], 0).json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["metadata"]["owner"], "me");
    let none = expect(&s, &["sandbox", "list", "--json", "-m", "suite=other"], 0).json();
    assert_eq!(none, Value::Array(vec![]));
    let table = expect(&s, &["sandbox", "list"], 0).stdout;
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with(&id)),
        "{table}"
    );
    let shown = expect(&s, &["sandbox", "get", &id], 0).stdout;
    assert!(
        shown.contains("state:") && shown.contains("running"),
        "{shown}"
    );

    // exec: stdout and stderr apart, the command's exit code, env, stdin.
    let out = expect(
        &s,
        &[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo out $GREETING; echo err >&2; exit 7",
        ],
        7,
    );
    assert_eq!(out.stdout, "out hello\n");
    assert_eq!(out.stderr, "err\n");
    let out = expect(
        &s,
        &[
            "sandbox",
            "exec",
            "-e",
            "X=1",
            "--cwd",
            "/tmp",
            &id,
            "--",
            "sh",
            "-c",
            "echo $X $(pwd)",
        ],
        0,
    );
    assert_eq!(out.stdout, "1 /tmp\n");
    let mut c = ember(&s, &s.admin_key);
    c.args(["sandbox", "exec", "-i", &id, "--", "sha256sum"]);
    let input: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let out = run(c, Some(&input));
    assert_eq!(out.code, 0, "{out:?}");
    let want = sha256_hex(&input);
    assert!(out.stdout.starts_with(&want), "{out:?} want {want}");
    let out = expect(
        &s,
        &[
            "sandbox",
            "exec",
            "--timeout",
            "1",
            &id,
            "--",
            "sleep",
            "30",
        ],
        124,
    );
    assert!(out.stderr.contains("timed out"), "{out:?}");
    let out = expect(
        &s,
        &["sandbox", "exec", &id, "--", "sh", "-c", "kill -9 $$"],
        137,
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    expect(&s, &["sandbox", "exec", &id, "--", "/no/such/program"], 125);

    // Files: a binary round trip through a file and through stdin/stdout.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("blob");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 256) as u8).collect();
    std::fs::write(&local, &blob).unwrap();
    let stat = expect(
        &s,
        &[
            "sandbox",
            "files",
            "put",
            &id,
            local.to_str().unwrap(),
            "/root/blob",
            "--mode",
            "600",
            "--json",
        ],
        0,
    )
    .json();
    assert_eq!(stat["size"], 300_000);
    assert_eq!(stat["mode"], "600");
    let back = dir.path().join("back");
    expect(
        &s,
        &[
            "sandbox",
            "files",
            "get",
            &id,
            "/root/blob",
            back.to_str().unwrap(),
        ],
        0,
    );
    assert!(
        std::fs::read(&back).unwrap() == blob,
        "the download differs"
    );
    let mut c = ember(&s, &s.admin_key);
    c.args(["sandbox", "files", "put", &id, "-", "/tmp/from-stdin"]);
    assert_eq!(run(c, Some(b"piped\n")).code, 0);
    let out = expect(&s, &["sandbox", "files", "get", &id, "/tmp/from-stdin"], 0);
    assert_eq!(out.stdout, "piped\n");
    let entries = expect(&s, &["sandbox", "files", "ls", &id, "/root", "--json"], 0).json();
    let names: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"blob"), "{names:?}");
    let missing = dir.path().join("missing");
    let out = expect(
        &s,
        &[
            "sandbox",
            "files",
            "get",
            &id,
            "/root/nope",
            missing.to_str().unwrap(),
        ],
        3,
    );
    assert!(
        !missing.exists(),
        "a failed download creates nothing: {out:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ember-download")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // mv: refuses to replace without -f, then moves.
    expect(
        &s,
        &[
            "sandbox",
            "files",
            "mv",
            &id,
            "/tmp/from-stdin",
            "/tmp/moved",
        ],
        0,
    );
    expect(&s, &["sandbox", "files", "get", &id, "/tmp/from-stdin"], 3);
    expect(
        &s,
        &["sandbox", "exec", &id, "--", "touch", "/tmp/other"],
        0,
    );
    expect(
        &s,
        &["sandbox", "files", "mv", &id, "/tmp/moved", "/tmp/other"],
        5,
    );
    expect(
        &s,
        &[
            "sandbox",
            "files",
            "mv",
            "-f",
            &id,
            "/tmp/moved",
            "/tmp/other",
        ],
        0,
    );
    expect(&s, &["sandbox", "files", "rm", &id, "/tmp/other"], 0);
    expect(&s, &["sandbox", "files", "get", &id, "/tmp/other"], 3);

    // Watch: the CLI prints a line per change until stopped.
    let mut w = ember(&s, &s.admin_key);
    w.args(["sandbox", "files", "watch", &id, "/tmp", "-r"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watcher = w.spawn().unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watch is in place once the CLI says so on stderr; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.starts_with("create") && l.ends_with("watched-file"))
    {
        expect(
            &s,
            &["sandbox", "exec", &id, "--", "touch", "/tmp/watched-file"],
            0,
        );
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
            lines.push(l);
        }
        assert!(Instant::now() < deadline, "no create line: {lines:?}");
    }
    let _ = watcher.kill();
    let _ = watcher.wait();

    // Network rules: replaced whole, shown back; a bad CIDR is a usage error.
    let out = expect(
        &s,
        &[
            "sandbox",
            "network",
            &id,
            "--deny-out",
            "203.0.113.0/24",
            "--json",
        ],
        0,
    )
    .json();
    assert_eq!(
        out["network"]["deny_out"],
        json!(["203.0.113.0/24"]),
        "{out}"
    );
    let out = expect(&s, &["sandbox", "network", &id, "--allow-out", "nope"], 2);
    assert!(out.stderr.contains("allow_out"), "{out:?}");

    // Pause and resume: what was written survives; a paused sandbox runs nothing.
    let paused = expect(&s, &["sandbox", "pause", &id, "--json"], 0).json();
    assert_eq!(paused["state"], "paused");
    assert_eq!(expect(&s, &["sandbox", "pause", &id], 5).code, 5);
    let out = expect(&s, &["sandbox", "exec", &id, "--", "true"], 125);
    assert!(out.stderr.contains("paused"), "{out:?}");
    let out = expect(&s, &["sandbox", "resume", &id], 0);
    assert_eq!(out.stdout.trim(), format!("{id} resumed"));
    let out = expect(
        &s,
        &["sandbox", "exec", &id, "--", "sha256sum", "/root/blob"],
        0,
    );
    assert!(out.stdout.starts_with(&sha256_hex(&blob)), "{out:?}");

    // Timeout, then kill; killing again is a conflict (it is destroyed).
    let t = expect(&s, &["sandbox", "timeout", &id, "1h", "--json"], 0).json();
    assert_eq!(t["timeout_s"], 3600);
    let out = expect(&s, &["sandbox", "kill", &id], 0);
    assert_eq!(out.stdout.trim(), format!("{id} destroyed"));
    assert_eq!(state_of(&s, &id), "destroyed");
    expect(&s, &["sandbox", "kill", &id], 5);
    let all = expect(&s, &["sandbox", "list", "--all", "--json"], 0).json();
    assert_eq!(all[0]["id"], id.as_str());
    assert_eq!(
        expect(&s, &["sandbox", "list", "--json"], 0).json(),
        Value::Array(vec![])
    );
    assert!(s.home.namespaces().is_empty(), "{:?}", s.home.namespaces());
    assert!(s.vm_processes().is_empty(), "{:?}", s.vm_processes());
}

#[test]
fn snapshots_through_the_cli_root_vm() {
    require_vm!();
    let s = ServerProc::with_agent();
    let id = create_sandbox(&s, &[]);
    expect(
        &s,
        &[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo frozen > /root/state",
        ],
        0,
    );
    let snap = expect(&s, &["snapshot", "create", &id, "cli-snap", "--json"], 0).json();
    assert_eq!(snap["name"], "cli-snap");
    assert_eq!(snap["source_sandbox_id"], id.as_str());
    assert_eq!(state_of(&s, &id), "running", "the source keeps running");
    expect(&s, &["snapshot", "create", &id, "cli-snap"], 5);

    let listed = expect(&s, &["snapshot", "list", "--json"], 0).json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "cli-snap");
    let got = expect(&s, &["snapshot", "get", "cli-snap", "--json"], 0).json();
    assert_eq!(got["build_id"], snap["build_id"]);
    assert!(
        expect(&s, &["snapshot", "list"], 0)
            .stdout
            .contains("cli-snap")
    );

    // A sandbox from the template sees the frozen file.
    let child = create_from_template(&s, "cli-snap");
    let out = expect(
        &s,
        &["sandbox", "exec", &child, "--", "cat", "/root/state"],
        0,
    );
    assert_eq!(out.stdout, "frozen\n");

    let deleted = expect(&s, &["snapshot", "delete", "cli-snap", "--json"], 0).json();
    assert_eq!(deleted["name"], "cli-snap");
    assert_eq!(deleted["data_freed"], false, "a sandbox still uses it");
    expect(&s, &["snapshot", "get", "cli-snap"], 3);
    expect(&s, &["sandbox", "create", "--template", "cli-snap"], 3);
    expect(&s, &["sandbox", "kill", &id, &child], 0);
}

/// `sandbox create --template NAME` right after the snapshot. The control
/// plane learns that its host holds the new build at its next host poll, and
/// until then answers 503 no_capacity (reported to the control plane's
/// owner); so a no-capacity answer is retried for a few seconds here.
fn create_from_template(s: &ServerProc, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = ember(s, &s.admin_key);
        c.args(["sandbox", "create", "--template", name]);
        let out = run(c, None);
        if out.code == 0 {
            return out.stdout.trim().to_owned();
        }
        assert_eq!(out.code, 6, "{out:?}");
        assert!(Instant::now() < deadline, "still no capacity: {out:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn run_goes_through_the_server_and_removes_its_sandbox_root_vm() {
    require_vm!();
    let s = ServerProc::with_agent();

    let out = expect(
        &s,
        &["run", "--", "sh", "-c", "echo out; echo err >&2; exit 5"],
        5,
    );
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    let mut c = ember(&s, &s.admin_key);
    c.args(["run", "--", "wc", "-c"]);
    let out = run(c, Some(b"twelve bytes"));
    assert_eq!((out.code, out.stdout.trim()), (0, "12"), "{out:?}");
    let out = expect(&s, &["run", "--timeout", "1", "--", "sleep", "30"], 124);
    assert!(out.stderr.contains("timed out"), "{out:?}");

    let all = expect(&s, &["sandbox", "list", "--all", "--json"], 0).json();
    let runs: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|sb| sb["metadata"]["created_by"] == "ember run")
        .collect();
    assert_eq!(runs.len(), 3, "{all}");
    assert!(runs.iter().all(|sb| sb["state"] == "destroyed"), "{all}");

    // Ctrl-C: exit 130 and the sandbox is destroyed.
    let mut c = ember(&s, &s.admin_key);
    c.args(["run", "--", "sleep", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let running = loop {
        let list = expect(&s, &["sandbox", "list", "--json", "--state", "running"], 0).json();
        if let Some(sb) = list.as_array().unwrap().first() {
            break sb["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "ember run never started a sandbox"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Let the command start (the exec request follows the create).
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert_eq!(state_of(&s, &running), "destroyed");
    assert!(s.vm_processes().is_empty(), "{:?}", s.vm_processes());

    // --local and --server are exclusive; a bad key is an Ember failure (125).
    let mut c = ember(&s, &s.admin_key);
    c.args(["run", "--local", "--server", "--", "true"]);
    assert_eq!(run(c, None).code, 2);
    expect_as(&s, "ember_bad_key", &["run", "--", "true"], 125);
}

#[test]
fn exec_it_is_an_interactive_terminal_root_vm() {
    require_vm!();
    use nix::sys::termios::{LocalFlags, tcgetattr};

    let s = ServerProc::with_agent();
    let id = create_sandbox(&s, &[]);
    let size = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let cooked = tcgetattr(pty.slave.as_fd()).unwrap();
    assert!(
        cooked
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO)
    );

    let mut c = ember(&s, &s.admin_key);
    c.args(["sandbox", "exec", "-it", &id, "--", "bash"])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    let mut child = c.spawn().unwrap();
    drop(c);

    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = std::fs::File::from(pty.master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = Vec::new();
    let wait_for = |needle: &str, screen: &mut Vec<u8>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !String::from_utf8_lossy(screen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => screen.extend(chunk),
                Err(_) => panic!(
                    "no {needle:?} on the terminal; it shows {:?}",
                    String::from_utf8_lossy(screen)
                ),
            }
        }
    };
    wait_for("# ", &mut screen);
    let raw = tcgetattr(pty.slave.as_fd()).unwrap();
    assert!(
        !raw.local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO),
        "the local terminal is raw during the session"
    );

    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    master.write_all(b"echo hi; stty size; tty\r").unwrap();
    wait_for("/dev/pts/", &mut screen);
    // Our window grows: the guest's terminal follows (SIGWINCH → resize).
    let bigger = nix::pty::Winsize {
        ws_row: 41,
        ws_col: 121,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one Winsize from a valid pointer.
    let rc = unsafe { nix::libc::ioctl(pty.master.as_raw_fd(), nix::libc::TIOCSWINSZ, &bigger) };
    assert_eq!(rc, 0, "TIOCSWINSZ");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    master.write_all(b"stty size; exit 3\r").unwrap();
    wait_for("41 121", &mut screen);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "ember sandbox exec -it did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(300)) {
        screen.extend(chunk);
    }
    let text = String::from_utf8_lossy(&screen).into_owned();
    assert_eq!(status.code(), Some(3), "{text:?}");
    // The command's output, after the echo of what was typed: `hi`, the
    // PTY's size (ours), and the PTY itself.
    assert!(
        text.contains("hi\r\n30 100\r\n/dev/pts/"),
        "the guest PTY has our size: {text:?}"
    );
    let restored = tcgetattr(pty.slave.as_fd()).unwrap();
    assert_eq!(
        restored.local_flags, cooked.local_flags,
        "the terminal is restored on exit"
    );
    assert_eq!(restored.input_flags, cooked.input_flags);
    assert_eq!(restored.output_flags, cooked.output_flags);
    expect(&s, &["sandbox", "kill", &id], 0);
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
