//! The CPU kernel table: one set of function pointers, picked once at start-up by feature detection
//! ([`Kernels::detect`]), and the scalar kernels that are both the fallback and the tests' oracle.
//!
//! Dot products of a quantized weight row with an activation row quantized the way llama.cpp does it
//! (ggml's `vec_dot_type`: Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1, Q8_K for the k-quants). Their results
//! are defined by the order of float operations below, and the SIMD twins keep that order, so a SIMD dot
//! equals the scalar dot bit for bit on the same blocks:
//!
//! ```text
//! 32-weight blocks:  sumi_b = sum of integer products in block b             (exact, i32)
//!                    t_b    = (d_w * d_a) * sumi_b  [+ m_w * s_a for Q4_1]   (f32)
//!                    acc[b % 4] += t_b;   result = (acc[0] + acc[2]) + (acc[1] + acc[3])
//! 256-weight blocks: isum_b (and msum_b for Q4_K: sum of mins x bsums)       (exact, i32)
//!                    sumf += (d_w * d_a) * isum_b  [- (dmin_w * d_a) * msum_b]   in block order
//! ```
//! Float dot products (f32, f16 K/V) have no such promise: the SIMD ones use FMA and several
//! accumulators and agree with the scalar ones to f32 rounding.

use half::f16;

use crate::quant::{get_scale_min_k4, K_SCALE_SIZE, QK, QK_K};

/// A dot product of one weight row (GGML blocks) with one activation row (Q8 blocks), both as bytes.
pub type QDotFn = fn(w: &[u8], a: &[u8]) -> f32;
/// A dot product of a weight row stored as bytes (f32 or f16, little-endian) with f32 activations.
pub type FDotFn = fn(w: &[u8], x: &[f32]) -> f32;

/// Which instruction set a table uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

/// Every hot CPU kernel, as function pointers chosen once.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub isa: Isa,
    /// Q4_0 x Q8_0.
    pub dot_q4_0: QDotFn,
    /// Q4_1 x Q8_1.
    pub dot_q4_1: QDotFn,
    /// Q5_0 x Q8_0.
    pub dot_q5_0: QDotFn,
    /// Q8_0 x Q8_0.
    pub dot_q8_0: QDotFn,
    /// Q4_K x Q8_K.
    pub dot_q4_k: QDotFn,
    /// Q6_K x Q8_K.
    pub dot_q6_k: QDotFn,
    /// F32 weights x f32.
    pub dot_f32w: FDotFn,
    /// F16 weights x f32.
    pub dot_f16w: FDotFn,
    /// f32 x f32.
    pub dot_f32: fn(a: &[f32], b: &[f32]) -> f32,
    /// f16 (K cache) x f32.
    pub dot_f16: fn(k: &[u16], x: &[f32]) -> f32,
    /// `y += a * x` with f16 `x` (V cache).
    pub axpy_f16: fn(y: &mut [f32], a: f32, x: &[u16]),
}

impl Kernels {
    /// The scalar kernels: portable, and the oracle the SIMD ones are tested against.
    pub fn scalar() -> Kernels {
        Kernels {
            isa: Isa::Scalar,
            dot_q4_0,
            dot_q4_1,
            dot_q5_0,
            dot_q8_0,
            dot_q4_k,
            dot_q6_k,
            dot_f32w,
            dot_f16w,
            dot_f32,
            dot_f16,
            axpy_f16,
        }
    }

    /// The AVX2+FMA+F16C kernels, if this CPU has them.
    pub fn avx2() -> Option<Kernels> {
        super::avx2::kernels()
    }

    /// The best table for this machine; `PAGELLM_CPU=scalar` forces the scalar one (tests, debugging).
    pub fn detect() -> Kernels {
        if std::env::var("PAGELLM_CPU").is_ok_and(|v| v.eq_ignore_ascii_case("scalar")) {
            return Kernels::scalar();
        }
        Kernels::avx2().unwrap_or_else(Kernels::scalar)
    }

    pub fn name(&self) -> &'static str {
        match self.isa {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }
}

// ---- little-endian field access (blocks sit at any alignment in the map) ----

#[inline]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline]
fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn i16_at(b: &[u8], at: usize) -> i32 {
    i16::from_le_bytes([b[at], b[at + 1]]) as i32
}

/// The 4-accumulator reduction every 32-weight dot product ends with (module doc).
#[inline]
pub(super) fn reduce4(acc: [f32; 4]) -> f32 {
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

// ---- activation quantizers (shared by every table: llama.cpp's x86 quantize_row_q8_0 / q8_1) ----

/// Q8_0 activations as llama.cpp's AVX2 `quantize_row_q8_0` makes them: `d = amax / 127`,
/// `q = round_half_even(x * (127 / amax))`.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (o, &v) in ob[2..].iter_mut().zip(xb) {
            *o = (v * id).round_ties_even() as i32 as i8 as u8;
        }
    }
}

/// Q8_1 activations (for Q4_1/Q5_1 weights): as Q8_0 plus `s = d * sum(q)`.
pub fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(36)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in ob[4..].iter_mut().zip(xb) {
            let q = (v * id).round_ties_even() as i32;
            sum += q;
            *o = q as i8 as u8;
        }
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_bits().to_le_bytes());
    }
}

