//! The engine: turns a prompt (token ids) into a reply, re-using the KV cache of the longest prefix it
//! has already computed. The REPL, and later the server, call only this API; it speaks token ids, never
//! sessions or blocks, so the internals can move to the shared paged pool with a hash-based prefix cache
//! (`kv`) without changing a caller.
//!
//! ## v0 internals
//! One [`Session`] and `held`, the token ids whose KV it holds (`held.len() == sess.len()` between
//! calls). A request's prompt is compared with `held` token by token; the session is cut back to the
//! common prefix and only the rest is prefilled:
//! ```text
//! held     [ t0 t1 ... t(k-1) | h(k) ... ]          prompt + reply of the turns before
//! prompt   [ t0 t1 ... t(k-1) | p(k) ... p(n-1) ]
//!            \ cached_tokens=k / \_ prefilled _/     k <= n - 1: the last prompt token is always run,
//!                                                    its logits pick the first reply token
//! ```
//! Every reply token handed to `on_token` is run through the model too (including the last one of a
//! reply cut by `max_tokens`), so `held` ends as prompt + whole reply and the next turn of a chat, whose
//! rendering starts with both, prefills only its new tokens. An EOG token is not run (the template
//! writes its own end-of-turn text). With `prefix_cache: false` every request starts from an empty
//! session (for comparisons and benchmarks).
//!
//! Sampling: the prompt and each sampled token are passed to `sampler.accept` (penalties see the whole
//! conversation); give each request a fresh or reset [`Sampler`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::kv::DEFAULT_BLOCK_SIZE;
use crate::model::{Logits, Model, ModelError, Session, UBATCH};
use crate::sampling::Sampler;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is {n_prompt} tokens, which does not fit the context of {ctx} tokens: pass a larger --ctx (the model was trained on {ctx_train}) or send a shorter prompt")]
    PromptTooLong { n_prompt: usize, ctx: usize, ctx_train: usize },
    #[error("the prompt is empty: nothing to generate from")]
    EmptyPrompt,
    #[error(transparent)]
    Model(#[from] ModelError),
}

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Most tokens (prompt + reply) a request may use; 0: the context the model was loaded with.
    pub ctx: usize,
    /// Re-use the KV of the prefix shared with earlier requests (off: prefill every prompt whole).
    pub prefix_cache: bool,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token, or `on_token` returned false.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// `cancel` was set.
    Cancelled,
    /// The context has no room for another token.
    ContextFull,
}

impl FinishReason {
    /// Lower-case name for logs and stats lines.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::ContextFull => "context_full",
        }
    }
}

/// The outcome of [`Engine::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The sampled tokens, without the EOG token that ended them.
    pub tokens: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was re-used; `prompt_tokens - cached_tokens` were prefilled.
    pub cached_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub finish: FinishReason,
}

/// KV cache occupancy and prefix-cache hits, in blocks of `block_size` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks holding some token's KV.
    pub used_blocks: usize,
    /// Full blocks a later prompt can re-use.
    pub cached_blocks: usize,
    pub block_size: usize,
    /// Prompt tokens asked for, over all requests.
    pub queried_tokens: u64,
    /// Of those, tokens served from the cache.
    pub hit_tokens: u64,
}

pub struct Engine {
    model: Model,
    eog_ids: Vec<u32>,
    opts: EngineOptions,
    /// Most tokens a request may use.
    ctx: usize,
    sess: Session,
    /// The token ids whose KV `sess` holds, in order.
    held: Vec<u32>,
    queried_tokens: u64,
    hit_tokens: u64,
}

