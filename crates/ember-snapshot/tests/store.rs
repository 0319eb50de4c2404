//! The build store on a real file system: writing generations three ways,
//! reading and materializing them, integrity checks, crash leftovers and gc.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use ember_snapshot::{
    Base, BlockSet, BuildFile, BuildInfo, BuildStore, Header, ImageKind, SnapshotError, VmInfo,
};
use ember_types::{BackendKind, BuildId};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: u64 = 4096;

struct Fixture {
    dir: tempfile::TempDir,
    store: BuildStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = BuildStore::open(dir.path()).unwrap();
    Fixture { dir, store }
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Materialize `header` into a fresh file and return its bytes.
    fn materialized(&self, header: &Header, kind: ImageKind) -> Vec<u8> {
        let dst = self.path(&format!("out-{}", BuildId::new()));
        let report = self.store.materialize(header, kind, &dst).unwrap();
        assert_eq!(report.size, header.size());
        assert_eq!(
            report.cloned_bytes + report.copied_bytes + report.hole_bytes,
            header.size()
        );
        let bytes = fs::read(&dst).unwrap();
        fs::remove_file(dst).unwrap();
        bytes
    }
}

fn vm_info() -> BuildInfo {
    BuildInfo {
        vm: Some(VmInfo {
            backend: BackendKind::Qemu,
            vmm_version: "7.2.0".into(),
            vcpus: 1,
            memory_mib: 1,
            kernel: "test-kernel".into(),
            page_size: PAGE,
        }),
        ..Default::default()
    }
}

fn random_page(rng: &mut StdRng) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    rng.fill_bytes(&mut page);
    page
}

fn set_page(image: &mut [u8], page: u64, bytes: &[u8]) {
    let at = (page * PAGE) as usize;
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

fn is_zero_page(image: &[u8], page: u64) -> bool {
    let at = (page * PAGE) as usize;
    image[at..(at + PAGE as usize).min(image.len())]
        .iter()
        .all(|&b| b == 0)
}

/// Read the image back through an `ImageReader` in odd-sized pieces.
fn assert_reads_back(store: &BuildStore, build: BuildId, kind: ImageKind, expect: &[u8]) {
    let reader = store.open_image(build, kind).unwrap();
    assert_eq!(reader.size(), expect.len() as u64);
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let start = rng.gen_range(0..expect.len());
        let len = rng.gen_range(0..=(expect.len() - start).min(3 * PAGE as usize));
        let mut buf = vec![0xAA; len];
        reader.read_at(&mut buf, start as u64).unwrap();
        let diff = buf.iter().zip(&expect[start..]).position(|(a, b)| a != b);
        assert_eq!(diff, None, "read {len} at {start}: first difference");
    }
    let mut past = [0u8; 2];
    let err = reader
        .read_at(&mut past, expect.len() as u64 - 1)
        .unwrap_err();
    assert!(matches!(err, SnapshotError::ReadPastEnd { .. }), "{err}");
}

