//! Dense GEMM for the model's bf16 linear layers, through cubek-matmul: c [m, n] = a [m, k] · bᵀ with b
//! [n, k] (a linear layer's weight, read transposed in place), f32 accumulation.
//!
//! Variant `wgmma` (Hopper, bf16: [`crate::gemm_wgmma`]). Variant `cubek`: bf16 through cubek's `Strategy::Auto`, which picks (and tunes, per device) its own
//! tiled or multi-level matmul kernel at launch; so it has no single kernel to show in `nsa ir` or the
//! snapshots. bf16 needs a device with bf16 arithmetic (CUDA, HIP). f32 takes cubek's `SimpleUnit`
//! routine (plain f32 FMAs, everywhere): `Auto` would round f32 operands to tf32 on tensor cores
//! (10-bit mantissa, ~1e-3 relative), which is not an f32 GEMM.
use crate::spec::{Storage, TensorSpec};
use crate::{HostTensor, Kernel, KernelError, Problem, Variant};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek_matmul::launch::launch_ref;
use cubek_matmul::multi_level;
use cubek_matmul::strategy::Strategy;
use cubek_std::InputBinding;
use nsa_backends::{ComputeClient, Device, DeviceFeatures, IrTarget};
use nsa_dsl::Format;

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "wgmma",
        summary: "128 × 128 tiles, 2 warpgroups of bf16 wgmma m64n128k16, 4-stage cp.async pipeline (Hopper)",
        needs_plane_ops: true,
    },
    Variant {
        name: "cubek",
        summary: "cubek-matmul: bf16 by Strategy::Auto (kernel chosen per device at launch), f32 by SimpleUnit (no tf32)",
        needs_plane_ops: false,
    },
];

const INPUTS: &[TensorSpec] = &[
    TensorSpec::new("a", &["m", "k"], Storage::Problem),
    TensorSpec::new("b", &["n", "k"], Storage::Problem),
];
const OUTPUTS: &[TensorSpec] = &[TensorSpec::new("c", &["m", "n"], Storage::Problem)];

fn dims(m: usize, n: usize, k: usize) -> Vec<(&'static str, usize)> {
    vec![("m", m), ("n", n), ("k", k)]
}

fn elem(format: Format) -> ElemType {
    match format {
        Format::Bf16 => ElemType::Float(FloatKind::BF16),
        Format::F32 => ElemType::Float(FloatKind::F32),
    }
}

pub struct Gemm;

