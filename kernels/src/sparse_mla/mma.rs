//! The flash-attention sparse MLA kernel: variants `mma_h64`, `mma_h64_k32`, `mma_h32` (CUDA, bf16).
//!
//! A cube holds one query row and `groups` groups of 16 heads; plane p works on head group p % groups
//! and half p / groups, so its O accumulator (16 heads × 256 of the 512 output columns, f32) stays in
//! registers for the whole row. Per block of `block` indices:
//! - the kv rows are gathered into shared memory once for all the cube's heads: bf16 rows by
//!   asynchronous 16-byte copies (`cp.async`, invalid rows zero-filled) one block ahead into a second
//!   buffer (`stages` = 2), so the gather overlaps the multiplies; FP8 cache rows dequantized exactly;
//! - each plane computes S = Q·Kᵀ of its 16 heads over its half of the block's keys, the two halves
//!   agree on the row maxima through shared memory, and each passes its P = exp(S − m) (bf16 fragments)
//!   to the other, so both add P·V over the whole block for their 256 columns;
//! - the online softmax runs in registers (quad shuffles, exp2 with log₂e folded into the scale) and O is
//!   rescaled by row.
//!
//! Shared-memory operand fragments are loaded one k-step ahead of the multiplies that use them.
use super::gather::{INVALID, fp8_chunk, resolve_block, split_blocks};
use super::output::{write_out_pair, write_split_stats};
use super::{D_QK, KvSource};
use cubecl::prelude::*;
use half::bf16;
use nsa_dsl::Format;
use nsa_dsl::warp_mma::{
    AccPair, Pair, accumulators_as_a, b_tile, chunk_to_fragment, commit_async_copies, copy_chunk_async, copy_regs,
    fast_exp2, fragment_to_chunk, load_x4, mma_into, quad_max, quad_sum, wait_async_copies,
};

/// 16-byte chunks per kv/q row in shared memory: 72 (576 bf16) plus one of padding, so the eight rows an
/// `ldmatrix` reads start in different banks.
pub(super) const ROW_CHUNKS: usize = 73;
const K_STEPS: usize = D_QK / 16;

/// Shared memory of a variant: padded Q and kv rows (`stages` buffers), three blocks of row offsets, and
/// per plane 16 row statistics and its P fragments.
pub(super) fn shared_memory_bytes(heads: usize, block: usize, stages: usize) -> usize {
    let planes = heads / 8;
    16 * ROW_CHUNKS * (heads + stages * block) + 4 * 3 * block + 4 * planes * 16 + 16 * planes * (block / 32) * 32
}

