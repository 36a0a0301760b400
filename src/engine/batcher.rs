//! The scheduler thread: continuous batching over the [`Engine`]'s batched API (batch.rs).
//!
//! ```text
//!  shared.waiting --pull (up to max_running requests)--> queue (no KV yet: new, forks, preempted)
//!                                                          |  admit: start_seq (prefix cache), reserve
//!                                                          v
//!  loop:  drop gone  ->  schedule  ->  Engine::step (ONE forward)  ->  sample + emit  ->  finish
//!                        running, oldest first: every decode token and prefill chunk under
//!                        TOKEN_BUDGET; a failed reserve preempts the youngest running sequence
//! ```
//! Why the order: running sequences come first so decodes never starve behind new prompts; admission
//! never preempts (a new request waits for blocks instead), so a request cannot push out an older
//! one. A new request whose first blocks equal those a running prefill is still computing waits for
//! them (one step or a few), then re-uses them from the prefix cache rather than computing them twice.
//!
//! Every sequence owns its [`Sampler`] and [`TextStream`], which survive a preemption: the
//! sequence restarts from prompt + reply so far (mostly cached) and continues exactly where it was.
//!
//! A `json_object` request's choices also own a [`JsonGuide`] (the vocabulary's [`JsonMask`], built
//! once on the first such request, plus the reply's state): sampling sees only tokens that keep the reply
//! a prefix of one JSON object, and the choice stops as soon as the object closes.

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use super::batch::{Sequence, StepOutput};
use super::cache::common_prefix;
use super::scheduler::{Event, Job, SchedulerOptions, Shared, Usage};
use super::text::{log_softmax_pick, TextStream};
use super::{Engine, FinishReason};
use crate::json_constraint::{JsonGuide, JsonMask};
use crate::model::UBATCH;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Most tokens (decode tokens plus prefill chunks) in one step's batch.
pub const TOKEN_BUDGET: usize = UBATCH;

/// Most sequences in one step's batch.
const MAX_SEQS: usize = 256;

/// One request's shared state: its choices finish one by one.
struct ReqCtx {
    job: Job,
    choices_left: usize,
    /// Completed, cancelled or failed: counted once.
    ended: bool,
}

type ReqRef = Rc<RefCell<ReqCtx>>;

/// One choice of a request: a sequence, running or waiting for KV.
struct SeqState {
    req: ReqRef,
    index: usize,
    /// `None` while queued (new or preempted).
    seq: Option<Sequence>,
    /// While queued: the tokens to start from (the prompt, or prompt + reply so far).
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    text: TextStream,
    generated: usize,
    max_tokens: usize,
    /// Prompt tokens re-used when it first started.
    cached_tokens: Option<usize>,
    /// Choices still to fork from this one once its prompt is computed (choice 0 of n > 1).
    forks: usize,
    finish: Option<FinishReason>,
    /// `Some` for a `json_object` request.
    json: Option<JsonGuide>,
}

impl SeqState {
    /// Whether its next token is the arg-max of its logits as they come (greedy, no penalty, no JSON
    /// guide, no logprobs, no choices to fork from them): then nobody needs the logits themselves.
    fn picks_argmax(&self) -> bool {
        self.forks == 0 && self.json.is_none() && self.sampler.is_plain_greedy() && self.req.borrow().job.req.logprobs.is_none()
    }
}

enum Outcome {
    Completed,
    Cancelled,
    Failed,
}

struct Batcher<'a> {
    engine: Engine,
    tok: Arc<Tokenizer>,
    shared: &'a Shared,
    opts: SchedulerOptions,
    /// Oldest first; the last one is preempted first.
    running: Vec<SeqState>,
    queue: VecDeque<SeqState>,
    /// Requests held here (running or queued); mirrors `State::running`.
    requests: usize,
    /// The token mask for `json_object` requests, built on the first one.
    json_mask: OnceCell<Arc<JsonMask>>,
}

/// The scheduler thread's body: until shutdown, pull requests and step the batch.
pub(super) fn run_loop(engine: Engine, tok: Arc<Tokenizer>, shared: &Shared, opts: SchedulerOptions) {
    let mut b = Batcher { engine, tok, shared, opts, running: Vec::new(), queue: VecDeque::new(), requests: 0, json_mask: OnceCell::new() };
    while b.pull() {
        b.drop_gone();
        // A bug in the engine must not take the server down or leave clients waiting forever: every
        // request held fails, the cache (whose state is unknown) is emptied, and serving goes on.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.step()));
        if let Err(panic) = run {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            b.fail_all(&format!("internal error: the engine panicked ({})", what.unwrap_or_default()));
            b.engine.clear_cache();
        }
        b.publish();
    }
}

