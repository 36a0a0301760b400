//! The engine: turns a prompt (token ids) into a reply, re-using the KV cache of every prefix it has
//! already computed. The REPL and the server call only this API; it speaks token ids, never blocks.
//!
//! ## Internals
//! One shared paged KV pool (`kv`): per layer a K/V store of `num_blocks x block_size` token slots on
//! the model's backend, and the block bookkeeping (ref counts, hash-chained prefix cache, LRU free queue)
//! in a [`KvCacheManager`](crate::kv::KvCacheManager). A request:
//! ```text
//! prompt   [ t0 t1 ... t(k-1) | p(k) ... p(n-1) ]
//!            \ cached_tokens=k / \_ prefilled _/     k <= n - 1: the last prompt token is always run,
//!                                                    its logits pick the first reply token
//! ```
//! `k` is the longest prefix whose KV the pool holds: cached full blocks from any earlier request (any
//! conversation, any client), continued token by token into the last block of a recently finished
//! sequence (cache.rs). The rest is prefilled in micro-batches through `forward_batch` with the
//! sequence's block table and slot mapping, then the reply is decoded one token at a time; blocks join
//! the prefix cache as they fill. Every reply token handed to `on_token` is run through the model too
//! (including the last one of a reply cut by `max_tokens`), so the next turn of a chat, whose rendering
//! starts with prompt + reply, prefills only its new tokens. An EOG token is not run (the template writes
//! its own end-of-turn text). At the end the sequence's blocks stay cached, in LRU order.
//!
//! With `prefix_cache: false` nothing is re-used: every request prefills its whole prompt (for
//! comparisons and benchmarks). Kernels are batch invariant, so both give the same tokens.
//!
//! Pool size: [`PoolOptions`]; by default exactly one context of `ctx` tokens.
//!
//! Two APIs over the same pool: [`Engine::generate`] runs one sequence start to end (the REPL, `run -p`);
//! the batched API (batch.rs: `start_seq`, `reserve`, `step`, `finish_seq`, `free_seq`) runs chunks of
//! many sequences through one forward pass per step, for the scheduler's continuous batching
//! (batcher.rs). Both leave finished sequences in the prefix cache the same way.
//!
//! Sampling: the prompt and each sampled token are passed to `sampler.accept` (penalties see the whole
//! conversation); give each request a fresh or reset [`Sampler`].

pub mod scheduler;
mod batch;
mod batcher;
mod cache;
mod text;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::kv::{KvBudget, KvCacheConfig, KvError, KvStorage, DEFAULT_BLOCK_SIZE};
use crate::model::{AttnSeq, ForwardBatch, Model, ModelError, Outputs, Scratch, UBATCH};
use crate::sampling::Sampler;

use cache::{KvCache, SeqKv};
pub use batch::{Sequence, StepOutput};
pub use cache::RETAINED_SEQS;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is {n_prompt} tokens, which does not fit the context of {ctx} tokens: pass a larger --ctx (the model was trained on {ctx_train}) or send a shorter prompt")]
    PromptTooLong { n_prompt: usize, ctx: usize, ctx_train: usize },
    #[error("the prompt is empty: nothing to generate from")]
    EmptyPrompt,
    #[error("a context of {ctx} tokens exceeds the KV pool of {pool_tokens} tokens ({kv_mem_mib} MiB at {bytes_per_token} bytes per token): pass a larger --kv-mem (at least {need_mib} MiB) or a smaller --ctx")]
    PoolTooSmall { ctx: usize, pool_tokens: usize, kv_mem_mib: usize, bytes_per_token: usize, need_mib: usize },
    #[error("the KV pool is full: a sequence needs {need} blocks of {block_size} tokens and the pool has {num_blocks}: pass a larger --kv-mem or a smaller --ctx")]
    PoolExhausted { need: usize, num_blocks: usize, block_size: usize },
    #[error("{0}")]
    Budget(String),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Most tokens (prompt + reply) a request may use; 0: the context the model was loaded with.
    pub ctx: usize,
    /// Re-use the KV of the prefix shared with earlier requests (off: prefill every prompt whole).
    pub prefix_cache: bool,
    /// Tokens a sequence keeps and what it evicts past them (`--kv-budget`, `--kv-policy`); `None`:
    /// keep everything.
    pub budget: Option<KvBudget>,
}

