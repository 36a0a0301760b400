//! The request scheduler: one thread owns the [`Engine`]; requests arrive through [`Scheduler::submit`]
//! and answer through a channel of [`Event`]s. The HTTP server (and tests) use only this API.
//!
//! ## Contract (stable: it does not change when the internals batch)
//! - `submit(Request) -> Result<Ticket, SubmitError>` checks the request at once: a prompt that does not
//!   fit the context, a `max_tokens` past it, or a full waiting queue (more than `max_queue` requests
//!   waiting) is refused there, before any work.
//! - A [`Ticket`]'s events: for each choice `index` in `0..n`, zero or more [`Event::Token`] and then one
//!   [`Event::Done`]; or an [`Event::Error`] that ends the request. The channel closes after the last one.
//!   Choices interleave (the `n` forks run in one batch); within one choice, order holds.
//! - Text: each token's `text` is what it releases of the reply, decoded across token boundaries (a
//!   character split over tokens waits for its last byte) with stop strings held back until they are
//!   ruled out; `Done.text` is the rest (the decoder's tail). Concatenating a choice's texts gives its
//!   reply; a stop string that matched, and everything after it, is never part of it.
//! - Dropping the ticket cancels the request: a waiting one leaves the queue at once, a running one stops
//!   at the engine's next step (one forward pass) and frees its sequence.
//! - `Done.usage.cached_tokens` is the engine's prefix-cache hit for that choice ([`Generation`](crate::engine::Generation)).
//! - Logprobs are of the model's distribution (log-softmax of the raw logits, before penalties and
//!   temperature), as OpenAI and llama-server report them.
//! - `json_object`: each choice samples only tokens that keep its text a prefix of one JSON object
//!   (json_constraint.rs; logprobs stay those of the unmasked distribution) and ends with `Stop` the
//!   moment the object closes, so a `Stop` reply is exactly one object (optionally led by whitespace);
//!   `max_tokens` may cut it short (`Length`), and so may a stop string the request gave.
//!
//! ## Internals: continuous batching (batcher.rs)
//! ```text
//! submit --> waiting (FIFO, bounded by max_queue) --pull--> the batcher thread, owning the Engine:
//!   loop { drop cancelled sequences; schedule (token budget); ONE Engine::step; sample; emit events }
//! ```
//! Each step batches every running sequence's next decode token plus chunks of prefills (new or
//! preempted sequences) under a budget of [`TOKEN_BUDGET`] tokens, vLLM v1 style: there are no prefill
//! and decode phases, a prefill is a sequence with many pending tokens. Up to `max_running` requests run
//! at once; `n` choices are forks sharing the prompt's blocks. When the pool runs out, the youngest
//! sequence is preempted (its blocks freed, its computed full blocks left in the prefix cache) and
//! re-queued ahead of new requests; its sampler and text state survive, so its reply is unchanged.
//! Logprobs come from each step's logits (before penalties and temperature).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::batcher;
use super::{CacheStats, Engine, FinishReason};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

pub use super::batcher::TOKEN_BUDGET;
pub use super::text::{log_softmax_pick, score, StopMatcher, TextStream, TokenScore};

/// Most alternatives a request may ask for per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generation request: a prompt (token ids) and how to continue it.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Independent replies to the same prompt; choice `i` samples with seed `sampling.seed + i`.
    pub n: usize,
    /// Most tokens per choice; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Stop strings, matched on the decoded text across token boundaries; never part of the output.
    pub stop: Vec<String>,
    /// `Some(k)`: report each token's logprob and the `k` most likely tokens at its position.
    pub logprobs: Option<usize>,
    /// Every choice is exactly one JSON object (`response_format: json_object`; see the module doc).
    pub json_object: bool,
    /// The request's own KV budget (the `kv_budget`/`kv_policy` extension fields); `None`: the
    /// server's (`--kv-budget`).
    pub kv_budget: Option<crate::kv::KvBudget>,
}

