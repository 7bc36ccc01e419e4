//! The reference model's decode path: one token at a time against a cache of what earlier tokens left —
//! per layer the normalized KV latent and the rotated rope key (MLA's absorbed form reads only these), and
//! the indexer's key. Queries are absorbed into the latent space (q_nope · W_UK per head) and the output is
//! lifted back by W_UV, as the device decode kernels compute it; the tests check it against the prefill's
//! MHA form and the golden generations.
use crate::reference::{ReferenceModel, argmax, top_keys};

#[derive(Default, Clone)]
struct LayerCache {
    /// [t, kv_lora_rank]: kv_a_layernorm of the compressed KV.
    latent: Vec<f64>,
    /// [t, qk_rope_head_dim]: the rotated rope key (shared by all heads).
    k_pe: Vec<f64>,
    /// [t, index_head_dim]: the indexer's normalized, rotated key.
    index_k: Vec<f64>,
}

/// What decoding has cached so far, per layer.
#[derive(Clone)]
pub struct LatentCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl LatentCache {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The cached rows of positions `start..end` (a page of a paged cache).
    pub fn slice(&self, start: usize, end: usize) -> LatentCache {
        assert!(
            start <= end && end <= self.len,
            "rows {start}..{end} of a {}-row cache",
            self.len
        );
        let rows = |v: &Vec<f64>| {
            let width = v.len() / self.len.max(1);
            v[start * width..end * width].to_vec()
        };
        LatentCache {
            layers: (self.layers.iter())
                .map(|l| LayerCache {
                    latent: rows(&l.latent),
                    k_pe: rows(&l.k_pe),
                    index_k: rows(&l.index_k),
                })
                .collect(),
            len: end - start,
        }
    }

