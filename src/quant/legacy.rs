//! The legacy 32-weight block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1.
//!
//! Every format stores one f16 scale `d` (and, for the `_1` kinds, an f16 offset) per 32 weights.
//! The 4- and 5-bit kinds split the block in halves: byte `j` of `qs` holds weight `j` in its low nibble
//! and weight `j + 16` in its high nibble; the 5th bits sit in the little-endian u32 `qh`, bit `j` for
//! weight `j`.
//!
//! Quantizers are ggml's `quantize_row_*_ref`: C's `(int8_t)` casts are Rust's truncating `as i8` (the
//! values are in range, so saturation never triggers), `roundf` is `f32::round` (half away from zero).

use std::mem::size_of;

use half::f16;

use super::{bytes_at, f16_at, i8s_at, put_f16, put_i8s, Block, Quantize};
use crate::dtype::GgmlType;

/// Weights per legacy block (ggml's QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK8_1 = 32).
pub const QK: usize = 32;
const HALF: usize = QK / 2;

/// Q4_0: `w[j] = d * (q[j] - 8)`, q in 0..=15.
///
/// ```text
/// bytes  0..2    d    f16
///        2..18   qs   byte j = q[j] | q[j+16] << 4      (j in 0..16)
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Q4_1: `w[j] = d * q[j] + m`, q in 0..=15.
///
/// ```text
/// bytes  0..2    d    f16
///        2..4    m    f16 (the block minimum)
///        4..20   qs   byte j = q[j] | q[j+16] << 4
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// Q5_0: `w[j] = d * (q[j] - 16)`, q in 0..=31.
///
/// ```text
/// bytes  0..2    d    f16
///        2..6    qh   u32 LE: bit j = bit 4 of q[j]     (j in 0..32)
///        6..22   qs   byte j = (q[j] & 15) | (q[j+16] & 15) << 4
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// Q5_1: `w[j] = d * q[j] + m`, q in 0..=31.
///
/// ```text
/// bytes  0..2    d    f16
///        2..4    m    f16 (the block minimum)
///        4..8    qh   u32 LE: bit j = bit 4 of q[j]
///        8..24   qs   byte j = (q[j] & 15) | (q[j+16] & 15) << 4
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// Q8_0: `w[j] = d * q[j]`, q in -127..=127.
///
/// ```text
/// bytes  0..2    d    f16
///        2..34   qs   i8 x 32
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// Q8_1: `w[j] = d * q[j]`, plus `s = d * sum(q)` for dot products with Q4_1/Q5_1 (activations only;
/// ggml has no dequantizer for it, pagellm's is the obvious `d * q`).
///
/// ```text
/// bytes  0..2    d    f16
///        2..4    s    f16 = f16(sum(q) * d)
///        4..36   qs   i8 x 32
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}
const _: () = assert!(size_of::<BlockQ8_1>() == 36);

/// The value of largest magnitude (the first one on ties) and that magnitude, as ggml's legacy quantizers
/// search for it: `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`.
fn signed_abs_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// (min, max) as ggml's `_1` quantizers find them, starting from (FLT_MAX, -FLT_MAX).
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `d ? 1.0f/d : 0.0f`
#[inline]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The absolute maximum as Q8_0/Q8_1 compute it: `amax = MAX(amax, fabsf(v))`.
fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(
        0.0f32,
        |amax, &v| if amax > v.abs() { amax } else { v.abs() },
    )
}

/// Splits 32 5-bit values into (qh, qs) as the Q5 formats store them.
fn pack_5bit(q: &[u8; QK]) -> ([u8; 4], [u8; HALF]) {
    let mut qh = 0u32;
    let mut qs = [0u8; HALF];
    for j in 0..HALF {
        let (q0, q1) = (q[j], q[j + HALF]);
        qs[j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + HALF);
    }
    (qh.to_le_bytes(), qs)
}

/// The inverse of `pack_5bit`: q[j] in 0..=31.
fn unpack_5bit(qh: [u8; 4], qs: &[u8; HALF]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for j in 0..HALF {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        q[j] = (qs[j] & 0x0f) | h0;
        q[j + HALF] = (qs[j] >> 4) | h1;
    }
    q
}

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const ELEMS: usize = QK;
    const BYTES: usize = 18;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            qs: bytes_at(b, 2),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        out[2..18].copy_from_slice(&self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, &b) in self.qs.iter().enumerate() {
            y[j] = ((b & 0x0f) as i32 - 8) as f32 * d;
            y[j + HALF] = ((b >> 4) as i32 - 8) as f32 * d;
        }
    }
}

