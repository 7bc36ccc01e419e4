//! Several fresh sequences prefilled in one pass (the serving engine's new requests of a step): their
//! tokens laid end to end, norms, projections, the indexer's projections and the MoE run once for all;
//! the indexer's scores and top-k per sequence over its own keys; attention once, in the MHA form under a
//! block-diagonal mask or in the sparse form over shifted choices, so no sequence sees another's keys.
use crate::device::{DeviceModel, PrefillAttention, host};
use crate::device_decode::DeviceCache;
use burn::tensor::{Int, Tensor};

/// The choices of several sequences as rows of one list over their key rows laid end to end: each
/// sequence's indices shifted by where its rows start (−1 kept), padded with −1 to the widest.
pub(crate) fn shifted_choice(parts: Vec<(Tensor<2, Int>, usize)>) -> Tensor<2, Int> {
    let width = parts.iter().map(|(c, _)| c.dims()[1]).max().unwrap_or(0);
    let rows = parts
        .into_iter()
        .map(|(chosen, start)| {
            let shifted = chosen.clone().add_scalar(start as i64);
            let shifted = shifted.mask_where(chosen.clone().lower_elem(0), chosen);
            let [n, k] = shifted.dims();
            if k == width {
                return shifted;
            }
            let none = Tensor::<2, Int>::zeros([n, width - k], &shifted.device()).sub_scalar(1);
            Tensor::cat(vec![shifted, none], 1)
        })
        .collect();
    Tensor::cat(rows, 0)
}

impl DeviceModel {
    /// Prefills `prompts` (each a fresh sequence) in one pass; each one's last-position logits [vocab] and
    /// its cache. The attention form is the configured one, or SGLang's rule for the longest prompt.
    pub fn prefill_batch(&self, prompts: &[&[u32]]) -> Vec<(Vec<f64>, DeviceCache)> {
        let c = &self.config;
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        assert!(lens.iter().all(|&n| n > 0), "every prompt has a token");
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |at, n| Some(std::mem::replace(at, *at + n)))
            .collect();
        let total: usize = lens.iter().sum();
        let ids: Vec<u32> = prompts.concat();
        let (cos, sin): (Vec<Tensor<2>>, Vec<Tensor<2>>) = lens.iter().map(|&n| self.cos_sin(0, n)).unzip();
        let cos_sin = (Tensor::cat(cos, 0), Tensor::cat(sin, 0));
        let longest = lens.iter().copied().max().unwrap_or(0);
        let form = self.prefill_attention.unwrap_or(PrefillAttention::rule(longest));
        let mut caches: Vec<DeviceCache> = prompts.iter().map(|_| self.new_cache()).collect();
        let mut x = self.embed(&ids);
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let h = self.rms_norm(x.clone(), &format!("{p}.input_layernorm.weight"));
            let q_lora = self.q_lora(&p, &h);
            let (latent, k_pe) = self.kv_latent(&p, &h, &cos_sin);
            let (index_q, index_k, index_w) = self.index_query_key(&p, &h, &q_lora, &cos_sin);
            let [_, heads, dim] = index_q.dims();
            let mut choices = Vec::with_capacity(prompts.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                let rows = starts[i]..starts[i] + lens[i];
                let q = index_q.clone().slice([rows.clone(), 0..heads, 0..dim]);
                let keys = index_k.clone().slice(rows.clone());
                let chosen = self.index_choose(q, index_w.clone().slice(rows.clone()), None, keys.clone(), 0);
                cache.store(
                    layer,
                    latent.clone().slice(rows.clone()),
                    k_pe.clone().slice(rows),
                    keys,
                );
                choices.push((chosen, starts[i]));
            }
            let kv = (latent, k_pe);
            let attention = match form {
                PrefillAttention::Mha => {
                    // Block-diagonal: each sequence's own mask, nothing across sequences.
                    let mut allowed = Tensor::<2>::zeros([total, total], &x.device());
                    for (chosen, start) in &choices {
                        let n = chosen.dims()[0];
                        let block = self.choice_mask(chosen).float();
                        allowed = allowed.slice_assign([*start..start + n, *start..start + n], block);
                    }
                    self.attention(&p, &q_lora, kv, allowed.greater_elem(0.5), &cos_sin)
                }
                PrefillAttention::Sparse => self.attention_sparse(&p, &q_lora, kv, shifted_choice(choices), &cos_sin),
            };
            x = x.add(attention);
            (x, _) = self.ffn(layer, x);
        }
        let last: Vec<i64> = starts.iter().zip(&lens).map(|(s, n)| (s + n - 1) as i64).collect();
        let last = Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(last, [prompts.len()]), &x.device());
        let logits = host(self.lm_logits(x.select(0, last)));
        caches
            .into_iter()
            .zip(&lens)
            .zip(logits.chunks(c.vocab_size))
            .map(|((mut cache, &n), logits)| {
                cache.advance(n);
                (logits.to_vec(), cache)
            })
            .collect()
    }
}
