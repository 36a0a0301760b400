//! The CUDA backend: the [`Backend`] ops on an NVIDIA GPU through the driver API (`cudarc`, loaded at
//! run time, so the binary builds and runs on machines without CUDA).
//!
//! Contract, beyond the trait's:
//! - **Probe first.** [`available`] checks for the driver, NVRTC and cuBLAS libraries before any context
//!   is made (cudarc panics when a library is missing); [`CudaBackend::new`] returns a
//!   [`BackendError::Init`] when there is no usable GPU.
//! - **Memory.** Weights are copied to the device once, as the quantized blocks of the file (vectors such
//!   as norm weights and biases as f32). Activations ([`Buffer`]) are `f32` device arrays, K/V pools are
//!   f16 device arrays laid out as the trait says. Host-side index lists (tokens, positions, slot mapping,
//!   block tables) are uploaded per op into small device arrays, skipped when equal to the last upload of
//!   the same kind (the layers of one step share them).
//! - **One stream.** Every op is queued on the backend's stream in call order; only `read_buffer` waits.
//! - **Products.** Activations are rounded as the CPU backend rounds them (Q8 blocks of 32 for the
//!   legacy types, Q8_K for the k-quants, none for float weights). Up to [`INT_PATH_MAX_TOK`] tokens:
//!   integer dot products straight from the weight blocks (`kernels/quant.cu`, launches of
//!   [`MMV_MAX_TOK`] tokens). More tokens: the weight dequantized to f16, the rounded activations as f16,
//!   one cuBLAS GEMM (f32 accumulation).
//! - **The CPU's numbers.** On the integer path every op gives the CPU backend's result bit for bit
//!   (measured: logits equal on every synthetic model and SmolLM2): the dots keep the CPU's float order
//!   (per-block terms, 4 accumulators / per-super-block sums, `reduce4`), attention keeps its 512-key
//!   splits, f16 Q and softmax weights and FMA orders, and the kernels are compiled with `--fmad=false`
//!   so no expression is contracted where Rust's is not. Why it matters: Q8 and f16 rounding steps turn
//!   a last-bit difference into a 1e-3..1e-1 difference in the logits (bench/GPU_NOTES.md).
//!
//! - **KV budget views** (`KvView`): dead entries are skipped, each split's live keys compacted in entry
//!   order, so views give the CPU's result bit for bit too; the probabilities (`score_offset`) come from
//!   the same pass (kernels/attention.cu: weights kept per row, summed by `attn_scores` in the CPU's order).
//!
//! - **Few launches** (graph.rs): inside [`Backend::run`] launches are deferred and issued at the next
//!   flush; a step whose launch list repeats the last one (decode) is captured once into a CUDA graph and
//!   then replayed with one driver call per step. Products of one input (Q, K, V; gate, up) share one
//!   launch, and rms_norm / glu quantize their output for the product that reads it (`rms_norm_q`,
//!   `glu_q`). One-token products use `mmv1_*` (more loads in flight per warp: 4 rounds of 32 blocks,
//!   2 for the k-quants), Q4_0 the persistent, software-pipelined `mmvp_q4_0r`. `PAGELLM_CUDA_GRAPH=0`,
//!   `PAGELLM_CUDA_FUSE=0`, `PAGELLM_CUDA_MMV1=0`, `PAGELLM_CUDA_MMVP=0`, `PAGELLM_CUDA_MMV1K=0` turn each
//!   off (comparisons, bench/GPU_NOTES.md).
//!
//! Not yet: batch invariance across the two product paths (above [`INT_PATH_MAX_TOK`] tokens the f16
//! GEMM path gives a token different logits, up to 4e-2 relative L2 on the tiny models), `--gpu-layers`.

mod attn_meta;
mod graph;
mod module;
mod scratch;

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{sys as drv, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};

use super::{AttnParams, AttnSeq, Backend, BackendError, Buffer, Glu, HostWeight, KvShape, KvStore, RopeMode, RopeParams, Weight};
use crate::dtype::GgmlType;
use attn_meta::attn_meta;
use scratch::{Grow, Scratch, Tag, Upload};

