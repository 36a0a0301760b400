//! The CPU kernel table: one set of function pointers, picked once at start-up by feature detection
//! ([`Kernels::detect`]), and the scalar kernels that are both the fallback and the tests' oracle.
//!
//! Dot products of a quantized weight row with an activation row quantized the way llama.cpp does it
//! (ggml's `vec_dot_type`: Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1, Q8_K for the k-quants). Their results
//! are defined by the order of float operations below, and the SIMD twins keep that order, so a SIMD dot
//! equals the scalar dot bit for bit on the same blocks:
//!
//! ```text
//! 32-weight blocks:  sumi_b = sum of integer products in block b             (exact, i32)
//!                    t_b    = (d_w * d_a) * sumi_b  [+ m_w * s_a for Q4_1]   (f32)
//!                    acc[b % 4] += t_b;   result = (acc[0] + acc[2]) + (acc[1] + acc[3])
//! 256-weight blocks: isum_b (and msum_b for Q4_K: sum of mins x bsums)       (exact, i32)
//!                    sumf += (d_w * d_a) * isum_b  [- (dmin_w * d_a) * msum_b]   in block order
//! ```
//! Float dot products (f32, f16 K/V) have no such promise: the SIMD ones use FMA and several
//! accumulators and agree with the scalar ones to f32 rounding.
//!
//! Tables with tile kernels ([`GemmKernels`]: AVX-512, AVX2) multiply up to 16 weight rows by a batch of
//! activation rows at once: each weight block is decoded once per tile and reused for every token, the
//! rows sit in the lanes of a vector (16 or 8), and every lane runs exactly the scalar sequence of float
//! operations above, so a tile's output equals the scalar dot of each (row, token) pair bit for bit.
//! The tiles read the activation blocks in place plus per-block side values ([`act_side`]).

use half::f16;

use crate::dtype::GgmlType;
use crate::quant::{get_scale_min_k4, K_SCALE_SIZE, QK, QK_K};

/// A dot product of one weight row (GGML blocks) with one activation row (Q8 blocks), both as bytes.
pub type QDotFn = fn(w: &[u8], a: &[u8]) -> f32;
/// A dot product of a weight row stored as bytes (f32 or f16, little-endian) with f32 activations.
pub type FDotFn = fn(w: &[u8], x: &[f32]) -> f32;

/// Quantizes one row of f32 activations (a whole number of blocks) into Q8 blocks.
pub type QuantizeFn = fn(x: &[f32], out: &mut [u8]);
/// Up to 16 weight rows (`w`, `n = w.len() / row_bytes` rows) times every activation row of `acts`:
/// `*out.add(t * out_stride + r)` = the scalar dot of weight row `r` and activation row `t`, for
/// `t < acts.n_tok`, `r < n`; nothing else is written.
///
/// # Safety
/// Those `acts.n_tok * n` elements are valid for writes and no other thread accesses them meanwhile.
pub type GemmFn =
    unsafe fn(w: &[u8], row_bytes: usize, acts: &QActs<'_>, scratch: &mut Scratch, out: *mut f32, out_stride: usize);

/// Packs one tile (`w`: 1..=16 weight rows of `row_bytes`) into `dst` (64-byte aligned,
/// [`PackKernels::tile_bytes`] long): every block in the layout the tile kernel decodes it into.
///
/// # Safety
/// The table this comes from was built after feature detection (as for every kernel pointer).
pub type PackFn = unsafe fn(w: &[u8], row_bytes: usize, dst: &mut [u8]);
/// A packed tile of `n` rows and `nb` blocks times every activation row of `acts`, written as
/// [`GemmFn`] writes them (the same values, bit for bit).
///
/// # Safety
/// As [`GemmFn`]; `tile` was packed by the same table's [`PackFn`].
pub type PackedFn = unsafe fn(tile: &[u8], n: usize, nb: usize, acts: &QActs<'_>, out: *mut f32, out_stride: usize);

/// Weights repacked once at load for one type's tile kernel, so that a matmul reads one sequential
/// stream of decoded blocks instead of decoding 16 interleaved rows on every call.
#[derive(Clone, Copy)]
pub struct PackKernels {
    pub ty: GgmlType,
    /// Bytes of one packed block of 16 rows.
    pub block_bytes: usize,
    pub pack: PackFn,
    pub gemm: PackedFn,
    /// Batches of more tokens read the file's layout through the tile kernel instead (a layout that
    /// still needs per-use work, such as splitting nibbles, loses to the tile's decode-once scratch
    /// when many tokens share each block).
    pub max_tokens: usize,
}

impl PackKernels {
    /// Bytes of one packed tile of `nb` blocks.
    pub fn tile_bytes(&self, nb: usize) -> usize {
        nb * self.block_bytes
    }
}

/// Which instruction set a table uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

/// A batch of activation rows quantized for a tile kernel.
///
/// ```text
/// bytes [n_tok x row_bytes]          the Q8 blocks (Q8_0 / Q8_1 / Q8_K), as the per-row dots read them
/// d     [n_tok x nb]                 each block's scale as f32
/// aux   [n_tok x nb x aux_per_block] what the weight type needs besides (act_side)
/// ```
pub struct QActs<'a> {
    pub n_tok: usize,
    pub row_bytes: usize,
    pub bytes: &'a [u8],
    pub d: &'a [f32],
    pub aux: &'a [i32],
}

impl QActs<'_> {
    /// Whether these rows are `nb` activation blocks of `ab` bytes each, with `apb` aux values a block
    /// (what a tile kernel's unchecked reads rely on).
    pub fn fit(&self, nb: usize, ab: usize, apb: usize) -> bool {
        let nt = self.n_tok;
        self.row_bytes == nb * ab
            && self.bytes.len() >= nt * self.row_bytes
            && self.d.len() >= nt * nb
            && self.aux.len() >= nt * nb * apb
    }
}

