//! A scripted model for serving tests: it answers every prompt with a fixed text, so that what the tiny
//! random checkpoint never writes (tool calls in DeepSeek's formats, long answers to cancel) goes through
//! the real server. Used by `tests/serve_scripted.rs` and the `nsa-scripted-server` binary (driven by
//! OpenAI's Python client in `scripts/test-clients.sh`).
use nsa_model::bundled_model_dir;
use nsa_model::paged::KvFormat;
use nsa_model::{ModelConfig, Tokenizer};
use nsa_runtime::engine::CachedModel;
use nsa_runtime::pages::PageId;
use nsa_server::http::ToolCallParser;
use nsa_server::{ModelDevice, ServeConfig, WeightFormat};
use std::net::SocketAddr;
use std::time::Duration;

/// Answers every prompt with `script` (token ids), then end of sequence; each step takes `step_time`.
struct Scripted {
    script: Vec<u32>,
    eos: u32,
    vocab: usize,
    step_time: Duration,
}

/// A sequence's progress: tokens seen, of which the prompt (the first step's tokens).
#[derive(Clone, Default)]
struct Progress {
    len: usize,
    prompt: usize,
}

impl CachedModel for Scripted {
    type Cache = Progress;
    type Store = ();
    const PAGED: bool = false;
    fn new_store(&self, _: usize, _: KvFormat) -> Result<(), String> {
        Ok(())
    }
    fn empty_cache(&self) -> Progress {
        Progress::default()
    }
    fn cache_len(cache: &Progress) -> usize {
        cache.len
    }
    fn in_pages(_: &[PageId], _: usize) -> Progress {
        unreachable!("a per-sequence model")
    }
    fn slice(cache: &Progress, start: usize, end: usize) -> Progress {
        Progress {
            len: end - start,
            prompt: cache.prompt.min(end) - cache.prompt.min(start),
        }
    }
    fn concat(parts: &[Progress]) -> Progress {
        Progress {
            len: parts.iter().map(|p| p.len).sum(),
            prompt: parts.iter().map(|p| p.prompt).sum(),
        }
    }
    fn run_step(&self, _: &mut (), caches: &mut [&mut Progress], tokens: &[&[u32]]) -> Vec<Vec<f64>> {
        std::thread::sleep(self.step_time);
        caches
            .iter_mut()
            .zip(tokens)
            .map(|(cache, tokens)| {
                if cache.len == 0 {
                    cache.prompt = tokens.len();
                }
                cache.len += tokens.len();
                let next = self.script.get(cache.len - cache.prompt).copied().unwrap_or(self.eos);
                let mut logits = vec![0.0; self.vocab];
                logits[next as usize] = 30.0;
                logits
            })
            .collect()
    }
}

/// Serves `text` as every answer (through `parser`) on `port` (0: a free one) until the process ends;
/// `ready` gets the bound address.
pub fn serve_script(
    text: &str,
    parser: Option<ToolCallParser>,
    step_time: Duration,
    port: u16,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let dir = bundled_model_dir();
    let tokenizer = Tokenizer::load(&dir).expect("tokenizer");
    let config = ModelConfig::load(&dir).expect("config");
    let model = Scripted {
        script: tokenizer.encode(text).expect("encodes"),
        eos: config.eos_token_ids[0],
        vocab: config.vocab_size,
        step_time,
    };
    let serve = ServeConfig {
        model_path: dir,
        tokenizer_path: None,
        dummy_weights: false,
        device: ModelDevice::Host,
        weight_format: WeightFormat::F32,
        host: "127.0.0.1".into(),
        port,
        served_model_name: Some("scripted".into()),
        context_length: Some(2048),
        page_size: 16,
        max_running_requests: 8,
        chunked_prefill_size: 2048,
        max_total_tokens: Some(8192),
        mem_fraction_static: None,
        disable_radix_cache: true,
        reasoning_parser: false,
        tool_call_parser: parser,
        sparse_prefill: None,
        kv_format: Default::default(),
    };
    nsa_server::serve_model(serve, move || Ok(model), ready)
}

/// [`serve_script`] on a free port in a thread of its own; returns the base URL.
pub fn spawn_script(text: &str, parser: Option<ToolCallParser>, step_time: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let text = text.to_string();
    std::thread::spawn(move || {
        let result = serve_script(&text, parser, step_time, 0, |address| tx.send(address).expect("waits"));
        panic!("the server stopped: {result:?}");
    });
    let address = rx.recv_timeout(Duration::from_secs(60)).expect("server starts");
    format!("http://{address}")
}