/// Token counts of one choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// What a [`Ticket`] receives.
#[derive(Clone, Debug)]
pub enum Event {
    Token {
        /// Which choice (`0..n`).
        index: usize,
        id: u32,
        /// The text this token releases (may be empty, see the module doc).
        text: String,
        /// ln p(token); `Some` when the request asked for logprobs.
        logprob: Option<f32>,
        /// The most likely tokens at this position with their logprobs, most likely first.
        top_logprobs: Vec<(u32, f32)>,
    },
    Done {
        index: usize,
        /// Text not yet released by a token (the decoder's tail).
        text: String,
        /// `Stop` (end-of-generation token or stop string), `Length` (`max_tokens`) or `ContextFull`.
        finish_reason: FinishReason,
        usage: Usage,
    },
    /// The request failed; no event follows.
    Error { message: String },
}

/// Why `submit` refused a request; the server maps each to an HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the prompt is empty: nothing to generate from")]
    EmptyPrompt,
    #[error("the prompt is {n_prompt} tokens, which does not fit the context of {ctx} tokens (at least one token must be left for the reply): send a shorter prompt, or start the server with a larger --ctx")]
    PromptTooLong { n_prompt: usize, ctx: usize },
    #[error("max_tokens is {max_tokens}, but the prompt is {n_prompt} tokens and the context {ctx} tokens: at most {} tokens are left for the reply", ctx.saturating_sub(*n_prompt))]
    MaxTokensTooLarge { max_tokens: usize, n_prompt: usize, ctx: usize },
    #[error("{what} must be between {min} and {max}")]
    OutOfRange { what: &'static str, min: usize, max: usize },
    #[error("the server is busy: {max_queue} requests are already waiting (--max-queue); retry later")]
    QueueFull { max_queue: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerOptions {
    /// The context (prompt + reply tokens) the engine was built with.
    pub ctx: usize,
    /// Most requests waiting (not counting the running ones); past it `submit` says `QueueFull`.
    pub max_queue: usize,
    /// Most choices per request.
    pub max_n: usize,
    /// Most requests running at once (batched together); 0: [`DEFAULT_MAX_RUNNING`].
    pub max_running: usize,
}

/// Requests batched together unless [`SchedulerOptions::max_running`] says otherwise.
pub const DEFAULT_MAX_RUNNING: usize = 64;

/// Counters for `/metrics`; a snapshot.
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedulerStats {
    pub waiting: usize,
    pub running: usize,
    /// Requests refused by `submit` because the queue was full.
    pub rejected: u64,
    /// Requests that ran to their end (every choice done).
    pub completed: u64,
    /// Requests whose ticket was dropped before their end (waiting or running).
    pub cancelled: u64,
    pub failed: u64,
    /// Over all choices: prompt tokens, those served by the prefix cache, generated tokens.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Choices that ended with `stop`, and with `length` (or a full context).
    pub finished_stop: u64,
    pub finished_length: u64,
    /// The engine's KV pool and prefix-cache counters, as of the last step.
    pub cache: CacheStats,
    /// Sequences (choices) in the running batch, as of the last step.
    pub running_seqs: usize,
    /// Forward steps, and over them: sequences and tokens batched.
    pub steps: u64,
    pub step_seqs: u64,
    pub step_tokens: u64,
    /// Sequences preempted because the KV pool ran out.
    pub preemptions: u64,
    /// Times the pool's invariants failed when the scheduler went idle (a leak or a bookkeeping bug).
    pub invariant_errors: u64,
}

/// The receiving end of one request. Dropping it cancels the request.
pub struct Ticket {
    id: u64,
    events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// The next event; `None` after the last one.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The same, for threads outside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    /// Stop the request now (the same as dropping the ticket, but the events already sent stay readable).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        let mut st = self.shared.lock();
        if let Some(pos) = st.waiting.iter().position(|j| j.id == self.id) {
            st.waiting.remove(pos);
            drop(st);
            self.shared.stats().cancelled += 1;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A request inside the scheduler.
pub(super) struct Job {
    pub id: u64,
    pub req: Request,
    pub tx: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
}

impl Job {
    /// The client is gone: its ticket was dropped or cancelled.
    pub fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

pub(super) struct State {
    pub waiting: VecDeque<Job>,
    /// Requests the batcher holds (running or preempted).
    pub running: usize,
    next_id: u64,
    pub shutdown: bool,
}

pub(super) struct Shared {
    state: Mutex<State>,
    pub wake: Condvar,
    stats: Mutex<SchedulerStats>,
}

impl Shared {
    /// The lock, even if a thread panicked while holding it (the queue stays consistent: every change is
    /// a single push or remove).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> MutexGuard<'_, SchedulerStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Owns the scheduler thread; dropping it cancels what runs and waits for the thread.
pub struct Scheduler {
    shared: Arc<Shared>,
    opts: SchedulerOptions,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Start the scheduler thread; it owns `engine` from now on. `tokenizer` decodes replies.
    pub fn spawn(engine: Engine, tokenizer: Arc<Tokenizer>, mut opts: SchedulerOptions) -> std::io::Result<Scheduler> {
        if opts.max_running == 0 {
            opts.max_running = DEFAULT_MAX_RUNNING;
        }
        let cache = engine.stats();
        let shared = Arc::new(Shared {
            state: Mutex::new(State { waiting: VecDeque::new(), running: 0, next_id: 1, shutdown: false }),
            wake: Condvar::new(),
            stats: Mutex::new(SchedulerStats { cache, ..Default::default() }),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pagellm-scheduler".into())
            .spawn(move || batcher::run_loop(engine, tokenizer, &s, opts))?;
        Ok(Scheduler { shared, opts, thread: Some(thread) })
    }

    pub fn options(&self) -> SchedulerOptions {
        self.opts
    }

    /// Queue a request; see the module doc for what is checked here.
    pub fn submit(&self, req: Request) -> Result<Ticket, SubmitError> {
        let (n_prompt, ctx) = (req.prompt.len(), self.opts.ctx);
        if n_prompt == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        // `>=`: at least one token of room must be left for the reply.
        if n_prompt >= ctx {
            return Err(SubmitError::PromptTooLong { n_prompt, ctx });
        }
        if let Some(max_tokens) = req.max_tokens {
            if max_tokens == 0 {
                return Err(SubmitError::OutOfRange { what: "max_tokens", min: 1, max: ctx - n_prompt });
            }
            if n_prompt + max_tokens > ctx {
                return Err(SubmitError::MaxTokensTooLarge { max_tokens, n_prompt, ctx });
            }
        }
        if req.n == 0 || req.n > self.opts.max_n {
            return Err(SubmitError::OutOfRange { what: "n", min: 1, max: self.opts.max_n });
        }
        if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::OutOfRange { what: "top_logprobs", min: 0, max: MAX_TOP_LOGPROBS });
        }

        let mut st = self.shared.lock();
        if st.shutdown {
            return Err(SubmitError::ShuttingDown);
        }
        if st.waiting.len() >= self.opts.max_queue {
            drop(st);
            self.shared.stats().rejected += 1;
            return Err(SubmitError::QueueFull { max_queue: self.opts.max_queue });
        }
        let id = st.next_id;
        st.next_id += 1;
        let (tx, events) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        st.waiting.push_back(Job { id, req, tx, cancel: cancel.clone() });
        drop(st);
        self.shared.wake.notify_one();
        Ok(Ticket { id, events, cancel, shared: self.shared.clone() })
    }

    pub fn stats(&self) -> SchedulerStats {
        let st = self.shared.lock();
        let (waiting, running) = (st.waiting.len(), st.running);
        drop(st);
        SchedulerStats { waiting, running, ..*self.shared.stats() }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.shutdown = true;
        st.waiting.clear();
        drop(st);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
