//! Elementwise ops of the CPU backend in SIMD: SiLU-gated products, the sum of squares of RMS norm and
//! its scaling, and the RoPE rotations. One table per ISA, chosen once per process ([`table`]); the
//! scalar functions here are the oracle, and every vector twin computes the same bits:
//!
//! ```text
//! silu_mul   g = g / (1 + exp(-g)) * u     exp: [`exp_f64`] on the f32 widened to f64, rounded once
//! sum_sq     sum (x*x as f64)              8 f64 accumulators, element i into acc[i % 8], then [`reduce8`]
//! scale_mul  o = (x * scale) * w           (w absent: x * scale)
//! rotate     a' = a c - b s,  b' = a s + b c   per pair (a, b); no fused multiply-add
//! ```
//! `exp_f64` is a fixed sequence of f64 operations (range reduction by ln 2 in two parts, a degree-12
//! Taylor polynomial by fused multiply-adds, the exponent set by bits), so the scalar, AVX2, AVX-512 and
//! NEON versions agree bit for bit by construction. Rounded to f32 it is the correctly rounded expf (relative
//! error ~2e-16 before rounding), the value the CUDA kernels' `exp_cr` (`(float)exp((double)x)`) gives;
//! glibc's `expf` misrounds a few arguments in 10^4, which is why the kernels do not call it.
//! The f64 sum of f32 squares is exact whenever a row's squares span less than 2^20 in magnitude, and
//! otherwise off by ~1e-16 relative: the order of the 8 accumulators is fixed here so that tables agree
//! bit for bit, and the CUDA kernel's tree order gives the same f32 mean in all but ~2^-26 of rows.
//!
//! The AVX2 and AVX-512 twins are here; the NEON ones (4 lanes, baseline on aarch64, no detection) are in
//! `neon_elementwise.rs`. Vector twins fuse a multiply-add only where the scalar code calls `mul_add`.
//!
//! Safety: the `#[target_feature]` functions are reached only through a table that [`table`] hands out
//! after `is_x86_feature_detected!` confirmed its features; the safe wrappers check slice lengths.

use super::kernels::Isa;

/// `g[i] = silu(g[i]) * u[i]` over `g.len()` elements (`u` at least as long).
pub(super) type SiluMulFn = fn(g: &mut [f32], u: &[f32]);
/// `sum x[i]^2` in f64, in the fixed accumulator order of the module doc.
pub(super) type SumSqFn = fn(x: &[f32]) -> f64;
/// `o[i] = (x[i] * scale) * w[i]`, or `x[i] * scale` without `w`.
pub(super) type ScaleMulFn = fn(o: &mut [f32], x: &[f32], scale: f32, w: Option<&[f32]>);
/// NEOX rotation: pairs `(a[i], b[i])` by the angle with `cos[i]`, `sin[i]`.
pub(super) type RotateHalvesFn = fn(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]);
/// NORM rotation: adjacent pairs `(x[2i], x[2i + 1])` by the angle with `cos[i]`, `sin[i]`.
pub(super) type RotatePairsFn = fn(x: &mut [f32], cos: &[f32], sin: &[f32]);

pub(super) struct Elementwise {
    /// Which table this is (tests tell them apart by it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub isa: Isa,
    pub silu_mul: SiluMulFn,
    pub sum_sq: SumSqFn,
    pub scale_mul: ScaleMulFn,
    pub rotate_halves: RotateHalvesFn,
    pub rotate_pairs: RotatePairsFn,
}

const SCALAR: Elementwise = Elementwise {
    isa: Isa::Scalar,
    silu_mul: scalar::silu_mul,
    sum_sq: scalar::sum_sq,
    scale_mul: scalar::scale_mul,
    rotate_halves: scalar::rotate_halves,
    rotate_pairs: scalar::rotate_pairs,
};

