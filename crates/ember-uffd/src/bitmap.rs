//! A fixed-size bitmap of atomic words: one bit per guest page, set and
//! cleared from many threads without a lock. The page server keeps three:
//! pages claimed for population, pages removed by the guest, pages written.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
}

impl AtomicBitmap {
    pub fn new(bits: usize) -> AtomicBitmap {
        AtomicBitmap {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; true if this call set it (it was clear).
    pub fn set(&self, i: usize) -> bool {
        let bit = 1 << (i % 64);
        self.words[i / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Set every bit of `range`.
    pub fn set_range(&self, range: Range<usize>) {
        for_words(range, |w, mask| {
            self.words[w].fetch_or(mask, Ordering::AcqRel);
        });
    }

    /// Clear every bit of `range`.
    pub fn clear_range(&self, range: Range<usize>) {
        for_words(range, |w, mask| {
            self.words[w].fetch_and(!mask, Ordering::AcqRel);
        });
    }

    /// Set every bit of `range` and append to `out` the runs of bits that
    /// this call set (those that were clear). Two callers racing for one bit
    /// see it in exactly one of their outputs.
    pub fn claim_range(&self, range: Range<usize>, out: &mut Vec<Range<usize>>) {
        for_words(range, |w, mask| {
            let before = self.words[w].fetch_or(mask, Ordering::AcqRel);
            let mut won = mask & !before;
            while won != 0 {
                let lo = won.trailing_zeros() as usize;
                let run = (won >> lo).trailing_ones() as usize;
                let start = w * 64 + lo;
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = start + run,
                    _ => out.push(start..start + run),
                }
                won &= !(mask_of(lo, lo + run));
            }
        });
    }

    /// Is any bit of `range` set?
    #[cfg(test)]
    pub fn any(&self, range: Range<usize>) -> bool {
        let mut found = false;
        for_words(range, |w, mask| {
            found |= self.words[w].load(Ordering::Acquire) & mask != 0;
        });
        found
    }

    /// The runs of set bits, in order.
    pub fn runs(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let lo = bits.trailing_zeros() as usize;
                let run = (bits >> lo).trailing_ones() as usize;
                let start = w * 64 + lo;
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = start + run,
                    _ => out.push(start..start + run),
                }
                bits &= !mask_of(lo, lo + run);
            }
        }
        out
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }
}

fn mask_of(lo: usize, hi: usize) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let width = hi - lo;
    if width == 64 {
        u64::MAX
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// Call `f(word_index, mask)` for each word `range` touches.
fn for_words(range: Range<usize>, mut f: impl FnMut(usize, u64)) {
    let mut i = range.start;
    while i < range.end {
        let w = i / 64;
        let lo = i % 64;
        let hi = (range.end - w * 64).min(64);
        f(w, mask_of(lo, hi));
        i = w * 64 + hi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Claims, clears and run listing agree with a Vec<bool> model.
        #[test]
        fn operations_match_a_naive_model(ops in proptest::collection::vec((0u8..3, 0usize..300, 0usize..100), 1..40)) {
            let bm = AtomicBitmap::new(300);
            let mut model = vec![false; 300];
            for (op, start, len) in ops {
                let end = (start + len).min(300);
                if start >= end { continue; }
                match op {
                    0 => {
                        let mut out = Vec::new();
                        bm.claim_range(start..end, &mut out);
                        let mut want: Vec<Range<usize>> = Vec::new();
                        for (i, bit) in model.iter_mut().enumerate().take(end).skip(start) {
                            if !*bit {
                                match want.last_mut() {
                                    Some(r) if r.end == i => r.end = i + 1,
                                    _ => want.push(i..i + 1),
                                }
                                *bit = true;
                            }
                        }
                        prop_assert_eq!(out, want);
                    }
                    1 => { bm.clear_range(start..end); for b in &mut model[start..end] { *b = false; } }
                    _ => { bm.set_range(start..end); for b in &mut model[start..end] { *b = true; } }
                }
                prop_assert_eq!(bm.any(start..end), model[start..end].iter().any(|b| *b));
            }
            let mut want: Vec<Range<usize>> = Vec::new();
            for (i, b) in model.iter().enumerate() {
                if *b {
                    match want.last_mut() { Some(r) if r.end == i => r.end = i + 1, _ => want.push(i..i + 1) }
                }
            }
            prop_assert_eq!(bm.runs(), want);
            prop_assert_eq!(bm.count(), model.iter().filter(|b| **b).count());
        }
    }
}
