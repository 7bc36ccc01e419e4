//! Every (kernel, variant, format) × target compiled with no device present and pinned as a snapshot in
//! `snapshots/<target>/<kernel>-<variant>-<format>.snap`. A change to generated code shows up as a diff to
//! review (`cargo insta review`); CI fails on any pending `.snap.new`.
use nsa_backends::IrTarget;
use nsa_dsl::Format;
use nsa_kernels::KERNELS;
use nsa_kernels::tuning::without_entry_hashes;

fn settings(target: IrTarget) -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(format!("../{}", target.name()));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings
}

#[test]
fn generated_code_matches_snapshots() {
    for target in IrTarget::ALL {
        let _guard = settings(target).bind_to_scope();
        for kernel in KERNELS {
            for variant in kernel.variants().iter().filter(|v| kernel.supports_target(v, target)) {
                for &format in kernel.formats().iter().filter(|f| kernel.supports_format(variant, **f)) {
                    let problem = kernel.ir_problem(format);
                    let source = nsa_kernels::ir::emit(*kernel, variant, target, &problem)
                        .unwrap_or_else(|e| panic!("{}/{} {format} for {target}: {e}", kernel.name(), variant.name));
                    // Entry names end in a hash of the kernel's type id, which moves with the build and
                    // every cubecl release: the same normalization the tuning versions use.
                    let source = without_entry_hashes(&source);
                    insta::assert_snapshot!(format!("{}-{}-{}", kernel.name(), variant.name, format), source);
                }
            }
        }
    }
}

#[test]
fn generation_is_deterministic() {
    let kernel = KERNELS[0];
    let variant = &kernel.variants()[0];
    let problem = kernel.ir_problem(Format::Bf16);
    for target in IrTarget::ALL {
        let first = nsa_kernels::ir::emit(kernel, variant, target, &problem).unwrap();
        let second = nsa_kernels::ir::emit(kernel, variant, target, &problem).unwrap();
        assert_eq!(first, second, "{target}");
    }
}

#[test]
fn value_renumbering_is_consistent_and_leaves_other_names() {
    let source = "float v12 = v7 + v12; bool* flag_v7_store; vec4<u32> uv3 = v4x;";
    assert_eq!(
        nsa_backends::ir::renumber_values(source),
        "float v0 = v1 + v0; bool* flag_v1_store; vec4<u32> uv3 = v2x;"
    );
}

/// The two things nsa's CubeCL patch (scripts/patches/cubecl-cpp-0.11.3.patch) adds to generated CUDA: a
/// minimum of one cube per multiprocessor in the launch bounds exactly where registers are handed over
/// (`setmaxnreg`, else ptxas ignores it), and accumulators as tied read-write operands (no copies of a
/// product's accumulator; the result takes the input's registers).
#[test]
fn patched_cuda_has_min_blocks_for_setmaxnreg_and_tied_accumulators() {
    let kernel = nsa_kernels::find_kernel("sparse_mla_prefill").unwrap();
    let problem = kernel.ir_problem(Format::Bf16);
    let source = |name: &str| {
        let variant = kernel.variants().iter().find(|v| v.name == name).unwrap();
        nsa_kernels::ir::emit(kernel, variant, IrTarget::Cuda, &problem).unwrap()
    };
    let producer = source("wgmma_h64_ws");
    assert!(producer.contains("setmaxnreg.inc") && producer.contains("__launch_bounds__(384, 1)"));
    let paired = source("wgmma_h64_pair");
    assert!(!paired.contains("setmaxnreg") && paired.contains("__launch_bounds__(256)"));
    // O += P·V (m64n256: 128 accumulators a unit) accumulates in place: "+f" outputs starting as the input.
    assert!(paired.contains(r#""+f"(result.i_127)"#));
    assert!(
        !paired.contains("mov.f32 %0, %128;"),
        "an accumulator copied into the result"
    );
}
