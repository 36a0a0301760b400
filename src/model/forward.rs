//! The forward pass of the llama family (llama, mistral, qwen2, qwen3) and gemma3: one flat sequence of
//! steps, the architecture differences switched by `Config` flags (QK norm, post norms, biases, GLU kind,
//! embedding scale, sliding windows).

use crate::backend::{AttnParams, AttnSeq, BackendError, Buffer, KvStore, RopeParams};

use super::weights::{G, L};
use super::{Model, ModelError};

/// One step of work: new tokens of one or more sequences, and where their K/V go.
///
/// ```text
/// tokens, positions, slot_mapping   [n_tokens]    token t is at positions[t], its K/V go to slot_mapping[t]
/// seqs                              per sequence: its rows of `tokens`, context length, block table
/// out_rows                          rows of `tokens` whose logits are returned, in this order
/// score_len                         f32 per layer of attention probabilities (KV budget views with a
///                                   score_offset), then in `Scratch::scores` `[n_layers x score_len]`
/// ```
pub struct ForwardBatch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub slot_mapping: &'a [u32],
    pub seqs: &'a [AttnSeq<'a>],
    pub out_rows: &'a [u32],
    pub score_len: usize,
}

/// Output rows per final-projection pass (bounds the logits buffer: 64 x vocab f32).
const OUT_CHUNK: usize = 64;

