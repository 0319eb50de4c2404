// Block sets are written as slices of block ranges; one-range slices are intended.
#![allow(clippy::single_range_in_vec_init)]

use super::*;
use proptest::prelude::*;

const KIB4: u64 = 4096;

fn ids(n: usize) -> Vec<BuildId> {
    (0..n).map(|_| BuildId::new()).collect()
}

fn set(ranges: &[Range<u64>]) -> BlockSet {
    BlockSet::from_ranges(ranges.iter().cloned())
}

fn m(offset: u64, length: u64, build_id: BuildId, storage: u64) -> Mapping {
    Mapping {
        offset,
        length,
        build_id,
        build_storage_offset: storage,
    }
}

#[test]
fn base_maps_the_whole_image_at_identity_offsets() {
    let b = BuildId::new();
    let h = Header::base(b, 10 * KIB4, KIB4).unwrap();
    assert_eq!(h.mappings(), &[m(0, 10 * KIB4, b, 0)]);
    let r = h.resolve(5 * KIB4 + 7).unwrap();
    assert_eq!(
        (r.build_id, r.storage_offset, r.remaining),
        (b, 5 * KIB4 + 7, 5 * KIB4 - 7)
    );
    assert_eq!(h.resolve(10 * KIB4), None);
    assert_eq!(h.meta().generation, 0);
    assert_eq!(h.meta().base_build_id, b);
    assert_eq!(h.referenced_builds(), BTreeSet::from([b]));
}

#[test]
fn next_generation_packs_dirty_runs_and_nils_zero_runs() {
    let [a, b] = ids(2).try_into().unwrap();
    let g0 = Header::base(a, 10 * KIB4, KIB4).unwrap();
    let g1 = Header::next_generation(&g0, b, &set(&[2..4, 7..8]), &set(&[5..6])).unwrap();
    assert_eq!(
        g1.mappings(),
        &[
            m(0, 2 * KIB4, a, 0),
            m(2 * KIB4, 2 * KIB4, b, 0),
            m(4 * KIB4, KIB4, a, 4 * KIB4),
            m(5 * KIB4, KIB4, BuildId::NIL, 0),
            m(6 * KIB4, KIB4, a, 6 * KIB4),
            m(7 * KIB4, KIB4, b, 2 * KIB4),
            m(8 * KIB4, 2 * KIB4, a, 8 * KIB4),
        ]
    );
    assert_eq!(g1.meta().generation, 1);
    assert_eq!(g1.meta().base_build_id, a);
    assert_eq!(g1.own_storage_len(), 3 * KIB4);
    assert!(g1.resolve(5 * KIB4 + 1).unwrap().is_zero());
}

#[test]
fn inherited_runs_coalesce_only_where_storage_is_contiguous() {
    let [a, b, c] = ids(3).try_into().unwrap();
    let g0 = Header::base(a, 8 * KIB4, KIB4).unwrap();
    // b stores blocks 1 and 3 back to back; block 2 keeps a between them.
    let g1 = Header::next_generation(&g0, b, &set(&[1..2, 3..4]), &BlockSet::new()).unwrap();
    // c overwrites block 2: b's blocks 1 and 3 are now separated by c, and
    // even if c had zeroed block 2, b's storage 0 and 4096 belong to image
    // blocks 1 and 3, so nothing may coalesce across block 2.
    let g2 = Header::next_generation(&g1, c, &set(&[2..3]), &BlockSet::new()).unwrap();
    assert_eq!(
        g2.mappings(),
        &[
            m(0, KIB4, a, 0),
            m(KIB4, KIB4, b, 0),
            m(2 * KIB4, KIB4, c, 0),
            m(3 * KIB4, KIB4, b, KIB4),
            m(4 * KIB4, 4 * KIB4, a, 4 * KIB4),
        ]
    );
    // Re-dirtying blocks 1..4 in one build gives one contiguous run.
    let d = BuildId::new();
    let g3 = Header::next_generation(&g2, d, &set(&[1..4]), &BlockSet::new()).unwrap();
    assert_eq!(g3.mappings()[1], m(KIB4, 3 * KIB4, d, 0));
    assert_eq!(g3.referenced_builds(), BTreeSet::from([a, d]));
}

