//! `KvCacheManager`: the block-table operations the engine calls, in vLLM's words.
//!
//! A sequence's life:
//! ```text
//! let (mut table, num_computed) = kv.find_cached_prefix(&tokens);      // reuse cached full blocks
//! loop {
//!     // schedule num_new tokens; None = pool exhausted: preempt someone (kv.free) or wait
//!     kv.allocate_slots(&mut table, &tokens, num_computed, num_new)?;
//!     forward(slots of positions num_computed..num_computed + num_new); num_computed += num_new;
//!     // next step's allocate_slots commits the blocks this forward filled
//! }
//! kv.cache_full_blocks(&mut table, &tokens, num_computed);             // commit the last full blocks
//! kv.free(table);                                                      // cached blocks stay findable
//! ```
//!
//! `tokens` is always the sequence's whole token list (prompt + generated); the manager never keeps it.
//! Blocks are committed to the prefix cache only once their KV is computed (`tokens[..num_computed]`), so
//! a hit never points at rows still being written.

use super::block_table::{slot_for, BlockTable};
use super::budget::BudgetState;
use super::pool::BlockPool;
use super::prefix::{hash_block_tokens, HashFn};
use super::{BlockId, KvError, TokenId, DEFAULT_BLOCK_SIZE};

/// How to build the pool.
#[derive(Clone, Copy, Debug)]
pub struct KvCacheConfig {
    pub num_blocks: usize,
    /// Tokens per block (default 16).
    pub block_size: usize,
    /// The prefix-cache hash; tests pass a tiny one to force collisions.
    pub hash_fn: HashFn,
}

impl KvCacheConfig {
    /// `num_blocks` blocks of the default size, hashed with [`hash_block_tokens`].
    pub fn new(num_blocks: usize) -> Self {
        KvCacheConfig { num_blocks, block_size: DEFAULT_BLOCK_SIZE, hash_fn: hash_block_tokens }
    }
}

/// A device copy the caller must perform before the next forward: every layer's K and V rows of block
/// `src` into block `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
}

/// The result of [`KvCacheManager::fork`].
#[derive(Debug)]
pub struct Forked {
    pub table: BlockTable,
    /// The private partial last block's copy, when the forked table has one.
    pub copy: Option<BlockCopy>,
}

/// Prefix-cache counters, in tokens (vLLM's `PrefixCacheStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// `find_cached_prefix` calls.
    pub requests: u64,
    /// Tokens asked for.
    pub queries: u64,
    /// Tokens found cached.
    pub hits: u64,
}

impl PrefixCacheStats {
    /// `hits / queries`, 0 before any query.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.hits as f64 / self.queries as f64
        }
    }
}

/// A snapshot for `/stats` and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvUsage {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Blocks held by at least one table.
    pub used_blocks: usize,
    /// Blocks that can be taken now (empty plus cached-but-unreferenced).
    pub free_blocks: usize,
    /// Blocks in the prefix cache, referenced or not.
    pub cached_blocks: usize,
    /// Cached blocks taken for new contents so far.
    pub evictions: u64,
    pub prefix: PrefixCacheStats,
}

/// Block pool + prefix cache behind the block-table API.
pub struct KvCacheManager {
    pool: BlockPool,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    pub fn new(config: KvCacheConfig) -> Result<Self, KvError> {
        let pool = BlockPool::new(config.num_blocks, config.block_size, config.hash_fn)?;
        Ok(KvCacheManager { pool, stats: PrefixCacheStats::default() })
    }

    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    /// Read access for stats and tests.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// An empty table for this pool.
    pub fn new_table(&self) -> BlockTable {
        BlockTable::new(self.block_size())
    }

    /// Walks `tokens` block by block and takes every cached full block that matches (ref_cnt + 1),
    /// stopping at the first miss. Returns the new table and the number of tokens it covers, which the
    /// caller treats as computed.
    ///
    /// At most `(tokens.len() - 1) / block_size` blocks are taken: at least one token is left to compute,
    /// since the next token's logits come from it (vLLM does the same).
    /// ```text
    /// tokens:  [ block 0 ][ block 1 ][ block 2 ][ t48 .. t52 ]
    /// cached:     hit        hit        miss  -> (table [b0, b1], 32)
    /// ```
    /// O(tokens): one hash, one probe and one block compare per block.
    pub fn find_cached_prefix(&mut self, tokens: &[TokenId]) -> (BlockTable, usize) {
        let bs = self.block_size();
        let mut table = self.new_table();
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut parent = None;
        for chunk in tokens.chunks_exact(bs).take(max_blocks) {
            let Some(b) = self.pool.lookup(parent, chunk) else { break };
            self.pool.touch(b);
            table.block_ids.push(b);
            parent = Some(b);
        }
        let num_cached_tokens = table.block_ids.len() * bs;
        table.num_tokens = num_cached_tokens;
        table.num_cached_blocks = table.block_ids.len();
        self.stats.requests += 1;
        self.stats.queries += tokens.len() as u64;
        self.stats.hits += num_cached_tokens as u64;
        (table, num_cached_tokens)
    }

