//! The block pool: per-block `ref_cnt` and prefix-cache state, the free queue and the hash table.
//!
//! Every operation here is O(1) except `lookup`/`cache`, which hash and compare one block's tokens
//! (O(block_size)), and `check`, which tests call. The pool never sees a sequence: the manager passes
//! block ids and token slices.
//!
//! Why a hit checks the parent too, not only the tokens: with `H(parent, tokens)` a collision can pair a
//! block's own tokens with another parent. Sequences `[X, Y]` and `[W, Y]` share the tokens of their second
//! block; if `H(hX, Y) == H(hW, Y)`, the `[W, Y]` lookup would find the `Y` block computed after `X`, whose
//! KV is wrong for `W`. So each cached block records its parent (block id and that block's generation),
//! and a hit must descend from the block matched just before it.

use std::collections::HashMap;

use super::free_queue::FreeQueue;
use super::prefix::{BlockHash, BuildPassThrough, HashFn};
use super::{BlockId, KvError, TokenId};

/// The block a cached block was computed after. `generation` guards against the parent having been
/// reused since (cannot happen while the queue order holds; checked anyway, it costs one compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ParentLink {
    block_id: BlockId,
    generation: u32,
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    /// Number of block tables holding this block; 0 means it is in the free queue.
    ref_cnt: u32,
    /// `Some(h)` exactly while the block is in the prefix cache, and then `table[h] == this block`.
    hash: Option<BlockHash>,
    /// For a cached block: the block before it (`None` for a sequence's first block).
    parent: Option<ParentLink>,
    /// Bumped each time the block is taken for new contents.
    generation: u32,
}