#[test]
fn three_memory_generations_materialize_byte_for_byte() {
    let fx = fixture();
    let store = &fx.store;
    let mut rng = StdRng::seed_from_u64(1);
    let pages = 256u64;

    // Generation 0: a full image with some zero pages, stored without them.
    let mut img0 = vec![0u8; (pages * PAGE) as usize];
    for p in 0..pages {
        if !(10..20).contains(&p) && p % 7 != 0 {
            set_page(&mut img0, p, &random_page(&mut rng));
        }
    }
    let zero0 = (0..pages).filter(|&p| is_zero_page(&img0, p)).count() as u64;
    let b0 = BuildId::new();
    let mut w = store.begin(b0, vm_info()).unwrap();
    let r0 = w
        .write_image_from_full(
            ImageKind::Memory,
            Base::Fresh { block_size: PAGE },
            &fx.write("img0", &img0),
        )
        .unwrap();
    w.write_vmstate(&b"device state 0"[..]).unwrap();
    let meta0 = w.commit().unwrap();
    assert_eq!(r0.bytes_written, (pages - zero0) * PAGE);
    assert_eq!(r0.zero_blocks, zero0);
    assert_eq!(r0.image_size, pages * PAGE);
    assert_eq!(meta0.files[&BuildFile::Memfile].size, r0.bytes_written);
    assert_eq!(meta0.files[&BuildFile::Vmstate].size, 14);
    assert!(!meta0.has(BuildFile::Rootfs));

    // Generation 1 via way (a): compare a full image with generation 0.
    let mut img1 = img0.clone();
    let changed1: Vec<u64> = [3, 4, 50].into_iter().chain(100..110).collect();
    for &p in &changed1 {
        set_page(&mut img1, p, &random_page(&mut rng));
    }
    set_page(&mut img1, 60, &[0; PAGE as usize]);
    set_page(&mut img1, 61, &[0; PAGE as usize]);
    let same = img1[(70 * PAGE) as usize..(71 * PAGE) as usize].to_vec();
    set_page(&mut img1, 70, &same);
    let h0 = store.open_header(b0, ImageKind::Memory).unwrap();
    let b1 = BuildId::new();
    let mut w = store
        .begin(
            b1,
            BuildInfo {
                parent: Some(b0),
                ..vm_info()
            },
        )
        .unwrap();
    let r1 = w
        .write_image_from_full(
            ImageKind::Memory,
            Base::Parent(&h0),
            &fx.write("img1", &img1),
        )
        .unwrap();
    w.commit().unwrap();
    assert_eq!(r1.dirty_blocks, changed1.len() as u64);
    assert_eq!(r1.bytes_written, changed1.len() as u64 * PAGE);
    assert_eq!(r1.header.meta().generation, 1);

    // Generation 2 via way (b): a sparse file holding only the dirty pages,
    // one of them dirty but zero, one filling a page that was zero.
    let h1 = store.open_header(b1, ImageKind::Memory).unwrap();
    let mut img2 = img1.clone();
    let sparse_path = fx.path("img2.sparse");
    let sparse = File::create(&sparse_path).unwrap();
    sparse.set_len(pages * PAGE).unwrap();
    let dirty2: Vec<u64> = [4, 5, 15].into_iter().chain(200..210).collect();
    for &p in &dirty2 {
        let page = random_page(&mut rng);
        set_page(&mut img2, p, &page);
        sparse.write_all_at(&page, p * PAGE).unwrap();
    }
    set_page(&mut img2, 100, &[0; PAGE as usize]);
    sparse
        .write_all_at(&[0; PAGE as usize], 100 * PAGE)
        .unwrap();
    sparse.sync_all().unwrap();
    drop(sparse);
    let b2 = BuildId::new();
    let mut w = store.begin(b2, vm_info()).unwrap();
    let r2 = w
        .write_image_from_sparse(ImageKind::Memory, Base::Parent(&h1), &sparse_path)
        .unwrap();
    w.commit().unwrap();
    assert_eq!(r2.dirty_blocks, dirty2.len() as u64);
    assert_eq!(r2.zero_blocks, 1, "the zeroed dirty page");
    assert_eq!(r2.bytes_written, dirty2.len() as u64 * PAGE);

    for (build, img) in [(b0, &img0), (b1, &img1), (b2, &img2)] {
        let header = store.open_header(build, ImageKind::Memory).unwrap();
        assert!(
            fx.materialized(&header, ImageKind::Memory) == *img,
            "build {build}"
        );
        assert_reads_back(store, build, ImageKind::Memory, img);
        store.verify(build).unwrap();
    }
    let h2 = store.open_header(b2, ImageKind::Memory).unwrap();
    assert_eq!(
        h2.referenced_builds(),
        [b0, b1, b2].into_iter().collect(),
        "the newest generation reads from all three builds"
    );
    assert!(store.build_references(b2).unwrap().contains(&b0));

    // Nil runs stay holes in the materialized file.
    let dst = fx.path("img2.full");
    let report = store.materialize(&h2, ImageKind::Memory, &dst).unwrap();
    let zero2 = (0..pages).filter(|&p| is_zero_page(&img2, p)).count() as u64;
    assert_eq!(report.hole_bytes, zero2 * PAGE);
    // st_blocks also counts the file system's extent-tree blocks: allow a few.
    let allocated = fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(
        allocated <= (pages - zero2 + 8) * PAGE,
        "allocated {allocated}"
    );
    let err = store.materialize(&h2, ImageKind::Memory, &dst).unwrap_err();
    assert!(
        matches!(err, SnapshotError::DestinationExists { .. }),
        "{err}"
    );
}

