//! The GGUF reader: a cursor over the mapped bytes that checks every length before it uses it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use memmap2::Mmap;

use super::value::{Value, ValueType};
use super::{keys, GgufError, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::dtype::GgmlType;

/// One tensor's header entry. `offset` is relative to the start of the data section.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// `ne[0]` first: `ne[0]` is the row length (contiguous), as in ggml.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

enum Storage {
    Map(Mmap),
    Owned(Vec<u8>),
}

/// A parsed GGUF file. Metadata are owned (small); tensor data stay in the map.
pub struct GgufFile {
    storage: Storage,
    pub version: u32,
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    key_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Memory-map and parse `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only; pagellm never writes model files while they are open. A file
        // truncated by another process under us is the one hazard mmap readers accept (llama.cpp too).
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        Self::parse(Storage::Map(map))
    }

    /// Parse a file held in memory (tests, hostile-input fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Map(m) => m,
            Storage::Owned(v) => v,
        }
    }

    pub fn file_size(&self) -> u64 {
        self.bytes().len() as u64
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// `general.architecture`, if present.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str(keys::ARCHITECTURE)
    }

    /// `{arch}.{suffix}` for this file's architecture.
    pub fn get_arch(&self, suffix: &str) -> Option<&Value> {
        self.get(&keys::arch_key(self.architecture()?, suffix))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of one tensor, borrowed from the map (bounds were checked at open).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.bytes()[start..start + info.n_bytes as usize]
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let bytes: &[u8] = match &storage {
            Storage::Map(m) => m,
            Storage::Owned(v) => v,
        };
        let mut c = Cursor { bytes, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::BadVersion { version });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;

        // A key/value pair is at least 8 (key length) + 4 (type) + 1 bytes.
        c.check_count("metadata count", n_kv, 13)?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let at = c.pos;
            let key = c.string("metadata key")?;
            let type_at = c.pos;
            let type_id = c.u32("metadata value type")?;
            let ty = ValueType::from_id(type_id)
                .ok_or_else(|| GgufError::BadValueType { key: key.clone(), type_id, offset: type_at as u64 })?;
            let value = c.value(ty, &key, 0)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey { key, offset: at as u64 });
            }
            metadata.push((key, value));
        }

        let alignment = match key_index.get(keys::ALIGNMENT).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => return Err(GgufError::BadAlignment { value: format!("{v:?}") }),
        };

        // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        c.check_count("tensor count", n_tensors, 24)?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        let mut info_offsets = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let at = c.pos as u64;
            let info = c.tensor_info(alignment)?;
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(bad_tensor(&info.name, at, "duplicate tensor name".into()));
            }
            info_offsets.push(at);
            tensors.push(info);
        }

        let data_offset = align_up(c.pos as u64, alignment);
        let file_size = bytes.len() as u64;
        if data_offset > file_size && !tensors.is_empty() {
            return Err(GgufError::truncated("padding before the data section", c.pos, (data_offset - c.pos as u64) as usize, bytes.len() - c.pos));
        }
        let data_size = file_size.saturating_sub(data_offset);
        for (t, &at) in tensors.iter().zip(&info_offsets) {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|end| end > data_size) {
                return Err(bad_tensor(
                    &t.name,
                    at,
                    format!(
                        "data [{}, +{}) relative to the data section at byte {data_offset} runs past the end of the file ({file_size} bytes)",
                        t.offset, t.n_bytes
                    ),
                ));
            }
        }
        check_overlaps(&tensors)?;

        Ok(GgufFile { storage, version, alignment, data_offset, metadata, tensors, key_index, tensor_index })
    }
}

fn bad_tensor(name: &str, offset: u64, problem: String) -> GgufError {
    GgufError::BadTensor { name: name.to_string(), offset, problem }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Sort by offset and require each tensor to end before the next begins.
fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(GgufError::Overlap { a: pair[0].name.clone(), b: pair[1].name.clone(), offset: pair[1].offset });
        }
    }
    Ok(())
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::truncated(what, self.pos, n, self.remaining()));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reject `count` items of at least `min_size` bytes each that the remaining bytes cannot hold, so
    /// no allocation is ever sized from an unchecked count.
    fn check_count(&self, what: &str, count: u64, min_size: usize) -> Result<(), GgufError> {
        let remaining = self.remaining() as u64;
        if count.checked_mul(min_size as u64).is_none_or(|need| need > remaining) {
            return Err(GgufError::BadCount { what: what.into(), count, offset: self.pos as u64, remaining });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(GgufError::BadCount {
                what: format!("{what} length"),
                count: len,
                offset: at as u64,
                remaining: self.remaining() as u64,
            });
        }
        let s = self.take(len as usize, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what.into(), offset: at as u64 })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(key)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(key)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::BadValueType { key: format!("{key} (bool byte {b})"), type_id: 7, offset: at as u64 })
                    }
                }
            }
            ValueType::String => Value::String(self.string(&format!("string value of '{key}'"))?),
            ValueType::Array => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::TooDeep { key: key.into(), offset: at as u64 });
                }
                let type_id = self.u32(key)?;
                let elem = ValueType::from_id(type_id)
                    .ok_or_else(|| GgufError::BadValueType { key: key.into(), type_id, offset: at as u64 })?;
                let count = self.u64(key)?;
                self.check_count(&format!("array length of '{key}'"), count, elem.min_size())?;
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, values)
            }
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let at = self.pos as u64;
        let name = self.string("tensor name")?;
        let n_dims = self.u32("tensor dimension count")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad_tensor(&name, at, format!("{n_dims} dimensions (must be 1..={MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(self.u64("tensor dimension")?);
        }
        let type_id = self.u32("tensor type")?;
        let offset = self.u64("tensor offset")?;

        let ty = GgmlType::from_id(type_id)
            .ok_or_else(|| bad_tensor(&name, at, format!("unknown tensor type id {type_id}")))?;
        if dims.contains(&0) {
            return Err(bad_tensor(&name, at, format!("zero-sized dimension in {dims:?}")));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|&n| n <= i64::MAX as u64))
            .ok_or_else(|| bad_tensor(&name, at, format!("element count of {dims:?} overflows")))?;
        if dims[0] % ty.block_size() as u64 != 0 {
            return Err(bad_tensor(
                &name,
                at,
                format!("row length {} is not a multiple of the {} block size {}", dims[0], ty, ty.block_size()),
            ));
        }
        let n_bytes =
            ty.bytes_for(n_elements).ok_or_else(|| bad_tensor(&name, at, format!("byte size of {dims:?} {ty} overflows")))?;
        if offset % alignment != 0 {
            return Err(bad_tensor(&name, at, format!("data offset {offset} is not a multiple of the alignment {alignment}")));
        }
        Ok(TensorInfo { name, dims, ty, offset, n_elements, n_bytes })
    }
}

/// Names that appear more than once (used by the writer to refuse them before writing).
pub(crate) fn first_duplicate<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = HashSet::new();
    names.into_iter().find(|n| !seen.insert(*n))
}
