//! `fp8_gemm`'s Hopper variant, on the tile of [`crate::wgmma_tile`] (one 128-wide K group per step):
//! e4m3 straight into warpgroup MMA (no widening) and DeepSeek's per-group promotion in registers — per
//! group 4 m64n128k32 multiplies into a fresh f32 accumulator, then out += acc · a_scale[row] ·
//! b_scale[group] (each group's scales differ, so they cannot be folded).
//!
//! bf16 output only: Hopper's FP8 multiplies accumulate in reduced precision inside a multiply (measured
//! on the H200: 2.2e-4 relative against f64 on an f32 output, where the f32 tolerance is 1e-5), the very
//! reason DeepSeek promotes to f32 every 128 of K; bf16 rounding (2⁻⁹) hides it.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use crate::wgmma_tile::{SMEM_CHUNKS, UNITS, advance_ring, fill_ring, store_bf16_tile};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::wgmma::{Operands, first_atom, wgmma_fresh};

pub use crate::wgmma_tile::{TILE, shared_memory_bytes};

/// K per step: one 128-byte row of e4m3, one scale group.
const GROUP: usize = 128;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fp8_gemm_wgmma_kernel(
    a: &[Vector<u32, Const<4>>],
    a_scales: &[f32],
    b: &[Vector<u32, Const<4>>],
    b_scales: &[f32],
    c: &mut [u32],
    m: usize,
    n: usize,
    k: usize,
) {
    let col_tiles = n / TILE;
    let tm = CUBE_POS / col_tiles;
    let tn = CUBE_POS % col_tiles;
    if tm * TILE >= m {
        terminate!();
    }
    let groups = k / GROUP;
    let row_chunks = k / 16;
    let warp = ((UNIT_POS / 32) % 4) as usize;
    let warpgroup = (UNIT_POS / 128) as usize;
    let g = UNIT_POS_PLANE as usize / 4;

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(SMEM_CHUNKS, 1024usize);
    let (skip, base) = first_atom(&smem);
    fill_ring(a, b, &mut smem, skip, groups, tm, tn, m, n, row_chunks);

    let row0 = tm * TILE + warpgroup * 64 + warp * 16 + g;
    let mut out = Vector::<f32, Const<64>>::new(0.0f32);
    for gi in 0..groups {
        let (a_desc, b_desc) = advance_ring(a, b, &mut smem, skip, base, gi, groups, tm, tn, m, n, row_chunks);
        let acc = wgmma_fresh::<Const<64>>(
            a_desc,
            b_desc,
            Operands::E4m3,
            TILE,
            comptime!(GROUP / 32),
            0usize,
            0usize,
            true,
        );
        // Promotion: out += acc · a_scale[row] · b_scale[group] (rows g and g + 8 of the warp).
        let b_scale = b_scales[tn * groups + gi];
        let s0 = select(row0 < m, a_scales[select(row0 < m, row0, 0usize) * groups + gi], 0.0f32) * b_scale;
        let s1 = select(
            row0 + 8 < m,
            a_scales[select(row0 + 8 < m, row0 + 8, 0usize) * groups + gi],
            0.0f32,
        ) * b_scale;
        let mut scale = Vector::<f32, Const<64>>::new(0.0f32);
        #[unroll]
        for i in 0..64usize {
            scale.insert(i, if comptime!(i % 4 < 2) { s0 } else { s1 });
        }
        out += acc * scale;
    }
    store_bf16_tile(c, out, tm, tn, m, n);
}

pub fn launch(device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
    let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
    let (kg, ng) = (k / GROUP, n.div_ceil(GROUP));
    fp8_gemm_wgmma_kernel::launch(
        &device.client,
        grid(m.div_ceil(TILE) * (n / TILE)),
        CubeDim::new_1d(UNITS),
        buffer(&inputs[0], m * k / 16),
        buffer(&inputs[1], m * kg),
        buffer(&inputs[2], n * k / 16),
        buffer(&inputs[3], ng * kg),
        buffer(&outputs[0], m * n / 2),
        m,
        n,
        k,
    );
}

pub fn define(target: IrTarget) -> KernelDefinition {
    let (props, target_props) = nsa_backends::ir_properties(target);
    let a = slice_arg;
    fp8_gemm_wgmma_kernel::Fp8GemmWgmmaKernel::new(
        ir_settings(CubeDim::new_1d(UNITS)),
        props,
        target_props,
        a(),
        a(),
        a(),
        a(),
        a(),
        (),
        (),
        (),
    )
    .define()
}