#[test]
fn a_partial_last_block_is_stored_with_its_real_length() {
    let [a, b] = ids(2).try_into().unwrap();
    let size = 3 * KIB4 + 100;
    let g0 = Header::base_sparse(a, size, KIB4, &set(&[1..2, 3..4])).unwrap();
    assert_eq!(
        g0.mappings(),
        &[
            m(0, KIB4, BuildId::NIL, 0),
            m(KIB4, KIB4, a, 0),
            m(2 * KIB4, KIB4, BuildId::NIL, 0),
            m(3 * KIB4, 100, a, KIB4),
        ]
    );
    assert_eq!(g0.own_storage_len(), KIB4 + 100);
    assert_eq!(g0.block_count(), 4);
    let g1 = Header::next_generation(&g0, b, &set(&[2..4]), &BlockSet::new()).unwrap();
    assert_eq!(g1.mappings()[2], m(2 * KIB4, KIB4 + 100, b, 0));
    assert_eq!(g1.resolve(size - 1).unwrap().remaining, 1);
}

#[test]
fn bad_generation_inputs_are_typed_errors() {
    let [a, b] = ids(2).try_into().unwrap();
    let g0 = Header::base(a, 4 * KIB4, KIB4).unwrap();
    let err = Header::next_generation(&g0, b, &set(&[1..3]), &set(&[2..4])).unwrap_err();
    assert!(
        matches!(err, SnapshotError::DirtyAndZero { block: 2 }),
        "{err}"
    );
    let err = Header::next_generation(&g0, b, &set(&[3..5]), &BlockSet::new()).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::BlockOutOfRange {
                block: 4,
                blocks: 4
            }
        ),
        "{err}"
    );
    let err =
        Header::next_generation(&g0, BuildId::NIL, &BlockSet::new(), &BlockSet::new()).unwrap_err();
    assert!(matches!(err, SnapshotError::NilBuild));
    for bs in [0, 100, 256, 3000, 1 << 31] {
        let err = Header::base(a, KIB4, bs).unwrap_err();
        assert!(
            matches!(err, SnapshotError::BlockSize { .. }),
            "{bs}: {err}"
        );
    }
    assert!(matches!(
        Header::base(a, 0, KIB4),
        Err(SnapshotError::EmptyImage)
    ));
}

#[test]
fn validate_rejects_gaps_overlaps_misalignment_and_reused_storage() {
    let a = BuildId::new();
    let meta = base_meta(a, 4 * KIB4, KIB4);
    let cases: Vec<(&str, Vec<Mapping>)> = vec![
        (
            "gap",
            vec![m(0, KIB4, a, 0), m(2 * KIB4, 2 * KIB4, a, KIB4)],
        ),
        (
            "overlap",
            vec![m(0, 2 * KIB4, a, 0), m(KIB4, 3 * KIB4, a, 2 * KIB4)],
        ),
        ("short", vec![m(0, 3 * KIB4, a, 0)]),
        ("past end", vec![m(0, 5 * KIB4, a, 0)]),
        ("empty", vec![m(0, 0, a, 0), m(0, 4 * KIB4, a, 0)]),
        (
            "unaligned length",
            vec![m(0, 100, a, 0), m(100, 4 * KIB4 - 100, a, 100)],
        ),
        ("unaligned storage", vec![m(0, 4 * KIB4, a, 512)]),
        ("nil storage", vec![m(0, 4 * KIB4, BuildId::NIL, KIB4)]),
        (
            "reused storage",
            vec![m(0, 2 * KIB4, a, 0), m(2 * KIB4, 2 * KIB4, a, KIB4)],
        ),
        ("overflow", vec![m(0, 4 * KIB4, a, u64::MAX - KIB4 + 1)]),
        ("none", vec![]),
    ];
    for (what, mappings) in cases {
        let err = Header::from_parts(meta, mappings).unwrap_err();
        assert!(
            matches!(err, SnapshotError::HeaderInvalid { .. }),
            "{what}: {err}"
        );
    }
    let wrong_base = HeaderMeta {
        base_build_id: BuildId::new(),
        ..meta
    };
    assert!(Header::from_parts(wrong_base, vec![m(0, 4 * KIB4, a, 0)]).is_err());
}