/// Most tokens the matrix-vector kernels take in one launch (`MMV_MAX_TOK` in kernels/quant.cu).
pub const MMV_MAX_TOK: usize = 8;
/// Keys per attention split (`ATT_SPLIT` in kernels/attention.cu): the CPU backend's, so that both
/// compute the same function.
pub const ATTN_SPLIT: usize = super::cpu::ATTN_SPLIT_TOKENS;
const _: () = assert!(ATTN_SPLIT == 512, "kernels/attention.cu hard-codes ATT_SPLIT 512");
/// Most tokens a product takes on the integer-dot kernels (in launches of [`MMV_MAX_TOK`]), which round
/// exactly as the CPU does; larger batches go through dequantize + cuBLAS f16 (faster, not exact).
/// 24: up to here the chunked integer kernels also beat dequantize + cuBLAS on an H100 (bench/GPU_NOTES.md).
pub const INT_PATH_MAX_TOK: usize = 24;
/// Most tokens a k-quant product runs on the integer tensor cores (`mmq_*`); more: dequantize + cuBLAS.
/// At 64 tokens mmq measured slower than cuBLAS on the H200 (Q4_K 14336 x 4096: 0.117 vs 0.128 ms, but
/// 4096 x 14336: 0.236 vs 0.134 ms: 64 CTAs for 4096 rows), at 16-24 faster than mmv in launches of 8
/// (0.073-0.080 vs 0.157-0.236 ms; bench/GPU_NOTES.md, session 5).
pub const MMQ_MAX_TOK: usize = INT_PATH_MAX_TOK;
/// Weight rows and tokens of one `mmq_*` CTA (kernels/mmq.cu MMQ_ROWS, MMQ_TOK) and its threads.
const MMQ_ROWS: usize = 64;
const MMQ_TOK: usize = 64;
const MMQ_THREADS: u32 = 128;
/// Threads per attention CTA (`ATT_WARPS` x 32 in kernels/attention.cu).
const ATTN_THREADS: u32 = 256;
/// Head sizes the attention kernel is instantiated for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Whether the CUDA libraries can be loaded, without touching them further (no context, no panic).
pub fn available() -> Result<(), String> {
    // SAFETY: these only try to dlopen the libraries by name.
    unsafe {
        if !drv::is_culib_present() {
            return Err("no CUDA driver library (libcuda.so) found".into());
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err("no NVRTC library (libnvrtc.so) found".into());
        }
        if !blas_sys::is_culib_present() {
            return Err("no cuBLAS library (libcublas.so) found".into());
        }
    }
    Ok(())
}

fn init_err(problem: impl Into<String>) -> BackendError {
    BackendError::Init { backend: "cuda".into(), problem: problem.into() }
}

/// A kernel argument, passed by value.
#[derive(Clone, Copy, PartialEq, Debug)]
enum A {
    /// A device pointer (0 for null).
    P(u64),
    I(i32),
    U(u32),
    F(f32),
    L(i64),
}

/// A weight on the device, with its kernels picked at upload (dispatch once).
struct CudaWeight {
    /// The blocks as in the file; empty for vectors of a type the kernels do not read.
    data: CudaSlice<u8>,
    /// Vectors (one row: norm weights, biases) as f32.
    vector: Option<CudaSlice<f32>>,
    /// `mmv_*`, and how it takes its activations.
    mmv: Option<(CudaFunction, Act)>,
    /// `mmv1_*` (or `mmvp_q4_0r`): one token (32-weight types), and the most blocks a launch needs
    /// (0: one per 4 rows; the persistent `mmvp` fills the GPU once).
    mmv1: Option<(CudaFunction, u32)>,
    /// `mmq_*` (k-quants on sm_80+): batches of more than `MMV_MAX_TOK` up to [`MMQ_MAX_TOK`] tokens
    /// on the integer tensor cores, exact like the CPU (kernels/mmq.cu).
    mmq: Option<CudaFunction>,
    dequant: Option<CudaFunction>,
    embed: Option<CudaFunction>,
}

/// How a product's activations are rounded before the multiply (as the CPU backend's `vec_dot_type`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    /// f32 (float weights).
    F32,
    /// Q8 blocks of 32 with an f16 scale (legacy quantized weights).
    Q8,
    /// Q8_K: one f32 scale per 256 (k-quant weights).
    Q8K,
}