/// `num_blocks` blocks of `block_size` token slots. See the module docs of `kv` for the queue order.
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    /// `num_blocks x block_size`: the token ids of each cached block (rows of other blocks are stale).
    tokens: Vec<TokenId>,
    free: FreeQueue,
    /// Prefix cache: hash -> the one cached block with that hash.
    table: HashMap<BlockHash, BlockId, BuildPassThrough>,
    hash_fn: HashFn,
    num_evictions: u64,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: usize, block_size: usize, hash_fn: HashFn) -> Result<Self, KvError> {
        if num_blocks == 0 {
            return Err(KvError::NoBlocks);
        }
        if block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        if num_blocks >= u32::MAX as usize {
            return Err(KvError::TooManyBlocks(num_blocks));
        }
        Ok(BlockPool {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks],
            tokens: vec![0; num_blocks * block_size],
            free: FreeQueue::full(num_blocks),
            // At most one entry per block: never grows after this.
            table: HashMap::with_capacity_and_hasher(num_blocks, BuildPassThrough::default()),
            hash_fn,
            num_evictions: 0,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be taken now: empty ones plus cached ones nobody references.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in the prefix cache, referenced or not.
    pub fn num_cached_blocks(&self) -> usize {
        self.table.len()
    }

    /// Cached blocks that were taken for new contents so far.
    pub fn num_evictions(&self) -> u64 {
        self.num_evictions
    }

    pub fn ref_cnt(&self, block_id: BlockId) -> u32 {
        self.blocks[block_id as usize].ref_cnt
    }

    /// `Some` while the block is in the prefix cache.
    pub fn block_hash(&self, block_id: BlockId) -> Option<BlockHash> {
        self.blocks[block_id as usize].hash
    }

    /// The free queue, front (taken next) to back: empty blocks, then cached ones least recently freed first.
    pub fn free_queue_order(&self) -> Vec<BlockId> {
        self.free.iter().collect()
    }

    fn row(&self, b: BlockId) -> &[TokenId] {
        let start = b as usize * self.block_size;
        &self.tokens[start..start + self.block_size]
    }

    fn link_to(&self, parent: Option<BlockId>) -> Option<ParentLink> {
        parent.map(|p| ParentLink { block_id: p, generation: self.blocks[p as usize].generation })
    }

    /// The hash of a full block of `tokens` whose previous block is `parent` (which must be cached).
    fn hash_after(&self, parent: Option<BlockId>, tokens: &[TokenId]) -> BlockHash {
        let parent_hash = parent.map(|p| self.blocks[p as usize].hash.expect("the parent of a cached block is cached"));
        (self.hash_fn)(parent_hash, tokens)
    }

    /// Takes the front of the free queue with `ref_cnt = 1`, evicting it from the prefix cache if it was
    /// cached. `None` when every block is referenced.
    pub(crate) fn take_free_block(&mut self) -> Option<BlockId> {
        let b = self.free.pop_front()?;
        let meta = &mut self.blocks[b as usize];
        debug_assert_eq!(meta.ref_cnt, 0);
        if let Some(h) = meta.hash.take() {
            let removed = self.table.remove(&h);
            debug_assert_eq!(removed, Some(b), "hash table entry of evicted block {b}");
            self.num_evictions += 1;
        }
        meta.parent = None;
        meta.generation = meta.generation.wrapping_add(1);
        meta.ref_cnt = 1;
        Some(b)
    }

    /// One more table holds `b`; a free (cached) block leaves the free queue.
    pub(crate) fn touch(&mut self, b: BlockId) {
        if self.blocks[b as usize].ref_cnt == 0 {
            self.free.remove(b);
        }
        self.blocks[b as usize].ref_cnt += 1;
    }

    /// One table fewer holds `b`. At 0 it joins the free queue: at the back when cached (most recently
    /// used), at the front when empty (nothing to keep, so it is reused before any cached block).
    pub(crate) fn release(&mut self, b: BlockId) {
        let meta = &mut self.blocks[b as usize];
        assert!(meta.ref_cnt > 0, "block {b} freed more often than it was taken");
        meta.ref_cnt -= 1;
        if meta.ref_cnt == 0 {
            if meta.hash.is_some() {
                self.free.push_back(b);
            } else {
                self.free.push_front(b);
            }
        }
    }

    /// The cached block holding exactly `tokens` after `parent` (the block matched just before, `None` for
    /// the first block), verified against its stored tokens and parent link; `None` on a miss.
    pub(crate) fn lookup(&self, parent: Option<BlockId>, tokens: &[TokenId]) -> Option<BlockId> {
        debug_assert_eq!(tokens.len(), self.block_size);
        let b = *self.table.get(&self.hash_after(parent, tokens))?;
        let meta = &self.blocks[b as usize];
        (meta.parent == self.link_to(parent) && self.row(b) == tokens).then_some(b)
    }

    /// Puts the full, computed, referenced block `b` (holding `tokens` after `parent`) into the prefix
    /// cache. `false` when another block already holds its hash (an equal block, or a collision): `b`
    /// stays uncached. A block already cached (shared with a fork that cached it) counts as cached.
    pub(crate) fn cache(&mut self, b: BlockId, parent: Option<BlockId>, tokens: &[TokenId]) -> bool {
        debug_assert_eq!(tokens.len(), self.block_size);
        debug_assert!(self.blocks[b as usize].ref_cnt > 0, "caching free block {b}");
        let h = self.hash_after(parent, tokens);
        if let Some(old) = self.blocks[b as usize].hash {
            debug_assert!(old == h && self.row(b) == tokens, "block {b} cached twice with different contents");
            return true;
        }
        if self.table.contains_key(&h) {
            return false;
        }
        self.table.insert(h, b);
        let link = self.link_to(parent);
        let meta = &mut self.blocks[b as usize];
        meta.hash = Some(h);
        meta.parent = link;
        let start = b as usize * self.block_size;
        self.tokens[start..start + self.block_size].copy_from_slice(tokens);
        true
    }

    /// `ids` are a table's leading cached blocks: each is cached and descends from the one before it.
    pub(crate) fn check_cached_chain(&self, ids: &[BlockId]) -> Result<(), String> {
        for (i, &b) in ids.iter().enumerate() {
            let meta = &self.blocks[b as usize];
            let parent = if i == 0 { None } else { Some(ids[i - 1]) };
            if meta.hash.is_none() || meta.parent != self.link_to(parent) {
                return Err(format!("table block {i} (id {b}) is not cached after {parent:?}: {meta:?}"));
            }
        }
        Ok(())
    }

    /// Every invariant, given `refs[b]` = the number of table entries naming block `b`.
    pub(crate) fn check(&self, refs: &[u32]) -> Result<(), String> {
        self.free.check()?;
        let mut referenced = 0;
        for (b, meta) in self.blocks.iter().enumerate() {
            if meta.ref_cnt != refs[b] {
                return Err(format!("block {b}: ref_cnt {} but {} tables hold it", meta.ref_cnt, refs[b]));
            }
            let queued = self.free.contains(b as BlockId);
            if (meta.ref_cnt == 0) != queued {
                return Err(format!("block {b}: ref_cnt {} but in the free queue = {queued}", meta.ref_cnt));
            }
            referenced += usize::from(meta.ref_cnt > 0);
        }
        if referenced + self.free.len() != self.blocks.len() {
            let (free, total) = (self.free.len(), self.blocks.len());
            return Err(format!("leak: {referenced} referenced + {free} free != {total} blocks"));
        }
        self.check_cache()?;
        self.check_queue_order()
    }

    /// Table entries and block hashes agree one to one; each cached block's hash is the hash of its stored
    /// tokens after its parent, and its parent is still the cached block it was computed after.
    fn check_cache(&self) -> Result<(), String> {
        for (&h, &b) in &self.table {
            if self.blocks[b as usize].hash != Some(h) {
                return Err(format!("table maps {h:?} to block {b} whose hash is {:?}", self.blocks[b as usize].hash));
            }
        }
        let mut num_hashed = 0;
        for (b, meta) in self.blocks.iter().enumerate() {
            let Some(h) = meta.hash else { continue };
            num_hashed += 1;
            if let Some(link) = meta.parent {
                let parent = &self.blocks[link.block_id as usize];
                if parent.generation != link.generation || parent.hash.is_none() {
                    return Err(format!("cached block {b} outlived its parent {}", link.block_id));
                }
            }
            let expect = self.hash_after(meta.parent.map(|l| l.block_id), self.row(b as BlockId));
            if expect != h {
                return Err(format!("block {b}: stored hash {h:?}, its tokens hash to {expect:?}"));
            }
        }
        if num_hashed != self.table.len() {
            return Err(format!("{num_hashed} blocks carry a hash, the table has {} entries", self.table.len()));
        }
        Ok(())
    }

    /// Front to back: empty blocks, then cached ones; a free cached block's free parent sits behind it,
    /// so children are evicted before parents.
    fn check_queue_order(&self) -> Result<(), String> {
        let mut pos = vec![usize::MAX; self.blocks.len()];
        let mut seen_cached = false;
        for (i, b) in self.free.iter().enumerate() {
            pos[b as usize] = i;
            let cached = self.blocks[b as usize].hash.is_some();
            if seen_cached && !cached {
                return Err(format!("free queue: empty block {b} behind a cached block"));
            }
            seen_cached |= cached;
        }
        for (b, meta) in self.blocks.iter().enumerate() {
            if let (Some(link), true) = (meta.parent, pos[b] != usize::MAX) {
                let p = pos[link.block_id as usize];
                if p != usize::MAX && p < pos[b] {
                    return Err(format!("free queue: parent {} would be evicted before its child {b}", link.block_id));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hash_block_tokens;

    #[test]
    fn empty_blocks_are_reused_before_cached_ones() {
        let mut pool = BlockPool::new(3, 2, hash_block_tokens).unwrap();
        let mut take = || pool.take_free_block().unwrap();
        let (a, b, c) = (take(), take(), take());
        assert_eq!(pool.take_free_block(), None);
        assert!(pool.cache(a, None, &[1, 2]));
        pool.release(a);
        pool.release(b);
        pool.release(c);
        assert_eq!(pool.free_queue_order(), [c, b, a]);
        pool.check(&[0, 0, 0]).unwrap();
        assert_eq!(pool.lookup(None, &[1, 2]), Some(a));
        assert_eq!(pool.take_free_block(), Some(c));
        assert_eq!(pool.take_free_block(), Some(b));
        assert_eq!(pool.num_evictions(), 0);
        assert_eq!(pool.take_free_block(), Some(a));
        assert_eq!(pool.num_evictions(), 1);
        assert_eq!(pool.lookup(None, &[1, 2]), None);
        pool.check(&[1, 1, 1]).unwrap();
    }

    /// The queue order keeps parents behind their children, so a parent is never reused under a cached
    /// child; break the order by hand and the generation check still refuses the orphan.
    #[test]
    fn an_orphaned_child_is_never_a_hit() {
        fn first_token(_: Option<BlockHash>, t: &[TokenId]) -> BlockHash {
            BlockHash(u64::from(t[0]))
        }
        let mut pool = BlockPool::new(2, 2, first_token).unwrap();
        let (p, c) = (pool.take_free_block().unwrap(), pool.take_free_block().unwrap());
        assert!(pool.cache(p, None, &[1, 1]) && pool.cache(c, Some(p), &[2, 2]));
        assert_eq!(pool.lookup(Some(p), &[2, 2]), Some(c));
        pool.release(p); // parent first: the wrong order
        pool.release(c);
        assert!(pool.check(&[0, 0]).unwrap_err().contains("evicted before its child"));
        assert_eq!(pool.take_free_block(), Some(p));
        assert!(pool.cache(p, None, &[1, 9]), "same hash as [1, 1], other contents");
        assert_eq!(pool.lookup(Some(p), &[2, 2]), None, "c was computed after [1, 1], not [1, 9]");
        assert!(pool.check(&[1, 0]).unwrap_err().contains("outlived its parent"));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(BlockPool::new(0, 16, hash_block_tokens).err(), Some(KvError::NoBlocks));
        assert_eq!(BlockPool::new(4, 0, hash_block_tokens).err(), Some(KvError::ZeroBlockSize));
    }
}