#[test]
fn merge_splits_base_mappings_around_the_overlay() {
    let [a, b] = ids(2).try_into().unwrap();
    let base = [m(0, 8 * KIB4, a, 0)];
    let overlay = [m(KIB4, KIB4, b, 0), m(3 * KIB4, 2 * KIB4, BuildId::NIL, 0)];
    assert_eq!(
        merge(&base, &overlay),
        vec![
            m(0, KIB4, a, 0),
            m(KIB4, KIB4, b, 0),
            m(2 * KIB4, KIB4, a, 2 * KIB4),
            m(3 * KIB4, 2 * KIB4, BuildId::NIL, 0),
            m(5 * KIB4, 3 * KIB4, a, 5 * KIB4),
        ]
    );
    // An overlay entry spanning several base mappings replaces all of them.
    let base = [
        m(0, KIB4, a, 0),
        m(KIB4, KIB4, b, 0),
        m(2 * KIB4, KIB4, a, KIB4),
    ];
    let overlay = [m(0, 3 * KIB4, BuildId::NIL, 0)];
    assert_eq!(merge(&base, &overlay), overlay.to_vec());
}

#[test]
fn normalize_joins_nil_runs_and_contiguous_storage_only() {
    let [a, b] = ids(2).try_into().unwrap();
    let raw = vec![
        m(0, KIB4, BuildId::NIL, 0),
        m(KIB4, KIB4, BuildId::NIL, 0),
        m(2 * KIB4, KIB4, a, 0),
        m(3 * KIB4, KIB4, a, KIB4),
        m(4 * KIB4, KIB4, a, 3 * KIB4),
        m(5 * KIB4, KIB4, b, 4 * KIB4),
    ];
    assert_eq!(
        normalize(raw),
        vec![
            m(0, 2 * KIB4, BuildId::NIL, 0),
            m(2 * KIB4, 2 * KIB4, a, 0),
            m(4 * KIB4, KIB4, a, 3 * KIB4),
            m(5 * KIB4, KIB4, b, 4 * KIB4),
        ]
    );
}

#[test]
fn segments_clip_a_range_to_mappings() {
    let [a, b] = ids(2).try_into().unwrap();
    let g0 = Header::base(a, 4 * KIB4, KIB4).unwrap();
    let g1 = Header::next_generation(&g0, b, &set(&[1..2]), &set(&[2..3])).unwrap();
    let segs: Vec<_> = g1.segments(100..3 * KIB4 + 5).collect();
    let seg = |image_offset, length, build_id, storage_offset| Segment {
        image_offset,
        length,
        build_id,
        storage_offset,
    };
    assert_eq!(
        segs,
        vec![
            seg(100, KIB4 - 100, a, 100),
            seg(KIB4, KIB4, b, 0),
            seg(2 * KIB4, KIB4, BuildId::NIL, 0),
            seg(3 * KIB4, 5, a, 3 * KIB4),
        ]
    );
    assert_eq!(g1.segments(4 * KIB4..5 * KIB4).count(), 0);
    assert_eq!(
        g1.segments(4 * KIB4 - 1..5 * KIB4)
            .map(|s| s.length)
            .sum::<u64>(),
        1
    );
}

