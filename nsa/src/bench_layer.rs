//! `nsa bench-layer`: one DeepSeek-V3.2 decoder layer's prefill or decode step as nsa's kernel launches
//! (`nsa_kernels::layer_plan`), timed step by step on a device at each context length, with the time split
//! into projections, indexer, top-k, attention and MoE, and beside each step the PyTorch reference of the
//! same computation (`bench/torch_reference.py`).
use crate::autotune::pick;
use crate::{Failure, open_device, usage};
use nsa_dsl::Format;
use nsa_kernels::bench;
use nsa_kernels::layer_plan::{GROUPS, LayerShape, decode_layer, prefill_layer};
use nsa_kernels::tuning::{DeviceKey, TuningTable, kernel_version};
use rand::SeedableRng;
use std::collections::BTreeMap;

/// Batch length of each step's timing, ours and PyTorch's (short: a layer has ~20 steps per context).
const BATCH_MS: f64 = 20.0;

#[derive(clap::Args)]
pub struct Args {
    /// `prefill` (a chunk of --tokens new tokens) or `decode` (one step of --batch sequences over paged
    /// FP8 caches).
    #[arg(long, default_value = "prefill")]
    phase: String,
    /// New tokens per prefill chunk.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Sequences per decode step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Context lengths (tokens already in the cache, the chunk's included), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072")]
    contexts: Vec<usize>,
    /// Layer dimensions: `v32` (DeepSeek-V3.2's) or `small` (the same structure, small enough for a
    /// software device).
    #[arg(long, default_value = "v32")]
    shape: String,
    /// auto | cuda[:N] | hip[:N] | wgpu[:N]
    #[arg(long)]
    device: Option<String>,
    /// A tuning table from `nsa autotune`: each step runs the variant it picks.
    #[arg(long)]
    table: Option<std::path::PathBuf>,
    /// Time each step's PyTorch reference with this script (`python3 SCRIPT <kernel> dim=size ...`).
    #[arg(long)]
    torch: Option<String>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let shape = LayerShape::ALL
        .into_iter()
        .find(|s| s.name == args.shape)
        .ok_or_else(|| usage(format!("unknown --shape `{}`; valid: v32, small", args.shape)))?;
    let decode = match args.phase.as_str() {
        "prefill" => false,
        "decode" => true,
        other => return Err(usage(format!("unknown --phase `{other}`; valid: prefill, decode"))),
    };
    // Tokens a layer pass produces: the prefill chunk, or one per decoded sequence.
    let tokens = if decode { args.batch } else { args.tokens };
    if tokens == 0 || (!decode && args.contexts.iter().any(|&c| c < args.tokens)) {
        return Err(usage(
            "--tokens / --batch must be ≥ 1 and every prefill context at least --tokens long",
        ));
    }
    let device = open_device(args.device.as_deref())?;
    let table = match &args.table {
        Some(path) => Some(TuningTable::load_for(path, &DeviceKey::of(&device.info)).map_err(usage)?),
        None => None,
    };
    // bf16 where the device computes in it (the model's format), f32 elsewhere.
    let format = if device.features().bf16 {
        Format::Bf16
    } else {
        Format::F32
    };
    println!(
        "bench-layer {} {} on {} — {} ({}), {format}, {}",
        shape.name,
        args.phase,
        device.info.id(),
        device.info.name,
        device.info.arch,
        if decode {
            format!("a decode step of {tokens} sequences")
        } else {
            format!("{tokens} new tokens per prefill")
        }
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut versions = BTreeMap::new();
    // Steps that do not depend on the context are measured once: (name) → (ms, torch ms).
    let mut once: BTreeMap<&str, (f64, Option<f64>)> = BTreeMap::new();
    for &context in &args.contexts {
        println!("\ncontext {context}:");
        println!(
            "{:<12} {:<16} {:<18} {:>10} {:>9} {:>10} {:>8}",
            "group", "step", "variant", "ms", "TFLOP/s", "torch ms", "speedup"
        );
        let mut groups: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        let mut torch_complete = args.torch.is_some();
        let steps = if decode {
            decode_layer(&shape, format, tokens, context)
        } else {
            prefill_layer(&shape, format, tokens, context)
        };
        for step in steps {
            let kernel = step.step.kernel;
            let version = versions.entry(kernel.name()).or_insert_with(|| kernel_version(kernel));
            let (variant, problem) = pick(table.as_ref(), version, kernel, &step.step.problem, &device)
                .map_err(|e| Failure::Run(format!("{}: {e}", step.name)))?;
            let (ms, torch) = match once.get(step.name).filter(|_| !step.per_context) {
                Some(measured) => *measured,
                None => {
                    let inputs = kernel.random_inputs(&problem, &mut rng);
                    let ms = bench::time(kernel, variant, &device, &problem, &inputs, BATCH_MS)?.median_ms;
                    drop(inputs);
                    let torch = args.torch.as_deref().and_then(|script| {
                        crate::bench::torch_ms(script, kernel.name(), &problem, BATCH_MS)
                            .map_err(|e| eprintln!("torch reference of {} failed: {e}", step.name))
                            .ok()
                    });
                    if !step.per_context {
                        once.insert(step.name, (ms, torch));
                    }
                    (ms, torch)
                }
            };
            torch_complete &= torch.is_some();
            let group = groups.entry(step.group).or_default();
            group.0 += ms;
            group.1 += torch.unwrap_or(0.0);
            let tflops = kernel.flops(&problem) as f64 / (ms * 1e-3) / 1e12;
            let (torch_col, speedup) = match torch {
                Some(t) => (format!("{t:.3}"), format!("{:.2}x", t / ms)),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<12} {:<16} {:<18} {ms:>10.3} {tflops:>9.2} {torch_col:>10} {speedup:>8}",
                step.group, step.name, variant.name
            );
        }
        let total: f64 = groups.values().map(|g| g.0).sum();
        let torch_total: f64 = groups.values().map(|g| g.1).sum();
        println!("split:");
        for name in GROUPS {
            let (ms, torch) = groups.get(name).copied().unwrap_or_default();
            let torch = if torch_complete {
                format!("  torch {torch:.3} ms")
            } else {
                String::new()
            };
            println!("  {name:<12} {ms:>10.3} ms  {:>5.1}%{torch}", 100.0 * ms / total);
        }
        let torch = if torch_complete {
            format!("; torch {torch_total:.3} ms ({:.2}x)", torch_total / total)
        } else {
            String::new()
        };
        println!(
            "  layer        {total:>10.3} ms  = {:.0} tokens/s per layer{torch}",
            tokens as f64 / (total * 1e-3)
        );
    }
    Ok(())
}
