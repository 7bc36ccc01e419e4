//! The serving runtime (issue 7). Built so far: sampling (temperature, top-k, top-p, min-p, seeds,
//! log-probabilities) and stop strings over streamed text. Paged caches and the scheduler are not built yet.
pub mod sampling;
