//! llama.cpp's CPU numerics: the float operations of its x86 build (AVX-512 F/DQ/VL/VNNI, the machine
//! llama-cpp-python compiles natively for), repeated one by one so that a model gives llama.cpp's logits
//! bit for bit (`--numerics llama.cpp`, `CpuBackend::with_llama_numerics`). It exists to compare with
//! llama.cpp exactly: these small quantized models are chaotic at the last bit (a 1e-6 nudge moves
//! SmolLM2's logits by ~5e-3), so no other order can agree with llama.cpp to 1e-2 in probability.
//! The native order (the default) is faster and batch-invariant; this one, like llama.cpp, is neither.
//!
//! What it reproduces (llama.cpp of llama-cpp-python 0.3.36, no flash attention, f16 K/V):
//!
//! ```text
//! quantized dots   Q4_1 x Q8_1, Q5_0 / Q8_0 x Q8_0 (ggml_vec_dot_*, AVX2 path; for batches of Q5_0 /
//!                  Q8_0 llamafile's tinyBLAS_Q0_AVX, which gives the same bits): 8 lanes, lane l holds
//!                  the integer sum of elements 4l..4l+3 of each block, acc[l] = fma(d_w * d_a, lane,
//!                  acc[l]) over the blocks, then hsum8; Q4_1 adds summs = fma(m_w, s_a, summs) after.
//!                  Q4_K (repacked by llama.cpp, gemv/gemm 8x8) and Q6_K x Q8_K: see their bodies
//! hsum8 / hsum16   _mm256 / _mm512_reduce_add_ps trees: halves added, then quarters, then the last pair
//! RMS norm         sum of (x*x as f32) as f64 in element order (ops.cpp), then x * scale * w
//! RoPE             angles as the native path computes them (ggml's running product, libm cosf / sinf);
//!                  y0 = fma(x0, c, -(x1 s)), y1 = fma(x0, s, x1 c) (gcc contracts ops.cpp's a*b - c*d)
//! SwiGLU           silu by ggml_v_expf (AVX-512 polynomial, scalef) where ggml runs its 16-lane loop,
//!                  libm's expf on a row's last len % 16 (none here: the FFN widths divide by 16)
//! GeGLU            f16 table of gelu (tanh form, `1 + a x x` fused), as the native one but for the fma
//! attention        Q and the probabilities rounded to f16; q.k and p.v as ggml_vec_dot_f16 (one token:
//!                  4 accumulators of 16 lanes, element i in acc[(i/16)%4] lane i%16) or as tinyBLAS
//!                  (2+ tokens in the batch: one accumulator of 16 lanes); softmax (ops.cpp) scales,
//!                  takes exp by ggml_v_expf 16 keys at a time, sums each 16's hsum16 in f64, multiplies
//!                  by (float)(1 / sum)
//! ```
//! The attention sees the keys llama.cpp's cache holds for one sequence from position 0: cells in
//! position order (sliding-window layers too: llama-cpp-python keeps a full-size SWA cache), padded to a
//! multiple of 256 with masked ones (which add exact zeros). Not covered (computed, but not in llama.cpp's
//! order): other weight types (the scalar table's dots), Q4_K matrices whose row count 8 does not divide
//! (llama.cpp does not repack those), several sequences in one batch (llama.cpp interleaves their cells);
//! KV budget views and attention scores use the native attention.

use half::f16;
use rayon::prelude::*;

use super::attention::CpuKv;
use super::elementwise::{scalar, Elementwise};
use super::kernels::{f16_at, f32_at, i16_at, q6k_value, quantize_q8_k, Isa, Kernels};
use crate::quant::{get_scale_min_k4, K_SCALE_SIZE, QK_K};
use crate::backend::{AttnParams, AttnSeq, KvShape};
use crate::dtype::GgmlType;