impl Engine {
    /// An engine over `model`; generation stops at any of `eog_ids`.
    pub fn new(model: Model, eog_ids: Vec<u32>, opts: EngineOptions) -> Result<Engine, EngineError> {
        let ctx = if opts.ctx == 0 { model.ctx() } else { opts.ctx };
        let sess = model.new_session(ctx)?;
        Ok(Engine { model, eog_ids, opts, ctx, sess, held: Vec::new(), queried_tokens: 0, hit_tokens: 0 })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Generate a reply to `prompt` (the whole rendered conversation's token ids). Re-uses the cached
    /// prefix shared with what was computed before (prompt + reply tokens of earlier turns): only the rest
    /// is prefilled. `on_token` gets each sampled token (not EOG ones); returning false stops. `cancel`
    /// is checked between steps (Ctrl-C).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation, EngineError> {
        let n = prompt.len();
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        // `>=`: the prompt must leave room for at least one reply token.
        if n >= self.ctx {
            let ctx_train = self.model.config().ctx_train;
            return Err(EngineError::PromptTooLong { n_prompt: n, ctx: self.ctx, ctx_train });
        }

        // Step 1: keep the longest prefix of `held` that the prompt repeats, minus at least one token.
        let cached = if self.opts.prefix_cache { common_prefix(&self.held, prompt).min(n - 1) } else { 0 };
        self.sess.truncate(cached);
        self.held.truncate(cached);
        self.queried_tokens += n as u64;
        self.hit_tokens += cached as u64;
        sampler.accept(prompt);
        let mut out = Generation {
            tokens: Vec::new(),
            prompt_tokens: n,
            cached_tokens: cached,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            finish: FinishReason::Cancelled,
        };

        // Step 2: prefill the rest a micro-batch at a time, so Ctrl-C is seen during a long prompt
        // (batch invariance: the split does not change the logits).
        let t = Instant::now();
        let mut logits = Vec::new();
        for chunk in prompt[cached..].chunks(UBATCH) {
            if cancel.load(Ordering::Relaxed) {
                out.prefill_secs = t.elapsed().as_secs_f64();
                return Ok(out);
            }
            logits = self.forward(chunk)?;
        }
        out.prefill_secs = t.elapsed().as_secs_f64();

        // Step 3: decode. Each emitted token is also run, so the cache holds the whole reply.
        let t = Instant::now();
        out.finish = loop {
            if out.tokens.len() >= max_tokens {
                break FinishReason::Length;
            }
            if cancel.load(Ordering::Relaxed) {
                break FinishReason::Cancelled;
            }
            let next = sampler.sample(&mut logits);
            if self.eog_ids.contains(&next) {
                break FinishReason::Stop;
            }
            sampler.accept(&[next]);
            out.tokens.push(next);
            if !on_token(next) {
                break FinishReason::Stop;
            }
            if self.held.len() >= self.ctx {
                break FinishReason::ContextFull;
            }
            logits = self.forward(&[next])?;
        };
        out.decode_secs = t.elapsed().as_secs_f64();
        Ok(out)
    }

    pub fn stats(&self) -> CacheStats {
        let bs = DEFAULT_BLOCK_SIZE;
        CacheStats {
            total_blocks: self.sess.capacity() / bs,
            used_blocks: self.sess.len().div_ceil(bs),
            cached_blocks: if self.opts.prefix_cache { self.held.len() / bs } else { 0 },
            block_size: bs,
            queried_tokens: self.queried_tokens,
            hit_tokens: self.hit_tokens,
        }
    }

    /// Forget every cached token (the hit counters stay).
    pub fn clear_cache(&mut self) {
        self.sess.clear();
        self.held.clear();
    }

    /// Run `tokens` after `held`; returns the last token's logits.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        match self.model.forward(&mut self.sess, tokens, Logits::Last) {
            Ok(logits) => {
                self.held.extend_from_slice(tokens);
                debug_assert_eq!(self.held.len(), self.sess.len());
                Ok(logits)
            }
            Err(e) => {
                // The session may hold part of `tokens`; start the next request from nothing rather
                // than trust a half-written cache.
                self.clear_cache();
                Err(e.into())
            }
        }
    }
}

/// Length of the longest common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[], &[1, 2]), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2]), 2);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 9, 3]), 1);
        assert_eq!(common_prefix(&[4, 5], &[4, 5]), 2);
    }
}
