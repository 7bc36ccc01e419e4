//! Top-k per row: the `k` largest of `scores[t, start[t]..=limit[t]]`, as int32 positions, −1 padded.
//!
//! scores [t, s] f32, start [t] i32 (first allowed position: where a ragged batch's sequence begins;
//! optional, default 0), limit [t] i32 (last allowed position, inclusive; −1 = none; optional, default
//! s − 1) → indices [t, k] i32 (positions in the row), unordered. A row with ≤ k allowed positions returns all of them. Ties (equal f32
//! bits) go to the lower position; values are ordered by IEEE total order (−0 < +0).
//! Variant `candidates`: one cube per row; an 11-bit digit histogram, then the threshold bucket's positions
//! gathered in shared memory and searched there (`candidates_split`: the same with each row's two reads
//! spread over several cubes, for few long rows). Variant `radix256`: one cube per row; 4 passes of 8-bit digit histograms (shared-memory atomics)
//! narrow the k-th largest key down, then the same compaction. Variants `radix2*`: one cube per row; a bit-by-bit radix select finds the k-th largest key (32 counting
//! passes, each a cube reduction), then an in-order compaction (cube prefix sums) writes the selection.
//! Exact: index sets must equal the reference's. Rows of up to 2²⁴ scores (counts are summed in f32).
mod candidates;
mod radix;
mod split;

