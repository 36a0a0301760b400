//! Paged attention on the CPU: K/V in f16 pools addressed through block tables, for decode (one query
//! token per sequence, many sequences) and prefill (new tokens over the cached prefix and themselves)
//! alike.
//!
//! ```text
//! pool (K, and V alike)  [num_slots x n_kv_heads x head_dim] f16,  slot = block_id * block_size + offset
//! query row t of sequence s is at position pos = ctx_len - n_q + (t - q_start); it sees keys
//!     j in lo ..= pos,   lo = 0, or pos + 1 - window for a sliding window (p - j < window)
//! those keys are cut into splits of SPLIT_TOKENS, counted from lo:
//!     [lo, lo + S) [lo + S, lo + 2S) ... [.., pos]          S = SPLIT_TOKENS
//! ```
//! **GQA.** The unit of work is one query row and one KV head: each K and V row is read once and serves
//! the `n_heads / n_kv_heads` query heads of its group.
//!
//! **Splits (flash-decoding).** Each split gives, per query head, a partial result normalized on its own:
//! its max score `m`, its exp-sum `l = sum exp(s_j - m)` and `o = sum f16(exp(s_j - m) / l) v_j`. The
//! partials are merged with log-sum-exp weights, as vLLM's paged attention v2 reduces its partitions:
//! ```text
//! M = max(m_a, m_b);  a = l_a exp(m_a - M);  b = l_b exp(m_b - M);  o = o_a a/(a+b) + o_b b/(a+b)
//! ```
//! folded left in split order. A query with at most SPLIT_TOKENS visible keys has one split, and its
//! result is ggml's non-flash attention over an f16 cache exactly: Q rounded to f16 before the `q . k`
//! products, the softmax summed in f64 and its weights rounded to f16 before they weight V (ggml
//! multiplies f16 by f16 there), keys in position order. That keeps pagellm's logits closest to
//! llama.cpp's.
//!
//! **Batch invariance.** Where a split starts and ends depends only on the query's position and the
//! window; every sum runs in position order, and splits merge in order. How the work is spread over
//! threads (all splits of a row in one task when there are many rows, as in prefill; one task per split
//! when there are few, as in decode of a long context) never changes an output bit, so prefill,
//! chunked prefill, decode, and a sequence alone or among others give a token the same result.
//!
//! **Inner loops.** With a SIMD kernel table and a head_dim that is a multiple of 16, a split's scores,
//! exps and weighted V sum run in `attention_simd` (AVX-512F or AVX2, F16C, FMA; or NEON; chosen once
//! per process from the table's ISA); otherwise, and always under `PAGELLM_CPU=scalar`, the per-key loops
//! here, the oracle. Either way each output element's order of operations depends only on the split's
//! keys.

use std::cell::RefCell;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::f16;
use rayon::prelude::*;

use super::attention_simd::{self, SimdAttn};
use super::kernels::Kernels;
use super::elementwise::expf;
use crate::backend::{AttnParams, AttnSeq, KvShape};

/// Keys per split. Fixed, so a token's result never depends on how its batch was formed.
pub const SPLIT_TOKENS: usize = 512;

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

/// Copies every slot of block `src` to block `dst`, K and V, for each `(src, dst)` in order.
pub(super) fn kv_copy_blocks(kv: &mut CpuKv, shape: KvShape, copies: &[(u32, u32)]) {
    let n = shape.block_size * shape.token_width();
    for &(src, dst) in copies {
        let (src, dst) = (src as usize, dst as usize);
        assert!(src < shape.num_blocks && dst < shape.num_blocks, "kv_copy_blocks: block outside a pool of {}", shape.num_blocks);
        kv.k.copy_within(src * n..(src + 1) * n, dst * n);
        kv.v.copy_within(src * n..(src + 1) * n, dst * n);
    }
}

/// The keys `keys` of sequence `seq` in KV head `g`: the unit a partial result covers.
#[derive(Clone)]
struct Span {
    seq: usize,
    g: usize,
    keys: Range<usize>,
}

/// A query head's partial (or merged) softmax state: max score and exp-sum.
#[derive(Clone, Copy, Default)]
struct Ml {
    max: f32,
    sum: f64,
}

/// Scratch of [`Job::partial`].
#[derive(Default)]
struct Work {
    /// `[group x split len]` scores, then softmax weights.
    scores: Vec<f32>,
    /// `[split len]` one head's weights in f16.
    half: Vec<f16>,
    /// `[split len]` offsets of the split's live K/V rows in the pools.
    rows: Vec<usize>,
    /// `[split len]` their entries.
    ents: Vec<u32>,
}

