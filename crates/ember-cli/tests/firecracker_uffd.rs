//! `ember uffd` against a real Firecracker: boot a tiny guest
//! (`tests/guest/pattern.S`) that fills 16 MiB and keeps printing a
//! checksum of it, snapshot it, store the snapshot's memory as a build, and
//! restore it with the `Uffd` memory backend served by `ember uffd`. The
//! restored guest re-reads every page through the page server and must keep
//! printing the right checksum. Needs `EMBER_FIRECRACKER_BIN`, `/dev/kvm`,
//! and binutils (`as`, `ld`); skips with the reason otherwise.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_snapshot::{Base, BuildInfo, BuildStore, ImageKind};
use ember_testkit::require;
use ember_types::BuildId;

const BASE: u64 = 0x80_0000;
const BYTES: u64 = 0x100_0000;
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// The checksum pattern.S prints while its memory is intact.
fn expected_sum() -> String {
    let sum = (BASE..BASE + BYTES)
        .step_by(4096)
        .map(|a| a.wrapping_mul(MUL) ^ a)
        .fold(0u64, |h, w| h.rotate_left(7).wrapping_add(w));
    format!("sum={sum:016x}")
}

fn build_guest(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let object = dir.join("pattern.o");
    let elf = dir.join("pattern.elf");
    let ok = Command::new("as")
        .args(["--64", "-o"])
        .arg(&object)
        .arg(src.join("pattern.S"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "assembling the guest failed");
    let ok = Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-n",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
            "--build-id=none",
            "-T",
        ])
        .arg(src.join("pattern.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&object)
        .status()
        .unwrap()
        .success();
    assert!(ok, "linking the guest failed");
    elf
}

fn has_tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One Firecracker process, its API socket and its serial output (stdout).
struct Firecracker {
    child: Child,
    api: PathBuf,
    serial: PathBuf,
}

impl Firecracker {
    fn start(bin: &Path, dir: &Path, name: &str) -> Firecracker {
        let api = dir.join(format!("{name}.api"));
        let serial = dir.join(format!("{name}.serial"));
        let child = Command::new(bin)
            .arg("--api-sock")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&serial).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&api).is_err() {
            assert!(
                Instant::now() < deadline,
                "Firecracker API socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Firecracker { child, api, serial }
    }

    /// One API request; panics unless Firecracker answers 2xx.
    fn call(&self, method: &str, path: &str, body: &str) {
        let mut s = UnixStream::connect(&self.api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut answer = vec![0u8; length];
        reader.read_exact(&mut answer).unwrap();
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!(
            (200..300).contains(&code),
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Wait until the serial output has `n` checksum lines; returns them.
    fn wait_for_sums(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let sums: Vec<String> = self
                .serial()
                .lines()
                .filter(|l| l.starts_with("sum=") && l.len() == 20)
                .map(str::to_owned)
                .collect();
            if sums.len() >= n {
                return sums;
            }
            assert!(
                Instant::now() < deadline,
                "guest printed {} checksums, not {n}: {:?}",
                sums.len(),
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Snapshot {
    dir: tempfile::TempDir,
    fc: PathBuf,
    vmstate: PathBuf,
    data: PathBuf,
    build: BuildId,
}

/// Boot the guest, wait for its first checksum, pause, take a full
/// snapshot, and store its memory as a build.
fn boot_and_snapshot(fc: PathBuf) -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    let guest = build_guest(dir.path());
    let vmstate = dir.path().join("vmstate");
    let memfile = dir.path().join("memfile");
    {
        let vm = Firecracker::start(&fc, dir.path(), "boot");
        vm.call(
            "PUT",
            "/boot-source",
            &format!(
                r#"{{"kernel_image_path":"{}","boot_args":""}}"#,
                guest.display()
            ),
        );
        vm.call(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":32}"#,
        );
        vm.call("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        let sums = vm.wait_for_sums(1, Duration::from_secs(120));
        assert_eq!(sums[0], expected_sum(), "the booted guest's own checksum");
        vm.call("PATCH", "/vm", r#"{"state":"Paused"}"#);
        vm.call(
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
                vmstate.display(),
                memfile.display()
            ),
        );
    }
    let data = dir.path().join("data");
    let store = BuildStore::open(&data).unwrap();
    let build = BuildId::new();
    let mut w = store.begin(build, BuildInfo::default()).unwrap();
    w.write_image_from_full(
        ImageKind::Memory,
        Base::Fresh { block_size: 4096 },
        &memfile,
    )
    .unwrap();
    w.commit().unwrap();
    Snapshot {
        dir,
        fc,
        vmstate,
        data,
        build,
    }
}

/// Start `ember uffd` for the snapshot's build with `extra` flags; wait for `ready`.
fn start_page_server(snap: &Snapshot, extra: &[&str]) -> (Child, PathBuf) {
    let socket = snap.dir.path().join("uffd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--log", "info", "uffd", "--socket"])
        .arg(&socket)
        .arg("--build")
        .arg(snap.build.to_string())
        .arg("--data-dir")
        .arg(&snap.data)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(snap.dir.path().join("uffd.log")).unwrap())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("ready "), "{ready:?}");
    (server, socket)
}

fn restore(snap: &Snapshot, socket: &Path) -> Firecracker {
    let vm = Firecracker::start(&snap.fc, snap.dir.path(), "restore");
    vm.call(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true}}"#,
            snap.vmstate.display(),
            socket.display()
        ),
    );
    vm
}

fn wait_exit(server: &mut Child, snap: &Snapshot) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "ember uffd did not exit after Firecracker did"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(snap.dir.path().join("uffd.log")).unwrap_or_default();
    assert!(status.success(), "ember uffd: {status:?}\n{log}");
}

