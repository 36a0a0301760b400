//! Attention under a KV budget view (holes, original positions) and the H2O probabilities it reports,
//! on the CPU, against a naive float64 attention over the live entries on fresh random inputs: outputs
//! (relative L2 < 2e-3, as for plain paged attention) and per-entry probabilities summed over each KV
//! head's query heads and the query rows (absolute error < 2e-5; K, V and Q rounded to f16 in both).
//! Also: an all-live view with positions `0..n` is bit-identical to no view; 1 thread and many give the
//! same bits; slot moves read every source first.

mod common;

use common::backend::{buffer, randn, read, rel_l2};
use pagellm::backend::cpu::{CpuBackend, Kernels, ATTN_SPLIT_TOKENS};
use pagellm::backend::{AttnParams, AttnSeq, Backend, KvShape, KvView};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const BS: usize = 16;
const N_KV: usize = 2;

/// A sequence of `n` entries under a view: K/V per entry, a scattered block table, live masks with
/// holes (never on the last `n_q` entries: the new tokens), increasing positions with gaps.
struct Case {
    k: Vec<f32>,
    v: Vec<f32>,
    n: usize,
    table: Vec<u32>,
    live: Vec<u64>,
    positions: Vec<u32>,
    num_blocks: usize,
}

impl Case {
    fn new(r: &mut StdRng, n: usize, n_q: usize, hd: usize, hole_rate: f64) -> Case {
        let num_blocks = n.div_ceil(BS) + 3;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(r);
        let table: Vec<u32> = ids[..n.div_ceil(BS)].to_vec();
        let mut live = vec![0u64; n.div_ceil(BS)];
        for e in 0..n {
            if e >= n - n_q || !r.gen_bool(hole_rate) {
                live[e / BS] |= 1 << (e % BS);
            }
        }
        let mut positions = Vec::with_capacity(n);
        let mut p = r.gen_range(0..5u32);
        for _ in 0..n {
            positions.push(p);
            p += 1 + if r.gen_bool(0.3) { r.gen_range(0..6) } else { 0 };
        }
        Case { k: randn(r, n * N_KV * hd), v: randn(r, n * N_KV * hd), n, table, live, positions, num_blocks }
    }

    fn live(&self, e: usize) -> bool {
        self.live[e / BS] >> (e % BS) & 1 == 1
    }

    fn slots(&self) -> Vec<u32> {
        (0..self.n).map(|e| self.table[e / BS] * BS as u32 + (e % BS) as u32).collect()
    }
}

/// `x` as the cache holds it (f16), in f64: the reference sees what the kernel sees.
fn f16r(x: f32) -> f64 {
    half::f16::from_f32(x).to_f64()
}

/// Naive f64 attention of the last `n_q` entries over the live entries they see, and the probabilities
/// `[N_KV x n]` summed over each KV head's query heads and the rows.
fn reference(q: &[f32], c: &Case, n_q: usize, p: &AttnParams) -> (Vec<f64>, Vec<f64>) {
    let (hd, nh) = (p.head_dim, p.n_heads);
    let mut out = vec![0.0; n_q * nh * hd];
    let mut probs = vec![0.0; N_KV * c.n];
    for i in 0..n_q {
        let e = c.n - n_q + i;
        let qp = c.positions[e] as usize;
        let seen: Vec<usize> =
            (0..=e).filter(|&j| c.live(j) && p.window.is_none_or(|w| qp - (c.positions[j] as usize) < w)).collect();
        for h in 0..nh {
            let g = h / (nh / N_KV);
            let qv: Vec<f64> = q[(i * nh + h) * hd..][..hd].iter().map(|&x| f16r(x)).collect();
            let row = |x: &[f32], j: usize| x[(j * N_KV + g) * hd..][..hd].iter().map(|&v| f16r(v)).collect::<Vec<_>>();
            let scores: Vec<f64> =
                seen.iter().map(|&j| row(&c.k, j).iter().zip(&qv).map(|(k, q)| k * q).sum::<f64>() * p.scale as f64).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = ex.iter().sum();
            let o = &mut out[(i * nh + h) * hd..][..hd];
            for (&j, ej) in seen.iter().zip(&ex) {
                probs[g * c.n + j] += ej / z;
                for (o, v) in o.iter_mut().zip(row(&c.v, j)) {
                    *o += ej / z * v;
                }
            }
        }
    }
    (out, probs)
}

/// One attention call for the case's last `n_q` entries; `(out, scores)`.
fn attend(b: &dyn Backend, c: &Case, q: &[f32], n_q: usize, p: &AttnParams, view: Option<&KvView>) -> (Vec<f32>, Vec<f32>) {
    let mut kv = b.alloc_kv(KvShape { num_blocks: c.num_blocks, block_size: BS, n_kv_heads: N_KV, head_dim: p.head_dim }).unwrap();
    b.kv_write(&mut kv, &buffer(b, &c.k), &buffer(b, &c.v), &c.slots());
    let seqs = [AttnSeq { q_start: 0, n_q, ctx_len: c.n, block_table: &c.table, view }];
    let mut out = b.alloc(q.len()).unwrap();
    // scores after 5 floats of padding, at base 3 + offset 2: offsets must be honoured
    let mut scores = buffer(b, &vec![f32::NAN; 5 + N_KV * c.n]);
    b.attention(&buffer(b, q), &kv, &seqs, p, &mut out, Some((&mut scores, 3)));
    (read(b, &out, q.len()), read(b, &scores, 5 + N_KV * c.n)[5..].to_vec())
}