/// Gathers the `block` kv rows whose word offsets are `offsets[slot·block..]` into rows
/// `first_row..` of `kv_s`: asynchronous copies for bf16 rows (complete at `wait_async_copies`), plain
/// loads for the FP8 cache.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gather_block<N: Size>(
    kv: &[Vector<u32, N>],
    kv_s: &mut [Vector<u32, N>],
    offsets: &[u32],
    slot: usize,
    first_row: usize,
    #[comptime] block: usize,
    #[comptime] source: KvSource,
) {
    let row_chunks = comptime!(D_QK / 8);
    let mut i = UNIT_POS as usize;
    while i < comptime!(block * D_QK / 8) {
        let (key, c) = (i / row_chunks, i % row_chunks);
        let offset = offsets[slot * block + key];
        let dst = (first_row + key) * ROW_CHUNKS + c;
        match source {
            KvSource::Rows | KvSource::Bf16Paged => {
                let valid = offset != INVALID;
                let start = select(valid, offset as usize / 4 + c, 0usize);
                let len = select(valid, 1usize, 0usize);
                copy_chunk_async(&kv[start..start + len], &mut kv_s[dst..dst + 1]);
            }
            KvSource::Fp8Paged => {
                kv_s[dst] = fp8_chunk(kv, offset, c);
            }
        }
        i += CUBE_DIM as usize;
    }
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
    o_part: &mut [f32],
    lse_part: &mut [f32],
    max_part: &mut [f32],
    rows: usize,
    rows_per_batch: usize,
    h_q: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
    topk: usize,
    splits: usize,
    sm_scale: f32,
    #[comptime] groups: usize,
    #[comptime] block: usize,
    #[comptime] stages: usize,
    #[comptime] source: KvSource,
) {
    let heads = comptime!(groups * 16);
    let planes = comptime!(groups * 2);
    let half_keys = comptime!(block / 2);
    // 16-key P fragments per plane per block, and x4 loads of K per k-step.
    let own_chunks = comptime!(block / 32);
    let q_chunks = comptime!(D_QK / 8);
    let head_blocks = h_q / heads;
    let split = CUBE_POS % splits;
    let row = CUBE_POS / splits / head_blocks;
    let head0 = (CUBE_POS / splits % head_blocks) * heads;
    let unit = UNIT_POS as usize;
    let plane = (UNIT_POS / 32) as usize;
    let group = plane % groups;
    let half = plane / groups;
    let partner = (plane + groups) % planes;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;
    // Split-KV: this cube's share of the row's blocks, [first, first + tiles).
    let (first, tiles) = split_blocks(indices, row, rows_per_batch, topk, split, splits, block, source);

    let mut q_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(heads * ROW_CHUNKS), 16usize);
    let mut kv_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(stages * block * ROW_CHUNKS), 16usize);
    let mut offsets = Shared::<[u32]>::new_slice(comptime!(3 * block));
    let mut row_stats = Shared::<[f32]>::new_slice(comptime!(planes * 16));
    let mut p_s = Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(planes * own_chunks * 32), 16usize);

    // Q of the cube's heads, once; the row offsets of the first two blocks.
    let mut i = unit;
    while i < comptime!(heads * D_QK / 8) {
        let (h, c) = (i / q_chunks, i % q_chunks);
        q_s[h * ROW_CHUNKS + c] = q[(row * h_q + head0 + h) * q_chunks + c];
        i += CUBE_DIM as usize;
    }
    #[unroll]
    for slot in 0..2usize {
        resolve_block(
            indices,
            block_table,
            &mut offsets[slot * block..slot * block + block],
            row,
            rows_per_batch,
            (first + slot) * block,
            topk,
            batch,
            s_kv,
            max_pages,
            pages,
            block,
            source,
            Format::Bf16,
        );
    }
    sync_cube();
    if comptime!(stages == 2) {
        gather_block(kv, &mut kv_s, &offsets, 0, 0, block, source);
        commit_async_copies();
    }

    // O: 32 column tiles of 8 (this plane's 256 columns) × rows g, g + 8; row max (log₂ units) and the
    // lane's partial row sums over its half's keys.
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
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;
    // ldmatrix row addresses: Q (A, rows l % 16, k chunk l / 16); K (B of S: key l % 8 + 8·(l / 16), d chunk
    // (l / 8) % 2); V (B of P·V, transposed: key l % 8 + 8·((l / 8) % 2), column chunk l / 16).
    let q_row = (group * 16 + lane % 16) * ROW_CHUNKS + lane / 16;
    let k_row = (half * half_keys + lane % 8 + 8 * (lane / 16)) * ROW_CHUNKS + (lane / 8) % 2;
    let v_row = (lane % 8 + 8 * ((lane / 8) % 2)) * ROW_CHUNKS + half * 32 + lane / 16;

    let mut tile = 0usize;
    while tile < tiles {
        let mut buf = 0usize;
        if comptime!(stages == 2) {
            buf = tile % 2;
        }
        let slot = tile % 3;
        if comptime!(stages == 1) {
            // Every plane is done with the previous block before its rows are overwritten.
            sync_cube();
            gather_block(kv, &mut kv_s, &offsets, slot, 0, block, source);
            commit_async_copies();
        }
        wait_async_copies();
        sync_cube();
        if comptime!(stages == 2) {
            if tile + 1 < tiles {
                gather_block(
                    kv,
                    &mut kv_s,
                    &offsets,
                    (tile + 1) % 3,
                    (1 - buf) * block,
                    block,
                    source,
                );
            }
            commit_async_copies();
        }
        if tile + 2 < tiles {
            let next = (tile + 2) % 3;
            resolve_block(
                indices,
                block_table,
                &mut offsets[next * block..next * block + block],
                row,
                rows_per_batch,
                (first + tile + 2) * block,
                topk,
                batch,
                s_kv,
                max_pages,
                pages,
                block,
                source,
                Format::Bf16,
            );
        }
        let kv_base = buf * block * ROW_CHUNKS;

        // S = Q·Kᵀ over this half's keys: half_keys / 8 tiles of 16 heads × 8 keys.
        let mut s = Array::<AccPair>::new(comptime!(half_keys / 4));
        #[unroll]
        for n in 0..comptime!(half_keys / 4) {
            s[n] = AccPair::new(0.0f32);
        }
        let mut a = load_x4::<bf16, N>(&q_s, q_row, false);
        let mut b = Array::<Pair>::new(comptime!(4 * own_chunks));
        #[unroll]
        for kb in 0..own_chunks {
            let regs = load_x4::<bf16, N>(&kv_s, kv_base + k_row + kb * 16 * ROW_CHUNKS, false);
            #[unroll]
            for r in 0..4usize {
                b[4 * kb + r] = regs[r];
            }
        }
        for k in 0..K_STEPS {
            // The next k-step's fragments (the last step reloads its own: harmless).
            let k_next = select(k + 1 < K_STEPS, k + 1, k);
            let a_next = load_x4::<bf16, N>(&q_s, q_row + 2 * k_next, false);
            let mut b_next = Array::<Pair>::new(comptime!(4 * own_chunks));
            #[unroll]
            for kb in 0..own_chunks {
                let regs = load_x4::<bf16, N>(&kv_s, kv_base + k_row + kb * 16 * ROW_CHUNKS + 2 * k_next, false);
                #[unroll]
                for r in 0..4usize {
                    b_next[4 * kb + r] = regs[r];
                }
            }
            #[unroll]
            for kb in 0..own_chunks {
                mma_into(&mut s, 2 * kb, &a, &b_tile(&b, 4 * kb));
                mma_into(&mut s, 2 * kb + 1, &a, &b_tile(&b, 4 * kb + 2));
            }
            copy_regs(&a_next, &mut a, 4usize);
            copy_regs(&b_next, &mut b, comptime!(4 * own_chunks));
        }

        // Row maxima (log₂ units) of rows g (r = 0) and g + 8 (r = 1) over both halves.
        let own_slots = slot * block + half * half_keys;
        let mut block_max = Array::<f32>::new(2usize);
        block_max[0] = -1073741824.0f32;
        block_max[1] = -1073741824.0f32;
        #[unroll]
        for n in 0..comptime!(half_keys / 8) {
            #[unroll]
            for e in 0..2usize {
                let valid = offsets[own_slots + n * 8 + 2 * t + e] != INVALID;
                #[unroll]
                for r in 0..2usize {
                    let x = s[2 * n + r].extract(e) * scale_log2;
                    block_max[r] = select(valid, f32::max(block_max[r], x), block_max[r]);
                }
            }
        }
        #[unroll]
        for r in 0..2usize {
            block_max[r] = quad_max(block_max[r]);
            if t == 0 {
                row_stats[plane * 16 + g + 8 * r] = block_max[r];
            }
        }
        sync_cube();
        let mut alpha = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            let m_new = f32::max(m[r], f32::max(block_max[r], row_stats[partner * 16 + g + 8 * r]));
            alpha[r] = fast_exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
        }

        // P = exp2(x − m) on this half's keys, to shared memory as A fragments for both halves.
        #[unroll]
        for n in 0..comptime!(half_keys / 8) {
            #[unroll]
            for r in 0..2usize {
                let mut p = AccPair::new(0.0f32);
                #[unroll]
                for e in 0..2usize {
                    let valid = offsets[own_slots + n * 8 + 2 * t + e] != INVALID;
                    let x = s[2 * n + r].extract(e) * scale_log2;
                    let pe = select(valid, fast_exp2(x - m[r]), 0.0f32);
                    l[r] += pe;
                    p.insert(e, pe);
                }
                s[2 * n + r] = p;
            }
        }
        #[unroll]
        for c in 0..own_chunks {
            p_s[(plane * own_chunks + c) * 32 + lane] = fragment_to_chunk(&accumulators_as_a(&s, 2 * c));
        }
        #[unroll]
        for n in 0..32usize {
            #[unroll]
            for r in 0..2usize {
                o[2 * n + r] = o[2 * n + r] * AccPair::new(alpha[r]);
            }
        }
        sync_cube();

        // O += P·V over the whole block, on this plane's 256 columns.
        #[unroll]
        for kb in 0..comptime!(block / 16) {
            let owner = comptime!(kb / own_chunks) * groups + group;
            let a = chunk_to_fragment(p_s[(owner * own_chunks + comptime!(kb % own_chunks)) * 32 + lane]);
            let v_base = kv_base + v_row + kb * 16 * ROW_CHUNKS;
            let mut v = load_x4::<bf16, N>(&kv_s, v_base, true);
            #[unroll]
            for j in 0..16usize {
                let v_next =
                    load_x4::<bf16, N>(&kv_s, v_base + 2 * comptime!(if j + 1 < 16 { j + 1 } else { j }), true);
                mma_into(&mut o, 2 * j, &a, &b_tile(&v, 0usize));
                mma_into(&mut o, 2 * j + 1, &a, &b_tile(&v, 2usize));
                copy_regs(&v_next, &mut v, 4usize);
            }
        }
        tile += 1;
    }

    // Row sums of both halves, then out = O / l as bf16 words (columns 2t, 2t + 1 of each tile); lse and
    // max logit from half 0. The last block's readers of `row_stats` passed the barrier before P·V. With
    // splits, each cube writes its normalized partial O (f32), lse and max instead, for `combine_splits`.
    #[unroll]
    for r in 0..2usize {
        l[r] = quad_sum(l[r]);
        if t == 0 {
            row_stats[plane * 16 + g + 8 * r] = l[r];
        }
    }
    sync_cube();
    #[unroll]
    for r in 0..2usize {
        let sum = l[r] + row_stats[partner * 16 + g + 8 * r];
        let inv = select(sum > 0.0f32, 1.0f32 / sum, 0.0f32);
        let out_row = row * h_q + head0 + group * 16 + g + 8 * r;
        let part_row = split * rows * h_q + out_row;
        #[unroll]
        for n in 0..32usize {
            let value = o[2 * n + r] * AccPair::new(inv);
            let column = half * 256 + n * 8 + 2 * t;
            write_out_pair(
                out,
                o_part,
                value.extract(0usize),
                value.extract(1usize),
                out_row,
                part_row,
                column,
                splits,
            );
        }
        if half == 0 && t == 0 {
            write_split_stats(lse, max_logit, lse_part, max_part, out_row, part_row, m[r], sum, splits);
        }
    }
}
