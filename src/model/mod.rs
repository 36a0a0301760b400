//! Models: `Config` from GGUF metadata, weights as views into the map, and the forward pass, written
//! against the [`Backend`] trait so it runs unchanged on any device.
//!
//! Public API (the CLI and the engine use only this):
//! ```text
//! Model::load(file, ModelOptions { ctx, threads }) -> Model
//! model.new_session(max_tokens) -> Session            owns a paged KV cache for one sequence
//! model.forward(&mut sess, &tokens, Logits::Last)     appends tokens at positions sess.len()..
//!                                                     -> [n_out x n_vocab] logits, row-major
//! model.forward_batch(&mut kv, &batch, &mut scratch)  the same for a ForwardBatch over a shared pool
//!                                                     (the engine: many sequences, block tables)
//! ```
//! Contract: file problems and user input (unknown architecture, missing tensor, bad token id, a prompt
//! longer than the session) are typed [`ModelError`]s, never panics. A session belongs to the model that
//! made it. Prompts are run in micro-batches of [`UBATCH`] tokens; by batch invariance the logits do not
//! depend on that split.

mod config;
mod forward;
mod kv;
mod weights;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::{self, Backend, BackendError, DEFAULT_BLOCK_SIZE};
use crate::gguf::GgufFile;

pub use config::{Arch, Config, ROPE_FREQ_BASE_SWA};
pub use forward::{ForwardBatch, Outputs, Scratch};
/// The backend types a [`ForwardBatch`] and a shared KV pool are made of, for callers that build them.
pub use crate::backend::{AttnSeq, KvShape, KvStore, KvView};
pub use weights::{LayerWeights, Weights, G, L};

/// Tokens per micro-batch of a long prompt (bounds activation memory).
pub const UBATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{arch}' (supported: {})", Arch::SUPPORTED)]
    UnknownArch { arch: String },
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("tensor '{name}' is missing")]
    MissingTensor { name: String },
    #[error("tensor '{name}': {problem}")]
    BadTensor { name: String, problem: String },
    #[error("unusable model configuration: {problem}")]
    BadConfig { problem: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{len} tokens in the session plus {n_new} new exceed its capacity of {capacity} tokens: pass a larger --ctx")]
    ContextFull { len: usize, n_new: usize, capacity: usize },
    #[error("a session of {requested} tokens exceeds the context of {ctx} tokens the model was loaded with: pass a larger --ctx")]
    SessionTooLarge { requested: usize, ctx: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    #[error("the session was made by another model")]
    WrongSession,
}

/// How the model is loaded.
#[derive(Clone, Copy, Debug)]
pub struct ModelOptions {
    /// Most tokens a session may hold (0: the model's training context).
    pub ctx: usize,
    /// CPU threads (0: one per core).
    pub threads: usize,
}

/// Which of the new tokens' logits [`Model::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last token's only.
    Last,
    /// Every token's.
    All,
    /// Tokens `i..` of this call (none when `i >= tokens.len()`).
    From(usize),
}

/// One sequence's state: its KV cache and its length.
pub struct Session {
    kv: kv::SeqKv,
    len: usize,
    scratch: Scratch,
    model_id: u64,
}

impl Session {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Most tokens the session holds.
    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }
    /// Forgets every token.
    pub fn clear(&mut self) {
        self.truncate(0);
    }
    /// Keeps the first `n` tokens (no-op when `n >= len`).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
        self.kv.truncate(self.len);
    }
    /// Asserts the block bookkeeping is consistent (tests).
    pub fn check_invariants(&self) {
        self.kv.check_invariants();
        assert!(self.kv.block_table.len() * DEFAULT_BLOCK_SIZE >= self.len);
    }
}

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

pub struct Model {
    cfg: Config,
    weights: Weights,
    backend: Arc<dyn Backend>,
    ctx: usize,
    id: u64,
    _file: Arc<GgufFile>,
}