impl Batcher<'_> {
    /// Takes new requests while fewer than `max_running` are held; waits while there is nothing to do.
    /// `false` on shutdown.
    fn pull(&mut self) -> bool {
        let mut st = self.shared.lock();
        loop {
            if st.shutdown {
                return false;
            }
            while self.requests < self.opts.max_running {
                let Some(job) = st.waiting.pop_front() else { break };
                st.running += 1;
                self.requests += 1;
                let s = self.new_request(job);
                self.queue.push_back(s);
            }
            if !self.running.is_empty() || !self.queue.is_empty() {
                return true;
            }
            st = self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Choice 0 of `job`; the others are forked from it once its prompt is computed.
    fn new_request(&self, job: Job) -> SeqState {
        let n = job.req.n;
        let req = Rc::new(RefCell::new(ReqCtx { job, choices_left: n, ended: false }));
        let mut s = self.new_choice(&req, 0);
        s.forks = n - 1;
        s
    }

    fn new_choice(&self, req: &ReqRef, index: usize) -> SeqState {
        let r = &req.borrow().job.req;
        let sampling = SamplingParams { seed: r.sampling.seed.wrapping_add(index as u64), ..r.sampling.clone() };
        let mut sampler = Sampler::new(sampling);
        sampler.accept(&r.prompt);
        let json = r.json_object.then(|| {
            JsonGuide::new(self.json_mask.get_or_init(|| Arc::new(JsonMask::for_tokenizer(&self.tok, &self.engine.eog_ids))).clone())
        });
        SeqState {
            req: req.clone(),
            index,
            seq: None,
            tokens: r.prompt.clone(),
            prompt_len: r.prompt.len(),
            sampler,
            text: TextStream::new(self.tok.clone(), &r.stop),
            generated: 0,
            max_tokens: r.max_tokens.unwrap_or(self.opts.ctx - r.prompt.len()),
            cached_tokens: None,
            forks: 0,
            finish: None,
            json,
        }
    }

    /// Frees at once the sequences of requests whose client is gone (or which ended by an error).
    fn drop_gone(&mut self) {
        let mut ended = Vec::new();
        let engine = &mut self.engine;
        let mut keep = |s: &mut SeqState| {
            let r = s.req.borrow();
            if !(r.ended || r.job.gone()) {
                return true;
            }
            if let Some(seq) = s.seq.take() {
                engine.free_seq(seq);
            }
            ended.push(s.req.clone());
            false
        };
        self.running.retain_mut(&mut keep);
        self.queue.retain_mut(keep);
        for r in ended {
            self.end_request(&r, Outcome::Cancelled);
        }
    }

    /// Counts a request's end once and releases its place.
    fn end_request(&mut self, req: &ReqRef, outcome: Outcome) {
        if std::mem::replace(&mut req.borrow_mut().ended, true) {
            return;
        }
        self.shared.lock().running -= 1;
        self.requests -= 1;
        let mut stats = self.shared.stats();
        match outcome {
            Outcome::Completed => stats.completed += 1,
            Outcome::Cancelled => stats.cancelled += 1,
            Outcome::Failed => stats.failed += 1,
        }
    }

    /// Sends `message` to the request and ends it; its other sequences go at the next `drop_gone`.
    fn fail(&mut self, req: &ReqRef, message: String) {
        let _ = req.borrow().job.tx.send(Event::Error { message });
        self.end_request(req, Outcome::Failed);
    }

    /// After a panic: every request held fails; sequences are dropped unfreed (the cache is cleared).
    fn fail_all(&mut self, message: &str) {
        let held: Vec<SeqState> = self.running.drain(..).chain(self.queue.drain(..)).collect();
        for s in held {
            self.fail(&s.req, message.to_string());
        }
    }

    /// One step: schedule, one forward, sample and emit, finish.
    fn step(&mut self) {
        let n_new = self.schedule();
        let total: usize = n_new.iter().sum();
        if total == 0 {
            // Nothing runs and the queue's front cannot get blocks: only a pool smaller than one
            // request could do this (the engine refuses such pools), but never spin on it.
            if let Some(s) = self.queue.pop_front() {
                self.fail(&s.req, "the KV pool has no room for this request: pass a larger --kv-mem".into());
            }
            return;
        }
        // every sequence of the step picks the arg-max of its logits as they come: the device picks
        // them, and the logits stay there
        let greedy = self.running.iter().zip(&n_new).filter(|(_, &n)| n > 0).all(|(s, _)| s.picks_argmax());
        let mut work: Vec<(&mut Sequence, usize)> = self
            .running
            .iter_mut()
            .zip(&n_new)
            .filter(|(_, &n)| n > 0)
            .map(|(s, &n)| (s.seq.as_mut().expect("running sequences hold KV"), n))
            .collect();
        let n_seqs = work.len();
        let out = if greedy { self.engine.step_greedy(&mut work) } else { self.engine.step(&mut work) };
        drop(work);
        {
            let mut stats = self.shared.stats();
            stats.steps += 1;
            stats.step_seqs += n_seqs as u64;
            stats.step_tokens += total as u64;
        }
        match out {
            Ok(out) => self.emit(out, &n_new),
            Err(e) => {
                let failed: Vec<ReqRef> = self.running.iter().zip(&n_new).filter(|(_, &n)| n > 0).map(|(s, _)| s.req.clone()).collect();
                for r in failed {
                    self.fail(&r, format!("the forward pass failed: {e}"));
                }
                self.drop_gone();
            }
        }
        if self.running.is_empty() && self.queue.is_empty() {
            self.check_idle();
        }
    }

    /// Tokens each running sequence runs this step (0: not scheduled), running ones first, then newly
    /// admitted ones (appended to `running`).
    fn schedule(&mut self) -> Vec<usize> {
        let mut budget = TOKEN_BUDGET;
        let mut n_new = Vec::with_capacity(self.running.len());
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = self.running[i].seq.as_mut().expect("running sequences hold KV");
            let n = seq.num_pending().min(budget);
            if self.engine.reserve(seq, n) {
                n_new.push(n);
                budget -= n;
                i += 1;
            } else {
                // Pool short: the youngest goes (maybe this very sequence, then the loop ends).
                self.preempt(self.running.len() - 1);
            }
        }
        n_new.resize(self.running.len(), 0);
        while budget > 0 && self.running.len() < MAX_SEQS {
            let Some(front) = self.queue.front() else { break };
            if self.waits_for_shared_prefix(&front.tokens) {
                break;
            }
            let mut s = self.queue.pop_front().expect("front exists");
            let kv_budget = s.req.borrow().job.req.kv_budget;
            let mut seq = match self.engine.start_seq(&s.tokens, kv_budget) {
                Ok(seq) => seq,
                Err(e) => {
                    self.fail(&s.req, e.to_string());
                    continue;
                }
            };
            let n = seq.num_pending().min(budget);
            if !self.engine.reserve(&mut seq, n) {
                self.engine.free_seq(seq);
                self.queue.push_front(s);
                break;
            }
            s.cached_tokens.get_or_insert(seq.cached_tokens());
            s.seq = Some(seq);
            self.running.push(s);
            n_new.push(n);
            budget -= n;
        }
        n_new
    }

    /// Whether a running prefill is still computing full blocks that `tokens` starts with: then the
    /// request waits, and finds them in the prefix cache once computed.
    fn waits_for_shared_prefix(&self, tokens: &[u32]) -> bool {
        let bs = self.engine.block_size();
        self.running.iter().filter_map(|s| s.seq.as_ref()).any(|seq| {
            let shared_blocks = common_prefix(seq.tokens(), tokens).min(tokens.len() - 1) / bs * bs;
            shared_blocks > 0 && seq.num_computed() < shared_blocks
        })
    }

    /// Frees running sequence `i` and queues it first: it restarts from its tokens so far.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        let seq = s.seq.take().expect("running sequences hold KV");
        s.tokens = seq.tokens().to_vec();
        self.engine.free_seq(seq);
        self.queue.push_front(s);
        self.shared.stats().preemptions += 1;
    }

    /// Samples every sequence whose chunk reached its last token, sends its events, forks n > 1
    /// choices, and finishes the sequences that are done.
    fn emit(&mut self, mut out: StepOutput, n_new: &[usize]) {
        let mut forks = Vec::new();
        // k: the k-th scheduled sequence of the step (StepOutput's numbering); i: its place in `running`
        let scheduled = n_new.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, _)| i);
        for (k, i) in scheduled.enumerate() {
            if let Some(next) = out.greedy(k) {
                take_token(&self.engine, &mut self.running[i], next, None);
                continue;
            }
            let Some(logits) = out.logits_mut(k) else { continue };
            if self.running[i].forks > 0 {
                forks.extend(self.fork(i, logits));
            }
            sample_one(&self.engine, &mut self.running[i], logits);
        }
        self.engine.recycle(out);
        self.running.append(&mut forks);
        let (done, running): (Vec<SeqState>, Vec<SeqState>) = self.running.drain(..).partition(|s| s.finish.is_some());
        self.running = running;
        for s in done {
            self.finish(s);
        }
    }

    /// The other choices of running sequence `i`, whose prompt was just computed: forks sharing its
    /// blocks, each sampling its first token from the same logits. A fork the pool has no block for
    /// is queued instead (it restarts from the prompt, found in the prefix cache).
    fn fork(&mut self, i: usize, logits: &[f32]) -> Vec<SeqState> {
        let n_forks = std::mem::take(&mut self.running[i].forks);
        let req = self.running[i].req.clone();
        let mut forks = Vec::new();
        for index in 1..=n_forks {
            let mut s = self.new_choice(&req, index);
            match self.engine.fork_seq(self.running[i].seq.as_ref().expect("running")) {
                Some(seq) => {
                    s.cached_tokens = Some(seq.cached_tokens());
                    s.seq = Some(seq);
                    sample_one(&self.engine, &mut s, &mut logits.to_vec());
                    forks.push(s);
                }
                None => self.queue.push_front(s),
            }
        }
        forks
    }

    /// A choice is done: its Done event, the stats, its KV kept in the cache.
    fn finish(&mut self, mut s: SeqState) {
        let finish_reason = s.finish.expect("finished");
        let usage = Usage { prompt_tokens: s.prompt_len, completion_tokens: s.generated, cached_tokens: s.cached_tokens.unwrap_or(0) };
        {
            let mut stats = self.shared.stats();
            stats.prompt_tokens += usage.prompt_tokens as u64;
            stats.cached_tokens += usage.cached_tokens as u64;
            stats.completion_tokens += usage.completion_tokens as u64;
            match finish_reason {
                FinishReason::Stop => stats.finished_stop += 1,
                _ => stats.finished_length += 1,
            }
        }
        let text = s.text.finish();
        let _ = s.req.borrow().job.tx.send(Event::Done { index: s.index, text, finish_reason, usage });
        if let Some(seq) = s.seq.take() {
            self.engine.finish_seq(seq);
        }
        let left = {
            let mut r = s.req.borrow_mut();
            r.choices_left -= 1;
            r.choices_left
        };
        if left == 0 {
            self.end_request(&s.req, Outcome::Completed);
        }
    }

    /// Idle: nothing may hold a block but the retained sequences.
    fn check_idle(&mut self) {
        if let Err(e) = self.engine.check_invariants() {
            eprintln!("pagellm: KV pool check failed while idle: {e}");
            self.shared.stats().invariant_errors += 1;
        }
    }

    fn publish(&mut self) {
        let cache = self.engine.stats();
        let mut stats = self.shared.stats();
        stats.cache = cache;
        stats.running_seqs = self.running.len();
    }
}

