//! `nsa serve`: SGLang's `launch_server` for DeepSeek-V3.2 — an OpenAI-compatible server. Flags are named
//! as SGLang's where the meaning is the same; flags for features not built yet are refused with a message
//! rather than ignored.
use crate::{Failure, usage};
use clap::Args as ClapArgs;
use nsa_server::http::ToolCallParser;
use nsa_server::{KvFormat, ModelDevice, ServeConfig, WeightFormat};
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// A DeepSeek-V3.2 checkpoint directory (config.json, safetensors, tokenizer.json); default: the
    /// bundled tiny model.
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// Where tokenizer.json is (default: the model path), e.g. to serve a config-only directory with
    /// `--load-format dummy`.
    #[arg(long)]
    tokenizer_path: Option<PathBuf>,
    /// `auto` / `safetensors`: the checkpoint's weights; `dummy`: random weights of config.json's shapes
    /// made on the device (benchmarks at shapes with no checkpoint at hand; device models only).
    #[arg(long, default_value = "auto")]
    load_format: String,
    /// `auto` (a CUDA or HIP GPU if found, else the host — or wgpu with `--kv-cache-dtype bf16` or
    /// `fp8_e4m3`, or `--load-format dummy`, which the host reference cannot do), `host` (the f64 reference model on the CPU), or the burn device model
    /// (f32) on `cuda[:N]`, `hip[:N]`, `wgpu`.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 30000)]
    port: u16,
    /// The model name clients send and `/v1/models` lists; default: the model directory's name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// The longest sequence (prompt + output); default: the config's max_position_embeddings.
    #[arg(long)]
    context_length: Option<usize>,
    /// Tokens per KV cache page.
    #[arg(long, default_value_t = 64)]
    page_size: usize,
    /// Requests in the running batch at once (more wait).
    #[arg(long, default_value_t = 64)]
    max_running_requests: usize,
    /// Prompt tokens fed per scheduler step, over all requests in prefill.
    #[arg(long, default_value_t = 8192)]
    chunked_prefill_size: usize,
    /// KV cache capacity in tokens (pages × page size); default: context length × min(16, max running).
    #[arg(long)]
    max_total_tokens: Option<usize>,
    /// Do not reuse finished requests' cached prefixes.
    #[arg(long)]
    disable_radix_cache: bool,
    /// `deepseek-v3`: split `<think>…</think>` into reasoning_content.
    #[arg(long)]
    reasoning_parser: Option<String>,
    /// `deepseekv32` (DSML) or `deepseekv31` (special tokens): tool calls → OpenAI tool_calls.
    #[arg(long)]
    tool_call_parser: Option<String>,
    /// `flashmla_sparse` (nsa's sparse MLA prefill kernel) or `auto` (SGLang's ≤ 2048-token MHA rule).
    #[arg(long, default_value = "auto")]
    nsa_prefill_backend: String,
    /// `flashmla_sparse` (nsa's sparse MLA kernel over the latent cache; the only decode path built).
    #[arg(long, default_value = "flashmla_sparse")]
    nsa_decode_backend: String,
    /// `auto`: the cache in the model's dtype (f32 on a device, f64 on the host); `bf16` (or `bfloat16`):
    /// 576 bf16 values a token, half of f32, on a device; `fp8_e4m3`: DeepSeek's 656-byte FP8 rows (512 e4m3
    /// latent values, 4 scales, 64 bf16 rope) on a device.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Weights' dtype: `auto` / `float32`: f32 (exact; the host reference: f64); `bfloat16` (or `bf16`), on
    /// a device model: the routed experts and (where the device has bf16 GEMMs: CUDA, HIP) the linear
    /// layers but the router in bf16, f32 accumulation; norms, embeddings, attention and router stay f32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Tensor parallelism: only 1 is built.
    #[arg(long, alias = "tp-size", default_value_t = 1)]
    tp: usize,
    /// Data parallelism: only 1 is built.
    #[arg(long, alias = "dp-size", default_value_t = 1)]
    dp: usize,
    /// The fraction of the device's memory (the host's for `--device host`) for the weights and the KV
    /// cache together; the cache gets what the weights leave (ignored when --max-total-tokens is given).
    #[arg(long)]
    mem_fraction_static: Option<f64>,
    /// Not built: refused when given.
    #[arg(long)]
    enable_dp_attention: bool,
    /// Accepted for SGLang command-line compatibility; nsa runs no code from the checkpoint.
    #[arg(long)]
    trust_remote_code: bool,
}

fn not_built(flag: &str, why: &str) -> Failure {
    usage(format!("{flag} is not built yet in nsa serve: {why}"))
}

