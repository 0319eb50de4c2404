//! Restore-and-touch benchmark: how fast guest memory becomes usable when
//! the page server serves it, against the kernel serving a private file
//! mapping (Firecracker's `File` backend) and against memcpy (the limit).
//!
//! `cargo bench -p ember-uffd --bench restore` (as root: userfaultfd, and
//! huge pages are reserved for the 2 MiB case). `EMBER_BENCH_MIB` sets the
//! image size (default 1024), `EMBER_BENCH_RUNS` the runs per cell
//! (default 3; the median is shown).
//!
//! Every case maps fresh guest memory, restores it, and touches every page
//! of a touch list (all pages in address order, all in random order, or a
//! recorded working set in its recorded order) from 1 or 2 threads, each
//! thread taking its own contiguous share of the list. The clock runs from before
//! the memory is mapped until the last page is touched.
//!
//! The flat cases serve one file holding the whole image. Production
//! resumes serve a chain of builds from `ember-snapshot`'s build store, each
//! generation a diff over its parent, so the chain case (`== 5-generation
//! chain (sparse diffs) ==`) writes such a chain of the same size into a
//! build store under the data directory: generation 0 a full build of the
//! flat image, generations 1..=4 diffs that each rewrite about 5 % of the
//! pages in short scattered runs. Its last build is served through
//! `ember_uffd::build::open`, as the agent serves it, after one check that
//! the served memory equals the final image. It is touched in address
//! order, in random order (by reads and by writes) and in a recorded
//! working set's order, lazily and with that set prefetched, from a warm
//! and from a cold page cache, against the same page server serving a flat
//! file of the final image, the kernel faulting that flat file in, and
//! memcpy of it.
//!
//! `EMBER_BENCH_ONLY=<substring>` runs only the blocks whose names contain
//! it: `sequential-1`, `random-2`, `dirty-sequential`, `ws-1`, `ws-cold`,
//! `chain/sequential`, `chain/random`, `chain/ws`, `chain/cold` (so
//! `chain` runs the whole chain case).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_snapshot::{Base, BlockSet, BuildInfo, BuildStore, ImageKind};
use ember_types::BuildId;
use ember_uffd::vmm_side::{GuestMemory, HugePageReservation};
use ember_uffd::{Config, Image, Layout, PageServer, WorkingSet};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy)]
struct Ptr(*mut u8);
// SAFETY: the benchmark shares mapped memory between its touch threads;
// each thread only reads or writes through volatile accesses.
unsafe impl Send for Ptr {}
// SAFETY: as above.
unsafe impl Sync for Ptr {}

impl Ptr {
    /// A method, so closures capture the whole `Ptr` (which is Send), not its field.
    fn at(self, off: u64) -> *mut u8 {
        self.0.wrapping_add(off as usize)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Touch {
    Read,
    Write,
}

/// Touch every page of `order` at `base + offset` from `threads` threads.
fn touch(base: Ptr, order: &[u64], threads: usize, how: Touch) -> u64 {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut sum = 0u64;
                    for &off in share(order, t, threads) {
                        let p = base.at(off);
                        // SAFETY: `off` is inside the mapping `base` starts.
                        unsafe {
                            match how {
                                Touch::Read => {
                                    sum = sum.wrapping_add(p.cast::<u64>().read_volatile())
                                }
                                Touch::Write => p.write_volatile(1),
                            }
                        }
                    }
                    sum
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold(0, u64::wrapping_add)
    })
}

/// Thread `t`'s share of `order`: the `t`-th of `threads` contiguous
/// pieces, as vCPUs each work in their own part of memory.
fn share(order: &[u64], t: usize, threads: usize) -> &[u64] {
    let per = order.len().div_ceil(threads);
    &order[(t * per).min(order.len())..((t + 1) * per).min(order.len())]
}