/// Side values of one activation block for a tile kernel with weights of type `wty` (in `d` and `aux`;
/// `aux.len()` is [`aux_per_block`]). The offsets turn unsigned weight codes into the signed values:
///
/// ```text
/// Q4_0 | Q5_0 | Q8_0 (Q8_0 acts):  aux[0] = -off * sum(q),  off = 8 | 16 | 128   (weights u = w + off)
/// Q4_1 (Q8_1 acts):                aux[0] = bits of f32(s)
/// Q4_K (Q8_K acts):                aux[i] = bp(2i) | bp(2i+1) << 16 (i16 pairs), bp(j) = bsums[2j] + bsums[2j+1]
/// Q6_K (Q8_K acts):                aux[g] = -32 * bsums[g]
/// ```
pub fn act_side(wty: GgmlType, blk: &[u8], d: &mut f32, aux: &mut [i32]) {
    let qsum = |q: &[u8]| q.iter().map(|&v| v as i8 as i32).sum::<i32>();
    match wty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
            let off = match wty {
                GgmlType::Q4_0 => 8,
                GgmlType::Q5_0 => 16,
                _ => 128,
            };
            *d = f16_at(blk, 0);
            aux[0] = -off * qsum(&blk[2..34]);
        }
        GgmlType::Q4_1 => {
            *d = f16_at(blk, 0);
            aux[0] = f16_at(blk, 2).to_bits() as i32;
        }
        GgmlType::Q4K => {
            *d = f32_at(blk, 0);
            for (i, a) in aux.iter_mut().enumerate() {
                let bp = |j: usize| i16_at(blk, 260 + 4 * j) + i16_at(blk, 262 + 4 * j);
                *a = (bp(2 * i) & 0xffff) | (bp(2 * i + 1) << 16);
            }
        }
        GgmlType::Q6K => {
            *d = f32_at(blk, 0);
            for (g, a) in aux.iter_mut().enumerate() {
                *a = -32 * i16_at(blk, 260 + 2 * g);
            }
        }
        _ => unreachable!("no tile kernel for {wty}"),
    }
}

/// How many `aux` values [`act_side`] writes per activation block for weights of type `wty`.
pub fn aux_per_block(wty: GgmlType) -> usize {
    match wty {
        GgmlType::Q4K => 4,
        GgmlType::Q6K => 16,
        _ => 1,
    }
}

