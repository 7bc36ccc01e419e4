//! Prometheus metrics (`GET /metrics`, text format 0.0.4): the scheduler's queue, running requests and
//! cache use, token counters (rates come from Prometheus' `rate()`; the generation rate of the last
//! [`THROUGHPUT_WINDOW`] also as a gauge, as SGLang's `gen_throughput`), time to first token and
//! inter-token latency as histograms.
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The span `nsa_gen_throughput` averages over.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bucket, count) in LATENCY_BUCKETS.iter().zip(&mut self.counts) {
            if seconds <= *bucket {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, count) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bucket}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    requests: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    used_pages: AtomicU64,
    total_pages: AtomicU64,
    preemptions: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    /// Generated tokens by time, the last window's.
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

/// Drops entries older than the window.
fn prune(recent: &mut VecDeque<(Instant, u64)>, now: Instant) {
    while recent
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > THROUGHPUT_WINDOW)
    {
        recent.pop_front();
    }
}

impl Metrics {
    pub fn request(&self, prompt_tokens: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    pub fn generated(&self, tokens: u64) {
        self.generation_tokens.fetch_add(tokens, Ordering::Relaxed);
        let now = Instant::now();
        let mut recent = self.recent.lock().expect("metrics lock");
        prune(&mut recent, now);
        recent.push_back((now, tokens));
    }

    /// Tokens a second generated over the last window.
    fn throughput(&self) -> f64 {
        let mut recent = self.recent.lock().expect("metrics lock");
        prune(&mut recent, Instant::now());
        recent.iter().map(|(_, n)| *n).sum::<u64>() as f64 / THROUGHPUT_WINDOW.as_secs_f64()
    }
    pub fn time_to_first_token(&self, seconds: f64) {
        self.ttft.lock().expect("metrics lock").observe(seconds);
    }
    pub fn inter_token_latency(&self, seconds: f64) {
        self.itl.lock().expect("metrics lock").observe(seconds);
    }
    pub fn set_scheduler(
        &self,
        running: usize,
        waiting: usize,
        used_pages: usize,
        total_pages: usize,
        preemptions: usize,
    ) {
        self.preemptions.store(preemptions as u64, Ordering::Relaxed);
        self.running.store(running as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
        self.used_pages.store(used_pages as u64, Ordering::Relaxed);
        self.total_pages.store(total_pages as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric(
            "nsa_requests_total",
            "counter",
            "Requests accepted.",
            get(&self.requests).to_string(),
        );
        metric(
            "nsa_requests_failed_total",
            "counter",
            "Requests answered with an error.",
            get(&self.failed).to_string(),
        );
        metric(
            "nsa_requests_cancelled_total",
            "counter",
            "Requests whose client went away.",
            get(&self.cancelled).to_string(),
        );
        metric(
            "nsa_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            get(&self.prompt_tokens).to_string(),
        );
        metric(
            "nsa_generation_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.generation_tokens).to_string(),
        );
        metric(
            "nsa_gen_throughput",
            "gauge",
            "Tokens generated a second, over the last 10 s.",
            self.throughput().to_string(),
        );
        metric(
            "nsa_num_running_reqs",
            "gauge",
            "Requests in the running batch.",
            get(&self.running).to_string(),
        );
        metric(
            "nsa_num_queue_reqs",
            "gauge",
            "Requests waiting to run.",
            get(&self.waiting).to_string(),
        );
        metric(
            "nsa_preemptions_total",
            "counter",
            "Requests sent back to wait for cache pages (recomputed later).",
            get(&self.preemptions).to_string(),
        );
        let (used, total) = (get(&self.used_pages), get(&self.total_pages).max(1));
        metric(
            "nsa_cache_pages_used",
            "gauge",
            "KV cache pages in use (running or cached prefixes).",
            used.to_string(),
        );
        metric(
            "nsa_cache_usage",
            "gauge",
            "Fraction of KV cache pages in use.",
            format!("{}", used as f64 / total as f64),
        );
        self.ttft.lock().expect("metrics lock").write(
            &mut out,
            "nsa_time_to_first_token_seconds",
            "Time to first token.",
        );
        self.itl.lock().expect("metrics lock").write(
            &mut out,
            "nsa_inter_token_latency_seconds",
            "Time between streamed tokens.",
        );
        out
    }
}