/// What a forward pass hands back for its output rows.
pub enum Outputs<'a> {
    /// Their logits, `[out_rows.len() x n_vocab]` (resized; the memory is re-used).
    Logits(&'a mut Vec<f32>),
    /// Only their greedy tokens ([`crate::sampling::argmax`] of each row's logits), reduced where the
    /// logits are: a GPU reads back one integer a row instead of `n_vocab` floats.
    Argmax(&'a mut Vec<u32>),
}

impl<'a> Outputs<'a> {
    /// The greedy tokens when `greedy`, else the logits.
    pub fn pick(greedy: bool, tokens: &'a mut Vec<u32>, logits: &'a mut Vec<f32>) -> Self {
        if greedy {
            Outputs::Argmax(tokens)
        } else {
            Outputs::Logits(logits)
        }
    }
}

/// [`Outputs`] once sized, as the ops write it.
enum OutRows<'a> {
    Logits(&'a mut [f32]),
    Argmax(&'a mut [u32]),
}

/// Activation buffers on the device, grown to the largest batch (and output rows) seen.
#[derive(Default)]
pub struct Scratch {
    n_tokens: usize,
    n_out: usize,
    bufs: Option<Bufs>,
    /// `[n_layers x score_len]` attention probabilities of the last batch that asked (device, host).
    scores: Option<Buffer>,
    scores_host: Vec<f32>,
}

struct Bufs {
    x: Buffer,      // [n x dim]      residual stream
    xb: Buffer,     // [n x dim]      normed input of a block
    xb2: Buffer,    // [n x dim]      block output before the residual add
    q: Buffer,      // [n x q_dim]
    q2: Buffer,     // [n x q_dim]    normed Q, then the attention output
    k: Buffer,      // [n x kv_dim]
    k2: Buffer,     // [n x kv_dim]   normed K
    v: Buffer,      // [n x kv_dim]
    hb: Buffer,     // [n x ffn_dim]  gate, then act(gate) * up
    hb2: Buffer,    // [n x ffn_dim]  up
    xo: Buffer,     // [n_out x dim]      rows picked for output (n_out <= OUT_CHUNK)
    xo2: Buffer,    // [n_out x dim]      after the final norm
    logits: Buffer, // [n_out x n_vocab]
}

impl Scratch {
    fn ensure(&mut self, model: &Model, n: usize, n_out: usize) -> Result<&mut Bufs, BackendError> {
        let (n, n_out) = (n.max(self.n_tokens), n_out.max(self.n_out));
        if self.bufs.is_none() || self.n_tokens < n || self.n_out < n_out {
            let (c, b) = (&model.cfg, model.backend.as_ref());
            self.bufs = None; // free the old set first
            self.bufs = Some(Bufs {
                x: b.alloc(n * c.dim)?,
                xb: b.alloc(n * c.dim)?,
                xb2: b.alloc(n * c.dim)?,
                q: b.alloc(n * c.q_dim())?,
                q2: b.alloc(n * c.q_dim())?,
                k: b.alloc(n * c.kv_dim())?,
                k2: b.alloc(n * c.kv_dim())?,
                v: b.alloc(n * c.kv_dim())?,
                hb: b.alloc(n * c.ffn_dim)?,
                hb2: b.alloc(n * c.ffn_dim)?,
                xo: b.alloc(n_out * c.dim)?,
                xo2: b.alloc(n_out * c.dim)?,
                logits: b.alloc(n_out * c.n_vocab)?,
            });
            (self.n_tokens, self.n_out) = (n, n_out);
        }
        Ok(self.bufs.as_mut().expect("just set"))
    }

    /// The attention probabilities of the last forward whose batch had a `score_len`:
    /// `[n_layers x score_len]`, laid out per layer as the batch's views said.
    pub fn scores(&self) -> &[f32] {
        &self.scores_host
    }
}

impl Model {
    /// Runs `batch` through the model, writing its K/V into `kv` (one store per layer), and returns the
    /// logits of `batch.out_rows`, `[out_rows.len() x n_vocab]`.
    pub fn forward_batch(&self, kv: &mut [KvStore], batch: &ForwardBatch, scratch: &mut Scratch) -> Result<Vec<f32>, ModelError> {
        let mut logits = Vec::new();
        self.forward_batch_into(kv, batch, scratch, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::forward_batch`] into `logits` (resized to `[out_rows.len() x n_vocab]`; its memory is
    /// re-used when it is large enough already).
    pub fn forward_batch_into(&self, kv: &mut [KvStore], batch: &ForwardBatch, scratch: &mut Scratch, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.forward_batch_out(kv, batch, scratch, Outputs::Logits(logits))
    }

    /// [`Model::forward_batch`], handing back what `out` asks for.
    pub fn forward_batch_out(&self, kv: &mut [KvStore], batch: &ForwardBatch, scratch: &mut Scratch, out: Outputs) -> Result<(), ModelError> {
        let n = batch.tokens.len();
        assert!(batch.positions.len() == n && batch.slot_mapping.len() == n && kv.len() == self.cfg.n_layers);
        let want = batch.score_len * self.cfg.n_layers;
        if want > 0 && scratch.scores.as_ref().is_none_or(|b| b.len() < want) {
            scratch.scores = None;
            scratch.scores = Some(self.backend.alloc(want)?);
        }
        let mut scores = if want > 0 { scratch.scores.take() } else { None };
        let s = scratch.ensure(self, n, batch.out_rows.len().clamp(1, OUT_CHUNK))?;
        // every element is written by run_layers: only new memory is zeroed
        let mut out = match out {
            Outputs::Logits(logits) => {
                logits.resize(batch.out_rows.len() * self.cfg.n_vocab, 0.0);
                OutRows::Logits(logits)
            }
            Outputs::Argmax(tokens) => {
                tokens.resize(batch.out_rows.len(), 0);
                OutRows::Argmax(tokens)
            }
        };
        self.backend.run(&mut || self.run_layers(kv, batch, s, scores.as_mut(), &mut out));
        if let Some(buf) = scores {
            scratch.scores_host.resize(want, 0.0);
            self.backend.read_buffer(&buf, 0, &mut scratch.scores_host);
            scratch.scores = Some(buf);
        }
        Ok(())
    }

    /// The ops of [`Model::forward_batch`], inside one [`Backend::run`](crate::backend::Backend::run).
    fn run_layers(&self, kv: &mut [KvStore], batch: &ForwardBatch, s: &mut Bufs, mut scores: Option<&mut Buffer>, out: &mut OutRows) {
        let (c, w, b) = (&self.cfg, &self.weights, self.backend.as_ref());
        let n = batch.tokens.len();
        let (dim, hd, eps) = (c.dim, c.head_dim, c.rms_eps);

        // token embeddings (gemma scales them by sqrt(dim))
        b.embed(w.get(G::TokenEmbd), batch.tokens, &mut s.x);
        if let Some(e) = c.embed_scale {
            b.scale(&mut s.x, e, n * dim);
        }

        for (il, lw) in w.layers.iter().enumerate() {
            let swa = c.is_swa(il);
            // attention norm
            b.rms_norm(&s.x, Some(lw.get(L::AttnNorm)), dim, n, eps, &mut s.xb);
            // Q, K, V projections (+ qwen2 biases)
            b.matmul(lw.get(L::Q), &s.xb, n, &mut s.q);
            b.matmul(lw.get(L::K), &s.xb, n, &mut s.k);
            b.matmul(lw.get(L::V), &s.xb, n, &mut s.v);
            if c.qkv_bias {
                b.add_bias(&mut s.q, lw.get(L::QBias), n);
                b.add_bias(&mut s.k, lw.get(L::KBias), n);
                b.add_bias(&mut s.v, lw.get(L::VBias), n);
            }
            // per-head RMS norm of Q and K (qwen3, gemma3)
            if c.qk_norm {
                b.rms_norm(&s.q, Some(lw.get(L::QNorm)), hd, n * c.n_heads, eps, &mut s.q2);
                b.rms_norm(&s.k, Some(lw.get(L::KNorm)), hd, n * c.n_kv_heads, eps, &mut s.k2);
                std::mem::swap(&mut s.q, &mut s.q2);
                std::mem::swap(&mut s.k, &mut s.k2);
            }
            // RoPE (sliding layers have their own base)
            let rope = RopeParams {
                mode: c.rope_mode,
                n_rot: c.n_rot,
                freq_base: if swa { c.rope_base_swa } else { c.rope_base },
                freq_scale: if swa { c.rope_scale_swa } else { c.rope_scale },
                freq_factors: w.rope_freqs.as_deref(),
            };
            b.rope(&mut s.q, batch.positions, c.n_heads, hd, &rope);
            b.rope(&mut s.k, batch.positions, c.n_kv_heads, hd, &rope);
            // gemma scales Q instead of the scores
            if let Some(qs) = c.q_scale {
                b.scale(&mut s.q, qs, n * c.q_dim());
            }
            // K/V into the paged cache, then attention over it
            b.kv_write(&mut kv[il], &s.k, &s.v, batch.slot_mapping);
            let attn = AttnParams {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: c.kq_scale,
                window: if swa { c.sliding_window } else { None },
            };
            let layer_scores = scores.as_deref_mut().map(|buf| (buf, il * batch.score_len));
            b.attention(&s.q, &kv[il], batch.seqs, &attn, &mut s.q2, layer_scores);
            // output projection, (post-attention norm,) residual
            b.matmul(lw.get(L::Out), &s.q2, n, &mut s.xb2);
            if c.post_norms {
                b.rms_norm(&s.xb2, Some(lw.get(L::PostAttnNorm)), dim, n, eps, &mut s.xb);
                b.add(&mut s.x, &s.xb, n * dim);
            } else {
                b.add(&mut s.x, &s.xb2, n * dim);
            }
            // FFN norm
            b.rms_norm(&s.x, Some(lw.get(L::FfnNorm)), dim, n, eps, &mut s.xb);
            // gated FFN: down(act(gate) * up)
            b.matmul(lw.get(L::Gate), &s.xb, n, &mut s.hb);
            b.matmul(lw.get(L::Up), &s.xb, n, &mut s.hb2);
            b.glu(&mut s.hb, &s.hb2, n * c.ffn_dim, c.glu);
            b.matmul(lw.get(L::Down), &s.hb, n, &mut s.xb2);
            // (post-FFN norm,) residual
            if c.post_norms {
                b.rms_norm(&s.xb2, Some(lw.get(L::PostFfwNorm)), dim, n, eps, &mut s.xb);
                b.add(&mut s.x, &s.xb, n * dim);
            } else {
                b.add(&mut s.x, &s.xb2, n * dim);
            }
        }

        // final norm and output projection of the requested rows, OUT_CHUNK rows at a time
        for (ci, rows) in batch.out_rows.chunks(OUT_CHUNK).enumerate() {
            let (m, first) = (rows.len(), ci * OUT_CHUNK);
            b.get_rows(&s.x, dim, rows, &mut s.xo);
            b.rms_norm(&s.xo, Some(w.get(G::OutputNorm)), dim, m, eps, &mut s.xo2);
            b.matmul(w.output(), &s.xo2, m, &mut s.logits);
            match out {
                OutRows::Logits(l) => b.read_buffer(&s.logits, 0, &mut l[first * c.n_vocab..(first + m) * c.n_vocab]),
                OutRows::Argmax(t) => b.argmax_rows(&s.logits, c.n_vocab, &mut t[first..first + m]),
            }
        }
    }
}
