//! The serving runtime (issue 7). Built so far: sampling (temperature, top-k, top-p, min-p, seeds,
//! log-probabilities), stop strings over streamed text, KV pages with prefix reuse. The scheduler and the
//! device caches behind the pages are not built yet.
pub mod pages;
pub mod sampling;
