//! The paired sparse MLA kernels on Hopper: variants `wgmma_h64_pair` and `wgmma_h64_ws` (CUDA sm_90a, bf16).
//!
//! A cube holds one query row and 64 heads as two warpgroups. Q sits in a swizzled shared tile for the
//! whole row (as in [`super::wgmma`]); blocks of 64 indices go in pairs into two kv buffers, the even block
//! into buffer 0 and the odd one into buffer 1, each buffer as two halves — column blocks 0..4 (V's columns
//! 0..256) and 4..9 — with a "ready" mbarrier each.
//! - Warpgroup w computes S = Q·Kᵀ over buffer w's 64 keys (m64n64) and owns output columns 256w.. (O: 128
//!   f32 a unit). The two agree on the row maxima in a chain on named barriers (warpgroup 0's maximum first,
//!   warpgroup 1's final), each adds P·V of its own block with P from registers (m64n256) and the other's
//!   with P from shared memory: warpgroup 0 stores its P, rescaled to the final maximum, in buffer 0's rope
//!   column block (dead once its S has read it), warpgroup 1 in a tile of its own.
//! - A half is refilled with the next pair's rows (`cp.async`, or FP8 dequantized by plain stores) by its
//!   last reader the moment that reader's product is done, so no one waits for a "free" signal and the
//!   copies land under the rest of the pair: 0L by warpgroup 0 after its own P·V, 1R by warpgroup 1 after
//!   its own, 1L and 0R after the products with the other's P.
//!
//!
//! `wgmma_h64_ws` (`producer`) is FlashMLA's warp specialization of the same schedule: a third warpgroup
//! resolves the indices and fills every half, the consumers only arrive on the half's "free" barrier where
//! they would have filled it. A consumer needs ~230 registers (O alone takes 128) and 384 units leave 168
//! each, so the producer hands its registers over (`setmaxnreg`: 40 for it, 232 for each consumer).
//! Measured slower than the consumers' own refills (spills at 232 registers, one warpgroup's gathers on the
//! critical path; BENCHMARKS.md): kept for the autotuner and as the base for FlashMLA's schedule.
use super::gather::{INVALID, dequantize_fp8_chunk, key_index, kv_row_offset, split_blocks};
use super::output::write_o_half;
use super::wgmma::{BLOCK, HEADS, KV_OFFSET, TILE_CHUNKS, load_q, rescale};
use super::{COLUMN_BLOCK, KvSource};
use cubecl::prelude::*;
use nsa_dsl::Format;
use nsa_dsl::format::pack_bf16x2;
use nsa_dsl::mbarrier::{
    fence_barrier_init, mbarrier_arrive, mbarrier_init, mbarrier_track_async_copies, mbarrier_wait,
};
use nsa_dsl::warp_mma::{copy_chunk_async, fast_exp2, quad_max, quad_sum};
use nsa_dsl::warpgroup::{
    named_barrier_arrive, named_barrier_sync, set_max_registers_decrease, set_max_registers_increase,
};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, fence_shared_for_wgmma, first_atom, store_shared_u32, sw128_descriptor,
    sw128_mn_major_descriptor, swizzled_chunk, wgmma_accumulate, wgmma_bf16_register_a_accumulate,
    wgmma_bf16_shared_accumulate_trans_b, wgmma_fresh,
};

/// Units a cube: two warpgroups, or three with the producer.
pub(super) const UNITS: u32 = 256;
pub(super) const PRODUCER_UNITS: u32 = 384;
/// Registers a unit of the producer and of each consumer after the hand-over: 128 · (40 + 2 · 232) fits
/// the 65536 of a multiprocessor.
const PRODUCER_REGISTERS: u32 = 40;
const CONSUMER_REGISTERS: u32 = 232;
/// kv rows of a block each unit of a warpgroup copies (8 units a row: a 16-byte chunk of each column
/// block), and the rows between them.
const GATHER_ROWS: usize = 4;
const ROW_STEP: usize = 16;
/// Chunk offsets from the aligned base: Q and the two kv buffers, warpgroup 1's P tile, the 8 mbarriers
/// (ready, then free).
const P1_OFFSET: usize = 3 * TILE_CHUNKS;
const BARRIER_OFFSET: usize = P1_OFFSET + COLUMN_BLOCK;
const TILES_CHUNKS: usize = BARRIER_OFFSET + 4;
/// Named barriers between the warpgroups: warpgroup 0's row maxima, warpgroup 1's (final) ones, each one's
/// P in shared memory, the row sums at the end.
const MAX0: u32 = 1;
const MAX1: u32 = 2;
const P0_READY: u32 = 3;
const P1_READY: u32 = 4;
const SUMS: u32 = 5;
const BOTH: u32 = 256;

