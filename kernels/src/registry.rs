//! The one list of kernel families.
use crate::{Kernel, KernelError, Variant};

pub static KERNELS: &[&dyn Kernel] = &[
    &crate::norm::RmsNorm,
    &crate::norm::LayerNorm,
    &crate::rope::ROPE_INTERLEAVED,
    &crate::rope::ROPE_NEOX,
    &crate::silu_mul::SiluMul,
    &crate::indexer::IndexerLogits,
    &crate::indexer_fp8::IndexerFp8,
    &crate::topk::TopK,
    &crate::sparse_mla_prefill::SparseMlaPrefill,
    &crate::sparse_mla_decode::SparseMlaDecode,
    &crate::mla_decode::MlaDecode,
    &crate::mha_prefill::MhaPrefill,
    &crate::fp8_kv::Fp8KvQuantize,
    &crate::fp8_kv_dequant::Fp8KvDequantize,
    &crate::cast_rows::CAST_ROWS,
    &crate::cast_rows::WIDEN_ROWS,
    &crate::fp8_act::Fp8ActQuant,
    &crate::fp8_gemm::Fp8Gemm,
    &crate::gemm::Gemm,
    &crate::moe_gate::MoeGate,
    &crate::moe_experts::MoeExperts,
    &crate::moe_experts_fp8::MoeExpertsFp8,
];

pub fn find_kernel(name: &str) -> Result<&'static dyn Kernel, KernelError> {
    KERNELS
        .iter()
        .copied()
        .find(|k| k.name() == name)
        .ok_or_else(|| KernelError::UnknownKernel {
            given: name.into(),
            valid: KERNELS.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
        })
}

pub fn find_variant(kernel: &dyn Kernel, name: &str) -> Result<&'static Variant, KernelError> {
    kernel
        .variants()
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| KernelError::UnknownVariant {
            kernel: kernel.name(),
            given: name.into(),
            valid: kernel.variants().iter().map(|v| v.name).collect::<Vec<_>>().join(", "),
        })
}
