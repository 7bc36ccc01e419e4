//! The model's plain-Rust reference: DeepSeek-V3.2's prefill in f64 on the host, written from the math (as
//! each kernel has an f64 reference beside it). The oracle the device model is checked against, and a way
//! to run any checkpoint small enough for a CPU. Dense MHA form of MLA with the indexer's top-k mask;
//! generation recomputes the whole sequence per token (the golden data shows it equals the cached path).
use crate::checkpoint::expected_tensors;
use crate::{Checkpoint, ModelConfig, ModelError};
use std::collections::HashMap;
use std::path::Path;

pub struct ReferenceModel {
    pub config: ModelConfig,
    /// Emulate bf16 inference: every linear, norm and attention output and the residual stream rounded to
    /// bf16 (products and sums stay exact, as tensor cores accumulate in f32); else all f64.
    pub bf16: bool,
    weights: HashMap<String, Vec<f64>>,
    /// Rotary inverse frequencies (YaRN-scaled when the config says so), one per rotated pair.
    inv_freq: Vec<f64>,
}

/// What one prefill computes, for checking against other implementations.
pub struct Forward {
    /// [n, vocab]
    pub logits: Vec<f64>,
    /// Per layer: the residual stream after it, [n, hidden].
    pub layer_out: Vec<Vec<f64>>,
    /// Per layer: the indexer's chosen keys per row, [n, index_topk], −1 padded, ascending.
    pub index_topk: Vec<Vec<i32>>,
    /// Per MoE layer (None for dense ones): the router's experts per row, [n, top_k], ascending.
    pub router_topk_ids: Vec<Option<Vec<i32>>>,
}

/// x [n, k] · w [m, k]ᵀ → [n, m].
pub(crate) fn linear(x: &[f64], w: &[f64], k: usize) -> Vec<f64> {
    let m = w.len() / k;
    let mut out = Vec::with_capacity(x.len() / k * m);
    for row in x.chunks(k) {
        out.extend((0..m).map(|j| row.iter().zip(&w[j * k..][..k]).map(|(a, b)| a * b).sum::<f64>()));
    }
    out
}

/// The greedy token: the largest logit (the lower id on a tie).
pub fn argmax(logits: &[f64]) -> u32 {
    (0..logits.len())
        .max_by(|a, b| logits[*a].total_cmp(&logits[*b]).then(b.cmp(a)))
        .expect("logits") as u32
}

/// The `k` best-scored positions (ties to the earlier one), ascending.
pub(crate) fn top_keys(mut scored: Vec<(f64, usize)>, k: usize) -> Vec<i32> {
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut keys: Vec<i32> = scored.iter().take(k).map(|(_, t)| *t as i32).collect();
    keys.sort();
    keys
}

pub(crate) fn rms_norm(x: &[f64], weight: &[f64], eps: f64) -> Vec<f64> {
    let d = weight.len();
    x.chunks(d)
        .flat_map(|row| {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            row.iter().zip(weight).map(move |(v, w)| v * inv * w)
        })
        .collect()
}

