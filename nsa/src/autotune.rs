//! `nsa autotune`: measure every kernel variant on a grid of shape buckets on one device and write the
//! tuning table (`nsa_kernels::tuning`). Each variant is checked against its reference once first; results
//! are saved after every measurement, so Ctrl-C keeps them and a rerun resumes where the last one stopped.
use crate::{Failure, open_device, usage};
use nsa_kernels::strategy::{STRATEGIES, Strategy, find_strategy, strategy_version, table_name};
use nsa_kernels::tuning::{
    DEFAULT_BATCH_MS, DeviceKey, TuningTable, config_label, default_variant, kernel_version, parse_label,
};
use nsa_kernels::{KERNELS, Kernel, Problem, Variant, bench, check, find_kernel};
use rand::SeedableRng;
use std::collections::HashMap;
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
    /// Measure every configuration at every bucket. Without it, a configuration measured past 5× the best
    /// at another bucket of its kernel is not measured again (the portable fallbacks at model sizes take
    /// seconds per launch and cannot win).
    #[arg(long)]
    exhaustive: bool,
    /// Length of each timed batch of back-to-back launches, in ms (default 20, near the GPU's full clock;
    /// 200 measures under the sustained load that reaches its power cap, as serving runs). The table
    /// records it; a resumed table keeps its own, and another value is an error.
    #[arg(long)]
    batch_ms: Option<f64>,
}

/// Past this many times the best of its bucket a configuration cannot win there.
const HOPELESS: f64 = 5.0;
/// A launch slower than this is timed once (host clock): repeats would not change the decision.
const TIME_ONCE_MS: f64 = 1000.0;

