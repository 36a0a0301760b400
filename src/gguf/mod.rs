//! GGUF v2/v3: read (memory-mapped, zero copy, bounds-checked) and write.
//!
//! Layout of a file (all integers little-endian):
//! ```text
//! "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv x (key, type u32, value)
//!        | n_tensors x (name, n_dims u32, dims u64[n_dims], type u32, offset u64)
//!        | padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
//! ```
//! Contract: `GgufFile::open` never panics and never allocates from a length it has not checked against
//! the bytes that remain; every malformation is a [`GgufError`] naming what is wrong and the byte offset.
//! Tensor data are slices of the map ([`GgufFile::tensor_data`]); nothing is copied.

pub mod keys;
mod reader;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use value::{Value, ValueType};
pub use writer::{string_array, write_gguf, GgufBuilder, TensorSpec};

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML_MAX_DIMS: tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays nest at most this deep (GGUF files in the wild use one level; the cap stops stack exhaustion).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// What went wrong while reading a GGUF file, with the byte offset where it was found.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a GGUF file: magic at byte 0 is {found:#010x}, expected 0x46554747 (\"GGUF\")")]
    BadMagic { found: u32 },
    #[error("unsupported GGUF version {version} at byte 4 (pagellm reads versions 2 and 3)")]
    BadVersion { version: u32 },
    #[error("file truncated: {what} at byte {offset} needs {needed} bytes, only {available} remain")]
    Truncated { what: String, offset: u64, needed: u64, available: u64 },
    #[error("implausible {what} {count} at byte {offset}: the {remaining} remaining bytes cannot hold that many")]
    BadCount { what: String, count: u64, offset: u64, remaining: u64 },
    #[error("invalid UTF-8 in {what} at byte {offset}")]
    BadUtf8 { what: String, offset: u64 },
    #[error("unknown metadata value type {type_id} for key '{key}' at byte {offset}")]
    BadValueType { key: String, type_id: u32, offset: u64 },
    #[error("arrays nested deeper than {MAX_ARRAY_DEPTH} levels for key '{key}' at byte {offset}")]
    TooDeep { key: String, offset: u64 },
    #[error("duplicate metadata key '{key}' at byte {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("bad general.alignment {value}: must be a u32 power of two")]
    BadAlignment { value: String },
    #[error("tensor '{name}' at byte {offset}: {problem}")]
    BadTensor { name: String, offset: u64, problem: String },
    #[error("tensors '{a}' and '{b}' overlap in the data section (byte {offset} relative to its start)")]
    Overlap { a: String, b: String, offset: u64 },
}

impl GgufError {
    pub(crate) fn truncated(what: impl Into<String>, offset: usize, needed: usize, available: usize) -> Self {
        GgufError::Truncated { what: what.into(), offset: offset as u64, needed: needed as u64, available: available as u64 }
    }
}
