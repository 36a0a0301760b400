//! The AVX-512 table's repacked weights (see [`PACK`]): Q8_0 in the tile kernel's scratch layout, the
//! 4-bit types with their nibbles kept. The layouts and the arithmetic on them are the tile kernels'
//! (the parent module), so a packed matrix gives the same bits as the same matrix read in place.

use core::arch::x86_64::*;
use std::marker::PhantomData;

use super::*;

/// The weight types this table repacks: a decode step reads one stream instead of 16 interleaved
/// rows. Q8_0 as the scratch layout (576 bytes per 16 x 34, +6%); Q4_0 / Q4_1 / Q5_0 with their
/// nibbles transposed and left packed (320 / 320 / 384 bytes per 16 x 18 / 20 / 22: +11% / 0 / +9%).
pub(super) static PACK: [PackKernels; 4] = [
    PackKernels {
        ty: crate::dtype::GgmlType::Q8_0,
        block_bytes: <Q8_0 as Tile>::SB,
        pack: pack::<Q8_0>,
        gemm: packed::<Q8_0>,
        max_tokens: usize::MAX,
    },
    nib_pack::<Q4_0>(crate::dtype::GgmlType::Q4_0),
    nib_pack::<Q4_1>(crate::dtype::GgmlType::Q4_1),
    nib_pack::<Q5_0>(crate::dtype::GgmlType::Q5_0),
];

/// Packs the tile `w` (1..=16 rows of `row_bytes`): its blocks decoded once, as [`gemm`] decodes
/// them into its scratch on every call.
///
/// # Safety
/// See [`PackFn`](crate::backend::cpu::kernels::PackFn).
unsafe fn pack<K: Tile>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
    let (_, nb, offs) = tile_shape(w, row_bytes, K::WB, "pack");
    assert!(dst.len() >= nb * K::SB && (dst.as_ptr() as usize).is_multiple_of(64), "pack: destination too small or unaligned");
    // SAFETY: as in gemm: reads within `w`, writes within `dst` (checked above).
    unsafe { decode_all::<K>(w.as_ptr(), w.len(), &offs, nb, dst.as_mut_ptr()) }
}

/// A tile packed by [`pack`] times every token of `acts`: [`gemm`]'s results without its decode.
///
/// # Safety
/// See [`PackedFn`](crate::backend::cpu::kernels::PackedFn).
unsafe fn packed<K: Tile>(tile: &[u8], n: usize, nb: usize, acts: &QActs<'_>, out: *mut f32, out_stride: usize) {
    assert!((1..=16).contains(&n), "packed: bad tile");
    assert!(tile.len() >= nb * K::SB && (tile.as_ptr() as usize).is_multiple_of(64), "packed: tile too small or unaligned");
    assert!(acts.fit(nb, K::AB, K::AUX), "gemm: activations do not match the weights");
    // SAFETY: table() is only built after feature detection; the tile holds nb decoded blocks and
    // the activations match them (checked above); `out` is the caller's promise.
    unsafe { every_token(&Decoded::<K> { scr: tile.as_ptr(), nb, _k: PhantomData }, n, acts, out, out_stride) }
}

// ---- 4-bit types packed with their nibbles kept: per block of 16 rows, the 16 code bytes of every
// row transposed (4 vectors: lane r = dword k of row r) and the header dword of every row (d, and
// Q4_1's m): 320 bytes, read as one stream; the codes are split into nibbles at use, exactly as
// `nibble_codes` splits them, so results equal the other paths bit for bit.

/// The table entry of a nibble-packed type.
const fn nib_pack<L: Nibbles>(ty: crate::dtype::GgmlType) -> PackKernels {
    PackKernels { ty, block_bytes: L::SB_PACKED, pack: pack_nib::<L>, gemm: packed_nib::<L>, max_tokens: NIB_MAX_TOKENS }
}
/// Up to this many tokens (one register tile) the nibble-packed layout wins (SmolLM2 tg128 +35%);
/// a 512-token prefill split the nibbles 128 times per block and ran ~10% slower than the tile path.
const NIB_MAX_TOKENS: usize = T_MAX;

/// The types that pack this way: where their code bytes start in a block, how many header vectors
/// (16 bytes of each row from its block's start, transposed: d, m, Q5_0's qh) they keep, and how
/// their codes and scales come out of the packed vectors (as `Legacy::codes` makes them).
trait Nibbles: Legacy {
    const QS_AT: usize;
    const HEADS: usize;
    const SB_PACKED: usize = 256 + 64 * Self::HEADS;
    unsafe fn from_packed(o: [__m512i; 4], head: [__m512i; 2]) -> ([__m512i; 8], __m512, __m512);
}
impl Nibbles for Q4_0 {
    const QS_AT: usize = 2;
    const HEADS: usize = 1;
    #[inline(always)]
    unsafe fn from_packed(o: [__m512i; 4], head: [__m512i; 2]) -> ([__m512i; 8], __m512, __m512) {
        let dw = f16_lanes::<false>(head[0]);
        (split_nibbles(o), dw, dw)
    }
}
impl Nibbles for Q4_1 {
    const QS_AT: usize = 4;
    const HEADS: usize = 1;
    #[inline(always)]
    unsafe fn from_packed(o: [__m512i; 4], head: [__m512i; 2]) -> ([__m512i; 8], __m512, __m512) {
        (split_nibbles(o), f16_lanes::<false>(head[0]), f16_lanes::<true>(head[0]))
    }
}
impl Nibbles for Q5_0 {
    const QS_AT: usize = 6;
    const HEADS: usize = 2;
    #[inline(always)]
    unsafe fn from_packed(o: [__m512i; 4], head: [__m512i; 2]) -> ([__m512i; 8], __m512, __m512) {
        q5_0_codes(split_nibbles(o), head)
    }
}

