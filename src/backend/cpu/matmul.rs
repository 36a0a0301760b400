//! Quantized matrix times a batch of activations, on the rayon pool.
//!
//! ```text
//! x [n_tokens x k] f32 --quantize once per call (llama.cpp's vec_dot_type)--> act [n_tokens x k] Q8
//! out[t][r] = dot(w row r, act row t)
//! tile kernels (AVX-512, AVX2): tasks = runs of 16-row tiles; a tile decodes its weight blocks once
//!     into per-thread scratch, then runs every token through them (prefill: all of them; decode: one,
//!     AVX-512 without the scratch, AVX2 through the per-row dots below)
//! per-row dots (scalar; AVX2 below 2 tokens): tasks = chunks of rows (a chunk stays in L1/L2) x tokens
//!     in tiles of 64
//! ```
//! Each output element equals the scalar dot of one weight row and one activation row (the tile
//! kernels reproduce its float operations lane by lane), so it does not depend on the batch size, the
//! chunking, the number of threads or the kernel table. Buffers (activations, tile scratch)
//! are per thread and kept between calls: no allocation once they have grown.

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernels::{
    act_side, aux_per_block, FDotFn, GemmFn, Kernels, PackKernels, QActs, QDotFn, QuantizeFn, Scratch,
};
use crate::dtype::GgmlType;

/// A weight matrix repacked once for its table's tile kernel ([`PackKernels`]): tile after tile of 16
/// rows, `nb` decoded blocks each, in one 64-byte aligned allocation.
pub(super) struct Packed {
    fns: PackKernels,
    nb: usize,
    data: Scratch,
}

impl Packed {
    /// Heap bytes the packed copy holds.
    pub(super) fn bytes(&self) -> usize {
        self.data.bytes().len()
    }
}

/// `w` (`n_rows` rows of `row_len` weights of type `ty`) packed for `k`'s tile kernel, if the table
/// packs that type and the memory is there (otherwise the matmul reads `w` in place). Call inside the
/// backend's pool.
pub(super) fn pack(k: &Kernels, ty: GgmlType, w: &[u8], row_len: usize, n_rows: usize) -> Option<Packed> {
    let fns = k.gemm.and_then(|g| g.pack_for(ty))?;
    let (row_bytes, n_tiles) = (w.len() / n_rows.max(1), n_rows.div_ceil(TILE_ROWS));
    let nb = row_len / ty.block_size();
    let tile_bytes = fns.tile_bytes(nb);
    if !memory_allows(n_tiles * tile_bytes) {
        return None;
    }
    let mut data = Scratch::try_zeroed(n_tiles * tile_bytes)?;
    data.get(n_tiles * tile_bytes)[..n_tiles * tile_bytes].par_chunks_mut(tile_bytes).enumerate().for_each(|(t, dst)| {
        let rows = t * TILE_ROWS..((t + 1) * TILE_ROWS).min(n_rows);
        // SAFETY: the pointer comes from a table built after feature detection; `dst` is one tile's
        // bytes of a 64-byte aligned buffer (tile_bytes is a multiple of 64).
        unsafe { (fns.pack)(&w[rows.start * row_bytes..rows.end * row_bytes], row_bytes, dst) }
    });
    Some(Packed { fns, nb, data })
}

/// Whether a packed copy of `bytes` leaves most of the memory available (Linux's MemAvailable): a model
/// near the size of RAM keeps its weights in place rather than push the system into swap.
fn memory_allows(bytes: usize) -> bool {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<usize>().ok().map(|kib| kib << 10)
    });
    available.is_none_or(|a| bytes < a / 2)
}

/// Tokens per tile of the per-row path: an activation tile of 64 rows stays in L2 while a chunk of
/// weight rows runs over it.
const TOKEN_TILE: usize = 64;

/// Rows per tile kernel call.
const TILE_ROWS: usize = 16;

/// How one weight type is multiplied.
enum Plan {
    /// Quantize activations to blocks of `elems` weights in `bytes` bytes, then integer dots.
    Quant { elems: usize, bytes: usize, quantize: QuantizeFn, dot: QDotFn, gemm: Option<GemmFn> },
    /// Float weights read in place, dotted with f32 activations.
    Float(FDotFn),
    /// Any other supported type: dequantize each weight row to f32, then f32 dots.
    Dequant,
}

