//! `mha_prefill`'s Hopper variants: flash attention on warpgroup MMA. A cube is `groups` warpgroups
//! (128 units each) owning 64·groups queries of one head; warpgroup w holds queries 64w.., warp i of it
//! 16 of them in the accumulator layout of the `mma` variant. Q stays for the whole cube in registers (the
//! A operand of S = Q·Kᵀ, m64n64 over 12 k16 steps, K read from a swizzled shared tile) or, to free 48
//! registers a unit so that three warpgroups fit an SM, in a swizzled shared tile of its own. P stays in
//! registers and O += P·V is m64n128 over 4 k16 steps with V read MN-major ([key][dim] as stored, trans-b),
//! O rescaled in registers first. K/V blocks of 64 keys are gathered by cp.async `depth` blocks ahead and
//! shared by the warpgroups ([`Pipeline`]).
//!
//! Block b's S is issued without waiting and consumed a step later: while the tensor cores compute it, the
//! warpgroup runs block b − 1's softmax and P·V (FlashAttention-3's intra-warpgroup overlap). V keeps one
//! buffer more than K for that.
//!
//! Masking costs a compare and a select per score, so only blocks crossing a warpgroup's causal diagonal
//! are masked; a warpgroup whose queries see none of a block skips it.
use crate::Problem;
use crate::launch::{bf16_head_rows_map, buffer, grid, ir_settings, slice_arg};
use crate::mha_prefill::locate_tile;
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::pack_bf16x2;
use nsa_dsl::mbarrier::{
    fence_barrier_init, mbarrier_arrive, mbarrier_arrive_expect_tx, mbarrier_init, mbarrier_wait,
};
use nsa_dsl::tma::tma_load_3d;
use nsa_dsl::warp_mma::{commit_async_copies, copy_chunk_async, fast_exp2, quad_max, quad_sum};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, fence_shared_for_wgmma, first_atom, sw128_descriptor, sw128_mn_major_descriptor,
    swizzled_chunk, wait_async_copies_pending, wgmma_bf16_register_a_accumulate, wgmma_bf16_register_a_fresh,
    wgmma_fresh, wgmma_wait,
};

const D_QK: usize = 192;
const D_V: usize = 128;
const BLOCK: usize = 64;
/// 16-byte chunks of one 64-row × 64-column swizzled block (8 KiB).
const COLUMN_BLOCK: usize = BLOCK * 8;
const K_CHUNKS: usize = 3 * COLUMN_BLOCK;
const V_CHUNKS: usize = 2 * COLUMN_BLOCK;

/// How a cube's K/V blocks flow: `groups` warpgroups (64 queries each) share blocks copied `depth` blocks
/// ahead. Without `staged` every block starts with a cube barrier (copies landed, buffers free); `staged`
/// signals both per stage with mbarriers instead (a "full" one every unit arrives on once its copies of the
/// block landed, an "empty" one once it is done reading it), so a warpgroup may run up to a step ahead of
/// the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pipeline {
    pub groups: usize,
    pub depth: usize,
    pub staged: bool,
    /// Q in swizzled shared tiles (S = Q·Kᵀ reads both operands from shared memory) instead of registers:
    /// 48 registers fewer per unit, so three warpgroups fit an SM's registers.
    pub q_shared: bool,
    /// Tiles copied by the tensor copy engine (`dsl::tma`, one unit issuing five box copies a block, the
    /// full barrier completed by their bytes) instead of every unit's cp.async; needs `staged`.
    pub tma: bool,
}

impl Pipeline {
    /// K buffers: block b + depth is copied while block b − 1's are being released (staged) or after
    /// they were (cube barrier).
    fn k_buffers(self) -> usize {
        self.depth + 1 + usize::from(self.staged)
    }

    /// V buffers: block b's V is read a step after its K (P·V runs behind S).
    fn v_buffers(self) -> usize {
        self.depth + 2
    }

    /// Where the Q tiles start (after K and V), in 16-byte chunks.
    fn q_offset(self) -> usize {
        self.k_buffers() * K_CHUNKS + self.v_buffers() * V_CHUNKS
    }

