//! Synthetic models: a GGUF with random weights for a named shape and quant type, plus a minimal
//! SentencePiece-style tokenizer section, so benchmarks and GPU tests of large shapes need no download.
//!
//! Weights are random blocks, not quantized random floats: every byte of a block is random and its f16
//! scale fields are set so dequantized values have a standard deviation near 0.02 (the N(0, 0.02)
//! initialisation the peer figures use). Norm weights are 1 + N(0, 0.02) in f32. Generation is parallel
//! and streamed tensor by tensor, so an 8B model is written without holding it in memory.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use half::f16;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::dtype::GgmlType;
use crate::gguf::{keys, string_array, write_gguf, TensorSpec, Value, ValueType};

/// A model shape. `head_dim` is explicit because gemma3's is not `dim / n_heads`.
#[derive(Clone, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub arch: &'static str,
    pub dim: u64,
    pub n_layers: u64,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub head_dim: u64,
    pub ffn_dim: u64,
    pub vocab: u64,
    pub ctx: u64,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
    /// gemma3 only: sliding-window size of the local layers.
    pub sliding_window: Option<u64>,
}

pub const SHAPES: &[Shape] = &[
    Shape { name: "tiny", arch: "llama", dim: 256, n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 64, ffn_dim: 512, vocab: 512, ctx: 512, rope_base: 10000.0, rms_eps: 1e-5, tied_embeddings: false, sliding_window: None },
    Shape { name: "tiny-gemma3", arch: "gemma3", dim: 256, n_layers: 2, n_heads: 4, n_kv_heads: 1, head_dim: 64, ffn_dim: 512, vocab: 512, ctx: 512, rope_base: 1e6, rms_eps: 1e-6, tied_embeddings: true, sliding_window: Some(64) },
    Shape { name: "smollm2-135m", arch: "llama", dim: 576, n_layers: 30, n_heads: 9, n_kv_heads: 3, head_dim: 64, ffn_dim: 1536, vocab: 49152, ctx: 8192, rope_base: 100000.0, rms_eps: 1e-5, tied_embeddings: true, sliding_window: None },
    Shape { name: "gemma3-270m", arch: "gemma3", dim: 640, n_layers: 18, n_heads: 4, n_kv_heads: 1, head_dim: 256, ffn_dim: 2048, vocab: 262144, ctx: 32768, rope_base: 1e6, rms_eps: 1e-6, tied_embeddings: true, sliding_window: Some(512) },
    Shape { name: "llama3-1b", arch: "llama", dim: 2048, n_layers: 16, n_heads: 32, n_kv_heads: 8, head_dim: 64, ffn_dim: 8192, vocab: 128256, ctx: 131072, rope_base: 500000.0, rms_eps: 1e-5, tied_embeddings: true, sliding_window: None },
    Shape { name: "llama3-8b", arch: "llama", dim: 4096, n_layers: 32, n_heads: 32, n_kv_heads: 8, head_dim: 128, ffn_dim: 14336, vocab: 128256, ctx: 8192, rope_base: 500000.0, rms_eps: 1e-5, tied_embeddings: false, sliding_window: None },
];

pub fn shape(name: &str) -> Option<&'static Shape> {
    SHAPES.iter().find(|s| s.name == name)
}

/// The quantization recipe: one type for the big matrices, or llama.cpp-like mixes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Recipe {
    /// Every matrix in this type (embeddings and output too).
    Uniform(GgmlType),
    /// Q4_K, with Q6_K for output, attn_v and ffn_down on every other layer (like llama.cpp's Q4_K_M).
    Q4KM,
}

impl Recipe {
    pub fn parse(s: &str) -> Option<Recipe> {
        if s.eq_ignore_ascii_case("q4_k_m") {
            return Some(Recipe::Q4KM);
        }
        let ty = GgmlType::from_name(s).or_else(|| GgmlType::from_name(s.trim_end_matches("_s").trim_end_matches("_S")))?;
        (ty.is_supported() && ty != GgmlType::Q8K).then_some(Recipe::Uniform(ty))
    }

    /// `general.file_type` (llama_ftype) for this recipe, so llama.cpp labels the file the same way.
    fn file_type(self) -> u32 {
        use GgmlType::*;
        match self {
            Recipe::Q4KM => 15,
            Recipe::Uniform(t) => match t {
                F32 => 0,
                F16 => 1,
                Q4_0 => 2,
                Q4_1 => 3,
                Q8_0 => 7,
                Q5_0 => 8,
                Q5_1 => 9,
                Q2K => 10,
                Q3K => 12,
                Q4K => 14,
                Q5K => 16,
                Q6K => 18,
                BF16 => 32,
                _ => 0,
            },
        }
    }

