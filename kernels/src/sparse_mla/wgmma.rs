//! The sparse MLA kernel on Hopper's warpgroup MMA: variant `wgmma_h64` (CUDA sm_90a, bf16).
//!
//! A cube holds one query row and 64 heads as two warpgroups (256 units); warp i of warpgroup w owns heads
//! 16i.. in the accumulator layout of `nsa_dsl::wgmma`. Q (64 × 576) sits for the whole row in a
//! 128-byte-swizzled shared tile (9 column blocks of 64 rows × 64 values). Per block of 64 indices:
//! - the kv rows are gathered one block ahead into a second buffer with the same layout (`cp.async` for
//!   bf16 rows, invalid rows zero-filled; FP8 cache rows dequantized exactly on the way);
//! - warpgroup w computes S = Q·Kᵀ over keys 32w.. (m64n32, 36 k16 steps, both operands read by the
//!   tensor cores from shared memory), the two agree on the row maxima through shared memory and write
//!   P = exp(S − m) as bf16 into one swizzled 64 × 64 tile;
//! - each adds P·V over all 64 keys for its 256 of the 512 output columns (m64n256, 4 k16 steps, V read
//!   MN-major from the same kv tile: the first 8 of its 9 column blocks), O (128 f32 a unit) rescaled by
//!   row in registers first.
use super::gather::{
    INVALID, TOKEN_CHUNKS, block_index, copy_fp8_row_raw, dequantize_fp8_share, dequantize_staged_fp8_share,
    kv_row_offset, resolve_block, split_blocks,
};
use super::output::write_o_half;
use super::{COLUMN_BLOCK, D_QK, KvSource};
use cubecl::prelude::*;
use nsa_dsl::Format;
use nsa_dsl::format::pack_bf16x2;
use nsa_dsl::warp_mma::{commit_async_copies, copy_chunk_async, fast_exp2, quad_max, quad_sum};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, first_atom, store_shared_u32, sw128_descriptor, sw128_mn_major_descriptor,
    swizzled_chunk, wgmma_bf16_shared_accumulate_trans_b, wgmma_fresh, wgmma_wait,
};

pub(super) const HEADS: usize = 64;
/// Units a cube: two warpgroups.
pub(super) const UNITS: u32 = 256;
pub(super) const BLOCK: usize = 64;
/// 16-byte chunks of a row (576 bf16) and of a whole 64-row tile.
const ROW_CHUNKS: usize = D_QK / 8;
pub(super) const TILE_CHUNKS: usize = 9 * COLUMN_BLOCK;
/// Chunk offsets from the aligned base: Q, the two kv buffers, then P (64 × 64 bf16: one column block).
pub(super) const KV_OFFSET: usize = TILE_CHUNKS;
const P_OFFSET: usize = 3 * TILE_CHUNKS;
const TILES_CHUNKS: usize = P_OFFSET + COLUMN_BLOCK;
/// Where, from a kv buffer's start, the FP8 cache's raw rows are staged: its last 64 × 41 chunks.
const RAW_OFFSET: usize = TILE_CHUNKS - BLOCK * TOKEN_CHUNKS;

/// Shared memory: the swizzled tiles (plus one atom to align them), three blocks of row offsets and the
/// 8 warps' 16 row statistics.
pub(super) fn shared_memory_bytes() -> usize {
    16 * TILES_CHUNKS + ATOM_BYTES as usize + 4 * 3 * BLOCK + 4 * 8 * 16
}

/// Chunk index, from a tile's start, of chunk `c` (0..72) of row `row` of a swizzled 64-row tile.
#[cube]
fn tile_chunk(row: usize, c: usize) -> usize {
    (c / 8) * COLUMN_BLOCK + swizzled_chunk(row, c % 8)
}

/// Q of 64 heads from (row, head) `first` on into the swizzled tile at chunk `skip` (every unit of the cube).
#[cube]
pub(super) fn load_q<N: Size>(q: &[Vector<u32, N>], smem: &mut [Vector<u32, N>], skip: usize, first: usize) {
    let mut i = UNIT_POS as usize;
    while i < comptime!(HEADS * ROW_CHUNKS) {
        let (h, c) = (i / ROW_CHUNKS, i % ROW_CHUNKS);
        smem[skip + tile_chunk(h, c)] = q[(first + h) * ROW_CHUNKS + c];
        i += CUBE_DIM as usize;
    }
}

