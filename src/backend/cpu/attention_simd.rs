//! SIMD inner loops of the CPU paged attention, over one split of one KV head: the scores `q_h . k_j` of
//! the group's query heads, their `exp(s - max)`, and the weighted sum `sum_j w_hj v_j`. Three tables:
//! AVX2 + FMA + F16C (8 lanes), AVX-512F (16 lanes, the same exp) and NEON (4 lanes; each 8-lane sum of
//! the others in a pair of registers).
//!
//! ```text
//! k, v    f16 pools; rows[j] is key j's offset in them (head_dim values)
//! q       [heads x head_dim] f32            scores, w   [heads x n] f32 (row h: head h's keys)
//! QK: one key at a time x up to 3 heads (AVX-512: 4), its K row converted once (F16C) for them; each
//!     score in the kernel tables' `dot_f16` order: 4 x 8 lane sums by FMA over 32-element steps,
//!     `(a0 + a1) + (a2 + a3)`, avx2's `hsum_ps` tree, times scale (AVX-512 holds a0|a1 and a2|a3 in two
//!     16-lane registers: the same bits; NEON holds each 8-lane sum in two 4-lane registers, as neon.rs's
//!     `dot_f16` does, and ends in the same tree).
//! exp: `elementwise`'s f64 exp, rounded once: the correctly rounded expf (the CUDA kernels' `exp_cr`),
//!     the same bits as the scalar loops' `elementwise::expf`. A row's last few go through the same
//!     lanes, padded. The same pass sums the weights in f64, in 8 lanes (element i into lane i % 8)
//!     reduced by a fixed tree: off the one dependent chain of the scalar loops' sum, and still exact
//!     for all but the last bits of an f64 (so the f32 `1 / sum` is the same but in ~2^-26 of rows).
//! PV: 16 (AVX-512: 32) outputs x up to 4 (8) heads in registers; keys in position order, one FMA per
//!     key per output (`axpy_f16`'s order); each V row chunk converted once for the heads of the pass.
//! ```
//! So these loops compute what the per-key `dot_f16`/`axpy_f16` loops did, bit for bit, on every table:
//! avx2, avx512 and neon agree, and so do the CUDA kernels, which follow this order. Every output
//! element's reduction order depends only on head_dim and the split's keys, never on the batch, chunking
//! or thread (DESIGN.md, "Batch invariance"). The scalar loops in `attention.rs` stay the oracle
//! (`PAGELLM_CPU=scalar` forces them) and the path for a head_dim that is not a multiple of 16.
//!
//! Safety: the `#[target_feature]` functions are reached only through a [`SimdAttn`] that [`simd`] hands
//! out only after `is_x86_feature_detected!` confirmed its features (once per process); NEON is baseline
//! on aarch64. The safe wrappers check every row offset and slice length before the unchecked loads.

use super::kernels::Isa;

/// `scores[h * n + i] = scale * q_h . k[rows[i]..]` for `h < heads`, `n = rows.len()`.
pub(super) type QkFn = fn(k: &[u16], rows: &[usize], hd: usize, q: &[f32], heads: usize, scale: f32, scores: &mut [f32]);
/// `o[h * hd..][..hd] = sum_i w[h * n + i] v[rows[i]..]` for `h < heads`, keys in order.
pub(super) type PvFn = fn(v: &[u16], rows: &[usize], hd: usize, w: &[f32], heads: usize, o: &mut [f32]);

/// `x[i] = exp(x[i] - m)` for every `i`, correctly rounded; returns their sum in f64 (8 lanes, element
/// `i` into lane `i % 8`, then a fixed tree).
pub(super) type ExpFn = fn(x: &mut [f32], m: f32) -> f64;

/// The vector attention loops, for head dims that are a multiple of [`SimdAttn::HD_STEP`].
pub(super) struct SimdAttn {
    pub qk: QkFn,
    pub pv: PvFn,
    pub exp: ExpFn,
}

impl SimdAttn {
    pub const HD_STEP: usize = 16;
}

