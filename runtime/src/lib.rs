//! The serving runtime (issue 7): sampling (temperature, top-k, top-p, min-p, seeds, log-probabilities),
//! stop strings over streamed text, KV pages with prefix reuse, the scheduler (continuous batching,
//! chunked prefill, preemption) and the engine that runs its batches on a model, keeping each sequence's
//! cache rows in the scheduler's pages.
pub mod engine;
pub mod pages;
pub mod sampling;
pub mod scheduler;