    /// Makes room in `table` for `num_new_tokens` more tokens after the `num_computed_tokens` already in
    /// the cache, taking blocks from the free queue (evicting the least recently used cached blocks when
    /// no empty block remains). First commits the blocks that `tokens[..num_computed_tokens]` filled.
    ///
    /// ```text
    /// tokens:  [ computed .............. | new ........ | not yet scheduled ]
    ///          0                 num_computed   num_computed + num_new
    /// table:   [ full ][ full ][ partial    ][ taken now  ]
    /// ```
    /// Returns the number of blocks added, or `None` (table unchanged apart from the commit) when the pool
    /// has too few free blocks: the engine preempts a sequence or waits. `tokens` must hold at least
    /// `num_computed_tokens + num_new_tokens` ids and `num_computed_tokens <= table.num_tokens()`.
    pub fn allocate_slots(
        &mut self,
        table: &mut BlockTable,
        tokens: &[TokenId],
        num_computed_tokens: usize,
        num_new_tokens: usize,
    ) -> Option<usize> {
        let total = num_computed_tokens + num_new_tokens;
        assert!(tokens.len() >= total, "allocate_slots: {total} tokens scheduled but only {} known", tokens.len());
        assert!(num_computed_tokens <= table.num_tokens, "allocate_slots: computed tokens beyond the table's slots");
        self.cache_full_blocks(table, tokens, num_computed_tokens);
        let need = total.div_ceil(self.block_size()).saturating_sub(table.len());
        if need > self.pool.num_free_blocks() {
            return None;
        }
        for _ in 0..need {
            let b = self.pool.take_free_block().expect("counted free blocks");
            table.block_ids.push(b);
        }
        table.num_tokens = table.num_tokens.max(total);
        debug_assert_eq!(table.len(), table.num_tokens.div_ceil(self.block_size()));
        Some(need)
    }

    /// Commits to the prefix cache every full block of `tokens[..num_computed_tokens]` (whose KV the
    /// forward has written) not committed yet, chaining each to the block before it. Returns how many
    /// blocks this call committed. Stops for good at a block whose hash another block already holds
    /// (an equal block computed by a concurrent sequence, or a collision): blocks after it could never be
    /// reached by a lookup.
    pub fn cache_full_blocks(
        &mut self,
        table: &mut BlockTable,
        tokens: &[TokenId],
        num_computed_tokens: usize,
    ) -> usize {
        debug_assert_eq!(table.block_size, self.block_size(), "table from another pool");
        let bs = self.block_size();
        let num_full = (num_computed_tokens.min(tokens.len()) / bs).min(table.len());
        let start = table.num_cached_blocks;
        if table.caching_stopped || num_full <= start {
            return 0;
        }
        for i in start..num_full {
            let parent = if i == 0 { None } else { Some(table.block_ids[i - 1]) };
            if !self.pool.cache(table.block_ids[i], parent, &tokens[i * bs..(i + 1) * bs]) {
                table.caching_stopped = true;
                break;
            }
            table.num_cached_blocks = i + 1;
        }
        table.num_cached_blocks - start
    }

    /// A new table for a forked sequence (n > 1 sampling, beams): every full block is shared
    /// (ref_cnt + 1); the partial last block, which both sequences will write, is copied into a fresh
    /// block at once (each branch writes its next token there on the very next step, so a lazy copy
    /// would save nothing). The caller performs `copy` on the device before the next forward.
    /// Precondition: every slot of `table` is computed (fork right after a step; shared full blocks are
    /// never written again). `None` when no block is free for the copy.
    pub fn fork(&mut self, table: &BlockTable) -> Option<Forked> {
        debug_assert_eq!(table.len(), table.num_tokens.div_ceil(self.block_size()));
        self.fork_prefix(table, table.num_tokens)
    }

