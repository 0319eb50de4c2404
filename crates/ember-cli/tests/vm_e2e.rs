//! End-to-end tests on real QEMU microVMs (TCG here): `ember run` as a
//! process, and `LocalSandbox` for the guest agent's file API.
//!
//! Needs root (network namespaces, TAP devices) and a built guest image
//! (`ember image build`; `scripts/test` builds it first). Each test checks
//! that what it created — the VMM process, the slot's namespace, the run
//! directory, the RAM file — is gone afterwards.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ember_cli::cmd::run::LocalSandbox;
use ember_guest_api::{StartProcess, WriteOptions};
use ember_image::Image;
use ember_testkit::{is_root, require};
use futures::StreamExt;
use sha2::{Digest, Sha256};

fn data_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("EMBER_DATA_DIR").unwrap_or_else(|| "/var/lib/ember".into()))
}

fn image() -> Option<Image> {
    Image::locate(&data_dir())
}

macro_rules! require_vm {
    () => {
        require!(
            is_root(),
            "needs root for network namespaces and TAP devices"
        );
        require!(
            image().is_some(),
            "no guest image under {}: run `ember image build` first",
            data_dir().display()
        );
    };
}

fn ember() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
    // Local mode: `ember run` would use a server configured here.
    c.env("EMBER_DATA_DIR", data_dir())
        .env("EMBER_LOG", "ember_cli=info")
        .env_remove("EMBER_API_URL")
        .env("XDG_CONFIG_HOME", "/nonexistent/ember-vm-e2e");
    c
}

/// What `ember run` reported about the VM it started (from its log).
#[derive(Debug, Default)]
struct Started {
    sandbox: String,
    vmm_pid: u32,
    netns: String,
}

