//! The `candidates_split` variant: `candidates` with each row's two reads of the scores spread over
//! `splits` cubes, for few long rows (a decode step: 128 rows of 128K keys kept 128 cubes of 256 units
//! busy, each reading half a megabyte twice). Four launches:
//! 1. histogram (rows × splits cubes): the 11-bit digit histogram of the cube's segment of its row;
//! 2. select (a cube per row): the digit of the k-th largest key from the row's segment histograms, and
//!    the mode: take the whole row, finish from candidates, or fall back to passes over the whole row;
//! 3. collect (rows × splits cubes): keys above that digit written, the digit's positions gathered as
//!    candidates (each segment's slots start after the earlier segments' counts, from their histograms);
//! 4. finish (a cube per row): the remaining 21 bits as in `candidates`.
use super::candidates::{finish_select, select_digit};
use super::{CANDIDATES, UNITS, UNROLL, load_keys, row_window, write_selection};
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::select::cube_exclusive_scan;

/// Per row in `choice`: the top digit, keys still to take at it, the mode, and the keys at the top digit.
const CHOICE: usize = 4;
const TAKE_ALL: u32 = 0;
const FROM_CANDIDATES: u32 = 1;
const WHOLE_ROW: u32 = 2;

/// Cubes per row: enough for ~1024 cubes in all, each segment at least 8192 scores.
pub(super) fn splits(rows: usize, s: usize) -> usize {
    1024usize.div_ceil(rows.max(1)).min(s.div_ceil(8192)).max(1)
}

