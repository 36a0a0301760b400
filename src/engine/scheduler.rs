//! The request scheduler: one thread owns the [`Engine`]; requests arrive through [`Scheduler::submit`]
//! and answer through a channel of [`Event`]s. The HTTP server (and tests) use only this API.
//!
//! ## Contract (stable: it does not change when the internals batch)
//! - `submit(Request) -> Result<Ticket, SubmitError>` checks the request at once: a prompt that does not
//!   fit the context, a `max_tokens` past it, or a full waiting queue (more than `max_queue` requests
//!   waiting) is refused there, before any work.
//! - A [`Ticket`]'s events: for each choice `index` in `0..n`, zero or more [`Event::Token`] and then one
//!   [`Event::Done`]; or an [`Event::Error`] that ends the request. The channel closes after the last one.
//!   Choices may interleave (they will once `n > 1` forks run batched); within one choice, order holds.
//! - Text: each token's `text` is what it releases of the reply, decoded across token boundaries (a
//!   character split over tokens waits for its last byte) with stop strings held back until they are
//!   ruled out; `Done.text` is the rest (the decoder's tail). Concatenating a choice's texts gives its
//!   reply; a stop string that matched, and everything after it, is never part of it.
//! - Dropping the ticket cancels the request: a waiting one leaves the queue at once, a running one stops
//!   at the engine's next step (one forward pass) and frees its sequence.
//! - `Done.usage.cached_tokens` is the engine's prefix-cache hit for that choice ([`Generation`]).
//! - Logprobs are of the model's distribution (log-softmax of the raw logits, before penalties and
//!   temperature), as OpenAI and llama-server report them.
//!
//! ## v0 internals
//! ```text
//! submit --> waiting (FIFO, bounded) --admit--> run: choice 0..n one after another through
//!                                               Engine::generate (stop strings, decoding: TextStream)
//! ```
//! One request at a time; the cancel flag is the one `Engine::generate` checks between forward passes.
//! Logprobs: `Engine::generate` hands `on_token` only the id, so a request asking for them is scored
//! after the fact by one extra pass of the model over prompt + reply ([`score`]); its tokens are sent
//! when that pass is done. Once the engine exposes each step's logits this pass goes away.
//!
//! ## Later (continuous batching)
//! `admit` moves every waiting request whose blocks fit into a running set; each step builds one batch
//! from all running sequences (decode tokens plus chunks of prefills), samples each sequence's next token
//! and feeds it to that sequence's [`TextStream`]. `n` choices become forks sharing the prompt's blocks.
//! Nothing above this section changes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{CacheStats, Engine, FinishReason, Generation};
use crate::model::{Logits, Model, ModelError};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
}

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
    /// The engine's KV pool and prefix-cache counters, as of the last finished request.
    pub cache: CacheStats,
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
struct Job {
    id: u64,
    req: Request,
    tx: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

struct State {
    waiting: VecDeque<Job>,
    running: usize,
    next_id: u64,
    shutdown: bool,
    /// Cancel flags of the running requests (set on shutdown).
    running_cancel: Vec<Arc<AtomicBool>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    stats: Mutex<SchedulerStats>,
}

impl Shared {
    /// The lock, even if a thread panicked while holding it (the queue stays consistent: every change is
    /// a single push or remove).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, SchedulerStats> {
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
    pub fn spawn(engine: Engine, tokenizer: Arc<Tokenizer>, opts: SchedulerOptions) -> std::io::Result<Scheduler> {
        let cache = engine.stats();
        let shared = Arc::new(Shared {
            state: Mutex::new(State { waiting: VecDeque::new(), running: 0, next_id: 1, shutdown: false, running_cancel: Vec::new() }),
            wake: Condvar::new(),
            stats: Mutex::new(SchedulerStats { cache, ..Default::default() }),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("pagellm-scheduler".into()).spawn(move || run_loop(engine, &tokenizer, &s, opts))?;
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
        for c in &st.running_cancel {
            c.store(true, Ordering::SeqCst);
        }
        drop(st);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The scheduler thread: admit a request, run it, repeat until shutdown.
fn run_loop(mut engine: Engine, tok: &Arc<Tokenizer>, shared: &Shared, opts: SchedulerOptions) {
    while let Some(job) = admit(shared) {
        // A bug in the engine must not take the server down or leave the client waiting forever: the
        // request fails, the cache (whose state is unknown) is emptied, and the next request runs.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(&mut engine, tok, shared, opts, &job)));
        let outcome = run.unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            let _ = job.tx.send(Event::Error { message: format!("internal error: the engine panicked ({})", what.unwrap_or_default()) });
            engine.clear_cache();
            Outcome::Failed
        });
        let mut st = shared.lock();
        st.running -= 1;
        st.running_cancel.retain(|c| !Arc::ptr_eq(c, &job.cancel));
        drop(st);
        let mut stats = shared.stats();
        match outcome {
            Outcome::Completed => stats.completed += 1,
            Outcome::Cancelled => stats.cancelled += 1,
            Outcome::Failed => stats.failed += 1,
        }
        stats.cache = engine.stats();
    }
}

/// Wait for the next waiting request that is still wanted; `None` on shutdown.
fn admit(shared: &Shared) -> Option<Job> {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return None;
        }
        if let Some(job) = st.waiting.pop_front() {
            st.running += 1;
            st.running_cancel.push(job.cancel.clone());
            return Some(job);
        }
        st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

enum Outcome {
    Completed,
    Cancelled,
    Failed,
}

/// Run every choice of `job` one after another.
fn run_job(engine: &mut Engine, tok: &Arc<Tokenizer>, shared: &Shared, opts: SchedulerOptions, job: &Job) -> Outcome {
    let req = &job.req;
    for index in 0..req.n {
        let gone = || job.cancel.load(Ordering::Relaxed) || job.tx.is_closed();
        if gone() {
            return Outcome::Cancelled;
        }
        let res = run_choice(engine, tok, opts, job, index);
        if gone() {
            return Outcome::Cancelled;
        }
        match res {
            Ok((g, tail, stopped)) => {
                let finish_reason = if stopped { FinishReason::Stop } else { g.finish };
                let usage = Usage { prompt_tokens: g.prompt_tokens, completion_tokens: g.tokens.len(), cached_tokens: g.cached_tokens };
                let mut stats = shared.stats();
                stats.prompt_tokens += usage.prompt_tokens as u64;
                stats.cached_tokens += usage.cached_tokens as u64;
                stats.completion_tokens += usage.completion_tokens as u64;
                match finish_reason {
                    FinishReason::Stop => stats.finished_stop += 1,
                    _ => stats.finished_length += 1,
                }
                drop(stats);
                let _ = job.tx.send(Event::Done { index, text: tail, finish_reason, usage });
            }
            Err(message) => {
                let _ = job.tx.send(Event::Error { message });
                return Outcome::Failed;
            }
        }
    }
    Outcome::Completed
}

/// One choice: generate (sending token events as they come, or after scoring when logprobs are asked
/// for); returns the generation, the text not yet released, and whether a stop string ended it.
fn run_choice(
    engine: &mut Engine,
    tok: &Arc<Tokenizer>,
    opts: SchedulerOptions,
    job: &Job,
    index: usize,
) -> Result<(Generation, String, bool), String> {
    let req = &job.req;
    let sampling = SamplingParams { seed: req.sampling.seed.wrapping_add(index as u64), ..req.sampling.clone() };
    let mut sampler = Sampler::new(sampling);
    let mut text = TextStream::new(tok.clone(), &req.stop);
    let max_tokens = req.max_tokens.unwrap_or(opts.ctx - req.prompt.len());
    let mut held: Vec<Event> = Vec::new();
    let mut on_token = |id: u32| {
        if job.tx.is_closed() {
            // The client is gone: stop at once rather than wait for the ticket's drop.
            job.cancel.store(true, Ordering::SeqCst);
            return false;
        }
        let (piece, hit_stop) = text.push(id);
        let ev = Event::Token { index, id, text: piece, logprob: None, top_logprobs: Vec::new() };
        if req.logprobs.is_some() {
            held.push(ev);
        } else {
            let _ = job.tx.send(ev);
        }
        !hit_stop
    };
    let g = engine.generate(&req.prompt, &mut sampler, max_tokens, &job.cancel, &mut on_token).map_err(|e| e.to_string())?;
    let tail = text.finish();
    if let Some(k) = req.logprobs {
        if !job.cancel.load(Ordering::Relaxed) {
            let scores = score(engine.model(), &req.prompt, &g.tokens, k).map_err(|e| format!("scoring logprobs failed: {e}"))?;
            for (mut ev, (lp, top)) in held.into_iter().zip(scores) {
                if let Event::Token { logprob, top_logprobs, .. } = &mut ev {
                    *logprob = Some(lp);
                    *top_logprobs = top;
                }
                let _ = job.tx.send(ev);
            }
        }
    }
    Ok((g, tail, text.stopped()))
}

/// Each reply token's logprob and the `k` most likely tokens at its position, from one pass of the model
/// over prompt + reply in a session of its own (the engine's cache is not touched).
///
/// ```text
/// fed:     p0 .. p(n-1) | r0 r1 .. r(m-2)
/// rows:           ^last   ^    ^        ^      row i predicts r(i)
/// ```
pub fn score(model: &Model, prompt: &[u32], reply: &[u32], k: usize) -> Result<Vec<TokenScore>, ModelError> {
    const CHUNK: usize = 64;
    let Some((_, fed_reply)) = reply.split_last() else { return Ok(Vec::new()) };
    let n_vocab = model.config().n_vocab;
    let mut sess = model.new_session(prompt.len() + fed_reply.len())?;
    let mut rows = model.forward(&mut sess, prompt, Logits::Last)?;
    let mut out = Vec::with_capacity(reply.len());
    let mut chunks = fed_reply.chunks(CHUNK);
    loop {
        for row in rows.chunks_exact(n_vocab) {
            out.push(log_softmax_pick(row, reply[out.len()], k));
        }
        match chunks.next() {
            Some(c) => rows = model.forward(&mut sess, c, Logits::All)?,
            None => break,
        }
    }
    debug_assert_eq!(out.len(), reply.len());
    Ok(out)
}

/// A token's logprob and the most likely tokens at its position with theirs.
pub type TokenScore = (f32, Vec<(u32, f32)>);

/// ln softmax(row)[id], and the `k` largest entries of ln softmax(row) (ties by id).
fn log_softmax_pick(row: &[f32], id: u32, k: usize) -> TokenScore {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|i| (i, lp(row[i as usize]))).collect();
    }
    (row.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)), top)
}

