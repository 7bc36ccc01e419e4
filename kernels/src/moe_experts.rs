//! The routed experts of a DeepSeek MoE layer: token permutation by expert, each expert's SwiGLU FFN, and
//! the weighted combine back to token order.
//!
//! x [tokens, hidden], ids [tokens, top_k] i32 and weights [tokens, top_k] f32 (what `moe_gate` writes),
//! w13 [experts, 2·inter, hidden] (gate_proj rows, then up_proj rows), w2 [experts, hidden, inter]
//! (down_proj) → out [tokens, hidden] = Σ_k weights[t, k] · w2_e · (silu(w1_e · x_t) ⊙ (w3_e · x_t)), e = ids[t, k].
//! Steps (one launch each): per-expert counts; their prefix sums (expert offsets); a stable permutation
//! (row r of expert e's block ↔ (token, k), in token order); the gate/up projection and SiLU·mul per permuted
//! row; the down projection; the combine. Intermediates are f32. The shared expert is a dense MLP added by
//! the caller.
//! Variant `simt`: one unit per output element of each step (everywhere; the reference for faster variants).
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::moe_experts_mma::{TILE, down_mma_kernel, gate_up_mma_kernel};
use crate::moe_experts_wgmma as wgmma;
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{pack, read_e4m3, read_element};
use nsa_dsl::reduce::{Reduction, cube_sum};
use nsa_dsl::select::cube_exclusive_scan;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

const UNITS: u32 = 256;

pub const VARIANTS: &[Variant] = &[
    wgmma::VARIANT,
    Variant {
        name: "mma",
        summary: "grouped GEMMs on mma.sync: 64 rows of an expert × 64 columns per cube (CUDA, bf16)",
        needs_plane_ops: true,
    },
    Variant {
        name: "simt",
        summary: "counting-sort permutation, one unit per output element of each projection",
        needs_plane_ops: false,
    },
];

/// counts[e] = how many (token, k) pairs chose expert e (one cube per expert).
#[cube(launch)]
fn count_kernel(ids: &[i32], counts: &mut [u32], pairs: usize, experts: usize) {
    let expert = CUBE_POS;
    if expert >= experts {
        terminate!();
    }
    let mut mine = 0u32;
    let mut p = UNIT_POS as usize;
    while p < pairs {
        mine += u32::cast_from(ids[p] == expert as i32);
        p += CUBE_DIM as usize;
    }
    let total = cube_sum(f32::cast_from(mine), UNITS, Reduction::Shared);
    if UNIT_POS == 0 {
        counts[expert] = u32::cast_from(total);
    }
}

/// offsets[e] = Σ_{e' < e} counts[e'] (offsets[experts] = all pairs), in one cube.
#[cube(launch)]
fn offsets_kernel(counts: &[u32], offsets: &mut [u32], experts: usize) {
    let mut carried = 0u32;
    let mut chunk = 0usize;
    while chunk < experts {
        let e = chunk + UNIT_POS as usize;
        let count = select(e < experts, counts[select(e < experts, e, 0usize)], 0u32);
        let scan = cube_exclusive_scan(count, UNITS);
        if e < experts {
            offsets[e] = carried + scan.prefix;
        }
        carried += scan.total;
        chunk += CUBE_DIM as usize;
    }
    if UNIT_POS == 0 {
        offsets[experts] = carried;
    }
}

/// Stable permutation (one cube per expert): the expert's pairs, in pair order, get rows offsets[e]..;
/// rows[r] = the pair's token, slots[pair] = r.
#[cube(launch)]
fn permute_kernel(
    ids: &[i32],
    offsets: &[u32],
    rows: &mut [u32],
    slots: &mut [u32],
    pairs: usize,
    experts: usize,
    top_k: usize,
) {
    let expert = CUBE_POS;
    if expert >= experts {
        terminate!();
    }
    let mut next = offsets[expert];
    let mut chunk = 0usize;
    while chunk < pairs {
        let p = chunk + UNIT_POS as usize;
        let mine = p < pairs && ids[select(p < pairs, p, 0usize)] == expert as i32;
        let scan = cube_exclusive_scan(u32::cast_from(mine), UNITS);
        if mine {
            let row = next + scan.prefix;
            rows[row as usize] = (p / top_k) as u32;
            slots[p] = row;
        }
        next += scan.total;
        chunk += CUBE_DIM as usize;
    }
}

