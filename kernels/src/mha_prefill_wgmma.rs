//! `mha_prefill`'s Hopper variants: flash attention on warpgroup MMA. A cube is `groups` warpgroups
//! (128 units each) owning 64·groups queries of one head; warpgroup w holds queries 64w.., warp i of it
//! 16 of them in the accumulator layout of the `mma` variant. Q stays for the whole cube in registers (the
//! A operand of S = Q·Kᵀ, m64n64 over 12 k16 steps, K read from a swizzled shared tile) or, to free 48
//! registers a unit so that three warpgroups fit an SM, in a swizzled shared tile of its own. P stays in
//! registers and O += P·V is m64n128 over 4 k16 steps with V read MN-major ([key][dim] as stored, trans-b),
//! O rescaled in registers first.
//!
//! K/V blocks of 64 keys (and the Q tiles) are copied by the tensor copy engine (`dsl::tma`): one unit
//! starts a block's five 64 × 64 boxes `depth` blocks ahead, and they complete on the block's "full"
//! mbarrier; every unit releases a block's K buffer once its S was computed and its V buffer after its P·V
//! ("free" mbarriers), and the copying unit waits for those releases before reusing a buffer. No cube
//! barrier per block: a warpgroup may run ahead of the others by the buffers it has. Rows past the tensor
//! come in as zeros; rows of the next sequence are masked like any key past a query's causal limit.
//!
//! Block b's S is issued without waiting and consumed a step later: while the tensor cores compute it, the
//! warpgroup runs block b − 1's softmax (FlashAttention-3's intra-warpgroup overlap); block b − 1's P·V
//! then waits for every product in flight, S included. V keeps one buffer more than K (P·V runs a step
//! behind S).
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
use nsa_dsl::mbarrier::{fence_barrier_init, mbarrier_arrive, mbarrier_arrive_expect_tx, mbarrier_init, mbarrier_wait};
use nsa_dsl::tma::tma_load_3d;
use nsa_dsl::warp_mma::{fast_exp2, quad_max, quad_sum};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, first_atom, sw128_descriptor, sw128_mn_major_descriptor, wgmma_bf16_register_a_accumulate,
    wgmma_bf16_register_a_fresh, wgmma_fresh, wgmma_wait,
};

const D_QK: usize = 192;
const D_V: usize = 128;
const BLOCK: usize = 64;
/// 16-byte chunks of one 64-row × 64-column swizzled block (8 KiB): one TMA box.
const COLUMN_BLOCK: usize = BLOCK * 8;
const K_CHUNKS: usize = 3 * COLUMN_BLOCK;
const V_CHUNKS: usize = 2 * COLUMN_BLOCK;

/// A cube's shape: `groups` warpgroups (64 queries each) sharing K/V blocks copied `depth` blocks ahead,
/// Q in registers or (`q_shared`) in shared tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pipeline {
    pub groups: usize,
    pub depth: usize,
    /// Q in swizzled shared tiles (S = Q·Kᵀ reads both operands from shared memory) instead of registers:
    /// 48 registers fewer per unit, so three warpgroups fit an SM's registers.
    pub q_shared: bool,
}

impl Pipeline {
    /// Blocks are copied at least one ahead (with none, step 0 would wait for a copy never started).
    fn check(self) {
        assert!(
            self.depth >= 1 && (1..=3).contains(&self.groups),
            "{self:?}: not a pipeline"
        );
    }

    /// K buffers: block b + depth is copied once block b − 1's S is done.
    fn k_buffers(self) -> usize {
        self.depth + 1
    }

    /// V buffers (and full barriers): block b's V is read a step after its K (P·V runs behind S).
    fn v_buffers(self) -> usize {
        self.depth + 2
    }

    /// Where the Q tiles start (after K and V), in 16-byte chunks.
    fn q_offset(self) -> usize {
        self.k_buffers() * K_CHUNKS + self.v_buffers() * V_CHUNKS
    }

    /// Bytes of the tiles; the barriers follow them: full (one per V buffer), K free, V free.
    fn tiles_bytes(self) -> usize {
        16 * (self.q_offset() + if self.q_shared { self.groups * K_CHUNKS } else { 0 })
    }

