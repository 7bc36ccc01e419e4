//! `mha_prefill`'s Hopper variants: flash attention on warpgroup MMA. A cube is `groups` warpgroups
//! (128 units each) owning 64·groups queries of one head; warpgroup w holds queries 64w.., warp i of it
//! 16 of them in the accumulator layout of the `mma` variant. Q stays in registers for the whole cube
//! (the A operand of S = Q·Kᵀ, m64n64 over 12 k16 steps, K read from a swizzled shared tile); P stays in
//! registers and O += P·V is m64n128 over 4 k16 steps with V read MN-major ([key][dim] as stored,
//! trans-b), O rescaled in registers first. K/V blocks of 64 keys are gathered by cp.async one block
//! ahead and shared by the warpgroups.
//!
//! Block b's S is issued without waiting and consumed a step later: while the tensor cores compute it, the
//! warpgroup runs block b − 1's softmax and P·V (FlashAttention-3's intra-warpgroup overlap; a cube
//! barrier still starts every step, K/V shared by the warpgroups). V keeps three buffers for that (K two).
//!
//! Masking costs a compare and a select per score, so only blocks crossing a warpgroup's causal diagonal
//! are masked; a warpgroup whose queries see none of a block skips it.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::mha_prefill::locate_tile;
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::format::pack_bf16x2;
use nsa_dsl::warp_mma::{commit_async_copies, copy_chunk_async, fast_exp2, quad_max, quad_sum};
use nsa_dsl::wgmma::{
    ATOM_BYTES, await_stage, first_atom, sw128_descriptor, sw128_mn_major_descriptor, swizzled_chunk,
    wgmma_bf16_register_a_accumulate, wgmma_bf16_register_a_fresh, wgmma_wait,
};

const D_QK: usize = 192;
const D_V: usize = 128;
const BLOCK: usize = 64;
/// 16-byte chunks of one 64-row × 64-column swizzled block (8 KiB).
const COLUMN_BLOCK: usize = BLOCK * 8;
const K_CHUNKS: usize = 3 * COLUMN_BLOCK;
const V_CHUNKS: usize = 2 * COLUMN_BLOCK;
const K_BUFFERS: usize = 2;
const V_BUFFERS: usize = 3;
/// K buffers, then V buffers (chunks from the aligned base).
const K_OFFSET: usize = 0;
const V_OFFSET: usize = K_OFFSET + K_BUFFERS * K_CHUNKS;
const SMEM_CHUNKS: usize = V_OFFSET + V_BUFFERS * V_CHUNKS;

pub fn shared_memory_bytes() -> usize {
    16 * SMEM_CHUNKS + ATOM_BYTES as usize
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
) {
    let c = UNIT_POS as usize % 8;
    let r0 = UNIT_POS as usize / 8;
    #[unroll]
    for pass in 0..comptime!(BLOCK * 8 / units) {
        let r = r0 + pass * comptime!(units / 8);
        let position = first + r;
        let valid = position < count;
        let source_row = ((row0 + select(valid, position, 0usize)) * heads + head) * chunks + c;
        let len = select(valid, 1usize, 0usize);
        let dst_row = tile0 + swizzled_chunk(r, c);
        #[unroll]
        for block in 0..comptime!(chunks / 8) {
            let start = source_row + block * 8;
            let dst = dst_row + block * COLUMN_BLOCK;
            copy_chunk_async(&source[start..start + len], &mut smem[dst..dst + 1]);
        }
    }
}

/// Byte offset from the aligned base of block `block`'s K tile.
#[cube]
fn k_tile_bytes(block: usize) -> u32 {
    ((K_OFFSET + (block % K_BUFFERS) * K_CHUNKS) * 16) as u32
}

/// Byte offset from the aligned base of block `block`'s V tile.
#[cube]
fn v_tile_bytes(block: usize) -> u32 {
    ((V_OFFSET + (block % V_BUFFERS) * V_CHUNKS) * 16) as u32
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
) {
    let first = block * BLOCK;
    let k_tile = skip + K_OFFSET + (block % K_BUFFERS) * K_CHUNKS;
    let v_tile = skip + V_OFFSET + (block % V_BUFFERS) * V_CHUNKS;
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
    );
}

