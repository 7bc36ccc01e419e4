//! DeepSeek-V3.2 prefill on burn tensors on a device (f32): burn's ops for norms, RoPE, the MHA form's
//! softmax attention and the shared expert; nsa's kernels as custom ops (`ops`) for every matmul (exact
//! f32), the indexer's scores and top-k, the absorbed-form sparse MLA prefill, the MoE router and the routed
//! experts. The decode path is `device_decode`.
use crate::checkpoint::expected_tensors;
use crate::device_decode::DeviceCache;
use crate::ops::matmul;
use crate::reference::Forward;
use crate::{Checkpoint, ModelConfig, ModelError};
use burn::tensor::{Bool, Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData, activation};
use std::collections::HashMap;
use std::path::Path;

/// The device type of burn's tensors (for callers without a burn dependency).
pub type BurnDevice = Device;

/// The burn device for `spec`: `wgpu` / `wgpu:0` (burn's default adapter: a GPU, or lavapipe), `cuda[:N]`,
/// `hip[:N]` (also `rocm[:N]`). Burn panics when the runtime's library is missing: check with nsa's
/// device discovery first.
pub fn burn_device(spec: &str) -> Result<Device, String> {
    let (runtime, index) = match spec.split_once(':') {
        Some((runtime, index)) => {
            let index: usize = index
                .parse()
                .map_err(|_| format!("bad device `{spec}`: expected e.g. cuda:0"))?;
            (runtime, index)
        }
        None => (spec, 0),
    };
    match runtime {
        "wgpu" if index == 0 => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        "wgpu" => Err(format!(
            "the device model takes wgpu's default adapter only (wgpu:0); got `{spec}`"
        )),
        "cuda" => Ok(Device::cuda(index)),
        "rocm" | "hip" => Ok(Device::rocm(index)),
        _ => Err(format!(
            "unknown device `{spec}` for the device model; valid: wgpu, cuda[:N], hip[:N]"
        )),
    }
}

/// How the prefill computes attention (SGLang's MHA one-shot vs sparse prefill choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillAttention {
    /// The MHA form (k and v expanded per head by kv_b_proj) under the indexer's mask.
    Mha,
    /// The absorbed form over the indexer's chosen keys through nsa's sparse MLA kernel.
    Sparse,
}

impl PrefillAttention {
    /// SGLang's rule (the `mha_one_shot` strategy's default): MHA for sequences of at most 2048 tokens.
    pub fn rule(tokens: usize) -> PrefillAttention {
        if tokens <= 2048 {
            PrefillAttention::Mha
        } else {
            PrefillAttention::Sparse
        }
    }
}

pub struct DeviceModel {
    pub config: ModelConfig,
    /// The prefill's attention form; `None` follows [`PrefillAttention::rule`].
    pub prefill_attention: Option<PrefillAttention>,
    pub(crate) device: Device,
    /// Per MoE layer prefix: the routed experts' weights stacked as nsa's moe_experts kernel reads them.
    experts: HashMap<String, Experts>,
    /// The same device as nsa's kernels see it (burn's client), for the custom ops.
    pub(crate) kernels: nsa_backends::Device,
    /// Linear weights, transposed to [in, out] once at load; norms and biases as [1, d].
    weights: HashMap<String, Tensor<2>>,
    /// bf16 copies ([`WeightFormat::Bf16`]) of linear weights as the checkpoint's [out, in] in words,
    /// which [`Self::linear`] uses instead (the f32 ones stay: attention reads kv_b_proj's slices).
    bf16_linears: HashMap<String, Tensor<2, Int>>,
    inv_freq: Vec<f64>,
}

/// A MoE layer's routed experts, stacked: w13 [experts, 2·inter, hidden] (gate rows, then up rows) and w2
/// [experts, hidden, inter].
enum Experts {
    F32(Tensor<3>, Tensor<3>),
    /// bf16 pairs in i32 words, rows flattened over the experts: w13 [experts · 2·inter, hidden / 2], w2
    /// [experts · hidden, inter / 2] (half the bytes; the kernel's tensor-core variants run).
    Bf16(Tensor<2, Int>, Tensor<2, Int>),
}

/// How the device model keeps its large weights (`nsa serve --dtype`). `Bf16`: the routed experts, and
/// where the device runs bf16 GEMMs every linear layer but the router, in bf16 (x rounded on the way
/// in, f32 accumulation); norms, embeddings, attention and the router stay f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
}

/// The most queries × keys the decode indexer scores in one pass ([`DeviceModel::index_choose_all`]).
pub const ONE_PASS_SCORES: usize = 1 << 24;

