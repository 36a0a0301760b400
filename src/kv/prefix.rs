//! Block hashes for the prefix cache.
//!
//! A full block's hash is `hash(parent block's hash, the block's token ids)`, so two sequences with equal
//! prefixes produce equal hash chains and the k-th block of one finds the k-th block of the other.
//!
//! ```text
//! tokens:  [ t0 .. t15 ][ t16 .. t31 ][ t32 .. t40 ]
//! hash:     h0 = H(None, t0..t15)
//!                        h1 = H(Some(h0), t16..t31)
//!                                      (partial: no hash, never cached)
//! ```
//!
//! The hash is only a key: a hit is verified against the block's stored tokens and its parent block
//! (pool.rs), so a collision costs a miss, never a wrong block. That is also why the hash function is a
//! parameter ([`HashFn`]): tests force collisions with a tiny one.

use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::TokenId;

/// The prefix-cache key of one full block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// `hash(parent block hash, block tokens)`; `parent` is `None` for a sequence's first block.
pub type HashFn = fn(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash;

/// The default [`HashFn`]: SipHash-1-3 (std's `DefaultHasher`) with its fixed zero keys, so hashes are
/// the same on every run of a build. 64 bits; collisions are handled by verification, not assumed away.
pub fn hash_block_tokens(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.map(|p| p.0).hash(&mut h);
    tokens.hash(&mut h);
    BlockHash(h.finish())
}

/// The table's keys are hashes already: pass them through instead of hashing them again.
#[derive(Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if a key type other than `BlockHash` is used; fold the bytes in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub(crate) type BuildPassThrough = BuildHasherDefault<PassThroughHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_parent_and_tokens() {
        let a = hash_block_tokens(None, &[1, 2, 3, 4]);
        assert_eq!(a, hash_block_tokens(None, &[1, 2, 3, 4]));
        assert_ne!(a, hash_block_tokens(None, &[1, 2, 3, 5]));
        assert_ne!(a, hash_block_tokens(Some(BlockHash(0)), &[1, 2, 3, 4]));
        assert_ne!(hash_block_tokens(Some(a), &[9]), hash_block_tokens(Some(BlockHash(a.0 ^ 1)), &[9]));
    }
}
