//! AVX2 + FMA + F16C kernels, the SIMD twins of the scalar ones in `kernels.rs` (same results bit for bit
//! for the quantized dots; see that module's doc for the order of float operations they share).
//!
//! Safety: every `#[target_feature]` function here is reached only through the table [`kernels`] returns,
//! and [`kernels`] returns one only after `is_x86_feature_detected!` confirmed avx2, fma and f16c. Block
//! pointers come from slices whose lengths the safe wrappers check (`assert!`) before any load.

#[cfg(target_arch = "x86_64")]
pub(super) fn kernels() -> Option<super::Kernels> {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        Some(imp::table())
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn kernels() -> Option<super::Kernels> {
    None
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::x86_64::*;

    use half::f16;

    use super::super::kernels::{reduce4, Isa, Kernels};
    use crate::quant::{QK, QK_K};

    pub(super) fn table() -> Kernels {
        Kernels {
            isa: Isa::Avx2,
            dot_q4_0: |w, a| legacy(w, a, 18, 34, Kind::Q4_0),
            dot_q4_1: |w, a| legacy(w, a, 20, 36, Kind::Q4_1),
            dot_q5_0: |w, a| legacy(w, a, 22, 34, Kind::Q5_0),
            dot_q8_0: |w, a| legacy(w, a, 34, 34, Kind::Q8_0),
            dot_q4_k: |w, a| {
                let nb = check(w, a, 144, 292);
                // SAFETY: table() is only built after feature detection; lengths checked above.
                unsafe { dot_q4_k(w.as_ptr(), a.as_ptr(), nb) }
            },
            dot_q6_k: |w, a| {
                let nb = check(w, a, 210, 292);
                // SAFETY: as above.
                unsafe { dot_q6_k(w.as_ptr(), a.as_ptr(), nb) }
            },
            dot_f32w: |w, x| {
                assert!(w.len() >= 4 * x.len());
                // SAFETY: as above; w holds x.len() f32.
                unsafe { dot_f32_ptr(w.as_ptr() as *const f32, x.as_ptr(), x.len()) }
            },
            dot_f16w: |w, x| {
                assert!(w.len() >= 2 * x.len());
                // SAFETY: as above; w holds x.len() f16.
                unsafe { dot_f16_ptr(w.as_ptr() as *const u16, x.as_ptr(), x.len()) }
            },
            dot_f32: |a, b| {
                let n = a.len().min(b.len());
                // SAFETY: as above.
                unsafe { dot_f32_ptr(a.as_ptr(), b.as_ptr(), n) }
            },
            dot_f16: |k, x| {
                let n = k.len().min(x.len());
                // SAFETY: as above.
                unsafe { dot_f16_ptr(k.as_ptr(), x.as_ptr(), n) }
            },
            axpy_f16: |y, a, x| {
                let n = y.len().min(x.len());
                // SAFETY: as above.
                unsafe { axpy_f16(y.as_mut_ptr(), a, x.as_ptr(), n) }
            },
            quantize_q8_0: |x, out| {
                let nb = x.len() / QK;
                assert!(out.len() >= nb * 34);
                // SAFETY: as above; nb blocks of x and of out.
                unsafe { quantize_q8(x.as_ptr(), out.as_mut_ptr(), nb, false) }
            },
            quantize_q8_1: |x, out| {
                let nb = x.len() / QK;
                assert!(out.len() >= nb * 36);
                // SAFETY: as above.
                unsafe { quantize_q8(x.as_ptr(), out.as_mut_ptr(), nb, true) }
            },
            quantize_q8_k: |x, out| {
                let nb = x.len() / QK_K;
                assert!(out.len() >= nb * 292);
                // SAFETY: as above.
                unsafe { quantize_q8_k(x.as_ptr(), out.as_mut_ptr(), nb) }
            },
            gemm: Some(super::super::avx2_tiles::kernels()),
        }
    }

    /// Largest |x| of 8 lanes (exact: max does not round).
    #[inline(always)]
    unsafe fn hmax_ps(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }

    /// 32 i32 lanes (4 vectors, values in -127..=127) -> 32 bytes in order.
    #[inline(always)]
    unsafe fn pack_i8(q: [__m256i; 4]) -> __m256i {
        let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// Q8_0 (or, with `q8_1`, Q8_1) blocks as `kernels::quantize_q8_0/1` make them: `q = rne(x * (127/amax))`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8(x: *const f32, out: *mut u8, nb: usize, q8_1: bool) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let ob = if q8_1 { 36 } else { 34 };
        for ib in 0..nb {
            let (xb, o) = (x.add(ib * QK), out.add(ib * ob));
            let v = [0, 1, 2, 3].map(|i| _mm256_loadu_ps(xb.add(8 * i)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let amax = hmax_ps(m);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            // cvtps rounds to nearest even (the default MXCSR mode Rust never changes)
            let q = v.map(|vi| _mm256_cvtps_epi32(_mm256_mul_ps(vi, id)));
            let qs = if q8_1 { 4 } else { 2 };
            _mm256_storeu_si256(o.add(qs) as *mut __m256i, pack_i8(q));
            (o as *mut u16).write_unaligned(f16::from_f32(d).to_bits());
            if q8_1 {
                let sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
                (o.add(2) as *mut u16).write_unaligned(f16::from_f32(d * sum as f32).to_bits());
            }
        }
    }

    /// Q8_K blocks as ggml's reference quantizer makes them (`quant::BlockQ8K::quantize`): the scale comes
    /// from the first element of largest magnitude, `q = min(rne(x * -127/max), 127)`, bsums of 16.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8_k(x: *const f32, out: *mut u8, nb: usize) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for ib in 0..nb {
            let (xb, o) = (x.add(ib * QK_K), out.add(ib * 292));
            let mut m = _mm256_setzero_ps();
            for i in 0..QK_K / 8 {
                m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb.add(8 * i)), abs_mask));
            }
            let amax = hmax_ps(m);
            if amax == 0.0 {
                std::ptr::write_bytes(o, 0, 292);
                continue;
            }
            let first = (0..QK_K).find(|&i| (*xb.add(i)).abs() == amax).expect("amax is some |x|");
            let iscale = -127.0 / *xb.add(first);
            let sv = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for g in 0..QK_K / 32 {
                let q = [0, 1, 2, 3].map(|i| {
                    let v = _mm256_mul_ps(sv, _mm256_loadu_ps(xb.add(32 * g + 8 * i)));
                    _mm256_min_epi32(_mm256_cvtps_epi32(v), top)
                });
                _mm256_storeu_si256(o.add(4 + 32 * g) as *mut __m256i, pack_i8(q));
                // bsums of the two 16-element groups
                let s0 = hsum_i32(_mm256_add_epi32(q[0], q[1]));
                let s1 = hsum_i32(_mm256_add_epi32(q[2], q[3]));
                (o.add(260 + 4 * g) as *mut i16).write_unaligned(s0 as i16);
                (o.add(262 + 4 * g) as *mut i16).write_unaligned(s1 as i16);
            }
            (o as *mut f32).write_unaligned(1.0 / iscale);
        }
    }

    /// Number of whole blocks, after checking both rows hold the same number of them.
    #[inline]
    fn check(w: &[u8], a: &[u8], wb: usize, ab: usize) -> usize {
        let nb = w.len() / wb;
        assert!(
            w.len() == nb * wb && a.len() >= nb * ab,
            "dot: rows of {} and {} bytes do not match",
            w.len(),
            a.len()
        );
        nb
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Q4_0,
        Q4_1,
        Q5_0,
        Q8_0,
    }

    fn legacy(w: &[u8], a: &[u8], wb: usize, ab: usize, kind: Kind) -> f32 {
        let nb = check(w, a, wb, ab);
        // SAFETY: table() is only built after feature detection; lengths checked above.
        unsafe { legacy_dot(w.as_ptr(), a.as_ptr(), nb, wb, ab, kind) }
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Sum of products of signed bytes, as 8 i32 lanes (each lane: 4 adjacent products).
    #[inline(always)]
    unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256i {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
    }

    /// Unsigned bytes (< 128) times signed bytes, as 8 i32 lanes.
    #[inline(always)]
    unsafe fn mul_sum_u8_i8(x: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }

    /// 16 packed bytes -> 32 nibbles: low nibbles in bytes 0..16, high nibbles in bytes 16..32.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    /// 32 bits -> 32 bytes, 0xFF where the bit is set.
    #[inline(always)]
    unsafe fn bytes_from_bits(bits: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
        let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
        _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit_mask), _mm256_set1_epi64x(-1))
    }

    /// The 8 i32 partial sums of one 32-weight block.
    #[inline(always)]
    unsafe fn block_sums(x: *const u8, y: *const u8, kind: Kind) -> __m256i {
        match kind {
            Kind::Q4_0 => {
                let q = _mm256_sub_epi8(nibbles(x.add(2)), _mm256_set1_epi8(8));
                mul_sum_i8(q, _mm256_loadu_si256(y.add(2) as *const __m256i))
            }
            Kind::Q4_1 => mul_sum_u8_i8(nibbles(x.add(4)), _mm256_loadu_si256(y.add(4) as *const __m256i)),
            Kind::Q5_0 => {
                // q - 16 = nibble | (bit 4 clear ? 0xF0 : 0) read as i8.
                let qh = (x.add(2) as *const u32).read_unaligned();
                let hi = _mm256_andnot_si256(bytes_from_bits(qh), _mm256_set1_epi8(0xf0u8 as i8));
                let q = _mm256_or_si256(nibbles(x.add(6)), hi);
                mul_sum_i8(q, _mm256_loadu_si256(y.add(2) as *const __m256i))
            }
            Kind::Q8_0 => mul_sum_i8(
                _mm256_loadu_si256(x.add(2) as *const __m256i),
                _mm256_loadu_si256(y.add(2) as *const __m256i),
            ),
        }
    }

    /// Horizontal sums of 4 vectors of 8 i32 lanes: [sum(p0), sum(p1), sum(p2), sum(p3)] (exact).
    #[inline(always)]
    unsafe fn hsum4_i32(p0: __m256i, p1: __m256i, p2: __m256i, p3: __m256i) -> __m128i {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
    }

    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
        _mm_cvtsi128_si32(s)
    }

    /// Four f16 values at `p + k * stride + off`, as f32.
    #[inline(always)]
    unsafe fn f16x4(p: *const u8, stride: usize, off: usize) -> __m128 {
        let h = |k: usize| (p.add(k * stride + off) as *const u16).read_unaligned() as i16;
        _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn legacy_dot(w: *const u8, a: *const u8, nb: usize, wb: usize, ab: usize, kind: Kind) -> f32 {
        let mut acc = _mm_setzero_ps();
        let mut ib = 0;
        while ib + 4 <= nb {
            let (x, y) = (w.add(ib * wb), a.add(ib * ab));
            let s = hsum4_i32(
                block_sums(x, y, kind),
                block_sums(x.add(wb), y.add(ab), kind),
                block_sums(x.add(2 * wb), y.add(2 * ab), kind),
                block_sums(x.add(3 * wb), y.add(3 * ab), kind),
            );
            let dd = _mm_mul_ps(f16x4(x, wb, 0), f16x4(y, ab, 0));
            let mut t = _mm_mul_ps(dd, _mm_cvtepi32_ps(s));
            if kind == Kind::Q4_1 {
                t = _mm_add_ps(t, _mm_mul_ps(f16x4(x, wb, 2), f16x4(y, ab, 2)));
            }
            acc = _mm_add_ps(acc, t);
            ib += 4;
        }
        let mut lanes = [0.0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), acc);
        while ib < nb {
            let (x, y) = (w.add(ib * wb), a.add(ib * ab));
            let sumi = hsum_i32(block_sums(x, y, kind));
            let mut t = (load_f16(x) * load_f16(y)) * sumi as f32;
            if kind == Kind::Q4_1 {
                t += load_f16(x.add(2)) * load_f16(y.add(2));
            }
            lanes[ib % 4] += t;
            ib += 1;
        }
        reduce4(lanes)
    }

    /// Scale and min (6 bits each) of sub-block `j` of a Q4_K block (`s` = its 12 scale bytes).
    #[inline(always)]
    unsafe fn scale_min_k4(j: usize, s: *const u8) -> (i32, i32) {
        let b = |i: usize| *s.add(i) as i32;
        if j < 4 {
            (b(j) & 63, b(j + 4) & 63)
        } else {
            ((b(j + 4) & 0x0f) | ((b(j - 4) >> 6) << 4), (b(j + 4) >> 4) | ((b(j) >> 6) << 4))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_k(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let mask = _mm256_set1_epi8(0x0f);
        let mut sumf = 0.0f32;
        for ib in 0..nb {
            let (x, y) = (w.add(ib * 144), a.add(ib * 292));
            let mut msum = 0i32;
            let mut sumv = _mm256_setzero_si256();
            for g in 0..4 {
                let (sc_lo, m_lo) = scale_min_k4(2 * g, x.add(4));
                let (sc_hi, m_hi) = scale_min_k4(2 * g + 1, x.add(4));
                let bs = |k: usize| (y.add(260 + 2 * k) as *const i16).read_unaligned() as i32;
                msum += m_lo * (bs(4 * g) + bs(4 * g + 1)) + m_hi * (bs(4 * g + 2) + bs(4 * g + 3));
                let q4 = _mm256_loadu_si256(x.add(16 + 32 * g) as *const __m256i);
                let lo = _mm256_and_si256(q4, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), mask);
                let a_lo = _mm256_loadu_si256(y.add(4 + 64 * g) as *const __m256i);
                let a_hi = _mm256_loadu_si256(y.add(4 + 64 * g + 32) as *const __m256i);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_set1_epi16(sc_lo as i16));
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), _mm256_set1_epi16(sc_hi as i16));
                sumv = _mm256_add_epi32(sumv, _mm256_add_epi32(p_lo, p_hi));
            }
            let isum = hsum_i32(sumv);
            let yd = (y as *const f32).read_unaligned();
            let d = load_f16(x) * yd;
            let dmin = load_f16(x.add(2)) * yd;
            sumf += d * isum as f32 - dmin * msum as f32;
        }
        sumf
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6_k(w: *const u8, a: *const u8, nb: usize) -> f32 {
        let m4 = _mm256_set1_epi8(0x0f);
        let m2 = _mm256_set1_epi8(0x03);
        let k32 = _mm256_set1_epi8(32);
        let mut sumf = 0.0f32;
        for ib in 0..nb {
            let (x, y) = (w.add(ib * 210), a.add(ib * 292));
            let mut sumv = _mm256_setzero_si256();
            for n in 0..2 {
                let ql_a = _mm256_loadu_si256(x.add(64 * n) as *const __m256i);
                let ql_b = _mm256_loadu_si256(x.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(x.add(128 + 32 * n) as *const __m256i);
                let lows = [
                    _mm256_and_si256(ql_a, m4),
                    _mm256_and_si256(ql_b, m4),
                    _mm256_and_si256(_mm256_srli_epi16(ql_a, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(ql_b, 4), m4),
                ];
                let highs = [
                    _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4),
                ];
                for k in 0..4 {
                    let q = _mm256_or_si256(lows[k], highs[k]);
                    let av = _mm256_loadu_si256(y.add(4 + 128 * n + 32 * k) as *const __m256i);
                    // (q - 32) . a = q . a - 32 * sum(a), in i16 pairs
                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, av), _mm256_maddubs_epi16(k32, av));
                    let s0 = *x.add(192 + 8 * n + 2 * k) as i8 as i16;
                    let s1 = *x.add(192 + 8 * n + 2 * k + 1) as i8 as i16;
                    let sc = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                    sumv = _mm256_add_epi32(sumv, _mm256_madd_epi16(p, sc));
                }
            }
            let isum = hsum_i32(sumv);
            sumf += (load_f16(x.add(208)) * (y as *const f32).read_unaligned()) * isum as f32;
        }
        sumf
    }

    #[inline(always)]
    unsafe fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32_ptr(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, r) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.add(i + 8 * k));
                *r = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.add(i + 8 * k)), *r);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += *a.add(i) * *b.add(i);
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16_ptr(k: *const u16, x: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, r) in acc.iter_mut().enumerate() {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i + 8 * j) as *const __m128i));
                *r = _mm256_fmadd_ps(kv, _mm256_loadu_ps(x.add(i + 8 * j)), *r);
            }
            i += 32;
        }
        while i + 8 <= n {
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(x.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            let h = k.add(i).read_unaligned();
            s += _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))) * *x.add(i);
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_f16(y: *mut f32, a: f32, x: *const u16, n: usize) {
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.add(i) as *const __m128i));
            _mm256_storeu_ps(y.add(i), _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(y.add(i))));
            i += 8;
        }
        while i < n {
            let h = x.add(i).read_unaligned();
            *y.add(i) += a * _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
            i += 1;
        }
    }
}
