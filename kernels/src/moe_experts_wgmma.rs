//! Hopper steps of `moe_experts` and `moe_experts_fp8` (variant `wgmma`; CUDA sm_90, bf16 activations):
//! the per-expert projections as grouped GEMMs on bf16 warpgroup multiplies ([`nsa_dsl::wgmma`]).
//!
//! A cube (2 warpgroups, 256 units) owns 128 permuted rows of one expert (each expert's rows in tiles of
//! 128, in expert order); warpgroup w owns rows 64w..64w + 64. K advances 64 at a time through a ring of
//! `STAGES` swizzled tiles: activations by cp.async; weights by cp.async (bf16) or, when FP8, loaded a stage
//! ahead, widened to bf16 times their 128 × 128 block scale after the multiply and stored. A stage's four
//! k16 multiplies accumulate onto the unit's 64 accumulators.
//! gate/up: B = 64 gate rows then the matching 64 up rows, so one m64n128 product hands each unit both
//! halves of its h columns. down: B = 128 rows of w2.
use crate::moe_experts_mma::expert_tile;
use cubecl::prelude::*;
use nsa_dsl::Format;
use nsa_dsl::format::{e4m3x16_to_bf16_chunks, pack};
use nsa_dsl::warp_mma::{commit_async_copies, copy_chunk_async};
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, first_atom, sw128_descriptor, swizzled_chunk, wgmma_accumulate,
};

/// Permuted rows per cube; gate/up columns (of h) per cube; K per stage (one 128-byte bf16 row).
pub(crate) const ROWS: usize = 128;
pub(crate) const H_COLUMNS: usize = 64;
const K_STEP: usize = 64;
const STAGES: usize = 3;
/// 16-byte chunks of one operand tile (128 rows × 128 bytes) and of one stage (activations, weights).
const TILE_CHUNKS: usize = ROWS * 8;
const STAGE_CHUNKS: usize = 2 * TILE_CHUNKS;
pub(crate) const UNITS: u32 = 256;
/// FP8 weight chunks (16 codes) each unit stages per K step: 128 rows × 4.
const FP8_LOADS: usize = ROWS * 4 / UNITS as usize;

pub(crate) fn shared_memory_bytes() -> usize {
    16 * STAGES * STAGE_CHUNKS + ATOM_BYTES as usize
}

/// Starts copying K step `ks` of 128 activation rows (bf16, `row_vectors` chunks per row) into the tile
/// at chunk `tile0`: row r is source row `rows[row0 + r]` when `gather`, else `row0 + r`; rows from
/// `valid` on are zero-filled.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_activations(
    source: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    tile0: usize,
    rows: &[u32],
    row0: usize,
    valid: usize,
    row_vectors: usize,
    ks: usize,
    #[comptime] gather: bool,
) {
    let mut i = UNIT_POS as usize;
    while i < TILE_CHUNKS {
        let (r, c) = (i / 8, i % 8);
        let ok = r < valid;
        let mut source_row = row0 + r;
        if comptime!(gather) {
            source_row = rows[select(ok, row0 + r, 0usize)] as usize;
        }
        let start = select(ok, source_row * row_vectors + ks * 8 + c, 0usize);
        let len = select(ok, 1usize, 0usize);
        let dst = tile0 + swizzled_chunk(r, c);
        copy_chunk_async(&source[start..start + len], &mut smem[dst..dst + 1]);
        i += UNITS as usize;
    }
}

/// The weight row that tile row `r` holds: `base + r`, and from row 64 on `split` further (gate/up: the up
/// half of w13).
#[cube]
fn weight_row(base: usize, split: usize, r: usize) -> usize {
    base + r + select(r >= 64, split, 0usize)
}

/// Starts copying K step `ks` of 128 bf16 weight rows (K = `k`) into the tile at chunk `tile0`.
#[cube]
fn copy_bf16_weights(
    w: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    tile0: usize,
    base: usize,
    split: usize,
    k: usize,
    ks: usize,
) {
    let mut i = UNIT_POS as usize;
    while i < TILE_CHUNKS {
        let (r, c) = (i / 8, i % 8);
        let start = weight_row(base, split, r) * (k / 8) + ks * 8 + c;
        let dst = tile0 + swizzled_chunk(r, c);
        copy_chunk_async(&w[start..start + 1], &mut smem[dst..dst + 1]);
        i += UNITS as usize;
    }
}

/// Loads this unit's share of K step `ks` of 128 e4m3 weight rows (16 codes per chunk) and their block
/// scales into registers.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_fp8_weights(
    w: &[Vector<u32, Const<4>>],
    scales: &[f32],
    base: usize,
    split: usize,
    k: usize,
    ks: usize,
    words: &mut Array<Vector<u32, Const<4>>>,
    block_scales: &mut Array<f32>,
) {
    #[unroll]
    for j in 0..FP8_LOADS {
        let i = UNIT_POS as usize + j * UNITS as usize;
        let (r, c) = (i / 4, i % 4);
        let row = weight_row(base, split, r);
        words[j] = w[row * (k / 16) + ks * 4 + c];
        block_scales[j] = scales[(row / 128) * (k / 128) + ks / 2];
    }
}