/// `$name`: `$body` (an `#[inline(always)]` function) compiled plain and, on x86, with FMA, and called as
/// the CPU allows (`mul_add` is then one instruction instead of a libm call; the value is the same).
macro_rules! fma_twin {
    ($name:ident = $body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has FMA (checked above).
                return unsafe { fast($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

/// `_mm256` horizontal sum (hsum_float_8, tinyBLAS `hsum(__m256)`).
#[inline(always)]
fn hsum8(v: &[f32; 8]) -> f32 {
    let r = [v[4] + v[0], v[5] + v[1], v[6] + v[2], v[7] + v[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// gcc's `_mm512_reduce_add_ps`.
#[inline(always)]
fn hsum16(v: &[f32; 16]) -> f32 {
    let t: [f32; 8] = std::array::from_fn(|i| v[8 + i] + v[i]);
    let u = [t[4] + t[0], t[5] + t[1], t[6] + t[2], t[7] + t[3]];
    (u[0] + u[2]) + (u[1] + u[3])
}

// ---- quantized dots ----

/// Q4_1 (20-byte blocks: d, m, 16 nibble bytes) x Q8_1 (36-byte blocks: d, s, 32 bytes).
#[inline(always)]
fn q4_1_body(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut summs) = ([0.0f32; 8], 0.0f32);
    for (x, y) in w.chunks_exact(20).zip(a.chunks_exact(36)) {
        summs = f16_at(x, 2).mul_add(f16_at(y, 2), summs);
        let d = f16_at(x, 0) * f16_at(y, 0);
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for e in 4 * l..4 * l + 4 {
                let q = if e < 16 { x[4 + e] & 0x0f } else { x[4 + e - 16] >> 4 };
                sumi += q as i32 * y[4 + e] as i8 as i32;
            }
            *acc = d.mul_add(sumi as f32, *acc);
        }
    }
    hsum8(&acc) + summs
}

/// Q8_0 x Q8_0 (34-byte blocks: d, 32 bytes).
#[inline(always)]
fn q8_0_body(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in w.chunks_exact(34).zip(a.chunks_exact(34)) {
        let d = f16_at(x, 0) * f16_at(y, 0);
        for (l, acc) in acc.iter_mut().enumerate() {
            let sumi: i32 = (2 + 4 * l..2 + 4 * l + 4).map(|e| x[e] as i8 as i32 * y[e] as i8 as i32).sum();
            *acc = d.mul_add(sumi as f32, *acc);
        }
    }
    hsum8(&acc)
}

/// Q5_0 (22-byte blocks: d, 32 high bits, 16 nibble bytes) x Q8_0: as Q8_0, on the values `q - 16`.
#[inline(always)]
fn q5_0_body(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in w.chunks_exact(22).zip(a.chunks_exact(34)) {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let d = f16_at(x, 0) * f16_at(y, 0);
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for e in 4 * l..4 * l + 4 {
                let low = if e < 16 { x[6 + e] & 0x0f } else { x[6 + e - 16] >> 4 };
                let v = (low as i32 | (((qh >> e) & 1) as i32) << 4) - 16;
                sumi += v * y[2 + e] as i8 as i32;
            }
            *acc = d.mul_add(sumi as f32, *acc);
        }
    }
    hsum8(&acc)
}

/// Q4_K x Q8_K as llama.cpp's x86 build computes it: its Q4_K matrices are repacked (q4_K_8x8). A
/// batch's rows in whole fours go through `ggml_gemm_q4_K_8x8_q8_K`, the rest (and single tokens)
/// through `ggml_gemv_q4_K_8x8_q8_K`. Both keep two fused chains per output, `acc = fma(isum, d_w * d_a,
/// acc)` and `accm = fma(msum, dmin_w * d_a, accm)`, and return `acc - accm`; the gemv adds once per
/// super-block, the gemm (`pairs`) once per pair of 32-weight sub-blocks. `isum`, `msum`: exact integer
/// sums of `scale * q * a` and `min * bsum`.
#[inline(always)]
fn q4_k_body(w: &[u8], a: &[u8], pairs: bool) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        let scales: &[u8; K_SCALE_SIZE] = x[4..16].try_into().expect("12 scale bytes");
        let (d, dmin) = (f16_at(x, 0) * f32_at(y, 0), f16_at(x, 2) * f32_at(y, 0));
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, scales);
            msum += m as i32 * (i16_at(y, 260 + 4 * j) + i16_at(y, 260 + 4 * j + 2));
            let qs = &x[16 + 32 * (j / 2)..][..32];
            let s: i32 = (0..32).map(|l| (if j % 2 == 0 { qs[l] & 0x0f } else { qs[l] >> 4 }) as i32 * y[4 + 32 * j + l] as i8 as i32).sum();
            isum += sc as i32 * s;
            if (pairs && j % 2 == 1) || j == 7 {
                acc = (isum as f32).mul_add(d, acc);
                accm = (msum as f32).mul_add(dmin, accm);
                (isum, msum) = (0, 0);
            }
        }
    }
    acc - accm
}