struct CudaKv {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: module::Kernels,
    #[allow(dead_code)] // grid sizing (mmvp's block count is computed from it at start)
    sms: usize,
    name: String,
    copied: AtomicUsize,
    scratch: Mutex<Scratch>,
    /// The activations now in the Q8 scratch: (x pointer, tokens, row length, Act as u8). Products of
    /// one input (Q, K, V; gate, up) quantize it once. Cleared by every launch other than a product's,
    /// by writes and allocations, and by a product that writes over x.
    quantized: Mutex<Option<(u64, usize, usize, u8)>>,
    /// Launches deferred inside `run`, and the graphs that replay them (graph.rs).
    queue: Mutex<graph::Queue>,
    /// Whether one-token products use `mmv1_*`.
    mmv1: bool,
    /// Whether one-token k-quant products use `mmv1_q4_k` / `mmv1_q6_k` (2 rounds in flight) instead
    /// of `mmv` (`PAGELLM_CUDA_MMV1K=0`: `mmv`).
    mmv1k: bool,
    /// Whether k-quant products of 9 to [`MMQ_MAX_TOK`] tokens use `mmq_*` (sm_80+; `PAGELLM_CUDA_MMQ=0`:
    /// `mmv` up to [`INT_PATH_MAX_TOK`], then cuBLAS).
    mmq: bool,
    /// Blocks of `mmvp_q4_0r` that fit the GPU at once (0: not used, `PAGELLM_CUDA_MMVP=0`).
    mmvp_blocks: u32,
    /// Whether rms_norm and glu also quantize their output for the product that reads it next
    /// (`rms_norm_q`, `glu_q`), as told by [`CudaBackend::quant_hints`].
    fuse: bool,
    /// (activations pointer, row length, rounding) of the last products that quantized their input:
    /// an op writing that buffer next time quantizes it on the way out (one launch fewer).
    quant_hints: Mutex<Vec<(u64, usize, Act)>>,
    /// The head-dim-128 attention kernel `PAGELLM_CUDA_ATTN` forces (see [`attn128`]); `None`: chosen per call.
    attn128: Option<(&'static str, usize, u32)>,
}

/// The head-dim-128 attention kernel `PAGELLM_CUDA_ATTN` forces (`g4c64`: 4 query heads per CTA;
/// `g2c64`: 2; `w16`: 4 with 16 warps), with its heads per CTA and threads. Unset, each call picks g2
/// when g4 would leave SMs idle, else g4 ([`CudaBackend::attention`]): g2 is 11% faster for a decode
/// step of one sequence at 4096 keys on the H200 and slower with many CTAs (bench/GPU_NOTES.md, session 4).
fn attn128() -> Option<(&'static str, usize, u32)> {
    match std::env::var("PAGELLM_CUDA_ATTN").as_deref() {
        Ok("g4c64") => Some(("attn_hd128", 4, ATTN_THREADS)),
        Ok("g2c64") => Some(("attn_hd128_g2c64", 2, ATTN_THREADS)),
        Ok("w16") => Some(("attn_hd128_w16", 4, 512)),
        _ => None,
    }
}

fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

fn weight(w: &Weight) -> &CudaWeight {
    w.inner().downcast_ref::<CudaWeight>().expect("weight from another backend")
}

fn slice(b: &Buffer) -> &CudaSlice<f32> {
    b.inner().downcast_ref::<CudaSlice<f32>>().expect("buffer from another backend")
}

fn kv_ref(kv: &KvStore) -> &CudaKv {
    kv.inner().downcast_ref::<CudaKv>().expect("kv store from another backend")
}

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

fn blocks(n: usize, per: usize) -> u32 {
    u32::try_from(n.div_ceil(per)).expect("grid too large")
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

thread_local! {
    /// The context last made current on this thread (binding costs two driver calls per launch).
    static BOUND: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl CudaBackend {
    /// The backend on GPU `ordinal`: probes the libraries, makes a context and a stream, loads the kernels.
    pub fn new(ordinal: usize) -> Result<CudaBackend, BackendError> {
        available().map_err(init_err)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| init_err(format!("no usable GPU {ordinal}: {e}")))?;
        // One stream, in-order: cudarc's per-buffer events would only add work.
        // SAFETY: no buffer exists yet, and every op below runs on the one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| init_err(format!("stream: {e}")))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| init_err(format!("cuBLAS: {e}")))?;
        let k = module::load(&ctx).map_err(init_err)?;
        let sms = ctx
            .attribute(drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| init_err(e.to_string()))? as usize;
        let (major, minor) = ctx.compute_capability().map_err(|e| init_err(e.to_string()))?;
        let gpu = ctx.name().unwrap_or_else(|_| "GPU".into());
        let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        let name = format!("cuda ({gpu}, sm_{major}{minor}, {sms} SMs, {mem:.0} GiB)");
        let up = || Upload { host: Vec::new(), dev: Grow(None), epoch: u64::MAX };
        let scratch = Scratch {
            qa: Grow(None),
            da: Grow(None),
            sa: Grow(None),
            ss: Grow(None),
            wf16: Grow(None),
            xf16: Grow(None),
            part_o: Grow(None),
            part_ml: Grow(None),
            weights: Grow(None),
            moved: Grow(None),
            up: std::array::from_fn(|_| up()),
        };
        // dispatch once; for comparisons: PAGELLM_CUDA_GRAPH=0 (no graphs), PAGELLM_CUDA_FUSE=0 (no merged
        // products, no quantizing epilogues), both: every launch issued at once as before;
        // PAGELLM_CUDA_MMV1=0 (no one-token kernels), PAGELLM_CUDA_MMVP=0 (Q4_0 one-token products by mmv1
        // instead of the persistent mmvp), PAGELLM_CUDA_MMV1K=0 (k-quant one-token products by mmv)
        let off = |v: &str| std::env::var(v).as_deref() == Ok("0");
        // programmatic dependent launch on sm_90 and later (PAGELLM_CUDA_PDL=0: every launch waits for
        // the previous kernel to finish before it starts, as before)
        let pdl = major >= 9 && !off("PAGELLM_CUDA_PDL");
        let queue = Mutex::new(graph::Queue::new(!off("PAGELLM_CUDA_GRAPH"), !off("PAGELLM_CUDA_FUSE"), pdl));
        let mmv1 = !off("PAGELLM_CUDA_MMV1");
        let fuse = !off("PAGELLM_CUDA_FUSE");
        let mmvp_blocks = if off("PAGELLM_CUDA_MMVP") {
            0
        } else {
            let per_sm = k.get("mmvp_q4_0r").occupancy_max_active_blocks_per_multiprocessor(128, 0, None).unwrap_or(0);
            per_sm * sms as u32
        };
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            k,
            sms,
            name,
            copied: AtomicUsize::new(0),
            scratch: Mutex::new(scratch),
            quantized: Mutex::new(None),
            queue,
            mmv1,
            mmv1k: !off("PAGELLM_CUDA_MMV1K"),
            mmq: major >= 8 && !off("PAGELLM_CUDA_MMQ"),
            mmvp_blocks,
            fuse,
            quant_hints: Mutex::new(Vec::new()),
            attn128: attn128(),
        })
    }

