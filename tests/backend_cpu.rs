//! The CPU backend's kernels against naive f64 references on random inputs (never zeros), and the SIMD
//! kernel table against the scalar one (DESIGN.md, "Error bounds"):
//! - integer dots on quantized blocks: SIMD equals scalar bit for bit; scalar against the f64 dot of the
//!   dequantized blocks within f32 rounding (relative to sum |w_i a_i|);
//! - f32 kernels (rms_norm, silu, rope at small positions) < 1e-5 relative L2;
//! - kernels with f16 K/V or f16 intermediates (attention, GELU's f16 table) < 2e-3;
//! - matmul against the f64 product of the dequantized weights and the Q8-quantized activations < 1e-5
//!   (the activation quantization llama.cpp does too; against unquantized activations < 3e-2).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pagellm::backend::cpu::{
    act_side, aux_per_block, quantize_q8_0, quantize_q8_1, quantize_q8_k, CpuBackend, Kernels, QActs, Scratch,
};
use pagellm::backend::{
    AttnParams, AttnSeq, Backend, Glu, HostBytes, HostWeight, KvShape, RopeMode, RopeParams, Weight,
};
use pagellm::dtype::GgmlType;
use pagellm::model::{Logits, Model, ModelOptions, G, L};
use rand::Rng;

use common::backend::{buffer, dequant, randn, random_weights, read, rel_l2, rng, upload, Bytes};

// ---- a heap counter, for the weights-stay-in-the-map test ----

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Tests in this file run one at a time, so the heap measurement sees only its own allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- helpers ----

/// A backend per kernel table this machine runs, scalar first; a table that repacks a weight type
/// comes twice, repacking (its default) and reading every weight in place (`--no-repack`).
fn backends() -> Vec<(String, CpuBackend)> {
    let all = Kernels::all();
    println!("kernel tables: {:?}", all.iter().map(|k| k.name()).collect::<Vec<_>>());
    if all.len() == 1 {
        println!("no SIMD on this machine: SIMD-vs-scalar checks cover the scalar table only");
    }
    let mut v = Vec::new();
    for k in all {
        let packs = k.gemm.is_some_and(|g| !g.pack.is_empty());
        v.push((k.name().to_string(), CpuBackend::new(2, k).unwrap()));
        if packs {
            v.push((format!("{} in place", k.name()), CpuBackend::new(2, k).unwrap().with_repack(false)));
        }
    }
    v
}

/// Every SIMD table this machine runs (printing which ones are skipped).
fn simd_tables() -> Vec<Kernels> {
    let v: Vec<Kernels> = Kernels::all().into_iter().skip(1).collect();
    println!("SIMD tables checked against scalar: {:?}", v.iter().map(|k| k.name()).collect::<Vec<_>>());
    for (name, k) in [("avx2", Kernels::avx2()), ("avx512", Kernels::avx512()), ("neon", Kernels::neon())] {
        if k.is_none() {
            println!("{name}: not on this machine, skipped");
        }
    }
    v
}

// ---- dot products ----

/// An activation quantizer (`quantize_q8_*`).
type Quantizer = fn(&[f32], &mut [u8]);

/// (weight type, activation type, activation quantizer, kernel)
fn quant_dots(k: &Kernels) -> Vec<(GgmlType, GgmlType, Quantizer, pagellm::backend::cpu::QDotFn)> {
    vec![
        (GgmlType::Q4_0, GgmlType::Q8_0, quantize_q8_0, k.dot_q4_0),
        (GgmlType::Q4_1, GgmlType::Q8_1, quantize_q8_1, k.dot_q4_1),
        (GgmlType::Q5_0, GgmlType::Q8_0, quantize_q8_0, k.dot_q5_0),
        (GgmlType::Q8_0, GgmlType::Q8_0, quantize_q8_0, k.dot_q8_0),
        (GgmlType::Q4K, GgmlType::Q8K, quantize_q8_k, k.dot_q4_k),
        (GgmlType::Q6K, GgmlType::Q8K, quantize_q8_k, k.dot_q6_k),
    ]
}

#[test]
fn quantized_dots_match_dequantized_reference() {
    let _serial = serial();
    let mut r = rng(1);
    // the scalar table, and llama.cpp's float order (`--numerics llama.cpp`)
    let dots = [quant_dots(&Kernels::scalar()), quant_dots(&Kernels::llama_cpp())].concat();
    for (wty, aty, quantize, dot) in dots {
        // 2304 = 9 K-quant super-blocks = 72 legacy blocks: the 4-block SIMD loop and its tail both run
        for k in [256, 512, 2304] {
            let w = random_weights(&mut r, wty, 1, k);
            let x = randn(&mut r, k);
            let mut a = vec![0u8; k / aty.block_size() * aty.type_size()];
            quantize(&x, &mut a);
            let (wf, af) = (dequant(wty, &w, k), dequant(aty, &a, k));
            let exact: f64 = wf.iter().zip(&af).map(|(&p, &q)| p as f64 * q as f64).sum();
            let scale: f64 = wf.iter().zip(&af).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            let got = dot(&w, &a) as f64;
            // Q4_1's dot uses s = f16(d * sum q) where the dequantized activation has d * q: f16 rounding
            let bound = if wty == GgmlType::Q4_1 { 1e-3 } else { 1e-6 };
            let err = (got - exact).abs() / scale;
            assert!(err < bound, "{wty} k={k}: dot {got} vs {exact} (error {err:e} of sum |w a|)");
        }
    }
}