/// How the expert weights are stored: in the problem's format, or as DeepSeek's FP8 checkpoint (e4m3 bytes
/// with one f32 scale per 128 × 128 block of each expert's matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WeightFormat {
    Dense,
    Fp8Block,
}

/// Element (r, c) of expert `expert`'s [rows, cols] weight matrix, as f32.
#[cube]
#[allow(clippy::too_many_arguments, unused_assignments)]
fn read_weight(
    w: &[u32],
    scales: &[f32],
    expert: usize,
    r: usize,
    c: usize,
    rows: usize,
    cols: usize,
    #[comptime] weights: WeightFormat,
    #[comptime] format: Format,
) -> f32 {
    let index = (expert * rows + r) * cols + c;
    let mut value = 0.0f32;
    match weights {
        WeightFormat::Dense => {
            value = read_element(w, index, format);
        }
        WeightFormat::Fp8Block => {
            let block = (expert * rows.div_ceil(128) + r / 128) * cols.div_ceil(128) + c / 128;
            value = read_e4m3(w, index) * scales[block];
        }
    }
    value
}

/// The expert owning permuted row `row` (offsets ascending).
#[cube]
fn expert_of(offsets: &[u32], row: usize, experts: usize) -> usize {
    let mut expert = 0usize;
    for e in 1..experts {
        if offsets[e] as usize <= row {
            expert = e;
        }
    }
    expert
}

/// h[r, i] = silu(w1_e[i] · x[token]) · (w3_e[i] · x[token]) for permuted row r.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_kernel(
    x: &[u32],
    w13: &[u32],
    w13_scales: &[f32],
    rows: &[u32],
    offsets: &[u32],
    h: &mut [f32],
    total_rows: usize,
    hidden: usize,
    inter: usize,
    experts: usize,
    #[comptime] format: Format,
    #[comptime] weights: WeightFormat,
) {
    let at = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if at >= total_rows * inter {
        terminate!();
    }
    let (row, i) = (at / inter, at % inter);
    let expert = expert_of(offsets, row, experts);
    let token = rows[row] as usize;
    let mut gate = 0.0f32;
    let mut up = 0.0f32;
    for d in 0..hidden {
        let value = read_element(x, token * hidden + d, format);
        gate += value * read_weight(w13, w13_scales, expert, i, d, 2 * inter, hidden, weights, format);
        up += value
            * read_weight(
                w13,
                w13_scales,
                expert,
                inter + i,
                d,
                2 * inter,
                hidden,
                weights,
                format,
            );
    }
    h[at] = gate / (1.0f32 + f32::exp(-gate)) * up;
}

/// y[r, j] = w2_e[j] · h[r] for permuted row r.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn down_kernel(
    h: &[f32],
    w2: &[u32],
    w2_scales: &[f32],
    offsets: &[u32],
    y: &mut [f32],
    total_rows: usize,
    hidden: usize,
    inter: usize,
    experts: usize,
    #[comptime] format: Format,
    #[comptime] weights: WeightFormat,
) {
    let at = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if at >= total_rows * hidden {
        terminate!();
    }
    let (row, j) = (at / hidden, at % hidden);
    let expert = expert_of(offsets, row, experts);
    let mut sum = 0.0f32;
    for i in 0..inter {
        sum += h[row * inter + i] * read_weight(w2, w2_scales, expert, j, i, hidden, inter, weights, format);
    }
    y[at] = sum;
}

