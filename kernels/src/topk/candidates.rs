//! The `candidates` variant: two reads of the scores, the rest of the search in shared memory.
use super::{CANDIDATES, UNITS, UNROLL, load_keys, row_window, write_selection};
use cubecl::prelude::*;
use nsa_dsl::select::{cube_exclusive_scan, ordered_key};

/// Picks the digit holding the `remaining`-th largest key from a histogram of `bins` digits (bins ≤ 8·UNITS,
/// a multiple of UNITS or below it): each unit sums its group of bins from the top, a cube prefix scan
/// counts the keys in higher groups, and the unit whose group holds the boundary walks it. Leaves
/// (digit, keys still to take within it) in `choice`; every unit must reach it.
#[cube]
pub(super) fn select_digit(histogram: &[Atomic<u32>], choice: &mut [u32], remaining: u32, #[comptime] bins: u32) {
    let group = comptime!(if bins > UNITS { bins / UNITS } else { 1 });
    let unit = UNIT_POS;
    let mut count = 0u32;
    #[unroll]
    for g in 0..group {
        let bin = unit * group + g;
        if bin < bins {
            count += histogram[(bins - 1 - bin) as usize].load();
        }
    }
    let above = cube_exclusive_scan(count, UNITS);
    if above.prefix < remaining && above.prefix + count >= remaining {
        let mut seen = above.prefix;
        let mut found = false;
        #[unroll]
        for g in 0..group {
            let bin = bins - 1 - (unit * group + g);
            let c = histogram[bin as usize].load();
            if !found && seen + c >= remaining {
                choice[0] = bin;
                choice[1] = remaining - seen;
                found = true;
            }
            seen += c;
        }
    }
}

/// Adds to the histogram the digit (key >> shift) & (bins − 1) of every key matching `prefix` under
/// `mask`: over positions 0..count, or over the positions in `candidates[0..count]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn count_digits(
    scores: &[f32],
    base: usize,
    candidates: &[u32],
    count: usize,
    prefix: u32,
    mask: u32,
    shift: u32,
    #[comptime] bins: u32,
    #[comptime] from_candidates: bool,
    histogram: &[Atomic<u32>],
) {
    let stride = CUBE_DIM as usize;
    let mut keys = Array::<u32>::new(UNROLL);
    let mut c = UNIT_POS as usize;
    while c < count {
        // UNROLL loads in flight (a unit past the end reads its first one again).
        #[unroll]
        for j in 0..UNROLL {
            let i = select(c + j * stride < count, c + j * stride, c);
            let mut position = i;
            if from_candidates {
                position = candidates[i] as usize;
            }
            keys[j] = ordered_key(scores[base + position]);
        }
        #[unroll]
        for j in 0..UNROLL {
            if c + j * stride < count && (keys[j] & mask) == prefix {
                histogram[((keys[j] >> shift) & (bins - 1)) as usize].fetch_add(1u32);
            }
        }
        c += comptime!(UNROLL) * stride;
    }
}

/// Radix select that reads the scores twice: an 11-bit digit histogram finds the bucket of the k-th
/// largest key; a second pass writes every position above that bucket and collects the bucket's positions
/// (at most CANDIDATES) in shared memory, where three more digit passes (8, 8, 5 bits) finish the search.
/// A bucket too large for shared memory falls back to digit passes over all scores. Output unordered.
#[cube(launch)]
pub(super) fn topk_candidates_kernel(
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
    let unit = UNIT_POS as usize;
    let histogram = Shared::<[Atomic<u32>]>::new_slice(2048usize);
    let counters = Shared::<[Atomic<u32>]>::new_slice(2usize);
    let mut candidates = Shared::<[u32]>::new_slice(CANDIDATES);
    let mut choice = Shared::<[u32]>::new_slice(2usize);
    if allowed <= k {
        write_selection(scores, indices, row, base, first, allowed, k, true, 0u32, 0usize);
    } else {
        // Pass 1: the top 11 bits.
        #[unroll]
        for g in 0..8u32 {
            histogram[unit * 8 + g as usize].store(0u32);
        }
        if unit < 2 {
            counters[unit].store(0u32);
        }
        sync_cube();
        count_digits(
            scores,
            base,
            &candidates,
            allowed,
            0u32,
            0u32,
            21u32,
            2048u32,
            false,
            &histogram,
        );
        sync_cube();
        select_digit(&histogram, &mut choice, k as u32, 2048u32);
        sync_cube();
        let top = choice[0];
        let remaining = choice[1];
        let bucket = histogram[top as usize].load() as usize;
        let prefix = top << 21;
        let mask = 0xffe0_0000u32;
        let from_candidates = bucket <= CANDIDATES;
        sync_cube();
        if from_candidates {
            // Pass 2: keys above the bucket are selected; the bucket's positions become candidates.
            let mut keys = Array::<u32>::new(UNROLL);
            let mut valid = Array::<bool>::new(UNROLL);
            let mut c = unit;
            while c < allowed {
                load_keys(scores, base, c, allowed, &mut keys, &mut valid);
                #[unroll]
                for j in 0..UNROLL {
                    let digit = keys[j] >> 21;
                    let i = c + j * CUBE_DIM as usize;
                    if valid[j] && digit > top {
                        indices[row * k + counters[0].fetch_add(1u32) as usize] = (first + i) as i32;
                    } else if valid[j] && digit == top {
                        candidates[counters[1].fetch_add(1u32) as usize] = i as u32;
                    }
                }
                c += comptime!(UNROLL) * CUBE_DIM as usize;
            }
            sync_cube();
        }
        let count = select(from_candidates, bucket, allowed);
        finish_select(
            scores,
            indices,
            row,
            k,
            base,
            first,
            allowed,
            &candidates,
            count,
            from_candidates,
            prefix,
            mask,
            remaining,
            &histogram,
            &mut choice,
            &counters,
        );
    }
}

