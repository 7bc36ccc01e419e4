//! Every registered kernel variant against its f64 reference, on every catalogue problem, on the test
//! device (`NSA_TEST_DEVICE`, default: the best found — lavapipe's Vulkan in CI). Variants the device
//! cannot run (plane ops on lavapipe) are reported, and must be checked where they run (`nsa selftest`).
use cubecl::prelude::KernelDefinition;
use cubecl::server::Handle;
use nsa_backends::{Device, IrTarget};
use nsa_dsl::Format;
use nsa_kernels::norm::{LayerNorm, RmsNorm};
use nsa_kernels::{HostTensor, KERNELS, Kernel, KernelError, Problem, TensorSpec, Variant, check};

fn test_device() -> nsa_backends::Device {
    let spec = std::env::var("NSA_TEST_DEVICE").ok();
    nsa_backends::select(spec.as_deref()).expect("a test device (install mesa-vulkan-drivers for lavapipe)")
}

#[test]
fn kernels_skip_the_cubes_past_the_end_of_a_spilled_grid() {
    // Grids of at most 2 cubes across: every multi-cube launch spills into y with a partial last row, so
    // a kernel that indexes by CUBE_POS_X, or computes past the last row, gets wrong answers here. (Writes
    // past a buffer's end are dropped by wgpu's robust buffer access; `nsa selftest` repeats this geometry
    // on CUDA, where they fault.) The catalogue test beside it passes under either geometry.
    nsa_kernels::launch::set_max_cubes_x(2);
    let device = test_device();
    for kernel in KERNELS {
        for variant in kernel.variants() {
            // The second problem the device supports (the first is often a single cube).
            let supported: Vec<_> = kernel
                .problems()
                .into_iter()
                .filter(|p| kernel.supports(variant, p, device.features()).is_ok())
                .collect();
            let Some(problem) = supported.get(1).or(supported.first()) else {
                continue;
            };
            let result = check(*kernel, variant, &device, problem, 11).expect("kernel runs");
            assert!(
                result.passed(),
                "{}::{}::{} on a spilled grid: {result:?}",
                kernel.name(),
                variant.name,
                problem
            );
        }
    }
    nsa_kernels::launch::set_max_cubes_x(65535);
}

#[test]
fn every_kernel_variant_matches_its_reference() {
    let device = test_device();
    let mut failures = Vec::new();
    let mut checked = 0;
    for kernel in KERNELS {
        for variant in kernel.variants() {
            for (i, problem) in kernel.problems().iter().enumerate() {
                if let Err(reason) = kernel.supports(variant, problem, device.features()) {
                    println!("{}::{}::{} skipped: {reason}", kernel.name(), variant.name, problem);
                    continue;
                }
                let result = check(*kernel, variant, &device, problem, 7 + i as u64).expect("kernel runs");
                checked += 1;
                println!(
                    "{}::{}::{} max error {:.2e} (tolerance {:.0e})",
                    kernel.name(),
                    variant.name,
                    problem,
                    result.max_error,
                    result.tolerance
                );
                if !result.passed() {
                    failures.push(format!(
                        "{}::{}::{}: {:?}",
                        kernel.name(),
                        variant.name,
                        problem,
                        result
                    ));
                }
            }
        }
    }
    assert!(checked > 0, "no kernel variant ran on {:?}", device);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// RMSNorm whose launch does nothing, runs RMSNorm where LayerNorm's reference is expected, or panics: the
/// check must fail the first two (or it could not catch an unwritten output or a wrong result) and report
/// the panic as this variant's error.
struct Broken {
    launch: bool,
    panics: bool,
}

impl Kernel for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn summary(&self) -> &'static str {
        "test double"
    }
    fn variants(&self) -> &'static [Variant] {
        RmsNorm.variants()
    }
    fn inputs(&self) -> &'static [TensorSpec] {
        LayerNorm.inputs()
    }
    fn outputs(&self) -> &'static [TensorSpec] {
        RmsNorm.outputs()
    }
    fn default_params(&self) -> &'static [(&'static str, f64)] {
        RmsNorm.default_params()
    }
    fn problems(&self) -> Vec<Problem> {
        RmsNorm.problems()
    }
    fn ir_problem(&self, format: Format) -> Problem {
        RmsNorm.ir_problem(format)
    }
    fn validate(&self, problem: &Problem) -> Result<(), KernelError> {
        RmsNorm.validate(problem)
    }
    fn flops(&self, problem: &Problem) -> u64 {
        RmsNorm.flops(problem)
    }
    fn reference(&self, problem: &Problem, inputs: &[HostTensor]) -> Vec<Vec<f64>> {
        LayerNorm.reference(problem, inputs)
    }
    fn launch(&self, variant: &Variant, device: &Device, problem: &Problem, inputs: &[Handle], outputs: &[Handle]) {
        if self.panics {
            panic!("refused by the library");
        }
        if self.launch {
            RmsNorm.launch(variant, device, problem, &inputs[..2], outputs);
        }
    }
    fn define(&self, variant: &Variant, target: IrTarget, problem: &Problem) -> KernelDefinition {
        RmsNorm.define(variant, target, problem)
    }
}