impl Quantize for BlockQ4_0 {
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let d = signed_abs_max(x) / -8.0;
        let id = inverse(d);
        let mut qs = [0u8; HALF];
        for j in 0..HALF {
            let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((x[j + HALF] * id + 8.5) as i8).min(15) as u8;
            qs[j] = q0 | (q1 << 4);
        }
        Self {
            d: f16::from_f32(d),
            qs,
        }
    }
}

impl Block for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const ELEMS: usize = QK;
    const BYTES: usize = 20;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qs: bytes_at(b, 4),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        put_f16(out, 2, self.m);
        out[4..20].copy_from_slice(&self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, &b) in self.qs.iter().enumerate() {
            y[j] = (b & 0x0f) as f32 * d + m;
            y[j + HALF] = (b >> 4) as f32 * d + m;
        }
    }
}

impl Quantize for BlockQ4_1 {
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        let mut qs = [0u8; HALF];
        for j in 0..HALF {
            let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((x[j + HALF] - min) * id + 0.5) as i8).min(15) as u8;
            qs[j] = q0 | (q1 << 4);
        }
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qs,
        }
    }
}

impl Block for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const ELEMS: usize = QK;
    const BYTES: usize = 22;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            qh: bytes_at(b, 2),
            qs: bytes_at(b, 6),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        out[2..6].copy_from_slice(&self.qh);
        out[6..22].copy_from_slice(&self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let q = unpack_5bit(self.qh, &self.qs);
        for (y, &q) in y[..QK].iter_mut().zip(&q) {
            *y = (q as i32 - 16) as f32 * d;
        }
    }
}

impl Quantize for BlockQ5_0 {
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let d = signed_abs_max(x) / -16.0;
        let id = inverse(d);
        let q = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
        let (qh, qs) = pack_5bit(&q);
        Self {
            d: f16::from_f32(d),
            qh,
            qs,
        }
    }
}

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const ELEMS: usize = QK;
    const BYTES: usize = 24;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qh: bytes_at(b, 4),
            qs: bytes_at(b, 8),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        put_f16(out, 2, self.m);
        out[4..8].copy_from_slice(&self.qh);
        out[8..24].copy_from_slice(&self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        let q = unpack_5bit(self.qh, &self.qs);
        for (y, &q) in y[..QK].iter_mut().zip(&q) {
            *y = q as f32 * d + m;
        }
    }
}

impl Quantize for BlockQ5_1 {
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse(d);
        // ggml casts straight to uint8_t here (no MIN(31, ..)): (max - min) * id + 0.5 stays below 32.
        let q = std::array::from_fn(|j| ((x[j] - min) * id + 0.5) as u8);
        let (qh, qs) = pack_5bit(&q);
        Self {
            d: f16::from_f32(d),
            m: f16::from_f32(min),
            qh,
            qs,
        }
    }
}

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const ELEMS: usize = QK;
    const BYTES: usize = 34;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            qs: i8s_at(b, 2),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        put_i8s(out, 2, &self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, &q) in y[..QK].iter_mut().zip(&self.qs) {
            *y = q as f32 * d;
        }
    }
}

impl Quantize for BlockQ8_0 {
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let d = abs_max(x) / 127.0;
        let id = inverse(d);
        Self {
            d: f16::from_f32(d),
            qs: std::array::from_fn(|j| (x[j] * id).round() as i8),
        }
    }
}

impl Block for BlockQ8_1 {
    const TYPE: GgmlType = GgmlType::Q8_1;
    const ELEMS: usize = QK;
    const BYTES: usize = 36;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            s: f16_at(b, 2),
            qs: i8s_at(b, 4),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        put_f16(out, 2, self.s);
        put_i8s(out, 4, &self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, &q) in y[..QK].iter_mut().zip(&self.qs) {
            *y = q as f32 * d;
        }
    }
}

impl Quantize for BlockQ8_1 {
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK];
        let d = abs_max(x) / 127.0;
        let id = inverse(d);
        let qs: [i8; QK] = std::array::from_fn(|j| (x[j] * id).round() as i8);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        Self {
            d: f16::from_f32(d),
            s: f16::from_f32(sum as f32 * d),
            qs,
        }
    }
}
