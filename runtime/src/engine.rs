//! The model side of the scheduler: runs a step's batch on a model with a per-sequence cache, and samples
//! each request's next token with its own parameters and seed. The burn device model keeps every
//! sequence's rows in the scheduler's pages of one store ([`nsa_model::paged`]: a request reusing a cached
//! prefix reads those pages as they are); the host reference keeps a cache per sequence and copies of full
//! pages, from which a prefix (or a recompute after preemption) is rebuilt.
use crate::pages::PageId;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::scheduler::{Engine, Work};
use nsa_model::device::DeviceModel;
use nsa_model::paged::{KvFormat, PageTable, PagedStore};
use nsa_model::reference::ReferenceModel;
use nsa_model::reference_decode::LatentCache;
use std::collections::HashMap;

/// A model that extends sequences' caches: either in the scheduler's pages of a store it owns (`PAGED`),
/// or in per-sequence caches that slice into page copies and join back.
pub trait CachedModel {
    type Cache: Clone;
    /// Where paged caches keep their rows (nothing for per-sequence caches).
    type Store;
    /// Whether caches live in the scheduler's pages of the store: then a cache is rebuilt from its pages
    /// by [`Self::in_pages`], never copied.
    const PAGED: bool;
    /// The store for pages of `page_size` tokens, KV rows in `format` (an error where the model cannot).
    fn new_store(&self, page_size: usize, format: KvFormat) -> Result<Self::Store, String>;
    fn empty_cache(&self) -> Self::Cache;
    fn cache_len(cache: &Self::Cache) -> usize;
    /// Paged models: the cache of the first `len` positions, held in `pages`.
    fn in_pages(pages: &[PageId], len: usize) -> Self::Cache;
    /// Per-sequence models: the rows of positions `start..end` (a page's copy).
    fn slice(cache: &Self::Cache, start: usize, end: usize) -> Self::Cache;
    /// Per-sequence models: non-empty parts joined.
    fn concat(parts: &[Self::Cache]) -> Self::Cache;
    /// Appends `tokens[i]` (a prompt chunk or a decode token) to `caches[i]` (a paged cache's pages cover the
    /// new positions); each sequence's last logits.
    fn run_step(&self, store: &mut Self::Store, caches: &mut [&mut Self::Cache], tokens: &[&[u32]]) -> Vec<Vec<f64>>;
}

impl CachedModel for ReferenceModel {
    type Cache = LatentCache;
    type Store = ();
    const PAGED: bool = false;
    fn new_store(&self, _: usize, format: KvFormat) -> Result<(), String> {
        match format {
            KvFormat::F32 => Ok(()),
            narrow => Err(format!(
                "the host reference keeps f64 caches: a {} cache needs a device model (--device cuda, hip or wgpu)",
                narrow.name()
            )),
        }
    }
    fn empty_cache(&self) -> LatentCache {
        self.new_cache()
    }
    fn cache_len(cache: &LatentCache) -> usize {
        cache.len()
    }
    fn in_pages(_: &[PageId], _: usize) -> LatentCache {
        unreachable!("the host reference's caches are not paged")
    }
    fn slice(cache: &LatentCache, start: usize, end: usize) -> LatentCache {
        cache.slice(start, end)
    }
    fn concat(parts: &[LatentCache]) -> LatentCache {
        LatentCache::concat(parts)
    }
    /// Token by token through the decode path, so a sequence's results do not depend on how the
    /// scheduler chunked or batched it (batched greedy outputs equal single-request ones exactly).
    fn run_step(&self, _: &mut (), caches: &mut [&mut LatentCache], tokens: &[&[u32]]) -> Vec<Vec<f64>> {
        (caches.iter_mut().zip(tokens))
            .map(|(cache, tokens)| {
                let mut logits = Vec::new();
                for &token in *tokens {
                    logits = self.decode_step(cache, token);
                }
                logits
            })
            .collect()
    }
}

