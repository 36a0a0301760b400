//! A sequence's block table and the slot mapping.
//!
//! ```text
//! positions:   0 ........ 15 | 16 ....... 31 | 32 .. 40 (num_tokens = 41, block_size = 16)
//! block_ids:   [    7        ,      2        ,    9     ]
//! slot(pos):   7*16 + pos    | 2*16 + pos-16 | 9*16 + pos-32
//!              `--------- full, shared ------'  `private partial block'
//! ```
//!
//! Only [`KvCacheManager`](super::KvCacheManager) changes a table (it holds one reference on each listed
//! block); the engine reads it to build `slot_mapping` and the `block_tables` of a forward batch.

use std::ops::Range;

use super::BlockId;

/// `block_ids[pos / block_size] * block_size + pos % block_size`: the pool row holding position `pos`.
pub fn slot_for(block_ids: &[BlockId], block_size: usize, pos: usize) -> usize {
    block_ids[pos / block_size] as usize * block_size + pos % block_size
}

/// One sequence's blocks, in position order. Created empty ([`BlockTable::new`]) or by
/// `find_cached_prefix`/`fork`; returned to the pool with `free`.
#[derive(Debug, PartialEq, Eq)]
pub struct BlockTable {
    pub(crate) block_ids: Vec<BlockId>,
    pub(crate) block_size: usize,
    /// Token slots allocated: `block_ids.len() == num_tokens.div_ceil(block_size)`.
    pub(crate) num_tokens: usize,
    /// The leading `num_cached_blocks` blocks are in the prefix cache (or were matched from it).
    pub(crate) num_cached_blocks: usize,
    /// Set when a block could not be cached (an equal block already was, or a hash collision): the
    /// blocks after it would be unreachable, so caching stops for this table.
    pub(crate) caching_stopped: bool,
}

impl BlockTable {
    /// An empty table for a pool of `block_size`-token blocks.
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be at least 1");
        BlockTable { block_ids: Vec::new(), block_size, num_tokens: 0, num_cached_blocks: 0, caching_stopped: false }
    }

    pub fn block_ids(&self) -> &[BlockId] {
        &self.block_ids
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.block_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.block_ids.is_empty()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Token slots allocated (computed or about to be).
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Leading blocks that are in the prefix cache.
    pub fn num_cached_blocks(&self) -> usize {
        self.num_cached_blocks
    }

    /// The pool row of position `pos` (`pos < num_tokens`).
    pub fn slot(&self, pos: usize) -> usize {
        debug_assert!(pos < self.num_tokens, "position {pos} beyond the {} allocated slots", self.num_tokens);
        slot_for(&self.block_ids, self.block_size, pos)
    }

    /// Appends the slots of `positions` to `out` (the forward batch's `slot_mapping`).
    pub fn slot_mapping(&self, positions: Range<usize>, out: &mut Vec<usize>) {
        out.extend(positions.map(|pos| self.slot(pos)));
    }
}