/// A Q4_K or Q6_K matrix (`n_rows` rows of `row_len`) times `n_tokens` rows of `x`, in the order
/// llama.cpp picks for the batch: Q4_K per [`q4_k_body`] (whole fours of tokens by its gemm), Q6_K by
/// [`q6_k_body`] below 8 tokens and by its tiled kernel ([`q6_k_tiled`]) from 8. `out[t * n_rows + r]`.
/// Call inside the backend's pool.
pub(super) fn matmul_k(ty: GgmlType, w: &[u8], row_len: usize, n_rows: usize, x: &[f32], n_tokens: usize, out: &mut [f32]) {
    let nb = row_len / QK_K;
    let (wb, ab) = (nb * ty.type_size(), nb * 292);
    let mut acts = vec![0u8; n_tokens * ab];
    acts.par_chunks_mut(ab).zip(x.par_chunks(row_len)).for_each(|(a, x)| quantize_q8_k(x, a));
    let gemm_tokens = n_tokens - n_tokens % 4;
    let k = KProduct { q4_k: ty == GgmlType::Q4K, tiled: n_tokens >= 8, gemm_tokens, n_rows, wb, ab };
    out[..n_tokens * n_rows].par_chunks_mut(64).enumerate().for_each(|(c, o)| k_outputs(&k, w, &acts, c * 64, o));
}

/// What [`k_outputs`] needs of a [`matmul_k`] call.
struct KProduct {
    q4_k: bool,
    tiled: bool,
    gemm_tokens: usize,
    n_rows: usize,
    wb: usize,
    ab: usize,
}

/// Outputs `first..first + o.len()` of a [`matmul_k`] product.
#[inline(always)]
fn k_outputs_body(k: &KProduct, w: &[u8], acts: &[u8], first: usize, o: &mut [f32]) {
    for (i, o) in o.iter_mut().enumerate() {
        let (t, r) = ((first + i) / k.n_rows, (first + i) % k.n_rows);
        let (w, a) = (&w[r * k.wb..(r + 1) * k.wb], &acts[t * k.ab..(t + 1) * k.ab]);
        *o = match (k.q4_k, k.tiled) {
            (true, _) => q4_k_body(w, a, t < k.gemm_tokens),
            (false, false) => q6_k_body(w, a),
            (false, true) => q6_k_tiled(w, a),
        };
    }
}

fma_twin!(k_outputs = k_outputs_body(k: &KProduct, w: &[u8], acts: &[u8], first: usize, o: &mut [f32]) -> ());

/// Q6_K x Q8_K as llama.cpp's tiled kernel (`ggml-cpu/tiled`, batches of 8+ tokens of non-repacked
/// K-quants): per super-block the exact integer `isum`, then `acc = fma(isum * d_w, d_a, acc)` (the
/// kernel writes `acc + (isum * d_w) * d_a` with `_mm512_add_ps` / `_mm512_mul_ps`, which gcc, whose
/// headers spell them as vector `+` and `*`, contracts).
fn q6_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let isum: i32 = (0..QK_K).map(|e| x[192 + e / 16] as i8 as i32 * (q6k_value(x, e) - 32) * y[4 + e] as i8 as i32).sum();
        acc = (isum as f32 * f16_at(x, 208)).mul_add(f32_at(y, 0), acc);
    }
    acc
}

