//! The scheduler against an engine that, like a real one, sees only the pages' cached tokens and the new
//! ones: whatever the batching, prefix reuse or preemption, every request's output must equal running it
//! alone, and no request is lost.
use nsa_runtime::pages::{PageId, PagePool};
use nsa_runtime::scheduler::{Engine, Event, FinishReason, Scheduler, SchedulerConfig, Work};
use std::collections::HashMap;

const PAGE: usize = 4;

/// The "model": the next token is a hash of the whole sequence.
fn next_token(sequence: &[u32]) -> u32 {
    let hash = sequence.iter().fold(0xcbf29ce484222325u64, |h, t| {
        (h ^ *t as u64).wrapping_mul(0x100000001b3)
    });
    (hash % 50) as u32
}

/// Stores fed tokens in page slots and reads the sequence back from them.
#[derive(Default)]
struct PagedEngine {
    slots: HashMap<PageId, Vec<Option<u32>>>,
    /// Requests whose first work started past position 0: they reused another request's pages.
    reused: usize,
    started: std::collections::HashSet<u64>,
}

impl Engine for PagedEngine {
    fn run(&mut self, batch: &[Work]) -> Vec<u32> {
        let mut out = Vec::new();
        for work in batch {
            if self.started.insert(work.request) && work.start > 0 {
                self.reused += 1;
            }
            let mut sequence: Vec<u32> = (0..work.start)
                .map(|pos| {
                    self.slots
                        .get(&work.pages[pos / PAGE])
                        .and_then(|s| s[pos % PAGE])
                        .unwrap_or_else(|| {
                            panic!(
                                "request {} reads position {pos}, never written to its page",
                                work.request
                            )
                        })
                })
                .collect();
            for (i, token) in work.tokens.iter().enumerate() {
                let pos = work.start + i;
                self.slots
                    .entry(work.pages[pos / PAGE])
                    .or_insert_with(|| vec![None; PAGE])[pos % PAGE] = Some(*token);
                sequence.push(*token);
            }
            if work.wants_token {
                out.push(next_token(&sequence));
            }
        }
        out
    }
}

/// The output of `prompt` run alone: the sequence hash chain, up to max_tokens or a stop token.
fn alone(prompt: &[u32], max_tokens: usize, stop: u32) -> Vec<u32> {
    let mut sequence = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let token = next_token(&sequence);
        sequence.push(token);
        out.push(token);
        if token == stop {
            break;
        }
    }
    out
}

/// Every request run to the end: the outputs, preemptions and prefix reuses.
fn run_all(
    config: SchedulerConfig,
    pages: usize,
    requests: &[(Vec<u32>, usize)],
) -> (HashMap<u64, Vec<u32>>, usize, usize) {
    run_all_with(Scheduler::new(config, PagePool::new(pages, PAGE)), pages, requests)
}

fn run_all_with(
    mut scheduler: Scheduler,
    pages: usize,
    requests: &[(Vec<u32>, usize)],
) -> (HashMap<u64, Vec<u32>>, usize, usize) {
    for (id, (prompt, max_tokens)) in requests.iter().enumerate() {
        scheduler.add(id as u64, prompt.clone(), *max_tokens, vec![7]).unwrap();
    }
    let mut engine = PagedEngine::default();
    let mut outputs: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut finished = 0;
    for _ in 0..10_000 {
        if scheduler.is_idle() {
            break;
        }
        for event in scheduler.step(&mut engine) {
            match event {
                Event::Token { request, token } => outputs.entry(request).or_default().push(token),
                Event::Finished { reason, .. } => {
                    assert_ne!(reason, FinishReason::Context);
                    finished += 1;
                }
            }
        }
    }
    assert!(scheduler.is_idle(), "requests left after 10 000 steps");
    assert_eq!(finished, requests.len(), "every request finishes");
    assert_eq!(
        scheduler.free_pages() + scheduler.cached_pages(),
        pages,
        "every page free or cached"
    );
    (outputs, scheduler.preemptions, engine.reused)
}

fn workload() -> Vec<(Vec<u32>, usize)> {
    // Three shared stems (prefix reuse) with different tails and lengths.
    (0..24u32)
        .map(|i| {
            let stem: Vec<u32> = (0..9).map(|t| 100 * (i % 3) + t).collect();
            let tail: Vec<u32> = (0..(i % 5)).map(|t| 1000 + i * 10 + t).collect();
            ([stem, tail].concat(), 3 + (i as usize % 7))
        })
        .collect()
}

#[test]
fn batched_outputs_equal_running_each_request_alone() {
    let requests = workload();
    for (max_running, chunk, pages) in [(1, 64, 64), (8, 5, 64), (24, 3, 64), (6, 2, 12)] {
        let config = SchedulerConfig {
            max_running,
            chunked_prefill: chunk,
            context_length: 64,
        };
        let (outputs, preemptions, reused) = run_all(config, pages, &requests);
        // Prefixes are cached when requests finish: with fewer slots than requests, later ones reuse them.
        if max_running < requests.len() {
            assert!(reused > 0, "shared stems reuse cached pages");
        }
        for (id, (prompt, max_tokens)) in requests.iter().enumerate() {
            assert_eq!(
                outputs[&(id as u64)],
                alone(prompt, *max_tokens, 7),
                "request {id} with max_running {max_running}, chunk {chunk}, {pages} pages"
            );
        }
        if pages == 12 {
            assert!(preemptions > 0, "a 12-page pool forces preemption");
        }
    }
}

/// `--disable-radix-cache`: the same outputs, and no page ever reused (the shared stems of the workload
/// are reused when it is on: `batched_outputs_equal_running_each_request_alone`).
#[test]
fn disabled_prefix_reuse_reuses_nothing() {
    let requests = workload();
    let config = SchedulerConfig {
        max_running: 4,
        chunked_prefill: 5,
        context_length: 64,
    };
    let mut scheduler = Scheduler::new(config, PagePool::new(64, PAGE));
    scheduler.disable_prefix_reuse();
    let (outputs, _, reused) = run_all_with(scheduler, 64, &requests);
    assert_eq!(reused, 0, "pages reused with prefix reuse off");
    for (id, (prompt, max_tokens)) in requests.iter().enumerate() {
        assert_eq!(outputs[&(id as u64)], alone(prompt, *max_tokens, 7), "request {id}");
    }
}

#[test]
fn requests_that_cannot_run_are_refused_with_the_reason() {
    let config = SchedulerConfig {
        max_running: 4,
        chunked_prefill: 8,
        context_length: 16,
    };
    let mut scheduler = Scheduler::new(config, PagePool::new(2, PAGE));
    assert!(scheduler.add(0, vec![], 4, vec![]).unwrap_err().contains("empty"));
    assert!(
        scheduler
            .add(1, vec![1; 16], 4, vec![])
            .unwrap_err()
            .contains("context length")
    );
    assert!(scheduler.add(2, vec![1; 8], 4, vec![]).unwrap_err().contains("pages"));
    assert!(scheduler.add(3, vec![1; 4], 4, vec![]).is_ok());
}
