//! nsa's kernel families. Each family file holds its `#[cube]` kernels, its f64 reference and its
//! registration ([`Kernel`]); [`registry::KERNELS`] lists every family, and tests, snapshots, `nsa ir`,
//! `nsa selftest` and `nsa run-kernel` all walk that one list.
pub mod bench;
pub mod cast_rows;
pub mod check;
pub mod error;
pub mod fp8_act;
pub mod fp8_gemm;
pub mod fp8_gemm_wgmma;
pub mod fp8_kv;
pub mod fp8_kv_dequant;
pub mod gemm;
pub mod gemm_wgmma;
pub mod indexer;
pub mod indexer_fp8;
pub mod indexer_fp8_wgmma;
pub mod indexer_wgmma;
pub mod ir;
pub mod launch;
pub mod layer_plan;
pub mod mha_prefill;
pub mod mha_prefill_wgmma;
pub mod mla_decode;
pub mod moe_experts;
pub mod moe_experts_fp8;
pub mod moe_experts_mma;
pub mod moe_experts_wgmma;
pub mod moe_gate;
pub mod norm;
pub mod registry;
pub mod rope;
pub mod silu_mul;
pub mod sparse_mla;
pub mod sparse_mla_decode;
pub mod sparse_mla_prefill;
pub mod spec;
pub mod strategy;
pub mod tensor;
pub mod topk;
pub mod tuning;
pub mod wgmma_tile;

pub use check::{CheckResult, check};
pub use error::KernelError;
pub use registry::{KERNELS, find_kernel, find_variant};
pub use spec::{Kernel, KernelSpec, Problem, TensorSpec, Variant};
pub use tensor::{DType, HostTensor};
