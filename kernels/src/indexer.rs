//! Lightning indexer logits (DeepSeek-V3.2 DSA, prefill form).
//!
//! logits[t, s] = Σ_h w[t, h] · ReLU(q[t, h, :] · k[s, :])  for k_start[t] ≤ s ≤ q_pos[t], else −∞
//! q [t, h, d] and k [s, d] in f32 or bf16 (scale factors folded into w [t, h] f32); q_pos [t] i32 (the
//! last key the query sees; optional, default: every key); k_start [t] i32 (the first: in a ragged batch
//! of sequences whose keys are concatenated, where the query's sequence begins; optional, default 0),
//! logits [t, s] f32. Tolerance 1e-5 (f32 accumulation of bf16-exact inputs).
//! Variant `wgmma` (Hopper: [`crate::indexer_wgmma`]). Variant `key_per_unit`: one unit per (t, s), looping over heads and d; q is read by all units of a cube
//! at once (a broadcast), k rows stream through.
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::unpack;
use nsa_dsl::mma::{store_tile, tile_a, tile_b, zero_accumulator};
use rand::Rng;

const UNITS: u32 = 128;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "wgmma",
        summary: "Hopper warpgroup MMA: 64 keys × 16 tokens per cube, keys as A, head sum within quads (64 × 128)",
        needs_plane_ops: true,
    },
    Variant {
        name: "cmma",
        summary: "tensor cores: 16×16×16 bf16 tiles, 64 keys per cube",
        needs_plane_ops: true,
    },
    Variant {
        name: "key_per_unit",
        summary: "one unit per key, heads looped",
        needs_plane_ops: false,
    },
];

/// Keys and tokens per cube of the `cmma` variant.
const KEYS_PER_CUBE: usize = 64;
const TOKENS_PER_CUBE: usize = 2;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn indexer_logits_kernel(
    q: &[u32],
    w: &[f32],
    k: &[u32],
    q_pos: &[i32],
    k_start: &[i32],
    logits: &mut [f32],
    t: usize,
    s: usize,
    heads: usize,
    row_words: usize,
    #[comptime] format: Format,
) {
    let blocks_per_token = s.div_ceil(CUBE_DIM as usize);
    let token = CUBE_POS / blocks_per_token;
    let key = (CUBE_POS % blocks_per_token) * CUBE_DIM as usize + UNIT_POS as usize;
    if token >= t || key >= s {
        terminate!();
    }
    let limit = q_pos[token];
    // −∞ from its bits: WGSL has no infinity literal.
    let mut score = f32::reinterpret(0xff80_0000u32);
    if limit >= 0 && key <= limit as usize && key as i32 >= k_start[token] {
        score = 0.0;
        for h in 0..heads {
            let q_base = (token * heads + h) * row_words;
            let mut dot = 0.0f32;
            for i in 0..row_words {
                let qw = q[q_base + i];
                let kw = k[key * row_words + i];
                dot += unpack(qw, 0u32, format) * unpack(kw, 0u32, format);
                if comptime!(format.per_word() == 2) {
                    dot += unpack(qw, 1u32, format) * unpack(kw, 1u32, format);
                }
            }
            score += w[token * heads + h] * f32::max(dot, 0.0);
        }
    }
    logits[token * s + key] = score;
}

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["t", "h", "d"], Storage::Problem),
    TensorSpec::new("w", &["t", "h"], Storage::F32),
    TensorSpec::new("k", &["s", "d"], Storage::Problem),
    TensorSpec::new("q_pos", &["t"], Storage::I32).optional(),
    TensorSpec::new("k_start", &["t"], Storage::I32).optional(),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("logits", &["t", "s"], Storage::F32)];

pub struct IndexerLogits;