    /// A new table holding the first `num_tokens` tokens of `table` (all computed): the full blocks among
    /// them shared, the block holding the last `num_tokens % block_size` of them copied (`copy`), as in
    /// [`fork`](Self::fork). This continues a token-level prefix of a finished sequence that the prefix
    /// cache (whole blocks only) does not reach:
    /// ```text
    /// table     [ b0 full ][ b1 full ][ b2 : t32 .. t40 ]       num_tokens = 37
    /// forked    [ b0      ][ b7 <- copy of b2 ]                 holds t0 .. t36, appends at 37
    /// ```
    /// `None` when no block is free for the copy.
    pub fn fork_prefix(&mut self, table: &BlockTable, num_tokens: usize) -> Option<Forked> {
        assert!(num_tokens <= table.num_tokens, "fork_prefix: {num_tokens} tokens of a table of {}", table.num_tokens);
        let num_full = num_tokens / self.block_size();
        let has_partial = !num_tokens.is_multiple_of(self.block_size());
        if has_partial && self.pool.num_free_blocks() == 0 {
            return None;
        }
        let mut block_ids = Vec::with_capacity(num_tokens.div_ceil(self.block_size()));
        for &b in &table.block_ids[..num_full] {
            self.pool.touch(b);
            block_ids.push(b);
        }
        let copy = has_partial.then(|| {
            let dst = self.pool.take_free_block().expect("checked one block is free");
            block_ids.push(dst);
            BlockCopy { src: table.block_ids[num_full], dst }
        });
        let num_cached_blocks = table.num_cached_blocks.min(num_full);
        let forked = BlockTable {
            block_ids,
            block_size: table.block_size,
            num_tokens,
            num_cached_blocks,
            // The block that could not be cached is kept only when the fork reaches past it.
            caching_stopped: table.caching_stopped && num_full > table.num_cached_blocks,
        };
        Some(Forked { table: forked, copy })
    }

    /// Stops caching the table's later blocks: under a KV budget, once a token is evicted the table's
    /// entries no longer follow its tokens, so no later block may be keyed by them.
    pub fn stop_caching(&mut self, table: &mut BlockTable) {
        table.caching_stopped = true;
    }

    /// Compacts a sequence under a KV budget (budget.rs): from the first full block whose live fraction
    /// fell below the threshold, packs the live entries into the front of that range and frees the
    /// blocks left empty. A destination block that is shared or cached is replaced by a fresh one (the
    /// live entries are copied out of it, it is never written); a private one is re-used in place.
    /// Returns the slot moves the device must make (`Backend::kv_move_slots`), `None` when nothing needs
    /// compacting or no block is free for a copy (the holes then wait for a later step).
    /// ```text
    /// before  [ A: 1111 | B: 1001 | C: 0110 | D: 11.. ]      (B below half live: compact from B)
    /// after   [ A: 1111 | B': 1111 | D': 11.. ]             B' = B if private, else a fresh block
    /// ```
    pub fn compact(&mut self, table: &mut BlockTable, st: &mut BudgetState) -> Option<Vec<(u32, u32)>> {
        let bs = self.block_size();
        debug_assert_eq!(table.num_tokens, st.num_entries(), "the table's slots are the budget's entries");
        let first = st.compact_from()?;
        let keep: Vec<usize> = (first * bs..st.num_entries()).filter(|&e| st.is_live(e)).collect();
        let n_blocks = first + keep.len().div_ceil(bs);
        let private = |pool: &BlockPool, b: BlockId| pool.ref_cnt(b) == 1 && pool.block_hash(b).is_none();
        let fresh = (first..n_blocks).filter(|&i| !private(&self.pool, table.block_ids[i])).count();
        if fresh > self.pool.num_free_blocks() {
            return None;
        }
        let old = table.block_ids.clone();
        let mut ids = old[..first].to_vec();
        for &b in &old[first..n_blocks] {
            ids.push(if private(&self.pool, b) { b } else { self.pool.take_free_block().expect("counted free blocks") });
        }
        let moves: Vec<(u32, u32)> = keep
            .iter()
            .enumerate()
            .map(|(k, &e)| (slot_for(&old, bs, e) as u32, slot_for(&ids, bs, first * bs + k) as u32))
            .filter(|(src, dst)| src != dst)
            .collect();
        // the old blocks not re-used in place go back, the last first
        for (i, &b) in old.iter().enumerate().skip(first).rev() {
            if i >= n_blocks || ids[i] != b {
                self.pool.release(b);
            }
        }
        table.block_ids = ids;
        table.num_tokens = first * bs + keep.len();
        table.num_cached_blocks = table.num_cached_blocks.min(first);
        table.caching_stopped = true;
        st.compact(first);
        Some(moves)
    }

    /// Gives the table's blocks back (ref_cnt - 1). Blocks reaching 0 join the free queue tail first, so
    /// a sequence's last block is evicted first and its prefix stays cached longest; cached blocks stay
    /// findable until evicted.
    pub fn free(&mut self, table: BlockTable) {
        debug_assert_eq!(table.block_size, self.block_size(), "table from another pool");
        for &b in table.block_ids.iter().rev() {
            self.pool.release(b);
        }
    }

