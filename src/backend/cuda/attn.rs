//! [`Backend::attention`] on the GPU: which kernel variant a call takes, and its launches.

use super::attn_meta::attn_meta;
use super::scratch::Tag;
use super::{blocks, dptr, kv_ref, CudaBackend, A, ATTN_THREADS, ATTN_THREADS_W4};
use crate::backend::{AttnParams, AttnSeq, Buffer, KvStore};

/// The head-dim-128 attention kernel `PAGELLM_CUDA_ATTN` forces (`g4c64`: 4 query heads per CTA;
/// `g2c64`: 2; `g2c128`: 2, staging 128 keys at a time; `w16`: 4 with 16 warps; `a4c64`: 4 with 4 warps,
/// K/V staged by cp.async; sm_80+, ignored below), with its heads per CTA and threads. Unset, each call
/// picks g2c128 when g4 would leave SMs idle (g4 itself when the group has 2 heads or fewer), else a4c64 on
/// sm_80+ ([`CudaBackend::attention`]): for a decode step of one sequence at 4096 keys on the H200, g2c64 is
/// 11% faster than g4 and g2c128 3% faster than g2c64; with many CTAs both are slower, and a4c64 (4 CTAs of
/// 4 warps per SM on the H200, each thread's weighted sum over 4 heads) takes 20% less time than g4 at 16 x
/// 4096 (bench/GPU_NOTES.md, session 4, call 85 and session 11).
pub(super) fn attn128() -> Option<(&'static str, usize, u32)> {
    match std::env::var("PAGELLM_CUDA_ATTN").as_deref() {
        Ok("g4c64") => Some(("attn_hd128", 4, ATTN_THREADS)),
        Ok("g2c64") => Some(("attn_hd128_g2c64", 2, ATTN_THREADS)),
        Ok("w16") => Some(("attn_hd128_w16", 4, 512)),
        Ok("g2c128") => Some(("attn_hd128_g2c128", 2, ATTN_THREADS)),
        Ok("a4c64") => Some(("attn_hd128_a4c64", 4, ATTN_THREADS_W4)),
        _ => None,
    }
}

