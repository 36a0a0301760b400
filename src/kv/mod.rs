//! Paged KV cache bookkeeping: block pool, block tables, prefix cache (DESIGN.md, "KV cache: paged,
//! shared, evictable").
//!
//! Pure Rust, no device types: this module decides *which* block holds *which* tokens; the backend owns
//! the memory (`num_blocks x block_size x n_kv_heads x head_dim` per layer, for K and for V) and the model
//! reads and writes it through the `slot_mapping` and `block_table`s built here. One block id names the
//! same rows in every layer's pool.
//!
//! ## Pieces
//! - [`BlockPool`] (pool.rs): `num_blocks` blocks with `ref_cnt`, an optional `block_hash` and the
//!   tokens of a cached block; the free queue (free_queue.rs) and the prefix-cache table `hash -> block_id`.
//! - [`BlockTable`] (block_table.rs): one sequence's `block_ids`; `slot(pos)` is where the KV of token
//!   position `pos` lives: `block_ids[pos / block_size] * block_size + pos % block_size`.
//! - [`KvCacheManager`] (manager.rs): the API the engine calls, in vLLM's words: `find_cached_prefix`,
//!   `allocate_slots`, `cache_full_blocks`, `fork` / `fork_prefix`, `free`, `usage`, `check_invariants`.
//! - [`KvStorage`] (storage.rs): the one place that owns device memory: one backend [`KvStore`](crate::backend::KvStore) per
//!   layer (K and V, f16), and the block copies that copy-on-write asks for.
//! - prefix.rs: `block_hash = hash(parent block_hash, the block's token ids)`, SipHash with fixed keys.
//!
//! ## Contract
//! - A block is either *free* (`ref_cnt == 0`, in the free queue) or *referenced* by `ref_cnt` block
//!   tables. `free + referenced == num_blocks` at all times (`check_invariants` proves it in tests).
//! - Only *full* blocks whose KV has been computed are *cached* (carry a hash, found by later sequences).
//!   A cached block is immutable until it is evicted. A hit is never trusted on the hash alone: the
//!   stored tokens must equal the query's and the block's parent must be the block matched just before.
//! - Free queue order (front is reused first):
//!   ```text
//!   front -> [ free, no hash (empty) ... ][ free, cached: least recently freed ... most recently ] <- back
//!   ```
//!   so a cached block is reused ("evicted": its hash leaves the table that moment) only when no empty
//!   block remains, and a sequence's blocks are queued tail first, so its last block goes first and a
//!   parent never leaves before its cached children.
//! - Running out of blocks is an `Option::None`, never a panic; the engine preempts or waits.
//!
//! ## Complexity (n = tokens involved, B = block_size)
//! | operation | cost |
//! | --- | --- |
//! | take a free block (pop front, evict its hash) | O(1) |
//! | free a block (ref_cnt - 1, push to a queue end) | O(1) |
//! | touch a cached free block (unlink from the middle of the queue) | O(1) |
//! | `find_cached_prefix(tokens)` | O(n): one hash + one table probe + one B-token compare per block |
//! | `allocate_slots` | O(new blocks + newly full blocks x B) |
//! | `fork(table)`, `fork_prefix(table, n)` | O(blocks in the table) |
//! | `free(table)` | O(blocks in the table) |
//! | `check_invariants` | O(num_blocks x B + table entries), tests only |
//!
//! Table probes are O(1) expected (`HashMap`); the free queue is an index-linked doubly linked list in
//! two `Vec<u32>`s (prev/next), so no operation allocates after construction except a table's own `Vec`.
//!
//! ## Sliding-window layers (Gemma-3)
//! Local (sliding-window) layers use the same block tables as global ones: the attention kernel masks the
//! positions that left the window. We keep every block of a sequence, so its whole prefix stays reusable
//! by later turns; nothing here evicts blocks by position.
//!
//! ## KV budgets (opt-in)
//! budget.rs: `--kv-budget N --kv-policy sinks|h2o` bounds the tokens a sequence keeps: eviction clears
//! live bits in the sequence's own masks (the kernels skip holes), `KvCacheManager::compact` packs the
//! survivors and frees blocks, copying shared or cached blocks instead of writing them.

mod block_table;
mod budget;
mod free_queue;
mod manager;
mod pool;
mod prefix;
mod storage;

pub use block_table::{slot_for, BlockTable};
pub use budget::{BudgetState, KvBudget, KvPolicy, COMPACT_BELOW, DEFAULT_RECENT, DEFAULT_SINKS};
pub use manager::{BlockCopy, Forked, KvCacheConfig, KvCacheManager, KvUsage, PrefixCacheStats};
pub use pool::BlockPool;
pub use prefix::{hash_block_tokens, BlockHash, HashFn};
pub use storage::{KvStorage, KV_ELEM_BYTES};


/// Index of a block in the pool: `0..num_blocks`, the same in every layer.
pub type BlockId = u32;

/// A token id, as the tokenizer gives it.
pub type TokenId = u32;

/// Default tokens per block (DESIGN.md).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Errors of the cache's configuration, and invariant violations found by `check_invariants`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("the KV pool needs at least one block: pass a larger --kv-mem or --ctx")]
    NoBlocks,
    #[error("block_size must be at least 1 token (the default is {DEFAULT_BLOCK_SIZE})")]
    ZeroBlockSize,
    #[error("{0} KV blocks exceed the limit of {max}: pass a larger block size or a smaller --kv-mem",
        max = u32::MAX - 1)]
    TooManyBlocks(usize),
    #[error("KV cache invariant violated: {0}")]
    Invariant(String),
}
