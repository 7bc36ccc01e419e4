//! Strategy decisions: choices SGLang fixes by a rule, measured instead.
//!
//! A strategy has named options; each option is a plan — the chain of kernel launches that computes the
//! same attention result another way — and SGLang's rule picks one by default. `nsa autotune` times every
//! option's plan over a grid of shapes (the sum of its steps' median times, each step on the variant
//! dispatch picks for it) and the table keeps the fastest under the entry `strategy:<name>`;
//! [`crate::tuning::Dispatch::decide`] returns it, or the rule's option without a table.
use crate::{Kernel, Problem};
use nsa_dsl::Format;

/// One launch of a plan.
pub struct Step {
    pub kernel: &'static dyn Kernel,
    pub problem: Problem,
}

pub trait Strategy: Sync {
    /// SGLang's name for the choice (`nsa_prefill_backend`), or ours where SGLang has no flag.
    fn name(&self) -> &'static str;
    /// What is being chosen, one line.
    fn summary(&self) -> &'static str;
    fn options(&self) -> &'static [&'static str];
    /// SGLang's fixed rule, in words.
    fn rule_text(&self) -> &'static str;
    /// The option SGLang's rule picks at `shape`.
    fn rule(&self, shape: &Problem) -> &'static str;
    /// The shape buckets `nsa autotune` measures: the model's sizes, or tiny ones for a CPU-backed device.
    fn grid(&self, tiny: bool) -> Vec<Problem>;
    /// The launches `option` makes at `shape`.
    fn plan(&self, option: &str, shape: &Problem) -> Vec<Step>;
}

pub static STRATEGIES: &[&dyn Strategy] = &[&PrefillBackend, &MhaOneShot];

/// The table's kernel name for a strategy's entries.
pub fn table_name(strategy: &dyn Strategy) -> String {
    format!("strategy:{}", strategy.name())
}

pub fn find_strategy(name: &str) -> Option<&'static dyn Strategy> {
    let name = name.strip_prefix("strategy:").unwrap_or(name);
    STRATEGIES.iter().copied().find(|s| s.name() == name)
}

/// A strategy's version: its name and the versions of every kernel its plans launch, so a table measured
/// before one of them changed is not applied.
pub fn strategy_version(strategy: &dyn Strategy) -> String {
    let mut kernels: Vec<&'static dyn Kernel> = Vec::new();
    for shape in strategy.grid(true) {
        for option in strategy.options() {
            for step in strategy.plan(option, &shape) {
                if !kernels.iter().any(|k| k.name() == step.kernel.name()) {
                    kernels.push(step.kernel);
                }
            }
        }
    }
    let mut text = strategy.name().to_string();
    for kernel in kernels {
        text.push_str(&crate::tuning::kernel_version(kernel));
    }
    crate::tuning::fnv1a(text.as_bytes())
}

const SM_SCALE_MLA: f64 = 0.041666666666666664;
const SM_SCALE_MHA: f64 = 0.07216878364870323;
const PAGE: usize = 64;

/// A strategy's shape: bf16 at the model's sizes; f32 for the tiny grid, which must run on any device
/// (lavapipe has no bf16 arithmetic for cubek's GEMM).
fn shape(format: Format, q: usize, kv: usize, heads: usize, topk: usize) -> Problem {
    Problem::new(format, &[("q", q), ("kv", kv), ("heads", heads), ("topk", topk)], &[])
}

fn sparse_prefill(format: Format, q: usize, kv: usize, heads: usize, topk: usize) -> Step {
    Step {
        kernel: &crate::sparse_mla_prefill::SparseMlaPrefill,
        problem: Problem::new(
            format,
            &[
                ("s_q", q),
                ("h_q", heads),
                ("s_kv", kv),
                ("topk", topk),
                ("d_qk", 576),
                ("d_v", 512),
            ],
            &[("sm_scale", SM_SCALE_MLA), ("mask", 0.0)],
        ),
    }
}

/// `--nsa-prefill-backend flashmla_auto` over an FP8 KV cache: widen the cached tokens to bf16 and run the
/// bf16 sparse prefill (`flashmla_sparse`), or run the FP8-cache decode kernel on every new token
/// (`flashmla_kv`). One sequence of `q` new tokens over `kv` cached ones (its own included).
pub struct PrefillBackend;