/// out[t, j] = Σ_k weights[t, k] · y[slots[t, k], j], stored in the problem's format (word per unit).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn combine_kernel(
    y: &[f32],
    weights: &[f32],
    slots: &[u32],
    out: &mut [u32],
    tokens: usize,
    hidden: usize,
    top_k: usize,
    #[comptime] format: Format,
) {
    let per_word = comptime!(format.per_word() as usize);
    let words = hidden / per_word;
    let w = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    if w >= tokens * words {
        terminate!();
    }
    let (token, j) = (w / words, (w % words) * per_word);
    let mut lo = 0.0f32;
    let mut hi = 0.0f32;
    for k in 0..top_k {
        let weight = weights[token * top_k + k];
        let row = slots[token * top_k + k] as usize;
        lo += weight * y[row * hidden + j];
        if comptime!(per_word == 2) {
            hi += weight * y[row * hidden + j + 1];
        }
    }
    out[w] = pack(lo, hi, format);
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("x", &["tokens", "hidden"], Storage::Problem),
    TensorSpec::new("ids", &["tokens", "top_k"], Storage::I32),
    TensorSpec::new("weights", &["tokens", "top_k"], Storage::F32),
    TensorSpec::new("w13", &["experts", "2*inter", "hidden"], Storage::Problem),
    TensorSpec::new("w2", &["experts", "hidden", "inter"], Storage::Problem),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("out", &["tokens", "hidden"], Storage::Problem)];

fn dims(tokens: usize, hidden: usize, inter: usize, experts: usize, top_k: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("tokens", tokens),
        ("hidden", hidden),
        ("inter", inter),
        ("experts", experts),
        ("top_k", top_k),
    ]
}

pub struct MoeExperts;

