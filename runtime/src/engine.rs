//! The model side of the scheduler: runs a step's batch on a model with a per-sequence cache (the host
//! reference's latent cache or the device model's), keeping the cache's rows in the scheduler's pages so
//! that a request reusing a cached prefix, or one recomputed after preemption, starts from the pages'
//! rows. Samples each request's next token with its own parameters and seed.
use crate::pages::PageId;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::scheduler::{Engine, Work};
use nsa_model::device::DeviceModel;
use nsa_model::device_decode::DeviceCache;
use nsa_model::reference::ReferenceModel;
use nsa_model::reference_decode::LatentCache;
use std::collections::HashMap;

/// A model that extends a sequence's cache token by token and slices / joins caches by rows.
pub trait CachedModel {
    type Cache: Clone;
    fn empty_cache(&self) -> Self::Cache;
    fn cache_len(cache: &Self::Cache) -> usize;
    /// Feeds `tokens` at positions `cache_len..`; the last token's logits.
    fn extend(&self, cache: &mut Self::Cache, tokens: &[u32]) -> Vec<f64>;
    fn slice(cache: &Self::Cache, start: usize, end: usize) -> Self::Cache;
    /// Joins non-empty parts.
    fn concat(parts: &[Self::Cache]) -> Self::Cache;
    /// Appends `tokens[i]` to `caches[i]` for every sequence; each one's logits. One by one unless the
    /// model batches.
    fn decode_batch(&self, caches: &mut [&mut Self::Cache], tokens: &[u32]) -> Vec<Vec<f64>> {
        caches
            .iter_mut()
            .zip(tokens)
            .map(|(cache, &token)| self.extend(cache, &[token]))
            .collect()
    }
}

impl CachedModel for ReferenceModel {
    type Cache = LatentCache;
    fn empty_cache(&self) -> LatentCache {
        self.new_cache()
    }
    fn cache_len(cache: &LatentCache) -> usize {
        cache.len()
    }
    /// Token by token through the decode path, so a sequence's results do not depend on how the
    /// scheduler chunked it (batched greedy outputs equal single-request ones exactly).
    fn extend(&self, cache: &mut LatentCache, tokens: &[u32]) -> Vec<f64> {
        let mut logits = Vec::new();
        for &token in tokens {
            logits = self.decode_step(cache, token);
        }
        logits
    }
    fn slice(cache: &LatentCache, start: usize, end: usize) -> LatentCache {
        cache.slice(start, end)
    }
    fn concat(parts: &[LatentCache]) -> LatentCache {
        LatentCache::concat(parts)
    }
}

impl CachedModel for DeviceModel {
    type Cache = DeviceCache;
    fn empty_cache(&self) -> DeviceCache {
        self.new_cache()
    }
    fn cache_len(cache: &DeviceCache) -> usize {
        cache.len()
    }
    /// A fresh sequence's tokens in one prefill; later chunks in one pass over the cached prefix.
    fn extend(&self, cache: &mut DeviceCache, tokens: &[u32]) -> Vec<f64> {
        if cache.is_empty() && tokens.len() > 1 {
            let (logits, filled) = self.prefill_prompt(tokens);
            *cache = filled;
            return logits;
        }
        DeviceModel::extend(self, cache, tokens)
    }
    fn slice(cache: &DeviceCache, start: usize, end: usize) -> DeviceCache {
        cache.slice(start, end)
    }
    fn concat(parts: &[DeviceCache]) -> DeviceCache {
        DeviceCache::concat(parts)
    }
    /// One batched step (projections and MoE over all sequences at once).
    fn decode_batch(&self, caches: &mut [&mut DeviceCache], tokens: &[u32]) -> Vec<Vec<f64>> {
        DeviceModel::decode_batch(self, caches, tokens)
    }
}

struct Sequence {
    params: SamplingParams,
    sampler: Sampler,
    top_logprobs: usize,
}

impl Sequence {
    fn new(params: SamplingParams, seed: Option<u64>, top_logprobs: usize) -> Sequence {
        Sequence {
            params,
            sampler: Sampler::new(seed),
            top_logprobs,
        }
    }
}

pub struct ModelEngine<M: CachedModel> {
    model: M,
    page_size: usize,
    /// Caches of the sequences that ran last step, by request.
    caches: HashMap<u64, M::Cache>,
    /// The rows each full page holds, written when its sequence finishes (only finished sequences' full
    /// pages are reused as prefixes; a preempted sequence starts again from nothing).
    pages: HashMap<PageId, M::Cache>,
    /// Each running sequence's pages, as its last step listed them.
    sequence_pages: HashMap<u64, Vec<PageId>>,
    sequences: HashMap<u64, Sequence>,
    /// What the last step sampled, by request (log-probabilities for the response).
    sampled: HashMap<u64, Sampled>,
    /// Sequences that started from a cached prefix's pages.
    pub prefix_hits: usize,
}

