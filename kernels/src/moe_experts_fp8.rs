//! The routed experts with DeepSeek's FP8 expert weights: `moe_experts` with w13 and w2 stored as e4m3 bytes
//! and one f32 scale per 128 × 128 block of each expert's matrix (the checkpoint's `weight` and
//! `weight_scale_inv`), dequantized as they are read.
//!
//! x [tokens, hidden] (bf16 or f32), ids / weights [tokens, top_k], w13 [experts, 2·inter, hidden] u8 with
//! w13_scales [experts, 2·inter / 128, hidden / 128], w2 [experts, hidden, inter] u8 with w2_scales
//! [experts, hidden / 128, inter / 128] → out [tokens, hidden]. hidden and inter are multiples of 128.
//! Variants `wgmma` (Hopper: weights widened to bf16 × scale in shared memory, see
//! [`crate::moe_experts_wgmma`]) and `simt` (everywhere).
use crate::fp8_act::quantize_weight_blocks;
use crate::moe_experts::{
    Layer, MoeExperts, Projections, WeightFormat, launch_layer, random_expert_weights, random_routing, reference_layer,
};
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::{Format, host};

const BLOCK: usize = 128;

pub const VARIANTS: &[Variant] = &[
    crate::moe_experts_wgmma::VARIANT,
    Variant {
        name: "simt",
        summary: "moe_experts' steps with e4m3 weights dequantized per 128 × 128 block as they are read",
        needs_plane_ops: false,
    },
];

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("x", &["tokens", "hidden"], Storage::Problem),
    TensorSpec::new("ids", &["tokens", "top_k"], Storage::I32),
    TensorSpec::new("weights", &["tokens", "top_k"], Storage::F32),
    TensorSpec::new("w13", &["experts", "2*inter", "hidden"], Storage::U8),
    TensorSpec::new(
        "w13_scales",
        &["experts", "2*inter_blocks", "hidden_blocks"],
        Storage::F32,
    ),
    TensorSpec::new("w2", &["experts", "hidden", "inter"], Storage::U8),
    TensorSpec::new("w2_scales", &["experts", "hidden_blocks", "inter_blocks"], Storage::F32),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("out", &["tokens", "hidden"], Storage::Problem)];

fn dims(tokens: usize, hidden: usize, inter: usize, experts: usize, top_k: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("tokens", tokens),
        ("hidden", hidden),
        ("inter", inter),
        ("experts", experts),
        ("top_k", top_k),
        ("hidden_blocks", hidden / BLOCK),
        ("inter_blocks", inter / BLOCK),
    ]
}

/// The dequantized f64 matrices of bytes and block scales.
fn dequantize_weight_blocks(bytes: &[u8], scales: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let (row_blocks, col_blocks) = (rows / BLOCK, cols / BLOCK);
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (e, r, c) = (i / (rows * cols), (i / cols) % rows, i % cols);
            host::e4m3_to_f32(*b) as f64 * scales[(e * row_blocks + r / BLOCK) * col_blocks + c / BLOCK]
        })
        .collect()
}

pub struct MoeExpertsFp8;

