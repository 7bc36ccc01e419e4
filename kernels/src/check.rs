//! Correctness check of one kernel variant on one device against its f64 reference: fresh random
//! inputs, outputs poisoned with NaN before the run, every element compared. Shared by the tests and
//! `nsa selftest`.
use crate::{HostTensor, Kernel, KernelError, Problem, TensorSpec, Variant};
use cubecl::server::Handle;
use nsa_backends::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Poison for outputs: NaN as f32, and NaN in both halves as bf16 — an unwritten element cannot pass.
pub const POISON: u32 = 0xffff_ffff;

#[derive(Clone, Debug)]
pub struct CheckResult {
    pub kernel: &'static str,
    pub variant: &'static str,
    pub problem: Problem,
    /// max over elements of |out − ref| / (1 + |ref|)  (allclose with rtol = atol).
    pub max_error: f64,
    pub tolerance: f64,
    /// Elements that were NaN (or never written).
    pub nan_count: usize,
    pub worst: Option<WorstElement>,
}

#[derive(Clone, Debug)]
pub struct WorstElement {
    pub output: &'static str,
    pub index: usize,
    pub got: f64,
    pub expected: f64,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.nan_count == 0 && self.max_error <= self.tolerance
    }
}

/// Standard normal samples (Box–Muller), so tests never run on zeros or on a narrow range.
pub fn normal(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

pub fn random_normal_inputs(specs: &[TensorSpec], problem: &Problem, rng: &mut StdRng) -> Vec<HostTensor> {
    specs
        .iter()
        .map(|spec| {
            let shape = spec.shape(problem);
            let values = normal(rng, spec.len(problem));
            HostTensor::from_f32(spec.name, &shape, spec.dtype(problem), &values)
        })
        .collect()
}

/// Runs `variant` on `device` over host inputs and reads the outputs back.
pub fn run(
    kernel: &dyn Kernel,
    variant: &Variant,
    device: &Device,
    problem: &Problem,
    inputs: &[HostTensor],
) -> Result<Vec<HostTensor>, KernelError> {
    kernel.validate(problem)?;
    kernel
        .supports(variant, problem, device.features())
        .map_err(|reason| KernelError::Unsupported {
            kernel: kernel.name(),
            variant: variant.name,
            reason,
        })?;
    let client = &device.client;
    let input_handles: Vec<Handle> = inputs
        .iter()
        .map(|t| client.create_from_slice(bytemuck::cast_slice(&t.words)))
        .collect();
    let output_specs = kernel.outputs();
    let output_handles: Vec<Handle> = output_specs
        .iter()
        .map(|spec| client.create_from_slice(bytemuck::cast_slice(&vec![POISON; spec.words(problem).max(1)])))
        .collect();
    // A launch that panics (a library kernel refusing the problem, say) is this variant's error, not the
    // end of a whole selftest.
    let launched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        kernel.launch(variant, device, problem, &input_handles, &output_handles)
    }));
    if let Err(payload) = launched {
        let reason = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the launch panicked".into());
        return Err(KernelError::Device {
            kernel: kernel.name(),
            variant: variant.name,
            reason,
        });
    }
    output_specs
        .iter()
        .zip(output_handles)
        .map(|(spec, handle)| {
            // A kernel that failed to compile or launch surfaces here, as an error rather than a panic.
            let bytes = client.read_one(handle).map_err(|e| KernelError::Device {
                kernel: kernel.name(),
                variant: variant.name,
                reason: e
                    .to_string()
                    .lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty())
                    .unwrap_or("")
                    .to_string(),
            })?;
            let words: Vec<u32> = bytemuck::cast_slice::<u8, u32>(&bytes)[..spec.words(problem)].to_vec();
            Ok(HostTensor {
                name: spec.name.into(),
                shape: spec.shape(problem),
                dtype: spec.dtype(problem),
                words,
            })
        })
        .collect()
}

/// Checks `variant` on `problem` with inputs drawn from `seed`.
pub fn check(
    kernel: &dyn Kernel,
    variant: &'static Variant,
    device: &Device,
    problem: &Problem,
    seed: u64,
) -> Result<CheckResult, KernelError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let inputs = kernel.random_inputs(problem, &mut rng);
    let expected = kernel.reference(problem, &inputs);
    let outputs = run(kernel, variant, device, problem, &inputs)?;
    let mut result = CheckResult {
        kernel: kernel.name(),
        variant: variant.name,
        problem: problem.clone(),
        max_error: 0.0,
        tolerance: 0.0,
        nan_count: 0,
        worst: None,
    };
    // Each output has its own tolerance; the result reports the output closest to (or furthest past) it.
    let mut worst_ratio = -1.0;
    for ((spec, output), expected) in kernel.outputs().iter().zip(&outputs).zip(&expected) {
        let tolerance = kernel.tolerance(spec, problem);
        let (mut got, mut want) = (output.to_f64(), expected.clone());
        kernel.canonicalize(spec, problem, &mut got);
        kernel.canonicalize(spec, problem, &mut want);
        let (mut max_error, mut worst) = (0.0f64, None);
        for (index, (got, want)) in got.into_iter().zip(&want).enumerate() {
            if got.is_nan() {
                result.nan_count += 1;
                continue;
            }
            // Infinities (masked logits, the lse of an empty row) must match exactly.
            let error = if got.is_infinite() || want.is_infinite() {
                if got == *want { 0.0 } else { f64::INFINITY }
            } else {
                (got - want).abs() / (1.0 + want.abs())
            };
            if worst.is_none() || error > max_error {
                max_error = max_error.max(error);
                worst = Some(WorstElement {
                    output: spec.name,
                    index,
                    got,
                    expected: *want,
                });
            }
        }
        let ratio = max_error / tolerance.max(f64::MIN_POSITIVE);
        if ratio > worst_ratio {
            worst_ratio = ratio;
            (result.max_error, result.tolerance, result.worst) = (max_error, tolerance, worst);
        }
    }
    Ok(result)
}
