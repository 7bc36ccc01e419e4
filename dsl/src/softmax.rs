//! Online softmax: a running maximum `m` and sum `l = Σ exp(x − m)`, updated one score (or one merged
//! state) at a time, so attention never holds a whole row of scores. Scores use exp2 with log₂e folded
//! in by the caller when it wants (`exp(x) = exp2(x·log₂e)`).
use cubecl::prelude::*;

/// Running (max, sum of exponentials) of the scores seen so far.
#[derive(CubeType, Clone, Copy)]
pub struct OnlineSoftmax {
    pub max: f32,
    pub sum: f32,
}

/// The state before any score: max −2³⁰ rather than −∞, so `exp(old − new)` never computes ∞ − ∞.
#[cube]
pub fn online_softmax_new() -> OnlineSoftmax {
    OnlineSoftmax {
        max: -1073741824.0f32,
        sum: 0.0f32,
    }
}

/// Adds one score; returns the factor by which sums/accumulators built on the old max must be rescaled.
#[cube]
pub fn online_softmax_push(state: &mut OnlineSoftmax, score: f32) -> f32 {
    let new_max = f32::max(state.max, score);
    let rescale = f32::exp(state.max - new_max);
    state.sum = state.sum * rescale + f32::exp(score - new_max);
    state.max = new_max;
    rescale
}

/// Merges another state into `state` (e.g. partial rows from two units).
#[cube]
pub fn online_softmax_merge(state: &mut OnlineSoftmax, other: OnlineSoftmax) {
    let new_max = f32::max(state.max, other.max);
    state.sum = state.sum * f32::exp(state.max - new_max) + other.sum * f32::exp(other.max - new_max);
    state.max = new_max;
}

/// `log Σ exp(x)` of the scores seen.
#[cube]
pub fn online_softmax_logsumexp(state: &OnlineSoftmax) -> f32 {
    state.max + f32::ln(state.sum)
}
