//! The serving runtime (issue 7). Built so far: sampling (temperature, top-k, top-p, min-p, seeds,
//! log-probabilities), stop strings over streamed text, KV pages with prefix reuse, and the scheduler
//! (continuous batching, chunked prefill, preemption) driving an engine. The engine over the device
//! model's caches is not built yet.
pub mod pages;
pub mod sampling;
pub mod scheduler;
