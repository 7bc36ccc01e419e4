//! 16×16×16 tensor-core tiles (CubeCL's cmma: wmma on CUDA, rocWMMA on HIP): bf16 operands read from
//! row-major buffers, f32 accumulators. No wgpu support; kernels using these are CUDA/HIP variants.
use cubecl::prelude::*;
use half::bf16;

/// An f32 accumulator tile of zeros.
#[cube]
pub fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    )
}

/// The A tile (16 rows × 16 columns) whose first element is `data[start]`, rows `stride` apart.
#[cube]
pub fn tile_a(data: &[bf16], start: usize, #[comptime] stride: u32) -> cmma::Matrix<bf16> {
    cmma::Matrix::<bf16>::from_slice(
        cmma::MatrixIdent::A,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::RowMajor,
        &data[start..data.len()],
        stride,
    )
}

/// The B tile (16 × 16) at `data[start]`, rows `stride` apart. With `transposed`, the rows of `data` are
/// B's columns (Kᵀ from row-major keys); otherwise its rows.
#[cube]
pub fn tile_b(
    data: &[bf16],
    start: usize,
    #[comptime] stride: u32,
    #[comptime] transposed: bool,
) -> cmma::Matrix<bf16> {
    let layout = if transposed {
        cmma::MatrixLayout::ColMajor
    } else {
        cmma::MatrixLayout::RowMajor
    };
    cmma::Matrix::<bf16>::from_slice(
        cmma::MatrixIdent::B,
        16usize,
        16usize,
        16usize,
        layout,
        &data[start..data.len()],
        stride,
    )
}

/// Stores an accumulator tile at `out[start]`, rows `stride` apart.
#[cube]
pub fn store_tile(out: &mut [f32], start: usize, tile: &cmma::Matrix<f32>, #[comptime] stride: u32) {
    let end = out.len();
    cmma::store(&mut out[start..end], tile, stride, cmma::MatrixLayout::RowMajor);
}