#[test]
fn disk_generations_at_4k_blocks_with_sparse_random_changes() {
    for seed in 0..4 {
        let fx = fixture();
        let store = &fx.store;
        let mut rng = StdRng::seed_from_u64(100 + seed);
        // Not a multiple of the block size: the last block is partial.
        let size = 2 * 1024 * 1024 + 1000u64;
        let blocks = size.div_ceil(PAGE);
        let mut image = vec![0u8; size as usize];
        rng.fill_bytes(&mut image[..(size / 2) as usize]);
        rng.fill_bytes(&mut image[(size - 700) as usize..]);

        let mut build = BuildId::new();
        let mut w = store.begin(build, BuildInfo::default()).unwrap();
        let path = fx.write("disk", &image);
        let r = w
            .write_image_from_full(ImageKind::Rootfs, Base::Fresh { block_size: PAGE }, &path)
            .unwrap();
        w.commit().unwrap();
        let stored = (0..blocks).filter(|&b| !is_zero_page(&image, b)).count() as u64;
        assert_eq!(r.dirty_blocks, stored);
        assert_eq!(
            r.bytes_written,
            (stored - 1) * PAGE + 1000,
            "partial last block"
        );

        for round in 0..6 {
            let parent = store.open_header(build, ImageKind::Rootfs).unwrap();
            // Change ~2% of the blocks; some become zero, some stay equal.
            let mut changed = BlockSet::new();
            let mut tracked = BlockSet::new();
            for b in 0..blocks {
                if rng.gen_ratio(1, 50) {
                    tracked.insert(b);
                    let at = (b * PAGE) as usize;
                    let end = (at + PAGE as usize).min(size as usize);
                    let before = image[at..end].to_vec();
                    match rng.gen_range(0..4) {
                        0 => image[at..end].fill(0),
                        1 => {} // written with the same bytes
                        _ => rng.fill_bytes(&mut image[at..end]),
                    }
                    if image[at..end] != before[..] && !is_zero_page(&image, b) {
                        changed.insert(b);
                    }
                }
            }
            let path = fx.write("disk", &image);
            build = BuildId::new();
            let mut w = store.begin(build, BuildInfo::default()).unwrap();
            let r = if round % 2 == 0 {
                // Way (a): find the changes by comparing contents.
                let r = w
                    .write_image_from_full(ImageKind::Rootfs, Base::Parent(&parent), &path)
                    .unwrap();
                assert_eq!(r.dirty_blocks, changed.len(), "seed {seed} round {round}");
                r
            } else {
                // Way (c): a tracked dirty set, read through a callback.
                let disk = File::open(&path).unwrap();
                let mut calls = 0;
                let r = w
                    .write_image_from_blocks(
                        ImageKind::Rootfs,
                        Base::Parent(&parent),
                        size,
                        &tracked,
                        |offset, buf| {
                            calls += 1;
                            disk.read_exact_at(buf, offset)
                        },
                    )
                    .unwrap();
                assert!(calls >= tracked.run_count());
                let nonzero = tracked
                    .blocks()
                    .filter(|&b| !is_zero_page(&image, b))
                    .count();
                assert_eq!(r.dirty_blocks, nonzero as u64, "seed {seed} round {round}");
                r
            };
            w.commit().unwrap();
            assert!(r.bytes_written <= r.dirty_blocks * PAGE);
            let header = store.open_header(build, ImageKind::Rootfs).unwrap();
            assert!(
                fx.materialized(&header, ImageKind::Rootfs) == image,
                "seed {seed} round {round}"
            );
            store.verify(build).unwrap();
        }
        assert_reads_back(store, build, ImageKind::Rootfs, &image);
    }
}

