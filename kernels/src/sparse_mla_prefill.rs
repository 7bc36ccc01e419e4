//! Sparse MLA prefill (FlashMLA `flash_mla_sparse_fwd` semantics).
//!
//! For each query token t and head h, over the valid entries i of indices[t, :] (0 ≤ i < s_kv):
//!   S_i = sm_scale · q[t, h, :] · kv[i, :]            (d_qk = 576: 512 latent + 64 rope)
//!   out[t, h, :] = Σ_i softmax(S)_i · kv[i, :d_v]      (d_v = 512: V is the latent part of kv)
//!   lse[t, h] = log Σ_i exp(S_i) (natural), max_logit[t, h] = max_i S_i
//! A row with no valid index gives out = 0, lse = +∞, max_logit = −∞. q, kv, out in bf16 or f32.
//! Tolerances (FlashMLA's tests): out 8e-4 (plus bf16 output rounding, 2⁻⁹ relative), lse 1e-5.
//! Variant `simt_h{HB}`: a cube holds HB heads of one token; per block of BI indices it gathers the kv rows
//! into shared memory, computes the HB×BI scores, updates each head's online softmax, and accumulates
//! P·V into per-unit registers (each unit owns d_v / 128 output columns of every head). Scalar FMAs, no
//! tensor cores yet.
use crate::launch::{buffer, grid, ir_props, ir_settings, slice_arg};
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::{pack, unpack};
use rand::Rng;
use rand::seq::SliceRandom;

const UNITS: u32 = 128;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "simt_h16",
        summary: "16 heads per cube, 8 indices per block",
        needs_plane_ops: false,
    },
    Variant {
        name: "simt_h8",
        summary: "8 heads per cube, 16 indices per block",
        needs_plane_ops: false,
    },
];