/// Scratch memory of a tile kernel: 64-byte aligned, grown on demand and kept (one per thread).
#[derive(Default)]
pub struct Scratch(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Scratch {
    /// Exactly `bytes` bytes rounded up to whole lines, zeroed, or None if memory runs out.
    pub fn try_zeroed(bytes: usize) -> Option<Scratch> {
        let mut v = Vec::new();
        v.try_reserve_exact(bytes.div_ceil(64)).ok()?;
        v.resize(bytes.div_ceil(64), Line([0; 64]));
        Some(Scratch(v))
    }

    /// The bytes held (whole lines).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes; the slice covers exactly the vector's initialised lines.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 64) }
    }

    /// At least `bytes` bytes, 64-byte aligned (contents unspecified).
    pub fn get(&mut self, bytes: usize) -> &mut [u8] {
        let lines = bytes.div_ceil(64);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 64]));
        }
        // SAFETY: `Line` is 64 plain bytes; the slice covers exactly the vector's initialised lines.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.0.len() * 64) }
    }
}

/// The tile kernels of a table, by weight type.
#[derive(Clone, Copy)]
pub struct GemmKernels {
    pub q4_0: GemmFn,
    pub q4_1: GemmFn,
    pub q5_0: GemmFn,
    pub q8_0: GemmFn,
    pub q4_k: GemmFn,
    pub q6_k: GemmFn,
    /// Batches of fewer tokens of a weight type go through the per-row dots instead (both give the same
    /// results).
    pub min_tokens: fn(GgmlType) -> usize,
    /// The types whose weights this table repacks at their first product (where the packed layout
    /// costs little more memory than the file's and saves the per-call decode: on AVX-512, Q8_0 and the
    /// 4-bit Q4_0 / Q4_1).
    pub pack: &'static [PackKernels],
}

impl GemmKernels {
    /// How this table packs `ty`, if it does.
    pub fn pack_for(&self, ty: GgmlType) -> Option<PackKernels> {
        self.pack.iter().find(|p| p.ty == ty).copied()
    }
}

impl GemmKernels {
    pub fn get(&self, ty: GgmlType) -> Option<GemmFn> {
        Some(match ty {
            GgmlType::Q4_0 => self.q4_0,
            GgmlType::Q4_1 => self.q4_1,
            GgmlType::Q5_0 => self.q5_0,
            GgmlType::Q8_0 => self.q8_0,
            GgmlType::Q4K => self.q4_k,
            GgmlType::Q6K => self.q6_k,
            _ => return None,
        })
    }
}

/// Every hot CPU kernel, as function pointers chosen once.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub isa: Isa,
    /// Q4_0 x Q8_0.
    pub dot_q4_0: QDotFn,
    /// Q4_1 x Q8_1.
    pub dot_q4_1: QDotFn,
    /// Q5_0 x Q8_0.
    pub dot_q5_0: QDotFn,
    /// Q8_0 x Q8_0.
    pub dot_q8_0: QDotFn,
    /// Q4_K x Q8_K.
    pub dot_q4_k: QDotFn,
    /// Q6_K x Q8_K.
    pub dot_q6_k: QDotFn,
    /// F32 weights x f32.
    pub dot_f32w: FDotFn,
    /// F16 weights x f32.
    pub dot_f16w: FDotFn,
    /// f32 x f32.
    pub dot_f32: fn(a: &[f32], b: &[f32]) -> f32,
    /// f16 (K cache) x f32.
    pub dot_f16: fn(k: &[u16], x: &[f32]) -> f32,
    /// `y += a * x` with f16 `x` (V cache).
    pub axpy_f16: fn(y: &mut [f32], a: f32, x: &[u16]),
    /// Activation quantizers (bit-equal to the scalar `quantize_q8_*`).
    pub quantize_q8_0: QuantizeFn,
    pub quantize_q8_1: QuantizeFn,
    pub quantize_q8_k: QuantizeFn,
    /// Tile kernels (matrix x batch), where the table has them; otherwise matmul runs the per-row dots.
    pub gemm: Option<GemmKernels>,
}

impl Kernels {
    /// The scalar kernels: portable, and the oracle the SIMD ones are tested against.
    pub fn scalar() -> Kernels {
        Kernels {
            isa: Isa::Scalar,
            dot_q4_0,
            dot_q4_1,
            dot_q5_0,
            dot_q8_0,
            dot_q4_k,
            dot_q6_k,
            dot_f32w,
            dot_f16w,
            dot_f32,
            dot_f16,
            axpy_f16,
            quantize_q8_0,
            quantize_q8_1,
            quantize_q8_k,
            gemm: None,
        }
    }

