//! `pagellm info`: what a GGUF file holds, for people (a table) and machines (`--json`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::dtype::GgmlType;
use crate::gguf::{keys, GgufFile, Value};

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TypeRow {
    #[serde(rename = "type")]
    pub ty: String,
    pub count: usize,
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct RopeInfo {
    pub freq_base: Option<f64>,
    pub dimension_count: Option<u64>,
    pub scaling_type: Option<String>,
    pub scaling_factor: Option<f64>,
}

/// The facts `pagellm info` prints. Optional fields are those a file may legitimately omit.
#[derive(Serialize, Debug, Clone)]
pub struct ModelInfo {
    pub path: String,
    pub file_size: u64,
    pub gguf_version: u32,
    pub architecture: Option<String>,
    pub name: Option<String>,
    pub n_params: u64,
    pub n_tensors: usize,
    pub context_length: Option<u64>,
    pub n_layers: Option<u64>,
    pub dim: Option<u64>,
    pub ffn_dim: Option<u64>,
    pub n_heads: Option<u64>,
    pub n_kv_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub sliding_window: Option<u64>,
    pub rms_eps: Option<f64>,
    pub rope: RopeInfo,
    pub vocab_size: Option<u64>,
    pub tokenizer_model: Option<String>,
    pub tokenizer_pre: Option<String>,
    pub has_chat_template: bool,
    pub bits_per_weight: f64,
    pub tensor_types: Vec<TypeRow>,
}

impl ModelInfo {
    pub fn from_file(path: &Path, f: &GgufFile) -> ModelInfo {
        let arch_u64 = |k: &str| f.get_arch(k).and_then(Value::as_u64);
        let arch_f64 = |k: &str| f.get_arch(k).and_then(Value::as_f64);
        let n_heads = arch_u64(keys::HEAD_COUNT);
        let dim = arch_u64(keys::EMBEDDING_LENGTH);
        // head_count_kv defaults to head_count (no GQA), key_length to dim / n_heads, as in llama.cpp.
        let n_kv_heads = arch_u64(keys::HEAD_COUNT_KV).or(n_heads);
        let head_dim = arch_u64(keys::KEY_LENGTH).or_else(|| Some(dim? / n_heads.filter(|&h| h > 0)?));
        let n_vocab_tokens = f.get(keys::TOKENIZER_TOKENS).and_then(Value::as_array).map(|a| a.len() as u64);

        let mut by_type: BTreeMap<GgmlType, TypeRow> = BTreeMap::new();
        for t in &f.tensors {
            let row = by_type.entry(t.ty).or_insert_with(|| TypeRow { ty: t.ty.name().into(), count: 0, elements: 0, bytes: 0 });
            row.count += 1;
            row.elements += t.n_elements;
            row.bytes += t.n_bytes;
        }
        let n_params: u64 = f.tensors.iter().map(|t| t.n_elements).sum();
        let data_bytes: u64 = f.tensors.iter().map(|t| t.n_bytes).sum();
        ModelInfo {
            path: path.display().to_string(),
            file_size: f.file_size(),
            gguf_version: f.version,
            architecture: f.architecture().map(String::from),
            name: f.get_str(keys::NAME).map(String::from),
            n_params,
            n_tensors: f.tensors.len(),
            context_length: arch_u64(keys::CONTEXT_LENGTH),
            n_layers: arch_u64(keys::BLOCK_COUNT),
            dim,
            ffn_dim: arch_u64(keys::FEED_FORWARD_LENGTH),
            n_heads,
            n_kv_heads,
            head_dim,
            sliding_window: arch_u64(keys::SLIDING_WINDOW),
            rms_eps: arch_f64(keys::RMS_EPS),
            rope: RopeInfo {
                freq_base: arch_f64(keys::ROPE_FREQ_BASE),
                dimension_count: arch_u64(keys::ROPE_DIMENSION_COUNT).or(head_dim),
                scaling_type: f.get_arch(keys::ROPE_SCALING_TYPE).and_then(Value::as_str).map(String::from),
                scaling_factor: arch_f64(keys::ROPE_SCALING_FACTOR),
            },
            vocab_size: n_vocab_tokens.or_else(|| arch_u64(keys::VOCAB_SIZE)),
            tokenizer_model: f.get_str(keys::TOKENIZER_MODEL).map(String::from),
            tokenizer_pre: f.get_str(keys::TOKENIZER_PRE).map(String::from),
            has_chat_template: f.get_str(keys::CHAT_TEMPLATE).is_some(),
            bits_per_weight: if n_params > 0 { data_bytes as f64 * 8.0 / n_params as f64 } else { 0.0 },
            tensor_types: by_type.into_values().collect(),
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let mut s = String::new();
        let mut line = |k: &str, v: String| writeln!(s, "{k:<20} {v}").expect("write to String");
        line("file", format!("{} ({}, GGUF v{})", self.path, human_bytes(self.file_size), self.gguf_version));
        line("architecture", self.architecture.clone().unwrap_or_else(|| "-".into()));
        if let Some(n) = &self.name {
            line("name", n.clone());
        }
        line("parameters", format!("{} ({:.2} bits per weight)", human_count(self.n_params), self.bits_per_weight));
        line("context length", opt(self.context_length));
        line("layers", opt(self.n_layers));
        line("embedding dim", opt(self.dim));
        line("ffn dim", opt(self.ffn_dim));
        line("heads", opt(self.n_heads));
        line("kv heads", opt(self.n_kv_heads));
        line("head dim", opt(self.head_dim));
        if let Some(w) = self.sliding_window {
            line("sliding window", w.to_string());
        }
        let mut rope = format!(
            "base {}, dims {}",
            self.rope.freq_base.map_or("-".into(), |b| b.to_string()),
            opt(self.rope.dimension_count)
        );
        if let Some(t) = &self.rope.scaling_type {
            write!(rope, ", scaling {t} x{}", self.rope.scaling_factor.unwrap_or(1.0)).expect("write to String");
        }
        line("rope", rope);
        line("vocab size", opt(self.vocab_size));
        let tok = match (&self.tokenizer_model, &self.tokenizer_pre) {
            (Some(m), Some(p)) => format!("{m} (pre-tokenizer {p})"),
            (Some(m), None) => m.clone(),
            _ => "-".into(),
        };
        line("tokenizer", tok);
        line("chat template", if self.has_chat_template { "present".into() } else { "absent".into() });
        writeln!(s, "\n{:<8} {:>7} {:>14} {:>12}", "type", "tensors", "elements", "bytes").expect("write to String");
        for r in &self.tensor_types {
            writeln!(s, "{:<8} {:>7} {:>14} {:>12}", r.ty, r.count, r.elements, human_bytes(r.bytes)).expect("write to String");
        }
        s
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.2} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
