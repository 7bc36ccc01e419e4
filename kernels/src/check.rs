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
    if len > 1 << 22 {
        // Bench-sized (the model's tensors, 10⁸ values): drawn in parallel from one seed of `rng`.
        let seed = rng.random::<u64>();
        let words = fast_random_words(seed, len, |z| {
            let u1 = ((z >> 32) as f64 + 1.0) / (1u64 << 32) as f64;
            let u2 = (z & 0xffff_ffff) as f64 / (1u64 << 32) as f64;
            (((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32).to_bits()
        });
        return words.into_iter().map(f32::from_bits).collect();
    }
    (0..len)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Model-sized bench data (billions of weights) in seconds: `len` words, each from a hash of its index and
/// `seed` (splitmix64), filled by every core. Not for tests: `normal` with a seeded rng is the test data.
pub fn fast_random_words(seed: u64, len: usize, word: impl Fn(u64) -> u32 + Sync) -> Vec<u32> {
    let mut words = vec![0u32; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (c, part) in words.chunks_mut(chunk).enumerate() {
            let word = &word;
            scope.spawn(move || {
                for (i, w) in part.iter_mut().enumerate() {
                    let mut z = seed ^ ((c * chunk + i) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    *w = word(z ^ (z >> 31));
                }
            });
        }
    });
    words
}

/// Two bf16 values per word, uniform with standard deviation `std` (the same variance as the normal test
/// data), from [`fast_random_words`].
pub fn fast_bf16_words(seed: u64, len: usize, std: f32) -> Vec<u32> {
    let amplitude = std * 3f32.sqrt();
    // A 24-bit uniform integer → a bf16 in [−amplitude, amplitude).
    let bf16 = move |bits: u64| {
        let unit = (bits & 0xff_ffff) as f32 / (1u32 << 24) as f32;
        half::bf16::from_f32((2.0 * unit - 1.0) * amplitude).to_bits() as u32
    };
    fast_random_words(seed, len.div_ceil(2), move |z| bf16(z >> 40) | (bf16(z >> 16) << 16))
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
            let bytes = client
                .read_one(handle)
                .map_err(|e| KernelError::device(kernel, variant, e))?;
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
        let tolerance = kernel.variant_tolerance(variant, spec, problem);
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

#[cfg(test)]
mod tests {
    #[test]
    fn fast_bf16_words_have_the_asked_spread_and_no_repeats() {
        let words = super::fast_bf16_words(7, 200_001, 0.5);
        assert_eq!(words.len(), 100_001);
        let values: Vec<f64> = nsa_dsl::host::unpack(&words, nsa_dsl::Format::Bf16, 200_001)
            .iter()
            .map(|v| *v as f64)
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        assert!(mean.abs() < 0.01 && (std - 0.5).abs() < 0.01, "mean {mean}, std {std}");
        assert!(values.iter().all(|v| v.abs() <= 0.5 * 3f64.sqrt() + 1e-2));
        // The two halves of a word and neighbouring words are independent draws.
        let same = words.windows(2).filter(|w| w[0] == w[1]).count()
            + words.iter().filter(|w| *w >> 16 == *w & 0xffff).count();
        // bf16 has ~2000 values in this range: chance alone repeats ~1 in 1000; correlated halves would repeat always.
        assert!(same < 1000, "{same} repeats");
    }
}
