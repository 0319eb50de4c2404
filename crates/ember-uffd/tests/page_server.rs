//! The page server against a real userfaultfd: a child process plays
//! Firecracker (`ember-uffd-peer`: anonymous private guest memory,
//! `UFFD_FEATURE_EVENT_REMOVE`, missing-mode registration, the JSON + fd
//! handshake), touches memory from several threads and checks every byte
//! against the image the build describes. The server runs in this process.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_testkit::require;
use ember_uffd::control::{ControlClient, Request};
use ember_uffd::vmm_side::HugePageReservation;
use ember_uffd::{
    Backing, Config, Ending, Error, Image, Layout, Mapping, Outcome, PageServer, WorkingSet,
};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("EMBER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn can_run() -> bool {
    ember_testkit::is_root() && Path::new("/dev/userfaultfd").exists()
}

/// A build chain on disk: generations 1..=3 each with a packed `memfile`
/// holding only its own blocks, a flattened layout pointing every block at
/// the generation that last wrote it (or at nothing: zeros), and the flat
/// image the guest must see.
struct Chain {
    dir: tempfile::TempDir,
    size: u64,
    layout: Layout,
    files: Vec<PathBuf>,
    expected: PathBuf,
}

/// Deterministic bytes that differ per generation and per block, so a
/// block served from the wrong generation or offset is caught.
fn block_bytes(generation: u64, block: u64) -> Vec<u8> {
    let mut x = (generation << 40) ^ (block.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ 0x1234_5678;
    let mut out = Vec::with_capacity(PAGE as usize);
    for _ in 0..PAGE / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

impl Chain {
    /// `owner(block)`: 0 = zeros, 1..=3 = the generation that last wrote it.
    fn build(size: u64, owner: impl Fn(u64) -> u64) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let blocks = size / PAGE;
        let mut data: Vec<Vec<u8>> = vec![Vec::new(); 3];
        let mut expected = Vec::with_capacity(size as usize);
        let mut mappings: Vec<Mapping> = Vec::new();
        for b in 0..blocks {
            let g = owner(b);
            let (backing, bytes) = if g == 0 {
                (Backing::Zero, vec![0u8; PAGE as usize])
            } else {
                let file = (g - 1) as usize;
                let at = data[file].len() as u64;
                let bytes = block_bytes(g, b);
                data[file].extend_from_slice(&bytes);
                (
                    Backing::File {
                        file,
                        file_offset: at,
                    },
                    bytes,
                )
            };
            expected.extend_from_slice(&bytes);
            let joins = mappings
                .last()
                .is_some_and(|m: &Mapping| match (m.backing, backing) {
                    (Backing::Zero, Backing::Zero) => true,
                    (
                        Backing::File {
                            file: f1,
                            file_offset: o1,
                        },
                        Backing::File {
                            file: f2,
                            file_offset: o2,
                        },
                    ) => f1 == f2 && o1 + m.length == o2,
                    _ => false,
                });
            if joins {
                mappings.last_mut().unwrap().length += PAGE;
            } else {
                mappings.push(Mapping {
                    offset: b * PAGE,
                    length: PAGE,
                    backing,
                });
            }
        }
        let files: Vec<PathBuf> = (1..=3)
            .map(|g| {
                let p = dir.path().join(format!("gen{g}.memfile"));
                std::fs::write(&p, &data[g - 1]).unwrap();
                p
            })
            .collect();
        let expected_path = dir.path().join("expected.img");
        std::fs::write(&expected_path, &expected).unwrap();
        let layout = Layout::new(size, mappings, 3).unwrap();
        Chain {
            dir,
            size,
            layout,
            files,
            expected: expected_path,
        }
    }

    /// Three generations over `size` bytes with runs of zeros: generation 1
    /// wrote most blocks, 2 rewrote some runs, 3 rewrote others, and
    /// several runs were never written at all.
    fn three_generations(size: u64) -> Chain {
        Chain::build(size, |b| {
            let h = b.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 59; // 0..32, changes per block
            match (b / 7) % 11 {
                0 | 5 => 0,
                3 | 8 => 2,
                6 => 3,
                _ if h < 3 => 3,
                _ if h < 6 => 0,
                _ => 1,
            }
        })
    }

    fn image(&self) -> Image {
        Image::open("test-build", Arc::new(self.layout.clone()), &self.files).unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("uffd.sock")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn expected_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.expected).unwrap()
    }
}