/// Another bucket of `kernel` where `label` was measured past [`HOPELESS`]× that bucket's best: (bucket,
/// ratio).
fn hopeless_elsewhere(table: &TuningTable, kernel: &str, version: &str, label: &str) -> Option<(String, f64)> {
    table
        .entries
        .iter()
        .filter(|e| e.kernel == kernel && e.version == version)
        .find_map(|e| {
            let best = e.times_ms.values().copied().min_by(f64::total_cmp)?;
            let ratio = e.times_ms.get(label)? / best;
            (ratio > HOPELESS).then(|| {
                let dims: Vec<String> = e.bucket.iter().map(|(n, s)| format!("{n}={s}")).collect();
                (dims.join(" "), ratio)
            })
        })
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
    let _ = writeln!(
        out,
        "tuning table {} for {}, timed in {} ms batches of launches",
        path.display(),
        table.device,
        table.batch_ms
    );
    let _ = writeln!(
        out,
        "{:<30} {:<16} {:>10}  {:<16} {:>10}  gain  bucket",
        "kernel", "best", "ms", "default/rule", "ms"
    );
    // The versions this build's kernels have: entries measured on other code are kept in the file but
    // ignored by dispatch, and a rerun of `nsa autotune` re-measures them.
    let mut versions: HashMap<String, Option<String>> = HashMap::new();
    let mut stale = 0;
    for entry in &table.entries {
        let current = versions
            .entry(entry.kernel.clone())
            .or_insert_with(|| match find_strategy(&entry.kernel) {
                Some(strategy) => Some(strategy_version(strategy)),
                None => find_kernel(&entry.kernel).ok().map(kernel_version),
            });
        let is_stale = current.as_deref() != Some(entry.version.as_str());
        stale += usize::from(is_stale);
        // The default is the family's first listed variant among those measured; for a strategy, the
        // option SGLang's rule picks at that bucket.
        let (default_name, default_ms) = match find_strategy(&entry.kernel) {
            Some(strategy) => {
                let option = strategy.rule(&shape_of(strategy, entry));
                (option, entry.times_ms.get(option).copied().unwrap_or(f64::NAN))
            }
            None => find_kernel(&entry.kernel)
                .ok()
                .and_then(|k| k.variants().iter().find(|v| entry.times_ms.contains_key(v.name)))
                .map(|v| (v.name, entry.times_ms[v.name]))
                .unwrap_or(("-", f64::NAN)),
        };
        let best_ms = entry.times_ms.get(&entry.best).copied().unwrap_or(f64::NAN);
        let bucket: Vec<String> = entry.bucket.iter().map(|(n, s)| format!("{n}={s}")).collect();
        let overrides = if is_stale {
            "  (stale: measured on older code, ignored)"
        } else if entry.kernel.starts_with("strategy:") && entry.best != default_name {
            "  (overrides the rule)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{:<30} {:<16} {:>10.4}  {:<16} {:>10.4}  {:>4.2}x {} {}{overrides}",
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
    for strategy in STRATEGIES {
        let _ = writeln!(out, "rule of {}: {}", table_name(*strategy), strategy.rule_text());
    }
    if stale > 0 {
        let _ = writeln!(
            out,
            "{stale} of {} entries are stale (their kernel changed since); `nsa autotune --out {}` on this device \
             re-measures them",
            table.entries.len(),
            path.display()
        );
    }
    Ok(())
}

/// A strategy entry's shape: the strategy's bucket dims at the entry's sizes.
fn shape_of(strategy: &dyn Strategy, entry: &nsa_kernels::tuning::Entry) -> Problem {
    let mut shape = strategy.grid(false).remove(0);
    for (name, size) in &mut shape.dims {
        *size = entry.bucket.get(*name).copied().unwrap_or(*size);
    }
    shape
}

/// One measurement to make.
enum Job {
    /// A kernel variant (with tuned parameters) at a bucket.
    Kernel {
        kernel: &'static dyn Kernel,
        version: String,
        variant: &'static Variant,
        problem: Problem,
        label: String,
    },
    /// A strategy's option at a bucket.
    Strategy {
        strategy: &'static dyn Strategy,
        version: String,
        shape: Problem,
        option: &'static str,
    },
}

type Selection = (Vec<&'static dyn Kernel>, Vec<&'static dyn Strategy>);

/// `--kernels`: kernel and strategy names (`nsa_prefill_backend` or `strategy:nsa_prefill_backend`); all
/// of both when empty.
fn selection(names: &[String]) -> Result<Selection, Failure> {
    if names.is_empty() {
        return Ok((KERNELS.to_vec(), STRATEGIES.to_vec()));
    }
    let (mut kernels, mut strategies) = (Vec::new(), Vec::new());
    for name in names {
        if let Some(strategy) = find_strategy(name) {
            strategies.push(strategy);
        } else {
            kernels.push(find_kernel(name).map_err(|e| {
                let names: Vec<&str> = STRATEGIES.iter().map(|s| s.name()).collect();
                usage(format!("{e}; strategies: {}", names.join(", ")))
            })?);
        }
    }
    Ok((kernels, strategies))
}

/// Correctness once per configuration, on the family's first test shape it supports (with the
/// configuration's tuned parameters).
fn check_once(
    checked: &mut Vec<(String, String)>,
    kernel: &'static dyn Kernel,
    variant: &'static Variant,
    problem: &Problem,
    label: &str,
    device: &nsa_backends::Device,
) -> Result<(), Failure> {
    let id = (kernel.name().to_string(), label.to_string());
    if checked.contains(&id) {
        return Ok(());
    }
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
        let result = check::check(kernel, variant, device, &test, 2026)?;
        if !result.passed() {
            return Err(Failure::Run(format!(
                "{}/{label} fails its reference check (max error {:e}); not tuning with it",
                kernel.name(),
                result.max_error
            )));
        }
    }
    checked.push(id);
    Ok(())
}

/// A strategy option's time at `shape`: the sum of its steps' median times, each step on the variant the
/// table measured fastest for it so far (the default variant otherwise).
#[allow(clippy::too_many_arguments)]
fn time_plan(
    versions: &mut std::collections::BTreeMap<&'static str, String>,
    table: &TuningTable,
    strategy: &dyn Strategy,
    option: &str,
    shape: &Problem,
    device: &nsa_backends::Device,
    batch_ms: f64,
    rng: &mut rand::rngs::StdRng,
) -> Result<f64, Failure> {
    let mut total = 0.0;
    for step in strategy.plan(option, shape) {
        let (kernel, problem) = (step.kernel, step.problem);
        let version = versions.entry(kernel.name()).or_insert_with(|| kernel_version(kernel));
        let (variant, problem) = pick(Some(table), version, kernel, &problem, device)
            .map_err(|e| Failure::Run(format!("{}: {e}", strategy.name())))?;
        let inputs = kernel.random_inputs(&problem, rng);
        total += bench::time(kernel, variant, device, &problem, &inputs, batch_ms)?.median_ms;
    }
    Ok(total)
}

/// The variant (with its tuned parameters) that runs `problem`: the table's fastest at the nearest
/// bucket where the device runs it, else the default variant.
pub fn pick(
    table: Option<&TuningTable>,
    version: &str,
    kernel: &'static dyn Kernel,
    problem: &Problem,
    device: &nsa_backends::Device,
) -> Result<(&'static Variant, Problem), String> {
    let picked = table
        .and_then(|t| t.choose(kernel.name(), version, problem))
        .map(parse_label)
        .and_then(|(name, params)| {
            let variant = kernel.variants().iter().find(|v| v.name == name)?;
            kernel.supports(variant, problem, device.features()).ok()?;
            let mut tuned = problem.clone();
            for (n, v) in params {
                tuned.set_param(&n, v);
            }
            Some((variant, tuned))
        });
    match picked {
        Some(pick) => Ok(pick),
        None => default_variant(kernel, problem, device.features())
            .map(|variant| (variant, problem.clone()))
            .ok_or_else(|| format!("no variant of {} runs {problem} on this device", kernel.name())),
    }
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
    if let Some(batch_ms) = args.batch_ms {
        crate::bench::check_batch_ms(batch_ms)?;
    }
    let (kernels, strategies) = selection(&args.kernels)?;
    let device = open_device(args.device.as_deref())?;
    let key = DeviceKey::of(&device.info);
    let mut table = if args.out.exists() {
        let table = TuningTable::load_for(&args.out, &key).map_err(|e| usage(format!("{e}; choose another --out")))?;
        if let Some(batch_ms) = args.batch_ms.filter(|&ms| ms != table.batch_ms) {
            return Err(usage(format!(
                "{} was measured in {} ms batches, not {batch_ms}: resume it without --batch-ms (or with \
                 --batch-ms {}), or choose another --out",
                args.out.display(),
                table.batch_ms,
                table.batch_ms
            )));
        }
        table
    } else {
        TuningTable {
            batch_ms: args.batch_ms.unwrap_or(DEFAULT_BATCH_MS),
            ..TuningTable::new(key.clone())
        }
    };
    let batch_ms = table.batch_ms;

    // The work: every (kernel, configuration, bucket) the device supports and the table lacks. A
    // configuration is a variant with the problem's own parameters (the fixed rule), or with one tunable
    // parameter set to one of its candidate values. Then every strategy option at every bucket (after the
    // kernels, so its steps run on their tuned variants).
    let mut work: Vec<Job> = Vec::new();
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
                        work.push(Job::Kernel {
                            kernel,
                            version: version.clone(),
                            variant,
                            problem: config,
                            label,
                        });
                    }
                }
            }
        }
    }
    for &strategy in &strategies {
        let version = strategy_version(strategy);
        for shape in strategy.grid(grid == "tests") {
            for option in strategy.options() {
                let done = table
                    .entry_mut(&table_name(strategy), &version, &shape)
                    .is_some_and(|e| e.times_ms.contains_key(*option));
                if !done {
                    work.push(Job::Strategy {
                        strategy,
                        version: version.clone(),
                        shape: shape.clone(),
                        option,
                    });
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
    let mut inputs: Option<((&str, String), Vec<nsa_backends::cubecl::server::Handle>)> = None;
    let mut versions = std::collections::BTreeMap::new();
    let mut skipped = 0;
    for (done, job) in work.iter().enumerate() {
        if start.elapsed() > budget {
            eprintln!(
                "budget reached after {done} of {} measurements; the table keeps them, run again to continue",
                work.len()
            );
            return Ok(());
        }
        let (name, version, bucket, label, ms) = match job {
            Job::Kernel {
                kernel,
                version,
                variant,
                problem,
                label,
            } => {
                if !args.exhaustive
                    && let Some((other, ratio)) = hopeless_elsewhere(&table, kernel.name(), version, label)
                {
                    eprintln!(
                        "[{}/{}] {} {label} {}: skipped, {ratio:.0}× the best at {other} (--exhaustive measures it)",
                        done + 1,
                        work.len(),
                        kernel.name(),
                        describe_bucket(problem)
                    );
                    skipped += 1;
                    continue;
                }
                check_once(&mut checked, *kernel, variant, problem, label, &device)?;
                // Variants at one bucket share inputs, drawn and copied to the device once (model-sized
                // ones take seconds to draw and to copy).
                let key = (kernel.name(), describe_bucket(problem));
                if inputs.as_ref().is_none_or(|(k, _)| *k != key) {
                    drop(inputs.take()); // free the last bucket's buffers before making the next
                    let data = kernel.random_inputs(problem, &mut rng);
                    inputs = Some((key, bench::upload(&device, &data)));
                }
                let handles = &inputs.as_ref().expect("just drawn").1;
                // Past 5× the bucket's best so far a variant cannot win, and past a second repeats change
                // nothing: one launch is enough.
                let best = table
                    .entry_mut(kernel.name(), version, problem)
                    .and_then(|e| e.times_ms.values().copied().min_by(f64::total_cmp))
                    .unwrap_or(f64::INFINITY);
                let give_up = (HOPELESS * best).min(TIME_ONCE_MS);
                let timing = bench::time_uploaded(*kernel, variant, &device, problem, handles, batch_ms, give_up)?;
                (
                    kernel.name().to_string(),
                    version,
                    problem,
                    label.clone(),
                    timing.median_ms,
                )
            }
            Job::Strategy {
                strategy,
                version,
                shape,
                option,
            } => {
                let ms = time_plan(
                    &mut versions,
                    &table,
                    *strategy,
                    option,
                    shape,
                    &device,
                    batch_ms,
                    &mut rng,
                )?;
                (table_name(*strategy), version, shape, option.to_string(), ms)
            }
        };
        // Entries are keyed by the bucket's dims, so a configuration's parameters never split them.
        let entry = table.entry_or_insert(&name, version, bucket);
        entry.times_ms.insert(label.clone(), ms);
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
            "[{}/{}] {name} {label} {}: {ms:.4} ms  (elapsed {elapsed:.0}s, ETA {eta:.0}s)",
            done + 1,
            work.len(),
            describe_bucket(bucket),
        );
    }
    eprintln!(
        "done: {} entries in {} ({skipped} hopeless configurations skipped); `nsa autotune --show --out {}` prints them",
        table.entries.len(),
        args.out.display(),
        args.out.display()
    );
    Ok(())
}
