//! The flash-attention sparse MLA kernel: variants `mma_h64`, `mma_h32`, `mma_h32_k32` (CUDA, bf16).
//!
//! A cube holds one query row and `groups` groups of 16 heads; plane p works on head group p % groups
//! and half p / groups of the 512 output columns, so its O accumulator (16 × 256 f32) stays in registers
//! for the whole row. Per block of `block` indices: the kv rows are gathered once into shared memory
//! (bf16; FP8 dequantized exactly) for all the cube's heads; each plane computes S = Q·Kᵀ of its 16 heads
//! (both halves compute it: the price of keeping O in registers), the online softmax in registers (quad
//! shuffles for row maxima, exp2 with log₂e folded into the scale), rescales O by row, and adds P·V with
//! P taken straight from the S accumulators.
use super::gather::{resolve_block, write_row_stats};
use super::{D_QK, D_V, KvSource};
use cubecl::prelude::*;
use half::bf16;
use nsa_dsl::Format;
use nsa_dsl::format::e4m3_to_f32;
use nsa_dsl::warp_mma::{
    AccPair, Chunk, Pair, accumulators_as_a, fast_exp2, load_x4, mma_into, quad_max, quad_sum, split_b,
};

/// 16-byte chunks per kv/q row in shared memory: 72 (576 bf16) plus one of padding, so the eight rows an
/// `ldmatrix` reads start in different banks.
pub(super) const ROW_CHUNKS: usize = 73;
const INVALID: u32 = 0xffff_ffff;

