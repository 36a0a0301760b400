//! Paged attention on the CPU: K/V in f16 pools addressed through block tables.
//!
//! ```text
//! pool (K, and V alike)  [num_slots x n_kv_heads x head_dim] f16,  slot = block_id * block_size + offset
//! query row t of sequence s is at position pos = ctx_len - n_q + (t - q_start); it sees keys
//!     j in lo ..= pos,   lo = 0, or pos + 1 - window for a sliding window (p - j < window)
//! ```
//! One task per (query token, head): scores over its visible keys in position order, softmax (sum in
//! f64, as ggml), then the V rows weighted in the same order. Nothing depends on which other queries
//! share the call, so prefill, chunked prefill and decode give a token the same result.
//!
//! Like llama.cpp's attention over an f16 cache (no flash attention), Q is rounded to f16 before the
//! `q . k` products and the softmax weights are rounded to f16 before they weight V: ggml multiplies
//! f16 by f16 there. Mirroring it keeps pagellm's logits closest to llama.cpp's.

use half::f16;
use rayon::prelude::*;

use super::kernels::Kernels;
use crate::backend::{AttnParams, AttnSeq, KvShape};

/// One layer's K and V pools.
pub(super) struct CpuKv {
    pub k: Vec<u16>,
    pub v: Vec<u16>,
}

impl CpuKv {
    pub fn new(shape: KvShape) -> CpuKv {
        let n = shape.num_slots() * shape.token_width();
        CpuKv { k: vec![0; n], v: vec![0; n] }
    }
}

/// Stores token `t`'s K and V rows (f32, rounded to f16) in slot `slot_mapping[t]`.
pub(super) fn kv_write(kv: &mut CpuKv, shape: KvShape, k: &[f32], v: &[f32], slot_mapping: &[u32]) {
    let w = shape.token_width();
    for (t, &slot) in slot_mapping.iter().enumerate() {
        let slot = slot as usize;
        assert!(slot < shape.num_slots(), "kv_write: slot {slot} outside a pool of {} slots", shape.num_slots());
        let dst = slot * w..(slot + 1) * w;
        for (o, &x) in kv.k[dst.clone()].iter_mut().zip(&k[t * w..(t + 1) * w]) {
            *o = f16::from_f32(x).to_bits();
        }
        for (o, &x) in kv.v[dst].iter_mut().zip(&v[t * w..(t + 1) * w]) {
            *o = f16::from_f32(x).to_bits();
        }
    }
}

/// See the module doc. `q` and `out` are `[n_tokens x n_heads x head_dim]`.
pub(super) fn attention(
    kern: &Kernels,
    q: &[f32],
    kv: &CpuKv,
    shape: KvShape,
    seqs: &[AttnSeq],
    p: &AttnParams,
    out: &mut [f32],
) {
    let (hd, n_heads) = (p.head_dim, p.n_heads);
    assert!(shape.head_dim == hd && shape.n_kv_heads == p.n_kv_heads && n_heads % p.n_kv_heads == 0);
    let group = n_heads / p.n_kv_heads;
    let bs = shape.block_size;

    // (sequence, position) of every query row; rows outside every sequence are left alone.
    let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
    let mut row_of: Vec<Option<(usize, usize)>> = vec![None; n_rows];
    for (si, s) in seqs.iter().enumerate() {
        assert!(s.n_q <= s.ctx_len && s.block_table.len() * bs >= s.ctx_len, "attention: block table too short");
        for i in 0..s.n_q {
            row_of[s.q_start + i] = Some((si, s.ctx_len - s.n_q + i));
        }
    }
    assert!(q.len() >= n_rows * n_heads * hd && out.len() >= n_rows * n_heads * hd);

    out[..n_rows * n_heads * hd].par_chunks_mut(hd).enumerate().for_each_init(|| (Vec::new(), Vec::new()), |(scores, qv), (idx, o)| {
        let (t, h) = (idx / n_heads, idx % n_heads);
        let Some((si, pos)) = row_of[t] else { return };
        let bt = seqs[si].block_table;
        let g = h / group;
        qv.clear();
        qv.extend(q[idx * hd..(idx + 1) * hd].iter().map(|&x| f16::from_f32(x).to_f32()));
        let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let row = |j: usize| {
            let slot = bt[j / bs] as usize * bs + j % bs;
            (slot * p.n_kv_heads + g) * hd
        };

        // scores = scale * q . k_j
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in lo..=pos {
            let r = row(j);
            let s = (kern.dot_f16)(&kv.k[r..r + hd], qv) * p.scale;
            max = max.max(s);
            scores.push(s);
        }
        // softmax, summed in f64 like ggml
        let mut sum = 0.0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let inv = (1.0 / sum) as f32;
        // out = sum_j p_j v_j
        o.fill(0.0);
        for (j, &e) in (lo..=pos).zip(scores.iter()) {
            let r = row(j);
            (kern.axpy_f16)(o, f16::from_f32(e * inv).to_f32(), &kv.v[r..r + hd]);
        }
    });
}