impl Strategy for PrefillBackend {
    fn name(&self) -> &'static str {
        "nsa_prefill_backend"
    }
    fn summary(&self) -> &'static str {
        "sparse prefill over the FP8 cache: dequantize + bf16 sparse kernel, or the FP8 decode kernel"
    }
    fn options(&self) -> &'static [&'static str] {
        &["flashmla_sparse", "flashmla_kv"]
    }
    fn rule_text(&self) -> &'static str {
        "flashmla_sparse if total_kv_tokens < total_q_tokens * 512, else flashmla_kv"
    }
    fn rule(&self, shape: &Problem) -> &'static str {
        if shape.dim("kv") < shape.dim("q") * 512 {
            "flashmla_sparse"
        } else {
            "flashmla_kv"
        }
    }
    fn grid(&self, tiny: bool) -> Vec<Problem> {
        if tiny {
            return [(2, 256), (8, 512)]
                .map(|(q, kv)| shape(Format::F32, q, kv, 16, 64))
                .into();
        }
        let mut grid = Vec::new();
        for q in [16, 128, 1024] {
            for kv in [8192, 32768, 131072] {
                grid.push(shape(Format::Bf16, q, kv, 128, 2048));
            }
        }
        grid
    }
    fn plan(&self, option: &str, shape: &Problem) -> Vec<Step> {
        let (q, kv, heads, topk) = (shape.dim("q"), shape.dim("kv"), shape.dim("heads"), shape.dim("topk"));
        match option {
            "flashmla_sparse" => vec![
                Step {
                    kernel: &crate::fp8_kv_dequant::Fp8KvDequantize,
                    problem: Problem::new(shape.format, &[("n", kv), ("d_qk", 576), ("token_bytes", 656)], &[]),
                },
                sparse_prefill(shape.format, q, kv, heads, topk),
            ],
            "flashmla_kv" => {
                let pages = kv.div_ceil(PAGE);
                vec![Step {
                    kernel: &crate::sparse_mla_decode::SparseMlaDecode,
                    problem: Problem::new(
                        shape.format,
                        &[
                            ("b", 1),
                            ("s_q", q),
                            ("h_q", heads),
                            ("d_qk", 576),
                            ("d_v", 512),
                            ("pages", pages),
                            ("page_size", PAGE),
                            ("token_bytes", 656),
                            ("max_pages", pages),
                            ("topk", topk),
                        ],
                        &[
                            ("sm_scale", SM_SCALE_MLA),
                            ("logical", 0.0),
                            ("num_splits", 0.0),
                            ("mask", 0.0),
                        ],
                    ),
                }]
            }
            other => unreachable!("nsa_prefill_backend has no option {other}"),
        }
    }
}

/// Short prefills: dense MHA over every token at once (SGLang's `MHA_ONE_SHOT`: the latent cache expanded
/// to per-head K/V by kv_b_proj, then varlen causal attention), or the sparse path (FP8 indexer, top-k,
/// queries absorbed into the latent space, sparse MLA, values projected back out). Both include the
/// projections that differ between them; per-head projections are timed as one GEMM of the same shape
/// (each head's weight is 128 KB, so the batched form moves the same bytes). One sequence of `q` new
/// tokens after a cached prefix of `kv − q`.
pub struct MhaOneShot;

impl Strategy for MhaOneShot {
    fn name(&self) -> &'static str {
        "mha_one_shot"
    }
    fn summary(&self) -> &'static str {
        "short prefill: dense MHA over all tokens in one launch, or indexer + top-k + sparse MLA"
    }
    fn options(&self) -> &'static [&'static str] {
        &["mha_one_shot", "sparse"]
    }
    fn rule_text(&self) -> &'static str {
        "mha_one_shot if the sequence (cached prefix + new tokens) has at most 2048 tokens, else sparse"
    }
    fn rule(&self, shape: &Problem) -> &'static str {
        if shape.dim("kv") <= 2048 {
            "mha_one_shot"
        } else {
            "sparse"
        }
    }
    fn grid(&self, tiny: bool) -> Vec<Problem> {
        if tiny {
            return [(4, 64), (16, 128)]
                .map(|(q, kv)| shape(Format::F32, q, kv, 16, 64))
                .into();
        }
        let mut grid = Vec::new();
        for q in [256, 1024, 2048] {
            for kv in [1024, 2048, 4096, 8192] {
                if q <= kv {
                    grid.push(shape(Format::Bf16, q, kv, 128, 2048));
                }
            }
        }
        grid
    }
    fn plan(&self, option: &str, shape: &Problem) -> Vec<Step> {
        let (q, kv, heads, topk) = (shape.dim("q"), shape.dim("kv"), shape.dim("heads"), shape.dim("topk"));
        let gemm = |m: usize, n: usize, k: usize| Step {
            kernel: &crate::gemm::Gemm,
            problem: Problem::new(shape.format, &[("m", m), ("n", n), ("k", k)], &[]),
        };
        match option {
            "mha_one_shot" => vec![
                // kv_b_proj: each token's 512-wide latent → 128 nope-K + 128 V per head.
                gemm(kv, heads * 256, 512),
                Step {
                    kernel: &crate::mha_prefill::MhaPrefill,
                    problem: Problem::new(
                        shape.format,
                        &[
                            ("t_q", q),
                            ("t_k", kv),
                            ("h", heads),
                            ("d_qk", 192),
                            ("d_v", 128),
                            ("n_cu", 2),
                        ],
                        &[("sm_scale", SM_SCALE_MHA), ("bench", 1.0)],
                    ),
                },
            ],
            "sparse" => {
                let pages = kv.div_ceil(PAGE);
                vec![
                    Step {
                        kernel: &crate::indexer_fp8::IndexerFp8,
                        problem: Problem::new(
                            Format::F32,
                            &[
                                ("t", q),
                                ("h", 64.min(heads)),
                                ("d", 128),
                                ("b", 1),
                                ("pages", pages),
                                ("page_size", PAGE),
                                ("token_bytes", 132),
                                ("max_pages", pages),
                            ],
                            &[("next_n", q as f64), ("bench", 1.0)],
                        ),
                    },
                    Step {
                        kernel: &crate::topk::TopK,
                        problem: Problem::new(
                            Format::F32,
                            &[("t", q), ("s", pages * PAGE), ("k", topk)],
                            &[("data", 3.0)],
                        ),
                    },
                    // q absorption (q_nope · W_UK per head) and the output's W_UV.
                    gemm(q * heads, 512, 128),
                    sparse_prefill(shape.format, q, kv, heads, topk),
                    gemm(q * heads, 128, 512),
                ]
            }
            other => unreachable!("mha_one_shot has no option {other}"),
        }
    }
}
