//! `fp8_gemm`'s Hopper variant: e4m3 straight into warpgroup MMA (no widening), a cp.async pipeline of
//! `STAGES` K groups in 128-byte-swizzled shared tiles, and DeepSeek's per-group promotion in registers.
//!
//! A cube (2 warpgroups, 256 units) computes a 128 × 128 tile of c; warpgroup w owns rows 64w..64w + 64.
//! Per 128-wide K group: 4 m64n128k32 multiplies into a fresh f32 accumulator, then
//! out += acc · a_scale[row] · b_scale[group] (each group's scales differ, so they cannot be folded).
//!
//! bf16 output only: Hopper's FP8 multiplies accumulate in reduced precision inside a multiply (measured
//! on the H200: 2.2e-4 relative against f64 on an f32 output, where the f32 tolerance is 1e-5), the very
//! reason DeepSeek promotes to f32 every 128 of K; bf16 rounding (2⁻⁹) hides it.
use crate::Problem;
use crate::launch::{buffer, grid, ir_settings, slice_arg};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_dsl::format::pack;
use nsa_dsl::warp_mma::commit_async_copies;
use nsa_dsl::wgmma::{
    ATOM_BYTES, Operands, await_stage, copy_rows_swizzled, first_atom, sw128_descriptor, wgmma_fresh,
};

const GROUP: usize = 128;
pub const TILE: usize = 128;
/// K groups in flight: 4 × 32 KiB of shared memory.
const STAGES: usize = 4;
/// 16-byte chunks of one operand tile (128 rows × 128 bytes) and of one stage (A then B).
const TILE_CHUNKS: usize = TILE * GROUP / 16;
const STAGE_CHUNKS: usize = 2 * TILE_CHUNKS;
const UNITS: u32 = 256;

pub fn shared_memory_bytes() -> usize {
    16 * STAGES * STAGE_CHUNKS + ATOM_BYTES as usize
}

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
    let warpgroup = (UNIT_POS / 128) as usize;
    let warp = ((UNIT_POS / 32) % 4) as usize;
    let lane = UNIT_POS_PLANE as usize;
    let (g, t) = (lane / 4, lane % 4);

    let mut smem = Shared::<[Vector<u32, Const<4>>]>::new_aligned_slice(
        comptime!(STAGES * STAGE_CHUNKS + ATOM_BYTES as usize / 16),
        1024usize,
    );
    let (skip, base) = first_atom(&smem);

    #[unroll]
    for s in 0..comptime!(STAGES - 1) {
        if s < groups {
            let tile0 = skip + s * STAGE_CHUNKS;
            copy_rows_swizzled(a, &mut smem, tile0, tm * TILE, m, k / 16, s * 8, TILE);
            copy_rows_swizzled(b, &mut smem, tile0 + TILE_CHUNKS, tn * TILE, n, k / 16, s * 8, TILE);
        }
        commit_async_copies();
    }

    let row0 = tm * TILE + warpgroup * 64 + warp * 16 + g;
    let mut out = Array::<f32>::new(64usize);
    #[unroll]
    for i in 0..64usize {
        out[i] = 0.0f32;
    }
    for gi in 0..groups {
        // Group gi has landed (at most STAGES − 2 younger groups pending); the barrier also says every
        // warpgroup is done with the stage the next copy overwrites.
        await_stage(comptime!(STAGES as u32 - 2));
        let next = gi + STAGES - 1;
        if next < groups {
            let tile0 = skip + (next % STAGES) * STAGE_CHUNKS;
            copy_rows_swizzled(a, &mut smem, tile0, tm * TILE, m, k / 16, next * 8, TILE);
            copy_rows_swizzled(b, &mut smem, tile0 + TILE_CHUNKS, tn * TILE, n, k / 16, next * 8, TILE);
        }
        commit_async_copies();

        let stage = base + ((gi % STAGES) * STAGE_CHUNKS * 16) as u32;
        let a_desc = sw128_descriptor(stage + (warpgroup * 64 * GROUP) as u32);
        let b_desc = sw128_descriptor(stage + (TILE_CHUNKS * 16) as u32);
        let acc = wgmma_fresh::<Const<64>>(
            a_desc,
            b_desc,
            Operands::E4m3,
            TILE,
            comptime!(GROUP / 32),
            0usize,
            0usize,
        );

        let b_scale = b_scales[tn * groups + gi];
        let s0 = select(row0 < m, a_scales[select(row0 < m, row0, 0usize) * groups + gi], 0.0f32) * b_scale;
        let s1 = select(
            row0 + 8 < m,
            a_scales[select(row0 + 8 < m, row0 + 8, 0usize) * groups + gi],
            0.0f32,
        ) * b_scale;
        #[unroll]
        for i in 0..64usize {
            let scale = if comptime!(i % 4 < 2) { s0 } else { s1 };
            out[i] += acc.extract(i) * scale;
        }
    }

    #[unroll]
    for half in 0..2usize {
        let row = row0 + 8 * half;
        if row < m {
            #[unroll]
            for i in 0..16usize {
                let column = tn * TILE + 8 * i + 2 * t;
                let (lo, hi) = (out[4 * i + 2 * half], out[4 * i + 2 * half + 1]);
                c[(row * n + column) / 2] = pack(lo, hi, Format::Bf16);
            }
        }
    }
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
