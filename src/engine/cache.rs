//! The engine's KV cache: the shared paged pool ([`KvStorage`], one K/V store per layer on the backend),
//! the block bookkeeping ([`KvCacheManager`]: ref counts, hash-chained prefix cache, LRU free queue) and
//! the few finished sequences kept whole for token-exact continuation.
//!
//! ## A sequence's life
//! ```text
//! start(prompt)     find_cached_prefix: every cached full block the prompt repeats, from any earlier
//!                   sequence (conversation, client); then, if a retained sequence repeats more of the
//!                   prompt, continue it token by token: fork_prefix shares its full blocks and copies
//!                   the block holding the rest (copy-on-write), so nothing the cache holds is re-run
//! allocate(n)       slots for the next n tokens (allocate_slots commits the blocks filled so far);
//!                   when no block is free, release retained sequences, oldest first, then fail
//! finish            commit the last full blocks, keep the sequence as retained (or free it)
//! ```
//! ```text
//! prompt     [ t0 .......................................... t(n-1) ]
//! cached     [ block hits (find_cached_prefix) ][ + retained tail ]      at most n - 1 tokens: the
//!            \___________ num_computed ______________________/           last prompt token is always
//!                                                                        run, its logits pick the reply
//! ```
//! **Retained sequences.** Up to [`RETAINED_SEQS`] finished sequences keep their blocks (their partial
//! last block included, which the prefix cache, holding whole blocks only, cannot serve). A chat's next
//! turn, re-rendered from the whole conversation, then prefills exactly the tokens its template added,
//! as llama.cpp's per-slot cache does, while every full block stays shared through the prefix cache
//! with all other sequences. A retained sequence is dropped when a newer one covers it, when more than
//! `RETAINED_SEQS` are kept, or (oldest first) when a sequence needs its blocks.
//!
//! With `prefix_cache` off nothing is looked up or retained: every prompt is prefilled whole.

use std::collections::VecDeque;

use super::EngineError;
use crate::kv::{BlockTable, BudgetState, KvBudget, KvCacheConfig, KvCacheManager, KvError, KvStorage, KvUsage};
use crate::model::{KvStore, KvView, Model, ModelError};

/// Finished sequences kept whole (see the module doc).
pub const RETAINED_SEQS: usize = 4;

/// One sequence's KV: its block table and its tokens.
pub(super) struct SeqKv {
    pub table: BlockTable,
    /// Prompt, then reply tokens as they are run; the first `num_computed` have their KV in the pool.
    pub tokens: Vec<u32>,
    pub num_computed: usize,
    /// Under a KV budget (kv/budget.rs): the table's entries, their positions, live masks and scores.
    /// Without one, entry `j` of the table is token `j`.
    pub budget: Option<BudgetState>,
}

impl SeqKv {
    /// Table entries holding computed tokens: where the next token's entry goes.
    pub fn computed_entries(&self) -> usize {
        match &self.budget {
            None => self.num_computed,
            Some(b) => b.num_entries() - (b.positions().last().map_or(0, |&p| p as usize + 1) - self.num_computed),
        }
    }

    /// The attention view of a sequence under a budget; its probabilities go to `score_offset` when
    /// its policy wants them.
    pub fn view(&self, score_offset: usize) -> Option<KvView<'_>> {
        self.budget.as_ref().map(|b| KvView {
            live: b.live_masks(),
            positions: b.positions(),
            score_offset: b.wants_scores().then_some(score_offset),
        })
    }

    /// Floats of attention probabilities its next step of `n_new` tokens asks for (`n_kv x entries`).
    pub fn score_len(&self, n_kv_heads: usize, n_new: usize) -> usize {
        match &self.budget {
            Some(b) if b.wants_scores() => n_kv_heads * (self.computed_entries() + n_new),
            _ => 0,
        }
    }
}

pub(super) struct KvCache {
    manager: KvCacheManager,
    config: KvCacheConfig,
    storage: KvStorage,
    /// Most recently finished first; every slot of their tables is computed.
    retained: VecDeque<SeqKv>,
    prefix_cache: bool,
}

impl KvCache {
    /// A pool of `config.num_blocks` blocks on the model's backend.
    pub fn new(model: &Model, config: KvCacheConfig, prefix_cache: bool) -> Result<KvCache, EngineError> {
        let manager = KvCacheManager::new(config)?;
        let storage = KvStorage::new(model.backend(), model.config().n_layers, model.kv_shape(config.num_blocks, config.block_size))
            .map_err(ModelError::from)?;
        Ok(KvCache { manager, config, storage, retained: VecDeque::new(), prefix_cache })
    }

    pub fn layers_mut(&mut self) -> &mut [KvStore] {
        self.storage.layers_mut()
    }

