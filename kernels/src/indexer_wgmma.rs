//! `indexer_logits`' Hopper variant (bf16, 64 heads × 128): the scores as warpgroup products with the keys
//! as A, so the head sum stays inside a quad. A cube (one warpgroup) holds 64 keys in shared memory and
//! walks `TOKENS` tokens two at a time: S = K·[Q_t0; Q_t1]ᵀ is m64n128 over 8 k16 steps (row = key,
//! columns 0..64 the first token's heads, 64..128 the second's), then
//! logit = Σ_h w[t, h]·ReLU(S) — 16 columns per unit, 2 shuffles per row — with the next pair's Q landing
//! by cp.async meanwhile.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::warp_mma::commit_async_copies;
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, copy_rows_swizzled, first_atom, sw128_descriptor, wgmma_fresh,
};

const HEADS: usize = 64;
const DIM: usize = 128;
const KEYS: usize = 64;
/// Tokens per cube (pairs walked in order).
const TOKENS: usize = 16;
/// Swizzled 64-column blocks: the key tile's (64 rows) and a token pair's (128 rows), in 16-byte chunks.
const KEY_BLOCK: usize = KEYS * 8;
const PAIR_BLOCK: usize = 2 * HEADS * 8;
const PAIR_OFFSET: usize = 2 * KEY_BLOCK;
const SMEM_CHUNKS: usize = PAIR_OFFSET + 2 * 2 * PAIR_BLOCK;

pub fn shared_memory_bytes() -> usize {
    16 * SMEM_CHUNKS + ATOM_BYTES as usize
}

pub fn shape_requirements(problem: &Problem) -> Result<(), String> {
    let (h, d) = (problem.dim("h"), problem.dim("d"));
    if problem.format != Format::Bf16 || h != HEADS || d != DIM {
        return Err(format!(
            "needs bf16, h 64 and d 128, got {} h={h} d={d}",
            problem.format
        ));
    }
    Ok(())
}

/// Starts copying the Q rows of the token pair starting at `token0` (128 rows of [t·64, 128]) into buffer
/// `buf`.
#[cube]
fn copy_pair(
    q: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    skip: usize,
    token0: usize,
    t: usize,
    buf: usize,
) {
    let tile0 = skip + PAIR_OFFSET + buf * 2 * PAIR_BLOCK;
    #[unroll]
    for block in 0..2usize {
        copy_rows_swizzled(
            q,
            smem,
            tile0 + block * PAIR_BLOCK,
            token0 * HEADS,
            t * HEADS,
            comptime!(DIM / 8),
            block * 8,
            comptime!(2 * HEADS),
        );
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn indexer_logits_wgmma_kernel(
    q: &[Vector<u32, Const<4>>],
    w: &[f32],
    k: &[Vector<u32, Const<4>>],
    q_pos: &[i32],
    k_start: &[i32],
    logits: &mut [f32],
    t: usize,
    s: usize,
) {
    let key_tiles = s.div_ceil(KEYS);
    let key0 = (CUBE_POS % key_tiles) * KEYS;
    let token_base = (CUBE_POS / key_tiles) * TOKENS;
    if token_base >= t {
        terminate!();
    }
    let lane = UNIT_POS_PLANE as usize;
    let (g, tq) = (lane / 4, lane % 4);
    let warp = (UNIT_POS / 32) as usize;

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(
        comptime!(SMEM_CHUNKS + ATOM_BYTES as usize / 16),
        1024usize,
    );
    let (skip, base) = first_atom(&smem);

    #[unroll]
    for block in 0..2usize {
        copy_rows_swizzled(
            k,
            &mut smem,
            skip + block * KEY_BLOCK,
            key0,
            s,
            comptime!(DIM / 8),
            block * 8,
            KEYS,
        );
    }
    copy_pair(q, &mut smem, skip, token_base, t, 0usize);
    commit_async_copies();
    let k_desc = sw128_descriptor(base);

    let pairs = comptime!(TOKENS / 2);
    for pair in 0..pairs {
        let token0 = token_base + 2 * pair;
        await_stage(0u32);
        if pair + 1 < pairs && token0 + 2 < t {
            copy_pair(q, &mut smem, skip, token0 + 2, t, (pair + 1) % 2);
        }
        commit_async_copies();
        if token0 < t {
            let q_desc = sw128_descriptor(base + ((PAIR_OFFSET + (pair % 2) * 2 * PAIR_BLOCK) * 16) as u32);
            let scores = wgmma_fresh::<Const<64>>(
                k_desc,
                q_desc,
                Operands::Bf16,
                128usize,
                comptime!(DIM / 16),
                comptime!(KEY_BLOCK * 16),
                comptime!(PAIR_BLOCK * 16),
                true,
            );
            // Element 4i + 2r + e: key 16·warp + g + 8r, column 8i + 2tq + e = (token i / 8, head 8(i % 8) + 2tq + e).
            #[unroll]
            for j in 0..2usize {
                let token = token0 + j;
                let valid_token = token < t;
                let row = select(valid_token, token, 0usize);
                #[unroll]
                for r in 0..2usize {
                    let mut sum = 0.0f32;
                    #[unroll]
                    for i in 0..8usize {
                        #[unroll]
                        for e in 0..2usize {
                            let head = 8 * i + 2 * tq + e;
                            let x = scores.extract(4 * (8 * j + i) + 2 * r + e);
                            sum += w[row * HEADS + head] * f32::max(x, 0.0f32);
                        }
                    }
                    sum += plane_shuffle_xor(sum, 1u32);
                    sum += plane_shuffle_xor(sum, 2u32);
                    let key = key0 + warp * 16 + g + 8 * r;
                    if valid_token && key < s && tq == j * 2 + r {
                        let visible = key as i32 >= k_start[row] && key as i32 <= q_pos[row];
                        logits[row * s + key] = select(visible, sum, f32::reinterpret(0xff80_0000u32));
                    }
                }
            }
        }
    }
}

pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
    let (t, s) = (problem.dim("t"), problem.dim("s"));
    indexer_logits_wgmma_kernel::launch(
        &device.client,
        grid(s.div_ceil(KEYS) * t.div_ceil(TOKENS)),
        CubeDim::new_1d(128),
        buffer(&inputs[0], t * HEADS * DIM / 8),
        buffer(&inputs[1], t * HEADS),
        buffer(&inputs[2], s * DIM / 8),
        buffer(&inputs[3], t),
        buffer(&inputs[4], t),
        buffer(&outputs[0], t * s),
        t,
        s,
    );
}

pub fn define(target: IrTarget) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    indexer_logits_wgmma_kernel::IndexerLogitsWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(128)),
        props,
        target_props,
        a(),
        a(),
        a(),
        a(),
        a(),
        a(),
        (),
        (),
    )
    .define()
}
