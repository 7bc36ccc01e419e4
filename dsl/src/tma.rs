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

/// Starts storing the box at element coordinates (`c0` innermost, `c1`, `c2`) of the 3-D tensor `map` from
/// shared memory at byte address `source` (laid out as the map's box, swizzle included); parts of the box
/// outside the tensor are not written. The units that wrote `source` must first run
/// [`fence_shared_to_async`] and synchronize with the storing unit; the store then joins this unit's bulk
/// group ([`tma_store_commit`]), and `source` may change only after [`tma_store_wait_read`].
#[cube]
pub fn tma_store_3d<T: CubePrimitive>(map: &TensorMap<T, Tiled>, source: u32, c0: i32, c1: i32, c2: i32) {
    let descriptor = tensor_map_address(map);
    gpu_asm!(
        "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [{m}, {{{c0}, {c1}, {c2}}}], [{s}];",
        m = in(_) descriptor,
        c0 = in(_) c0,
        c1 = in(_) c1,
        c2 = in(_) c2,
        s = in(_) source
    );
}

/// Closes this unit's bulk group of stores started since the last commit.
#[cube]
pub fn tma_store_commit() {
    gpu_asm!("cp.async.bulk.commit_group;");
}

/// Waits until this unit's committed stores have read their shared memory (not until they reached global
/// memory: that is guaranteed at the kernel's end).
#[cube]
pub fn tma_store_wait_read() {
    gpu_asm!("cp.async.bulk.wait_group.read 0;");
}

/// Makes this unit's ordinary shared-memory writes visible to the tensor copy engine (the async proxy).
#[cube]
pub fn fence_shared_to_async() {
    gpu_asm!("fence.proxy.async.shared::cta;");
}
