//! `nsa autotune`: measure every kernel variant on a grid of shape buckets on one device and write the
//! tuning table (`nsa_kernels::tuning`). Each variant is checked against its reference once first; results
//! are saved after every measurement, so Ctrl-C keeps them and a rerun resumes where the last one stopped.
use crate::{Failure, open_device, usage};
use nsa_kernels::tuning::{DeviceKey, TuningTable, config_label, kernel_version};
use nsa_kernels::{KERNELS, Kernel, Problem, Variant, bench, check, find_kernel};
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// auto | cuda[:N] | hip[:N] | wgpu[:N]
    #[arg(long)]
    device: Option<String>,
    /// Kernels to tune, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    kernels: Vec<String>,
    /// Shape buckets: `model` (the model's shapes, as `nsa bench`) or `tests` (the small test shapes).
    #[arg(long, default_value = "model")]
    grid: String,
    /// Stop measuring after this long (`90s`, `10m`, `1h`); a rerun continues.
    #[arg(long, default_value = "10m")]
    budget: String,
    /// The table to write (and resume).
    #[arg(long, default_value = "nsa-tuning.json")]
    out: PathBuf,
    /// Print the table at --out (fastest variant per bucket, and its gain over the default) and exit.
    #[arg(long)]
    show: bool,
    /// With --show: also draw each kernel's time per variant over its buckets into this SVG file.
    #[arg(long, requires = "show")]
    plot: Option<PathBuf>,
}

fn parse_budget(text: &str) -> Result<Duration, Failure> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let value: u64 = number
        .parse()
        .map_err(|_| usage(format!("bad --budget `{text}`: expected e.g. 90s, 10m, 1h")))?;
    let seconds = match unit {
        "s" | "" => value,
        "m" => value * 60,
        "h" => value * 3600,
        _ => return Err(usage(format!("bad --budget `{text}`: expected e.g. 90s, 10m, 1h"))),
    };
    Ok(Duration::from_secs(seconds))
}

fn describe_bucket(problem: &Problem) -> String {
    let dims: Vec<String> = problem.dims.iter().map(|(n, s)| format!("{n}={s}")).collect();
    format!("{} {}", problem.format, dims.join(" "))
}

fn show(path: &std::path::Path) -> Result<(), Failure> {
    use std::io::Write;
    let table = TuningTable::load(path).map_err(usage)?;
    // A closed pipe (`--show | head`) ends the listing quietly.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "tuning table {} for {}", path.display(), table.device);
    let _ = writeln!(
        out,
        "{:<20} {:<14} {:>10}  {:<14} {:>10}  gain  bucket",
        "kernel", "best", "ms", "default", "ms"
    );
    for entry in &table.entries {
        let kernel = find_kernel(&entry.kernel).ok();
        // The default is the family's first listed variant among those measured.
        let default = kernel.and_then(|k| k.variants().iter().find(|v| entry.times_ms.contains_key(v.name)));
        let best_ms = entry.times_ms.get(&entry.best).copied().unwrap_or(f64::NAN);
        let (default_name, default_ms) = default
            .map(|v| (v.name, entry.times_ms[v.name]))
            .unwrap_or(("-", f64::NAN));
        let bucket: Vec<String> = entry.bucket.iter().map(|(n, s)| format!("{n}={s}")).collect();
        let _ = writeln!(
            out,
            "{:<20} {:<14} {:>10.4}  {:<14} {:>10.4}  {:>4.2}x {} {}",
            entry.kernel,
            entry.best,
            best_ms,
            default_name,
            default_ms,
            default_ms / best_ms,
            entry.format,
            bucket.join(" ")
        );
    }
    Ok(())
}

