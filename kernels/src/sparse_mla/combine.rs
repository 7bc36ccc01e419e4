//! Split-KV's second step: merges the per-split partial outputs of each (row, head) by their lse.
use super::D_V;
use cubecl::prelude::*;
use nsa_dsl::Format;
use nsa_dsl::format::pack;

/// out = Σ_s exp(lse_s − lse)·o_s with lse = log Σ_s exp(lse_s), max_logit = max_s max_s; partials are
/// [splits, pairs, 512] f32 (each normalized by its own sum) and [splits, pairs] (an empty split has
/// lse −∞). A pair with no valid key anywhere gets out 0, lse +∞, max_logit −∞, as without splits.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn combine_splits_kernel(
    o_part: &[f32],
    lse_part: &[f32],
    max_part: &[f32],
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    pairs: usize,
    splits: usize,
    #[comptime] format: Format,
) {
    let pair = CUBE_POS;
    if pair >= pairs {
        terminate!();
    }
    let minus_inf = f32::reinterpret(0xff80_0000u32);
    let mut top = minus_inf;
    let mut max_all = minus_inf;
    for s in 0..splits {
        top = f32::max(top, lse_part[s * pairs + pair]);
        max_all = f32::max(max_all, max_part[s * pairs + pair]);
    }
    let empty = top == minus_inf;
    let mut total = 0.0f32;
    for s in 0..splits {
        total += select(empty, 0.0f32, f32::exp(lse_part[s * pairs + pair] - top));
    }
    let per_word = comptime!(format.per_word() as usize);
    let mut w = UNIT_POS as usize;
    while w < comptime!(D_V / format.per_word() as usize) {
        let column = w * per_word;
        let mut lo = 0.0f32;
        let mut hi = 0.0f32;
        if !empty {
            for s in 0..splits {
                let weight = f32::exp(lse_part[s * pairs + pair] - top) / total;
                let base = (s * pairs + pair) * D_V + column;
                lo += weight * o_part[base];
                if comptime!(per_word == 2) {
                    hi += weight * o_part[base + 1];
                }
            }
        }
        out[pair * comptime!(D_V / format.per_word() as usize) + w] = pack(lo, hi, format);
        w += CUBE_DIM as usize;
    }
    if UNIT_POS == 0 {
        lse[pair] = select(empty, f32::reinterpret(0x7f80_0000u32), top + f32::ln(total));
        max_logit[pair] = max_all;
    }
}