/// The vector loops for a kernel table of ISA `isa`: none for the scalar table (which keeps the scalar
/// loops, the oracle), the NEON ones for a neon table, the AVX-512 ones for an avx512 table, else the
/// AVX2 ones. x86 CPU features are detected once per process.
pub(super) fn simd(isa: Isa) -> Option<&'static SimdAttn> {
    static TABLES: std::sync::OnceLock<[Option<SimdAttn>; 2]> = std::sync::OnceLock::new();
    let [avx2, avx512] = TABLES.get_or_init(detect);
    match isa {
        Isa::Scalar => None,
        Isa::Avx2 => avx2.as_ref(),
        Isa::Avx512 => avx512.as_ref().or(avx2.as_ref()),
        Isa::Neon => NEON,
    }
}

/// The NEON loops, where the NEON kernel table exists (NEON is baseline there).
#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
const NEON: Option<&SimdAttn> =
    Some(&SimdAttn { qk: passes::qk::<neon_imp::Neon>, pv: passes::pv::<neon_imp::Neon>, exp: neon_imp::exp });
#[cfg(not(all(target_arch = "aarch64", target_endian = "little")))]
const NEON: Option<&SimdAttn> = None;

/// The QK and PV wrappers of every instruction set: arguments checked, then its passes over several
/// heads at once.
#[cfg(any(target_arch = "x86_64", all(target_arch = "aarch64", target_endian = "little")))]
mod passes {
    use super::SimdAttn;

    /// `m` heads' scores at once (`q` `[m x hd]`; head h's at `s + h * n`).
    pub(super) type QkPass = unsafe fn(k: *const u16, rows: &[usize], hd: usize, q: *const f32, scale: f32, s: *mut f32, n: usize);
    /// `m` heads' weighted V sums at once (`w` `[m x n]`, `o` `[m x hd]`).
    pub(super) type PvPass = unsafe fn(v: *const u16, rows: &[usize], hd: usize, w: *const f32, o: *mut f32, n: usize);

    /// One instruction set's passes: `QK[m - 1]` (`PV[m - 1]`) takes `m` heads, `None` where there is no
    /// pass that wide; [`qk`] and [`pv`] run the widest that fits, head after head.
    ///
    /// # Safety
    /// Implemented only where the only way to `qk::<Self>` and `pv::<Self>` is a [`SimdAttn`] that
    /// `simd` hands out where the CPU runs the passes; they read only the rows and lengths checked here.
    pub(super) unsafe trait Passes {
        const QK: &'static [Option<QkPass>];
        const PV: &'static [Option<PvPass>];
    }

    /// The widest pass for `rest` heads, and its width.
    fn widest<P: Copy>(passes: &[Option<P>], rest: usize) -> (usize, P) {
        (1..=rest.min(passes.len())).rev().find_map(|m| passes[m - 1].map(|p| (m, p))).expect("a pass of one head")
    }

    /// Every row `r..r + hd` inside `pool`, and head_dim a positive multiple of the step.
    fn check(pool: &[u16], rows: &[usize], hd: usize) {
        assert!(hd.is_multiple_of(SimdAttn::HD_STEP) && hd > 0, "attention simd: head_dim {hd}");
        assert!(rows.iter().all(|&r| r.checked_add(hd).is_some_and(|e| e <= pool.len())), "attention simd: row outside the pool");
    }

    /// [`super::QkFn`] by `P`'s passes.
    pub(super) fn qk<P: Passes>(k: &[u16], rows: &[usize], hd: usize, q: &[f32], heads: usize, scale: f32, scores: &mut [f32]) {
        let n = rows.len();
        check(k, rows, hd);
        assert!(q.len() >= heads * hd && scores.len() >= heads * n);
        let mut h = 0;
        while h < heads {
            let (m, pass) = widest(P::QK, heads - h);
            // SAFETY: the CPU runs P's passes (the trait's promise); rows and lengths checked above.
            unsafe { pass(k.as_ptr(), rows, hd, q[h * hd..].as_ptr(), scale, scores[h * n..].as_mut_ptr(), n) };
            h += m;
        }
    }

