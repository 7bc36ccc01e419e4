//! What the kernels write at the end of a row: the row statistics (every variant), and for the
//! flash-attention ones the normalized output, or with split-KV each split's partials for `combine_splits`.
use super::D_V;
use cubecl::prelude::*;
use nsa_dsl::format::pack_bf16x2;

/// Output columns `column`, `column` + 1 of (row, head) `out_row`, already normalized: one bf16 pair word,
/// or with splits the two f32 partials at `part_row` (split · rows · h_q + out_row).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_out_pair(
    out: &mut [u32],
    o_part: &mut [f32],
    v0: f32,
    v1: f32,
    out_row: usize,
    part_row: usize,
    column: usize,
    splits: usize,
) {
    if splits == 1 {
        out[out_row * (D_V / 2) + column / 2] = pack_bf16x2(v0, v1);
    } else {
        o_part[part_row * D_V + column] = v0;
        o_part[part_row * D_V + column + 1] = v1;
    }
}

/// lse and max logit of (row, head) `out_row` from its running max `m_log2` (log₂ units) and sum `sum`;
/// with splits, the split's partials (an empty split weighs nothing: lse −∞).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_split_stats(
    lse: &mut [f32],
    max_logit: &mut [f32],
    lse_part: &mut [f32],
    max_part: &mut [f32],
    out_row: usize,
    part_row: usize,
    m_log2: f32,
    sum: f32,
    splits: usize,
) {
    let m_nat = m_log2 * core::f32::consts::LN_2;
    if splits == 1 {
        write_row_stats(lse, max_logit, out_row, m_nat, sum);
    } else {
        let empty = sum == 0.0f32;
        lse_part[part_row] = select(empty, f32::reinterpret(0xff80_0000u32), m_nat + f32::ln(sum));
        max_part[part_row] = select(empty, f32::reinterpret(0xff80_0000u32), m_nat);
    }
}

/// lse = m + ln l (natural) and the max logit of one (row, head); an empty row (l = 0) gets +∞ and −∞.
#[cube]
pub(super) fn write_row_stats(lse: &mut [f32], max_logit: &mut [f32], out_row: usize, m: f32, l: f32) {
    let empty = l == 0.0f32;
    lse[out_row] = select(empty, f32::reinterpret(0x7f80_0000u32), m + f32::ln(l));
    max_logit[out_row] = select(empty, f32::reinterpret(0xff80_0000u32), m);
}

/// The end of a warpgroup's rows in the warpgroup-MMA kernels: its 64 × 256 O (a unit's rows g, g + 8 of its
/// warp's 16, from `first_row` / `first_part_row`; columns 256·`half` + 8n + 2t, + 1) divided by the rows'
/// sums, and with `stats` their lse and max logit (from the running maxima `m`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_o_half(
    o: &Vector<f32, Const<128>>,
    sum: &Array<f32>,
    m: &Array<f32>,
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    o_part: &mut [f32],
    lse_part: &mut [f32],
    max_part: &mut [f32],
    first_row: usize,
    first_part_row: usize,
    half: usize,
    splits: usize,
    stats: bool,
) {
    let t = UNIT_POS_PLANE as usize % 4;
    #[unroll]
    for r in 0..2usize {
        let inv = select(sum[r] > 0.0f32, 1.0f32 / sum[r], 0.0f32);
        let out_row = first_row + 8 * r;
        let part_row = first_part_row + 8 * r;
        #[unroll]
        for n in 0..32usize {
            let column = half * 256 + n * 8 + 2 * t;
            let v0 = o.extract(4 * n + 2 * r) * inv;
            let v1 = o.extract(4 * n + 2 * r + 1) * inv;
            write_out_pair(out, o_part, v0, v1, out_row, part_row, column, splits);
        }
        if stats && t == 0 {
            write_split_stats(
                lse, max_logit, lse_part, max_part, out_row, part_row, m[r], sum[r], splits,
            );
        }
    }
}