#[test]
fn holes_in_a_full_image_are_zeros_never_inherited() {
    let fx = fixture();
    let pages = 64u64;
    // A RAM file where the guest touched two pages.
    let path = fx.path("ram");
    let ram = File::create(&path).unwrap();
    ram.set_len(pages * PAGE).unwrap();
    ram.write_all_at(&[1; PAGE as usize], 3 * PAGE).unwrap();
    ram.write_all_at(&[2; PAGE as usize], 40 * PAGE).unwrap();
    let b0 = BuildId::new();
    let mut w = fx.store.begin(b0, vm_info()).unwrap();
    let r = w
        .write_image_from_full(ImageKind::Memory, Base::Fresh { block_size: PAGE }, &path)
        .unwrap();
    w.commit().unwrap();
    assert_eq!(
        (r.bytes_written, r.dirty_blocks, r.zero_blocks),
        (2 * PAGE, 2, 62)
    );

    // The next full image punched page 3 back to a hole: it must read as
    // zeros, not as the parent's page.
    let ram = OpenOptions::new().write(true).open(&path).unwrap();
    ram.set_len(0).unwrap();
    ram.set_len(pages * PAGE).unwrap();
    ram.write_all_at(&[2; PAGE as usize], 40 * PAGE).unwrap();
    ram.write_all_at(&[3; PAGE as usize], 41 * PAGE).unwrap();
    drop(ram);
    let h0 = fx.store.open_header(b0, ImageKind::Memory).unwrap();
    let b1 = BuildId::new();
    let mut w = fx.store.begin(b1, vm_info()).unwrap();
    let r = w
        .write_image_from_full(ImageKind::Memory, Base::Parent(&h0), &path)
        .unwrap();
    w.commit().unwrap();
    assert_eq!(
        (r.bytes_written, r.dirty_blocks),
        (PAGE, 1),
        "only page 41 is new"
    );
    let mut expect = vec![0u8; (pages * PAGE) as usize];
    set_page(&mut expect, 40, &[2; PAGE as usize]);
    set_page(&mut expect, 41, &[3; PAGE as usize]);
    let h1 = fx.store.open_header(b1, ImageKind::Memory).unwrap();
    assert!(fx.materialized(&h1, ImageKind::Memory) == expect);
    assert_reads_back(&fx.store, b1, ImageKind::Memory, &expect);
}

#[test]
fn a_fresh_image_from_a_block_list_reads_zero_elsewhere() {
    let fx = fixture();
    let build = BuildId::new();
    let mut w = fx.store.begin(build, BuildInfo::default()).unwrap();
    let dirty = BlockSet::from_ranges([2..4, 9..10]);
    w.write_image_from_blocks(
        ImageKind::Rootfs,
        Base::Fresh { block_size: PAGE },
        10 * PAGE,
        &dirty,
        |offset, buf| {
            for (i, block) in buf.chunks_mut(PAGE as usize).enumerate() {
                block.fill((offset / PAGE) as u8 + i as u8 + 1);
            }
            Ok(())
        },
    )
    .unwrap();
    w.commit().unwrap();
    let mut expect = vec![0u8; 10 * PAGE as usize];
    for b in [2u64, 3, 9] {
        set_page(&mut expect, b, &[b as u8 + 1; PAGE as usize]);
    }
    assert_reads_back(&fx.store, build, ImageKind::Rootfs, &expect);

    // The callback's errors come back with the offset that failed.
    let mut w = fx
        .store
        .begin(BuildId::new(), BuildInfo::default())
        .unwrap();
    let err = w
        .write_image_from_blocks(
            ImageKind::Rootfs,
            Base::Fresh { block_size: PAGE },
            10 * PAGE,
            &dirty,
            |_, _| Err(std::io::Error::other("overlay unreadable")),
        )
        .unwrap_err();
    assert!(
        matches!(err, SnapshotError::BlockSource { offset: 8192, .. }),
        "{err}"
    );
}

/// Commit a memory image of `pages` pages under a new build, as a diff of
/// `parent` when given, dirtying `dirty` pages with `fill`.
fn memory_build(
    fx: &Fixture,
    parent: Option<&Header>,
    pages: u64,
    dirty: &[u64],
    fill: u8,
) -> (BuildId, Header) {
    let build = BuildId::new();
    let mut w = fx.store.begin(build, vm_info()).unwrap();
    let base = match parent {
        Some(p) => Base::Parent(p),
        None => Base::Fresh { block_size: PAGE },
    };
    let set: BlockSet = dirty.iter().copied().collect();
    let r = w
        .write_image_from_blocks(ImageKind::Memory, base, pages * PAGE, &set, |_, buf| {
            buf.fill(fill);
            Ok(())
        })
        .unwrap();
    w.commit().unwrap();
    (build, r.header)
}

fn leftovers(store: &BuildStore) -> Vec<String> {
    fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(".del-"))
        .collect()
}

