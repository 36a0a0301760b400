//! AVX-512 tile kernels (F, BW, VL and VNNI's `vpdpbusd`): up to 16 weight rows times a batch of
//! quantized activation rows, each weight block decoded once per tile and reused for every token.
//!
//! ```text
//! scratch, per weight block b (16 rows; row r >= n repeats row n-1, its lanes are never read back):
//!   W[i]  [16 rows x 4 bytes] u8  = weight codes u of elements 4i..4i+4 of every row (the order the
//!                                   activation block stores them in), u = w + off >= 0
//!   scales                        f32 per row (and i8/u8 sub-block scales, Q4_K min pairs)
//! per token t and block b:  dp = aux[t][b] + sum_i vpdpbusd(W[i], broadcast(a_t[4i..4i+4]))
//!                          (aux = -off * sum(a), so dp = sum(w * a) exactly: lane r = row r)
//! then every lane runs the scalar kernel's float sequence (kernels.rs module doc), so each output
//! element equals the scalar dot bit for bit.
//! ```
//! Tokens go 4 at a time (T = 4 accumulator sets in registers), so each W vector loaded from the
//! scratch feeds 4 `vpdpbusd`. The per-row dot products (`dot_*`), the float kernels and the activation
//! quantizers of this table are the AVX2 ones.
//!
//! Safety: every `#[target_feature]` function is reached only through the table [`kernels`] returns,
//! which it returns only after `is_x86_feature_detected!` confirmed every feature used here. The safe
//! wrappers check the lengths of every slice before the unchecked loads.

