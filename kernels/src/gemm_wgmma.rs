//! `gemm`'s Hopper variant (bf16): c [m, n] = a [m, k] · bᵀ (b [n, k]) on warpgroup MMA. A cube (2
//! warpgroups) computes a 128 × 128 tile, warpgroup w rows 64w..64w + 64, m64n128k16 accumulating in place
//! through a 4-stage cp.async ring of 128-byte-swizzled tiles (64 of K per stage). Rows, columns and K past
//! the ends are zero-filled; k a multiple of 8 (16-byte rows), n even.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::pack;
use nsa_dsl::warp_mma::commit_async_copies;
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, copy_rows_swizzled, first_atom, sw128_descriptor, wgmma_accumulate,
};

pub const TILE: usize = 128;
/// K per stage: one 128-byte row of bf16.
const K_STEP: usize = 64;
const STAGES: usize = 4;
const TILE_CHUNKS: usize = TILE * 8;
const STAGE_CHUNKS: usize = 2 * TILE_CHUNKS;
const UNITS: u32 = 256;

pub fn shared_memory_bytes() -> usize {
    16 * STAGES * STAGE_CHUNKS + ATOM_BYTES as usize
}

/// Why `problem` cannot take this variant, if it cannot.
pub fn shape_requirements(problem: &Problem) -> Result<(), String> {
    let (n, k) = (problem.dim("n"), problem.dim("k"));
    if problem.format != Format::Bf16 || !k.is_multiple_of(8) || !n.is_multiple_of(2) {
        return Err(format!(
            "needs bf16, k a multiple of 8 and n even, got {} n={n} k={k}",
            problem.format
        ));
    }
    Ok(())
}

#[cube(launch)]
fn gemm_wgmma_kernel(
    a: &[Vector<u32, Const<4>>],
    b: &[Vector<u32, Const<4>>],
    c: &mut [u32],
    m: usize,
    n: usize,
    k: usize,
) {
    let col_tiles = n.div_ceil(TILE);
    let tm = CUBE_POS / col_tiles;
    let tn = CUBE_POS % col_tiles;
    if tm * TILE >= m {
        terminate!();
    }
    let steps = k.div_ceil(K_STEP);
    let row_chunks = k / 8;
    let warpgroup = (UNIT_POS / 128) as usize;
    let lane = UNIT_POS_PLANE as usize;

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(
        comptime!(STAGES * STAGE_CHUNKS + ATOM_BYTES as usize / 16),
        1024usize,
    );
    let (skip, base) = first_atom(&smem);

    #[unroll]
    for s in 0..comptime!(STAGES - 1) {
        if s < steps {
            let tile0 = skip + s * STAGE_CHUNKS;
            copy_rows_swizzled(a, &mut smem, tile0, tm * TILE, m, row_chunks, s * 8, TILE);
            copy_rows_swizzled(b, &mut smem, tile0 + TILE_CHUNKS, tn * TILE, n, row_chunks, s * 8, TILE);
        }
        commit_async_copies();
    }
    let mut acc = Vector::<f32, Const<64>>::new(0.0f32);
    for ks in 0..steps {
        // Step ks has landed; the barrier also says both warpgroups are done with the slot refilled next.
        await_stage(comptime!(STAGES as u32 - 2));
        let next = ks + STAGES - 1;
        if next < steps {
            let tile0 = skip + (next % STAGES) * STAGE_CHUNKS;
            copy_rows_swizzled(a, &mut smem, tile0, tm * TILE, m, row_chunks, next * 8, TILE);
            copy_rows_swizzled(
                b,
                &mut smem,
                tile0 + TILE_CHUNKS,
                tn * TILE,
                n,
                row_chunks,
                next * 8,
                TILE,
            );
        }
        commit_async_copies();
        let stage = base + ((ks % STAGES) * STAGE_CHUNKS * 16) as u32;
        acc = wgmma_accumulate::<Const<64>>(
            acc,
            sw128_descriptor(stage + (warpgroup * 64 * 128) as u32),
            sw128_descriptor(stage + (TILE_CHUNKS * 16) as u32),
            Operands::Bf16,
            128usize,
            4usize,
        );
    }

    // bf16 pairs: row g (+ 8) of the unit's warp, columns 8i + 2t, + 1.
    let first = tm * TILE + (UNIT_POS / 32) as usize * 16 + lane / 4;
    #[unroll]
    for half in 0..2usize {
        let row = first + 8 * half;
        if row < m {
            #[unroll]
            for i in 0..16usize {
                let column = tn * TILE + 8 * i + 2 * (lane % 4);
                if column < n {
                    c[(row * n + column) / 2] = pack(
                        acc.extract(4 * i + 2 * half),
                        acc.extract(4 * i + 2 * half + 1),
                        Format::Bf16,
                    );
                }
            }
        }
    }
}

pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
    let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
    gemm_wgmma_kernel::launch(
        &device.client,
        grid(m.div_ceil(TILE) * n.div_ceil(TILE)),
        CubeDim::new_1d(UNITS),
        buffer(&inputs[0], m * k / 8),
        buffer(&inputs[1], n * k / 8),
        buffer(&outputs[0], m * n / 2),
        m,
        n,
        k,
    );
}

pub fn define(target: IrTarget) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    gemm_wgmma_kernel::GemmWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(UNITS)),
        props,
        target_props,
        a(),
        a(),
        a(),
        (),
        (),
        (),
    )
    .define()
}