#[test]
fn the_check_fails_unwritten_and_wrong_outputs() {
    let device = test_device();
    let variant = RmsNorm
        .variants()
        .iter()
        .find(|v| v.supports(device.features()))
        .unwrap();
    let problem = Problem::new(Format::F32, &[("rows", 3), ("hidden", 64)], &[("eps", 1e-6)]);
    let unwritten = check(
        &Broken {
            launch: false,
            panics: false,
        },
        variant,
        &device,
        &problem,
        1,
    )
    .unwrap();
    assert!(!unwritten.passed());
    assert_eq!(
        unwritten.nan_count,
        3 * 64,
        "every poisoned element must count as unwritten"
    );
    let wrong = check(
        &Broken {
            launch: true,
            panics: false,
        },
        variant,
        &device,
        &problem,
        1,
    )
    .unwrap();
    assert_eq!(wrong.nan_count, 0);
    assert!(
        !wrong.passed(),
        "RMSNorm passed as LayerNorm: max error {}",
        wrong.max_error
    );
}

#[test]
fn a_panicking_launch_is_the_variants_error() {
    let device = test_device();
    let variant = RmsNorm
        .variants()
        .iter()
        .find(|v| v.supports(device.features()))
        .unwrap();
    let problem = Problem::new(Format::F32, &[("rows", 3), ("hidden", 64)], &[("eps", 1e-6)]);
    match check(
        &Broken {
            launch: true,
            panics: true,
        },
        variant,
        &device,
        &problem,
        1,
    ) {
        Err(KernelError::Device { reason, .. }) => assert!(reason.contains("refused by the library"), "{reason}"),
        other => panic!("expected a device error, got {:?}", other.map(|r| r.max_error)),
    }
}

#[test]
fn parallel_weight_quantizer_equals_its_definition() {
    // Two matrices with partial edge blocks both ways; values spanning several magnitudes per block.
    let (matrices, rows, cols) = (2, 300, 260);
    let values: Vec<f32> = (0..matrices * rows * cols)
        .map(|i| ((i as f32 * 0.618).sin() * (1.0 + (i % 97) as f32)) / (1 + i % 5) as f32)
        .collect();
    let (bytes, scales) = nsa_kernels::fp8_act::quantize_weight_blocks(&values, matrices, rows, cols);
    let (rb, cb) = (rows.div_ceil(128), cols.div_ceil(128));
    assert_eq!(scales.len(), matrices * rb * cb);
    // The definition, serially: every block's amax over its elements, then each element's code.
    let mut amax = vec![0f32; matrices * rb * cb];
    let block_of = |i: usize| {
        let (e, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
        (e * rb + r / 128) * cb + c / 128
    };
    for (i, v) in values.iter().enumerate() {
        amax[block_of(i)] = amax[block_of(i)].max(v.abs());
    }
    for (i, v) in values.iter().enumerate() {
        let scale = amax[block_of(i)].max(1e-4) / 448.0;
        assert_eq!(scales[block_of(i)], scale, "scale of element {i}");
        let code = nsa_dsl::host::f32_to_e4m3((v / scale).clamp(-448.0, 448.0));
        assert_eq!(bytes[i], code, "code of element {i}");
    }
}