#[test]
fn simd_quantized_dots_equal_scalar_bit_for_bit() {
    let _serial = serial();
    let mut r = rng(2);
    for simd in simd_tables() {
        let pairs = quant_dots(&Kernels::scalar()).into_iter().zip(quant_dots(&simd));
        for ((wty, aty, quantize, scalar_dot), (_, _, _, simd_dot)) in pairs {
            for k in [256, 768, 2304, 4096] {
                for _ in 0..20 {
                    let w = random_weights(&mut r, wty, 1, k);
                    let mut a = vec![0u8; k / aty.block_size() * aty.type_size()];
                    quantize(&randn(&mut r, k), &mut a);
                    let (s, v) = (scalar_dot(&w, &a), simd_dot(&w, &a));
                    assert_eq!(s.to_bits(), v.to_bits(), "{wty} k={k}: scalar {s} vs {} {v}", simd.name());
                }
            }
        }
    }
}

/// The SIMD activation quantizers write the same bytes as the scalar ones (scales, codes, sums).
#[test]
fn simd_quantizers_equal_scalar_bit_for_bit() {
    let _serial = serial();
    let mut r = rng(12);
    let scalar = Kernels::scalar();
    for simd in simd_tables() {
        let pairs = [
            ("q8_0", 34, 32, scalar.quantize_q8_0, simd.quantize_q8_0),
            ("q8_1", 36, 32, scalar.quantize_q8_1, simd.quantize_q8_1),
            ("q8_k", 292, 256, scalar.quantize_q8_k, simd.quantize_q8_k),
        ];
        for (name, bytes, elems, s_q, v_q) in pairs {
            for n in [768, 1024, 2304] {
                let mut x = randn(&mut r, n);
                // edge cases: a block of zeros, ties of +-amax (the first one sets Q8_K's sign), exact halves
                x[..elems].fill(0.0);
                x[elems] = -3.0;
                x[elems + 5] = 3.0;
                x[2 * elems + 1] = 2.5;
                x[2 * elems + 2] = 127.0 / 2.0;
                let (mut a, mut b) = (vec![0u8; n / elems * bytes], vec![0u8; n / elems * bytes]);
                s_q(&x, &mut a);
                v_q(&x, &mut b);
                assert!(a == b, "{name} n={n}: {} quantizer differs from scalar", simd.name());
            }
        }
    }
}