impl Kernel for MoeExperts {
    fn name(&self) -> &'static str {
        "moe_experts"
    }
    fn summary(&self) -> &'static str {
        "routed experts: permute by expert, SwiGLU FFN per expert, weighted combine"
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
        &[]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (tokens, hidden, inter, experts, top_k): the tiny checkpoint's scale, more pairs than a cube,
            // one token with every expert, unused experts.
            for (tokens, hidden, inter, experts, top_k) in [
                (7, 64, 32, 8, 2),
                (70, 32, 16, 16, 4),
                (1, 32, 24, 4, 4),
                (9, 48, 16, 32, 3),
                // Shapes the mma variant takes (hidden, inter multiples of 64; an expert past 64 rows).
                (20, 128, 64, 8, 2),
                (130, 64, 128, 4, 3),
                // The wgmma variant's (hidden a multiple of 128): experts past 128 rows, K past its stages.
                (300, 256, 128, 4, 2),
            ] {
                problems.push(Problem::new(format, &dims(tokens, hidden, inter, experts, top_k), &[]));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // DeepSeek-V3.2's layer: 256 experts (22.5 GB of bf16 weights), top-8, at 256 and 8192 tokens.
        [256, 8192]
            .into_iter()
            .map(|tokens| Problem::new(Format::Bf16, &dims(tokens, 7168, 2048, 256, 8), &[]))
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(256, 7168, 2048, 256, 8), &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let (hidden, experts, top_k) = (problem.dim("hidden"), problem.dim("experts"), problem.dim("top_k"));
        if hidden == 0 || !hidden.is_multiple_of(problem.format.per_word() as usize) || top_k == 0 || top_k > experts {
            return Err(KernelError::InvalidProblem {
                kernel: "moe_experts",
                field: "top_k",
                expected: "1 ≤ top_k ≤ experts and hidden a positive multiple of the values per word".into(),
                got: format!("top_k {top_k}, experts {experts}, hidden {hidden}"),
            });
        }
        Ok(())
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        if variant.name == "wgmma" {
            return wgmma::requirements(problem, features);
        }
        if variant.name == "mma" {
            if !features.mma_m16n8k16_bf16 || features.plane_size != 32 {
                return Err("needs warp mma.sync m16n8k16 bf16 (CUDA)".into());
            }
            let (hidden, inter) = (problem.dim("hidden"), problem.dim("inter"));
            if problem.format != Format::Bf16 || !hidden.is_multiple_of(TILE) || !inter.is_multiple_of(TILE) {
                return Err(format!(
                    "needs bf16 with hidden and inter multiples of 64, got {} hidden={hidden} inter={inter}",
                    problem.format
                ));
            }
        }
        Ok(())
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        variant.name == "simt" || target == IrTarget::Cuda
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        variant.name == "simt" || format == Format::Bf16
    }
    fn shared_memory_bytes(&self, variant: &Variant, _: &Problem) -> usize {
        match variant.name {
            "wgmma" => wgmma::shared_memory_bytes(),
            // Three 64-row tiles of 64 bf16 (plus a padding chunk per row).
            "mma" => 3 * 16 * TILE * (TILE / 8 + 1),
            _ => 0,
        }
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Per (token, k): gate and up (2·2·hidden·inter) and down (2·hidden·inter).
        let pairs = problem.dim("tokens") * problem.dim("top_k");
        (6 * pairs * problem.dim("hidden") * problem.dim("inter")) as u64
    }
    fn tolerance(&self, _: &TensorSpec, problem: &Problem) -> f64 {
        match problem.format {
            Format::Bf16 => 4e-3,
            Format::F32 => 1e-5,
        }
    }
    fn variant_tolerance(&self, variant: &Variant, output: &TensorSpec, problem: &Problem) -> f64 {
        tensor_core_tolerance(variant, problem, self.tolerance(output, problem))
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (tokens, hidden, inter) = (problem.dim("tokens"), problem.dim("hidden"), problem.dim("inter"));
        let (experts, top_k) = (problem.dim("experts"), problem.dim("top_k"));
        let dtype = DType::of(problem.format);
        let x = crate::check::normal(rng, tokens * hidden);
        let (ids, weights) = random_routing(rng, tokens, experts, top_k);
        let (w13_shape, w2_shape) = ([experts, 2 * inter, hidden], [experts, hidden, inter]);
        let (w13, w2) = if problem.format == Format::Bf16 && experts * hidden * inter > MODEL_SIZED {
            // The model's 256 experts: 11 G weights, generated in parallel.
            let seed = rand::Rng::random::<u64>(rng);
            let words = |shape: [usize; 3], seed, std: f32| HostTensor {
                name: String::new(),
                shape: shape.to_vec(),
                dtype,
                words: crate::check::fast_bf16_words(seed, shape.iter().product(), std),
            };
            (
                HostTensor {
                    name: "w13".into(),
                    ..words(w13_shape, seed, (hidden as f32).powf(-0.5))
                },
                HostTensor {
                    name: "w2".into(),
                    ..words(w2_shape, seed ^ 1, (inter as f32).powf(-0.5))
                },
            )
        } else {
            let (w13, w2) = random_expert_weights(rng, experts, hidden, inter);
            (
                HostTensor::from_f32("w13", &w13_shape, dtype, &w13),
                HostTensor::from_f32("w2", &w2_shape, dtype, &w2),
            )
        };
        vec![
            HostTensor::from_f32("x", &[tokens, hidden], dtype, &x),
            HostTensor::from_i32("ids", &[tokens, top_k], &ids),
            HostTensor::from_f32("weights", &[tokens, top_k], DType::F32, &weights),
            w13,
            w2,
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (x, ids, weights) = (inputs[0].to_f64(), inputs[1].to_f64(), inputs[2].to_f64());
        vec![reference_layer(
            problem,
            &x,
            &ids,
            &weights,
            &inputs[3].to_f64(),
            &inputs[4].to_f64(),
        )]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        // Dense weights have no scales: 1-element placeholders fill those bindings.
        let none = device.client.create_from_slice(&[0u8; 4]);
        let layer = Layer {
            x: &inputs[0],
            ids: &inputs[1],
            weights: &inputs[2],
            w13: &inputs[3],
            w13_scales: &none,
            w2: &inputs[4],
            w2_scales: &none,
            out: &outputs[0],
        };
        launch_layer(device, problem, layer, WeightFormat::Dense, Projections::of(variant));
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        if variant.name == "wgmma" {
            return wgmma::define(target, false);
        }
        if variant.name == "mma" {
            let (props, target_props) = nsa_backends::ir_properties(target);
            let a = slice_arg;
            return gate_up_mma_kernel::GateUpMmaKernel::new(
                ir_settings(CubeDim::new_1d(128)),
                props,
                target_props,
                a(),
                a(),
                a(),
                a(),
                a(),
                (),
                (),
                (),
                (),
                4,
            )
            .define();
        }
        define_gate_up(variant, target, problem, WeightFormat::Dense)
    }
}

