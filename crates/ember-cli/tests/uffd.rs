//! `ember uffd` as the host agent runs it: a separate process that prints
//! `ready`, serves a VMM (played by `ember-uffd-peer`, which maps and hands
//! over guest memory exactly as Firecracker does) and exits with a status
//! that says how it ended.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_snapshot::{Base, BuildInfo, BuildStore, ImageKind};
use ember_testkit::require;
use ember_types::BuildId;

const PAGE: u64 = 4096;
const SIZE: u64 = 8 << 20;

/// The stand-in VMM, built next to this test by a workspace test run.
fn peer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("ember-uffd-peer")
}

fn can_run() -> bool {
    ember_testkit::is_root() && Path::new("/dev/userfaultfd").exists()
}

fn image_bytes() -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..SIZE / 8)
        .flat_map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // A run of zero pages every 64 pages, as a guest image has.
            let v = if (i * 8 / PAGE) % 64 < 4 { 0 } else { x };
            v.to_le_bytes()
        })
        .collect()
}

/// Start `ember uffd` with `args` and wait for its `ready` line.
fn start(args: &[&std::ffi::OsStr]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--log")
        .arg("info")
        .arg("uffd")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready socket="), "first line: {line:?}");
    (child, out)
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut s).unwrap();
    s
}

fn peer(socket: &Path, expected: &Path, steps: &[&str]) -> Command {
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--socket")
        .arg(socket)
        .arg("--regions")
        .arg(SIZE.to_string())
        .arg("--expected")
        .arg(expected)
        .args(["--threads", "2", "--order", "random"])
        .args(steps);
    cmd
}

#[test]
fn serves_a_build_records_its_working_set_then_prefetches_it() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    require!(
        peer_bin().exists(),
        "needs {} (built by a workspace test run)",
        peer_bin().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let store = BuildStore::open(dir.path()).unwrap();
    let image = image_bytes();
    let full = dir.path().join("full.img");
    std::fs::write(&full, &image).unwrap();
    let build = BuildId::new();
    let mut w = store.begin(build, BuildInfo::default()).unwrap();
    w.write_image_from_full(ImageKind::Memory, Base::Fresh { block_size: PAGE }, &full)
        .unwrap();
    w.commit().unwrap();
    let socket = dir.path().join("uffd.sock");
    let metrics = dir.path().join("metrics.json");
    let build_arg = build.to_string();
    let base: Vec<&std::ffi::OsStr> = vec![
        "--socket".as_ref(),
        socket.as_os_str(),
        "--build".as_ref(),
        build_arg.as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
        "--metrics-file".as_ref(),
        metrics.as_os_str(),
    ];

    // First restore records the working set: the first half of memory.
    let mut args = base.clone();
    args.push("--record-working-set".as_ref());
    let (mut server, _out) = start(&args);
    assert!(socket.exists(), "socket listens once ready is printed");
    let status = peer(&socket, &full, &["verify:0:4194304"])
        .status()
        .unwrap();
    assert!(status.success(), "VMM saw wrong bytes");
    let status = wait(&mut server);
    assert!(
        status.success(),
        "exit 0 after the VMM exited: {}",
        stderr_of(&mut server)
    );
    let ws = store.build_dir(build).join("working-set");
    let recorded = ember_uffd::WorkingSet::read(&ws)
        .unwrap()
        .expect("working set written into the build");
    assert_eq!(recorded.bytes(), SIZE / 2);
    assert!(!socket.exists(), "socket removed");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(
        m["faults"],
        SIZE / 2 / PAGE,
        "no read-ahead while recording: {m}"
    );

    // Second restore prefetches it; the build is still intact for verify.
    let (mut server, _out) = start(&base);
    let status = peer(&socket, &full, &["verify"]).status().unwrap();
    assert!(status.success(), "VMM saw wrong bytes");
    assert!(wait(&mut server).success());
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert!(m["pages_prefetched"].as_u64().unwrap() > 0, "{m}");
    store
        .verify(build)
        .expect("the sidecar leaves the committed build valid");
}

#[test]
fn an_unreadable_build_kills_the_vmm_and_exits_nonzero() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    require!(
        peer_bin().exists(),
        "needs {} (built by a workspace test run)",
        peer_bin().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let memfile = dir.path().join("mem");
    std::fs::write(&memfile, image_bytes()).unwrap();
    let expected = dir.path().join("expected");
    std::fs::write(&expected, image_bytes()).unwrap();
    let socket = dir.path().join("uffd.sock");
    let (mut server, _out) = start(&[
        "--socket".as_ref(),
        socket.as_os_str(),
        "--memfile".as_ref(),
        memfile.as_os_str(),
        "--readahead".as_ref(),
        "4096".as_ref(),
    ]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memfile)
        .unwrap()
        .set_len(SIZE / 2)
        .unwrap();
    let status = peer(&socket, &expected, &["verify"]).status().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the VMM was killed: {status:?}"
    );
    let status = wait(&mut server);
    assert_eq!(status.code(), Some(1));
    let err = stderr_of(&mut server);
    assert!(
        err.contains("cannot serve") && err.contains(&memfile.display().to_string()),
        "{err}"
    );
}

#[test]
fn sigterm_kills_the_vmm_and_exits_zero() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    require!(
        peer_bin().exists(),
        "needs {} (built by a workspace test run)",
        peer_bin().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let memfile = dir.path().join("mem");
    std::fs::write(&memfile, image_bytes()).unwrap();
    let socket = dir.path().join("uffd.sock");
    let (mut server, _out) = start(&[
        "--socket".as_ref(),
        socket.as_os_str(),
        "--memfile".as_ref(),
        memfile.as_os_str(),
    ]);
    let mut vmm = peer(&socket, &memfile, &["verify:0:1048576", "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(vmm.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "holding");
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(wait(&mut server).success());
    let status = wait(&mut vmm);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the VMM was killed with its page server: {status:?}"
    );
    let _ = vmm.stdin.take().map(|mut s| s.write_all(b"\n"));
}