    fn pick(self, tensor: &str, layer: Option<u64>) -> GgmlType {
        match self {
            Recipe::Uniform(t) => t,
            Recipe::Q4KM => {
                let more_bits = layer.is_none_or(|il| il % 2 == 0);
                let is_big = tensor == "output.weight" || tensor.ends_with("attn_v.weight") || tensor.ends_with("ffn_down.weight");
                if is_big && more_bits {
                    GgmlType::Q6K
                } else {
                    GgmlType::Q4K
                }
            }
        }
    }
}

/// K-quants need rows that are whole 256-element super-blocks; like llama.cpp, fall back for others.
fn fit_row(ty: GgmlType, row_len: u64) -> GgmlType {
    use GgmlType::*;
    if row_len.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    match ty {
        Q2K | Q3K => Q4_0,
        Q4K => Q5_0,
        Q5K => Q5_1,
        _ => Q8_0,
    }
}

/// The tensors of `shape`, in llama.cpp's naming, with `recipe` applied. Norm weights are F32.
pub fn tensor_specs(shape: &Shape, recipe: Recipe) -> Vec<TensorSpec> {
    let (d, hd) = (shape.dim, shape.head_dim);
    let q_dim = shape.n_heads * hd;
    let kv_dim = shape.n_kv_heads * hd;
    let mat = |name: String, ne0: u64, ne1: u64, layer: Option<u64>| {
        let ty = fit_row(recipe.pick(&name, layer), ne0);
        TensorSpec::new(name, &[ne0, ne1], ty)
    };
    let norm = |name: String, n: u64| TensorSpec::new(name, &[n], GgmlType::F32);

    let mut t = vec![mat("token_embd.weight".into(), d, shape.vocab, None), norm("output_norm.weight".into(), d)];
    if !shape.tied_embeddings {
        t.push(mat("output.weight".into(), d, shape.vocab, None));
    }
    for il in 0..shape.n_layers {
        let b = |s: &str| format!("blk.{il}.{s}");
        t.push(norm(b("attn_norm.weight"), d));
        t.push(mat(b("attn_q.weight"), d, q_dim, Some(il)));
        t.push(mat(b("attn_k.weight"), d, kv_dim, Some(il)));
        t.push(mat(b("attn_v.weight"), d, kv_dim, Some(il)));
        t.push(mat(b("attn_output.weight"), q_dim, d, Some(il)));
        t.push(norm(b("ffn_norm.weight"), d));
        t.push(mat(b("ffn_gate.weight"), d, shape.ffn_dim, Some(il)));
        t.push(mat(b("ffn_up.weight"), d, shape.ffn_dim, Some(il)));
        t.push(mat(b("ffn_down.weight"), shape.ffn_dim, d, Some(il)));
        if shape.arch == "gemma3" {
            t.push(norm(b("attn_q_norm.weight"), hd));
            t.push(norm(b("attn_k_norm.weight"), hd));
            t.push(norm(b("post_attention_norm.weight"), d));
            t.push(norm(b("post_ffw_norm.weight"), d));
        }
    }
    t
}

/// Metadata: the architecture keys llama.cpp requires and a minimal SentencePiece vocabulary
/// (`<unk>`, `<s>`, `</s>`, 256 byte tokens, then made-up pieces) of the shape's vocab size.
pub fn metadata(shape: &Shape, recipe: Recipe) -> Vec<(String, Value)> {
    let a = |k: &str| keys::arch_key(shape.arch, k);
    let mut m = vec![
        (keys::ARCHITECTURE.into(), Value::String(shape.arch.into())),
        (keys::NAME.into(), Value::String(format!("pagellm synthetic {}", shape.name))),
        (keys::FILE_TYPE.into(), Value::U32(recipe.file_type())),
        (keys::QUANTIZATION_VERSION.into(), Value::U32(2)),
        (a(keys::CONTEXT_LENGTH), Value::U32(shape.ctx as u32)),
        (a(keys::EMBEDDING_LENGTH), Value::U32(shape.dim as u32)),
        (a(keys::BLOCK_COUNT), Value::U32(shape.n_layers as u32)),
        (a(keys::FEED_FORWARD_LENGTH), Value::U32(shape.ffn_dim as u32)),
        (a(keys::HEAD_COUNT), Value::U32(shape.n_heads as u32)),
        (a(keys::HEAD_COUNT_KV), Value::U32(shape.n_kv_heads as u32)),
        (a(keys::KEY_LENGTH), Value::U32(shape.head_dim as u32)),
        (a(keys::VALUE_LENGTH), Value::U32(shape.head_dim as u32)),
        (a(keys::ROPE_DIMENSION_COUNT), Value::U32(shape.head_dim as u32)),
        (a(keys::ROPE_FREQ_BASE), Value::F32(shape.rope_base)),
        (a(keys::RMS_EPS), Value::F32(shape.rms_eps)),
        (a(keys::VOCAB_SIZE), Value::U32(shape.vocab as u32)),
    ];
    if let Some(w) = shape.sliding_window {
        m.push((a(keys::SLIDING_WINDOW), Value::U32(w as u32)));
    }

    let n = shape.vocab as usize;
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3]; // unknown, control, control
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6); // byte
    }
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let mut i = 0usize;
    while tokens.len() < n {
        // Distinct pieces: "▁" + base-26 spelling of i.
        let mut s = String::from("\u{2581}");
        let mut k = i;
        loop {
            s.push(letters[k % 26] as char);
            k /= 26;
            if k == 0 {
                break;
            }
        }
        tokens.push(s);
        types.push(1); // normal
        i += 1;
    }
    tokens.truncate(n);
    types.truncate(n);
    let scores: Vec<Value> = (0..n).map(|i| Value::F32(-(i as f32))).collect();
    m.extend([
        (keys::TOKENIZER_MODEL.into(), Value::String("llama".into())),
        (keys::TOKENIZER_PRE.into(), Value::String("default".into())),
        (keys::TOKENIZER_TOKENS.into(), string_array(&tokens)),
        (keys::TOKENIZER_SCORES.into(), Value::Array(ValueType::F32, scores)),
        (keys::TOKENIZER_TOKEN_TYPE.into(), Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect())),
        (keys::TOKENIZER_BOS_ID.into(), Value::U32(1)),
        (keys::TOKENIZER_EOS_ID.into(), Value::U32(2)),
        (keys::TOKENIZER_UNK_ID.into(), Value::U32(0)),
        (keys::TOKENIZER_ADD_BOS.into(), Value::Bool(true)),
    ]);
    m
}