    /// [`super::PvFn`] by `P`'s passes.
    pub(super) fn pv<P: Passes>(v: &[u16], rows: &[usize], hd: usize, w: &[f32], heads: usize, o: &mut [f32]) {
        let n = rows.len();
        check(v, rows, hd);
        assert!(o.len() >= heads * hd && w.len() >= heads * n);
        let mut h = 0;
        while h < heads {
            let (m, pass) = widest(P::PV, heads - h);
            // SAFETY: as in qk.
            unsafe { pass(v.as_ptr(), rows, hd, w[h * n..].as_ptr(), o[h * hd..].as_mut_ptr(), n) };
            h += m;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> [Option<SimdAttn>; 2] {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let avx512 = avx2 && is_x86_feature_detected!("avx512f");
    [
        avx2.then_some(SimdAttn { qk: passes::qk::<imp::Avx2>, pv: passes::pv::<imp::Avx2>, exp: imp::exp }),
        avx512.then_some(SimdAttn { qk: imp512::qk, pv: passes::pv::<imp512::Avx512>, exp: imp::exp }),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> [Option<SimdAttn>; 2] {
    [None, None]
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::x86_64::*;

    use super::super::elementwise::x86::{exp8, F64x8};
    use super::passes::{Passes, PvPass, QkPass};

    /// AVX2 + FMA + F16C: QK over up to 3 heads, PV up to 4.
    pub(super) struct Avx2;

    // SAFETY: reached only through the avx2 and avx512 tables, built after these features were detected.
    unsafe impl Passes for Avx2 {
        const QK: &'static [Option<QkPass>] = &[Some(qk_pass::<1>), Some(qk_pass::<2>), Some(qk_pass::<3>)];
        const PV: &'static [Option<PvPass>] = &[Some(pv_pass::<1>), Some(pv_pass::<2>), Some(pv_pass::<3>), Some(pv_pass::<4>)];
    }

    pub(super) fn exp(x: &mut [f32], m: f32) -> f64 {
        // SAFETY: reached only through the avx2 and avx512 tables, built after these features were detected.
        unsafe { exp_row(x, m) }
    }

    /// `x = exp(x - m)`, and the sum of the new values in f64: element `i` into lane `i % 8` of two
    /// 4-lane accumulators, the lanes reduced by `elementwise::reduce8`'s tree.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_row(x: &mut [f32], m: f32) -> f64 {
        let mv = _mm256_set1_ps(m);
        let mut sum = F64x8::zero();
        let mut chunks = x.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            // SAFETY: 8 floats of a chunk.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                sum.add(e);
            }
        }
        // the last few through the same lanes, so every element takes the same arithmetic
        let rest = chunks.into_remainder();
        let mut pad = [0.0f32; 8];
        pad[..rest.len()].copy_from_slice(rest);
        // SAFETY: 8 floats of pad.
        unsafe { _mm256_storeu_ps(pad.as_mut_ptr(), exp8(_mm256_sub_ps(_mm256_loadu_ps(pad.as_ptr()), mv))) };
        rest.copy_from_slice(&pad[..rest.len()]);
        let mut acc = sum.lanes();
        for (l, &e) in acc.iter_mut().zip(rest.iter()) {
            *l += e as f64;
        }
        super::super::elementwise::reduce8(acc)
    }

    /// avx2.rs's `hsum_ps` tree: `((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `H` heads (`q` `[H x hd]`) against every key, each K row converted once; scores of head h at
    /// `s + h * n`. Each score in the kernel table's `dot_f16` order: 4 x 8 lane sums over 32-element
    /// steps (a last 16 into the first), `(a0 + a1) + (a2 + a3)`, [`hsum_ps`], times `scale`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk_pass<const H: usize>(k: *const u16, rows: &[usize], hd: usize, q: *const f32, scale: f32, s: *mut f32, n: usize) {
        for (i, &r) in rows.iter().enumerate() {
            let kr = k.add(r);
            let mut acc = [[_mm256_setzero_ps(); 4]; H];
            let mut d = 0;
            while d + 32 <= hd {
                let kv: [__m256; 4] = std::array::from_fn(|j| _mm256_cvtph_ps(_mm_loadu_si128(kr.add(d + 8 * j) as *const __m128i)));
                for (h, a) in acc.iter_mut().enumerate() {
                    for j in 0..4 {
                        a[j] = _mm256_fmadd_ps(kv[j], _mm256_loadu_ps(q.add(h * hd + d + 8 * j)), a[j]);
                    }
                }
                d += 32;
            }
            while d < hd {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(kr.add(d) as *const __m128i));
                for (h, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q.add(h * hd + d)), a[0]);
                }
                d += 8;
            }
            for (h, a) in acc.iter().enumerate() {
                let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                *s.add(h * n + i) = hsum_ps(v) * scale;
            }
        }
    }

    /// `o[h * hd + d] = sum_i w[h * n + i] v_i[d]` for `H` heads, 16 outputs per head at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_pass<const H: usize>(v: *const u16, rows: &[usize], hd: usize, w: *const f32, o: *mut f32, n: usize) {
        let mut d = 0;
        while d < hd {
            let mut acc = [[_mm256_setzero_ps(); 2]; H];
            for (i, &r) in rows.iter().enumerate() {
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(v.add(r + d) as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(v.add(r + d + 8) as *const __m128i));
                for (h, a) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*w.add(h * n + i));
                    a[0] = _mm256_fmadd_ps(wv, lo, a[0]);
                    a[1] = _mm256_fmadd_ps(wv, hi, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(h * hd + d), a[0]);
                _mm256_storeu_ps(o.add(h * hd + d + 8), a[1]);
            }
            d += 16;
        }
    }
}

