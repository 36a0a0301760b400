//! The products ([`Backend::matmul`]) and the weights they read: upload (the file's blocks, Q4_0
//! repacked), the choice of kernel per batch size, the Q8 activations a product rounds its input to and
//! the hints that let the op writing that input quantize it on the way out.

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use cudarc::cublas::{result as blas, sys as blas_sys};

use super::scratch::Scratch;
use super::{blocks, dptr, graph, weight, Act, CudaBackend, CudaWeight, A, INT_PATH_MAX_TOK, MMQ_ROWS, MMQ_THREADS, MMQ_TILES, MMV_MAX_TOK};
use crate::backend::{BackendError, Buffer, HostWeight, Weight};
use crate::dtype::GgmlType;

/// The kernel-name suffix of a weight type, if the kernels read it.
fn type_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q6K => "q6_k",
        _ => return None,
    })
}

/// Q4_0 blocks `[d f16, qs 16 bytes] x nb` per row -> `[qs x nb][d x nb]` per row (same size).
fn repack_q4_0(bytes: &[u8], nb: usize) -> Vec<u8> {
    let row_bytes = nb * 18;
    let mut out = vec![0u8; bytes.len()];
    for (src, dst) in bytes.chunks_exact(row_bytes).zip(out.chunks_exact_mut(row_bytes)) {
        let (qs, ds) = dst.split_at_mut(nb * 16);
        for (b, blk) in src.chunks_exact(18).enumerate() {
            ds[2 * b..2 * b + 2].copy_from_slice(&blk[..2]);
            qs[16 * b..16 * b + 16].copy_from_slice(&blk[2..]);
        }
    }
    out
}

impl CudaBackend {
    /// [`Backend::upload_weight`]: vectors as f32, matrices as the file's blocks (Q4_0 repacked), with
    /// the kernels that multiply them.
    pub(super) fn upload_matrix(&self, w: &HostWeight) -> Result<Weight, BackendError> {
        let bad = |problem: String| BackendError::BadWeight { name: w.name.clone(), problem };
        let unsupported = || BackendError::UnsupportedType { name: w.name.clone(), ty: w.ty, backend: "cuda".into() };
        let row_bytes = crate::quant::row_bytes(w.ty, w.row_len)
            .ok_or_else(|| bad(format!("rows of {} are not whole {} blocks", w.row_len, w.ty)))?;
        let len = row_bytes.checked_mul(w.n_rows).ok_or_else(|| bad("size overflows".into()))?;
        let host = w.source.host_bytes();
        if w.offset.checked_add(len).is_none_or(|end| end > host.len()) {
            return Err(bad(format!("{len} bytes at offset {} run past the {} bytes of the file", w.offset, host.len())));
        }
        let bytes = &host[w.offset..w.offset + len];
        let suffix = type_suffix(w.ty).filter(|_| w.row_len.is_multiple_of(32));
        self.bind();
        let vector = if w.n_rows == 1 {
            let mut v = vec![0.0f32; w.row_len];
            crate::quant::dequantize(w.ty, bytes, &mut v).map_err(|_| unsupported())?;
            Some(self.stream.clone_htod(&v).map_err(|_| self.alloc_err(&w.name, w.row_len * 4))?)
        } else {
            None
        };
        let Some(suffix) = suffix else {
            return match vector {
                Some(vector) => {
                    let data = self.stream.alloc_zeros::<u8>(1).map_err(|_| self.alloc_err(&w.name, 1))?;
                    let inner = CudaWeight { data, vector: Some(vector), mmv: None, mmv1: None, mmq: None, dequant: None, embed: None };
                    Ok(Weight::new(w.ty, w.row_len, w.n_rows, Box::new(inner)))
                }
                None => Err(unsupported()),
            };
        };
        // Q4_0 rows of an even number of blocks are repacked for 16-byte loads (kernels/quant.cu, T_Q4_0R)
        let (suffix, data) = if w.ty == GgmlType::Q4_0 && (w.row_len / 32).is_multiple_of(2) {
            let packed = repack_q4_0(bytes, w.row_len / 32);
            ("q4_0r", self.stream.clone_htod(&packed).map_err(|_| self.alloc_err(&w.name, len))?)
        } else {
            (suffix, self.stream.clone_htod(bytes).map_err(|_| self.alloc_err(&w.name, len))?)
        };
        self.copied.fetch_add(len, Ordering::Relaxed);
        let act = match w.ty {
            GgmlType::F32 | GgmlType::F16 => Act::F32,
            GgmlType::Q4K | GgmlType::Q6K => Act::Q8K,
            _ => Act::Q8,
        };
        let inner = CudaWeight {
            data,
            vector,
            mmv: Some((self.k.get(&format!("mmv_{suffix}")).clone(), act)),
            mmv1: match suffix {
                _ if act == Act::Q8K && self.mmv1 && self.mmv1k => Some((self.k.get(&format!("mmv1_{suffix}")).clone(), 0)),
                _ if act != Act::Q8 || !self.mmv1 => None,
                "q4_0r" if self.mmvp_blocks > 0 => Some((self.k.get("mmvp_q4_0r").clone(), self.mmvp_blocks)),
                _ => Some((self.k.get(&format!("mmv1_{suffix}")).clone(), 0)),
            },
            mmq: (act == Act::Q8K && self.mmq)
                .then(|| ["", "_n"].map(|shape| MMQ_TILES.map(|t| self.k.get(&format!("mmq_{suffix}_{t}{shape}")).clone()))),
            dequant: Some(self.k.get(&format!("dequant_f16_{suffix}")).clone()),
            embed: Some(self.k.get(&format!("embed_{suffix}")).clone()),
        };
        Ok(Weight::new(w.ty, w.row_len, w.n_rows, Box::new(inner)))
    }