/// Start a server on `chain`'s socket in a thread.
fn serve(chain: &Chain, config: Config) -> JoinHandle<Result<Outcome, Error>> {
    let server = PageServer::bind(&chain.socket(), chain.image(), config).unwrap();
    assert!(chain.socket().exists(), "socket exists once bind returns");
    std::thread::spawn(move || server.accept()?.wait())
}

fn peer(chain: &Chain, regions: &[u64], extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember-uffd-peer"));
    let regions: Vec<String> = regions.iter().map(|r| r.to_string()).collect();
    cmd.arg("--socket")
        .arg(chain.socket())
        .arg("--regions")
        .arg(regions.join(","))
        .arg("--expected")
        .arg(&chain.expected)
        .args(extra);
    cmd
}

fn run_peer(mut cmd: Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    if !out.status.success() {
        eprintln!("peer stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

fn join(server: JoinHandle<Result<Outcome, Error>>) -> Result<Outcome, Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.is_finished() {
        assert!(
            Instant::now() < deadline,
            "page server did not exit within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    server.join().unwrap()
}

fn write_offsets(path: &Path, offsets: &[u64]) {
    let text: String = offsets.iter().map(|o| format!("{o}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn multi_generation_image_with_zero_runs_is_served_exactly_across_two_regions() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::three_generations(12 * MIB);
    let server = serve(&chain, Config::default());
    let out = run_peer(peer(
        &chain,
        &[4 * MIB, 8 * MIB],
        &["--threads", "4", "--order", "random", "verify"],
    ));
    assert!(out.status.success(), "peer saw wrong bytes");
    let outcome = join(server).unwrap();
    assert_eq!(outcome.ending, Ending::PeerExited);
    let m = &outcome.metrics;
    assert_eq!(
        m.pages_copied + m.pages_zeroed,
        chain.size / PAGE,
        "every page populated exactly once: {m:?}"
    );
    assert_eq!(m.eexist, 0, "no page copied twice: {m:?}");
    assert!(m.pages_zeroed > 0, "the chain has zero runs: {m:?}");
    assert!(
        m.faults > 0 && m.faults < chain.size / PAGE,
        "read-ahead serves several pages per fault: {m:?}"
    );
    assert!(
        !chain.socket().exists(),
        "socket removed once the VMM connected"
    );
}

#[test]
fn faults_without_read_ahead_and_racing_threads_copy_each_page_once() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::three_generations(8 * MIB);
    let config = Config {
        readahead: PAGE,
        readahead_max: PAGE,
        ..Config::default()
    };
    let server = serve(&chain, config);
    // Every thread reads every page in the same order: faults on one page
    // from several threads at once.
    let out = run_peer(peer(
        &chain,
        &[8 * MIB],
        &["--threads", "4", "--order", "random", "--overlap", "verify"],
    ));
    assert!(out.status.success(), "peer saw wrong bytes");
    let m = join(server).unwrap().metrics;
    assert_eq!(m.pages_copied + m.pages_zeroed, chain.size / PAGE, "{m:?}");
    assert_eq!(m.eexist, 0, "{m:?}");
    assert!(
        m.faults >= chain.size / PAGE,
        "one fault per page at least: {m:?}"
    );
}

#[test]
fn removed_ranges_read_as_zeros_afterwards() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::build(8 * MIB, |_| 1);
    let server = serve(&chain, Config::default());
    // Populate the first half, give back a populated range and a range
    // never touched (crossing a read-ahead window), then read everything.
    let steps = [
        "--threads",
        "2",
        "verify:0:4194304",
        "discard:1048576:65536",
        "discard:5251072:131072",
        "verify",
    ];
    let out = run_peer(peer(&chain, &[8 * MIB], &steps));
    assert!(out.status.success(), "peer saw wrong bytes after REMOVE");
    let m = join(server).unwrap().metrics;
    assert_eq!(m.remove_events, 2, "{m:?}");
    assert_eq!(m.bytes_removed, 65536 + 131072, "{m:?}");
    // The populated removed range faulted back in as zeros.
    assert!(m.pages_zeroed >= (65536 + 131072) / PAGE, "{m:?}");
}

#[test]
fn a_build_that_cannot_be_read_kills_the_vmm_and_names_build_and_offset() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::build(4 * MIB, |_| 1);
    let server = serve(
        &chain,
        Config {
            readahead: PAGE,
            readahead_max: PAGE,
            ..Config::default()
        },
    );
    // The build loses its second half after the server opened it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&chain.files[0])
        .unwrap();
    f.set_len(2 * MIB).unwrap();
    let mut child = peer(
        &chain,
        &[4 * MIB],
        &["verify:0:1048576", "verify:3145728:4096", "hold"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the VMM was killed: {status:?}"
    );
    let err = join(server).unwrap_err();
    match &err {
        Error::FailedClosed { build, offset, .. } => {
            assert_eq!(build, "test-build");
            assert_eq!(*offset, 3 * MIB);
        }
        other => panic!("expected FailedClosed, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("test-build") && msg.contains("0x300000"),
        "{msg}"
    );
}

#[test]
fn regions_the_header_does_not_cover_kill_the_vmm_at_handshake() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::build(2 * MIB, |_| 1);
    let server = serve(&chain, Config::default());
    let mut child = peer(&chain, &[2 * MIB, 2 * MIB], &["hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let err = join(server).unwrap_err();
    assert!(err.to_string().contains("does not cover"), "{err}");
}

#[test]
fn the_server_exits_cleanly_when_the_vmm_dies() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::build(4 * MIB, |b| (b % 3 != 0) as u64);
    let server = serve(&chain, Config::default());
    let mut child = peer(&chain, &[4 * MIB], &["verify:0:1048576", "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut child, "holding");
    child.kill().unwrap();
    child.wait().unwrap();
    let outcome = join(server).unwrap();
    assert_eq!(outcome.ending, Ending::PeerExited);
    assert!(outcome.metrics.faults > 0);
}

#[test]
fn working_set_is_recorded_then_prefetched_before_the_guest_touches_it() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::three_generations(16 * MIB);
    let ws_path = chain.path("working-set");
    // A quarter of the pages, in a scattered order, in runs of 1..8.
    let mut touched = Vec::new();
    let mut b = 0u64;
    let mut x = 77u64;
    while b < chain.size / PAGE {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let run = 1 + (x >> 61);
        if (x >> 33).is_multiple_of(4) {
            touched.extend((b..(b + run).min(chain.size / PAGE)).map(|p| p * PAGE));
        }
        b += run;
    }
    let order: Vec<u64> = {
        let mut o = touched.clone();
        let n = o.len();
        for i in (1..n).rev() {
            o.swap(i, (i * 7919 + 13) % (i + 1));
        }
        o
    };
    let list = chain.path("touched");
    write_offsets(&list, &order);
    let touch = format!("touch-list:{}", list.display());

    // First restore: record (no read-ahead, so the set is exactly what was touched).
    let record = Config {
        readahead: PAGE,
        readahead_max: PAGE,
        record_working_set: Some(ws_path.clone()),
        ..Config::default()
    };
    let server = serve(&chain, record);
    assert!(
        run_peer(peer(&chain, &[6 * MIB, 10 * MIB], &[touch.as_str()]))
            .status
            .success()
    );
    let first = join(server).unwrap();
    let ws = WorkingSet::read(&ws_path)
        .unwrap()
        .expect("working set written");
    assert_eq!(Some(&ws), first.working_set.as_ref());
    let recorded: Vec<u64> = ws
        .ranges
        .iter()
        .flat_map(|r| (r.start..r.end).step_by(PAGE as usize))
        .collect();
    assert_eq!(recorded, order, "recorded in first-touch order");

    // Second restore: prefetch it; the guest finds every page already there.
    let prefetch = Config {
        prefetch: Some(ws.clone()),
        record_working_set: Some(ws_path.clone()),
        ..Config::default()
    };
    let server = serve(&chain, prefetch);
    let resident = format!("resident:{}", list.display());
    let out = run_peer(peer(
        &chain,
        &[6 * MIB, 10 * MIB],
        &[resident.as_str(), touch.as_str()],
    ));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("resident {n} of {n}", n = order.len())),
        "{stdout}"
    );
    let second = join(server).unwrap();
    let m = &second.metrics;
    assert_eq!(m.faults, 0, "no page of the working set faulted: {m:?}");
    assert_eq!(m.pages_prefetched, order.len() as u64, "{m:?}");
    // Prefetched pages are not recorded again: the set is unchanged.
    assert_eq!(
        WorkingSet::read(&ws_path).unwrap().unwrap().ranges,
        ws.ranges
    );
}

#[test]
fn write_protect_tracking_reports_exactly_the_pages_written() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let chain = Chain::three_generations(8 * MIB);
    let control = chain.path("control.sock");
    let config = Config {
        dirty_tracking: true,
        control_socket: Some(control.clone()),
        ..Config::default()
    };
    let server = serve(&chain, config);
    // Read the first half (pages arrive write-protected), then write:
    // pages read before, pages never read (missing write faults), and a
    // page inside a run of zeros; then hold so the dirty set can be asked.
    let zero_page = (0..chain.size / PAGE)
        .map(|p| p * PAGE)
        .find(|&p| {
            p >= 5 * MIB
                && chain.expected_bytes()[p as usize..(p + PAGE) as usize]
                    .iter()
                    .all(|b| *b == 0)
        })
        .expect("a zero page in the second half");
    let steps = [
        "--threads".to_string(),
        "2".into(),
        "verify:0:4194304".into(),
        "write:40960:12288".into(),
        "write:1048576:4096".into(),
        "write:4456448:8192".into(),
        format!("write:{zero_page}:4096"),
        "verify".into(),
        "hold".into(),
    ];
    let steps: Vec<&str> = steps.iter().map(|s| s.as_str()).collect();
    let mut child = peer(&chain, &[8 * MIB], &steps)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for_line(&mut child, "holding");
    let mut client = ControlClient::connect(&control).unwrap();
    let answer = client.request(&Request::Dirty).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let got: Vec<(u64, u64)> = answer["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect();
    let mut want = vec![
        (40960, 12288),
        (1048576, 4096),
        (4456448, 8192),
        (zero_page, 4096),
    ];
    want.sort();
    assert_eq!(got, want);
    let metrics = client.request(&Request::Metrics).unwrap();
    assert!(
        metrics["metrics"]["write_protect_faults"].as_u64().unwrap() >= 4,
        "{metrics}"
    );
    drop(client);
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(child.wait().unwrap().success(), "peer saw wrong bytes");
    join(server).unwrap();
    assert!(!control.exists(), "control socket removed at exit");
}

#[test]
fn huge_pages_are_served_whole() {
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let reservation = HugePageReservation::reserve(8);
    require!(
        reservation.is_ok(),
        "huge pages cannot be reserved: {}",
        reservation.unwrap_err()
    );
    let chain = Chain::three_generations(16 * MIB);
    let server = serve(&chain, Config::default());
    let out = run_peer(peer(
        &chain,
        &[6 * MIB, 10 * MIB],
        &[
            "--page-size",
            "2097152",
            "--threads",
            "3",
            "--order",
            "random",
            "verify",
        ],
    ));
    assert!(out.status.success(), "peer saw wrong bytes");
    let m = join(server).unwrap().metrics;
    assert_eq!(
        m.pages_copied + m.pages_zeroed,
        8,
        "8 huge pages, each populated once: {m:?}"
    );
    assert_eq!(m.bytes_copied, 16 * MIB, "{m:?}");
}

fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("peer did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for_line(child: &mut Child, want: &str) {
    let stdout = child.stdout.take().expect("peer stdout piped");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "peer exited before printing {want:?}");
        if line.trim() == want {
            break;
        }
    }
    // Keep the pipe open so the peer never sees EPIPE.
    std::mem::forget(reader);
}

#[test]
fn a_diff_build_from_the_build_store_is_served_through_its_header() {
    use ember_snapshot::{Base, BlockSet, BuildInfo, BuildStore, ImageKind};
    use ember_types::BuildId;
    require!(can_run(), "needs root and /dev/userfaultfd");
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let store = BuildStore::open(dir.path()).unwrap();
    let size = 8 * MIB;
    let blocks = size / PAGE;
    // Generation 0: data everywhere but every fifth run of 8 blocks.
    let mut image: Vec<u8> = (0..blocks)
        .flat_map(|b| {
            if (b / 8) % 5 == 0 {
                vec![0u8; PAGE as usize]
            } else {
                block_bytes(1, b)
            }
        })
        .collect();
    let full = dir.path().join("full.img");
    std::fs::write(&full, &image).unwrap();
    let base_id = BuildId::new();
    let mut w = store.begin(base_id, BuildInfo::default()).unwrap();
    w.write_image_from_full(ImageKind::Memory, Base::Fresh { block_size: PAGE }, &full)
        .unwrap();
    w.commit().unwrap();
    // Generation 1: rewrites scattered blocks, some inside the zero runs.
    let dirty: BlockSet = (0..blocks).filter(|b| b % 13 == 0 || b % 97 < 3).collect();
    for b in (0..blocks).filter(|b| b % 13 == 0 || b % 97 < 3) {
        image[(b * PAGE) as usize..((b + 1) * PAGE) as usize].copy_from_slice(&block_bytes(2, b));
    }
    let parent = store.open_header(base_id, ImageKind::Memory).unwrap();
    let diff_id = BuildId::new();
    let info = BuildInfo {
        parent: Some(base_id),
        ..BuildInfo::default()
    };
    let mut w = store.begin(diff_id, info).unwrap();
    let snapshot = image.clone();
    w.write_image_from_blocks(
        ImageKind::Memory,
        Base::Parent(&parent),
        size,
        &dirty,
        |off, buf| {
            buf.copy_from_slice(&snapshot[off as usize..off as usize + buf.len()]);
            Ok(())
        },
    )
    .unwrap();
    w.commit().unwrap();

    let served = ember_uffd::build::open(&store, diff_id).unwrap();
    assert_eq!(served.name(), diff_id.to_string());
    let expected = dir.path().join("expected.img");
    std::fs::write(&expected, &image).unwrap();
    let socket = dir.path().join("uffd.sock");
    let server = PageServer::bind(&socket, served, Config::default()).unwrap();
    let server = std::thread::spawn(move || server.accept()?.wait());
    let out = run_peer({
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember-uffd-peer"));
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--regions")
            .arg(size.to_string())
            .arg("--expected")
            .arg(&expected)
            .args(["--threads", "2", "--order", "random", "verify"]);
        cmd
    });
    assert!(out.status.success(), "peer saw wrong bytes");
    let m = join(server).unwrap().metrics;
    assert_eq!(m.pages_copied + m.pages_zeroed, blocks, "{m:?}");
    assert_eq!(
        ember_uffd::build::working_set_path(&store, diff_id),
        store.build_dir(diff_id).join("working-set")
    );
}