impl<M: CachedModel> ModelEngine<M> {
    pub fn new(model: M, page_size: usize) -> ModelEngine<M> {
        ModelEngine {
            model,
            page_size,
            caches: HashMap::new(),
            pages: HashMap::new(),
            sequence_pages: HashMap::new(),
            sequences: HashMap::new(),
            sampled: HashMap::new(),
            prefix_hits: 0,
        }
    }

    /// Sampling of `request`'s tokens (before the scheduler first runs it).
    pub fn register(&mut self, request: u64, params: SamplingParams, seed: Option<u64>, top_logprobs: usize) {
        self.sequences
            .insert(request, Sequence::new(params, seed, top_logprobs));
    }

    /// `request` finished or was cancelled: its full pages take its rows (a later request may reuse them as
    /// a prefix); its cache and sampler go.
    pub fn forget(&mut self, request: u64) {
        if let (Some(cache), Some(pages)) = (self.caches.get(&request), self.sequence_pages.remove(&request)) {
            let full = M::cache_len(cache) / self.page_size;
            for (i, page) in pages.iter().enumerate().take(full) {
                let rows = M::slice(cache, i * self.page_size, (i + 1) * self.page_size);
                self.pages.insert(*page, rows);
            }
        }
        self.caches.remove(&request);
        self.sequences.remove(&request);
        self.sampled.remove(&request);
    }

    /// The token sampled for `request` in the last step, with its log-probabilities.
    pub fn take_sampled(&mut self, request: u64) -> Option<Sampled> {
        self.sampled.remove(&request)
    }

    /// The sequence's cache holding exactly `work.start` rows: its own from the last step, or rebuilt from
    /// its pages (a cached prefix, or a recompute after preemption).
    fn cache_for(&mut self, work: &Work) -> M::Cache {
        if let Some(cache) = self.caches.remove(&work.request)
            && M::cache_len(&cache) == work.start
        {
            return cache;
        }
        if work.start == 0 {
            return self.model.empty_cache();
        }
        self.prefix_hits += 1;
        let parts: Vec<M::Cache> = (0..work.start.div_ceil(self.page_size))
            .map(|i| {
                let rows = self
                    .pages
                    .get(&work.pages[i])
                    .expect("a prefix page's rows were written");
                let take = (work.start - i * self.page_size).min(self.page_size);
                M::slice(rows, 0, take)
            })
            .collect();
        M::concat(&parts)
    }
}

impl<M: CachedModel> Engine for ModelEngine<M> {
    /// Prompt chunks run sequence by sequence; every single-token item (decodes) runs in one batched step.
    fn run(&mut self, batch: &[Work]) -> Vec<u32> {
        let mut caches: Vec<M::Cache> = batch.iter().map(|work| self.cache_for(work)).collect();
        let mut logits: Vec<Vec<f64>> = vec![Vec::new(); batch.len()];
        let decodes: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tokens.len() == 1).collect();
        for (i, work) in batch.iter().enumerate().filter(|(_, w)| w.tokens.len() > 1) {
            logits[i] = self.model.extend(&mut caches[i], &work.tokens);
        }
        if !decodes.is_empty() {
            let tokens: Vec<u32> = decodes.iter().map(|&i| batch[i].tokens[0]).collect();
            let mut decoding: Vec<&mut M::Cache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| batch[*i].tokens.len() == 1)
                .map(|(_, cache)| cache)
                .collect();
            let results = self.model.decode_batch(&mut decoding, &tokens);
            for (&i, result) in decodes.iter().zip(results) {
                logits[i] = result;
            }
        }
        let mut tokens = Vec::new();
        for ((work, cache), logits) in batch.iter().zip(caches).zip(logits) {
            self.sequence_pages.insert(work.request, work.pages.clone());
            self.caches.insert(work.request, cache);
            if work.wants_token {
                let sequence = (self.sequences.entry(work.request))
                    .or_insert_with(|| Sequence::new(SamplingParams::default(), None, 0));
                let sampled = sequence
                    .sampler
                    .sample(&logits, &sequence.params, sequence.top_logprobs);
                tokens.push(sampled.token);
                self.sampled.insert(work.request, sampled);
            }
        }
        tokens
    }
}
