//! SIMD inner loops of the CPU paged attention, over one split of one KV head: the scores `q_h . k_j` of
//! the group's query heads, their `exp(s - max)`, and the weighted sum `sum_j w_hj v_j`. Two tables:
//! AVX2 + FMA + F16C (8 lanes) and AVX-512F (16 lanes, the same exp).
//!
//! ```text
//! k, v    f16 pools; rows[j] is key j's offset in them (head_dim values)
//! q       [heads x head_dim] f32            scores, w   [heads x n] f32 (row h: head h's keys)
//! QK: one key at a time x up to 3 heads (AVX-512: 4), its K row converted once (F16C) for them; each
//!     score in the kernel tables' `dot_f16` order: 4 x 8 lane sums by FMA over 32-element steps,
//!     `(a0 + a1) + (a2 + a3)`, avx2's `hsum_ps` tree, times scale (AVX-512 holds a0|a1 and a2|a3 in two
//!     16-lane registers: the same bits).
//! exp: `elementwise`'s f64 exp, rounded once: the correctly rounded expf (the CUDA kernels' `exp_cr`),
//!     the same bits as the scalar loops' `elementwise::expf`. A row's last few go through the same
//!     lanes, padded. The same pass sums the weights in f64, in 8 lanes (element i into lane i % 8)
//!     reduced by a fixed tree: off the one dependent chain of the scalar loops' sum, and still exact
//!     for all but the last bits of an f64 (so the f32 `1 / sum` is the same but in ~2^-26 of rows).
//! PV: 16 (AVX-512: 32) outputs x up to 4 (8) heads in registers; keys in position order, one FMA per
//!     key per output (`axpy_f16`'s order); each V row chunk converted once for the heads of the pass.
//! ```
//! So these loops compute what the per-key `dot_f16`/`axpy_f16` loops did, bit for bit, on both tables:
//! avx2 and avx512 agree, and so do the CUDA kernels, which follow this order. Every output element's reduction order depends only on head_dim and the split's keys,
//! never on the batch, chunking or thread (DESIGN.md, "Batch invariance"). The scalar loops in
//! `attention.rs` stay the oracle (`PAGELLM_CPU=scalar` forces them) and the path for a head_dim that is
//! not a multiple of 16.
//!
//! Safety: the `#[target_feature]` functions are reached only through a [`SimdAttn`] that [`simd`] hands
//! out only after `is_x86_feature_detected!` confirmed its features (once per process); the safe
//! wrappers check every row offset and slice length before the unchecked loads.

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
/// loops, the oracle), the AVX-512 ones for an avx512 table, else the AVX2 ones. CPU features are
/// detected once per process.
pub(super) fn simd(isa: Isa) -> Option<&'static SimdAttn> {
    static TABLES: std::sync::OnceLock<[Option<SimdAttn>; 2]> = std::sync::OnceLock::new();
    let [avx2, avx512] = TABLES.get_or_init(detect);
    match isa {
        Isa::Scalar => None,
        Isa::Avx2 => avx2.as_ref(),
        Isa::Avx512 => avx512.as_ref().or(avx2.as_ref()),
        Isa::Neon => None,
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> [Option<SimdAttn>; 2] {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let avx512 = avx2 && is_x86_feature_detected!("avx512f");
    [
        avx2.then_some(SimdAttn { qk: imp::qk, pv: imp::pv, exp: imp::exp }),
        avx512.then_some(SimdAttn { qk: imp512::qk, pv: imp512::pv, exp: imp::exp }),
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

    /// Every row `r..r + hd` inside `pool`, and head_dim a positive multiple of the step.
    pub(super) fn check(pool: &[u16], rows: &[usize], hd: usize) {
        assert!(hd.is_multiple_of(super::SimdAttn::HD_STEP) && hd > 0, "attention simd: head_dim {hd}");
        assert!(rows.iter().all(|&r| r.checked_add(hd).is_some_and(|e| e <= pool.len())), "attention simd: row outside the pool");
    }

    pub(super) fn qk(k: &[u16], rows: &[usize], hd: usize, q: &[f32], heads: usize, scale: f32, scores: &mut [f32]) {
        let n = rows.len();
        check(k, rows, hd);
        assert!(q.len() >= heads * hd && scores.len() >= heads * n);
        let mut h = 0;
        while h < heads {
            let m = (heads - h).min(3);
            let (qh, sh) = (&q[h * hd..], &mut scores[h * n..]);
            // SAFETY: features detected before this table was handed out; rows and lengths checked above.
            unsafe {
                match m {
                    1 => qk_pass::<1>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                    2 => qk_pass::<2>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                    _ => qk_pass::<3>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                }
            }
            h += m;
        }
    }

    pub(super) fn pv(v: &[u16], rows: &[usize], hd: usize, w: &[f32], heads: usize, o: &mut [f32]) {
        let n = rows.len();
        check(v, rows, hd);
        assert!(o.len() >= heads * hd && w.len() >= heads * n);
        let mut h = 0;
        while h < heads {
            let m = (heads - h).min(4);
            let (wh, oh) = (&w[h * n..], &mut o[h * hd..]);
            // SAFETY: as in qk.
            unsafe {
                match m {
                    1 => pv_pass::<1>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    2 => pv_pass::<2>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    3 => pv_pass::<3>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    _ => pv_pass::<4>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                }
            }
            h += m;
        }
    }

    pub(super) fn exp(x: &mut [f32], m: f32) -> f64 {
        // SAFETY: as in qk.
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

    use super::imp::{check, hsum_ps};

    pub(super) fn qk(k: &[u16], rows: &[usize], hd: usize, q: &[f32], heads: usize, scale: f32, scores: &mut [f32]) {
        if !hd.is_multiple_of(32) {
            return super::imp::qk(k, rows, hd, q, heads, scale, scores);
        }
        let n = rows.len();
        check(k, rows, hd);
        assert!(q.len() >= heads * hd && scores.len() >= heads * n);
        let mut h = 0;
        while h < heads {
            let m = (heads - h).min(4);
            let (qh, sh) = (&q[h * hd..], &mut scores[h * n..]);
            // SAFETY: avx512f (and avx2, fma, f16c) detected before this table was handed out; rows and
            // lengths checked above.
            unsafe {
                match m {
                    1 => qk_pass::<1>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                    2 => qk_pass::<2>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                    3 => qk_pass::<3>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                    _ => qk_pass::<4>(k.as_ptr(), rows, hd, qh.as_ptr(), scale, sh.as_mut_ptr(), n),
                }
            }
            h += m;
        }
    }

    pub(super) fn pv(v: &[u16], rows: &[usize], hd: usize, w: &[f32], heads: usize, o: &mut [f32]) {
        let n = rows.len();
        check(v, rows, hd);
        assert!(o.len() >= heads * hd && w.len() >= heads * n);
        let mut h = 0;
        while h < heads {
            let m = if heads - h >= 8 { 8 } else { (heads - h).min(4) };
            let (wh, oh) = (&w[h * n..], &mut o[h * hd..]);
            // SAFETY: as in qk.
            unsafe {
                match m {
                    1 => pv_pass::<1>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    2 => pv_pass::<2>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    3 => pv_pass::<3>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    4 => pv_pass::<4>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                    _ => pv_pass::<8>(v.as_ptr(), rows, hd, wh.as_ptr(), oh.as_mut_ptr(), n),
                }
            }
            h += m;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector exp is f64's exp rounded to f32 (the correctly rounded expf) over [-105, 89], and
    /// glibc's `f32::exp` but for its rare misroundings; 0 below, NaN kept.
    #[test]
    fn exp_is_correctly_rounded() {
        let Some(t) = simd(Isa::Avx2) else { return };
        let xs: Vec<f32> = (0..400_003).map(|i| -105.0 + i as f32 * (194.0 / 400_003.0)).collect();
        let mut got = xs.clone();
        (t.exp)(&mut got, 0.0);
        let wrong = xs.iter().zip(&got).filter(|&(&x, &g)| g.to_bits() != ((x as f64).exp() as f32).to_bits()).count();
        let glibc = xs.iter().zip(&got).filter(|&(&x, &g)| g.to_bits() != x.exp().to_bits()).count();
        println!("vector exp: {wrong} of {} not correctly rounded; {glibc} differ from glibc's expf", xs.len());
        assert_eq!(wrong, 0);
        let mut edge = [-106.0, -1e30, f32::NEG_INFINITY, f32::NAN, 0.0, 100.0];
        (t.exp)(&mut edge, 0.0);
        assert_eq!(&edge[..3], &[0.0; 3]);
        assert!(edge[3].is_nan() && edge[4] == 1.0 && edge[5] == f32::INFINITY);
    }
}