/// (byte offset, f16 value) of the scale fields of one block, chosen so values have std ~0.02.
fn scale_fields(ty: GgmlType) -> &'static [(usize, f32)] {
    use GgmlType::*;
    match ty {
        Q4_0 => &[(0, 4.3e-3)],
        Q4_1 => &[(0, 4.3e-3), (2, -3.4e-2)],
        Q5_0 => &[(0, 2.2e-3)],
        Q5_1 => &[(0, 2.2e-3), (2, -3.4e-2)],
        Q8_0 => &[(0, 2.7e-4)],
        Q2K => &[(80, 2.4e-3), (82, 1.2e-3)],
        Q3K => &[(108, 5.0e-4)],
        Q4K => &[(0, 1.4e-4), (2, 1.0e-3)],
        Q5K => &[(0, 6.8e-5), (2, 1.05e-3)],
        Q6K => &[(208, 1.5e-5)],
        _ => &[],
    }
}

/// Fill `buf` with `n_bytes` of random data for a tensor of type `ty`, in parallel, reproducibly from `seed`.
fn random_tensor(ty: GgmlType, n_bytes: usize, seed: u64, buf: &mut Vec<u8>) {
    buf.resize(n_bytes, 0);
    const CHUNK: usize = 1 << 20;
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let es = ty.type_size();
            buf.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
                for e in chunk.chunks_exact_mut(es) {
                    let x = normal.sample(&mut rng);
                    match ty {
                        GgmlType::F32 => e.copy_from_slice(&x.to_le_bytes()),
                        GgmlType::F16 => e.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
                        _ => e.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    }
                }
            });
        }
        _ => {
            let bs = ty.type_size();
            let fields = scale_fields(ty);
            let per_chunk = (CHUNK / bs).max(1) * bs;
            buf.par_chunks_mut(per_chunk).enumerate().for_each(|(ci, chunk)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                rng.fill_bytes(chunk);
                for block in chunk.chunks_exact_mut(bs) {
                    for &(off, scale) in fields {
                        let jitter: f32 = rng.gen_range(0.5..1.5);
                        block[off..off + 2].copy_from_slice(&f16::from_f32(scale * jitter).to_le_bytes());
                    }
                }
            });
        }
    }
}

/// Norm weights near 1 (a random-weight model whose norms are ~0 would produce only zeros).
fn random_norm(n: usize, seed: u64, buf: &mut Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(1.0f32, 0.02).expect("valid normal");
    buf.clear();
    for _ in 0..n {
        buf.extend_from_slice(&normal.sample(&mut rng).to_le_bytes());
    }
}

/// Write the synthetic model to `path`. Returns the number of bytes written.
pub fn write_model(path: &Path, shape: &Shape, recipe: Recipe, seed: u64, mut progress: impl FnMut(usize, usize)) -> io::Result<u64> {
    let specs = tensor_specs(shape, recipe);
    let meta = metadata(shape, recipe);
    let file = std::fs::File::create(path)?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    let n = specs.len();
    write_gguf(&mut out, &meta, &specs, |i, buf| {
        let t = &specs[i];
        let tseed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        if t.dims.len() == 1 {
            random_norm(t.dims[0] as usize, tseed, buf);
        } else {
            let n_bytes = t.n_bytes().expect("specs are built with whole blocks") as usize;
            random_tensor(t.ty, n_bytes, tseed, buf);
        }
        progress(i + 1, n);
        Ok(())
    })?;
    out.flush()?;
    Ok(out.get_ref().metadata()?.len())
}