/// The AVX-512F twins of `imp`'s QK and PV, the same arithmetic bit for bit (so the avx2 and avx512
/// kernel tables, and the CUDA kernels that follow them, agree): 16 lanes hold two of QK's 8-lane sums;
/// PV does 32 outputs x up to 8 heads per pass.
#[cfg(target_arch = "x86_64")]
mod imp512 {
    use core::arch::x86_64::*;

    use super::imp::{hsum_ps, Avx2};
    use super::passes::{self, Passes, PvPass, QkPass};

    /// AVX-512F: QK over up to 4 heads (head dims a multiple of 32; others by the AVX2 passes), PV up
    /// to 4 or 8.
    pub(super) struct Avx512;

    // SAFETY: reached only through the avx512 table, built after avx512f (and the AVX2 features) were
    // detected.
    unsafe impl Passes for Avx512 {
        const QK: &'static [Option<QkPass>] = &[Some(qk_pass::<1>), Some(qk_pass::<2>), Some(qk_pass::<3>), Some(qk_pass::<4>)];
        const PV: &'static [Option<PvPass>] =
            &[Some(pv_pass::<1>), Some(pv_pass::<2>), Some(pv_pass::<3>), Some(pv_pass::<4>), None, None, None, Some(pv_pass::<8>)];
    }

    pub(super) fn qk(k: &[u16], rows: &[usize], hd: usize, q: &[f32], heads: usize, scale: f32, scores: &mut [f32]) {
        if hd.is_multiple_of(32) {
            passes::qk::<Avx512>(k, rows, hd, q, heads, scale, scores)
        } else {
            passes::qk::<Avx2>(k, rows, hd, q, heads, scale, scores)
        }
    }

    /// The 16 lanes of `a` folded to 8: low half + high half.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn half(a: __m512) -> __m256 {
        _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))))
    }

    /// `imp::qk_pass`'s arithmetic bit for bit, 16 lanes wide: lanes 0..8 and 8..16 of `a[0]` are its
    /// `a0` and `a1`, of `a[1]` its `a2` and `a3`. Head dims a multiple of 32 (others go to `imp::qk`).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn qk_pass<const H: usize>(k: *const u16, rows: &[usize], hd: usize, q: *const f32, scale: f32, s: *mut f32, n: usize) {
        for (i, &r) in rows.iter().enumerate() {
            let kr = k.add(r);
            let mut acc = [[_mm512_setzero_ps(); 2]; H];
            let mut d = 0;
            while d < hd {
                let k0 = _mm512_cvtph_ps(_mm256_loadu_si256(kr.add(d) as *const __m256i));
                let k1 = _mm512_cvtph_ps(_mm256_loadu_si256(kr.add(d + 16) as *const __m256i));
                for (h, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(q.add(h * hd + d)), a[0]);
                    a[1] = _mm512_fmadd_ps(k1, _mm512_loadu_ps(q.add(h * hd + d + 16)), a[1]);
                }
                d += 32;
            }
            for (h, a) in acc.iter().enumerate() {
                *s.add(h * n + i) = hsum_ps(_mm256_add_ps(half(a[0]), half(a[1]))) * scale;
            }
        }
    }

    /// 32 outputs per head at a time (16 for a last odd chunk), `H` heads.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn pv_pass<const H: usize>(v: *const u16, rows: &[usize], hd: usize, w: *const f32, o: *mut f32, n: usize) {
        let mut d = 0;
        while d + 32 <= hd {
            let mut acc = [[_mm512_setzero_ps(); 2]; H];
            for (i, &r) in rows.iter().enumerate() {
                let lo = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(r + d) as *const __m256i));
                let hi = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(r + d + 16) as *const __m256i));
                for (h, a) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*w.add(h * n + i));
                    a[0] = _mm512_fmadd_ps(wv, lo, a[0]);
                    a[1] = _mm512_fmadd_ps(wv, hi, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(h * hd + d), a[0]);
                _mm512_storeu_ps(o.add(h * hd + d + 16), a[1]);
            }
            d += 32;
        }
        if d < hd {
            let mut acc = [_mm512_setzero_ps(); H];
            for (i, &r) in rows.iter().enumerate() {
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(r + d) as *const __m256i));
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*w.add(h * n + i)), x, *a);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(h * hd + d), *a);
            }
        }
    }
}