/// Widens the chunks [`load_fp8_weights`] loaded to bf16 × scale and stores them into the tile at `tile0`.
#[cube]
fn store_fp8_weights(
    words: &Array<Vector<u32, Const<4>>>,
    block_scales: &Array<f32>,
    smem: &mut [Vector<u32, Const<4>>],
    tile0: usize,
) {
    #[unroll]
    for j in 0..FP8_LOADS {
        let i = UNIT_POS as usize + j * UNITS as usize;
        let (r, c) = (i / 4, i % 4);
        let (lo, hi) = e4m3x16_to_bf16_chunks(words[j], block_scales[j]);
        smem[tile0 + swizzled_chunk(r, 2 * c)] = lo;
        smem[tile0 + swizzled_chunk(r, 2 * c + 1)] = hi;
    }
}

/// Starts staging K step `ks` (activations and weights) into stage slot `slot0` (in chunks); FP8 weights are
/// stored at once.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_now(
    a: &[Vector<u32, Const<4>>],
    rows: &[u32],
    w: &[Vector<u32, Const<4>>],
    scales: &[f32],
    smem: &mut [Vector<u32, Const<4>>],
    slot0: usize,
    row0: usize,
    valid: usize,
    base: usize,
    split: usize,
    k: usize,
    ks: usize,
    #[comptime] gather: bool,
    #[comptime] fp8: bool,
) {
    copy_activations(a, smem, slot0, rows, row0, valid, k / 8, ks, gather);
    if comptime!(fp8) {
        let mut words = Array::<Vector<u32, Const<4>>>::new(FP8_LOADS);
        let mut block_scales = Array::<f32>::new(FP8_LOADS);
        load_fp8_weights(w, scales, base, split, k, ks, &mut words, &mut block_scales);
        store_fp8_weights(&words, &block_scales, smem, slot0 + TILE_CHUNKS);
    } else {
        copy_bf16_weights(w, smem, slot0 + TILE_CHUNKS, base, split, k, ks);
    }
}

/// This unit's 64 accumulators of A·Bᵀ over K = `k`: A = 128 activation rows from `row0` (gathered through
/// `rows` when `gather`; from `valid` on zero), B = 128 weight rows ([`weight_row`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn grouped_product(
    a: &[Vector<u32, Const<4>>],
    rows: &[u32],
    w: &[Vector<u32, Const<4>>],
    scales: &[f32],
    row0: usize,
    valid: usize,
    base: usize,
    split: usize,
    k: usize,
    #[comptime] gather: bool,
    #[comptime] fp8: bool,
) -> Array<f32> {
    let steps = k / K_STEP;
    let warpgroup = (UNIT_POS / 128) as usize;
    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(
        comptime!(STAGES * STAGE_CHUNKS + ATOM_BYTES as usize / 16),
        1024usize,
    );
    let (skip, base_address) = first_atom(&smem);

    #[unroll]
    for s in 0..comptime!(STAGES - 1) {
        if s < steps {
            let slot0 = skip + s * STAGE_CHUNKS;
            stage_now(
                a, rows, w, scales, &mut smem, slot0, row0, valid, base, split, k, s, gather, fp8,
            );
        }
        commit_async_copies();
    }
    let mut acc = Vector::<f32, Const<64>>::new(0.0f32);
    let mut words = Array::<Vector<u32, Const<4>>>::new(FP8_LOADS);
    let mut block_scales = Array::<f32>::new(FP8_LOADS);
    for ks in 0..steps {
        // Step ks has landed; the barrier also says every warpgroup is done with the slot refilled next.
        await_stage(comptime!(STAGES as u32 - 2));
        let next = ks + STAGES - 1;
        let slot0 = skip + (next % STAGES) * STAGE_CHUNKS;
        if next < steps {
            copy_activations(a, &mut smem, slot0, rows, row0, valid, k / 8, next, gather);
            if comptime!(fp8) {
                load_fp8_weights(w, scales, base, split, k, next, &mut words, &mut block_scales);
            } else {
                copy_bf16_weights(w, &mut smem, slot0 + TILE_CHUNKS, base, split, k, next);
            }
        }
        commit_async_copies();

        let stage = base_address + ((ks % STAGES) * STAGE_CHUNKS * 16) as u32;
        acc = wgmma_accumulate::<Const<64>>(
            acc,
            sw128_descriptor(stage + (warpgroup * 64 * 128) as u32),
            sw128_descriptor(stage + (TILE_CHUNKS * 16) as u32),
            Operands::Bf16,
            128usize,
            4usize,
            0usize,
            0usize,
        );
        if comptime!(fp8) {
            if next < steps {
                store_fp8_weights(&words, &block_scales, &mut smem, slot0 + TILE_CHUNKS);
            }
        }
    }
    let mut out = Array::<f32>::new(64usize);
    #[unroll]
    for i in 0..64usize {
        out[i] = acc.extract(i);
    }
    out
}

