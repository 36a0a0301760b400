//! The k-quant super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (weights) and Q8_K (activations).
//!
//! A super-block holds `QK_K = 256` weights in 8 or 16 sub-blocks, each with its own small integer scale
//! (and min), which are themselves scaled by the f16 `d` (and `dmin`) of the super-block. The low bits of
//! the quants are interleaved so SIMD code can pull a whole 32-byte plane with one load and a shift:
//!
//! ```text
//! 2-bit planes (Q2_K qs, Q3_K qs), per 128-weight half n (32 bytes each):
//!     weight 128n + 32j + l  =  (qs[32n + l] >> 2j) & 3          j in 0..4, l in 0..32
//! 4-bit planes (Q4_K/Q5_K qs), per 64-weight group j (32 bytes each):
//!     weight 64j + l         =  qs[32j + l] & 15                 l in 0..32
//!     weight 64j + 32 + l    =  qs[32j + l] >> 4
//! ```
//!
//! Only dequantization (ggml's `dequantize_row_*`) is here for Q2_K..Q6_K; their ggml quantizers are
//! iterative searches pagellm does not need. Q8_K has ggml's `quantize_row_q8_K_ref`.

use std::mem::size_of;

use half::f16;

use super::{bytes_at, f16_at, i8s_at, put_f16, put_i8s, Block, Quantize};
use crate::dtype::{GgmlType, QK_K};

/// Bytes of packed 6-bit scales and mins in Q4_K and Q5_K (and of the 6-bit scales of Q3_K).
pub const K_SCALE_SIZE: usize = 12;

/// Q2_K: 16 sub-blocks of 16; `w = d * (sc & 15) * q - dmin * (sc >> 4)`, q in 0..=3.
///
/// ```text
/// bytes   0..16   scales  byte s: low nibble = scale, high nibble = min of sub-block s
///        16..80   qs      2-bit planes (module doc); sub-block s = weights 16s..16s+16
///        80..82   d       f16
///        82..84   dmin    f16
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);

/// Q3_K: 16 sub-blocks of 16; `w = d * (sc - 32) * (q - 4 * !hbit)`, q in 0..=3, sc 6-bit.
///
/// ```text
/// bytes   0..32   hmask   bit b of byte l = high bit of weight 32b + l (set means +0, clear means -4)
///        32..96   qs      2-bit planes (module doc)
///        96..108  scales  16 x 6 bits, see `unpack_q3k_scales`
///       108..110  d       f16
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; K_SCALE_SIZE],
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);

/// Q4_K: 8 sub-blocks of 32; `w = d * sc * q - dmin * m`, q in 0..=15, sc and m 6-bit.
///
/// ```text
/// bytes   0..2    d       f16
///         2..4    dmin    f16
///         4..16   scales  8 scales + 8 mins x 6 bits, see `get_scale_min_k4`
///        16..144  qs      4-bit planes (module doc); sub-block s = weights 32s..32s+32
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// Q5_K: as Q4_K with a 5th bit; q in 0..=31.
///
/// ```text
/// bytes   0..2    d       f16
///         2..4    dmin    f16
///         4..16   scales  as Q4_K
///        16..48   qh      bit 2j of byte l: weight 64j + l; bit 2j+1: weight 64j + 32 + l
///        48..176  qs      4-bit planes (low 4 bits)
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// Q6_K: 16 sub-blocks of 16; `w = d * sc * (q - 32)`, q in 0..=63, sc i8.
///
/// ```text
/// bytes   0..128  ql      per half n (64 bytes): weight 128n + l      = ql[64n + l] & 15
///                                                weight 128n + 32 + l = ql[64n + 32 + l] & 15
///                                                weight 128n + 64 + l = ql[64n + l] >> 4
///                                                weight 128n + 96 + l = ql[64n + 32 + l] >> 4
///       128..192  qh      per half n (32 bytes): bits 2k..2k+2 of qh[32n + l] = high bits of
///                                                weight 128n + 32k + l
///       192..208  scales  i8 x 16, sub-block s = weights 16s..16s+16
///       208..210  d       f16
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// Q8_K: `w = d * q`, q in -127..=127 (activations for k-quant dot products).
///
/// ```text
/// bytes   0..4    d       f32 (not f16)
///         4..260  qs      i8 x 256
///       260..292  bsums   i16 x 16, bsums[g] = sum of qs[16g..16g+16]
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(size_of::<BlockQ8K>() == 292);

