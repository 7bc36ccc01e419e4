//! Lightning indexer logits (DeepSeek-V3.2 DSA, prefill form).
//!
//! logits[t, s] = Σ_h w[t, h] · ReLU(q[t, h, :] · k[s, :])  for k_start ≤ s ≤ q_pos[t], else −∞
//! q [t, h, d] and k [s, d] in f32 or bf16 (scale factors folded into w [t, h] f32); q_pos [t] i32 (optional,
//! default: every key), logits [t, s] f32. Tolerance 1e-5 (f32 accumulation of bf16-exact inputs).
//! Variant `key_per_unit`: one unit per (t, s), looping over heads and d; q is read by all units of a cube
//! at once (a broadcast), k rows stream through.
use crate::launch::{buffer, grid, ir_props, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::unpack;
use rand::Rng;

const UNITS: u32 = 128;

pub const VARIANTS: &[Variant] = &[Variant {
    name: "key_per_unit",
    summary: "one unit per key, heads looped",
    needs_plane_ops: false,
}];

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn indexer_logits_kernel(
    q: &[u32],
    w: &[f32],
    k: &[u32],
    q_pos: &[i32],
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
    if limit >= 0 && key <= limit as usize {
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
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("logits", &["t", "s"], Storage::F32)];

pub struct IndexerLogits;

impl Kernel for IndexerLogits {
    fn name(&self) -> &'static str {
        "indexer_logits"
    }
    fn summary(&self) -> &'static str {
        "logits[t, s] = Σ_h w[t, h]·ReLU(q[t, h]·k[s]) for s ≤ q_pos[t], else −∞"
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
            for (t, h, d, s) in [(3, 64, 128, 300), (16, 8, 32, 16), (5, 4, 64, 1000)] {
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
        let (d, per_word) = (problem.dim("d"), problem.format.per_word() as usize);
        if d == 0 || d % per_word != 0 {
            return Err(KernelError::InvalidProblem {
                kernel: self.name(),
                field: "d",
                expected: format!("a positive multiple of {per_word} for {}", problem.format),
                got: d.to_string(),
            });
        }
        Ok(())
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // Causal rows see on average half the keys; count every (t, s) pair: 2·d per head plus ReLU·w.
        (problem.dim("t") * problem.dim("s") * problem.dim("h") * (2 * problem.dim("d") + 2)) as u64
    }
    fn default_input(&self, _: &TensorSpec, problem: &Problem) -> HostTensor {
        let (t, s) = (problem.dim("t"), problem.dim("s"));
        HostTensor::from_i32("q_pos", &[t], &vec![s as i32 - 1; t])
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
        inputs.push(HostTensor::from_i32("q_pos", &[t], &positions));
        inputs
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (t, h, d, s) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("s"));
        let (q, w, k, q_pos) = (
            inputs[0].to_f64(),
            inputs[1].to_f64(),
            inputs[2].to_f64(),
            inputs[3].to_f64(),
        );
        let mut logits = vec![f64::NEG_INFINITY; t * s];
        for token in 0..t {
            for key in 0..s {
                if (key as f64) > q_pos[token] {
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
    fn launch(&self, _: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (t, h, d, s) = (problem.dim("t"), problem.dim("h"), problem.dim("d"), problem.dim("s"));
        let row_words = d / problem.format.per_word() as usize;
        indexer_logits_kernel::launch(
            &device.client,
            grid(t * s.div_ceil(UNITS as usize)),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], t * h * row_words),
            buffer(&inputs[1], t * h),
            buffer(&inputs[2], s * row_words),
            buffer(&inputs[3], t),
            buffer(&outputs[0], t * s),
            t,
            s,
            h,
            row_words,
            problem.format,
        );
    }
    fn define(&self, _: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (props, target_props) = ir_props(target);
        indexer_logits_kernel::IndexerLogitsKernel::new(
            ir_settings(CubeDim::new_1d(UNITS)),
            props,
            target_props,
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