/// (heads per cube, indices per block) of a variant.
fn tiles(variant: &Variant) -> (u32, u32) {
    match variant.name {
        "simt_h16" => (16, 8),
        _ => (8, 16),
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sparse_mla_prefill_kernel(
    q: &[u32],
    kv: &[u32],
    indices: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    s_q: usize,
    h_q: usize,
    s_kv: usize,
    topk: usize,
    sm_scale: f32,
    #[comptime] heads: u32,
    #[comptime] block: u32,
    #[comptime] d_qk: u32,
    #[comptime] d_v: u32,
    #[comptime] format: Format,
) {
    let per_word = comptime!(format.per_word());
    let qk_words = comptime!(d_qk / per_word) as usize;
    let v_words_per_unit = comptime!(d_v / per_word / UNITS);
    let head_blocks = h_q / heads as usize;
    let token = CUBE_POS / head_blocks;
    let head0 = (CUBE_POS % head_blocks) * heads as usize;
    let unit = UNIT_POS as usize;
    // The grid is rounded up to whole rows of 65535 cubes: cubes past the last token do nothing.
    if token >= s_q {
        terminate!();
    }

    let mut kv_smem = Shared::<[u32]>::new_slice(comptime!((block * d_qk / per_word) as usize));
    let mut valid_smem = Shared::<[u32]>::new_slice(block as usize);
    // Scores, then probabilities, of the block: [heads, block].
    let mut p_smem = Shared::<[f32]>::new_slice(comptime!((heads * block) as usize));
    // Per head: running max, running sum, and this block's rescale factor.
    let mut m_smem = Shared::<[f32]>::new_slice(heads as usize);
    let mut l_smem = Shared::<[f32]>::new_slice(heads as usize);
    let mut alpha_smem = Shared::<[f32]>::new_slice(heads as usize);
    // acc_o[head][word][lane]: this unit's output columns.
    let mut acc_o = Array::<f32>::new(comptime!((heads * v_words_per_unit * per_word) as usize));
    #[unroll]
    for i in 0..comptime!(heads * v_words_per_unit * per_word) {
        acc_o[i as usize] = 0.0f32;
    }
    if unit < heads as usize {
        // −2³⁰ rather than −∞: exp(m_old − m_new) stays finite while no index was valid.
        m_smem[unit] = -1073741824.0f32;
        l_smem[unit] = 0.0f32;
    }

    let mut start = 0usize;
    while start < topk {
        // Gather: kv rows of this block's indices into shared memory (invalid → flagged, not loaded).
        let mut i = unit;
        while i < comptime!((block * d_qk / per_word) as usize) {
            let slot = i / qk_words;
            let mut word = 0u32;
            if start + slot < topk {
                let index = indices[token * topk + start + slot];
                if index >= 0 && (index as usize) < s_kv {
                    word = kv[index as usize * qk_words + i % qk_words];
                }
            }
            kv_smem[i] = word;
            i += UNITS as usize;
        }
        if unit < block as usize {
            let mut valid = 0u32;
            if start + unit < topk {
                let index = indices[token * topk + start + unit];
                valid = u32::cast_from(index >= 0 && (index as usize) < s_kv);
            }
            valid_smem[unit] = valid;
        }
        sync_cube();

        // S = sm_scale · Q·Kᵀ for the block: one (head, slot) pair per unit and step.
        let mut pair = unit;
        while pair < comptime!((heads * block) as usize) {
            let head = pair / block as usize;
            let slot = pair % block as usize;
            let q_base = (token * h_q + head0 + head) * qk_words;
            let mut dot = 0.0f32;
            for w in 0..qk_words {
                let qw = q[q_base + w];
                let kw = kv_smem[slot * qk_words + w];
                dot += unpack(qw, 0u32, format) * unpack(kw, 0u32, format);
                if comptime!(per_word == 2) {
                    dot += unpack(qw, 1u32, format) * unpack(kw, 1u32, format);
                }
            }
            p_smem[pair] = dot * sm_scale;
            pair += UNITS as usize;
        }
        sync_cube();

        // Online softmax per head: new max, rescale factor, P = exp(S − m) on valid slots.
        if unit < heads as usize {
            let m_old = m_smem[unit];
            let mut m_new = m_old;
            #[unroll]
            for slot in 0..block {
                if valid_smem[slot as usize] == 1 {
                    m_new = f32::max(m_new, p_smem[unit * block as usize + slot as usize]);
                }
            }
            let alpha = f32::exp(m_old - m_new);
            let mut sum = 0.0f32;
            #[unroll]
            for slot in 0..block {
                let index = unit * block as usize + slot as usize;
                let p = select(valid_smem[slot as usize] == 1, f32::exp(p_smem[index] - m_new), 0.0f32);
                p_smem[index] = p;
                sum += p;
            }
            m_smem[unit] = m_new;
            l_smem[unit] = l_smem[unit] * alpha + sum;
            alpha_smem[unit] = alpha;
        }
        sync_cube();

        // O = O·alpha + P·V on this unit's columns.
        #[unroll]
        for head in 0..heads {
            let alpha = alpha_smem[head as usize];
            #[unroll]
            for vw in 0..v_words_per_unit {
                let word = unit + (vw * UNITS) as usize;
                #[unroll]
                for lane in 0..per_word {
                    let a = ((head * v_words_per_unit + vw) * per_word + lane) as usize;
                    let mut value = acc_o[a] * alpha;
                    #[unroll]
                    for slot in 0..block {
                        let v = unpack(kv_smem[slot as usize * qk_words + word], lane, format);
                        value += p_smem[(head * block + slot) as usize] * v;
                    }
                    acc_o[a] = value;
                }
            }
        }
        sync_cube();
        start += block as usize;
    }

    // out = O / l; an empty row (l = 0) gives 0, lse +∞ and max logit −∞.
    let v_words = comptime!(d_v / per_word) as usize;
    #[unroll]
    for head in 0..heads {
        let l = l_smem[head as usize];
        let inv_l = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
        let row = token * h_q + head0 + head as usize;
        #[unroll]
        for vw in 0..v_words_per_unit {
            let a = ((head * v_words_per_unit + vw) * per_word) as usize;
            let mut hi = 0.0f32;
            if comptime!(per_word == 2) {
                hi = acc_o[a + 1] * inv_l;
            }
            out[row * v_words + unit + (vw * UNITS) as usize] = pack(acc_o[a] * inv_l, hi, format);
        }
        if unit == 0 {
            let empty = l == 0.0f32;
            lse[row] = select(
                empty,
                f32::reinterpret(0x7f80_0000u32),
                m_smem[head as usize] + f32::ln(l),
            );
            max_logit[row] = select(empty, f32::reinterpret(0xff80_0000u32), m_smem[head as usize]);
        }
    }
}

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
        VARIANTS
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
        let invalid = |field, expected: &str, got: usize| KernelError::InvalidProblem {
            kernel: "sparse_mla_prefill",
            field,
            expected: expected.into(),
            got: got.to_string(),
        };
        if problem.dim("d_qk") != 576 {
            return Err(invalid("d_qk", "576 (512 latent + 64 rope)", problem.dim("d_qk")));
        }
        if problem.dim("d_v") != 512 {
            return Err(invalid("d_v", "512", problem.dim("d_v")));
        }
        if problem.dim("h_q") == 0 || problem.dim("h_q") % 16 != 0 {
            return Err(invalid("h_q", "a multiple of 16", problem.dim("h_q")));
        }
        Ok(())
    }
    fn shared_memory_bytes(&self, variant: &Variant, problem: &Problem) -> usize {
        let (heads, block) = tiles(variant);
        let per_word = problem.format.per_word() as usize;
        // kv rows (words), valid flags, P, and three per-head floats.
        4 * (block as usize * 576 / per_word + block as usize + (heads * block) as usize + 3 * heads as usize)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        // FlashMLA's count: 2·h_q·Σtopk·(d_qk + d_v).
        (2 * problem.dim("h_q") * problem.dim("s_q") * problem.dim("topk") * (problem.dim("d_qk") + problem.dim("d_v")))
            as u64
    }
    fn tolerance(&self, output: &TensorSpec, problem: &Problem) -> f64 {
        match (output.name, problem.format) {
            ("out", Format::Bf16) => 8e-4 + 1.0 / 512.0,
            ("out", Format::F32) => 8e-4,
            _ => 1e-5,
        }
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
        let (s_q, h_q, s_kv, topk) = (
            problem.dim("s_q"),
            problem.dim("h_q"),
            problem.dim("s_kv"),
            problem.dim("topk"),
        );
        let (d_qk, d_v) = (problem.dim("d_qk"), problem.dim("d_v"));
        let scale = problem.param("sm_scale");
        let (q, kv, indices) = (inputs[0].to_f64(), inputs[1].to_f64(), inputs[2].to_f64());
        let (mut out, mut lse, mut max_logit) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..s_q {
            let valid: Vec<usize> = indices[t * topk..][..topk]
                .iter()
                .filter(|i| **i >= 0.0 && (**i as usize) < s_kv)
                .map(|i| *i as usize)
                .collect();
            for h in 0..h_q {
                let q_row = &q[(t * h_q + h) * d_qk..][..d_qk];
                let scores: Vec<f64> = valid
                    .iter()
                    .map(|&i| {
                        scale
                            * q_row
                                .iter()
                                .zip(&kv[i * d_qk..][..d_qk])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let l: f64 = weights.iter().sum();
                for d in 0..d_v {
                    let o: f64 = valid.iter().zip(&weights).map(|(&i, w)| w * kv[i * d_qk + d]).sum();
                    out.push(if valid.is_empty() { 0.0 } else { o / l });
                }
                lse.push(if valid.is_empty() { f64::INFINITY } else { m + l.ln() });
                max_logit.push(m);
            }
        }
        vec![out, lse, max_logit]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        let (heads, block) = tiles(variant);
        let (s_q, h_q, s_kv, topk) = (
            problem.dim("s_q"),
            problem.dim("h_q"),
            problem.dim("s_kv"),
            problem.dim("topk"),
        );
        let per_word = problem.format.per_word() as usize;
        sparse_mla_prefill_kernel::launch(
            &device.client,
            grid(s_q * h_q / heads as usize),
            CubeDim::new_1d(UNITS),
            buffer(&inputs[0], s_q * h_q * 576 / per_word),
            buffer(&inputs[1], s_kv * 576 / per_word),
            buffer(&inputs[2], s_q * topk),
            buffer(&outputs[0], s_q * h_q * 512 / per_word),
            buffer(&outputs[1], s_q * h_q),
            buffer(&outputs[2], s_q * h_q),
            s_q,
            h_q,
            s_kv,
            topk,
            problem.param("sm_scale") as f32,
            heads,
            block,
            576,
            512,
            problem.format,
        );
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        let (heads, block) = tiles(variant);
        let (props, target_props) = ir_props(target);
        sparse_mla_prefill_kernel::SparseMlaPrefillKernel::new(
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
            (),
            heads,
            block,
            576,
            512,
            problem.format,
        )
        .define()
    }
}