/// The device buffers of one MoE layer's routed experts.
pub(crate) struct Layer<'a> {
    pub x: &'a Handle,
    pub ids: &'a Handle,
    pub weights: &'a Handle,
    pub w13: &'a Handle,
    pub w13_scales: &'a Handle,
    pub w2: &'a Handle,
    pub w2_scales: &'a Handle,
    pub out: &'a Handle,
}

/// Which kernels run the two projections.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Projections {
    Simt,
    /// mma.sync, bf16 weights only.
    Mma,
    /// Hopper warpgroup MMA, bf16 or FP8 weights.
    Wgmma,
}

impl Projections {
    pub(crate) fn of(variant: &Variant) -> Projections {
        match variant.name {
            "mma" => Projections::Mma,
            "wgmma" => Projections::Wgmma,
            _ => Projections::Simt,
        }
    }
}

/// Runs the six steps (counts, offsets, permutation, gate/up, down, combine) over `layer`.
pub(crate) fn launch_layer(
    device: &Device,
    problem: &Problem,
    layer: Layer,
    weight_format: WeightFormat,
    projections: Projections,
) {
    let (tokens, hidden, inter) = (problem.dim("tokens"), problem.dim("hidden"), problem.dim("inter"));
    let (experts, top_k) = (problem.dim("experts"), problem.dim("top_k"));
    let (format, per_word) = (problem.format, problem.format.per_word() as usize);
    let client = &device.client;
    let pairs = tokens * top_k;
    // Weight words and scale counts per storage.
    let (w13_words, w2_words, w13_scales, w2_scales) = match weight_format {
        WeightFormat::Dense => (
            experts * 2 * inter * hidden / per_word,
            experts * hidden * inter / per_word,
            1,
            1,
        ),
        WeightFormat::Fp8Block => (
            experts * 2 * inter * hidden / 4,
            experts * hidden * inter / 4,
            experts * (2 * inter).div_ceil(128) * hidden.div_ceil(128),
            experts * hidden.div_ceil(128) * inter.div_ceil(128),
        ),
    };
    let counts = client.empty(4 * experts);
    let offsets = client.empty(4 * (experts + 1));
    let rows = client.empty(4 * pairs);
    let slots = client.empty(4 * pairs);
    let h = client.empty(4 * pairs * inter);
    let y = client.empty(4 * pairs * hidden);
    let dim = CubeDim::new_1d(UNITS);
    count_kernel::launch(
        client,
        grid(experts),
        dim,
        buffer(layer.ids, pairs),
        buffer(&counts, experts),
        pairs,
        experts,
    );
    offsets_kernel::launch(
        client,
        grid(1),
        dim,
        buffer(&counts, experts),
        buffer(&offsets, experts + 1),
        experts,
    );
    permute_kernel::launch(
        client,
        grid(experts),
        dim,
        buffer(layer.ids, pairs),
        buffer(&offsets, experts + 1),
        buffer(&rows, pairs),
        buffer(&slots, pairs),
        pairs,
        experts,
        top_k,
    );
    if projections == Projections::Wgmma {
        let fp8 = weight_format == WeightFormat::Fp8Block;
        let vectors = |elements: usize| elements / if fp8 { 16 } else { 8 };
        let row_tiles = pairs.div_ceil(wgmma::ROWS) + experts;
        let h16 = client.empty(2 * pairs * inter);
        wgmma::gate_up_wgmma_kernel::launch(
            client,
            grid(row_tiles * (inter / wgmma::H_COLUMNS)),
            CubeDim::new_1d(wgmma::UNITS),
            buffer(layer.x, tokens * hidden / 8),
            buffer(layer.w13, vectors(experts * 2 * inter * hidden)),
            buffer(layer.w13_scales, w13_scales),
            buffer(&rows, pairs),
            buffer(&offsets, experts + 1),
            buffer(&h16, pairs * inter / 2),
            hidden,
            inter,
            experts,
            inter / wgmma::H_COLUMNS,
            fp8,
        );
        wgmma::down_wgmma_kernel::launch(
            client,
            grid(row_tiles * (hidden / wgmma::ROWS)),
            CubeDim::new_1d(wgmma::UNITS),
            buffer(&h16, pairs * inter / 8),
            buffer(layer.w2, vectors(experts * hidden * inter)),
            buffer(layer.w2_scales, w2_scales),
            buffer(&offsets, experts + 1),
            buffer(&y, pairs * hidden),
            hidden,
            inter,
            experts,
            hidden / wgmma::ROWS,
            fp8,
        );
    } else if projections == Projections::Mma {
        // Row tiles: each expert's rows in tiles of 64 (at most one partial tile per expert); dense bf16
        // weights only.
        let row_tiles = pairs.div_ceil(TILE) + experts;
        let h16 = client.empty(2 * pairs * inter);
        gate_up_mma_kernel::launch(
            client,
            grid(row_tiles * (inter / TILE)),
            CubeDim::new_1d(128),
            4,
            buffer(layer.x, tokens * hidden / 8),
            buffer(layer.w13, experts * 2 * inter * hidden / 8),
            buffer(&rows, pairs),
            buffer(&offsets, experts + 1),
            buffer(&h16, pairs * inter / 2),
            hidden,
            inter,
            experts,
            inter / TILE,
        );
        down_mma_kernel::launch(
            client,
            grid(row_tiles * (hidden / TILE)),
            CubeDim::new_1d(128),
            4,
            buffer(&h16, pairs * inter / 8),
            buffer(layer.w2, experts * hidden * inter / 8),
            buffer(&offsets, experts + 1),
            buffer(&y, pairs * hidden),
            hidden,
            inter,
            experts,
            hidden / TILE,
        );
    } else {
        gate_up_kernel::launch(
            client,
            grid((pairs * inter).div_ceil(UNITS as usize)),
            dim,
            buffer(layer.x, tokens * hidden / per_word),
            buffer(layer.w13, w13_words),
            buffer(layer.w13_scales, w13_scales),
            buffer(&rows, pairs),
            buffer(&offsets, experts + 1),
            buffer(&h, pairs * inter),
            pairs,
            hidden,
            inter,
            experts,
            format,
            weight_format,
        );
        down_kernel::launch(
            client,
            grid((pairs * hidden).div_ceil(UNITS as usize)),
            dim,
            buffer(&h, pairs * inter),
            buffer(layer.w2, w2_words),
            buffer(layer.w2_scales, w2_scales),
            buffer(&offsets, experts + 1),
            buffer(&y, pairs * hidden),
            pairs,
            hidden,
            inter,
            experts,
            format,
            weight_format,
        );
    }
    combine_kernel::launch(
        client,
        grid((tokens * hidden / per_word).div_ceil(UNITS as usize)),
        dim,
        buffer(&y, pairs * hidden),
        buffer(layer.weights, pairs),
        buffer(&slots, pairs),
        buffer(layer.out, tokens * hidden / per_word),
        tokens,
        hidden,
        top_k,
        format,
    );
}

