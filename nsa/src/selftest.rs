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
    println!(
        "{:<18} {:<8} {:<40} {:>10} {:>9}  result",
        "kernel", "variant", "shape", "max error", "tolerance"
    );
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for kernel in KERNELS
        .iter()
        .filter(|k| args.kernel.as_deref().is_none_or(|n| n == k.name()))
    {
        for variant in kernel.variants() {
            if !variant.supports(device.features()) {
                println!(
                    "{:<18} {:<8} {:<40} {:>10} {:>9}  SKIP (needs plane ops)",
                    kernel.name(),
                    variant.name,
                    "-",
                    "-",
                    "-"
                );
                skipped += 1;
                continue;
            }
            for (i, problem) in kernel.problems().iter().enumerate() {
                let result = check(*kernel, variant, &device, problem, args.seed + i as u64)?;
                let verdict = if result.passed() {
                    passed += 1;
                    "PASS".to_string()
                } else {
                    failed += 1;
                    match &result.worst {
                        _ if result.nan_count > 0 => {
                            format!("FAIL ({} NaN/unwritten)", result.nan_count)
                        }
                        Some(w) => format!(
                            "FAIL ({}[{}] = {:.6}, expected {:.6})",
                            w.output, w.index, w.got, w.expected
                        ),
                        None => "FAIL".into(),
                    }
                };
                println!(
                    "{:<18} {:<8} {:<40} {:>10.2e} {:>9.0e}  {verdict}",
                    kernel.name(),
                    variant.name,
                    problem.to_string(),
                    result.max_error,
                    result.tolerance
                );
            }
        }
    }
    println!(
        "\n{passed} passed, {failed} failed, {skipped} variants skipped on {}",
        device.info.id()
    );
    if failed > 0 {
        Err(Failure::Run(format!("{failed} checks failed")))
    } else {
        Ok(())
    }
}
