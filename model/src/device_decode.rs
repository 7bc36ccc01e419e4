//! The device model's decode path: one token at a time against per-layer caches on the device — the
//! normalized KV latent, the rotated rope key and the indexer's key of every earlier token. The indexer
//! (nsa's indexer_logits + topk kernels) picks the cached rows and attention runs in MLA's absorbed form
//! over them through nsa's sparse MLA kernel; the tests check it against the prefill's MHA form and the
//! golden generations.
use crate::device::{DeviceModel, host};
use burn::tensor::{Int, Tensor};

/// One layer's cached rows in buffers with room to grow (doubling), so a decode step writes its row in
/// place instead of copying the whole cache.
#[derive(Clone)]
struct LayerCache {
    /// [capacity, kv_lora_rank]
    latent: Tensor<2>,
    /// [capacity, qk_rope_head_dim]
    k_pe: Tensor<2>,
    /// [capacity, index_head_dim]
    index_k: Tensor<2>,
    /// Rows in use.
    rows: usize,
}

impl LayerCache {
    fn new(latent: Tensor<2>, k_pe: Tensor<2>, index_k: Tensor<2>) -> LayerCache {
        let rows = latent.dims()[0];
        LayerCache {
            latent,
            k_pe,
            index_k,
            rows,
        }
    }

    fn latent(&self) -> Tensor<2> {
        self.latent.clone().slice(0..self.rows)
    }
    fn k_pe(&self) -> Tensor<2> {
        self.k_pe.clone().slice(0..self.rows)
    }
    fn index_k(&self) -> Tensor<2> {
        self.index_k.clone().slice(0..self.rows)
    }

    fn append(self, latent: Tensor<2>, k_pe: Tensor<2>, index_k: Tensor<2>) -> LayerCache {
        let (rows, n) = (self.rows, latent.dims()[0]);
        LayerCache {
            latent: write_rows(self.latent, rows, latent),
            k_pe: write_rows(self.k_pe, rows, k_pe),
            index_k: write_rows(self.index_k, rows, index_k),
            rows: rows + n,
        }
    }
}

/// `new` written at rows `rows..` of `buffer` (grown to twice its size, or more, when it is full).
fn write_rows(buffer: Tensor<2>, rows: usize, new: Tensor<2>) -> Tensor<2> {
    let ([capacity, width], n) = (buffer.dims(), new.dims()[0]);
    let buffer = if rows + n > capacity {
        let grown = Tensor::<2>::zeros([(2 * capacity).max(rows + n), width], &buffer.device());
        grown.slice_assign(0..rows, buffer.slice(0..rows))
    } else {
        buffer
    };
    buffer.slice_assign(rows..rows + n, new)
}

/// What decoding has cached so far, per layer.
#[derive(Clone)]
pub struct DeviceCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
}

impl DeviceCache {
    /// Appends a chunk's rows to `layer`'s caches (the prefill's, all layers, then [`Self::advance`]).
    pub(crate) fn store(&mut self, layer: usize, latent: Tensor<2>, k_pe: Tensor<2>, index_k: Tensor<2>) {
        self.layers[layer] = Some(match self.layers[layer].take() {
            Some(cache) => cache.append(latent, k_pe, index_k),
            None => LayerCache::new(latent, k_pe, index_k),
        });
    }

    /// Counts `n` tokens stored in every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The cached rows of positions `start..end` (a page of a paged cache).
    pub fn slice(&self, start: usize, end: usize) -> DeviceCache {
        assert!(
            start <= end && end <= self.len,
            "rows {start}..{end} of a {}-row cache",
            self.len
        );
        let rows = |t: Tensor<2>| t.slice(start..end);
        DeviceCache {
            layers: (self.layers.iter())
                .map(|l| {
                    l.as_ref()
                        .filter(|_| end > start)
                        .map(|l| LayerCache::new(rows(l.latent()), rows(l.k_pe()), rows(l.index_k())))
                })
                .collect(),
            len: end - start,
        }
    }

