//! The engine on the bundled tiny model: requests batched by the scheduler — with chunked prefill, prefixes
//! rebuilt from the pages of earlier requests, and preemption in a small pool — give each request exactly
//! the tokens of its own greedy generation through the model's cache. Host reference (exact) and the burn
//! device model on the default wgpu device (lavapipe in CI).
use nsa_model::bundled_model_dir;
use nsa_model::device::DeviceModel;
use nsa_model::paged::KvFormat;
use nsa_model::reference::ReferenceModel;
use nsa_runtime::engine::{CachedModel, ModelEngine};
use nsa_runtime::pages::PagePool;
use nsa_runtime::sampling::SamplingParams;
use nsa_runtime::scheduler::{Event, Scheduler, SchedulerConfig};
use std::collections::HashMap;

const PAGE: usize = 4;

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

/// Runs `prompts` (each for `count` tokens, no stop token) through the scheduler and engine; returns each
/// request's tokens, how many requests were preempted and how many started from cached prefix pages.
fn serve<M: CachedModel>(model: M, prompts: &[Vec<u32>], count: usize, pages: usize) -> (Vec<Vec<u32>>, usize, usize) {
    serve_cached(model, prompts, count, pages, KvFormat::F32)
}

/// [`serve`] with the KV cache in `format`.
fn serve_cached<M: CachedModel>(
    model: M,
    prompts: &[Vec<u32>],
    count: usize,
    pages: usize,
    format: KvFormat,
) -> (Vec<Vec<u32>>, usize, usize) {
    let config = SchedulerConfig {
        max_running: 4,
        chunked_prefill: 6,
        context_length: 256,
    };
    let mut scheduler = Scheduler::new(config, PagePool::new(pages, PAGE));
    let mut engine = ModelEngine::with_cache(model, PAGE, format).expect("a cache the model keeps");
    let mut outputs: HashMap<u64, Vec<u32>> = HashMap::new();
    // The first request runs alone and finishes: the others share its prefix pages.
    for (id, prompt) in prompts.iter().enumerate() {
        engine.register(id as u64, greedy(), Some(0), None);
        scheduler
            .add(id as u64, prompt.clone(), count, Vec::new())
            .expect("fits");
        if id == 0 {
            while !scheduler.is_idle() {
                collect(scheduler.step(&mut engine), &mut outputs, &mut engine);
            }
        }
    }
    while !scheduler.is_idle() {
        collect(scheduler.step(&mut engine), &mut outputs, &mut engine);
    }
    let outputs = (0..prompts.len() as u64)
        .map(|id| outputs.remove(&id).unwrap_or_default())
        .collect();
    (outputs, scheduler.preemptions, engine.prefix_hits)
}

fn collect<M: CachedModel>(events: Vec<Event>, outputs: &mut HashMap<u64, Vec<u32>>, engine: &mut ModelEngine<M>) {
    for event in events {
        match event {
            Event::Token { request, token } => outputs.entry(request).or_default().push(token),
            Event::Finished { request, .. } => engine.forget(request),
        }
    }
}

/// Prompts sharing a 9-token prefix (two full pages) with the first, plus one unrelated.
fn prompts() -> Vec<Vec<u32>> {
    let shared: Vec<u32> = vec![0, 3, 17, 250, 31, 77, 400, 12, 9];
    let mut prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|i| [shared.clone(), vec![100 + i, 5 + i]].concat())
        .collect();
    prompts.push(vec![0, 3, 600, 601, 602]);
    prompts
}

#[test]
fn host_engine_outputs_equal_each_request_alone() {
    let model = ReferenceModel::load(&bundled_model_dir()).expect("model");
    let expected: Vec<Vec<u32>> = prompts().iter().map(|p| model.generate_greedy_cached(p, 8)).collect();
    // Roomy pool: prefixes are reused. Tight pool (12 pages for 4 running requests of up to 5 pages): preempted.
    for pages in [64, 12] {
        let model = ReferenceModel::load(&bundled_model_dir()).expect("model");
        let (outputs, preempted, prefix_hits) = serve(model, &prompts(), 8, pages);
        assert_eq!(outputs, expected, "{pages} pages");
        if pages == 12 {
            assert!(preempted > 0, "the tight pool should preempt");
        } else {
            assert!(
                prefix_hits >= 3,
                "the shared prefix should be reused: {prefix_hits} hits"
            );
        }
    }
}

#[test]
fn device_engine_outputs_equal_each_request_alone() {
    let device = nsa_model::device::burn_device("wgpu").expect("wgpu");
    let model = DeviceModel::load(&bundled_model_dir(), &device).expect("model");
    let prompts = &prompts()[..3];
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| model.generate_greedy_cached(p, 4)).collect();
    let (outputs, _, prefix_hits) = serve(model, prompts, 4, 64);
    assert_eq!(outputs, expected);
    assert!(
        prefix_hits >= 2,
        "the shared prefix should be reused: {prefix_hits} hits"
    );
    // A tight pool: requests are preempted, their pages go to others (rows overwritten in the store) and
    // they are recomputed into fresh pages.
    let model = DeviceModel::load(&bundled_model_dir(), &device).expect("model");
    let (outputs, preempted, _) = serve(model, prompts, 4, 5);
    assert_eq!(outputs, expected, "tight pool");
    assert!(preempted > 0, "the tight pool should preempt");
}

/// With the KV cache in bf16 or FP8 (`--kv-cache-dtype bf16`, `fp8_e4m3`), batching, prefix pages and
/// preemption still give each request the tokens it gets alone through the same engine; the host
/// reference refuses both.
#[test]
fn device_engine_with_narrow_caches_equals_each_request_alone() {
    let device = nsa_model::device::burn_device("wgpu").expect("wgpu");
    let load = || DeviceModel::load(&bundled_model_dir(), &device).expect("model");
    let prompts = &prompts()[..3];
    for (format, name) in [(KvFormat::Bf16, "bf16"), (KvFormat::Fp8, "FP8")] {
        let alone: Vec<Vec<u32>> = (prompts.iter())
            .map(|p| serve_cached(load(), std::slice::from_ref(p), 4, 64, format).0.remove(0))
            .collect();
        let (outputs, _, prefix_hits) = serve_cached(load(), prompts, 4, 64, format);
        assert_eq!(outputs, alone, "{name}");
        assert!(
            prefix_hits >= 2,
            "{name}: the shared prefix should be reused: {prefix_hits} hits"
        );
        let (outputs, preempted, _) = serve_cached(load(), prompts, 4, 5, format);
        assert_eq!(outputs, alone, "{name}: tight pool");
        assert!(preempted > 0, "{name}: the tight pool should preempt");
        let host = ReferenceModel::load(&bundled_model_dir()).expect("model");
        let refused = ModelEngine::with_cache(host, PAGE, format)
            .err()
            .expect("the host reference refuses narrow caches");
        assert!(refused.contains(name), "{refused}");
    }
}