/// The NEON table, on the CPUs that have the NEON kernel table (NEON is baseline there).
#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
const NEON: Option<&Elementwise> = Some(&super::neon_elementwise::TABLE);
#[cfg(not(all(target_arch = "aarch64", target_endian = "little")))]
const NEON: Option<&Elementwise> = None;

/// The table for a kernel table of ISA `isa` (the scalar one for `scalar`, or where the ISA is missing);
/// x86 CPU features are detected once per process.
pub(super) fn table(isa: Isa) -> &'static Elementwise {
    static TABLES: std::sync::OnceLock<[Option<Elementwise>; 2]> = std::sync::OnceLock::new();
    let [avx2, avx512] = TABLES.get_or_init(detect);
    let simd = match isa {
        Isa::Scalar => None,
        Isa::Avx2 => avx2.as_ref(),
        Isa::Avx512 => avx512.as_ref().or(avx2.as_ref()),
        Isa::Neon => NEON,
    };
    simd.unwrap_or(&SCALAR)
}

/// Every table this machine runs, scalar first (tests).
#[cfg(test)]
pub(super) fn all() -> Vec<&'static Elementwise> {
    let mut v = vec![table(Isa::Scalar)];
    for isa in [Isa::Avx2, Isa::Avx512, Isa::Neon] {
        let t = table(isa);
        if !v.iter().any(|u| u.isa == t.isa) {
            v.push(t);
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
fn detect() -> [Option<Elementwise>; 2] {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512 = avx2 && is_x86_feature_detected!("avx512f");
    [
        avx2.then_some(Elementwise {
            isa: Isa::Avx2,
            silu_mul: x86::silu_mul,
            sum_sq: x86::sum_sq,
            scale_mul: x86::scale_mul,
            rotate_halves: x86::rotate_halves,
            rotate_pairs: x86::rotate_pairs,
        }),
        avx512.then_some(Elementwise {
            isa: Isa::Avx512,
            silu_mul: x86_512::silu_mul,
            sum_sq: x86_512::sum_sq,
            scale_mul: x86_512::scale_mul,
            rotate_halves: x86_512::rotate_halves,
            rotate_pairs: x86_512::rotate_pairs,
        }),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> [Option<Elementwise>; 2] {
    [None, None]
}

/// `1 / k!` for k = 12 down to 0: the Taylor coefficients of `exp_f64`, highest first.
pub(super) const EXP_COEFS: [f64; 13] = [
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
    1.0,
    1.0,
];
/// ln 2 = hi + lo, hi with 21 trailing zero bits so `n * hi` is exact (fdlibm's split).
pub(super) const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
pub(super) const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// Arguments are clamped to this range: beyond it the f32 result is 0 or inf anyway.
pub(super) const EXP_MIN: f64 = -105.0;
pub(super) const EXP_MAX: f64 = 89.0;

/// `exp(x)` for an f32 argument widened to f64 (module doc); NaN stays NaN.
pub(super) fn exp_f64(x: f64) -> f64 {
    // the vector max/min return x when it is NaN: so does this
    let x = if x.is_nan() { x } else { x.clamp(EXP_MIN, EXP_MAX) };
    let n = (x * std::f64::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let p = EXP_COEFS[1..].iter().fold(EXP_COEFS[0], |p, &c| p.mul_add(r, c));
    let e = (n as i64 + 1023) as u64;
    p * f64::from_bits(e << 52)
}

/// The correctly rounded `expf` (module doc).
pub(super) fn expf(x: f32) -> f32 {
    exp_f64(x as f64) as f32
}

/// The fixed reduction of the 8 accumulators of [`SumSqFn`] (and of the attention's exp-sums).
#[inline]
pub(super) fn reduce8(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// The oracle (and the vector twins' path for a row's last few elements).
pub(super) mod scalar {
    pub(in super::super) fn silu_mul(g: &mut [f32], u: &[f32]) {
        g.iter_mut().zip(u).for_each(|(x, &y)| *x = *x / (1.0 + super::expf(-*x)) * y);
    }

    /// Adds `x[i]^2` into `acc[(first + i) % 8]`.
    pub(in super::super) fn add_sq(acc: &mut [f64; 8], x: &[f32], first: usize) {
        for (i, &v) in x.iter().enumerate() {
            acc[(first + i) % 8] += (v * v) as f64;
        }
    }

    pub(in super::super) fn sum_sq(x: &[f32]) -> f64 {
        let mut acc = [0.0; 8];
        add_sq(&mut acc, x, 0);
        super::reduce8(acc)
    }

    pub(in super::super) fn scale_mul(o: &mut [f32], x: &[f32], scale: f32, w: Option<&[f32]>) {
        match w {
            Some(w) => o.iter_mut().zip(x).zip(w).for_each(|((o, &v), &g)| *o = (v * scale) * g),
            None => o.iter_mut().zip(x).for_each(|(o, &v)| *o = v * scale),
        }
    }

    pub(in super::super) fn rotate_halves(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (((x0, x1), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let (v0, v1) = (*x0, *x1);
            *x0 = v0 * c - v1 * s;
            *x1 = v0 * s + v1 * c;
        }
    }

    pub(in super::super) fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        for ((p, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (v0, v1) = (p[0], p[1]);
            p[0] = v0 * c - v1 * s;
            p[1] = v0 * s + v1 * c;
        }
    }
}

/// Length checks shared by the vector wrappers (the scalar loops stop at the shortest slice; the
/// vector ones must not read past any).
pub(super) fn check_rotate(a: usize, b: usize, cos: usize, sin: usize) {
    assert!(b >= a && cos >= a && sin >= a, "rotate: slices of {a}, {b}, {cos}, {sin}");
}

/// AVX2 + FMA: 8 f32 lanes, exp in two halves of 4 f64 lanes.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use core::arch::x86_64::*;

    use super::{scalar, EXP_COEFS, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO};

    /// [`super::exp_f64`] on 4 lanes: the same operations in the same order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn exp4d(x: __m256d) -> __m256d {
        // max/min return their second operand when either is NaN: x's NaN goes through
        let x = _mm256_min_pd(_mm256_set1_pd(EXP_MAX), _mm256_max_pd(_mm256_set1_pd(EXP_MIN), x));
        let n = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), x);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
        let mut p = _mm256_set1_pd(EXP_COEFS[0]);
        for &c in &EXP_COEFS[1..] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
        }
        let e = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)), _mm256_set1_epi64x(1023));
        _mm256_mul_pd(p, _mm256_castsi256_pd(_mm256_slli_epi64::<52>(e)))
    }

    /// The correctly rounded expf of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn exp8(x: __m256) -> __m256 {
        let lo = exp4d(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        let hi = exp4d(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
        _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo))
    }

    pub(super) fn silu_mul(g: &mut [f32], u: &[f32]) {
        assert!(u.len() >= g.len(), "silu_mul: {} up values for {} gates", u.len(), g.len());
        let n = g.len() / 8 * 8;
        // SAFETY: features detected before this table was handed out; both slices hold n floats.
        unsafe { silu_mul8(g.as_mut_ptr(), u.as_ptr(), n) };
        scalar::silu_mul(&mut g[n..], &u[n..]);
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn silu_mul8(g: *mut f32, u: *const f32, n: usize) {
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(g.add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(g.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.add(i))));
        }
    }

    /// 8 f64 accumulators in two registers (lanes 0-3, 4-7): `add` widens 8 f32 and adds lane by lane.
    /// The f64 sums of [`super::SumSqFn`] and of the attention's exp pass.
    pub(in super::super) struct F64x8 {
        lo: __m256d,
        hi: __m256d,
    }

    impl F64x8 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn zero() -> F64x8 {
            F64x8 { lo: _mm256_setzero_pd(), hi: _mm256_setzero_pd() }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn add(&mut self, v: __m256) {
            self.lo = _mm256_add_pd(self.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            self.hi = _mm256_add_pd(self.hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)));
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn lanes(&self) -> [f64; 8] {
            let mut acc = [0.0; 8];
            _mm256_storeu_pd(acc.as_mut_ptr(), self.lo);
            _mm256_storeu_pd(acc.as_mut_ptr().add(4), self.hi);
            acc
        }
    }

    pub(super) fn sum_sq(x: &[f32]) -> f64 {
        let n = x.len() / 8 * 8;
        // SAFETY: as above; x holds n floats.
        let mut acc = unsafe { sum_sq8(x.as_ptr(), n) };
        scalar::add_sq(&mut acc, &x[n..], 0);
        super::reduce8(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_sq8(x: *const f32, n: usize) -> [f64; 8] {
        let mut acc = F64x8::zero();
        for i in (0..n).step_by(8) {
            let v = _mm256_loadu_ps(x.add(i));
            acc.add(_mm256_mul_ps(v, v));
        }
        acc.lanes()
    }

    pub(super) fn scale_mul(o: &mut [f32], x: &[f32], scale: f32, w: Option<&[f32]>) {
        let len = o.len();
        assert!(x.len() >= len && w.is_none_or(|w| w.len() >= len), "scale_mul: short input");
        let n = len / 8 * 8;
        // SAFETY: as above; o, x (and w) hold n floats.
        unsafe { scale_mul8(o.as_mut_ptr(), x.as_ptr(), scale, w.map(<[f32]>::as_ptr), n) };
        scalar::scale_mul(&mut o[n..], &x[n..], scale, w.map(|w| &w[n..]));
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn scale_mul8(o: *mut f32, x: *const f32, scale: f32, w: Option<*const f32>, n: usize) {
        let sv = _mm256_set1_ps(scale);
        for i in (0..n).step_by(8) {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), sv);
            let v = match w {
                Some(w) => _mm256_mul_ps(v, _mm256_loadu_ps(w.add(i))),
                None => v,
            };
            _mm256_storeu_ps(o.add(i), v);
        }
    }

    pub(super) fn rotate_halves(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
        super::check_rotate(a.len(), b.len(), cos.len(), sin.len());
        let n = a.len() / 8 * 8;
        // SAFETY: as above; every slice holds at least n floats.
        unsafe { rotate_halves8(a.as_mut_ptr(), b.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), n) };
        scalar::rotate_halves(&mut a[n..], &mut b[n..], &cos[n..], &sin[n..]);
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rotate_halves8(a: *mut f32, b: *mut f32, cos: *const f32, sin: *const f32, n: usize) {
        for i in (0..n).step_by(8) {
            let (x0, x1) = (_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)));
            let (c, s) = (_mm256_loadu_ps(cos.add(i)), _mm256_loadu_ps(sin.add(i)));
            _mm256_storeu_ps(a.add(i), _mm256_sub_ps(_mm256_mul_ps(x0, c), _mm256_mul_ps(x1, s)));
            _mm256_storeu_ps(b.add(i), _mm256_add_ps(_mm256_mul_ps(x0, s), _mm256_mul_ps(x1, c)));
        }
    }

    pub(super) fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let pairs = x.len() / 2;
        super::check_rotate(pairs, pairs, cos.len(), sin.len());
        let n = pairs / 4 * 4;
        // SAFETY: as above; x holds 2n floats, cos and sin n.
        unsafe { rotate_pairs4(x.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), n) };
        scalar::rotate_pairs(&mut x[2 * n..], &cos[n..], &sin[n..]);
    }

    /// 4 pairs a step: `x c + swap(x) (-s, s)` per pair, which rounds as `a c - b s`, `a s + b c` do
    /// (the negation is exact, the additions commute).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rotate_pairs4(x: *mut f32, cos: *const f32, sin: *const f32, n: usize) {
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        let neg_even = _mm256_setr_ps(-0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0);
        for i in (0..n).step_by(4) {
            let v = _mm256_loadu_ps(x.add(2 * i));
            let c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cos.add(i))), dup);
            let s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sin.add(i))), dup);
            let swapped = _mm256_permute_ps::<0b10_11_00_01>(v);
            let r = _mm256_add_ps(_mm256_mul_ps(v, c), _mm256_mul_ps(swapped, _mm256_xor_ps(s, neg_even)));
            _mm256_storeu_ps(x.add(2 * i), r);
        }
    }
}

