//! `mha_prefill`'s Hopper variant: flash attention on warpgroup MMA. A cube is one warpgroup (128 units)
//! owning 64 queries of one head, as the `mma` variant (warp w holds queries 16w..16w + 16, in the same
//! accumulator layout, so the online softmax is the same code path in registers):
//! S = Q·Kᵀ is m64n64 over 12 k16 steps from swizzled shared tiles (Q and K as three 64-column blocks);
//! P stays in registers and O += P·V is m64n128 over 4 k16 steps with V read MN-major ([key][dim] as
//! stored, trans-b), O rescaled in registers first. K/V blocks of 64 keys are gathered by cp.async one
//! block ahead into two buffers.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::mha_prefill::locate_tile;
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::pack;
use nsa_dsl::warp_mma::{commit_async_copies, copy_chunk_async, fast_exp2, quad_max, quad_sum};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, first_atom, sw128_descriptor, sw128_mn_major_descriptor, swizzled_chunk,
    wgmma_bf16_register_a_accumulate, wgmma_fresh,
};

const D_QK: usize = 192;
const D_V: usize = 128;
const BLOCK: usize = 64;
/// 16-byte chunks of one 64-row × 64-column swizzled block (8 KiB).
const COLUMN_BLOCK: usize = BLOCK * 8;
const Q_CHUNKS: usize = 3 * COLUMN_BLOCK;
const K_CHUNKS: usize = 3 * COLUMN_BLOCK;
const V_CHUNKS: usize = 2 * COLUMN_BLOCK;
/// Q, two K buffers, two V buffers (chunks from the aligned base).
const K_OFFSET: usize = Q_CHUNKS;
const V_OFFSET: usize = K_OFFSET + 2 * K_CHUNKS;
const SMEM_CHUNKS: usize = V_OFFSET + 2 * V_CHUNKS;

pub fn shared_memory_bytes() -> usize {
    16 * SMEM_CHUNKS + ATOM_BYTES as usize
}

