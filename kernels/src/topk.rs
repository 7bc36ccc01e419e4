//! Top-k per row: the `k` largest of `scores[t, 0..=limit[t]]`, as int32 positions, −1 padded.
//!
//! scores [t, s] f32, limit [t] i32 (last allowed position, inclusive; −1 = none; optional, default s − 1)
//! → indices [t, k] i32, unordered. A row with ≤ k allowed positions returns all of them. Ties (equal f32
//! bits) go to the lower position; values are ordered by IEEE total order (−0 < +0).
//! Variant `radix256`: one cube per row; 4 passes of 8-bit digit histograms (shared-memory atomics)
//! narrow the k-th largest key down, then the same compaction. Variants `radix2*`: one cube per row; a bit-by-bit radix select finds the k-th largest key (32 counting
//! passes, each a cube reduction), then an in-order compaction (cube prefix sums) writes the selection.
//! Exact: index sets must equal the reference's. Rows of up to 2²⁴ scores (counts are summed in f32).
use crate::launch::{buffer, grid, ir_props, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::Reduction;
use nsa_dsl::reduce::cube_sum;
use nsa_dsl::select::{cube_exclusive_scan, ordered_key};
use rand::Rng;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "candidates",
        summary: "11-bit bucket, then radix select over its positions in shared memory",
        needs_plane_ops: false,
    },
    Variant {
        name: "radix256",
        summary: "8-bit radix select: 4 histogram passes (shared atomics)",
        needs_plane_ops: false,
    },
    Variant {
        name: "radix2",
        summary: "bit-by-bit radix select, plane reductions",
        needs_plane_ops: true,
    },
    Variant {
        name: "radix2_shared",
        summary: "bit-by-bit radix select, shared-memory reductions",
        needs_plane_ops: false,
    },
];

const UNITS: u32 = 256;
/// Shared-memory capacity for the positions of the threshold's 11-bit bucket (`candidates` variant).
const CANDIDATES: usize = 3584;

/// How many leading positions of row `row` may be selected: limit + 1, at most s (none for limit < 0).
#[cube]
fn allowed_positions(limits: &[i32], row: usize, s: usize) -> usize {
    let limit = limits[row];
    let mut allowed = 0usize;
    if limit >= 0 {
        allowed = select(limit as usize + 1 < s, limit as usize + 1, s);
    }
    allowed
}

/// Counts, over this cube's row, the keys at or above `candidate` (or strictly above, with `strict`).
#[cube]
fn count_keys(
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
fn topk_kernel(
    scores: &[f32],
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
    let allowed = allowed_positions(limits, row, s);
    let base = row * s;
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
        allowed,
        k,
        take_all,
        threshold,
        equals_needed,
    );
}

/// Writes row `row`'s selection in position order: every allowed key above `threshold` and the first
/// `equals_needed` equal to it (all allowed keys with `take_all`), then −1 up to k.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_selection(
    scores: &[f32],
    indices: &mut [i32],
    row: usize,
    base: usize,
    allowed: usize,
    k: usize,
    take_all: bool,
    threshold: u32,
    equals_needed: usize,
) {
    let mut written = 0usize;
    let mut equals_seen = 0usize;
    let mut chunk = 0usize;
    while chunk < allowed {
        let i = chunk + UNIT_POS as usize;
        let mut key = 0u32;
        if i < allowed {
            key = ordered_key(scores[base + i]);
        }
        let valid = i < allowed;
        let above = valid && (take_all || key > threshold);
        let equal = valid && !take_all && key == threshold;
        let equal_rank = cube_exclusive_scan(u32::cast_from(equal), UNITS);
        let selected = above || (equal && equals_seen + (equal_rank.prefix as usize) < equals_needed);
        let slot = cube_exclusive_scan(u32::cast_from(selected), UNITS);
        if selected {
            indices[row * k + written + slot.prefix as usize] = i as i32;
        }
        written += slot.total as usize;
        equals_seen += equal_rank.total as usize;
        chunk += CUBE_DIM as usize;
    }
    let mut j = written + UNIT_POS as usize;
    while j < k {
        indices[row * k + j] = -1;
        j += CUBE_DIM as usize;
    }
}