#[test]
fn decode_reports_what_is_wrong() {
    let [a, b] = ids(2).try_into().unwrap();
    let g0 = Header::base(a, 16 * KIB4, KIB4).unwrap();
    let g1 = Header::next_generation(&g0, b, &set(&[3..5]), &set(&[9..10])).unwrap();
    let bytes = g1.encode();
    assert_eq!(Header::decode(&bytes).unwrap(), g1);

    let err = Header::decode(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(
        matches!(err, SnapshotError::HeaderTruncated { .. }),
        "{err}"
    );
    let err = Header::decode(&bytes[..20]).unwrap_err();
    assert!(
        matches!(err, SnapshotError::HeaderTruncated { .. }),
        "{err}"
    );
    assert!(matches!(
        Header::decode(&[]),
        Err(SnapshotError::HeaderTruncated { .. })
    ));

    let mut wrong = bytes.clone();
    wrong[0] = b'X';
    assert!(matches!(
        Header::decode(&wrong),
        Err(SnapshotError::HeaderMagic)
    ));
    assert!(matches!(
        Header::decode(b"{\"json\":1}"),
        Err(SnapshotError::HeaderMagic)
    ));

    let mut wrong = bytes.clone();
    wrong[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        Header::decode(&wrong),
        Err(SnapshotError::HeaderVersion {
            found: 2,
            supported: 1
        })
    ));

    let mut wrong = bytes.clone();
    wrong[FIXED_LEN + 3] ^= 0x10;
    assert!(matches!(
        Header::decode(&wrong),
        Err(SnapshotError::HeaderChecksum)
    ));

    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        Header::decode(&longer),
        Err(SnapshotError::HeaderInvalid { .. })
    ));

    // A huge mapping count must not make decode allocate or overflow.
    let mut huge = bytes.clone();
    huge[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Header::decode(&huge),
        Err(SnapshotError::HeaderTruncated { .. })
    ));
}

#[test]
fn a_checksummed_but_inconsistent_header_is_rejected() {
    let a = BuildId::new();
    let mut bytes = Header::base(a, 4 * KIB4, KIB4).unwrap().encode();
    // Make the only mapping one block short and reseal the checksum.
    bytes[FIXED_LEN + 8..FIXED_LEN + 16].copy_from_slice(&(3 * KIB4).to_le_bytes());
    reseal(&mut bytes);
    let err = Header::decode(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::HeaderInvalid { .. }), "{err}");
}

fn reseal(bytes: &mut [u8]) {
    let body = bytes.len() - CHECKSUM_LEN;
    let digest = Sha256::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&digest);
}

// ---- model-based property tests ----

/// What happens to a run of blocks in one generation.
#[derive(Debug, Clone, Copy)]
enum Action {
    Keep,
    Dirty,
    Zero,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![4 => Just(Action::Keep), 2 => Just(Action::Dirty), 1 => Just(Action::Zero)]
}

#[derive(Debug, Clone)]
struct Scenario {
    block_size: u64,
    size: u64,
    /// Generation 0 stores these blocks (`None`: the whole image at identity).
    base_stored: Option<Vec<(bool, u64)>>,
    generations: Vec<Vec<(Action, u64)>>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::sample::select(vec![512u64, 1024, 4096]),
        1u64..48,
        0u64..4096,
        prop::option::of(prop::collection::vec((any::<bool>(), 1u64..6), 1..20)),
        prop::collection::vec(prop::collection::vec((action(), 1u64..6), 1..20), 0..8),
    )
        .prop_map(
            |(block_size, blocks, tail, base_stored, generations)| Scenario {
                block_size,
                size: blocks * block_size - tail % block_size,
                base_stored,
                generations,
            },
        )
}

/// Expand run-length actions to one per block, cycling if they run short.
fn per_block<T: Copy>(runs: &[(T, u64)], blocks: u64) -> Vec<T> {
    runs.iter()
        .flat_map(|&(t, n)| std::iter::repeat_n(t, n as usize))
        .cycle()
        .take(blocks as usize)
        .collect()
}

/// The naive model: each block's (build, storage offset).
type Model = Vec<(BuildId, u64)>;

fn block_len(s: &Scenario, block: u64) -> u64 {
    s.block_size.min(s.size - block * s.block_size)
}