/// Shared memory: the tiles and barriers (plus one atom to align them), two blocks of key validity flags, and
/// the row statistics (both warpgroups' maxima, both one's sums).
pub(super) fn shared_memory_bytes() -> usize {
    16 * TILES_CHUNKS + ATOM_BYTES as usize + 4 * 2 * BLOCK + 4 * 4 * HEADS
}

/// Byte offset from the barriers of buffer `buf`'s half `half`'s "ready" barrier (its rows landed).
const fn ready(buf: usize, half: usize) -> u32 {
    (8 * (2 * buf + half)) as u32
}

/// Byte offset from the barriers of buffer `buf`'s half `half`'s "free" barrier (its last reader is done;
/// the producer's signal to refill it).
const fn free(buf: usize, half: usize) -> u32 {
    (8 * (4 + 2 * buf + half)) as u32
}

/// Shared byte offsets of warpgroup w's P tile from the base: P0 in buffer 0's rope column block, P1 its own.
const fn p_tile(wg: usize) -> u32 {
    if wg == 0 {
        ((KV_OFFSET + 8 * COLUMN_BLOCK) * 16) as u32
    } else {
        (P1_OFFSET * 16) as u32
    }
}

/// What a unit needs to find and copy its kv rows.
#[derive(CubeType, Clone)]
struct Rows {
    row: usize,
    rows_per_batch: usize,
    batch: usize,
    first: usize,
    tiles: usize,
    topk: usize,
    s_kv: usize,
    max_pages: usize,
    pages: usize,
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_wgmma_pair_kernel<N: Size>(
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
    #[comptime] producer: bool,
    #[comptime] source: KvSource,
) {
    let head_blocks = h_q / HEADS;
    let split = CUBE_POS % splits;
    let row = CUBE_POS / splits / head_blocks;
    let head0 = (CUBE_POS / splits % head_blocks) * HEADS;
    let unit = UNIT_POS as usize;
    // Through a broadcast so that the compiler knows the warpgroup is warp-uniform.
    let wg = plane_broadcast(UNIT_POS / 128, 0u32);
    if row >= rows {
        terminate!();
    }
    let (first, tiles) = split_blocks(indices, row, rows_per_batch, topk, split, splits, BLOCK, source);
    let at = Rows {
        row,
        rows_per_batch,
        batch: row / rows_per_batch,
        first,
        tiles,
        topk,
        s_kv,
        max_pages,
        pages,
    };

    let mut smem =
        Shared::<[Vector<u32, N>]>::new_aligned_slice(comptime!(TILES_CHUNKS + ATOM_BYTES as usize / 16), 16usize);
    let mut valid = Shared::<[u32]>::new_slice(comptime!(2 * BLOCK));
    let mut stats = Shared::<[f32]>::new_slice(comptime!(4 * HEADS));
    let (skip, base) = first_atom(&smem);
    let barriers = base + comptime!((BARRIER_OFFSET * 16) as u32);

    let out_row0 = row * h_q + head0;
    load_q(q, &mut smem, skip, out_row0);
    if unit == 0 {
        // Each half is filled by one warpgroup, and (with the producer) freed by one.
        #[unroll]
        for b in 0..8u32 {
            mbarrier_init(barriers + 8 * b, 128u32);
        }
        fence_barrier_init();
    }
    fence_shared_for_wgmma();
    sync_cube();

    let part_row0 = split * rows * h_q + out_row0;
    if comptime!(producer) && wg == 2 {
        set_max_registers_decrease(PRODUCER_REGISTERS);
        produce(
            kv,
            &mut smem,
            &mut valid,
            indices,
            block_table,
            barriers,
            skip,
            &at,
            source,
        );
    } else if wg == 0 {
        if comptime!(producer) {
            set_max_registers_increase(CONSUMER_REGISTERS);
        }
        consume(
            kv,
            &mut smem,
            &mut valid,
            &mut stats,
            indices,
            block_table,
            out,
            lse,
            max_logit,
            o_part,
            lse_part,
            max_part,
            skip,
            base,
            barriers,
            &at,
            sm_scale,
            out_row0,
            part_row0,
            splits,
            0usize,
            producer,
            source,
        );
    } else {
        if comptime!(producer) {
            set_max_registers_increase(CONSUMER_REGISTERS);
        }
        consume(
            kv,
            &mut smem,
            &mut valid,
            &mut stats,
            indices,
            block_table,
            out,
            lse,
            max_logit,
            o_part,
            lse_part,
            max_part,
            skip,
            base,
            barriers,
            &at,
            sm_scale,
            out_row0,
            part_row0,
            splits,
            1usize,
            producer,
            source,
        );
    }
}

/// This unit's kv row offsets of pair `pair` (block 2·pair: 0..4, block 2·pair + 1: 4..8); rows past the
/// split's blocks (an odd count's last pair) are invalid: zero-filled and masked.
#[cube]
fn resolve_pair(
    indices: &[i32],
    block_table: &[i32],
    offsets: &mut Array<u32>,
    pair: usize,
    at: &Rows,
    #[comptime] source: KvSource,
) {
    let group = (UNIT_POS as usize % 128) / 8;
    #[unroll]
    for j in 0..comptime!(2 * GATHER_ROWS) {
        let block = 2 * pair + j / GATHER_ROWS;
        let position = (at.first + block) * BLOCK + group + ROW_STEP * (j % GATHER_ROWS);
        let index = key_index(indices, at.row, at.rows_per_batch, position, at.topk, source);
        let index = select(block < at.tiles, index, -1i32);
        offsets[j] = kv_row_offset(
            index,
            block_table,
            at.batch,
            at.s_kv,
            at.max_pages,
            at.pages,
            source,
            Format::Bf16,
        );
    }
}

/// One warpgroup's fill of half `half` of buffer `buf` (column blocks 0..4, or 4..9): starts this unit's
/// copies of its 4 rows (or stores their dequantized FP8 chunks), writes the block's key validity with the
/// first half, and arrives on the half's ready barrier, which completes once all 128 units arrived and their
/// copies landed.
#[cube]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)] // a comptime condition cannot join a runtime one
fn fill_half<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    valid: &mut [u32],
    offsets: &Array<u32>,
    barriers: u32,
    skip: usize,
    #[comptime] buf: usize,
    #[comptime] half: usize,
    #[comptime] source: KvSource,
) {
    let id = UNIT_POS as usize % 128;
    let (group, lane) = (id / 8, id % 8);
    let tile0 = skip + KV_OFFSET + buf * TILE_CHUNKS;
    #[unroll]
    for i in 0..GATHER_ROWS {
        let offset = offsets[buf * GATHER_ROWS + i];
        let key = group + ROW_STEP * i;
        let ok = offset != INVALID;
        let row_start = select(ok, offset as usize / 4, 0usize);
        let len = select(ok, 1usize, 0usize);
        #[unroll]
        for k in 0..comptime!(4 + half) {
            let block = comptime!(4 * half) + k;
            let c = block * 8 + lane;
            let dst = tile0 + block * COLUMN_BLOCK + swizzled_chunk(key, lane);
            match source {
                KvSource::Rows | KvSource::Bf16Paged => {
                    let start = select(ok, row_start + c, 0usize);
                    copy_chunk_async(&kv[start..start + len], &mut smem[dst..dst + 1]);
                }
                KvSource::Fp8Paged => {
                    smem[dst] = dequantize_fp8_chunk(kv, offset, c, comptime!(block == 8));
                }
            }
        }
        if comptime!(half == 0) {
            if lane == 0 {
                valid[buf * BLOCK + key] = select(ok, 1u32, 0u32);
            }
        }
    }
    let ready = barriers + comptime!(ready(buf, half));
    match source {
        KvSource::Rows | KvSource::Bf16Paged => mbarrier_track_async_copies(ready),
        KvSource::Fp8Paged => fence_shared_for_wgmma(),
    }
    mbarrier_arrive(ready);
}

