//! NEON kernels for aarch64, the SIMD twins of the scalar ones in `kernels.rs` (same results bit for bit
//! for the quantized dots; see that module's doc for the order of float operations they share).
//!
//! NEON is part of the aarch64 baseline, so this table exists on every aarch64 CPU and on no other
//! architecture ([`kernels`] returns `None` there). The integer block sums run in vectors, exactly:
//! with `sdot` where the CPU has the dot-product extension (detected once, when the table is built),
//! else with `vmull_s8` + `vpadalq_s16` (i8 x i8 products widened to i16, pairwise-added into i32); the
//! per-block float combination is the scalar sequence itself, so the dots equal the scalar ones bit for
//! bit either way. The float dots (f32, f16) and `axpy_f16` run avx2.rs's order of float operations
//! (4 sums of 8 lanes by FMA, each in a pair of 4-lane registers, reduced by its tree): they agree with
//! the scalar ones to f32 rounding and with the AVX2 table's bit for bit, and so do the attention scores
//! that follow them (`attention_simd`). The activation quantizers are the scalar ones (they must be bit-equal anyway);
//! there are no tile kernels (`gemm: None`: matmul runs the per-row dots).
//!
//! Safety: block pointers point into whole blocks (`chunks_exact` of the rows, as in the scalar dots,
//! which also take as many blocks as both rows hold) and float pointers into slices of at least the `n`
//! elements read; all loads are byte loads (`vld1q_u8`) or loads from `&[f32]`/`&[u16]`, so no
//! alignment is assumed beyond the slice's own.

// Little-endian only: the kernels read f16/f32/u32 fields with byte loads reinterpreted in place (what
// `from_le_bytes` means on a little-endian CPU); big-endian aarch64 gets no NEON table.
#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
pub(super) fn kernels() -> Option<super::Kernels> {
    Some(imp::table())
}

#[cfg(not(all(target_arch = "aarch64", target_endian = "little")))]
pub(super) fn kernels() -> Option<super::Kernels> {
    None
}

/// The table's name: "neon+dotprod" where [`kernels`] picks the `sdot` sums, else "neon".
pub(super) fn name() -> &'static str {
    #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
    if imp::has_dotprod() {
        return "neon+dotprod";
    }
    "neon"
}

#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
pub(super) mod imp {
    use core::arch::aarch64::*;

    use super::super::kernels::{f16_at, f32_at, i16_at, legacy_dot, Isa, Kernels};
    use crate::quant::{get_scale_min_k4, K_SCALE_SIZE};

    /// The table, with `sdot` for the integer sums where the CPU has the dot-product extension (detected
    /// once, here).
    pub(super) fn table() -> Kernels {
        if has_dotprod() {
            // SAFETY: the dot-product extension was just detected.
            unsafe { table_with::<Sdot>() }
        } else {
            // SAFETY: Mull uses baseline NEON only.
            unsafe { table_with::<Mull>() }
        }
    }

    /// Whether the CPU has the dot-product extension (one detection, shared by the table and its name).
    pub(super) fn has_dotprod() -> bool {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }

    /// # Safety
    /// The CPU runs `D`'s instructions.
    unsafe fn table_with<D: Dot>() -> Kernels {
        Kernels {
            isa: Isa::Neon,
            // SAFETY (these six): table_with::<D> is only called where D runs; they read whole blocks only.
            dot_q4_0: |w, a| unsafe { legacy::<D>(w, a, Kind::Q4_0) },
            dot_q4_1: |w, a| unsafe { legacy::<D>(w, a, Kind::Q4_1) },
            dot_q5_0: |w, a| unsafe { legacy::<D>(w, a, Kind::Q5_0) },
            dot_q8_0: |w, a| unsafe { legacy::<D>(w, a, Kind::Q8_0) },
            dot_q4_k: |w, a| unsafe { dot_q4_k::<D>(w, a) },
            dot_q6_k: |w, a| unsafe { dot_q6_k::<D>(w, a) },
            // the float kernels run over as many elements as both rows hold, as the scalar ones do
            dot_f32w: |w, x| {
                let n = x.len().min(w.len() / 4);
                // SAFETY: NEON is baseline on aarch64; w holds n f32 (read as bytes), x n f32.
                unsafe { dot_f32_ptr(w.as_ptr(), x.as_ptr(), n) }
            },
            dot_f16w: |w, x| {
                let n = x.len().min(w.len() / 2);
                // SAFETY: as above; w holds n f16 (read as bytes).
                unsafe { dot_f16_ptr(w.as_ptr(), x.as_ptr(), n) }
            },
            dot_f32: |a, b| {
                let n = a.len().min(b.len());
                // SAFETY: as above; both hold n f32.
                unsafe { dot_f32_ptr(a.as_ptr() as *const u8, b.as_ptr(), n) }
            },
            dot_f16: |k, x| {
                let n = k.len().min(x.len());
                // SAFETY: as above.
                unsafe { dot_f16_ptr(k.as_ptr() as *const u8, x.as_ptr(), n) }
            },
            axpy_f16: |y, a, x| {
                let n = y.len().min(x.len());
                // SAFETY: as above.
                unsafe { axpy_f16(y.as_mut_ptr(), a, x.as_ptr() as *const u8, n) }
            },
            // quantizers (must be bit-equal to the scalar ones) and tiles: the scalar table's
            ..Kernels::scalar()
        }
    }

    // ---- integer helpers (all exact) ----

    /// `acc` + the 16 products `x[i] * y[i]`, summed into 4 i32 lanes (which products go to which lane
    /// differs between the implementations; the total, all that is used, is exact in both).
    pub(super) trait Dot {
        /// # Safety
        /// The CPU runs the implementation's instructions.
        unsafe fn dot(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t;
    }

    /// Baseline NEON: products widened to i16 (`vmull_s8`), pairs added into i32 (`vpadalq_s16`).
    pub(super) struct Mull;

    impl Dot for Mull {
        #[inline(always)]
        unsafe fn dot(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
            let lo = vmull_s8(vget_low_s8(x), vget_low_s8(y));
            let hi = vmull_high_s8(x, y);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }

    /// The dot-product extension (`sdot`, ARMv8.2+, optional; Apple M1, Graviton 2, Cortex-A76 and later).
    /// Inline assembly because `vdotq_s32` is not stable Rust yet.
    pub(super) struct Sdot;

    impl Dot for Sdot {
        #[inline(always)]
        unsafe fn dot(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
            let mut acc = acc;
            core::arch::asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {x:v}.16b, {y:v}.16b",
                acc = inout(vreg) acc,
                x = in(vreg) x,
                y = in(vreg) y,
                options(pure, nomem, nostack, preserves_flags)
            );
            acc
        }
    }

    #[inline(always)]
    unsafe fn load_i8(p: *const u8) -> int8x16_t {
        vreinterpretq_s8_u8(vld1q_u8(p))
    }

    /// 16 packed bytes -> (low nibbles, high nibbles), 0..=15 each.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        let v = vld1q_u8(p);
        (vandq_u8(v, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(v))
    }

    /// 16 bits -> 16 bytes, 0x10 where the bit is set (bit i -> byte i).
    #[inline(always)]
    unsafe fn bit4_from_bits(bits: u32) -> uint8x16_t {
        const MASK: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        let bytes = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        vandq_u8(vtstq_u8(bytes, vld1q_u8(MASK.as_ptr())), vdupq_n_u8(0x10))
    }

    // ---- 32-weight blocks ----

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Q4_0,
        Q4_1,
        Q5_0,
        Q8_0,
    }

    impl Kind {
        /// Bytes of a weight block and of its activation block (Q8_0, or Q8_1 for Q4_1): all that
        /// [`block_sum`] may read.
        fn block_bytes(self) -> (usize, usize) {
            match self {
                Kind::Q4_0 => (18, 34),
                Kind::Q4_1 => (20, 36),
                Kind::Q5_0 => (22, 34),
                Kind::Q8_0 => (34, 34),
            }
        }
    }

