//! `nsa forward` and `nsa generate` on DeepSeek-V3.2 checkpoints. Today they run the model's plain-Rust f64
//! reference on the host (`nsa_model::reference`; generation through its latent-cache decode path), which
//! reproduces Hugging Face's outputs; the device model (burn, nsa's kernels) is not built yet, so
//! `--dtype bf16` is refused rather than faked.
use crate::{Failure, usage};
use nsa_model::reference::ReferenceModel;
use nsa_model::tokenizer::IncrementalDecoder;
use nsa_model::{Tokenizer, bundled_model_dir};
use nsa_runtime::sampling::{Sampler, SamplingParams, StopMatcher};
use safetensors::{Dtype, tensor::TensorView};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json); default: the bundled tiny model.
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// safetensors file with `input_ids` [n] (I32 or I64).
    #[arg(long)]
    input_ids: PathBuf,
    /// Where to write logits, layer_out, layer{l}.index_topk and layer{l}.router_topk_ids.
    #[arg(long)]
    out: PathBuf,
    /// Compute precision: f32 (the host reference computes in f64 and writes f32), or bf16 (on the host:
    /// the reference with every activation rounded to bf16, as bf16 inference stores them; on a device:
    /// the model's large weights in bf16 as `nsa serve --dtype bfloat16` keeps them).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// `host` (the f64 reference model), or the burn device model (f32) on a device: `auto` (the best
    /// found), `cuda[:N]`, `hip[:N]`, `wgpu`.
    #[arg(long, default_value = "host")]
    device: String,
    /// The device model's prefill attention: `mha` (the MHA form under the indexer's mask), `sparse` (the
    /// absorbed form through nsa's sparse MLA kernel), `auto` (SGLang's rule: mha up to 2048 tokens).
    #[arg(long, default_value = "auto")]
    attention: String,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory; default: the bundled tiny model.
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// The text to continue (raw: no chat template is applied).
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample from the smallest set of tokens whose probability reaches top_p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than min_p × the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// `host` (the f64 reference model), or the burn device model (f32, its decode path over a latent cache
    /// on the device): `auto` (the best found), `cuda[:N]`, `hip[:N]`, `wgpu`.
    #[arg(long, default_value = "host")]
    device: String,
}

/// The burn device `spec` names, found and opened through nsa's discovery first: a missing runtime is an
/// error naming it, not burn's panic.
fn burn_device(spec: &str) -> Result<nsa_model::device::BurnDevice, Failure> {
    let found = nsa_backends::select(Some(spec)).map_err(|e| usage(e.to_string()))?;
    nsa_model::device::burn_device(&found.info.id()).map_err(usage)
}

/// One model's decode path: appends a token, returns its logits.
enum Decoder {
    Host(Box<ReferenceModel>, nsa_model::reference_decode::LatentCache),
    Device(
        Box<nsa_model::device::DeviceModel>,
        nsa_model::device_decode::DeviceCache,
    ),
}

impl Decoder {
    /// The prompt into the cache; the last position's logits. The device model runs one prefill, the
    /// host reference decodes it token by token.
    fn prompt(&mut self, ids: &[u32]) -> Vec<f64> {
        match self {
            Decoder::Host(..) => ids.iter().fold(Vec::new(), |_, id| self.step(*id)),
            Decoder::Device(model, cache) => {
                let (logits, filled) = model.prefill_prompt(ids);
                *cache = filled;
                logits
            }
        }
    }

    fn step(&mut self, id: u32) -> Vec<f64> {
        match self {
            Decoder::Host(model, cache) => model.decode_step(cache, id),
            Decoder::Device(model, cache) => model.decode_step(cache, id),
        }
    }
}

fn model_dir(path: &Option<PathBuf>) -> PathBuf {
    path.clone().unwrap_or_else(bundled_model_dir)
}