fn params(hd: usize, ratio: usize, window: Option<usize>) -> AttnParams {
    AttnParams { n_heads: N_KV * ratio, n_kv_heads: N_KV, head_dim: hd, scale: 2.0 / (hd as f32).sqrt(), window }
}

#[test]
fn views_with_holes_match_the_reference_with_probabilities() {
    let backends = [
        ("1 thread", CpuBackend::new(1, Kernels::detect()).unwrap()),
        ("16 threads", CpuBackend::new(16, Kernels::detect()).unwrap()),
        ("scalar", CpuBackend::new(2, Kernels::scalar()).unwrap()),
    ];
    let mut r = StdRng::seed_from_u64(7);
    let (mut worst_out, mut worst_p) = (0.0f64, 0.0f64);
    let n_split = ATTN_SPLIT_TOKENS;
    for (hd, ratio) in [(64, 1), (64, 4), (128, 8)] {
        for window in [None, Some(300)] {
            for (n, n_q, holes) in [(1, 1, 0.0), (40, 1, 0.5), (n_split + 37, 1, 0.3), (2 * n_split + 100, 5, 0.6), (90, 9, 0.95)] {
                let p = params(hd, ratio, window);
                let c = Case::new(&mut r, n, n_q, hd, holes);
                let q = randn(&mut r, n_q * p.n_heads * hd);
                let view = KvView { live: &c.live, positions: &c.positions, score_offset: Some(2) };
                let (want_out, want_p) = reference(&q, &c, n_q, &p);
                let name = format!("hd {hd} ratio {ratio} window {window:?} n {n} n_q {n_q} holes {holes}");
                let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
                for (bname, b) in &backends {
                    let (out, probs) = attend(b, &c, &q, n_q, &p, Some(&view));
                    let err = rel_l2(&out, &want_out);
                    assert!(err < 2e-3, "{name} ({bname}): output rel L2 {err:e}");
                    let perr = probs.iter().zip(&want_p).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                    assert!(perr < 2e-5, "{name} ({bname}): probability error {perr:e}");
                    let dead_weight: f32 = (0..n).filter(|&e| !c.live(e)).flat_map(|e| [probs[e], probs[n + e]]).sum();
                    assert_eq!(dead_weight, 0.0, "{name}: an evicted entry got weight");
                    worst_out = worst_out.max(err);
                    worst_p = worst_p.max(perr);
                    if *bname != "scalar" {
                        match &first {
                            None => first = Some((out, probs)),
                            Some(f) => assert!(f.0 == out && f.1 == probs, "{name}: depends on the thread count"),
                        }
                    }
                }
            }
        }
    }
    println!("budget views: worst output rel L2 {worst_out:.2e}, worst probability error {worst_p:.2e}");
}

/// A view that evicts nothing (every entry live, positions 0..n) changes no bit of the output.
#[test]
fn an_all_live_view_is_bit_identical_to_none() {
    let b = CpuBackend::new(2, Kernels::detect()).unwrap();
    let mut r = StdRng::seed_from_u64(8);
    for (n, n_q, window) in [(33, 1, None), (1200, 1, Some(700)), (700, 30, None)] {
        let p = params(64, 4, window);
        let mut c = Case::new(&mut r, n, n_q, 64, 0.0);
        c.positions = (0..n as u32).collect();
        let q = randn(&mut r, n_q * p.n_heads * 64);
        let (plain, _) = attend(&b, &c, &q, n_q, &p, None);
        for score_offset in [None, Some(0)] {
            let view = KvView { live: &c.live, positions: &c.positions, score_offset };
            let (viewed, _) = attend(&b, &c, &q, n_q, &p, Some(&view));
            assert!(plain == viewed, "n {n} n_q {n_q} window {window:?} scores {score_offset:?}: output bits changed");
        }
    }
}

/// `kv_move_slots` reads every source before writing: a chain of overlapping moves.
#[test]
fn slot_moves_read_all_sources_first() {
    let b = CpuBackend::new(1, Kernels::detect()).unwrap();
    let shape = KvShape { num_blocks: 2, block_size: 4, n_kv_heads: 1, head_dim: 16 };
    let mut kv = b.alloc_kv(shape).unwrap();
    let k: Vec<f32> = (0..8 * 16).map(|i| i as f32).collect();
    let v: Vec<f32> = k.iter().map(|x| -x).collect();
    b.kv_write(&mut kv, &buffer(&b, &k), &buffer(&b, &v), &(0..8).collect::<Vec<u32>>());
    // 3 -> 1, 5 -> 3, 7 -> 5: each destination is an earlier move's source
    b.kv_move_slots(&mut kv, &[(3, 1), (5, 3), (7, 5)]);
    // read back through attention with a one-hot query: one key per call is the value of that slot
    let p = AttnParams { n_heads: 1, n_kv_heads: 1, head_dim: 16, scale: 1.0, window: None };
    for (slot, want) in [(0u32, 0usize), (1, 3), (2, 2), (3, 5), (5, 7), (6, 6)] {
        let table = [slot / 4];
        let live = [1u64 << (slot % 4)];
        let positions: Vec<u32> = (0..4).collect();
        let view = KvView { live: &live, positions: &positions, score_offset: None };
        let seqs = [AttnSeq { q_start: 0, n_q: 1, ctx_len: (slot % 4 + 1) as usize, block_table: &table, view: Some(&view) }];
        let mut out = b.alloc(16).unwrap();
        b.attention(&buffer(&b, &[0.0; 16]), &kv, &seqs, &p, &mut out, None);
        let got = read(&b, &out, 16);
        let expect: Vec<f32> = (0..16).map(|i| -((want * 16 + i) as f32)).collect();
        assert_eq!(got, expect, "slot {slot} should hold what slot {want} held");
    }
}
