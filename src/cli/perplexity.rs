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
//!
//! Under a KV budget ([`evaluate_budget`]) each chunk runs through the engine in steps of `kv_step`
//! tokens, the policy evicting after every step as it would during generation; the scored positions
//! are the same.

use crate::engine::{Engine, EngineError};
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
    Engine(#[from] EngineError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

/// -log softmax(logits)[target], computed in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    -(logits[target as usize] as f64 - max - sum.ln())
}

/// Running sums of the negative log-likelihood.
#[derive(Default)]
struct Nll {
    sum: f64,
    sum2: f64,
    count: usize,
}

impl Nll {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.sum2 += v * v;
        self.count += 1;
    }

    fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }

    fn finish(&self, n_tokens: usize, n_chunks: usize, ctx: usize, per_chunk: Vec<f64>) -> Perplexity {
        let mean = self.sum / self.count as f64;
        let var = self.sum2 / self.count as f64 - mean * mean;
        let ppl = mean.exp();
        let ppl_err = if var > 0.0 && self.count > 1 { (var / (self.count - 1) as f64).sqrt() * ppl } else { 0.0 };
        Perplexity { n_tokens, n_chunks, ctx, scored: self.count, ppl, ppl_err, per_chunk }
    }
}

/// The text's tokens and the chunks to score.
fn chunks(tok: &Tokenizer, text: &str, ctx: usize, max_chunks: usize) -> Result<(Vec<u32>, usize), PerplexityError> {
    let tokens = tok.encode(text, true, false)?;
    if tokens.len() < 2 * ctx {
        return Err(PerplexityError::TooShort { n_tokens: tokens.len(), ctx });
    }
    let n_chunks = tokens.len() / ctx;
    Ok((tokens, if max_chunks > 0 { n_chunks.min(max_chunks) } else { n_chunks }))
}

/// Chunk `i`'s input: its tokens, the first replaced by BOS when the model uses one.
fn chunk_input(tok: &Tokenizer, tokens: &[u32], i: usize, ctx: usize) -> Vec<u32> {
    let mut input = tokens[i * ctx..(i + 1) * ctx].to_vec();
    if tok.add_bos() {
        input[0] = tok.bos_id();
    }
    input
}

/// [`evaluate`] with the engine's KV budget active: every chunk fed `step` tokens at a time.
pub fn evaluate_budget(
    engine: &mut Engine,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    step: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, PerplexityError> {
    let (tokens, n_chunks) = chunks(tok, text, ctx, max_chunks)?;
    let first = ctx / 2;
    let budget = engine.options().budget;
    let mut nll_sum = Nll::default();
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for i in 0..n_chunks {
        let input = chunk_input(tok, &tokens, i, ctx);
        let target = &tokens[i * ctx..(i + 1) * ctx];
        engine.eval_tokens(&input[..ctx - 1], step, first, budget, &mut |pos, row| nll_sum.add(nll(row, target[pos + 1])))?;
        per_chunk.push(nll_sum.ppl());
        on_chunk(i, nll_sum.ppl());
    }
    Ok(nll_sum.finish(tokens.len(), n_chunks, ctx, per_chunk))
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
    let (tokens, n_chunks) = chunks(tok, text, ctx, max_chunks)?;
    let first = ctx / 2;
    let n_vocab = model.config().n_vocab;
    let mut sess = model.new_session(ctx)?;
    let mut nll_sum = Nll::default();
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for i in 0..n_chunks {
        let input = chunk_input(tok, &tokens, i, ctx);
        sess.clear();
        let logits = model.forward(&mut sess, &input, Logits::From(first))?;
        for j in 0..ctx - 1 - first {
            nll_sum.add(nll(&logits[j * n_vocab..(j + 1) * n_vocab], tokens[i * ctx + first + j + 1]));
        }
        per_chunk.push(nll_sum.ppl());
        on_chunk(i, nll_sum.ppl());
    }
    Ok(nll_sum.finish(tokens.len(), n_chunks, ctx, per_chunk))
}