impl DeviceModel {
    pub fn load(dir: &Path, device: &Device) -> Result<DeviceModel, ModelError> {
        let config = ModelConfig::load(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let expected = expected_tensors(&config);
        checkpoint.check_against(&expected)?;
        let mut loaded = checkpoint.load_all(&expected)?;
        let mut weights = HashMap::with_capacity(expected.len());
        for (name, shape) in expected {
            let values = loaded.remove(&name).expect("load_all returns every expected tensor");
            let tensor = match shape.as_slice() {
                [d] => Tensor::<2>::from_data(TensorData::new(values, [1, *d]), device),
                [rows, cols] => Tensor::<2>::from_data(TensorData::new(values, [*rows, *cols]), device).transpose(),
                other => unreachable!("{name}: a weight of rank {}", other.len()),
            };
            weights.insert(name, tensor);
        }
        let mut experts = HashMap::new();
        for layer in (0..config.num_hidden_layers).filter(|l| config.is_moe_layer(*l)) {
            let p = format!("model.layers.{layer}");
            // Linear weights are kept as [in, out] views of the checkpoint's [out, in]: transposed back.
            let stacked = |names: &[&str]| -> Tensor<3> {
                let per_expert: Vec<Tensor<3>> = (0..config.n_routed_experts)
                    .map(|e| {
                        let rows: Vec<Tensor<2>> = names
                            .iter()
                            .map(|n| weights[&format!("{p}.mlp.experts.{e}.{n}.weight")].clone().transpose())
                            .collect();
                        Tensor::cat(rows, 0).unsqueeze::<3>()
                    })
                    .collect();
                Tensor::cat(per_expert, 0)
            };
            let pair = Experts::F32(stacked(&["gate_proj", "up_proj"]), stacked(&["down_proj"]));
            // The stacked copies are the only ones the kernels read: free the per-expert tensors.
            weights.retain(|name, _| !name.starts_with(&format!("{p}.mlp.experts.")));
            experts.insert(p, pair);
        }
        Ok(Self::assemble(config, device, weights, experts))
    }

    /// A model of `config`'s shapes with random weights made on the device (SGLang's `--load-format
    /// dummy`: for benchmarks at shapes no checkpoint is at hand for): linear weights normal with standard
    /// deviation 1/√fan-in (activations keep their scale through the layers), norm weights one, biases
    /// (the router's correction) zero. The routed experts are drawn already stacked, so the largest
    /// models need no second copy. Outputs mean nothing; `seed` makes them repeatable.
    pub fn dummy(config: ModelConfig, device: &Device, seed: u64) -> DeviceModel {
        device.seed(seed);
        let normal = |shape: [usize; 2], fan_in: usize| {
            Tensor::<2>::random(shape, Distribution::Normal(0.0, (fan_in as f64).powf(-0.5)), device)
        };
        let mut weights = HashMap::new();
        let is_routed = |name: &str| name.contains(".mlp.experts.");
        for (name, shape) in expected_tensors(&config).into_iter().filter(|(n, _)| !is_routed(n)) {
            let tensor = match shape.as_slice() {
                [d] if name.ends_with("bias") => Tensor::<2>::zeros([1, *d], device),
                [d] => Tensor::<2>::ones([1, *d], device),
                // [out, in] in the checkpoint, kept as [in, out].
                [rows, cols] => normal([*cols, *rows], *cols),
                other => unreachable!("{name}: a weight of rank {}", other.len()),
            };
            weights.insert(name, tensor);
        }
        let (experts, hidden, inter) = (
            config.n_routed_experts,
            config.hidden_size,
            config.moe_intermediate_size,
        );
        let stacked = |shape: [usize; 3], fan_in: usize| {
            Tensor::<3>::random(shape, Distribution::Normal(0.0, (fan_in as f64).powf(-0.5)), device)
        };
        let experts = (0..config.num_hidden_layers)
            .filter(|l| config.is_moe_layer(*l))
            .map(|layer| {
                let pair = Experts::F32(
                    stacked([experts, 2 * inter, hidden], hidden),
                    stacked([experts, hidden, inter], inter),
                );
                (format!("model.layers.{layer}"), pair)
            })
            .collect();
        Self::assemble(config, device, weights, experts)
    }

    fn assemble(
        config: ModelConfig,
        device: &Device,
        weights: HashMap<String, Tensor<2>>,
        experts: HashMap<String, Experts>,
    ) -> DeviceModel {
        let inv_freq = crate::reference::inv_freq(&config);
        let kernels = crate::ops::kernel_device(&weights["model.embed_tokens.weight"]);
        DeviceModel {
            config,
            prefill_attention: None,
            device: device.clone(),
            experts,
            kernels,
            weights,
            bf16_linears: HashMap::new(),
            inv_freq,
        }
    }

    /// Keeps the large weights in `format` (from f32: bf16 rounds to nearest even; a bf16 checkpoint's
    /// weights stay exact). Experts one layer at a time, so the peak is one layer's second copy.
    pub fn with_weight_format(mut self, format: WeightFormat) -> DeviceModel {
        if format == WeightFormat::Bf16 {
            if crate::ops::runs_bf16_gemm(&self.kernels) {
                let tied = self.config.tie_word_embeddings;
                for (name, w) in &self.weights {
                    let [rows, _] = w.dims();
                    let linear =
                        rows > 1 && !name.ends_with("mlp.gate.weight") && (tied || name != "model.embed_tokens.weight");
                    if linear {
                        let words = crate::ops::bf16_rows(&self.kernels, w.clone().transpose());
                        self.bf16_linears.insert(name.clone(), words);
                    }
                }
            }
            for experts in self.experts.values_mut() {
                if let Experts::F32(w13, w2) = experts {
                    let rows = |w: &Tensor<3>| {
                        let [e, r, c] = w.dims();
                        crate::ops::bf16_rows(&self.kernels, w.clone().reshape([e * r, c]))
                    };
                    *experts = Experts::Bf16(rows(w13), rows(w2));
                }
            }
        }
        self
    }

    pub(crate) fn w(&self, name: &str) -> Tensor<2> {
        self.weights[name].clone()
    }

    pub(crate) fn linear(&self, x: Tensor<2>, name: &str) -> Tensor<2> {
        match self.bf16_linears.get(name) {
            Some(w) => crate::ops::linear_bf16(&self.kernels, x, w),
            None => crate::ops::matmul(x, self.w(name)),
        }
    }

    pub(crate) fn rms_norm(&self, x: Tensor<2>, name: &str) -> Tensor<2> {
        let eps = self.config.rms_norm_eps;
        let inv = x.clone().square().mean_dim(1).add_scalar(eps).sqrt().recip();
        x.mul(inv).mul(self.w(name))
    }

    /// cos and sin [n, pairs] of positions start..start + n (angles computed in f32, as torch does).
    pub(crate) fn cos_sin(&self, start: usize, n: usize) -> (Tensor<2>, Tensor<2>) {
        self.cos_sin_at((start..start + n).collect())
    }

    /// [`Self::cos_sin`] at any positions (one upload each for a whole batch of sequences).
    pub(crate) fn cos_sin_at(&self, positions: Vec<usize>) -> (Tensor<2>, Tensor<2>) {
        let (half, n) = (self.inv_freq.len(), positions.len());
        let angles: Vec<f64> = (positions.into_iter())
            .flat_map(|p| self.inv_freq.iter().map(move |f| (p as f32 * *f as f32) as f64))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
        (
            Tensor::from_data(TensorData::new(cos, [n, half]), &self.device),
            Tensor::from_data(TensorData::new(sin, [n, half]), &self.device),
        )
    }

    /// Rotates x [n, heads, 2·pairs]: interleaved pairs (2i, 2i+1) (the layout comes back interleaved), or
    /// NeoX halves (i, i + pairs).
    pub(crate) fn rope(&self, x: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>, interleaved: bool) -> Tensor<3> {
        let [n, heads, dim] = x.dims();
        let pairs = dim / 2;
        let (cos, sin) = (cos.clone().reshape([n, 1, pairs]), sin.clone().reshape([n, 1, pairs]));
        if interleaved {
            let x = x.reshape([n, heads, pairs, 2]);
            let x0 = x
                .clone()
                .slice([0..n, 0..heads, 0..pairs, 0..1])
                .reshape([n, heads, pairs]);
            let x1 = x.slice([0..n, 0..heads, 0..pairs, 1..2]).reshape([n, heads, pairs]);
            let r0 = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
            let r1 = x1.mul(cos).add(x0.mul(sin));
            Tensor::stack::<4>(vec![r0, r1], 3).reshape([n, heads, dim])
        } else {
            let x0 = x.clone().slice([0..n, 0..heads, 0..pairs]);
            let x1 = x.slice([0..n, 0..heads, pairs..dim]);
            let r0 = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
            let r1 = x1.mul(cos).add(x0.mul(sin));
            Tensor::cat(vec![r0, r1], 2)
        }
    }

    /// The indexer's choice for the n queries at positions `first`.. (the rows of `h` and `q_lora`): for
    /// each, the `min(index_topk, first + n)` causal keys of highest score through nsa's indexer_logits and
    /// topk kernels ([n, k], −1 padded where a row has fewer causal keys), over the `earlier` keys
    /// ([first, index_head_dim], from the cache) and the new tokens' own rotated keys, which it returns too.
    pub(crate) fn index_select(
        &self,
        p: &str,
        h: &Tensor<2>,
        q_lora: &Tensor<2>,
        cos_sin: &(Tensor<2>, Tensor<2>),
        earlier: Option<Tensor<2>>,
        first: usize,
    ) -> (Tensor<2, Int>, Tensor<2>) {
        let (q, k, weights) = self.index_query_key(p, h, q_lora, cos_sin);
        let chosen = self.index_choose(q, weights, earlier, k.clone(), first);
        (chosen, k)
    }

    /// The indexer's rotated queries [n, heads, d], rotated keys [n, d] and head weights [n, heads] (both
    /// scales folded in) for the rows of `h` / `q_lora` — row by row, so a batch of sequences shares it.
    pub(crate) fn index_query_key(
        &self,
        p: &str,
        h: &Tensor<2>,
        q_lora: &Tensor<2>,
        cos_sin: &(Tensor<2>, Tensor<2>),
    ) -> (Tensor<3>, Tensor<2>, Tensor<2>) {
        let c = &self.config;
        let [n, _] = h.dims();
        let (heads, d) = (c.index_n_heads, c.index_head_dim);
        let rope = c.qk_rope_head_dim;
        let q = self
            .linear(q_lora.clone(), &format!("{p}.self_attn.indexer.wq_b.weight"))
            .reshape([n, heads, d]);
        let k = self.indexer_key(p, h);
        let rotate = |x: Tensor<3>| {
            let [n, hh, _] = x.dims();
            let pe = self.rope(x.clone().slice([0..n, 0..hh, 0..rope]), &cos_sin.0, &cos_sin.1, false);
            Tensor::cat(vec![pe, x.slice([0..n, 0..hh, rope..d])], 2)
        };
        let q = rotate(q);
        let k = rotate(k.reshape([n, 1, d])).reshape([n, d]);
        // score[s, t] = Σ_h relu(q[s, h] · k[t] · d^−½) · w[s, h] · H^−½: both scales folded into w.
        let weights = self
            .linear(h.clone(), &format!("{p}.self_attn.indexer.weights_proj.weight"))
            .mul_scalar((heads as f64).powf(-0.5) * (d as f64).powf(-0.5));
        (q, k, weights)
    }

    /// The `min(index_topk, first + n)` causal keys of highest score for n queries of one sequence at
    /// positions `first`.., over its `earlier` keys and the new ones (nsa's indexer_logits + topk).
    pub(crate) fn index_choose(
        &self,
        q: Tensor<3>,
        weights: Tensor<2>,
        earlier: Option<Tensor<2>>,
        new_keys: Tensor<2>,
        first: usize,
    ) -> Tensor<2, Int> {
        let n = q.dims()[0];
        let keys = match earlier {
            Some(earlier) => Tensor::cat(vec![earlier, new_keys], 0),
            None => new_keys,
        };
        let k_top = self.config.index_topk.min(first + n);
        crate::ops::indexer_topk(&self.kernels, q, weights, keys, k_top, first)
    }

    /// The indexer's choice for a step's sequences (sequence i: `counts[i]` queries after `cached[i]` keys;
    /// `keys` every sequence's keys, the new ones included, sequence i's in order from row `starts[i]`) as
    /// each sequence's positions
    /// ([counts[i], k], −1 padded). A step whose queries × keys stay within `one_pass_scores`
    /// ([`ONE_PASS_SCORES`] in the model; the tests pass others) scores every query against the whole key
    /// buffer in one launch pair, each query limited to its own sequence's range; a larger one runs a
    /// launch pair per sequence (the work would grow with the square of the batch).
    #[allow(clippy::too_many_arguments)]
    pub fn index_choose_all(
        &self,
        q: Tensor<3>,
        weights: Tensor<2>,
        keys: Tensor<2>,
        starts: &[usize],
        cached: &[usize],
        counts: &[usize],
        one_pass_scores: usize,
    ) -> Vec<Tensor<2, Int>> {
        debug_assert!(counts.iter().all(|&n| n > 0), "every sequence has a query");
        let [queries, heads, d] = q.dims();
        let lens: Vec<usize> = cached.iter().zip(counts).map(|(c, n)| c + n).collect();
        let (mut k_start, mut q_pos) = (Vec::new(), Vec::new());
        for ((&c, &n), &start) in cached.iter().zip(counts).zip(starts) {
            k_start.extend(std::iter::repeat_n(start as i32, n));
            q_pos.extend((0..n).map(|j| (start + c + j) as i32));
        }
        if counts.len() > 1 && queries * keys.dims()[0] <= one_pass_scores {
            let k = self.config.index_topk.min(lens.iter().copied().max().unwrap_or(0));
            let absolute = crate::ops::indexer_topk_ranges(&self.kernels, q, weights, keys, k, &q_pos, &k_start);
            // Key indices back to each sequence's positions (−1 stays).
            let start = Tensor::<1, Int>::from_data(
                burn::tensor::TensorData::new(k_start.iter().map(|&s| s as i64).collect(), [queries]),
                &self.device,
            );
            let start = start.reshape([queries, 1]).expand([queries, k]);
            let positions = absolute
                .clone()
                .sub(start)
                .mask_where(absolute.clone().lower_elem(0), absolute);
            let mut first = 0;
            return counts
                .iter()
                .map(|&n| {
                    first += n;
                    positions.clone().slice(first - n..first)
                })
                .collect();
        }
        let (mut chosen, mut first) = (Vec::new(), 0);
        for (((&c, &n), &len), &start) in cached.iter().zip(counts).zip(&lens).zip(starts) {
            let span = first..first + n;
            let q = q.clone().slice([span.clone(), 0..heads, 0..d]);
            let own_keys = keys.clone().slice(start..start + len);
            let k = self.config.index_topk.min(len);
            chosen.push(crate::ops::indexer_topk(
                &self.kernels,
                q,
                weights.clone().slice(span),
                own_keys,
                k,
                c,
            ));
            first += n;
        }
        chosen
    }

    /// The prefill's indexer ([`Self::index_select`] from position 0) and its [n, n] mask: key t allowed
    /// for query s when t ≤ s and t is chosen. Returns the mask, the choice and the rotated keys.
    fn indexer(
        &self,
        p: &str,
        h: &Tensor<2>,
        q_lora: &Tensor<2>,
        cos_sin: &(Tensor<2>, Tensor<2>),
    ) -> (Tensor<2, Bool>, Tensor<2, Int>, Tensor<2>) {
        let (chosen, k) = self.index_select(p, h, q_lora, cos_sin, None, 0);
        let [n, k_top] = chosen.dims();
        // A query with fewer causal keys than k_top has −1s: replaced by its own position (always chosen).
        let positions = Tensor::<1, Int>::arange(0..n as i64, &self.device);
        let own = positions.clone().reshape([n, 1]).expand([n, k_top]);
        let filled = chosen.clone().mask_where(chosen.clone().lower_elem(0), own);
        let future = positions
            .clone()
            .reshape([1, n])
            .expand([n, n])
            .greater(positions.reshape([n, 1]).expand([n, n]));
        let picked = Tensor::<2>::zeros([n, n], &self.device)
            .scatter(1, filled, Tensor::ones([n, k_top], &self.device), IndexingUpdateOp::Add)
            .greater_elem(0.5);
        (picked.bool_and(future.bool_not()), chosen, k)
    }

    /// The indexer's key [n, index_head_dim] before RoPE: wk, then LayerNorm (eps 1e-6) with weight and bias.
    pub(crate) fn indexer_key(&self, p: &str, h: &Tensor<2>) -> Tensor<2> {
        let k = self.linear(h.clone(), &format!("{p}.self_attn.indexer.wk.weight"));
        let mean = k.clone().mean_dim(1);
        let centered = k.sub(mean);
        let var = centered.clone().square().mean_dim(1);
        centered
            .div(var.add_scalar(1e-6).sqrt())
            .mul(self.w(&format!("{p}.self_attn.indexer.k_norm.weight")))
            .add(self.w(&format!("{p}.self_attn.indexer.k_norm.bias")))
    }

    /// What MLA caches per token: the normalized KV latent [n, kv_lora_rank] and the rotated rope key
    /// [n, qk_rope_head_dim] (shared by all heads).
    pub(crate) fn kv_latent(&self, p: &str, h: &Tensor<2>, cos_sin: &(Tensor<2>, Tensor<2>)) -> (Tensor<2>, Tensor<2>) {
        let c = &self.config;
        let [n, _] = h.dims();
        let (rope, rank) = (c.qk_rope_head_dim, c.kv_lora_rank);
        let kv_a = self.linear(h.clone(), &format!("{p}.self_attn.kv_a_proj_with_mqa.weight"));
        let latent = self.rms_norm(
            kv_a.clone().slice([0..n, 0..rank]),
            &format!("{p}.self_attn.kv_a_layernorm.weight"),
        );
        let k_pe = self
            .rope(
                kv_a.slice([0..n, rank..rank + rope]).reshape([n, 1, rope]),
                &cos_sin.0,
                &cos_sin.1,
                true,
            )
            .reshape([n, rope]);
        (latent, k_pe)
    }

    /// MLA's queries from the q LoRA output: per head the nope part [n, heads, qk_nope_head_dim] and the
    /// rotated (interleaved RoPE) part [n, heads, qk_rope_head_dim].
    fn mla_query(&self, p: &str, q_lora: &Tensor<2>, cos_sin: &(Tensor<2>, Tensor<2>)) -> (Tensor<3>, Tensor<3>) {
        let c = &self.config;
        let [n, _] = q_lora.dims();
        let (heads, nope) = (c.num_attention_heads, c.qk_nope_head_dim);
        let qk = nope + c.qk_rope_head_dim;
        let q_name = if c.q_lora_rank.is_some() { "q_b_proj" } else { "q_proj" };
        let q = self
            .linear(q_lora.clone(), &format!("{p}.self_attn.{q_name}.weight"))
            .reshape([n, heads, qk]);
        let q_pe = self.rope(
            q.clone().slice([0..n, 0..heads, nope..qk]),
            &cos_sin.0,
            &cos_sin.1,
            true,
        );
        (q.slice([0..n, 0..heads, 0..nope]), q_pe)
    }

    /// MLA in the MHA form over the allowed keys (the latent and rope keys from [`Self::kv_latent`]);
    /// returns the o_proj output [n, hidden].
    fn attention(
        &self,
        p: &str,
        q_lora: &Tensor<2>,
        (latent, k_pe): (Tensor<2>, Tensor<2>),
        allowed: Tensor<2, Bool>,
        cos_sin: &(Tensor<2>, Tensor<2>),
    ) -> Tensor<2> {
        let c = &self.config;
        let [n, _] = latent.dims();
        let (heads, nope, rope, v_dim) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        );
        let (q_nope, q_pe) = self.mla_query(p, q_lora, cos_sin);
        let q = Tensor::cat(vec![q_nope, q_pe], 2);
        let k_pe = k_pe.reshape([n, 1, rope]);
        let kv = self
            .linear(latent, &format!("{p}.self_attn.kv_b_proj.weight"))
            .reshape([n, heads, nope + v_dim]);
        let k = Tensor::cat(
            vec![
                kv.clone().slice([0..n, 0..heads, 0..nope]),
                k_pe.expand([n, heads, rope]),
            ],
            2,
        );
        let v = kv.slice([0..n, 0..heads, nope..nope + v_dim]);
        let (q, k, v) = (q.swap_dims(0, 1), k.swap_dims(0, 1), v.swap_dims(0, 1));
        let scores = crate::ops::matmul(q, k.swap_dims(1, 2)).mul_scalar(c.softmax_scale());
        let blocked = allowed.bool_not().reshape([1, n, n]).expand([heads, n, n]);
        let probs = activation::softmax(scores.mask_fill(blocked, f32::NEG_INFINITY), 2);
        let out = crate::ops::matmul(probs, v).swap_dims(0, 1).reshape([n, heads * v_dim]);
        self.linear(out, &format!("{p}.self_attn.o_proj.weight"))
    }