/// How the shared KV pool is sized ([`Engine::with_pool`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolOptions {
    /// Bytes of KV memory over all layers, K and V (`--kv-mem`); 0: exactly one context of `ctx`
    /// tokens. More than that keeps more prefixes cached (other conversations, other clients).
    pub kv_mem_bytes: usize,
    /// Tokens per block; 0: [`DEFAULT_BLOCK_SIZE`].
    pub block_size: usize,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token, or `on_token` returned false.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// `cancel` was set.
    Cancelled,
    /// The context has no room for another token.
    ContextFull,
}

impl FinishReason {
    /// Lower-case name for logs and stats lines.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::ContextFull => "context_full",
        }
    }
}

/// The outcome of [`Engine::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The sampled tokens, without the EOG token that ended them.
    pub tokens: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was re-used; `prompt_tokens - cached_tokens` were prefilled.
    pub cached_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub finish: FinishReason,
}

/// KV cache occupancy and prefix-cache hits, in blocks of `block_size` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks held by a sequence: the running one and the finished ones kept for continuation
    /// ([`RETAINED_SEQS`]).
    pub used_blocks: usize,
    /// Full blocks in the prefix cache, held or free: what a later prompt can re-use.
    pub cached_blocks: usize,
    /// Blocks a new token can take now (empty, or cached and unreferenced).
    pub free_blocks: usize,
    /// Of `used_blocks`, those held only by retained (finished) sequences: with no request running,
    /// `used_blocks == retained_blocks`, else a block leaked.
    pub retained_blocks: usize,
    pub block_size: usize,
    /// Prompt tokens asked for, over all requests.
    pub queried_tokens: u64,
    /// Of those, tokens served from the cache.
    pub hit_tokens: u64,
    /// Tokens a KV budget evicted, over all sequences.
    pub evicted_tokens: u64,
}

pub struct Engine {
    model: Model,
    eog_ids: Vec<u32>,
    opts: EngineOptions,
    /// Most tokens a request may use.
    ctx: usize,
    /// The shared pool, its bookkeeping and the retained sequences.
    cache: KvCache,
    scratch: Scratch,
    /// The logits vector of the last [`StepOutput`] handed back ([`Engine::recycle`]): the next step
    /// writes into it instead of a fresh allocation (64 x 128256 logits are 33 MB of new pages a step).
    spare_logits: Vec<f32>,
    queried_tokens: u64,
    hit_tokens: u64,
    evicted_tokens: u64,
}

impl Engine {
    /// An engine over `model` with a pool of one context; generation stops at any of `eog_ids`.
    pub fn new(model: Model, eog_ids: Vec<u32>, opts: EngineOptions) -> Result<Engine, EngineError> {
        Engine::with_pool(model, eog_ids, opts, PoolOptions::default())
    }