    /// `parts`' rows one after another (pages joined back into a sequence's cache).
    pub fn concat(parts: &[LatentCache]) -> LatentCache {
        let layers = parts.first().map_or(0, |p| p.layers.len());
        LatentCache {
            layers: (0..layers)
                .map(|l| LayerCache {
                    latent: parts.iter().flat_map(|p| p.layers[l].latent.iter().copied()).collect(),
                    k_pe: parts.iter().flat_map(|p| p.layers[l].k_pe.iter().copied()).collect(),
                    index_k: parts.iter().flat_map(|p| p.layers[l].index_k.iter().copied()).collect(),
                })
                .collect(),
            len: parts.iter().map(|p| p.len).sum(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl ReferenceModel {
    pub fn new_cache(&self) -> LatentCache {
        LatentCache {
            layers: vec![LayerCache::default(); self.config.num_hidden_layers],
            len: 0,
        }
    }

    /// Appends token `id` at position `cache.len()`; returns its logits [vocab].
    pub fn decode_step(&self, cache: &mut LatentCache, id: u32) -> Vec<f64> {
        let c = &self.config;
        let (hidden, s) = (c.hidden_size, cache.len);
        let mut x = self.w("model.embed_tokens.weight")[id as usize * hidden..][..hidden].to_vec();
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let lc = &mut cache.layers[layer];
            let h = self.rms_norm(&x, self.w(&format!("{p}.input_layernorm.weight")), c.rms_norm_eps);
            let q_lora = self.q_lora(&p, &h);
            let q_in = q_lora.len();

            // The indexer: this token's key joins the cache; its query scores every cached key.
            let (ih, d) = (c.index_n_heads, c.index_head_dim);
            let mut q_idx = self.linear(&q_lora, self.w(&format!("{p}.self_attn.indexer.wq_b.weight")), q_in);
            for head in 0..ih {
                self.rope(&mut q_idx[head * d..][..d], 0, s, false);
            }
            let mut k_idx = self.layer_norm(
                &self.linear(&h, self.w(&format!("{p}.self_attn.indexer.wk.weight")), hidden),
                self.w(&format!("{p}.self_attn.indexer.k_norm.weight")),
                self.w(&format!("{p}.self_attn.indexer.k_norm.bias")),
                1e-6,
            );
            self.rope(&mut k_idx, 0, s, false);
            lc.index_k.extend(&k_idx);
            let weights = self.linear(
                &h,
                self.w(&format!("{p}.self_attn.indexer.weights_proj.weight")),
                hidden,
            );
            let scored: Vec<(f64, usize)> = (0..=s)
                .map(|t| (self.index_score(&q_idx, &lc.index_k[t * d..][..d], &weights), t))
                .collect();
            let keys = top_keys(scored, c.index_topk);

            // MLA, absorbed: the latent and rope key join the cache.
            let (heads, nope, rope, v_dim, rank) = (
                c.num_attention_heads,
                c.qk_nope_head_dim,
                c.qk_rope_head_dim,
                c.v_head_dim,
                c.kv_lora_rank,
            );
            let qk = nope + rope;
            let q_name = if c.q_lora_rank.is_some() { "q_b_proj" } else { "q_proj" };
            let mut q = self.linear(&q_lora, self.w(&format!("{p}.self_attn.{q_name}.weight")), q_in);
            for head in 0..heads {
                self.rope(&mut q[head * qk..][..qk], nope, s, true);
            }
            let kv_a = self.linear(&h, self.w(&format!("{p}.self_attn.kv_a_proj_with_mqa.weight")), hidden);
            lc.latent.extend(self.rms_norm(
                &kv_a[..rank],
                self.w(&format!("{p}.self_attn.kv_a_layernorm.weight")),
                c.rms_norm_eps,
            ));
            let mut k_pe = kv_a[rank..].to_vec();
            self.rope(&mut k_pe, 0, s, true);
            lc.k_pe.extend(&k_pe);
            // kv_b_proj [heads · (nope + v), rank]: per head W_UK (nope rows), then W_UV (v rows).
            let w_kv = self.w(&format!("{p}.self_attn.kv_b_proj.weight"));
            let softmax_scale = c.softmax_scale();
            let mut out = vec![0.0; heads * v_dim];
            for head in 0..heads {
                let rows = &w_kv[head * (nope + v_dim) * rank..];
                let q_head = &q[head * qk..][..qk];
                let q_latent: Vec<f64> = (0..rank)
                    .map(|r| (0..nope).map(|i| q_head[i] * rows[i * rank + r]).sum())
                    .collect();
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|&t| {
                        let t = t as usize;
                        let latent: f64 = q_latent
                            .iter()
                            .zip(&lc.latent[t * rank..][..rank])
                            .map(|(a, b)| a * b)
                            .sum();
                        let pe: f64 = q_head[nope..]
                            .iter()
                            .zip(&lc.k_pe[t * rope..][..rope])
                            .map(|(a, b)| a * b)
                            .sum();
                        (latent + pe) * softmax_scale
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                let mut out_latent = vec![0.0; rank];
                for (&t, e) in keys.iter().zip(&exps) {
                    for (o, l) in out_latent.iter_mut().zip(&lc.latent[t as usize * rank..][..rank]) {
                        *o += e / sum * l;
                    }
                }
                for j in 0..v_dim {
                    let w_uv = &rows[(nope + j) * rank..][..rank];
                    out[head * v_dim + j] = w_uv.iter().zip(&out_latent).map(|(a, b)| a * b).sum();
                }
            }
            self.round(&mut out);
            let attn = self.linear(&out, self.w(&format!("{p}.self_attn.o_proj.weight")), heads * v_dim);
            x.iter_mut().zip(&attn).for_each(|(x, a)| *x += a);
            self.round(&mut x);
            self.ffn(layer, &mut x, 1);
        }
        cache.len += 1;
        self.lm_logits(&x)
    }

    /// Greedy decoding through the cache: the prompt token by token, then `count` new tokens.
    pub fn generate_greedy_cached(&self, prompt: &[u32], count: usize) -> Vec<u32> {
        let mut cache = self.new_cache();
        let mut logits = Vec::new();
        for id in prompt {
            logits = self.decode_step(&mut cache, *id);
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let next = argmax(&logits);
            out.push(next);
            logits = self.decode_step(&mut cache, next);
        }
        out
    }
}
