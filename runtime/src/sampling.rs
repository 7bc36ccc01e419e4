//! Choosing the next token from a position's logits, as OpenAI's and SGLang's sampling parameters define it:
//! temperature (0 = greedy), top_k, top_p (nucleus), min_p (relative to the most likely token), a seed for
//! reproducible draws, and log-probabilities of the chosen and the most likely tokens. Stop strings are
//! matched on the streamed text by [`StopMatcher`].
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy (the most likely token; ties to the lowest id).
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p; 1 keeps all.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Drop tokens less likely than min_p × the most likely one's probability; 0 keeps all.
    pub min_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
        }
    }
}

impl SamplingParams {
    /// Rejects values outside the parameters' ranges, naming the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        Ok(())
    }
}

/// The chosen token and log-probabilities (natural log, of the distribution before any filtering at
/// temperature 1, as OpenAI reports them).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// `None` when logprobs were not requested.
    pub logprob: Option<f64>,
    /// The requested number of most likely tokens, most likely first.
    pub top_logprobs: Vec<(u32, f64)>,
}

/// The sorted prefix [`Sampler`]'s top-p search and draw start with (grown 8× while too short).
const PREFIX_FIRST: usize = 256;

/// Draws tokens for one request; seeded for reproducible sampling.
pub struct Sampler {
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(seed: Option<u64>) -> Sampler {
        Sampler {
            rng: match seed {
                Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
                None => rand::rngs::StdRng::from_os_rng(),
            },
        }
    }

    /// The next token; with `logprobs` (`Some(n)`: the n most likely reported too) its log-probability,
    /// a pass over the vocabulary that greedy serving without logprobs does not pay.
    pub fn sample(&mut self, logits: &[f64], params: &SamplingParams, logprobs: Option<usize>) -> Sampled {
        assert!(!logits.is_empty(), "sampling from no logits");
        let token = if params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits, params)
        };
        let Some(top) = logprobs else {
            return Sampled {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            };
        };
        // One pass for the normalizer, and only the requested top entries ranked: a 129K vocabulary
        // sorted for every token of every sequence cost ~10 ms a token on the host.
        let log_total = log_sum_exp(logits);
        let top_logprobs = most_likely(logits, top)
            .into_iter()
            .map(|(id, logit)| (id, logit - log_total))
            .collect();
        Sampled {
            token,
            logprob: Some(logits[token as usize] - log_total),
            top_logprobs,
        }
    }

    fn draw(&mut self, logits: &[f64], params: &SamplingParams) -> u32 {
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<(f64, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (((l - max) / params.temperature).exp(), i as u32))
            .collect();
        let total: f64 = probs.iter().map(|p| p.0).sum();
        probs.iter_mut().for_each(|p| p.0 /= total);
        // The filters in SGLang's order: top-k, top-p, min-p; then the draw walks the kept tokens most likely
        // first (ties to the lower id). Only sorted prefixes are built (the vocabulary is ~129K): the k most
        // likely by partial selection, k growing until it holds the nucleus, or the draw's point — the same
        // prefix a full sort gives.
        if params.top_p < 1.0 {
            let keep = if params.top_k > 0 {
                params.top_k.min(probs.len())
            } else {
                probs.len()
            };
            let mut k = keep.min(PREFIX_FIRST);
            let cut = loop {
                if k < probs.len() {
                    probs.select_nth_unstable_by(k - 1, descending);
                }
                probs[..k].sort_by(descending);
                let mut kept = 0.0;
                match probs[..k].iter().position(|p| {
                    kept += p.0;
                    kept >= params.top_p
                }) {
                    Some(i) => break i + 1,
                    None if k == keep => break k,
                    None => k = (k * 8).min(keep),
                }
            };
            probs.truncate(cut);
        } else if params.top_k > 0 && params.top_k < probs.len() {
            probs.select_nth_unstable_by(params.top_k - 1, descending);
            probs.truncate(params.top_k);
        }
        let floor = params.min_p * probs.iter().map(|p| p.0).fold(0.0, f64::max);
        probs.retain(|p| p.0 >= floor);
        let point = self.rng.random::<f64>() * probs.iter().map(|p| p.0).sum::<f64>();
        walk_descending(&mut probs, point)
    }
}

/// Most likely first, ties to the lower id.
fn descending(a: &(f64, u32), b: &(f64, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The token at which the running sum of `probs` in [`descending`] order first reaches `point` (the last
/// one if rounding never gets there), sorting only as long a prefix as the walk needs.
fn walk_descending(probs: &mut [(f64, u32)], point: f64) -> u32 {
    let n = probs.len();
    let mut k = n.min(PREFIX_FIRST);
    loop {
        if k < n {
            probs.select_nth_unstable_by(k - 1, descending);
        }
        probs[..k].sort_by(descending);
        let mut left = point;
        for (p, id) in &probs[..k] {
            left -= p;
            if left <= 0.0 {
                return *id;
            }
        }
        if k == n {
            return probs[n - 1].1;
        }
        k = (k * 8).min(n);
    }
}

/// The most likely token (ties to the lowest id).
pub fn argmax(logits: &[f64]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// ln Σ exp(logits): a token's log-probability is its logit minus this.
fn log_sum_exp(logits: &[f64]) -> f64 {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() + max
}

/// The `n` largest logits with their ids, largest first (ties to the lower id).
fn most_likely(logits: &[f64], n: usize) -> Vec<(u32, f64)> {
    if n == 0 {
        return Vec::new();
    }
    let mut ranked: Vec<(f64, u32)> = logits.iter().enumerate().map(|(i, l)| (*l, i as u32)).collect();
    if n < ranked.len() {
        ranked.select_nth_unstable_by(n - 1, descending);
        ranked.truncate(n);
    }
    ranked.sort_by(descending);
    ranked.into_iter().map(|(logit, id)| (id, logit)).collect()
}

/// Stop strings over streamed text: [`StopMatcher::push`] returns the text that can be shown now (text that
/// might begin a stop string is held back) and whether a stop string ended the output; the stop string
/// itself is never shown.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// New text → (text to emit, stopped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest suffix that begins some stop string (at a character boundary).
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| {
                        let start = self.held.len() - n;
                        self.held.is_char_boundary(start) && s.starts_with(&self.held[start..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// The end of the output without a stop: whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