    /// 16-byte chunks of the K, V and Q tiles; the staged form's barriers follow them.
    fn tile_chunks(self) -> usize {
        self.q_offset() + if self.q_shared { self.groups * K_CHUNKS } else { 0 }
    }

    pub fn shared_memory_bytes(self) -> usize {
        // Staged: a full and an empty barrier (8 bytes each) per stage = one chunk per stage.
        let barriers = if self.staged { self.v_buffers() } else { 0 };
        16 * (self.tile_chunks() + barriers) + ATOM_BYTES as usize
    }
}

/// Starts copying 64 rows of head `head` (positions `first..` of a sequence whose `count` rows start at row
/// `row0` of `source` [rows, heads, chunks]; past the sequence zero) into swizzled 64-column blocks at
/// chunk `tile0`. Unit u copies chunk u % 8 of every 64-column block of rows u / 8 + (units / 8)·i, so
/// its addresses are computed once per row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_head_rows_swizzled(
    source: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    tile0: usize,
    row0: usize,
    first: usize,
    count: usize,
    heads: usize,
    head: usize,
    #[comptime] chunks: usize,
    #[comptime] units: usize,
    unit: usize,
) {
    let c = unit % 8;
    let r0 = unit / 8;
    #[unroll]
    for pass in 0..comptime!((BLOCK * 8).div_ceil(units)) {
        let r = r0 + pass * comptime!(units / 8);
        // Three warpgroups (384 units) do not divide 64 rows: the last pass stops at the tile's end.
        let in_tile = comptime!((BLOCK * 8).is_multiple_of(units)) || r < BLOCK;
        let position = first + select(in_tile, r, 0usize);
        let valid = position < count;
        let source_row = ((row0 + select(valid, position, 0usize)) * heads + head) * chunks + c;
        let len = select(valid, 1usize, 0usize);
        let dst_row = tile0 + swizzled_chunk(r, c);
        if in_tile {
            #[unroll]
            for block in 0..comptime!(chunks / 8) {
                let start = source_row + block * 8;
                let dst = dst_row + block * COLUMN_BLOCK;
                copy_chunk_async(&source[start..start + len], &mut smem[dst..dst + 1]);
            }
        }
    }
}

/// Byte offset from the aligned base of block `block`'s K tile (K buffers first).
#[cube]
fn k_tile_bytes(block: usize, #[comptime] k_buffers: usize) -> u32 {
    ((block % k_buffers) * K_CHUNKS * 16) as u32
}

/// Byte offset from the aligned base of block `block`'s V tile (after the K buffers).
#[cube]
fn v_tile_bytes(block: usize, #[comptime] k_buffers: usize, #[comptime] v_buffers: usize) -> u32 {
    ((k_buffers * K_CHUNKS + (block % v_buffers) * V_CHUNKS) * 16) as u32
}

/// Starts copying block `block`'s 64 keys of K and V into their buffers.
#[cube]
#[allow(clippy::too_many_arguments)]
fn prefetch(
    k: &[Vector<u32, Const<4>>],
    v: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    skip: usize,
    block: usize,
    k0: usize,
    k_len: usize,
    heads: usize,
    head: usize,
    #[comptime] units: usize,
    #[comptime] k_buffers: usize,
    #[comptime] v_buffers: usize,
) {
    let first = block * BLOCK;
    let k_tile = skip + (block % k_buffers) * K_CHUNKS;
    let v_tile = skip + k_buffers * K_CHUNKS + (block % v_buffers) * V_CHUNKS;
    copy_head_rows_swizzled(
        k,
        smem,
        k_tile,
        k0,
        first,
        k_len,
        heads,
        head,
        comptime!(D_QK / 8),
        units,
        UNIT_POS as usize,
    );
    copy_head_rows_swizzled(
        v,
        smem,
        v_tile,
        k0,
        first,
        k_len,
        heads,
        head,
        comptime!(D_V / 8),
        units,
        UNIT_POS as usize,
    );
}