    /// An engine whose KV pool is sized by `pool`: `num_blocks = kv_mem_bytes / bytes per block`, which
    /// must hold at least one context of `ctx` tokens.
    pub fn with_pool(model: Model, eog_ids: Vec<u32>, opts: EngineOptions, pool: PoolOptions) -> Result<Engine, EngineError> {
        let ctx = if opts.ctx == 0 { model.ctx() } else { opts.ctx };
        if ctx > model.ctx() {
            return Err(ModelError::SessionTooLarge { requested: ctx, ctx: model.ctx() }.into());
        }
        let block_size = if pool.block_size == 0 { DEFAULT_BLOCK_SIZE } else { pool.block_size };
        let budget = opts.budget.and_then(KvBudget::active);
        if let Some(b) = budget {
            b.check(block_size).map_err(EngineError::Budget)?;
        }
        // Under a budget a sequence holds its kept tokens, the holes compaction has not reclaimed yet
        // (under half of each block) and one micro-batch of new tokens.
        let seq_tokens = budget.map_or(ctx, |b| ctx.min(2 * b.tokens + UBATCH + 2 * block_size));
        let min_blocks = seq_tokens.div_ceil(block_size).max(1);
        let num_blocks = if pool.kv_mem_bytes == 0 {
            min_blocks
        } else {
            let (n_layers, one) = (model.config().n_layers, model.kv_shape(1, block_size));
            let per_block = KvStorage::bytes_per_block(n_layers, one);
            let num_blocks = KvStorage::blocks_for_bytes(pool.kv_mem_bytes, n_layers, one);
            if num_blocks < min_blocks {
                const MIB: usize = 1 << 20;
                return Err(EngineError::PoolTooSmall {
                    ctx,
                    pool_tokens: num_blocks * block_size,
                    kv_mem_mib: pool.kv_mem_bytes / MIB,
                    bytes_per_token: per_block / block_size,
                    need_mib: (min_blocks * per_block).div_ceil(MIB),
                });
            }
            num_blocks
        };
        let config = KvCacheConfig { num_blocks, block_size, ..KvCacheConfig::new(num_blocks) };
        let cache = KvCache::new(&model, config, opts.prefix_cache)?;
        Ok(Engine { model, eog_ids, opts, ctx, cache, scratch: Scratch::default(), spare_logits: Vec::new(), queried_tokens: 0, hit_tokens: 0, evicted_tokens: 0 })
    }

    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Generate a reply to `prompt` (the whole rendered conversation's token ids). Re-uses the longest
    /// prefix whose KV the pool holds (see the module doc): only the rest is prefilled. `on_token` gets
    /// each sampled token (not EOG ones); returning false stops. `cancel` is checked between steps
    /// (Ctrl-C).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation, EngineError> {
        self.check_prompt(prompt)?;

        // Step 1: the longest prefix the pool holds (none without the prefix cache).
        let mut seq = self.cache.start(&self.model, prompt, self.opts.budget);
        let res = self.run(&mut seq, sampler, max_tokens, cancel, on_token);
        // Step 4: commit the computed blocks; the sequence stays cached.
        self.cache.finish(seq);
        debug_assert!(self.cache.check_invariants().is_ok(), "{:?}", self.cache.check_invariants());
        res
    }

