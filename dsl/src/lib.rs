//! nsa's layer on CubeCL: the building blocks every kernel is made of.
//!
//! - [`format`]: storage formats decoded from raw bits (f32, bf16, FP8 e4m3 with block scales), so one kernel
//!   runs where the runtime has no such types (WGSL has no bf16).
//! - [`load`]: vectorized word loads and index-gathered row loads.
//! - [`reduce`]: cube-wide reductions with a plane (warp/subgroup) path and a shared-memory fallback.
//! - [`softmax`]: online-softmax state (running max and sum of exponentials).
//! - [`mma`]: tensor-core tiles (bf16 in, f32 accumulate) for the CUDA/HIP variants.
//! - [`warp_mma`]: warp tensor-core multiplies with fragments in a known register layout (CUDA `mma.sync`), for
//!   kernels that rescale accumulator rows in registers (flash attention).
//! - [`wgmma`]: Hopper warpgroup multiplies from swizzled shared-memory tiles (sm_90a inline PTX).
//! - [`mbarrier`]: shared-memory barriers with separate arrive and wait, for pipelines without cube barriers.
//! - [`tma`]: Hopper tensor-map copies of whole tiles by one unit, completing on an mbarrier.
//! - [`warpgroup`]: named barriers between the roles of a warp-specialized cube.
//! - [`select`]: order-preserving keys for radix select, cube-wide prefix sums for compaction.
//!
//! Every buffer is addressed as 32-bit words (`&[u32]`): a bf16 word holds two elements, an e4m3 word four.
pub mod format;
pub mod host;
pub mod load;
pub mod mbarrier;
pub mod mma;
pub mod reduce;
pub mod select;
pub mod softmax;
pub mod tma;
pub mod warp_mma;
pub mod warpgroup;
pub mod wgmma;

pub use format::Format;
pub use reduce::Reduction;