/// Positions begin..end of a row's `allowed` that segment `split` of `splits` covers.
#[cube]
fn segment(allowed: usize, split: usize, splits: usize) -> (usize, usize) {
    let length = allowed.div_ceil(splits);
    let begin = select(split * length < allowed, split * length, allowed);
    let end = select(begin + length < allowed, begin + length, allowed);
    (begin, end)
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn topk_split_histogram_kernel(
    scores: &[f32],
    starts: &[i32],
    limits: &[i32],
    histograms: &mut [u32],
    rows: usize,
    s: usize,
    k: usize,
    splits: usize,
) {
    let cube = CUBE_POS;
    let row = cube / splits;
    if row >= rows {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let (first, allowed) = row_window(starts, limits, row, s);
    let histogram = Shared::<[Atomic<u32>]>::new_slice(2048usize);
    #[unroll]
    for g in 0..8usize {
        histogram[unit * 8 + g].store(0u32);
    }
    sync_cube();
    if allowed > k {
        let (begin, end) = segment(allowed, cube % splits, splits);
        let mut keys = Array::<u32>::new(UNROLL);
        let mut valid = Array::<bool>::new(UNROLL);
        let mut c = begin + unit;
        while c < end {
            load_keys(scores, row * s + first, c, end, &mut keys, &mut valid);
            #[unroll]
            for j in 0..UNROLL {
                if valid[j] {
                    histogram[(keys[j] >> 21) as usize].fetch_add(1u32);
                }
            }
            c += comptime!(UNROLL) * CUBE_DIM as usize;
        }
    }
    sync_cube();
    #[unroll]
    for g in 0..8usize {
        histograms[cube * 2048 + unit * 8 + g] = histogram[unit * 8 + g].load();
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn topk_split_select_kernel(
    starts: &[i32],
    limits: &[i32],
    histograms: &[u32],
    choice: &mut [u32],
    rows: usize,
    s: usize,
    k: usize,
    splits: usize,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let (_, allowed) = row_window(starts, limits, row, s);
    let histogram = Shared::<[Atomic<u32>]>::new_slice(2048usize);
    let mut digit = Shared::<[u32]>::new_slice(2usize);
    // A unit's 8 bins summed over the splits, the 8 loads of a split in flight together.
    let mut sums = Array::<u32>::new(8usize);
    #[unroll]
    for g in 0..8usize {
        sums[g] = 0u32;
    }
    for split in 0..splits {
        #[unroll]
        for g in 0..8usize {
            sums[g] += histograms[(row * splits + split) * 2048 + unit * 8 + g];
        }
    }
    #[unroll]
    for g in 0..8usize {
        histogram[unit * 8 + g].store(sums[g]);
    }
    if unit == 0 {
        // A row with ≤ k allowed keys has an empty histogram: no unit picks a digit.
        digit[0] = 0u32;
        digit[1] = 0u32;
    }
    sync_cube();
    select_digit(&histogram, &mut digit, k as u32, 2048u32);
    sync_cube();
    if unit == 0 {
        let bucket = histogram[digit[0] as usize].load() as usize;
        choice[row * CHOICE] = digit[0];
        choice[row * CHOICE + 1] = digit[1];
        choice[row * CHOICE + 2] = select(
            allowed <= k,
            TAKE_ALL,
            select(bucket <= CANDIDATES, FROM_CANDIDATES, WHOLE_ROW),
        );
        choice[row * CHOICE + 3] = bucket as u32;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn topk_split_collect_kernel(
    scores: &[f32],
    starts: &[i32],
    limits: &[i32],
    histograms: &[u32],
    choice: &[u32],
    candidates: &mut [u32],
    indices: &mut [i32],
    rows: usize,
    s: usize,
    k: usize,
    splits: usize,
) {
    let cube = CUBE_POS;
    let row = cube / splits;
    if row >= rows {
        terminate!();
    }
    if choice[row * CHOICE + 2] != FROM_CANDIDATES {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let split = cube % splits;
    let top = choice[row * CHOICE];
    // This segment's keys go after those the segments before it hold above / at the top digit (from
    // their histograms); slots within the segment come from shared counters. (Global atomics on one
    // counter a row serialized: 134 µs of 330 at 128 rows × 128K.)
    let mut above = 0u32;
    let mut at = 0u32;
    for earlier in 0..split {
        #[unroll]
        for g in 0..8usize {
            let bin = unit * 8 + g;
            let n = histograms[(row * splits + earlier) * 2048 + bin];
            above += select(bin as u32 > top, n, 0u32);
            at += select(bin as u32 == top, n, 0u32);
        }
    }
    let above_before = cube_exclusive_scan(above, UNITS).total;
    let at_before = cube_exclusive_scan(at, UNITS).total;
    let slots = Shared::<[Atomic<u32>]>::new_slice(2usize);
    if unit == 0 {
        slots[0].store(above_before);
        slots[1].store(at_before);
    }
    sync_cube();
    let (first, allowed) = row_window(starts, limits, row, s);
    let (begin, end) = segment(allowed, split, splits);
    let mut keys = Array::<u32>::new(UNROLL);
    let mut valid = Array::<bool>::new(UNROLL);
    let mut c = begin + unit;
    while c < end {
        load_keys(scores, row * s + first, c, end, &mut keys, &mut valid);
        #[unroll]
        for j in 0..UNROLL {
            let digit = keys[j] >> 21;
            let position = c + j * CUBE_DIM as usize;
            if valid[j] && digit > top {
                indices[row * k + slots[0].fetch_add(1u32) as usize] = (first + position) as i32;
            } else if valid[j] && digit == top {
                candidates[row * CANDIDATES + slots[1].fetch_add(1u32) as usize] = position as u32;
            }
        }
        c += comptime!(UNROLL) * CUBE_DIM as usize;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn topk_split_finish_kernel(
    scores: &[f32],
    starts: &[i32],
    limits: &[i32],
    choice: &[u32],
    candidates: &[u32],
    indices: &mut [i32],
    rows: usize,
    s: usize,
    k: usize,
) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let (first, allowed) = row_window(starts, limits, row, s);
    let base = row * s + first;
    let mode = choice[row * CHOICE + 2];
    let histogram = Shared::<[Atomic<u32>]>::new_slice(256usize);
    let written = Shared::<[Atomic<u32>]>::new_slice(1usize);
    let mut local = Shared::<[u32]>::new_slice(CANDIDATES);
    let mut digit = Shared::<[u32]>::new_slice(2usize);
    if mode == TAKE_ALL {
        write_selection(scores, indices, row, base, first, allowed, k, true, 0u32, 0usize);
    } else {
        let from_candidates = mode == FROM_CANDIDATES;
        let mut count = allowed;
        if from_candidates {
            count = choice[row * CHOICE + 3] as usize;
            let mut c = unit;
            while c < count {
                local[c] = candidates[row * CANDIDATES + c];
                c += CUBE_DIM as usize;
            }
            if unit == 0 {
                // The collect pass wrote every key above the top digit: all but the `remaining` to take at it.
                written[0].store(k as u32 - choice[row * CHOICE + 1]);
            }
        }
        sync_cube();
        finish_select(
            scores,
            indices,
            row,
            k,
            base,
            first,
            allowed,
            &local,
            count,
            from_candidates,
            choice[row * CHOICE] << 21,
            0xffe0_0000u32,
            choice[row * CHOICE + 1],
            &histogram,
            &mut digit,
            &written,
        );
    }
}

/// Launches the four kernels over `t` rows of `s` scores (workspace from the device's pool).
pub(super) fn launch(device: &Device, t: usize, s: usize, k: usize, inputs: &[Handle], outputs: &[Handle]) {
    let client = &device.client;
    let splits = splits(t, s);
    let histograms = client.empty(4 * t * splits * 2048);
    let choice = client.empty(4 * t * CHOICE);
    let candidates = client.empty(4 * t * CANDIDATES);
    let cube = CubeDim::new_1d(UNITS);
    let (scores, starts, limits) = (&inputs[0], &inputs[1], &inputs[2]);
    topk_split_histogram_kernel::launch(
        client,
        grid(t * splits),
        cube,
        buffer(scores, t * s),
        buffer(starts, t),
        buffer(limits, t),
        buffer(&histograms, t * splits * 2048),
        t,
        s,
        k,
        splits,
    );
    topk_split_select_kernel::launch(
        client,
        grid(t),
        cube,
        buffer(starts, t),
        buffer(limits, t),
        buffer(&histograms, t * splits * 2048),
        buffer(&choice, t * CHOICE),
        t,
        s,
        k,
        splits,
    );
    topk_split_collect_kernel::launch(
        client,
        grid(t * splits),
        cube,
        buffer(scores, t * s),
        buffer(starts, t),
        buffer(limits, t),
        buffer(&histograms, t * splits * 2048),
        buffer(&choice, t * CHOICE),
        buffer(&candidates, t * CANDIDATES),
        buffer(&outputs[0], t * k),
        t,
        s,
        k,
        splits,
    );
    topk_split_finish_kernel::launch(
        client,
        grid(t),
        cube,
        buffer(scores, t * s),
        buffer(starts, t),
        buffer(limits, t),
        buffer(&choice, t * CHOICE),
        buffer(&candidates, t * CANDIDATES),
        buffer(&outputs[0], t * k),
        t,
        s,
        k,
    );
}

/// The four kernels' definitions for `target`, in launch order.
pub(super) fn definitions(target: IrTarget) -> Vec<KernelDefinition> {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let settings = || ir_settings(CubeDim::new_1d(UNITS));
    let (p, tp) = (&props, &target_props);
    vec![
        topk_split_histogram_kernel::TopkSplitHistogramKernel::new(
            settings(),
            p.clone(),
            tp.clone(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            (),
        )
        .define(),
        topk_split_select_kernel::TopkSplitSelectKernel::new(
            settings(),
            p.clone(),
            tp.clone(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            (),
        )
        .define(),
        topk_split_collect_kernel::TopkSplitCollectKernel::new(
            settings(),
            p.clone(),
            tp.clone(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            (),
        )
        .define(),
        topk_split_finish_kernel::TopkSplitFinishKernel::new(
            settings(),
            p.clone(),
            tp.clone(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
        )
        .define(),
    ]
}
