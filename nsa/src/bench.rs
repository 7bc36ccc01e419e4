//! `nsa bench`: time kernel variants on a device; print time, TFLOP/s, GB/s and % of the roofline, and
//! beside them a PyTorch reference timed by `bench/torch_reference.py` on the same device.
use crate::{Failure, open_device, usage};
use nsa_kernels::tuning::{DeviceKey, Dispatch, config_label, default_variant};
use nsa_kernels::{Kernel, Problem, find_kernel, find_variant};
use rand::SeedableRng;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Kernel name (`nsa ir --list`).
    kernel: String,
    /// Variant, `all` (every variant the device supports) or `tuned` (the one --table picks per shape; the
    /// default variant without a table).
    #[arg(long, default_value = "all")]
    variant: String,
    /// A tuning table from `nsa autotune`: with `--variant tuned` it picks the variant; with `all`, each shape
    /// also prints the table's pick and the default.
    #[arg(long)]
    table: Option<std::path::PathBuf>,
    /// Override sizes of every bench shape, e.g. `--shape s_kv=8192 --shape s_q=1024`.
    #[arg(long = "shape", value_name = "DIM=SIZE")]
    shapes: Vec<String>,
    /// auto | cuda[:N] | hip[:N] | wgpu[:N]
    #[arg(long)]
    device: Option<String>,
    /// Time the PyTorch reference with this script (`python3 SCRIPT <kernel> dim=size ...`).
    #[arg(long)]
    torch: Option<String>,
    /// Peak TFLOP/s and GB/s of the device for % of roofline (default: measured H200 figures on sm_90).
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[arg(long)]
    peak_gbps: Option<f64>,
    /// Length of each timed batch of back-to-back launches, in ms (ours and the PyTorch reference alike).
    /// 200 keeps the GPU under sustained load (on the H200: at its power cap, 1300–1700 MHz); ~20 measures
    /// near full clock, as `nsa autotune` does.
    #[arg(long, default_value_t = 200.0)]
    batch_ms: f64,
}

/// FP8 tensor-core rate over bf16's as measured on the lent H200: `torch._scaled_mm` e4m3 at 8192³ ran
/// 1476 TFLOP/s against the bf16 matmul's 790 (the data sheet's ratio is 2).
const FP8_RATE: f64 = 1476.0 / 790.0;

/// Measured on the lent H200 (../shared/notes/platform-facts.md): bf16 matmul and device copy.
fn default_peaks(arch: &str) -> Option<(f64, f64)> {
    (arch == "sm_90").then_some((790.0, 4240.0))
}

fn problems(kernel: &dyn Kernel, overrides: &[String]) -> Result<Vec<Problem>, Failure> {
    let mut problems = kernel.bench_problems();
    for o in overrides {
        let Some((name, size)) = o.split_once('=').and_then(|(n, v)| Some((n, v.parse::<usize>().ok()?))) else {
            return Err(usage(format!("bad --shape `{o}`: expected DIM=SIZE")));
        };
        for problem in &mut problems {
            let Some(dim) = problem.dims.iter_mut().find(|(n, _)| *n == name) else {
                let valid: Vec<_> = problem.dims.iter().map(|(n, _)| *n).collect();
                return Err(usage(format!(
                    "{} has no dim `{name}`; dims: {}",
                    kernel.name(),
                    valid.join(", ")
                )));
            };
            dim.1 = size;
        }
    }
    problems.dedup();
    Ok(problems)
}

/// A `--batch-ms` value must be a positive number of milliseconds (a usage error otherwise).
pub(crate) fn check_batch_ms(batch_ms: f64) -> Result<(), Failure> {
    if batch_ms > 0.0 && batch_ms.is_finite() {
        Ok(())
    } else {
        Err(usage(format!(
            "--batch-ms must be a positive number of milliseconds, not {batch_ms}"
        )))
    }
}