impl Work {
    /// Capacity for any split of `group` query heads of `hd` dims, taken at once: buffers that grew with
    /// the context would allocate again whenever it passed their size (decode makes no allocation once
    /// warm). `half` holds a split's weights of one head, or the group's query rows (`load_q`).
    fn reserve(&mut self, group: usize, hd: usize) {
        fn at_least<T>(v: &mut Vec<T>, n: usize) {
            v.reserve(n.saturating_sub(v.len()));
        }
        at_least(&mut self.scores, group * SPLIT_TOKENS);
        at_least(&mut self.half, SPLIT_TOKENS.max(group * hd));
        at_least(&mut self.rows, SPLIT_TOKENS);
        at_least(&mut self.ents, SPLIT_TOKENS);
    }
}

/// One split's softmax weights, normalized within the split, kept for the probabilities a KV budget
/// policy asks for (`KvView::score_offset`): `w` `[group x ents.len()]`, `ml` `[group]`.
#[derive(Clone, Default)]
struct SplitRec {
    ents: Vec<u32>,
    w: Vec<f32>,
    ml: Vec<Ml>,
}

/// A query row: its sequence, its entry in the sequence's table and its position.
#[derive(Clone, Copy)]
struct Row {
    seq: usize,
    entry: usize,
    pos: usize,
}

/// What every task reads.
struct Job<'a> {
    kern: &'a Kernels,
    /// The vector loops, for a SIMD kernel table and a head_dim they cover; else the per-key kernels.
    simd: Option<&'static SimdAttn>,
    kv: &'a CpuKv,
    q: &'a [f32],
    seqs: &'a [AttnSeq<'a>],
    /// Per query row, `None` for rows outside every sequence.
    rows: &'a [Option<Row>],
    bs: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    /// Query heads per KV head.
    group: usize,
    scale: f32,
    window: Option<usize>,
}

/// Scratch of one task.
#[derive(Default)]
struct Tmp {
    /// `[group x hd]` the query heads of the group, rounded to f16.
    qv: Vec<f32>,
    work: Work,
    /// `[group x hd]` and `[group]`: a later split's partial before it is merged.
    o: Vec<f32>,
    ml: Vec<Ml>,
    /// `[group]` the merged state.
    acc: Vec<Ml>,
    /// The row's splits, when its sequence wants probabilities.
    recs: Vec<SplitRec>,
}

/// The largest of `x` (`-inf` when empty), in 16 independent lanes so the loop vectorizes instead of
/// waiting on one chain of `max`: the maximum of a set does not depend on the order it is taken in
/// (NaNs are skipped either way), so the bits are those of a left fold.
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in chunks.by_ref() {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    lanes.iter().fold(m, |a, &v| a.max(v))
}

/// Buffers of [`Job::run_splits`], kept between calls.
#[derive(Default)]
struct SplitScratch {
    /// `(row, span)` of every split; those of (row, KV head) `idx` are `items[first[idx]..first[idx + 1]]`.
    items: Vec<(usize, Span)>,
    first: Vec<usize>,
    /// Per item: its partial output `[group x hd]` and state `[group]`, whether it has a live key,
    /// its weights (when its row wants probabilities) and whether it does.
    parts: Vec<f32>,
    mls: Vec<Ml>,
    found: Vec<bool>,
    recs: Vec<SplitRec>,
    keep: Vec<bool>,
}

/// Buffers of one [`attention`] call, kept for the next.
#[derive(Default)]
struct CallScratch {
    /// `[rows]` each query row's sequence, entry and position.
    rows: Vec<Option<Row>>,
    /// `[rows x n_kv_heads]` probabilities, when wanted (else empty).
    probs: Vec<Vec<f32>>,
    splits: SplitScratch,
}

// Why thread-locals: after the first steps, a decode step allocates nothing (issue: no allocation on
// the hot path). The rayon workers keep their task scratch (`TMP`); the calling thread keeps the call's
// (`CALL`, taken out for the call, so a nested call could never see it borrowed).
thread_local! {
    static TMP: RefCell<Tmp> = RefCell::default();
    static CALL: RefCell<CallScratch> = RefCell::default();
}