/// Samples the next token of `s` from `logits` and sends it; sets `s.finish` when the choice is done
/// (an EOG token, a stop string, a closed JSON object, `max_tokens`), else appends the token for the
/// next step to run. Logprobs are of the raw logits, before the JSON mask.
fn sample_one(engine: &Engine, s: &mut SeqState, logits: &mut [f32]) {
    let want = s.req.borrow().job.req.logprobs;
    let raw = want.map(|k| (k, logits.to_vec()));
    let next = match &s.json {
        None => s.sampler.sample(logits),
        Some(json) => match json.sample(logits, |l| s.sampler.sample(l)) {
            Some(next) => next,
            // No token can continue the object (a vocabulary missing some byte): end here.
            None => {
                s.finish = Some(FinishReason::Stop);
                return;
            }
        },
    };
    take_token(engine, s, next, raw);
}

/// Sequence `s` continues with `next`: its event (with logprobs from `raw`, the logits it was picked
/// from, when the request asked for the top k), its end at an EOG or stop string or length.
fn take_token(engine: &Engine, s: &mut SeqState, next: u32, raw: Option<(usize, Vec<f32>)>) {
    if engine.eog_ids.contains(&next) {
        s.finish = Some(FinishReason::Stop);
        return;
    }
    s.sampler.accept(&[next]);
    s.generated += 1;
    let (piece, hit_stop) = s.text.push(next);
    // The object closed: only an EOG token may follow, so stop now (the same reply, one step sooner).
    let json_done = s.json.as_mut().is_some_and(|json| json.accept(next));
    let (logprob, top_logprobs) = match raw {
        Some((k, raw)) => {
            let (lp, top) = log_softmax_pick(&raw, next, k);
            (Some(lp), top)
        }
        None => (None, Vec::new()),
    };
    let _ = s.req.borrow().job.tx.send(Event::Token { index: s.index, id: next, text: piece, logprob, top_logprobs });
    if hit_stop || json_done {
        s.finish = Some(FinishReason::Stop);
    } else if s.generated >= s.max_tokens {
        s.finish = Some(FinishReason::Length);
    } else {
        s.seq.as_mut().expect("a sampled sequence holds KV").push(next);
    }
}
