//! The engine thread: owns the model, the scheduler and the engine, takes requests from the HTTP
//! handlers and streams each request's tokens back on its own channel. A request whose channel is closed
//! (its client went away, or a stop string ended it) is cancelled at its next token.
use crate::metrics::Metrics;
use nsa_model::paged::KvFormat;
use nsa_runtime::engine::{CachedModel, ModelEngine};
use nsa_runtime::pages::PagePool;
use nsa_runtime::sampling::{Sampled, SamplingParams};
use nsa_runtime::scheduler::{Event, FinishReason, Scheduler, SchedulerConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use tokio::sync::mpsc;

/// What the engine sends a request's handler.
#[derive(Debug)]
pub enum Out {
    Token {
        token: u32,
        sampled: Option<Sampled>,
    },
    Finished(FinishReason),
    /// The scheduler refused the request (e.g. it needs more pages than exist).
    Refused(String),
}

pub struct Submit {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop_tokens: Vec<u32>,
    pub params: SamplingParams,
    pub seed: Option<u64>,
    /// Logprobs wanted, with this many most likely tokens each.
    pub logprobs: Option<usize>,
    pub out: mpsc::UnboundedSender<Out>,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub scheduler: SchedulerConfig,
    pub page_size: usize,
    pub total_pages: usize,
    pub prefix_reuse: bool,
    /// How the KV cache keeps rows (`--kv-cache-dtype`).
    pub kv_format: KvFormat,
}

/// The handlers' side of the engine thread.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: std_mpsc::Sender<Submit>,
    alive: Arc<AtomicBool>,
}

/// Marks the engine dead when its thread ends, panics included.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl WorkerHandle {
    /// Whether the engine thread still runs (`/health` reports it).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Queues a request; its tokens arrive on `submit.out`. False when the engine thread is gone.
    pub fn submit(&self, submit: Submit) -> bool {
        self.tx.send(submit).is_ok()
    }
}

/// Starts the engine thread; `load` builds the model on that thread (device models stay where they were
/// made). Returns once the model is loaded, or with the loader's error.
pub fn start<M, L>(load: L, config: WorkerConfig, metrics: Arc<Metrics>) -> Result<WorkerHandle, String>
where
    M: CachedModel + 'static,
    L: FnOnce() -> Result<M, String> + Send + 'static,
{
    let (tx, rx) = std_mpsc::channel::<Submit>();
    let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), String>>();
    let alive = Arc::new(AtomicBool::new(true));
    let guard = AliveGuard(alive.clone());
    std::thread::Builder::new()
        .name("nsa-engine".into())
        .spawn(move || {
            let _guard = guard;
            let engine = load().and_then(|model| ModelEngine::with_cache(model, config.page_size, config.kv_format));
            let engine = match engine {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    engine
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            run(engine, rx, config, &metrics);
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle { tx, alive }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err("the engine thread stopped while loading the model".into()),
    }
}

fn run<M: CachedModel>(
    mut engine: ModelEngine<M>,
    rx: std_mpsc::Receiver<Submit>,
    config: WorkerConfig,
    metrics: &Metrics,
) {
    let pool = PagePool::new(config.total_pages, config.page_size);
    let mut scheduler = Scheduler::new(config.scheduler.clone(), pool);
    if !config.prefix_reuse {
        scheduler.disable_prefix_reuse();
    }
    let mut outs: HashMap<u64, mpsc::UnboundedSender<Out>> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        // Idle: wait for work. Busy: take what has arrived and keep stepping.
        let mut incoming = Vec::new();
        if scheduler.is_idle() {
            match rx.recv() {
                Ok(submit) => incoming.push(submit),
                Err(_) => return,
            }
        }
        incoming.extend(rx.try_iter());
        for submit in incoming {
            let id = next_id;
            next_id += 1;
            match scheduler.add(id, submit.prompt, submit.max_tokens, submit.stop_tokens) {
                Ok(()) => {
                    engine.register(id, submit.params, submit.seed, submit.logprobs);
                    outs.insert(id, submit.out);
                }
                Err(reason) => {
                    let _ = submit.out.send(Out::Refused(reason));
                }
            }
        }
        // Requests whose handler is gone are dropped before they cost a step.
        let gone: Vec<u64> = outs
            .iter()
            .filter(|(_, out)| out.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            cancel(id, &mut scheduler, &mut engine, &mut outs, metrics);
        }
        for event in scheduler.step(&mut engine) {
            match event {
                Event::Token { request, token } => {
                    let sampled = engine.take_sampled(request);
                    metrics.generated(1);
                    let delivered = outs
                        .get(&request)
                        .is_some_and(|out| out.send(Out::Token { token, sampled }).is_ok());
                    if !delivered {
                        cancel(request, &mut scheduler, &mut engine, &mut outs, metrics);
                    }
                }
                Event::Finished { request, reason } => {
                    engine.forget(request);
                    if let Some(out) = outs.remove(&request) {
                        let _ = out.send(Out::Finished(reason));
                    }
                }
            }
        }
        metrics.set_scheduler(
            scheduler.running(),
            scheduler.waiting(),
            scheduler.used_pages(),
            scheduler.total_pages(),
            scheduler.preemptions,
        );
    }
}

/// Drops request `id`, whose handler is gone: out of the scheduler (what it computed stays a cached
/// prefix) and the engine. A request that already finished this step is left to its Finished event.
fn cancel<M: CachedModel>(
    id: u64,
    scheduler: &mut Scheduler,
    engine: &mut ModelEngine<M>,
    outs: &mut HashMap<u64, mpsc::UnboundedSender<Out>>,
    metrics: &Metrics,
) {
    if scheduler.cancel(id) {
        engine.forget(id);
        outs.remove(&id);
        metrics.cancelled();
    }
}