/// Issues S = Q·Kᵀ for block `block` (64 queries × 64 keys, K = 192 in three 64-column blocks of the K
/// tile) without waiting: the result is in flight until [`wgmma_wait`].
#[cube]
fn issue_scores(qa: Vector<u32, Const<64>>, base: u32, block: usize) -> Vector<f32, Const<32>> {
    wgmma_bf16_register_a_fresh::<Const<32>, Const<64>>(
        qa,
        sw128_descriptor(base + k_tile_bytes(block)),
        64usize,
        comptime!(D_QK / 16),
        comptime!(COLUMN_BLOCK * 16),
        false,
    )
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
) -> Vector<f32, Const<64>> {
    let key0 = block * BLOCK;
    let v_desc = sw128_mn_major_descriptor(base + v_tile_bytes(block), comptime!(COLUMN_BLOCK as u32 * 16));
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

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_wgmma_kernel(
    q: &[u32],
    k: &[Vector<u32, Const<4>>],
    v: &[Vector<u32, Const<4>>],
    cu_q: &[i32],
    cu_k: &[i32],
    out: &mut [u32],
    lse: &mut [f32],
    heads: usize,
    seqs: usize,
    tile_bound: usize,
    sm_scale: f32,
    #[comptime] groups: usize,
) {
    let (head, q_start, q_len, k0, k_len, local0) =
        locate_tile(cu_q, cu_k, heads, seqs, tile_bound, comptime!(BLOCK * groups));
    let warp = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);
    let units = comptime!(128 * groups);

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(
        comptime!(SMEM_CHUNKS + ATOM_BYTES as usize / 16),
        1024usize,
    );
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

    prefetch(k, v, &mut smem, skip, 0usize, k0, k_len, heads, head, units);
    commit_async_copies();

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
        let row = ((q_start + select(valid, local, 0usize)) * heads + head) * comptime!(D_QK / 2) + t;
        #[unroll]
        for j in 0..12usize {
            #[unroll]
            for h in 0..2usize {
                qa.insert(4 * j + r + 2 * h, select(valid, q[row + 8 * j + 4 * h], 0u32));
            }
        }
    }
    let mut o = Vector::<f32, Const<64>>::new(0.0f32);
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;

    // Block b's S is issued in step b and consumed in step b + 1, after block b − 1's softmax and P·V ran
    // while the tensor cores computed it.
    if blocks > 0 {
        await_stage(0u32);
        if 1 < blocks {
            prefetch(k, v, &mut smem, skip, 1usize, k0, k_len, heads, head, units);
        }
        commit_async_copies();
        let s0 = issue_scores(qa, base, 0usize);
        let mut held = wgmma_wait::<Const<32>>(s0, 64usize);
        let mut step = 1usize;
        while step < blocks {
            await_stage(0u32);
            if step + 1 < blocks {
                prefetch(k, v, &mut smem, skip, step + 1, k0, k_len, heads, head, units);
            }
            commit_async_copies();
            let s = issue_scores(qa, base, step);
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
                );
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

/// Launches with `groups` warpgroups (64 queries each) per cube.
pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle], groups: usize) {
    let (t_q, t_k, h, seqs) = (
        problem.dim("t_q"),
        problem.dim("t_k"),
        problem.dim("h"),
        problem.dim("n_cu") - 1,
    );
    // At most one partial tile per sequence beyond the full ones.
    let tiles = t_q.div_ceil(BLOCK * groups) + seqs;
    mha_prefill_wgmma_kernel::launch(
        &device.client,
        grid(tiles * h),
        CubeDim::new_1d(128 * groups as u32),
        buffer(&inputs[0], t_q * h * D_QK / 2),
        buffer(&inputs[1], t_k * h * D_QK / 8),
        buffer(&inputs[2], t_k * h * D_V / 8),
        buffer(&inputs[3], seqs + 1),
        buffer(&inputs[4], seqs + 1),
        buffer(&outputs[0], t_q * h * D_V / 2),
        buffer(&outputs[1], t_q * h),
        h,
        seqs,
        tiles,
        problem.param("sm_scale") as f32,
        groups,
    );
}

pub fn define(target: IrTarget, groups: usize) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    mha_prefill_wgmma_kernel::MhaPrefillWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(128 * groups as u32)),
        props,
        target_props,
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        (),
        (),
        (),
        (),
        groups,
    )
    .define()
}