/// ggml's `nearest_int`: round half to even through the 1.5 * 2^23 magic number (exact for
/// |x| <= 4194303, the only range ggml calls it with).
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// Scale and min (6 bits each) of sub-block `j` (0..8) of a Q4_K/Q5_K block:
///
/// ```text
/// j < 4:  sc = s[j] & 63                      m = s[j+4] & 63
/// j >= 4: sc = s[j+4] & 15 | (s[j-4] >> 6) << 4   m = s[j+4] >> 4 | (s[j] >> 6) << 4
/// ```
#[inline]
pub fn get_scale_min_k4(j: usize, s: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 16 signed scales (-32..=31) of a Q3_K block: the low 4 bits of scale j are nibble j of bytes 0..8
/// (low nibbles first), the high 2 bits are bits 2(j/4)..2(j/4)+2 of byte 8 + j%4.
#[inline]
pub fn unpack_q3k_scales(s: &[u8; K_SCALE_SIZE]) -> [i8; QK_K / 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0f } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

impl Block for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2K;
    const ELEMS: usize = QK_K;
    const BYTES: usize = 84;

    fn read(b: &[u8]) -> Self {
        Self {
            scales: bytes_at(b, 0),
            qs: bytes_at(b, 16),
            d: f16_at(b, 80),
            dmin: f16_at(b, 82),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..16].copy_from_slice(&self.scales);
        out[16..80].copy_from_slice(&self.qs);
        put_f16(out, 80, self.d);
        put_f16(out, 82, self.dmin);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        let y = &mut y[..QK_K];
        for n in 0..2 {
            let q = &self.qs[32 * n..32 * n + 32];
            for j in 0..4 {
                for h in 0..2 {
                    // sub-block 8n + 2j + h = weights 128n + 32j + 16h .. +16
                    let sc = self.scales[8 * n + 2 * j + h];
                    let dl = d * (sc & 0x0f) as f32;
                    let ml = min * (sc >> 4) as f32;
                    let out = &mut y[128 * n + 32 * j + 16 * h..][..16];
                    for (l, o) in out.iter_mut().enumerate() {
                        *o = dl * ((q[16 * h + l] >> (2 * j)) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

impl Block for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3K;
    const ELEMS: usize = QK_K;
    const BYTES: usize = 110;

    fn read(b: &[u8]) -> Self {
        Self {
            hmask: bytes_at(b, 0),
            qs: bytes_at(b, 32),
            scales: bytes_at(b, 96),
            d: f16_at(b, 108),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..32].copy_from_slice(&self.hmask);
        out[32..96].copy_from_slice(&self.qs);
        out[96..108].copy_from_slice(&self.scales);
        put_f16(out, 108, self.d);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d_all = self.d.to_f32();
        let scales = unpack_q3k_scales(&self.scales);
        let y = &mut y[..QK_K];
        for n in 0..2 {
            let q = &self.qs[32 * n..32 * n + 32];
            for j in 0..4 {
                let m = 1u8 << (4 * n + j); // hmask bit of plane j in half n
                for h in 0..2 {
                    let dl = d_all * scales[8 * n + 2 * j + h] as f32;
                    let out = &mut y[128 * n + 32 * j + 16 * h..][..16];
                    for (l, o) in out.iter_mut().enumerate() {
                        let i = 16 * h + l;
                        let low = ((q[i] >> (2 * j)) & 3) as i32;
                        let minus = if self.hmask[i] & m != 0 { 0 } else { 4 };
                        *o = dl * (low - minus) as f32;
                    }
                }
            }
        }
    }
}

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    const ELEMS: usize = QK_K;
    const BYTES: usize = 144;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: bytes_at(b, 4),
            qs: bytes_at(b, 16),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        put_f16(out, 2, self.dmin);
        out[4..16].copy_from_slice(&self.scales);
        out[16..144].copy_from_slice(&self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        let y = &mut y[..QK_K];
        for j in 0..4 {
            let q = &self.qs[32 * j..32 * j + 32];
            let (sc1, m1) = get_scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (lo, hi) = y[64 * j..64 * j + 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                hi[l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    const ELEMS: usize = QK_K;
    const BYTES: usize = 176;

    fn read(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: bytes_at(b, 4),
            qh: bytes_at(b, 16),
            qs: bytes_at(b, 48),
        }
    }

    fn write(&self, out: &mut [u8]) {
        put_f16(out, 0, self.d);
        put_f16(out, 2, self.dmin);
        out[4..16].copy_from_slice(&self.scales);
        out[16..48].copy_from_slice(&self.qh);
        out[48..176].copy_from_slice(&self.qs);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        let y = &mut y[..QK_K];
        for j in 0..4 {
            let ql = &self.qs[32 * j..32 * j + 32];
            let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let (sc1, m1) = get_scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (lo, hi) = y[64 * j..64 * j + 64].split_at_mut(32);
            for l in 0..32 {
                let h1 = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * ((ql[l] & 0x0f) as i32 + h1) as f32 - m1;
                hi[l] = d2 * ((ql[l] >> 4) as i32 + h2) as f32 - m2;
            }
        }
    }
}

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    const ELEMS: usize = QK_K;
    const BYTES: usize = 210;

    fn read(b: &[u8]) -> Self {
        Self {
            ql: bytes_at(b, 0),
            qh: bytes_at(b, 128),
            scales: i8s_at(b, 192),
            d: f16_at(b, 208),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        put_i8s(out, 192, &self.scales);
        put_f16(out, 208, self.d);
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let y = &mut y[..QK_K];
        for n in 0..2 {
            let ql = &self.ql[64 * n..64 * n + 64];
            let qh = &self.qh[32 * n..32 * n + 32];
            let sc = &self.scales[8 * n..8 * n + 8];
            let out = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                // ggml: d * sc[is] * q, i.e. (d * sc) * q
                out[l] = d * sc[is] as f32 * q1 as f32;
                out[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                out[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                out[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

impl Block for BlockQ8K {
    const TYPE: GgmlType = GgmlType::Q8K;
    const ELEMS: usize = QK_K;
    const BYTES: usize = 292;

    fn read(b: &[u8]) -> Self {
        let bsums = std::array::from_fn(|g| i16::from_le_bytes([b[260 + 2 * g], b[261 + 2 * g]]));
        Self {
            d: f32::from_le_bytes(bytes_at(b, 0)),
            qs: i8s_at(b, 4),
            bsums,
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.d.to_le_bytes());
        put_i8s(out, 4, &self.qs);
        for (g, s) in self.bsums.iter().enumerate() {
            out[260 + 2 * g..262 + 2 * g].copy_from_slice(&s.to_le_bytes());
        }
    }

    fn dequantize(&self, y: &mut [f32]) {
        for (y, &q) in y[..QK_K].iter_mut().zip(&self.qs) {
            *y = self.d * q as f32;
        }
    }
}

impl Quantize for BlockQ8K {
    /// ggml's `quantize_row_q8_K_ref`. On an all-zero block ggml leaves `bsums` as they were; here they
    /// are 0, which is what they sum to.
    fn quantize(x: &[f32]) -> Self {
        let x = &x[..QK_K];
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            return Self {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; QK_K / 16],
            };
        }
        // -127 rather than -128: ggml changed this for IQ2_XXS's AVX path, and its SIMD kernels assume it.
        let iscale = -127.0 / max;
        let qs: [i8; QK_K] = std::array::from_fn(|j| nearest_int(iscale * x[j]).min(127) as i8);
        let bsums =
            std::array::from_fn(|g| qs[16 * g..16 * g + 16].iter().map(|&q| i16::from(q)).sum());
        Self {
            d: 1.0 / iscale,
            qs,
            bsums,
        }
    }
}