/// Build every generation through the header and through the model.
fn run(s: &Scenario) -> Vec<(Header, Model)> {
    let blocks = s.size.div_ceil(s.block_size);
    let base = BuildId::new();
    let mut out = Vec::new();
    let (h0, m0) = match &s.base_stored {
        None => (
            Header::base(base, s.size, s.block_size).unwrap(),
            (0..blocks)
                .map(|b| (base, b * s.block_size))
                .collect::<Model>(),
        ),
        Some(runs) => {
            let stored = per_block(runs, blocks);
            let set: BlockSet = (0..blocks).filter(|&b| stored[b as usize]).collect();
            let mut cursor = 0;
            let model: Model = (0..blocks)
                .map(|b| {
                    if stored[b as usize] {
                        cursor += block_len(s, b);
                        (base, cursor - block_len(s, b))
                    } else {
                        (BuildId::NIL, 0)
                    }
                })
                .collect();
            (
                Header::base_sparse(base, s.size, s.block_size, &set).unwrap(),
                model,
            )
        }
    };
    out.push((h0, m0));
    for gen_runs in &s.generations {
        let actions = per_block(gen_runs, blocks);
        let build = BuildId::new();
        let (parent, parent_model) = out.last().unwrap();
        let dirty: BlockSet = (0..blocks)
            .filter(|&b| matches!(actions[b as usize], Action::Dirty))
            .collect();
        let zero: BlockSet = (0..blocks)
            .filter(|&b| matches!(actions[b as usize], Action::Zero))
            .collect();
        let mut model = parent_model.clone();
        let mut cursor = 0;
        for b in 0..blocks {
            match actions[b as usize] {
                Action::Keep => {}
                Action::Dirty => {
                    model[b as usize] = (build, cursor);
                    cursor += block_len(s, b);
                }
                Action::Zero => model[b as usize] = (BuildId::NIL, 0),
            }
        }
        let h = Header::next_generation(parent, build, &dirty, &zero).unwrap();
        assert_eq!(h.own_storage_len(), cursor);
        out.push((h, model));
    }
    out
}

/// The model's answer for one byte.
fn model_at(s: &Scenario, model: &Model, offset: u64) -> (BuildId, u64) {
    let (build, storage) = model[(offset / s.block_size) as usize];
    if build.is_nil() {
        (build, 0)
    } else {
        (build, storage + offset % s.block_size)
    }
}

/// Check `h` against the model at the edges and middle of every block;
/// with `maximal`, also that every run ends where the model's run does.
fn check_against_model(s: &Scenario, h: &Header, model: &Model, maximal: bool) {
    let blocks = s.size.div_ceil(s.block_size);
    for b in 0..blocks {
        let start = b * s.block_size;
        let len = block_len(s, b);
        for offset in [start, start + len / 2, start + len - 1] {
            let r = h.resolve(offset).unwrap();
            assert_eq!(
                (r.build_id, r.storage_offset),
                model_at(s, model, offset),
                "offset {offset}"
            );
            let end = offset + r.remaining;
            assert!(r.remaining > 0 && end <= s.size);
            // Every block start inside the run continues it in the model.
            let mut next = (offset / s.block_size + 1) * s.block_size;
            while next < end {
                let expect = if r.is_zero() {
                    (BuildId::NIL, 0)
                } else {
                    (r.build_id, r.storage_offset + (next - offset))
                };
                assert_eq!(
                    model_at(s, model, next),
                    expect,
                    "run from {offset} breaks at {next}"
                );
                next += s.block_size;
            }
            if maximal && end < s.size {
                let continued = if r.is_zero() {
                    (BuildId::NIL, 0)
                } else {
                    (r.build_id, r.storage_offset + r.remaining)
                };
                assert_ne!(
                    model_at(s, model, end),
                    continued,
                    "run from {offset} stops early"
                );
            }
        }
    }
    assert_eq!(h.resolve(s.size), None);
}

