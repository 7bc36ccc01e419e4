//! `gemm`'s Hopper variant (bf16): c [m, n] = a [m, k] · bᵀ (b [n, k]) on warpgroup MMA, on the tile of
//! [`crate::wgmma_tile`] (64 of K per step): m64n128k16 accumulating in place. Rows, columns and K past the
//! ends are zero-filled; k a multiple of 8 (16-byte rows), n even.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::wgmma_tile::{SMEM_CHUNKS, TILE, UNITS, advance_ring, fill_ring, store_bf16_tile};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::wgmma::{Operands, first_atom, wgmma_accumulate};

/// K per step: one 128-byte row of bf16.
const K_STEP: usize = 64;

pub use crate::wgmma_tile::shared_memory_bytes;

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

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(SMEM_CHUNKS, 1024usize);
    let (skip, base) = first_atom(&smem);
    fill_ring(a, b, &mut smem, skip, steps, tm, tn, m, n, row_chunks);
    let mut acc = Vector::<f32, Const<64>>::new(0.0f32);
    for ks in 0..steps {
        let (a_desc, b_desc) = advance_ring(a, b, &mut smem, skip, base, ks, steps, tm, tn, m, n, row_chunks);
        acc = wgmma_accumulate::<Const<64>>(acc, a_desc, b_desc, Operands::Bf16, 128usize, 4usize, 0usize, 0usize);
    }
    store_bf16_tile(c, acc, tm, tn, m, n);
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