impl CachedModel for DeviceModel {
    type Cache = PageTable;
    type Store = PagedStore;
    const PAGED: bool = true;
    fn new_store(&self, page_size: usize, format: KvFormat) -> Result<PagedStore, String> {
        Ok(DeviceModel::new_store(self, page_size, format))
    }
    fn empty_cache(&self) -> PageTable {
        PageTable::default()
    }
    fn cache_len(cache: &PageTable) -> usize {
        cache.len
    }
    fn in_pages(pages: &[PageId], len: usize) -> PageTable {
        PageTable {
            pages: pages.to_vec(),
            len,
        }
    }
    fn slice(_: &PageTable, _: usize, _: usize) -> PageTable {
        unreachable!("paged caches stay in their pages")
    }
    fn concat(_: &[PageTable]) -> PageTable {
        unreachable!("paged caches stay in their pages")
    }
    /// Each prompt chunk in a pass of its own, then every decode token in one pass over the store. (One pass
    /// for the whole batch works too, but every new mix of chunk lengths is a new shape for burn's JIT: at
    /// 64 concurrent requests on the H200 that compiled more than it ran, 205 against 338 tokens/s.)
    fn run_step(&self, store: &mut PagedStore, caches: &mut [&mut PageTable], tokens: &[&[u32]]) -> Vec<Vec<f64>> {
        let mut logits = vec![Vec::new(); tokens.len()];
        let (mut decodes, mut decode_tokens) = (Vec::new(), Vec::new());
        for (i, (cache, tokens)) in caches.iter_mut().zip(tokens).enumerate() {
            if tokens.len() == 1 {
                decodes.push(&mut **cache);
                decode_tokens.push(*tokens);
            } else {
                logits[i] = self.step_paged(store, &mut [&mut **cache], &[*tokens]).remove(0);
            }
        }
        if !decodes.is_empty() {
            let results = self.step_paged(store, &mut decodes, &decode_tokens);
            let single = (0..tokens.len()).filter(|&i| tokens[i].len() == 1);
            for (i, result) in single.zip(results) {
                logits[i] = result;
            }
        }
        logits
    }
}

struct Sequence {
    params: SamplingParams,
    sampler: Sampler,
    logprobs: Option<usize>,
}

impl Sequence {
    fn new(params: SamplingParams, seed: Option<u64>, logprobs: Option<usize>) -> Sequence {
        Sequence {
            params,
            sampler: Sampler::new(seed),
            logprobs,
        }
    }
}

pub struct ModelEngine<M: CachedModel> {
    model: M,
    page_size: usize,
    store: M::Store,
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
        Self::with_cache(model, page_size, KvFormat::F32).expect("every model keeps a cache in its own dtype")
    }

    /// With the KV cache in `format` (`--kv-cache-dtype`; bf16 and FP8 on device models only).
    pub fn with_cache(model: M, page_size: usize, format: KvFormat) -> Result<ModelEngine<M>, String> {
        Ok(ModelEngine {
            store: model.new_store(page_size, format)?,
            model,
            page_size,
            caches: HashMap::new(),
            pages: HashMap::new(),
            sequence_pages: HashMap::new(),
            sequences: HashMap::new(),
            sampled: HashMap::new(),
            prefix_hits: 0,
        })
    }

    /// Sampling of `request`'s tokens (before the scheduler first runs it).
    pub fn register(&mut self, request: u64, params: SamplingParams, seed: Option<u64>, logprobs: Option<usize>) {
        self.sequences.insert(request, Sequence::new(params, seed, logprobs));
    }

    /// `request` finished or was cancelled: its full pages take its rows (a later request may reuse them as
    /// a prefix; paged models' rows are in them already); its cache and sampler go.
    pub fn forget(&mut self, request: u64) {
        if let (false, Some(cache), Some(pages)) = (
            M::PAGED,
            self.caches.get(&request),
            self.sequence_pages.remove(&request),
        ) {
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
        let previous = (self.caches.remove(&work.request)).filter(|cache| M::cache_len(cache) == work.start);
        if M::PAGED {
            // A paged cache is the work's pages and length: the rows are in the store already.
            if previous.is_none() && work.start > 0 {
                self.prefix_hits += 1;
            }
            return M::in_pages(&work.pages, work.start);
        }
        if let Some(cache) = previous {
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
    /// The step's prompt chunks and decode tokens in one call of the model.
    fn run(&mut self, batch: &[Work]) -> Vec<u32> {
        let mut caches: Vec<M::Cache> = batch.iter().map(|work| self.cache_for(work)).collect();
        let tokens: Vec<&[u32]> = batch.iter().map(|work| work.tokens.as_slice()).collect();
        let mut refs: Vec<&mut M::Cache> = caches.iter_mut().collect();
        let logits = self.model.run_step(&mut self.store, &mut refs, &tokens);
        let mut tokens = Vec::new();
        for ((work, cache), logits) in batch.iter().zip(caches).zip(logits) {
            self.sequence_pages.insert(work.request, work.pages.clone());
            self.caches.insert(work.request, cache);
            if work.wants_token {
                let sequence = (self.sequences.entry(work.request))
                    .or_insert_with(|| Sequence::new(SamplingParams::default(), None, None));
                let sampled = sequence.sampler.sample(&logits, &sequence.params, sequence.logprobs);
                tokens.push(sampled.token);
                self.sampled.insert(work.request, sampled);
            }
        }
        tokens
    }
}
