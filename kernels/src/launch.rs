//! Small host helpers shared by the families' `launch`/`define` functions.
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::sync::atomic::{AtomicUsize, Ordering};

static MAX_CUBES_X: AtomicUsize = AtomicUsize::new(65535);

/// Lowers the x extent of grids, so tests make every kernel spill into y (and meet the bound checks that
/// the last, partial row of cubes needs) with small problems.
pub fn set_max_cubes_x(max: usize) {
    MAX_CUBES_X.store(max.clamp(1, 65535), Ordering::Relaxed);
}

/// Cubes for `n` independent work items, spread over x and y so no dimension passes 65535 (wgpu's limit);
/// kernels read the linear `CUBE_POS` and must skip positions past `n`.
pub fn grid(n: usize) -> CubeCount {
    let x = n.clamp(1, MAX_CUBES_X.load(Ordering::Relaxed));
    CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1)
}

/// The widest vector (4, 2 or 1 words) that divides `words`.
pub fn vector_size(words: usize) -> usize {
    [4, 2, 1].into_iter().find(|n| words.is_multiple_of(*n)).unwrap_or(1)
}

/// A slice argument over `handle` seen as `len` elements (vectors) of the kernel's slice type.
pub fn buffer(handle: &Handle, len: usize) -> BufferArg {
    // SAFETY: every caller passes the length the buffer was created with, in the slice's element size.
    unsafe { BufferArg::from_raw_parts(handle.clone(), len) }
}

/// Kernel settings for defining (not launching) a kernel for `target`.
pub fn ir_settings(cube_dim: CubeDim) -> KernelSettings {
    KernelSettings::new(*cube_dim, ExecutionMode::Checked, AddressType::U32)
}

/// The compilation argument of a plain (not aliased) slice.
pub fn slice_arg() -> BufferCompilationArg {
    BufferCompilationArg { inplace: None }
}

/// A tensor map over `handle` holding bf16 rows [rows, heads, width] (flash attention's q / k / v), for
/// copies of 64 rows × 64 columns of one head into a 128-byte-swizzled tile (`dsl::tma`).
pub fn bf16_head_rows_map(handle: &Handle, rows: usize, heads: usize, width: usize) -> TensorMapArg<Tiled> {
    let (shape, strides) = ([rows.max(1), heads, width], [heads * width, width, 1]);
    // SAFETY: the buffer holds rows × heads × width bf16 values, row-major, as every caller's input does.
    let tensor = unsafe { TensorArg::from_raw_parts(handle.clone(), strides.into(), shape.into()) };
    TensorMapArg::new(
        TiledArgs {
            tile_size: [64, 1, 64].into(),
        },
        tensor,
        ElemType::Float(FloatKind::BF16),
    )
    .with_swizzle(TensorMapSwizzle::B128)
}