    pub fn shared_memory_bytes(self) -> usize {
        let barriers = 8 * (2 * self.v_buffers() + self.k_buffers());
        (self.tiles_bytes() + barriers).next_multiple_of(16) + ATOM_BYTES as usize
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

/// Shared address of warpgroup `w`'s Q tile (`q_shared`: after the K and V buffers).
#[cube]
fn q_tile_address(base: u32, w: usize, #[comptime] pipeline: Pipeline) -> u32 {
    base + ((comptime!(pipeline.q_offset()) + w * K_CHUNKS) * 16) as u32
}

/// Starts copying `boxes` 64 × 64 boxes of `map` at (column 64c, `head`, `row`) into consecutive 8 KiB
/// swizzled blocks from shared address `tile`, completing on barrier `full`.
#[cube]
fn load_boxes(map: &TensorMap<u32, Tiled>, tile: u32, full: u32, head: i32, row: i32, #[comptime] boxes: u32) {
    let box_bytes = comptime!(COLUMN_BLOCK * 16) as u32;
    #[unroll]
    for c in 0..boxes {
        tma_load_3d(map, tile + c * box_bytes, full, (64 * c) as i32, head, row);
    }
}

/// Shared address of block `block`'s full barrier (its copies' bytes landed).
#[cube]
fn full_barrier(base: u32, block: usize, #[comptime] pipeline: Pipeline) -> u32 {
    let first = comptime!(pipeline.tiles_bytes());
    base + (first + 8 * (block % comptime!(pipeline.v_buffers()))) as u32
}

/// Shared address of the barrier every unit arrives on once done with block `block`'s K buffer.
#[cube]
fn k_free_barrier(base: u32, block: usize, #[comptime] pipeline: Pipeline) -> u32 {
    let first = comptime!(pipeline.tiles_bytes() + 8 * pipeline.v_buffers());
    base + (first + 8 * (block % comptime!(pipeline.k_buffers()))) as u32
}

/// Shared address of the barrier every unit arrives on once done with block `block`'s V buffer.
#[cube]
fn v_free_barrier(base: u32, block: usize, #[comptime] pipeline: Pipeline) -> u32 {
    let first = comptime!(pipeline.tiles_bytes() + 8 * (pipeline.v_buffers() + pipeline.k_buffers()));
    base + (first + 8 * (block % comptime!(pipeline.v_buffers()))) as u32
}

/// Waits until the barrier at `address`, one of `buffers` used in turn, completed the phase of block
/// `block` − `buffers` (the buffer's previous block).
#[cube]
fn await_previous_use(address: u32, block: usize, #[comptime] buffers: usize) {
    mbarrier_wait(address, ((block / buffers + 1) % 2) as u32);
}

/// One unit's start of block `block`'s copies: K as three and V as two 64 × 64 boxes of head `head` from
/// row `k0` + 64·block, and with block 0 (`q_shared`) every warpgroup's Q tile from row `q_row0` + 64w,
/// all completing on the block's full barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_block(
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
    let full = full_barrier(base, block, pipeline);
    let block_bytes = comptime!((K_CHUNKS + V_CHUNKS) * 16) as u32;
    let q_bytes = comptime!(pipeline.groups * K_CHUNKS * 16) as u32;
    let with_q = comptime!(pipeline.q_shared) && block == 0;
    mbarrier_arrive_expect_tx(full, select(with_q, block_bytes + q_bytes, block_bytes));
    let row = (k0 + block * BLOCK) as i32;
    let head = head as i32;
    let k_tile = base + k_tile_bytes(block, k_buffers);
    let v_tile = base + v_tile_bytes(block, k_buffers, v_buffers);
    load_boxes(k_map, k_tile, full, head, row, 3u32);
    load_boxes(v_map, v_tile, full, head, row, 2u32);
    if with_q {
        #[unroll]
        for w in 0..pipeline.groups {
            let q_tile = q_tile_address(base, w, pipeline);
            let q_row = (q_row0 + w * BLOCK) as i32;
            load_boxes(q_map, q_tile, full, head, q_row, 3u32);
        }
    }
}

/// The start of step `step`: waits until block `step` landed; the copying unit starts block
/// `step` + depth once its buffers are free; issues block `step`'s S (returned in flight).
#[cube]
#[allow(clippy::too_many_arguments)]
fn begin_step(
    k_map: &TensorMap<u32, Tiled>,
    v_map: &TensorMap<u32, Tiled>,
    q_map: &TensorMap<u32, Tiled>,
    base: u32,
    qa: Vector<u32, Const<64>>,
    q_tile: u32,
    step: usize,
    blocks: usize,
    k0: usize,
    head: usize,
    #[comptime] pipeline: Pipeline,
) -> Vector<f32, Const<32>> {
    let (k_buffers, v_buffers) = comptime!((pipeline.k_buffers(), pipeline.v_buffers()));
    mbarrier_wait(full_barrier(base, step, pipeline), ((step / v_buffers) % 2) as u32);
    let ahead = step + comptime!(pipeline.depth);
    if UNIT_POS == 0 && ahead < blocks {
        if ahead >= k_buffers {
            await_previous_use(k_free_barrier(base, ahead, pipeline), ahead, k_buffers);
        }
        if ahead >= v_buffers {
            await_previous_use(v_free_barrier(base, ahead, pipeline), ahead, v_buffers);
        }
        copy_block(k_map, v_map, q_map, base, ahead, k0, 0usize, head, pipeline);
    }
    sync_plane();
    issue_scores(qa, q_tile, base, step, k_buffers, comptime!(pipeline.q_shared))
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
    wgmma_bf16_register_a_accumulate::<Const<64>, Const<16>>(o * scale, a, v_desc, 128usize, 4usize, 2048usize, true)
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_wgmma_kernel(
    q: &[u32],
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
    let groups = comptime!(pipeline.groups);
    let (k_buffers, v_buffers) = comptime!((pipeline.k_buffers(), pipeline.v_buffers()));
    let (head, q_start, q_len, k0, k_len, local0) =
        locate_tile(cu_q, cu_k, heads, seqs, tile_bound, comptime!(BLOCK * groups));
    let warp = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let units = comptime!(128 * groups) as u32;

    let smem =
        Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(comptime!(pipeline.shared_memory_bytes() / 16), 1024usize);
    let (_, base) = first_atom(&smem);

    // Keys the whole tile needs; those this warpgroup's last query needs, and the first key any of its
    // queries cannot see (blocks before it need no mask).
    let tile_end = select(local0 + BLOCK * groups < q_len, local0 + BLOCK * groups, q_len);
    let tile_keys = select(k_len + tile_end > q_len, k_len + tile_end - q_len, 0usize);
    let blocks = tile_keys.div_ceil(BLOCK);
    // The warpgroup index through a shuffle from lane 0: provably warp-uniform, so the compiler keeps Q's
    // descriptors in uniform registers (one add a k step instead of six instructions), and the branch on
    // this warpgroup's key range is uniform.
    let warpgroup = plane_broadcast(UNIT_POS / 128, 0u32) as usize;
    let group_first = local0 + warpgroup * BLOCK;
    let group_end = select(group_first + BLOCK < q_len, group_first + BLOCK, q_len);
    let group_keys = select(
        group_first < q_len && k_len + group_end > q_len,
        k_len + group_end - q_len,
        0usize,
    );
    let unmasked_keys = select(k_len + group_first + 1 > q_len, k_len + group_first + 1 - q_len, 0usize);
    let q_tile = q_tile_address(base, warpgroup, pipeline);

    // Barriers: a block's full one completes with the copying unit's arrival and the copies' bytes; the
    // free ones with every unit's release. Then blocks 0 .. depth − 1 (block 0 with the Q tiles).
    if UNIT_POS == 0 {
        #[unroll]
        for i in 0..v_buffers {
            mbarrier_init(full_barrier(base, i, pipeline), 1u32);
            mbarrier_init(v_free_barrier(base, i, pipeline), units);
        }
        #[unroll]
        for i in 0..k_buffers {
            mbarrier_init(k_free_barrier(base, i, pipeline), units);
        }
        fence_barrier_init();
    }
    sync_cube();
    if UNIT_POS == 0 {
        #[unroll]
        for first in 0..comptime!(pipeline.depth) {
            if first < blocks {
                copy_block(k_map, v_map, q_map, base, first, k0, q_start + local0, head, pipeline);
            }
        }
    }
    sync_plane();

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

    // Step b (begin_step): block b awaited, block b + depth's copies started, block b's S issued; while the
    // tensor cores compute it, block b − 1's softmax, then its P·V (whose wait covers S too); then S read
    // (held for step b + 1) and block b's K buffer released. Step 0 is peeled out of the loop (a loop with
    // an `if step > 0` around the softmax measured 12% slower).
    if blocks > 0 {
        let s0 = begin_step(
            k_map, v_map, q_map, base, qa, q_tile, 0usize, blocks, k0, head, pipeline,
        );
        let mut held = wgmma_wait::<Const<32>>(s0);
        mbarrier_arrive(k_free_barrier(base, 0usize, pipeline));
        let mut step = 1usize;
        while step < blocks {
            let s = begin_step(k_map, v_map, q_map, base, qa, q_tile, step, blocks, k0, head, pipeline);
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
            mbarrier_arrive(v_free_barrier(base, late, pipeline));
            held = wgmma_wait::<Const<32>>(s);
            mbarrier_arrive(k_free_barrier(base, step, pipeline));
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
    pipeline.check();
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
    pipeline.check();
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    mha_prefill_wgmma_kernel::MhaPrefillWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(128 * pipeline.groups as u32)),
        props,
        target_props,
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
