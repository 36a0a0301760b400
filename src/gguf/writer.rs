//! The GGUF writer. Tensor data are produced one tensor at a time by a callback, so a multi-gigabyte
//! synthetic model is written without holding it in memory.

use std::io::{self, Write};

use super::reader::first_duplicate;
use super::value::{Value, ValueType};
use super::{keys, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::dtype::GgmlType;

/// A tensor to write: name, dims (`ne[0]` first) and type. Its byte size follows from them.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dims: &[u64], ty: GgmlType) -> TensorSpec {
        TensorSpec { name: name.into(), dims: dims.to_vec(), ty }
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data, or `None` if the row length is not a whole number of blocks.
    pub fn n_bytes(&self) -> Option<u64> {
        if self.dims.first().is_none_or(|&ne0| ne0 % self.ty.block_size() as u64 != 0) {
            return None;
        }
        self.ty.bytes_for(self.n_elements())
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Write a GGUF v3 file. `fill(i, buf)` must append exactly tensor `i`'s bytes to `buf` (cleared before
/// each call); a wrong length is an error, not a corrupt file.
pub fn write_gguf<W: Write>(
    out: &mut W,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut fill: impl FnMut(usize, &mut Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    if let Some(k) = first_duplicate(metadata.iter().map(|(k, _)| k.as_str())) {
        return Err(invalid(format!("duplicate metadata key '{k}'")));
    }
    if let Some(n) = first_duplicate(tensors.iter().map(|t| t.name.as_str())) {
        return Err(invalid(format!("duplicate tensor name '{n}'")));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == keys::ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
        Some((_, v)) => return Err(invalid(format!("general.alignment must be a u32 power of two, not {v:?}"))),
    };

    // Header: count bytes as we go so the data section starts on an aligned offset.
    let mut header = Vec::new();
    header.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        put_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS || t.dims.contains(&0) {
            return Err(invalid(format!("tensor '{}' has bad dims {:?}", t.name, t.dims)));
        }
        let size = t.n_bytes().ok_or_else(|| {
            invalid(format!("tensor '{}': dims {:?} do not fit whole {} blocks", t.name, t.dims, t.ty))
        })?;
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        sizes.push(size);
        offset = (offset + size).div_ceil(alignment) * alignment;
    }
    pad(&mut header, alignment);
    out.write_all(&header)?;

    let mut buf = Vec::new();
    for (i, (t, &size)) in tensors.iter().zip(&sizes).enumerate() {
        buf.clear();
        fill(i, &mut buf)?;
        if buf.len() as u64 != size {
            return Err(invalid(format!("tensor '{}': callback wrote {} bytes, expected {size}", t.name, buf.len())));
        }
        pad(&mut buf, alignment);
        out.write_all(&buf)?;
    }
    Ok(())
}

fn pad(buf: &mut Vec<u8>, alignment: u64) {
    let len = buf.len() as u64;
    buf.resize((len.div_ceil(alignment) * alignment) as usize, 0);
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_string(buf, s),
        Value::Array(elem, items) => {
            if let Some(bad) = items.iter().find(|i| i.value_type() != *elem) {
                return Err(invalid(format!("array of {elem:?} holds a {:?}", bad.value_type())));
            }
            buf.extend_from_slice(&(*elem as u32).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item)?;
            }
        }
    }
    Ok(())
}

/// An in-memory GGUF under construction: metadata and tensors with their bytes. For tests and small files.
#[derive(Default, Clone)]
pub struct GgufBuilder {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(TensorSpec, Vec<u8>)>,
}

impl GgufBuilder {
    pub fn new() -> GgufBuilder {
        GgufBuilder::default()
    }

    pub fn kv(mut self, key: &str, value: Value) -> GgufBuilder {
        self.metadata.push((key.to_string(), value));
        self
    }

    pub fn tensor(mut self, spec: TensorSpec, data: Vec<u8>) -> GgufBuilder {
        self.tensors.push((spec, data));
        self
    }

    pub fn to_bytes(&self) -> io::Result<Vec<u8>> {
        let specs: Vec<TensorSpec> = self.tensors.iter().map(|(s, _)| s.clone()).collect();
        let mut out = Vec::new();
        write_gguf(&mut out, &self.metadata, &specs, |i, buf| {
            buf.extend_from_slice(&self.tensors[i].1);
            Ok(())
        })?;
        Ok(out)
    }
}

/// A string-array value (vocabularies, merges).
pub fn string_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(ValueType::String, items.into_iter().map(|s| Value::String(s.as_ref().to_string())).collect())
}