impl Kernel for MoeExpertsFp8 {
    fn name(&self) -> &'static str {
        "moe_experts_fp8"
    }
    fn summary(&self) -> &'static str {
        "routed experts with FP8 block-scaled expert weights (DeepSeek's checkpoint format)"
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
            // The last: experts past 128 rows (wgmma's row tiles), K past the pipeline's stages.
            for (tokens, hidden, inter, experts, top_k) in
                [(5, 128, 128, 4, 2), (9, 256, 128, 8, 3), (300, 256, 128, 4, 2)]
            {
                problems.push(Problem::new(format, &dims(tokens, hidden, inter, experts, top_k), &[]));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // A 16-expert slice of DeepSeek-V3.2's layer.
        [256, 8192]
            .into_iter()
            .map(|tokens| Problem::new(Format::Bf16, &dims(tokens, 7168, 2048, 16, 8), &[]))
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(256, 7168, 2048, 256, 8), &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        let (hidden, inter, experts, top_k) = (
            problem.dim("hidden"),
            problem.dim("inter"),
            problem.dim("experts"),
            problem.dim("top_k"),
        );
        let ok = hidden > 0
            && inter > 0
            && hidden.is_multiple_of(BLOCK)
            && inter.is_multiple_of(BLOCK)
            && problem.dim("hidden_blocks") == hidden / BLOCK
            && problem.dim("inter_blocks") == inter / BLOCK
            && (1..=experts).contains(&top_k);
        if !ok {
            return Err(KernelError::InvalidProblem {
                kernel: "moe_experts_fp8",
                field: "hidden",
                expected: "hidden and inter positive multiples of 128 (with their block counts), 1 ≤ top_k ≤ experts"
                    .into(),
                got: format!("hidden {hidden}, inter {inter}, top_k {top_k}, experts {experts}"),
            });
        }
        Ok(())
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        match variant.name {
            "wgmma" => crate::moe_experts_wgmma::requirements(problem, features),
            _ => Ok(()),
        }
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        variant.name == "simt" || target == IrTarget::Cuda
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        variant.name == "simt" || format == Format::Bf16
    }
    fn shared_memory_bytes(&self, variant: &Variant, _: &Problem) -> usize {
        match variant.name {
            "wgmma" => crate::moe_experts_wgmma::shared_memory_bytes(),
            _ => 0,
        }
    }
    fn flops(&self, problem: &Problem) -> u64 {
        MoeExperts.flops(problem)
    }
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        MoeExperts.tolerance(output, problem)
    }
    fn variant_tolerance(&self, variant: &Variant, output: &TensorSpec, problem: &Problem) -> f64 {
        MoeExperts.variant_tolerance(variant, output, problem)
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (tokens, hidden, inter) = (problem.dim("tokens"), problem.dim("hidden"), problem.dim("inter"));
        let (experts, top_k) = (problem.dim("experts"), problem.dim("top_k"));
        let x = crate::check::normal(rng, tokens * hidden);
        let (ids, weights) = random_routing(rng, tokens, experts, top_k);
        let (w13, w2) = random_expert_weights(rng, experts, hidden, inter);
        let (w13_bytes, w13_scales) = quantize_weight_blocks(&w13, experts, 2 * inter, hidden);
        let (w2_bytes, w2_scales) = quantize_weight_blocks(&w2, experts, hidden, inter);
        let (hb, ib) = (hidden / BLOCK, inter / BLOCK);
        vec![
            HostTensor::from_f32("x", &[tokens, hidden], DType::of(problem.format), &x),
            HostTensor::from_i32("ids", &[tokens, top_k], &ids),
            HostTensor::from_f32("weights", &[tokens, top_k], DType::F32, &weights),
            HostTensor::from_u8("w13", &[experts, 2 * inter, hidden], &w13_bytes),
            HostTensor::from_f32("w13_scales", &[experts, 2 * ib, hb], DType::F32, &w13_scales),
            HostTensor::from_u8("w2", &[experts, hidden, inter], &w2_bytes),
            HostTensor::from_f32("w2_scales", &[experts, hb, ib], DType::F32, &w2_scales),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (hidden, inter) = (problem.dim("hidden"), problem.dim("inter"));
        let w13 = dequantize_weight_blocks(
            &host::words_to_bytes(&inputs[3].words),
            &inputs[4].to_f64(),
            2 * inter,
            hidden,
        );
        let w2 = dequantize_weight_blocks(
            &host::words_to_bytes(&inputs[5].words),
            &inputs[6].to_f64(),
            hidden,
            inter,
        );
        let (x, ids, weights) = (inputs[0].to_f64(), inputs[1].to_f64(), inputs[2].to_f64());
        vec![reference_layer(problem, &x, &ids, &weights, &w13, &w2)]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let layer = Layer {
            x: &inputs[0],
            ids: &inputs[1],
            weights: &inputs[2],
            w13: &inputs[3],
            w13_scales: &inputs[4],
            w2: &inputs[5],
            w2_scales: &inputs[6],
            out: &outputs[0],
        };
        launch_layer(device, problem, layer, WeightFormat::Fp8Block, Projections::of(variant));
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        if variant.name == "wgmma" {
            return crate::moe_experts_wgmma::define(target, true);
        }
        crate::moe_experts::define_gate_up(variant, target, problem, WeightFormat::Fp8Block)
    }
}