#[test]
fn a_writer_dropped_before_commit_leaves_nothing() {
    let fx = fixture();
    let build = BuildId::new();
    let mut w = fx.store.begin(build, vm_info()).unwrap();
    let img = fx.write("img", &[7u8; 8 * PAGE as usize]);
    w.write_image_from_full(ImageKind::Memory, Base::Fresh { block_size: PAGE }, &img)
        .unwrap();
    assert!(w.staging_dir().join("memfile").is_file());
    drop(w);
    assert!(!fx.store.exists(build));
    assert!(fx.store.list().unwrap().is_empty());
    assert_eq!(leftovers(&fx.store), Vec::<String>::new());
}

#[test]
fn recover_removes_crash_leftovers_but_not_a_live_writer() {
    let fx = fixture();
    // What a writer killed mid-write and a gc killed mid-delete leave.
    let crashed = fx
        .store
        .root()
        .join(format!(".tmp-{}-00000000deadbeef", BuildId::new()));
    fs::create_dir(&crashed).unwrap();
    fs::write(crashed.join("memfile"), [1u8; 4096]).unwrap();
    let deleting = fx
        .store
        .root()
        .join(format!(".del-{}-0000000000000001", BuildId::new()));
    fs::create_dir_all(deleting.join("sub")).unwrap();

    let live = BuildId::new();
    let mut w = fx.store.begin(live, vm_info()).unwrap();
    w.write_vmstate(&b"state"[..]).unwrap();

    let mut removed = fx.store.recover().unwrap();
    removed.sort();
    let mut expect = vec![crashed.clone(), deleting.clone()];
    expect.sort();
    assert_eq!(removed, expect);
    assert!(!crashed.exists() && !deleting.exists());
    assert!(
        w.staging_dir().is_dir(),
        "a live writer's directory survives recover"
    );

    let meta = w.commit().unwrap();
    assert!(meta.has(BuildFile::Vmstate));
    assert_eq!(fx.store.list().unwrap(), vec![live]);
    assert!(fx.store.recover().unwrap().is_empty());
}

#[test]
fn vmstate_written_in_place_by_a_vmm_is_recorded() {
    let fx = fixture();
    let build = BuildId::new();
    let w = fx.store.begin(build, vm_info()).unwrap();
    fs::write(w.vmstate_path(), b"written by the VMM").unwrap();
    let meta = w.commit().unwrap();
    assert_eq!(meta.files[&BuildFile::Vmstate].size, 18);
    assert_eq!(
        fs::read(fx.store.file_path(build, BuildFile::Vmstate)).unwrap(),
        b"written by the VMM"
    );
    fx.store.verify(build).unwrap();
    assert_eq!(fx.store.read_meta(build).unwrap(), meta);
}

#[test]
fn builds_are_immutable_and_files_written_once() {
    let fx = fixture();
    let (build, _) = memory_build(&fx, None, 4, &[1], 9);
    let err = fx.store.begin(build, vm_info()).unwrap_err();
    assert!(matches!(err, SnapshotError::BuildExists { .. }), "{err}");
    let err = fx.store.begin(BuildId::NIL, vm_info()).unwrap_err();
    assert!(matches!(err, SnapshotError::NilBuild), "{err}");

    let mut w = fx.store.begin(BuildId::new(), vm_info()).unwrap();
    w.write_vmstate(&b"a"[..]).unwrap();
    let err = w.write_vmstate(&b"b"[..]).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::BuildFileWritten {
                file: "vmstate",
                ..
            }
        ),
        "{err}"
    );

    // A diff must describe an image of its parent's size.
    let parent = fx.store.open_header(build, ImageKind::Memory).unwrap();
    let img = fx.write("small", &[1u8; PAGE as usize]);
    let err = w
        .write_image_from_full(ImageKind::Memory, Base::Parent(&parent), &img)
        .unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::ImageSizeMismatch {
                expected: 16384,
                found: 4096
            }
        ),
        "{err}"
    );
}

