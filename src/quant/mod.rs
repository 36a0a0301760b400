//! GGML block formats and their scalar reference (de)quantization.
//!
//! Contract:
//! - [`dequantize`] decodes `dst.len()` weights of type `ty` from `src`, which must hold exactly that many
//!   whole blocks ([`row_bytes`]). Blocks are read byte by byte, little-endian, at any alignment: mmap'd
//!   tensor data is only 32-byte aligned overall and blocks are 18, 20, 22, ... bytes long.
//! - [`quantize`] is the inverse for the types ggml has a reference quantizer for here (F32, F16, BF16,
//!   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q8_K); other types give [`QuantError::Unsupported`].
//! - Results are bit-identical to ggml's scalar reference (`dequantize_row_*`, `quantize_row_*_ref` in
//!   ggml-quants.c) as computed by the `gguf` Python package: `tests/quant_oracle.rs` holds this against
//!   fixtures from `tests/fixtures/gen_quant.py` (whose `--check-ggml` replays them through ggml-quants.c
//!   itself). Every product and sum is a separate f32 operation in ggml's order (`d * q - m`,
//!   `(d * sc) * q`), never a fused multiply-add.
//! - Bad input (an unsupported type, lengths that do not match) is a typed [`QuantError`], never a panic.
//! - Scalar and safe only: SIMD kernels live in `backend::cpu`, which tests itself against these.
//!
//! Layout of the module: `legacy` (32-weight blocks), `kquants` (256-weight super-blocks), `float`
//! (F32/F16/BF16 element conversions). Each block type is a `#[repr(C)]` struct whose size is asserted at
//! compile time to equal ggml's, with [`Block`] to parse, write and decode it.

mod float;
mod kquants;
mod legacy;
#[cfg(test)]
mod tests;

use thiserror::Error;

use crate::dtype::GgmlType;

pub use float::{bf16_bits_from_f32, bf16_bits_to_f32, f16_bits_from_f32, f16_bits_to_f32};
pub use kquants::{
    get_scale_min_k4, nearest_int, unpack_q3k_scales, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K,
    BlockQ6K, BlockQ8K, K_SCALE_SIZE,
};
pub use legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, QK};

pub use crate::dtype::QK_K;

/// Why a (de)quantization call was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantError {
    /// `op` ("dequantize" or "quantize") has no implementation for `ty`.
    #[error("{op} is not implemented for {ty} (supported: F32, F16, BF16, Q4_0..Q8_1, Q2_K..Q8_K; quantize: no Q2_K..Q6_K)")]
    Unsupported { ty: GgmlType, op: &'static str },
    /// `n` weights do not fill whole blocks of `ty`.
    #[error("{n} weights are not a whole number of {ty} blocks of {block_size}")]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block_size: usize,
    },
    /// The byte buffer does not hold exactly the blocks for `n` weights.
    #[error("{n} weights of {ty} take {expected} bytes, but the byte buffer has {got}")]
    LengthMismatch {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
}

/// One encoded block: `ELEMS` weights in `BYTES` bytes, laid out exactly as ggml's `block_*` struct.
pub trait Block: Copy + Sized {
    /// The GGML type this block belongs to.
    const TYPE: GgmlType;
    /// Weights per block.
    const ELEMS: usize;
    /// Bytes per block (equals `size_of::<Self>()` and `TYPE.type_size()`).
    const BYTES: usize;

    /// Parses the block from `b[..BYTES]` (little-endian, any alignment). Panics if `b` is shorter.
    fn read(b: &[u8]) -> Self;
    /// Writes the block's bytes into `out[..BYTES]`. Panics if `out` is shorter.
    fn write(&self, out: &mut [u8]);
    /// Decodes the block's weights into `y[..ELEMS]` (ggml's `dequantize_row_*`). Panics if `y` is shorter.
    fn dequantize(&self, y: &mut [f32]);
}

/// A block type with a ggml reference quantizer.
pub trait Quantize: Block {
    /// Encodes `x[..ELEMS]` exactly as ggml's `quantize_row_*_ref`. Panics if `x` is shorter.
    fn quantize(x: &[f32]) -> Self;
}

/// Bytes taken by `n` weights of `ty`, or `None` when `n` is not a whole number of blocks or overflows.
pub fn row_bytes(ty: GgmlType, n: usize) -> Option<usize> {
    let block_size = ty.block_size();
    if !n.is_multiple_of(block_size) {
        return None;
    }
    (n / block_size).checked_mul(ty.type_size())
}