/// Q6_K x Q8_K (ggml_vec_dot_q6_K_q8_K, AVX2 path): 8 integer lanes per super-block, lane `k` holding
/// `scale * q * a` of the elements `e` with `(e % 32) / 4 == k` minus `32 * (sc[2k] bsum[2k] + sc[2k+1]
/// bsum[2k+1])`; then `acc[k] = fma(d_a * d_w, lane, acc[k])` and hsum8.
#[inline(always)]
fn q6_k_body(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let sc = |i: usize| x[192 + i] as i8 as i32;
        let mut lanes = [0i32; 8];
        for e in 0..QK_K {
            lanes[(e % 32) / 4] += sc(e / 16) * q6k_value(x, e) * y[4 + e] as i8 as i32;
        }
        let d = f32_at(y, 0) * f16_at(x, 208);
        for (k, (acc, lane)) in acc.iter_mut().zip(lanes).enumerate() {
            let sub = 32 * (sc(2 * k) * i16_at(y, 260 + 4 * k) + sc(2 * k + 1) * i16_at(y, 260 + 4 * k + 2));
            *acc = d.mul_add((lane - sub) as f32, *acc);
        }
    }
    hsum8(&acc)
}

/// [`q4_k_body`] for one token.
#[inline(always)]
fn q4_k_gemv(w: &[u8], a: &[u8]) -> f32 {
    q4_k_body(w, a, false)
}

/// Each body through [`fma_twin`], and the table of them.
macro_rules! dots {
    ($($name:ident => $body:ident),*) => {
        $(fma_twin!($name = $body(w: &[u8], a: &[u8]) -> f32);)*

        /// The scalar table with llama.cpp's dots (no tile kernels: every product is a per-row dot).
        pub(super) fn kernels() -> Kernels {
            let mut k = Kernels::scalar();
            $(k.$name = $name;)*
            #[cfg(target_arch = "x86_64")]
            if avx2::usable() {
                (k.dot_q4_1, k.dot_q5_0, k.dot_q8_0) = (avx2::dot_q4_1, avx2::dot_q5_0, avx2::dot_q8_0);
            }
            k
        }
    };
}