    /// MLA in the absorbed form over the indexer's chosen keys, through nsa's sparse_mla_prefill kernel
    /// (SGLang's sparse prefill): queries taken into the latent space by W_UK, the kernel's latent outputs
    /// lifted back by W_UV. The kernel works at DeepSeek's dims (576 = 512 latent + 64 rope, heads in 16s):
    /// smaller models are zero-padded into them, which leaves every dot product unchanged.
    ///
    /// `q_lora` [n, ·] holds the queries (at the positions `cos_sin` gives), `latent` / `k_pe` [s, ·] every
    /// key row, `chosen` [n, k] the rows each query attends to (−1: none): the prefill's own tokens, or a
    /// decode step over the cache.
    /// Cached rows in the sparse MLA kernel's layout: [latent | 0 | rope | 0], 576 columns.
    pub(crate) fn kv_rows(&self, latent: Tensor<2>, k_pe: Tensor<2>) -> Tensor<2> {
        use nsa_kernels::sparse_mla::{D_QK, D_V};
        let c = &self.config;
        let (rank, rope) = (c.kv_lora_rank, c.qk_rope_head_dim);
        assert!(
            rank <= D_V && rope <= D_QK - D_V,
            "latent {rank} + rope {rope} exceed the kernel's 512 + 64"
        );
        let [s, _] = latent.dims();
        let zeros = |cols: usize| Tensor::<2>::zeros([s, cols], &self.device);
        Tensor::cat(vec![latent, zeros(D_V - rank), k_pe, zeros(D_QK - D_V - rope)], 1)
    }

