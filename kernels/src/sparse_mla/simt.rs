//! The scalar (SIMT) sparse MLA kernel: variants `simt_h16`, `simt_h8`; runs everywhere, lavapipe included.
use super::gather::{kv_word, resolve_block};
use super::output::write_row_stats;
use super::{D_QK, D_V, KvSource, UNITS};
use cubecl::prelude::*;
use nsa_dsl::Format;
use nsa_dsl::format::{pack, unpack};

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_kernel(
    q: &[u32],
    kv: &[u32],
    block_table: &[i32],
    indices: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    rows: usize,
    rows_per_batch: usize,
    h_q: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
    topk: usize,
    sm_scale: f32,
    #[comptime] heads: u32,
    #[comptime] block: u32,
    #[comptime] source: KvSource,
    #[comptime] format: Format,
) {
    let per_word = comptime!(format.per_word());
    let q_words = comptime!(D_QK as u32 / per_word) as usize;
    let v_words_per_unit = comptime!(D_V as u32 / per_word / UNITS);
    let head_blocks = h_q / heads as usize;
    let row = CUBE_POS / head_blocks;
    let head0 = (CUBE_POS % head_blocks) * heads as usize;
    let unit = UNIT_POS as usize;
    // The grid is rounded up to whole rows of cubes: cubes past the last query row do nothing.
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;

    // The block's kv rows in the problem's storage format (words).
    let mut kv_smem = Shared::<[u32]>::new_slice(comptime!(block as usize) * q_words);
    let mut offset_smem = Shared::<[u32]>::new_slice(block as usize);
    // Scores, then probabilities, of the block: [heads, block].
    let mut p_smem = Shared::<[f32]>::new_slice(comptime!((heads * block) as usize));
    // Per head: running max, running sum, and this block's rescale factor.
    let mut m_smem = Shared::<[f32]>::new_slice(heads as usize);
    let mut l_smem = Shared::<[f32]>::new_slice(heads as usize);
    let mut alpha_smem = Shared::<[f32]>::new_slice(heads as usize);
    // acc_o[head][word][lane]: this unit's output columns.
    let mut acc_o = Array::<f32>::new(comptime!((heads * v_words_per_unit * per_word) as usize));
    #[unroll]
    for i in 0..comptime!(heads * v_words_per_unit * per_word) {
        acc_o[i as usize] = 0.0f32;
    }
    if unit < heads as usize {
        // −2³⁰ rather than −∞: exp(m_old − m_new) stays finite while no index was valid.
        m_smem[unit] = -1073741824.0f32;
        l_smem[unit] = 0.0f32;
    }

    let mut start = 0usize;
    while start < topk {
        // Resolve this block's indices to kv rows (0xffff_ffff: invalid or past topk).
        resolve_block(
            indices,
            block_table,
            &mut offset_smem,
            row,
            rows_per_batch,
            start,
            topk,
            batch,
            s_kv,
            max_pages,
            pages,
            block as usize,
            source,
            format,
        );
        sync_cube();
        // Gather (and dequantize) the rows into shared memory; invalid rows read as 0.
        let mut i = unit;
        while i < comptime!(block as usize) * q_words {
            let offset = offset_smem[i / q_words];
            let mut word = 0u32;
            if offset != 0xffff_ffffu32 {
                word = kv_word(kv, offset as usize, i % q_words, source, format);
            }
            kv_smem[i] = word;
            i += UNITS as usize;
        }
        sync_cube();

        // S = sm_scale · Q·Kᵀ for the block: one (head, slot) pair per unit and step.
        let mut pair = unit;
        while pair < comptime!((heads * block) as usize) {
            let head = pair / block as usize;
            let slot = pair % block as usize;
            let q_base = (row * h_q + head0 + head) * q_words;
            let mut dot = 0.0f32;
            for w in 0..q_words {
                let qw = q[q_base + w];
                let kw = kv_smem[slot * q_words + w];
                dot += unpack(qw, 0u32, format) * unpack(kw, 0u32, format);
                if comptime!(per_word == 2) {
                    dot += unpack(qw, 1u32, format) * unpack(kw, 1u32, format);
                }
            }
            p_smem[pair] = dot * sm_scale;
            pair += UNITS as usize;
        }
        sync_cube();

        // Online softmax per head: new max, rescale factor, P = exp(S − m) on valid slots.
        if unit < heads as usize {
            let m_old = m_smem[unit];
            let mut m_new = m_old;
            #[unroll]
            for slot in 0..block {
                if offset_smem[slot as usize] != 0xffff_ffffu32 {
                    m_new = f32::max(m_new, p_smem[unit * block as usize + slot as usize]);
                }
            }
            let alpha = f32::exp(m_old - m_new);
            let mut sum = 0.0f32;
            #[unroll]
            for slot in 0..block {
                let index = unit * block as usize + slot as usize;
                let p = select(
                    offset_smem[slot as usize] != 0xffff_ffffu32,
                    f32::exp(p_smem[index] - m_new),
                    0.0f32,
                );
                p_smem[index] = p;
                sum += p;
            }
            m_smem[unit] = m_new;
            l_smem[unit] = l_smem[unit] * alpha + sum;
            alpha_smem[unit] = alpha;
        }
        sync_cube();

        // O = O·alpha + P·V on this unit's columns.
        #[unroll]
        for head in 0..heads {
            let alpha = alpha_smem[head as usize];
            #[unroll]
            for vw in 0..v_words_per_unit {
                #[unroll]
                for lane in 0..per_word {
                    let a = ((head * v_words_per_unit + vw) * per_word + lane) as usize;
                    let word = unit + (vw * UNITS) as usize;
                    let mut value = acc_o[a] * alpha;
                    #[unroll]
                    for slot in 0..block {
                        let v = unpack(kv_smem[slot as usize * q_words + word], lane, format);
                        value += p_smem[(head * block + slot) as usize] * v;
                    }
                    acc_o[a] = value;
                }
            }
        }
        sync_cube();
        start += block as usize;
    }

    // out = O / l; an empty row (l = 0) gives 0, lse +∞ and max logit −∞.
    let v_words = comptime!(D_V as u32 / per_word) as usize;
    #[unroll]
    for head in 0..heads {
        let l = l_smem[head as usize];
        let inv_l = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
        let out_row = row * h_q + head0 + head as usize;
        #[unroll]
        for vw in 0..v_words_per_unit {
            let a = ((head * v_words_per_unit + vw) * per_word) as usize;
            let mut hi = 0.0f32;
            if comptime!(per_word == 2) {
                hi = acc_o[a + 1] * inv_l;
            }
            out[out_row * v_words + unit + (vw * UNITS) as usize] = pack(acc_o[a] * inv_l, hi, format);
        }
        if unit == 0 {
            write_row_stats(lse, max_logit, out_row, m_smem[head as usize], l);
        }
    }
}
