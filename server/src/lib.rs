//! `nsa serve`: an OpenAI-compatible server (axum + tokio) over the serving runtime — the engine thread
//! runs the scheduler and the model (the host f64 reference or the burn device model), the handlers
//! encode chats in DeepSeek-V3.2's format and parse its output (reasoning, DSML / v3.1 tool calls).
pub mod api;
pub mod chat;
pub mod http;
pub mod metrics;
pub mod parsers;
pub mod text;
pub mod worker;

use http::{AppState, ServedModel, ToolCallParser};
use metrics::Metrics;
use nsa_model::device::DeviceModel;
pub use nsa_model::device::WeightFormat;
pub use nsa_model::paged::KvFormat;
use nsa_model::reference::ReferenceModel;
use nsa_model::{ModelConfig, Tokenizer};
use nsa_runtime::sampling::SamplingParams;
use nsa_runtime::scheduler::SchedulerConfig;
use std::path::PathBuf;
use std::sync::Arc;
use worker::WorkerConfig;

/// Where the model runs.
#[derive(Clone, Debug)]
pub enum ModelDevice {
    /// The f64 reference model on the CPU.
    Host,
    /// The burn device model (f32) on this device (`cuda:0`, `hip:0`, `wgpu`), checked by the caller, with
    /// its memory where the runtime reports it.
    Burn { id: String, memory_bytes: Option<u64> },
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model_path: PathBuf,
    /// Where tokenizer.json is (`None`: the model's directory).
    pub tokenizer_path: Option<PathBuf>,
    /// Random weights of the config's shapes instead of the checkpoint's (SGLang's `--load-format dummy`;
    /// device models only): benchmarks at shapes with no checkpoint at hand.
    pub dummy_weights: bool,
    pub device: ModelDevice,
    /// How a device model keeps its large weights (`--dtype`).
    pub weight_format: WeightFormat,
    pub host: String,
    pub port: u16,
    pub served_model_name: Option<String>,
    pub context_length: Option<usize>,
    pub page_size: usize,
    pub max_running_requests: usize,
    pub chunked_prefill_size: usize,
    pub max_total_tokens: Option<usize>,
    /// The fraction of the device's memory (the host's for the host model) for weights plus KV cache; the
    /// cache gets what the weights leave. `--max-total-tokens` wins when both are given.
    pub mem_fraction_static: Option<f64>,
    pub disable_radix_cache: bool,
    pub reasoning_parser: bool,
    pub tool_call_parser: Option<ToolCallParser>,
    /// The prefill's attention form on the device model (`None`: SGLang's rule).
    pub sparse_prefill: Option<bool>,
    /// How the KV cache keeps rows (`--kv-cache-dtype`: f32, bf16 or DeepSeek's FP8 layout; the narrow
    /// ones on device models only).
    pub kv_format: KvFormat,
}

/// generation_config.json's sampling defaults (temperature, top_p, top_k, min_p), where present.
pub fn sampling_defaults(dir: &std::path::Path) -> SamplingParams {
    let mut params = SamplingParams::default();
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return params;
    };
    let config: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if let Some(t) = config["temperature"].as_f64() {
        params.temperature = t;
    }
    if let Some(p) = config["top_p"].as_f64() {
        params.top_p = p;
    }
    if let Some(k) = config["top_k"].as_u64() {
        params.top_k = k as usize;
    }
    if let Some(p) = config["min_p"].as_f64() {
        params.min_p = p;
    }
    params
}

/// The host's memory (MemTotal of /proc/meminfo), where it can be read.
fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How many tokens the cache holds when weights and cache share `fraction` of the memory: weights are
/// kept as f32 on a device and f64 on the host. A device caches each token once per layer, in the pages
/// of its store (the KV row in its format's bytes, `KvFormat::row_bytes`: 576 f32 or bf16 values, or 656 FP8
/// bytes; and the f32 indexer key); the host reference keeps
/// latent, rope key and indexer key twice (the running sequence's cache and its page copies).
pub fn cache_tokens(config: &ModelConfig, device: &ModelDevice, kv: KvFormat, fraction: f64) -> Result<usize, String> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!("--mem-fraction-static must be in (0, 1], got {fraction}"));
    }
    let (memory, element) = match device {
        ModelDevice::Host => (host_memory(), 8),
        ModelDevice::Burn { memory_bytes, .. } => (*memory_bytes, 4),
    };
    let memory =
        memory.ok_or("--mem-fraction-static: this device does not report its memory; give --max-total-tokens")?;
    let weights: u64 = nsa_model::checkpoint::expected_tensors(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64 * element)
        .sum();
    let row_bytes = match device {
        ModelDevice::Host => 2 * (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * 8,
        ModelDevice::Burn { .. } => kv.row_bytes() + 4 * config.index_head_dim,
    };
    let per_token = (config.num_hidden_layers * row_bytes) as u64;
    let budget = (memory as f64 * fraction) as u64;
    if budget <= weights {
        return Err(format!(
            "--mem-fraction-static {fraction}: {:.2} GB of {:.2} GB leaves nothing for the cache after the weights ({:.2} GB)",
            budget as f64 / 1e9,
            memory as f64 / 1e9,
            weights as f64 / 1e9
        ));
    }
    Ok(((budget - weights) / per_token) as usize)
}

