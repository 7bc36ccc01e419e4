//! The 128 × 128 output tile shared by the `gemm` and `fp8_gemm` wgmma variants: a cube of two
//! warpgroups (warpgroup w owns rows 64w..64w + 64), a ring of `STAGES` stages, each 128 rows × 128 bytes
//! of A then of B (64 of K in bf16, 128 in e4m3), 128-byte swizzled and filled by cp.async `STAGES − 1`
//! steps ahead; the result written as bf16 pairs.
use cubecl::prelude::*;
use nsa_dsl::format::pack_bf16x2;
use nsa_dsl::warp_mma::commit_async_copies;
use nsa_dsl::wgmma::{ATOM_BYTES, await_stage, copy_rows_swizzled, sw128_descriptor};

pub const TILE: usize = 128;
/// Steps in flight: 4 × 32 KiB of shared memory.
pub const STAGES: usize = 4;
/// 16-byte chunks of one operand tile (128 rows × 128 bytes) and of one stage (A then B).
pub const TILE_CHUNKS: usize = TILE * 8;
pub const STAGE_CHUNKS: usize = 2 * TILE_CHUNKS;
pub const UNITS: u32 = 256;
/// Chunks to allocate: the ring plus one swizzle atom to align it.
pub const SMEM_CHUNKS: usize = STAGES * STAGE_CHUNKS + ATOM_BYTES as usize / 16;

pub fn shared_memory_bytes() -> usize {
    16 * SMEM_CHUNKS
}

/// Starts copying step `step` (chunks 8·step.. of each row: A rows of tile row `tm`, B rows of tile column
/// `tn`, rows of `row_chunks` chunks) into its ring slot; past the ends zero-filled.
#[cube]
#[allow(clippy::too_many_arguments)]
fn copy_step(
    a: &[Vector<u32, Const<4>>],
    b: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    skip: usize,
    step: usize,
    tm: usize,
    tn: usize,
    m: usize,
    n: usize,
    row_chunks: usize,
) {
    let tile0 = skip + (step % STAGES) * STAGE_CHUNKS;
    copy_rows_swizzled(a, smem, tile0, tm * TILE, m, row_chunks, step * 8, TILE);
    copy_rows_swizzled(b, smem, tile0 + TILE_CHUNKS, tn * TILE, n, row_chunks, step * 8, TILE);
}

/// Starts the first `STAGES − 1` of `steps` steps (one copy group each, empty past the end).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fill_ring(
    a: &[Vector<u32, Const<4>>],
    b: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    skip: usize,
    steps: usize,
    tm: usize,
    tn: usize,
    m: usize,
    n: usize,
    row_chunks: usize,
) {
    #[unroll]
    for s in 0..comptime!(STAGES - 1) {
        if s < steps {
            copy_step(a, b, smem, skip, s, tm, tn, m, n, row_chunks);
        }
        commit_async_copies();
    }
}

/// Waits until step `step` has landed (the barrier also says every warpgroup is done with the slot refilled
/// next), then starts step `step + STAGES − 1` in that slot. Returns the A (this warpgroup's 64 rows) and
/// B descriptors of step `step`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn advance_ring(
    a: &[Vector<u32, Const<4>>],
    b: &[Vector<u32, Const<4>>],
    smem: &mut [Vector<u32, Const<4>>],
    skip: usize,
    base: u32,
    step: usize,
    steps: usize,
    tm: usize,
    tn: usize,
    m: usize,
    n: usize,
    row_chunks: usize,
) -> (u64, u64) {
    await_stage(comptime!(STAGES as u32 - 2));
    let next = step + STAGES - 1;
    if next < steps {
        copy_step(a, b, smem, skip, next, tm, tn, m, n, row_chunks);
    }
    commit_async_copies();
    let stage = base + ((step % STAGES) * STAGE_CHUNKS * 16) as u32;
    let warpgroup = (UNIT_POS / 128) as usize;
    (
        sw128_descriptor(stage + (warpgroup * 64 * 128) as u32),
        sw128_descriptor(stage + (TILE_CHUNKS * 16) as u32),
    )
}

/// Writes this unit's 64 values of tile (`tm`, `tn`) of c [m, n] as bf16 pairs (row g (+ 8) of the unit's
/// warp, columns 8i + 2t, + 1; the wgmma accumulator layout); rows and columns past the ends skipped.
#[cube]
pub fn store_bf16_tile(c: &mut [u32], values: Vector<f32, Const<64>>, tm: usize, tn: usize, m: usize, n: usize) {
    let lane = UNIT_POS_PLANE as usize;
    let first = tm * TILE + (UNIT_POS / 32) as usize * 16 + lane / 4;
    #[unroll]
    for half in 0..2usize {
        let row = first + 8 * half;
        if row < m {
            #[unroll]
            for i in 0..16usize {
                let column = tn * TILE + 8 * i + 2 * (lane % 4);
                if column < n {
                    c[(row * n + column) / 2] =
                        pack_bf16x2(values.extract(4 * i + 2 * half), values.extract(4 * i + 2 * half + 1));
                }
            }
        }
    }
}