/// The legacy-block dots in AVX2, as llama.cpp's own: the same integer lanes (`maddubs` cannot saturate
/// on these ranges), the same `fmadd` per block and the same hsum8, so the same bits as the bodies above.
///
/// Safety: the `#[target_feature]` functions are reached only through [`kernels`], which hands them out
/// after [`usable`] confirmed avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The f16 at byte `at` of `b`, by F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([b[at], b[at + 1]]) as i32)))
    }

    pub(super) fn usable() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum8(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    }

    /// Lane `l`: the sum of the products of unsigned bytes `4l..4l+4` of `u` with the signed ones of `s`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes_us(u: __m256i, s: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    }

    /// As [`lanes_us`] for two signed operands (the sign moved onto `y`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes_ss(x: __m256i, y: __m256i) -> __m256 {
        lanes_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    /// 16 bytes of nibbles as 32 bytes: the low nibbles (elements 0..16), then the high ones.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let b = _mm_loadu_si128(p as *const __m128i);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0f))
    }

    /// Byte `i` all ones where bit `i` of `bits` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bit_bytes(bits: u32) -> __m256i {
        // byte i takes byte i / 8 of `bits`, then tests its bit i % 8
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1(w: &[u8], a: &[u8]) -> f32 {
        let (mut acc, mut summs) = (_mm256_setzero_ps(), 0.0f32);
        for (x, y) in w.chunks_exact(20).zip(a.chunks_exact(36)) {
            summs = f16_at(x, 2).mul_add(f16_at(y, 2), summs);
            let d = _mm256_set1_ps(f16_at(x, 0) * f16_at(y, 0));
            let q = lanes_us(nibbles(x[4..].as_ptr()), _mm256_loadu_si256(y[4..].as_ptr() as *const __m256i));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum8(acc) + summs
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0(w: &[u8], a: &[u8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.chunks_exact(22).zip(a.chunks_exact(34)) {
            let d = _mm256_set1_ps(f16_at(x, 0) * f16_at(y, 0));
            // q - 16: the nibble with 0xf0 or'ed in where the fifth bit is clear
            let high = _mm256_andnot_si256(bit_bytes(u32::from_le_bytes([x[2], x[3], x[4], x[5]])), _mm256_set1_epi8(0xf0u8 as i8));
            let qx = _mm256_or_si256(nibbles(x[6..].as_ptr()), high);
            let q = lanes_ss(qx, _mm256_loadu_si256(y[2..].as_ptr() as *const __m256i));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum8(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0(w: &[u8], a: &[u8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.chunks_exact(34).zip(a.chunks_exact(34)) {
            let d = _mm256_set1_ps(f16_at(x, 0) * f16_at(y, 0));
            let q = lanes_ss(_mm256_loadu_si256(x[2..].as_ptr() as *const __m256i), _mm256_loadu_si256(y[2..].as_ptr() as *const __m256i));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum8(acc)
    }

    pub(super) fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
        // SAFETY: handed out only after `usable` (module doc); the chunks are whole blocks.
        unsafe { q4_1(w, a) }
    }

    pub(super) fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
        // SAFETY: as above.
        unsafe { q5_0(w, a) }
    }

    pub(super) fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
        // SAFETY: as above.
        unsafe { q8_0(w, a) }
    }
}

dots!(dot_q4_1 => q4_1_body, dot_q5_0 => q5_0_body, dot_q8_0 => q8_0_body, dot_q4_k => q4_k_gemv, dot_q6_k => q6_k_body);

// ---- elementwise ----

/// ggml's AVX-512 `ggml_v_expf` for one lane.
fn v_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x)); // ln 2, low and high parts
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = c(0x3c07_2010).mul_add(b, c(0x3d2b_9f17)).mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)));
    let j = j.mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // _mm512_scalef_ps: j * 2^n (|n| <= 192: an exact f64 power of two), rounded once
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// `g = silu(g) * u` as ggml_vec_swiglu_f32: 16 lanes by [`v_expf`]; the last `len % 16` elements by
/// `x / (1 + expf(-x))` with libm's expf (none in the models here: their FFN widths are multiples of 16,
/// and the backend's chunks are too).
#[inline(always)]
fn silu_mul_body(g: &mut [f32], u: &[f32]) {
    let full = g.len() / 16 * 16;
    for (x, &y) in g[..full].iter_mut().zip(u) {
        *x = *x / (1.0 + v_expf(0.0 - *x)) * y;
    }
    for (x, &y) in g[full..].iter_mut().zip(&u[full..]) {
        *x = *x / (1.0 + (-*x).exp()) * y;
    }
}

/// ggml's `ggml_gelu_f32` as gcc compiles it: `1 + a x x` contracted to `fma(a x, x, 1)`.
fn gelu_f32(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (GELU_COEF_A * x).mul_add(x, 1.0)).tanh())
}

/// `g = gelu(g) * u` as ggml_vec_geglu_f32 with `GGML_GELU_FP16`: the native `gelu_mul` over a table of
/// this module's [`gelu_f32`].
pub(super) fn geglu_mul(g: &mut [f32], u: &[f32]) {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| super::f16_table(gelu_f32));
    g.iter_mut().zip(u).for_each(|(x, &y)| *x = super::gelu_mul(*x, y, table));
}

fn sum_sq(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |s, &v| s + (v * v) as f64)
}

