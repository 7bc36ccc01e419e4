//! Dense MLA decode over a paged latent cache (absorbed form; FlashMLA `flash_mla_with_kvcache` without
//! indices): the registration of the shared core in [`crate::sparse_mla`] with implicit indices.
//!
//! q [b, s_q, h_q, 576] and cache [pages, 64, 576] (bf16 or f32, alike), block_table [b, max_pages] i32 (a
//! sequence's logical page → physical page, −1 = none), seqlens [b] i32 (each sequence's tokens, its s_q new
//! ones included); sm_scale → out [b, s_q, h_q, 512], lse and max_logit [b, s_q, h_q] f32. Row j of a batch
//! sees positions 0 ..= seqlen − s_q + j (causal, as MTP's draft tokens need); unmapped pages are skipped.
//! Tolerances: out 2e-3 (plus bf16 output rounding; see `tolerance`), lse 1e-5.
use crate::sparse_mla::{self, D_QK, D_V, KvSource, Launch, PAGE_SIZE};
use crate::spec::{Storage, TensorSpec};
use crate::{DType, HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;
use rand::Rng;
use rand::seq::SliceRandom;

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["b", "s_q", "h_q", "d_qk"], Storage::Problem),
    TensorSpec::new("cache", &["pages", "page_size", "d_qk"], Storage::Problem),
    TensorSpec::new("block_table", &["b", "max_pages"], Storage::I32),
    TensorSpec::new("seqlens", &["b"], Storage::I32),
];
const OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new("out", &["b", "s_q", "h_q", "d_v"], Storage::Problem),
    TensorSpec::new("lse", &["b", "s_q", "h_q"], Storage::F32),
    TensorSpec::new("max_logit", &["b", "s_q", "h_q"], Storage::F32),
];

fn dims(b: usize, s_q: usize, h_q: usize, pages: usize, max_pages: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("b", b),
        ("s_q", s_q),
        ("h_q", h_q),
        ("d_qk", D_QK),
        ("d_v", D_V),
        ("pages", pages),
        ("page_size", PAGE_SIZE),
        ("max_pages", max_pages),
    ]
}

const PARAMS: &[(&str, f64)] = &[("sm_scale", 0.041666666666666664), ("num_splits", 0.0), ("bench", 0.0)];

pub struct MlaDecode;

