//! `Config`: the hyper-parameters of a model, read from GGUF metadata, and the per-architecture facts
//! llama.cpp hard-codes rather than stores (gemma3's sliding-window pattern and local RoPE base).

use crate::backend::{Glu, RopeMode};
use crate::gguf::{keys, GgufFile};

use super::ModelError;

/// Keys pagellm reads that `gguf::keys` does not list (suffixes after "{arch}.").
pub const ROPE_FREQ_BASE_SWA: &str = "rope.freq_base_swa";

/// Architectures the model code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, gemma3";

    pub fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Everything the forward pass needs to know about a model's shape and numerics.
#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub n_vocab: usize,
    /// Context length the model was trained for (`{arch}.context_length`).
    pub ctx_train: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// K and V head width (`attention.key_length`; gemma3's is not `dim / n_heads`).
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub rms_eps: f32,
    pub rope_mode: RopeMode,
    /// Dimensions of each head that RoPE rotates.
    pub n_rot: usize,
    /// RoPE base and scale of global-attention layers.
    pub rope_base: f32,
    pub rope_scale: f32,
    /// RoPE base and scale of sliding-window layers.
    pub rope_base_swa: f32,
    pub rope_scale_swa: f32,
    /// Sliding window (tokens) of the layers `swa_layers` marks.
    pub sliding_window: Option<usize>,
    pub swa_layers: Vec<bool>,
    /// Multiplies `q . k` in the softmax (llama: `1 / sqrt(head_dim)`).
    pub kq_scale: f32,
    /// Multiplies Q before attention (gemma3's `query_pre_attn_scalar`), with `kq_scale` then 1.
    pub q_scale: Option<f32>,
    /// Multiplies the token embeddings (gemma: `sqrt(dim)`).
    pub embed_scale: Option<f32>,
    pub glu: Glu,
    /// Per-head RMS norm of Q and K before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// RMS norms on the attention and FFN outputs before the residual adds (gemma2/3).
    pub post_norms: bool,
    /// Biases on the Q, K, V projections (qwen2).
    pub qkv_bias: bool,
}

fn req_u64(file: &GgufFile, arch: &str, suffix: &str) -> Result<u64, ModelError> {
    file.get_u64(&keys::arch_key(arch, suffix)).ok_or_else(|| ModelError::MissingKey { key: keys::arch_key(arch, suffix) })
}

fn opt_u64(file: &GgufFile, arch: &str, suffix: &str) -> Option<u64> {
    file.get_u64(&keys::arch_key(arch, suffix))
}

fn opt_f64(file: &GgufFile, arch: &str, suffix: &str) -> Option<f64> {
    file.get_f64(&keys::arch_key(arch, suffix))
}

impl Config {
    /// Reads the configuration of `file`; an architecture outside [`Arch::SUPPORTED`] is an error.
    pub fn from_gguf(file: &GgufFile) -> Result<Config, ModelError> {
        let arch_name = file.architecture().ok_or_else(|| ModelError::MissingKey { key: keys::ARCHITECTURE.into() })?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| ModelError::UnknownArch { arch: arch_name.into() })?;
        let a = arch_name;
        let u = |s: &str| req_u64(file, a, s).map(|v| v as usize);