    /// [`Backend::matmul`] (the module doc's product paths).
    pub(super) fn product(&self, w: &Weight, x: &Buffer, n_tokens: usize, out: &mut Buffer) {
        let cw = weight(w);
        let (k, n_rows, n) = (w.row_len(), w.n_rows(), n_tokens);
        assert!(x.len() >= n * k && out.len() >= n * n_rows, "matmul: buffers too small");
        if n == 0 {
            return;
        }
        let (mmv, act) = cw.mmv.as_ref().expect("matrix of a supported type");
        let wp = dptr(&cw.data, &self.stream);
        let (xp, op) = (self.p(x), self.p(out));
        let mut s = self.lock();
        let mmq = cw.mmq.as_ref().filter(|_| self.mmq_tokens.contains(&n));
        if n <= INT_PATH_MAX_TOK || mmq.is_some() {
            let grid = (blocks(n_rows, 4), 1, 1);
            if *act != Act::F32 {
                let nblk = n * k / 32;
                // a scratch array about to be reallocated loses what the record says it holds
                let [qa, da, sa, ss] = self.quant_scratch(&mut s, n, k);
                self.note_quant_hint(xp, k, *act);
                let (name, groups) = if *act == Act::Q8K { ("quantize_q8k", nblk / 8) } else { ("quantize_q8", nblk) };
                let key = Some((xp, n, k, *act as u8));
                let mut q = self.quantized.lock().unwrap_or_else(|e| e.into_inner());
                if *q != key {
                    self.forget_packed();
                    let args = [A::P(xp), A::P(qa), A::P(da), A::P(sa), A::P(ss), A::I(groups as i32)];
                    self.launch_keep(self.k.get(name), (blocks(groups * 32, 256), 1, 1), 256, &args);
                    *q = key;
                }
                if op == xp {
                    *q = None;
                }
                drop(q);
                if let Some(fs) = mmq {
                    let i = MMQ_TILES.iter().position(|&t| n <= t).unwrap_or(MMQ_TILES.len() - 1);
                    // the activations in mmq's layout (kernels/mmq.cu mmq_pack), once per quantized input
                    // then their scales (f32) and block sums (8 x i32) per token and super-block
                    let n_pad = n.div_ceil(MMQ_TILES[i]) * MMQ_TILES[i];
                    let scales = n_pad * (k / 256);
                    let qp = s.mmq_act.ensure(&self.stream, n_pad * k + 36 * scales, &self.flusher());
                    let (dap, sap) = (qp + (n_pad * k) as u64, qp + (n_pad * k + 4 * scales) as u64);
                    let mut packed = self.mmq_packed.lock().unwrap_or_else(|e| e.into_inner());
                    if *packed != Some((qa, qp, n_pad, k)) {
                        let args = [A::P(qa), A::P(da), A::P(sa), A::I(k as i32), A::I(n as i32), A::I(n_pad as i32), A::P(qp)];
                        self.launch_keep(self.k.get("mmq_pack"), (blocks(n_pad * k / 16, 256), 1, 1), 256, &args);
                        *packed = Some((qa, qp, n_pad, k));
                    }
                    drop(packed);
                    let args = [A::P(qp), A::P(dap), A::P(sap), A::I(k as i32), A::I(n as i32), A::P(wp), A::I(n_rows as i32), A::P(op)];
                    // narrow CTAs: 16 rows, 8 warps on each row's K
                    let rows = if self.mmq_narrow { MMQ_ROWS / 2 } else { MMQ_ROWS };
                    let f = &fs[self.mmq_narrow as usize][i];
                    let grid = (n_rows.div_ceil(rows) as u32, n.div_ceil(MMQ_TILES[i]) as u32, 1);
                    self.launch_keep(f, grid, MMQ_THREADS, &args);
                    return;
                }
                // per launch of up to MMV_MAX_TOK tokens: offsets of its first token's activation blocks
                // (kernels/quant.cu MMV_ARGS: activations, then up to three (weight, rows, output) parts;
                // inside `run` the queue merges products of the same activations into one launch)
                for t0 in (0..n).step_by(MMV_MAX_TOK) {
                    let nt = (n - t0).min(MMV_MAX_TOK);
                    let b0 = (t0 * k / 32) as u64;
                    let args = [
                        A::P(qa + t0 as u64 * k as u64),
                        A::P(da + 4 * b0),
                        A::P(sa + 4 * b0),
                        A::P(ss + 4 * b0),
                        A::I(k as i32),
                        A::I(nt as i32),
                        A::P(wp),
                        A::I(n_rows as i32),
                        A::P(op + 4 * (t0 * n_rows) as u64),
                        A::P(0),
                        A::I(0),
                        A::P(0),
                        A::P(0),
                        A::I(0),
                        A::P(0),
                    ];
                    let (f, grid) = match (&cw.mmv1, nt) {
                        (Some((f1, 0)), 1) => (f1, grid),
                        (Some((f1, cap)), 1) => (f1, (grid.0.min(*cap), 1, 1)),
                        _ => (mmv, grid),
                    };
                    self.enqueue(graph::Op::mmv(f.cu_function(), grid, 128, &args, 4));
                }
            } else {
                for t0 in (0..n).step_by(MMV_MAX_TOK) {
                    let nt = (n - t0).min(MMV_MAX_TOK);
                    let args = [A::P(wp), A::I(k as i32), A::I(n_rows as i32), A::P(xp + 4 * (t0 * k) as u64), A::I(nt as i32), A::P(op + 4 * (t0 * n_rows) as u64)];
                    self.launch_fn(mmv, grid, 128, &args);
                }
            }
        } else {
            let w16 = s.wf16.ensure(&self.stream, n_rows * k, &self.flusher());
            let x16 = s.xf16.ensure(&self.stream, n * k, &self.flusher());
            let deq = cw.dequant.as_ref().expect("matrix of a supported type");
            self.launch_fn(deq, (blocks(n_rows * k / 32, 256), 1, 1), 256, &[A::P(wp), A::I(k as i32), A::I(n_rows as i32), A::P(w16)]);
            match act {
                Act::F32 => self.launch("f32_to_f16", (blocks(n * k, 256), 1, 1), 256, &[A::P(xp), A::P(x16), A::L((n * k) as i64)]),
                Act::Q8 => self.launch("q8_to_f16", (blocks(n * k, 256), 1, 1), 256, &[A::P(xp), A::P(x16), A::I((n * k / 32) as i32)]),
                Act::Q8K => self.launch("q8k_to_f16", (blocks(n * k / 8, 256), 1, 1), 256, &[A::P(xp), A::P(x16), A::I((n * k / 256) as i32)]),
            }
            self.flush();
            self.bind();
            self.gemm_f16(w16, x16, n_rows, n, k, op);
        }
    }

