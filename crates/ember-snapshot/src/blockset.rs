//! `BlockSet`: a set of block indexes kept as sorted, disjoint, non-adjacent
//! runs. Dirty and zero sets of a snapshot are a few runs in the common case
//! (a guest touches memory in clusters), so runs beat a bitmap on size and
//! hand the header code exactly what it consumes. It knows nothing about
//! bytes or block sizes.

use std::ops::Range;

/// A set of block indexes stored as coalesced runs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    /// Sorted, non-empty, and separated by at least one missing block.
    runs: Vec<Range<u64>>,
}

impl BlockSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The set covering every block of every range; ranges may overlap,
    /// touch or come in any order, and empty ones are ignored.
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> Self {
        let mut runs: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        runs.sort_unstable_by_key(|r| r.start);
        let mut set = BlockSet {
            runs: Vec::with_capacity(runs.len()),
        };
        for r in runs {
            set.push_sorted(r);
        }
        set
    }

    /// Every block in `0..blocks`.
    pub fn full(blocks: u64) -> Self {
        Self::from_ranges(std::iter::once(0..blocks))
    }

    /// Add one block.
    pub fn insert(&mut self, block: u64) {
        self.insert_run(block..block + 1);
    }

    /// Add every block of `run`. Appending in ascending order is O(1); an
    /// insertion in the middle costs O(runs).
    pub fn insert_run(&mut self, run: Range<u64>) {
        if run.start >= run.end {
            return;
        }
        match self.runs.last() {
            None => self.runs.push(run),
            Some(last) if run.start >= last.start => self.push_sorted(run),
            Some(_) => {
                // Runs that end before `run` starts (not touching) stay; the
                // ones that overlap or touch it merge into it.
                let first = self.runs.partition_point(|r| r.end < run.start);
                let last = self.runs.partition_point(|r| r.start <= run.end);
                let merged = if first < last {
                    self.runs[first].start.min(run.start)..self.runs[last - 1].end.max(run.end)
                } else {
                    run
                };
                self.runs.splice(first..last, [merged]);
            }
        }
    }

    /// Append a run that starts at or after the last run's start.
    fn push_sorted(&mut self, run: Range<u64>) {
        match self.runs.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => self.runs.push(run),
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end <= block);
        self.runs.get(i).is_some_and(|r| r.start <= block)
    }

    /// The runs, ascending, each non-empty, none touching the next.
    pub fn runs(&self) -> impl ExactSizeIterator<Item = Range<u64>> + '_ {
        self.runs.iter().cloned()
    }

    /// The blocks, ascending.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| r.clone())
    }

    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// One past the highest block, or 0 when empty.
    pub fn end(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.end)
    }

    /// The lowest block present in both sets.
    pub fn first_common(&self, other: &BlockSet) -> Option<u64> {
        let (mut i, mut j) = (0, 0);
        while i < self.runs.len() && j < other.runs.len() {
            let (a, b) = (&self.runs[i], &other.runs[j]);
            let start = a.start.max(b.start);
            if start < a.end.min(b.end) {
                return Some(start);
            }
            if a.end <= b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        None
    }

    /// Blocks of `0..blocks` not in the set.
    pub fn complement(&self, blocks: u64) -> BlockSet {
        let mut out = BlockSet::new();
        let mut next = 0;
        for r in &self.runs {
            if r.start >= blocks {
                break;
            }
            out.insert_run(next..r.start);
            next = r.end;
        }
        out.insert_run(next..blocks);
        out
    }

    /// Blocks in either set.
    pub fn union(&self, other: &BlockSet) -> BlockSet {
        BlockSet::from_ranges(self.runs().chain(other.runs()))
    }
}

impl FromIterator<u64> for BlockSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut set = BlockSet::new();
        for b in iter {
            set.insert(b);
        }
        set
    }
}

impl std::fmt::Debug for BlockSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.runs.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn runs(s: &BlockSet) -> Vec<Range<u64>> {
        s.runs().collect()
    }

    #[test]
    fn ranges_coalesce_when_they_touch_or_overlap_in_any_order() {
        let s = BlockSet::from_ranges([10..12, 0..3, 3..5, 11..20, 7..7, 30..31]);
        assert_eq!(runs(&s), vec![0..5, 10..20, 30..31]);
        assert_eq!(s.len(), 5 + 10 + 1);
        assert_eq!(s.run_count(), 3);
        assert_eq!(s.end(), 31);
    }

    #[test]
    fn inserting_in_order_extends_the_last_run() {
        let s: BlockSet = [1, 2, 3, 5, 6, 9].into_iter().collect();
        assert_eq!(runs(&s), vec![1..4, 5..7, 9..10]);
    }

    #[test]
    fn inserting_out_of_order_bridges_neighbouring_runs() {
        let mut s = BlockSet::from_ranges([0..2, 4..6, 10..12]);
        s.insert_run(2..4);
        assert_eq!(runs(&s), vec![0..6, 10..12]);
        s.insert(8);
        assert_eq!(runs(&s), vec![0..6, 8..9, 10..12]);
        s.insert(9);
        assert_eq!(runs(&s), vec![0..6, 8..12]);
        s.insert_run(0..100);
        assert_eq!(runs(&s), vec![0..100]);
    }

    #[test]
    fn contains_checks_run_boundaries() {
        let s = BlockSet::from_ranges([2..4, 8..9]);
        let members: Vec<u64> = (0..12).filter(|&b| s.contains(b)).collect();
        assert_eq!(members, vec![2, 3, 8]);
        assert!(!BlockSet::new().contains(0));
    }

    #[test]
    fn complement_and_union_partition_the_range() {
        let s = BlockSet::from_ranges([0..2, 5..7, 9..20]);
        let c = s.complement(10);
        assert_eq!(runs(&c), vec![2..5, 7..9]);
        assert_eq!(runs(&s.union(&c)), vec![0..20]);
        assert_eq!(s.first_common(&c), None);
        assert_eq!(runs(&BlockSet::new().complement(4)), vec![0..4]);
        assert!(BlockSet::full(4).complement(4).is_empty());
    }

    #[test]
    fn first_common_finds_the_lowest_shared_block() {
        let a = BlockSet::from_ranges([0..3, 10..20]);
        let b = BlockSet::from_ranges([3..5, 15..16]);
        assert_eq!(a.first_common(&b), Some(15));
    }

    proptest! {
        #[test]
        fn matches_a_btreeset(ops in proptest::collection::vec((0u64..200, 0u64..8), 0..60)) {
            let mut set = BlockSet::new();
            let mut model = BTreeSet::new();
            for (start, len) in ops {
                set.insert_run(start..start + len);
                model.extend(start..start + len);
            }
            prop_assert_eq!(set.blocks().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(set.len(), model.len() as u64);
            let rs = runs(&set);
            for w in rs.windows(2) {
                prop_assert!(w[0].end < w[1].start, "runs touch: {:?}", rs);
            }
            for b in 0..210 {
                prop_assert_eq!(set.contains(b), model.contains(&b));
            }
            let c = set.complement(150);
            for b in 0..150 {
                prop_assert_eq!(c.contains(b), !model.contains(&b));
            }
            prop_assert_eq!(BlockSet::from_ranges(rs.iter().rev().cloned()), set);
        }
    }
}