    pub fn storage(&self) -> &KvStorage {
        &self.storage
    }

    pub fn usage(&self) -> KvUsage {
        self.manager.usage()
    }

    /// A sequence for `prompt` holding the longest prefix already computed (module doc), at most
    /// `prompt.len() - 1` tokens; under `budget` when given (its cached prefix counts as live entries).
    pub fn start(&mut self, model: &Model, prompt: &[u32], budget: Option<KvBudget>) -> SeqKv {
        let mut seq = self.start_shared(model, prompt);
        if let Some(budget) = budget.and_then(KvBudget::active) {
            let c = model.config();
            let mut st = BudgetState::new(budget, self.config.block_size, c.n_layers, c.n_kv_heads);
            st.push(0..seq.num_computed);
            seq.budget = Some(st);
        }
        seq
    }

    /// A sequence for `tokens` that re-uses nothing (perplexity: every chunk from an empty cache).
    pub fn start_empty(&mut self, model: &Model, tokens: &[u32], budget: Option<KvBudget>) -> SeqKv {
        let mut seq = SeqKv { table: self.manager.new_table(), tokens: tokens.to_vec(), num_computed: 0, budget: None };
        if let Some(budget) = budget.and_then(KvBudget::active) {
            let c = model.config();
            seq.budget = Some(BudgetState::new(budget, self.config.block_size, c.n_layers, c.n_kv_heads));
        }
        seq
    }

    fn start_shared(&mut self, model: &Model, prompt: &[u32]) -> SeqKv {
        let mut seq = SeqKv { table: self.manager.new_table(), tokens: prompt.to_vec(), num_computed: 0, budget: None };
        if !self.prefix_cache || prompt.is_empty() {
            return seq;
        }
        let (table, hit) = self.manager.find_cached_prefix(prompt);
        (seq.table, seq.num_computed) = (table, hit);
        // The retained sequence repeating most of the prompt, the most recent on ties.
        let limit = prompt.len() - 1;
        let best = self.retained.iter().enumerate().fold(None, |best: Option<(usize, usize)>, (i, r)| {
            let c = common_prefix(&r.tokens[..r.num_computed], prompt).min(limit);
            if best.is_none_or(|(bc, _)| c > bc) { Some((c, i)) } else { best }
        });
        if let Some((c, i)) = best.filter(|&(c, _)| c > hit) {
            if let Some(forked) = self.manager.fork_prefix(&self.retained[i].table, c) {
                self.storage.copy_blocks(model.backend(), forked.copy.as_slice());
                let hits_only = std::mem::replace(&mut seq.table, forked.table);
                self.manager.free(hits_only);
                seq.num_computed = c;
            }
        }
        seq
    }

    /// Slots for the `n_new` tokens after `seq.num_computed` (`seq.tokens` must hold them). Releases
    /// retained sequences, oldest first, while the pool is short.
    pub fn allocate(&mut self, seq: &mut SeqKv, n_new: usize) -> Result<(), EngineError> {
        let entries = seq.computed_entries();
        loop {
            if self.manager.allocate_slots(&mut seq.table, &seq.tokens, entries, n_new).is_some() {
                if let Some(b) = &mut seq.budget {
                    let next = b.positions().last().map_or(0, |&p| p as usize + 1);
                    b.push(next..seq.num_computed + n_new);
                }
                return Ok(());
            }
            match self.retained.pop_back() {
                Some(r) => self.manager.free(r.table),
                None => {
                    let (num_blocks, block_size) = (self.config.num_blocks, self.config.block_size);
                    let need = (seq.num_computed + n_new).div_ceil(block_size);
                    return Err(EngineError::PoolExhausted { need, num_blocks, block_size });
                }
            }
        }
    }

    /// Commits the sequence's computed full blocks to the prefix cache and keeps it retained (or, with
    /// the prefix cache off, frees it).
    pub fn finish(&mut self, seq: SeqKv) {
        let SeqKv { mut table, mut tokens, num_computed, budget } = seq;
        tokens.truncate(num_computed);
        self.manager.cache_full_blocks(&mut table, &tokens, num_computed);
        // (slots allocated but never computed, after a failed forward: not worth keeping; a sequence
        // that evicted tokens cannot be continued token by token)
        let evicted = budget.is_some_and(|b| b.num_evicted() > 0);
        if !self.prefix_cache || num_computed == 0 || table.num_tokens() != num_computed || evicted {
            self.manager.free(table);
            return;
        }
        // A retained sequence whose tokens this one repeats reaches nothing this one does not.
        let (covered, kept): (Vec<SeqKv>, Vec<SeqKv>) =
            self.retained.drain(..).partition(|r| common_prefix(&r.tokens, &tokens) == r.tokens.len());
        covered.into_iter().for_each(|r| self.manager.free(r.table));
        self.retained = kept.into();
        self.retained.push_front(SeqKv { table, tokens, num_computed, budget: None });
        while self.retained.len() > RETAINED_SEQS {
            let r = self.retained.pop_back().expect("len > RETAINED_SEQS");
            self.manager.free(r.table);
        }
    }