/// The tensor-core variants keep the intermediate h in bf16 (as SGLang's fused MoE does) and the `wgmma`
/// FP8 one widens weights to bf16 × scale: bf16's 1e-2 rather than the simt variant's 4e-3. A host
/// simulation of exactly those roundings reaches 5.1e-3 – 7.1e-3 on the test problems (the H200 4.2e-3 –
/// 8.7e-3), so the wider bound is the roundings, not a fault.
pub(crate) fn tensor_core_tolerance(variant: &Variant, problem: &Problem, tolerance: f64) -> f64 {
    match (variant.name, problem.format) {
        ("simt", _) | (_, Format::F32) => tolerance,
        _ => tolerance.max(1e-2),
    }
}

/// The f64 reference of the routed experts with (dequantized) weights w13 [experts, 2·inter, hidden] and w2
/// [experts, hidden, inter].
pub(crate) fn reference_layer(
    problem: &Problem,
    x: &[f64],
    ids: &[f64],
    weights: &[f64],
    w13: &[f64],
    w2: &[f64],
) -> Vec<f64> {
    let (tokens, hidden, inter, top_k) = (
        problem.dim("tokens"),
        problem.dim("hidden"),
        problem.dim("inter"),
        problem.dim("top_k"),
    );
    let mut out = vec![0f64; tokens * hidden];
    for t in 0..tokens {
        let xt = &x[t * hidden..][..hidden];
        for k in 0..top_k {
            let e = ids[t * top_k + k] as usize;
            let dot = |row: usize| -> f64 { w13[row * hidden..][..hidden].iter().zip(xt).map(|(a, b)| a * b).sum() };
            let h: Vec<f64> = (0..inter)
                .map(|i| {
                    let (g, u) = (dot(e * 2 * inter + i), dot(e * 2 * inter + inter + i));
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for j in 0..hidden {
                let y: f64 = w2[(e * hidden + j) * inter..][..inter]
                    .iter()
                    .zip(&h)
                    .map(|(a, b)| a * b)
                    .sum();
                out[t * hidden + j] += weights[t * top_k + k] * y;
            }
        }
    }
    out
}

/// The gate/up projection (the step that carries the FLOPs) stands for the family in `nsa ir`.
pub(crate) fn define_gate_up(
    _: &Variant,
    target: IrTarget,
    problem: &Problem,
    weights: WeightFormat,
) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    gate_up_kernel::GateUpKernel::new(
        ir_settings(CubeDim::new_1d(UNITS)),
        props,
        target_props,
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        (),
        (),
        (),
        (),
        problem.format,
        weights,
    )
    .define()
}

/// Distinct experts per token, with positive weights normalized as the gate writes them.
pub(crate) fn random_routing(
    rng: &mut rand::rngs::StdRng,
    tokens: usize,
    experts: usize,
    top_k: usize,
) -> (Vec<i32>, Vec<f32>) {
    let mut ids = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut all: Vec<i32> = (0..experts as i32).collect();
        all.shuffle(rng);
        ids.extend(&all[..top_k]);
        let raw: Vec<f32> = crate::check::normal(rng, top_k).iter().map(|v| v.abs() + 0.1).collect();
        let sum: f32 = raw.iter().sum();
        weights.extend(raw.iter().map(|w| w / sum));
    }
    (ids, weights)
}

/// Expert weights w13 [experts, 2·inter, hidden] and w2 [experts, hidden, inter], scaled so activations stay
/// O(1) through both projections.
/// Expert weights (experts × hidden × inter) past which bench data comes from `fast_bf16_words`.
const MODEL_SIZED: usize = 1 << 28;

pub(crate) fn random_expert_weights(
    rng: &mut rand::rngs::StdRng,
    experts: usize,
    hidden: usize,
    inter: usize,
) -> (Vec<f32>, Vec<f32>) {
    let w13 = crate::check::normal(rng, experts * 2 * inter * hidden)
        .iter()
        .map(|v| v / (hidden as f32).sqrt())
        .collect();
    let w2 = crate::check::normal(rng, experts * hidden * inter)
        .iter()
        .map(|v| v / (inter as f32).sqrt())
        .collect();
    (w13, w2)
}
