//! Test support: the two targets the suite runs against, per-test
//! directories, raw API requests, and leak checks.

pub mod guest;
pub mod uffd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_vmm::firecracker::{ApiTimeouts, FirecrackerConfig, FirecrackerVmm};
use ember_vmm::layout::{RunLayout, entry};
use ember_vmm::{DiskFormat, DriveSpec, Launch, MachineSpec, VmConfig};

/// What the suite drives: the fake (always) or a real Firecracker binary.
#[derive(Debug, Clone)]
pub enum Target {
    Fake(PathBuf),
    Real(PathBuf),
}

impl Target {
    pub fn fake() -> Self {
        Target::Fake(PathBuf::from(env!("CARGO_BIN_EXE_ember-fc-fake")))
    }

    pub fn real() -> Option<Self> {
        ember_testkit::firecracker_bin().map(Target::Real)
    }

    pub fn is_real(&self) -> bool {
        matches!(self, Target::Real(_))
    }

    pub fn binary(&self) -> &Path {
        match self {
            Target::Fake(p) | Target::Real(p) => p,
        }
    }

    pub fn config(&self) -> FirecrackerConfig {
        FirecrackerConfig {
            binary: Some(self.binary().to_owned()),
            timeouts: ApiTimeouts {
                call: Duration::from_secs(10),
                snapshot: Duration::from_secs(60),
            },
            ..FirecrackerConfig::default()
        }
    }

    pub fn vmm(&self) -> FirecrackerVmm {
        FirecrackerVmm::new(self.config())
    }

    /// Say (in the test output) which assertions the fake cannot make.
    pub fn note_skipped(&self, what: &str) {
        if !self.is_real() {
            eprintln!(
                "fake target: not checking {what} (needs a real guest; runs against EMBER_FIRECRACKER_BIN)"
            );
        }
    }
}

/// A VMM process started by hand (no driver, no namespaces) for talking to
/// its API directly. Killed on drop.
#[derive(Debug)]
pub struct BareVmm {
    pub child: std::process::Child,
    pub socket: PathBuf,
    pub client: ember_vmm::firecracker::ApiClient,
}

impl BareVmm {
    pub async fn start(target: &Target, dir: &Path, id: &str) -> Self {
        let socket = dir.join(format!("{id}.sock"));
        let child = std::process::Command::new(target.binary())
            .args(["--api-sock", socket.to_str().unwrap(), "--id", id])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let client = ember_vmm::firecracker::ApiClient::new(&socket, ApiTimeouts::default());
        let started = Instant::now();
        while client.describe_instance().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "no API socket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            child,
            socket,
            client,
        }
    }
}

impl Drop for BareVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A test's private directory with the guest kernel and a root drive.
#[derive(Debug)]
pub struct Env {
    pub dir: tempfile::TempDir,
    pub kernel: PathBuf,
    pub root_drive: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ember-fc-test-")
            .tempdir()
            .unwrap();
        let kernel = guest::build(dir.path());
        let root_drive = dir.path().join("root.img");
        std::fs::write(&root_drive, vec![0u8; 1 << 20]).unwrap();
        Self {
            dir,
            kernel,
            root_drive,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A launch of the tiny guest with a fresh run directory `run-<name>`.
    pub fn launch(&self, name: &str) -> Launch {
        let run_dir = self.path(&format!("run-{name}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        Launch {
            vm_id: format!("t-{name}-{}", unique()),
            run_dir,
            config: VmConfig {
                machine: MachineSpec {
                    vcpus: 1,
                    memory_mib: guest::MEMORY_MIB,
                },
                kernel: self.kernel.clone(),
                initrd: None,
                kernel_args: "console=ttyS0".into(),
                drives: vec![DriveSpec {
                    id: "root".into(),
                    host_path: self.root_drive.clone(),
                    read_only: false,
                    root: true,
                    format: DiskFormat::Raw,
                    backing: Vec::new(),
                }],
                net: None,
            },
            memory_file: None,
            confinement: None,
        }
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Assert a VM's process is gone and its run directory holds no sockets or
/// mount points any more.
pub fn assert_no_leftovers(run_dir: &Path, pid: u32) {
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "VMM process {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let layout = RunLayout::new(run_dir);
    for name in [
        entry::API_SOCKET,
        entry::VSOCK_SOCKET,
        entry::DRIVES_DIR,
        entry::BOOT_DIR,
        entry::RESTORE_DIR,
        entry::SNAPSHOT_DIR,
    ] {
        assert!(
            !layout.host(name).exists(),
            "{} left behind",
            layout.host(name).display()
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&run_dir.display().to_string()),
        "a mount of the run directory leaked into the test's namespace"
    );
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A raw request with any body, for checking what the VMM refuses.
pub async fn raw_request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    driver.abort();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The data extents (offset, length) of a sparse file.
pub fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a descriptor we hold open.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        out.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    out
}

/// Write `diff`'s data extents over a copy of `base`: the memory a diff
/// snapshot describes.
pub fn merge(base: &Path, diff: &Path, out: &Path) {
    use std::os::unix::fs::FileExt;
    std::fs::copy(base, out).unwrap();
    let target = std::fs::OpenOptions::new().write(true).open(out).unwrap();
    let source = std::fs::File::open(diff).unwrap();
    for (offset, len) in data_extents(diff) {
        let mut buf = vec![0u8; len as usize];
        source.read_exact_at(&mut buf, offset).unwrap();
        target.write_all_at(&buf, offset).unwrap();
    }
}

/// A network namespace with a TAP device, removed on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tap: &str) -> Self {
        let name = format!("emberfc{}", unique().replace('-', ""));
        run(&["ip", "netns", "add", &name]);
        run(&[
            "ip", "-n", &name, "tuntap", "add", "dev", tap, "mode", "tap",
        ]);
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn inode(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(self.path()).unwrap())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn run(args: &[&str]) {
    let status = std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap();
    assert!(status.success(), "{args:?} failed");
}
