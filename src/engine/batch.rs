//! The engine's batched API, for the scheduler (continuous batching): sequences live outside the engine,
//! and each [`Engine::step`] runs one chunk of new tokens of several of them through ONE `forward_batch`,
//! so N clients share one matmul per layer.
//!
//! ```text
//! start_seq(tokens)            the longest cached prefix (find_cached_prefix, retained sequences)
//! reserve(seq, n_new)          slots for the next n_new tokens; false when the pool is short (the
//!                              scheduler then preempts a sequence and retries, or waits)
//! step([(seq, n_new)..])       one forward over every scheduled chunk; logits for each sequence whose
//!                              chunk reaches its last token
//! seq.push(token)              the sampled token: the next step runs it (n_new = 1)
//! finish_seq / free_seq        commit the computed full blocks; keep the sequence retained / free it
//! ```
//! A sequence's tokens, in one picture:
//! ```text
//! tokens   [ computed (KV in the pool) ........ | pending: prompt rest, or the last sampled token ]
//!          0                              num_computed                                      len
//! ```
//! A prefill is just a sequence with many pending tokens; a decode, one. The scheduler decides how many
//! of them each step runs (its token budget); batch invariance (DESIGN.md) makes the split invisible in
//! the logits.

use super::cache::SeqKv;
use super::{Engine, EngineError};
use crate::kv::KvBudget;
use crate::model::{AttnSeq, ForwardBatch, ModelError, Outputs};

/// One sequence of the batched API: its block table and tokens.
pub struct Sequence {
    kv: SeqKv,
    /// Tokens of the prompt it was started with.
    prompt_len: usize,
    /// Of those, tokens whose KV was re-used when it started.
    cached_tokens: usize,
}

impl Sequence {
    /// Prompt then sampled tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.kv.tokens
    }

    /// Tokens whose KV is in the pool.
    pub fn num_computed(&self) -> usize {
        self.kv.num_computed
    }

    /// Tokens still to run (a prefill's rest, or the last sampled token).
    pub fn num_pending(&self) -> usize {
        self.kv.tokens.len() - self.kv.num_computed
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Blocks in the sequence's table.
    pub fn num_blocks(&self) -> usize {
        self.kv.table.len()
    }

    pub(super) fn kv(&self) -> &SeqKv {
        &self.kv
    }

    /// Appends a sampled token; the next step that schedules this sequence runs it.
    pub fn push(&mut self, token: u32) {
        self.kv.tokens.push(token);
    }
}

/// The output of one [`Engine::step`] (logits) or [`Engine::step_greedy`] (greedy tokens): a row per
/// sequence whose chunk reached its last token.
pub struct StepOutput {
    /// Empty after [`Engine::step_greedy`].
    logits: Vec<f32>,
    /// After [`Engine::step_greedy`]: each row's greedy token; else empty.
    tokens: Vec<u32>,
    /// Per scheduled sequence, in order: its row of `logits` (or `tokens`).
    rows: Vec<Option<usize>>,
    n_vocab: usize,
}

impl StepOutput {
    /// After [`Engine::step_greedy`]: the `i`-th scheduled sequence's greedy next token, when its chunk
    /// reached its last token.
    pub fn greedy(&self, i: usize) -> Option<u32> {
        self.tokens.get(self.rows.get(i).copied().flatten()?).copied()
    }

    /// The logits of the `i`-th scheduled sequence's last token, when its chunk reached it.
    /// (None after [`Engine::step_greedy`], which keeps the logits on the device.)
    pub fn logits_mut(&mut self, i: usize) -> Option<&mut [f32]> {
        let span = self.span(i)?;
        self.logits.get_mut(span)
    }

    /// [`StepOutput::logits_mut`], read-only.
    pub fn logits(&self, i: usize) -> Option<&[f32]> {
        self.logits.get(self.span(i)?)
    }

    /// Where the `i`-th scheduled sequence's row lies in `logits`, if it has one.
    fn span(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let r = self.rows.get(i).copied().flatten()?;
        Some(r * self.n_vocab..(r + 1) * self.n_vocab)
    }
}

