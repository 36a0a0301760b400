//! Quantized matrix times a batch of activations, on the rayon pool.
//!
//! ```text
//! x [n_tokens x k] f32 --quantize once per call (llama.cpp's vec_dot_type)--> act [n_tokens x k] Q8
//! out[t][r] = dot(w row r, act row t)
//! work split: output rows in chunks (a chunk of weight rows stays in L1/L2) x tokens in tiles of 64
//! ```
//! Each output element is one call of one dot kernel on one weight row and one activation row, so it
//! does not depend on the batch size, the chunking or the number of threads.

use rayon::prelude::*;

use super::kernels::{quantize_q8_0, quantize_q8_1, quantize_q8_k, FDotFn, Kernels, QDotFn};
use crate::dtype::GgmlType;

/// Tokens per tile: an activation tile of 64 rows stays in L2 while a chunk of weight rows runs over it.
const TOKEN_TILE: usize = 64;

/// How one weight type is multiplied.
enum Plan {
    /// Quantize activations to blocks of `elems` weights in `bytes` bytes, then integer dots.
    Quant { elems: usize, bytes: usize, quantize: fn(&[f32], &mut [u8]), dot: QDotFn },
    /// Float weights read in place, dotted with f32 activations.
    Float(FDotFn),
    /// Any other supported type: dequantize each weight row to f32, then f32 dots.
    Dequant,
}

fn plan(k: &Kernels, ty: GgmlType) -> Plan {
    use GgmlType as T;
    let q8_0 = |dot| Plan::Quant { elems: 32, bytes: 34, quantize: quantize_q8_0, dot };
    let q8_k = |dot| Plan::Quant { elems: 256, bytes: 292, quantize: quantize_q8_k, dot };
    match ty {
        T::Q4_0 => q8_0(k.dot_q4_0),
        T::Q5_0 => q8_0(k.dot_q5_0),
        T::Q8_0 => q8_0(k.dot_q8_0),
        T::Q4_1 => Plan::Quant { elems: 32, bytes: 36, quantize: quantize_q8_1, dot: k.dot_q4_1 },
        T::Q4K => q8_k(k.dot_q4_k),
        T::Q6K => q8_k(k.dot_q6_k),
        T::F32 => Plan::Float(k.dot_f32w),
        T::F16 => Plan::Float(k.dot_f16w),
        _ => Plan::Dequant,
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
    x: &[f32],
    n_tokens: usize,
    out: &mut [f32],
) {
    let row_bytes = w.len() / n_rows;
    assert!(x.len() >= n_tokens * row_len && out.len() >= n_tokens * n_rows, "matmul: buffers too small");
    let out_ptr = OutPtr(out.as_mut_ptr());
    let chunk = chunk_rows(n_rows, threads);
    let n_chunks = n_rows.div_ceil(chunk);
    let w_row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];

    match plan(k, ty) {
        Plan::Quant { elems, bytes, quantize, dot } => {
            let a_row = row_len / elems * bytes;
            let mut act = vec![0u8; n_tokens * a_row];
            act.par_chunks_mut(a_row).zip(x.par_chunks(row_len)).for_each(|(o, xr)| quantize(xr, o));
            (0..n_chunks).into_par_iter().for_each(|c| {
                let rows = c * chunk..((c + 1) * chunk).min(n_rows);
                for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                    for t in t0..(t0 + TOKEN_TILE).min(n_tokens) {
                        let a = &act[t * a_row..(t + 1) * a_row];
                        for r in rows.clone() {
                            let v = dot(w_row(r), a);
                            // SAFETY: see OutPtr; t * n_rows + r < out.len() was asserted above.
                            unsafe { out_ptr.write(t * n_rows + r, v) };
                        }
                    }
                }
            });
        }
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

/// Whether `ty` can be multiplied (and dequantized for embeddings) by this backend.
pub(super) fn supported(ty: GgmlType) -> bool {
    ty.is_supported() && ty != GgmlType::Q8K
}
