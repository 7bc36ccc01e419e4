//! The tensor-core sparse MLA kernel: variants `cmma_h16`, `cmma_h32` (CUDA/HIP, bf16).
use super::gather::{kv_word, resolve_block};
use super::output::write_row_stats;
use super::{D_QK, D_V, KvSource};
use cubecl::prelude::*;
use half::bf16;
use nsa_dsl::Format;
use nsa_dsl::format::{pack, unpack};
use nsa_dsl::mma::{store_tile, tile_a, tile_b, zero_accumulator};

/// Rows of kv per block and heads per tile of the tensor-core variants.
pub(super) const CMMA_BLOCK: usize = 16;
pub(super) const CMMA_HEADS: usize = 16;

/// Tensor-core variants (`cmma_h16`, `cmma_h32`; CUDA/HIP, bf16): a cube holds one query row and
/// `head_tiles` tiles of 16 heads, with four planes per head tile. Per block of 16 indices the kv rows are
/// gathered once into shared memory as bf16 (FP8 dequantized exactly) for all the cube's heads; S = Q·Kᵀ
/// runs as 16×16×16 matrix multiplies split four ways along d (9 steps per plane); the online softmax runs
/// on the 16×16 scores of each head tile; P·V runs as 32 column tiles per head tile (8 per plane) into
/// shared memory, and each unit folds its columns into O = O·alpha + P·V in registers (CubeCL's cmma
/// fragments cannot be rescaled per row).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_cmma_kernel(
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
    #[comptime] head_tiles: usize,
    #[comptime] source: KvSource,
) {
    let format = comptime!(Format::Bf16);
    let heads = comptime!(head_tiles * CMMA_HEADS);
    let q_words = D_QK / 2;
    let head_blocks = h_q / heads;
    let row = CUBE_POS / head_blocks;
    let head0 = (CUBE_POS % head_blocks) * heads;
    let unit = UNIT_POS as usize;
    let plane = (UNIT_POS / PLANE_DIM) as usize;
    // Plane p works on head tile p / 4 and quarter p % 4 (of d for S, of the 32 column tiles for P·V).
    let tile = plane / 4;
    let quarter = plane % 4;
    // Unit u folds head tile u / 128, columns u % 128 + 128·c, into its registers.
    let my_tile = unit / 128;
    let column = unit % 128;
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;

    let mut q_tile = Shared::<[bf16]>::new_slice(comptime!(heads * D_QK));
    let mut kv_tile = Shared::<[bf16]>::new_slice(CMMA_BLOCK * D_QK);
    let mut p_tile = Shared::<[bf16]>::new_slice(comptime!(heads * CMMA_BLOCK));
    // Split-k partial scores ([head tile][quarter][16 × 16]), then P·V of the block ([heads, 512]).
    let mut s_parts = Shared::<[f32]>::new_slice(comptime!(4 * heads * CMMA_BLOCK));
    let mut pv = Shared::<[f32]>::new_slice(comptime!(heads * D_V));
    let mut offset_smem = Shared::<[u32]>::new_slice(CMMA_BLOCK);
    let mut m_smem = Shared::<[f32]>::new_slice(heads);
    let mut l_smem = Shared::<[f32]>::new_slice(heads);
    let mut alpha_smem = Shared::<[f32]>::new_slice(heads);
    // acc_o[head][c]: head my_tile·16 + head, column `column` + 128·c.
    let mut acc_o = Array::<f32>::new(CMMA_HEADS * 4);
    #[unroll]
    for i in 0..CMMA_HEADS * 4 {
        acc_o[i] = 0.0f32;
    }
    // Q of the cube's heads, once, as bf16.
    let mut i = unit;
    while i < comptime!(heads * D_QK / 2) {
        let word = q[(row * h_q + head0) * q_words + i];
        q_tile[2 * i] = bf16::cast_from(unpack(word, 0u32, format));
        q_tile[2 * i + 1] = bf16::cast_from(unpack(word, 1u32, format));
        i += CUBE_DIM as usize;
    }
    if unit < heads {
        m_smem[unit] = -1073741824.0f32;
        l_smem[unit] = 0.0f32;
    }

    let mut start = 0usize;
    while start < topk {
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
            CMMA_BLOCK,
            source,
            format,
        );
        sync_cube();
        let mut i = unit;
        while i < CMMA_BLOCK * q_words {
            let offset = offset_smem[i / q_words];
            let mut word = 0u32;
            if offset != 0xffff_ffffu32 {
                word = kv_word(kv, offset as usize, i % q_words, source, format);
            }
            let e = (i / q_words) * D_QK + (i % q_words) * 2;
            kv_tile[e] = bf16::cast_from(unpack(word, 0u32, format));
            kv_tile[e + 1] = bf16::cast_from(unpack(word, 1u32, format));
            i += CUBE_DIM as usize;
        }
        sync_cube();

        // S = Q·Kᵀ of head tile `tile` over d in [144·quarter, 144·quarter + 144).
        let acc = zero_accumulator();
        #[unroll]
        for step in 0..9usize {
            let d0 = quarter * 144 + step * 16;
            let a = tile_a(&q_tile, tile * CMMA_HEADS * D_QK + d0, D_QK as u32);
            let b = tile_b(&kv_tile, d0, D_QK as u32, true);
            cmma::execute(&a, &b, &acc, &acc);
        }
        store_tile(&mut s_parts, plane * CMMA_HEADS * CMMA_BLOCK, &acc, CMMA_BLOCK as u32);
        sync_cube();

        // Online softmax per head on the block's 16 scores; P to shared memory as bf16.
        if unit < heads {
            let parts = (unit / CMMA_HEADS) * 4 * 256 + (unit % CMMA_HEADS) * CMMA_BLOCK;
            let m_old = m_smem[unit];
            let mut m_new = m_old;
            #[unroll]
            for slot in 0..CMMA_BLOCK {
                let x = parts + slot;
                let score = (s_parts[x] + s_parts[x + 256] + s_parts[x + 512] + s_parts[x + 768]) * sm_scale;
                s_parts[x] = score;
                if offset_smem[slot] != 0xffff_ffffu32 {
                    m_new = f32::max(m_new, score);
                }
            }
            let alpha = f32::exp(m_old - m_new);
            let mut sum = 0.0f32;
            #[unroll]
            for slot in 0..CMMA_BLOCK {
                let p = select(
                    offset_smem[slot] != 0xffff_ffffu32,
                    f32::exp(s_parts[parts + slot] - m_new),
                    0.0f32,
                );
                // P enters the matrix multiply as bf16; the sum (and so lse) keeps f32, as FlashMLA does.
                p_tile[unit * CMMA_BLOCK + slot] = bf16::cast_from(p);
                sum += p;
            }
            m_smem[unit] = m_new;
            l_smem[unit] = l_smem[unit] * alpha + sum;
            alpha_smem[unit] = alpha;
        }
        sync_cube();

        // P·V of head tile `tile`: column tiles 8·quarter .. 8·quarter + 8 of the 32.
        let a = tile_a(&p_tile, tile * CMMA_HEADS * CMMA_BLOCK, CMMA_BLOCK as u32);
        #[unroll]
        for n in 0..8usize {
            let n0 = (quarter * 8 + n) * 16;
            let b = tile_b(&kv_tile, n0, D_QK as u32, false);
            let o = zero_accumulator();
            cmma::execute(&a, &b, &o, &o);
            store_tile(&mut pv, tile * CMMA_HEADS * D_V + n0, &o, D_V as u32);
        }
        sync_cube();

        // O = O·alpha + P·V on this unit's columns.
        #[unroll]
        for head in 0..CMMA_HEADS {
            let h = my_tile * CMMA_HEADS + head;
            let alpha = alpha_smem[h];
            #[unroll]
            for c in 0..4usize {
                let a = head * 4 + c;
                acc_o[a] = acc_o[a] * alpha + pv[h * D_V + column + c * 128];
            }
        }
        sync_cube();
        start += CMMA_BLOCK;
    }

    // out = O / l (column pairs meet through shared memory, reusing `pv`); empty rows: 0, +∞, −∞.
    #[unroll]
    for head in 0..CMMA_HEADS {
        let h = my_tile * CMMA_HEADS + head;
        let l = l_smem[h];
        let inv_l = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
        #[unroll]
        for c in 0..4usize {
            pv[h * D_V + column + c * 128] = acc_o[head * 4 + c] * inv_l;
        }
    }
    sync_cube();
    let mut w = unit;
    while w < comptime!(heads * D_V / 2) {
        let head = w / (D_V / 2);
        let out_row = row * h_q + head0 + head;
        out[out_row * (D_V / 2) + w % (D_V / 2)] = pack(pv[2 * w], pv[2 * w + 1], format);
        w += CUBE_DIM as usize;
    }
    if unit < heads {
        write_row_stats(lse, max_logit, row * h_q + head0 + unit, m_smem[unit], l_smem[unit]);
    }
}