fn mmap(len: u64, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    // SAFETY: a fresh mapping at a kernel-chosen address.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, flags, fd, 0) };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

fn munmap(p: *mut u8, len: u64) {
    // SAFETY: unmapping a mapping this benchmark made.
    unsafe { libc::munmap(p.cast(), len as usize) };
}

/// A build in a build store, served through its memory header as the agent
/// serves it.
struct Chain {
    store: BuildStore,
    build: BuildId,
    /// The data files of every build the header reads, for evicting them
    /// from the page cache.
    data_files: Vec<PathBuf>,
}

struct Bench {
    size: u64,
    /// The image as one flat file: what the page server serves when there is
    /// no `chain`, and what the kernel and memcpy baselines always read.
    memfile: PathBuf,
    /// Serve this build instead of `memfile`; it holds the same bytes.
    chain: Option<Chain>,
    /// The data directory, owned by the bench that made it; the chain's
    /// benches live inside the flat bench's directory.
    _dir: Option<tempfile::TempDir>,
    runs: usize,
}

impl Bench {
    /// Open what the page server serves: the flat file, or the chain's last
    /// build through its header.
    fn image(&self) -> Image {
        match &self.chain {
            None => {
                let layout = Arc::new(Layout::flat(self.size).unwrap());
                Image::open("bench", layout, std::slice::from_ref(&self.memfile)).unwrap()
            }
            Some(chain) => ember_uffd::build::open(&chain.store, chain.build).unwrap(),
        }
    }

    /// (e) memcpy of the same pages from the file's (populated) mapping into
    /// pre-faulted memory: what copying costs with no faults at all.
    fn memcpy(&self, order: &[u64], threads: usize) -> Duration {
        let file = std::fs::File::open(&self.memfile).unwrap();
        let src = mmap(
            self.size,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
        );
        let dst = mmap(
            self.size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
        );
        let (s, d) = (Ptr(src), Ptr(dst));
        let started = Instant::now();
        std::thread::scope(|sc| {
            for t in 0..threads {
                sc.spawn(move || {
                    for &off in share(order, t, threads) {
                        // SAFETY: both mappings cover `off + PAGE`, and do not overlap.
                        unsafe {
                            std::ptr::copy_nonoverlapping(s.at(off), d.at(off), PAGE as usize)
                        };
                    }
                });
            }
        });
        let t = started.elapsed();
        munmap(src, self.size);
        munmap(dst, self.size);
        t
    }

    /// (a) the kernel: `mmap(MAP_PRIVATE)` of the memory file, then touch.
    fn kernel(&self, order: &[u64], threads: usize, how: Touch) -> Duration {
        let file = std::fs::File::open(&self.memfile).unwrap();
        let started = Instant::now();
        let p = mmap(
            self.size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
        );
        touch(Ptr(p), order, threads, how);
        let t = started.elapsed();
        munmap(p, self.size);
        t
    }

    /// (b)/(c)/(d) the page server: map and register guest memory, open the
    /// build, hand over the userfaultfd, touch.
    fn page_server(
        &self,
        order: &[u64],
        threads: usize,
        page_size: u64,
        config: Config,
        how: Touch,
    ) -> (Duration, ember_uffd::MetricsSnapshot) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("uffd.sock");
        let started = Instant::now();
        let image = self.image();
        let server = PageServer::bind(&socket, image, config).unwrap();
        let serving = std::thread::spawn(move || server.accept().unwrap());
        let mem = GuestMemory::new(&[self.size], page_size).unwrap();
        mem.send_handshake(&socket).unwrap();
        let session = serving.join().unwrap();
        touch(Ptr(mem.addr_of(0)), order, threads, how);
        let t = started.elapsed();
        // This process plays the VMM: unmap, then stop serving.
        drop(mem);
        let metrics = session.detach();
        (t, metrics)
    }

    /// Evict the memory file (and the chain's data files) from the page
    /// cache, as after a reboot or when a snapshot was written long ago: the
    /// next reads come from the disk.
    fn drop_cache(&self) {
        let chain_files = self.chain.iter().flat_map(|c| &c.data_files);
        for path in std::iter::once(&self.memfile).chain(chain_files) {
            let file = std::fs::File::open(path).unwrap();
            file.sync_all().unwrap();
            // SAFETY: a valid open descriptor; the advice only drops clean pages.
            let rc = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            assert_eq!(rc, 0, "posix_fadvise(DONTNEED)");
        }
    }

    /// Whether the memory file's pages are gone from the page cache (a
    /// tmpfs or a file system that ignores the advice keeps them).
    fn cache_dropped(&self) -> bool {
        self.drop_cache();
        let file = std::fs::File::open(&self.memfile).unwrap();
        let p = mmap(
            self.size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
        );
        let pages = self.size.div_ceil(PAGE) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: `p` maps `self.size` bytes; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(p.cast(), self.size as usize, vec.as_mut_ptr()) };
        munmap(p, self.size);
        assert_eq!(rc, 0, "mincore");
        let resident = vec.iter().filter(|b| **b & 1 == 1).count();
        resident * 10 < pages
    }

    fn median(&self, mut f: impl FnMut() -> Duration) -> Duration {
        let mut v: Vec<Duration> = (0..self.runs).map(|_| f()).collect();
        v.sort();
        v[v.len() / 2]
    }
}