fn plan(k: &Kernels, ty: GgmlType, n_tokens: usize) -> Plan {
    use GgmlType as T;
    let gemm = k.gemm.filter(|g| n_tokens >= (g.min_tokens)(ty)).and_then(|g| g.get(ty));
    let q8_0 = |dot| Plan::Quant { elems: 32, bytes: 34, quantize: k.quantize_q8_0, dot, gemm };
    let q8_k = |dot| Plan::Quant { elems: 256, bytes: 292, quantize: k.quantize_q8_k, dot, gemm };
    match ty {
        T::Q4_0 => q8_0(k.dot_q4_0),
        T::Q5_0 => q8_0(k.dot_q5_0),
        T::Q8_0 => q8_0(k.dot_q8_0),
        T::Q4_1 => Plan::Quant { elems: 32, bytes: 36, quantize: k.quantize_q8_1, dot: k.dot_q4_1, gemm },
        T::Q4K => q8_k(k.dot_q4_k),
        T::Q6K => q8_k(k.dot_q6_k),
        T::F32 => Plan::Float(k.dot_f32w),
        T::F16 => Plan::Float(k.dot_f16w),
        _ => Plan::Dequant,
    }
}

/// Quantized activations of one call (block bytes, and the tile kernels' side values).
#[derive(Default)]
struct ActBuf {
    bytes: Vec<u8>,
    d: Vec<f32>,
    aux: Vec<i32>,
}

