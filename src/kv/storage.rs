//! The KV pool's device memory: one [`KvStore`] per layer, allocated by the backend, each
//! `num_blocks x block_size x n_kv_heads x head_dim` for K and again for V (f16). The bookkeeping
//! ([`KvCacheManager`](super::KvCacheManager)) names blocks; this file holds what they name. A block id
//! means the same rows in every layer.
//!
//! Sizing: one block costs `n_layers x block_size x n_kv_heads x head_dim x 2 (K, V) x 2 bytes`, so a
//! memory budget of `M` bytes holds `M / that` blocks ([`KvStorage::blocks_for_bytes`]).

use crate::backend::{Backend, BackendError, KvShape, KvStore};

use super::BlockCopy;

/// Bytes of one K (or V) element in the pools (f16).
pub const KV_ELEM_BYTES: usize = 2;

/// Every layer's K/V pool.
pub struct KvStorage {
    layers: Vec<KvStore>,
    shape: KvShape,
}

impl KvStorage {
    /// `n_layers` pools of `shape`, zero-filled; an allocation the device cannot make is an error.
    pub fn new(backend: &dyn Backend, n_layers: usize, shape: KvShape) -> Result<KvStorage, BackendError> {
        let layers = (0..n_layers).map(|il| backend.alloc_kv_layer(il, shape)).collect::<Result<Vec<_>, _>>()?;
        Ok(KvStorage { layers, shape })
    }

    /// Bytes one block takes over all layers, K and V.
    pub fn bytes_per_block(n_layers: usize, shape: KvShape) -> usize {
        n_layers * shape.block_size * shape.token_width() * 2 * KV_ELEM_BYTES
    }

    /// How many blocks of `shape` fit in `bytes` over `n_layers` layers.
    pub fn blocks_for_bytes(bytes: usize, n_layers: usize, shape: KvShape) -> usize {
        bytes / Self::bytes_per_block(n_layers, shape).max(1)
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Bytes held, all layers, K and V.
    pub fn bytes(&self) -> usize {
        self.shape.num_blocks * Self::bytes_per_block(self.layers.len(), self.shape)
    }

    /// The per-layer pools, as the forward pass takes them.
    pub fn layers_mut(&mut self) -> &mut [KvStore] {
        &mut self.layers
    }

    /// Moves slots in every layer (a budget's compaction), all sources read first.
    pub fn move_slots(&mut self, backend: &dyn Backend, moves: &[(u32, u32)]) {
        if moves.is_empty() {
            return;
        }
        for layer in &mut self.layers {
            backend.kv_move_slots(layer, moves);
        }
    }

    /// Performs copy-on-write copies in every layer.
    pub fn copy_blocks(&mut self, backend: &dyn Backend, copies: &[BlockCopy]) {
        if copies.is_empty() {
            return;
        }
        let pairs: Vec<(u32, u32)> = copies.iter().map(|c| (c.src, c.dst)).collect();
        for layer in &mut self.layers {
            backend.kv_copy_blocks(layer, &pairs);
        }
    }
}