pub fn run(args: Args) -> Result<(), Failure> {
    if args.show {
        show(&args.out)?;
        if let Some(plot) = &args.plot {
            let table = TuningTable::load(&args.out).map_err(usage)?;
            std::fs::write(plot, crate::plot::svg(&table))
                .map_err(|e| Failure::Run(format!("{}: {e}", plot.display())))?;
            eprintln!("plot written to {}", plot.display());
        }
        return Ok(());
    }
    let budget = parse_budget(&args.budget)?;
    let grid = match args.grid.as_str() {
        "model" | "tests" => args.grid.as_str(),
        other => return Err(usage(format!("unknown --grid `{other}`; valid grids: model, tests"))),
    };
    let kernels: Vec<&'static dyn Kernel> = if args.kernels.is_empty() {
        KERNELS.to_vec()
    } else {
        args.kernels
            .iter()
            .map(|k| find_kernel(k).map_err(usage))
            .collect::<Result<_, _>>()?
    };
    let device = open_device(args.device.as_deref())?;
    let key = DeviceKey::of(&device.info);
    let mut table = if args.out.exists() {
        TuningTable::load_for(&args.out, &key).map_err(|e| usage(format!("{e}; choose another --out")))?
    } else {
        TuningTable::new(key.clone())
    };

    // The work: every (kernel, configuration, bucket) the device supports and the table lacks. A
    // configuration is a variant with the problem's own parameters (the fixed rule), or with one tunable
    // parameter set to one of its candidate values.
    let mut work: Vec<(&'static dyn Kernel, String, &'static Variant, Problem, String)> = Vec::new();
    for &kernel in &kernels {
        let version = kernel_version(kernel);
        let buckets = if grid == "model" {
            kernel.bench_problems()
        } else {
            kernel.problems()
        };
        for problem in buckets {
            for variant in kernel.variants() {
                if kernel.supports(variant, &problem, device.features()).is_err() {
                    continue;
                }
                let mut configs = vec![(config_label(variant.name, &[]), problem.clone())];
                for (name, values) in kernel.tunable_params(variant) {
                    for value in values.iter() {
                        let mut tuned = problem.clone();
                        tuned.set_param(name, *value);
                        configs.push((config_label(variant.name, &[(name, *value)]), tuned));
                    }
                }
                for (label, config) in configs {
                    let done = table
                        .entry_mut(kernel.name(), &version, &problem)
                        .is_some_and(|e| e.times_ms.contains_key(&label));
                    if !done {
                        work.push((kernel, version.clone(), variant, config, label));
                    }
                }
            }
        }
    }
    eprintln!(
        "autotune on {} ({}): {} measurements to make, budget {:?}, table {}",
        device.info.id(),
        key,
        work.len(),
        budget,
        args.out.display()
    );
    let start = Instant::now();
    let mut checked: Vec<(String, String)> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    for (done, (kernel, version, variant, problem, label)) in work.iter().enumerate() {
        if start.elapsed() > budget {
            eprintln!(
                "budget reached after {done} of {} measurements; the table keeps them, run again to continue",
                work.len()
            );
            return Ok(());
        }
        // Correctness once per configuration, on the family's first test shape it supports.
        let id = (kernel.name().to_string(), label.clone());
        if !checked.contains(&id) {
            let test = kernel
                .problems()
                .into_iter()
                .find(|p| kernel.supports(variant, p, device.features()).is_ok());
            if let Some(mut test) = test {
                for (name, value) in &problem.params {
                    if kernel.tunable_params(variant).iter().any(|(n, _)| n == name) {
                        test.set_param(name, *value);
                    }
                }
                let result = check::check(*kernel, variant, &device, &test, 2026)?;
                if !result.passed() {
                    return Err(Failure::Run(format!(
                        "{}/{label} fails its reference check (max error {:e}); not tuning with it",
                        kernel.name(),
                        result.max_error
                    )));
                }
            }
            checked.push(id);
        }
        let inputs = kernel.random_inputs(problem, &mut rng);
        let timing = bench::time(*kernel, variant, &device, problem, &inputs, 20.0)?;
        // Entries are keyed by the bucket's dims, so a configuration's parameters never split them.
        let entry = table.entry_or_insert(kernel.name(), version, problem);
        entry.times_ms.insert(label.clone(), timing.median_ms);
        entry.best = entry
            .times_ms
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        table.save(&args.out).map_err(|e| Failure::Run(e.to_string()))?;
        let elapsed = start.elapsed().as_secs_f64();
        let eta = elapsed / (done + 1) as f64 * (work.len() - done - 1) as f64;
        eprintln!(
            "[{}/{}] {} {} {}: {:.4} ms  (elapsed {:.0}s, ETA {:.0}s)",
            done + 1,
            work.len(),
            kernel.name(),
            label,
            describe_bucket(problem),
            timing.median_ms,
            elapsed,
            eta
        );
    }
    eprintln!(
        "done: {} entries in {}; `nsa autotune --show --out {}` prints them",
        table.entries.len(),
        args.out.display(),
        args.out.display()
    );
    Ok(())
}