    /// How the next product of `x` (rows of `k`, or any row length when `k` is 0) will round it, if a
    /// product read it last time: `(row length, 1 = Q8 | 2 = Q8K)`.
    pub(super) fn quant_hint(&self, x: u64, k: usize) -> Option<(usize, i32)> {
        if !self.fuse {
            return None;
        }
        let hints = self.quant_hints.lock().unwrap_or_else(|e| e.into_inner());
        let &(_, len, act) = hints.iter().find(|h| h.0 == x && (k == 0 || h.1 == k))?;
        match act {
            Act::Q8 if len.is_multiple_of(32) => Some((len, 1)),
            Act::Q8K if len.is_multiple_of(256) => Some((len, 2)),
            _ => None,
        }
    }

    /// Most tokens whose products take quantized activations (rounding `qact`, as [`Self::quant_hint`]).
    pub(super) fn int_tokens(&self, qact: i32) -> usize {
        if qact == 2 && self.mmq {
            (*self.mmq_tokens.end()).max(INT_PATH_MAX_TOK)
        } else {
            INT_PATH_MAX_TOK
        }
    }

    pub(super) fn note_quant_hint(&self, x: u64, k: usize, act: Act) {
        let mut hints = self.quant_hints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hints.iter_mut().find(|h| h.0 == x && h.1 == k) {
            h.2 = act;
        } else {
            if hints.len() == 8 {
                hints.remove(0);
            }
            hints.push((x, k, act));
        }
    }