    /// Waits until every queued op has finished (timings, tests).
    pub fn synchronize(&self) {
        self.flush();
        self.stream.synchronize().unwrap_or_else(|e| panic!("cuda: {e}"));
    }

    /// (flushes replayed from a CUDA graph, graphs captured) so far.
    pub fn graph_stats(&self) -> (u64, u64) {
        let q = self.queue();
        (q.replays, q.captures)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, graph::Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues the launches deferred so far (graph.rs).
    fn flush(&self) {
        let mut q = self.queue();
        if q.has_pending() {
            self.bind();
            q.flush(&self.stream);
        }
    }

    fn bind(&self) {
        let id = Arc::as_ptr(&self.ctx) as usize;
        if BOUND.with(|b| b.get()) != id {
            self.ctx.bind_to_thread().unwrap_or_else(|e| panic!("cuda: cannot bind the context: {e}"));
            BOUND.with(|b| b.set(id));
        }
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[A]) {
        self.launch_fn(self.k.get(name), grid, block, args)
    }

    fn launch_fn(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, args: &[A]) {
        self.forget_quantized();
        self.launch_keep(f, grid, block, args)
    }

    fn forget_quantized(&self) {
        *self.quantized.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A launch that leaves the Q8 scratch's record alone (the products' own).
    fn launch_keep(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, args: &[A]) {
        self.enqueue(graph::Op::new(f.cu_function(), grid, block, args));
    }

    /// Queues `op` inside `run`, else issues it.
    fn enqueue(&self, op: graph::Op) {
        let mut q = self.queue();
        if q.recording {
            q.push(op);
        } else {
            let pdl = q.pdl;
            drop(q);
            self.bind();
            op.issue(&self.stream, pdl);
        }
    }

    fn p(&self, b: &Buffer) -> u64 {
        dptr(slice(b), &self.stream)
    }

    /// How the next product of `x` (rows of `k`, or any row length when `k` is 0) will round it, if a
    /// product read it last time: `(row length, 1 = Q8 | 2 = Q8K)`.
    fn quant_hint(&self, x: u64, k: usize) -> Option<(usize, i32)> {
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
    fn int_tokens(&self, qact: i32) -> usize {
        if qact == 2 && self.mmq {
            MMQ_MAX_TOK
        } else {
            INT_PATH_MAX_TOK
        }
    }

    fn note_quant_hint(&self, x: u64, k: usize, act: Act) {
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
    /// The y of a residual add x += y of `len` values queued just before (0: none), taken out of the
    /// queue: the norm of x that follows does it (`rms_norm` / `rms_norm_q`'s y).
    fn take_add(&self, x: u64, len: usize) -> u64 {
        if !self.fuse {
            return 0;
        }
        let add = self.k.get("add").cu_function() as usize;
        let mut q = self.queue();
        let y = match q.last_mut() {
            Some(op) if op.f == add && op.args[0] == A::P(x) && op.args[2] == A::L(len as i64) => match op.args[1] {
                A::P(y) => y,
                _ => return 0,
            },
            _ => return 0,
        };
        q.pop();
        y
    }

    fn quant_scratch(&self, s: &mut Scratch, n: usize, k: usize) -> [u64; 4] {
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
    fn set_quantized(&self, x: u64, n: usize, k: usize, qact: i32) {
        let act = if qact == 1 { Act::Q8 } else { Act::Q8K };
        *self.quantized.lock().unwrap_or_else(|e| e.into_inner()) = Some((x, n, k, act as u8));
    }

    /// The device copy of a host list. A queued launch may read the current copy: a different list
    /// flushes the queue before overwriting it.
    fn upload(&self, s: &mut Scratch, tag: Tag, data: &[u32]) -> u64 {
        let u = &mut s.up[tag as usize];
        let epoch = self.queue().epoch;
        if u.epoch == epoch && !u.current(data) {
            self.flush();
        }
        let p = u.put(&self.stream, data, &|| self.flush());
        u.epoch = self.queue().epoch;
        p
    }

    /// `Grow::ensure`'s flush before a reallocation.
    fn flusher(&self) -> impl Fn() + '_ {
        || self.flush()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
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

    fn alloc_err(&self, what: &str, bytes: usize) -> BackendError {
        BackendError::OutOfMemory { what: what.into(), bytes, backend: "cuda".into() }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<Weight, BackendError> {
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
            mmq: (act == Act::Q8K && self.mmq).then(|| self.k.get(&format!("mmq_{suffix}")).clone()),
            dequant: Some(self.k.get(&format!("dequant_f16_{suffix}")).clone()),
            embed: Some(self.k.get(&format!("embed_{suffix}")).clone()),
        };
        Ok(Weight::new(w.ty, w.row_len, w.n_rows, Box::new(inner)))
    }

    fn weight_bytes_copied(&self) -> usize {
        self.copied.load(Ordering::Relaxed)
    }

    fn alloc(&self, len: usize) -> Result<Buffer, BackendError> {
        self.flush();
        self.forget_quantized();
        let s = self.stream.alloc_zeros::<f32>(len.max(1)).map_err(|_| self.alloc_err("activations", len * 4))?;
        Ok(Buffer::new(len, Box::new(s)))
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<KvStore, BackendError> {
        if !HEAD_DIMS.contains(&shape.head_dim) {
            return Err(init_err(format!("head_dim {} is not supported by the attention kernels (only {HEAD_DIMS:?}): use --device cpu", shape.head_dim)));
        }
        self.flush();
        let n = shape.num_slots() * shape.token_width();
        let err = || self.alloc_err("the KV cache", n * 4);
        let k = self.stream.alloc_zeros::<u16>(n).map_err(|_| err())?;
        let v = self.stream.alloc_zeros::<u16>(n).map_err(|_| err())?;
        Ok(KvStore::new(shape, Box::new(CudaKv { k, v })))
    }

    fn write_buffer(&self, dst: &mut Buffer, offset: usize, src: &[f32]) {
        self.flush();
        self.forget_quantized();
        let d = dst.inner_mut().downcast_mut::<CudaSlice<f32>>().expect("buffer from another backend");
        let mut view = d.slice_mut(offset..offset + src.len());
        self.stream.memcpy_htod(src, &mut view).unwrap_or_else(|e| panic!("cuda write_buffer: {e}"));
    }

    fn read_buffer(&self, src: &Buffer, offset: usize, dst: &mut [f32]) {
        self.flush();
        let view = slice(src).slice(offset..offset + dst.len());
        self.stream.memcpy_dtoh(&view, dst).unwrap_or_else(|e| panic!("cuda read_buffer: {e}"));
        self.synchronize();
    }

    /// The ops of `f` are queued and issued at the flushes (graph.rs): a decode step whose launch list
    /// repeats the last one runs as one CUDA graph.
    fn run(&self, f: &mut (dyn FnMut() + Send)) {
        /// Ends the recording however `f` ends (a panic inside a test's `catch_unwind` included).
        struct Stop<'a>(&'a CudaBackend);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.flush();
                self.0.queue().recording = false;
            }
        }
        {
            let mut q = self.queue();
            if q.recording || !q.defers() {
                drop(q);
                return f(); // nested (the outer run flushes), or nothing to gain from deferring
            }
            q.recording = true;
        }
        let _stop = Stop(self);
        f();
    }

    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut Buffer) {
        let cw = weight(table);
        let k = table.row_len();
        assert!(out.len() >= tokens.len() * k, "embed: output too small");
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.n_rows()) {
            panic!("embed: token {t} outside a vocabulary of {}", table.n_rows());
        }
        let f = cw.embed.as_ref().expect("embedding table of a supported type");
        let mut s = self.lock();
        let toks = self.upload(&mut s, Tag::Tokens, tokens);
        let n = tokens.len();
        let args = [A::P(dptr(&cw.data, &self.stream)), A::I(k as i32), A::P(toks), A::I(n as i32), A::P(self.p(out))];
        self.launch_fn(f, (blocks(n * k / 32, 128), 1, 1), 128, &args);
    }