    /// A copy of `seq` (every slot computed): full blocks shared, the partial last block copied on the
    /// device now. `None` when no block is free for the copy.
    pub fn fork(&mut self, model: &Model, seq: &SeqKv) -> Option<SeqKv> {
        let forked = self.manager.fork_prefix(&seq.table, seq.computed_entries())?;
        self.storage.copy_blocks(model.backend(), forked.copy.as_slice());
        let (tokens, num_computed, budget) = (seq.tokens.clone(), seq.num_computed, seq.budget.clone());
        Some(SeqKv { table: forked.table, tokens, num_computed, budget })
    }

    /// After a step ran `seq`'s tokens: adds the step's attention probabilities (`scores`, the forward's
    /// `[n_layers x score_len]`, this sequence's at `offset`) to its H2O scores, evicts what its budget
    /// no longer holds, and compacts its blocks once holes pile up (kv/budget.rs).
    /// Returns the tokens evicted.
    pub fn after_step(&mut self, model: &Model, seq: &mut SeqKv, scores: &[f32], score_len: usize, offset: usize) -> usize {
        let Some(st) = &mut seq.budget else { return 0 };
        if st.wants_scores() && score_len > 0 {
            let n = st.num_entries();
            let n_kv = model.config().n_kv_heads;
            for (il, layer) in scores.chunks(score_len).enumerate() {
                st.add_scores(il, &layer[offset..offset + n_kv * n], n);
            }
        }
        let evicted = st.enforce();
        if evicted > 0 {
            self.manager.stop_caching(&mut seq.table);
        }
        if let Some(moves) = self.manager.compact(&mut seq.table, st) {
            self.storage.move_slots(model.backend(), &moves);
        }
        debug_assert!(st.check().is_ok(), "{:?}", st.check());
        evicted
    }

    /// Frees a sequence that is not finished (preempted, cancelled): its computed full blocks are
    /// committed first, so they stay findable in the prefix cache; nothing is retained.
    pub fn release(&mut self, seq: SeqKv) {
        let SeqKv { mut table, tokens, num_computed, .. } = seq;
        self.manager.cache_full_blocks(&mut table, &tokens, num_computed);
        self.manager.free(table);
    }

    /// Distinct blocks held only by retained sequences (no running sequence shares them): with nothing
    /// running, `used_blocks - retained_only_blocks` must be 0, else a block leaked.
    pub fn retained_only_blocks(&self) -> usize {
        let mut refs: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for r in &self.retained {
            for &b in r.table.block_ids() {
                *refs.entry(b).or_default() += 1;
            }
        }
        refs.iter().filter(|&(&b, &n)| self.manager.pool().ref_cnt(b) == n).count()
    }

    /// The pool's invariants with `running` sequences live besides the retained ones (tests, idle checks).
    pub fn check_invariants_with(&self, running: &[&SeqKv]) -> Result<(), KvError> {
        let tables: Vec<&BlockTable> = self.retained.iter().map(|r| &r.table).chain(running.iter().map(|s| &s.table)).collect();
        self.manager.check_invariants(&tables)
    }

    /// Forgets every cached token: retained sequences and the prefix cache.
    pub fn clear(&mut self) -> Result<(), KvError> {
        self.retained.clear();
        self.manager = KvCacheManager::new(self.config)?;
        Ok(())
    }

    /// The pool's invariants, given that no sequence is running (tests).
    pub fn check_invariants(&self) -> Result<(), KvError> {
        let tables: Vec<&BlockTable> = self.retained.iter().map(|r| &r.table).collect();
        self.manager.check_invariants(&tables)?;
        match self.retained.iter().find(|r| r.num_computed != r.table.num_tokens() || r.tokens.len() != r.num_computed) {
            Some(r) => Err(KvError::Invariant(format!(
                "a retained sequence of {} tokens has {} computed in {} slots",
                r.tokens.len(),
                r.num_computed,
                r.table.num_tokens()
            ))),
            None => Ok(()),
        }
    }
}

/// Length of the longest common prefix of `a` and `b`.
pub(super) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[], &[1, 2]), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2]), 2);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 9, 3]), 1);
        assert_eq!(common_prefix(&[4, 5], &[4, 5]), 2);
    }
}