/// The last reader of half `half` of buffer `buf` is done with it: fills it with the next pair's rows
/// (when there is one), or with the producer, signals that it is free.
#[cube]
#[allow(clippy::too_many_arguments)]
fn release_half<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    valid: &mut [u32],
    offsets: &Array<u32>,
    barriers: u32,
    skip: usize,
    more: bool,
    #[comptime] buf: usize,
    #[comptime] half: usize,
    #[comptime] producer: bool,
    #[comptime] source: KvSource,
) {
    if comptime!(producer) {
        mbarrier_arrive(barriers + comptime!(free(buf, half)));
    } else if more {
        fill_half(kv, smem, valid, offsets, barriers, skip, buf, half, source);
    }
}

/// The producer warpgroup's loop: each pair's rows resolved, then its halves filled in the order their
/// last readers free them (0L and 1R after the warpgroups' own products, 1L and 0R after the other's).
#[cube]
#[allow(clippy::too_many_arguments)]
fn produce<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    valid: &mut [u32],
    indices: &[i32],
    block_table: &[i32],
    barriers: u32,
    skip: usize,
    at: &Rows,
    #[comptime] source: KvSource,
) {
    let pairs = at.tiles.div_ceil(2);
    // Each pair's rows are resolved while the previous pair's last half is awaited (the index and block
    // table loads are a chain of two global reads).
    let mut offsets = Array::<u32>::new(comptime!(2 * GATHER_ROWS));
    resolve_pair(indices, block_table, &mut offsets, 0usize, at, source);
    let mut phase = 0u32;
    let mut pair = 0usize;
    while pair < pairs {
        let refill = pair > 0;
        await_free(barriers + comptime!(free(0, 0)), refill, phase);
        fill_half(kv, smem, valid, &offsets, barriers, skip, 0usize, 0usize, source);
        await_free(barriers + comptime!(free(1, 1)), refill, phase);
        fill_half(kv, smem, valid, &offsets, barriers, skip, 1usize, 1usize, source);
        await_free(barriers + comptime!(free(1, 0)), refill, phase);
        fill_half(kv, smem, valid, &offsets, barriers, skip, 1usize, 0usize, source);
        await_free(barriers + comptime!(free(0, 1)), refill, phase);
        fill_half(kv, smem, valid, &offsets, barriers, skip, 0usize, 1usize, source);
        resolve_pair(indices, block_table, &mut offsets, pair + 1, at, source);
        if refill {
            phase ^= 1;
        }
        pair += 1;
    }
}

