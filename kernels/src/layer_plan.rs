//! One DeepSeek-V3.2 decoder layer (DSA attention + MoE) as the chain of nsa kernel launches a prefill of
//! `q` new tokens over a context of `kv` tokens runs ([`prefill_layer`]), or a decode step of a batch over
//! the paged FP8 caches ([`decode_layer`]), grouped as the time split `nsa bench-layer` reports:
//! projections (the dense linear layers), indexer (its projections and logits over the context), top-k,
//! attention (q absorption, sparse MLA, W_UV) and MoE (router, 256 routed experts, shared expert).
//! Norms and RoPE (< 1 % of the layer) are left out.
use crate::strategy::Step;
use crate::{Kernel, Problem};
use nsa_dsl::Format;

/// The dimensions that set a layer's cost.
#[derive(Clone, Copy, Debug)]
pub struct LayerShape {
    pub name: &'static str,
    pub hidden: usize,
    pub q_lora: usize,
    pub heads: usize,
    pub nope: usize,
    pub v: usize,
    pub index_heads: usize,
    pub index_dim: usize,
    pub topk: usize,
    pub experts: usize,
    pub top_k: usize,
    pub inter: usize,
    pub n_group: usize,
    pub topk_group: usize,
}

/// The sparse MLA kernels' fixed dims: 512 latent + 64 rope.
const LATENT: usize = 512;
const ROPE: usize = 64;

impl LayerShape {
    /// DeepSeek-V3.2's layer (config.json of deepseek-ai/DeepSeek-V3.2).
    pub const V32: LayerShape = LayerShape {
        name: "v32",
        hidden: 7168,
        q_lora: 1536,
        heads: 128,
        nope: 128,
        v: 128,
        index_heads: 64,
        index_dim: 128,
        topk: 2048,
        experts: 256,
        top_k: 8,
        inter: 2048,
        n_group: 8,
        topk_group: 4,
    };
    /// A small layer of the same structure, for runs on software devices (tests).
    pub const SMALL: LayerShape = LayerShape {
        name: "small",
        hidden: 256,
        q_lora: 64,
        heads: 16,
        nope: 32,
        v: 32,
        index_heads: 4,
        index_dim: 32,
        topk: 32,
        experts: 8,
        top_k: 2,
        inter: 64,
        n_group: 4,
        topk_group: 2,
    };
    pub const ALL: [LayerShape; 2] = [LayerShape::V32, LayerShape::SMALL];
}

pub const GROUPS: [&str; 5] = ["projections", "indexer", "top-k", "attention", "moe"];

pub struct LayerStep {
    pub group: &'static str,
    /// What the launch computes (`q_a_proj`, `sparse_mla`).
    pub name: &'static str,
    pub step: Step,
    /// Whether the step's cost depends on the context length (else it is timed once per token count).
    pub per_context: bool,
}

/// Tokens per page of the paged caches.
const PAGE: usize = 64;

/// The layer's launches for one decode step of `batch` sequences with `context` cached tokens each, over
/// DeepSeek's FP8 caches (656-byte latent rows, 132-byte indexer rows): projections and MoE on `batch`
/// tokens, the FP8 indexer and top-k over each sequence's context, sparse MLA decode.
pub fn decode_layer(shape: &LayerShape, format: Format, batch: usize, context: usize) -> Vec<LayerStep> {
    let s = shape;
    let max_pages = context.div_ceil(PAGE);
    let pages = batch * max_pages;
    let mut steps = prefill_layer(shape, format, batch, context);
    let replace = |name: &str, kernel: &'static dyn Kernel, problem: Problem, steps: &mut Vec<LayerStep>| {
        let step = steps.iter_mut().find(|st| st.name == name).expect("a prefill step");
        step.step = Step { kernel, problem };
    };
    replace(
        "indexer_logits",
        &crate::indexer_fp8::IndexerFp8,
        Problem::new(
            Format::F32,
            &[
                ("t", batch),
                ("h", s.index_heads),
                ("d", s.index_dim),
                ("b", batch),
                ("pages", pages),
                ("page_size", PAGE),
                ("token_bytes", s.index_dim + 4),
                ("max_pages", max_pages),
            ],
            &[("next_n", 1.0), ("bench", 1.0)],
        ),
        &mut steps,
    );
    replace(
        "sparse_mla",
        &crate::sparse_mla_decode::SparseMlaDecode,
        Problem::new(
            format,
            &[
                ("b", batch),
                ("s_q", 1),
                ("h_q", s.heads),
                ("d_qk", LATENT + ROPE),
                ("d_v", LATENT),
                ("pages", pages),
                ("page_size", PAGE),
                ("token_bytes", 656),
                ("max_pages", max_pages),
                ("topk", s.topk),
            ],
            &[
                ("sm_scale", ((s.nope + ROPE) as f64).powf(-0.5)),
                ("logical", 0.0),
                ("num_splits", 0.0),
                ("mask", 0.0),
            ],
        ),
        &mut steps,
    );
    steps
}

