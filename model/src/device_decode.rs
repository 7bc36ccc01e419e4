//! The device model's cached path: tokens appended to sequences whose earlier rows are cached on the
//! device — each cached token's KV row in the sparse MLA kernel's layout (normalized latent and rotated
//! rope key) and its indexer key. The indexer (nsa's indexer_logits + topk kernels) picks the cached rows
//! and attention runs in MLA's absorbed form over them through nsa's sparse MLA kernel; the tests check it
//! against the prefill's MHA form and the golden generations.
//!
//! One step loop ([`DeviceModel::step`]) serves both homes of the rows ([`CacheRows`]): a sequence's own
//! growing buffers ([`DeviceCache`], value semantics, for generation and tests) and the pages of a store
//! shared by every sequence ([`crate::paged::PagedStore`], the server's).
use crate::device::DeviceModel;
use burn::tensor::{Int, Tensor};

/// One layer's cached rows in buffers with room to grow (doubling), so a decode step writes its row in
/// place instead of copying the whole cache.
#[derive(Clone)]
struct LayerCache {
    /// [capacity, 576] in the kernel's layout.
    kv: Tensor<2>,
    /// [capacity, index_head_dim]
    index_k: Tensor<2>,
    /// Rows in use.
    rows: usize,
}

impl LayerCache {
    fn kv(&self) -> Tensor<2> {
        self.kv.clone().slice(0..self.rows)
    }
    fn index_k(&self) -> Tensor<2> {
        self.index_k.clone().slice(0..self.rows)
    }
}

/// `new` written at rows `rows..` of `buffer` (grown to twice its size, or more, when it is full).
pub(crate) fn write_rows(buffer: Tensor<2>, rows: usize, new: Tensor<2>) -> Tensor<2> {
    let ([capacity, width], n) = (buffer.dims(), new.dims()[0]);
    let buffer = if rows + n > capacity {
        let grown = Tensor::<2>::zeros([(2 * capacity).max(rows + n), width], &buffer.device());
        grown.slice_assign(0..rows, buffer.slice(0..rows))
    } else {
        buffer
    };
    buffer.slice_assign(rows..rows + n, new)
}

/// What one sequence has cached so far, per layer, in its own buffers.
#[derive(Clone)]
pub struct DeviceCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
}

impl DeviceCache {
    /// Appends rows to `layer`'s caches (the prefill's, all layers, then [`Self::advance`]).
    pub(crate) fn store(&mut self, layer: usize, kv: Tensor<2>, index_k: Tensor<2>) {
        let n = kv.dims()[0];
        self.layers[layer] = Some(match self.layers[layer].take() {
            Some(cache) => LayerCache {
                kv: write_rows(cache.kv, cache.rows, kv),
                index_k: write_rows(cache.index_k, cache.rows, index_k),
                rows: cache.rows + n,
            },
            None => LayerCache { kv, index_k, rows: n },
        });
    }

    /// Counts `n` tokens stored in every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a step's sequences keep their cached rows. Sequence `seq` of the step has `cached(seq)` rows before
/// it; the step stores each layer's new rows, then asks for the rows attention reads.
pub(crate) trait CacheRows {
    fn cached(&self, seq: usize) -> usize;
    /// After [`Self::store`]: every sequence's indexer keys of `layer` (cached and new) in one buffer, and
    /// the row where each sequence's start (its keys in position order; what follows its last key up to
    /// the next start is unused).
    fn index_keys(&self, layer: usize, counts: &[usize]) -> (Tensor<2>, Vec<usize>);
    /// Appends every sequence's new rows of `layer` (sequence i's `counts[i]` rows, one after another in
    /// `kv` — the kernel's layout — and `index_k`).
    fn store(&mut self, layer: usize, counts: &[usize], kv: Tensor<2>, index_k: Tensor<2>);
    /// After every sequence stored `layer`'s rows: the KV rows attention reads, and `chosen[i]` (sequence i's
    /// positions, −1 none) as indices into them, padded with −1 to one width and stacked.
    fn attention_rows(&self, layer: usize, chosen: Vec<Tensor<2, Int>>) -> (Tensor<2>, Tensor<2, Int>);
    /// The step's tokens are in every layer: sequence i has `added[i]` more rows.
    fn advance(&mut self, added: &[usize]);
}

/// Sequences' own buffers, laid end to end for attention.
struct OwnBuffers<'a, 'b>(&'a mut [&'b mut DeviceCache]);