/// Waits for the free barrier at `address` to complete phase `phase` when `refill` (the first pair's
/// halves are free from the start).
#[cube]
fn await_free(address: u32, refill: bool, phase: u32) {
    if refill {
        mbarrier_wait(address, phase);
    }
}

/// Warpgroup `wg`'s loop over the pairs (filling half `wg` of both buffers for the next), then its half of
/// the output.
#[cube]
#[allow(clippy::too_many_arguments)]
fn consume<N: Size>(
    kv: &[Vector<u32, N>],
    smem: &mut [Vector<u32, N>],
    valid: &mut [u32],
    stats: &mut [f32],
    indices: &[i32],
    block_table: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    max_logit: &mut [f32],
    o_part: &mut [f32],
    lse_part: &mut [f32],
    max_part: &mut [f32],
    skip: usize,
    base: u32,
    barriers: u32,
    at: &Rows,
    sm_scale: f32,
    out_row0: usize,
    part_row0: usize,
    splits: usize,
    #[comptime] wg: usize,
    #[comptime] producer: bool,
    #[comptime] source: KvSource,
) {
    let warp = (UNIT_POS / 32) as usize % 4;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let other = comptime!(1 - wg);
    let tile_bytes = comptime!((TILE_CHUNKS * 16) as u32);
    let block_bytes = comptime!(COLUMN_BLOCK * 16);
    let own_tile = base + comptime!((KV_OFFSET * 16) as u32) + comptime!(wg as u32) * tile_bytes;
    let other_tile = base + comptime!((KV_OFFSET * 16) as u32) + comptime!(other as u32) * tile_bytes;
    let own_p = base + comptime!(p_tile(wg));
    let other_p = base + comptime!(p_tile(1 - wg));
    // Warpgroup w's half w (column blocks 4w..) lands first: its own fill, a step before the other's.
    let early_offset = comptime!((wg * 4 * COLUMN_BLOCK * 16) as u32);
    let late_offset = comptime!((other * 4 * COLUMN_BLOCK * 16) as u32);
    // V columns 256·wg.. of each buffer: its column blocks 4·wg..
    let v_offset = comptime!((wg * 4 * COLUMN_BLOCK * 16) as u32);
    let own_v = sw128_mn_major_descriptor(own_tile + v_offset, block_bytes as u32);
    let other_v = sw128_mn_major_descriptor(other_tile + v_offset, block_bytes as u32);
    let stat_row = warp * 16 + g;

    let mut o = Vector::<f32, Const<128>>::new(0.0f32);
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
    }
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;
    let pairs = at.tiles.div_ceil(2);
    // The rows of pair 0 (this warpgroup's halves), then the offsets of pair 1, loaded under pair 0.
    let mut offsets = Array::<u32>::new(comptime!(2 * GATHER_ROWS));
    if comptime!(!producer) {
        resolve_pair(indices, block_table, &mut offsets, 0usize, at, source);
        if pairs > 0 {
            fill_half(kv, smem, valid, &offsets, barriers, skip, wg, wg, source);
            fill_half(kv, smem, valid, &offsets, barriers, skip, other, wg, source);
        }
        resolve_pair(indices, block_table, &mut offsets, 1usize, at, source);
    }
    let mut phase = 0u32;
    let mut pair = 0usize;
    while pair < pairs {
        let more = pair + 1 < pairs;
        // Warpgroup 0 waits for buffer 0's halves in the order they are filled (L first), warpgroup 1 R first.
        mbarrier_wait(barriers + comptime!(ready(wg, wg)), phase);
        fence_shared_for_wgmma();
        // S over the half that landed first (its own fill, done a step earlier), then over the other, so
        // that the tensor cores work while that one's copies finish. Element 4n + 2r + e: head
        // 16·warp + g + 8r, key 8n + 2t + e.
        let s = wgmma_fresh::<Const<32>>(
            sw128_descriptor(base + early_offset),
            sw128_descriptor(own_tile + early_offset),
            Operands::Bf16,
            64usize,
            comptime!(16 + 4 * wg),
            block_bytes,
            block_bytes,
            true,
        );
        mbarrier_wait(barriers + comptime!(ready(wg, 1 - wg)), phase);
        fence_shared_for_wgmma();
        let s = wgmma_accumulate::<Const<32>>(
            s,
            sw128_descriptor(base + late_offset),
            sw128_descriptor(own_tile + late_offset),
            Operands::Bf16,
            64usize,
            comptime!(16 + 4 * other),
            block_bytes,
            block_bytes,
        );
        let mut x = Array::<f32>::new(32usize);
        let mut block_max = Array::<f32>::new(2usize);
        block_max[0] = -1073741824.0f32;
        block_max[1] = -1073741824.0f32;
        #[unroll]
        for i in 0..32usize {
            let ok = valid[wg * BLOCK + (i / 4) * 8 + 2 * t + i % 2] != 0;
            let r = (i % 4) / 2;
            x[i] = select(ok, s.extract(i) * scale_log2, f32::reinterpret(0xff80_0000u32));
            block_max[r] = f32::max(block_max[r], x[i]);
        }
        // The maxima chain: warpgroup 0 publishes max(m, its block's), warpgroup 1 adds its block's (final).
        let mut m_new = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            block_max[r] = quad_max(block_max[r]);
        }
        if comptime!(wg == 0) {
            #[unroll]
            for r in 0..2usize {
                m_new[r] = f32::max(m[r], block_max[r]);
                if t == 0 {
                    stats[stat_row + 8 * r] = m_new[r];
                }
            }
            named_barrier_arrive(MAX0, BOTH);
        } else {
            named_barrier_sync(MAX0, BOTH);
            #[unroll]
            for r in 0..2usize {
                m_new[r] = f32::max(stats[stat_row + 8 * r], block_max[r]);
                if t == 0 {
                    stats[HEADS + stat_row + 8 * r] = m_new[r];
                }
            }
            named_barrier_arrive(MAX1, BOTH);
        }
        let mut alpha = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            alpha[r] = fast_exp2(m[r] - m_new[r]);
            m[r] = m_new[r];
            l[r] *= alpha[r];
        }
        rescale(&mut o, &alpha);
        #[unroll]
        for i in 0..32usize {
            let r = (i % 4) / 2;
            x[i] = fast_exp2(x[i] - m[r]);
            l[r] += x[i];
        }
        // Own block: O += P·V with P as bf16 pairs in the A layout (k step j: keys 16j..).
        let mut a = Vector::<u32, Const<16>>::new(0u32);
        #[unroll]
        for i in 0..16usize {
            a.insert(i, pack_bf16x2(x[2 * i], x[2 * i + 1]));
        }
        o = wgmma_bf16_register_a_accumulate::<Const<128>, Const<16>>(o, a, own_v, 256usize, 4usize, 2048usize, true);
        // This warpgroup was the last reader of its own buffer's half `wg`: the next pair's rows go in now.
        release_half(
            kv, smem, valid, &offsets, barriers, skip, more, wg, wg, producer, source,
        );

        if comptime!(wg == 0) {
            // The final maxima: P and O (its own block's product included) move to them.
            named_barrier_sync(MAX1, BOTH);
            let mut f = Array::<f32>::new(2usize);
            #[unroll]
            for r in 0..2usize {
                let m_final = stats[HEADS + stat_row + 8 * r];
                f[r] = fast_exp2(m[r] - m_final);
                m[r] = m_final;
                l[r] *= f[r];
            }
            store_p(a, &f, own_p, warp, g, t, true);
            fence_shared_for_wgmma();
            named_barrier_arrive(P0_READY, BOTH);
            named_barrier_sync(P1_READY, BOTH);
            rescale(&mut o, &f);
        } else {
            store_p(a, &alpha, own_p, warp, g, t, false);
            fence_shared_for_wgmma();
            named_barrier_arrive(P1_READY, BOTH);
            named_barrier_sync(P0_READY, BOTH);
        }
        // The other's block: P from its shared tile.
        o = wgmma_bf16_shared_accumulate_trans_b::<Const<128>>(
            o,
            sw128_descriptor(other_p),
            other_v,
            256usize,
            4usize,
            2048usize,
            true,
        );
        release_half(
            kv, smem, valid, &offsets, barriers, skip, more, other, wg, producer, source,
        );
        if comptime!(!producer) {
            resolve_pair(indices, block_table, &mut offsets, pair + 2, at, source);
        }
        phase ^= 1;
        pair += 1;
    }

    // Both warpgroups' row sums, then the normalized output (columns 256·wg + 8n + 2t, + 1); lse and max
    // logit from warpgroup 0.
    #[unroll]
    for r in 0..2usize {
        l[r] = quad_sum(l[r]);
        if t == 0 {
            stats[2 * HEADS + wg * HEADS + stat_row + 8 * r] = l[r];
        }
    }
    named_barrier_sync(SUMS, BOTH);
    let mut sum = Array::<f32>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        sum[r] = l[r] + stats[2 * HEADS + other * HEADS + stat_row + 8 * r];
    }
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
        out_row0 + stat_row,
        part_row0 + stat_row,
        wg,
        splits,
        wg == 0,
    );
}

/// Stores P (`a`: bf16 pairs in the A layout, pair 2n + r = row g + 8r, keys 8n + 2t, + 1), times `factor` by
/// row when `scaled`, into the swizzled 64 × 64 tile at shared address `tile` (row = head, 64 keys = one
/// 128-byte row). Rescaling the rounded pairs instead of keeping P in f32 saves 16 registers.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_p(
    a: Vector<u32, Const<16>>,
    factor: &Array<f32>,
    tile: u32,
    warp: usize,
    g: usize,
    t: usize,
    #[comptime] scaled: bool,
) {
    #[unroll]
    for n in 0..8usize {
        #[unroll]
        for r in 0..2usize {
            let pair = a.extract(2 * n + r);
            let mut word = pair;
            if scaled {
                let lo = f32::reinterpret(pair << 16u32) * factor[r];
                let hi = f32::reinterpret(pair & 0xffff_0000u32) * factor[r];
                word = pack_bf16x2(lo, hi);
            }
            let chunk = swizzled_chunk(warp * 16 + g + 8 * r, n);
            store_shared_u32(tile + (chunk * 16 + 4 * t) as u32, word);
        }
    }
}