impl Job<'_> {
    /// The entry ranges the query `row` sees, in order (see the module doc): entries `lo ..= entry`,
    /// `lo` the first inside the window (by original position, under a budget view).
    fn splits(&self, row: Row) -> impl Iterator<Item = Range<usize>> {
        let Row { seq, entry, pos } = row;
        let lo = match (self.window, self.seqs[seq].view) {
            (None, _) => 0,
            (Some(w), None) => (pos + 1).saturating_sub(w),
            (Some(w), Some(v)) => v.positions[..=entry].partition_point(|&p| pos - p as usize >= w),
        };
        (lo..=entry).step_by(SPLIT_TOKENS).map(move |s| s..(s + SPLIT_TOKENS).min(entry + 1))
    }

    /// Whether row `row`'s sequence wants its attention probabilities.
    fn wants_scores(&self, row: Option<Row>) -> bool {
        row.is_some_and(|r| self.seqs[r.seq].view.is_some_and(|v| v.score_offset.is_some()))
    }

    /// Loads query row `t`'s heads of KV head `g`, rounded to f16 like ggml.
    fn load_q(&self, t: usize, g: usize, qv: &mut Vec<f32>, half: &mut Vec<f16>) {
        let (start, len) = ((t * self.n_heads + g * self.group) * self.hd, self.group * self.hd);
        half.resize(len, f16::ZERO);
        half.convert_from_f32_slice(&self.q[start..start + len]);
        qv.resize(len, 0.0);
        half.convert_to_f32_slice(qv);
    }

    /// Offsets of KV head `g`'s rows of the live entries of `keys` in the pools, and those entries, in
    /// entry order (one block lookup per block; a block with no live entry is skipped whole).
    fn kv_rows(&self, seq: usize, keys: Range<usize>, g: usize, rows: &mut Vec<usize>, ents: &mut Vec<u32>) {
        let (bs, stride, head) = (self.bs, self.n_kv_heads * self.hd, g * self.hd);
        let (bt, live) = (self.seqs[seq].block_table, self.seqs[seq].view.map(|v| v.live));
        rows.clear();
        ents.clear();
        let first = keys.start / bs;
        for (i, &b) in bt[first..keys.end.div_ceil(bs)].iter().enumerate() {
            let start = (first + i) * bs;
            let mask = live.map_or(u64::MAX, |l| l[first + i]);
            let (lo, hi) = (keys.start.max(start) - start, keys.end.min(start + bs) - start);
            let base = b as usize * bs;
            for off in (lo..hi).filter(|&off| mask >> off & 1 == 1) {
                rows.push((base + off) * stride + head);
                ents.push((start + off) as u32);
            }
        }
    }

    /// Attention of the group's query heads `qv` over the live keys of `span`, normalized within it:
    /// `o` `[group x hd]`, `ml` `[group]`; with `rec`, the weights too. `false` (and nothing written)
    /// when the span has no live key.
    fn partial(&self, span: &Span, qv: &[f32], work: &mut Work, o: &mut [f32], ml: &mut [Ml], mut rec: Option<&mut SplitRec>) -> bool {
        let Work { scores, half, rows, ents } = work;
        let (hd, group, g, kv) = (self.hd, self.group, span.g, self.kv);
        self.kv_rows(span.seq, span.keys.clone(), g, rows, ents);
        let n = rows.len();
        if n == 0 {
            return false;
        }
        scores.resize(group * n, 0.0);
        ml.fill(Ml { max: f32::NEG_INFINITY, sum: 0.0 });
        // scores = scale * q . k_j, one read of k_j for the whole group
        if let Some(simd) = self.simd {
            (simd.qk)(&kv.k, rows, hd, qv, group, self.scale, scores);
        } else {
            for (i, &r) in rows.iter().enumerate() {
                let k = &kv.k[r..r + hd];
                for hh in 0..group {
                    scores[hh * n + i] = (self.kern.dot_f16)(k, &qv[hh * hd..(hh + 1) * hd]) * self.scale;
                }
            }
        }
        for (hh, m) in ml.iter_mut().enumerate() {
            m.max = max_of(&scores[hh * n..(hh + 1) * n]);
        }
        // softmax, summed in f64 like ggml; weights rounded to f16 (in bulk: F16C where the CPU has it)
        if let Some(simd) = self.simd {
            for (hh, m) in ml.iter_mut().enumerate() {
                m.sum = (simd.exp)(&mut scores[hh * n..(hh + 1) * n], m.max);
            }
        } else {
            for (hh, m) in ml.iter().enumerate() {
                scores[hh * n..(hh + 1) * n].iter_mut().for_each(|s| *s = expf(*s - m.max));
            }
            // (the heads' sums interleaved, so their f64 add chains overlap; each head's order is unchanged)
            for i in 0..n {
                for (hh, m) in ml.iter_mut().enumerate() {
                    m.sum += scores[hh * n + i] as f64;
                }
            }
        }
        half.resize(n, f16::ZERO);
        for (hh, m) in ml.iter_mut().enumerate() {
            let row = &mut scores[hh * n..(hh + 1) * n];
            let inv = (1.0 / m.sum) as f32;
            row.iter_mut().for_each(|s| *s *= inv);
            if let Some(rec) = rec.as_deref_mut() {
                rec.w.extend_from_slice(row);
            }
            half.convert_from_f32_slice(row);
            half.convert_to_f32_slice(row);
        }
        if let Some(rec) = rec {
            rec.ents.clone_from(ents);
            rec.ml.clone_from_slice(ml);
        }
        // o = sum_j w_j v_j, one read of v_j for the whole group
        if let Some(simd) = self.simd {
            (simd.pv)(&kv.v, rows, hd, scores, group, o);
            return true;
        }
        o.fill(0.0);
        for (i, &r) in rows.iter().enumerate() {
            let v = &kv.v[r..r + hd];
            for hh in 0..group {
                (self.kern.axpy_f16)(&mut o[hh * hd..(hh + 1) * hd], scores[hh * n + i], v);
            }
        }
        true
    }

    /// A split record for `partial` to fill: weights cleared, `ml` sized.
    fn new_rec(&self, rec: &mut SplitRec) {
        rec.w.clear();
        rec.ml.resize(self.group, Ml::default());
    }

    /// Adds each kept split's probabilities (its weights times its share of the merged softmax `acc`,
    /// summed over the group's heads) to `probs` `[ctx_len]` of the row's sequence.
    fn add_probs(&self, recs: &[SplitRec], acc: &[Ml], probs: &mut [f32]) {
        for rec in recs {
            let n = rec.ents.len();
            for (hh, (m, a)) in rec.ml.iter().zip(acc).enumerate() {
                let frac = (m.sum * ((m.max - a.max) as f64).exp() / a.sum) as f32;
                for (&e, &w) in rec.ents.iter().zip(&rec.w[hh * n..(hh + 1) * n]) {
                    probs[e as usize] += frac * w;
                }
            }
        }
    }

    /// Folds the partial `(o_b, ml_b)` into `(o_a, ml_a)`, per query head (module doc).
    fn merge(&self, o_a: &mut [f32], ml_a: &mut [Ml], o_b: &[f32], ml_b: &[Ml]) {
        let hd = self.hd;
        for (hh, (a, b)) in ml_a.iter_mut().zip(ml_b).enumerate() {
            let max = a.max.max(b.max);
            let wa = a.sum * ((a.max - max) as f64).exp();
            let wb = b.sum * ((b.max - max) as f64).exp();
            let sum = wa + wb;
            let (fa, fb) = ((wa / sum) as f32, (wb / sum) as f32);
            for (x, &y) in o_a[hh * hd..(hh + 1) * hd].iter_mut().zip(&o_b[hh * hd..(hh + 1) * hd]) {
                *x = *x * fa + y * fb;
            }
            *a = Ml { max, sum };
        }
    }

    /// One task per (row, KV head): every split of the row in order, merged as it goes. `probs[idx]`:
    /// the task's probabilities, when its sequence wants them (module doc of `KvView`).
    fn run_rows(&self, out: &mut [f32], probs: &mut [Vec<f32>]) {
        let (group, hd) = (self.group, self.hd);
        out.par_chunks_mut(group * hd).zip(probs.par_iter_mut()).enumerate().for_each(|(idx, (o, probs))| {
            TMP.with_borrow_mut(|tmp| self.row_task(idx, o, probs, tmp))
        });
    }

    /// Task `idx` = (row, KV head) of [`Job::run_rows`].
    fn row_task(&self, idx: usize, o: &mut [f32], probs: &mut [f32], tmp: &mut Tmp) {
        let (group, hd, n_kv) = (self.group, self.hd, self.n_kv_heads);
        let (t, g) = (idx / n_kv, idx % n_kv);
        let Some(row) = self.rows[t] else { return };
        let keep = !probs.is_empty();
        tmp.work.reserve(group, hd);
        self.load_q(t, g, &mut tmp.qv, &mut tmp.work.half);
        tmp.acc.resize(group, Ml::default());
        let mut kept = 0;
        let mut started = false;
        for keys in self.splits(row) {
            let span = Span { seq: row.seq, g, keys };
            let rec = keep.then(|| {
                if tmp.recs.len() <= kept {
                    tmp.recs.push(SplitRec::default());
                }
                self.new_rec(&mut tmp.recs[kept]);
                &mut tmp.recs[kept]
            });
            let found = if !started {
                started = self.partial(&span, &tmp.qv, &mut tmp.work, o, &mut tmp.acc, rec);
                started
            } else {
                tmp.o.resize(group * hd, 0.0);
                tmp.ml.resize(group, Ml::default());
                let found = self.partial(&span, &tmp.qv, &mut tmp.work, &mut tmp.o, &mut tmp.ml, rec);
                if found {
                    self.merge(o, &mut tmp.acc, &tmp.o, &tmp.ml);
                }
                found
            };
            kept += (keep && found) as usize;
        }
        if keep {
            self.add_probs(&tmp.recs[..kept], &tmp.acc, probs);
        }
    }

    /// One task per (row, KV head, split), then one per (row, KV head) merging its splits in order:
    /// the same arithmetic as [`Job::run_rows`], with more parallelism when rows are few.
    fn run_splits(&self, out: &mut [f32], probs: &mut [Vec<f32>], sc: &mut SplitScratch) {
        let (group, hd, n_kv) = (self.group, self.hd, self.n_kv_heads);
        let SplitScratch { items, first, parts, mls, found, recs, keep } = sc;
        items.clear();
        first.clear();
        first.push(0);
        for (t, row) in self.rows.iter().enumerate() {
            for g in 0..n_kv {
                if let Some(row) = *row {
                    items.extend(self.splits(row).map(|keys| (t, Span { seq: row.seq, g, keys })));
                }
                first.push(items.len());
            }
        }
        let n = items.len();
        parts.resize(n * group * hd, 0.0);
        mls.resize(n * group, Ml::default());
        // (a split with no live key: found = false, and the merge below skips it)
        found.clear();
        found.resize(n, false);
        recs.resize_with(n, SplitRec::default);
        keep.clear();
        keep.extend(items.iter().map(|(t, _)| self.wants_scores(self.rows[*t])));
        parts[..n * group * hd]
            .par_chunks_mut(group * hd)
            .zip(mls[..n * group].par_chunks_mut(group))
            .zip(found.par_iter_mut().zip(recs[..n].par_iter_mut()))
            .zip(items.par_iter().zip(keep.par_iter()))
            .for_each(|(((o, ml), (found, rec)), ((t, span), &keep))| {
                TMP.with_borrow_mut(|tmp| {
                    tmp.work.reserve(group, hd);
                    self.load_q(*t, span.g, &mut tmp.qv, &mut tmp.work.half);
                    let rec = keep.then(|| {
                        self.new_rec(rec);
                        rec
                    });
                    *found = self.partial(span, &tmp.qv, &mut tmp.work, o, ml, rec);
                })
            });
        let (parts, mls, recs) = (&parts[..], &mls[..], &recs[..]);
        out.par_chunks_mut(group * hd).zip(probs.par_iter_mut()).enumerate().for_each(|(idx, (o, probs))| {
            let found_in = || (first[idx]..first[idx + 1]).filter(|&i| found[i]);
            let Some(i0) = found_in().next() else { return };
            TMP.with_borrow_mut(|tmp| {
                o.copy_from_slice(&parts[i0 * group * hd..(i0 + 1) * group * hd]);
                tmp.acc.clear();
                tmp.acc.extend_from_slice(&mls[i0 * group..(i0 + 1) * group]);
                for i in found_in().skip(1) {
                    self.merge(o, &mut tmp.acc, &parts[i * group * hd..(i + 1) * group * hd], &mls[i * group..(i + 1) * group]);
                }
                if !probs.is_empty() {
                    for i in found_in() {
                        self.add_probs(std::slice::from_ref(&recs[i]), &tmp.acc, probs);
                    }
                }
            })
        });
    }
}