    fn matmul(&self, w: &Weight, x: &Buffer, n_tokens: usize, out: &mut Buffer) {
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
        let mmq = cw.mmq.as_ref().filter(|_| n > MMV_MAX_TOK && n <= MMQ_MAX_TOK);
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
                    let args = [A::P(xp), A::P(qa), A::P(da), A::P(sa), A::P(ss), A::I(groups as i32)];
                    self.launch_keep(self.k.get(name), (blocks(groups * 32, 256), 1, 1), 256, &args);
                    *q = key;
                }
                if op == xp {
                    *q = None;
                }
                drop(q);
                if let Some(f) = mmq {
                    let args = [A::P(qa), A::P(da), A::P(sa), A::I(k as i32), A::I(n as i32), A::P(wp), A::I(n_rows as i32), A::P(op)];
                    let grid = (n_rows.div_ceil(MMQ_ROWS) as u32, n.div_ceil(MMQ_TOK) as u32, 1);
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

    fn add_bias(&self, x: &mut Buffer, bias: &Weight, n_tokens: usize) {
        let b = weight(bias).vector.as_ref().expect("bias is a vector");
        let len = bias.row_len();
        let n = n_tokens * len;
        self.launch("add_bias", (blocks(n, 256), 1, 1), 256, &[A::P(self.p(x)), A::P(dptr(b, &self.stream)), A::I(len as i32), A::L(n as i64)]);
    }

    fn rms_norm(&self, x: &Buffer, w: Option<&Weight>, row_len: usize, n_rows: usize, eps: f32, out: &mut Buffer) {
        assert!(x.len() >= row_len * n_rows && out.len() >= row_len * n_rows, "rms_norm: buffers too small");
        let wp = match w {
            Some(w) => {
                assert_eq!(w.row_len() * w.n_rows(), row_len, "rms_norm: weight length");
                dptr(weight(w).vector.as_ref().expect("norm weight is a vector"), &self.stream)
            }
            None => 0,
        };
        if n_rows == 0 {
            return;
        }
        // a block with row_len = PER x threads, PER = 1, 2, 4 or 8, takes the kernels' register path
        let threads = [1, 2, 4, 8]
            .into_iter()
            .find(|&per| row_len.is_multiple_of(32 * per) && row_len / per <= 1024)
            .map_or((row_len.div_ceil(32) * 32).clamp(32, 1024), |per| row_len / per) as u32;
        let (xp, op) = (self.p(x), self.p(out));
        let y = self.take_add(xp, row_len * n_rows);
        let args = [A::P(xp), A::P(wp), A::I(row_len as i32), A::F(eps), A::P(op), A::P(y)];
        match self.quant_hint(op, row_len) {
            // the next product of out quantizes it: do it here (kernels/elementwise.cu, rms_norm_q)
            Some((_, qact)) if n_rows <= self.int_tokens(qact) && op != xp => {
                let mut s = self.lock();
                let [qa, da, sa, ss] = self.quant_scratch(&mut s, n_rows, row_len);
                let q = [A::P(qa), A::P(da), A::P(sa), A::P(ss), A::I(qact)];
                self.launch("rms_norm_q", (n_rows as u32, 1, 1), threads, &[&args[..], &q[..]].concat());
                self.set_quantized(op, n_rows, row_len, qact);
            }
            _ => self.launch("rms_norm", (n_rows as u32, 1, 1), threads, &args),
        }
    }

    fn rope(&self, x: &mut Buffer, positions: &[u32], n_heads: usize, head_dim: usize, p: &RopeParams) {
        assert!(p.n_rot <= head_dim && p.n_rot.is_multiple_of(2));
        let n = positions.len();
        assert!(x.len() >= n * n_heads * head_dim, "rope: buffer too small");
        if n == 0 || p.n_rot == 0 {
            return;
        }
        let theta_scale = p.freq_base.powf(-2.0 / p.n_rot as f32);
        let mode = match p.mode {
            RopeMode::Norm => 0,
            RopeMode::Neox => 1,
        };
        let mut s = self.lock();
        let pos = self.upload(&mut s, Tag::Positions, positions);
        let ff = match p.freq_factors {
            Some(f) => {
                assert!(f.len() >= p.n_rot / 2, "rope: too few frequency factors");
                let bits: Vec<u32> = f.iter().map(|v| v.to_bits()).collect();
                self.upload(&mut s, Tag::FreqFactors, &bits)
            }
            None => 0,
        };
        let total = n * n_heads * p.n_rot / 2;
        let args = [
            A::P(self.p(x)),
            A::P(pos),
            A::I(n as i32),
            A::I(n_heads as i32),
            A::I(head_dim as i32),
            A::I(p.n_rot as i32),
            A::I(mode),
            A::F(theta_scale),
            A::F(p.freq_scale),
            A::P(ff),
            A::P(0),
            A::I(0),
        ];
        // RoPE of K right after RoPE of Q (same positions and angles): one launch of both
        if self.fuse {
            let rope = self.k.get("rope").cu_function() as usize;
            let mut q = self.queue();
            if let Some(prev) = q.last_mut() {
                let same = prev.f == rope && prev.args[11] == A::I(0) && prev.args[1..3] == args[1..3] && prev.args[4..10] == args[4..10];
                if same && prev.args[0] != args[0] {
                    let A::I(heads0) = prev.args[3] else { unreachable!("rope's argument 3 is n_heads") };
                    prev.args[10] = args[0];
                    prev.args[11] = args[3];
                    prev.grid.0 = blocks(n * heads0 as usize * p.n_rot / 2 + total, 256);
                    drop(q);
                    self.forget_quantized();
                    return;
                }
            }
        }
        self.launch("rope", (blocks(total, 256), 1, 1), 256, &args);
    }

    fn kv_write(&self, kv: &mut KvStore, k: &Buffer, v: &Buffer, slot_mapping: &[u32]) {
        let shape = kv.shape();
        let width = shape.token_width();
        let n = slot_mapping.len();
        if let Some(&slot) = slot_mapping.iter().find(|&&s| s as usize >= shape.num_slots()) {
            panic!("kv_write: slot {slot} outside a pool of {} slots", shape.num_slots());
        }
        assert!(k.len() >= n * width && v.len() >= n * width, "kv_write: buffers too small");
        if n == 0 {
            return;
        }
        let c = kv_ref(kv);
        let (kp, vp) = (dptr(&c.k, &self.stream), dptr(&c.v, &self.stream));
        let mut s = self.lock();
        let slots = self.upload(&mut s, Tag::Slots, slot_mapping);
        let args = [A::P(kp), A::P(vp), A::P(self.p(k)), A::P(self.p(v)), A::P(slots), A::I(n as i32), A::I(width as i32)];
        self.launch("kv_write", (blocks(n * width, 256), 1, 1), 256, &args);
    }

    fn kv_copy_blocks(&self, kv: &mut KvStore, copies: &[(u32, u32)]) {
        let shape = kv.shape();
        let per_block = shape.block_size * shape.token_width();
        let c = kv_ref(kv);
        let (kp, vp) = (dptr(&c.k, &self.stream), dptr(&c.v, &self.stream));
        for &(src, dst) in copies {
            assert!((src as usize) < shape.num_blocks && (dst as usize) < shape.num_blocks, "kv_copy_blocks: block outside the pool");
            let args = [A::P(kp), A::P(vp), A::U(src), A::U(dst), A::L(per_block as i64)];
            self.launch("kv_copy_blocks", (blocks(per_block, 256), 1, 1), 256, &args);
        }
    }

    fn kv_move_slots(&self, kv: &mut KvStore, moves: &[(u32, u32)]) {
        let shape = kv.shape();
        let width = shape.token_width();
        if let Some(&(a, b)) = moves.iter().find(|&&(a, b)| a.max(b) as usize >= shape.num_slots()) {
            panic!("kv_move_slots: move {a} -> {b} outside a pool of {} slots", shape.num_slots());
        }
        // the last move to each destination wins, as in the CPU's writes in order (the scatter below
        // writes every destination once, in parallel)
        let mut seen = std::collections::HashSet::new();
        let mut flat: Vec<u32> = Vec::with_capacity(2 * moves.len());
        for &(src, dst) in moves.iter().rev() {
            if seen.insert(dst) {
                flat.extend([src, dst]);
            }
        }
        let n = flat.len() / 2;
        if n == 0 {
            return;
        }
        let c = kv_ref(kv);
        let (kp, vp) = (dptr(&c.k, &self.stream), dptr(&c.v, &self.stream));
        let mut s = self.lock();
        let mv = self.upload(&mut s, Tag::Moves, &flat);
        let tmp = s.moved.ensure(&self.stream, 2 * n * width, &self.flusher());
        let args = [A::P(kp), A::P(vp), A::P(mv), A::I(n as i32), A::I(width as i32), A::P(tmp)];
        // gather every source, then scatter: all sources read before any destination is written
        self.launch("kv_gather", (blocks(n * width, 256), 1, 1), 256, &args);
        self.launch("kv_scatter", (blocks(n * width, 256), 1, 1), 256, &args);
    }

    fn attention(&self, q: &Buffer, kv: &KvStore, seqs: &[AttnSeq], p: &AttnParams, out: &mut Buffer, scores: Option<(&mut Buffer, usize)>) {
        let shape = kv.shape();
        let (hd, n_heads, n_kv) = (p.head_dim, p.n_heads, p.n_kv_heads);
        assert!(shape.head_dim == hd && shape.n_kv_heads == n_kv && n_heads % n_kv == 0);
        let bs = shape.block_size;
        let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
        if n_rows == 0 {
            return;
        }
        assert!(q.len() >= n_rows * n_heads * hd && out.len() >= n_rows * n_heads * hd, "attention: buffers too small");
        let (scores_p, scores_out) = match &scores {
            Some((b, base)) => (self.p(b), Some((*base, b.len()))),
            None => (0, None),
        };
        let meta = attn_meta(seqs, p, bs, scores_out);
        if let Some(&b) = meta.bt.iter().find(|&&b| b as usize >= shape.num_blocks) {
            panic!("attention: block {b} outside a pool of {} blocks", shape.num_blocks);
        }
        let n_splits = meta.n_splits;
        let group = n_heads / n_kv;

        let c = kv_ref(kv);
        let (kp, vp) = (dptr(&c.k, &self.stream), dptr(&c.v, &self.stream));
        let (qp, op) = (self.p(q), self.p(out));
        let mut s = self.lock();
        let rows_p = self.upload(&mut s, Tag::AttnRows, &meta.rows);
        let bt_p = self.upload(&mut s, Tag::AttnBt, &meta.bt);
        let live_p = if meta.live.is_empty() { 0 } else { self.upload(&mut s, Tag::AttnLive, &meta.live) };
        let (po, pml) = if n_splits > 1 {
            let po = s.part_o.ensure(&self.stream, n_rows * n_heads * n_splits * hd, &self.flusher());
            (po, s.part_ml.ensure(&self.stream, n_rows * n_heads * n_splits * 4, &self.flusher()))
        } else {
            (0, 0)
        };
        let wp = if meta.weights_len > 0 { s.weights.ensure(&self.stream, meta.weights_len, &self.flusher()) } else { 0 };
        let args = [
            A::P(qp),
            A::P(kp),
            A::P(vp),
            A::P(rows_p),
            A::P(bt_p),
            A::P(live_p),
            A::I(n_heads as i32),
            A::I(n_kv as i32),
            A::I(bs as i32),
            A::F(p.scale),
            A::I(n_splits as i32),
            A::P(op),
            A::P(po),
            A::P(pml),
            A::P(wp),
        ];
        // 4 query heads per CTA (one head per CTA, 4x the CTAs, measured slower for one sequence at
        // depth 4096 on the H200: bench/GPU_NOTES.md session 3); 2 when 4 leave SMs idle (one sequence
        // at 4096 keys: 34.1 vs 38.3 us per layer on the H200, session 4). Both give the same values.
        let ctas_g4 = n_rows * n_kv * group.div_ceil(4) * n_splits;
        let (name, g, threads) = match self.attn128 {
            Some((name, g, threads)) if hd == 128 => (name.to_string(), g, threads),
            None if hd == 128 && group > 2 && ctas_g4 < self.sms => ("attn_hd128_g2c64".to_string(), 2, ATTN_THREADS),
            _ => (format!("attn_hd{hd}"), 4, ATTN_THREADS),
        };
        let grid = (n_rows as u32, (n_kv * group.div_ceil(g)) as u32, n_splits as u32);
        self.launch(&name, grid, threads, &args);
        if n_splits > 1 {
            let args = [A::P(po), A::P(pml), A::P(rows_p), A::I(n_heads as i32), A::I(hd as i32), A::I(n_splits as i32), A::P(op)];
            self.launch("attn_merge", ((n_rows * n_heads) as u32, 1, 1), hd as u32, &args);
        }
        // the probabilities, summed over heads and rows in the CPU's order (every element written)
        if !meta.score_seqs.is_empty() {
            let seqs_p = self.upload(&mut s, Tag::AttnScoreSeqs, &meta.score_seqs);
            let args = [
                A::P(rows_p),
                A::P(seqs_p),
                A::P(live_p),
                A::P(wp),
                A::P(pml),
                A::I(n_heads as i32),
                A::I(n_kv as i32),
                A::I(bs as i32),
                A::I(n_splits as i32),
                A::P(scores_p),
            ];
            let grid = (blocks(meta.max_score_ctx, 128), n_kv as u32, (meta.score_seqs.len() / 5) as u32);
            self.launch("attn_scores", grid, 128, &args);
        }
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize) {
        assert!(x.len() >= len && y.len() >= len);
        self.launch("add", (blocks(len, 256), 1, 1), 256, &[A::P(self.p(x)), A::P(self.p(y)), A::L(len as i64)]);
    }

    fn scale(&self, x: &mut Buffer, s: f32, len: usize) {
        assert!(x.len() >= len);
        self.launch("scale", (blocks(len, 256), 1, 1), 256, &[A::P(self.p(x)), A::F(s), A::L(len as i64)]);
    }

    fn glu(&self, gate: &mut Buffer, up: &Buffer, len: usize, act: Glu) {
        assert!(gate.len() >= len && up.len() >= len);
        let act = match act {
            Glu::Silu => 0,
            Glu::GeluTanh => 1,
        };
        let (gp, up) = (self.p(gate), self.p(up));
        let args = [A::P(gp), A::P(up), A::L(len as i64), A::I(act)];
        match self.quant_hint(gp, 0) {
            // the next product of gate quantizes it: do it here (kernels/elementwise.cu, glu_q)
            Some((k, qact)) if len.is_multiple_of(k) && len / k <= self.int_tokens(qact) => {
                let mut s = self.lock();
                let [qa, da, sa, ss] = self.quant_scratch(&mut s, len / k, k);
                let q = [A::P(qa), A::P(da), A::P(sa), A::P(ss), A::I(qact)];
                let threads = if qact == 1 { len } else { len / 8 };
                self.launch("glu_q", (blocks(threads, 256), 1, 1), 256, &[&args[..], &q[..]].concat());
                self.set_quantized(gp, len / k, k, qact);
            }
            _ => self.launch("glu", (blocks(len, 256), 1, 1), 256, &args),
        }
    }

    fn get_rows(&self, src: &Buffer, row_len: usize, rows: &[u32], out: &mut Buffer) {
        let n = rows.len();
        assert!(out.len() >= n * row_len && rows.iter().all(|&r| (r as usize + 1) * row_len <= src.len()), "get_rows: out of bounds");
        if n == 0 {
            return;
        }
        let mut s = self.lock();
        let rp = self.upload(&mut s, Tag::Rows, rows);
        let args = [A::P(self.p(src)), A::I(row_len as i32), A::P(rp), A::I(n as i32), A::P(self.p(out))];
        self.launch("get_rows", (blocks(n * row_len, 256), 1, 1), 256, &args);
    }
}