#[test]
fn verify_catches_a_flipped_byte_and_a_truncated_header() {
    let fx = fixture();
    let (b0, h0) = memory_build(&fx, None, 16, &[0, 1, 2, 5], 3);
    let (b1, _) = memory_build(&fx, Some(&h0), 16, &[2, 9], 4);
    fx.store.verify(b0).unwrap();
    fx.store.verify(b1).unwrap();

    // One flipped bit in a data file.
    let memfile = fx.store.data_path(b0, ImageKind::Memory);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memfile)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, 5000).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], 5000).unwrap();
    let err = fx.store.verify(b0).unwrap_err();
    assert!(
        matches!(err, SnapshotError::ChecksumMismatch { build, file: "memfile" } if build == b0),
        "{err}"
    );
    assert!(err.to_string().contains(&b0.to_string()), "{err}");
    f.write_all_at(&byte, 5000).unwrap();
    fx.store.verify(b0).unwrap();

    // A truncated header: verify names it, and so does opening it.
    let header = fx.store.header_path(b1, ImageKind::Memory);
    let len = fs::metadata(&header).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&header)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = fx.store.verify(b1).unwrap_err();
    assert!(
        matches!(err, SnapshotError::SizeMismatch { build, file: "memfile.header", .. } if build == b1),
        "{err}"
    );
    let err = fx.store.open_header(b1, ImageKind::Memory).unwrap_err();
    match &err {
        SnapshotError::HeaderCorrupt {
            build,
            file,
            source,
        } => {
            assert_eq!((*build, *file), (b1, "memfile.header"));
            assert!(
                matches!(**source, SnapshotError::HeaderTruncated { .. }),
                "{source}"
            );
        }
        other => panic!("expected HeaderCorrupt, got {other}"),
    }

    // A missing file and a missing build are named as such.
    fs::remove_file(fx.store.file_path(b0, BuildFile::MemfileHeader)).unwrap();
    let err = fx.store.verify(b0).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::BuildFileMissing {
                file: "memfile.header",
                ..
            }
        ),
        "{err}"
    );
    let ghost = BuildId::new();
    let err = fx.store.verify(ghost).unwrap_err();
    assert!(
        matches!(err, SnapshotError::BuildMissing { build } if build == ghost),
        "{err}"
    );
    let err = fx.store.open_header(ghost, ImageKind::Rootfs).unwrap_err();
    assert!(matches!(err, SnapshotError::BuildMissing { .. }), "{err}");
}

#[test]
fn a_disk_only_build_has_no_memory_image() {
    let fx = fixture();
    let build = BuildId::new();
    let mut w = fx.store.begin(build, BuildInfo::default()).unwrap();
    let disk = fx.write("disk", &[5u8; 3 * PAGE as usize]);
    w.write_image_from_full(ImageKind::Rootfs, Base::Fresh { block_size: PAGE }, &disk)
        .unwrap();
    let meta = w.commit().unwrap();
    assert!(meta.info.vm.is_none());
    assert_eq!(
        meta.files.keys().copied().collect::<Vec<_>>(),
        vec![BuildFile::Rootfs, BuildFile::RootfsHeader]
    );
    let err = fx.store.open_header(build, ImageKind::Memory).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::BuildFileMissing {
                file: "memfile.header",
                ..
            }
        ),
        "{err}"
    );
    fx.store.open_header(build, ImageKind::Rootfs).unwrap();
}

