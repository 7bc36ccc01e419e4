//! Hopper's tensor copy engine (TMA, CUDA sm_90): one unit starts the copy of a whole box of a tensor into
//! shared memory, described by a tensor map the host encodes (shape, strides, box, swizzle); the copy
//! engine computes every address, fills what lies outside the tensor with zeros, and counts the bytes it
//! wrote towards an [`crate::mbarrier`] transaction count. No per-unit copy instructions, and the writes are
//! already in the async proxy that wgmma reads through (no proxy fence).
use cubecl::prelude::*;
use cubecl_cpp::cuda::ptx::tensor_map_address;

/// Starts copying the box at element coordinates (`c0` innermost, `c1`, `c2`) of the 3-D tensor `map`
/// into shared memory at byte address `destination` (1024-byte aligned for the 128-byte swizzle); its bytes
/// complete on the mbarrier at `barrier`.
#[cube]
pub fn tma_load_3d<T: CubePrimitive>(
    map: &TensorMap<T, Tiled>,
    destination: u32,
    barrier: u32,
    c0: i32,
    c1: i32,
    c2: i32,
) {
    let descriptor = tensor_map_address(map);
    gpu_asm!(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes ",
        "[{d}], [{m}, {{{c0}, {c1}, {c2}}}], [{b}];",
        d = in(_) destination,
        m = in(_) descriptor,
        c0 = in(_) c0,
        c1 = in(_) c1,
        c2 = in(_) c2,
        b = in(_) barrier
    );
}