    /// MLA in the absorbed form over the rows `chosen` (−1: none) of `kv` (in [`Self::kv_rows`]' layout)
    /// through nsa's sparse MLA kernel.
    pub(crate) fn attention_sparse(
        &self,
        p: &str,
        q_lora: &Tensor<2>,
        kv: Tensor<2>,
        chosen: Tensor<2, Int>,
        cos_sin: &(Tensor<2>, Tensor<2>),
    ) -> Tensor<2> {
        use nsa_kernels::sparse_mla::{D_QK, D_V};
        let c = &self.config;
        let [n, _] = q_lora.dims();
        let (heads, nope, rope, v_dim, rank) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        );
        let (q_nope, q_pe) = self.mla_query(p, q_lora, cos_sin);
        let q_nope = q_nope.swap_dims(0, 1); // [heads, n, nope]
        let w_kv = self
            .w(&format!("{p}.self_attn.kv_b_proj.weight"))
            .transpose()
            .reshape([heads, nope + v_dim, rank]);
        let w_uk = w_kv.clone().slice([0..heads, 0..nope, 0..rank]);
        let w_uv = w_kv.slice([0..heads, nope..nope + v_dim, 0..rank]);
        let q_latent = matmul(q_nope, w_uk).swap_dims(0, 1); // [n, heads, rank]
        // Zero-padded to [latent | 0 | rope | 0] = 576 columns, heads to a multiple of 16.
        let padded_heads = heads.next_multiple_of(16);
        let zeros3 = |cols: usize| Tensor::<3>::zeros([n, heads, cols], &self.device);
        let q_full = Tensor::cat(vec![q_latent, zeros3(D_V - rank), q_pe, zeros3(D_QK - D_V - rope)], 2);
        let q_full = if padded_heads > heads {
            Tensor::cat(
                vec![q_full, Tensor::zeros([n, padded_heads - heads, D_QK], &self.device)],
                1,
            )
        } else {
            q_full
        };
        let out = crate::ops::sparse_mla_prefill(&self.kernels, q_full, kv, chosen, c.softmax_scale());
        let out_latent = out.slice([0..n, 0..heads, 0..rank]).swap_dims(0, 1); // [heads, n, rank]
        let out = matmul(out_latent, w_uv.swap_dims(1, 2)) // [heads, n, v]
            .swap_dims(0, 1)
            .reshape([n, heads * v_dim]);
        self.linear(out, &format!("{p}.self_attn.o_proj.weight"))
    }

    pub(crate) fn mlp(&self, prefix: &str, x: Tensor<2>) -> Tensor<2> {
        let gate = self.linear(x.clone(), &format!("{prefix}.gate_proj.weight"));
        let up = self.linear(x, &format!("{prefix}.up_proj.weight"));
        self.linear(activation::silu(gate).mul(up), &format!("{prefix}.down_proj.weight"))
    }

    /// The noaux_tc router; experts computed for every token and weighted (zero where not chosen).
    pub(crate) fn moe(&self, p: &str, x: Tensor<2>) -> (Tensor<2>, Tensor<2, Int>) {
        let c = &self.config;
        // nsa's moe_gate and moe_experts kernels: the router on the exact-f32 logits, the routed experts
        // on the experts' stacked weights.
        let logits = self.linear(x.clone(), &format!("{p}.mlp.gate.weight"));
        let gate = crate::ops::GateConfig {
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            scaling: c.routed_scaling_factor,
            norm: c.norm_topk_prob,
        };
        let bias = self.w(&format!("{p}.mlp.gate.e_score_correction_bias"));
        let (ids, weights) = crate::ops::moe_gate(&self.kernels, logits, bias, &gate);
        let mut out = match &self.experts[p] {
            Experts::F32(w13, w2) => crate::ops::moe_experts(&self.kernels, x.clone(), ids.clone(), weights, w13, w2),
            Experts::Bf16(w13, w2) => {
                let shape = crate::ops::ExpertShape {
                    experts: c.n_routed_experts,
                    inter: c.moe_intermediate_size,
                };
                crate::ops::moe_experts_bf16(&self.kernels, x.clone(), ids.clone(), weights, w13, w2, shape)
            }
        };
        if c.n_shared_experts > 0 {
            out = out.add(self.mlp(&format!("{p}.mlp.shared_experts"), x));
        }
        (out, ids)
    }

    /// The query's LoRA path: q_a_proj → RMSNorm (or the normalized input where there is no q LoRA).
    pub(crate) fn q_lora(&self, p: &str, h: &Tensor<2>) -> Tensor<2> {
        match self.config.q_lora_rank {
            Some(_) => self.rms_norm(
                self.linear(h.clone(), &format!("{p}.self_attn.q_a_proj.weight")),
                &format!("{p}.self_attn.q_a_layernorm.weight"),
            ),
            None => h.clone(),
        }
    }

    /// The layer's second half: post-attention norm, dense MLP or MoE, residual; the router's picks.
    pub(crate) fn ffn(&self, layer: usize, x: Tensor<2>) -> (Tensor<2>, Option<Tensor<2, Int>>) {
        let p = format!("model.layers.{layer}");
        let h = self.rms_norm(x.clone(), &format!("{p}.post_attention_layernorm.weight"));
        if self.config.is_moe_layer(layer) {
            let (out, ids) = self.moe(&p, h);
            (x.add(out), Some(ids))
        } else {
            (x.add(self.mlp(&format!("{p}.mlp"), h)), None)
        }
    }

    /// Token rows of the embedding [ids.len(), hidden].
    pub(crate) fn embed(&self, ids: &[u32]) -> Tensor<2> {
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(ids.iter().map(|i| *i as i64).collect::<Vec<_>>(), [ids.len()]),
            &self.device,
        );
        self.weights["model.embed_tokens.weight"]
            .clone()
            .transpose()
            .select(0, index)
    }

    /// Final norm and lm_head (the embedding where tied): logits [n, vocab].
    pub(crate) fn lm_logits(&self, x: Tensor<2>) -> Tensor<2> {
        let head = if self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.linear(self.rms_norm(x, "model.norm.weight"), head)
    }

    /// One prefill of `ids` from position 0; results copied back to the host.
    pub fn forward(&self, ids: &[u32]) -> Forward {
        self.prefill(ids).0
    }

    /// [`Self::forward`], and the cache its tokens leave for decoding to continue from.
    pub fn prefill(&self, ids: &[u32]) -> (Forward, DeviceCache) {
        let mut cache = self.new_cache();
        let c = &self.config;
        let n = ids.len();
        let mut x = self.embed(ids);
        let cos_sin = self.cos_sin(0, n);
        let host_int = |t: Tensor<2, Int>| -> Vec<i32> {
            t.into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .expect("ints")
                .into_iter()
                .map(|v| v as i32)
                .collect()
        };
        let mut result = Forward {
            logits: Vec::new(),
            layer_out: Vec::new(),
            index_topk: Vec::new(),
            router_topk_ids: Vec::new(),
        };
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let h = self.rms_norm(x.clone(), &format!("{p}.input_layernorm.weight"));
            let q_lora = self.q_lora(&p, &h);
            let (allowed, chosen, index_k) = self.indexer(&p, &h, &q_lora, &cos_sin);
            let (latent, k_pe) = self.kv_latent(&p, &h, &cos_sin);
            let rows = self.kv_rows(latent.clone(), k_pe.clone());
            cache.store(layer, rows.clone(), index_k);
            let attention = match self.prefill_attention.unwrap_or(PrefillAttention::rule(n)) {
                PrefillAttention::Mha => self.attention(&p, &q_lora, (latent, k_pe), allowed, &cos_sin),
                PrefillAttention::Sparse => self.attention_sparse(&p, &q_lora, rows, chosen.clone(), &cos_sin),
            };
            x = x.add(attention);
            let router;
            (x, router) = self.ffn(layer, x);
            result.layer_out.push(host(x.clone()));
            // Chosen keys as the reference lists them: the causal ones, ascending, −1 padded.
            let k_top = c.index_topk.min(n);
            let chosen = host_int(chosen);
            let mut keys = vec![-1i32; n * c.index_topk];
            for s in 0..n {
                let mut row: Vec<i32> = chosen[s * k_top..][..k_top]
                    .iter()
                    .copied()
                    .filter(|t| (0..=s as i32).contains(t))
                    .collect();
                row.sort();
                row.dedup(); // short rows are padded with their own position
                keys[s * c.index_topk..][..row.len()].copy_from_slice(&row);
            }
            result.index_topk.push(keys);
            result.router_topk_ids.push(router.map(|ids| {
                let mut ids = host_int(ids);
                ids.chunks_mut(c.num_experts_per_tok).for_each(|r| r.sort());
                ids
            }));
        }
        result.logits = host(self.lm_logits(x));
        cache.advance(n);
        (result, cache)
    }
}

/// A tensor's values on the host, as f64.
pub(crate) fn host(t: Tensor<2>) -> Vec<f64> {
    t.into_data()
        .try_to_vec::<f32>()
        .expect("f32")
        .into_iter()
        .map(f64::from)
        .collect()
}
