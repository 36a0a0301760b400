//! NEON twins of `elementwise`'s ops (aarch64), the same bits as its scalar oracle by the contract of that
//! module's doc: 4 f32 lanes, the f64 exp in two halves of 2 f64 lanes, each op in the scalar order.
//!
//! ```text
//! silu_mul   4 a step:  x / (1 + exp(-x)) * u        exp: `exp_f64`'s sequence on float64x2_t
//! sum_sq     8 a step:  acc[i % 8] in 4 float64x2_t (lanes 0-1, 2-3, 4-5, 6-7), then `reduce8`
//! scale_mul  4 a step:  (x * scale) * w
//! rotate     4 pairs a step: halves as loaded, adjacent pairs split by vld2q / joined by vst2q;
//!            vmulq then vsubq / vaddq, never a fused vfmaq (the scalar code rounds the products)
//! ```
//! FMA appears only where the scalar code calls `mul_add` (the exp's reduction and polynomial), as
//! `vfmsq_f64` / `vfmaq_f64`, which round once as `mul_add` does; LLVM does not contract a separate
//! `vmulq` + `vaddq` into one. The clamp uses `vmaxq_f64` / `vminq_f64` (FMAX/FMIN: NaN in, NaN out),
//! not the `vmaxnmq` forms, which would clamp a NaN to a number where the scalar code keeps it.
//!
//! NEON is baseline on aarch64, so this table needs no detection; it exists where the NEON kernel table
//! does (little-endian aarch64). The last few elements of a row go through the scalar functions.
//!
//! Safety: every pointer loop reads and writes only the `n` elements its safe wrapper checked the slices
//! hold; loads and stores are `vld1q_f32`-style, of f32 slices, so no alignment beyond theirs is assumed.

use core::arch::aarch64::*;

use super::elementwise::{check_rotate, reduce8, scalar, Elementwise, EXP_COEFS, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO};
use super::kernels::Isa;

pub(super) const TABLE: Elementwise = Elementwise { isa: Isa::Neon, silu_mul, sum_sq, scale_mul, rotate_halves, rotate_pairs };

/// `elementwise::exp_f64` on 2 lanes: the same operations in the same order.
#[inline(always)]
unsafe fn exp2d(x: float64x2_t) -> float64x2_t {
    let x = vminq_f64(vdupq_n_f64(EXP_MAX), vmaxq_f64(vdupq_n_f64(EXP_MIN), x));
    let n = vrndnq_f64(vmulq_f64(x, vdupq_n_f64(std::f64::consts::LOG2_E)));
    // x - n * ln2 in two fused steps: (-n).mul_add(hi, x), then (-n).mul_add(lo, r)
    let r = vfmsq_f64(x, n, vdupq_n_f64(LN2_HI));
    let r = vfmsq_f64(r, n, vdupq_n_f64(LN2_LO));
    let mut p = vdupq_n_f64(EXP_COEFS[0]);
    for &c in &EXP_COEFS[1..] {
        p = vfmaq_f64(vdupq_n_f64(c), p, r);
    }
    // n is integral (NaN converts to 0, as `n as i64` does)
    let e = vaddq_s64(vcvtq_s64_f64(n), vdupq_n_s64(1023));
    vmulq_f64(p, vreinterpretq_f64_s64(vshlq_n_s64::<52>(e)))
}

/// The correctly rounded expf of 4 lanes.
#[inline(always)]
pub(super) unsafe fn exp4(x: float32x4_t) -> float32x4_t {
    let lo = exp2d(vcvt_f64_f32(vget_low_f32(x)));
    let hi = exp2d(vcvt_high_f64_f32(x));
    vcvt_high_f32_f64(vcvt_f32_f64(lo), hi)
}

pub(super) fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert!(u.len() >= g.len(), "silu_mul: {} up values for {} gates", u.len(), g.len());
    let n = g.len() / 4 * 4;
    // SAFETY: both slices hold n floats.
    unsafe { silu_mul4(g.as_mut_ptr(), u.as_ptr(), n) };
    scalar::silu_mul(&mut g[n..], &u[n..]);
}

unsafe fn silu_mul4(g: *mut f32, u: *const f32, n: usize) {
    let one = vdupq_n_f32(1.0);
    for i in (0..n).step_by(4) {
        let x = vld1q_f32(g.add(i));
        let s = vdivq_f32(x, vaddq_f32(one, exp4(vnegq_f32(x))));
        vst1q_f32(g.add(i), vmulq_f32(s, vld1q_f32(u.add(i))));
    }
}

/// 8 f64 accumulators in four registers (lanes 0-1, 2-3, 4-5, 6-7): `add` widens 8 f32 and adds lane by
/// lane. The f64 sums of [`super::elementwise::SumSqFn`] and of the attention's exp pass.
pub(super) struct F64x8([float64x2_t; 4]);

impl F64x8 {
    #[inline(always)]
    pub(super) unsafe fn zero() -> F64x8 {
        F64x8([vdupq_n_f64(0.0); 4])
    }

