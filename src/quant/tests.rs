//! Unit tests for `quant`: layouts, round trips with bounded error, hand-packed k-quant blocks, errors.
//! Bit-exactness against ggml is `tests/quant_oracle.rs`.

use std::mem::size_of;

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::*;
use crate::dtype::GgmlType as T;

/// Normal data whose scale changes per block of 32 (1e-3 .. 1e3), so scales of every size are exercised.
fn random_weights(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut x = vec![0.0f32; n];
    for block in x.chunks_mut(32) {
        let scale = 10f32.powf(rng.gen_range(-3.0..3.0));
        for v in block.iter_mut() {
            *v = rng.sample::<f32, _>(StandardNormal) * scale;
        }
    }
    assert!(x.iter().any(|&v| v != 0.0));
    x
}

fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let mut q = vec![0u8; row_bytes(ty, x.len()).unwrap()];
    quantize(ty, x, &mut q).unwrap();
    let mut y = vec![f32::NAN; x.len()];
    dequantize(ty, &q, &mut y).unwrap();
    y
}

/// Checks |y - x| <= bound(block) for every weight, where `bound` sees the block's original values.
fn assert_bounded(ty: GgmlType, x: &[f32], y: &[f32], bound: impl Fn(&[f32]) -> f32) {
    let bs = ty.block_size().max(32);
    for (ib, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
        let limit = bound(xb);
        for (j, (&a, &b)) in xb.iter().zip(yb).enumerate() {
            assert!(
                (a - b).abs() <= limit,
                "{ty}: block {ib} element {j}: {a} -> {b}, error {} > bound {limit}",
                (a - b).abs()
            );
        }
    }
}

fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn range(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

#[test]
fn block_structs_match_the_dtype_table() {
    fn check<B: Block>() {
        assert_eq!(B::BYTES, size_of::<B>(), "{}", B::TYPE);
        assert_eq!(B::BYTES, B::TYPE.type_size(), "{}", B::TYPE);
        assert_eq!(B::ELEMS, B::TYPE.block_size(), "{}", B::TYPE);
    }
    check::<BlockQ4_0>();
    check::<BlockQ4_1>();
    check::<BlockQ5_0>();
    check::<BlockQ5_1>();
    check::<BlockQ8_0>();
    check::<BlockQ8_1>();
    check::<BlockQ2K>();
    check::<BlockQ3K>();
    check::<BlockQ4K>();
    check::<BlockQ5K>();
    check::<BlockQ6K>();
    check::<BlockQ8K>();
}

#[test]
fn read_then_write_gives_back_the_bytes() {
    fn check<B: Block>(rng: &mut StdRng) {
        for _ in 0..8 {
            let b: Vec<u8> = (0..B::BYTES).map(|_| rng.gen()).collect();
            let mut out = vec![0u8; B::BYTES];
            B::read(&b).write(&mut out);
            assert_eq!(b, out, "{}", B::TYPE);
        }
    }
    let rng = &mut StdRng::seed_from_u64(1);
    check::<BlockQ4_0>(rng);
    check::<BlockQ4_1>(rng);
    check::<BlockQ5_0>(rng);
    check::<BlockQ5_1>(rng);
    check::<BlockQ8_0>(rng);
    check::<BlockQ8_1>(rng);
    check::<BlockQ2K>(rng);
    check::<BlockQ3K>(rng);
    check::<BlockQ4K>(rng);
    check::<BlockQ5K>(rng);
    check::<BlockQ6K>(rng);
    check::<BlockQ8K>(rng);
}

#[test]
fn quantize_round_trips_have_bounded_error() {
    let rng = &mut StdRng::seed_from_u64(2);
    let x = random_weights(rng, 64 * QK_K);
    // f16 scales carry a relative error of up to 2^-11, times up to 31 (or 127) steps: the `1.1`/`+ 1/16`
    // terms below cover it. Symmetric 4/5-bit types clip +amax to 7 (15) steps, hence a full step there.
    let f16_rel = 1.0 / 2048.0;
    assert_bounded(T::Q8_0, &x, &round_trip(T::Q8_0, &x), |b| {
        amax(b) / 127.0 * 0.6
    });
    assert_bounded(T::Q8_1, &x, &round_trip(T::Q8_1, &x), |b| {
        amax(b) / 127.0 * 0.6
    });
    assert_bounded(T::Q8K, &x, &round_trip(T::Q8K, &x), |b| {
        amax(b) / 127.0 * 0.5001
    });
    assert_bounded(T::Q4_0, &x, &round_trip(T::Q4_0, &x), |b| {
        amax(b) / 8.0 * 1.01
    });
    assert_bounded(T::Q5_0, &x, &round_trip(T::Q5_0, &x), |b| {
        amax(b) / 16.0 * 1.02
    });
    assert_bounded(T::Q4_1, &x, &round_trip(T::Q4_1, &x), |b| {
        let (lo, hi) = range(b);
        (hi - lo) / 15.0 * (0.5 + 1.0 / 16.0) + lo.abs() * f16_rel
    });
    assert_bounded(T::Q5_1, &x, &round_trip(T::Q5_1, &x), |b| {
        let (lo, hi) = range(b);
        (hi - lo) / 31.0 * (0.5 + 1.0 / 16.0) + lo.abs() * f16_rel
    });
    assert_bounded(T::F32, &x, &round_trip(T::F32, &x), |_| 0.0);
    let y = round_trip(T::F16, &x);
    for (&a, &b) in x.iter().zip(&y) {
        // below 2^-14 f16 is subnormal: an absolute step of 2^-24
        assert!(
            (a - b).abs() <= a.abs() * f16_rel + 2f32.powi(-25),
            "F16: {a} -> {b}"
        );
    }
    let y = round_trip(T::BF16, &x);
    for (&a, &b) in x.iter().zip(&y) {
        assert!((a - b).abs() <= a.abs() / 256.0, "BF16: {a} -> {b}");
    }
}

#[test]
fn requantizing_dequantized_q8_blocks_is_stable() {
    // Values already on the grid of a block come back to the same bytes.
    let rng = &mut StdRng::seed_from_u64(3);
    let x = random_weights(rng, 8 * QK_K);
    for ty in [T::Q8_0, T::Q8K, T::Q4_0, T::Q4_1] {
        let mut q = vec![0u8; row_bytes(ty, x.len()).unwrap()];
        quantize(ty, &x, &mut q).unwrap();
        let mut y = vec![0.0; x.len()];
        dequantize(ty, &q, &mut y).unwrap();
        let mut q2 = vec![0u8; q.len()];
        quantize(ty, &y, &mut q2).unwrap();
        let mut y2 = vec![0.0; x.len()];
        dequantize(ty, &q2, &mut y2).unwrap();
        let err = y
            .iter()
            .zip(&y2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = amax(&x);
        assert!(err <= scale * 1e-2, "{ty}: requantized grid moved by {err}");
    }
}

// ---- hand-packed k-quant blocks: layouts re-derived from the struct docs, values from the formulas ----

fn dequant_block<B: Block>(b: &B) -> Vec<f32> {
    let mut bytes = vec![0u8; B::BYTES];
    b.write(&mut bytes);
    let mut y = vec![0.0; B::ELEMS];
    dequantize(B::TYPE, &bytes, &mut y).unwrap();
    y
}

fn rand_f16(rng: &mut StdRng) -> f16 {
    let v: f32 = rng.gen_range(1e-3..1e-1);
    f16::from_f32(if rng.gen() { v } else { -v })
}

#[test]
fn q2_k_hand_packed() {
    let rng = &mut StdRng::seed_from_u64(10);
    let q: Vec<u8> = (0..QK_K).map(|_| rng.gen_range(0..4)).collect();
    let (sc, mn): (Vec<u8>, Vec<u8>) = (0..16)
        .map(|_| (rng.gen_range(0..16), rng.gen_range(0..16)))
        .unzip();
    let (d, dmin) = (rand_f16(rng), rand_f16(rng));
    let mut b = BlockQ2K {
        scales: [0; 16],
        qs: [0; 64],
        d,
        dmin,
    };
    for s in 0..16 {
        b.scales[s] = sc[s] | (mn[s] << 4);
    }
    for (w, &qw) in q.iter().enumerate() {
        let (n, j, l) = (w / 128, (w % 128) / 32, w % 32);
        b.qs[32 * n + l] |= qw << (2 * j);
    }
    let y = dequant_block(&b);
    for (w, &qw) in q.iter().enumerate() {
        let s = w / 16;
        let want = d.to_f32() * sc[s] as f32 * qw as f32 - dmin.to_f32() * mn[s] as f32;
        assert_eq!(y[w].to_bits(), want.to_bits(), "Q2_K weight {w}");
    }
}

#[test]
fn q3_k_hand_packed() {
    let rng = &mut StdRng::seed_from_u64(11);
    let q: Vec<i32> = (0..QK_K).map(|_| rng.gen_range(-4..4)).collect();
    let sc: Vec<i32> = (0..16).map(|_| rng.gen_range(-32..32)).collect();
    let d = rand_f16(rng);
    let mut b = BlockQ3K {
        hmask: [0; 32],
        qs: [0; 64],
        scales: [0; 12],
        d,
    };
    for (w, &qw) in q.iter().enumerate() {
        let stored = (qw + 4) as u8; // 0..8: low 2 bits in qs, bit 2 in hmask
        let (n, j, l) = (w / 128, (w % 128) / 32, w % 32);
        b.qs[32 * n + l] |= (stored & 3) << (2 * j);
        b.hmask[w % 32] |= (stored >> 2) << (w / 32);
    }
    for (j, &s) in sc.iter().enumerate() {
        let v = (s + 32) as u8;
        if j < 8 {
            b.scales[j] |= v & 0x0f;
        } else {
            b.scales[j - 8] |= (v & 0x0f) << 4;
        }
        b.scales[8 + j % 4] |= (v >> 4) << (2 * (j / 4));
    }
    assert_eq!(unpack_q3k_scales(&b.scales).map(i32::from).to_vec(), sc);
    let y = dequant_block(&b);
    for (w, &qw) in q.iter().enumerate() {
        let want = d.to_f32() * sc[w / 16] as f32 * qw as f32;
        assert_eq!(y[w].to_bits(), want.to_bits(), "Q3_K weight {w}");
    }
}

/// Packs 8 (scale, min) pairs of 6 bits as Q4_K/Q5_K store them.
fn pack_k4_scales(sc: &[u8], mn: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
    }
    s
}

fn k4_case(seed: u64, qmax: u8) -> (Vec<u8>, Vec<u8>, Vec<u8>, f16, f16) {
    let rng = &mut StdRng::seed_from_u64(seed);
    let q = (0..QK_K).map(|_| rng.gen_range(0..qmax)).collect();
    let sc = (0..8).map(|_| rng.gen_range(0..64)).collect();
    let mn = (0..8).map(|_| rng.gen_range(0..64)).collect();
    (q, sc, mn, rand_f16(rng), rand_f16(rng))
}

#[test]
fn q4_k_hand_packed() {
    let (q, sc, mn, d, dmin) = k4_case(12, 16);
    let scales = pack_k4_scales(&sc, &mn);
    for j in 0..8 {
        assert_eq!(get_scale_min_k4(j, &scales), (sc[j], mn[j]));
    }
    let mut b = BlockQ4K {
        d,
        dmin,
        scales,
        qs: [0; 128],
    };
    for (w, &qw) in q.iter().enumerate() {
        let (j, half, l) = (w / 64, (w % 64) / 32, w % 32);
        b.qs[32 * j + l] |= qw << (4 * half);
    }
    let y = dequant_block(&b);
    for (w, &qw) in q.iter().enumerate() {
        let s = w / 32;
        let want = d.to_f32() * sc[s] as f32 * qw as f32 - dmin.to_f32() * mn[s] as f32;
        assert_eq!(y[w].to_bits(), want.to_bits(), "Q4_K weight {w}");
    }
}

#[test]
fn q5_k_hand_packed() {
    let (q, sc, mn, d, dmin) = k4_case(13, 32);
    let mut b = BlockQ5K {
        d,
        dmin,
        scales: pack_k4_scales(&sc, &mn),
        qh: [0; 32],
        qs: [0; 128],
    };
    for (w, &qw) in q.iter().enumerate() {
        let (j, half, l) = (w / 64, (w % 64) / 32, w % 32);
        b.qs[32 * j + l] |= (qw & 0x0f) << (4 * half);
        b.qh[l] |= (qw >> 4) << (2 * j + half);
    }
    let y = dequant_block(&b);
    for (w, &qw) in q.iter().enumerate() {
        let s = w / 32;
        let want = d.to_f32() * sc[s] as f32 * qw as f32 - dmin.to_f32() * mn[s] as f32;
        assert_eq!(y[w].to_bits(), want.to_bits(), "Q5_K weight {w}");
    }
}

#[test]
fn q6_k_hand_packed() {
    let rng = &mut StdRng::seed_from_u64(14);
    let q: Vec<u8> = (0..QK_K).map(|_| rng.gen_range(0..64)).collect();
    let sc: Vec<i8> = (0..16).map(|_| rng.gen()).collect();
    let d = rand_f16(rng);
    let mut b = BlockQ6K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d,
    };
    b.scales.copy_from_slice(&sc);
    for (w, &qw) in q.iter().enumerate() {
        let (n, k, l) = (w / 128, (w % 128) / 32, w % 32);
        // k = 0, 1: low nibbles of ql[64n + 32k + l]; k = 2, 3: high nibbles of ql[64n + 32(k-2) + l]
        b.ql[64 * n + 32 * (k % 2) + l] |= (qw & 0x0f) << (4 * (k / 2));
        b.qh[32 * n + l] |= (qw >> 4) << (2 * k);
    }
    let y = dequant_block(&b);
    for (w, &qw) in q.iter().enumerate() {
        let want = d.to_f32() * sc[w / 16] as f32 * (qw as i32 - 32) as f32;
        assert_eq!(y[w].to_bits(), want.to_bits(), "Q6_K weight {w}");
    }
}

