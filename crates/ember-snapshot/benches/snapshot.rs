//! Snapshot benchmarks, each reported as a ratio against a baseline measured
//! in the same run (the machines are shared and noisy; absolute numbers are
//! for orientation only).
//!
//! `cargo bench -p ember-snapshot --bench snapshot`
//! (`EMBER_BENCH_IMAGE_MIB` sets the image size, default 256).

use std::fs::{self, File};
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use ember_snapshot::{Base, BlockSet, BuildInfo, BuildStore, Header, ImageKind};
use ember_types::BuildId;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: u64 = 4096;

fn main() {
    header_resolve();
    build_from_full_image();
}

/// `Header::resolve` (binary search over mappings) against indexing a
/// per-block table, the fastest possible lookup, on a header of 100k mappings.
fn header_resolve() {
    let blocks: u64 = 200_000;
    let base = BuildId::new();
    let g0 = Header::base(base, blocks * PAGE, PAGE).unwrap();
    // Dirty two blocks of every four: 100k alternating mappings.
    let dirty = BlockSet::from_ranges((0..blocks / 4).map(|k| 4 * k..4 * k + 2));
    let g1 = Header::next_generation(&g0, BuildId::new(), &dirty, &BlockSet::new()).unwrap();
    let mappings = g1.mappings().len();

    // Baseline: the same answers from a flat per-block table.
    let table: Vec<(u32, u64)> = (0..blocks)
        .map(|b| {
            let r = g1.resolve(b * PAGE).unwrap();
            (u32::from(r.build_id == base), r.storage_offset)
        })
        .collect();

    let mut rng = StdRng::seed_from_u64(42);
    let queries: Vec<u64> = (0..2_000_000)
        .map(|_| rng.gen_range(0..blocks * PAGE))
        .collect();

    // Alternate the two in short rounds so load from other processes hits
    // both alike; report the median round of each.
    let mut header_ns = Vec::new();
    let mut table_ns = Vec::new();
    let mut sum = 0u64;
    for round in queries.chunks(100_000) {
        let (t, s) = time(|| {
            let mut sum = 0u64;
            for &q in round {
                let r = g1.resolve(black_box(q)).unwrap();
                sum = sum.wrapping_add(r.storage_offset ^ r.remaining);
            }
            sum
        });
        header_ns.push(t.as_nanos() as f64 / round.len() as f64);
        sum ^= s;
        let (t, s) = time(|| {
            let mut sum = 0u64;
            for &q in round {
                let (_, storage) = table[(black_box(q) / PAGE) as usize];
                sum = sum.wrapping_add(storage + q % PAGE);
            }
            sum
        });
        table_ns.push(t.as_nanos() as f64 / round.len() as f64);
        sum ^= s;
    }
    black_box(sum);
    let (header, table) = (median(&mut header_ns), median(&mut table_ns));

    let encoded = g1.encode();
    let (decode_time, _) = time(|| Header::decode(black_box(&encoded)).unwrap());
    println!(
        "header resolve, {mappings} mappings, {} random offsets:",
        queries.len()
    );
    println!("  Header::resolve     {header:7.1} ns/op (median of 20 rounds)");
    println!("  per-block Vec index {table:7.1} ns/op (baseline)");
    println!("  ratio resolve/baseline = {:.2}", header / table);
    println!(
        "  encoded header {} KiB, decode+validate {:.2} ms",
        encoded.len() / 1024,
        decode_time.as_secs_f64() * 1e3
    );
}

/// Writing a build from a full image (zero detection, SHA-256, fsync)
/// against copying the same file with a read/write loop plus fsync.
fn build_from_full_image() {
    let mib: u64 = std::env::var("EMBER_BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = BuildStore::open(dir.path()).unwrap();

    // A memory-like image: a quarter of the pages are zero.
    let mut rng = StdRng::seed_from_u64(7);
    let mut image = vec![0u8; size as usize];
    for page in image.chunks_mut(PAGE as usize) {
        if rng.gen_ratio(3, 4) {
            rng.fill_bytes(page);
        }
    }
    let image_path = dir.path().join("image");
    fs::write(&image_path, &image).unwrap();

    let (copy_time, _) = time(|| copy_and_sync(&image_path, &dir.path().join("copy")));

    let b0 = BuildId::new();
    let (full_time, report) = time(|| {
        let mut w = store.begin(b0, BuildInfo::default()).unwrap();
        let r = w
            .write_image_from_full(
                ImageKind::Memory,
                Base::Fresh { block_size: PAGE },
                &image_path,
            )
            .unwrap();
        w.commit().unwrap();
        r
    });

    // A diff: 5% of the pages change; every page is compared with the parent.
    for page in image.chunks_mut(PAGE as usize) {
        if rng.gen_ratio(1, 20) {
            rng.fill_bytes(page);
        }
    }
    let next_path = dir.path().join("image.next");
    fs::write(&next_path, &image).unwrap();
    drop(image);
    let parent = store.open_header(b0, ImageKind::Memory).unwrap();
    let (diff_time, diff) = time(|| {
        let mut w = store.begin(BuildId::new(), BuildInfo::default()).unwrap();
        let r = w
            .write_image_from_full(ImageKind::Memory, Base::Parent(&parent), &next_path)
            .unwrap();
        w.commit().unwrap();
        r
    });

    let rate = |d: Duration| size as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!("build from a full {mib} MiB image (page cache warm, fsync included):");
    println!(
        "  read/write copy + fsync    {:8.0} MiB/s (baseline)",
        rate(copy_time)
    );
    println!(
        "  fresh build               {:8.0} MiB/s, wrote {} of {} MiB, ratio build/copy = {:.2}",
        rate(full_time),
        report.bytes_written >> 20,
        report.image_size >> 20,
        rate(full_time) / rate(copy_time)
    );
    println!(
        "  diff build (5% changed)   {:8.0} MiB/s, wrote {} MiB, ratio diff/copy = {:.2}",
        rate(diff_time),
        diff.bytes_written >> 20,
        rate(diff_time) / rate(copy_time)
    );
}

fn copy_and_sync(src: &Path, dst: &Path) {
    let mut from = File::open(src).unwrap();
    let mut to = File::create(dst).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).unwrap();
    }
    to.sync_all().unwrap();
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed(), out)
}
