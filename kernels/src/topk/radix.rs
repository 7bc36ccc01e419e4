//! Radix select over all scores: `radix2*` (bit by bit, a cube reduction per bit) and `radix256` (8-bit
//! digits, shared-memory histograms); both finish with the ordered compaction.
use super::{UNITS, row_window, write_selection};
use cubecl::prelude::*;
use nsa_dsl::Reduction;
use nsa_dsl::reduce::cube_sum;
use nsa_dsl::select::{cube_exclusive_scan, ordered_key};

/// Counts, over this cube's row, the keys at or above `candidate` (or strictly above, with `strict`).
#[cube]
pub(super) fn count_keys(
    scores: &[f32],
    base: usize,
    allowed: usize,
    candidate: u32,
    #[comptime] strict: bool,
    #[comptime] reduction: Reduction,
) -> f32 {
    let mut count = 0u32;
    let mut i = UNIT_POS as usize;
    while i < allowed {
        let key = ordered_key(scores[base + i]);
        if strict {
            count += u32::cast_from(key > candidate);
        } else {
            count += u32::cast_from(key >= candidate);
        }
        i += CUBE_DIM as usize;
    }
    cube_sum(f32::cast_from(count), UNITS, reduction)
}

#[cube(launch)]
pub(super) fn topk_kernel(
    scores: &[f32],
    starts: &[i32],
    limits: &[i32],
    indices: &mut [i32],
    rows: usize,
    s: usize,
    k: usize,
    #[comptime] reduction: Reduction,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let (first, allowed) = row_window(starts, limits, row, s);
    let base = row * s + first;
    let take_all = allowed <= k;

    // Radix select: the largest key `threshold` with at least k keys ≥ it is the k-th largest.
    let mut threshold = 0u32;
    let mut equals_needed = 0usize;
    if !take_all {
        for b in 0..32u32 {
            let candidate = threshold | (0x8000_0000u32 >> b);
            if count_keys(scores, base, allowed, candidate, false, reduction) >= f32::cast_from(k) {
                threshold = candidate;
            }
        }
        let greater = count_keys(scores, base, allowed, threshold, true, reduction);
        equals_needed = k - usize::cast_from(greater);
    }

    write_selection(
        scores,
        indices,
        row,
        base,
        first,
        allowed,
        k,
        take_all,
        threshold,
        equals_needed,
    );
}

/// Radix select with 8-bit digits: per pass a 256-bin histogram (shared atomics) of the keys that match
/// the digits chosen so far, then a suffix sum over the bins picks the digit holding the k-th largest key.
#[cube(launch)]
pub(super) fn topk_radix256_kernel(
    scores: &[f32],
    starts: &[i32],
    limits: &[i32],
    indices: &mut [i32],
    rows: usize,
    s: usize,
    k: usize,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let (first, allowed) = row_window(starts, limits, row, s);
    let base = row * s + first;
    let take_all = allowed <= k;
    let unit = UNIT_POS as usize;
    let histogram = Shared::<[Atomic<u32>]>::new_slice(256usize);
    // The chosen digit and how many keys are still to be taken below the digits chosen so far.
    let mut choice = Shared::<[u32]>::new_slice(2usize);

    let mut prefix = 0u32;
    let mut prefix_mask = 0u32;
    let mut remaining = k as u32;
    if !take_all {
        #[unroll]
        for pass in 0..4u32 {
            let shift = 24 - 8 * pass;
            if unit < 256 {
                histogram[unit].store(0u32);
            }
            sync_cube();
            let mut i = unit;
            while i < allowed {
                let key = ordered_key(scores[base + i]);
                if (key & prefix_mask) == prefix {
                    histogram[((key >> shift) & 255) as usize].fetch_add(1u32);
                }
                i += CUBE_DIM as usize;
            }
            sync_cube();
            // Unit u looks at digit 255 − u: the exclusive prefix over units counts the keys in higher digits.
            let mut count = 0u32;
            if unit < 256 {
                count = histogram[255 - unit].load();
            }
            let above = cube_exclusive_scan(count, UNITS);
            if unit < 256 && above.prefix < remaining && above.prefix + count >= remaining {
                choice[0] = (255 - unit) as u32;
                choice[1] = remaining - above.prefix;
            }
            sync_cube();
            prefix |= choice[0] << shift;
            prefix_mask |= 255u32 << shift;
            remaining = choice[1];
            sync_cube();
        }
    }
    write_selection(
        scores,
        indices,
        row,
        base,
        first,
        allowed,
        k,
        take_all,
        prefix,
        remaining as usize,
    );
}