/// Checks that `n_bytes` holds exactly the blocks of `n` weights of `ty`.
fn check_lengths(ty: GgmlType, n: usize, n_bytes: usize) -> Result<(), QuantError> {
    let block_size = ty.block_size();
    if !n.is_multiple_of(block_size) {
        return Err(QuantError::NotBlockMultiple { ty, n, block_size });
    }
    // A product that overflows cannot equal a real buffer's length either.
    let expected = row_bytes(ty, n).unwrap_or(usize::MAX);
    if expected != n_bytes {
        return Err(QuantError::LengthMismatch {
            ty,
            n,
            expected,
            got: n_bytes,
        });
    }
    Ok(())
}

/// Decodes `dst.len()` weights of type `ty` from the whole blocks in `src` (any alignment).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    use GgmlType as T;
    let decode: fn(&[u8], &mut [f32]) = match ty {
        T::F32 => float::f32_from_le,
        T::F16 => float::f16_to_f32_row,
        T::BF16 => float::bf16_to_f32_row,
        T::Q4_0 => dequantize_blocks::<BlockQ4_0>,
        T::Q4_1 => dequantize_blocks::<BlockQ4_1>,
        T::Q5_0 => dequantize_blocks::<BlockQ5_0>,
        T::Q5_1 => dequantize_blocks::<BlockQ5_1>,
        T::Q8_0 => dequantize_blocks::<BlockQ8_0>,
        T::Q8_1 => dequantize_blocks::<BlockQ8_1>,
        T::Q2K => dequantize_blocks::<BlockQ2K>,
        T::Q3K => dequantize_blocks::<BlockQ3K>,
        T::Q4K => dequantize_blocks::<BlockQ4K>,
        T::Q5K => dequantize_blocks::<BlockQ5K>,
        T::Q6K => dequantize_blocks::<BlockQ6K>,
        T::Q8K => dequantize_blocks::<BlockQ8K>,
        _ => {
            return Err(QuantError::Unsupported {
                ty,
                op: "dequantize",
            })
        }
    };
    check_lengths(ty, dst.len(), src.len())?;
    decode(src, dst);
    Ok(())
}

/// Encodes `src` (a whole number of blocks of `ty`) into `dst`, bit-identical to ggml's reference.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    use GgmlType as T;
    let encode: fn(&[f32], &mut [u8]) = match ty {
        T::F32 => float::f32_to_le,
        T::F16 => float::f32_to_f16_row,
        T::BF16 => float::f32_to_bf16_row,
        T::Q4_0 => quantize_blocks::<BlockQ4_0>,
        T::Q4_1 => quantize_blocks::<BlockQ4_1>,
        T::Q5_0 => quantize_blocks::<BlockQ5_0>,
        T::Q5_1 => quantize_blocks::<BlockQ5_1>,
        T::Q8_0 => quantize_blocks::<BlockQ8_0>,
        T::Q8_1 => quantize_blocks::<BlockQ8_1>,
        T::Q8K => quantize_blocks::<BlockQ8K>,
        _ => return Err(QuantError::Unsupported { ty, op: "quantize" }),
    };
    check_lengths(ty, src.len(), dst.len())?;
    encode(src, dst);
    Ok(())
}

/// Decodes whole blocks; lengths were checked by the caller (`chunks_exact` stops at the shorter side).
fn dequantize_blocks<B: Block>(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src
        .chunks_exact(B::BYTES)
        .zip(dst.chunks_exact_mut(B::ELEMS))
    {
        B::read(b).dequantize(y);
    }
}

/// Encodes whole blocks; lengths were checked by the caller.
fn quantize_blocks<B: Quantize>(src: &[f32], dst: &mut [u8]) {
    for (x, out) in src
        .chunks_exact(B::ELEMS)
        .zip(dst.chunks_exact_mut(B::BYTES))
    {
        B::quantize(x).write(out);
    }
}

// ---- little-endian field access shared by the block files (bounds-checked slices, any alignment) ----

#[inline]
fn f16_at(b: &[u8], at: usize) -> half::f16 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline]
fn put_f16(out: &mut [u8], at: usize, v: half::f16) {
    out[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
}

#[inline]
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

#[inline]
fn i8s_at<const N: usize>(b: &[u8], at: usize) -> [i8; N] {
    bytes_at::<N>(b, at).map(|v| v as i8)
}

#[inline]
fn put_i8s(out: &mut [u8], at: usize, v: &[i8]) {
    for (o, &q) in out[at..at + v.len()].iter_mut().zip(v) {
        *o = q as u8;
    }
}
