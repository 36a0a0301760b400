//! Paged attention on the CPU against a naive float64 attention on fresh random inputs (DESIGN.md,
//! "Error bounds": f16 K/V, relative L2 < 2e-3), over head dims 64/128/256, GQA ratios 1/4/8, lengths 1
//! to 4096 crossing block and split boundaries, several sequences with scattered block tables in one
//! pool, sliding windows; and batch invariance: a token's output is the same bits whether it is decoded
//! alone, prefilled whole or in chunks, among other sequences or not, on 1 thread or many.

use pagellm::backend::cpu::{CpuBackend, Isa, Kernels, ATTN_SPLIT_TOKENS};
use pagellm::backend::{AttnParams, AttnSeq, Backend, Buffer, KvShape, KvStore};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const BS: usize = 16;
const N_KV: usize = 2;

fn randn(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (0..4).map(|_| r.gen_range(-1.0f32..1.0)).sum::<f32>()).collect()
}

fn buffer(b: &dyn Backend, x: &[f32]) -> Buffer {
    let mut buf = b.alloc(x.len()).unwrap();
    b.write_buffer(&mut buf, 0, x);
    buf
}

fn read(b: &dyn Backend, buf: &Buffer, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    b.read_buffer(buf, 0, &mut v);
    v
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// One sequence: its K/V (`[ctx x N_KV x hd]`, f32 as computed, before the cache rounds them to f16)
/// and its block table in the shared pool.
struct Seq {
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: usize,
    table: Vec<u32>,
}

impl Seq {
    fn slots(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        range.map(|j| self.table[j / BS] * BS as u32 + (j % BS) as u32).collect()
    }
}

/// Sequences of the given lengths with block tables drawn at random from one pool (so neighbours in a
/// table are scattered), their K/V written into `kv` (through two backends' pools alike).
fn make_seqs(r: &mut StdRng, lens: &[usize], hd: usize) -> (Vec<Seq>, usize) {
    let num_blocks: usize = lens.iter().map(|l| l.div_ceil(BS)).sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(r);
    let mut next = ids.into_iter();
    let seqs = lens
        .iter()
        .map(|&ctx| Seq {
            k: randn(r, ctx * N_KV * hd),
            v: randn(r, ctx * N_KV * hd),
            ctx,
            table: next.by_ref().take(ctx.div_ceil(BS)).collect(),
        })
        .collect();
    (seqs, num_blocks)
}

fn fill(b: &dyn Backend, seqs: &[Seq], num_blocks: usize, hd: usize) -> KvStore {
    let mut kv = b.alloc_kv(KvShape { num_blocks, block_size: BS, n_kv_heads: N_KV, head_dim: hd }).unwrap();
    for s in seqs {
        b.kv_write(&mut kv, &buffer(b, &s.k), &buffer(b, &s.v), &s.slots(0..s.ctx));
    }
    kv
}

/// Naive attention in f64 of `q` (`[n_q x n_heads x hd]`, the last `n_q` positions of `s`).
fn reference(q: &[f32], s: &Seq, n_q: usize, p: &AttnParams) -> Vec<f64> {
    let (hd, nh) = (p.head_dim, p.n_heads);
    let mut out = vec![0.0; n_q * nh * hd];
    for i in 0..n_q {
        let pos = s.ctx - n_q + i;
        let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in 0..nh {
            let g = h / (nh / N_KV);
            let qv = &q[(i * nh + h) * hd..][..hd];
            let row = |x: &[f32], j: usize| x[(j * N_KV + g) * hd..][..hd].iter().map(|&v| v as f64).collect::<Vec<_>>();
            let scores: Vec<f64> = (lo..=pos)
                .map(|j| row(&s.k, j).iter().zip(qv).map(|(k, &q)| k * q as f64).sum::<f64>() * p.scale as f64)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let o = &mut out[(i * nh + h) * hd..][..hd];
            for (j, ej) in (lo..=pos).zip(&e) {
                for (o, v) in o.iter_mut().zip(row(&s.v, j)) {
                    *o += ej / z * v;
                }
            }
        }
    }
    out
}

/// Runs one attention call: `n_q[s]` new rows of each sequence, stacked in order.
fn attend(b: &dyn Backend, kv: &KvStore, seqs: &[Seq], n_q: &[usize], qs: &[Vec<f32>], p: &AttnParams) -> Vec<Vec<f32>> {
    let width = p.n_heads * p.head_dim;
    let mut q_start = 0;
    let spans: Vec<AttnSeq> = seqs
        .iter()
        .zip(n_q)
        .map(|(s, &n)| {
            let a = AttnSeq { q_start, n_q: n, ctx_len: s.ctx, block_table: &s.table, view: None };
            q_start += n;
            a
        })
        .collect();
    let q: Vec<f32> = qs.concat();
    let mut out = b.alloc(q.len()).unwrap();
    b.attention(&buffer(b, &q), kv, &spans, p, &mut out, None);
    let all = read(b, &out, q.len());
    let mut rows = all.chunks(width);
    n_q.iter().map(|&n| rows.by_ref().take(n).flatten().copied().collect()).collect()
}

fn params(hd: usize, ratio: usize, window: Option<usize>) -> AttnParams {
    // a scale above 1/sqrt(hd) makes the softmax peaked enough to matter
    AttnParams { n_heads: N_KV * ratio, n_kv_heads: N_KV, head_dim: hd, scale: 2.0 / (hd as f32).sqrt(), window }
}

/// Several sequences decoding at once (one query each) and the same rows one sequence at a time, on a
/// 1-thread and a 16-thread backend (one task per row, or one per split): all against the reference,
/// all the same bits.
#[test]
fn decode_many_sequences_matches_reference() {
    let one = CpuBackend::new(1, Kernels::detect()).unwrap();
    let many = CpuBackend::new(16, Kernels::detect()).unwrap();
    let lens = [1, 15, 16, 17, 100, ATTN_SPLIT_TOKENS, ATTN_SPLIT_TOKENS + 1, 1100, 4096];
    let mut r = StdRng::seed_from_u64(1);
    let mut worst = 0.0f64;
    for hd in [64, 128, 256] {
        for ratio in [1, 4, 8] {
            for window in [None, Some(700)] {
                let p = params(hd, ratio, window);
                let (seqs, num_blocks) = make_seqs(&mut r, &lens, hd);
                let qs: Vec<Vec<f32>> = seqs.iter().map(|_| randn(&mut r, p.n_heads * hd)).collect();
                let n_q = vec![1; seqs.len()];
                let kv1 = fill(&one, &seqs, num_blocks, hd);
                let kvm = fill(&many, &seqs, num_blocks, hd);
                let batched = attend(&one, &kv1, &seqs, &n_q, &qs, &p);
                assert_eq!(attend(&many, &kvm, &seqs, &n_q, &qs, &p), batched, "hd {hd} ratio {ratio}: depends on threads");
                for (i, s) in seqs.iter().enumerate() {
                    let name = format!("hd {hd} ratio {ratio} window {window:?} len {}", s.ctx);
                    let err = rel_l2(&batched[i], &reference(&qs[i], s, 1, &p));
                    assert!(err < 2e-3, "{name}: rel L2 {err:e}");
                    worst = worst.max(err);
                    let alone = attend(&many, &kvm, std::slice::from_ref(s), &[1], std::slice::from_ref(&qs[i]), &p);
                    assert!(alone[0] == batched[i], "{name}: a decoded row depends on its batch companions");
                }
            }
        }
    }
    println!("decode: worst relative L2 error {worst:.2e}");
}

/// Prefill: new tokens over a cached prefix (crossing blocks and splits), a prompt from scratch and a
/// decode row in one call; then the same rows in chunks and one by one give the same bits.
#[test]
fn prefill_over_cached_prefix_matches_reference_and_chunking() {
    let b = CpuBackend::new(2, Kernels::detect()).unwrap();
    let mut r = StdRng::seed_from_u64(2);
    let mut worst = 0.0f64;
    for (hd, ratio, window) in [(64, 1, None), (128, 4, None), (256, 8, None), (64, 4, Some(24)), (128, 8, Some(600))] {
        let p = params(hd, ratio, window);
        // (context, new tokens): 40 new after 1060 cached; 70 from scratch; one decode row; 4 at 4096
        let shape = [(1100, 40), (70, 70), (33, 1), (4096, 4)];
        let lens: Vec<usize> = shape.iter().map(|s| s.0).collect();
        let n_q: Vec<usize> = shape.iter().map(|s| s.1).collect();
        let (seqs, num_blocks) = make_seqs(&mut r, &lens, hd);
        let kv = fill(&b, &seqs, num_blocks, hd);
        let qs: Vec<Vec<f32>> = n_q.iter().map(|&n| randn(&mut r, n * p.n_heads * hd)).collect();
        let whole = attend(&b, &kv, &seqs, &n_q, &qs, &p);
        let width = p.n_heads * hd;
        for (i, s) in seqs.iter().enumerate() {
            let name = format!("hd {hd} ratio {ratio} window {window:?} ctx {} new {}", s.ctx, n_q[i]);
            let err = rel_l2(&whole[i], &reference(&qs[i], s, n_q[i], &p));
            assert!(err < 2e-3, "{name}: rel L2 {err:e}");
            worst = worst.max(err);
            // chunks of 7 rows (the attention reads only up to each chunk's end) and single rows
            for chunk in [7, 1] {
                let mut got = Vec::new();
                let mut done = 0;
                while done < n_q[i] {
                    let m = chunk.min(n_q[i] - done);
                    let ctx = s.ctx - n_q[i] + done + m;
                    let part = Seq { k: Vec::new(), v: Vec::new(), ctx, table: s.table.clone() };
                    let q = qs[i][done * width..(done + m) * width].to_vec();
                    got.extend(attend(&b, &kv, &[part], &[m], &[q], &p).remove(0));
                    done += m;
                }
                assert!(got == whole[i], "{name}: chunks of {chunk} give other bits than the whole prefill");
            }
        }
    }
    println!("prefill: worst relative L2 error {worst:.2e}");
}

/// A window longer than a split, and a context crossing many splits, on a sequence alone: against the
/// reference, and not a NaN anywhere with extreme scores.
#[test]
fn long_windows_and_extreme_scores() {
    let b = CpuBackend::new(2, Kernels::detect()).unwrap();
    let mut r = StdRng::seed_from_u64(3);
    for window in [Some(1), Some(ATTN_SPLIT_TOKENS), Some(ATTN_SPLIT_TOKENS + 1), Some(2000), None] {
        let p = AttnParams { scale: 0.9, ..params(64, 4, window) };
        let (seqs, num_blocks) = make_seqs(&mut r, &[3000], 64);
        let kv = fill(&b, &seqs, num_blocks, 64);
        let q = vec![randn(&mut r, 3 * p.n_heads * 64)];
        let got = attend(&b, &kv, &seqs, &[3], &q, &p);
        assert!(got[0].iter().all(|x| x.is_finite()), "window {window:?}: non-finite output");
        let err = rel_l2(&got[0], &reference(&q[0], &seqs[0], 3, &p));
        assert!(err < 2e-3, "window {window:?}: rel L2 {err:e}");
        println!("window {window:?}, scale 0.9: relative L2 error {err:.2e}");
    }
}

/// Every kernel table (scalar, the oracle, and each SIMD one this CPU has) against the reference, each
/// SIMD table close to the scalar one and bit-identical to the other SIMD tables (avx2 and avx512 share
/// one float order, which the CUDA kernels follow too), over the models' shapes and a split boundary.
#[test]
fn every_kernel_table_matches_reference() {
    let mut r = StdRng::seed_from_u64(4);
    for (hd, ratio) in [(64, 3), (64, 1), (128, 8), (256, 4), (80, 2), (48, 5), (40, 3)] {
        let p = params(hd, ratio, None);
        let (seqs, num_blocks) = make_seqs(&mut r, &[1, 13, 300, ATTN_SPLIT_TOKENS + 37], hd);
        let n_q = [1, 13, 5, 3];
        let qs: Vec<Vec<f32>> = n_q.iter().map(|&n| randn(&mut r, n * p.n_heads * hd)).collect();
        let (mut scalar, mut simd) = (None, None);
        for kern in Kernels::all() {
            let b = CpuBackend::new(1, kern).unwrap();
            let kv = fill(&b, &seqs, num_blocks, hd);
            let got = attend(&b, &kv, &seqs, &n_q, &qs, &p);
            for (i, s) in seqs.iter().enumerate() {
                let err = rel_l2(&got[i], &reference(&qs[i], s, n_q[i], &p));
                assert!(err < 2e-3, "{} hd {hd} ratio {ratio} ctx {}: rel L2 {err:e}", kern.name(), s.ctx);
            }
            let base: &Vec<Vec<f32>> = scalar.get_or_insert(got.clone());
            for (i, (g, w)) in got.iter().zip(base).enumerate() {
                let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
                let err = rel_l2(g, &w64);
                assert!(err < 1e-3, "{} hd {hd} ratio {ratio} seq {i}: {err:e} from scalar", kern.name());
            }
            if kern.isa != Isa::Scalar {
                assert!(*simd.get_or_insert(got.clone()) == got, "{} hd {hd} ratio {ratio}: other bits than avx2", kern.name());
            }
        }
    }
}

/// Micro-benchmark (run with `--ignored --nocapture`): ns per query-head-key on 1 thread, per kernel
/// table, for SmolLM2's shape (head_dim 64, 3 query heads per KV head) and Gemma 3's (256, 4): 20 new
/// rows over 800 cached keys, a chat turn with the prefix cache.
#[test]
#[ignore]
fn attention_ns_per_query_head_key() {
    let mut r = StdRng::seed_from_u64(5);
    for (hd, ratio) in [(64, 3), (256, 4)] {
        let p = params(hd, ratio, None);
        let (ctx, new) = (820, 20);
        let (seqs, num_blocks) = make_seqs(&mut r, &[ctx], hd);
        let qs = vec![randn(&mut r, new * p.n_heads * hd)];
        let work: usize = (0..new).map(|i| ctx - new + i + 1).sum::<usize>() * p.n_heads;
        // PAGELLM_BENCH_ISA=avx2 (say) times one table only, for a profiler
        let only = std::env::var("PAGELLM_BENCH_ISA").ok();
        for kern in Kernels::all().into_iter().filter(|k| only.as_deref().is_none_or(|o| o == k.name())) {
            let b = CpuBackend::new(1, kern).unwrap();
            let kv = fill(&b, &seqs, num_blocks, hd);
            let reps = 30;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(attend(&b, &kv, &seqs, &[new], &qs, &p));
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            println!("hd {hd} group {ratio} {:>6}: {:.2} ns per query-head-key", kern.name(), best * 1e9 / work as f64);
        }
    }
}