/// Radix select with 8-bit digits: per pass a 256-bin histogram (shared atomics) of the keys that match
/// the digits chosen so far, then a suffix sum over the bins picks the digit holding the k-th largest key.
#[cube(launch)]
fn topk_radix256_kernel(scores: &[f32], limits: &[i32], indices: &mut [i32], rows: usize, s: usize, k: usize) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let allowed = allowed_positions(limits, row, s);
    let base = row * s;
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
        allowed,
        k,
        take_all,
        prefix,
        remaining as usize,
    );
}

/// Picks the digit holding the `remaining`-th largest key from a histogram of `bins` digits (bins ≤ 8·UNITS,
/// a multiple of UNITS or below it): each unit sums its group of bins from the top, a cube prefix scan
/// counts the keys in higher groups, and the unit whose group holds the boundary walks it. Leaves
/// (digit, keys still to take within it) in `choice`; every unit must reach it.
#[cube]
fn select_digit(histogram: &[Atomic<u32>], choice: &mut [u32], remaining: u32, #[comptime] bins: u32) {
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
fn count_digits(
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
    let mut c = UNIT_POS as usize;
    while c < count {
        let mut position = c;
        if from_candidates {
            position = candidates[c] as usize;
        }
        let key = ordered_key(scores[base + position]);
        if (key & mask) == prefix {
            histogram[((key >> shift) & (bins - 1)) as usize].fetch_add(1u32);
        }
        c += CUBE_DIM as usize;
    }
}

/// Radix select that reads the scores twice: an 11-bit digit histogram finds the bucket of the k-th
/// largest key; a second pass writes every position above that bucket and collects the bucket's positions
/// (at most CANDIDATES) in shared memory, where three more digit passes (8, 8, 5 bits) finish the search.
/// A bucket too large for shared memory falls back to digit passes over all scores. Output unordered.
#[cube(launch)]
fn topk_candidates_kernel(scores: &[f32], limits: &[i32], indices: &mut [i32], rows: usize, s: usize, k: usize) {
    let row = CUBE_POS;
    if row >= rows {
        terminate!();
    }
    let allowed = allowed_positions(limits, row, s);
    let base = row * s;
    let unit = UNIT_POS as usize;
    let histogram = Shared::<[Atomic<u32>]>::new_slice(2048usize);
    let counters = Shared::<[Atomic<u32>]>::new_slice(2usize);
    let mut candidates = Shared::<[u32]>::new_slice(CANDIDATES);
    let mut choice = Shared::<[u32]>::new_slice(2usize);
    if allowed <= k {
        write_selection(scores, indices, row, base, allowed, k, true, 0u32, 0usize);
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
        let mut remaining = choice[1];
        let bucket = histogram[top as usize].load() as usize;
        let mut prefix = top << 21;
        let mut mask = 0xffe0_0000u32;
        let from_candidates = bucket <= CANDIDATES;
        sync_cube();
        if from_candidates {
            // Pass 2: keys above the bucket are selected; the bucket's positions become candidates.
            let mut i = unit;
            while i < allowed {
                let digit = ordered_key(scores[base + i]) >> 21;
                if digit > top {
                    indices[row * k + counters[0].fetch_add(1u32) as usize] = i as i32;
                } else if digit == top {
                    candidates[counters[1].fetch_add(1u32) as usize] = i as u32;
                }
                i += CUBE_DIM as usize;
            }
            sync_cube();
        }
        let count = select(from_candidates, bucket, allowed);
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
                    scores,
                    base,
                    &candidates,
                    count,
                    prefix,
                    mask,
                    shift,
                    bins,
                    true,
                    &histogram,
                );
            } else {
                count_digits(
                    scores,
                    base,
                    &candidates,
                    count,
                    prefix,
                    mask,
                    shift,
                    bins,
                    false,
                    &histogram,
                );
            }
            sync_cube();
            select_digit(&histogram, &mut choice, remaining, 256u32);
            sync_cube();
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
                if key == prefix {
                    let mut rank = 0u32;
                    for other in 0..count {
                        let p = candidates[other];
                        if p < position && ordered_key(scores[base + p as usize]) == prefix {
                            rank += 1;
                        }
                    }
                    take = rank < remaining;
                }
                if take {
                    indices[row * k + counters[0].fetch_add(1u32) as usize] = position as i32;
                }
                c += CUBE_DIM as usize;
            }
        } else {
            write_selection(
                scores,
                indices,
                row,
                base,
                allowed,
                k,
                false,
                prefix,
                remaining as usize,
            );
        }
    }
}