/// AVX-512F: 16 f32 lanes, exp in two halves of 8 f64 lanes.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use core::arch::x86_64::*;

    use super::{scalar, x86, EXP_COEFS, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO};

    /// [`super::exp_f64`] on 8 lanes: the same operations in the same order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp8d(x: __m512d) -> __m512d {
        let x = _mm512_min_pd(_mm512_set1_pd(EXP_MAX), _mm512_max_pd(_mm512_set1_pd(EXP_MIN), x));
        let n = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), x);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
        let mut p = _mm512_set1_pd(EXP_COEFS[0]);
        for &c in &EXP_COEFS[1..] {
            p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
        }
        let e = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(n)), _mm512_set1_epi64(1023));
        _mm512_mul_pd(p, _mm512_castsi512_pd(_mm512_slli_epi64::<52>(e)))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let lo = _mm512_cvtpd_ps(exp8d(_mm512_cvtps_pd(_mm512_castps512_ps256(x))));
        let hi = _mm512_cvtpd_ps(exp8d(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))))));
        concat(lo, hi)
    }

    /// `[lo | hi]` from two halves (AVX-512F has no f32x8 insert: go through the f64 view).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn concat(lo: __m256, hi: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi)))
    }

    pub(super) fn silu_mul(g: &mut [f32], u: &[f32]) {
        assert!(u.len() >= g.len(), "silu_mul: {} up values for {} gates", u.len(), g.len());
        let n = g.len() / 16 * 16;
        // SAFETY: features detected before this table was handed out; both slices hold n floats.
        unsafe { silu_mul16(g.as_mut_ptr(), u.as_ptr(), n) };
        x86::silu_mul(&mut g[n..], &u[n..]);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn silu_mul16(g: *mut f32, u: *const f32, n: usize) {
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let x = _mm512_loadu_ps(g.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
            _mm512_storeu_ps(g.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(u.add(i))));
        }
    }

    pub(super) fn sum_sq(x: &[f32]) -> f64 {
        let n = x.len() / 8 * 8;
        // SAFETY: as above; x holds n floats.
        let mut acc = unsafe { sum_sq8(x.as_ptr(), n) };
        scalar::add_sq(&mut acc, &x[n..], 0);
        super::reduce8(acc)
    }

    /// The 8 accumulators in one register, 8 elements a step.
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_sq8(x: *const f32, n: usize) -> [f64; 8] {
        let mut acc = _mm512_setzero_pd();
        for i in (0..n).step_by(8) {
            let v = _mm256_loadu_ps(x.add(i));
            acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_mul_ps(v, v)));
        }
        let mut out = [0.0; 8];
        _mm512_storeu_pd(out.as_mut_ptr(), acc);
        out
    }

    pub(super) fn scale_mul(o: &mut [f32], x: &[f32], scale: f32, w: Option<&[f32]>) {
        let len = o.len();
        assert!(x.len() >= len && w.is_none_or(|w| w.len() >= len), "scale_mul: short input");
        let n = len / 16 * 16;
        // SAFETY: as above; o, x (and w) hold n floats.
        unsafe { scale_mul16(o.as_mut_ptr(), x.as_ptr(), scale, w.map(<[f32]>::as_ptr), n) };
        x86::scale_mul(&mut o[n..], &x[n..], scale, w.map(|w| &w[n..]));
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn scale_mul16(o: *mut f32, x: *const f32, scale: f32, w: Option<*const f32>, n: usize) {
        let sv = _mm512_set1_ps(scale);
        for i in (0..n).step_by(16) {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.add(i)), sv);
            let v = match w {
                Some(w) => _mm512_mul_ps(v, _mm512_loadu_ps(w.add(i))),
                None => v,
            };
            _mm512_storeu_ps(o.add(i), v);
        }
    }

    pub(super) fn rotate_halves(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
        super::check_rotate(a.len(), b.len(), cos.len(), sin.len());
        let n = a.len() / 16 * 16;
        // SAFETY: as above; every slice holds at least n floats.
        unsafe { rotate_halves16(a.as_mut_ptr(), b.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), n) };
        x86::rotate_halves(&mut a[n..], &mut b[n..], &cos[n..], &sin[n..]);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn rotate_halves16(a: *mut f32, b: *mut f32, cos: *const f32, sin: *const f32, n: usize) {
        for i in (0..n).step_by(16) {
            let (x0, x1) = (_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)));
            let (c, s) = (_mm512_loadu_ps(cos.add(i)), _mm512_loadu_ps(sin.add(i)));
            _mm512_storeu_ps(a.add(i), _mm512_sub_ps(_mm512_mul_ps(x0, c), _mm512_mul_ps(x1, s)));
            _mm512_storeu_ps(b.add(i), _mm512_add_ps(_mm512_mul_ps(x0, s), _mm512_mul_ps(x1, c)));
        }
    }

    pub(super) fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let pairs = x.len() / 2;
        super::check_rotate(pairs, pairs, cos.len(), sin.len());
        let n = pairs / 8 * 8;
        // SAFETY: as above; x holds 2n floats, cos and sin n.
        unsafe { rotate_pairs8(x.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), n) };
        x86::rotate_pairs(&mut x[2 * n..], &cos[n..], &sin[n..]);
    }

    /// 8 pairs a step, as the AVX2 version's 4.
    #[target_feature(enable = "avx512f")]
    unsafe fn rotate_pairs8(x: *mut f32, cos: *const f32, sin: *const f32, n: usize) {
        let dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let neg_even = _mm512_castsi512_ps(_mm512_set1_epi64(0x8000_0000));
        for i in (0..n).step_by(8) {
            let v = _mm512_loadu_ps(x.add(2 * i));
            let c = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(cos.add(i))));
            let s = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(sin.add(i))));
            let swapped = _mm512_permute_ps::<0b10_11_00_01>(v);
            let s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), _mm512_castps_si512(neg_even)));
            let r = _mm512_add_ps(_mm512_mul_ps(v, c), _mm512_mul_ps(swapped, s));
            _mm512_storeu_ps(x.add(2 * i), r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random f32 in `[-r, r]` from a fixed seed (xorshift), never zero-filled.
    fn random(n: usize, r: f32, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * r
            })
            .collect()
    }

    fn same(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    /// exp_f64 rounded to f32 against f64::exp rounded to f32 (libm's double exp, < 1 ulp): equal on
    /// random arguments over the whole useful range, and at the clamps.
    #[test]
    fn expf_is_correctly_rounded() {
        let xs = random(1 << 20, 104.0, 7);
        let off = xs.iter().filter(|&&x| expf(x).to_bits() != ((x as f64).exp() as f32).to_bits()).count();
        assert_eq!(off, 0, "{off} of {} arguments differ from the rounded f64 exp", xs.len());
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(100.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }

    /// Every vector table computes the scalar bits, for lengths around every vector width (4, 8, 16);
    /// the gates once within [-12, 12] and once over [-200, 200] with infinities, NaN and signed zeros
    /// spliced in (the exp's clamps and NaN path).
    #[test]
    fn vector_tables_equal_scalar() {
        let tables = all();
        println!("elementwise tables: {:?}", tables.iter().map(|t| t.isa).collect::<Vec<_>>());
        let lens = [1, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 31, 64, 100, 576, 1536];
        let wide = |len: usize| {
            let mut g = random(len, 200.0, 3 + len as u64);
            let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, 0.0, 1e-40, -88.9, 104.9];
            g.iter_mut().step_by(3).zip(specials).for_each(|(g, s)| *g = s);
            g
        };
        for g in lens.iter().flat_map(|&len| [random(len, 12.0, len as u64), wide(len)]) {
            let len = g.len();
            let u = random(len, 3.0, 99 + len as u64);
            let w = random(len, 2.0, 5 + len as u64);
            let (cos, sin) = (random(len, 1.0, 11), random(len, 1.0, 13));
            let want_silu = {
                let mut g = g.clone();
                (SCALAR.silu_mul)(&mut g, &u);
                g
            };
            for t in &tables {
                let mut got = g.clone();
                (t.silu_mul)(&mut got, &u);
                assert!(same(&got, &want_silu), "{:?} silu_mul, len {len}", t.isa);
                let (got, want) = ((t.sum_sq)(&g), (SCALAR.sum_sq)(&g));
                assert!(got.to_bits() == want.to_bits() || got.is_nan() && want.is_nan(), "{:?} sum_sq, len {len}", t.isa);
                for wt in [Some(&w[..]), None] {
                    let (mut a, mut b) = (vec![0.0; len], vec![0.0; len]);
                    (t.scale_mul)(&mut a, &g, 0.37, wt);
                    (SCALAR.scale_mul)(&mut b, &g, 0.37, wt);
                    assert!(same(&a, &b), "{:?} scale_mul, len {len}", t.isa);
                }
                let (mut a0, mut b0, mut a1, mut b1) = (g.clone(), u.clone(), g.clone(), u.clone());
                (t.rotate_halves)(&mut a0, &mut b0, &cos, &sin);
                (SCALAR.rotate_halves)(&mut a1, &mut b1, &cos, &sin);
                assert!(same(&a0, &a1) && same(&b0, &b1), "{:?} rotate_halves, len {len}", t.isa);
                let (mut p0, mut p1) = (g.clone(), g.clone());
                let pairs = len / 2;
                (t.rotate_pairs)(&mut p0[..2 * pairs], &cos[..pairs], &sin[..pairs]);
                (SCALAR.rotate_pairs)(&mut p1[..2 * pairs], &cos[..pairs], &sin[..pairs]);
                assert!(same(&p0, &p1), "{:?} rotate_pairs, len {len}", t.isa);
            }
        }
    }

    /// The rotations are rotations: against the plain formulas in f64 (loose) and norm-preserving.
    #[test]
    fn rotations_match_the_formula() {
        let x = random(64, 4.0, 3);
        let ang = random(32, 3.0, 4);
        let (cos, sin): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        for t in all() {
            let mut p = x.clone();
            (t.rotate_pairs)(&mut p, &cos, &sin);
            for i in 0..32 {
                let (a, b, c, s) = (x[2 * i] as f64, x[2 * i + 1] as f64, cos[i] as f64, sin[i] as f64);
                assert!((p[2 * i] as f64 - (a * c - b * s)).abs() < 1e-5, "{:?} pair {i}", t.isa);
                assert!((p[2 * i + 1] as f64 - (a * s + b * c)).abs() < 1e-5, "{:?} pair {i}", t.isa);
            }
            let (mut a, mut b) = (x[..32].to_vec(), x[32..].to_vec());
            (t.rotate_halves)(&mut a, &mut b, &cos, &sin);
            for i in 0..32 {
                let before = x[i] as f64 * x[i] as f64 + x[32 + i] as f64 * x[32 + i] as f64;
                let after = a[i] as f64 * a[i] as f64 + b[i] as f64 * b[i] as f64;
                assert!((before - after).abs() < 1e-4 * before.max(1.0), "{:?} half pair {i}", t.isa);
            }
        }
    }
}