/// h[r, i] = silu(w1_e[i] · x[rows[r]]) · (w3_e[i] · x[rows[r]]) as bf16, for this cube's 128 rows and 64 i.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gate_up_wgmma_kernel(
    x: &[Vector<u32, Const<4>>],
    w13: &[Vector<u32, Const<4>>],
    w13_scales: &[f32],
    rows: &[u32],
    offsets: &[u32],
    h: &mut [u32],
    hidden: usize,
    inter: usize,
    experts: usize,
    col_tiles: usize,
    #[comptime] fp8: bool,
) {
    let (expert, row0, end) = expert_tile(offsets, experts, CUBE_POS / col_tiles, ROWS);
    if expert >= experts {
        terminate!();
    }
    let i0 = (CUBE_POS % col_tiles) * H_COLUMNS;
    let base = expert * 2 * inter + i0;
    let out = grouped_product(
        x,
        rows,
        w13,
        w13_scales,
        row0,
        end - row0,
        base,
        inter - 64,
        hidden,
        true,
        fp8,
    );
    let lane = UNIT_POS_PLANE as usize;
    let first = row0 + (UNIT_POS / 32) as usize * 16 + lane / 4;
    #[unroll]
    for half in 0..2usize {
        let row = first + 8 * half;
        if row < end {
            #[unroll]
            for i in 0..8usize {
                let g0 = out[4 * i + 2 * half];
                let g1 = out[4 * i + 2 * half + 1];
                let lo = g0 / (1.0f32 + f32::exp(-g0)) * out[4 * (i + 8) + 2 * half];
                let hi = g1 / (1.0f32 + f32::exp(-g1)) * out[4 * (i + 8) + 2 * half + 1];
                h[(row * inter + i0 + 8 * i + 2 * (lane % 4)) / 2] = pack(lo, hi, Format::Bf16);
            }
        }
    }
}

/// y[r, j] = w2_e[j] · h[r] (f32), for this cube's 128 rows and 128 j.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn down_wgmma_kernel(
    h: &[Vector<u32, Const<4>>],
    w2: &[Vector<u32, Const<4>>],
    w2_scales: &[f32],
    offsets: &[u32],
    y: &mut [f32],
    hidden: usize,
    inter: usize,
    experts: usize,
    col_tiles: usize,
    #[comptime] fp8: bool,
) {
    let (expert, row0, end) = expert_tile(offsets, experts, CUBE_POS / col_tiles, ROWS);
    if expert >= experts {
        terminate!();
    }
    let j0 = (CUBE_POS % col_tiles) * 128;
    let out = grouped_product(
        h,
        offsets,
        w2,
        w2_scales,
        row0,
        end - row0,
        expert * hidden + j0,
        0usize,
        inter,
        false,
        fp8,
    );
    let lane = UNIT_POS_PLANE as usize;
    let first = row0 + (UNIT_POS / 32) as usize * 16 + lane / 4;
    #[unroll]
    for half in 0..2usize {
        let row = first + 8 * half;
        if row < end {
            #[unroll]
            for i in 0..16usize {
                let column = j0 + 8 * i + 2 * (lane % 4);
                y[row * hidden + column] = out[4 * i + 2 * half];
                y[row * hidden + column + 1] = out[4 * i + 2 * half + 1];
            }
        }
    }
}

/// The `wgmma` variant of both expert kernels.
pub(crate) const VARIANT: crate::Variant = crate::Variant {
    name: "wgmma",
    summary: "grouped GEMMs on bf16 warpgroup MMA: 128 rows of an expert per cube, 4-stage pipeline (Hopper)",
    needs_plane_ops: true,
};

pub(crate) fn requirements(problem: &crate::Problem, features: &nsa_backends::DeviceFeatures) -> Result<(), String> {
    crate::spec::needs_wgmma(features)?;
    let (hidden, inter) = (problem.dim("hidden"), problem.dim("inter"));
    if problem.format != Format::Bf16 || !hidden.is_multiple_of(128) || !inter.is_multiple_of(64) {
        return Err(format!(
            "needs bf16 with hidden a multiple of 128 and inter of 64, got {} hidden={hidden} inter={inter}",
            problem.format
        ));
    }
    Ok(())
}

/// The gate/up kernel's definition (`nsa ir`, the snapshots).
pub(crate) fn define(target: nsa_backends::IrTarget, fp8: bool) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = crate::launch::slice_arg;
    gate_up_wgmma_kernel::GateUpWgmmaKernel::new(
        crate::launch::ir_settings(CubeDim::new_1d(UNITS)),
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
        (),
        (),
        fp8,
    )
    .define()
}