/// The device `auto` means for serving: a CUDA or HIP GPU, else the host (the f32 device model on a
/// software Vulkan adapter is slower than the host reference).
/// The model's device for `--device spec`; `needs_device`: the host reference cannot serve (an FP8 cache),
/// so `auto` falls back to wgpu rather than the host.
fn model_device(spec: &str, needs_device: bool) -> Result<ModelDevice, Failure> {
    match spec {
        "host" | "cpu" => Ok(ModelDevice::Host),
        "auto" => {
            let runtimes: &[&str] = if needs_device {
                &["cuda", "hip", "wgpu"]
            } else {
                &["cuda", "hip"]
            };
            for runtime in runtimes {
                if let Ok(found) = nsa_backends::select(Some(runtime)) {
                    return Ok(burn(found));
                }
            }
            Ok(ModelDevice::Host)
        }
        spec => {
            let found = nsa_backends::select(Some(spec)).map_err(usage)?;
            Ok(burn(found))
        }
    }
}

fn burn(found: nsa_backends::Device) -> ModelDevice {
    ModelDevice::Burn {
        id: found.info.id(),
        memory_bytes: found.info.memory_bytes,
    }
}

fn config(args: Args) -> Result<ServeConfig, Failure> {
    if args.tp != 1 {
        return Err(not_built("--tp", "one device per server"));
    }
    if args.dp != 1 || args.enable_dp_attention {
        return Err(not_built(
            "data parallelism (--dp, --enable-dp-attention)",
            "one device per server",
        ));
    }
    let kv_format = match args.kv_cache_dtype.as_str() {
        "auto" => KvFormat::F32,
        "bf16" | "bfloat16" => KvFormat::Bf16,
        "fp8_e4m3" => KvFormat::Fp8,
        other => {
            return Err(not_built(
                &format!("--kv-cache-dtype {other}"),
                "valid: auto (the model's dtype), bf16, fp8_e4m3 (both on device models)",
            ));
        }
    };
    let weight_format = match args.dtype.as_str() {
        "auto" | "float32" | "float" => WeightFormat::F32,
        "bfloat16" | "bf16" => WeightFormat::Bf16,
        other => {
            return Err(not_built(&format!("--dtype {other}"), "valid: auto, float32, bfloat16"));
        }
    };
    let dummy_weights = match args.load_format.as_str() {
        "auto" | "safetensors" => false,
        "dummy" => true,
        other => {
            return Err(not_built(
                &format!("--load-format {other}"),
                "valid: auto, safetensors, dummy",
            ));
        }
    };
    let sparse_prefill = match args.nsa_prefill_backend.as_str() {
        "auto" => None,
        "flashmla_sparse" => Some(true),
        other => {
            return Err(not_built(
                &format!("--nsa-prefill-backend {other}"),
                "valid: auto, flashmla_sparse",
            ));
        }
    };
    if args.nsa_decode_backend != "flashmla_sparse" {
        return Err(not_built(
            &format!("--nsa-decode-backend {}", args.nsa_decode_backend),
            "valid: flashmla_sparse",
        ));
    }
    let reasoning_parser = match args.reasoning_parser.as_deref() {
        None => false,
        Some("deepseek-v3") => true,
        Some(other) => return Err(usage(format!("--reasoning-parser {other}: valid: deepseek-v3"))),
    };
    let tool_call_parser = match args.tool_call_parser.as_deref() {
        None => None,
        Some("deepseekv32") => Some(ToolCallParser::Deepseekv32),
        Some("deepseekv31") => Some(ToolCallParser::Deepseekv31),
        Some(other) => {
            return Err(usage(format!(
                "--tool-call-parser {other}: valid: deepseekv32, deepseekv31"
            )));
        }
    };
    for (flag, value) in [
        ("--page-size", args.page_size),
        ("--max-running-requests", args.max_running_requests),
        ("--chunked-prefill-size", args.chunked_prefill_size),
    ] {
        if value == 0 {
            return Err(usage(format!("{flag} must be at least 1")));
        }
    }
    Ok(ServeConfig {
        model_path: args.model_path.unwrap_or_else(nsa_model::bundled_model_dir),
        tokenizer_path: args.tokenizer_path,
        dummy_weights,
        device: model_device(
            &args.device,
            kv_format != KvFormat::F32 || dummy_weights || weight_format != WeightFormat::F32,
        )?,
        weight_format,
        host: args.host,
        port: args.port,
        served_model_name: args.served_model_name,
        context_length: args.context_length,
        page_size: args.page_size,
        max_running_requests: args.max_running_requests,
        chunked_prefill_size: args.chunked_prefill_size,
        max_total_tokens: args.max_total_tokens,
        mem_fraction_static: args.mem_fraction_static,
        disable_radix_cache: args.disable_radix_cache,
        reasoning_parser,
        tool_call_parser,
        sparse_prefill,
        kv_format,
    })
}

pub fn run(args: Args) -> Result<(), Failure> {
    let config = config(args)?;
    let device = match &config.device {
        ModelDevice::Host => "host (f64 reference model)".to_string(),
        ModelDevice::Burn { id, .. } if config.weight_format == WeightFormat::Bf16 => {
            format!("{id} (burn device model, bf16 weights)")
        }
        ModelDevice::Burn { id, .. } => format!("{id} (burn device model, f32)"),
    };
    eprintln!("loading {} on {device}", config.model_path.display());
    nsa_server::serve(config, |address| {
        eprintln!("serving on http://{address} (OpenAI API under /v1; /health, /metrics); Ctrl-C stops");
    })
    .map_err(Failure::Run)
}
