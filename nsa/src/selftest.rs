use crate::{Failure, open_device};
use nsa_kernels::{KERNELS, check};

#[derive(clap::Args)]
pub struct Args {
    /// auto | cuda[:N] | hip[:N] | wgpu[:N]
    #[arg(long)]
    device: Option<String>,
    /// Only this kernel.
    #[arg(long)]
    kernel: Option<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

fn row(kernel: &str, variant: &str, shape: &str, error: &str, tolerance: &str, verdict: &str) {
    println!("{kernel:<18} {variant:<14} {shape:<66} {error:>10} {tolerance:>9}  {verdict}");
}

pub fn run(args: Args) -> Result<(), Failure> {
    let device = open_device(args.device.as_deref())?;
    if let Some(name) = &args.kernel {
        nsa_kernels::find_kernel(name).map_err(crate::usage)?;
    }
    println!(
        "selftest on {} — {} ({})",
        device.info.id(),
        device.info.name,
        device.info.arch
    );
    row("kernel", "variant", "shape", "max error", "tolerance", "result");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for kernel in KERNELS
        .iter()
        .filter(|k| args.kernel.as_deref().is_none_or(|n| n == k.name()))
    {
        for variant in kernel.variants() {
            for (i, problem) in kernel.problems().iter().enumerate() {
                let shape = problem.to_string();
                if let Err(reason) = kernel.supports(variant, problem, device.features()) {
                    row(
                        kernel.name(),
                        variant.name,
                        &shape,
                        "-",
                        "-",
                        &format!("SKIP ({reason})"),
                    );
                    skipped += 1;
                    continue;
                }
                let result = match check(*kernel, variant, &device, problem, args.seed + i as u64) {
                    Ok(result) => result,
                    Err(error) => {
                        row(
                            kernel.name(),
                            variant.name,
                            &shape,
                            "-",
                            "-",
                            &format!("FAIL ({error})"),
                        );
                        failed += 1;
                        continue;
                    }
                };
                let verdict = if result.passed() {
                    passed += 1;
                    "PASS".to_string()
                } else {
                    failed += 1;
                    match &result.worst {
                        _ if result.nan_count > 0 => format!("FAIL ({} NaN/unwritten)", result.nan_count),
                        Some(w) => format!(
                            "FAIL ({}[{}] = {:.6}, expected {:.6})",
                            w.output, w.index, w.got, w.expected
                        ),
                        None => "FAIL".into(),
                    }
                };
                let (error, tolerance) = (format!("{:.2e}", result.max_error), format!("{:.0e}", result.tolerance));
                row(kernel.name(), variant.name, &shape, &error, &tolerance, &verdict);
            }
        }
    }
    // Every kernel variant once more on grids spilled into y (2 cubes across): the cubes past the end of
    // the last row must do nothing — on CUDA a stray write faults, elsewhere it may pass silently.
    nsa_kernels::launch::set_max_cubes_x(2);
    for kernel in KERNELS
        .iter()
        .filter(|k| args.kernel.as_deref().is_none_or(|n| n == k.name()))
    {
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
            let shape = format!("{problem} (spilled grid)");
            let verdict = match check(*kernel, variant, &device, problem, args.seed) {
                Ok(result) if result.passed() => format!("PASS ({:.2e})", result.max_error),
                Ok(result) => format!(
                    "FAIL ({:.2e} > {:.0e}, {} NaN)",
                    result.max_error, result.tolerance, result.nan_count
                ),
                Err(error) => format!("FAIL ({error})"),
            };
            if verdict.starts_with("PASS") {
                passed += 1
            } else {
                failed += 1
            }
            row(kernel.name(), variant.name, &shape, "-", "-", &verdict);
        }
    }
    nsa_kernels::launch::set_max_cubes_x(65535);
    println!(
        "\n{passed} passed, {failed} failed, {skipped} skipped (not supported here) on {}",
        device.info.id()
    );
    if failed > 0 {
        Err(Failure::Run(format!("{failed} checks failed")))
    } else {
        Ok(())
    }
}