/// The order keys are compared by: IEEE total order of the f32 bits.
fn host_key(value: f32) -> u32 {
    let bits = value.to_bits();
    if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 }
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("scores", &["t", "s"], Storage::F32),
    TensorSpec::new("limit", &["t"], Storage::I32).optional(),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("indices", &["t", "k"], Storage::I32)];

fn reduction(variant: &Variant) -> Reduction {
    if variant.needs_plane_ops {
        Reduction::Plane
    } else {
        Reduction::Shared
    }
}

pub struct TopK;

impl Kernel for TopK {
    fn name(&self) -> &'static str {
        "topk"
    }
    fn summary(&self) -> &'static str {
        "indices of the k largest scores[t, 0..=limit[t]], −1 padded"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        // data: the test catalogue's input kind (0 normal, 1 few distinct values, 2 negative and denormal,
        // 3 normal with every position allowed, 4 all in [1, 1.25)).
        &[("data", 0.0)]
    }
    fn problems(&self) -> Vec<Problem> {
        // (t, s, k, data): tie-free, s < k, the model's k = 2048 over 8K keys, ties, negative/denormal scores,
        // and one narrow range.
        [
            (9, 300, 16, 0),
            (6, 1000, 2048, 0),
            (4, 8192, 2048, 0),
            (5, 3000, 100, 1),
            (5, 2000, 64, 2),
            (3, 8192, 2048, 4),
        ]
        .into_iter()
        .map(|(t, s, k, data)| Problem::new(Format::F32, &[("t", t), ("s", s), ("k", k)], &[("data", data as f64)]))
        .collect()
    }
    fn formats(&self) -> &'static [Format] {
        &[Format::F32]
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // 2048 prefill rows over 8K / 32K / 128K keys, k = 2048, every position allowed.
        [8192, 32768, 131072]
            .into_iter()
            .map(|s| Problem::new(Format::F32, &[("t", 2048), ("s", s), ("k", 2048)], &[("data", 3.0)]))
            .collect()
    }
    fn ir_problem(&self, _: Format) -> Problem {
        Problem::new(Format::F32, &[("t", 4), ("s", 8192), ("k", 2048)], &[("data", 0.0)])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let (s, k) = (problem.dim("s"), problem.dim("k"));
        if k == 0 || s >= 1 << 24 {
            return Err(KernelError::InvalidProblem {
                kernel: self.name(),
                field: if k == 0 { "k" } else { "s" },
                expected: "k ≥ 1 and s < 2²⁴".into(),
                got: format!("k = {k}, s = {s}"),
            });
        }
        Ok(())
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // 33 counting passes and the compaction: ~34 key comparisons per score.
        34 * (problem.dim("t") * problem.dim("s")) as u64
    }
    fn shared_memory_bytes(&self, variant: &Variant, _: &Problem) -> usize {
        match variant.name {
            // Histogram, candidate positions, and the scans' arrays (one per call site).
            "candidates" => 4 * (2048 + CANDIDATES + 2 + 2) + 6 * 4 * UNITS as usize,
            "radix256" => 4 * (256 + 2) + 3 * 4 * UNITS as usize,
            _ => 2 * 4 * UNITS as usize,
        }
    }
    fn tolerance(&self, _: &TensorSpec, _: &Problem) -> f64 {
        0.0
    }
    fn canonicalize(&self, _: &TensorSpec, problem: &Problem, values: &mut [f64]) {
        for row in values.chunks_mut(problem.dim("k")) {
            row.sort_by(f64::total_cmp);
        }
    }
    fn default_input(&self, _: &TensorSpec, problem: &Problem) -> HostTensor {
        let (t, s) = (problem.dim("t"), problem.dim("s"));
        HostTensor::from_i32("limit", &[t], &vec![s as i32 - 1; t])
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (t, s, k) = (problem.dim("t"), problem.dim("s"), problem.dim("k"));
        let normal = crate::check::normal(rng, t * s);
        let scores: Vec<f32> = match problem.param("data") as u32 {
            // One narrow range (all in one 11-bit bucket: the `candidates` variant's fallback path).
            4 => normal.iter().map(|v| 1.0 + v.abs().fract() / 4.0).collect(),
            // Few distinct values: many exact ties at the threshold.
            1 => normal.iter().map(|v| (v * 4.0).round() / 4.0).collect(),
            // Negative, tiny and denormal magnitudes, and both zeros.
            2 => normal
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 4 {
                    0 => -v.abs() - 1.0,
                    1 => f32::from_bits(rng.random_range(1..0x0080_0000)) * v.signum(),
                    2 => {
                        if v > &0.0 {
                            0.0
                        } else {
                            -0.0
                        }
                    }
                    _ => v * 1e-30,
                })
                .collect(),
            _ => normal,
        };
        // Limits: whole rows, fewer allowed than k, none, and random prefixes (data 3, for bench: whole rows).
        let limits: Vec<i32> = (0..t)
            .map(|r| match if problem.param("data") == 3.0 { 0 } else { r % 4 } {
                0 => s as i32 - 1,
                1 => rng.random_range(0..k.min(s)) as i32,
                2 if r % 8 == 2 => -1,
                _ => rng.random_range(0..s) as i32,
            })
            .collect();
        vec![
            HostTensor::from_f32("scores", &[t, s], crate::DType::F32, &scores),
            HostTensor::from_i32("limit", &[t], &limits),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (s, k) = (problem.dim("s"), problem.dim("k"));
        let scores: Vec<f32> = inputs[0].words.iter().map(|w| f32::from_bits(*w)).collect();
        let limits = inputs[1].to_f64();
        let mut out = Vec::new();
        for (row, limit) in scores.chunks(s).zip(limits) {
            let allowed = if limit < 0.0 { 0 } else { (limit as usize + 1).min(s) };
            let mut order: Vec<usize> = (0..allowed).collect();
            order.sort_by_key(|&i| (std::cmp::Reverse(host_key(row[i])), i));
            order.truncate(k);
            out.extend(order.iter().map(|&i| i as f64));
            out.extend(std::iter::repeat_n(-1.0, k - order.len()));
        }
        vec![out]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (t, s, k) = (problem.dim("t"), problem.dim("s"), problem.dim("k"));
        if variant.name == "candidates" {
            return topk_candidates_kernel::launch(
                &device.client,
                grid(t),
                CubeDim::new_1d(UNITS),
                buffer(&inputs[0], t * s),
                buffer(&inputs[1], t),
                buffer(&outputs[0], t * k),
                t,
                s,
                k,
            );
        }
        if variant.name == "radix256" {
            return topk_radix256_kernel::launch(
                &device.client,
                grid(t),
                CubeDim::new_1d(UNITS),
                buffer(&inputs[0], t * s),
                buffer(&inputs[1], t),
                buffer(&outputs[0], t * k),
                t,
                s,
                k,
            );
        }
        topk_kernel::launch(
            &device.client,
            grid(t),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], t * s),
            buffer(&inputs[1], t),
            buffer(&outputs[0], t * k),
            t,
            s,
            k,
            reduction(variant),
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, _: &Problem) -> KernelDefinition {
        let (props, target_props) = ir_props(target);
        let settings = ir_settings(CubeDim::new_1d(UNITS));
        if variant.name == "candidates" {
            return topk_candidates_kernel::TopkCandidatesKernel::new(
                settings,
                props,
                target_props,
                slice_arg(),
                slice_arg(),
                slice_arg(),
                (),
                (),
                (),
            )
            .define();
        }
        if variant.name == "radix256" {
            return topk_radix256_kernel::TopkRadix256Kernel::new(
                settings,
                props,
                target_props,
                slice_arg(),
                slice_arg(),
                slice_arg(),
                (),
                (),
                (),
            )
            .define();
        }
        topk_kernel::TopkKernel::new(
            settings,
            props,
            target_props,
            slice_arg(),
            slice_arg(),
            slice_arg(),
            (),
            (),
            (),
            reduction(variant),
        )
        .define()
    }
}
