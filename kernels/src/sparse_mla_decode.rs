//! Sparse MLA decode over the paged FP8 KV cache (FlashMLA `flash_mla_with_kvcache` sparse semantics): the
//! registration of the shared core in [`crate::sparse_mla`].
//!
//! q [b, s_q, h_q, 576] (bf16 or f32); cache [pages, 64, 656] bytes (as `fp8_kv_quantize` writes them);
//! block_table [b, max_pages] i32 (a sequence's logical page → physical page, −1 = none); indices
//! [b, s_q, topk] i32, by parameter `logical`:
//! - 0 (default, FlashMLA's convention): physical token slots page·64 + offset in the cache, as SGLang passes
//!   them after mapping the indexer's top-k through the block table (−1 or ≥ pages·64: skipped; the block
//!   table is not read);
//! - 1: logical token positions in the row's sequence, mapped through its block table here (what the top-k
//!   kernel outputs, without the separate mapping step; −1, past the table, or an unmapped page: skipped).
//!
//! sm_scale → out [b, s_q, h_q, 512] (q's format), lse and max_logit [b, s_q, h_q] f32. Tolerances: out 1e-3
//! (FlashMLA's decode test; plus bf16 output rounding), lse 1e-5.
use crate::fp8_kv::quantize_token;
use crate::sparse_mla::{self, D_QK, D_V, KvSource, Launch, PAGE_SIZE, TOKEN_WORDS};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, DeviceFeatures, IrTarget};
use nsa_dsl::{Format, host};
use rand::Rng;
use rand::seq::SliceRandom;

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("q", &["b", "s_q", "h_q", "d_qk"], Storage::Problem),
    TensorSpec::new("cache", &["pages", "page_size", "token_bytes"], Storage::U8),
    TensorSpec::new("block_table", &["b", "max_pages"], Storage::I32),
    TensorSpec::new("indices", &["b", "s_q", "topk"], Storage::I32),
];
const OUTPUTS: &[TensorSpec] = &[
    TensorSpec::new("out", &["b", "s_q", "h_q", "d_v"], Storage::Problem),
    TensorSpec::new("lse", &["b", "s_q", "h_q"], Storage::F32),
    TensorSpec::new("max_logit", &["b", "s_q", "h_q"], Storage::F32),
];

/// The 576 values of cached token `slot` of `page`, dequantized (e4m3 · scale, bf16 rope).
fn dequantize(cache: &[f64], page: usize, slot: usize) -> Vec<f64> {
    let bytes: Vec<u8> = cache[(page * PAGE_SIZE + slot) * 656..][..656]
        .iter()
        .map(|b| *b as u8)
        .collect();
    let scales: Vec<f32> = bytes[512..528]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut values: Vec<f64> = (0..D_V)
        .map(|i| (host::e4m3_to_f32(bytes[i]) * scales[i / 128]) as f64)
        .collect();
    values.extend(
        bytes[528..]
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()),
    );
    values
}

fn dims(b: usize, s_q: usize, h_q: usize, pages: usize, max_pages: usize, topk: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("b", b),
        ("s_q", s_q),
        ("h_q", h_q),
        ("d_qk", D_QK),
        ("d_v", D_V),
        ("pages", pages),
        ("page_size", PAGE_SIZE),
        ("token_bytes", 656),
        ("max_pages", max_pages),
        ("topk", topk),
    ]
}

pub struct SparseMlaDecode;