impl CacheRows for OwnBuffers<'_, '_> {
    fn cached(&self, seq: usize) -> usize {
        self.0[seq].len
    }
    fn index_keys(&self, layer: usize, _: &[usize]) -> (Tensor<2>, Vec<usize>) {
        let keys: Vec<Tensor<2>> = (self.0.iter())
            .map(|cache| cache.layers[layer].as_ref().expect("stored").index_k())
            .collect();
        let starts = (keys.iter())
            .scan(0, |next, k| {
                let start = *next;
                *next += k.dims()[0];
                Some(start)
            })
            .collect();
        (Tensor::cat(keys, 0), starts)
    }
    fn store(&mut self, layer: usize, counts: &[usize], kv: Tensor<2>, index_k: Tensor<2>) {
        let mut first = 0;
        for (cache, &n) in self.0.iter_mut().zip(counts) {
            let span = first..first + n;
            cache.store(layer, kv.clone().slice(span.clone()), index_k.clone().slice(span));
            first += n;
        }
    }
    fn attention_rows(&self, layer: usize, chosen: Vec<Tensor<2, Int>>) -> (Tensor<2>, Tensor<2, Int>) {
        let (mut kv, mut shifted, mut offset) = (Vec::new(), Vec::new(), 0);
        for (cache, chosen) in self.0.iter().zip(chosen) {
            let stored = cache.layers[layer].as_ref().expect("stored this step");
            kv.push(stored.kv());
            let moved = chosen.clone().add_scalar(offset as i64);
            shifted.push(moved.mask_where(chosen.clone().lower_elem(0), chosen));
            offset += stored.rows;
        }
        (Tensor::cat(kv, 0), stack_padded(shifted))
    }
    fn advance(&mut self, added: &[usize]) {
        for (cache, &n) in self.0.iter_mut().zip(added) {
            cache.advance(n);
        }
    }
}

/// Row blocks of chosen indices stacked, each padded on the right with −1 to the widest.
pub(crate) fn stack_padded(rows: Vec<Tensor<2, Int>>) -> Tensor<2, Int> {
    let width = rows.iter().map(|c| c.dims()[1]).max().unwrap_or(0);
    Tensor::cat(
        rows.into_iter()
            .map(|c| {
                let [n, w] = c.dims();
                if w == width {
                    return c;
                }
                let none = Tensor::<2, Int>::zeros([n, width - w], &c.device()).sub_scalar(1);
                Tensor::cat(vec![c, none], 1)
            })
            .collect(),
        0,
    )
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
        let mut caches = [cache];
        self.step(&mut OwnBuffers(&mut caches), &[ids]).remove(0)
    }

    /// One decode step of several sequences at once: `ids[i]` is appended to `caches[i]`. Returns each
    /// sequence's logits [vocab] on the host.
    pub fn decode_batch(&self, caches: &mut [&mut DeviceCache], ids: &[u32]) -> Vec<Vec<f64>> {
        assert_eq!(caches.len(), ids.len(), "a token per sequence");
        let tokens: Vec<&[u32]> = ids.iter().map(std::slice::from_ref).collect();
        self.step(&mut OwnBuffers(caches), &tokens)
    }

    /// One pass appending `tokens[i]` to sequence i of `rows` (each at least one token; a prompt chunk or a
    /// decode token). Norms, projections, MoE and the LM head run on all the step's tokens at once; the
    /// indexer per sequence over its own keys (query j of a sequence with s cached rows sees keys up to
    /// s + j), attention once over every sequence's chosen rows. Returns each sequence's last logits.
    pub(crate) fn step(&self, rows: &mut impl CacheRows, tokens: &[&[u32]]) -> Vec<Vec<f64>> {
        assert!(
            tokens.iter().all(|t| !t.is_empty()),
            "every sequence takes at least one token"
        );
        let c = &self.config;
        let counts: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let positions = (0..tokens.len()).flat_map(|i| rows.cached(i)..rows.cached(i) + counts[i]);
        let cos_sin = self.cos_sin_at(positions.collect());
        let ids: Vec<u32> = tokens.concat();
        let mut x = self.embed(&ids);
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let h = self.rms_norm(x.clone(), &format!("{p}.input_layernorm.weight"));
            let q_lora = self.q_lora(&p, &h);
            let (latent, k_pe) = self.kv_latent(&p, &h, &cos_sin);
            let kv = self.kv_rows(latent, k_pe);
            let (index_q, index_k, index_w) = self.index_query_key(&p, &h, &q_lora, &cos_sin);
            // Every sequence's rows join its cache; then the indexer's scores and top-k over each sequence's
            // own keys (the new ones included: each token attends to itself).
            rows.store(layer, &counts, kv, index_k);
            let cached: Vec<usize> = (0..counts.len()).map(|i| rows.cached(i)).collect();
            let (keys, starts) = rows.index_keys(layer, &counts);
            let budget = crate::device::ONE_PASS_SCORES;
            let chosen = self.index_choose_all(index_q, index_w, keys, &starts, &cached, &counts, budget);
            let (kv, chosen) = rows.attention_rows(layer, chosen);
            x = x.add(self.attention_sparse(&p, &q_lora, kv, chosen, &cos_sin));
            (x, _) = self.ffn(layer, x);
        }
        rows.advance(&counts);
        // Each sequence's last token, in one gather.
        let last: Vec<i64> = (counts.iter())
            .scan(0, |end, n| {
                *end += n;
                Some(*end as i64 - 1)
            })
            .collect();
        let last = Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(last, [counts.len()]), &self.device);
        // One pass from the device's f32 rows into each sequence's f64 logits (at DeepSeek's vocabulary a
        // step's logits are 64 × 129280: an intermediate copy cost milliseconds).
        let rows = self.lm_logits(x.select(0, last)).into_data();
        let rows = rows.as_slice::<f32>().expect("f32 logits");
        rows.chunks(c.vocab_size)
            .map(|row| row.iter().map(|&v| f64::from(v)).collect())
            .collect()
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
