//! Sparse MLA prefill (FlashMLA `flash_mla_sparse_fwd` semantics) over kv rows: the registration of the
//! shared core in [`crate::sparse_mla`].
//!
//! q [s_q, h_q, 576], kv [s_kv, 576] (bf16 or f32), indices [s_q, topk] i32 (−1 or ≥ s_kv: skipped),
//! sm_scale → out [s_q, h_q, 512] (q's format), lse [s_q, h_q] f32 (natural log), max_logit [s_q, h_q] f32.
//! Tolerances (FlashMLA's tests): out 8e-4 (plus bf16 output rounding, 2⁻⁹ relative), lse 1e-5.
use crate::sparse_mla::{self, D_QK, D_V, KvSource, Launch};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use rand::Rng;
use rand::seq::SliceRandom;

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["s_q", "h_q", "d_qk"], Storage::Problem),
    TensorSpec::new("kv", &["s_kv", "d_qk"], Storage::Problem),
    TensorSpec::new("indices", &["s_q", "topk"], Storage::I32),
];
const OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new("out", &["s_q", "h_q", "d_v"], Storage::Problem),
    TensorSpec::new("lse", &["s_q", "h_q"], Storage::F32),
    TensorSpec::new("max_logit", &["s_q", "h_q"], Storage::F32),
];

pub struct SparseMlaPrefill;

impl Kernel for SparseMlaPrefill {
    fn name(&self) -> &'static str {
        "sparse_mla_prefill"
    }
    fn summary(&self) -> &'static str {
        "out = softmax(sm_scale·q·kv[idx]ᵀ)·kv[idx, :512], lse, max logit (FlashMLA sparse prefill)"
    }
    fn variants(&self) -> &'static [Variant] {
        sparse_mla::VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        // 1/√576, as DeepSeek scales q·k over the full 576-dim head.
        // mask: test data only — 1 makes a third of the rows all-invalid and sprinkles invalid entries.
        &[("sm_scale", 0.041666666666666664), ("mask", 0.0)]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (s_q, h_q, s_kv, topk): more keys than topk, fewer keys than topk (s_kv < topk), 128 heads.
            for (s_q, h_q, s_kv, topk) in [(3, 16, 300, 64), (4, 32, 40, 64), (2, 128, 1000, 128)] {
                problems.push(Problem::new(
                    format,
                    &[
                        ("s_q", s_q),
                        ("h_q", h_q),
                        ("s_kv", s_kv),
                        ("topk", topk),
                        ("d_qk", 576),
                        ("d_v", 512),
                    ],
                    &[("sm_scale", 0.041666666666666664), ("mask", 1.0)],
                ));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        [8192, 32768, 131072]
            .into_iter()
            .map(|s_kv| {
                Problem::new(
                    Format::Bf16,
                    &[
                        ("s_q", 4096),
                        ("h_q", 128),
                        ("s_kv", s_kv),
                        ("topk", 2048),
                        ("d_qk", 576),
                        ("d_v", 512),
                    ],
                    &[("sm_scale", 0.041666666666666664), ("mask", 0.0)],
                )
            })
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(
            format,
            &[
                ("s_q", 4096),
                ("h_q", 128),
                ("s_kv", 8192),
                ("topk", 2048),
                ("d_qk", 576),
                ("d_v", 512),
            ],
            &[("sm_scale", 0.041666666666666664), ("mask", 0.0)],
        )
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        sparse_mla::validate(self.name(), problem)
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        sparse_mla::supports(variant, problem, features)
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        sparse_mla::supports_target(variant, target)
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        sparse_mla::supports_format(variant, format)
    }
    fn shared_memory_bytes(&self, variant: &Variant, problem: &Problem) -> usize {
        sparse_mla::shared_memory_bytes(variant, problem.format)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // FlashMLA's count: 2·h_q·Σtopk·(d_qk + d_v).
        (2 * problem.dim("h_q") * problem.dim("s_q") * problem.dim("topk") * (problem.dim("d_qk") + problem.dim("d_v")))
            as u64
    }
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        sparse_mla::tolerance(output, problem, 8e-4)
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let mut inputs = crate::check::random_normal_inputs(&INPUTS[..2], problem, rng);
        let (s_q, s_kv, topk) = (problem.dim("s_q"), problem.dim("s_kv"), problem.dim("topk"));
        let mut indices = Vec::with_capacity(s_q * topk);
        let mask = problem.param("mask") != 0.0;
        for row in 0..s_q {
            // Distinct keys; −1 pads rows when s_kv < topk.
            let mut keys: Vec<i32> = if s_kv > topk {
                rand::seq::index::sample(rng, s_kv, topk)
                    .into_iter()
                    .map(|i| i as i32)
                    .collect()
            } else {
                let mut all: Vec<i32> = (0..s_kv as i32).collect();
                all.shuffle(rng);
                all
            };
            keys.resize(topk, -1);
            match if mask { row % 3 } else { 0 } {
                // Every index invalid: −1 and past-the-end.
                1 => keys
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, k)| *k = if i % 2 == 0 { -1 } else { (s_kv + i) as i32 }),
                // Some invalid entries sprinkled in.
                2 => keys.iter_mut().for_each(|k| {
                    if rng.random_range(0..5) == 0 {
                        *k = if rng.random() {
                            -1
                        } else {
                            s_kv as i32 + rng.random_range(0..100)
                        };
                    }
                }),
                _ => {}
            }
            indices.extend(keys);
        }
        inputs.push(HostTensor::from_i32("indices", &[s_q, topk], &indices));
        inputs
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (h_q, s_kv, topk) = (problem.dim("h_q"), problem.dim("s_kv"), problem.dim("topk"));
        let (q, kv, indices) = (inputs[0].to_f64(), inputs[1].to_f64(), inputs[2].to_f64());
        let row = |_, i: i64| (i >= 0 && (i as usize) < s_kv).then(|| kv[i as usize * D_QK..][..D_QK].to_vec());
        sparse_mla::reference(&q, h_q, topk, &indices, problem.param("sm_scale"), row)
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (s_q, h_q, s_kv, topk) = (
            problem.dim("s_q"),
            problem.dim("h_q"),
            problem.dim("s_kv"),
            problem.dim("topk"),
        );
        let per_word = problem.format.per_word() as usize;
        // kv rows need no block table: a one-entry placeholder fills the binding.
        let no_block_table = device.client.create_from_slice(&[0u8; 4]);
        let sizes = Launch {
            rows: s_q,
            rows_per_batch: s_q,
            h_q,
            s_kv,
            max_pages: 0,
            pages: 0,
            topk,
            sm_scale: problem.param("sm_scale") as f32,
            splits: 0,
        };
        let buffers = [
            (&inputs[0], s_q * h_q * D_QK / per_word),
            (&inputs[1], s_kv * D_QK / per_word),
            (&no_block_table, 1),
            (&inputs[2], s_q * topk),
            (&outputs[0], s_q * h_q * D_V / per_word),
            (&outputs[1], s_q * h_q),
            (&outputs[2], s_q * h_q),
        ];
        sparse_mla::launch(variant, device, buffers, sizes, KvSource::Rows, problem.format);
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        sparse_mla::define(variant, target, KvSource::Rows, problem.format)
    }
}