thread_local! {
    static ACT: RefCell<ActBuf> = RefCell::default();
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` on this thread's buffer, or on a fresh one if it is in use (a rayon worker waiting inside
/// one matmul can pick up another: never a second borrow).
fn with_buf<B: Default, R>(key: &'static std::thread::LocalKey<RefCell<B>>, f: impl FnOnce(&mut B) -> R) -> R {
    let mut f = Some(f);
    let r = key.with(|cell| cell.try_borrow_mut().ok().map(|mut b| (f.take().expect("called once"))(&mut b)));
    r.unwrap_or_else(|| (f.take().expect("called once"))(&mut B::default()))
}

/// Grows `v` to at least `n` elements (never shrinks: the buffer is reused).
fn at_least<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// A pointer to the output that tasks write disjoint elements of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write pairwise disjoint elements (different output rows r of the same token rows) and
// the pointer does not outlive the `&mut` borrow held for the whole parallel call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is in bounds of the output and no other task writes element `i`.
    #[inline(always)]
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }

    /// The address of element `i` (`i <= out.len()`).
    #[inline(always)]
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Rows per task: enough tasks for every thread to get several (load balance), at most 64 rows.
fn chunk_rows(n_rows: usize, threads: usize) -> usize {
    n_rows.div_ceil(threads.max(1) * 8).clamp(4, 64)
}

/// `out[t * n_rows + r] = w[r] . x[t]` for `t < n_tokens`. `w` holds `n_rows` rows of `row_len` weights
/// of type `ty`, `row_bytes` bytes each. Call inside the backend's pool.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    k: &Kernels,
    threads: usize,
    ty: GgmlType,
    w: &[u8],
    row_len: usize,
    n_rows: usize,
    packed: Option<&Packed>,
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) {
    let row_bytes = w.len() / n_rows;
    let packed = packed.filter(|p| n_tokens <= p.fns.max_tokens);
    let fits = |p: &Packed| p.fns.ty == ty && p.nb * ty.block_size() == row_len && p.bytes() >= n_rows.div_ceil(TILE_ROWS) * p.fns.tile_bytes(p.nb);
    assert!(packed.is_none_or(fits), "matmul: packed weight does not match the matrix");
    assert!(x.len() >= n_tokens * row_len && out.len() >= n_tokens * n_rows, "matmul: buffers too small");
    let out_ptr = OutPtr(out.as_mut_ptr());
    let chunk = chunk_rows(n_rows, threads);
    let n_chunks = n_rows.div_ceil(chunk);
    let w_row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];

    match plan(k, ty, n_tokens) {
        Plan::Quant { elems, bytes, quantize, dot, gemm } => with_buf(&ACT, |act| {
            // a packed weight runs its tile kernel whatever the batch
            let side = gemm.is_some() || packed.is_some();
            let a_row = row_len / elems * bytes;
            let nb = row_len / elems;
            let apb = aux_per_block(ty);
            at_least(&mut act.bytes, n_tokens * a_row);
            // quantize every token row once
            let ab = &mut act.bytes[..n_tokens * a_row];
            if n_tokens == 1 {
                quantize(&x[..row_len], ab);
            } else {
                ab.par_chunks_mut(a_row)
                    .zip(x[..n_tokens * row_len].par_chunks(row_len))
                    .for_each(|(o, xr)| quantize(xr, o));
            }
            // and, for the tile kernels, the side values of its blocks
            if side {
                at_least(&mut act.d, n_tokens * nb);
                at_least(&mut act.aux, n_tokens * nb * apb);
                let blocks = act.bytes[..n_tokens * a_row].par_chunks(bytes);
                let (d, aux) = (&mut act.d[..n_tokens * nb], &mut act.aux[..n_tokens * nb * apb]);
                blocks
                    .zip(d.par_iter_mut())
                    .zip(aux.par_chunks_mut(apb))
                    .with_min_len(64)
                    .for_each(|((blk, d), aux)| act_side(ty, blk, d, aux));
            }
            let act: &ActBuf = act;
            let acts = || QActs {
                n_tok: n_tokens,
                row_bytes: a_row,
                bytes: &act.bytes[..n_tokens * a_row],
                d: &act.d[..n_tokens * nb],
                aux: &act.aux[..n_tokens * nb * apb],
            };
            match (packed, gemm) {
                (Some(p), _) => packed_tiles(p, threads, n_rows, &acts(), out_ptr),
                (None, Some(gemm)) => tiles(gemm, threads, w, row_bytes, n_rows, &acts(), out_ptr),
                (None, None) => (0..n_chunks).into_par_iter().for_each(|c| {
                    let rows = c * chunk..((c + 1) * chunk).min(n_rows);
                    for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                        for t in t0..(t0 + TOKEN_TILE).min(n_tokens) {
                            let a = &act.bytes[t * a_row..(t + 1) * a_row];
                            for r in rows.clone() {
                                let v = dot(w_row(r), a);
                                // SAFETY: see OutPtr; t * n_rows + r < out.len() was asserted above.
                                unsafe { out_ptr.write(t * n_rows + r, v) };
                            }
                        }
                    }
                }),
            }
        }),
        Plan::Float(dot) => {
            (0..n_chunks).into_par_iter().for_each(|c| {
                let rows = c * chunk..((c + 1) * chunk).min(n_rows);
                for t in 0..n_tokens {
                    let xt = &x[t * row_len..(t + 1) * row_len];
                    for r in rows.clone() {
                        let v = dot(w_row(r), xt);
                        // SAFETY: as above.
                        unsafe { out_ptr.write(t * n_rows + r, v) };
                    }
                }
            });
        }
        Plan::Dequant => {
            (0..n_chunks).into_par_iter().for_each(|c| {
                let rows = c * chunk..((c + 1) * chunk).min(n_rows);
                let mut wf = vec![0.0f32; rows.len() * row_len];
                for (i, r) in rows.clone().enumerate() {
                    crate::quant::dequantize(ty, w_row(r), &mut wf[i * row_len..(i + 1) * row_len])
                        .expect("weight type checked at upload");
                }
                for t in 0..n_tokens {
                    let xt = &x[t * row_len..(t + 1) * row_len];
                    for (i, r) in rows.clone().enumerate() {
                        let v = (k.dot_f32)(&wf[i * row_len..(i + 1) * row_len], xt);
                        // SAFETY: as above.
                        unsafe { out_ptr.write(t * n_rows + r, v) };
                    }
                }
            });
        }
    }
}

/// The tile kernel over runs of 16-row tiles; each task writes its tiles' output columns.
fn tiles(gemm: GemmFn, threads: usize, w: &[u8], row_bytes: usize, n_rows: usize, acts: &QActs<'_>, out: OutPtr) {
    tile_tasks(threads, n_rows, |run| {
        with_buf(&SCRATCH, |scratch| {
            for (r0, n) in run {
                // SAFETY: see OutPtr: elements t * n_rows + r0 + (0..n) are this task's, and in bounds
                // (out.len() >= n_tokens * n_rows was asserted by matmul).
                unsafe { gemm(&w[r0 * row_bytes..(r0 + n) * row_bytes], row_bytes, acts, scratch, out.at(r0), n_rows) };
            }
        })
    });
}

/// [`tiles`] over a packed weight: each task reads its tiles as one sequential stream.
fn packed_tiles(p: &Packed, threads: usize, n_rows: usize, acts: &QActs<'_>, out: OutPtr) {
    let tile_bytes = p.fns.tile_bytes(p.nb);
    let data = p.data.bytes();
    tile_tasks(threads, n_rows, |run| {
        for (r0, n) in run {
            let tile = r0 / TILE_ROWS;
            // SAFETY: as in `tiles`; the tile was packed by this table (Packed::fns).
            unsafe { (p.fns.gemm)(&data[tile * tile_bytes..(tile + 1) * tile_bytes], n, p.nb, acts, out.at(r0), n_rows) };
        }
    });
}

/// The 16-row tiles of `n_rows` rows in runs, `f(run)` per run on the pool: several runs per thread, for
/// balance on a busy machine. A run yields each tile's first row and row count.
fn tile_tasks(threads: usize, n_rows: usize, f: impl Fn(&mut dyn Iterator<Item = (usize, usize)>) + Sync) {
    let n_tiles = n_rows.div_ceil(TILE_ROWS);
    let per_task = n_tiles.div_ceil(threads.max(1) * 8).max(1);
    (0..n_tiles.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let tiles = task * per_task..((task + 1) * per_task).min(n_tiles);
        f(&mut tiles.map(|t| (t * TILE_ROWS, TILE_ROWS.min(n_rows - t * TILE_ROWS))))
    });
}

/// Whether `ty` can be multiplied (and dequantized for embeddings) by this backend.
pub(super) fn supported(ty: GgmlType) -> bool {
    ty.is_supported() && ty != GgmlType::Q8K
}