/// Finishes row `row`'s selection once its top 11 bits are known (`prefix` under `mask`, `remaining` keys
/// still to take at that digit): three more digit passes (8, 8, 5 bits) over the `count` positions in
/// `candidates` (`from_candidates`) or over all `allowed` scores, then the keys above the threshold and the
/// `remaining` lowest positions equal to it — appended after the `written[0]` already written from the
/// candidates, or (fallback) the whole selection in position order.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn finish_select(
    scores: &[f32],
    indices: &mut [i32],
    row: usize,
    k: usize,
    base: usize,
    first: usize,
    allowed: usize,
    candidates: &[u32],
    count: usize,
    from_candidates: bool,
    prefix: u32,
    mask: u32,
    remaining: u32,
    histogram: &[Atomic<u32>],
    choice: &mut [u32],
    written: &[Atomic<u32>],
) {
    let unit = UNIT_POS as usize;
    let mut prefix = prefix;
    let mut mask = mask;
    let mut remaining = remaining;
    // Keys equal to the final threshold (the last pass's digit count).
    let mut equal_total = 0u32;
    // The remaining 21 bits: 8, 8 and 5 at a time, over the candidates or (fallback) all scores.
    #[unroll]
    for pass in 0..3u32 {
        let shift = comptime!([13u32, 5, 0][pass as usize]);
        let bins = comptime!([256u32, 256, 32][pass as usize]);
        if unit < 256 {
            histogram[unit].store(0u32);
        }
        sync_cube();
        if from_candidates {
            count_digits(
                scores, base, candidates, count, prefix, mask, shift, bins, true, histogram,
            );
        } else {
            count_digits(
                scores, base, candidates, count, prefix, mask, shift, bins, false, histogram,
            );
        }
        sync_cube();
        select_digit(histogram, choice, remaining, 256u32);
        sync_cube();
        equal_total = histogram[choice[0] as usize].load();
        prefix |= choice[0] << shift;
        mask |= (bins - 1) << shift;
        remaining = choice[1];
        sync_cube();
    }
    if from_candidates {
        // Candidates above the threshold, then the `remaining` lowest positions equal to it.
        let mut c = unit;
        while c < count {
            let position = candidates[c];
            let key = ordered_key(scores[base + position as usize]);
            let mut take = key > prefix;
            if key == prefix && remaining < equal_total {
                // Only some of the keys equal to the threshold are taken: the lowest positions.
                let mut rank = 0u32;
                for other in 0..count {
                    let p = candidates[other];
                    if p < position && ordered_key(scores[base + p as usize]) == prefix {
                        rank += 1;
                    }
                }
                take = rank < remaining;
            } else if key == prefix {
                take = true;
            }
            if take {
                indices[row * k + written[0].fetch_add(1u32) as usize] = (first + position as usize) as i32;
            }
            c += CUBE_DIM as usize;
        }
    } else {
        write_selection(
            scores,
            indices,
            row,
            base,
            first,
            allowed,
            k,
            false,
            prefix,
            remaining as usize,
        );
    }
}
