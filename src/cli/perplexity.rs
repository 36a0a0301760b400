//! `pagellm perplexity`: llama-perplexity's method, so the numbers compare.
//!
//! The text is tokenized once (BOS first if the model adds one) and cut into `n_chunk = n_tokens / ctx`
//! chunks of `ctx` tokens. Each chunk is evaluated from an empty cache, its first token replaced by BOS
//! when the model uses one, and only the second half is scored:
//! ```text
//!   chunk:   | t0 ... t(ctx/2 - 1) | t(ctx/2) ... t(ctx-1) |
//!   scored:                        logits at ctx/2 .. ctx-2 predict t(ctx/2 + 1) .. t(ctx-1)
//! ```
//! that is `ctx - 1 - ctx/2` tokens a chunk. PPL = exp(mean negative log-likelihood over all of them).

use crate::model::{Logits, Model};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub n_tokens: usize,
    pub n_chunks: usize,
    pub ctx: usize,
    pub scored: usize,
    pub ppl: f64,
    /// Standard error of the estimate, as llama-perplexity prints after "+/-".
    pub ppl_err: f64,
    /// Running estimate after each chunk.
    pub per_chunk: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("the text has {n_tokens} tokens, fewer than 2 x ctx ({ctx}); use a longer text or a smaller --ctx")]
    TooShort { n_tokens: usize, ctx: usize },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

/// -log softmax(logits)[target], computed in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    -(logits[target as usize] as f64 - max - sum.ln())
}

/// Evaluate `text`; `max_chunks` (0 = all) limits the work; `on_chunk(i, running_ppl)` reports progress.
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, PerplexityError> {
    let tokens = tok.encode(text, true, false)?;
    if tokens.len() < 2 * ctx {
        return Err(PerplexityError::TooShort { n_tokens: tokens.len(), ctx });
    }
    let mut n_chunks = tokens.len() / ctx;
    if max_chunks > 0 {
        n_chunks = n_chunks.min(max_chunks);
    }
    let first = ctx / 2;
    let n_vocab = model.config().n_vocab;
    let mut sess = model.new_session(ctx)?;
    let (mut sum, mut sum2, mut count) = (0f64, 0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for i in 0..n_chunks {
        let chunk = &tokens[i * ctx..(i + 1) * ctx];
        let mut input = chunk.to_vec();
        if tok.add_bos() {
            input[0] = tok.bos_id();
        }
        sess.clear();
        let logits = model.forward(&mut sess, &input, Logits::From(first))?;
        for j in 0..ctx - 1 - first {
            let v = nll(&logits[j * n_vocab..(j + 1) * n_vocab], chunk[first + j + 1]);
            sum += v;
            sum2 += v * v;
            count += 1;
        }
        let running = (sum / count as f64).exp();
        per_chunk.push(running);
        on_chunk(i, running);
    }
    let mean = sum / count as f64;
    let var = sum2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let ppl_err = if var > 0.0 && count > 1 { (var / (count - 1) as f64).sqrt() * ppl } else { 0.0 };
    Ok(Perplexity { n_tokens: tokens.len(), n_chunks, ctx, scored: count, ppl, ppl_err, per_chunk })
}