/// See the module doc. `q` and `out` are `[n_tokens x n_heads x head_dim]`; rows outside every sequence
/// are left alone. `scores`: where sequences whose view has a `score_offset` get their probabilities.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    kern: &Kernels,
    q: &[f32],
    kv: &CpuKv,
    shape: KvShape,
    seqs: &[AttnSeq],
    p: &AttnParams,
    out: &mut [f32],
    scores: Option<&mut [f32]>,
) {
    let (hd, n_heads, n_kv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    assert!(shape.head_dim == hd && shape.n_kv_heads == n_kv && n_heads % n_kv == 0);
    let bs = shape.block_size;

    let mut sc = CALL.take();
    // sequence, entry and position of every query row
    let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
    let CallScratch { rows, probs, splits } = &mut sc;
    rows.clear();
    rows.resize(n_rows, None);
    for (si, s) in seqs.iter().enumerate() {
        assert!(s.n_q <= s.ctx_len && s.block_table.len() * bs >= s.ctx_len, "attention: block table too short");
        assert!(s.block_table.iter().all(|&b| (b as usize) < shape.num_blocks), "attention: block id outside the pool");
        if let Some(v) = s.view {
            assert!(bs <= 64 && v.live.len() >= s.ctx_len.div_ceil(bs) && v.positions.len() >= s.ctx_len, "attention: view too short");
            assert!(v.positions[..s.ctx_len].windows(2).all(|w| w[0] < w[1]), "attention: view positions must increase");
        }
        for i in 0..s.n_q {
            let entry = s.ctx_len - s.n_q + i;
            let pos = s.view.map_or(entry, |v| v.positions[entry] as usize);
            rows[s.q_start + i] = Some(Row { seq: si, entry, pos });
        }
    }
    assert!(q.len() >= n_rows * n_heads * hd && out.len() >= n_rows * n_heads * hd);

    let job = Job {
        kern,
        simd: attention_simd::simd(kern.isa).filter(|_| hd.is_multiple_of(SimdAttn::HD_STEP)),
        kv,
        q,
        seqs,
        rows: &rows[..],
        bs,
        n_heads,
        n_kv_heads: n_kv,
        hd,
        group: n_heads / n_kv,
        scale: p.scale,
        window: p.window,
    };
    // per (row, KV head): the probabilities of its sequence's entries, when wanted (else empty)
    let want = scores.is_some();
    probs.resize_with(n_rows * n_kv, Vec::new);
    for (idx, p) in probs.iter_mut().enumerate() {
        p.clear();
        if let Some(r) = job.rows[idx / n_kv].filter(|&r| want && job.wants_scores(Some(r))) {
            p.resize(seqs[r.seq].ctx_len, 0.0);
        }
    }
    let probs = &mut probs[..n_rows * n_kv];
    let out = &mut out[..n_rows * n_heads * hd];
    // Few (row, KV head) tasks, as in decode: spread the splits of a long context over the threads too.
    if n_rows * n_kv < 2 * rayon::current_num_threads() {
        job.run_splits(out, probs, splits);
    } else {
        job.run_rows(out, probs);
    }
    // each sequence's probabilities, summed over its query rows in row order
    if let Some(scores) = scores {
        for s in seqs {
            let (Some(v), ctx) = (s.view, s.ctx_len) else { continue };
            let Some(off) = v.score_offset else { continue };
            let dst = &mut scores[off..off + n_kv * ctx];
            dst.fill(0.0);
            for t in s.q_start..s.q_start + s.n_q {
                for (g, d) in dst.chunks_mut(ctx).enumerate() {
                    d.iter_mut().zip(&probs[t * n_kv + g]).for_each(|(d, &p)| *d += p);
                }
            }
        }
    }
    CALL.set(sc);
}

/// Moves K and V of slot `src` to slot `dst` for each `(src, dst)`, every source read first.
pub(super) fn kv_move_slots(kv: &mut CpuKv, shape: KvShape, moves: &[(u32, u32)]) {
    let w = shape.token_width();
    for pool in [&mut kv.k, &mut kv.v] {
        let rows: Vec<u16> = moves
            .iter()
            .flat_map(|&(src, _)| {
                let src = src as usize;
                assert!(src < shape.num_slots(), "kv_move_slots: slot {src} outside a pool of {} slots", shape.num_slots());
                pool[src * w..(src + 1) * w].iter().copied()
            })
            .collect();
        for (&(_, dst), row) in moves.iter().zip(rows.chunks(w)) {
            let dst = dst as usize;
            assert!(dst < shape.num_slots(), "kv_move_slots: slot {dst} outside a pool of {} slots", shape.num_slots());
            pool[dst * w..(dst + 1) * w].copy_from_slice(row);
        }
    }
}