fn started(stderr: &str) -> Started {
    let line = stderr
        .lines()
        .find(|l| l.contains("VM started"))
        .unwrap_or_else(|| panic!("no 'VM started' line in:\n{stderr}"));
    let field = |name: &str| -> String {
        let i = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        line[i..].split_whitespace().next().unwrap().to_owned()
    };
    Started {
        sandbox: field("sandbox"),
        vmm_pid: field("vmm_pid").parse().unwrap(),
        netns: field("netns"),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Nothing of the sandbox is left: process, namespace, run dir, RAM file.
fn assert_gone(s: &Started) {
    assert!(!s.sandbox.is_empty());
    assert!(!pid_alive(s.vmm_pid), "VMM {} still running", s.vmm_pid);
    assert!(!netns_exists(&s.netns), "namespace {} left behind", s.netns);
    let run_dir = Path::new("/run/ember/run").join(&s.sandbox);
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let ram = Path::new("/dev/shm/ember").join(format!("{}.ram", s.sandbox));
    assert!(!ram.exists(), "{} left behind", ram.display());
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = ember();
    cmd.arg("run").args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ember run");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_streams_stdout_and_stderr_apart_and_exits_with_the_commands_code_root_vm() {
    require_vm!();
    let out = run(
        &["--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr: {err}");
    assert_eq!(text(&out.stdout), "to-out\n");
    assert!(err.contains("to-err\n"), "{err}");
    assert!(!err.contains("to-out"), "{err}");
    assert_gone(&started(&err));
}

#[test]
fn run_passes_env_cwd_user_and_stdin_root_vm() {
    require_vm!();
    let out = run(
        &[
            "-e",
            "GREETING=hello world",
            "--cwd",
            "/tmp",
            "--user",
            "user",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(id -un)\"; tr a-z A-Z",
        ],
        Some(b"piped input\n"),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert_eq!(text(&out.stdout), "hello world|/tmp|user\nPIPED INPUT\n");
    assert_gone(&started(&err));
}

#[test]
fn run_kills_a_command_past_its_timeout_root_vm() {
    require_vm!();
    let t = Instant::now();
    let out = run(&["--timeout", "2", "--", "sleep", "300"], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stderr: {err}");
    assert!(err.contains("timed out"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(200),
        "took {:?}",
        t.elapsed()
    );
    assert_gone(&started(&err));
}

#[test]
fn run_reports_signals_as_128_plus_n_root_vm() {
    require_vm!();
    let out = run(&["--", "sh", "-c", "kill -TERM $$"], None);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    assert_gone(&started(&text(&out.stderr)));
}

#[test]
fn run_of_an_unknown_program_or_a_missing_file_is_a_clear_error_root_vm() {
    require_vm!();
    let out = run(&["--", "no-such-program-xyz"], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("no-such-program-xyz") && err.contains("not found"),
        "{err}"
    );
    assert_gone(&started(&err));

    let out = run(&["--", "cat", "/no/such/file"], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No such file"), "{err}");

    let out = run(&["--cwd", "/no/such/dir", "--", "true"], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("/no/such/dir"), "{err}");
}

/// Wait for `ember run`'s "VM started" line on its stderr, keeping the rest.
fn spawn_and_wait_started(
    args: &[&str],
) -> (
    std::process::Child,
    Started,
    std::thread::JoinHandle<String>,
) {
    use std::io::{BufRead, BufReader};
    let mut child = ember()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if line.contains("VM started") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let line = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("ember run never started its VM");
    (child, started(&line), reader)
}

#[test]
fn run_reports_a_vmm_that_dies_mid_run_and_cleans_up_root_vm() {
    require_vm!();
    let (child, s, reader) = spawn_and_wait_started(&["--", "sh", "-c", "echo started; sleep 600"]);
    // Let the command start, then kill QEMU from outside.
    std::thread::sleep(Duration::from_secs(3));
    unsafe_kill(s.vmm_pid, libc::SIGKILL);
    let out = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("VM exited") || err.contains("the VM"), "{err}");
    assert_gone(&s);
}

#[test]
fn ctrl_c_tears_the_sandbox_down_root_vm() {
    require_vm!();
    let (child, s, reader) = spawn_and_wait_started(&["--", "sleep", "600"]);
    std::thread::sleep(Duration::from_secs(2));
    unsafe_kill(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_gone(&s);
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn files_round_trip_including_64_mib_with_checksum_root_vm() {
    require_vm!();
    runtime().block_on(async {
        let image = image().unwrap();
        let mut sb = LocalSandbox::new();
        let booted = sb.boot(&image, 1, 512, &BTreeMap::new()).await;
        let result = async {
            booted?;
            let guest = sb.guest();
            let mut data = vec![0u8; 64 << 20];
            rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
            let want = hex(&Sha256::digest(&data));
            let info = guest
                .write_file(
                    "/home/user/big.bin",
                    &WriteOptions::default(),
                    std::io::Cursor::new(data.clone()),
                )
                .await?;
            assert_eq!(info.size, 64 << 20);
            // The guest computes the checksum of what it stored...
            let out = guest
                .start_process(&StartProcess {
                    cmd: "sha256sum".into(),
                    args: vec!["/home/user/big.bin".into()],
                    ..Default::default()
                })
                .await?
                .wait()
                .await?;
            assert_eq!(
                text(&out.stdout).split_whitespace().next(),
                Some(want.as_str())
            );
            // ...and reading it back streams the same bytes.
            let mut content = guest.read_file("/home/user/big.bin", None).await?;
            assert_eq!(content.size(), Some(64 << 20));
            let mut h = Sha256::new();
            let mut n = 0usize;
            while let Some(chunk) = content.next().await {
                let chunk = chunk?;
                n += chunk.len();
                h.update(&chunk);
            }
            assert_eq!(n, 64 << 20);
            assert_eq!(hex(&h.finalize()), want);
            // Small files, listing, stat, mkdir, rename, remove.
            guest
                .write_file(
                    "/tmp/a/b/c.txt",
                    &WriteOptions {
                        mode: Some(0o600),
                        ..Default::default()
                    },
                    std::io::Cursor::new(b"hello".to_vec()),
                )
                .await?;
            let st = guest.stat("/tmp/a/b/c.txt", None).await?;
            assert_eq!((st.size, st.mode & 0o777), (5, 0o600));
            let names: Vec<_> = guest
                .list_dir("/tmp/a/b", None)
                .await?
                .into_iter()
                .map(|e| e.name)
                .collect();
            assert_eq!(names, vec!["c.txt".to_owned()]);
            let missing = guest.stat("/tmp/nope", None).await.unwrap_err();
            assert_eq!(
                missing.code().map(|c| c.as_str().to_owned()),
                Some("not_found".into())
            );
            anyhow::Ok(())
        }
        .await;
        let problems = sb.teardown().await;
        result.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    });
}

#[test]
fn two_sandboxes_at_once_have_the_same_guest_ip_in_different_namespaces_root_vm() {
    require_vm!();
    runtime().block_on(async {
        let image = image().unwrap();
        let (mut a, mut b) = (LocalSandbox::new(), LocalSandbox::new());
        let env_a: BTreeMap<_, _> = [("WHO".to_owned(), "a".to_owned())].into();
        let env_b: BTreeMap<_, _> = [("WHO".to_owned(), "b".to_owned())].into();
        let (ra, rb) = tokio::join!(
            a.boot(&image, 1, 256, &env_a),
            b.boot(&image, 1, 256, &env_b)
        );
        let result = async {
            ra?;
            rb?;
            assert_ne!(
                a.slot().unwrap().netns_name(),
                b.slot().unwrap().netns_name()
            );
            for (sb, who) in [(&a, "a"), (&b, "b")] {
                let out = sb
                    .guest()
                    .start_process(&StartProcess {
                        cmd: "sh".into(),
                        args: vec![
                            "-c".into(),
                            "echo $WHO $(ip -4 -o addr show eth0 | awk '{print $4}')".into(),
                        ],
                        ..Default::default()
                    })
                    .await?
                    .wait()
                    .await?;
                assert_eq!(text(&out.stdout), format!("{who} 169.254.0.21/30\n"));
            }
            anyhow::Ok(())
        }
        .await;
        let (pa, pb) = (a.vm().map(|v| v.pid()), b.vm().map(|v| v.pid()));
        let names: Vec<String> = [a.slot(), b.slot()]
            .iter()
            .flatten()
            .map(|s| s.netns_name().to_owned())
            .collect();
        let mut problems = a.teardown().await;
        problems.extend(b.teardown().await);
        result.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        for pid in [pa, pb].into_iter().flatten() {
            assert!(!pid_alive(pid), "VMM {pid} still running");
        }
        for n in names {
            assert!(!netns_exists(&n), "{n} left behind");
        }
    });
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