/// The NEON twins of `imp`'s loops, the same arithmetic bit for bit: QK's four 8-lane sums per head in
/// eight 4-lane registers, reduced by neon.rs's `hsum_4x8` (avx2's tree); PV 16 outputs x up to 4 heads
/// in four registers per head; exp through `neon_elementwise`'s exp and f64 lanes.
#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod neon_imp {
    use core::arch::aarch64::*;

    use super::super::neon::imp::{hsum_4x8, load_f16x8};
    use super::super::neon_elementwise::{exp4, F64x8};
    use super::passes::{Passes, PvPass, QkPass};

    /// NEON: QK over up to 3 heads (24 accumulators, 2 K and 1 Q register of the 32), PV up to 4.
    pub(super) struct Neon;

    // SAFETY: NEON is baseline on aarch64.
    unsafe impl Passes for Neon {
        const QK: &'static [Option<QkPass>] = &[Some(qk_pass::<1>), Some(qk_pass::<2>), Some(qk_pass::<3>)];
        const PV: &'static [Option<PvPass>] = &[Some(pv_pass::<1>), Some(pv_pass::<2>), Some(pv_pass::<3>), Some(pv_pass::<4>)];
    }

    /// `x = exp(x - m)`, and the sum of the new values in f64: element `i` into lane `i % 8`, the lanes
    /// reduced by `elementwise::reduce8`'s tree; the last few padded to 8, as in `imp`.
    pub(super) fn exp(x: &mut [f32], m: f32) -> f64 {
        /// 8 floats at `p` replaced by `exp(p[i] - m)`; returns them (lanes 0-3, 4-7).
        ///
        /// # Safety
        /// `p` points to 8 floats.
        #[inline(always)]
        unsafe fn exp8(p: *mut f32, mv: float32x4_t) -> (float32x4_t, float32x4_t) {
            let lo = exp4(vsubq_f32(vld1q_f32(p), mv));
            let hi = exp4(vsubq_f32(vld1q_f32(p.add(4)), mv));
            vst1q_f32(p, lo);
            vst1q_f32(p.add(4), hi);
            (lo, hi)
        }
        // SAFETY: NEON is baseline on aarch64; each pointer is to the 8 floats of a chunk or of pad.
        unsafe {
            let mv = vdupq_n_f32(m);
            let mut sum = F64x8::zero();
            let mut chunks = x.chunks_exact_mut(8);
            for c in chunks.by_ref() {
                let (lo, hi) = exp8(c.as_mut_ptr(), mv);
                sum.add(lo, hi);
            }
            let rest = chunks.into_remainder();
            let mut pad = [0.0f32; 8];
            pad[..rest.len()].copy_from_slice(rest);
            exp8(pad.as_mut_ptr(), mv);
            rest.copy_from_slice(&pad[..rest.len()]);
            let mut acc = sum.lanes();
            for (l, &e) in acc.iter_mut().zip(rest.iter()) {
                *l += e as f64;
            }
            super::super::elementwise::reduce8(acc)
        }
    }

    /// `H` heads (`q` `[H x hd]`) against every key, each K row converted once; scores of head h at
    /// `s + h * n`, in `imp::qk_pass`'s order: sum `j` of 4 (8 lanes) in `a[2j]` and `a[2j + 1]`.
    unsafe fn qk_pass<const H: usize>(k: *const u16, rows: &[usize], hd: usize, q: *const f32, scale: f32, s: *mut f32, n: usize) {
        for (i, &r) in rows.iter().enumerate() {
            let kr = k.add(r) as *const u8;
            let mut acc = [[vdupq_n_f32(0.0); 8]; H];
            let mut d = 0;
            while d + 32 <= hd {
                for j in 0..4 {
                    let (k0, k1) = load_f16x8(kr.add(2 * (d + 8 * j)));
                    for (h, a) in acc.iter_mut().enumerate() {
                        let qp = q.add(h * hd + d + 8 * j);
                        a[2 * j] = vfmaq_f32(a[2 * j], k0, vld1q_f32(qp));
                        a[2 * j + 1] = vfmaq_f32(a[2 * j + 1], k1, vld1q_f32(qp.add(4)));
                    }
                }
                d += 32;
            }
            // a last 16 (head dims a multiple of 16 but not of 32): into the first sum, 8 at a time
            while d < hd {
                let (k0, k1) = load_f16x8(kr.add(2 * d));
                for (h, a) in acc.iter_mut().enumerate() {
                    let qp = q.add(h * hd + d);
                    a[0] = vfmaq_f32(a[0], k0, vld1q_f32(qp));
                    a[1] = vfmaq_f32(a[1], k1, vld1q_f32(qp.add(4)));
                }
                d += 8;
            }
            for (h, a) in acc.iter().enumerate() {
                *s.add(h * n + i) = hsum_4x8(a) * scale;
            }
        }
    }

    /// `o[h * hd + d] = sum_i w[h * n + i] v_i[d]` for `H` heads, 16 outputs per head at a time.
    unsafe fn pv_pass<const H: usize>(v: *const u16, rows: &[usize], hd: usize, w: *const f32, o: *mut f32, n: usize) {
        let mut d = 0;
        while d < hd {
            let mut acc = [[vdupq_n_f32(0.0); 4]; H];
            for (i, &r) in rows.iter().enumerate() {
                let (x0, x1) = load_f16x8(v.add(r + d) as *const u8);
                let (x2, x3) = load_f16x8(v.add(r + d + 8) as *const u8);
                for (h, a) in acc.iter_mut().enumerate() {
                    let wv = vdupq_n_f32(*w.add(h * n + i));
                    for (a, x) in a.iter_mut().zip([x0, x1, x2, x3]) {
                        *a = vfmaq_f32(*a, wv, x);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (j, &a) in a.iter().enumerate() {
                    vst1q_f32(o.add(h * hd + d + 4 * j), a);
                }
            }
            d += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::super::elementwise::{expf, reduce8};
    use super::super::kernels::Kernels;
    use super::*;

    /// The kernel tables that have vector loops, each with its loops (their names printed: tests/aarch64.sh
    /// checks that the neon one ran).
    fn tables() -> Vec<(Kernels, &'static SimdAttn)> {
        let v: Vec<(Kernels, &SimdAttn)> = Kernels::all().into_iter().filter_map(|k| simd(k.isa).map(|s| (k, s))).collect();
        println!("attention SIMD loops checked: {:?}", v.iter().map(|(k, _)| k.name()).collect::<Vec<_>>());
        v
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// QK and PV of every table with vector loops against the per-key loops of `attention.rs` with the
    /// same kernel table (its `dot_f16`, `axpy_f16`), bit for bit: head dims 16 to 256 (a last 16 after
    /// 32-element steps included), 1 to 9 heads (every pass width), keys at unaligned offsets in any
    /// order. (tests/backend_cpu.rs pins those per-key kernels of every SIMD table to one float order,
    /// so the tables agree across architectures too.)
    #[test]
    fn qk_and_pv_equal_the_per_key_loops() {
        let mut r = StdRng::seed_from_u64(17);
        for (kern, t) in tables() {
            for hd in [16, 48, 64, 80, 128, 256] {
                let pool: Vec<u16> = (0..40 * hd).map(|_| f16::from_f32(r.gen_range(-2.0..2.0)).to_bits()).collect();
                for heads in 1..=9 {
                    let n = r.gen_range(1..=13);
                    let rows: Vec<usize> = (0..n).map(|_| r.gen_range(0..=pool.len() - hd)).collect();
                    let q: Vec<f32> = (0..heads * hd).map(|_| r.gen_range(-1.0..1.0)).collect();
                    let scale = r.gen_range(0.05..0.5);
                    let what = format!("{} hd {hd} heads {heads}", kern.name());

                    let mut scores = vec![f32::NAN; heads * n];
                    (t.qk)(&pool, &rows, hd, &q, heads, scale, &mut scores);
                    for (h, qh) in q.chunks_exact(hd).enumerate() {
                        for (i, &at) in rows.iter().enumerate() {
                            let per_key = (kern.dot_f16)(&pool[at..at + hd], qh) * scale;
                            let got = scores[h * n + i];
                            assert_eq!(got.to_bits(), per_key.to_bits(), "{what}: qk {got} vs per-key dot_f16 {per_key}");
                        }
                    }

                    let w: Vec<f32> = (0..heads * n).map(|_| r.gen_range(0.0..1.0)).collect();
                    let mut o = vec![f32::NAN; heads * hd];
                    (t.pv)(&pool, &rows, hd, &w, heads, &mut o);
                    let mut per_key = vec![0.0f32; heads * hd];
                    for (i, &at) in rows.iter().enumerate() {
                        for (h, ph) in per_key.chunks_exact_mut(hd).enumerate() {
                            (kern.axpy_f16)(ph, w[h * n + i], &pool[at..at + hd]);
                        }
                    }
                    assert_eq!(bits(&o), bits(&per_key), "{what}: pv vs per-key axpy_f16");
                }
            }
        }
    }

    /// The exp pass of every table: each value `expf(x - m)` (the scalar loops' bits), the sum the 8 f64
    /// lanes of the contract (element `i` into lane `i % 8`, then `reduce8`), for lengths around 8.
    #[test]
    fn exp_pass_equals_expf_and_eight_lanes() {
        let mut r = StdRng::seed_from_u64(18);
        for (kern, t) in tables() {
            for len in [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 100, 513] {
                let x: Vec<f32> = (0..len).map(|_| r.gen_range(-30.0..8.0)).collect();
                let m = x.iter().fold(r.gen_range(-5.0..5.0), |a: f32, &v| a.max(v));
                let mut got = x.clone();
                let sum = (t.exp)(&mut got, m);
                let want: Vec<f32> = x.iter().map(|&v| expf(v - m)).collect();
                let mut lanes = [0.0f64; 8];
                want.iter().enumerate().for_each(|(i, &e)| lanes[i % 8] += e as f64);
                let what = format!("{} exp, len {len}", kern.name());
                assert_eq!(bits(&got), bits(&want), "{what}");
                assert_eq!(sum.to_bits(), reduce8(lanes).to_bits(), "{what}: sum {sum} vs {}", reduce8(lanes));
            }
        }
    }

    /// The vector exp is f64's exp rounded to f32 (the correctly rounded expf) over [-105, 89], and
    /// glibc's `f32::exp` but for its rare misroundings; 0 below, NaN kept.
    #[test]
    fn exp_is_correctly_rounded() {
        for (kern, t) in tables() {
            let xs: Vec<f32> = (0..400_003).map(|i| -105.0 + i as f32 * (194.0 / 400_003.0)).collect();
            let mut got = xs.clone();
            (t.exp)(&mut got, 0.0);
            let wrong = xs.iter().zip(&got).filter(|&(&x, &g)| g.to_bits() != ((x as f64).exp() as f32).to_bits()).count();
            let glibc = xs.iter().zip(&got).filter(|&(&x, &g)| g.to_bits() != x.exp().to_bits()).count();
            let n = xs.len();
            println!("{} vector exp: {wrong} of {n} not correctly rounded; {glibc} differ from glibc's expf", kern.name());
            assert_eq!(wrong, 0);
            let mut edge = [-106.0, -1e30, f32::NEG_INFINITY, f32::NAN, 0.0, 100.0];
            (t.exp)(&mut edge, 0.0);
            assert_eq!(&edge[..3], &[0.0; 3]);
            assert!(edge[3].is_nan() && edge[4] == 1.0 && edge[5] == f32::INFINITY);
        }
    }
}