/// Tile kernels: every (row, token) of a tile equals the scalar dot bit for bit, for 1..=16 rows and
/// batches of 1..=9 tokens (the 4-token register tiles, their remainders, the fused one-token path).
#[test]
fn simd_tiles_equal_scalar_dots_bit_for_bit() {
    let _serial = serial();
    let mut r = rng(13);
    let mut scratch = Scratch::default();
    let tables: Vec<Kernels> = simd_tables().into_iter().filter(|k| k.gemm.is_some()).collect();
    if tables.is_empty() {
        println!("skipped: no table with tile kernels on this machine");
    }
    for simd in tables {
        let gemm = simd.gemm.unwrap();
        for (wty, aty, quantize, scalar_dot) in quant_dots(&Kernels::scalar()) {
            let tile = gemm.get(wty).expect("a tile kernel for every quantized type");
            let shapes =
                [(256, 16, 9), (512, 1, 1), (768, 7, 4), (2304, 16, 5), (1024, 13, 2), (4096, 3, 3), (2304, 16, 1)];
            let shapes = shapes.into_iter().chain([(768, 11, 1)]);
            for (k, n_rows, n_tok) in shapes {
                let w = random_weights(&mut r, wty, n_rows, k);
                let row_bytes = w.len() / n_rows;
                let a_row = k / aty.block_size() * aty.type_size();
                let mut a = vec![0u8; n_tok * a_row];
                quantize(&randn(&mut r, n_tok * k), &mut a);
                let (nb, apb) = (k / aty.block_size(), aux_per_block(wty));
                let (mut d, mut aux) = (vec![0.0f32; n_tok * nb], vec![0i32; n_tok * nb * apb]);
                for ((blk, d), aux) in a.chunks_exact(aty.type_size()).zip(&mut d).zip(aux.chunks_exact_mut(apb)) {
                    act_side(wty, blk, d, aux);
                }
                let acts = QActs { n_tok, row_bytes: a_row, bytes: &a, d: &d, aux: &aux };
                // stride 17: rows past n_rows and the 17th lane must stay untouched
                let mut out = vec![f32::NAN; n_tok * 17];
                // SAFETY: out holds n_tok rows of 17 >= n_rows values; nothing else touches it.
                unsafe { tile(&w, row_bytes, &acts, &mut scratch, out.as_mut_ptr(), 17) };
                let mut outs = vec![("tile", out)];
                // the packed kernel, where the table packs this type: same results from the packed copy
                if let Some(p) = gemm.pack_for(wty) {
                    let mut packed = Scratch::default();
                    let dst = &mut packed.get(p.tile_bytes(nb))[..p.tile_bytes(nb)];
                    // SAFETY: the table was built after feature detection; dst is 64-byte aligned and
                    // one tile long.
                    unsafe { (p.pack)(&w, row_bytes, dst) };
                    let mut out = vec![f32::NAN; n_tok * 17];
                    // SAFETY: as for the tile above.
                    unsafe { (p.gemm)(dst, n_rows, nb, &acts, out.as_mut_ptr(), 17) };
                    outs.push(("packed", out));
                }
                for (kind, out) in &outs {
                    for (i, v) in out.iter().enumerate() {
                        assert!(i % 17 < n_rows || v.is_nan(), "{wty}: {kind} wrote past its rows");
                    }
                    for t in 0..n_tok {
                        for row in 0..n_rows {
                            let w_row = &w[row * row_bytes..(row + 1) * row_bytes];
                            let s = scalar_dot(w_row, &a[t * a_row..(t + 1) * a_row]);
                            let v = out[t * 17 + row];
                            let what =
                                format!("{wty} k={k} row {row} token {t}: scalar {s} vs {} {kind} {v}", simd.name());
                            assert_eq!(s.to_bits(), v.to_bits(), "{what}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn float_dots_agree() {
    let _serial = serial();
    let mut r = rng(3);
    for k in &Kernels::all() {
        for n in [1, 7, 64, 257, 1000] {
            let (a, b) = (randn(&mut r, n), randn(&mut r, n));
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let scale: f64 = a.iter().zip(&b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum();
            assert!(((k.dot_f32)(&a, &b) as f64 - exact).abs() / scale < 1e-6, "dot_f32 n={n}");
            let wb: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(((k.dot_f32w)(&wb, &b) as f64 - exact).abs() / scale < 1e-6, "dot_f32w n={n}");
            let h: Vec<u16> = a.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let ah: Vec<f64> = h.iter().map(|&v| half::f16::from_bits(v).to_f64()).collect();
            let exact_h: f64 = ah.iter().zip(&b).map(|(&x, &y)| x * y as f64).sum();
            assert!(((k.dot_f16)(&h, &b) as f64 - exact_h).abs() / scale < 1e-6, "dot_f16 n={n}");
            let hb: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(((k.dot_f16w)(&hb, &b) as f64 - exact_h).abs() / scale < 1e-6, "dot_f16w n={n}");
            let mut y = b.clone();
            (k.axpy_f16)(&mut y, 0.37, &h);
            let want: Vec<f64> = b.iter().zip(&ah).map(|(&y, &x)| y as f64 + 0.37 * x).collect();
            assert!(rel_l2(&y, &want) < 1e-6, "axpy_f16 n={n}");
        }
    }
}

/// The float order every SIMD table's float dots share (avx2.rs's; neon.rs follows it, so the tables
/// agree across architectures): 4 sums of 8 lanes by FMA over 32-element steps, a last 8s into the
/// first, `(a0 + a1) + (a2 + a3)`, the tree `((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`, then the
/// last `n % 8` products rounded and added one by one.
fn dot_4x8(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut a = [[0.0f32; 8]; 4];
    let mut fma = |j: usize, i: usize| (0..8).for_each(|l| a[j][l] = w[i + l].mul_add(x[i + l], a[j][l]));
    let mut i = 0;
    while i + 32 <= n {
        (0..4).for_each(|j| fma(j, i + 8 * j));
        i += 32;
    }
    while i + 8 <= n {
        fma(0, i);
        i += 8;
    }
    let v: [f32; 8] = std::array::from_fn(|l| (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]));
    let s = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
    (i..n).fold(s, |s, k| s + w[k] * x[k])
}

/// Every SIMD table's float dots (f32 and f16, as slices and as weight bytes) equal [`dot_4x8`] bit for
/// bit, and `axpy_f16` is one FMA per element (the last `n % 8`: a rounded product, then the add), on
/// lengths around every step.
#[test]
fn simd_float_dots_share_one_order() {
    let _serial = serial();
    let mut r = rng(31);
    for k in simd_tables() {
        for n in [1, 7, 8, 9, 16, 24, 31, 32, 33, 40, 63, 64, 100, 257, 1000] {
            let (a, b) = (randn(&mut r, n), randn(&mut r, n));
            let h: Vec<u16> = a.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let ah: Vec<f32> = h.iter().map(|&v| half::f16::from_bits(v).to_f32()).collect();
            let wb: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
            let hb: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            let (want, want_h) = (dot_4x8(&a, &b), dot_4x8(&ah, &b));
            for (what, got, want) in [
                ("dot_f32", (k.dot_f32)(&a, &b), want),
                ("dot_f32w", (k.dot_f32w)(&wb, &b), want),
                ("dot_f16", (k.dot_f16)(&h, &b), want_h),
                ("dot_f16w", (k.dot_f16w)(&hb, &b), want_h),
            ] {
                assert_eq!(got.to_bits(), want.to_bits(), "{} {what} n={n}: {got} vs the 4 x 8 order {want}", k.name());
            }
            let mut y = b.clone();
            (k.axpy_f16)(&mut y, 0.37, &h);
            let fused = n / 8 * 8;
            let want = |i: usize| if i < fused { 0.37f32.mul_add(ah[i], b[i]) } else { b[i] + 0.37 * ah[i] };
            assert!(y.iter().enumerate().all(|(i, g)| g.to_bits() == want(i).to_bits()), "{} axpy_f16 n={n}", k.name());
        }
    }
}

#[test]
fn activation_quantizers_round_within_half_a_step() {
    let _serial = serial();
    let mut r = rng(4);
    let x = randn(&mut r, 1024);
    for (ty, quantize) in [(GgmlType::Q8_0, quantize_q8_0 as Quantizer), (GgmlType::Q8_1, quantize_q8_1), (GgmlType::Q8K, quantize_q8_k)] {
        let mut a = vec![0u8; 1024 / ty.block_size() * ty.type_size()];
        quantize(&x, &mut a);
        let back = dequant(ty, &a, 1024);
        for (blk, (xs, bs)) in x.chunks(ty.block_size()).zip(back.chunks(ty.block_size())).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (&v, &q) in xs.iter().zip(bs) {
                // half a step of amax/127, plus the f16 rounding of the scale (Q8_0/Q8_1)
                assert!((v - q).abs() <= amax / 127.0 * 0.5 + amax * 1e-3, "{ty} block {blk}: {v} -> {q}");
            }
        }
    }
}

// ---- matmul ----

#[test]
fn matmul_matches_reference_and_simd_equals_scalar() {
    let _serial = serial();
    let bks = backends();
    let mut r = rng(5);
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        // generic path: dequantized rows, f32 dots
        GgmlType::Q5_1,
        GgmlType::Q5K,
    ];
    let (n_rows, k, n_tok) = (37, 512, 5);
    // the activation format llama.cpp (and pagellm) quantize x to for each weight type
    let act = |ty: GgmlType| -> Option<(GgmlType, Quantizer)> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some((GgmlType::Q8_0, quantize_q8_0)),
            GgmlType::Q4_1 => Some((GgmlType::Q8_1, quantize_q8_1)),
            GgmlType::Q4K | GgmlType::Q6K => Some((GgmlType::Q8K, quantize_q8_k)),
            _ => None,
        }
    };
    for ty in types {
        let w = random_weights(&mut r, ty, n_rows, k);
        let wf = dequant(ty, &w, n_rows * k);
        let x = randn(&mut r, n_tok * k);
        // x as the kernel sees it: Q8-quantized for the integer paths
        let xq = match act(ty) {
            Some((aty, quantize)) => {
                let mut a = vec![0u8; n_tok * k / aty.block_size() * aty.type_size()];
                quantize(&x, &mut a);
                dequant(aty, &a, n_tok * k)
            }
            None => x.clone(),
        };
        let product = |x: &[f32]| -> Vec<f64> { (0..n_tok)
            .flat_map(|t| {
                let (wf, x) = (&wf, &x);
                (0..n_rows).map(move |row| (0..k).map(|i| wf[row * k + i] as f64 * x[t * k + i] as f64).sum())
            })
            .collect() };
        let (want, want_q) = (product(&x), product(&xq));
        let mut outs = Vec::new();
        for (name, b) in &bks {
            let wt = upload(b, ty, w.clone(), k, n_rows);
            let xb = buffer(b, &x);
            let mut out = b.alloc(n_tok * n_rows).unwrap();
            let packed_before = b.weight_bytes_copied();
            b.matmul(&wt, &xb, n_tok, &mut out);
            let got = read(b, &out, n_tok * n_rows);
            // the packed path ran where the table packs this type (and only there)
            let packed = b.weight_bytes_copied() - packed_before;
            assert_eq!(packed > 0, b.repacks(ty), "{name} {ty}: packed {packed} bytes");
            // against the product with the quantized activations: f32 rounding only (Q4_1: f16 of s)
            let bound = if ty == GgmlType::Q4_1 { 1e-3 } else { 1e-5 };
            let err = rel_l2(&got, &want_q);
            assert!(err < bound, "{name} {ty}: matmul error {err:e} > {bound:e}");
            // against the exact product: the activation quantization's own error
            let err = rel_l2(&got, &want);
            assert!(err < 3e-2, "{name} {ty}: matmul error vs unquantized activations {err:e}");

            // batch invariance: token 3 alone gives the same row, bit for bit
            let x3 = buffer(b, &x[3 * k..4 * k]);
            let mut o3 = b.alloc(n_rows).unwrap();
            b.matmul(&wt, &x3, 1, &mut o3);
            assert!(read(b, &o3, n_rows) == got[3 * n_rows..4 * n_rows], "{name} {ty}: batch-dependent result");
            outs.push(got);
        }
        let exact = !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q5_1 | GgmlType::Q5K);
        for ((name, _), got) in bks.iter().zip(&outs).skip(1) {
            if exact {
                assert!(got == &outs[0], "{ty}: {name} matmul differs from scalar");
            } else {
                let s: Vec<f64> = outs[0].iter().map(|&v| v as f64).collect();
                assert!(rel_l2(got, &s) < 1e-5, "{ty}: {name} vs scalar");
            }
        }
    }
}

#[test]
fn unsupported_weights_are_refused() {
    let _serial = serial();
    let b = CpuBackend::new(1, Kernels::scalar()).unwrap();
    let source: Arc<dyn HostBytes> = Arc::new(Bytes(vec![0; 64]));
    let mk = |ty, row_len, n_rows| HostWeight { name: "t".into(), ty, row_len, n_rows, source: source.clone(), offset: 0 };
    assert!(b.upload_weight(&mk(GgmlType::IQ2XXS, 256, 1)).is_err());
    assert!(b.upload_weight(&mk(GgmlType::Q4_0, 33, 1)).is_err(), "row not a whole block");
    assert!(b.upload_weight(&mk(GgmlType::Q8_0, 32, 2)).is_err(), "runs past the source");
}

// ---- elementwise ops ----

#[test]
fn embed_rms_norm_glu_match_reference() {
    let _serial = serial();
    let mut r = rng(6);
    for (name, b) in backends() {
        // embeddings: dequantized rows
        let (vocab, dim) = (50, 64);
        let table = random_weights(&mut r, GgmlType::Q8_0, vocab, dim);
        let tw = upload(&b, GgmlType::Q8_0, table.clone(), dim, vocab);
        let toks = [3u32, 49, 0, 3];
        let mut out = b.alloc(toks.len() * dim).unwrap();
        b.embed(&tw, &toks, &mut out);
        let got = read(&b, &out, toks.len() * dim);
        for (i, &t) in toks.iter().enumerate() {
            let row = &table[t as usize * 68..(t as usize + 1) * 68];
            assert_eq!(got[i * dim..(i + 1) * dim], dequant(GgmlType::Q8_0, row, dim)[..], "{name} embed");
        }

        // rms_norm with a weight: whole rows and per-head
        for (row_len, n_rows) in [(576, 7), (64, 21)] {
            let x = randn(&mut r, row_len * n_rows);
            let g = randn(&mut r, row_len);
            let gw = upload(&b, GgmlType::F32, g.iter().flat_map(|v| v.to_le_bytes()).collect(), row_len, 1);
            let mut o = b.alloc(x.len()).unwrap();
            b.rms_norm(&buffer(&b, &x), Some(&gw), row_len, n_rows, 1e-6, &mut o);
            let want: Vec<f64> = x
                .chunks(row_len)
                .flat_map(|row| {
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row_len as f64;
                    let s = 1.0 / (ms + 1e-6).sqrt();
                    row.iter().zip(&g).map(move |(&v, &gg)| v as f64 * s * gg as f64).collect::<Vec<_>>()
                })
                .collect();
            let err = rel_l2(&read(&b, &o, x.len()), &want);
            assert!(err < 1e-5, "{name} rms_norm {row_len}: {err:e}");
        }

        // GLUs
        let n = 3000;
        let (gate, up) = (randn(&mut r, n), randn(&mut r, n));
        for (act, bound) in [(Glu::Silu, 1e-5), (Glu::GeluTanh, 2e-3)] {
            let mut gb = buffer(&b, &gate);
            b.glu(&mut gb, &buffer(&b, &up), n, act);
            let want: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(&x, &u)| {
                    let (x, u) = (x as f64, u as f64);
                    let a = match act {
                        Glu::Silu => x / (1.0 + (-x).exp()),
                        Glu::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
                    };
                    a * u
                })
                .collect();
            let err = rel_l2(&read(&b, &gb, n), &want);
            assert!(err < bound, "{name} {act:?}: {err:e}");
        }

        // add, scale, get_rows
        let (x, y) = (randn(&mut r, 100), randn(&mut r, 100));
        let mut xb = buffer(&b, &x);
        b.add(&mut xb, &buffer(&b, &y), 100);
        b.scale(&mut xb, 0.5, 100);
        let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &c)| (a as f64 + c as f64) * 0.5).collect();
        assert!(rel_l2(&read(&b, &xb, 100), &want) < 1e-6);
        let mut rows = b.alloc(20).unwrap();
        b.get_rows(&xb, 10, &[7, 2], &mut rows);
        let all = read(&b, &xb, 100);
        assert_eq!(read(&b, &rows, 20), [&all[70..80], &all[20..30]].concat());
    }
}