impl Model {
    /// Loads `file` on the CPU backend.
    pub fn load(file: Arc<GgufFile>, opts: ModelOptions) -> Result<Model, ModelError> {
        let backend = backend::cpu(backend::CpuOptions::threads(opts.threads))?;
        Model::load_on(file, opts, backend)
    }

    /// Loads `file` on a given backend.
    pub fn load_on(file: Arc<GgufFile>, opts: ModelOptions, backend: Arc<dyn Backend>) -> Result<Model, ModelError> {
        let cfg = Config::from_gguf(&file)?;
        let weights = Weights::load(&file, &cfg, backend.as_ref())?;
        let ctx = if opts.ctx == 0 { cfg.ctx_train } else { opts.ctx };
        let id = NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Model { cfg, weights, backend, ctx, id, _file: file })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The context the model was loaded with (most tokens per session).
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// The shape of one layer's K/V pool of `num_blocks` blocks of `block_size` tokens for this model.
    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape { num_blocks, block_size, n_kv_heads: self.cfg.n_kv_heads, head_dim: self.cfg.head_dim }
    }

    /// A session holding up to `max_tokens` tokens (0: the loaded context).
    pub fn new_session(&self, max_tokens: usize) -> Result<Session, ModelError> {
        let max_tokens = if max_tokens == 0 { self.ctx } else { max_tokens };
        if max_tokens > self.ctx {
            return Err(ModelError::SessionTooLarge { requested: max_tokens, ctx: self.ctx });
        }
        let kv = kv::SeqKv::new(self.backend.as_ref(), &self.cfg, max_tokens, DEFAULT_BLOCK_SIZE)?;
        Ok(Session { kv, len: 0, scratch: Scratch::default(), model_id: self.id })
    }

    /// Appends `tokens` to the session (positions `sess.len()..`) and returns the logits `which` asks
    /// for, `[n_out x n_vocab]` row-major.
    pub fn forward(&self, sess: &mut Session, tokens: &[u32], which: Logits) -> Result<Vec<f32>, ModelError> {
        if sess.model_id != self.id {
            return Err(ModelError::WrongSession);
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_vocab) {
            return Err(ModelError::BadToken { id, n_vocab: self.cfg.n_vocab });
        }
        let capacity = sess.capacity();
        if sess.len + tokens.len() > capacity {
            return Err(ModelError::ContextFull { len: sess.len, n_new: tokens.len(), capacity });
        }
        let n = tokens.len();
        let out_from = match which {
            Logits::Last => n.saturating_sub(1),
            Logits::All => 0,
            Logits::From(i) => i.min(n),
        };
        let mut logits = Vec::new();
        logits.try_reserve_exact((n - out_from) * self.cfg.n_vocab).map_err(|_| BackendError::OutOfMemory {
            what: "logits".into(),
            bytes: (n - out_from) * self.cfg.n_vocab * 4,
            backend: "host".into(),
        })?;

        for start in (0..n).step_by(UBATCH) {
            let chunk = &tokens[start..(start + UBATCH).min(n)];
            let (p0, m) = (sess.len, chunk.len());
            sess.kv.reserve(p0 + m).expect("capacity checked above");
            let positions: Vec<u32> = (p0..p0 + m).map(|p| p as u32).collect();
            let slot_mapping: Vec<u32> = (p0..p0 + m).map(|p| sess.kv.slot(p)).collect();
            let out_rows: Vec<u32> = (start..start + m).filter(|&i| i >= out_from).map(|i| (i - start) as u32).collect();
            let block_table = sess.kv.block_table.clone();
            let seqs = [AttnSeq { q_start: 0, n_q: m, ctx_len: p0 + m, block_table: &block_table, view: None }];
            let batch = ForwardBatch { tokens: chunk, positions: &positions, slot_mapping: &slot_mapping, seqs: &seqs, out_rows: &out_rows, score_len: 0 };
            let out = self.forward_batch(&mut sess.kv.layers, &batch, &mut sess.scratch)?;
            logits.extend_from_slice(&out);
            sess.len += m;
        }
        Ok(logits)
    }
}