/// Q8_K activations: ggml's reference quantizer (x86 llama.cpp uses it too).
pub fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    use crate::quant::{Block, BlockQ8K, Quantize};
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(BlockQ8K::BYTES)) {
        BlockQ8K::quantize(xb).write(ob);
    }
}

// ---- scalar dot products: 32-weight blocks ----

/// Runs `block(w_block, a_block) -> t_b` over the blocks and reduces as the module doc says.
#[inline]
fn legacy_dot(w: &[u8], a: &[u8], wb: usize, ab: usize, block: impl Fn(&[u8], &[u8]) -> f32) -> f32 {
    let mut acc = [0.0f32; 4];
    for (i, (wblk, ablk)) in w.chunks_exact(wb).zip(a.chunks_exact(ab)).enumerate() {
        acc[i % 4] += block(wblk, ablk);
    }
    reduce4(acc)
}

fn dot_q4_0(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 18, 34, |x, y| {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x[2 + j] & 0x0f) as i32 - 8;
            let v1 = (x[2 + j] >> 4) as i32 - 8;
            sumi += v0 * y[2 + j] as i8 as i32 + v1 * y[2 + j + 16] as i8 as i32;
        }
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32
    })
}

fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 20, 36, |x, y| {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x[4 + j] & 0x0f) as i32;
            let v1 = (x[4 + j] >> 4) as i32;
            sumi += v0 * y[4 + j] as i8 as i32 + v1 * y[4 + j + 16] as i8 as i32;
        }
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2)
    })
}

fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 22, 34, |x, y| {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let mut sumi = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) as i32;
            let h1 = ((qh >> (j + 16)) & 1) as i32;
            let v0 = ((x[6 + j] & 0x0f) as i32 | (h0 << 4)) - 16;
            let v1 = ((x[6 + j] >> 4) as i32 | (h1 << 4)) - 16;
            sumi += v0 * y[2 + j] as i8 as i32 + v1 * y[2 + j + 16] as i8 as i32;
        }
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32
    })
}

fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 34, 34, |x, y| {
        let sumi: i32 = x[2..34].iter().zip(&y[2..34]).map(|(&p, &q)| p as i8 as i32 * q as i8 as i32).sum();
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32
    })
}

// ---- scalar dot products: 256-weight super-blocks (Q8_K: d f32 @0, qs @4, bsums i16 @260) ----

fn dot_q4_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        let scales: &[u8; K_SCALE_SIZE] = x[4..16].try_into().unwrap();
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, scales);
            let bsum = i16_at(y, 260 + 4 * j) + i16_at(y, 260 + 4 * j + 2);
            msum += m as i32 * bsum;
            // sub-block j: weights 32j..32j+32 = low (even j) or high (odd j) nibbles of qs[32(j/2)..]
            let qs = &x[16 + 32 * (j / 2)..][..32];
            let mut s = 0i32;
            for l in 0..32 {
                let q = if j % 2 == 0 { qs[l] & 0x0f } else { qs[l] >> 4 };
                s += q as i32 * y[4 + 32 * j + l] as i8 as i32;
            }
            isum += sc as i32 * s;
        }
        let d = f16_at(x, 0) * f32_at(y, 0);
        let dmin = f16_at(x, 2) * f32_at(y, 0);
        sumf += d * isum as f32 - dmin * msum as f32;
    }
    sumf
}

/// The 6-bit value (0..=63) of weight `i` of a Q6_K block.
#[inline]
pub(super) fn q6k_value(x: &[u8], i: usize) -> i32 {
    let (n, r) = (i / 128, i % 128);
    let (k, l) = (r / 32, r % 32);
    let ql = x[64 * n + 32 * (k % 2) + l];
    let low = if k < 2 { ql & 0x0f } else { ql >> 4 };
    let high = (x[128 + 32 * n + l] >> (2 * k)) & 3;
    (low | (high << 4)) as i32
}

fn dot_q6_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let mut isum = 0i32;
        for sub in 0..16 {
            let sc = x[192 + sub] as i8 as i32;
            let mut s = 0i32;
            for i in 16 * sub..16 * sub + 16 {
                s += (q6k_value(x, i) - 32) * y[4 + i] as i8 as i32;
            }
            isum += sc * s;
        }
        sumf += (f16_at(x, 208) * f32_at(y, 0)) * isum as f32;
    }
    sumf
}

// ---- scalar float kernels ----

fn dot_f32w(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(4).zip(x).map(|(b, &v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v).sum()
}

fn dot_f16w(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2).zip(x).map(|(b, &v)| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() * v).sum()
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dot_f16(k: &[u16], x: &[f32]) -> f32 {
    k.iter().zip(x).map(|(&h, &v)| f16::from_bits(h).to_f32() * v).sum()
}

fn axpy_f16(y: &mut [f32], a: f32, x: &[u16]) {
    for (o, &h) in y.iter_mut().zip(x) {
        *o += a * f16::from_bits(h).to_f32();
    }
}