/// Issues S = Q·Kᵀ for block `block` (64 queries × 64 keys, K = 192 in three 64-column blocks of the K
/// tile; Q from registers `qa`, or the swizzled tile at shared address `q_tile`) without waiting: the result
/// is in flight until [`wgmma_wait`].
#[cube]
fn issue_scores(
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    base: u32,
    block: usize,
    #[comptime] k_buffers: usize,
    #[comptime] q_shared: bool,
) -> Vector<f32, Const<32>> {
    let k_desc = sw128_descriptor(base + k_tile_bytes(block, k_buffers));
    let block_bytes = comptime!(COLUMN_BLOCK * 16);
    if q_shared {
        wgmma_fresh::<Const<32>>(
            sw128_descriptor(q_tile),
            k_desc,
            Operands::Bf16,
            64usize,
            comptime!(D_QK / 16),
            block_bytes,
            block_bytes,
            false,
        )
    } else {
        wgmma_bf16_register_a_fresh::<Const<32>, Const<64>>(
            qa,
            k_desc,
            64usize,
            comptime!(D_QK / 16),
            block_bytes,
            false,
        )
    }
}

/// Block `block`'s online softmax of `s` (this warpgroup's 64 queries × 64 keys from 64·block; element
/// 4n + 2r + e: row g + 8r, key 8n + 2t + e) in log₂ units, then O rescaled and O += P·V (V from the
/// block's buffer past shared address `base`). A block reaching past `unmasked_keys` (warpgroup-uniform)
/// is masked: keys at or past a row's causal `limit` weigh nothing; blocks left of the diagonal skip the
/// compares. Maxima and sums are trees, not 16-long chains.
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_and_pv(
    s: Vector<f32, Const<32>>,
    o: Vector<f32, Const<64>>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    limit: &Array<usize>,
    block: usize,
    unmasked_keys: usize,
    base: u32,
    t: usize,
    scale_log2: f32,
    #[comptime] k_buffers: usize,
    #[comptime] v_buffers: usize,
) -> Vector<f32, Const<64>> {
    let key0 = block * BLOCK;
    let v_desc = sw128_mn_major_descriptor(
        base + v_tile_bytes(block, k_buffers, v_buffers),
        comptime!(COLUMN_BLOCK as u32 * 16),
    );
    let masked = (block + 1) * BLOCK > unmasked_keys;
    let mut x = Array::<f32>::new(32usize);
    #[unroll]
    for i in 0..32usize {
        x[i] = s.extract(i);
    }
    if masked {
        #[unroll]
        for i in 0..32usize {
            let key = key0 + (i / 4) * 8 + 2 * t + i % 2;
            x[i] = select(key < limit[(i % 4) / 2], x[i], f32::reinterpret(0xff80_0000u32));
        }
    }
    let mut alpha = Array::<f32>::new(2usize);
    let mut p = Array::<f32>::new(32usize);
    #[unroll]
    for r in 0..2usize {
        // Row r's 16 values are elements 4n + 2r + e.
        let mut tree = Array::<f32>::new(16usize);
        #[unroll]
        for i in 0..16usize {
            tree[i] = x[4 * (i / 2) + 2 * r + i % 2];
        }
        #[unroll]
        for level in 0..4u32 {
            let width = comptime!(8usize >> level);
            #[unroll]
            for i in 0..width {
                tree[i] = f32::max(tree[i], tree[i + width]);
            }
        }
        let m_new = f32::max(m[r], quad_max(tree[0]) * scale_log2);
        alpha[r] = fast_exp2(m[r] - m_new);
        m[r] = m_new;
        #[unroll]
        for i in 0..16usize {
            let index = 4 * (i / 2) + 2 * r + i % 2;
            let pe = fast_exp2(x[index] * scale_log2 - m_new);
            p[index] = pe;
            tree[i] = pe;
        }
        #[unroll]
        for level in 0..4u32 {
            let width = comptime!(8usize >> level);
            #[unroll]
            for i in 0..width {
                tree[i] += tree[i + width];
            }
        }
        l[r] = l[r] * alpha[r] + tree[0];
    }
    // O rescaled per row, then O += P·V with P as bf16 pairs in the m16n8k16 A layout: k step j holds
    // keys 16j.. = accumulator column groups 2j (pairs 0, 1) and 2j + 1 (pairs 2, 3).
    let mut scale = Vector::<f32, Const<64>>::new(0.0f32);
    #[unroll]
    for i in 0..64usize {
        scale.insert(i, alpha[(i % 4) / 2]);
    }
    let mut a = Vector::<u32, Const<16>>::new(0u32);
    #[unroll]
    for i in 0..16usize {
        a.insert(i, pack_bf16x2(p[2 * i], p[2 * i + 1]));
    }
    wgmma_bf16_register_a_accumulate::<Const<64>, Const<16>>(o * scale, a, v_desc, 128usize, 4usize, 2048usize)
}