pub(crate) fn layer_norm(x: &[f64], weight: &[f64], bias: &[f64], eps: f64) -> Vec<f64> {
    let d = weight.len();
    x.chunks(d)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter()
                .zip(weight)
                .zip(bias)
                .map(move |((v, w), b)| (v - mean) * inv * w + b)
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// YaRN inverse frequencies (transformers' `_compute_yarn_parameters`, truncated correction range); plain
/// RoPE without YaRN.
pub(crate) fn inv_freq(config: &ModelConfig) -> Vec<f64> {
    let dim = config.qk_rope_head_dim;
    let base = config.rope_theta;
    let plain: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
        .collect();
    let Some(y) = &config.yarn else { return plain };
    let original = y.original_max_position_embeddings as f64;
    let correction =
        |rotations: f64| (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
    let low = correction(y.beta_fast).floor().max(0.0);
    let mut high = correction(y.beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    plain
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let extrapolation = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f / y.factor * (1.0 - extrapolation) + f * extrapolation
        })
        .collect()
}

impl ReferenceModel {
    /// Loads `dir` (config.json, weights checked against the config, all read as f64).
    pub fn load(dir: &Path) -> Result<ReferenceModel, ModelError> {
        let config = ModelConfig::load(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let expected = expected_tensors(&config);
        checkpoint.check_against(&expected)?;
        let weights = checkpoint
            .load_all(&expected)?
            .into_iter()
            .map(|(n, v)| (n, v.into_iter().map(f64::from).collect()))
            .collect();
        let inv_freq = inv_freq(&config);
        Ok(ReferenceModel {
            config,
            bf16: false,
            weights,
            inv_freq,
        })
    }

    /// Rounds `values` to bf16 when emulating bf16 inference.
    pub(crate) fn round(&self, values: &mut [f64]) {
        if self.bf16 {
            values.iter_mut().for_each(|v| *v = half::bf16::from_f64(*v).to_f64());
        }
    }

    pub(crate) fn linear(&self, x: &[f64], w: &[f64], k: usize) -> Vec<f64> {
        let mut out = linear(x, w, k);
        self.round(&mut out);
        out
    }

    pub(crate) fn rms_norm(&self, x: &[f64], weight: &[f64], eps: f64) -> Vec<f64> {
        let mut out = rms_norm(x, weight, eps);
        self.round(&mut out);
        out
    }

    pub(crate) fn layer_norm(&self, x: &[f64], weight: &[f64], bias: &[f64], eps: f64) -> Vec<f64> {
        let mut out = layer_norm(x, weight, bias, eps);
        self.round(&mut out);
        out
    }

    pub(crate) fn w(&self, name: &str) -> &[f64] {
        &self.weights[name]
    }

    /// Rotation angles per position and pair, rounded through f32 as torch computes them.
    fn angles(&self, position: usize) -> Vec<f64> {
        self.inv_freq
            .iter()
            .map(|f| (position as f32 * *f as f32) as f64)
            .collect()
    }

    /// Rotates `x[offset..offset + rope]` in place: interleaved pairs (2i, 2i+1), or NeoX halves (i, i + rope/2).
    pub(crate) fn rope(&self, x: &mut [f64], offset: usize, position: usize, interleaved: bool) {
        let half = self.config.qk_rope_head_dim / 2;
        for (i, angle) in self.angles(position).iter().enumerate() {
            let (a, b) = if interleaved {
                (offset + 2 * i, offset + 2 * i + 1)
            } else {
                (offset + i, offset + i + half)
            };
            let (cos, sin) = (angle.cos(), angle.sin());
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * cos - x1 * sin;
            x[b] = x1 * cos + x0 * sin;
        }
    }

    /// One indexer score: Σ_h relu(q_h · k · d^−½) · w_h · H^−½ for a query's heads `q` [H, d] and weights
    /// `w` [H] against key `k` [d].
    pub(crate) fn index_score(&self, q: &[f64], k: &[f64], w: &[f64]) -> f64 {
        let (heads, d) = (w.len(), k.len());
        let (scale, head_scale) = ((d as f64).powf(-0.5), (heads as f64).powf(-0.5));
        (0..heads)
            .map(|head| {
                let dot: f64 = q[head * d..][..d].iter().zip(k).map(|(a, b)| a * b).sum();
                (dot * scale).max(0.0) * w[head] * head_scale
            })
            .sum()
    }

    /// The normalized q LoRA output of `h` [n, hidden] (what MLA's q_b_proj and the indexer's wq_b read),
    /// or `h` itself without q LoRA.
    pub(crate) fn q_lora(&self, p: &str, h: &[f64]) -> Vec<f64> {
        let c = &self.config;
        match c.q_lora_rank {
            Some(_) => self.rms_norm(
                &self.linear(h, self.w(&format!("{p}.self_attn.q_a_proj.weight")), c.hidden_size),
                self.w(&format!("{p}.self_attn.q_a_layernorm.weight")),
                c.rms_norm_eps,
            ),
            None => h.to_vec(),
        }
    }

    /// The layer's second half on the residual stream `x` [n, hidden]: post-attention norm, dense MLP or
    /// MoE, residual add; returns the router's experts for a MoE layer.
    pub(crate) fn ffn(&self, layer: usize, x: &mut [f64], n: usize) -> Option<Vec<i32>> {
        let c = &self.config;
        let p = format!("model.layers.{layer}");
        let h = self.rms_norm(
            x,
            self.w(&format!("{p}.post_attention_layernorm.weight")),
            c.rms_norm_eps,
        );
        let (out, router) = if c.is_moe_layer(layer) {
            let (out, ids) = self.moe(&p, &h, n);
            (out, Some(ids))
        } else {
            (self.mlp(&format!("{p}.mlp"), &h, c.intermediate_size), None)
        };
        x.iter_mut().zip(&out).for_each(|(x, m)| *x += m);
        self.round(x);
        router
    }

    /// Final norm and LM head: logits [n, vocab] of the residual stream `x`.
    pub(crate) fn lm_logits(&self, x: &[f64]) -> Vec<f64> {
        let c = &self.config;
        let normed = self.rms_norm(x, self.w("model.norm.weight"), c.rms_norm_eps);
        let head = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.linear(&normed, self.w(head), c.hidden_size)
    }

    /// The lightning indexer's keys per row: the top `index_topk` causal positions by
    /// Σ_h relu(q_h · k · d^−½) · w_h · H^−½ (all causal positions when there are fewer).
    fn indexer(&self, p: &str, h: &[f64], q_lora: &[f64], n: usize) -> Vec<i32> {
        let c = &self.config;
        let (heads, d, hidden) = (c.index_n_heads, c.index_head_dim, c.hidden_size);
        let q_in = q_lora.len() / n;
        let mut q = self.linear(q_lora, self.w(&format!("{p}.self_attn.indexer.wq_b.weight")), q_in);
        let k_raw = self.linear(h, self.w(&format!("{p}.self_attn.indexer.wk.weight")), hidden);
        let mut k = self.layer_norm(
            &k_raw,
            self.w(&format!("{p}.self_attn.indexer.k_norm.weight")),
            self.w(&format!("{p}.self_attn.indexer.k_norm.bias")),
            1e-6,
        );
        let weights = self.linear(h, self.w(&format!("{p}.self_attn.indexer.weights_proj.weight")), hidden);
        for t in 0..n {
            for head in 0..heads {
                self.rope(&mut q[(t * heads + head) * d..][..d], 0, t, false);
            }
            self.rope(&mut k[t * d..][..d], 0, t, false);
        }
        let mut chosen = vec![-1i32; n * c.index_topk];
        for s in 0..n {
            let (q_s, w_s) = (&q[s * heads * d..][..heads * d], &weights[s * heads..][..heads]);
            let scored: Vec<(f64, usize)> = (0..=s)
                .map(|t| (self.index_score(q_s, &k[t * d..][..d], w_s), t))
                .collect();
            let keys = top_keys(scored, c.index_topk);
            chosen[s * c.index_topk..][..keys.len()].copy_from_slice(&keys);
        }
        chosen
    }

    /// MLA in the MHA form over the indexer's keys (`q_lora`: the normalized q LoRA output, or the hidden
    /// state without q LoRA); returns the attention output projected by o_proj.
    fn attention(&self, p: &str, h: &[f64], q_lora: &[f64], n: usize, keys: &[i32]) -> Vec<f64> {
        let c = &self.config;
        let (hidden, heads, nope, rope, v_dim) = (
            c.hidden_size,
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        );
        let qk = nope + rope;
        let q_in = q_lora.len() / n;
        let q_name = if c.q_lora_rank.is_some() { "q_b_proj" } else { "q_proj" };
        let mut q = self.linear(q_lora, self.w(&format!("{p}.self_attn.{q_name}.weight")), q_in);
        let kv_a = self.linear(h, self.w(&format!("{p}.self_attn.kv_a_proj_with_mqa.weight")), hidden);
        let width = c.kv_lora_rank + rope;
        let latent: Vec<f64> = kv_a.chunks(width).flat_map(|r| r[..c.kv_lora_rank].to_vec()).collect();
        let mut k_pe: Vec<f64> = kv_a.chunks(width).flat_map(|r| r[c.kv_lora_rank..].to_vec()).collect();
        let kv = self.linear(
            &self.rms_norm(
                &latent,
                self.w(&format!("{p}.self_attn.kv_a_layernorm.weight")),
                c.rms_norm_eps,
            ),
            self.w(&format!("{p}.self_attn.kv_b_proj.weight")),
            c.kv_lora_rank,
        );
        for t in 0..n {
            for head in 0..heads {
                self.rope(&mut q[(t * heads + head) * qk..][..qk], nope, t, true);
            }
            self.rope(&mut k_pe[t * rope..][..rope], 0, t, true);
        }
        let scale = c.softmax_scale();
        let mut out = vec![0.0; n * heads * v_dim];
        for s in 0..n {
            let allowed: Vec<usize> = keys[s * c.index_topk..][..c.index_topk]
                .iter()
                .filter(|k| **k >= 0)
                .map(|k| *k as usize)
                .collect();
            for head in 0..heads {
                let qh = &q[(s * heads + head) * qk..][..qk];
                let logits: Vec<f64> = allowed
                    .iter()
                    .map(|&t| {
                        let kv_t = &kv[(t * heads + head) * (nope + v_dim)..];
                        let dot_nope: f64 = qh[..nope].iter().zip(&kv_t[..nope]).map(|(a, b)| a * b).sum();
                        let dot_rope: f64 = qh[nope..]
                            .iter()
                            .zip(&k_pe[t * rope..][..rope])
                            .map(|(a, b)| a * b)
                            .sum();
                        (dot_nope + dot_rope) * scale
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                let o = &mut out[(s * heads + head) * v_dim..][..v_dim];
                for (&t, e) in allowed.iter().zip(&exps) {
                    let v = &kv[(t * heads + head) * (nope + v_dim) + nope..][..v_dim];
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += e / sum * v;
                    }
                }
            }
        }
        self.round(&mut out);
        self.linear(&out, self.w(&format!("{p}.self_attn.o_proj.weight")), heads * v_dim)
    }

    pub(crate) fn mlp(&self, prefix: &str, x: &[f64], width: usize) -> Vec<f64> {
        let hidden = self.config.hidden_size;
        let gate = self.linear(x, self.w(&format!("{prefix}.gate_proj.weight")), hidden);
        let up = self.linear(x, self.w(&format!("{prefix}.up_proj.weight")), hidden);
        let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        self.linear(&act, self.w(&format!("{prefix}.down_proj.weight")), width)
    }

    /// The noaux_tc router and the experts: returns the layer's MLP output and the chosen experts.
    pub(crate) fn moe(&self, p: &str, x: &[f64], n: usize) -> (Vec<f64>, Vec<i32>) {
        let c = &self.config;
        let (hidden, experts, top_k) = (c.hidden_size, c.n_routed_experts, c.num_experts_per_tok);
        let logits = self.linear(x, self.w(&format!("{p}.mlp.gate.weight")), hidden);
        let bias = self.w(&format!("{p}.mlp.gate.e_score_correction_bias"));
        let per_group = experts / c.n_group;
        let mut out = vec![0.0; n * hidden];
        let mut chosen_ids = Vec::with_capacity(n * top_k);
        for t in 0..n {
            let scores: Vec<f64> = logits[t * experts..][..experts]
                .iter()
                .map(|l| 1.0 / (1.0 + (-l).exp()))
                .collect();
            let biased: Vec<f64> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
            // A group's score: the sum of its two best biased scores; keep the topk_group best groups.
            let mut groups: Vec<(f64, usize)> = (0..c.n_group)
                .map(|g| {
                    let mut members: Vec<f64> = biased[g * per_group..][..per_group].to_vec();
                    members.sort_by(|a, b| b.total_cmp(a));
                    (members.iter().take(2).sum(), g)
                })
                .collect();
            groups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let kept: Vec<usize> = groups.iter().take(c.topk_group).map(|(_, g)| *g).collect();
            let masked: Vec<f64> = (0..experts)
                .map(|e| {
                    if kept.contains(&(e / per_group)) {
                        biased[e]
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|a, b| masked[*b].total_cmp(&masked[*a]).then(a.cmp(b)));
            let chosen = &order[..top_k];
            let mut weights: Vec<f64> = chosen.iter().map(|e| scores[*e]).collect();
            if c.norm_topk_prob {
                let sum: f64 = weights.iter().sum::<f64>() + 1e-20;
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            let row = &x[t * hidden..][..hidden];
            let o = &mut out[t * hidden..][..hidden];
            for (e, w) in chosen.iter().zip(&weights) {
                let y = self.mlp(&format!("{p}.mlp.experts.{e}"), row, c.moe_intermediate_size);
                for (o, y) in o.iter_mut().zip(&y) {
                    *o += w * c.routed_scaling_factor * y;
                }
            }
            let mut ids: Vec<i32> = chosen.iter().map(|e| *e as i32).collect();
            ids.sort();
            chosen_ids.extend(ids);
        }
        if c.n_shared_experts > 0 {
            let shared = self.mlp(
                &format!("{p}.mlp.shared_experts"),
                x,
                c.moe_intermediate_size * c.n_shared_experts,
            );
            out.iter_mut().zip(&shared).for_each(|(o, s)| *o += s);
        }
        (out, chosen_ids)
    }

    /// One prefill of `ids` from position 0.
    pub fn forward(&self, ids: &[u32]) -> Forward {
        let c = &self.config;
        let (n, hidden) = (ids.len(), c.hidden_size);
        let embed = self.w("model.embed_tokens.weight");
        let mut x: Vec<f64> = ids
            .iter()
            .flat_map(|id| embed[*id as usize * hidden..][..hidden].to_vec())
            .collect();
        let mut result = Forward {
            logits: Vec::new(),
            layer_out: Vec::new(),
            index_topk: Vec::new(),
            router_topk_ids: Vec::new(),
        };
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let h = self.rms_norm(&x, self.w(&format!("{p}.input_layernorm.weight")), c.rms_norm_eps);
            // The indexer reads the normalized q LoRA output, which attention computes first.
            let q_lora = self.q_lora(&p, &h);
            let keys = self.indexer(&p, &h, &q_lora, n);
            let attn = self.attention(&p, &h, &q_lora, n, &keys);
            x.iter_mut().zip(&attn).for_each(|(x, a)| *x += a);
            self.round(&mut x);
            let router = self.ffn(layer, &mut x, n);
            result.layer_out.push(x.clone());
            result.index_topk.push(keys);
            result.router_topk_ids.push(router);
        }
        result.logits = self.lm_logits(&x);
        result
    }

    /// Greedy decoding of `count` tokens after `prompt` (each step a full prefill).
    pub fn generate_greedy(&self, prompt: &[u32], count: usize) -> Vec<u32> {
        let mut ids = prompt.to_vec();
        let vocab = self.config.vocab_size;
        for _ in 0..count {
            let logits = self.forward(&ids).logits;
            ids.push(argmax(&logits[(ids.len() - 1) * vocab..]));
        }
        ids[prompt.len()..].to_vec()
    }
}