    /// `parts`' rows one after another (pages joined back into a sequence's cache); at least one part
    /// has rows.
    pub fn concat(parts: &[DeviceCache]) -> DeviceCache {
        let parts: Vec<&DeviceCache> = parts.iter().filter(|p| p.len > 0).collect();
        let first = parts.first().expect("concat joins at least one non-empty part");
        let join = |pick: &dyn Fn(&LayerCache) -> Tensor<2>, l: usize| {
            Tensor::cat(
                parts
                    .iter()
                    .map(|p| pick(p.layers[l].as_ref().expect("a non-empty part")))
                    .collect(),
                0,
            )
        };
        DeviceCache {
            layers: (0..first.layers.len())
                .map(|l| {
                    Some(LayerCache::new(
                        join(&|c| c.latent(), l),
                        join(&|c| c.k_pe(), l),
                        join(&|c| c.index_k(), l),
                    ))
                })
                .collect(),
            len: parts.iter().map(|p| p.len).sum(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DeviceModel {
    pub fn new_cache(&self) -> DeviceCache {
        DeviceCache {
            layers: (0..self.config.num_hidden_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Appends token `id` at position `cache.len()`; returns its logits [vocab] on the host.
    pub fn decode_step(&self, cache: &mut DeviceCache, id: u32) -> Vec<f64> {
        self.extend(cache, &[id])
    }

    /// Appends `ids` at positions `cache.len()..` in one pass (a prompt chunk after a cached prefix, or a
    /// single decode token); returns the last one's logits [vocab] on the host.
    pub fn extend(&self, cache: &mut DeviceCache, ids: &[u32]) -> Vec<f64> {
        let c = &self.config;
        let (s, n) = (cache.len, ids.len());
        assert!(n > 0, "extend takes at least one token");
        let cos_sin = self.cos_sin(s, n);
        let mut x = self.embed(ids);
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let h = self.rms_norm(x.clone(), &format!("{p}.input_layernorm.weight"));
            let q_lora = self.q_lora(&p, &h);

            // The indexer over the cached keys and the new tokens' own (causally: query i sees keys up to
            // s + i). The new latents, rope keys and indexer keys join the cache: each token attends to
            // itself.
            let earlier = cache.layers[layer].as_ref().map(LayerCache::index_k);
            let (chosen, k_idx) = self.index_select(&p, &h, &q_lora, &cos_sin, earlier, s);
            let (latent, k_pe) = self.kv_latent(&p, &h, &cos_sin);
            cache.store(layer, latent, k_pe, k_idx);
            let stored = cache.layers[layer].as_ref().expect("just stored");
            let (latent, k_pe) = (stored.latent(), stored.k_pe());
            // MLA, absorbed, over the chosen cached rows: nsa's sparse MLA kernel, as the prefill's
            // sparse form.
            let attention = self.attention_sparse(&p, &q_lora, (latent, k_pe), chosen, &cos_sin);
            x = x.add(attention);
            (x, _) = self.ffn(layer, x);
        }
        cache.advance(n);
        host(self.lm_logits(x.slice(n - 1..n)))
    }

    /// One decode step of several sequences at once: `ids[i]` is appended to `caches[i]`. Norms, the
    /// projections, the MoE and the LM head run on the whole batch; the indexer and attention run per
    /// sequence over its own cache. Returns each sequence's logits [vocab] on the host.
    pub fn decode_batch(&self, caches: &mut [&mut DeviceCache], ids: &[u32]) -> Vec<Vec<f64>> {
        assert_eq!(caches.len(), ids.len(), "a token per sequence");
        let c = &self.config;
        let rows: Vec<(Tensor<2>, Tensor<2>)> = caches.iter().map(|cache| self.cos_sin(cache.len, 1)).collect();
        let batch_cos_sin = (
            Tensor::cat(rows.iter().map(|r| r.0.clone()).collect(), 0),
            Tensor::cat(rows.iter().map(|r| r.1.clone()).collect(), 0),
        );
        let row = |t: &Tensor<2>, i: usize| t.clone().slice(i..i + 1);
        let mut x = self.embed(ids);
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let h = self.rms_norm(x.clone(), &format!("{p}.input_layernorm.weight"));
            let q_lora = self.q_lora(&p, &h);
            let (latent, k_pe) = self.kv_latent(&p, &h, &batch_cos_sin);
            let (index_q, index_k, index_w) = self.index_query_key(&p, &h, &q_lora, &batch_cos_sin);
            // The indexer's scores and top-k per sequence over its own keys; attention once for the batch over every
            // sequence's rows laid end to end, each one's chosen rows shifted to where its cache starts.
            let (mut latents, mut k_pes, mut chosen_rows, mut offset) = (Vec::new(), Vec::new(), Vec::new(), 0);
            let [_, index_heads, index_dim] = index_q.dims();
            for (i, cache) in caches.iter_mut().enumerate() {
                let q = index_q.clone().slice([i..i + 1, 0..index_heads, 0..index_dim]);
                let earlier = cache.layers[layer].as_ref().map(LayerCache::index_k);
                let k_idx = row(&index_k, i);
                let chosen = self.index_choose(q, row(&index_w, i), earlier, k_idx.clone(), cache.len);
                cache.store(layer, row(&latent, i), row(&k_pe, i), k_idx);
                let stored = cache.layers[layer].as_ref().expect("just stored");
                latents.push(stored.latent());
                k_pes.push(stored.k_pe());
                let shifted = chosen.clone().add_scalar(offset as i64);
                chosen_rows.push(shifted.mask_where(chosen.clone().lower_elem(0), chosen));
                offset += stored.rows;
            }
            let width = chosen_rows.iter().map(|c| c.dims()[1]).max().unwrap_or(0);
            let chosen = Tensor::cat(
                chosen_rows
                    .into_iter()
                    .map(|c| {
                        let pad = width - c.dims()[1];
                        if pad == 0 {
                            return c;
                        }
                        let none = Tensor::<2, Int>::zeros([1, pad], &c.device()).sub_scalar(1);
                        Tensor::cat(vec![c, none], 1)
                    })
                    .collect(),
                0,
            );
            let kv = (Tensor::cat(latents, 0), Tensor::cat(k_pes, 0));
            x = x.add(self.attention_sparse(&p, &q_lora, kv, chosen, &batch_cos_sin));
            (x, _) = self.ffn(layer, x);
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let logits = host(self.lm_logits(x));
        logits.chunks(c.vocab_size).map(<[f64]>::to_vec).collect()
    }

    /// The prompt through one prefill, which leaves its cache: returns the last position's logits.
    pub fn prefill_prompt(&self, prompt: &[u32]) -> (Vec<f64>, DeviceCache) {
        let (forward, cache) = self.prefill(prompt);
        let vocab = self.config.vocab_size;
        (forward.logits[(prompt.len() - 1) * vocab..].to_vec(), cache)
    }

    /// Greedy decoding through the cache: the prompt in one prefill, then `count` decode steps.
    pub fn generate_greedy_cached(&self, prompt: &[u32], count: usize) -> Vec<u32> {
        let (mut logits, mut cache) = self.prefill_prompt(prompt);
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let next = crate::reference::argmax(&logits);
            out.push(next);
            logits = self.decode_step(&mut cache, next);
        }
        out
    }
}