/// Gathers chunk `c` (8 bf16) of the kv row at word `offset` (four words per `kv` vector).
#[cube]
fn kv_chunk<N: Size>(kv: &[Vector<u32, N>], offset: u32, c: usize, #[comptime] source: KvSource) -> Chunk {
    let mut chunk = Chunk::reinterpret(Vector::<u32, N>::new(0u32));
    if offset != INVALID {
        let base = offset as usize / 4;
        match source {
            KvSource::Rows => {
                chunk = Chunk::reinterpret(kv[base + c]);
            }
            KvSource::Fp8Paged => {
                if c < 64 {
                    // Latent bytes 8c..8c+8 (words 2c, 2c+1), group scale c / 16 (words 128..132).
                    let words = kv[base + c / 2];
                    let lo = select(c % 2 == 0, words.extract(0usize), words.extract(2usize));
                    let hi = select(c % 2 == 0, words.extract(1usize), words.extract(3usize));
                    let scales = kv[base + 32];
                    let group = c / 16;
                    let scale_bits = select(
                        group < 2,
                        select(group == 0, scales.extract(0usize), scales.extract(1usize)),
                        select(group == 2, scales.extract(2usize), scales.extract(3usize)),
                    );
                    let scale = f32::reinterpret(scale_bits);
                    #[unroll]
                    for j in 0..8usize {
                        let word = select(j < 4, lo, hi);
                        let byte = (word >> (8 * (j % 4)) as u32) & 0xff;
                        chunk.insert(j, bf16::cast_from(e4m3_to_f32(byte) * scale));
                    }
                } else {
                    // The 64 bf16 rope values: words 132.. (vector 33 onwards).
                    chunk = Chunk::reinterpret(kv[base + 33 + (c - 64)]);
                }
            }
        }
    }
    chunk
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_mma_kernel<N: Size>(
    q: &[Vector<u32, N>],
    kv: &[Vector<u32, N>],
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
    #[comptime] groups: usize,
    #[comptime] block: usize,
    #[comptime] source: KvSource,
) {
    let heads = comptime!(groups * 16);
    let q_chunks = comptime!(D_QK / 8);
    let head_blocks = h_q / heads;
    let row = CUBE_POS / head_blocks;
    let head0 = (CUBE_POS % head_blocks) * heads;
    let unit = UNIT_POS as usize;
    let plane = (UNIT_POS / 32) as usize;
    let group = plane % groups;
    let half = plane / groups;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;

    let mut q_s = Shared::<[Chunk]>::new_aligned_slice(comptime!(heads * ROW_CHUNKS), 16usize);
    let mut kv_s = Shared::<[Chunk]>::new_aligned_slice(comptime!(block * ROW_CHUNKS), 16usize);
    let mut offsets = Shared::<[u32]>::new_slice(block);

    // Q of the cube's heads, once.
    let mut i = unit;
    while i < comptime!(heads * D_QK / 8) {
        let (h, c) = (i / q_chunks, i % q_chunks);
        q_s[h * ROW_CHUNKS + c] = Chunk::reinterpret(q[(row * h_q + head0 + h) * q_chunks + c]);
        i += CUBE_DIM as usize;
    }

    // O: 32 column tiles of 8 (this plane's 256 columns) × rows g, g + 8; row max (log₂ units) and the
    // lane's partial row sums.
    let mut o = Array::<AccPair>::new(64usize);
    #[unroll]
    for n in 0..64usize {
        o[n] = AccPair::new(0.0f32);
    }
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
    }
    let scale_log2 = sm_scale * 1.442_695_f32;
    // ldmatrix row addresses: Q (A, rows l % 16, k chunk l / 16); K (B of S: key l % 8 + 8·(l / 16), d chunk
    // (l / 8) % 2); V (B of P·V, transposed: key l % 8 + 8·((l / 8) % 2), column chunk l / 16).
    let q_row = (group * 16 + lane % 16) * ROW_CHUNKS + lane / 16;
    let k_row = (lane % 8 + 8 * (lane / 16)) * ROW_CHUNKS + (lane / 8) % 2;
    let v_row = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_CHUNKS + half * 32 + lane / 16;

    let mut start = 0usize;
    while start < topk {
        resolve_block(
            indices,
            block_table,
            &mut offsets,
            row * topk,
            start,
            topk,
            batch,
            s_kv,
            max_pages,
            pages,
            block,
            source,
            Format::Bf16,
        );
        sync_cube();
        let mut i = unit;
        while i < comptime!(block * D_QK / 8) {
            let (key, c) = (i / q_chunks, i % q_chunks);
            kv_s[key * ROW_CHUNKS + c] = kv_chunk(kv, offsets[key], c, source);
            i += CUBE_DIM as usize;
        }
        sync_cube();

        // S = Q·Kᵀ: block / 8 tiles of 16 heads × 8 keys.
        let mut s = Array::<AccPair>::new(comptime!(block / 4));
        #[unroll]
        for n in 0..comptime!(block / 4) {
            s[n] = AccPair::new(0.0f32);
        }
        for k in 0..comptime!(D_QK / 16) {
            let a = load_x4(&q_s, q_row + 2 * k, false);
            #[unroll]
            for kb in 0..comptime!(block / 16) {
                let b = load_x4(&kv_s, k_row + kb * 16 * ROW_CHUNKS + 2 * k, false);
                mma_into(&mut s, 2 * kb, &a, &split_b(&b, false));
                mma_into(&mut s, 2 * kb + 1, &a, &split_b(&b, true));
            }
        }

        // Online softmax on rows g (r = 0) and g + 8 (r = 1), in log₂ units.
        let mut block_max = Array::<f32>::new(2usize);
        block_max[0] = -1073741824.0f32;
        block_max[1] = -1073741824.0f32;
        #[unroll]
        for n in 0..comptime!(block / 8) {
            #[unroll]
            for e in 0..2usize {
                let valid = offsets[n * 8 + 2 * t + e] != INVALID;
                #[unroll]
                for r in 0..2usize {
                    let x = s[2 * n + r].extract(e) * scale_log2;
                    block_max[r] = select(valid, f32::max(block_max[r], x), block_max[r]);
                }
            }
        }
        let mut alpha = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            let m_new = f32::max(m[r], quad_max(block_max[r]));
            alpha[r] = fast_exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
        }
        #[unroll]
        for n in 0..comptime!(block / 8) {
            #[unroll]
            for r in 0..2usize {
                let mut p = AccPair::new(0.0f32);
                #[unroll]
                for e in 0..2usize {
                    let valid = offsets[n * 8 + 2 * t + e] != INVALID;
                    let x = s[2 * n + r].extract(e) * scale_log2;
                    let pe = select(valid, fast_exp2(x - m[r]), 0.0f32);
                    l[r] += pe;
                    p.insert(e, pe);
                }
                s[2 * n + r] = p;
            }
        }
        #[unroll]
        for n in 0..32usize {
            #[unroll]
            for r in 0..2usize {
                o[2 * n + r] = o[2 * n + r] * AccPair::new(alpha[r]);
            }
        }

        // O += P·V over this plane's 256 columns.
        #[unroll]
        for kb in 0..comptime!(block / 16) {
            let a = accumulators_as_a(&s, 2 * kb);
            #[unroll]
            for j in 0..16usize {
                let b = load_x4(&kv_s, v_row + kb * 16 * ROW_CHUNKS + 2 * j, true);
                mma_into(&mut o, 2 * j, &a, &split_b(&b, false));
                mma_into(&mut o, 2 * j + 1, &a, &split_b(&b, true));
            }
        }
        sync_cube();
        start += block;
    }

    // out = O / l as bf16 words (columns 2t, 2t + 1 of each tile); lse and max logit from half 0.
    #[unroll]
    for r in 0..2usize {
        let sum = quad_sum(l[r]);
        let inv = select(sum > 0.0f32, 1.0f32 / sum, 0.0f32);
        let out_row = row * h_q + head0 + group * 16 + g + 8 * r;
        #[unroll]
        for n in 0..32usize {
            let value = o[2 * n + r] * AccPair::new(inv);
            let mut pair = Pair::empty();
            pair.insert(0usize, bf16::cast_from(value.extract(0usize)));
            pair.insert(1usize, bf16::cast_from(value.extract(1usize)));
            out[out_row * (D_V / 2) + half * 128 + n * 4 + t] = u32::reinterpret(pair);
        }
        if half == 0 && t == 0 {
            write_row_stats(lse, max_logit, out_row, m[r] * core::f32::consts::LN_2, sum);
        }
    }
}
