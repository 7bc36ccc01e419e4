//! Sampling against the distributions its parameters define, measured over many seeded draws, and stop
//! strings over every chunking of a stream.
use nsa_runtime::sampling::{Sampler, SamplingParams, StopMatcher};

/// Draw counts per token over `draws` samples.
fn histogram(logits: &[f64], params: &SamplingParams, draws: usize) -> Vec<usize> {
    let mut sampler = Sampler::new(Some(7));
    let mut counts = vec![0; logits.len()];
    for _ in 0..draws {
        counts[sampler.sample(logits, params, None).token as usize] += 1;
    }
    counts
}

// Probabilities at temperature 1: 0.5, 0.25, 0.125, 0.0625, 0.0625.
const LOGITS: [f64; 5] = [
    3.0,
    2.3068528194400546,
    1.6137056388801092,
    0.9205584583201638,
    0.9205584583201638,
];

#[test]
fn greedy_picks_the_most_likely_token_and_reports_logprobs() {
    let params = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let sampled = Sampler::new(Some(1)).sample(&LOGITS, &params, Some(3));
    assert_eq!(sampled.token, 0);
    assert!((sampled.logprob.unwrap() - 0.5f64.ln()).abs() < 1e-12);
    let top: Vec<u32> = sampled.top_logprobs.iter().map(|t| t.0).collect();
    assert_eq!(top, vec![0, 1, 2]);
    assert!((sampled.top_logprobs[2].1 - 0.125f64.ln()).abs() < 1e-12);
    let plain = Sampler::new(Some(1)).sample(&LOGITS, &params, None);
    assert_eq!((plain.token, plain.logprob, plain.top_logprobs.len()), (0, None, 0));
}

/// The top entries come from a partial selection, not a sort of the whole vocabulary: over a DeepSeek-size
/// vocabulary with many ties they equal a full sort's (largest first, ties to the lower id), and top-k
/// draws stay inside the k most likely.
#[test]
fn top_logprobs_and_top_k_over_a_large_vocabulary_with_ties() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Logits on a coarse grid: thousands of exact ties.
    let logits: Vec<f64> = (0..129_280).map(|_| rng.random_range(0..400) as f64 / 40.0).collect();
    let params = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let sampled = Sampler::new(Some(1)).sample(&logits, &params, Some(20));
    let mut sorted: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, l)| (i as u32, *l)).collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let log_total = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
    assert_eq!(sampled.token, sorted[0].0, "greedy: the lowest id of the largest logit");
    assert_eq!(sampled.top_logprobs.len(), 20);
    for ((id, lp), (want_id, logit)) in sampled.top_logprobs.iter().zip(&sorted) {
        assert_eq!(id, want_id);
        assert!((lp - (logit - log_total)).abs() < 1e-9, "token {id}: logprob {lp}");
    }
    let top_k = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        ..Default::default()
    };
    let allowed: std::collections::HashSet<u32> = sorted[..50].iter().map(|t| t.0).collect();
    let mut sampler = Sampler::new(Some(3));
    for _ in 0..200 {
        let token = sampler.sample(&logits, &top_k, None).token;
        assert!(allowed.contains(&token), "token {token} outside the top 50");
    }
}

#[test]
fn draws_follow_the_filtered_distribution() {
    let n = 40_000;
    let share = |counts: &[usize], i: usize| counts[i] as f64 / n as f64;
    // Temperature 1, no filters: the softmax itself (4σ ≈ 0.01 at n = 40 000).
    let all = histogram(&LOGITS, &SamplingParams::default(), n);
    for (i, p) in [0.5, 0.25, 0.125, 0.0625, 0.0625].iter().enumerate() {
        assert!(
            (share(&all, i) - p).abs() < 0.01,
            "token {i}: {} vs {p}",
            share(&all, i)
        );
    }
    // top_k 2: 2/3 and 1/3 of the two most likely.
    let k2 = histogram(
        &LOGITS,
        &SamplingParams {
            top_k: 2,
            ..Default::default()
        },
        n,
    );
    assert!((share(&k2, 0) - 2.0 / 3.0).abs() < 0.01 && k2[2..].iter().all(|c| *c == 0));
    // top_p 0.7: 0.5 + 0.25 reaches it, so the same two.
    let p7 = histogram(
        &LOGITS,
        &SamplingParams {
            top_p: 0.7,
            ..Default::default()
        },
        n,
    );
    assert!((share(&p7, 0) - 2.0 / 3.0).abs() < 0.01 && p7[2..].iter().all(|c| *c == 0));
    // min_p 0.2: keeps p ≥ 0.1 (the first three): 4/7, 2/7, 1/7.
    let m2 = histogram(
        &LOGITS,
        &SamplingParams {
            min_p: 0.2,
            ..Default::default()
        },
        n,
    );
    assert!((share(&m2, 2) - 1.0 / 7.0).abs() < 0.01 && m2[3..].iter().all(|c| *c == 0));
    // Temperature 0.5 squares the odds: 0.5² : 0.25² : … normalized.
    let t = histogram(
        &LOGITS,
        &SamplingParams {
            temperature: 0.5,
            ..Default::default()
        },
        n,
    );
    let z = 0.25 + 0.0625 + 0.015625 + 2.0 * 0.00390625;
    assert!((share(&t, 0) - 0.25 / z).abs() < 0.01);
}