impl Kernel for SparseMlaDecode {
    fn name(&self) -> &'static str {
        "sparse_mla_decode"
    }
    fn summary(&self) -> &'static str {
        "sparse MLA over the paged FP8 KV cache through a block table (FlashMLA sparse decode)"
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
        // logical: 0 = physical indices (FlashMLA), 1 = positions through the block table.
        // mask: test data only — 1 adds invalid entries, unmapped pages and all-invalid rows.
        // num_splits: split-KV cubes per row for the flash-attention variants (0: enough to fill the device).
        &[
            ("sm_scale", 0.041666666666666664),
            ("logical", 0.0),
            ("num_splits", 0.0),
            ("mask", 0.0),
        ]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (b, s_q, h_q, pages, max_pages, topk): ragged sequences, MTP's s_q = 2, 128 heads.
            // Physical and logical indices each.
            // Physical and logical indices each; one problem split in 3.
            for (b, s_q, h_q, pages, max_pages, topk, logical, splits) in [
                (3, 1, 16, 12, 5, 64, 0.0, 0.0),
                (2, 2, 32, 8, 4, 128, 1.0, 0.0),
                (1, 1, 128, 4, 4, 64, 0.0, 0.0),
                (2, 2, 128, 6, 3, 256, 1.0, 3.0),
            ] {
                problems.push(Problem::new(
                    format,
                    &dims(b, s_q, h_q, pages, max_pages, topk),
                    &[
                        ("sm_scale", 0.041666666666666664),
                        ("logical", logical),
                        ("num_splits", splits),
                        ("mask", 1.0),
                    ],
                ));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        // b 128, h_q 128, s_q 1 and 2, topk 2048, 32K context: 512 pages per sequence.
        [1, 2]
            .into_iter()
            .map(|s_q| {
                Problem::new(
                    Format::Bf16,
                    &dims(128, s_q, 128, 128 * 512, 512, 2048),
                    // num_splits: split-KV cubes per row for the flash-attention variants (0: enough to fill the device).
                    &[
                        ("sm_scale", 0.041666666666666664),
                        ("logical", 0.0),
                        ("num_splits", 0.0),
                        ("mask", 0.0),
                    ],
                )
            })
            .collect()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(
            format,
            &dims(128, 1, 128, 65536, 512, 2048),
            // num_splits: split-KV cubes per row for the flash-attention variants (0: enough to fill the device).
            &[
                ("sm_scale", 0.041666666666666664),
                ("logical", 0.0),
                ("num_splits", 0.0),
                ("mask", 0.0),
            ],
        )
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        sparse_mla::validate(self.name(), problem)?;
        if problem.dim("page_size") != PAGE_SIZE || problem.dim("token_bytes") != 656 {
            return Err(KernelError::InvalidProblem {
                kernel: self.name(),
                field: "page_size",
                expected: "64 tokens of 656 bytes".into(),
                got: format!(
                    "{} tokens of {} bytes",
                    problem.dim("page_size"),
                    problem.dim("token_bytes")
                ),
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
        (2 * problem.dim("h_q") * problem.dim("b") * problem.dim("s_q") * problem.dim("topk") * (D_QK + D_V)) as u64
    }
    fn bytes(&self, problem: &Problem) -> u64 {
        // q, block table, indices and outputs, plus the 656-byte tokens gathered (not the whole cache).
        let gathered = (problem.dim("b") * problem.dim("s_q") * problem.dim("topk") * 656) as u64;
        let touched = [0, 2, 3].iter().map(|&i| INPUTS[i].bytes(problem)).sum::<u64>();
        gathered + touched + OUTPUTS.iter().map(|t| t.bytes(problem)).sum::<u64>()
    }
    fn tunable_params(&self, variant: &Variant) -> &'static [(&'static str, &'static [f64])] {
        sparse_mla::tunable_params(variant)
    }
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        sparse_mla::tolerance(output, problem, 1e-3)
    }
    fn random_inputs(&self, problem: &Problem, rng: &mut rand::rngs::StdRng) -> Vec<HostTensor> {
        let (b, s_q, h_q) = (problem.dim("b"), problem.dim("s_q"), problem.dim("h_q"));
        let (pages, max_pages, topk) = (problem.dim("pages"), problem.dim("max_pages"), problem.dim("topk"));
        let mask = problem.param("mask") != 0.0;
        let q = crate::check::normal(rng, b * s_q * h_q * D_QK);
        let tokens = pages * PAGE_SIZE;
        let cache = if mask {
            // Tests: every token quantized from normal values, as fp8_kv_quantize writes it.
            let mut bytes = Vec::with_capacity(tokens * 656);
            for _ in 0..tokens {
                let values: Vec<f64> = crate::check::normal(rng, D_QK).iter().map(|v| *v as f64).collect();
                bytes.extend(quantize_token(&values));
            }
            HostTensor {
                name: "cache".into(),
                shape: vec![pages, PAGE_SIZE, 656],
                dtype: crate::DType::U8,
                words: host::pack_bytes(&bytes),
            }
        } else {
            // Bench (millions of tokens): random non-NaN e4m3 codes, scale 2⁻⁷, rope bf16 in ±[0.5, 2).
            let mut words = Vec::with_capacity(tokens * TOKEN_WORDS);
            for _ in 0..tokens {
                words.extend((0..128).map(|_| rng.random::<u32>() & 0xf6f6_f6f6));
                words.extend([0x3c00_0000u32; 4]);
                words.extend((0..32).map(|_| (rng.random::<u32>() & 0x807f_807f) | 0x3f00_3f00));
            }
            HostTensor {
                name: "cache".into(),
                shape: vec![pages, PAGE_SIZE, 656],
                dtype: crate::DType::U8,
                words,
            }
        };
        // Block tables: disjoint physical pages per sequence (sequences get up to max_pages; with mask,
        // one logical page is left unmapped).
        let mut physical: Vec<i32> = (0..pages as i32).collect();
        physical.shuffle(rng);
        let mut table = vec![-1i32; b * max_pages];
        let mut lengths = Vec::new();
        for seq in 0..b {
            let used = (pages / b).min(max_pages).max(1);
            for p in 0..used {
                table[seq * max_pages + p] = physical.get(seq * used + p).copied().unwrap_or(-1);
            }
            if mask && used > 1 {
                table[seq * max_pages + used / 2] = -1;
            }
            lengths.push(used * PAGE_SIZE - if mask { rng.random_range(0..PAGE_SIZE) } else { 0 });
        }
        let mut indices = Vec::with_capacity(b * s_q * topk);
        for (seq, &length) in lengths.iter().enumerate() {
            for row in 0..s_q {
                let mut chosen: Vec<i32> = if length > topk {
                    rand::seq::index::sample(rng, length, topk)
                        .into_iter()
                        .map(|i| i as i32)
                        .collect()
                } else {
                    (0..length as i32).collect()
                };
                chosen.resize(topk, -1);
                if mask && (seq + row) % 3 == 1 {
                    // An all-invalid row: −1, and positions past the block table.
                    chosen.iter_mut().enumerate().for_each(|(i, c)| {
                        *c = if i % 2 == 0 {
                            -1
                        } else {
                            (max_pages * PAGE_SIZE + i) as i32
                        }
                    });
                }
                if problem.param("logical") == 0.0 {
                    // Physical slots: the position's page through the table (an unmapped page: −1).
                    chosen.iter_mut().filter(|c| **c >= 0).for_each(|c| {
                        let pos = *c as usize;
                        *c = match table.get(seq * max_pages + pos / PAGE_SIZE) {
                            Some(&page) if page >= 0 => page * PAGE_SIZE as i32 + (pos % PAGE_SIZE) as i32,
                            // Past the table: a slot past the cache.
                            None => (tokens + pos) as i32,
                            Some(_) => -1,
                        };
                    });
                }
                indices.extend(chosen);
            }
        }
        vec![
            HostTensor::from_f32("q", &[b, s_q, h_q, D_QK], crate::DType::of(problem.format), &q),
            cache,
            HostTensor::from_i32("block_table", &[b, max_pages], &table),
            HostTensor::from_i32("indices", &[b, s_q, topk], &indices),
        ]
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (s_q, h_q, pages, max_pages, topk) = (
            problem.dim("s_q"),
            problem.dim("h_q"),
            problem.dim("pages"),
            problem.dim("max_pages"),
            problem.dim("topk"),
        );
        let (q, cache, table, indices) = (
            inputs[0].to_f64(),
            inputs[1].to_f64(),
            inputs[2].to_f64(),
            inputs[3].to_f64(),
        );
        let logical = problem.param("logical") != 0.0;
        let row = |r: usize, i: i64| {
            let batch = r / s_q;
            if !logical {
                return (i >= 0 && (i as usize) < pages * PAGE_SIZE)
                    .then(|| dequantize(&cache, i as usize / PAGE_SIZE, i as usize % PAGE_SIZE));
            }
            if i < 0 || i as usize >= max_pages * PAGE_SIZE {
                return None;
            }
            let page = table[batch * max_pages + i as usize / PAGE_SIZE];
            (page >= 0.0 && (page as usize) < pages).then(|| dequantize(&cache, page as usize, i as usize % PAGE_SIZE))
        };
        sparse_mla::reference(&q, h_q, topk, &indices, problem.param("sm_scale"), row)
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (b, s_q, h_q) = (problem.dim("b"), problem.dim("s_q"), problem.dim("h_q"));
        let (pages, max_pages, topk) = (problem.dim("pages"), problem.dim("max_pages"), problem.dim("topk"));
        let rows = b * s_q;
        let per_word = problem.format.per_word() as usize;
        let sizes = Launch {
            rows,
            rows_per_batch: s_q,
            h_q,
            s_kv: if problem.param("logical") != 0.0 {
                0
            } else {
                pages * PAGE_SIZE
            },
            max_pages,
            pages,
            topk,
            sm_scale: problem.param("sm_scale") as f32,
            splits: problem.param("num_splits") as usize,
        };
        let buffers = [
            (&inputs[0], rows * h_q * D_QK / per_word),
            (&inputs[1], pages * PAGE_SIZE * TOKEN_WORDS),
            (&inputs[2], b * max_pages),
            (&inputs[3], rows * topk),
            (&outputs[0], rows * h_q * D_V / per_word),
            (&outputs[1], rows * h_q),
            (&outputs[2], rows * h_q),
        ];
        sparse_mla::launch(variant, device, buffers, sizes, KvSource::Fp8Paged, problem.format);
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        sparse_mla::define(variant, target, KvSource::Fp8Paged, problem.format)
    }
}