    /// The Q8 scratch for `n` rows of `k` (qa, da, sa, ss), for an op that quantizes on the way out;
    /// forgets the record if an array is reallocated.
    pub(super) fn quant_scratch(&self, s: &mut Scratch, n: usize, k: usize) -> [u64; 4] {
        let nblk = n * k / 32;
        let fits = s.qa.0.as_ref().is_some_and(|a| a.len() >= n * k)
            && [&s.da.0, &s.ss.0].iter().all(|a| a.as_ref().is_some_and(|a| a.len() >= nblk))
            && s.sa.0.as_ref().is_some_and(|a| a.len() >= nblk);
        if !fits {
            self.forget_quantized();
        }
        [
            s.qa.ensure(&self.stream, n * k, &self.flusher()),
            s.da.ensure(&self.stream, nblk, &self.flusher()),
            s.sa.ensure(&self.stream, nblk, &self.flusher()),
            s.ss.ensure(&self.stream, nblk, &self.flusher()),
        ]
    }

    /// Records that the Q8 scratch now holds `x` (`n` rows of `k`) rounded as `qact`.
    pub(super) fn set_quantized(&self, x: u64, n: usize, k: usize, qact: i32) {
        let act = if qact == 1 { Act::Q8 } else { Act::Q8K };
        *self.quantized.lock().unwrap_or_else(|e| e.into_inner()) = Some((x, n, k, act as u8));
        self.forget_packed();
    }

    /// cuBLAS: `out[t][r] = sum_k w[r][k] x[t][k]` on f16 copies, f32 accumulation.
    fn gemm_f16(&self, w16: u64, x16: u64, n_rows: usize, n_tok: usize, k: usize, out: u64) {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let i = |v: usize| i32::try_from(v).expect("GEMM dimension over i32");
        // Column-major view: out (n_rows x n_tok, ld n_rows) = W^T (W is k x n_rows, ld k) * X (k x n_tok).
        // SAFETY: the pointers are device arrays of n_rows*k and n_tok*k f16 and n_tok*n_rows f32.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i(n_rows),
                i(n_tok),
                i(k),
                &alpha as *const f32 as *const c_void,
                w16 as *const c_void,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                i(k),
                x16 as *const c_void,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                i(k),
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                i(n_rows),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .unwrap_or_else(|e| panic!("cuBLAS GEMM failed: {e:?}"));
    }
}