/// Gathers the 64 kv rows whose word offsets are `offsets[slot·64..]` into the swizzled tile at chunk
/// `tile0`: asynchronous copies for bf16 rows (complete at the next stage wait), dequantizing stores for
/// the FP8 cache. Four units share a row (chunks u, u + 4, ..: one offset read, a warp reads 64 contiguous
/// bytes of each of 8 rows per copy), so a unit's 18 copies cost a few instructions each.
#[cube]
fn gather_tile<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    offsets: &[u32],
    slot: usize,
    tile0: usize,
    #[comptime] source: KvSource,
) {
    let key = UNIT_POS as usize / 4;
    let first = UNIT_POS as usize % 4;
    let offset = offsets[slot * BLOCK + key];
    match source {
        KvSource::Rows | KvSource::Bf16Paged => {
            let valid = offset != INVALID;
            let row_start = select(valid, offset as usize / 4, 0usize);
            let len = select(valid, 1usize, 0usize);
            #[unroll]
            for j in 0..comptime!(ROW_CHUNKS / 4) {
                let c = first + 4 * j;
                let dst = tile0 + tile_chunk(key, c);
                let start = select(valid, row_start + c, 0usize);
                copy_chunk_async(&kv[start..start + len], &mut smem[dst..dst + 1]);
            }
        }
        KvSource::Fp8Paged => dequantize_fp8_share(kv, smem, offset, tile0, key, first),
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_wgmma_kernel<N: Size>(
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
    #[comptime] source: KvSource,
) {
    let head_blocks = h_q / HEADS;
    let split = CUBE_POS % splits;
    let row = CUBE_POS / splits / head_blocks;
    let head0 = (CUBE_POS / splits % head_blocks) * HEADS;
    let unit = UNIT_POS as usize;
    let warp = (UNIT_POS / 32) as usize;
    // The warpgroup through a broadcast, so that ptxas keeps the descriptors built from it in uniform
    // registers instead of rebuilding them at every k step.
    let half = plane_broadcast(UNIT_POS / 128, 0u32) as usize;
    let group = warp % 4;
    let partner = (warp + 4) % 8;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    if row >= rows {
        terminate!();
    }
    let batch = row / rows_per_batch;
    let (first, tiles) = split_blocks(indices, row, rows_per_batch, topk, split, splits, BLOCK, source);

    let mut smem =
        Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILES_CHUNKS + ATOM_BYTES as usize / 16), 16usize);
    let mut offsets = Shared::<[u32]>::new_slice(comptime!(3 * BLOCK));
    let mut row_stats = Shared::<[f32]>::new_slice(comptime!(8usize * 16));
    let (skip, base) = first_atom(&smem);

    // Q of the cube's heads into its swizzled tile, once; the row offsets of the first two blocks.
    load_q(q, &mut smem, skip, row * h_q + head0);
    #[unroll]
    for slot in 0..2usize {
        resolve_block(
            indices,
            block_table,
            &mut offsets[slot * BLOCK..slot * BLOCK + BLOCK],
            row,
            rows_per_batch,
            (first + slot) * BLOCK,
            topk,
            batch,
            s_kv,
            max_pages,
            pages,
            BLOCK,
            source,
            Format::Bf16,
        );
    }
    sync_cube();
    gather_tile(kv, &mut smem, &offsets, 0, skip + KV_OFFSET, source);
    commit_async_copies();

    let mut o = Vector::<f32, Const<128>>::new(0.0f32);
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
    }
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;
    let q_desc = sw128_descriptor(base);
    let p_tile = base + comptime!(P_OFFSET as u32 * 16);
    let p_desc = sw128_descriptor(p_tile);

    let mut tile = 0usize;
    while tile < tiles {
        let buf = tile % 2;
        let slot = tile % 3;
        // Block `tile` landed and is visible to the tensor cores; every unit is done with the last block.
        await_stage(0u32);
        // The indices of block `tile` + 2, loaded now and resolved to offsets at the end of the step: the
        // loads' latency hides under the step instead of stalling two warps before a barrier.
        let ahead = tile + 2 < tiles && unit < BLOCK;
        let next_index = select(
            ahead,
            block_index(indices, row, rows_per_batch, (first + tile + 2) * BLOCK, topk, source),
            -1i32,
        );
        let kv_tile = base + ((KV_OFFSET + buf * TILE_CHUNKS) * 16) as u32;
        // S over this warpgroup's 32 keys, issued first so that the tensor cores compute it while the
        // units start the next block's gather: element 4n + 2r + e is row g + 8r, key 32·half + 8n + 2t + e.
        let block_bytes = comptime!(COLUMN_BLOCK * 16);
        let s_in_flight = wgmma_fresh::<Const<16>>(
            q_desc,
            sw128_descriptor(kv_tile + (half * 32 * 128) as u32),
            Operands::Bf16,
            32usize,
            comptime!(D_QK / 16),
            block_bytes,
            block_bytes,
            false,
        );
        // The FP8 cache: the next block's rows are only copied here, unconverted, into the end of its buffer
        // (they land while S and the softmax run) and dequantized while this block's P·V runs.
        if tile + 1 < tiles {
            match source {
                KvSource::Fp8Paged => {
                    let offset = offsets[((tile + 1) % 3) * BLOCK + unit / 4];
                    let raw0 = skip + KV_OFFSET + (1 - buf) * TILE_CHUNKS + RAW_OFFSET;
                    copy_fp8_row_raw(kv, &mut smem, offset, raw0, unit / 4, unit % 4);
                }
                KvSource::Rows | KvSource::Bf16Paged => {
                    gather_tile(
                        kv,
                        &mut smem,
                        &offsets,
                        (tile + 1) % 3,
                        skip + KV_OFFSET + (1 - buf) * TILE_CHUNKS,
                        source,
                    );
                }
            }
        }
        commit_async_copies();
        let s = wgmma_wait::<Const<16>>(s_in_flight);
        let own_slots = slot * BLOCK + half * 32;
        let mut x = Array::<f32>::new(16usize);
        let mut block_max = Array::<f32>::new(2usize);
        block_max[0] = -1073741824.0f32;
        block_max[1] = -1073741824.0f32;
        #[unroll]
        for i in 0..16usize {
            let valid = offsets[own_slots + (i / 4) * 8 + 2 * t + i % 2] != INVALID;
            let r = (i % 4) / 2;
            x[i] = select(valid, s.extract(i) * scale_log2, f32::reinterpret(0xff80_0000u32));
            block_max[r] = f32::max(block_max[r], x[i]);
        }
        #[unroll]
        for r in 0..2usize {
            block_max[r] = quad_max(block_max[r]);
            if t == 0 {
                row_stats[warp * 16 + g + 8 * r] = block_max[r];
            }
        }
        sync_cube();
        let next_offset = kv_row_offset(
            next_index,
            block_table,
            batch,
            s_kv,
            max_pages,
            pages,
            source,
            Format::Bf16,
        );
        let mut alpha = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            let m_new = f32::max(m[r], f32::max(block_max[r], row_stats[partner * 16 + g + 8 * r]));
            alpha[r] = fast_exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
        }

        // P = exp2(x − m) into the shared P tile (row = head, 64 keys = one 128-byte swizzled row).
        #[unroll]
        for n in 0..4usize {
            #[unroll]
            for r in 0..2usize {
                // Through the array: inline PTX takes array elements as values (a fresh local as its address).
                let i = 4 * n + 2 * r;
                x[i] = fast_exp2(x[i] - m[r]);
                x[i + 1] = fast_exp2(x[i + 1] - m[r]);
                l[r] += x[i] + x[i + 1];
                let chunk = swizzled_chunk(group * 16 + g + 8 * r, half * 4 + n);
                store_shared_u32(p_tile + (chunk * 16 + 4 * t) as u32, pack_bf16x2(x[i], x[i + 1]));
            }
        }
        rescale(&mut o, &alpha);
        // P visible to the tensor cores; the FP8 cache also waits for the next block's raw rows.
        let fp8 = comptime!(source == KvSource::Fp8Paged);
        await_stage(comptime!(if fp8 { 0u32 } else { 1u32 }));

        // O += P·V over the block's 64 keys on this warpgroup's columns 256·half.. (kv column blocks 4·half..).
        let v_desc = sw128_mn_major_descriptor(kv_tile + (half * 4 * COLUMN_BLOCK * 16) as u32, block_bytes as u32);
        if fp8 {
            // Issued only: the next block is dequantized meanwhile (after the last block too, into the buffer
            // no one reads any more: no branch may separate the products from their wait).
            o = wgmma_bf16_shared_accumulate_trans_b::<Const<128>>(
                o, p_desc, v_desc, 256usize, 4usize, 2048usize, false,
            );
            let next_tile0 = skip + KV_OFFSET + (1 - buf) * TILE_CHUNKS;
            dequantize_staged_fp8_share(&mut smem, next_tile0 + RAW_OFFSET, next_tile0, unit / 4, unit % 4);
            o = wgmma_wait::<Const<128>>(o);
        } else {
            o = wgmma_bf16_shared_accumulate_trans_b::<Const<128>>(
                o, p_desc, v_desc, 256usize, 4usize, 2048usize, true,
            );
        }
        if ahead {
            offsets[((tile + 2) % 3) * BLOCK + unit] = next_offset;
        }
        tile += 1;
    }

    // Row sums of both warpgroups, then the normalized output (columns 8n + 2t, + 1 of this half), lse and
    // max logit from warpgroup 0.
    #[unroll]
    for r in 0..2usize {
        l[r] = quad_sum(l[r]);
        if t == 0 {
            row_stats[warp * 16 + g + 8 * r] = l[r];
        }
    }
    sync_cube();
    let mut sum = Array::<f32>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        sum[r] = l[r] + row_stats[partner * 16 + g + 8 * r];
    }
    let first_row = row * h_q + head0 + group * 16 + g;
    write_o_half(
        &o,
        &sum,
        &m,
        out,
        lse,
        max_logit,
        o_part,
        lse_part,
        max_part,
        first_row,
        split * rows * h_q + first_row,
        half,
        splits,
        half == 0,
    );
}

/// O's rows times `factor` (row g: elements 4n, 4n + 1; row g + 8: 4n + 2, 4n + 3); skipped by the warp when
/// no factor differs from 1 (once the maxima settle, most blocks).
#[cube]
pub(super) fn rescale(o: &mut Vector<f32, Const<128>>, factor: &Array<f32>) {
    if plane_any(factor[0] != 1.0f32 || factor[1] != 1.0f32) {
        let mut scale = Vector::<f32, Const<128>>::new(0.0f32);
        #[unroll]
        for i in 0..128usize {
            scale.insert(i, factor[(i % 4) / 2]);
        }
        *o *= scale;
    }
}
