//! AVX2 tile kernels: the AVX-512 design of `avx512.rs` on 8-lane vectors, for CPUs without AVX-512.
//!
//! ```text
//! a 16-row tile = two halves of 8 rows; per half and weight block b, in a per-thread scratch:
//!   W[i]  [8 rows x 4 bytes] = codes of elements 4i..4i+4 (Q8_0: |w| and w, for the sign trick)
//!   scales                   f32 per row (and sub-block scales as i16 pairs / i32, Q4_K min pairs)
//! per token t: sumi = aux[t][b] + vpmaddwd(sum of vpmaddubsw(W[i], broadcast(a_t[4i..4i+4])), 1)
//! ```
//! `vpmaddubsw` saturates its i16 pair sums, so the i16 partial sums are grouped by what the codes allow:
//! 8 groups for 4-bit codes (8 * 2 * 15 * 127 < 2^15), 4 for Q5_0 (31), 2 for Q6_K (63), and Q8_0 goes
//! one group at a time through `|w| * sign(a, w)` (2 * 128 * 127 < 2^15). Every lane then runs the scalar
//! kernel's float sequence, so each output equals the scalar dot bit for bit, as in `avx512.rs`.
//!
//! Safety: reached only through the AVX2 table, built after `is_x86_feature_detected!` confirmed avx2,
//! fma and f16c; the safe wrapper checks every slice length before the unchecked loads.

#[cfg(target_arch = "x86_64")]
pub(super) use imp::kernels;

#[cfg(target_arch = "x86_64")]
// Per-token register arrays (dp[t], isum[t], ...) are indexed in step with each other: index loops read best.
#[allow(clippy::needless_range_loop)]
mod imp {
    use core::arch::x86_64::*;

    use super::super::kernels::{GemmKernels, QActs, Scratch};

    /// The tile kernels (for the AVX2 table only: see the module's safety note).
    pub(in super::super) fn kernels() -> GemmKernels {
        GemmKernels {
            q4_0: gemm::<Q4_0>,
            q4_1: gemm::<Q4_1>,
            q5_0: gemm::<Q5_0>,
            q8_0: gemm::<Q8_0>,
            q4_k: gemm::<Q4K>,
            q6_k: gemm::<Q6K>,
            // one token goes faster through the per-row dots than through a scratch round trip
            min_tokens: |_| 2,
            pack: &[],
        }
    }

    /// Tokens per register tile.
    const T_MAX: usize = 4;