#[test]
fn q8_k_quantize_fills_bsums_and_handles_zero_blocks() {
    let rng = &mut StdRng::seed_from_u64(15);
    let x = random_weights(rng, QK_K);
    let b = BlockQ8K::quantize(&x);
    for g in 0..16 {
        let sum: i16 = b.qs[16 * g..16 * g + 16]
            .iter()
            .map(|&q| i16::from(q))
            .sum();
        assert_eq!(b.bsums[g], sum);
    }
    assert!(b.qs.iter().any(|&q| q.unsigned_abs() == 127));
    let z = BlockQ8K::quantize(&[0.0; QK_K]);
    assert_eq!((z.d, z.qs, z.bsums), (0.0, [0; QK_K], [0; 16]));
}

// ---- helpers with ggml semantics ----

#[test]
fn nearest_int_rounds_half_to_even() {
    for (x, want) in [
        (0.5, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (-2.5, -2),
        (126.49, 126),
        (-127.0, -127),
    ] {
        assert_eq!(nearest_int(x), want, "{x}");
    }
    let rng = &mut StdRng::seed_from_u64(16);
    for _ in 0..10_000 {
        let x: f32 = rng.gen_range(-4_000_000.0..4_000_000.0);
        assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
    }
}

#[test]
fn bf16_conversion_matches_ggml() {
    assert_eq!(bf16_bits_from_f32(1.0), 0x3f80);
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bf16_bits_from_f32(f32::MAX), 0x7f80); // rounds to infinity
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0x7f80_0001)), 0x7fc0); // signalling NaN made quiet
    assert_eq!(bf16_bits_from_f32(f32::from_bits(0xffff_ffff)), 0xffff);
    assert_eq!(bf16_bits_to_f32(0xc040), -3.0);
    assert_eq!(f16_bits_to_f32(f16_bits_from_f32(65520.0)), f32::INFINITY);
}