/// The layer's launches for `q` new tokens over `kv` context tokens, in `format`.
pub fn prefill_layer(shape: &LayerShape, format: Format, q: usize, kv: usize) -> Vec<LayerStep> {
    let s = shape;
    let step = |group, name, kernel: &'static dyn Kernel, problem: Problem, per_context| LayerStep {
        group,
        name,
        step: Step { kernel, problem },
        per_context,
    };
    let gemm = |group, name, m: usize, n: usize, k: usize| {
        let problem = Problem::new(format, &[("m", m), ("n", n), ("k", k)], &[]);
        step(group, name, &crate::gemm::Gemm, problem, false)
    };
    let qk = s.nope + ROPE;
    vec![
        gemm("projections", "q_a_proj", q, s.q_lora, s.hidden),
        gemm("projections", "q_b_proj", q, s.heads * qk, s.q_lora),
        gemm("projections", "kv_a_proj", q, LATENT + ROPE, s.hidden),
        gemm("projections", "o_proj", q, s.hidden, s.heads * s.v),
        gemm("indexer", "wq_b", q, s.index_heads * s.index_dim, s.q_lora),
        gemm("indexer", "wk", q, s.index_dim, s.hidden),
        gemm("indexer", "weights_proj", q, s.index_heads, s.hidden),
        step(
            "indexer",
            "indexer_logits",
            &crate::indexer::IndexerLogits,
            Problem::new(
                format,
                &[("t", q), ("h", s.index_heads), ("d", s.index_dim), ("s", kv)],
                &[],
            ),
            true,
        ),
        step(
            "top-k",
            "topk",
            &crate::topk::TopK,
            // data 3: indexer-like scores (as the strategies use).
            Problem::new(Format::F32, &[("t", q), ("s", kv), ("k", s.topk)], &[("data", 3.0)]),
            true,
        ),
        // q absorption (q_nope · W_UK per head) and the output's W_UV, as one GEMM each (same FLOPs).
        gemm("attention", "q_absorb", q * s.heads, LATENT, s.nope),
        step(
            "attention",
            "sparse_mla",
            &crate::sparse_mla_prefill::SparseMlaPrefill,
            Problem::new(
                format,
                &[
                    ("s_q", q),
                    ("h_q", s.heads),
                    ("s_kv", kv),
                    ("topk", s.topk),
                    ("d_qk", LATENT + ROPE),
                    ("d_v", LATENT),
                ],
                &[("sm_scale", ((qk as f64).powf(-0.5))), ("mask", 0.0)],
            ),
            true,
        ),
        gemm("attention", "w_uv", q * s.heads, s.v, LATENT),
        step(
            "moe",
            "moe_gate",
            &crate::moe_gate::MoeGate,
            Problem::new(
                Format::F32,
                &[("tokens", q), ("experts", s.experts), ("top_k", s.top_k)],
                &[
                    ("n_group", s.n_group as f64),
                    ("topk_group", s.topk_group as f64),
                    ("scaling", 2.5),
                    ("norm", 1.0),
                ],
            ),
            false,
        ),
        gemm("moe", "router", q, s.experts, s.hidden),
        step(
            "moe",
            "moe_experts",
            &crate::moe_experts::MoeExperts,
            Problem::new(
                format,
                &[
                    ("tokens", q),
                    ("hidden", s.hidden),
                    ("inter", s.inter),
                    ("experts", s.experts),
                    ("top_k", s.top_k),
                ],
                &[],
            ),
            false,
        ),
        gemm("moe", "shared_gate_up", q, 2 * s.inter, s.hidden),
        step(
            "moe",
            "shared_silu_mul",
            &crate::silu_mul::SiluMul,
            Problem::new(format, &[("tokens", q), ("d", s.inter)], &[]),
            false,
        ),
        gemm("moe", "shared_down", q, s.hidden, s.inter),
    ]
}