use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use candidates::topk_candidates_kernel;
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::Reduction;
use nsa_dsl::select::{cube_exclusive_scan, ordered_key};
use radix::{topk_kernel, topk_radix256_kernel};
use rand::Rng;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "candidates",
        summary: "11-bit bucket, then radix select over its positions in shared memory",
        needs_plane_ops: false,
    },
    Variant {
        name: "candidates_split",
        summary: "candidates with each row's reads split over cubes (few long rows: decode)",
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

pub(super) const UNITS: u32 = 256;
/// Loads a unit has in flight in the `candidates*` loops over scores (they are latency-bound otherwise).
pub(super) const UNROLL: usize = 4;
/// Shared-memory capacity for the positions of the threshold's 11-bit bucket (`candidates` variant).
pub(super) const CANDIDATES: usize = 3584;

/// The positions row `row` may select: `count` from `first` = start (clamped to 0) through limit (at
/// most s − 1); none when limit < start or limit < 0.
#[cube]
pub(super) fn row_window(starts: &[i32], limits: &[i32], row: usize, s: usize) -> (usize, usize) {
    let first = select(starts[row] > 0, starts[row], 0i32) as usize;
    let limit = limits[row];
    let mut count = 0usize;
    if limit >= 0 && limit as usize >= first && first < s {
        let end = select(limit as usize + 1 < s, limit as usize + 1, s);
        count = end - first;
    }
    (first, count)
}

/// The keys of positions c + j·CUBE_DIM (j < UNROLL) of the row at `base`, loaded together; `valid[j]`:
/// whether that position is before `end` (if not, `keys[j]` is position c's key again).
#[cube]
pub(super) fn load_keys(
    scores: &[f32],
    base: usize,
    c: usize,
    end: usize,
    keys: &mut Array<u32>,
    valid: &mut Array<bool>,
) {
    #[unroll]
    for j in 0..UNROLL {
        let position = c + j * CUBE_DIM as usize;
        valid[j] = position < end;
        keys[j] = ordered_key(scores[base + select(position < end, position, c)]);
    }
}

/// Writes row `row`'s selection (positions `first + i` of the window at `base`) in position order: every allowed key above `threshold` and the first
/// `equals_needed` equal to it (all allowed keys with `take_all`), then −1 up to k.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_selection(
    scores: &[f32],
    indices: &mut [i32],
    row: usize,
    base: usize,
    first: usize,
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
            indices[row * k + written + slot.prefix as usize] = (first + i) as i32;
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

/// The order keys are compared by: IEEE total order of the f32 bits.
fn host_key(value: f32) -> u32 {
    let bits = value.to_bits();
    if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 }
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("scores", &["t", "s"], Storage::F32),
    TensorSpec::new("start", &["t"], Storage::I32).optional(),
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
        "indices of the k largest scores[t, start[t]..=limit[t]], −1 padded"
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
        // one narrow range; then rows long enough for `candidates_split` to split (ties across segments,
        // the narrow range's whole-row fallback).
        [
            (9, 300, 16, 0),
            (6, 1000, 2048, 0),
            (4, 8192, 2048, 0),
            (5, 3000, 100, 1),
            (5, 2000, 64, 2),
            (3, 8192, 2048, 4),
            (3, 40000, 2048, 0),
            (3, 30000, 512, 1),
            (2, 20000, 2048, 4),
        ]
        .into_iter()
        .map(|(t, s, k, data)| Problem::new(Format::F32, &[("t", t), ("s", s), ("k", k)], &[("data", data as f64)]))
        .collect()
    }
    fn formats(&self) -> &'static [Format] {
        &[Format::F32]
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // 2048 prefill rows over 8K / 32K / 128K keys, then a decode step's 128 rows over 32K / 128K; k = 2048,
        // every position allowed.
        [(2048, 8192), (2048, 32768), (2048, 131072), (128, 32768), (128, 131072)]
            .into_iter()
            .map(|(t, s)| Problem::new(Format::F32, &[("t", t), ("s", s), ("k", 2048)], &[("data", 3.0)]))
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
            "candidates" | "candidates_split" => 4 * (2048 + CANDIDATES + 2 + 2) + 6 * 4 * UNITS as usize,
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
    fn default_input(&self, spec: &TensorSpec, problem: &Problem) -> HostTensor {
        let (t, s) = (problem.dim("t"), problem.dim("s"));
        match spec.name {
            "start" => HostTensor::from_i32("start", &[t], &vec![0; t]),
            _ => HostTensor::from_i32("limit", &[t], &vec![s as i32 - 1; t]),
        }
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
        // Starts: ragged prefill (a query's sequence begins at its start) on every third row, past the limit
        // on some; 0 elsewhere.
        let starts: Vec<i32> = limits
            .iter()
            .enumerate()
            .map(
                |(r, &limit)| match if problem.param("data") == 3.0 { 0 } else { r % 3 } {
                    1 => rng.random_range(0..s / 2 + 1) as i32,
                    2 if r % 9 == 2 => limit + 1,
                    _ => 0,
                },
            )
            .collect();
        vec![
            HostTensor::from_f32("scores", &[t, s], crate::DType::F32, &scores),
            HostTensor::from_i32("start", &[t], &starts),
            HostTensor::from_i32("limit", &[t], &limits),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (s, k) = (problem.dim("s"), problem.dim("k"));
        let scores: Vec<f32> = inputs[0].words.iter().map(|w| f32::from_bits(*w)).collect();
        let (starts, limits) = (inputs[1].to_f64(), inputs[2].to_f64());
        let mut out = Vec::new();
        for ((row, start), limit) in scores.chunks(s).zip(starts).zip(limits) {
            let first = start.max(0.0) as usize;
            let end = if limit < 0.0 { 0 } else { (limit as usize + 1).min(s) };
            let mut order: Vec<usize> = (first..end.max(first)).collect();
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
                buffer(&inputs[2], t),
                buffer(&outputs[0], t * k),
                t,
                s,
                k,
            );
        }
        if variant.name == "candidates_split" {
            return split::launch(device, t, s, k, inputs, outputs);
        }
        if variant.name == "radix256" {
            return topk_radix256_kernel::launch(
                &device.client,
                grid(t),
                CubeDim::new_1d(UNITS),
                buffer(&inputs[0], t * s),
                buffer(&inputs[1], t),
                buffer(&inputs[2], t),
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
            buffer(&inputs[2], t),
            buffer(&outputs[0], t * k),
            t,
            s,
            k,
            reduction(variant),
        );
    }
    fn later_launches(&self, variant: &Variant, target: IrTarget, _: &Problem) -> Vec<KernelDefinition> {
        match variant.name {
            "candidates_split" => split::definitions(target).split_off(1),
            _ => Vec::new(),
        }
    }
    fn define(&self, variant: &Variant, target: IrTarget, _: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        let settings = ir_settings(CubeDim::new_1d(UNITS));
        if variant.name == "candidates" {
            return topk_candidates_kernel::TopkCandidatesKernel::new(
                settings,
                props,
                target_props,
                slice_arg(),
                slice_arg(),
                slice_arg(),
                slice_arg(),
                (),
                (),
                (),
            )
            .define();
        }
        if variant.name == "candidates_split" {
            return split::definitions(target).remove(0);
        }
        if variant.name == "radix256" {
            return topk_radix256_kernel::TopkRadix256Kernel::new(
                settings,
                props,
                target_props,
                slice_arg(),
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
            slice_arg(),
            (),
            (),
            (),
            reduction(variant),
        )
        .define()
    }
}
