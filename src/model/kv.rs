//! A minimal paged KV cache for one sequence: per-layer pools on the backend, a block allocator and the
//! sequence's block table, behind [`Model::forward`](super::Model::forward) (one-shot `run -p`,
//! perplexity, bench, scoring). The engine uses the shared pool with prefix caching (`kv` module) and
//! calls `forward_batch` directly; both speak only block tables and slot mappings.
//!
//! ```text
//! block_table [b0, b1, b2]      token j -> slot block_table[j / block_size] * block_size + j % block_size
//! positions    0..16  16..32  32..len   (the last block may be partly filled)
//! ```
//! Blocks come from a LIFO free list: allocate and free are O(1).

use crate::backend::{Backend, BackendError, KvShape, KvStore};

use super::config::Config;

pub(super) struct SeqKv {
    pub layers: Vec<KvStore>,
    pub block_table: Vec<u32>,
    free: Vec<u32>,
    block_size: usize,
    num_blocks: usize,
}

impl SeqKv {
    /// Pools able to hold `max_tokens` tokens in blocks of `block_size`.
    pub fn new(backend: &dyn Backend, cfg: &Config, max_tokens: usize, block_size: usize) -> Result<SeqKv, BackendError> {
        let num_blocks = max_tokens.div_ceil(block_size).max(1);
        let shape = KvShape { num_blocks, block_size, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim };
        let layers = (0..cfg.n_layers).map(|il| backend.alloc_kv_layer(il, shape)).collect::<Result<Vec<_>, _>>()?;
        // Reversed so blocks are handed out in ascending order (easier to read in dumps).
        let free = (0..num_blocks as u32).rev().collect();
        Ok(SeqKv { layers, block_table: Vec::new(), free, block_size, num_blocks })
    }

    /// Tokens the pools can hold.
    pub fn capacity(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Grows the block table to cover `n_tokens` tokens; `None` when the pool runs out.
    pub fn reserve(&mut self, n_tokens: usize) -> Option<()> {
        while self.block_table.len() * self.block_size < n_tokens {
            let b = self.free.pop()?;
            self.block_table.push(b);
        }
        Some(())
    }

    /// Returns the blocks past the first `n_tokens` tokens to the free list.
    pub fn truncate(&mut self, n_tokens: usize) {
        let keep = n_tokens.div_ceil(self.block_size);
        while self.block_table.len() > keep {
            let b = self.block_table.pop().expect("len > keep");
            self.free.push(b);
        }
    }

    /// The slot of the token at position `pos` (its block must be reserved).
    pub fn slot(&self, pos: usize) -> u32 {
        self.block_table[pos / self.block_size] * self.block_size as u32 + (pos % self.block_size) as u32
    }

    /// Every block is either in the table or free, exactly once.
    pub fn check_invariants(&self) {
        let mut seen = vec![false; self.num_blocks];
        for &b in self.block_table.iter().chain(&self.free) {
            assert!(!std::mem::replace(&mut seen[b as usize], true), "block {b} listed twice");
        }
        assert!(seen.iter().all(|&s| s), "a block is neither used nor free");
    }
}
