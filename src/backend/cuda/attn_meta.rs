//! The host lists an attention call uploads (kernels/attention.cu's layouts): per query row its block
//! table offset, entry, first visible entry (window), live-mask offset, context length, weights offset;
//! the block tables, live masks and probability requests of the call's sequences.

use super::ATTN_SPLIT;
use crate::backend::{AttnParams, AttnSeq};

/// Fields per query row in [`AttnMeta::rows`] (`ATT_ROW`, `AR_*` in kernels/attention.cu).
pub(super) const ATT_ROW: usize = 8;

/// The host lists of one attention call (kernels/attention.cu's layouts).
pub(super) struct AttnMeta {
    /// `[n_rows x ATT_ROW]`: block table offset (-1: no sequence), entry, first entry in the window,
    /// live mask offset (-1: no view), ctx_len, weights offset (2 words), wants probabilities.
    pub(super) rows: Vec<u32>,
    /// The sequences' block tables, concatenated.
    pub(super) bt: Vec<u32>,
    /// The live masks of the sequences under a view, as u64 (low word first).
    pub(super) live: Vec<u32>,
    /// `[5]` per sequence that wants probabilities: first row, rows, ctx_len, offset in scores (2 words).
    pub(super) score_seqs: Vec<u32>,
    /// f32 of within-split weights the rows that want probabilities need.
    pub(super) weights_len: usize,
    pub(super) max_score_ctx: usize,
    /// Splits of the row with the most.
    pub(super) n_splits: usize,
    /// Splits of the row with the fewest (0: a row belongs to no sequence).
    pub(super) min_splits: usize,
}

/// Each query row's entry and visible range, cut as the CPU cuts them (src/backend/cpu/attention.rs,
/// `Job::splits`): entries `lo ..= entry`, `lo` the first inside the window by original position.
/// `scores`: (base, buffer length) when the call has a scores output.
pub(super) fn attn_meta(seqs: &[AttnSeq], p: &AttnParams, bs: usize, scores: Option<(usize, usize)>) -> AttnMeta {
    let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
    let mut m = AttnMeta {
        rows: vec![u32::MAX; ATT_ROW * n_rows],
        bt: Vec::new(),
        live: Vec::new(),
        score_seqs: Vec::new(),
        weights_len: 0,
        max_score_ctx: 0,
        n_splits: 1,
        min_splits: 0,
    };
    for s in seqs {
        assert!(s.n_q <= s.ctx_len && s.block_table.len() * bs >= s.ctx_len, "attention: block table too short");
        let nb = s.ctx_len.div_ceil(bs);
        let bt_off = m.bt.len() as u32;
        m.bt.extend_from_slice(&s.block_table[..nb]);
        let live_off = match s.view {
            Some(v) => {
                assert!(bs <= 64 && v.live.len() >= nb && v.positions.len() >= s.ctx_len, "attention: view too short");
                debug_assert!(v.positions[..s.ctx_len].windows(2).all(|w| w[0] < w[1]), "attention: view positions must increase");
                let off = m.live.len() / 2;
                m.live.extend(v.live[..nb].iter().flat_map(|&x| [x as u32, (x >> 32) as u32]));
                u32::try_from(off).expect("live masks over u32")
            }
            None => u32::MAX,
        };
        let want = match (s.view.and_then(|v| v.score_offset), scores) {
            (Some(off), Some((base, len))) => {
                let dst = base + off;
                assert!(dst + p.n_kv_heads * s.ctx_len <= len, "attention: scores buffer too small");
                m.score_seqs.extend([s.q_start as u32, s.n_q as u32, s.ctx_len as u32, dst as u32, (dst >> 32) as u32]);
                m.max_score_ctx = m.max_score_ctx.max(s.ctx_len);
                true
            }
            _ => false,
        };
        for i in 0..s.n_q {
            let entry = s.ctx_len - s.n_q + i;
            let lo = match (p.window, s.view) {
                (None, _) => 0,
                (Some(w), None) => (entry + 1).saturating_sub(w),
                (Some(w), Some(v)) => {
                    let pos = v.positions[entry] as usize;
                    v.positions[..=entry].partition_point(|&q| pos - q as usize >= w)
                }
            };
            let w_off = if want { m.weights_len } else { 0 };
            let r = &mut m.rows[ATT_ROW * (s.q_start + i)..][..ATT_ROW];
            r.copy_from_slice(&[bt_off, entry as u32, lo as u32, live_off, s.ctx_len as u32, w_off as u32, (w_off >> 32) as u32, want as u32]);
            if want {
                m.weights_len += p.n_heads * s.ctx_len;
            }
        }
    }
    // each row's splits over lo ..= entry (0 for a row of no sequence)
    let splits = m.rows.chunks(ATT_ROW).map(|r| if r[0] == u32::MAX { 0 } else { (r[1] as usize + 1).saturating_sub(r[2] as usize).div_ceil(ATTN_SPLIT) });
    m.n_splits = splits.clone().fold(1, usize::max);
    m.min_splits = splits.min().unwrap_or(0);
    m
}