// ---- errors, never panics ----

#[test]
fn bad_calls_are_typed_errors() {
    let mut y = [0.0f32; 64];
    assert_eq!(
        dequantize(T::IQ2XXS, &[0; 132], &mut y[..]),
        Err(QuantError::Unsupported {
            ty: T::IQ2XXS,
            op: "dequantize"
        })
    );
    let mut buf = [0u8; 144];
    assert!(matches!(
        quantize(T::Q4K, &[0.5; 256], &mut buf),
        Err(QuantError::Unsupported { .. })
    ));
    assert_eq!(
        dequantize(T::Q4_0, &[0; 18], &mut y[..31]),
        Err(QuantError::NotBlockMultiple {
            ty: T::Q4_0,
            n: 31,
            block_size: 32
        })
    );
    assert_eq!(
        dequantize(T::Q4_0, &[0; 35], &mut y[..]),
        Err(QuantError::LengthMismatch {
            ty: T::Q4_0,
            n: 64,
            expected: 36,
            got: 35
        })
    );
    assert!(matches!(
        quantize(T::Q8_0, &[1.0; 32], &mut buf[..33]),
        Err(QuantError::LengthMismatch { .. })
    ));
    assert!(matches!(
        dequantize(T::F16, &[0; 3], &mut y[..2]),
        Err(QuantError::LengthMismatch { .. })
    ));
    assert_eq!(row_bytes(T::Q6K, 512), Some(420));
    assert_eq!(row_bytes(T::Q6K, 100), None);
    assert_eq!(row_bytes(T::F32, usize::MAX), None);
    assert!(dequantize(T::Q8_0, &[], &mut []).is_ok());
    let msg = QuantError::LengthMismatch {
        ty: T::Q4_0,
        n: 64,
        expected: 36,
        got: 35,
    }
    .to_string();
    assert!(msg.contains("Q4_0") && msg.contains("36"), "{msg}");
}

#[test]
fn unaligned_source_decodes_the_same() {
    let rng = &mut StdRng::seed_from_u64(17);
    let x = random_weights(rng, 2 * QK_K);
    for ty in [T::Q8_0, T::Q5_1, T::Q8K, T::F16, T::F32] {
        let n_bytes = row_bytes(ty, x.len()).unwrap();
        let mut q = vec![0u8; n_bytes];
        quantize(ty, &x, &mut q).unwrap();
        let mut shifted = vec![0u8; n_bytes + 3];
        shifted[3..].copy_from_slice(&q);
        let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        dequantize(ty, &q, &mut a).unwrap();
        dequantize(ty, &shifted[3..], &mut b).unwrap();
        assert_eq!(a, b, "{ty}");
    }
}
