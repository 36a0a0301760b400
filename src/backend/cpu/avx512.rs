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
//! scratch feeds 4 `vpdpbusd`. One token (a decode step) skips the scratch for the 32-weight types: each
//! block is decoded into registers and used at once. Either way the tile prefetches the next one (the
//! 16 interleaved row streams defeat the hardware prefetcher). The per-row dot products (`dot_*`), the
//! float kernels and the activation quantizers of this table are the AVX2 ones.
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
// Per-token register arrays (dp[t], isum[t], ...) are indexed in step with each other: index loops read best.
#[allow(clippy::needless_range_loop)]
mod imp {
    use core::arch::x86_64::*;
    use std::marker::PhantomData;

    use super::super::kernels::{GemmKernels, Isa, Kernels, PackKernels, QActs, Scratch};

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
                // one token: the 32-weight types decode into registers (Tile::FUSED), faster than the
                // per-row dots; the k-quants' per-row dots (AVX2) beat a scratch round trip 1.5-1.9x
                // (backend_cpu `throughput`, 2 threads: Q4_K 22.4 vs 14.8 GB/s, Q6_K 24.0 vs 12.9)
                min_tokens: |ty| if matches!(ty, crate::dtype::GgmlType::Q4K | crate::dtype::GgmlType::Q6K) { 2 } else { 1 },
                pack: &pack::PACK,
            }),
            ..base
        }
    }

    mod pack;

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
        /// 16-row loads ([`transpose16x4`]) per block (each advances the prefetch).
        const LOADS: usize;
        /// Decodes block `base` (= row 0's block; row r's is at `base + offs[r]`) into `dst`.
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch);
        /// Every block of T tokens: `out[t * 16 + r]`.
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out);
        /// Whether [`Tile::gemv`] exists: one token, each block decoded into registers and used at once
        /// (no scratch round trip; the decode step's path).
        const FUSED: bool = false;
        /// The tile `w` (`n_bytes`) times one token, prefetching the next tile as [`decode_all`] does.
        unsafe fn gemv(_w: *const u8, _n_bytes: usize, _offs: &Offsets, _nb: usize, _a: &Acts<1>, _out: &Out) {
            unreachable!("no fused kernel")
        }
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

    impl<const T: usize> Acts<T> {
        /// Rows `t0..t0 + T` of `acts`, against `nb` weight blocks with `aux` side values each.
        ///
        /// # Safety
        /// Those rows exist in `acts` (they are only pointed at here).
        #[inline(always)]
        unsafe fn rows(acts: &QActs<'_>, t0: usize, nb: usize, aux: usize) -> Acts<T> {
            Acts {
                bytes: std::array::from_fn(|t| acts.bytes.as_ptr().add((t0 + t) * acts.row_bytes)),
                d: std::array::from_fn(|t| acts.d.as_ptr().add((t0 + t) * nb)),
                aux: std::array::from_fn(|t| acts.aux.as_ptr().add((t0 + t) * nb * aux)),
            }
        }
    }

    /// A tile's rows (1..=16) and blocks of `wb` bytes, and each row's offset (rows past the tile repeat
    /// its last one, whose lanes are masked off at the store). Panics (`what: bad tile`) on a tile that
    /// is not whole rows of whole blocks.
    fn tile_shape(w: &[u8], row_bytes: usize, wb: usize, what: &str) -> (usize, usize, Offsets) {
        let n = w.len() / row_bytes.max(1);
        let nb = row_bytes / wb;
        assert!((1..=16).contains(&n) && n * row_bytes == w.len() && nb * wb == row_bytes, "{what}: bad tile");
        (n, nb, Offsets { at: std::array::from_fn(|r| r.min(n - 1) * row_bytes) })
    }

    /// One register tile of `T` tokens of some layout of weight blocks: rows `t0..t0 + T` of `acts`
    /// into `out` ([`every_token`] walks the batch with it).
    trait TokenTile {
        /// # Safety
        /// The layout and `acts` match (the caller checked), `out` is writable for the tile's lanes.
        unsafe fn tokens<const T: usize>(&self, acts: &QActs<'_>, t0: usize, out: &Out);
    }

    /// Blocks decoded into the scratch layout ([`Tile::decode`]): the tile kernels' and Q8_0's packed.
    struct Decoded<K> {
        scr: *const u8,
        nb: usize,
        _k: PhantomData<K>,
    }

    impl<K: Tile> TokenTile for Decoded<K> {
        unsafe fn tokens<const T: usize>(&self, acts: &QActs<'_>, t0: usize, out: &Out) {
            compute::<K, T>(self.scr, self.nb, acts, t0, out)
        }
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
        let (n, nb, offs) = tile_shape(w, row_bytes, K::WB, "gemm");
        assert!(acts.fit(nb, K::AB, K::AUX), "gemm: activations do not match the weights");
        let scr = scratch.get(nb * K::SB).as_mut_ptr();
        // SAFETY: table() is only built after feature detection; every block read lies in `w` (offsets
        // of rows < n, blocks < nb), every activation read in `acts` (checked above), the scratch holds
        // nb * SB bytes; the stores are masked to the n lanes the caller vouches for.
        unsafe {
            if acts.n_tok == 1 && K::FUSED {
                let o = Out { p: out, stride: out_stride, mask: ((1u32 << n) - 1) as u16 };
                return gemv::<K>(w.as_ptr(), w.len(), &offs, nb, acts, &o);
            }
            decode_all::<K>(w.as_ptr(), w.len(), &offs, nb, scr);
            every_token(&Decoded::<K> { scr, nb, _k: PhantomData }, n, acts, out, out_stride);
        }
    }

    /// Every token of `acts`, T_MAX at a time, through `tile`.
    ///
    /// # Safety
    /// `tile`'s blocks and `acts` match ([`QActs::fit`]), and `out` is as [`gemm`] requires for `n` rows.
    unsafe fn every_token<G: TokenTile>(tile: &G, n: usize, acts: &QActs<'_>, out: *mut f32, out_stride: usize) {
        let nt = acts.n_tok;
        let mut t0 = 0;
        while t0 < nt {
            let o = Out { p: out.add(t0 * out_stride), stride: out_stride, mask: ((1u32 << n) - 1) as u16 };
            match (nt - t0).min(T_MAX) {
                4 => tile.tokens::<4>(acts, t0, &o),
                3 => tile.tokens::<3>(acts, t0, &o),
                2 => tile.tokens::<2>(acts, t0, &o),
                _ => tile.tokens::<1>(acts, t0, &o),
            }
            t0 += T_MAX;
        }
    }

    /// Decodes every block of the tile at `w` (`n_bytes` long) while prefetching the bytes that follow it
    /// (the next tile, as the matmul walks them): the 16 interleaved row streams of a tile defeat the
    /// hardware prefetcher, and a decode step (one token) would wait on memory latency without this.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn decode_all<K: Tile>(w: *const u8, n_bytes: usize, offs: &Offsets, nb: usize, scr: *mut u8) {
        let mut pf = Prefetch::after(w, n_bytes, nb * K::LOADS);
        for b in 0..nb {
            K::decode(w.add(b * K::WB), offs, scr.add(b * K::SB), &mut pf);
        }
    }

    /// A run of cache lines to prefetch, `step` bytes at a time; prefetching never faults, so past the
    /// end of the matrix it is only wasted.
    struct Prefetch {
        at: *const u8,
        end: *const u8,
        step: usize,
    }

    impl Prefetch {
        /// The `n_bytes` after the tile at `w`, over `steps` steps: a few lines per 16-row load group
        /// (a burst of dozens of prefetches would fill the L1 miss queue and stall the decode behind it).
        #[inline(always)]
        fn after(w: *const u8, n_bytes: usize, steps: usize) -> Prefetch {
            let at = w.wrapping_add(n_bytes);
            Prefetch { at, end: at.wrapping_add(n_bytes), step: n_bytes.div_ceil(steps).next_multiple_of(64) }
        }

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

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn gemv<K: Tile>(w: *const u8, n_bytes: usize, offs: &Offsets, nb: usize, acts: &QActs<'_>, out: &Out) {
        let a = Acts::<1> { bytes: [acts.bytes.as_ptr()], d: [acts.d.as_ptr()], aux: [acts.aux.as_ptr()] };
        K::gemv(w, n_bytes, offs, nb, &a, out);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn compute<K: Tile, const T: usize>(scr: *const u8, nb: usize, acts: &QActs<'_>, t0: usize, out: &Out) {
        K::compute::<T>(scr, nb, &Acts::<T>::rows(acts, t0, nb, K::AUX), out);
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
    unsafe fn transpose16x4(base: *const u8, offs: &Offsets, off: usize, pf: &mut Prefetch) -> [__m512i; 4] {
        pf.step();
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

    /// As [`transpose16x4`] for 32 bytes: `out[k]` lane r = dword k (0..8) of row r.
    #[inline(always)]
    unsafe fn transpose16x8(base: *const u8, offs: &Offsets, off: usize, pf: &mut Prefetch) -> [__m512i; 8] {
        let x = transpose16x4(base, offs, off, pf);
        let y = transpose16x4(base, offs, off + 16, pf);
        [x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]]
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
            0x0000_0000,
            0x0000_0010,
            0x0000_1000,
            0x0000_1010,
            0x0010_0000,
            0x0010_0010,
            0x0010_1000,
            0x0010_1010,
            0x1000_0000,
            0x1000_0010,
            0x1000_1000,
            0x1000_1010,
            0x1010_0000,
            0x1010_0010,
            0x1010_1000,
            0x1010_1010,
        );
        _mm512_permutexvar_epi32(bits, lut)
    }

    /// The 8 code vectors of a 32-weight block of nibble pairs (16 bytes at `qs`: byte j holds
    /// elements j and j + 16).
    #[inline(always)]
    unsafe fn nibble_codes(base: *const u8, offs: &Offsets, qs: usize, pf: &mut Prefetch) -> [__m512i; 8] {
        split_nibbles(transpose16x4(base, offs, qs, pf))
    }

    /// 4 vectors of nibble pairs -> the 8 code vectors (low nibbles, then high).
    #[inline(always)]
    unsafe fn split_nibbles(o: [__m512i; 4]) -> [__m512i; 8] {
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

    /// A 32-weight block type: its code vectors and scales, in registers.
    trait Legacy {
        const WB: usize;
        const AB: usize;
        /// Offset of the codes in an activation block (Q8_0: 2, Q8_1: 4).
        const QS: usize;
        /// Whether blocks carry a min (`+ m_w * s_a`).
        const MIN: bool;
        const LOADS: usize;
        /// W[0..8], d_w and (MIN) m_w of block `base`, one lane per row.
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m512i; 8], __m512, __m512);
    }

    impl<L: Legacy> Tile for L {
        const WB: usize = L::WB;
        const AB: usize = L::AB;
        const SB: usize = if L::MIN { 640 } else { 576 };
        const AUX: usize = 1;
        const LOADS: usize = L::LOADS;
        const FUSED: bool = true;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch) {
            let (w, dw, mw) = L::codes(base, offs, pf);
            for (i, v) in w.into_iter().enumerate() {
                store(dst.add(64 * i), v);
            }
            _mm512_store_ps(dst.add(512) as *mut f32, dw);
            if L::MIN {
                _mm512_store_ps(dst.add(576) as *mut f32, mw);
            }
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            legacy::<T, _>(nb, a, out, &mut FromScratch::<L> { scr, _l: PhantomData })
        }
        #[inline(always)]
        unsafe fn gemv(w: *const u8, n_bytes: usize, offs: &Offsets, nb: usize, a: &Acts<1>, out: &Out) {
            let pf = Prefetch::after(w, n_bytes, nb * L::LOADS);
            legacy::<1, _>(nb, a, out, &mut Fused::<L> { w, offs, pf, _l: PhantomData })
        }
    }

    /// Where [`legacy`] gets block b's codes (closures would not inherit the target features, and
    /// their intrinsics would become calls).
    trait Blocks<const T: usize> {
        /// `acc[t] += t_b` for block `b` (legacy_tail).
        unsafe fn block(&mut self, b: usize, a: &Acts<T>, acc: &mut [__m512; T]);
    }

    /// Decoded blocks in the scratch (Tile::decode's layout).
    struct FromScratch<L> {
        scr: *const u8,
        _l: PhantomData<L>,
    }

    impl<L: Legacy, const T: usize> Blocks<T> for FromScratch<L> {
        #[inline(always)]
        unsafe fn block(&mut self, b: usize, a: &Acts<T>, acc: &mut [__m512; T]) {
            let p = self.scr.add(b * <L as Tile>::SB);
            let mut dp = legacy_init::<T>(L::MIN, b, a);
            for i in 0..8 {
                let w = load(p.add(64 * i));
                for t in 0..T {
                    dp[t] = _mm512_dpbusd_epi32(dp[t], w, splat_i32(a.bytes[t].add(b * L::AB + L::QS + 4 * i)));
                }
            }
            let dw = _mm512_load_ps(p.add(512) as *const f32);
            let mw = if L::MIN { _mm512_load_ps(p.add(576) as *const f32) } else { dw };
            legacy_tail::<T>(dp, dw, mw, L::MIN, b, a, acc);
        }
    }

    /// Blocks decoded straight from the weights into registers (one token).
    struct Fused<'a, L> {
        w: *const u8,
        offs: &'a Offsets,
        pf: Prefetch,
        _l: PhantomData<L>,
    }

    impl<L: Legacy> Blocks<1> for Fused<'_, L> {
        #[inline(always)]
        unsafe fn block(&mut self, b: usize, a: &Acts<1>, acc: &mut [__m512; 1]) {
            let (c, dw, mw) = L::codes(self.w.add(b * L::WB), self.offs, &mut self.pf);
            let mut dp = legacy_init::<1>(L::MIN, b, a);
            for (i, ci) in c.into_iter().enumerate() {
                dp[0] = _mm512_dpbusd_epi32(dp[0], ci, splat_i32(a.bytes[0].add(b * L::AB + L::QS + 4 * i)));
            }
            legacy_tail::<1>(dp, dw, mw, L::MIN, b, a, acc);
        }
    }

    impl Legacy for Q4_0 {
        const WB: usize = 18;
        const AB: usize = 34;
        const QS: usize = 2;
        const MIN: bool = false;
        const LOADS: usize = 2;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m512i; 8], __m512, __m512) {
            let w = nibble_codes(base, offs, 2, pf);
            let dw = f16_lanes::<false>(transpose16x4(base, offs, 0, pf)[0]);
            (w, dw, dw)
        }
    }

    impl Legacy for Q4_1 {
        const WB: usize = 20;
        const AB: usize = 36;
        const QS: usize = 4;
        const MIN: bool = true;
        const LOADS: usize = 2;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m512i; 8], __m512, __m512) {
            let w = nibble_codes(base, offs, 4, pf);
            let dm = transpose16x4(base, offs, 0, pf)[0];
            (w, f16_lanes::<false>(dm), f16_lanes::<true>(dm))
        }
    }

    impl Legacy for Q5_0 {
        const WB: usize = 22;
        const AB: usize = 34;
        const QS: usize = 2;
        const MIN: bool = false;
        const LOADS: usize = 2;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m512i; 8], __m512, __m512) {
            let w = nibble_codes(base, offs, 6, pf);
            let head = transpose16x4(base, offs, 0, pf);
            q5_0_codes(w, [head[0], head[1]])
        }
    }

    /// Q5_0's codes from its low nibbles `w` and the first two head dwords of each row (bytes 0..8 =
    /// d | qh | qs[0..2]), and its scale.
    #[inline(always)]
    unsafe fn q5_0_codes(w: [__m512i; 8], head: [__m512i; 2]) -> ([__m512i; 8], __m512, __m512) {
        {
            let qh = _mm512_or_si512(_mm512_srli_epi32::<16>(head[0]), _mm512_slli_epi32::<16>(head[1]));
            // element 4i + j has its fifth bit at bit 4i + j of qh
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
            let dw = f16_lanes::<false>(head[0]);
            let mut codes = w;
            for i in 0..8 {
                codes[i] = _mm512_or_si512(w[i], hi[i]);
            }
            (codes, dw, dw)
        }
    }

    impl Legacy for Q8_0 {
        const WB: usize = 34;
        const AB: usize = 34;
        const QS: usize = 2;
        const MIN: bool = false;
        const LOADS: usize = 3;
        #[inline(always)]
        unsafe fn codes(base: *const u8, offs: &Offsets, pf: &mut Prefetch) -> ([__m512i; 8], __m512, __m512) {
            let flip = _mm512_set1_epi8(-128);
            let lo = transpose16x4(base, offs, 2, pf);
            let hi = transpose16x4(base, offs, 18, pf);
            let dw = f16_lanes::<false>(transpose16x4(base, offs, 0, pf)[0]);
            let mut codes = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
            for c in codes.iter_mut() {
                *c = _mm512_xor_si512(*c, flip);
            }
            (codes, dw, dw)
        }
    }

    /// Each token's integer sum starts at its offset correction (none with a min: Q4_1 codes are values).
    #[inline(always)]
    unsafe fn legacy_init<const T: usize>(min: bool, b: usize, a: &Acts<T>) -> [__m512i; T] {
        let mut dp = [_mm512_setzero_si512(); T];
        if !min {
            for t in 0..T {
                dp[t] = _mm512_set1_epi32(*a.aux[t].add(b));
            }
        }
        dp
    }

    /// `acc[t] += (d_w * d_a) * sumi [+ m_w * s_a]`: the scalar kernel's float sequence, lane by lane.
    #[inline(always)]
    unsafe fn legacy_tail<const T: usize>(
        dp: [__m512i; T],
        dw: __m512,
        mw: __m512,
        min: bool,
        b: usize,
        a: &Acts<T>,
        acc: &mut [__m512; T],
    ) {
        for t in 0..T {
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d[t].add(b)));
            let mut tb = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(dp[t]));
            if min {
                let sa = _mm512_set1_ps(f32::from_bits(*a.aux[t].add(b) as u32));
                tb = _mm512_add_ps(tb, _mm512_mul_ps(mw, sa));
            }
            acc[t] = _mm512_add_ps(acc[t], tb);
        }
    }

    /// Every 32-weight block from `src`, accumulated as `acc[b % 4]` and reduced
    /// `(acc0 + acc2) + (acc1 + acc3)`.
    #[inline(always)]
    unsafe fn legacy<const T: usize, S: Blocks<T>>(nb: usize, a: &Acts<T>, out: &Out, src: &mut S) {
        let z = [_mm512_setzero_ps(); T];
        let (mut acc0, mut acc1, mut acc2, mut acc3) = (z, z, z, z);
        let mut b = 0;
        while b + 4 <= nb {
            src.block(b, a, &mut acc0);
            src.block(b + 1, a, &mut acc1);
            src.block(b + 2, a, &mut acc2);
            src.block(b + 3, a, &mut acc3);
            b += 4;
        }
        for (j, acc) in [&mut acc0, &mut acc1, &mut acc2].into_iter().enumerate() {
            if b + j < nb {
                src.block(b + j, a, acc);
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
        const LOADS: usize = 9;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch) {
            for g in 0..4 {
                let lo = transpose16x4(base, offs, 16 + 32 * g, pf);
                let hi = transpose16x4(base, offs, 32 + 32 * g, pf);
                for (k, v) in lo.into_iter().chain(hi).enumerate() {
                    store(dst.add(64 * (16 * g + k)), lo_nibbles(v));
                    store(dst.add(64 * (16 * g + 8 + k)), hi_nibbles(v));
                }
            }
            // bytes 0..16 = d | dmin | scales[12] = s0 | s1 | s2 (dwords); kernels::get_scale_min_k4 per lane
            let [dm, s0, s1, s2] = transpose16x4(base, offs, 0, pf);
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
        const LOADS: usize = 14;
        #[inline(always)]
        unsafe fn decode(base: *const u8, offs: &Offsets, dst: *mut u8, pf: &mut Prefetch) {
            let m30 = _mm512_set1_epi8(0x30);
            for n in 0..2 {
                // element 128n + 32k + l: low 4 bits from ql[64n + 32(k%2) + l] (k < 2: low nibble),
                // high 2 bits from qh[32n + l] >> 2k
                let qa = transpose16x8(base, offs, 64 * n, pf);
                let qb = transpose16x8(base, offs, 64 * n + 32, pf);
                let qh = transpose16x8(base, offs, 128 + 32 * n, pf);
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
            let s = transpose16x4(base, offs, 192, pf);
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
            _mm512_store_ps(dst.add(Q6K_D) as *mut f32, f16_lanes::<true>(transpose16x4(base, offs, 194, pf)[3]));
        }
        #[inline(always)]
        unsafe fn compute<const T: usize>(scr: *const u8, nb: usize, a: &Acts<T>, out: &Out) {
            let mut sumf = [_mm512_setzero_ps(); T];
            for b in 0..nb {
                let p = scr.add(b * Self::SB);
                let mut isum = [_mm512_setzero_si512(); T];
                for s in 0..16 {
                    let mut dp = [_mm512_setzero_si512(); T];
                    for t in 0..T {
                        dp[t] = _mm512_set1_epi32(*a.aux[t].add(16 * b + s));
                    }
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