fn rope_ref(x: &[f32], pos: &[u32], n_heads: usize, hd: usize, p: &RopeParams) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (t, &ps) in pos.iter().enumerate() {
        for h in 0..n_heads {
            let head = &mut out[(t * n_heads + h) * hd..][..hd];
            for i in 0..p.n_rot / 2 {
                let ff = p.freq_factors.map_or(1.0, |f| f[i] as f64);
                let theta = ps as f64 * p.freq_scale as f64 * (p.freq_base as f64).powf(-2.0 * i as f64 / p.n_rot as f64) / ff;
                let (a, b) = match p.mode {
                    RopeMode::Norm => (2 * i, 2 * i + 1),
                    RopeMode::Neox => (i, i + p.n_rot / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * theta.cos() - x1 * theta.sin();
                head[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    }
    out
}

#[test]
fn rope_both_modes_match_reference() {
    let _serial = serial();
    let mut r = rng(7);
    let factors: Vec<f32> = (0..24).map(|_| r.gen_range(1.0f32..8.0)).collect();
    for (name, b) in backends() {
        for mode in [RopeMode::Norm, RopeMode::Neox] {
            // (positions, bound): f32 cannot hold an angle of ~4000 rad better than ~1e-4
            for (p0, bound) in [(0u32, 1e-5), (4000, 5e-4)] {
                for (n_rot, scale, ff) in [(64, 1.0, None), (48, 0.25, Some(&factors[..]))] {
                    let (n_heads, hd, n) = (3, 64, 9);
                    let x = randn(&mut r, n * n_heads * hd);
                    let pos: Vec<u32> = (0..n as u32).map(|i| p0 + i * 7).collect();
                    let p = RopeParams { mode, n_rot, freq_base: 10000.0, freq_scale: scale, freq_factors: ff };
                    let mut xb = buffer(&b, &x);
                    b.rope(&mut xb, &pos, n_heads, hd, &p);
                    let err = rel_l2(&read(&b, &xb, x.len()), &rope_ref(&x, &pos, n_heads, hd, &p));
                    assert!(err < bound, "{name} {mode:?} n_rot {n_rot} pos {p0}: {err:e}");
                }
            }
        }
    }
}

// ---- paged attention ----

/// Naive attention in f64 over f16-rounded K/V: q [n_q x n_heads x hd] at positions ctx-n_q..ctx.
fn attn_ref(q: &[f32], k: &[f32], v: &[f32], ctx: usize, n_q: usize, p: &AttnParams) -> Vec<f64> {
    let (hd, nh, nkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    let r16 = |x: f32| half::f16::from_f32(x).to_f64();
    let mut out = vec![0.0; n_q * nh * hd];
    for i in 0..n_q {
        let pos = ctx - n_q + i;
        for h in 0..nh {
            let g = h / (nh / nkv);
            let qv = &q[(i * nh + h) * hd..][..hd];
            let keys: Vec<usize> = (0..=pos).filter(|&j| p.window.is_none_or(|w| pos - j < w)).collect();
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| (0..hd).map(|d| qv[d] as f64 * r16(k[(j * nkv + g) * hd + d])).sum::<f64>() * p.scale as f64)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (&j, &ej) in keys.iter().zip(&e) {
                for d in 0..hd {
                    out[(i * nh + h) * hd + d] += ej / z * r16(v[(j * nkv + g) * hd + d]);
                }
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_reference() {
    let _serial = serial();
    let mut r = rng(8);
    let (nh, nkv, hd, bs) = (6, 2, 64, 16);
    let shape = KvShape { num_blocks: 16, block_size: bs, n_kv_heads: nkv, head_dim: hd };
    // two sequences with scattered blocks: 70 tokens (50 cached + 20 new), 37 tokens (30 + 7)
    let tables: [Vec<u32>; 2] = [vec![7, 2, 9, 0, 11], vec![3, 14, 5]];
    let (ctx, n_new) = ([70usize, 37], [20usize, 7]);
    let mut outs = Vec::new();
    for window in [None, Some(24)] {
        let p = AttnParams { n_heads: nh, n_kv_heads: nkv, head_dim: hd, scale: 0.125, window };
        let kvs: Vec<(Vec<f32>, Vec<f32>)> = ctx.iter().map(|&c| (randn(&mut r, c * nkv * hd), randn(&mut r, c * nkv * hd))).collect();
        let qs: Vec<Vec<f32>> = n_new.iter().map(|&n| randn(&mut r, n * nh * hd)).collect();
        let mut per_backend = Vec::new();
        for (name, b) in backends() {
            let mut kv = b.alloc_kv(shape).unwrap();
            // the cached prefixes first, then the new tokens, each through its block table
            for (s, (k, v)) in kvs.iter().enumerate() {
                let slot = |j: usize| tables[s][j / bs] * bs as u32 + (j % bs) as u32;
                for range in [0..ctx[s] - n_new[s], ctx[s] - n_new[s]..ctx[s]] {
                    let w = nkv * hd;
                    let kb = buffer(&b, &k[range.start * w..range.end * w]);
                    let vb = buffer(&b, &v[range.start * w..range.end * w]);
                    b.kv_write(&mut kv, &kb, &vb, &range.map(slot).collect::<Vec<_>>());
                }
            }
            // both sequences' new tokens in one call
            let q_all: Vec<f32> = qs.concat();
            let seqs = [
                AttnSeq { q_start: 0, n_q: n_new[0], ctx_len: ctx[0], block_table: &tables[0], view: None },
                AttnSeq { q_start: n_new[0], n_q: n_new[1], ctx_len: ctx[1], block_table: &tables[1], view: None },
            ];
            let mut out = b.alloc(q_all.len()).unwrap();
            b.attention(&buffer(&b, &q_all), &kv, &seqs, &p, &mut out, None);
            let got = read(&b, &out, q_all.len());
            let split = n_new[0] * nh * hd;
            for s in 0..2 {
                let part = if s == 0 { &got[..split] } else { &got[split..] };
                let want = attn_ref(&qs[s], &kvs[s].0, &kvs[s].1, ctx[s], n_new[s], &p);
                let err = rel_l2(part, &want);
                assert!(err < 2e-3, "{name} window {window:?} seq {s}: {err:e}");
            }
            // decode-style: the last token of sequence 0 alone gives the same row, bit for bit
            let last = &qs[0][(n_new[0] - 1) * nh * hd..];
            let mut o1 = b.alloc(nh * hd).unwrap();
            let one = [AttnSeq { q_start: 0, n_q: 1, ctx_len: ctx[0], block_table: &tables[0], view: None }];
            b.attention(&buffer(&b, last), &kv, &one, &p, &mut o1, None);
            assert!(read(&b, &o1, nh * hd) == got[split - nh * hd..split], "{name}: attention depends on the batch");
            per_backend.push(got);
        }
        outs.push(per_backend);
    }
    for per_backend in &outs {
        let s: Vec<f64> = per_backend[0].iter().map(|&v| v as f64).collect();
        for got in &per_backend[1..] {
            let err = rel_l2(got, &s);
            assert!(err < 1e-3, "attention SIMD vs scalar: {err:e}");
        }
    }
}

/// `--numerics llama.cpp`: every op it changes (matmul per batch shape, norm, RoPE, GLUs, attention
/// one token and batched) computes the same function as the f64 references, within the bounds of the
/// native kernels. (That its float order is llama.cpp's is held by tests/model_greedy.rs: the two real
/// models give llama.cpp's logits bit for bit.)
#[test]
fn llama_numerics_ops_match_reference() {
    let _serial = serial();
    let mut r = rng(9);
    let b = CpuBackend::new(2, Kernels::detect()).unwrap().with_llama_numerics();
    println!("{}", b.name());
    let k = 512;
    for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
        let (aty, quantize): (GgmlType, Quantizer) = match ty {
            GgmlType::Q4_1 => (GgmlType::Q8_1, quantize_q8_1),
            GgmlType::Q4K | GgmlType::Q6K => (GgmlType::Q8K, quantize_q8_k),
            _ => (GgmlType::Q8_0, quantize_q8_0),
        };
        let n_rows = 24;
        let w = random_weights(&mut r, ty, n_rows, k);
        let (wf, wt) = (dequant(ty, &w, n_rows * k), upload(&b, ty, w.clone(), k, n_rows));
        // 1 token (gemv), 6 (a gemm four and two gemv rows), 9 (Q6_K's tiled kernel)
        for n_tok in [1, 6, 9] {
            let x = randn(&mut r, n_tok * k);
            let mut a = vec![0u8; n_tok * k / aty.block_size() * aty.type_size()];
            quantize(&x, &mut a);
            let xq = dequant(aty, &a, n_tok * k);
            let want: Vec<f64> = (0..n_tok * n_rows)
                .map(|o| (0..k).map(|i| wf[(o % n_rows) * k + i] as f64 * xq[(o / n_rows) * k + i] as f64).sum())
                .collect();
            let mut out = b.alloc(n_tok * n_rows).unwrap();
            b.matmul(&wt, &buffer(&b, &x), n_tok, &mut out);
            let err = rel_l2(&read(&b, &out, n_tok * n_rows), &want);
            let bound = if ty == GgmlType::Q4_1 { 1e-3 } else { 1e-5 };
            assert!(err < bound, "{ty} x {n_tok} tokens: matmul error {err:e}");
        }
    }

    // rms_norm, RoPE, SwiGLU and GeGLU
    let (dim, n) = (640, 3);
    let x = randn(&mut r, n * dim);
    let mut out = b.alloc(n * dim).unwrap();
    b.rms_norm(&buffer(&b, &x), None, dim, n, 1e-6, &mut out);
    let want: Vec<f64> = x
        .chunks(dim)
        .flat_map(|row| {
            let s = (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64 + 1e-6).sqrt();
            row.iter().map(move |&v| v as f64 / s)
        })
        .collect();
    assert!(rel_l2(&read(&b, &out, n * dim), &want) < 1e-6, "rms_norm");
    let p = RopeParams { mode: RopeMode::Norm, n_rot: 64, freq_base: 10000.0, freq_scale: 1.0, freq_factors: None };
    let (pos, xr) = ([0u32, 5, 77], randn(&mut r, 3 * 2 * 64));
    let mut xb = buffer(&b, &xr);
    b.rope(&mut xb, &pos, 2, 64, &p);
    assert!(rel_l2(&read(&b, &xb, xr.len()), &rope_ref(&xr, &pos, 2, 64, &p)) < 1e-5, "rope");
    let (g, u) = (randn(&mut r, 2048), randn(&mut r, 2048));
    for (act, f, bound) in [
        (Glu::Silu, (|x: f64| x / (1.0 + (-x).exp())) as fn(f64) -> f64, 1e-6),
        // GeGLU goes through an f16 table: f16 rounding of the gate
        (Glu::GeluTanh, |x: f64| 0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh()), 1e-3),
    ] {
        let mut gb = buffer(&b, &g);
        b.glu(&mut gb, &buffer(&b, &u), g.len(), act);
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| f(g as f64) * u as f64).collect();
        let err = rel_l2(&read(&b, &gb, g.len()), &want);
        assert!(err < bound, "{act:?}: {err:e}");
    }

    // attention: one sequence of 40 tokens, the last 9 new (batched, tinyBLAS order), then 1 (decode);
    // head dim 80 also runs the f64 tail of ggml_vec_dot_f16 (dims 64..80)
    for hd in [64, 80] {
        let (nh, nkv, bs) = (4, 2, 16);
        let shape = KvShape { num_blocks: 4, block_size: bs, n_kv_heads: nkv, head_dim: hd };
        let table = [2u32, 0, 3];
        let ctx = 40;
        let (kf, vf) = (randn(&mut r, ctx * nkv * hd), randn(&mut r, ctx * nkv * hd));
        let mut kv = b.alloc_kv(shape).unwrap();
        let slots: Vec<u32> = (0..ctx).map(|j| table[j / bs] * bs as u32 + (j % bs) as u32).collect();
        b.kv_write(&mut kv, &buffer(&b, &kf), &buffer(&b, &vf), &slots);
        for (n_q, window) in [(9, None), (1, None), (9, Some(12))] {
            let p = AttnParams { n_heads: nh, n_kv_heads: nkv, head_dim: hd, scale: 0.125, window };
            let q = randn(&mut r, n_q * nh * hd);
            let seqs = [AttnSeq { q_start: 0, n_q, ctx_len: ctx, block_table: &table, view: None }];
            let mut out = b.alloc(q.len()).unwrap();
            b.attention(&buffer(&b, &q), &kv, &seqs, &p, &mut out, None);
            let err = rel_l2(&read(&b, &out, q.len()), &attn_ref(&q, &kf, &vf, ctx, n_q, &p));
            assert!(err < 2e-3, "attention hd {hd}, {n_q} queries, window {window:?}: {err:e}");
        }
    }
}

// ---- weights are read in place ----

#[test]
fn weights_are_views_of_their_source() {
    let _serial = serial();
    let b = CpuBackend::new(1, Kernels::detect()).unwrap();
    let mut r = rng(9);
    let bytes = random_weights(&mut r, GgmlType::Q4_0, 8, 64);
    let src = Arc::new(Bytes(bytes));
    let range = src.0.as_ptr_range();
    let source: Arc<dyn HostBytes> = src.clone();
    let w = b
        .upload_weight(&HostWeight { name: "w".into(), ty: GgmlType::Q4_0, row_len: 64, n_rows: 4, source, offset: 4 * 36 })
        .unwrap();
    let data = b.weight_data(&w);
    assert!(range.contains(&data.as_ptr()) && data.len() == 4 * 36, "weight was copied");
    assert_eq!(b.weight_bytes_copied(), 0);
}

/// Loading a real model and running it allocates far less heap than the model's size.
#[test]
fn model_weights_stay_in_the_map() {
    let _serial = serial();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        assert!(std::env::var_os("CI").is_none(), "model {} is missing", path.display());
        println!("skipped: model {} is missing", path.display());
        return;
    }
    let file = Arc::new(pagellm::gguf::GgufFile::open(&path).unwrap());
    let size = file.file_size() as usize;
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let cpu = Arc::new(CpuBackend::new(2, Kernels::detect()).unwrap().with_repack(false));
    let opts = ModelOptions { ctx: 256, threads: 2 };
    let model = Model::load_on(file.clone(), opts, cpu.clone()).unwrap();
    let mut sess = model.new_session(256).unwrap();
    let logits = model.forward(&mut sess, &[2, 651, 6037, 529], Logits::Last).unwrap();
    assert_eq!(logits.len(), model.config().n_vocab);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    println!("model file {} MiB, peak heap growth {} MiB", size >> 20, peak >> 20);
    assert!(peak < size / 8, "heap grew by {peak} bytes for a {size}-byte model: weights were copied?");

    // every weight the backend holds is a slice of the map
    let map = file.bytes().as_ptr_range();
    let inside = |w: &Weight| {
        let d = cpu.weight_data(w);
        map.contains(&d.as_ptr()) && d.as_ptr_range().end <= map.end
    };
    let w = model.weights();
    assert!([G::TokenEmbd, G::OutputNorm].iter().all(|&g| inside(w.get(g))) && inside(w.output()));
    let all = [
        L::AttnNorm, L::Q, L::K, L::V, L::QBias, L::KBias, L::VBias, L::QNorm, L::KNorm, L::Out,
        L::PostAttnNorm, L::FfnNorm, L::Gate, L::Up, L::Down, L::PostFfwNorm,
    ];
    let mut n = 0;
    for layer in &w.layers {
        for t in all {
            if let Some(x) = layer.opt(t) {
                assert!(inside(x), "{t:?} is not in the map");
                n += 1;
            }
        }
    }
    assert_eq!(n, 13 * model.config().n_layers, "gemma3 has 13 tensors per layer");
    assert_eq!(cpu.weight_bytes_copied(), 0);
    drop((sess, model, cpu));

    // repacking (the default): the heap grows by the packed copies the backend reports, and no more
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let cpu = Arc::new(CpuBackend::new(2, Kernels::detect()).unwrap());
    let model = Model::load_on(file.clone(), opts, cpu.clone()).unwrap();
    let mut sess = model.new_session(256).unwrap();
    model.forward(&mut sess, &[2, 651, 6037, 529], Logits::Last).unwrap();
    let (peak, packed) = (PEAK.load(Ordering::Relaxed).saturating_sub(before), cpu.weight_bytes_copied());
    println!("repacking ({}): {} MiB packed, peak heap growth {} MiB", cpu.kernels().name(), packed >> 20, peak >> 20);
    assert_eq!(packed > 0, cpu.repacks(GgmlType::Q8_0), "gemma-3's Q8_0 matrices are packed where the table packs Q8_0");
    // only matrices are packed, each layout at most 11% larger than the file's bytes
    assert!(packed < size + size / 8, "packed {packed} bytes of a {size}-byte model");
    assert!(peak < packed + size / 8, "heap grew by {peak} bytes, {packed} of them packed weights");
}

// ---- throughput (not a check: `cargo test --release --test backend_cpu -- --ignored --nocapture throughput`) ----

/// Times one matmul per (type, shape, table): decode (1 token) over a matrix larger than the caches as
/// weight GB/s, prefill (512 tokens) over a layer-sized matrix as GMAC/s; the minimum of several runs
/// (this machine is shared and noisy), inside the pool as the model runs them. `PAGELLM_THREADS` sets
/// the threads (default 1); `PAGELLM_NO_PREFILL=1` times decode only; `PAGELLM_BIG_MIB` sizes the
/// decode matrix (default 96).
#[test]
#[ignore]
fn throughput() {
    let _serial = serial();
    let env = |key: &str| std::env::var(key).ok().and_then(|v| v.parse::<usize>().ok());
    let threads = env("PAGELLM_THREADS").unwrap_or(1);
    let big_mib = env("PAGELLM_BIG_MIB").unwrap_or(96);
    let prefill = std::env::var_os("PAGELLM_NO_PREFILL").is_none();
    let mut r = rng(14);
    let time = |b: &CpuBackend, f: &mut (dyn FnMut() + Send), reps: usize| {
        let mut best = f64::INFINITY;
        b.run(&mut || {
            for _ in 0..reps {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
        });
        best
    };
    let shapes = [
        (GgmlType::Q4_1, 576),
        (GgmlType::Q5_0, 640),
        (GgmlType::Q8_0, 640),
        (GgmlType::Q4K, 1024),
        (GgmlType::Q6K, 2048),
        (GgmlType::Q4_0, 1024),
    ];
    for (ty, k) in shapes {
        let row_bytes = k / ty.block_size() * ty.type_size();
        let big_rows = (big_mib << 20) / row_bytes / 16 * 16;
        let big = random_weights(&mut r, ty, big_rows, k);
        let layer_rows = 2048;
        let layer = random_weights(&mut r, ty, layer_rows, k);
        let x = randn(&mut r, 512 * k);
        for kern in Kernels::all() {
            let name = kern.name();
            let b = CpuBackend::new(threads, kern).unwrap();
            let wb = upload(&b, ty, big.clone(), k, big_rows);
            let wl = upload(&b, ty, layer.clone(), k, layer_rows);
            let (x1, xp) = (buffer(&b, &x[..k]), buffer(&b, &x));
            let mut o1 = b.alloc(big_rows).unwrap();
            let mut op = b.alloc(512 * layer_rows).unwrap();
            let td = time(&b, &mut || b.matmul(&wb, &x1, 1, &mut o1), 8);
            let tp = match prefill && name != "scalar" {
                true => time(&b, &mut || b.matmul(&wl, &xp, 512, &mut op), 3),
                false => f64::NAN,
            };
            println!(
                "{ty:>5} k={k:<5} {name:<7} {threads}t  decode {:6.1} GB/s ({:6.2} ms / {} MiB)   \
                 prefill 512x{layer_rows}: {:6.1} GMAC/s",
                big.len() as f64 / td / 1e9,
                td * 1e3,
                big.len() >> 20,
                512.0 * layer_rows as f64 * k as f64 / tp / 1e9
            );
        }
    }
}
