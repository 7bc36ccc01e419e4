//! Continuous batching with chunked prefill over paged caches: every step runs one batch that decodes one
//! token for each running request and feeds prompt tokens of requests still in prefill (at most
//! `chunked_prefill` of them per step); requests join as others finish (`max_running` at once), reuse the
//! cached prefixes of finished requests ([`PrefixCache`]; not yet those of requests running alongside), and
//! when pages run out the newest running request is preempted (its pages
//! freed, its tokens recomputed later) — requests wait or are recomputed, never dropped.
use crate::pages::{PageId, PagePool, PrefixCache, PrefixMatch};
use std::collections::VecDeque;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_running: usize,
    /// Prompt tokens fed per step, over all requests in prefill.
    pub chunked_prefill: usize,
    /// Longest sequence (prompt + output).
    pub context_length: usize,
}

/// One request's share of a step: feed `tokens` at positions `start..` (the cache below `start` is in
/// `pages`); `wants_token` when they end the sequence so far (the engine returns the next token).
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    pub request: u64,
    pub start: usize,
    pub tokens: Vec<u32>,
    pub pages: Vec<PageId>,
    pub wants_token: bool,
}

/// The model side: runs a step's batch, returns the next token of each item that wants one (in order).
pub trait Engine {
    fn run(&mut self, batch: &[Work]) -> Vec<u32>;
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token { request: u64, token: u32 },
    Finished { request: u64, reason: FinishReason },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// max_tokens reached.
    Length,
    /// A stop token.
    Stop,
    /// The context length is reached.
    Context,
}

struct Request {
    id: u64,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    /// Tokens whose cache is in `pages`.
    computed: usize,
    pages: Vec<PageId>,
    prefix: Option<PrefixMatch>,
}