/// Token ids in, reply text out: a streaming decoder followed by a [`StopMatcher`].
pub struct TextStream {
    decoder: StreamDecoder<Arc<Tokenizer>>,
    stops: StopMatcher,
}

impl TextStream {
    pub fn new(tok: Arc<Tokenizer>, stops: &[String]) -> TextStream {
        TextStream { decoder: StreamDecoder::new(tok), stops: StopMatcher::new(stops) }
    }

    /// Add a token; returns the text it releases and whether a stop string has now matched.
    pub fn push(&mut self, id: u32) -> (String, bool) {
        if self.stops.stopped {
            return (String::new(), true);
        }
        let piece = self.decoder.push(id);
        (self.stops.push(&piece, false), self.stops.stopped)
    }

    /// End of the reply: the rest of the text (nothing after a stop string).
    pub fn finish(&mut self) -> String {
        if self.stops.stopped {
            return String::new();
        }
        let tail = self.decoder.flush();
        self.stops.push(&tail, true)
    }

    pub fn stopped(&self) -> bool {
        self.stops.stopped
    }
}

/// Holds back text that may be the start of a stop string, and cuts the text at the first match.
///
/// ```text
/// pending: "...Hello, Us"   stop "User:"  -> release "...Hello, ", keep "Us" (a prefix of "User:")
/// pending: "Us" + "er: x"   contains "User:" at 0 -> release "", stopped
/// ```
/// Why this is enough: `pending` only ever keeps its longest suffix that is a prefix of some stop
/// string, so a match can never begin in text already released.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        StopMatcher { stops, pending: String::new(), stopped: false }
    }

    /// Add `text`; returns what may be shown now. `at_end`: no more text comes, release all before a match.
    pub fn push(&mut self, text: &str, at_end: bool) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        let first_match = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_match {
            self.stopped = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        let keep = if at_end { 0 } else { self.partial_stop_len() };
        let rest = self.pending.split_off(self.pending.len() - keep);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Bytes of the longest suffix of `pending` that is a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            // Suffixes shorter than `s`, starting at character boundaries.
            for (at, _) in p.char_indices().rev().take(s.chars().count().saturating_sub(1)) {
                let suffix = &p[at..];
                if suffix.len() > best && s.starts_with(suffix) {
                    best = suffix.len();
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::{log_softmax_pick, StopMatcher};

    /// Feed `pieces` one by one; returns the released text and whether a stop matched.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p, false);
        }
        out += &m.push("", true);
        (out, m.stopped)
    }

    #[test]
    fn stop_strings_match_across_pieces_and_are_cut() {
        assert_eq!(run(&["User:"], &["Hello, Us", "er: more"]), ("Hello, ".into(), true));
        assert_eq!(run(&["User:"], &["Hello, Us", "es"]), ("Hello, Uses".into(), false));
        assert_eq!(run(&["\n\n", "END"], &["a\n", "b E", "N", "D\n\n"]), ("a\nb ".into(), true));
        assert_eq!(run(&["ab"], &["xa", "a", "b"]), ("xa".into(), true));
        assert_eq!(run(&[], &["free ", "text"]), ("free text".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&[""], &["x"]), ("x".into(), false));
    }

    #[test]
    fn held_text_is_released_once_ruled_out() {
        let mut m = StopMatcher::new(&["###".to_string()]);
        assert_eq!(m.push("a ##", false), "a ");
        assert_eq!(m.push("x", false), "##x");
        assert!(!m.stopped);
    }

    #[test]
    fn log_softmax_pick_matches_softmax() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = log_softmax_pick(&row, 2, 3);
        let p = crate::sampling::softmax(&row);
        assert!((lp - p[2].ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((top[0].1 - p[1].ln()).abs() < 1e-5);
        assert!(log_softmax_pick(&row, 9, 0).0.is_infinite());
    }
}