/// Split every mapping at each block boundary: a valid, maximally
/// un-normalized form of the same header.
fn split_blocks(h: &Header) -> Header {
    let bs = h.block_size();
    let mut out = Vec::new();
    for m in h.mappings() {
        let mut pos = m.offset;
        while pos < m.end() {
            let next = (pos + bs).min(m.end());
            out.push(m.slice(pos, next));
            pos = next;
        }
    }
    Header::from_parts(*h.meta(), out).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generations_resolve_like_the_model(s in scenario()) {
        for (h, model) in run(&s) {
            h.validate().unwrap();
            check_against_model(&s, &h, &model, true);
            // Normalized output is canonical: normalizing again changes nothing,
            // and re-normalizing a fully split copy gives it back.
            let mut again = h.clone();
            again.normalize();
            prop_assert_eq!(&again, &h);
            let mut split = split_blocks(&h);
            check_against_model(&s, &split, &model, false);
            split.normalize();
            prop_assert_eq!(&split, &h);
            // The wire format round-trips, un-normalized headers included.
            prop_assert_eq!(Header::decode(&h.encode()).unwrap(), h.clone());
            let split = split_blocks(&h);
            prop_assert_eq!(Header::decode(&split.encode()).unwrap(), split);
            // The referenced builds are exactly the model's non-nil builds.
            let expect: BTreeSet<BuildId> =
                model.iter().map(|&(b, _)| b).filter(|b| !b.is_nil()).collect();
            prop_assert_eq!(h.referenced_builds(), expect);
        }
    }

    #[test]
    fn random_bytes_never_decode(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        prop_assert!(Header::decode(&bytes).is_err());
        let mut with_magic = HEADER_MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        prop_assert!(Header::decode(&with_magic).is_err());
    }

    #[test]
    fn truncated_or_flipped_encodings_are_errors(
        s in scenario(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (h, _) = run(&s).pop().unwrap();
        let bytes = h.encode();
        let cut = cut.index(bytes.len());
        prop_assert!(Header::decode(&bytes[..cut]).is_err(), "truncated at {}", cut);
        let mut flipped = bytes.clone();
        flipped[flip.index(bytes.len())] ^= 1 << bit;
        prop_assert!(Header::decode(&flipped).is_err());
    }

    /// Corruption that keeps a valid checksum (a bug in a writer, not a
    /// disk) reaches validation: it must be an error or a valid header,
    /// never a panic.
    #[test]
    fn resealed_mutations_decode_to_valid_headers_or_errors(
        s in scenario(),
        at in any::<prop::sample::Index>(),
        value in any::<u64>(),
    ) {
        let (h, _) = run(&s).pop().unwrap();
        let mut bytes = h.encode();
        let body = bytes.len() - CHECKSUM_LEN;
        let start = at.index(body - 8 - 12) + 12;
        bytes[start..start + 8].copy_from_slice(&value.to_le_bytes());
        reseal(&mut bytes);
        if let Ok(decoded) = Header::decode(&bytes) {
            decoded.validate().unwrap();
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }
}

/// The bucket index must agree with a plain binary search, including when
/// buckets hold many mappings (large images) or mappings span many buckets.
#[test]
fn mapping_index_agrees_with_binary_search() {
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let cases: Vec<(u64, u64, BlockSet)> = vec![
        // 800 MiB, 4 KiB blocks: a bucket covers several blocks.
        (
            200_000,
            KIB4,
            BlockSet::from_ranges((0..50_000).map(|k| 4 * k..4 * k + 2)),
        ),
        // 1 TiB with a few runs: a mapping covers thousands of buckets.
        (
            1 << 28,
            KIB4,
            set(&[5..6, 1_000_000..1_000_003, (1 << 28) - 1..1 << 28]),
        ),
        // Irregular runs with a partial last block.
        (
            333_333,
            512,
            (0..333_333u64)
                .filter(|b| b % 7 < 3 || b % 11 == 0)
                .collect(),
        ),
    ];
    for (blocks, bs, dirty) in cases {
        let size = blocks * bs - 17;
        let g0 = Header::base(BuildId::new(), size, bs).unwrap();
        let g1 = Header::next_generation(&g0, BuildId::new(), &dirty, &BlockSet::new()).unwrap();
        let mut offsets: Vec<u64> = (0..20_000).map(|_| next() % size).collect();
        offsets.extend(g1.mappings().iter().flat_map(|m| [m.offset, m.end() - 1]));
        offsets.push(size - 1);
        for offset in offsets {
            let expect = g1.mappings().partition_point(|m| m.offset <= offset) - 1;
            assert_eq!(g1.index.find(offset), expect, "offset {offset} of {size}");
        }
    }
}