#[test]
fn gc_keeps_everything_reachable_and_removes_the_rest() {
    let fx = fixture();
    let store = &fx.store;
    // Chain a <- b <- c: c reads blocks from all three.
    let (a, ha) = memory_build(&fx, None, 16, &[0, 1, 2, 3], 1);
    let (b, hb) = memory_build(&fx, Some(&ha), 16, &[1], 2);
    let (c, hc) = memory_build(&fx, Some(&hb), 16, &[2], 3);
    assert_eq!(hc.referenced_builds(), [a, b, c].into_iter().collect());
    // A second chain d <- e, and a lone build f with a disk from a.
    let (d, hd) = memory_build(&fx, None, 8, &[0], 4);
    let (e, _) = memory_build(&fx, Some(&hd), 8, &[1], 5);
    let f = BuildId::new();
    let mut w = store.begin(f, BuildInfo::default()).unwrap();
    let disk = fx.write("disk", &[6u8; 4 * PAGE as usize]);
    w.write_image_from_full(ImageKind::Rootfs, Base::Fresh { block_size: PAGE }, &disk)
        .unwrap();
    w.commit().unwrap();

    // No gc while a build is being written.
    let pending = store.begin(BuildId::new(), vm_info()).unwrap();
    assert!(matches!(store.gc(&[c]), Err(SnapshotError::StoreBusy)));
    drop(pending);

    let expect_c = fx.materialized(&hc, ImageKind::Memory);
    let report = store.gc(&[c, f]).unwrap();
    let mut kept = vec![a, b, c, f];
    kept.sort();
    let mut deleted = vec![d, e];
    deleted.sort();
    assert_eq!(report.kept, kept);
    assert_eq!(report.deleted, deleted);
    assert_eq!(store.list().unwrap(), kept);
    assert_eq!(leftovers(store), Vec::<String>::new());
    // The surviving leaf still reads in full.
    let hc = store.open_header(c, ImageKind::Memory).unwrap();
    assert!(fx.materialized(&hc, ImageKind::Memory) == expect_c);

    // Roots that are already gone are skipped, not fatal.
    let report = store.gc(&[c, BuildId::new()]).unwrap();
    assert_eq!(report.deleted, vec![f]);
    // Nothing is live: everything goes.
    let report = store.gc(&[]).unwrap();
    assert_eq!(report.deleted.len(), 3);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn gc_deletes_nothing_when_a_live_header_is_unreadable() {
    let fx = fixture();
    let (a, ha) = memory_build(&fx, None, 8, &[0, 1], 1);
    let (b, _) = memory_build(&fx, Some(&ha), 8, &[1], 2);
    let (other, _) = memory_build(&fx, None, 8, &[3], 3);
    fs::write(fx.store.header_path(b, ImageKind::Memory), b"garbage").unwrap();
    let err = fx.store.gc(&[b]).unwrap_err();
    assert!(
        matches!(err, SnapshotError::HeaderCorrupt { build, .. } if build == b),
        "{err}"
    );
    let mut all = vec![a, b, other];
    all.sort();
    assert_eq!(fx.store.list().unwrap(), all);
}

#[test]
fn a_missing_referenced_build_is_a_clear_error() {
    let fx = fixture();
    let (a, ha) = memory_build(&fx, None, 8, &[0, 1, 2], 1);
    let (b, hb) = memory_build(&fx, Some(&ha), 8, &[1], 2);
    fs::remove_dir_all(fx.store.build_dir(a)).unwrap();

    let err = fx.store.open_header(b, ImageKind::Memory).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::ReferencedBuildsMissing { build, missing } if *build == b && *missing == vec![a]),
        "{err}"
    );
    assert!(err.to_string().contains(&a.to_string()), "{err}");
    let err = fx.store.reader(hb.clone(), ImageKind::Memory).unwrap_err();
    assert!(
        matches!(err, SnapshotError::ReferencedBuildsMissing { .. }),
        "{err}"
    );

    // A new generation on top of it cannot be committed either.
    let c = BuildId::new();
    let mut w = fx.store.begin(c, vm_info()).unwrap();
    let set: BlockSet = [5].into_iter().collect();
    w.write_image_from_blocks(
        ImageKind::Memory,
        Base::Parent(&hb),
        8 * PAGE,
        &set,
        |_, buf| {
            buf.fill(7);
            Ok(())
        },
    )
    .unwrap();
    let err = w.commit().unwrap_err();
    assert!(
        matches!(&err, SnapshotError::ReferencedBuildsMissing { missing, .. } if *missing == vec![a]),
        "{err}"
    );
    assert!(!fx.store.exists(c));
    assert_eq!(leftovers(&fx.store), Vec::<String>::new());
}

#[test]
fn a_memory_header_cannot_parent_a_disk() {
    let fx = fixture();
    let (a, ha) = memory_build(&fx, None, 8, &[0, 1, 2], 1);
    let mut w = fx
        .store
        .begin(BuildId::new(), BuildInfo::default())
        .unwrap();
    let set: BlockSet = [5].into_iter().collect();
    w.write_image_from_blocks(
        ImageKind::Rootfs,
        Base::Parent(&ha),
        8 * PAGE,
        &set,
        |_, buf| {
            buf.fill(7);
            Ok(())
        },
    )
    .unwrap();
    let err = w.commit().unwrap_err();
    assert!(
        matches!(err, SnapshotError::BuildFileMissing { build, file: "rootfs" } if build == a),
        "{err}"
    );
    assert_eq!(fx.store.list().unwrap(), vec![a]);
}