impl Kernel for IndexerLogits {
    fn name(&self) -> &'static str {
        "indexer_logits"
    }
    fn summary(&self) -> &'static str {
        "logits[t, s] = Σ_h w[t, h]·ReLU(q[t, h]·k[s]) for k_start[t] ≤ s ≤ q_pos[t], else −∞"
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
            // (t, h, d, s): the model's 64 heads × 128, the tiny golden model's 8 × 32, ragged key counts.
            // The last: wgmma's shape with token and key tails over several cubes.
            for (t, h, d, s) in [
                (3, 64, 128, 300),
                (16, 8, 32, 16),
                (5, 4, 64, 1000),
                (5, 16, 64, 1000),
                (37, 64, 128, 200),
            ] {
                problems.push(Problem::new(format, &[("t", t), ("h", h), ("d", d), ("s", s)], &[]));
            }
        }
        problems
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &[("t", 4), ("h", 64), ("d", 128), ("s", 8192)], &[])
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // 2048 prefill queries ending at the last of 8K / 32K / 128K keys.
        [8192, 32768, 131072]
            .into_iter()
            .map(|s| Problem::new(Format::Bf16, &[("t", 2048), ("h", 64), ("d", 128), ("s", s)], &[]))
            .collect()
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        crate::spec::whole_words(self.name(), "d", problem)
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        if variant.name == "wgmma" {
            crate::spec::needs_wgmma(features)?;
            return crate::indexer_wgmma::shape_requirements(problem);
        }
        if variant.name == "cmma" {
            if !features.cmma_bf16 || !features.plane_ops {
                return Err("needs bf16 tensor cores (cmma)".into());
            }
            let (h, d) = (problem.dim("h"), problem.dim("d"));
            if problem.format != Format::Bf16 || h % 16 != 0 || d % 16 != 0 {
                return Err(format!(
                    "needs bf16 with h and d multiples of 16, got {} h={h} d={d}",
                    problem.format
                ));
            }
            if (TOKENS_PER_CUBE * h / 16) as u32 * features.plane_size > features.max_units_per_cube {
                return Err(format!(
                    "{} heads need more than {} units per cube",
                    h, features.max_units_per_cube
                ));
            }
        }
        Ok(())
    }
    fn shared_memory_bytes(&self, variant: &Variant, problem: &Problem) -> usize {
        match variant.name {
            "wgmma" => crate::indexer_wgmma::shared_memory_bytes(),
            // The bf16 key block and the f32 scores.
            "cmma" => KEYS_PER_CUBE * problem.dim("d") * 2 + TOKENS_PER_CUBE * problem.dim("h") * KEYS_PER_CUBE * 4,
            _ => 0,
        }
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        match variant.name {
            "wgmma" => target == IrTarget::Cuda,
            "cmma" => matches!(target, IrTarget::Cuda | IrTarget::Hip),
            _ => true,
        }
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        variant.name != "wgmma" || format == Format::Bf16
    }

    fn formats(&self) -> &'static [Format] {
        &Format::ALL
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Causal rows see on average half the keys; count every (t, s) pair: 2·d per head plus ReLU·w.
        (problem.dim("t") * problem.dim("s") * problem.dim("h") * (2 * problem.dim("d") + 2)) as u64
    }
    fn default_input(&self, spec: &TensorSpec, problem: &Problem) -> HostTensor {
        let (t, s) = (problem.dim("t"), problem.dim("s"));
        match spec.name {
            "k_start" => HostTensor::from_i32("k_start", &[t], &vec![0; t]),
            _ => HostTensor::from_i32("q_pos", &[t], &vec![s as i32 - 1; t]),
        }
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let mut inputs = crate::check::random_normal_inputs(&INPUTS[..3], problem, rng);
        let (t, h, d, s) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("s"));
        // The model folds d^-½ (softmax scale) and h^-½ into w: logits stay O(1), as in DeepSeek-V3.2.
        let scale = 1.0 / ((d * h) as f32).sqrt();
        let w: Vec<f32> = crate::check::normal(rng, t * h).iter().map(|v| v * scale).collect();
        inputs[1] = HostTensor::from_f32("w", &[t, h], crate::DType::F32, &w);
        // Causal positions of a prefill chunk ending at the last key, plus one row that sees nothing.
        let positions: Vec<i32> = (0..t)
            .map(|i| {
                if i == 1 {
                    -1
                } else {
                    (s + i).saturating_sub(t) as i32 - rng.random_range(0..2)
                }
            })
            .collect();
        // A ragged batch: the rows after the first third belong to a second sequence whose keys start at s / 3.
        let starts: Vec<i32> = (0..t).map(|i| if i > t / 3 { (s / 3) as i32 } else { 0 }).collect();
        inputs.push(HostTensor::from_i32("q_pos", &[t], &positions));
        inputs.push(HostTensor::from_i32("k_start", &[t], &starts));
        inputs
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (t, h, d, s) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("s"));
        let (q, w, k, q_pos, k_start) = (
            inputs[0].to_f64(),
            inputs[1].to_f64(),
            inputs[2].to_f64(),
            inputs[3].to_f64(),
            inputs[4].to_f64(),
        );
        let mut logits = vec![f64::NEG_INFINITY; t * s];
        for token in 0..t {
            for key in 0..s {
                if (key as f64) > q_pos[token] || (key as f64) < k_start[token] {
                    continue;
                }
                logits[token * s + key] = (0..h)
                    .map(|head| {
                        let q_row = &q[(token * h + head) * d..][..d];
                        let dot: f64 = q_row.iter().zip(&k[key * d..][..d]).map(|(a, b)| a * b).sum();
                        w[token * h + head] * dot.max(0.0)
                    })
                    .sum();
            }
        }
        vec![logits]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (t, h, d, s) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("s"));
        if variant.name == "wgmma" {
            return crate::indexer_wgmma::launch(device, problem, inputs, outputs);
        }
        if variant.name == "cmma" {
            // bf16 buffers seen as bf16 slices: element counts, not words.
            let units = (TOKENS_PER_CUBE * h / 16) as u32 * device.features().plane_size;
            return indexer_logits_cmma_kernel::launch(
                &device.client,
                grid(t.div_ceil(TOKENS_PER_CUBE) * s.div_ceil(KEYS_PER_CUBE)),
                CubeDim::new_1d(units),
                buffer(&inputs[0], t * h * d),
                buffer(&inputs[1], t * h),
                buffer(&inputs[2], s * d),
                buffer(&inputs[3], t),
                buffer(&inputs[4], t),
                buffer(&outputs[0], t * s),
                t,
                s,
                h as u32,
                d as u32,
            );
        }
        let row_words = d / problem.format.per_word() as usize;
        indexer_logits_kernel::launch(
            &device.client,
            grid(t * s.div_ceil(UNITS as usize)),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], t * h * row_words),
            buffer(&inputs[1], t * h),
            buffer(&inputs[2], s * row_words),
            buffer(&inputs[3], t),
            buffer(&inputs[4], t),
            buffer(&outputs[0], t * s),
            t,
            s,
            h,
            row_words,
            problem.format,
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = nsa_backends::ir_properties(target);
        if variant.name == "wgmma" {
            return crate::indexer_wgmma::define(target);
        }
        if variant.name == "cmma" {
            let (h, d) = (problem.dim("h") as u32, problem.dim("d") as u32);
            return indexer_logits_cmma_kernel::IndexerLogitsCmmaKernel::new(
                ir_settings(CubeDim::new_1d(TOKENS_PER_CUBE as u32 * h / 16 * target.plane_size())),
                props,
                target_props,
                slice_arg(),
                slice_arg(),
                slice_arg(),
                slice_arg(),
                slice_arg(),
                slice_arg(),
                (),
                (),
                h,
                d,
            )
            .define();
        }
        indexer_logits_kernel::IndexerLogitsKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
            props,
            target_props,
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
            problem.format,
        )
        .define()
    }
}