fn preconditions() -> Option<PathBuf> {
    let fc = ember_testkit::firecracker_bin();
    let ok = fc.is_some()
        && Path::new("/dev/kvm").exists()
        && ember_testkit::is_root()
        && has_tool("as")
        && has_tool("ld");
    ok.then(|| fc.unwrap())
}

const NEEDS: &str =
    "needs a Firecracker binary in EMBER_FIRECRACKER_BIN, /dev/kvm, root and binutils (as, ld)";

#[test]
fn a_firecracker_snapshot_restores_through_ember_uffd() {
    let fc = preconditions();
    require!(fc.is_some(), "{NEEDS}");
    let snap = boot_and_snapshot(fc.unwrap());
    let metrics = snap.dir.path().join("metrics.json");
    let (mut server, socket) =
        start_page_server(&snap, &["--metrics-file", metrics.to_str().unwrap()]);
    let vm = restore(&snap, &socket);
    let want = expected_sum();
    let sums = vm.wait_for_sums(2, Duration::from_secs(120));
    assert!(
        sums.iter().all(|s| *s == want),
        "restored guest's checksums {sums:?}, want {want}"
    );
    drop(vm);
    // The VMM is gone: the page server exits 0 and leaves its metrics.
    wait_exit(&mut server, &snap);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert!(
        m["pages_copied"].as_u64().unwrap() >= BYTES / 4096,
        "every pattern page came from the page server: {m}"
    );
    eprintln!("restored guest printed {sums:?}; page server metrics: {m}");
}

#[test]
fn dirty_tracking_on_firecrackers_own_userfaultfd_sees_the_stack_and_not_the_reads() {
    let fc = preconditions();
    require!(fc.is_some(), "{NEEDS}");
    let snap = boot_and_snapshot(fc.unwrap());
    let control = snap.dir.path().join("control.sock");
    let (mut server, socket) = start_page_server(
        &snap,
        &[
            "--dirty-tracking",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    let vm = restore(&snap, &socket);
    vm.wait_for_sums(2, Duration::from_secs(120));
    vm.call("PATCH", "/vm", r#"{"state":"Paused"}"#);
    let mut client = ember_uffd::control::ControlClient::connect(&control).unwrap();
    let answer = client
        .request(&ember_uffd::control::Request::Dirty)
        .unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let ranges: Vec<(u64, u64)> = answer["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect();
    // The guest's stack (its .bss page at 0x101000) is written on every
    // call; the 16 MiB it only re-reads after the restore is not.
    let stack = 0x10_1000;
    assert!(
        ranges.iter().any(|&(o, l)| o <= stack && stack < o + l),
        "stack page not dirty: {ranges:?}"
    );
    assert!(
        ranges
            .iter()
            .all(|&(o, l)| o + l <= BASE || o >= BASE + BYTES),
        "pages only read reported dirty: {ranges:?}"
    );
    eprintln!("dirty after restore: {ranges:?}");
    drop(client);
    drop(vm);
    wait_exit(&mut server, &snap);
}