/// Starts copying 64 rows of head `head` (positions `first..` of a sequence whose `count` rows start at row
/// `row0` of `source` [rows, heads, chunks]; past the sequence zero) into swizzled 64-column blocks at
/// chunk `tile0`.
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
) {
    let mut i = UNIT_POS as usize;
    while i < comptime!(BLOCK * chunks) {
        let (r, c) = (i / chunks, i % chunks);
        let position = first + r;
        let valid = position < count;
        let start = ((row0 + select(valid, position, 0usize)) * heads + head) * chunks + c;
        let len = select(valid, 1usize, 0usize);
        let dst = tile0 + (c / 8) * COLUMN_BLOCK + swizzled_chunk(r, c % 8);
        copy_chunk_async(&source[start..start + len], &mut smem[dst..dst + 1]);
        i += CUBE_DIM as usize;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mha_prefill_wgmma_kernel(
    q: &[Vector<u32, Const<4>>],
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
) {
    let (head, q_start, q_len, k0, k_len, local0) = locate_tile(cu_q, cu_k, heads, seqs, tile_bound);
    let warp = (UNIT_POS / 32) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(
        comptime!(SMEM_CHUNKS + ATOM_BYTES as usize / 16),
        1024usize,
    );
    let (skip, base) = first_atom(&smem);

    let last_local = select(local0 + BLOCK < q_len, local0 + BLOCK, q_len) - 1;
    let tile_keys = select(k_len + last_local + 1 > q_len, k_len + last_local + 1 - q_len, 0usize);
    let blocks = tile_keys.div_ceil(BLOCK);

    copy_head_rows_swizzled(
        q,
        &mut smem,
        skip,
        q_start,
        local0,
        q_len,
        heads,
        head,
        comptime!(D_QK / 8),
    );
    copy_head_rows_swizzled(
        k,
        &mut smem,
        skip + K_OFFSET,
        k0,
        0,
        k_len,
        heads,
        head,
        comptime!(D_QK / 8),
    );
    copy_head_rows_swizzled(
        v,
        &mut smem,
        skip + V_OFFSET,
        k0,
        0,
        k_len,
        heads,
        head,
        comptime!(D_V / 8),
    );
    commit_async_copies();

    let mut o = Vector::<f32, Const<64>>::new(0.0f32);
    let mut m = Array::<f32>::new(2usize);
    let mut l = Array::<f32>::new(2usize);
    let mut limit = Array::<usize>::new(2usize);
    #[unroll]
    for r in 0..2usize {
        m[r] = -1073741824.0f32;
        l[r] = 0.0f32;
        let local = local0 + warp * 16 + g + 8 * r;
        limit[r] = select(k_len + local + 1 > q_len, k_len + local + 1 - q_len, 0usize);
    }
    let scale_log2 = sm_scale * core::f32::consts::LOG2_E;
    let q_desc = sw128_descriptor(base);

    let mut block = 0usize;
    while block < blocks {
        let buf = block % 2;
        await_stage(0u32);
        if block + 1 < blocks {
            let first = (block + 1) * BLOCK;
            let k_tile = skip + K_OFFSET + (1 - buf) * K_CHUNKS;
            let v_tile = skip + V_OFFSET + (1 - buf) * V_CHUNKS;
            copy_head_rows_swizzled(k, &mut smem, k_tile, k0, first, k_len, heads, head, comptime!(D_QK / 8));
            copy_head_rows_swizzled(v, &mut smem, v_tile, k0, first, k_len, heads, head, comptime!(D_V / 8));
        }
        commit_async_copies();

        // S = Q·Kᵀ: 64 queries × 64 keys, K = 192 in three 64-column blocks 8 KiB apart.
        let k_desc = sw128_descriptor(base + ((K_OFFSET + buf * K_CHUNKS) * 16) as u32);
        let s = wgmma_fresh::<Const<32>>(
            q_desc,
            k_desc,
            Operands::Bf16,
            64usize,
            comptime!(D_QK / 16),
            comptime!(COLUMN_BLOCK * 16),
            comptime!(COLUMN_BLOCK * 16),
        );

        // Online softmax in log₂ units (element 4n + 2r + e: row g + 8r, key 8n + 2t + e); keys past a
        // row's causal limit weigh nothing.
        let mut p = Array::<f32>::new(32usize);
        let mut alpha = Array::<f32>::new(2usize);
        #[unroll]
        for r in 0..2usize {
            let mut block_max = f32::reinterpret(0xce80_0000u32);
            #[unroll]
            for n in 0..8usize {
                #[unroll]
                for e in 0..2usize {
                    let key = block * BLOCK + n * 8 + 2 * t + e;
                    let x = s.extract(4 * n + 2 * r + e) * scale_log2;
                    block_max = select(key < limit[r], f32::max(block_max, x), block_max);
                }
            }
            let m_new = f32::max(m[r], quad_max(block_max));
            alpha[r] = fast_exp2(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
            #[unroll]
            for n in 0..8usize {
                #[unroll]
                for e in 0..2usize {
                    let key = block * BLOCK + n * 8 + 2 * t + e;
                    let x = s.extract(4 * n + 2 * r + e) * scale_log2;
                    let pe = select(key < limit[r], fast_exp2(x - m_new), 0.0f32);
                    l[r] += pe;
                    p[4 * n + 2 * r + e] = pe;
                }
            }
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
            a.insert(i, pack(p[2 * i], p[2 * i + 1], Format::Bf16));
        }
        let v_desc = sw128_mn_major_descriptor(
            base + ((V_OFFSET + buf * V_CHUNKS) * 16) as u32,
            comptime!(COLUMN_BLOCK as u32 * 16),
        );
        o = wgmma_bf16_register_a_accumulate::<Const<64>, Const<16>>(o * scale, a, v_desc, 128usize, 4usize, 2048usize);
        block += 1;
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
                out[pair * comptime!(D_V / 2) + n * 4 + t] = pack(
                    o.extract(4 * n + 2 * r) * inv,
                    o.extract(4 * n + 2 * r + 1) * inv,
                    Format::Bf16,
                );
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

pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
    let (t_q, t_k, h, seqs) = (
        problem.dim("t_q"),
        problem.dim("t_k"),
        problem.dim("h"),
        problem.dim("n_cu") - 1,
    );
    // At most one partial tile per sequence beyond t_q / 64 full ones.
    let tiles = t_q.div_ceil(BLOCK) + seqs;
    mha_prefill_wgmma_kernel::launch(
        &device.client,
        grid(tiles * h),
        CubeDim::new_1d(128),
        buffer(&inputs[0], t_q * h * D_QK / 8),
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
    );
}

pub fn define(target: IrTarget) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    mha_prefill_wgmma_kernel::MhaPrefillWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(128)),
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
    )
    .define()
}