pub struct Scheduler {
    config: SchedulerConfig,
    pool: PagePool,
    cache: PrefixCache,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    /// Preemptions so far (requests sent back to wait for pages).
    pub preemptions: usize,
    /// Whether finished requests' pages serve later requests' prefixes (`--disable-radix-cache` turns off).
    prefix_reuse: bool,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, pool: PagePool) -> Scheduler {
        assert!(config.max_running > 0 && config.chunked_prefill > 0);
        Scheduler {
            config,
            pool,
            cache: PrefixCache::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_reuse: true,
        }
    }

    /// Every request computes its whole prompt (SGLang's `--disable-radix-cache`).
    pub fn disable_prefix_reuse(&mut self) {
        self.prefix_reuse = false;
    }

    /// Drops request `id` wherever it is (its client went away); false if it is not here. What it computed
    /// stays as a cached prefix.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(index) = self.waiting.iter().position(|r| r.id == id) {
            let mut request = self.waiting.remove(index).expect("found");
            self.release(&mut request);
            return true;
        }
        if let Some(index) = self.running.iter().position(|r| r.id == id) {
            let request = self.running.remove(index);
            self.retire(request);
            return true;
        }
        false
    }

    /// Pages in use by running requests or cached prefixes.
    pub fn used_pages(&self) -> usize {
        self.pool.total_pages() - self.pool.free_pages()
    }

    pub fn total_pages(&self) -> usize {
        self.pool.total_pages()
    }

    /// Queues a request; an empty prompt, one past the context length or one no pool could hold is refused.
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, max_tokens: usize, stop_tokens: Vec<u32>) -> Result<(), String> {
        if prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if prompt.len() >= self.config.context_length {
            return Err(format!(
                "the prompt has {} tokens; the context length is {}",
                prompt.len(),
                self.config.context_length
            ));
        }
        let longest = (prompt.len() + max_tokens).min(self.config.context_length);
        if longest.div_ceil(self.pool.page_size()) > self.pool.total_pages() {
            return Err(format!("{longest} tokens need more cache pages than exist"));
        }
        self.waiting.push_back(Request {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens,
            stop_tokens,
            computed: 0,
            pages: Vec::new(),
            prefix: None,
        });
        Ok(())
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn free_pages(&self) -> usize {
        self.pool.free_pages()
    }

    /// Pages holding cached prefixes (no request uses them now).
    pub fn cached_pages(&self) -> usize {
        self.cache.cached_pages()
    }

    /// One step: admit, batch, run, collect.
    pub fn step(&mut self, engine: &mut dyn Engine) -> Vec<Event> {
        self.admit();
        let batch = self.plan();
        if batch.is_empty() {
            return Vec::new();
        }
        let mut tokens = engine.run(&batch).into_iter();
        let mut events = Vec::new();
        for work in &batch {
            let index = self
                .running
                .iter()
                .position(|r| r.id == work.request)
                .expect("planned request runs");
            let request = &mut self.running[index];
            request.computed = work.start + work.tokens.len();
            if !work.wants_token {
                continue;
            }
            let token = tokens.next().expect("a token for every item that wants one");
            request.tokens.push(token);
            events.push(Event::Token {
                request: request.id,
                token,
            });
            let generated = request.tokens.len() - request.prompt_len;
            let reason = if request.stop_tokens.contains(&token) {
                Some(FinishReason::Stop)
            } else if generated >= request.max_tokens {
                Some(FinishReason::Length)
            } else if request.tokens.len() >= self.config.context_length {
                Some(FinishReason::Context)
            } else {
                None
            };
            if let Some(reason) = reason {
                let request = self.running.remove(index);
                events.push(Event::Finished {
                    request: request.id,
                    reason,
                });
                self.retire(request);
            }
        }
        events
    }

    /// Waiting requests join (oldest first) while there is room; each starts from its longest cached prefix.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(mut request) = self.waiting.pop_front() else {
                return;
            };
            // At least the last token is computed again: its logits give the next token.
            let usable = &request.tokens[..request.tokens.len() - 1];
            let usable = if self.prefix_reuse { usable } else { &[] };
            let found = self.cache.lookup(usable, &mut self.pool);
            request.computed = found.tokens;
            request.pages = found.pages.clone();
            request.prefix = Some(found);
            self.running.push(request);
        }
    }

    /// The step's batch: decodes first, then prefill chunks within the budget; pages for all of it
    /// (preempting the newest requests when they run out).
    fn plan(&mut self) -> Vec<Work> {
        let mut budget = self.config.chunked_prefill;
        let mut batch = Vec::new();
        let mut index = 0;
        while index < self.running.len() {
            let request = &self.running[index];
            let remaining = request.tokens.len() - request.computed;
            let n = if remaining == 1 { 1 } else { remaining.min(budget) };
            if n == 0 {
                index += 1;
                continue;
            }
            let end = request.computed + n;
            let needed = end.div_ceil(self.pool.page_size()).saturating_sub(request.pages.len());
            if !self.reserve(needed, index) {
                // This request itself was preempted (it was the newest): its place is taken by the next.
                continue;
            }
            let request = &mut self.running[index];
            if needed > 0 {
                let fresh = self.pool.alloc(needed).expect("reserved");
                request.pages.extend(fresh);
            }
            if remaining > 1 {
                budget -= n;
            }
            batch.push(Work {
                request: request.id,
                start: request.computed,
                tokens: request.tokens[request.computed..end].to_vec(),
                pages: request.pages.clone(),
                wants_token: end == request.tokens.len(),
            });
            index += 1;
        }
        batch
    }

    /// Makes `pages` free: evicting cached prefixes, then preempting the newest running requests other
    /// than those already planned (index < `current`). False when `current` itself had to go.
    fn reserve(&mut self, pages: usize, current: usize) -> bool {
        loop {
            if self.pool.free_pages() >= pages || self.cache.evict(pages, &mut self.pool) {
                return true;
            }
            let victim = self.running.len() - 1;
            if victim < current {
                unreachable!("the planned requests' pages fit: add() refuses requests larger than the pool");
            }
            let request = self.running.remove(victim);
            self.preemptions += 1;
            self.preempt(request);
            if victim == current {
                return false;
            }
        }
    }

    /// Back to the front of the queue with no pages: its tokens so far are recomputed when it returns.
    fn preempt(&mut self, mut request: Request) {
        self.release(&mut request);
        request.computed = 0;
        self.waiting.push_front(request);
    }

    /// A finished request's full pages become a cached prefix; its own references go.
    fn retire(&mut self, mut request: Request) {
        let cached = if self.prefix_reuse {
            request.computed.min(request.tokens.len())
        } else {
            0
        };
        self.cache
            .insert(&request.tokens[..cached], &request.pages, &mut self.pool);
        self.release(&mut request);
    }

    fn release(&mut self, request: &mut Request) {
        if let Some(prefix) = request.prefix.take() {
            self.cache.unlock(&prefix);
        }
        for page in request.pages.drain(..) {
            self.pool.release(page);
        }
    }
}