    pub fn usage(&self) -> KvUsage {
        let pool = &self.pool;
        KvUsage {
            num_blocks: pool.num_blocks(),
            block_size: pool.block_size(),
            used_blocks: pool.num_blocks() - pool.num_free_blocks(),
            free_blocks: pool.num_free_blocks(),
            cached_blocks: pool.num_cached_blocks(),
            evictions: pool.num_evictions(),
            prefix: self.stats,
        }
    }

    /// Checks every invariant given *all* live tables: each block is free (ref_cnt 0, in the free queue)
    /// or held by exactly ref_cnt table entries; the free queue's links and order; the hash table and the
    /// blocks' hashes agree; no leak; each table's shape and its cached blocks' chain. For tests (O(pool)).
    pub fn check_invariants(&self, tables: &[&BlockTable]) -> Result<(), KvError> {
        let bs = self.block_size();
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for (t, table) in tables.iter().enumerate() {
            let fail = |msg: String| Err(KvError::Invariant(format!("table {t}: {msg}")));
            if table.block_size != bs {
                return fail(format!("block_size {} in a pool of {bs}", table.block_size));
            }
            if table.len() != table.num_tokens.div_ceil(bs) {
                return fail(format!("{} blocks for {} tokens", table.len(), table.num_tokens));
            }
            if table.num_cached_blocks > table.num_tokens / bs {
                return fail(format!("{} cached blocks but {} full", table.num_cached_blocks, table.num_tokens / bs));
            }
            for &b in &table.block_ids {
                if b as usize >= refs.len() {
                    return fail(format!("block id {b} out of range"));
                }
                refs[b as usize] += 1;
            }
            let mut sorted = table.block_ids.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return fail("holds a block twice".into());
            }
            self.pool.check_cached_chain(&table.block_ids[..table.num_cached_blocks]).or_else(fail)?;
        }
        self.pool.check(&refs).map_err(KvError::Invariant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(num_blocks: usize, block_size: usize) -> KvCacheManager {
        KvCacheManager::new(KvCacheConfig { num_blocks, block_size, hash_fn: hash_block_tokens }).unwrap()
    }

    #[test]
    fn prefill_free_and_hit() {
        let mut kv = manager(8, 4);
        let tokens: Vec<TokenId> = (0..10).collect();
        let (mut t, n) = kv.find_cached_prefix(&tokens);
        assert_eq!((t.len(), n), (0, 0));
        assert_eq!(kv.allocate_slots(&mut t, &tokens, 0, 10), Some(3));
        assert_eq!(t.slot(5), t.block_ids()[1] as usize * 4 + 1);
        assert_eq!(kv.cache_full_blocks(&mut t, &tokens, 10), 2);
        kv.check_invariants(&[&t]).unwrap();
        kv.free(t);
        kv.check_invariants(&[]).unwrap();
        let (t2, n2) = kv.find_cached_prefix(&tokens);
        assert_eq!((t2.len(), n2), (2, 8));
        assert_eq!(kv.usage().prefix, PrefixCacheStats { requests: 2, queries: 20, hits: 8 });
        kv.check_invariants(&[&t2]).unwrap();
    }

    #[test]
    fn a_fully_cached_prompt_leaves_one_token_to_compute() {
        let mut kv = manager(8, 4);
        let tokens: Vec<TokenId> = (0..8).collect();
        let (mut t, _) = kv.find_cached_prefix(&tokens);
        kv.allocate_slots(&mut t, &tokens, 0, 8).unwrap();
        kv.cache_full_blocks(&mut t, &tokens, 8);
        kv.free(t);
        let (t, n) = kv.find_cached_prefix(&tokens);
        assert_eq!(n, 4, "the last block is recomputed so the last token yields logits");
        kv.free(t);
    }

    #[test]
    fn exhaustion_is_none_and_changes_nothing() {
        let mut kv = manager(2, 4);
        let tokens: Vec<TokenId> = (0..12).collect();
        let mut t = kv.new_table();
        assert_eq!(kv.allocate_slots(&mut t, &tokens, 0, 12), None);
        assert!(t.is_empty());
        assert_eq!(kv.allocate_slots(&mut t, &tokens, 0, 8), Some(2));
        let forked = kv.fork(&t).expect("no partial block: nothing to copy");
        assert_eq!(forked.copy, None);
        kv.free(forked.table);
        kv.allocate_slots(&mut t, &tokens, 8, 0).unwrap();
        assert_eq!(kv.allocate_slots(&mut t, &tokens, 8, 1), None);
    }
}