/// Shared address of stage `stage`'s "full" barrier (`empty`: its "empty" one); `stages` barriers of each
/// kind follow the tiles at byte `tiles_bytes` from the aligned base.
#[cube]
fn barrier_address(
    base: u32,
    stage: usize,
    #[comptime] empty: bool,
    #[comptime] tiles_bytes: usize,
    #[comptime] stages: usize,
) -> u32 {
    let first = comptime!(tiles_bytes + if empty { 8 * stages } else { 0 });
    base + (first + 8 * (stage % stages)) as u32
}

/// This unit's copies of every block but the last one it started have landed: makes them visible to the
/// multiplies and arrives on `block`'s full barrier.
#[cube]
fn arrive_copied(base: u32, block: usize, #[comptime] tiles_bytes: usize, #[comptime] stages: usize) {
    wait_async_copies_pending(1u32);
    fence_shared_for_wgmma();
    mbarrier_arrive(barrier_address(base, block, false, tiles_bytes, stages));
}

/// Waits until every unit released the buffers that block `block` reuses (those of block
/// `block` − stages).
#[cube]
fn await_release(base: u32, block: usize, #[comptime] tiles_bytes: usize, #[comptime] stages: usize) {
    mbarrier_wait(
        barrier_address(base, block, true, tiles_bytes, stages),
        ((block / stages + 1) % 2) as u32,
    );
}

/// One unit's start of block `block`'s TMA copies: K as three and V as two 64 × 64 boxes of head `head`
/// from row `k0` + 64·block, and with block 0 (`q_shared`) every warpgroup's Q tile from row `q_row0`
/// + 64w, all completing on the block's full barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tma_prefetch(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    block: usize,
    k0: usize,
    q_row0: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) {
    let (k_buffers, v_buffers) = comptime!((pipeline.k_buffers(), pipeline.v_buffers()));
    let tiles_bytes = comptime!(16 * pipeline.tile_chunks());
    let box_bytes = comptime!(COLUMN_BLOCK * 16);
    let full = barrier_address(base, block, false, tiles_bytes, v_buffers);
    let block_bytes = comptime!((K_CHUNKS + V_CHUNKS) * 16) as u32;
    let q_bytes = comptime!(pipeline.groups * K_CHUNKS * 16) as u32;
    let with_q = comptime!(pipeline.q_shared) && block == 0;
    mbarrier_arrive_expect_tx(full, select(with_q, block_bytes + q_bytes, block_bytes));
    let row = (k0 + block * BLOCK) as i32;
    let head = head as i32;
    let k_tile = base + k_tile_bytes(block, k_buffers);
    let v_tile = base + v_tile_bytes(block, k_buffers, v_buffers);
    #[unroll]
    for c in 0..3u32 {
        tma_load_3d(k_map, k_tile + c * box_bytes as u32, full, (64 * c) as i32, head, row);
    }
    #[unroll]
    for c in 0..2u32 {
        tma_load_3d(v_map, v_tile + c * box_bytes as u32, full, (64 * c) as i32, head, row);
    }
    if with_q {
        #[unroll]
        for w in 0..pipeline.groups {
            let q_tile = base + ((comptime!(pipeline.q_offset()) + w * K_CHUNKS) * 16) as u32;
            #[unroll]
            for c in 0..3u32 {
                let q_row = (q_row0 + w * BLOCK) as i32;
                tma_load_3d(q_map, q_tile + c * box_bytes as u32, full, (64 * c) as i32, head, q_row);
            }
        }
    }
}