fn write_memfile(path: &Path, size: u64) {
    use std::io::Write;
    let mut f =
        std::io::BufWriter::with_capacity(8 * MIB as usize, std::fs::File::create(path).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&(x | 1).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).map(|p| p * PAGE).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// About a quarter of the pages, in runs of 1..=32 pages, runs in random
/// order: the shape of a real working set (kernel text, page tables, heap
/// and page-cache runs), not uniform scatter.
fn working_set_order(pages: u64) -> Vec<u64> {
    let mut runs = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut p = 0;
    while p < pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + x % 32;
        if x >> 62 == 0 {
            runs.push(p..(p + len).min(pages));
        }
        p += len;
    }
    let idx = shuffled(runs.len() as u64, 99);
    idx.iter()
        .flat_map(|i| runs[(i / PAGE) as usize].clone().map(|p| p * PAGE))
        .collect()
}

/// The default configuration, with experiment overrides from the
/// environment (`EMBER_BENCH_SPIN_US`, `EMBER_BENCH_POPULATE=1`).
fn tuned() -> Config {
    let mut c = Config::default();
    if let Some(us) = std::env::var("EMBER_BENCH_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.spin = Duration::from_micros(us);
    }
    if std::env::var("EMBER_BENCH_POPULATE").as_deref() == Ok("1") {
        c.populate_source = true;
    }
    if let Some(n) = std::env::var("EMBER_BENCH_PREFETCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.prefetch_threads = n;
    }
    if let Some(kib) = std::env::var("EMBER_BENCH_BATCH_KIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        c.prefetch_batch = kib * 1024;
    }
    if let Some(kib) = std::env::var("EMBER_BENCH_CHUNK_KIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        c.prefetch_chunk = kib * 1024;
    }
    c
}

fn window_name(ra: u64, max: u64) -> String {
    if ra == max {
        format!("(b) page server 4K, read-ahead {:>4} KiB", ra / 1024)
    } else {
        format!(
            "(b) page server 4K, read-ahead {}K..{}K",
            ra / 1024,
            max / 1024
        )
    }
}

fn fault_note(m: &ember_uffd::MetricsSnapshot) -> String {
    format!(
        "{} faults, mean {:.1} us to serve",
        m.faults, m.fault_latency_mean_us
    )
}

struct Row {
    name: String,
    t: Option<Duration>,
    note: String,
}

fn print_block(
    title: &str,
    bytes: u64,
    rows: &[Row],
    kernel_read: Duration,
    kernel_write: Duration,
    memcpy: Duration,
) {
    println!("\n{title}");
    println!(
        "  {:<44} {:>9} {:>8} {:>11} {:>11} {:>9}",
        "method", "ms", "GiB/s", "x k-read", "x k-write", "x memcpy"
    );
    for r in rows {
        match r.t {
            Some(t) => println!(
                "  {:<44} {:>9.1} {:>8.2} {:>11.2} {:>11.2} {:>9.2}  {}",
                r.name,
                t.as_secs_f64() * 1e3,
                bytes as f64 / (1u64 << 30) as f64 / t.as_secs_f64(),
                kernel_read.as_secs_f64() / t.as_secs_f64(),
                kernel_write.as_secs_f64() / t.as_secs_f64(),
                memcpy.as_secs_f64() / t.as_secs_f64(),
                r.note
            ),
            None => println!("  {:<44} {:>9}  {}", r.name, "-", r.note),
        }
    }
}