fn rotate_halves(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (((x0, x1), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        (*x0, *x1) = rotate(*x0, *x1, c, s);
    }
}

fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((p, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        (p[0], p[1]) = rotate(p[0], p[1], c, s);
    }
}

#[inline(always)]
fn rotate(x0: f32, x1: f32, c: f32, s: f32) -> (f32, f32) {
    (x0.mul_add(c, -(x1 * s)), x0.mul_add(s, x1 * c))
}

fma_twin!(silu_mul = silu_mul_body(g: &mut [f32], u: &[f32]) -> ());

pub(super) const ELEMENTWISE: Elementwise = Elementwise {
    isa: Isa::Scalar,
    silu_mul,
    sum_sq,
    scale_mul: scalar::scale_mul,
    rotate_halves,
    rotate_pairs,
};

// ---- attention ----

/// Cells llama.cpp's KV cache view is padded to (`llama_kv_cache::get_n_kv`: at least 256, a multiple of
/// 256): the p.v products run over that many cells, the unused ones adding exact zeros.
const N_KV_PAD: usize = 256;

/// `sum x[i] * y[i]` over `n` elements as ggml_vec_dot_f16 (AVX-512: element `i < n & !63` into lane
/// `i % 16` of accumulator `(i / 16) % 4`, the rest added in f64 after the reduction), or with `tiny` as
/// llamafile's tinyBLAS (one accumulator of 16 lanes; llama.cpp takes it only when 16 divides `n`). The
/// terms come as (index, x, y); absent indices are zero terms (masked keys).
#[inline(always)]
fn dot16(terms: impl Iterator<Item = (usize, f32, f32)>, n: usize, tiny: bool) -> f32 {
    let tiny = tiny && n.is_multiple_of(16);
    let (simd_end, mut tail) = (n & !63, Vec::new());
    let mut acc = [[0.0f32; 16]; 4];
    for (i, x, y) in terms {
        if !tiny && i >= simd_end {
            tail.push(x * y);
            continue;
        }
        let a = if tiny { 0 } else { (i / 16) % 4 };
        acc[a][i % 16] = x.mul_add(y, acc[a][i % 16]);
    }
    if tiny {
        return hsum16(&acc[0]);
    }
    let [mut a0, mut a1, a2, a3] = acc;
    for l in 0..16 {
        a0[l] += a2[l];
        a1[l] += a3[l];
        a0[l] += a1[l];
    }
    tail.iter().fold(hsum16(&a0) as f64, |s, &t| s + t as f64) as f32
}

/// llama.cpp's attention (module doc) for every query row of `seqs`; `tiny`: the batch has 2+ tokens.
pub(super) fn attention(q: &[f32], kv: &CpuKv, shape: KvShape, seqs: &[AttnSeq], p: &AttnParams, out: &mut [f32], tiny: bool) {
    let row_len = p.n_heads * p.head_dim;
    let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
    let mut row_seq = vec![None; n_rows];
    for s in seqs {
        row_seq[s.q_start..s.q_start + s.n_q].fill(Some(s));
    }
    let call = Call { q, kv, shape, p, tiny };
    out[..n_rows * row_len].par_chunks_mut(row_len).zip(row_seq).enumerate().for_each(|(r, (o, s))| {
        if let Some(s) = s {
            attend_row(&call, s, r, o)
        }
    });
}

/// What every row of an [`attention`] call shares.
struct Call<'a> {
    q: &'a [f32],
    kv: &'a CpuKv,
    shape: KvShape,
    p: &'a AttnParams,
    tiny: bool,
}

fma_twin!(attend_row = attend_row_body(c: &Call, s: &AttnSeq, r: usize, o: &mut [f32]) -> ());