impl Kernel for Gemm {
    fn name(&self) -> &'static str {
        "gemm"
    }
    fn summary(&self) -> &'static str {
        "c = a · bᵀ (b a [out, in] weight) through cubek-matmul, f32 accumulation"
    }
    fn variants(&self) -> &'static [Variant] {
        VARIANTS
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        INPUTS
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        OUTPUTS
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        &[]
    }
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for format in Format::ALL {
            // (m, n, k): one token, ragged sizes, a square-ish block.
            // The last: tails in every dimension for wgmma's 128 × 128 tiles and 64-wide K stages.
            for (m, n, k) in [(1, 96, 64), (37, 70, 130), (128, 128, 256), (200, 200, 200)] {
                problems.push(Problem::new(format, &dims(m, n, k), &[]));
            }
        }
        problems
    }
    fn bench_problems(&self) -> Vec<Problem> {
        vec![Problem::new(Format::Bf16, &dims(4096, 7168, 7168), &[])]
    }
    fn ir_problem(&self, format: Format) -> Problem {
        Problem::new(format, &dims(4096, 7168, 7168), &[])
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        if problem.dim("m") == 0 || problem.dim("n") == 0 || problem.dim("k") == 0 {
            return Err(KernelError::InvalidProblem {
                kernel: "gemm",
                field: "m",
                expected: "positive m, n and k".into(),
                got: format!("m {}, n {}, k {}", problem.dim("m"), problem.dim("n"), problem.dim("k")),
            });
        }
        Ok(())
    }
    fn requirements(&self, variant: &Variant, problem: &Problem, features: &DeviceFeatures) -> Result<(), String> {
        if variant.name == "wgmma" {
            crate::spec::needs_wgmma(features)?;
            return crate::gemm_wgmma::shape_requirements(problem);
        }
        if problem.format == Format::Bf16 && !features.bf16 {
            return Err("needs bf16 arithmetic (cubek works on the native type)".into());
        }
        Ok(())
    }
    fn supports_target(&self, variant: &Variant, target: IrTarget) -> bool {
        // Only wgmma has code of its own: cubek chooses its kernel at launch, so there is none to print.
        variant.name == "wgmma" && target == IrTarget::Cuda
    }
    fn supports_format(&self, variant: &Variant, format: Format) -> bool {
        variant.name != "wgmma" || format == Format::Bf16
    }
    fn shared_memory_bytes(&self, variant: &Variant, _: &Problem) -> usize {
        match variant.name {
            "wgmma" => crate::gemm_wgmma::shared_memory_bytes(),
            _ => 0,
        }
    }
    fn flops(&self, problem: &Problem) -> u64 {
        2 * (problem.dim("m") * problem.dim("n") * problem.dim("k")) as u64
    }
    fn tolerance(&self, _: &TensorSpec, problem: &Problem) -> f64 {
        match problem.format {
            // f32 sums of exact bf16 products, then bf16 output rounding (2⁻⁸ relative).
            Format::Bf16 => 4e-3,
            // f32 sums of k products in cubek's order against the f64 reference: grows with k.
            Format::F32 => 1e-5f64.max(2e-7 * problem.dim("k") as f64),
        }
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
        let (a, b) = (inputs[0].to_f64(), inputs[1].to_f64());
        let c = (0..m * n)
            .map(|at| {
                let (i, j) = (at / n, at % n);
                a[i * k..][..k].iter().zip(&b[j * k..][..k]).map(|(x, y)| x * y).sum()
            })
            .collect();
        vec![c]
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        if variant.name == "wgmma" {
            return crate::gemm_wgmma::launch(device, problem, inputs, outputs);
        }
        let (m, n, k) = (problem.dim("m"), problem.dim("n"), problem.dim("k"));
        // a row-major [m, k], b row-major [n, k] seen as its transpose [k, n], c row-major [m, n].
        let a = Operand::new(inputs[0].clone(), &[m, k], &[k, 1]);
        let b = Operand::new(inputs[1].clone(), &[k, n], &[1, k]);
        let c = Operand::new(outputs[0].clone(), &[m, n], &[n, 1]);
        if let Err(error) = matmul(&device.client, problem.format, a, b, c) {
            panic!("cubek-matmul cannot run {problem} on this device: {error}");
        }
    }
    fn define(&self, variant: &Variant, target: IrTarget, _: &Problem) -> KernelDefinition {
        assert_eq!(
            variant.name, "wgmma",
            "cubek picks its kernel at launch: no IR of its own"
        );
        crate::gemm_wgmma::define(target)
    }
}

/// A matmul operand: a buffer seen through a shape and strides in elements (rank 2, or 3 with a batch
/// dimension first).
pub struct Operand {
    handle: Handle,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl Operand {
    pub fn new(handle: Handle, shape: &[usize], strides: &[usize]) -> Operand {
        assert_eq!(
            shape.len(),
            strides.len(),
            "an operand's shape and strides have the same rank"
        );
        Operand {
            handle,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        }
    }

    fn binding(self) -> TensorBinding {
        // SAFETY: the caller's shape and strides describe memory inside the buffer (Operand's contract).
        unsafe { TensorBinding::from_raw_parts(self.handle, self.strides.into(), self.shape.into()) }
    }
}

/// c = a · b (a [.., m, k], b [.., k, n], c [.., m, n]) through cubek-matmul, on any client: the gemm
/// kernel's launch, and the device model's matmuls on burn's buffers. f32 is exact f32 (cubek's
/// `SimpleUnit`, never tf32); bf16 takes `Strategy::Auto`.
pub fn matmul(client: &ComputeClient, format: Format, a: Operand, b: Operand, c: Operand) -> Result<(), String> {
    let ty = elem(format);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: ty,
        rhs: ty,
        out: ty,
    });
    let strategy = match format {
        Format::Bf16 => Strategy::Auto,
        Format::F32 => Strategy::MultiLevel(multi_level::Strategy::SimpleUnit(Default::default())),
    };
    launch_ref(
        &strategy,
        client,
        InputBinding::new(a.binding(), ty),
        InputBinding::new(b.binding(), ty),
        c.binding(),
        &mut dtypes,
    )
    .map_err(|e| format!("{e:?}"))
}