fn main() {
    ember_testkit_like_skip();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("EMBER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let size = std::env::var("EMBER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024u64)
        * MIB;
    let runs = std::env::var("EMBER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize);
    let only: Option<String> = std::env::var("EMBER_BENCH_ONLY").ok();
    let dir = tempfile::tempdir_in(
        std::env::var("EMBER_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap();
    let memfile = dir.path().join("memfile");
    write_memfile(&memfile, size);
    // Read it once so the page cache holds it all: every method starts from
    // cached file data.
    let _ = std::fs::read(&memfile).unwrap();
    let bench = Bench {
        size,
        memfile,
        chain: None,
        _dir: Some(dir),
        runs,
    };
    let pages = size / PAGE;
    let huge = HugePageReservation::reserve(size / (2 * MIB) + 8);
    println!(
        "ember-uffd restore benchmark: {} MiB image of non-zero data, data file in the page cache (read once before timing).",
        size / MIB
    );
    println!(
        "Median of {runs} runs per cell. Ratios: how many times faster than the kernel (read / write touch) and than memcpy; > 1 is faster."
    );
    println!(
        "Clock: from mapping guest memory (and, for the page server, opening the build and the handshake) to the last page touched."
    );
    let d = Config::default();
    let read_aheads = [
        (4 * 1024, 4 * 1024),
        (64 * 1024, 64 * 1024),
        (256 * 1024, 256 * 1024),
        (1024 * 1024, 1024 * 1024),
        (d.readahead, d.readahead_max),
    ];
    let seq: Vec<u64> = (0..pages).map(|p| p * PAGE).collect();
    let random = shuffled(pages, 0x5eed);
    for (label, order) in [("sequential", &seq), ("random", &random)] {
        for threads in [1usize, 2] {
            if only
                .as_deref()
                .is_some_and(|o| !format!("{label}-{threads}").contains(o))
            {
                continue;
            }
            let memcpy = bench.median(|| bench.memcpy(order, threads));
            let kr = bench.median(|| bench.kernel(order, threads, Touch::Read));
            let kw = bench.median(|| bench.kernel(order, threads, Touch::Write));
            let mut rows = baseline_rows("(e) memcpy, pre-faulted", memcpy, kr, kw);
            for (ra, max) in read_aheads {
                let mut note = String::new();
                let t = bench.median(|| {
                    let config = Config {
                        readahead: ra,
                        readahead_max: max,
                        ..tuned()
                    };
                    let (t, m) = bench.page_server(order, threads, PAGE, config, Touch::Read);
                    note = fault_note(&m);
                    t
                });
                rows.push(Row {
                    name: window_name(ra, max),
                    t: Some(t),
                    note,
                });
            }
            match &huge {
                Ok(_) => {
                    // Pages fresh in the pool are slow the first time round;
                    // one untimed pass settles them.
                    bench.page_server(order, threads, 2 * MIB, Config::default(), Touch::Read);
                    let mut note = String::new();
                    let t = bench.median(|| {
                        let (t, m) = bench.page_server(
                            order,
                            threads,
                            2 * MIB,
                            Config::default(),
                            Touch::Read,
                        );
                        note = fault_note(&m);
                        t
                    });
                    rows.push(Row {
                        name: "(c) page server 2M huge pages".into(),
                        t: Some(t),
                        note,
                    });
                }
                Err(why) => rows.push(Row {
                    name: "(c) page server 2M huge pages".into(),
                    t: None,
                    note: format!("skipped: {why}"),
                }),
            }
            print_block(
                &format!("== all pages, {label} order, {threads} thread(s) =="),
                size,
                &rows,
                kr,
                kw,
                memcpy,
            );
        }
    }

    // What write-protect dirty tracking costs: the same restore with it off
    // and on, touching by reads (no page gets dirty) and by writes (every
    // page does: one write-protect fault each, except the page whose
    // missing fault brought it in).
    for (label, order) in [("sequential", &seq), ("random", &random)] {
        if only
            .as_deref()
            .is_some_and(|o| !format!("dirty-{label}").contains(o))
        {
            continue;
        }
        let memcpy = bench.median(|| bench.memcpy(order, 1));
        let kr = bench.median(|| bench.kernel(order, 1, Touch::Read));
        let kw = bench.median(|| bench.kernel(order, 1, Touch::Write));
        let mut rows = Vec::new();
        for (tracking, how, name) in [
            (false, Touch::Read, "(b) page server, default, read"),
            (true, Touch::Read, "(b) page server, dirty tracking, read"),
            (false, Touch::Write, "(b) page server, default, write"),
            (true, Touch::Write, "(b) page server, dirty tracking, write"),
        ] {
            let mut note = String::new();
            let t = bench.median(|| {
                let config = Config {
                    dirty_tracking: tracking,
                    ..tuned()
                };
                let (t, m) = bench.page_server(order, 1, PAGE, config, how);
                note = format!(
                    "{} faults, {} write-protect faults",
                    m.faults - m.write_protect_faults,
                    m.write_protect_faults
                );
                t
            });
            rows.push(Row {
                name: name.into(),
                t: Some(t),
                note,
            });
        }
        print_block(
            &format!("== dirty tracking cost: all pages, {label} order, 1 thread =="),
            size,
            &rows,
            kr,
            kw,
            memcpy,
        );
    }

    // (d) A recorded working set: record it on a first restore, then
    // restore again with prefetch and touch exactly those pages.
    let ws_order = working_set_order(pages);
    let ws_bytes = ws_order.len() as u64 * PAGE;
    for threads in [1usize, 2] {
        if only
            .as_deref()
            .is_some_and(|o| !format!("ws-{threads}").contains(o))
        {
            continue;
        }
        let ws_dir = tempfile::tempdir().unwrap();
        let ws_path = ws_dir.path().join("working-set");
        let ws = record_working_set(&bench, &ws_order, threads, &ws_path);
        let memcpy = bench.median(|| bench.memcpy(&ws_order, threads));
        let kr = bench.median(|| bench.kernel(&ws_order, threads, Touch::Read));
        let kw = bench.median(|| bench.kernel(&ws_order, threads, Touch::Write));
        let mut rows = baseline_rows("(e) memcpy, pre-faulted", memcpy, kr, kw);
        let d = Config::default();
        for (ra, max) in [
            (4 * 1024, 4 * 1024),
            (64 * 1024, 64 * 1024),
            (256 * 1024, 256 * 1024),
            (d.readahead, d.readahead_max),
        ] {
            let mut note = String::new();
            let t = bench.median(|| {
                let config = Config {
                    readahead: ra,
                    readahead_max: max,
                    ..tuned()
                };
                let (t, m) = bench.page_server(&ws_order, threads, PAGE, config, Touch::Read);
                note = format!(
                    "{}; {} MiB populated",
                    fault_note(&m),
                    (m.pages_copied + m.pages_zeroed) * PAGE / MIB
                );
                t
            });
            rows.push(Row {
                name: format!("{}, lazy", window_name(ra, max)),
                t: Some(t),
                note,
            });
        }
        let mut note = String::new();
        let prefetched = bench.median(|| {
            let config = Config {
                prefetch: Some(ws.clone()),
                ..tuned()
            };
            let (t, m) = bench.page_server(&ws_order, threads, PAGE, config, Touch::Read);
            note = format!(
                "{} faults; {} MiB prefetched",
                m.faults,
                m.pages_prefetched * PAGE / MIB
            );
            t
        });
        rows.push(Row {
            name: "(d) page server 4K, working-set prefetch".into(),
            t: Some(prefetched),
            note,
        });
        print_block(
            &format!(
                "== recorded working set: {} MiB ({:.0}% of pages), recorded order, {threads} thread(s) ==",
                ws_bytes / MIB,
                100.0 * ws_bytes as f64 / size as f64
            ),
            ws_bytes,
            &rows,
            kr,
            kw,
            memcpy,
        );
    }
    // The chain runs before the cold flat block, which ends the run when the
    // page cache cannot be dropped.
    chain_section(&bench, only.as_deref(), &seq, &random, &ws_order);

    // The same working set with the memory file evicted from the page cache
    // before each run: a restore of a snapshot that is on disk, not in
    // memory (the case REAP and FaaSnap are about). The memcpy baseline
    // stays the cached one: it is the limit, not a method.
    if only.as_deref().is_none_or(|o| "ws-cold".contains(o)) {
        if !bench.cache_dropped() {
            println!(
                "\n== recorded working set, cold page cache: skipped, the data directory keeps evicted pages (tmpfs?); set EMBER_BENCH_DIR to a disk =="
            );
            return;
        }
        let threads = 1;
        let ws_dir = tempfile::tempdir().unwrap();
        let ws_path = ws_dir.path().join("working-set");
        let ws = record_working_set(&bench, &ws_order, threads, &ws_path);
        let memcpy = bench.median(|| bench.memcpy(&ws_order, threads));
        let cold = |f: &mut dyn FnMut() -> Duration| {
            bench.median(|| {
                bench.drop_cache();
                f()
            })
        };
        let kr = cold(&mut || bench.kernel(&ws_order, threads, Touch::Read));
        let kw = cold(&mut || bench.kernel(&ws_order, threads, Touch::Write));
        let mut lazy_note = String::new();
        let lazy = cold(&mut || {
            let (t, m) = bench.page_server(&ws_order, threads, PAGE, tuned(), Touch::Read);
            lazy_note = fault_note(&m);
            t
        });
        let mut ws_note = String::new();
        let prefetched = cold(&mut || {
            let config = Config {
                prefetch: Some(ws.clone()),
                ..tuned()
            };
            let (t, m) = bench.page_server(&ws_order, threads, PAGE, config, Touch::Read);
            ws_note = format!(
                "{} faults; {} MiB prefetched",
                m.faults,
                m.pages_prefetched * PAGE / MIB
            );
            t
        });
        let mut rows = baseline_rows("(e) memcpy, pre-faulted, cached", memcpy, kr, kw);
        rows.extend([
            Row {
                name: "(b) page server 4K, default read-ahead".into(),
                t: Some(lazy),
                note: lazy_note,
            },
            Row {
                name: "(d) page server 4K, working-set prefetch".into(),
                t: Some(prefetched),
                note: ws_note,
            },
        ]);
        print_block(
            &format!(
                "== recorded working set, cold page cache: {} MiB, recorded order, {threads} thread ==",
                ws_bytes / MIB
            ),
            ws_bytes,
            &rows,
            kr,
            kw,
            memcpy,
        );
    }
}

/// Builds in the chain case: a full build and four diffs.
const CHAIN_GENERATIONS: u64 = 5;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The pages diff generation `generation` rewrites: runs of 1..=8 pages
/// with gaps of 0..160 pages between them (about 5 % of the pages), in
/// different places in every generation: a guest's writes between two
/// snapshots are scattered, but come in short runs.
fn diff_runs(pages: u64, generation: u64) -> Vec<Range<u64>> {
    let mut x = (0x51ed_2701_f3a5_c0dd ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut runs = Vec::new();
    let mut p = 0;
    loop {
        p += xorshift(&mut x) % 160;
        if p >= pages {
            return runs;
        }
        let len = 1 + xorshift(&mut x) % 8;
        runs.push(p..(p + len).min(pages));
        p += len;
    }
}

/// What generation `generation` writes into page `page`: non-zero words (a
/// zero page would be stored as nil, not as data), different per
/// generation and page.
fn fill_diff_page(buf: &mut [u8], generation: u64, page: u64) {
    let mut x = ((generation << 48) ^ page ^ 0x2545_f491_4f6c_dd1d) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        chunk.copy_from_slice(&(xorshift(&mut x) | 1).to_le_bytes());
    }
}

/// Write the final image of the chain as one flat file, computed from
/// generation 0's file and the diffs' page sets without the build store (so
/// the check against the served chain is independent of it), front to back
/// in large writes as `write_memfile` writes generation 0: how a file is
/// written decides the size of its page-cache folios, and with it how fast
/// the kernel baseline faults it in.
fn write_final_image(path: &Path, generation_0: &Path, diffs: &[BlockSet]) {
    use std::io::{Read, Write};
    let mut src = std::fs::File::open(generation_0).unwrap();
    let mut dst =
        std::io::BufWriter::with_capacity(8 * MIB as usize, std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; MIB as usize];
    let mut page = 0;
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(n.is_multiple_of(PAGE as usize), "short read of {n} bytes");
        for bytes in buf[..n].chunks_exact_mut(PAGE as usize) {
            // The last generation that wrote the page decides its content.
            if let Some(g) = (1..CHAIN_GENERATIONS)
                .rev()
                .find(|g| diffs[(g - 1) as usize].contains(page))
            {
                fill_diff_page(bytes, g, page);
            }
            page += 1;
        }
        dst.write_all(&buf[..n]).unwrap();
    }
    dst.into_inner().unwrap().sync_all().unwrap();
}

/// Write the chain into a build store next to `flat`'s memory file:
/// generation 0 a full build of that file, generations 1.. diffs over their
/// parents, each written as the agent writes a diff (the dirty blocks, read
/// through a callback); and the final image as a flat file. Returns the
/// bench serving the last build, the bench serving that flat file (both
/// with the flat file as their baseline), and a line describing the chain.
fn build_chain(flat: &Bench) -> (Bench, Bench, String) {
    let dir = flat.memfile.parent().unwrap().join("chain");
    let store = BuildStore::open(&dir).unwrap();
    let pages = flat.size / PAGE;
    let diffs: Vec<BlockSet> = (1..CHAIN_GENERATIONS)
        .map(|g| BlockSet::from_ranges(diff_runs(pages, g)))
        .collect();
    let mut build = BuildId::new();
    let mut w = store.begin(build, BuildInfo::default()).unwrap();
    w.write_image_from_full(
        ImageKind::Memory,
        Base::Fresh { block_size: PAGE },
        &flat.memfile,
    )
    .unwrap();
    w.commit().unwrap();
    for (generation, dirty) in (1..).zip(&diffs) {
        let parent = store.open_header(build, ImageKind::Memory).unwrap();
        let next = BuildId::new();
        let info = BuildInfo {
            parent: Some(build),
            ..BuildInfo::default()
        };
        let mut w = store.begin(next, info).unwrap();
        let report = w
            .write_image_from_blocks(
                ImageKind::Memory,
                Base::Parent(&parent),
                flat.size,
                dirty,
                |offset, buf| {
                    for (i, page) in buf.chunks_mut(PAGE as usize).enumerate() {
                        fill_diff_page(page, generation, offset / PAGE + i as u64);
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(report.dirty_blocks, dirty.len());
        assert_eq!(report.header.meta().generation, generation);
        w.commit().unwrap();
        build = next;
    }
    let final_image = dir.join("final-memfile");
    write_final_image(&final_image, &flat.memfile, &diffs);
    let diff_pages: u64 = diffs.iter().map(BlockSet::len).sum();
    let header = store.open_header(build, ImageKind::Memory).unwrap();
    let data_files: Vec<PathBuf> = header
        .referenced_builds()
        .into_iter()
        .map(|b| store.data_path(b, ImageKind::Memory))
        .collect();
    // Like the flat memory file, everything starts in the page cache.
    for path in std::iter::once(&final_image).chain(&data_files) {
        let _ = std::fs::read(path).unwrap();
    }
    let shape = format!(
        "generation 0: a full build of {} MiB; generations 1..={}: diffs of {:.1}% of the pages each (mean), in scattered runs of 1..=8 pages; \
         the last build's header has {} mappings over {} data files. Baselines and the flat rows read one flat file of the final image.",
        flat.size / MIB,
        CHAIN_GENERATIONS - 1,
        100.0 * diff_pages as f64 / (CHAIN_GENERATIONS - 1) as f64 / pages as f64,
        header.mappings().len(),
        data_files.len()
    );
    let chain = Bench {
        size: flat.size,
        memfile: final_image.clone(),
        chain: Some(Chain {
            store,
            build,
            data_files,
        }),
        _dir: None,
        runs: flat.runs,
    };
    let final_flat = Bench {
        size: flat.size,
        memfile: final_image,
        chain: None,
        _dir: None,
        runs: flat.runs,
    };
    (chain, final_flat, shape)
}

/// CRC-32 of a file, read in 1 MiB pieces.
fn file_crc(path: &Path) -> u32 {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finalize();
        }
        hasher.update(&buf[..n]);
    }
}

/// Serve the chain once and read all of guest memory back: it must be the
/// final image (and differ from generation 0), or every number the chain
/// case prints would time the wrong thing.
fn verify_chain(chain: &Bench, generation_0: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("uffd.sock");
    let server = PageServer::bind(&socket, chain.image(), Config::default()).unwrap();
    let serving = std::thread::spawn(move || server.accept().unwrap());
    let mem = GuestMemory::new(&[chain.size], PAGE).unwrap();
    mem.send_handshake(&socket).unwrap();
    let session = serving.join().unwrap();
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    for offset in (0..chain.size).step_by(buf.len()) {
        let n = (chain.size - offset).min(buf.len() as u64) as usize;
        mem.read(offset, &mut buf[..n]);
        hasher.update(&buf[..n]);
    }
    drop(mem);
    session.detach();
    let served = hasher.finalize();
    let want = file_crc(&chain.memfile);
    assert_eq!(
        served, want,
        "the served chain is not the final image (crc32 {served:#010x}, want {want:#010x})"
    );
    assert_ne!(
        want,
        file_crc(generation_0),
        "the diffs left the image unchanged"
    );
}

/// [`fault_note`] plus the faults on pages another fault was already
/// copying: a read-ahead window that spans several mappings is copied one
/// mapping at a time, and the first copy wakes the guest, which may fault
/// again inside the window before the rest is in.
fn chain_fault_note(m: &ember_uffd::MetricsSnapshot) -> String {
    format!(
        "{} ({} on pages being copied)",
        fault_note(m),
        m.faults_already_claimed
    )
}

/// The rows every block starts with: the limit and the kernel's two ways.
fn baseline_rows(memcpy_name: &str, memcpy: Duration, kr: Duration, kw: Duration) -> Vec<Row> {
    vec![
        Row {
            name: memcpy_name.into(),
            t: Some(memcpy),
            note: String::new(),
        },
        Row {
            name: "(a) kernel, private file mapping, read".into(),
            t: Some(kr),
            note: String::new(),
        },
        Row {
            name: "(a) kernel, private file mapping, write".into(),
            t: Some(kw),
            note: String::new(),
        },
    ]
}

/// The 5-generation chain against the flat final image, the kernel and
/// memcpy: all pages in address and in random order (read and write
/// touches), then the recorded working set, lazy and prefetched, from a
/// warm and from a cold page cache. One thread throughout, so the
/// differences are the source's, not the threads'.
fn chain_section(flat: &Bench, only: Option<&str>, seq: &[u64], random: &[u64], ws: &[u64]) {
    let selected = |name: &str| only.is_none_or(|o| name.contains(o));
    let cases = ["chain/sequential", "chain/random", "chain/ws", "chain/cold"];
    if !cases.iter().any(|c| selected(c)) {
        return;
    }
    let (chain, final_flat, shape) = build_chain(flat);
    verify_chain(&chain, &flat.memfile);
    println!("\n== 5-generation chain (sparse diffs) ==");
    println!("  {shape}");
    println!("  Verified once: the served chain reads back as the final image (crc32).");
    let served = [(&final_flat, "flat image"), (&chain, "5-gen chain")];
    for (label, order) in [("sequential", seq), ("random", random)] {
        if !selected(&format!("chain/{label}")) {
            continue;
        }
        let memcpy = final_flat.median(|| final_flat.memcpy(order, 1));
        let kr = final_flat.median(|| final_flat.kernel(order, 1, Touch::Read));
        let kw = final_flat.median(|| final_flat.kernel(order, 1, Touch::Write));
        let mut rows = baseline_rows("(e) memcpy, pre-faulted", memcpy, kr, kw);
        for (how, verb) in [(Touch::Read, "read"), (Touch::Write, "write")] {
            for (bench, what) in served {
                let mut note = String::new();
                let t = bench.median(|| {
                    let (t, m) = bench.page_server(order, 1, PAGE, tuned(), how);
                    note = chain_fault_note(&m);
                    t
                });
                rows.push(Row {
                    name: format!("(b) page server 4K, {what}, {verb}"),
                    t: Some(t),
                    note,
                });
            }
        }
        print_block(
            &format!("-- all pages, {label} order, 1 thread --"),
            flat.size,
            &rows,
            kr,
            kw,
            memcpy,
        );
    }
    for cold in [false, true] {
        if !selected(if cold { "chain/cold" } else { "chain/ws" }) {
            continue;
        }
        if cold && !flat.cache_dropped() {
            println!(
                "\n-- recorded working set, cold page cache: skipped, the data directory keeps evicted pages (tmpfs?); set EMBER_BENCH_DIR to a disk --"
            );
            continue;
        }
        chain_working_set_block(&served, ws, cold);
    }
}

/// One working-set table of the chain case: each served form records its
/// own set on a first restore (as production does), then is restored
/// lazily and with that set prefetched. `cold` evicts every data file from
/// the page cache before each timed run; memcpy stays the cached limit.
fn chain_working_set_block(served: &[(&Bench, &str); 2], order: &[u64], cold: bool) {
    let [(final_flat, _), (chain, _)] = *served;
    let ws_dir = tempfile::tempdir().unwrap();
    let sets: Vec<WorkingSet> = served
        .iter()
        .enumerate()
        .map(|(i, (bench, _))| {
            record_working_set(bench, order, 1, &ws_dir.path().join(format!("ws-{i}")))
        })
        .collect();
    // The chain bench evicts the final flat file and every build's data file.
    let time = |f: &mut dyn FnMut() -> Duration| {
        chain.median(|| {
            if cold {
                chain.drop_cache();
            }
            f()
        })
    };
    let memcpy = final_flat.median(|| final_flat.memcpy(order, 1));
    let kr = time(&mut || final_flat.kernel(order, 1, Touch::Read));
    let kw = time(&mut || final_flat.kernel(order, 1, Touch::Write));
    let memcpy_name = if cold {
        "(e) memcpy, pre-faulted, cached"
    } else {
        "(e) memcpy, pre-faulted"
    };
    let mut rows = baseline_rows(memcpy_name, memcpy, kr, kw);
    for (bench, what) in served {
        let mut note = String::new();
        let t = time(&mut || {
            let (t, m) = bench.page_server(order, 1, PAGE, tuned(), Touch::Read);
            note = format!(
                "{}; {} MiB populated",
                chain_fault_note(&m),
                (m.pages_copied + m.pages_zeroed) * PAGE / MIB
            );
            t
        });
        rows.push(Row {
            name: format!("(b) page server 4K, {what}, lazy"),
            t: Some(t),
            note,
        });
    }
    for ((bench, what), ws) in served.iter().zip(&sets) {
        let mut note = String::new();
        let t = time(&mut || {
            let config = Config {
                prefetch: Some(ws.clone()),
                ..tuned()
            };
            let (t, m) = bench.page_server(order, 1, PAGE, config, Touch::Read);
            note = format!(
                "{} faults; {} MiB prefetched",
                m.faults,
                m.pages_prefetched * PAGE / MIB
            );
            t
        });
        rows.push(Row {
            name: format!("(d) page server 4K, {what}, ws prefetch"),
            t: Some(t),
            note,
        });
    }
    let bytes = order.len() as u64 * PAGE;
    print_block(
        &format!(
            "-- recorded working set{}: {} MiB ({:.0}% of pages), recorded order, 1 thread --",
            if cold { ", cold page cache" } else { "" },
            bytes / MIB,
            100.0 * bytes as f64 / final_flat.size as f64
        ),
        bytes,
        &rows,
        kr,
        kw,
        memcpy,
    );
}

/// A first restore that touches `order` with recording on; the set it wrote.
fn record_working_set(bench: &Bench, order: &[u64], threads: usize, path: &Path) -> WorkingSet {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("uffd.sock");
    let image = bench.image();
    // Recording without read-ahead keeps the set to the pages touched.
    let config = Config {
        record_working_set: Some(path.to_owned()),
        readahead: PAGE,
        readahead_max: PAGE,
        ..Config::default()
    };
    let server = PageServer::bind(&socket, image, config).unwrap();
    let serving = std::thread::spawn(move || server.accept().unwrap());
    let mem = GuestMemory::new(&[bench.size], PAGE).unwrap();
    mem.send_handshake(&socket).unwrap();
    let session = serving.join().unwrap();
    touch(Ptr(mem.addr_of(0)), order, threads, Touch::Read);
    let ws = session
        .handle()
        .write_working_set()
        .unwrap()
        .expect("recording is on")
        .1;
    drop(mem);
    session.detach();
    ws
}

fn ember_testkit_like_skip() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/userfaultfd").exists() {
        println!("SKIPPED restore benchmark: needs root and /dev/userfaultfd");
        std::process::exit(0);
    }
}