    /// The AVX2+FMA+F16C kernels, if this CPU has them.
    pub fn avx2() -> Option<Kernels> {
        super::avx2::kernels()
    }

    /// The AVX-512 (F, BW, VL, VNNI) kernels plus the AVX2 float ones, if this CPU has them all.
    pub fn avx512() -> Option<Kernels> {
        super::avx512::kernels()
    }

    /// The NEON kernels: on every aarch64 CPU (NEON is baseline there), on no other architecture.
    pub fn neon() -> Option<Kernels> {
        super::neon::kernels()
    }

    /// The scalar table with llama.cpp's quantized dots (its x86 build's float order; see `ggml.rs`),
    /// as `CpuBackend::with_llama_numerics` uses it.
    pub fn llama_cpp() -> Kernels {
        super::ggml::kernels()
    }

    /// Every table this machine can run, scalar first (for tests).
    pub fn all() -> Vec<Kernels> {
        [Some(Kernels::scalar()), Kernels::avx2(), Kernels::avx512(), Kernels::neon()].into_iter().flatten().collect()
    }

    /// The best table for this machine. `PAGELLM_CPU=scalar|avx2|avx512|neon` forces one (tests, debugging);
    /// one the CPU lacks falls back to the best it has, with a notice.
    pub fn detect() -> Kernels {
        let best = || Kernels::avx512().or_else(Kernels::avx2).or_else(Kernels::neon).unwrap_or_else(Kernels::scalar);
        let Ok(want) = std::env::var("PAGELLM_CPU") else { return best() };
        let forced = match want.to_ascii_lowercase().as_str() {
            "scalar" => Some(Kernels::scalar()),
            "avx2" => Kernels::avx2(),
            "avx512" => Kernels::avx512(),
            "neon" => Kernels::neon(),
            _ => None,
        };
        forced.unwrap_or_else(|| {
            let k = best();
            eprintln!("PAGELLM_CPU={want}: not available here (scalar|avx2|avx512|neon), using {}", k.name());
            k
        })
    }

    pub fn name(&self) -> &'static str {
        match self.isa {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => super::neon::name(),
        }
    }
}

// ---- little-endian field access (blocks sit at any alignment in the map) ----

#[inline]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline]
pub(super) fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(super) fn i16_at(b: &[u8], at: usize) -> i32 {
    i16::from_le_bytes([b[at], b[at + 1]]) as i32
}

/// The 4-accumulator reduction every 32-weight dot product ends with (module doc).
#[inline]
pub(super) fn reduce4(acc: [f32; 4]) -> f32 {
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

// ---- activation quantizers (shared by every table: llama.cpp's x86 quantize_row_q8_0 / q8_1) ----

/// Q8_0 activations as llama.cpp's AVX2 `quantize_row_q8_0` makes them: `d = amax / 127`,
/// `q = round_half_even(x * (127 / amax))`.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (o, &v) in ob[2..].iter_mut().zip(xb) {
            *o = (v * id).round_ties_even() as i32 as i8 as u8;
        }
    }
}

/// Q8_1 activations (for Q4_1/Q5_1 weights): as Q8_0 plus `s = d * sum(q)`.
pub fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(36)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in ob[4..].iter_mut().zip(xb) {
            let q = (v * id).round_ties_even() as i32;
            sum += q;
            *o = q as i8 as u8;
        }
        ob[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_bits().to_le_bytes());
    }
}

/// Q8_K activations: ggml's reference quantizer (x86 llama.cpp uses it too).
pub fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    use crate::quant::{Block, BlockQ8K, Quantize};
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(BlockQ8K::BYTES)) {
        BlockQ8K::quantize(xb).write(ob);
    }
}

// ---- scalar dot products: 32-weight blocks ----

/// Runs `block(w_block, a_block) -> t_b` over the blocks and reduces as the module doc says.
#[inline]
pub(super) fn legacy_dot(w: &[u8], a: &[u8], wb: usize, ab: usize, block: impl Fn(&[u8], &[u8]) -> f32) -> f32 {
    let mut acc = [0.0f32; 4];
    for (i, (wblk, ablk)) in w.chunks_exact(wb).zip(a.chunks_exact(ab)).enumerate() {
        acc[i % 4] += block(wblk, ablk);
    }
    reduce4(acc)
}