        let dim = u(keys::EMBEDDING_LENGTH)?;
        let n_layers = u(keys::BLOCK_COUNT)?;
        let n_heads = u(keys::HEAD_COUNT)?;
        let n_kv_heads = opt_u64(file, a, keys::HEAD_COUNT_KV).map_or(n_heads, |v| v as usize);
        if n_heads == 0 || dim == 0 || n_layers == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(ModelError::BadConfig {
                problem: format!("{n_heads} heads, {n_kv_heads} KV heads, dim {dim}, {n_layers} layers"),
            });
        }
        let head_dim = opt_u64(file, a, keys::KEY_LENGTH).map_or(dim / n_heads, |v| v as usize);
        let head_dim_v = opt_u64(file, a, keys::VALUE_LENGTH).map_or(head_dim, |v| v as usize);
        if head_dim_v != head_dim || head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::BadConfig { problem: format!("key length {head_dim}, value length {head_dim_v}") });
        }
        let n_rot = opt_u64(file, a, keys::ROPE_DIMENSION_COUNT).map_or(head_dim, |v| v as usize);
        if n_rot > head_dim || !n_rot.is_multiple_of(2) {
            return Err(ModelError::BadConfig { problem: format!("rope dimension count {n_rot} for heads of {head_dim}") });
        }
        let rms_eps = opt_f64(file, a, keys::RMS_EPS).ok_or_else(|| ModelError::MissingKey { key: keys::arch_key(a, keys::RMS_EPS) })? as f32;

        let gemma3 = arch == Arch::Gemma3;
        let rope_base = opt_f64(file, a, keys::ROPE_FREQ_BASE).unwrap_or(10_000.0) as f32;
        let rope_scale = match file.get_arch(keys::ROPE_SCALING_TYPE).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => 1.0 / opt_f64(file, a, keys::ROPE_SCALING_FACTOR).unwrap_or(1.0) as f32,
            Some(other) => {
                return Err(ModelError::BadConfig { problem: format!("rope scaling '{other}' is not supported (only linear)") })
            }
        };
        // llama.cpp: gemma3's sliding layers use base 10000 and no scaling unless the file says otherwise.
        let rope_base_swa = opt_f64(file, a, ROPE_FREQ_BASE_SWA).map_or(if gemma3 { 10_000.0 } else { rope_base }, |v| v as f32);
        let rope_scale_swa = if gemma3 { 1.0 } else { rope_scale };

        let sliding_window = if gemma3 { Some(u(keys::SLIDING_WINDOW)?) } else { None };
        if sliding_window == Some(0) {
            return Err(ModelError::BadConfig { problem: "sliding window of 0 tokens".into() });
        }
        // llama.cpp's set_swa_pattern(6): every 6th layer (5, 11, ...) is global, the rest slide.
        let swa_layers = (0..n_layers).map(|il| gemma3 && il % 6 < 5).collect();

        let ctx_train = opt_u64(file, a, keys::CONTEXT_LENGTH).map_or(2048, |v| v as usize);
        let ffn_dim = u(keys::FEED_FORWARD_LENGTH)?;
        let n_vocab = file
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| ModelError::MissingTensor { name: "token_embd.weight".into() })? as usize;

        let inv_sqrt_hd = 1.0 / (head_dim as f32).sqrt();
        // llama.cpp (after gemma_pytorch): the 27B model (62 layers) scales Q by 1/sqrt(dim / n_heads).
        let gemma_q_scale = if n_layers == 62 { 1.0 / ((dim / n_heads) as f32).sqrt() } else { inv_sqrt_hd };
        Ok(Config {
            arch,
            n_vocab,
            ctx_train,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            rms_eps,
            rope_mode: if matches!(arch, Arch::Llama | Arch::Mistral) { RopeMode::Norm } else { RopeMode::Neox },
            n_rot,
            rope_base,
            rope_scale,
            rope_base_swa,
            rope_scale_swa,
            sliding_window,
            swa_layers,
            kq_scale: if gemma3 { 1.0 } else { inv_sqrt_hd },
            q_scale: gemma3.then_some(gemma_q_scale),
            embed_scale: gemma3.then(|| (dim as f32).sqrt()),
            glu: if gemma3 { Glu::GeluTanh } else { Glu::Silu },
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: gemma3,
            qkv_bias: arch == Arch::Qwen2,
        })
    }

    /// Width of the Q projection (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the K and V projections (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Whether layer `il` uses the sliding window.
    pub fn is_swa(&self, il: usize) -> bool {
        self.swa_layers[il]
    }
}