    /// Adds elements 0-3 (`lo`) and 4-7 (`hi`) of 8, each widened to f64, into lanes 0-7.
    #[inline(always)]
    pub(super) unsafe fn add(&mut self, lo: float32x4_t, hi: float32x4_t) {
        let a = &mut self.0;
        a[0] = vaddq_f64(a[0], vcvt_f64_f32(vget_low_f32(lo)));
        a[1] = vaddq_f64(a[1], vcvt_high_f64_f32(lo));
        a[2] = vaddq_f64(a[2], vcvt_f64_f32(vget_low_f32(hi)));
        a[3] = vaddq_f64(a[3], vcvt_high_f64_f32(hi));
    }

    #[inline(always)]
    pub(super) unsafe fn lanes(&self) -> [f64; 8] {
        let mut acc = [0.0; 8];
        for (k, &v) in self.0.iter().enumerate() {
            vst1q_f64(acc.as_mut_ptr().add(2 * k), v);
        }
        acc
    }
}

pub(super) fn sum_sq(x: &[f32]) -> f64 {
    let n = x.len() / 8 * 8;
    // SAFETY: x holds n floats.
    let mut acc = unsafe { sum_sq8(x.as_ptr(), n) };
    scalar::add_sq(&mut acc, &x[n..], 0);
    reduce8(acc)
}

unsafe fn sum_sq8(x: *const f32, n: usize) -> [f64; 8] {
    let mut acc = F64x8::zero();
    for i in (0..n).step_by(8) {
        let (lo, hi) = (vld1q_f32(x.add(i)), vld1q_f32(x.add(i + 4)));
        acc.add(vmulq_f32(lo, lo), vmulq_f32(hi, hi));
    }
    acc.lanes()
}

pub(super) fn scale_mul(o: &mut [f32], x: &[f32], scale: f32, w: Option<&[f32]>) {
    let len = o.len();
    assert!(x.len() >= len && w.is_none_or(|w| w.len() >= len), "scale_mul: short input");
    let n = len / 4 * 4;
    // SAFETY: o, x (and w) hold n floats.
    unsafe { scale_mul4(o.as_mut_ptr(), x.as_ptr(), scale, w.map(<[f32]>::as_ptr), n) };
    scalar::scale_mul(&mut o[n..], &x[n..], scale, w.map(|w| &w[n..]));
}

unsafe fn scale_mul4(o: *mut f32, x: *const f32, scale: f32, w: Option<*const f32>, n: usize) {
    let sv = vdupq_n_f32(scale);
    for i in (0..n).step_by(4) {
        let v = vmulq_f32(vld1q_f32(x.add(i)), sv);
        let v = match w {
            Some(w) => vmulq_f32(v, vld1q_f32(w.add(i))),
            None => v,
        };
        vst1q_f32(o.add(i), v);
    }
}

/// `(a c - b s, a s + b c)` lane by lane, each product rounded before the sum (no FMA).
#[inline(always)]
unsafe fn rotate4(a: float32x4_t, b: float32x4_t, c: float32x4_t, s: float32x4_t) -> (float32x4_t, float32x4_t) {
    (vsubq_f32(vmulq_f32(a, c), vmulq_f32(b, s)), vaddq_f32(vmulq_f32(a, s), vmulq_f32(b, c)))
}

pub(super) fn rotate_halves(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
    check_rotate(a.len(), b.len(), cos.len(), sin.len());
    let n = a.len() / 4 * 4;
    // SAFETY: every slice holds at least n floats.
    unsafe { rotate_halves4(a.as_mut_ptr(), b.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), n) };
    scalar::rotate_halves(&mut a[n..], &mut b[n..], &cos[n..], &sin[n..]);
}

unsafe fn rotate_halves4(a: *mut f32, b: *mut f32, cos: *const f32, sin: *const f32, n: usize) {
    for i in (0..n).step_by(4) {
        let (x0, x1) = rotate4(vld1q_f32(a.add(i)), vld1q_f32(b.add(i)), vld1q_f32(cos.add(i)), vld1q_f32(sin.add(i)));
        vst1q_f32(a.add(i), x0);
        vst1q_f32(b.add(i), x1);
    }
}

pub(super) fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let pairs = x.len() / 2;
    check_rotate(pairs, pairs, cos.len(), sin.len());
    let n = pairs / 4 * 4;
    // SAFETY: x holds 2n floats, cos and sin n.
    unsafe { rotate_pairs4(x.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), n) };
    scalar::rotate_pairs(&mut x[2 * n..], &cos[n..], &sin[n..]);
}

/// 4 pairs a step: `vld2q_f32` puts the 4 first elements of the pairs in one register and the 4 second
/// ones in another, so the arithmetic is `rotate_halves`'s; `vst2q_f32` interleaves them back.
unsafe fn rotate_pairs4(x: *mut f32, cos: *const f32, sin: *const f32, n: usize) {
    for i in (0..n).step_by(4) {
        let v = vld2q_f32(x.add(2 * i));
        let (a, b) = rotate4(v.0, v.1, vld1q_f32(cos.add(i)), vld1q_f32(sin.add(i)));
        vst2q_f32(x.add(2 * i), float32x4x2_t(a, b));
    }
}