fn dot_q4_0(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 18, 34, |x, y| {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x[2 + j] & 0x0f) as i32 - 8;
            let v1 = (x[2 + j] >> 4) as i32 - 8;
            sumi += v0 * y[2 + j] as i8 as i32 + v1 * y[2 + j + 16] as i8 as i32;
        }
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32
    })
}

fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 20, 36, |x, y| {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x[4 + j] & 0x0f) as i32;
            let v1 = (x[4 + j] >> 4) as i32;
            sumi += v0 * y[4 + j] as i8 as i32 + v1 * y[4 + j + 16] as i8 as i32;
        }
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2)
    })
}

fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 22, 34, |x, y| {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let mut sumi = 0i32;
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) as i32;
            let h1 = ((qh >> (j + 16)) & 1) as i32;
            let v0 = ((x[6 + j] & 0x0f) as i32 | (h0 << 4)) - 16;
            let v1 = ((x[6 + j] >> 4) as i32 | (h1 << 4)) - 16;
            sumi += v0 * y[2 + j] as i8 as i32 + v1 * y[2 + j + 16] as i8 as i32;
        }
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32
    })
}

fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    legacy_dot(w, a, 34, 34, |x, y| {
        let sumi: i32 = x[2..34].iter().zip(&y[2..34]).map(|(&p, &q)| p as i8 as i32 * q as i8 as i32).sum();
        (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32
    })
}

// ---- scalar dot products: 256-weight super-blocks (Q8_K: d f32 @0, qs @4, bsums i16 @260) ----

fn dot_q4_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        let scales: &[u8; K_SCALE_SIZE] = x[4..16].try_into().unwrap();
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, scales);
            let bsum = i16_at(y, 260 + 4 * j) + i16_at(y, 260 + 4 * j + 2);
            msum += m as i32 * bsum;
            // sub-block j: weights 32j..32j+32 = low (even j) or high (odd j) nibbles of qs[32(j/2)..]
            let qs = &x[16 + 32 * (j / 2)..][..32];
            let mut s = 0i32;
            for l in 0..32 {
                let q = if j % 2 == 0 { qs[l] & 0x0f } else { qs[l] >> 4 };
                s += q as i32 * y[4 + 32 * j + l] as i8 as i32;
            }
            isum += sc as i32 * s;
        }
        let d = f16_at(x, 0) * f32_at(y, 0);
        let dmin = f16_at(x, 2) * f32_at(y, 0);
        sumf += d * isum as f32 - dmin * msum as f32;
    }
    sumf
}

/// The 6-bit value (0..=63) of weight `i` of a Q6_K block.
#[inline]
pub(super) fn q6k_value(x: &[u8], i: usize) -> i32 {
    let (n, r) = (i / 128, i % 128);
    let (k, l) = (r / 32, r % 32);
    let ql = x[64 * n + 32 * (k % 2) + l];
    let low = if k < 2 { ql & 0x0f } else { ql >> 4 };
    let high = (x[128 + 32 * n + l] >> (2 * k)) & 3;
    (low | (high << 4)) as i32
}

fn dot_q6_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let mut isum = 0i32;
        for sub in 0..16 {
            let sc = x[192 + sub] as i8 as i32;
            let mut s = 0i32;
            for i in 16 * sub..16 * sub + 16 {
                s += (q6k_value(x, i) - 32) * y[4 + i] as i8 as i32;
            }
            isum += sc * s;
        }
        sumf += (f16_at(x, 208) * f32_at(y, 0)) * isum as f32;
    }
    sumf
}

// ---- scalar float kernels ----

fn dot_f32w(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(4).zip(x).map(|(b, &v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * v).sum()
}

fn dot_f16w(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2).zip(x).map(|(b, &v)| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() * v).sum()
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dot_f16(k: &[u16], x: &[f32]) -> f32 {
    k.iter().zip(x).map(|(&h, &v)| f16::from_bits(h).to_f32() * v).sum()
}

fn axpy_f16(y: &mut [f32], a: f32, x: &[u16]) {
    for (o, &h) in y.iter_mut().zip(x) {
        *o += a * f16::from_bits(h).to_f32();
    }
}