/// Packs the tile `w` (1..=16 rows of `row_bytes`) of a 4-bit type.
///
/// # Safety
/// See [`PackFn`](crate::backend::cpu::kernels::PackFn).
unsafe fn pack_nib<L: Nibbles>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
    let (_, nb, offs) = tile_shape(w, row_bytes, L::WB, "pack");
    assert!(dst.len() >= nb * L::SB_PACKED && (dst.as_ptr() as usize).is_multiple_of(64), "pack: destination too small or unaligned");
    // SAFETY: reads of 16 bytes at offsets 0 and QS_AT of each row's block lie in `w` (QS_AT + 16 <=
    // WB); writes within `dst` (checked above).
    unsafe { pack_nib_blocks::<L>(w.as_ptr(), w.len(), &offs, nb, dst.as_mut_ptr()) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn pack_nib_blocks<L: Nibbles>(w: *const u8, n_bytes: usize, offs: &Offsets, nb: usize, dst: *mut u8) {
    let mut pf = Prefetch::after(w, n_bytes, nb * 2);
    for b in 0..nb {
        let base = w.add(b * L::WB);
        let o = transpose16x4(base, offs, L::QS_AT, &mut pf);
        let head = transpose16x4(base, offs, 0, &mut pf);
        let p = dst.add(b * L::SB_PACKED);
        for (k, v) in o.into_iter().enumerate() {
            store(p.add(64 * k), v);
        }
        for k in 0..L::HEADS {
            store(p.add(256 + 64 * k), head[k]);
        }
    }
}

/// A tile packed by [`pack_nib`] times every token of `acts`.
///
/// # Safety
/// See [`PackedFn`](crate::backend::cpu::kernels::PackedFn).
unsafe fn packed_nib<L: Nibbles>(tile: &[u8], n: usize, nb: usize, acts: &QActs<'_>, out: *mut f32, out_stride: usize) {
    assert!((1..=16).contains(&n), "packed: bad tile");
    assert!(tile.len() >= nb * L::SB_PACKED && (tile.as_ptr() as usize).is_multiple_of(64), "packed: tile too small or unaligned");
    assert!(acts.fit(nb, L::AB, 1), "gemm: activations do not match the weights");
    // SAFETY: as in `packed`: the tile holds nb packed blocks, the activations fit them.
    unsafe { every_token(&NibPacked::<L> { p: tile.as_ptr(), nb, _l: PhantomData }, n, acts, out, out_stride) }
}

impl<L: Nibbles> TokenTile for NibPacked<L> {
    unsafe fn tokens<const T: usize>(&self, acts: &QActs<'_>, t0: usize, out: &Out) {
        packed_nib_t::<L, T>(self, acts, t0, out)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn packed_nib_t<L: Nibbles, const T: usize>(tile: &NibPacked<L>, acts: &QActs<'_>, t0: usize, out: &Out) {
    let mut src = NibPacked::<L> { p: tile.p, nb: tile.nb, _l: PhantomData };
    legacy::<T, _>(tile.nb, &Acts::<T>::rows(acts, t0, tile.nb, 1), out, &mut src);
}

/// A nibble-packed tile of `nb` blocks.
struct NibPacked<L> {
    p: *const u8,
    nb: usize,
    _l: PhantomData<L>,
}

impl<L: Nibbles, const T: usize> Blocks<T> for NibPacked<L> {
    #[inline(always)]
    unsafe fn block(&mut self, b: usize, a: &Acts<T>, acc: &mut [__m512; T]) {
        let p = self.p.add(b * L::SB_PACKED);
        let o = [load(p), load(p.add(64)), load(p.add(128)), load(p.add(192))];
        let head = [load(p.add(256)), if L::HEADS > 1 { load(p.add(320)) } else { _mm512_setzero_si512() }];
        let (c, dw, mw) = L::from_packed(o, head);
        let mut dp = legacy_init::<T>(L::MIN, b, a);
        for (i, ci) in c.into_iter().enumerate() {
            for t in 0..T {
                dp[t] = _mm512_dpbusd_epi32(dp[t], ci, splat_i32(a.bytes[t].add(b * L::AB + L::QS + 4 * i)));
            }
        }
        legacy_tail::<T>(dp, dw, mw, L::MIN, b, a, acc);
    }
}