#[cfg(target_arch = "x86_64")]
pub(super) fn kernels() -> Option<super::Kernels> {
    let base = super::avx2::kernels()?;
    let has = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    has.then(|| imp::table(base))
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn kernels() -> Option<super::Kernels> {
    None
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::x86_64::*;

    use super::super::kernels::{GemmKernels, Isa, Kernels, QActs, Scratch};

    pub(super) fn table(base: Kernels) -> Kernels {
        Kernels {
            isa: Isa::Avx512,
            gemm: Some(GemmKernels {
                q4_0: gemm::<Q4_0>,
                q4_1: gemm::<Q4_1>,
                q5_0: gemm::<Q5_0>,
                q8_0: gemm::<Q8_0>,
                q4_k: gemm::<Q4K>,
                q6_k: gemm::<Q6K>,
            }),
            ..base
        }
    }

    /// Tokens per register tile.
    const T_MAX: usize = 4;

    /// One weight type's block decoding and per-token arithmetic.
    trait Tile {
        /// Bytes of a weight block, of an activation block, of a decoded 16-row block in the scratch.
        const WB: usize;
        const AB: usize;
        const SB: usize;
        /// `aux` values per activation block (kernels::aux_per_block).
        const AUX: usize;
        /// Decodes block `base` (= row 0's block; row r's is at `base + offs[r]`) into `dst`.
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8);
        /// Every block of T tokens: `out[t * 16 + r]`.
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out);
    }

    /// Byte offsets of a tile's rows from row 0.
    struct Offsets {
        at: [usize; 16],
    }

    /// Where token t's 16 lanes go: `p + t * stride`, lanes of `mask` only.
    struct Out {
        p: *mut f32,
        stride: usize,
        mask: u16,
    }

    impl Out {
        #[inline(always)]
        unsafe fn store(&self, t: usize, v: __m512) {
            _mm512_mask_storeu_ps(self.p.add(t * self.stride), self.mask, v)
        }
    }

    /// T activation rows: block bytes, scales and side values (kernels::QActs).
    struct Acts<const T: usize> {
        bytes: [*const u8; T],
        d: [*const f32; T],
        aux: [*const i32; T],
    }

    /// # Safety
    /// See [`GemmFn`](super::super::kernels::GemmFn): `out` rows `t * out_stride` hold `n` writable lanes.
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
        let nt = acts.n_tok;
        assert!((1..=16).contains(&n) && n * row_bytes == w.len() && nb * K::WB == row_bytes, "gemm: bad tile");
        assert!(
            acts.row_bytes == nb * K::AB
                && acts.bytes.len() >= nt * acts.row_bytes
                && acts.d.len() >= nt * nb
                && acts.aux.len() >= nt * nb * K::AUX,
            "gemm: activations do not match the weights"
        );
        let at: [usize; 16] = std::array::from_fn(|r| r.min(n - 1) * row_bytes);
        let scr = scratch.get(nb * K::SB).as_mut_ptr();
        // SAFETY: table() is only built after feature detection; every block read lies in `w` (offsets
        // of rows < n, blocks < nb), every activation read in `acts` (checked above), the scratch holds
        // nb * SB bytes; the stores are masked to the n lanes the caller vouches for.
        unsafe {
            let offs = Offsets { at };
            decode_all::<K>(w.as_ptr(), w.len(), &offs, nb, scr);
            let mut t0 = 0;
            while t0 < nt {
                let o = Out { p: out.add(t0 * out_stride), stride: out_stride, mask: ((1u32 << n) - 1) as u16 };
                match (nt - t0).min(T_MAX) {
                    4 => compute::<K, 4>(scr, nb, acts, t0, &o),
                    3 => compute::<K, 3>(scr, nb, acts, t0, &o),
                    2 => compute::<K, 2>(scr, nb, acts, t0, &o),
                    _ => compute::<K, 1>(scr, nb, acts, t0, &o),
                }
                t0 += T_MAX;
            }
        }
    }

    /// Decodes every block of the tile at `w` (`n_bytes` long) while prefetching the bytes that follow it
    /// (the next tile, as the matmul walks them): the 16 interleaved row streams of a tile defeat the
    /// hardware prefetcher, and a decode step (one token) would wait on memory latency without this.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn decode_all<K: Tile>(w: *const u8, n_bytes: usize, offs: &Offsets, nb: usize, scr: *mut u8) {
        let next = w.wrapping_add(n_bytes);
        for b in 0..nb {
            // this block's share of the next tile's cache lines; prefetching never faults, so past the
            // end of the matrix it is only wasted
            for line in (b * n_bytes / nb / 64)..((b + 1) * n_bytes / nb).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line) as *const i8);
            }
            K::decode(w.add(b * K::WB), offs, scr.add(b * K::SB));
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn compute<K: Tile, const T: usize>(scr: *const u8, nb: usize, acts: &QActs<'_>, t0: usize, out: &Out) {
        let a = Acts::<T> {
            bytes: std::array::from_fn(|t| acts.bytes.as_ptr().add((t0 + t) * acts.row_bytes)),
            d: std::array::from_fn(|t| acts.d.as_ptr().add((t0 + t) * nb)),
            aux: std::array::from_fn(|t| acts.aux.as_ptr().add((t0 + t) * nb * K::AUX)),
        };
        K::compute::<T>(scr, nb, &a, out);
    }

    // ---- shared helpers ----

    #[inline(always)]
    unsafe fn splat_i32(p: *const u8) -> __m512i {
        _mm512_set1_epi32((p as *const i32).read_unaligned())
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_load_si512(p as *const _)
    }

    #[inline(always)]
    unsafe fn store(p: *mut u8, v: __m512i) {
        _mm512_store_si512(p as *mut _, v)
    }

    /// The low (or, with `HIGH`, high) f16 of every dword, as f32.
    #[inline(always)]
    unsafe fn f16_lanes<const HIGH: bool>(v: __m512i) -> __m512 {
        let v = if HIGH { _mm512_srli_epi32::<16>(v) } else { v };
        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
    }

    /// 16 bytes at `base + offs[r] + off` of each row r -> 4 vectors: `out[k]` lane r = dword k of row r.
    #[inline(always)]
    unsafe fn transpose16x4(base: *const u8, offs: &Offsets, off: usize) -> [__m512i; 4] {
        let row = |r: usize| _mm_loadu_si128(base.add(offs.at[r] + off) as *const __m128i);
        // z_i: 128-bit lane L = row i + 4L
        let z = |i: usize| {
            let v = _mm512_castsi128_si512(row(i));
            let v = _mm512_inserti32x4::<1>(v, row(i + 4));
            let v = _mm512_inserti32x4::<2>(v, row(i + 8));
            _mm512_inserti32x4::<3>(v, row(i + 12))
        };
        let (z0, z1, z2, z3) = (z(0), z(1), z(2), z(3));
        let a0 = _mm512_unpacklo_epi32(z0, z1);
        let a1 = _mm512_unpackhi_epi32(z0, z1);
        let a2 = _mm512_unpacklo_epi32(z2, z3);
        let a3 = _mm512_unpackhi_epi32(z2, z3);
        [
            _mm512_unpacklo_epi64(a0, a2),
            _mm512_unpackhi_epi64(a0, a2),
            _mm512_unpacklo_epi64(a1, a3),
            _mm512_unpackhi_epi64(a1, a3),
        ]
    }

    #[inline(always)]
    unsafe fn lo_nibbles(v: __m512i) -> __m512i {
        _mm512_and_si512(v, _mm512_set1_epi8(0x0f))
    }

    #[inline(always)]
    unsafe fn hi_nibbles(v: __m512i) -> __m512i {
        _mm512_and_si512(_mm512_srli_epi16::<4>(v), _mm512_set1_epi8(0x0f))
    }

    // ---- 32-weight blocks: Q4_0, Q4_1, Q5_0, Q8_0 ----
    //
    // scratch block: W[0..8] (512 bytes) | d_w [16] f32 | (Q4_1) m_w [16] f32

    struct Q4_0;
    struct Q4_1;
    struct Q5_0;
    struct Q8_0;

    /// Bits 4i..4i+4 of `bits` -> bit 4 of bytes 0..4 (of each dword): Q5_0's fifth bit, by table.
    #[inline(always)]
    unsafe fn spread4(bits: __m512i) -> __m512i {
        // entry n: bit j of n at bit 8j + 4; vpermd reads only the low 4 bits of each index
        let lut = _mm512_setr_epi32(
            0x0000_0000, 0x0000_0010, 0x0000_1000, 0x0000_1010, 0x0010_0000, 0x0010_0010, 0x0010_1000, 0x0010_1010,
            0x1000_0000, 0x1000_0010, 0x1000_1000, 0x1000_1010, 0x1010_0000, 0x1010_0010, 0x1010_1000, 0x1010_1010,
        );
        _mm512_permutexvar_epi32(bits, lut)
    }

    /// The 8 code vectors of a 32-weight block of nibble pairs (16 bytes at `qs`: byte j holds
    /// elements j and j + 16).
    #[inline(always)]
    unsafe fn nibble_codes(base: *const u8, offs: &Offsets, qs: usize) -> [__m512i; 8] {
        let o = transpose16x4(base, offs, qs);
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

    impl Tile for Q4_0 {
        const WB: usize = 18;
        const AB: usize = 34;
        const SB: usize = 576;
        const AUX: usize = 1;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8) {
            let w = nibble_codes(base, offs, 2);
            for (i, v) in w.into_iter().enumerate() {
                store(dst.add(64 * i), v);
            }
            _mm512_store_ps(dst.add(512) as *mut f32, f16_lanes::<false>(transpose16x4(base, offs, 0)[0]));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            legacy::<T, false>(scr, nb, Self::SB, Self::AB, 2, a, out)
        }
    }

    impl Tile for Q4_1 {
        const WB: usize = 20;
        const AB: usize = 36;
        const SB: usize = 640;
        const AUX: usize = 1;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8) {
            let w = nibble_codes(base, offs, 4);
            for (i, v) in w.into_iter().enumerate() {
                store(dst.add(64 * i), v);
            }
            let dm = transpose16x4(base, offs, 0)[0];
            _mm512_store_ps(dst.add(512) as *mut f32, f16_lanes::<false>(dm));
            _mm512_store_ps(dst.add(576) as *mut f32, f16_lanes::<true>(dm));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            legacy::<T, true>(scr, nb, Self::SB, Self::AB, 4, a, out)
        }
    }

    impl Tile for Q5_0 {
        const WB: usize = 22;
        const AB: usize = 34;
        const SB: usize = 576;
        const AUX: usize = 1;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8) {
            let w = nibble_codes(base, offs, 6);
            // bytes 0..8 = d | qh | qs[0..2]
            let head = transpose16x4(base, offs, 0);
            let qh = _mm512_or_si512(_mm512_srli_epi32::<16>(head[0]), _mm512_slli_epi32::<16>(head[1]));
            // element 4i + j (i < 4) has its fifth bit at bit 4i + j of qh; element 16 + 4i + j at 16 + 4i + j
            let hi = [
                spread4(qh),
                spread4(_mm512_srli_epi32::<4>(qh)),
                spread4(_mm512_srli_epi32::<8>(qh)),
                spread4(_mm512_srli_epi32::<12>(qh)),
                spread4(_mm512_srli_epi32::<16>(qh)),
                spread4(_mm512_srli_epi32::<20>(qh)),
                spread4(_mm512_srli_epi32::<24>(qh)),
                spread4(_mm512_srli_epi32::<28>(qh)),
            ];
            for i in 0..8 {
                store(dst.add(64 * i), _mm512_or_si512(w[i], hi[i]));
            }
            _mm512_store_ps(dst.add(512) as *mut f32, f16_lanes::<false>(head[0]));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            legacy::<T, false>(scr, nb, Self::SB, Self::AB, 2, a, out)
        }
    }

    impl Tile for Q8_0 {
        const WB: usize = 34;
        const AB: usize = 34;
        const SB: usize = 576;
        const AUX: usize = 1;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8) {
            let flip = _mm512_set1_epi8(-128);
            let lo = transpose16x4(base, offs, 2);
            let hi = transpose16x4(base, offs, 18);
            for i in 0..4 {
                store(dst.add(64 * i), _mm512_xor_si512(lo[i], flip));
                store(dst.add(64 * (i + 4)), _mm512_xor_si512(hi[i], flip));
            }
            _mm512_store_ps(dst.add(512) as *mut f32, f16_lanes::<false>(transpose16x4(base, offs, 0)[0]));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            legacy::<T, false>(scr, nb, Self::SB, Self::AB, 2, a, out)
        }
    }

    /// One 32-weight block for T tokens: `acc[t] += (d_w * d_a) * sumi [+ m_w * s_a]`.
    #[inline(always)]
    unsafe fn legacy_block<const T: usize, const MIN: bool>(
        p: *const u8,
        b: usize,
        ab: usize,
        qs: usize,
        a: &Acts<T>,
        acc: &mut [__m512; T],
    ) {
        let mut dp: [__m512i; T] =
            std::array::from_fn(|t| if MIN { _mm512_setzero_si512() } else { _mm512_set1_epi32(*a.aux[t].add(b)) });
        for i in 0..8 {
            let w = load(p.add(64 * i));
            for t in 0..T {
                dp[t] = _mm512_dpbusd_epi32(dp[t], w, splat_i32(a.bytes[t].add(b * ab + qs + 4 * i)));
            }
        }
        let dw = _mm512_load_ps(p.add(512) as *const f32);
        for t in 0..T {
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d[t].add(b)));
            let mut tb = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(dp[t]));
            if MIN {
                let mw = _mm512_load_ps(p.add(576) as *const f32);
                let sa = _mm512_set1_ps(f32::from_bits(*a.aux[t].add(b) as u32));
                tb = _mm512_add_ps(tb, _mm512_mul_ps(mw, sa));
            }
            acc[t] = _mm512_add_ps(acc[t], tb);
        }
    }

    /// Every 32-weight block, accumulated as `acc[b % 4]` and reduced `(acc0 + acc2) + (acc1 + acc3)`.
    #[inline(always)]
    unsafe fn legacy<const T: usize, const MIN: bool>(
        scr: *const u8,
        nb: usize,
        sb: usize,
        ab: usize,
        qs: usize,
        a: &Acts<T>,
        out: &Out,
    ) {
        let z = [_mm512_setzero_ps(); T];
        let (mut acc0, mut acc1, mut acc2, mut acc3) = (z, z, z, z);
        let mut b = 0;
        while b + 4 <= nb {
            legacy_block::<T, MIN>(scr.add(b * sb), b, ab, qs, a, &mut acc0);
            legacy_block::<T, MIN>(scr.add((b + 1) * sb), b + 1, ab, qs, a, &mut acc1);
            legacy_block::<T, MIN>(scr.add((b + 2) * sb), b + 2, ab, qs, a, &mut acc2);
            legacy_block::<T, MIN>(scr.add((b + 3) * sb), b + 3, ab, qs, a, &mut acc3);
            b += 4;
        }
        for (j, acc) in [&mut acc0, &mut acc1, &mut acc2].into_iter().enumerate() {
            if b + j < nb {
                legacy_block::<T, MIN>(scr.add((b + j) * sb), b + j, ab, qs, a, acc);
            }
        }
        for t in 0..T {
            let s = _mm512_add_ps(_mm512_add_ps(acc0[t], acc2[t]), _mm512_add_ps(acc1[t], acc3[t]));
            out.store(t, s);
        }
    }

    // ---- Q4_K: 256 weights, 8 sub-blocks of 32 with 6-bit scales and mins ----
    //
    // scratch block: W[0..64] (sub j: W[8j..8j+8]) | sc [8 x 16] u8 | min pairs [4] x (16 x 2 i16) |
    //                d [16] f32 | dmin [16] f32

    struct Q4K;

    const Q4K_SC: usize = 4096;
    const Q4K_MP: usize = Q4K_SC + 128;
    const Q4K_D: usize = Q4K_MP + 256;

    impl Tile for Q4K {
        const WB: usize = 144;
        const AB: usize = 292;
        const SB: usize = Q4K_D + 128;
        const AUX: usize = 4;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8) {
            for g in 0..4 {
                let lo = transpose16x4(base, offs, 16 + 32 * g);
                let hi = transpose16x4(base, offs, 32 + 32 * g);
                for (k, v) in lo.into_iter().chain(hi).enumerate() {
                    store(dst.add(64 * (16 * g + k)), lo_nibbles(v));
                    store(dst.add(64 * (16 * g + 8 + k)), hi_nibbles(v));
                }
            }
            // bytes 0..16 = d | dmin | scales[12] = s0 | s1 | s2 (dwords); kernels::get_scale_min_k4 per lane
            let [dm, s0, s1, s2] = transpose16x4(base, offs, 0);
            let m6 = _mm512_set1_epi32(63);
            let m4 = _mm512_set1_epi32(15);
            let m2 = _mm512_set1_epi32(3);
            let byte = |v: __m512i, shift: u32| _mm512_srlv_epi32(v, _mm512_set1_epi32(shift as i32));
            let mut mins = [_mm512_setzero_si512(); 8];
            for j in 0..8 {
                let (sc, m) = if j < 4 {
                    let sh = 8 * j as u32;
                    (_mm512_and_si512(byte(s0, sh), m6), _mm512_and_si512(byte(s1, sh), m6))
                } else {
                    let sh = 8 * (j - 4) as u32;
                    let sc_hi = _mm512_slli_epi32::<4>(_mm512_and_si512(byte(s0, sh + 6), m2));
                    let m_hi = _mm512_slli_epi32::<4>(_mm512_and_si512(byte(s1, sh + 6), m2));
                    (
                        _mm512_or_si512(_mm512_and_si512(byte(s2, sh), m4), sc_hi),
                        _mm512_or_si512(_mm512_and_si512(byte(s2, sh + 4), m4), m_hi),
                    )
                };
                _mm_store_si128(dst.add(Q4K_SC + 16 * j) as *mut __m128i, _mm512_cvtepi32_epi8(sc));
                mins[j] = m;
            }
            for i in 0..4 {
                let pair = _mm512_or_si512(mins[2 * i], _mm512_slli_epi32::<16>(mins[2 * i + 1]));
                store(dst.add(Q4K_MP + 64 * i), pair);
            }
            _mm512_store_ps(dst.add(Q4K_D) as *mut f32, f16_lanes::<false>(dm));
            _mm512_store_ps(dst.add(Q4K_D + 64) as *mut f32, f16_lanes::<true>(dm));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            let mut sumf = [_mm512_setzero_ps(); T];
            for b in 0..nb {
                let p = scr.add(b * Self::SB);
                let mut isum = [_mm512_setzero_si512(); T];
                for j in 0..8 {
                    let mut dp = [_mm512_setzero_si512(); T];
                    for k in 0..8 {
                        let w = load(p.add(64 * (8 * j + k)));
                        for t in 0..T {
                            let at = a.bytes[t].add(b * Self::AB + 4 + 32 * j + 4 * k);
                            dp[t] = _mm512_dpbusd_epi32(dp[t], w, splat_i32(at));
                        }
                    }
                    let sc = _mm512_cvtepu8_epi32(_mm_load_si128(p.add(Q4K_SC + 16 * j) as *const __m128i));
                    for t in 0..T {
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dp[t], sc));
                    }
                }
                let mut msum = [_mm512_setzero_si512(); T];
                for i in 0..4 {
                    let mp = load(p.add(Q4K_MP + 64 * i));
                    for t in 0..T {
                        msum[t] = _mm512_dpwssd_epi32(msum[t], mp, _mm512_set1_epi32(*a.aux[t].add(4 * b + i)));
                    }
                }
                let dw = _mm512_load_ps(p.add(Q4K_D) as *const f32);
                let dmw = _mm512_load_ps(p.add(Q4K_D + 64) as *const f32);
                for t in 0..T {
                    let da = _mm512_set1_ps(*a.d[t].add(b));
                    let d = _mm512_mul_ps(dw, da);
                    let dmin = _mm512_mul_ps(dmw, da);
                    let v = _mm512_sub_ps(
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[t])),
                        _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(msum[t])),
                    );
                    sumf[t] = _mm512_add_ps(sumf[t], v);
                }
            }
            for (t, s) in sumf.into_iter().enumerate() {
                out.store(t, s);
            }
        }
    }

    // ---- Q6_K: 256 weights, 16 sub-blocks of 16 with i8 scales, codes 0..64 (value = code - 32) ----
    //
    // scratch block: W[0..64] (sub s: W[4s..4s+4]) | sc [16 x 16] i8 | d [16] f32

    struct Q6K;

    const Q6K_SC: usize = 4096;
    const Q6K_D: usize = Q6K_SC + 256;

    impl Tile for Q6K {
        const WB: usize = 210;
        const AB: usize = 292;
        const SB: usize = Q6K_D + 64;
        const AUX: usize = 16;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8) {
            let m30 = _mm512_set1_epi8(0x30);
            for n in 0..2 {
                // element 128n + 32k + l: low 4 bits from ql[64n + 32(k%2) + l] (k < 2: low nibble),
                // high 2 bits from qh[32n + l] >> 2k
                let q = |off: usize| {
                    let (x, y) = (transpose16x4(base, offs, off), transpose16x4(base, offs, off + 16));
                    [x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]]
                };
                let (qa, qb, qh) = (q(64 * n), q(64 * n + 32), q(128 + 32 * n));
                for m in 0..8 {
                    let h = qh[m];
                    let codes = [
                        _mm512_or_si512(lo_nibbles(qa[m]), _mm512_and_si512(_mm512_slli_epi16::<4>(h), m30)),
                        _mm512_or_si512(lo_nibbles(qb[m]), _mm512_and_si512(_mm512_slli_epi16::<2>(h), m30)),
                        _mm512_or_si512(hi_nibbles(qa[m]), _mm512_and_si512(h, m30)),
                        _mm512_or_si512(hi_nibbles(qb[m]), _mm512_and_si512(_mm512_srli_epi16::<2>(h), m30)),
                    ];
                    for (k, v) in codes.into_iter().enumerate() {
                        store(dst.add(64 * (32 * n + 8 * k + m)), v);
                    }
                }
            }
            let s = transpose16x4(base, offs, 192);
            for (g, sv) in s.into_iter().enumerate() {
                let sc = [
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(sv)),
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(sv)),
                    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(sv)),
                    _mm512_srai_epi32::<24>(sv),
                ];
                for (i, v) in sc.into_iter().enumerate() {
                    _mm_store_si128(dst.add(Q6K_SC + 16 * (4 * g + i)) as *mut __m128i, _mm512_cvtepi32_epi8(v));
                }
            }
            // d is the f16 at 208: the high half of the dword at 206 (bytes 194..210 end the block)
            _mm512_store_ps(dst.add(Q6K_D) as *mut f32, f16_lanes::<true>(transpose16x4(base, offs, 194)[3]));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            let mut sumf = [_mm512_setzero_ps(); T];
            for b in 0..nb {
                let p = scr.add(b * Self::SB);
                let mut isum = [_mm512_setzero_si512(); T];
                for s in 0..16 {
                    let mut dp: [__m512i; T] = std::array::from_fn(|t| _mm512_set1_epi32(*a.aux[t].add(16 * b + s)));
                    for k in 0..4 {
                        let w = load(p.add(64 * (4 * s + k)));
                        for t in 0..T {
                            let at = a.bytes[t].add(b * Self::AB + 4 + 16 * s + 4 * k);
                            dp[t] = _mm512_dpbusd_epi32(dp[t], w, splat_i32(at));
                        }
                    }
                    let sc = _mm512_cvtepi8_epi32(_mm_load_si128(p.add(Q6K_SC + 16 * s) as *const __m128i));
                    for t in 0..T {
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dp[t], sc));
                    }
                }
                let dw = _mm512_load_ps(p.add(Q6K_D) as *const f32);
                for t in 0..T {
                    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d[t].add(b)));
                    sumf[t] = _mm512_add_ps(sumf[t], _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[t])));
                }
            }
            for (t, s) in sumf.into_iter().enumerate() {
                out.store(t, s);
            }
        }
    }
}