/// Query row `r` (of sequence `s`) of [`attention`]: every head's output into `o`.
#[inline(always)]
fn attend_row_body(c: &Call, s: &AttnSeq, r: usize, o: &mut [f32]) {
    let Call { q, kv, shape, p, tiny } = *c;
    let (hd, nh, bs, width) = (p.head_dim, p.n_heads, shape.block_size, shape.token_width());
    let (group, row_len) = (nh / p.n_kv_heads, nh * hd);
    let n_kv = s.ctx_len.div_ceil(N_KV_PAD).max(1) * N_KV_PAD;
    let entry = s.ctx_len - s.n_q + (r - s.q_start);
    let slot = |j: usize| s.block_table[j / bs] as usize * bs + j % bs;
    let keys: Vec<(usize, usize)> =
        (0..=entry).filter(|&j| p.window.is_none_or(|w| entry - j < w)).map(|j| (j, slot(j) * width)).collect();
    let (mut w, mut pr) = (vec![0.0f32; keys.len()], vec![0.0f32; keys.len()]);
    for h in 0..nh {
        let g = (h / group) * hd;
        let q16: Vec<f32> = q[r * row_len + h * hd..][..hd].iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        for (wj, &(_, base)) in w.iter_mut().zip(&keys) {
            let k = &kv.k[base + g..base + g + hd];
            let kq = dot16(k.iter().zip(&q16).enumerate().map(|(d, (&k, &q))| (d, f16::from_bits(k).to_f32(), q)), hd, tiny);
            *wj = kq * p.scale;
        }
        let max = w.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        // exp 16 keys (cells) at a time; each group's hsum16 into an f64 sum
        let mut sum = 0.0f64;
        let mut lanes = [0.0f32; 16];
        let mut cell_group = usize::MAX;
        for (pj, (&wj, &(j, _))) in pr.iter_mut().zip(w.iter().zip(&keys)) {
            if j / 16 != cell_group {
                sum += hsum16(&lanes) as f64;
                (lanes, cell_group) = ([0.0; 16], j / 16);
            }
            *pj = v_expf(wj - max);
            lanes[j % 16] = *pj;
        }
        sum += hsum16(&lanes) as f64;
        let inv = (1.0 / sum) as f32;
        pr.iter_mut().for_each(|v| *v = f16::from_f32(*v * inv).to_f32());
        for (d, od) in o[h * hd..(h + 1) * hd].iter_mut().enumerate() {
            let terms = keys.iter().zip(&pr).map(|(&(j, base), &pj)| (j, f16::from_bits(kv.v[base + g + d]).to_f32(), pj));
            *od = dot16(terms, n_kv, tiny);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The AVX2 dots give the scalar emulation's bits on random blocks (never zero scales).
    #[test]
    fn avx2_dots_equal_the_scalar_order() {
        if !super::avx2::usable() {
            println!("skipped: no avx2+fma+f16c on this machine");
            return;
        }
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        let f16 = |r: &mut rand::rngs::StdRng| half::f16::from_f32(r.gen_range(0.001f32..0.05)).to_bits().to_le_bytes();
        type Dot = fn(&[u8], &[u8]) -> f32;
        let cases: [(usize, usize, Dot, Dot); 3] = [
            (20, 36, super::q4_1_body, super::avx2::dot_q4_1),
            (22, 34, super::q5_0_body, super::avx2::dot_q5_0),
            (34, 34, super::q8_0_body, super::avx2::dot_q8_0),
        ];
        for (wb, ab, scalar, simd) in cases {
            for nb in [1, 7, 18] {
                for _ in 0..50 {
                    let mut w: Vec<u8> = (0..nb * wb).map(|_| r.gen()).collect();
                    let mut a: Vec<u8> = (0..nb * ab).map(|_| r.gen_range(-127i8..=127) as u8).collect();
                    for b in 0..nb {
                        w[b * wb..b * wb + 2].copy_from_slice(&f16(&mut r));
                        a[b * ab..b * ab + 2].copy_from_slice(&f16(&mut r));
                        if wb == 20 {
                            w[b * wb + 2..b * wb + 4].copy_from_slice(&f16(&mut r));
                            a[b * ab + 2..b * ab + 4].copy_from_slice(&f16(&mut r));
                        }
                        if wb == 34 {
                            // Q8_0 weights never hold -128
                            w[b * wb + 2..(b + 1) * wb].iter_mut().for_each(|v| *v = (*v as i8).max(-127) as u8);
                        }
                    }
                    let (s, v) = (scalar(&w, &a), simd(&w, &a));
                    assert!(s.to_bits() == v.to_bits(), "block bytes {wb}, {nb} blocks: scalar {s} vs avx2 {v}");
                }
            }
        }
    }
}