    /// Steps 2 and 3 of [`Engine::generate`] for `seq`, which holds the prompt.
    fn run(
        &mut self,
        seq: &mut SeqKv,
        sampler: &mut Sampler,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation, EngineError> {
        let n = seq.tokens.len();
        let cached = seq.num_computed;
        self.queried_tokens += n as u64;
        self.hit_tokens += cached as u64;
        sampler.accept(&seq.tokens);
        let mut out = Generation {
            tokens: Vec::new(),
            prompt_tokens: n,
            cached_tokens: cached,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            finish: FinishReason::Cancelled,
        };

        // Step 2: prefill the rest a micro-batch at a time, so Ctrl-C is seen during a long prompt
        // (batch invariance: the split does not change the logits).
        let t = Instant::now();
        // A plain greedy sampler needs only the arg-max of each step's logits, picked where they are
        // (on a GPU one integer comes back instead of n_vocab floats).
        let greedy = sampler.is_plain_greedy();
        let (mut logits, mut picked) = (Vec::new(), Vec::new());
        while seq.num_computed < n {
            if cancel.load(Ordering::Relaxed) {
                out.prefill_secs = t.elapsed().as_secs_f64();
                return Ok(out);
            }
            let n_new = (n - seq.num_computed).min(UBATCH);
            self.forward(seq, n_new, Outputs::pick(greedy, &mut picked, &mut logits))?;
        }
        out.prefill_secs = t.elapsed().as_secs_f64();

        // Step 3: decode. Each emitted token is also run, so the cache holds the whole reply.
        let t = Instant::now();
        out.finish = loop {
            if out.tokens.len() >= max_tokens {
                break FinishReason::Length;
            }
            if cancel.load(Ordering::Relaxed) {
                break FinishReason::Cancelled;
            }
            let next = if greedy { picked[0] } else { sampler.sample(&mut logits) };
            if self.eog_ids.contains(&next) {
                break FinishReason::Stop;
            }
            sampler.accept(&[next]);
            out.tokens.push(next);
            if !on_token(next) {
                break FinishReason::Stop;
            }
            if seq.num_computed >= self.ctx {
                break FinishReason::ContextFull;
            }
            seq.tokens.push(next);
            self.forward(seq, 1, Outputs::pick(greedy, &mut picked, &mut logits))?;
        };
        out.decode_secs = t.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Runs the `n_new` tokens of `seq` after its computed ones; the last one's logits (or greedy token)
    /// into `out` (its memory re-used from step to step).
    fn forward(&mut self, seq: &mut SeqKv, n_new: usize, out: Outputs) -> Result<(), EngineError> {
        self.forward_rows(seq, n_new, &[n_new as u32 - 1], out)
    }

    /// The same, with the outputs of the chunk's rows `out_rows`; under a budget, evicts after.
    fn forward_rows(&mut self, seq: &mut SeqKv, n_new: usize, out_rows: &[u32], out: Outputs) -> Result<(), EngineError> {
        self.cache.allocate(seq, n_new)?;
        let (p0, e0) = (seq.num_computed, seq.computed_entries());
        let positions: Vec<u32> = (p0..p0 + n_new).map(|p| p as u32).collect();
        let slot_mapping: Vec<u32> = (e0..e0 + n_new).map(|e| seq.table.slot(e) as u32).collect();
        let score_len = seq.score_len(self.model.config().n_kv_heads, n_new);
        let view = seq.view(0);
        let seqs = [AttnSeq { q_start: 0, n_q: n_new, ctx_len: e0 + n_new, block_table: seq.table.block_ids(), view: view.as_ref() }];
        let batch = ForwardBatch {
            tokens: &seq.tokens[p0..p0 + n_new],
            positions: &positions,
            slot_mapping: &slot_mapping,
            seqs: &seqs,
            out_rows,
            score_len,
        };
        self.model.forward_batch_out(self.cache.layers_mut(), &batch, &mut self.scratch, out)?;
        seq.num_computed += n_new;
        self.evicted_tokens += self.cache.after_step(&self.model, seq, self.scratch.scores(), score_len, 0) as u64;
        Ok(())
    }

    /// Runs `tokens` from an empty cache (nothing re-used, nothing kept) in steps of `step` tokens under
    /// `budget`, handing the logits of every position `>= from` to `on_logits(pos, row)`: perplexity with
    /// a KV policy evicting as it would during generation.
    pub fn eval_tokens(
        &mut self,
        tokens: &[u32],
        step: usize,
        from: usize,
        budget: Option<KvBudget>,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), EngineError> {
        self.check_prompt(&tokens[..tokens.len().saturating_sub(1)])?;
        let mut seq = self.cache.start_empty(&self.model, tokens, budget);
        let n_vocab = self.model.config().n_vocab;
        let mut res = Ok(());
        let mut logits = Vec::new();
        while seq.num_computed < tokens.len() {
            let (p0, n_new) = (seq.num_computed, step.min(tokens.len() - seq.num_computed));
            let rows: Vec<u32> = (0..n_new as u32).filter(|&r| p0 + r as usize >= from).collect();
            match self.forward_rows(&mut seq, n_new, &rows, Outputs::Logits(&mut logits)) {
                Ok(()) => {
                    for (&r, row) in rows.iter().zip(logits.chunks(n_vocab)) {
                        on_logits(p0 + r as usize, row);
                    }
                }
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        self.cache.release(seq);
        res
    }

    pub fn stats(&self) -> CacheStats {
        let u = self.cache.usage();
        CacheStats {
            total_blocks: u.num_blocks,
            used_blocks: u.used_blocks,
            cached_blocks: if self.opts.prefix_cache { u.cached_blocks } else { 0 },
            free_blocks: u.free_blocks,
            retained_blocks: self.cache.retained_only_blocks(),
            block_size: u.block_size,
            queried_tokens: self.queried_tokens,
            hit_tokens: self.hit_tokens,
            evicted_tokens: self.evicted_tokens,
        }
    }

    /// Bytes of the KV pool, all layers, K and V.
    pub fn kv_pool_bytes(&self) -> usize {
        self.cache.storage().bytes()
    }

    /// Forget every cached token (the hit counters stay).
    pub fn clear_cache(&mut self) {
        self.cache.clear().expect("the pool's configuration was accepted at start");
    }

    /// Checks the pool's invariants (ref counts, free queue, prefix cache, the retained tables); tests
    /// call it after every request.
    pub fn check_invariants(&self) -> Result<(), KvError> {
        self.cache.check_invariants()
    }

    /// The same with `running` sequences of the batched API live (the scheduler, when it checks).
    pub fn check_invariants_with(&self, running: &[&Sequence]) -> Result<(), KvError> {
        let kvs: Vec<&cache::SeqKv> = running.iter().map(|s| s.kv()).collect();
        self.cache.check_invariants_with(&kvs)
    }
}
