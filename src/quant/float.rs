//! F32, F16 and BF16 elements: one value per "block", 4 or 2 little-endian bytes.
//!
//! Conversions follow ggml: f16 <-> f32 is IEEE round-to-nearest-even (what F16C, numpy and `half` all
//! do); f32 -> bf16 is ggml's `ggml_compute_fp32_to_bf16`: NaN is kept as a quiet NaN with its top payload
//! bits, everything else rounds to nearest even (overflow gives infinity). bf16 -> f32 is exact.

use half::f16;

/// f16 bits to f32 (exact).
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 to f16 bits, round to nearest even (ggml's `GGML_FP32_TO_FP16`).
#[inline]
pub fn f16_bits_from_f32(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// bf16 bits to f32 (exact: bf16 is the top half of an f32).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits exactly as ggml's `ggml_compute_fp32_to_bf16`.
#[inline]
pub fn bf16_bits_from_f32(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: truncate and force the quiet bit, so the payload cannot round into infinity.
        return ((u >> 16) | 64) as u16;
    }
    // Round to nearest, ties to even; u64 so the carry out of 0xffff_xxxx cannot wrap.
    ((u64::from(u) + 0x7fff + u64::from((u >> 16) & 1)) >> 16) as u16
}

// Row converters used by `quant::{dequantize, quantize}`; lengths are checked by the caller.

pub(super) fn f32_from_le(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub(super) fn f32_to_le(src: &[f32], dst: &mut [u8]) {
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(4)) {
        out.copy_from_slice(&x.to_le_bytes());
    }
}

pub(super) fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

pub(super) fn f32_to_f16_row(src: &[f32], dst: &mut [u8]) {
    for (&x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&f16_bits_from_f32(x).to_le_bytes());
    }
}

pub(super) fn bf16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

pub(super) fn f32_to_bf16_row(src: &[f32], dst: &mut [u8]) {
    for (&x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&bf16_bits_from_f32(x).to_le_bytes());
    }
}