    trait Tile {
        const WB: usize;
        const AB: usize;
        const SB: usize;
        const AUX: usize;
        /// 8-row loads per block (each advances the prefetch).
        const LOADS: usize;
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch);
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out);
    }

    /// Byte offsets of a half tile's rows from `w`.
    struct Offsets {
        at: [usize; 8],
    }

    /// Where token t's 8 lanes go: `p + t * stride`, lanes set in `mask` only.
    struct Out {
        p: *mut f32,
        stride: usize,
        mask: __m256i,
    }

    impl Out {
        #[inline(always)]
        unsafe fn store(&self, t: usize, v: __m256) {
            _mm256_maskstore_ps(self.p.add(t * self.stride), self.mask, v)
        }
    }

    struct Acts<const T: usize> {
        bytes: [*const u8; T],
        d: [*const f32; T],
        aux: [*const i32; T],
    }

    /// The next rows' bytes, a few cache lines per 8-row load (see avx512.rs).
    struct Prefetch {
        at: *const u8,
        end: *const u8,
        step: usize,
    }

    impl Prefetch {
        #[inline(always)]
        unsafe fn step(&mut self) {
            let mut n = 0;
            while n < self.step && self.at < self.end {
                _mm_prefetch::<_MM_HINT_T0>(self.at as *const i8);
                self.at = self.at.wrapping_add(64);
                n += 64;
            }
        }
    }

    /// # Safety
    /// See [`GemmFn`](super::super::kernels::GemmFn).
    unsafe fn gemm<K: Tile>(
        w: &[u8],
        row_bytes: usize,
        acts: &QActs<'_>,
        scratch: &mut Scratch,
        out: *mut f32,
        out_stride: usize,
    ) {
        let n = w.len() / row_bytes.max(1);
        let nb = row_bytes / K::WB;
        assert!((1..=16).contains(&n) && n * row_bytes == w.len() && nb * K::WB == row_bytes, "gemm: bad tile");
        assert!(acts.fit(nb, K::AB, K::AUX), "gemm: activations do not match the weights");
        let scr = scratch.get(nb * K::SB).as_mut_ptr();
        for r0 in (0..n).step_by(8) {
            // SAFETY: as avx512.rs: rows < n and blocks < nb of `w`, activations checked above, the
            // scratch holds nb * SB bytes, stores masked to the rows of this half.
            unsafe { half::<K>(w.as_ptr(), row_bytes, r0, (n - r0).min(8), nb, acts, scr, out, out_stride) };
        }
    }

    /// Rows `r0..r0 + m` (m <= 8) of the tile at `w` times every token.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half<K: Tile>(
        w: *const u8,
        row_bytes: usize,
        r0: usize,
        m: usize,
        nb: usize,
        acts: &QActs<'_>,
        scr: *mut u8,
        out: *mut f32,
        out_stride: usize,
    ) {
        let offs = Offsets { at: std::array::from_fn(|r| (r0 + r.min(m - 1)) * row_bytes) };
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(m as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        decode_all::<K>(w, 8 * row_bytes, r0 * row_bytes, &offs, nb, scr);
        let nt = acts.n_tok;
        let mut t0 = 0;
        while t0 < nt {
            let o = Out { p: out.add(t0 * out_stride + r0), stride: out_stride, mask };
            match (nt - t0).min(T_MAX) {
                4 => compute::<K, 4>(scr, nb, acts, t0, &o),
                3 => compute::<K, 3>(scr, nb, acts, t0, &o),
                2 => compute::<K, 2>(scr, nb, acts, t0, &o),
                _ => compute::<K, 1>(scr, nb, acts, t0, &o),
            }
            t0 += T_MAX;
        }
    }

    /// Decodes every block of the half tile starting `first` bytes into `w`, prefetching the next
    /// `n_bytes` (8 rows) after it.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_all<K: Tile>(w: *const u8, n_bytes: usize, first: usize, offs: &Offsets, nb: usize, scr: *mut u8) {
        let at = w.wrapping_add(first + n_bytes);
        let step = n_bytes.div_ceil(nb * K::LOADS).next_multiple_of(64);
        let mut pf = Prefetch { at, end: at.wrapping_add(n_bytes), step };
        for b in 0..nb {
            K::decode(w.add(b * K::WB), offs, scr.add(b * K::SB), &mut pf);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn compute<K: Tile, const T: usize>(scr: *const u8, nb: usize, acts: &QActs<'_>, t0: usize, out: &Out) {
        let mut a = Acts::<T> { bytes: [std::ptr::null(); T], d: [std::ptr::null(); T], aux: [std::ptr::null(); T] };
        for t in 0..T {
            a.bytes[t] = acts.bytes.as_ptr().add((t0 + t) * acts.row_bytes);
            a.d[t] = acts.d.as_ptr().add((t0 + t) * nb);
            a.aux[t] = acts.aux.as_ptr().add((t0 + t) * nb * K::AUX);
        }
        K::compute::<T>(scr, nb, &a, out);
    }

    // ---- helpers ----

    #[inline(always)]
    unsafe fn splat_i32(p: *const u8) -> __m256i {
        _mm256_set1_epi32((p as *const i32).read_unaligned())
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_load_si256(p as *const __m256i)
    }

    #[inline(always)]
    unsafe fn store(p: *mut u8, v: __m256i) {
        _mm256_store_si256(p as *mut __m256i, v)
    }

    #[inline(always)]
    unsafe fn row16(base: *const u8, offs: &Offsets, r: usize, off: usize) -> __m128i {
        _mm_loadu_si128(base.add(offs.at[r] + off) as *const __m128i)
    }

    /// 16 bytes at `base + offs[r] + off` of each row r -> 4 vectors: `out[k]` lane r = dword k of row r.
    #[inline(always)]
    unsafe fn transpose8x4(base: *const u8, offs: &Offsets, off: usize, pf: &mut Prefetch) -> [__m256i; 4] {
        pf.step();
        // z_i: 128-bit lane L = row i + 4L
        let z0 =
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(row16(base, offs, 0, off)), row16(base, offs, 4, off));
        let z1 =
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(row16(base, offs, 1, off)), row16(base, offs, 5, off));
        let z2 =
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(row16(base, offs, 2, off)), row16(base, offs, 6, off));
        let z3 =
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(row16(base, offs, 3, off)), row16(base, offs, 7, off));
        let a0 = _mm256_unpacklo_epi32(z0, z1);
        let a1 = _mm256_unpackhi_epi32(z0, z1);
        let a2 = _mm256_unpacklo_epi32(z2, z3);
        let a3 = _mm256_unpackhi_epi32(z2, z3);
        [
            _mm256_unpacklo_epi64(a0, a2),
            _mm256_unpackhi_epi64(a0, a2),
            _mm256_unpacklo_epi64(a1, a3),
            _mm256_unpackhi_epi64(a1, a3),
        ]
    }

    #[inline(always)]
    unsafe fn transpose8x8(base: *const u8, offs: &Offsets, off: usize, pf: &mut Prefetch) -> [__m256i; 8] {
        let x = transpose8x4(base, offs, off, pf);
        let y = transpose8x4(base, offs, off + 16, pf);
        [x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]]
    }

    /// The low (or, with `HIGH`, high) f16 of every dword, as f32.
    #[inline(always)]
    unsafe fn f16_lanes<const HIGH: bool>(v: __m256i) -> __m256 {
        let v = if HIGH { _mm256_srli_epi32::<16>(v) } else { _mm256_and_si256(v, _mm256_set1_epi32(0xffff)) };
        _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)))
    }

    #[inline(always)]
    unsafe fn lo_nibbles(v: __m256i) -> __m256i {
        _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
    }

    #[inline(always)]
    unsafe fn hi_nibbles(v: __m256i) -> __m256i {
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), _mm256_set1_epi8(0x0f))
    }

    /// A dword of two equal i16 (a `vpmaddwd` operand that scales both halves of a pair sum).
    #[inline(always)]
    unsafe fn i16_pair(v: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32::<16>(v))
    }

    // ---- 32-weight blocks ----
    //
    // scratch block: W[0..8] (256 bytes) | d_w [8] f32 | m_w [8] f32 | (Q8_0) signed w [0..8]

    struct Q4_0;
    struct Q4_1;
    struct Q5_0;
    struct Q8_0;

    trait Legacy {
        const WB: usize;
        const AB: usize;
        const QS: usize;
        const MIN: bool;
        const LOADS: usize;
        /// Code vectors summed in i16 before one `vpmaddwd` (0: Q8_0's sign trick).
        const GROUP: usize;
        /// W[0..8] (Q8_0: signed w), d_w, m_w.
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m256i; 8], __m256, __m256);
    }

    impl<L: Legacy> Tile for L {
        const WB: usize = L::WB;
        const AB: usize = L::AB;
        const SB: usize = 320 + if L::GROUP == 0 { 256 } else { 0 };
        const AUX: usize = 1;
        const LOADS: usize = L::LOADS;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch) {
            let (w, dw, mw) = L::codes(base, offs, pf);
            for i in 0..8 {
                if L::GROUP == 0 {
                    store(dst.add(32 * i), _mm256_abs_epi8(w[i]));
                    store(dst.add(320 + 32 * i), w[i]);
                } else {
                    store(dst.add(32 * i), w[i]);
                }
            }
            _mm256_store_ps(dst.add(256) as *mut f32, dw);
            _mm256_store_ps(dst.add(288) as *mut f32, mw);
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            let z = [_mm256_setzero_ps(); T];
            let (mut acc0, mut acc1, mut acc2, mut acc3) = (z, z, z, z);
            let mut b = 0;
            while b + 4 <= nb {
                legacy_block::<L, T>(scr, b, a, &mut acc0);
                legacy_block::<L, T>(scr, b + 1, a, &mut acc1);
                legacy_block::<L, T>(scr, b + 2, a, &mut acc2);
                legacy_block::<L, T>(scr, b + 3, a, &mut acc3);
                b += 4;
            }
            for (j, acc) in [&mut acc0, &mut acc1, &mut acc2].into_iter().enumerate() {
                if b + j < nb {
                    legacy_block::<L, T>(scr, b + j, a, acc);
                }
            }
            for t in 0..T {
                out.store(t, _mm256_add_ps(_mm256_add_ps(acc0[t], acc2[t]), _mm256_add_ps(acc1[t], acc3[t])));
            }
        }
    }

    /// Block b for T tokens: `acc[t] += (d_w * d_a) * sumi [+ m_w * s_a]` (the scalar float sequence).
    #[inline(always)]
    unsafe fn legacy_block<L: Legacy, const T: usize>(scr: *const u8, b: usize, a: &Acts<T>, acc: &mut [__m256; T]) {
        let p = scr.add(b * <L as Tile>::SB);
        let ones = _mm256_set1_epi16(1);
        let mut dp = [_mm256_setzero_si256(); T];
        // the offset correction of unsigned codes (Q8_0's sign trick works on the signed weights)
        if !L::MIN && L::GROUP != 0 {
            for t in 0..T {
                dp[t] = _mm256_set1_epi32(*a.aux[t].add(b));
            }
        }
        if L::GROUP == 0 {
            for i in 0..8 {
                let (wa, ws) = (load(p.add(32 * i)), load(p.add(320 + 32 * i)));
                for t in 0..T {
                    let at = splat_i32(a.bytes[t].add(b * L::AB + L::QS + 4 * i));
                    let prod = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(at, ws));
                    dp[t] = _mm256_add_epi32(dp[t], _mm256_madd_epi16(prod, ones));
                }
            }
        } else {
            for g in (0..8).step_by(L::GROUP) {
                let mut s16 = [_mm256_setzero_si256(); T];
                for i in g..g + L::GROUP {
                    let w = load(p.add(32 * i));
                    for t in 0..T {
                        let at = splat_i32(a.bytes[t].add(b * L::AB + L::QS + 4 * i));
                        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(w, at));
                    }
                }
                for t in 0..T {
                    dp[t] = _mm256_add_epi32(dp[t], _mm256_madd_epi16(s16[t], ones));
                }
            }
        }
        let dw = _mm256_load_ps(p.add(256) as *const f32);
        let mw = _mm256_load_ps(p.add(288) as *const f32);
        for t in 0..T {
            let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d[t].add(b)));
            let mut tb = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(dp[t]));
            if L::MIN {
                let sa = _mm256_set1_ps(f32::from_bits(*a.aux[t].add(b) as u32));
                tb = _mm256_add_ps(tb, _mm256_mul_ps(mw, sa));
            }
            acc[t] = _mm256_add_ps(acc[t], tb);
        }
    }

    /// The 8 code vectors of a block of nibble pairs (byte j: elements j and j + 16).
    #[inline(always)]
    unsafe fn nibble_codes(base: *const u8, offs: &Offsets, qs: usize, pf: &mut Prefetch) -> [__m256i; 8] {
        let o = transpose8x4(base, offs, qs, pf);
        [
            lo_nibbles(o[0]),
            lo_nibbles(o[1]),
            lo_nibbles(o[2]),
            lo_nibbles(o[3]),
            hi_nibbles(o[0]),
            hi_nibbles(o[1]),
            hi_nibbles(o[2]),
            hi_nibbles(o[3]),
        ]
    }

    impl Legacy for Q4_0 {
        const WB: usize = 18;
        const AB: usize = 34;
        const QS: usize = 2;
        const MIN: bool = false;
        const LOADS: usize = 2;
        const GROUP: usize = 8;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m256i; 8], __m256, __m256) {
            let w = nibble_codes(base, offs, 2, pf);
            let dw = f16_lanes::<false>(transpose8x4(base, offs, 0, pf)[0]);
            (w, dw, dw)
        }
    }

    impl Legacy for Q4_1 {
        const WB: usize = 20;
        const AB: usize = 36;
        const QS: usize = 4;
        const MIN: bool = true;
        const LOADS: usize = 2;
        const GROUP: usize = 8;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m256i; 8], __m256, __m256) {
            let w = nibble_codes(base, offs, 4, pf);
            let dm = transpose8x4(base, offs, 0, pf)[0];
            (w, f16_lanes::<false>(dm), f16_lanes::<true>(dm))
        }
    }

    impl Legacy for Q5_0 {
        const WB: usize = 22;
        const AB: usize = 34;
        const QS: usize = 2;
        const MIN: bool = false;
        const LOADS: usize = 2;
        const GROUP: usize = 4;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m256i; 8], __m256, __m256) {
            let mut w = nibble_codes(base, offs, 6, pf);
            // bytes 0..8 = d | qh | qs[0..2]; element 4i + j has its fifth bit at bit 4i + j of qh
            let head = transpose8x4(base, offs, 0, pf);
            let qh = _mm256_or_si256(_mm256_srli_epi32::<16>(head[0]), _mm256_slli_epi32::<16>(head[1]));
            let nib = _mm256_set1_epi32(0xf);
            // 4 bits at bits 0..4 -> bit 4 of bytes 0..4 (no carries: the shifted copies do not overlap)
            let spread = _mm256_set1_epi32(0x0204_0810);
            let bit4 = _mm256_set1_epi32(0x1010_1010);
            for (i, wi) in w.iter_mut().enumerate() {
                let bits = _mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_set1_epi32(4 * i as i32)), nib);
                let hi = _mm256_and_si256(_mm256_mullo_epi32(bits, spread), bit4);
                *wi = _mm256_or_si256(*wi, hi);
            }
            let dw = f16_lanes::<false>(head[0]);
            (w, dw, dw)
        }
    }

    impl Legacy for Q8_0 {
        const WB: usize = 34;
        const AB: usize = 34;
        const QS: usize = 2;
        const MIN: bool = false;
        const LOADS: usize = 3;
        const GROUP: usize = 0;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m256i; 8], __m256, __m256) {
            let w = transpose8x8(base, offs, 2, pf);
            let dw = f16_lanes::<false>(transpose8x4(base, offs, 0, pf)[0]);
            (w, dw, dw)
        }
    }

    // ---- Q4_K ----
    //
    // scratch block: W[0..64] (sub j: W[8j..8j+8]) | sc [8] (i16 pairs) | min pairs [4] | d [8] | dmin [8]

    struct Q4K;

    const Q4K_SC: usize = 2048;
    const Q4K_MP: usize = Q4K_SC + 256;
    const Q4K_D: usize = Q4K_MP + 128;

    impl Tile for Q4K {
        const WB: usize = 144;
        const AB: usize = 292;
        const SB: usize = Q4K_D + 64;
        const AUX: usize = 4;
        const LOADS: usize = 9;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch) {
            for g in 0..4 {
                let o = transpose8x8(base, offs, 16 + 32 * g, pf);
                for (k, v) in o.into_iter().enumerate() {
                    store(dst.add(32 * (16 * g + k)), lo_nibbles(v));
                    store(dst.add(32 * (16 * g + 8 + k)), hi_nibbles(v));
                }
            }
            // bytes 0..16 = d | dmin | scales[12] = s0 | s1 | s2; kernels::get_scale_min_k4 per lane
            let [dm, s0, s1, s2] = transpose8x4(base, offs, 0, pf);
            let (m6, m4, m2) = (_mm256_set1_epi32(63), _mm256_set1_epi32(15), _mm256_set1_epi32(3));
            let mut mins = [_mm256_setzero_si256(); 8];
            for (j, min) in mins.iter_mut().enumerate() {
                let (sc, m) = if j < 4 {
                    let sh = _mm256_set1_epi32(8 * j as i32);
                    (_mm256_and_si256(_mm256_srlv_epi32(s0, sh), m6), _mm256_and_si256(_mm256_srlv_epi32(s1, sh), m6))
                } else {
                    let sh = 8 * (j as i32 - 4);
                    let (at, at4, at6) = (_mm256_set1_epi32(sh), _mm256_set1_epi32(sh + 4), _mm256_set1_epi32(sh + 6));
                    let sc_top = _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srlv_epi32(s0, at6), m2));
                    let m_top = _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srlv_epi32(s1, at6), m2));
                    (
                        _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(s2, at), m4), sc_top),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(s2, at4), m4), m_top),
                    )
                };
                store(dst.add(Q4K_SC + 32 * j), i16_pair(sc));
                *min = m;
            }
            for i in 0..4 {
                store(dst.add(Q4K_MP + 32 * i), _mm256_or_si256(mins[2 * i], _mm256_slli_epi32::<16>(mins[2 * i + 1])));
            }
            _mm256_store_ps(dst.add(Q4K_D) as *mut f32, f16_lanes::<false>(dm));
            _mm256_store_ps(dst.add(Q4K_D + 32) as *mut f32, f16_lanes::<true>(dm));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            let mut sumf = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let p = scr.add(b * Self::SB);
                let mut isum = [_mm256_setzero_si256(); T];
                for j in 0..8 {
                    // codes < 16: eight vpmaddubsw sums fit i16; the scale multiplies in vpmaddwd
                    let mut s16 = [_mm256_setzero_si256(); T];
                    for k in 0..8 {
                        let w = load(p.add(32 * (8 * j + k)));
                        for t in 0..T {
                            let at = splat_i32(a.bytes[t].add(b * Self::AB + 4 + 32 * j + 4 * k));
                            s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(w, at));
                        }
                    }
                    let sc = load(p.add(Q4K_SC + 32 * j));
                    for t in 0..T {
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(s16[t], sc));
                    }
                }
                let mut msum = [_mm256_setzero_si256(); T];
                for i in 0..4 {
                    let mp = load(p.add(Q4K_MP + 32 * i));
                    for t in 0..T {
                        let bp = _mm256_set1_epi32(*a.aux[t].add(4 * b + i));
                        msum[t] = _mm256_add_epi32(msum[t], _mm256_madd_epi16(mp, bp));
                    }
                }
                let dw = _mm256_load_ps(p.add(Q4K_D) as *const f32);
                let dmw = _mm256_load_ps(p.add(Q4K_D + 32) as *const f32);
                for t in 0..T {
                    let da = _mm256_set1_ps(*a.d[t].add(b));
                    let (d, dmin) = (_mm256_mul_ps(dw, da), _mm256_mul_ps(dmw, da));
                    let v = _mm256_sub_ps(
                        _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[t])),
                        _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(msum[t])),
                    );
                    sumf[t] = _mm256_add_ps(sumf[t], v);
                }
            }
            for (t, s) in sumf.into_iter().enumerate() {
                out.store(t, s);
            }
        }
    }

    // ---- Q6_K ----
    //
    // scratch block: W[0..64] (sub s: W[4s..4s+4]) | sc [16] (i16 pairs) | sc [16] (i32) | d [8]

    struct Q6K;

    const Q6K_SC: usize = 2048;
    const Q6K_SC32: usize = Q6K_SC + 512;
    const Q6K_D: usize = Q6K_SC32 + 512;

    impl Tile for Q6K {
        const WB: usize = 210;
        const AB: usize = 292;
        const SB: usize = Q6K_D + 32;
        const AUX: usize = 16;
        const LOADS: usize = 14;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch) {
            let m30 = _mm256_set1_epi8(0x30);
            for n in 0..2 {
                // element 128n + 32k + l: low 4 bits from ql[64n + 32(k%2) + l], high 2 from qh[32n + l] >> 2k
                let qa = transpose8x8(base, offs, 64 * n, pf);
                let qb = transpose8x8(base, offs, 64 * n + 32, pf);
                let qh = transpose8x8(base, offs, 128 + 32 * n, pf);
                for m in 0..8 {
                    let h = qh[m];
                    let codes = [
                        _mm256_or_si256(lo_nibbles(qa[m]), _mm256_and_si256(_mm256_slli_epi16::<4>(h), m30)),
                        _mm256_or_si256(lo_nibbles(qb[m]), _mm256_and_si256(_mm256_slli_epi16::<2>(h), m30)),
                        _mm256_or_si256(hi_nibbles(qa[m]), _mm256_and_si256(h, m30)),
                        _mm256_or_si256(hi_nibbles(qb[m]), _mm256_and_si256(_mm256_srli_epi16::<2>(h), m30)),
                    ];
                    for (k, v) in codes.into_iter().enumerate() {
                        store(dst.add(32 * (32 * n + 8 * k + m)), v);
                    }
                }
            }
            let s = transpose8x4(base, offs, 192, pf);
            for (g, sv) in s.into_iter().enumerate() {
                let sc = [
                    _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(sv)),
                    _mm256_srai_epi32::<24>(_mm256_slli_epi32::<16>(sv)),
                    _mm256_srai_epi32::<24>(_mm256_slli_epi32::<8>(sv)),
                    _mm256_srai_epi32::<24>(sv),
                ];
                for (i, v) in sc.into_iter().enumerate() {
                    store(dst.add(Q6K_SC + 32 * (4 * g + i)), i16_pair(v));
                    store(dst.add(Q6K_SC32 + 32 * (4 * g + i)), v);
                }
            }
            // d: the high half of the dword at 206 (bytes 194..210 end the block)
            _mm256_store_ps(dst.add(Q6K_D) as *mut f32, f16_lanes::<true>(transpose8x4(base, offs, 194, pf)[3]));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            let mut sumf = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let p = scr.add(b * Self::SB);
                let mut isum = [_mm256_setzero_si256(); T];
                for s in 0..16 {
                    let (sc, sc32) = (load(p.add(Q6K_SC + 32 * s)), load(p.add(Q6K_SC32 + 32 * s)));
                    // codes < 64: pairs of vpmaddubsw sums fit i16
                    for half in 0..2 {
                        let (w0, w1) = (load(p.add(32 * (4 * s + 2 * half))), load(p.add(32 * (4 * s + 2 * half + 1))));
                        for t in 0..T {
                            let at = a.bytes[t].add(b * Self::AB + 4 + 16 * s + 8 * half);
                            let s16 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w0, splat_i32(at)),
                                _mm256_maddubs_epi16(w1, splat_i32(at.add(4))),
                            );
                            isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(s16, sc));
                        }
                    }
                    // sc * (-32 * bsum): the code offset
                    for t in 0..T {
                        let off = _mm256_set1_epi32(*a.aux[t].add(16 * b + s));
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sc32, off));
                    }
                }
                let dw = _mm256_load_ps(p.add(Q6K_D) as *const f32);
                for t in 0..T {
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d[t].add(b)));
                    sumf[t] = _mm256_add_ps(sumf[t], _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[t])));
                }
            }
            for (t, s) in sumf.into_iter().enumerate() {
                out.store(t, s);
            }
        }
    }
}