/// The PyTorch reference's time per launch from `script`, timed in batches of about `batch_ms` like ours.
pub(crate) fn torch_ms(script: &str, kernel: &str, problem: &Problem, batch_ms: f64) -> Result<f64, String> {
    let mut args = vec![
        script.to_string(),
        kernel.to_string(),
        format!("dtype={}", problem.format),
        format!("batch_ms={batch_ms}"),
    ];
    args.extend(problem.dims.iter().map(|(n, v)| format!("{n}={v}")));
    let output = Command::new("python3")
        .args(&args)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("torch_ms="))
        .ok_or_else(|| {
            format!(
                "no torch_ms from {script}: {}",
                String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
            )
        })?;
    line["torch_ms=".len()..].trim().parse().map_err(|e| format!("{e}"))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let kernel = find_kernel(&args.kernel).map_err(usage)?;
    check_batch_ms(args.batch_ms)?;
    let tuned = args.variant == "tuned";
    let variants: Vec<_> = match args.variant.as_str() {
        "all" | "tuned" => kernel.variants().iter().collect(),
        name => vec![find_variant(kernel, name).map_err(usage)?],
    };
    let problems = problems(kernel, &args.shapes)?;
    let device = open_device(args.device.as_deref())?;
    let dispatch = match &args.table {
        Some(path) => {
            let (dispatch, warning) = Dispatch::load(path, &DeviceKey::of(&device.info));
            if let Some(warning) = warning {
                eprintln!("warning: {warning}");
            }
            dispatch
        }
        None => Dispatch::defaults(),
    };
    let peaks = match (args.peak_tflops, args.peak_gbps) {
        (Some(f), Some(b)) => Some((f, b)),
        _ => default_peaks(&device.info.arch),
    };
    println!(
        "bench {} on {} — {} ({})",
        kernel.name(),
        device.info.id(),
        device.info.name,
        device.info.arch
    );
    if let Some((f, b)) = peaks {
        println!(
            "roofline: {f} TFLOP/s (bf16 tensor-core peak; {:.0} for FP8 variants), {b} GB/s",
            f * FP8_RATE
        );
    }
    println!(
        "{:<14} {:<58} {:>10} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "variant", "shape", "time ms", "TFLOP/s", "GB/s", "roofline", "torch ms", "speedup"
    );
    let mut method_shown = false;
    for problem in &problems {
        eprintln!("preparing inputs for {problem} ...");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let inputs = kernel.random_inputs(problem, &mut rng);
        let torch = args
            .torch
            .as_deref()
            .map(|script| torch_ms(script, kernel.name(), problem, args.batch_ms));
        let pick = dispatch.choose(kernel, problem, device.features());
        if args.table.is_some()
            && let Some(pick) = &pick
        {
            let default = default_variant(kernel, problem, device.features()).map_or("-", |v| v.name);
            let params: Vec<(&str, f64)> = pick.params.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            let label = config_label(pick.variant.name, &params);
            println!("{problem}: {:?} pick {label} (default {default})", pick.choice);
        }
        // `tuned` times the pick with its parameters.
        let tuned_problem = pick.as_ref().filter(|_| tuned).map(|p| p.apply(problem));
        let problem = tuned_problem.as_ref().unwrap_or(problem);
        for variant in variants.iter().filter(|v| {
            kernel.supports(v, problem, device.features()).is_ok()
                && (!tuned || pick.as_ref().is_some_and(|p| p.variant.name == v.name))
        }) {
            let timing = nsa_kernels::bench::time(kernel, variant, &device, problem, &inputs, args.batch_ms)?;
            if !method_shown {
                println!(
                    "(times: median of ~{} ms batches of launches, measured by {})",
                    args.batch_ms, timing.method
                );
                method_shown = true;
            }
            let spec = kernel.spec(variant, problem);
            let seconds = timing.median_ms / 1e3;
            let (tflops, gbps) = (spec.flops as f64 / seconds / 1e12, spec.bytes as f64 / seconds / 1e9);
            let roofline = peaks.map_or("-".to_string(), |(f, b)| {
                let f = if kernel.fp8_math(variant) { f * FP8_RATE } else { f };
                let floor = (spec.flops as f64 / (f * 1e12)).max(spec.bytes as f64 / (b * 1e9));
                format!("{:.1}%", 100.0 * floor / seconds)
            });
            let (torch_col, speedup) = match &torch {
                Some(Ok(ms)) => (format!("{ms:.3}"), format!("{:.2}x", ms / timing.median_ms)),
                Some(Err(e)) => {
                    eprintln!("torch reference failed: {e}");
                    ("error".into(), "-".into())
                }
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<14} {:<58} {:>10.3} {:>9.2} {:>9.1} {:>9} {:>11} {:>9}",
                variant.name,
                problem.to_string(),
                timing.median_ms,
                tflops,
                gbps,
                roofline,
                torch_col,
                speedup
            );
        }
    }
    Ok(())
}
