//! Device scratch of the CUDA backend: arrays grown on demand, and the host lists (tokens, positions,
//! slot mapping, block tables...) uploaded per op, skipped when equal to the last upload of their kind.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::dptr;

/// A device array grown on demand (never shrunk).
pub(super) struct Grow<T>(pub(super) Option<CudaSlice<T>>);

impl<T: DeviceRepr + ValidAsZeroBits> Grow<T> {
    /// The array, at least `len` long; `before_free` runs before an old array is freed (queued
    /// launches may still read it: the caller flushes them).
    pub(super) fn ensure(&mut self, stream: &Arc<CudaStream>, len: usize, before_free: &dyn Fn()) -> u64 {
        if self.0.as_ref().is_none_or(|s| s.len() < len) {
            if self.0.is_some() {
                before_free();
            }
            self.0 = None;
            let s = stream.alloc_zeros::<T>(len.max(1)).unwrap_or_else(|e| panic!("cuda scratch of {len} elements: {e}"));
            self.0 = Some(s);
        }
        dptr(self.0.as_ref().expect("just set"), stream)
    }
}

/// The last host list uploaded for one purpose, and its device copy.
pub(super) struct Upload {
    pub(super) host: Vec<u32>,
    pub(super) dev: Grow<u32>,
    /// The queue epoch in which the device copy was last handed out (graph.rs).
    pub(super) epoch: u64,
}

impl Upload {
    pub(super) fn current(&self, data: &[u32]) -> bool {
        self.dev.0.is_some() && self.host == data
    }

    pub(super) fn put(&mut self, stream: &Arc<CudaStream>, data: &[u32], before_free: &dyn Fn()) -> u64 {
        if let Some(d) = &self.dev.0 {
            if self.host == data {
                return dptr(d, stream);
            }
        }
        let ptr = self.dev.ensure(stream, data.len().next_power_of_two(), before_free);
        if !data.is_empty() {
            let dev = self.dev.0.as_mut().expect("ensured");
            stream.memcpy_htod(data, &mut dev.slice_mut(..data.len())).unwrap_or_else(|e| panic!("cuda upload: {e}"));
        }
        self.host.clear();
        self.host.extend_from_slice(data);
        ptr
    }
}

/// What each kind of host list is uploaded as.
#[derive(Clone, Copy)]
pub(super) enum Tag {
    Tokens,
    Positions,
    Slots,
    Rows,
    AttnRows,
    AttnBt,
    AttnLive,
    AttnScoreSeqs,
    FreqFactors,
    Moves,
}
pub(super) const N_TAGS: usize = 10;

/// Scratch arrays, behind one lock (ops take `&self`).
pub(super) struct Scratch {
    pub(super) qa: Grow<i8>,
    pub(super) da: Grow<f32>,
    pub(super) sa: Grow<i32>,
    pub(super) ss: Grow<f32>,
    /// The Q8_K activations of an `mmq_*` product in `mmq_pack`'s layout.
    pub(super) mmq_act: Grow<i8>,
    pub(super) wf16: Grow<u16>,
    pub(super) xf16: Grow<u16>,
    pub(super) part_o: Grow<f32>,
    pub(super) part_ml: Grow<f32>,
    /// Each row's greedy token (`argmax_rows`).
    pub(super) picks: Grow<u32>,
    /// `[n_heads x ctx_len]` per query row that wants its probabilities: its within-split weights.
    pub(super) weights: Grow<f32>,
    /// `[2 x moves x token_width]` the K and V rows of `kv_move_slots`' sources.
    pub(super) moved: Grow<u16>,
    pub(super) up: [Upload; N_TAGS],
}