/// Loads the model `config.device` names, binds the port, serves until Ctrl-C. `ready` is called with the
/// bound address.
pub fn serve(config: ServeConfig, ready: impl FnOnce(std::net::SocketAddr)) -> Result<(), String> {
    let dir = config.model_path.clone();
    match &config.device {
        ModelDevice::Host if config.dummy_weights => {
            Err("--load-format dummy needs a device model (--device cuda, hip or wgpu)".into())
        }
        ModelDevice::Host if config.weight_format != WeightFormat::F32 => {
            Err("--dtype bfloat16 needs a device model (--device cuda, hip or wgpu)".into())
        }
        ModelDevice::Host => serve_model(
            config,
            move || ReferenceModel::load(&dir).map_err(|e| e.to_string()),
            ready,
        ),
        ModelDevice::Burn { id, .. } => {
            let (spec, sparse, dummy) = (id.clone(), config.sparse_prefill, config.dummy_weights);
            let weight_format = config.weight_format;
            let load = move || {
                let device = nsa_model::device::burn_device(&spec)?;
                let model = if dummy {
                    let shapes = ModelConfig::load(&dir).map_err(|e| e.to_string())?;
                    DeviceModel::dummy(shapes, &device, 0)
                } else {
                    DeviceModel::load(&dir, &device).map_err(|e| e.to_string())?
                };
                let mut model = model.with_weight_format(weight_format);
                model.prefill_attention = sparse.map(|sparse| {
                    if sparse {
                        nsa_model::device::PrefillAttention::Sparse
                    } else {
                        nsa_model::device::PrefillAttention::Mha
                    }
                });
                Ok(model)
            };
            serve_model(config, load, ready)
        }
    }
}

/// [`serve`] with the model `load` makes (on the engine's thread) instead of the one `config.device`
/// names; the config's model path still gives config.json, the tokenizer and generation defaults. Tests
/// serve scripted models through it.
pub fn serve_model<M, L>(config: ServeConfig, load: L, ready: impl FnOnce(std::net::SocketAddr)) -> Result<(), String>
where
    M: nsa_runtime::engine::CachedModel + 'static,
    L: FnOnce() -> Result<M, String> + Send + 'static,
{
    let dir = config.model_path.clone();
    let model_config = ModelConfig::load(&dir).map_err(|e| e.to_string())?;
    let tokenizer_dir = config.tokenizer_path.clone().unwrap_or(dir.clone());
    let tokenizer = Arc::new(Tokenizer::load(&tokenizer_dir).map_err(|e| e.to_string())?);
    let context_length = config.context_length.unwrap_or(model_config.max_position_embeddings);
    let total_tokens = match (config.max_total_tokens, config.mem_fraction_static) {
        (Some(tokens), _) => tokens,
        (None, Some(fraction)) => cache_tokens(&model_config, &config.device, config.kv_format, fraction)?,
        (None, None) => context_length * config.max_running_requests.min(16),
    };
    if total_tokens < context_length {
        eprintln!(
            "warning: the cache holds {total_tokens} tokens, fewer than the context length {context_length}: \
             longer requests are refused"
        );
    }
    eprintln!(
        "cache: {total_tokens} tokens in pages of {} (context length {context_length})",
        config.page_size
    );
    let worker_config = WorkerConfig {
        scheduler: SchedulerConfig {
            max_running: config.max_running_requests,
            chunked_prefill: config.chunked_prefill_size,
            context_length,
        },
        page_size: config.page_size,
        total_pages: total_tokens.div_ceil(config.page_size),
        prefix_reuse: !config.disable_radix_cache,
        kv_format: config.kv_format,
    };
    let metrics = Arc::new(Metrics::default());
    let worker = worker::start(load, worker_config, metrics.clone())?;
    let name = config.served_model_name.clone().unwrap_or_else(|| {
        let dir = dir.canonicalize().unwrap_or(dir.clone());
        dir.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let state = Arc::new(AppState {
        worker,
        tokenizer: tokenizer.clone(),
        metrics,
        model: ServedModel {
            name,
            context_length,
            vocab_size: model_config.vocab_size,
            eos_token_ids: model_config.eos_token_ids.clone(),
            defaults: sampling_defaults(&dir),
            reasoning_parser: config.reasoning_parser,
            tool_call_parser: config.tool_call_parser,
        },
        next_id: Default::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let address = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| format!("cannot listen on {address}: {e}"))?;
        ready(listener.local_addr().map_err(|e| e.to_string())?);
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| format!("server error: {e}"))
    })
}