/// The start of step `step`: waits until block `step`'s K/V landed (and, staged, until the buffers of the
/// block `depth` ahead are free), starts copying that block, issues block `step`'s S (returned in flight)
/// and, staged, announces this unit's copies of the block before it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn begin_step(
    k: &[Vector<u32, Const<4>>],
    v: &[Vector<u32, Const<4>>],
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    smem: &mut [Vector<u32, Const<4>>],
    skip: usize,
    base: u32,
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    step: usize,
    blocks: usize,
    k0: usize,
    k_len: usize,
    heads: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<32>> {
    let (units, depth, staged) = comptime!((128 * pipeline.groups, pipeline.depth, pipeline.staged));
    let (k_buffers, v_buffers) = comptime!((pipeline.k_buffers(), pipeline.v_buffers()));
    let tiles_bytes = comptime!(16 * pipeline.tile_chunks());
    let ahead = step + depth;
    if staged {
        mbarrier_wait(
            barrier_address(base, step, false, tiles_bytes, v_buffers),
            ((step / v_buffers) % 2) as u32,
        );
        // The buffers of block ahead − stages are free once every unit released them (only the copying
        // unit waits for that with TMA).
        if comptime!(!pipeline.tma) && ahead < blocks && ahead >= v_buffers {
            await_release(base, ahead, tiles_bytes, v_buffers);
        }
    } else {
        await_stage(comptime!(depth as u32 - 1));
    }
    if comptime!(pipeline.tma) {
        if UNIT_POS == 0 && ahead < blocks {
            if ahead >= v_buffers {
                await_release(base, ahead, tiles_bytes, v_buffers);
            }
            tma_prefetch(k_map, v_map, q_map, base, ahead, k0, 0usize, head, pipeline);
        }
        sync_plane();
    } else {
        if ahead < blocks {
            prefetch(
                k, v, smem, skip, ahead, k0, k_len, heads, head, units, k_buffers, v_buffers,
            );
        }
        commit_async_copies();
    }
    let s = issue_scores(qa, q_tile, base, step, k_buffers, comptime!(pipeline.q_shared));
    if staged && comptime!(!pipeline.tma) {
        if ahead - 1 < blocks {
            arrive_copied(base, ahead - 1, tiles_bytes, v_buffers);
        }
    }
    s
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_wgmma_kernel(
    q: &[u32],
    q_rows: &[Vector<u32, Const<4>>],
    k: &[Vector<u32, Const<4>>],
    v: &[Vector<u32, Const<4>>],
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    cu_q: &[i32],
    cu_k: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    sm_scale: f32,
    #[comptime] pipeline: Pipeline,
) {
    let (groups, depth, staged) = comptime!((pipeline.groups, pipeline.depth, pipeline.staged));
    let (k_buffers, v_buffers) = comptime!((pipeline.k_buffers(), pipeline.v_buffers()));
    let tiles_bytes = comptime!(16 * pipeline.tile_chunks());
    let (head, q_start, q_len, k0, k_len, local0) =
        locate_tile(cu_q, cu_k, heads, seqs, tile_bound, comptime!(BLOCK * groups));
    let warp = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let units = comptime!(128 * groups);

    let mut smem =
        Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(pipeline.shared_memory_bytes() / 16), 1024usize);
    let (skip, base) = first_atom(&smem);

    // Keys the whole tile needs; those this warpgroup's last query needs, and the first key any of its
    // queries cannot see (blocks before it need no mask).
    let tile_end = select(local0 + BLOCK * groups < q_len, local0 + BLOCK * groups, q_len);
    let tile_keys = select(k_len + tile_end > q_len, k_len + tile_end - q_len, 0usize);
    let blocks = tile_keys.div_ceil(BLOCK);
    let group_first = local0 + (warp / 4) * BLOCK;
    let group_end = select(group_first + BLOCK < q_len, group_first + BLOCK, q_len);
    let group_keys = select(
        group_first < q_len && k_len + group_end > q_len,
        k_len + group_end - q_len,
        0usize,
    );
    let unmasked_keys = select(k_len + group_first + 1 > q_len, k_len + group_first + 1 - q_len, 0usize);

    let q_tile_chunks = comptime!(pipeline.q_offset()) + (warp / 4) * K_CHUNKS;
    let q_tile = base + (q_tile_chunks * 16) as u32;
    if staged {
        // Full barriers: every unit's copies (cp.async) or the one copying unit's arrival plus the bytes
        // (TMA); empty barriers: every unit's release.
        if UNIT_POS == 0 {
            let copiers = comptime!(if pipeline.tma { 1u32 } else { units as u32 });
            #[unroll]
            for stage in 0..v_buffers {
                mbarrier_init(base + (tiles_bytes + 8 * stage) as u32, copiers);
                mbarrier_init(base + (tiles_bytes + 8 * (v_buffers + stage)) as u32, units as u32);
            }
            if comptime!(pipeline.tma) {
                fence_barrier_init();
            }
        }
        sync_cube();
    }
    if comptime!(pipeline.tma) {
        // Blocks 0 .. depth − 1 (block 0 with the Q tiles) started by one unit.
        if UNIT_POS == 0 {
            #[unroll]
            for first in 0..depth {
                if first < blocks {
                    tma_prefetch(k_map, v_map, q_map, base, first, k0, q_start + local0, head, pipeline);
                }
            }
        }
        sync_plane();
    } else {
        // This warpgroup's Q tile (with block 0's copy group), then blocks 0 .. depth − 1, one group each.
        if comptime!(pipeline.q_shared) {
            copy_head_rows_swizzled(
                q_rows,
                &mut smem,
                skip + q_tile_chunks,
                q_start,
                local0 + (warp / 4) * BLOCK,
                q_len,
                heads,
                head,
                comptime!(D_QK / 8),
                128usize,
                (UNIT_POS % 128) as usize,
            );
        }
        #[unroll]
        for first in 0..depth {
            if first < blocks {
                prefetch(
                    k, v, &mut smem, skip, first, k0, k_len, heads, head, units, k_buffers, v_buffers,
                );
            }
            commit_async_copies();
        }
        if staged {
            // Blocks 0 .. depth − 2 announced here; block b + depth − 1 in step b.
            wait_async_copies_pending(0u32);
            fence_shared_for_wgmma();
            #[unroll]
            for first in 0..comptime!(depth - 1) {
                mbarrier_arrive(barrier_address(base, first, false, tiles_bytes, v_buffers));
            }
        }
    }

    // Q as the A operand of S = Q·Kᵀ, k step j in registers 4j..4j + 3: rows g and g + 8 of this warp's
    // 16 (register + r), columns 16j + 2t, + 1 (register + 2h: + 8h); rows past the sequence zero. 48 are
    // used; the vector has 64 because CUDA aligns a vector type to its size, which must be a power of two.
    let mut qa = Vector::<u32, Const<64>>::new(0u32);
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    let mut limit = Array::<usize>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
        let local = local0 + warp * 16 + g + 8 * r;
        limit[r] = select(k_len + local + 1 > q_len, k_len + local + 1 - q_len, 0usize);
        let valid = local < q_len;
        if comptime!(!pipeline.q_shared) {
            let row = ((q_start + select(valid, local, 0usize)) * heads + head) * comptime!(D_QK / 2) + t;
            #[unroll]
            for j in 0..12usize {
                #[unroll]
                for h in 0..2usize {
                    qa.insert(4 * j + r + 2 * h, select(valid, q[row + 8 * j + 4 * h], 0u32));
                }
            }
        }
    }
    let mut o = Vector::<f32, Const<64>>::new(0.0f32);
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;

    // Step b (begin_step): block b's copies awaited, block b + depth's started, block b's S issued; while
    // the tensor cores compute it, block b − 1's softmax and P·V; then S awaited (held for step b + 1).
    // Step 0 is peeled so that no branch separates an S in flight from its wait (ptxas would serialize).
    if blocks > 0 {
        let s0 = begin_step(
            k, v, k_map, v_map, q_map, &mut smem, skip, base, qa, q_tile, 0usize, blocks, k0, k_len, heads, head,
            pipeline,
        );
        let mut held = wgmma_wait::<Const<32>>(s0, 64usize);
        let mut step = 1usize;
        while step < blocks {
            let s = begin_step(
                k, v, k_map, v_map, q_map, &mut smem, skip, base, qa, q_tile, step, blocks, k0, k_len, heads, head,
                pipeline,
            );
            let late = step - 1;
            if late * BLOCK < group_keys {
                o = softmax_and_pv(
                    held,
                    o,
                    &mut m,
                    &mut l,
                    &limit,
                    late,
                    unmasked_keys,
                    base,
                    t,
                    scale_log2,
                    k_buffers,
                    v_buffers,
                );
            }
            if staged {
                mbarrier_arrive(barrier_address(base, late, true, tiles_bytes, v_buffers));
            }
            held = wgmma_wait::<Const<32>>(s, 64usize);
            step += 1;
        }
        let late = blocks - 1;
        if late * BLOCK < group_keys {
            o = softmax_and_pv(
                held,
                o,
                &mut m,
                &mut l,
                &limit,
                late,
                unmasked_keys,
                base,
                t,
                scale_log2,
                k_buffers,
                v_buffers,
            );
        }
    }

    // out = O / l (bf16 pairs: row g + 8r, columns 8n + 2t, + 1), lse; rows past the sequence unwritten.
    #[unroll]
    for r in 0..2usize {
        let sum = quad_sum(l[r]);
        let local = local0 + warp * 16 + g + 8 * r;
        if local < q_len {
            let pair = (q_start + local) * heads + head;
            let inv = select(sum > 0.0f32, 1.0f32 / sum, 0.0f32);
            #[unroll]
            for n in 0..16usize {
                out[pair * comptime!(D_V / 2) + n * 4 + t] =
                    pack_bf16x2(o.extract(4 * n + 2 * r) * inv, o.extract(4 * n + 2 * r + 1) * inv);
            }
            if t == 0 {
                lse[pair] = select(
                    sum == 0.0f32,
                    f32::reinterpret(0x7f80_0000u32),
                    m[r] * core::f32::consts::LN_2 + f32::ln(sum),
                );
            }
        }
    }
}