fn load(dir: &Path) -> Result<ReferenceModel, Failure> {
    eprintln!("loading {} (host f64 reference model)", dir.display());
    ReferenceModel::load(dir).map_err(usage)
}

fn read_ids(path: &Path) -> Result<Vec<u32>, Failure> {
    let bytes = std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| usage(format!("{}: not a safetensors file: {e:?}", path.display())))?;
    let view = file.tensor("input_ids").map_err(|_| {
        usage(format!(
            "{}: no tensor `input_ids` (expected [n] I32 or I64)",
            path.display()
        ))
    })?;
    if view.shape().len() != 1 || view.shape()[0] == 0 {
        return Err(usage(format!(
            "{}: `input_ids` has shape {:?}; expected [n], n ≥ 1",
            path.display(),
            view.shape()
        )));
    }
    let ids: Vec<i64> = match view.dtype() {
        Dtype::I32 => view
            .data()
            .chunks(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
            .collect(),
        Dtype::I64 => view
            .data()
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        other => {
            return Err(usage(format!(
                "{}: `input_ids` is {other:?}; expected I32 or I64",
                path.display()
            )));
        }
    };
    Ok(ids.into_iter().map(|id| id as u32).collect())
}

pub fn forward(args: ForwardArgs) -> Result<(), Failure> {
    let bf16 = match args.dtype.as_str() {
        "f32" => false,
        "bf16" => true,
        other => return Err(usage(format!("--dtype {other}: expected f32 or bf16"))),
    };
    use nsa_model::device::PrefillAttention;
    let attention = match args.attention.as_str() {
        "auto" => None,
        "mha" => Some(PrefillAttention::Mha),
        "sparse" => Some(PrefillAttention::Sparse),
        other => return Err(usage(format!("--attention {other}: expected mha, sparse or auto"))),
    };
    if attention.is_some() && args.device == "host" {
        return Err(usage("--attention chooses the device model's form: give --device too"));
    }
    let ids = read_ids(&args.input_ids)?;
    let dir = model_dir(&args.model_path);
    let burn_device = match args.device.as_str() {
        "host" => None,
        spec => Some(burn_device(spec)?),
    };
    type Prefill = Box<dyn Fn(&[u32]) -> nsa_model::reference::Forward>;
    let (config, prefill): (nsa_model::ModelConfig, Prefill) = match burn_device {
        None => {
            let mut model = load(&dir)?;
            model.bf16 = bf16;
            (model.config.clone(), Box::new(move |ids| model.forward(ids)))
        }
        Some(device) => {
            let weights = if bf16 { "bf16 weights" } else { "f32" };
            eprintln!(
                "loading {} (burn device model, {weights}, {})",
                dir.display(),
                args.device
            );
            let format = if bf16 {
                nsa_model::device::WeightFormat::Bf16
            } else {
                nsa_model::device::WeightFormat::F32
            };
            let mut model = nsa_model::device::DeviceModel::load(&dir, &device)
                .map_err(usage)?
                .with_weight_format(format);
            model.prefill_attention = attention;
            (model.config.clone(), Box::new(move |ids| model.forward(ids)))
        }
    };
    let c = &config;
    if let Some(bad) = ids.iter().find(|id| **id as usize >= c.vocab_size) {
        return Err(usage(format!(
            "input id {bad} is outside the vocabulary (size {})",
            c.vocab_size
        )));
    }
    let n = ids.len();
    let start = std::time::Instant::now();
    let mut out = prefill(&ids);
    let first = start.elapsed();
    // A second run shows the prefill's speed without the first run's kernel compilation.
    let start = std::time::Instant::now();
    if args.device != "host" {
        out = prefill(&ids);
    }
    let second = start.elapsed();
    eprintln!(
        "prefill of {n} tokens: first run {:.1} ms{}",
        first.as_secs_f64() * 1e3,
        if args.device == "host" {
            format!(" ({:.0} tokens/s)", n as f64 / first.as_secs_f64())
        } else {
            format!(
                ", second {:.1} ms ({:.0} tokens/s)",
                second.as_secs_f64() * 1e3,
                n as f64 / second.as_secs_f64()
            )
        }
    );
    let f32_bytes = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect() };
    let i32_bytes = |v: &[i32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        (
            "logits".into(),
            Dtype::F32,
            vec![n, c.vocab_size],
            f32_bytes(&out.logits),
        ),
        (
            "layer_out".into(),
            Dtype::F32,
            vec![c.num_hidden_layers, n, c.hidden_size],
            f32_bytes(&out.layer_out.concat()),
        ),
    ];
    for (l, keys) in out.index_topk.iter().enumerate() {
        tensors.push((
            format!("layer{l}.index_topk"),
            Dtype::I32,
            vec![n, c.index_topk],
            i32_bytes(keys),
        ));
        if let Some(ids) = &out.router_topk_ids[l] {
            tensors.push((
                format!("layer{l}.router_topk_ids"),
                Dtype::I32,
                vec![n, c.num_experts_per_tok],
                i32_bytes(ids),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &args.out).map_err(|e| format!("{}: {e:?}", args.out.display()))?;
    eprintln!(
        "wrote {} tensors for {n} tokens to {}",
        tensors.len(),
        args.out.display()
    );
    Ok(())
}

pub fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
    };
    params
        .validate()
        .map_err(|e| usage(format!("--{}", e.replacen('_', "-", 1))))?;
    let dir = model_dir(&args.model_path);
    let tokenizer = Tokenizer::load(&dir).map_err(usage)?;
    let (config, mut decoder) = if args.device == "host" {
        let model = load(&dir)?;
        let cache = model.new_cache();
        (model.config.clone(), Decoder::Host(Box::new(model), cache))
    } else {
        let device = burn_device(&args.device)?;
        eprintln!("loading {} (burn device model, f32, {})", dir.display(), args.device);
        let model = nsa_model::device::DeviceModel::load(&dir, &device).map_err(usage)?;
        let cache = model.new_cache();
        (model.config.clone(), Decoder::Device(Box::new(model), cache))
    };
    let mut ids = tokenizer.encode(&args.prompt)?;
    if ids.is_empty() {
        return Err(usage("--prompt encodes to no tokens"));
    }
    let prompt_len = ids.len();
    let vocab = config.vocab_size;
    let mut sampler = Sampler::new(Some(args.seed));
    let mut stops = StopMatcher::new(&args.stop);
    let mut stdout = std::io::stdout().lock();
    let mut show = |text: &str| {
        let _ = write!(stdout, "{text}");
        let _ = stdout.flush();
    };
    // The prompt into the latent cache, then one decode step per new token.
    let start = std::time::Instant::now();
    let mut logits = decoder.prompt(&ids);
    let prompt_time = start.elapsed();
    let start = std::time::Instant::now();
    let (mut text, mut stopped) = (IncrementalDecoder::default(), false);
    for step in 0..args.max_tokens {
        if step > 0 {
            logits = decoder.step(*ids.last().expect("a prompt"));
        }
        let next = sampler.sample(&logits[..vocab], &params, None).token;
        if !args.ignore_eos && config.eos_token_ids.contains(&next) {
            break;
        }
        ids.push(next);
        let piece = text.push(&tokenizer, next)?;
        if !piece.is_empty() {
            let (out, stop) = stops.push(&piece);
            show(&out);
            if stop {
                stopped = true;
                break;
            }
        }
    }
    if !stopped {
        let (out, stop) = stops.push(&text.pending(&tokenizer)?);
        show(&out);
        if !stop {
            show(&stops.finish());
        }
    }
    show("\n");
    let generated = ids.len() - prompt_len;
    eprintln!(
        "{generated} tokens generated; prompt {prompt_len} tokens in {:.0} ms, decode {:.1} tokens/s",
        prompt_time.as_secs_f64() * 1e3,
        generated.saturating_sub(1) as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