#[test]
fn a_seed_reproduces_the_draws() {
    let params = SamplingParams::default();
    let run = |seed| {
        let mut sampler = Sampler::new(Some(seed));
        (0..50)
            .map(|_| sampler.sample(&LOGITS, &params, None).token)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

#[test]
fn bad_parameters_are_named() {
    for (params, mentions) in [
        (
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            "min_p",
        ),
    ] {
        assert!(params.validate().unwrap_err().contains(mentions));
    }
    assert!(SamplingParams::default().validate().is_ok());
}

#[test]
fn stop_strings_end_the_stream_at_every_chunking() {
    let text = "The answer is 42.\n\nUser: next";
    let stops = vec!["\n\nUser:".to_string(), "zzz".to_string()];
    // Every way of cutting the text in two or three pieces gives the same visible text.
    for a in 0..=text.len() {
        for b in a..=text.len() {
            let mut matcher = StopMatcher::new(&stops);
            let mut shown = String::new();
            let mut stopped = false;
            for piece in [&text[..a], &text[a..b], &text[b..]] {
                let (out, stop) = matcher.push(piece);
                shown.push_str(&out);
                stopped |= stop;
            }
            if !stopped {
                shown.push_str(&matcher.finish());
            }
            assert!(stopped, "split at {a}, {b}");
            assert_eq!(shown, "The answer is 42.", "split at {a}, {b}");
        }
    }
    // No stop string: everything comes back, the held-back tail at finish.
    let mut matcher = StopMatcher::new(&stops);
    let (out, stopped) = matcher.push("ends with zz");
    assert!(!stopped);
    assert_eq!(out + &matcher.finish(), "ends with zz");
}

/// The draw as a full sort of the vocabulary does it (the sampler's first form): the sampler's partial
/// selections must pick the same token for the same random number.
fn draw_by_full_sort(logits: &[f64], params: &SamplingParams, uniform: f64) -> u32 {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(f64, u32)> = (logits.iter().enumerate())
        .map(|(i, l)| (((l - max) / params.temperature).exp(), i as u32))
        .collect();
    let total: f64 = probs.iter().map(|p| p.0).sum();
    probs.iter_mut().for_each(|p| p.0 /= total);
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if params.top_k > 0 {
        probs.truncate(params.top_k);
    }
    let mut kept = 0.0;
    let cut = (probs.iter())
        .position(|p| {
            kept += p.0;
            kept >= params.top_p
        })
        .map_or(probs.len(), |i| i + 1);
    probs.truncate(cut);
    let floor = params.min_p * probs[0].0;
    probs.retain(|p| p.0 >= floor);
    let mut draw = uniform * probs.iter().map(|p| p.0).sum::<f64>();
    for (p, id) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *id;
        }
    }
    probs[probs.len() - 1].1
}

/// Over a DeepSeek-size vocabulary with ties, nuclei small and large (past several growths of the
/// sorted prefix), plain temperature, with and without top-k and min-p: every draw equals the full
/// sort's.
#[test]
fn partial_selection_draws_what_a_full_sort_draws() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let peaked: Vec<f64> = (0..129_280).map(|_| rng.random_range(0..300) as f64 / 25.0).collect();
    let flat: Vec<f64> = (0..129_280).map(|_| rng.random_range(0..30) as f64 / 100.0).collect();
    for logits in [&peaked, &flat] {
        for (top_p, top_k, min_p) in [
            (0.3, 0, 0.0),
            (0.95, 0, 0.0),
            (0.95, 40, 0.0),
            (0.9, 0, 0.05),
            (1.0, 100, 0.0),
            (1.0, 0, 0.0),
            (1.0, 0, 0.05),
        ] {
            let params = SamplingParams {
                temperature: 0.7,
                top_p,
                top_k,
                min_p,
            };
            let mut sampler = Sampler::new(Some(9));
            let mut uniforms = rand::rngs::StdRng::seed_from_u64(9);
            for draw in 0..20 {
                let token = sampler.sample(logits, &params, None).token;
                let expected = draw_by_full_sort(logits, &params, uniforms.random::<f64>());
                assert_eq!(
                    token, expected,
                    "draw {draw}, top_p {top_p}, top_k {top_k}, min_p {min_p}"
                );
            }
        }
    }
}