#[test]
fn a_data_file_shorter_than_its_header_needs_is_caught_on_open() {
    let fx = fixture();
    let (a, _) = memory_build(&fx, None, 8, &[0, 1, 2], 1);
    let memfile = fx.store.data_path(a, ImageKind::Memory);
    OpenOptions::new()
        .write(true)
        .open(&memfile)
        .unwrap()
        .set_len(PAGE)
        .unwrap();
    let err = fx.store.open_image(a, ImageKind::Memory).unwrap_err();
    assert!(
        matches!(err, SnapshotError::StorageOutOfRange { file: "memfile", needed, len, .. } if needed == 3 * PAGE && len == PAGE),
        "{err}"
    );
}

/// Reflinks need a file system that shares extents; make a small XFS on a
/// loop device.
#[test]
fn materialize_reflinks_on_xfs_as_root() {
    ember_testkit::require!(
        ember_testkit::is_root(),
        "needs root to mount a loop device"
    );
    let mkfs = Path::new("/usr/sbin/mkfs.xfs");
    ember_testkit::require!(mkfs.exists(), "needs mkfs.xfs (apt-get install xfsprogs)");
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("xfs.img");
    File::create(&image).unwrap().set_len(512 << 20).unwrap();
    let out = std::process::Command::new(mkfs)
        .args(["-q", "-m", "reflink=1"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.xfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mount = Mount::new(&image, &mnt);

    let store = BuildStore::open(&mnt).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut img = vec![0u8; 64 * PAGE as usize];
    rng.fill_bytes(&mut img[..32 * PAGE as usize]);
    let src = mnt.join("img");
    fs::write(&src, &img).unwrap();
    let build = BuildId::new();
    let mut w = store.begin(build, vm_info()).unwrap();
    w.write_image_from_full(ImageKind::Memory, Base::Fresh { block_size: PAGE }, &src)
        .unwrap();
    w.commit().unwrap();
    let header = store.open_header(build, ImageKind::Memory).unwrap();
    let dst = mnt.join("restored");
    let report = store.materialize(&header, ImageKind::Memory, &dst).unwrap();
    assert_eq!(report.cloned_bytes, 32 * PAGE, "{report:?}");
    assert_eq!(report.hole_bytes, 32 * PAGE);
    assert!(fs::read(&dst).unwrap() == img);
    drop(store);
    drop(mount);
}

/// A loop mount that is unmounted when dropped, even if the test fails.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new(image: &Path, dir: &Path) -> Mount {
        let out = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // `-d` detaches the loop device too.
        let _ = std::process::Command::new("umount")
            .arg("-d")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn a_linked_image_shares_its_file_and_diffs_build_on_it() {
    let fx = fixture();
    let mut rng = StdRng::seed_from_u64(11);
    let mut image = vec![0u8; 64 * PAGE as usize];
    for page in [0, 5, 6, 40] {
        set_page(&mut image, page, &random_page(&mut rng));
    }
    let src = fx.write("base.img", &image);
    let base = BuildId::new();
    let mut w = fx.store.begin(base, BuildInfo::default()).unwrap();
    let report = w.link_image(ImageKind::Rootfs, PAGE, &src).unwrap();
    assert_eq!(report.bytes_written, 0, "nothing is copied");
    w.commit().unwrap();
    // Same inode: the image's bytes are stored once.
    let linked = fs::metadata(fx.store.data_path(base, ImageKind::Rootfs)).unwrap();
    assert_eq!(linked.ino(), fs::metadata(&src).unwrap().ino());
    fx.store.verify(base).unwrap();
    assert_reads_back(&fx.store, base, ImageKind::Rootfs, &image);

    // A diff on top of it reads through to the linked file.
    let parent = fx.store.open_header(base, ImageKind::Rootfs).unwrap();
    let mut next = image.clone();
    set_page(&mut next, 6, &random_page(&mut rng));
    let next_path = fx.write("next.img", &next);
    let child = BuildId::new();
    let mut w = fx.store.begin(child, BuildInfo::default()).unwrap();
    let r = w
        .write_image_from_full(ImageKind::Rootfs, Base::Parent(&parent), &next_path)
        .unwrap();
    assert_eq!(r.bytes_written, PAGE);
    w.commit().unwrap();
    assert_reads_back(&fx.store, child, ImageKind::Rootfs, &next);
    let header = fx.store.open_header(child, ImageKind::Rootfs).unwrap();
    assert_eq!(fx.materialized(&header, ImageKind::Rootfs), next);
}