impl Engine {
    /// Refuses a prompt that is empty, does not leave a token of room in the context, or holds a token
    /// outside the vocabulary.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<(), EngineError> {
        let n = prompt.len();
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        // `>=`: the prompt must leave room for at least one reply token.
        if n >= self.ctx {
            let ctx_train = self.model.config().ctx_train;
            return Err(EngineError::PromptTooLong { n_prompt: n, ctx: self.ctx, ctx_train });
        }
        let n_vocab = self.model.config().n_vocab;
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::BadToken { id, n_vocab }.into());
        }
        Ok(())
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.cache.usage().block_size
    }

    /// Most tokens (prompt + reply) a sequence may hold.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// A sequence for `prompt` holding the longest prefix the pool has computed (at most all but the
    /// last token). Counts toward the prefix-cache hit rate.
    /// `budget`: the request's own KV budget; `None`: the engine's (`EngineOptions::budget`).
    pub fn start_seq(&mut self, prompt: &[u32], budget: Option<KvBudget>) -> Result<Sequence, EngineError> {
        self.check_prompt(prompt)?;
        if let Some(b) = budget.and_then(KvBudget::active) {
            b.check(self.block_size()).map_err(EngineError::Budget)?;
        }
        let kv = self.cache.start(&self.model, prompt, budget.or(self.opts.budget));
        self.queried_tokens += prompt.len() as u64;
        self.hit_tokens += kv.num_computed as u64;
        Ok(Sequence { cached_tokens: kv.num_computed, prompt_len: prompt.len(), kv })
    }

    /// A copy of `seq` (every token computed) sharing its full blocks, its partial last block copied;
    /// `None` when no block is free for the copy. For n > 1 choices of one prompt.
    pub fn fork_seq(&mut self, seq: &Sequence) -> Option<Sequence> {
        debug_assert_eq!(seq.num_pending(), 0, "fork a sequence right after its prompt is computed");
        let kv = self.cache.fork(&self.model, &seq.kv)?;
        Some(Sequence { prompt_len: seq.prompt_len, cached_tokens: seq.prompt_len.saturating_sub(1), kv })
    }

    /// Slots for the next `n_new` pending tokens of `seq`; releases retained (finished) sequences when
    /// the pool is short. `false`: still short, nothing taken.
    pub fn reserve(&mut self, seq: &mut Sequence, n_new: usize) -> bool {
        debug_assert!(n_new <= seq.num_pending());
        self.cache.allocate(&mut seq.kv, n_new).is_ok()
    }

    /// Runs `n_new` pending tokens of each sequence (reserved first) in one forward pass. The output has
    /// logits for each sequence whose chunk reached its last token.
    pub fn step(&mut self, work: &mut [(&mut Sequence, usize)]) -> Result<StepOutput, EngineError> {
        self.step_as(work, false)
    }

    /// [`Engine::step`] for sequences that all sample greedily (no penalties, no logprobs): the output
    /// has only each one's greedy token ([`StepOutput::greedy`], [`crate::sampling::argmax`] of the
    /// logits `step` would give), reduced on the device, so a GPU does not send the logits back.
    pub fn step_greedy(&mut self, work: &mut [(&mut Sequence, usize)]) -> Result<StepOutput, EngineError> {
        self.step_as(work, true)
    }

    fn step_as(&mut self, work: &mut [(&mut Sequence, usize)], greedy: bool) -> Result<StepOutput, EngineError> {
        let total: usize = work.iter().map(|(_, n)| n).sum();
        let (mut tokens, mut positions, mut slot_mapping) =
            (Vec::with_capacity(total), Vec::with_capacity(total), Vec::with_capacity(total));
        let (mut out_rows, mut rows) = (Vec::new(), Vec::with_capacity(work.len()));
        let n_kv = self.model.config().n_kv_heads;
        // per sequence: where its attention probabilities go (H2O), and how many
        let mut score_offs = Vec::with_capacity(work.len());
        let mut score_len = 0;
        for (seq, n_new) in work.iter() {
            let (kv, n_new) = (&seq.kv, *n_new);
            let (p0, e0) = (kv.num_computed, kv.computed_entries());
            assert!(n_new > 0 && p0 + n_new <= kv.tokens.len() && e0 + n_new <= kv.table.num_tokens(), "step: unreserved tokens");
            tokens.extend_from_slice(&kv.tokens[p0..p0 + n_new]);
            positions.extend((p0..p0 + n_new).map(|p| p as u32));
            slot_mapping.extend((e0..e0 + n_new).map(|e| kv.table.slot(e) as u32));
            score_offs.push(score_len);
            score_len += kv.score_len(n_kv, n_new);
            let reaches_end = p0 + n_new == kv.tokens.len();
            rows.push(reaches_end.then_some(out_rows.len()));
            if reaches_end {
                out_rows.push(tokens.len() as u32 - 1);
            }
        }
        let views: Vec<_> = work.iter().zip(&score_offs).map(|((seq, _), &off)| seq.kv.view(off)).collect();
        let mut q_start = 0;
        let seqs: Vec<AttnSeq> = work
            .iter()
            .zip(&views)
            .map(|((seq, n_new), view)| {
                let ctx_len = seq.kv.computed_entries() + n_new;
                let s = AttnSeq { q_start, n_q: *n_new, ctx_len, block_table: seq.kv.table.block_ids(), view: view.as_ref() };
                q_start += n_new;
                s
            })
            .collect();
        let batch = ForwardBatch { tokens: &tokens, positions: &positions, slot_mapping: &slot_mapping, seqs: &seqs, out_rows: &out_rows, score_len };
        let (mut logits, mut picks) = (Vec::new(), Vec::new());
        let out = if greedy {
            Outputs::Argmax(&mut picks)
        } else {
            logits = std::mem::take(&mut self.spare_logits);
            Outputs::Logits(&mut logits)
        };
        self.model.forward_batch_out(self.cache.layers_mut(), &batch, &mut self.scratch, out)?;
        drop(seqs);
        drop(views);
        for ((seq, n_new), &off) in work.iter_mut().zip(&score_offs) {
            seq.kv.num_computed += *n_new;
            self.evicted_tokens += self.cache.after_step(&self.model, &mut seq.kv, self.scratch.scores(), score_len, off) as u64;
        }
        Ok(StepOutput { logits, tokens: picks, rows, n_vocab: self.model.config().n_vocab })
    }

    /// Hands a step's output back once it is used: the next step re-uses its logits' memory.
    pub fn recycle(&mut self, out: StepOutput) {
        if out.logits.capacity() > 0 {
            self.spare_logits = out.logits;
        }
    }

    /// The sequence is done: its computed blocks join the prefix cache and it is kept for continuation
    /// (a chat's next turn). Its last sampled token, never run, is dropped.
    pub fn finish_seq(&mut self, seq: Sequence) {
        self.cache.finish(seq.kv);
    }

    /// Frees the sequence now (preemption, a client gone): its computed full blocks stay in the prefix
    /// cache, so a re-admission finds them.
    pub fn free_seq(&mut self, seq: Sequence) {
        self.cache.release(seq.kv);
    }
}