/// Tensor-core variant: a cube holds TOKENS_PER_CUBE tokens and 64 keys; each plane computes the scores
/// of 16 heads of one token against the 64 keys with 16×16×16 bf16 matrix multiplies (Q from global
/// memory, reused across the four key tiles; the key block staged once in shared memory, zeros past the
/// last key), then units apply ReLU, the weights and the sum over heads. CUDA/HIP only (cmma); bf16
/// inputs, heads and d multiples of 16.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn indexer_logits_cmma_kernel(
    q: &[bf16],
    w: &[f32],
    k: &[bf16],
    q_pos: &[i32],
    k_start: &[i32],
    logits: &mut [f32],
    t: usize,
    s: usize,
    #[comptime] heads: u32,
    #[comptime] dim: u32,
) {
    let blocks_per_row = s.div_ceil(KEYS_PER_CUBE);
    let token0 = (CUBE_POS / blocks_per_row) * TOKENS_PER_CUBE;
    let key0 = (CUBE_POS % blocks_per_row) * KEYS_PER_CUBE;
    if token0 >= t {
        terminate!();
    }
    let d = dim as usize;
    let h = heads as usize;
    let mut k_smem = Shared::<[bf16]>::new_slice(comptime!(KEYS_PER_CUBE * dim as usize));
    let mut scores = Shared::<[f32]>::new_slice(comptime!(TOKENS_PER_CUBE * heads as usize * KEYS_PER_CUBE));
    let mut i = UNIT_POS as usize;
    while i < comptime!(KEYS_PER_CUBE * dim as usize) {
        let key = key0 + i / d;
        let mut value = bf16::from_int(0);
        if key < s {
            value = k[key * d + i % d];
        }
        k_smem[i] = value;
        i += CUBE_DIM as usize;
    }
    sync_cube();

    // S[token, h, j] = q[token, h, :] · k[key0 + j, :] for this plane's token and 16 heads.
    let plane = (UNIT_POS / PLANE_DIM) as usize;
    let tok = plane / comptime!(heads as usize / 16);
    let head0 = (plane % comptime!(heads as usize / 16)) * 16;
    // A last, partial token block computes a valid token's scores again and does not write them.
    let token = select(token0 + tok < t, token0 + tok, t - 1);
    let q_base = (token * h + head0) * d;
    let acc0 = zero_accumulator();
    let acc1 = zero_accumulator();
    let acc2 = zero_accumulator();
    let acc3 = zero_accumulator();
    #[unroll]
    for step in 0..comptime!(dim / 16) {
        let a = tile_a(q, q_base + step as usize * 16, dim);
        let column = step as usize * 16;
        // Kᵀ tiles: the staged keys are rows of `dim`.
        cmma::execute(&a, &tile_b(&k_smem, column, dim, true), &acc0, &acc0);
        cmma::execute(&a, &tile_b(&k_smem, 16 * d + column, dim, true), &acc1, &acc1);
        cmma::execute(&a, &tile_b(&k_smem, 32 * d + column, dim, true), &acc2, &acc2);
        cmma::execute(&a, &tile_b(&k_smem, 48 * d + column, dim, true), &acc3, &acc3);
    }
    let row = (tok * h + head0) * KEYS_PER_CUBE;
    store_tile(&mut scores, row, &acc0, KEYS_PER_CUBE as u32);
    store_tile(&mut scores, row + 16, &acc1, KEYS_PER_CUBE as u32);
    store_tile(&mut scores, row + 32, &acc2, KEYS_PER_CUBE as u32);
    store_tile(&mut scores, row + 48, &acc3, KEYS_PER_CUBE as u32);
    sync_cube();

    // logits[token, key] = Σ_h w[token, h] · ReLU(S[token, h, j]), −∞ past q_pos.
    let mut pair = UNIT_POS as usize;
    while pair < comptime!(TOKENS_PER_CUBE * KEYS_PER_CUBE) {
        let tok = pair / KEYS_PER_CUBE;
        let j = pair % KEYS_PER_CUBE;
        let token = token0 + tok;
        let key = key0 + j;
        if token < t && key < s {
            let limit = q_pos[token];
            let mut score = f32::reinterpret(0xff80_0000u32);
            if limit >= 0 && key <= limit as usize && key as i32 >= k_start[token] {
                score = 0.0f32;
                for head in 0..h {
                    score += w[token * h + head] * f32::max(scores[(tok * h + head) * KEYS_PER_CUBE + j], 0.0f32);
                }
            }
            logits[token * s + key] = score;
        }
        pair += CUBE_DIM as usize;
    }
}