/// Launches with `pipeline`'s warpgroups (64 queries each) per cube.
pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle], pipeline: Pipeline) {
    let (t_q, t_k, h, seqs) = (
        problem.dim("t_q"),
        problem.dim("t_k"),
        problem.dim("h"),
        problem.dim("n_cu") - 1,
    );
    // At most one partial tile per sequence beyond the full ones.
    let tiles = t_q.div_ceil(BLOCK * pipeline.groups) + seqs;
    mha_prefill_wgmma_kernel::launch(
        &device.client,
        grid(tiles * h),
        CubeDim::new_1d(128 * pipeline.groups as u32),
        buffer(&inputs[0], t_q * h * D_QK / 2),
        buffer(&inputs[0], t_q * h * D_QK / 8),
        buffer(&inputs[1], t_k * h * D_QK / 8),
        buffer(&inputs[2], t_k * h * D_V / 8),
        bf16_head_rows_map(&inputs[1], t_k, h, D_QK),
        bf16_head_rows_map(&inputs[2], t_k, h, D_V),
        bf16_head_rows_map(&inputs[0], t_q, h, D_QK),
        buffer(&inputs[3], seqs + 1),
        buffer(&inputs[4], seqs + 1),
        buffer(&outputs[0], t_q * h * D_V / 2),
        buffer(&outputs[1], t_q * h),
        h,
        seqs,
        tiles,
        problem.param("sm_scale") as f32,
        pipeline,
    );
}

pub fn define(target: IrTarget, pipeline: Pipeline) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    mha_prefill_wgmma_kernel::MhaPrefillWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(128 * pipeline.groups as u32)),
        props,
        target_props,
        a(),
        a(),
        a(),
        a(),
        (),
        (),
        (),
        a(),
        a(),
        a(),
        a(),
        (),
        (),
        (),
        (),
        pipeline,
    )
    .define()
}