impl Kernel for MlaDecode {
    fn name(&self) -> &'static str {
        "mla_decode"
    }
    fn summary(&self) -> &'static str {
        "dense MLA decode over a paged latent cache through a block table (causal for s_q > 1)"
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
        // num_splits: split-KV cubes per row for the flash-attention variants (0: enough to fill the device).
        // bench: 1 fills the cache with cheap random bits (billions of values) and every sequence to the end.
        PARAMS
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (b, s_q, h_q, pages, max_pages): ragged lengths, MTP's s_q = 2, 64 and 128 heads.
            // (b, s_q, h_q, pages, max_pages, num_splits): ragged lengths, MTP's s_q = 2, 64 and 128 heads, 3
            // and 5 splits (more than some rows have blocks).
            for (b, s_q, h_q, pages, max_pages, splits) in [
                (3, 1, 16, 12, 4, 0.0),
                (2, 2, 32, 8, 4, 3.0),
                (3, 2, 64, 9, 3, 0.0),
                (2, 1, 128, 6, 3, 5.0),
            ] {
                problems.push(Problem::new(
                    format,
                    &dims(b, s_q, h_q, pages, max_pages),
                    &[
                        ("sm_scale", 0.041666666666666664),
                        ("num_splits", splits),
                        ("bench", 0.0),
                    ],
                ));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // b 128, h_q 128, s_q 1, 4K and 32K context.
        [4096usize, 32768]
            .into_iter()
            .map(|context| {
                let max_pages = context / PAGE_SIZE;
                Problem::new(
                    Format::Bf16,
                    &dims(128, 1, 128, 128 * max_pages, max_pages),
                    &[("sm_scale", 0.041666666666666664), ("num_splits", 0.0), ("bench", 1.0)],
                )
            })
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(128, 1, 128, 65536, 512), PARAMS)
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        sparse_mla::validate(self.name(), problem)?;
        if problem.dim("page_size") != PAGE_SIZE {
            return Err(KernelError::InvalidProblem {
                kernel: self.name(),
                field: "page_size",
                expected: "64".into(),
                got: problem.dim("page_size").to_string(),
            });
        }
        Ok(())
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
        // Every row over the whole table (the bench's sequences fill it).
        let context = PAGE_SIZE * problem.dim("max_pages");
        (2 * problem.dim("h_q") * problem.dim("b") * problem.dim("s_q") * context * (D_QK + D_V)) as u64
    }
    fn bytes(&self, problem: &Problem) -> u64 {
        // Each sequence's cache read once, plus q, the table and the outputs.
        let element = if problem.format == Format::Bf16 { 2 } else { 4 };
        let cache = (problem.dim("b") * problem.dim("max_pages") * PAGE_SIZE * D_QK * element) as u64;
        let others = [0, 2, 3].iter().map(|&i| INPUTS[i].bytes(problem)).sum::<u64>();
        cache + others + OUTPUTS.iter().map(|t| t.bytes(problem)).sum::<u64>()
    }
    fn tunable_params(&self, variant: &Variant) -> &'static [(&'static str, &'static [f64])] {
        sparse_mla::tunable_params(variant)
    }
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        // 2e-3 rather than sparse decode's 1e-3: P enters P·V as bf16 (FlashMLA does the same), and a causal
        // row that sees only a few positions does not average that rounding out (measured up to 3.1e-3
        // with the output's own bf16 rounding on the H200; FlashMLA's decode test allows rtol 2.01/128).
        sparse_mla::tolerance(output, problem, 2e-3)
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (b, s_q, h_q) = (problem.dim("b"), problem.dim("s_q"), problem.dim("h_q"));
        let (pages, max_pages) = (problem.dim("pages"), problem.dim("max_pages"));
        let bench = problem.param("bench") != 0.0;
        let dtype = DType::of(problem.format);
        let q = HostTensor::from_f32(
            "q",
            &[b, s_q, h_q, D_QK],
            dtype,
            &crate::check::normal(rng, b * s_q * h_q * D_QK),
        );
        let cache_shape = [pages, PAGE_SIZE, D_QK];
        let cache = if bench && problem.format == Format::Bf16 {
            // bf16 pairs in ±[0.5, 2) from random bits.
            let words = (0..pages * PAGE_SIZE * D_QK / 2)
                .map(|_| (rng.random::<u32>() & 0x807f_807f) | 0x3f00_3f00)
                .collect();
            HostTensor {
                name: "cache".into(),
                shape: cache_shape.to_vec(),
                dtype,
                words,
            }
        } else {
            HostTensor::from_f32(
                "cache",
                &cache_shape,
                dtype,
                &crate::check::normal(rng, pages * PAGE_SIZE * D_QK),
            )
        };
        // Disjoint physical pages per sequence; tests unmap one page of a sequence and draw ragged lengths
        // (one shorter than s_q: its first rows see nothing).
        let mut physical: Vec<i32> = (0..pages as i32).collect();
        if !bench {
            physical.shuffle(rng);
        }
        let per_seq = (pages / b).clamp(1, max_pages);
        let mut table = vec![-1i32; b * max_pages];
        for seq in 0..b {
            for p in 0..per_seq {
                table[seq * max_pages + p] = physical.get(seq * per_seq + p).copied().unwrap_or(-1);
            }
        }
        let mut seqlens = vec![(per_seq * PAGE_SIZE) as i32; b];
        if !bench {
            for (seq, len) in seqlens.iter_mut().enumerate() {
                *len = match seq % 3 {
                    0 => rng.random_range(PAGE_SIZE..=per_seq * PAGE_SIZE) as i32,
                    1 => rng.random_range(1..=s_q) as i32,
                    _ => (per_seq * PAGE_SIZE) as i32,
                };
            }
            if per_seq > 2 {
                table[per_seq / 2] = -1;
            }
        }
        vec![
            q,
            cache,
            HostTensor::from_i32("block_table", &[b, max_pages], &table),
            HostTensor::from_i32("seqlens", &[b], &seqlens),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (b, s_q, h_q) = (problem.dim("b"), problem.dim("s_q"), problem.dim("h_q"));
        let (pages, max_pages) = (problem.dim("pages"), problem.dim("max_pages"));
        let (q, cache, table, seqlens) = (
            inputs[0].to_f64(),
            inputs[1].to_f64(),
            inputs[2].to_f64(),
            inputs[3].to_f64(),
        );
        // Implicit indices: every visible position, −1 past the row's causal limit.
        let context = max_pages * PAGE_SIZE;
        let mut indices = Vec::with_capacity(b * s_q * context);
        for &seqlen in &seqlens[..b] {
            for j in 0..s_q {
                let visible = (seqlen as i64 - s_q as i64 + 1 + j as i64).max(0) as usize;
                indices.extend((0..context).map(|p| if p < visible { p as f64 } else { -1.0 }));
            }
        }
        let row = |r: usize, i: i64| {
            if i < 0 {
                return None;
            }
            let page = table[(r / s_q) * max_pages + i as usize / PAGE_SIZE];
            (page >= 0.0 && (page as usize) < pages).then(|| {
                let token = page as usize * PAGE_SIZE + i as usize % PAGE_SIZE;
                cache[token * D_QK..][..D_QK].to_vec()
            })
        };
        sparse_mla::reference(&q, h_q, context, &indices, problem.param("sm_scale"), row)
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (b, s_q, h_q) = (problem.dim("b"), problem.dim("s_q"), problem.dim("h_q"));
        let (pages, max_pages) = (problem.dim("pages"), problem.dim("max_pages"));
        let rows = b * s_q;
        let per_word = problem.format.per_word() as usize;
        let sizes = Launch {
            rows,
            rows_per_batch: s_q,
            h_q,
            s_kv: 0,
            max_pages,
            pages,
            topk: max_pages * PAGE_SIZE,
            sm_scale: problem.param("sm_scale") as f32,
            splits: problem.param("num_splits") as usize,
        };
        let buffers = [
            (&inputs[0], rows * h_q * D_QK / per_word),
            (&inputs[1], pages * PAGE_SIZE * D_QK / per_word),
            (&inputs[2], b * max_pages),
            (&inputs[3], b),
            (&outputs[0], rows * h_q * D_V / per_word),
            (&outputs[1], rows * h_q),
            (&outputs[2], rows * h_q),
        ];
        sparse_mla::launch(variant, device, buffers, sizes, KvSource::Bf16Paged, problem.format);
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        sparse_mla::define(variant, target, KvSource::Bf16Paged, problem.format)
    }
}