impl CudaBackend {
    /// [`Backend::attention`]: kernels/attention.cu over the lists of [`attn_meta`].
    pub(super) fn attend(&self, q: &Buffer, kv: &KvStore, seqs: &[AttnSeq], p: &AttnParams, out: &mut Buffer, scores: Option<(&mut Buffer, usize)>) {
        let shape = kv.shape();
        let (hd, n_heads, n_kv) = (p.head_dim, p.n_heads, p.n_kv_heads);
        assert!(shape.head_dim == hd && shape.n_kv_heads == n_kv && n_heads % n_kv == 0);
        let bs = shape.block_size;
        let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
        if n_rows == 0 {
            return;
        }
        assert!(q.len() >= n_rows * n_heads * hd && out.len() >= n_rows * n_heads * hd, "attention: buffers too small");
        let (scores_p, scores_out) = match &scores {
            Some((b, base)) => (self.p(b), Some((*base, b.len()))),
            None => (0, None),
        };
        let meta = attn_meta(seqs, p, bs, scores_out);
        if let Some(&b) = meta.bt.iter().find(|&&b| b as usize >= shape.num_blocks) {
            panic!("attention: block {b} outside a pool of {} blocks", shape.num_blocks);
        }
        let n_splits = meta.n_splits;
        let group = n_heads / n_kv;

        let c = kv_ref(kv);
        let (kp, vp) = (dptr(&c.k, &self.stream), dptr(&c.v, &self.stream));
        let (qp, op) = (self.p(q), self.p(out));
        let mut s = self.lock();
        let rows_p = self.upload(&mut s, Tag::AttnRows, &meta.rows);
        let bt_p = self.upload(&mut s, Tag::AttnBt, &meta.bt);
        let live_p = if meta.live.is_empty() { 0 } else { self.upload(&mut s, Tag::AttnLive, &meta.live) };
        let (po, pml) = if n_splits > 1 {
            let po = s.part_o.ensure(&self.stream, n_rows * n_heads * n_splits * hd, &self.flusher());
            (po, s.part_ml.ensure(&self.stream, n_rows * n_heads * n_splits * 4, &self.flusher()))
        } else {
            (0, 0)
        };
        let wp = if meta.weights_len > 0 { s.weights.ensure(&self.stream, meta.weights_len, &self.flusher()) } else { 0 };
        let args = [
            A::P(qp),
            A::P(kp),
            A::P(vp),
            A::P(rows_p),
            A::P(bt_p),
            A::P(live_p),
            A::I(n_heads as i32),
            A::I(n_kv as i32),
            A::I(bs as i32),
            A::F(p.scale),
            A::I(n_splits as i32),
            A::P(op),
            A::P(po),
            A::P(pml),
            A::P(wp),
        ];
        // 4 query heads per CTA (one head per CTA, 4x the CTAs, measured slower for one sequence at
        // depth 4096 on the H200: bench/GPU_NOTES.md session 3); 2 when 4 leave SMs idle, with 128-key
        // chunks (one sequence at 4096 keys: 29.2 vs 30.2 us g2c64 vs 34.7 us g4, call 85); else 4 warps
        // a CTA (16 x 4096: 85 vs 107 us, 4 x 4096: 30.7 vs 32.5; session 11). All give the same values.
        let ctas_g4 = n_rows * n_kv * group.div_ceil(4) * n_splits;
        let (name, g, threads) = match self.attn128 {
            Some((name, g, threads)) if hd == 128 => (name.to_string(), g, threads),
            None if hd == 128 && group > 2 && ctas_g4 < self.sms => ("attn_hd128_g2c128".to_string(), 2, ATTN_THREADS),
            None if hd == 128 && self.attn_async && ctas_g4 >= self.sms => ("attn_hd128_a4c64".to_string(), 4, ATTN_THREADS_W4),
            _ => (format!("attn_hd{hd}"), 4, ATTN_THREADS),
        };
        let grid = (n_rows as u32, (n_kv * group.div_ceil(g)) as u32, n_splits as u32);
        self.launch(&name, grid, threads, &args);
        // when every row has splits to merge and the next product of `out` takes Q8 blocks, the merge
        // writes them too (its 32-dim blocks lie inside a head); recorded after the call's last launch
        let k = n_heads * hd;
        let quantize = matches!(self.quant_hint(op, k), Some((_, 1))) && meta.min_splits > 1 && hd.is_multiple_of(32) && n_rows <= self.int_tokens(1);
        if n_splits > 1 {
            let [qa, da, sa, ss] = if quantize { self.quant_scratch(&mut s, n_rows, k) } else { [0; 4] };
            let args = [A::P(po), A::P(pml), A::P(rows_p), A::I(n_heads as i32), A::I(hd as i32), A::I(n_splits as i32), A::P(op)];
            let q = [A::P(qa), A::P(da), A::P(sa), A::P(ss), A::I(quantize as i32)];
            self.launch("attn_merge", ((n_rows * n_heads) as u32, 1, 1), hd as u32, &[&args[..], &q[..]].concat());
        }
        // the probabilities, summed over heads and rows in the CPU's order (every element written)
        if !meta.score_seqs.is_empty() {
            let seqs_p = self.upload(&mut s, Tag::AttnScoreSeqs, &meta.score_seqs);
            let args = [
                A::P(rows_p),
                A::P(seqs_p),
                A::P(live_p),
                A::P(wp),
                A::P(pml),
                A::I(n_heads as i32),
                A::I(n_kv as i32),
                A::I(bs as i32),
                A::I(n_splits as i32),
                A::P(scores_p),
            ];
            let grid = (blocks(meta.max_score_ctx, 128), n_kv as u32, (meta.score_seqs.len() / 5) as u32);
            self.launch("attn_scores", grid, 128, &args);
        }
        if quantize {
            self.set_quantized(op, n_rows, k, 1);
        }
    }
}
