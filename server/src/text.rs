//! A request's tokens from the engine → text as it becomes final: incremental detokenization (a token that
//! ends inside a UTF-8 character waits for the next), stop tokens left out of the text, stop strings cut
//! (the request ends there), log-probabilities kept beside, timings recorded for the metrics.
use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::worker::Out;
use nsa_model::Tokenizer;
use nsa_model::tokenizer::IncrementalDecoder;
use nsa_runtime::sampling::{Sampled, StopMatcher};
use nsa_runtime::scheduler::FinishReason;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A step of the output: new text and the tokens that made it.
#[derive(Default, Debug)]
pub struct Piece {
    pub text: String,
    pub logprobs: Vec<Sampled>,
}

pub enum Next {
    Piece(Piece),
    /// The end: why, and how many tokens were generated.
    Done {
        finish: &'static str,
        tokens: usize,
    },
    /// The engine refused the request (400: it needs more cache than exists), or went away (503).
    Failed(ApiError),
}

pub struct TextStream {
    rx: mpsc::UnboundedReceiver<Out>,
    tokenizer: Arc<Tokenizer>,
    stop_tokens: Vec<u32>,
    stops: StopMatcher,
    decoder: IncrementalDecoder,
    pending_logprobs: Vec<Sampled>,
    tokens: usize,
    metrics: Arc<Metrics>,
    started: Instant,
    last_token: Option<Instant>,
    /// Set at the end: the OpenAI finish reason.
    finish: Option<&'static str>,
}

impl TextStream {
    pub fn new(
        rx: mpsc::UnboundedReceiver<Out>,
        tokenizer: Arc<Tokenizer>,
        stop_tokens: Vec<u32>,
        stop_strings: &[String],
        metrics: Arc<Metrics>,
    ) -> TextStream {
        TextStream {
            rx,
            tokenizer,
            stop_tokens,
            stops: StopMatcher::new(stop_strings),
            decoder: IncrementalDecoder::default(),
            pending_logprobs: Vec::new(),
            tokens: 0,
            metrics,
            started: Instant::now(),
            last_token: None,
            finish: None,
        }
    }

    /// The next piece of text (possibly empty, with log-probabilities only), or the end.
    pub async fn next(&mut self) -> Next {
        if let Some(finish) = self.finish {
            return Next::Done {
                finish,
                tokens: self.tokens,
            };
        }
        loop {
            let Some(out) = self.rx.recv().await else {
                self.finish = Some("error");
                return Next::Failed(ApiError {
                    status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    message: "the engine stopped (see the server's log)".into(),
                    param: None,
                });
            };
            match out {
                Out::Refused(reason) => {
                    self.finish = Some("error");
                    return Next::Failed(ApiError::bad_request(reason, None));
                }
                Out::Finished(reason) => {
                    let finish = match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length | FinishReason::Context => "length",
                    };
                    self.finish = Some(finish);
                    // Text held back for a possible stop string is final now.
                    let text = self.stops.finish();
                    let logprobs = std::mem::take(&mut self.pending_logprobs);
                    if text.is_empty() && logprobs.is_empty() {
                        return Next::Done {
                            finish,
                            tokens: self.tokens,
                        };
                    }
                    return Next::Piece(Piece { text, logprobs });
                }
                Out::Token { token, sampled } => {
                    self.record_timing();
                    self.tokens += 1;
                    self.pending_logprobs.extend(sampled);
                    if self.stop_tokens.contains(&token) {
                        continue;
                    }
                    let new = self.decoder.push(&self.tokenizer, token).unwrap_or_default();
                    if new.is_empty() {
                        continue;
                    }
                    let (text, stopped) = self.stops.push(&new);
                    if stopped {
                        // Closing the channel cancels the request in the engine.
                        self.rx.close();
                        self.finish = Some("stop");
                    }
                    let logprobs = std::mem::take(&mut self.pending_logprobs);
                    return Next::Piece(Piece { text, logprobs });
                }
            }
        }
    }

    fn record_timing(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.time_to_first_token((now - self.started).as_secs_f64()),
            Some(last) => self.metrics.inter_token_latency((now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }
}