    /// The integer sum of one block (`x`: weight block, `y`: activation block, of `kind.block_bytes()`).
    #[inline(always)]
    unsafe fn block_sum<D: Dot>(x: *const u8, y: *const u8, kind: Kind) -> i32 {
        let z = vdupq_n_s32(0);
        let s = match kind {
            Kind::Q4_0 => {
                let (lo, hi) = nibbles(x.add(2));
                let off = vdupq_n_s8(8);
                let lo = vsubq_s8(vreinterpretq_s8_u8(lo), off);
                let hi = vsubq_s8(vreinterpretq_s8_u8(hi), off);
                D::dot(D::dot(z, lo, load_i8(y.add(2))), hi, load_i8(y.add(18)))
            }
            Kind::Q4_1 => {
                let (lo, hi) = nibbles(x.add(4));
                let s = D::dot(z, vreinterpretq_s8_u8(lo), load_i8(y.add(4)));
                D::dot(s, vreinterpretq_s8_u8(hi), load_i8(y.add(20)))
            }
            Kind::Q5_0 => {
                // weight j: nibble | bit j of qh << 4; weight j + 16: high nibble | bit j + 16 << 4; minus 16
                let qh = u32::from_le_bytes((x.add(2) as *const [u8; 4]).read_unaligned());
                let (lo, hi) = nibbles(x.add(6));
                let off = vdupq_n_s8(16);
                let lo = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, bit4_from_bits(qh))), off);
                let hi = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(hi, bit4_from_bits(qh >> 16))), off);
                D::dot(D::dot(z, lo, load_i8(y.add(2))), hi, load_i8(y.add(18)))
            }
            Kind::Q8_0 => {
                let s = D::dot(z, load_i8(x.add(2)), load_i8(y.add(2)));
                D::dot(s, load_i8(x.add(18)), load_i8(y.add(18)))
            }
        };
        vaddvq_s32(s)
    }

    /// # Safety
    /// The CPU runs `D`'s instructions.
    unsafe fn legacy<D: Dot>(w: &[u8], a: &[u8], kind: Kind) -> f32 {
        let (wb, ab) = kind.block_bytes();
        // the scalar block loop and reduction, with the block's integer sum from the vectors
        legacy_dot(w, a, wb, ab, |x, y| {
            // SAFETY: D runs (the caller's promise); x and y are whole blocks of `kind`.
            let sumi = unsafe { block_sum::<D>(x.as_ptr(), y.as_ptr(), kind) };
            let t = (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32;
            if kind == Kind::Q4_1 {
                t + f16_at(x, 2) * f16_at(y, 2)
            } else {
                t
            }
        })
    }

    // ---- 256-weight super-blocks (Q8_K: d f32 @0, qs @4, bsums i16 @260) ----

    /// # Safety
    /// The CPU runs `D`'s instructions.
    unsafe fn dot_q4_k<D: Dot>(w: &[u8], a: &[u8]) -> f32 {
        let mut sumf = 0.0f32;
        for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
            let scales: &[u8; K_SCALE_SIZE] = x[4..16].try_into().unwrap();
            let (xp, yp) = (x.as_ptr(), y.as_ptr());
            let mut msum = 0i32;
            let mut sumv = vdupq_n_s32(0);
            for g in 0..4 {
                // sub-blocks 2g (low nibbles) and 2g + 1 (high nibbles) of qs[32g..32g + 32]
                let (sc_lo, m_lo) = get_scale_min_k4(2 * g, scales);
                let (sc_hi, m_hi) = get_scale_min_k4(2 * g + 1, scales);
                let bs = |k: usize| i16_at(y, 260 + 2 * k);
                msum += m_lo as i32 * (bs(4 * g) + bs(4 * g + 1)) + m_hi as i32 * (bs(4 * g + 2) + bs(4 * g + 3));
                let (lo0, hi0) = nibbles(xp.add(16 + 32 * g));
                let (lo1, hi1) = nibbles(xp.add(16 + 32 * g + 16));
                let ya = yp.add(4 + 64 * g);
                let z = vdupq_n_s32(0);
                let s_lo = D::dot(
                    D::dot(z, vreinterpretq_s8_u8(lo0), load_i8(ya)),
                    vreinterpretq_s8_u8(lo1),
                    load_i8(ya.add(16)),
                );
                let s_hi = D::dot(
                    D::dot(z, vreinterpretq_s8_u8(hi0), load_i8(ya.add(32))),
                    vreinterpretq_s8_u8(hi1),
                    load_i8(ya.add(48)),
                );
                sumv = vmlaq_n_s32(sumv, s_lo, sc_lo as i32);
                sumv = vmlaq_n_s32(sumv, s_hi, sc_hi as i32);
            }
            let isum = vaddvq_s32(sumv);
            let d = f16_at(x, 0) * f32_at(y, 0);
            let dmin = f16_at(x, 2) * f32_at(y, 0);
            sumf += d * isum as f32 - dmin * msum as f32;
        }
        sumf
    }

    /// # Safety
    /// The CPU runs `D`'s instructions.
    unsafe fn dot_q6_k<D: Dot>(w: &[u8], a: &[u8]) -> f32 {
        let m4 = vdupq_n_u8(0x0f);
        let m2 = vdupq_n_u8(0x03);
        let k32 = vdupq_n_s8(32);
        let mut sumf = 0.0f32;
        for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
            let (xp, yp) = (x.as_ptr(), y.as_ptr());
            let mut sumv = vdupq_n_s32(0);
            // weight 128n + 32k + l: low 4 bits from ql[64n + 32(k % 2) + l] (k < 2: low nibble, else
            // high), high 2 bits from qh[32n + l] >> 2k; 16 weights per scale, in order
            for n in 0..2 {
                for h in 0..2 {
                    let ql_a = vld1q_u8(xp.add(64 * n + 16 * h));
                    let ql_b = vld1q_u8(xp.add(64 * n + 32 + 16 * h));
                    let qh = vld1q_u8(xp.add(128 + 32 * n + 16 * h));
                    let lows = [vandq_u8(ql_a, m4), vandq_u8(ql_b, m4), vshrq_n_u8::<4>(ql_a), vshrq_n_u8::<4>(ql_b)];
                    let highs = [
                        vshlq_n_u8::<4>(vandq_u8(qh, m2)),
                        vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m2)),
                        vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m2)),
                        vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh)),
                    ];
                    for k in 0..4 {
                        let q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lows[k], highs[k])), k32);
                        let s = D::dot(vdupq_n_s32(0), q, load_i8(yp.add(4 + 128 * n + 32 * k + 16 * h)));
                        let sc = x[192 + 8 * n + 2 * k + h] as i8 as i32;
                        sumv = vmlaq_n_s32(sumv, s, sc);
                    }
                }
            }
            let isum = vaddvq_s32(sumv);
            sumf += (f16_at(x, 208) * f32_at(y, 0)) * isum as f32;
        }
        sumf
    }

    // ---- float kernels ----

    /// 4 f16 (as u16 bits) -> 4 f32, exactly: the exponent is rebiased by a multiplication by 2^112
    /// (exact for normals and subnormals); inf and NaN (|h| >= 0x7c00) get an all-ones exponent.
    #[inline(always)]
    pub(in super::super) unsafe fn f16x4_to_f32(h: uint16x4_t) -> float32x4_t {
        let h = vmovl_u16(h);
        let mag = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
        let f = vmulq_f32(vreinterpretq_f32_u32(mag), vdupq_n_f32(f32::from_bits(0x7780_0000)));
        let special = vcgeq_f32(f, vdupq_n_f32(65536.0));
        let bits = vorrq_u32(vreinterpretq_u32_f32(f), vandq_u32(special, vdupq_n_u32(0x7f80_0000)));
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        vreinterpretq_f32_u32(vorrq_u32(bits, sign))
    }

    /// 8 f16 at byte pointer `p` -> two vectors of 4 f32.
    #[inline(always)]
    pub(in super::super) unsafe fn load_f16x8(p: *const u8) -> (float32x4_t, float32x4_t) {
        let h = vreinterpretq_u16_u8(vld1q_u8(p));
        (f16x4_to_f32(vget_low_u16(h)), f16x4_to_f32(vget_high_u16(h)))
    }

    #[inline(always)]
    unsafe fn load_f32x4(p: *const u8) -> float32x4_t {
        vreinterpretq_f32_u8(vld1q_u8(p))
    }

    #[inline(always)]
    unsafe fn f16_scalar(p: *const u8) -> f32 {
        half::f16::from_bits(u16::from_le_bytes((p as *const [u8; 2]).read_unaligned())).to_f32()
    }

    /// avx2.rs's reduction of its 4 sums of 8 lanes, sum `j` in `acc[2j]` (lanes 0-3) and `acc[2j + 1]`
    /// (4-7): `v = (a0 + a1) + (a2 + a3)` lane by lane, then its `hsum_ps` tree
    /// `((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`.
    #[inline(always)]
    pub(in super::super) unsafe fn hsum_4x8(acc: &[float32x4_t; 8]) -> f32 {
        let lo = vaddq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[4], acc[6]));
        let hi = vaddq_f32(vaddq_f32(acc[1], acc[3]), vaddq_f32(acc[5], acc[7]));
        let t = vaddq_f32(lo, hi);
        let u = vadd_f32(vget_low_f32(t), vget_high_f32(t));
        vget_lane_f32::<0>(u) + vget_lane_f32::<1>(u)
    }

    /// `sum_i w_i x_i` for `n` elements in avx2.rs's order: 4 sums of 8 lanes by FMA over 32-element
    /// steps, a last 8s into the first, [`hsum_4x8`], then the last `n % 8` products one by one
    /// (rounded, then added). `w8(i)`: weights `i..i + 8`; `w1(i)`: weight `i`.
    #[inline(always)]
    unsafe fn dot_4x8(
        n: usize,
        x: *const f32,
        w8: impl Fn(usize) -> (float32x4_t, float32x4_t),
        w1: impl Fn(usize) -> f32,
    ) -> f32 {
        let mut acc = [vdupq_n_f32(0.0); 8];
        let mut i = 0;
        while i + 32 <= n {
            for j in 0..4 {
                let (lo, hi) = w8(i + 8 * j);
                acc[2 * j] = vfmaq_f32(acc[2 * j], lo, vld1q_f32(x.add(i + 8 * j)));
                acc[2 * j + 1] = vfmaq_f32(acc[2 * j + 1], hi, vld1q_f32(x.add(i + 8 * j + 4)));
            }
            i += 32;
        }
        while i + 8 <= n {
            let (lo, hi) = w8(i);
            acc[0] = vfmaq_f32(acc[0], lo, vld1q_f32(x.add(i)));
            acc[1] = vfmaq_f32(acc[1], hi, vld1q_f32(x.add(i + 4)));
            i += 8;
        }
        let mut s = hsum_4x8(&acc);
        while i < n {
            s += w1(i) * *x.add(i);
            i += 1;
        }
        s
    }

    /// `a`: n f32 as bytes (any alignment); `b`: n f32.
    unsafe fn dot_f32_ptr(a: *const u8, b: *const f32, n: usize) -> f32 {
        let w1 = |i: usize| f32::from_le_bytes((a.add(4 * i) as *const [u8; 4]).read_unaligned());
        dot_4x8(n, b, |i| (load_f32x4(a.add(4 * i)), load_f32x4(a.add(4 * i + 16))), w1)
    }

    /// `k`: n f16 as bytes (any alignment); `x`: n f32.
    unsafe fn dot_f16_ptr(k: *const u8, x: *const f32, n: usize) -> f32 {
        dot_4x8(n, x, |i| load_f16x8(k.add(2 * i)), |i| f16_scalar(k.add(2 * i)))
    }

    /// `y += a * x`, `x`: n f16 as bytes.
    unsafe fn axpy_f16(y: *mut f32, a: f32, x: *const u8, n: usize) {
        let av = vdupq_n_f32(a);
        let mut i = 0;
        while i + 8 <= n {
            let (x0, x1) = load_f16x8(x.add(2 * i));
            vst1q_f32(y.add(i), vfmaq_f32(vld1q_f32(y.add(i)), av, x0));
            vst1q_f32(y.add(i + 4), vfmaq_f32(vld1q_f32(y.add(i + 4)), av, x1));
            i += 8;
        }
        while i < n {
            *y.add(i) += a * f16_scalar(x.add(2 * i));
            i += 1;
        }
    }

    #[cfg(test)]
    mod tests {
        use rand::{rngs::StdRng, Rng, SeedableRng};

        use super::super::super::kernels::QDotFn;
        use super::*;

        /// `n` blocks of `bytes` random bytes but for finite random scales: f16 ones at `f16s`, an f32 one
        /// at 0 in Q8_K blocks (292 bytes); random bytes there could be NaN or inf.
        fn random_blocks(r: &mut StdRng, n: usize, bytes: usize, f16s: &[usize]) -> Vec<u8> {
            let mut v = vec![0u8; n * bytes];
            r.fill(&mut v[..]);
            for blk in v.chunks_exact_mut(bytes) {
                for &at in f16s {
                    blk[at..at + 2].copy_from_slice(&half::f16::from_f32(r.gen_range(-1.0..1.0)).to_le_bytes());
                }
                if bytes == 292 {
                    blk[..4].copy_from_slice(&r.gen_range(-1.0f32..1.0).to_le_bytes());
                }
            }
            v
        }

        /// Both integer-sum variants give the scalar dots bit for bit, whichever one `table` picks here,
        /// on random blocks of every byte pattern (i8 -128 included, every nibble and scale code); the
        /// tests in tests/backend_cpu.rs see only the picked one.
        #[test]
        fn mull_and_sdot_tables_equal_scalar_bit_for_bit() {
            // SAFETY: Mull is baseline NEON; Sdot is built only where the extension was detected.
            let mut tables = vec![("mull", unsafe { table_with::<Mull>() })];
            if has_dotprod() {
                tables.push(("sdot", unsafe { table_with::<Sdot>() }));
            } else {
                println!("no dot-product extension on this CPU: the sdot variant is not checked");
            }
            let scalar = Kernels::scalar();
            let mut r = StdRng::seed_from_u64(21);
            // (weight block bytes, its f16 fields, activation block bytes, its f16 fields, kernel)
            type Case = (usize, &'static [usize], usize, &'static [usize], fn(&Kernels) -> QDotFn);
            let cases: [Case; 6] = [
                (18, &[0], 34, &[0], |k| k.dot_q4_0),
                (20, &[0, 2], 36, &[0, 2], |k| k.dot_q4_1),
                (22, &[0], 34, &[0], |k| k.dot_q5_0),
                (34, &[0], 34, &[0], |k| k.dot_q8_0),
                (144, &[0, 2], 292, &[], |k| k.dot_q4_k),
                (210, &[208], 292, &[], |k| k.dot_q6_k),
            ];
            for (wb, wf16, ab, af16, dot) in cases {
                for nb in [1, 3, 4, 9] {
                    for _ in 0..50 {
                        let (w, a) = (random_blocks(&mut r, nb, wb, wf16), random_blocks(&mut r, nb, ab, af16));
                        // also a shorter activation row: as many blocks as both rows hold, as in the scalar dot
                        for a in [&a[..], &a[..(nb - 1) * ab]] {
                            let want = dot(&scalar)(&w, a);
                            for (name, t) in &tables {
                                let got = dot(t)(&w, a);
                                let what = format!("{name}: {nb} blocks of {wb} bytes: {got} vs scalar {want}");
                                assert_eq!(got.to_bits(), want.to_bits(), "{what}");
                            }
                        }
                    }
                }
            }
        }

        /// The vector f16 -> f32 conversion is exact for all 65,536 inputs (NaNs: still NaN, same sign).
        #[test]
        fn f16_to_f32_exact_for_every_value() {
            for h0 in (0..=u16::MAX).step_by(4) {
                let hs = [h0, h0 + 1, h0 + 2, h0 + 3];
                let mut got = [0.0f32; 4];
                // SAFETY: NEON is baseline on aarch64; 4 u16 in, 4 f32 out.
                unsafe { vst1q_f32(got.as_mut_ptr(), f16x4_to_f32(vld1_u16(hs.as_ptr()))) };
                for (&h, &g) in hs.iter().zip(&got) {
                    let want = half::f16::from_bits(h).to_f32();
                    let same = if want.is_nan() {
                        g.is_nan() && g.is_sign_negative() == want.is_sign_negative()
                    } else {
                        g.to_bits() == want.to_bits()
                    };
                    assert!(same, "f16 {h:#06x}: {g:e} ({:#010x}) vs {want:e}", g.to_bits());
                }
            }
        }
    }
}
