//! The CUDA backend: the [`Backend`] ops on an NVIDIA GPU through the driver API (`cudarc`, loaded at
//! run time, so the binary builds and runs on machines without CUDA).
//!
//! Contract, beyond the trait's:
//! - **Probe first.** [`available`] checks for the driver, NVRTC and cuBLAS libraries before any context
//!   is made (cudarc panics when a library is missing); [`CudaBackend::new`] returns a
//!   [`BackendError::Init`] when there is no usable GPU.
//! - **Memory.** Weights are copied to the device once, as the quantized blocks of the file (vectors such
//!   as norm weights and biases as f32). Activations ([`Buffer`]) are `f32` device arrays, K/V pools are
//!   f16 device arrays laid out as the trait says (each K row's head_dim elements in the order the
//!   attention's q.k lanes read them: `kpos`, kernels/common.cuh). Host-side index lists (tokens, positions, slot mapping,
//!   block tables) are uploaded per op into small device arrays, skipped when equal to the last upload of
//!   the same kind (the layers of one step share them).
//! - **One stream.** Every op is queued on the backend's stream in call order; only `read_buffer` waits.
//! - **Products** (products.rs). Activations are rounded as the CPU backend rounds them (Q8 blocks of 32
//!   for the legacy types, Q8_K for the k-quants, none for float weights). Up to [`INT_PATH_MAX_TOK`]
//!   tokens: integer dot products straight from the weight blocks (`kernels/quant.cu`, launches of
//!   [`MMV_MAX_TOK`] tokens); k-quant batches of [`MMQ_MIN_TOK`] to [`MMQ_MAX_TOK`] tokens on the int8
//!   tensor cores (`kernels/mmq.cu`, sm_80+: K split across a CTA's warps, the activations repacked
//!   once per input by `mmq_pack`). More tokens: the weight dequantized to f16, the rounded activations
//!   as f16, one cuBLAS GEMM (f32 accumulation).
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
//!   launch, rms_norm / glu quantize their output for the product that reads it (`rms_norm_q`,
//!   `glu_q`), a residual add queued right before a norm of its sum is done by the norm, and RoPE of K
//!   joins RoPE of Q. One-token products use `mmv1_*` (more loads in flight per warp: 4 rounds of 32
//!   blocks, 2 for the k-quants), Q4_0 the persistent, software-pipelined `mmvp_q4_0r`. On sm_90 every
//!   launch is a programmatic dependent launch (kernels/common.cuh `pdl_enter`): a kernel starts while
//!   the previous one finishes and reads its weights before it waits for its inputs.
//!   `PAGELLM_CUDA_GRAPH=0`, `PAGELLM_CUDA_FUSE=0`, `PAGELLM_CUDA_MMV1=0`, `PAGELLM_CUDA_MMVP=0`,
//!   `PAGELLM_CUDA_MMV1K=0`, `PAGELLM_CUDA_MMQ=0`, `PAGELLM_CUDA_PDL=0` turn each off (comparisons,
//!   bench/GPU_NOTES.md).
//!
//! Not yet: batch invariance across the integer and the f16 product paths (above [`INT_PATH_MAX_TOK`]
//! tokens for the legacy types, above [`MMQ_MAX_TOK`] for the k-quants, the f16 GEMM path gives a token
//! different logits, up to 4e-2 relative L2 on the tiny models).

mod attn;
mod attn_meta;
mod graph;
mod module;
mod products;
mod scratch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{sys as drv, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};

use super::{AttnParams, AttnSeq, Backend, BackendError, Buffer, Glu, HostWeight, KvShape, KvStore, RopeMode, RopeParams, Weight};
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
/// Fewest tokens a k-quant product runs on the integer tensor cores (`mmq_*`); fewer: `mmv`. Measured
/// on the H200 (call 62, Q4_K_M 8B batched decode, ms a step): 4 sequences 7.65 (mmv 7.38), 6: 8.15
/// (10.08), 8: 8.88 (12.0-12.6).
pub const MMQ_MIN_TOK: usize = 5;
/// Most tokens a k-quant product runs on the integer tensor cores (`mmq_*`); more: dequantize + cuBLAS.
/// Measured on the H200 (bench/GPU_NOTES.md, calls 63-64; Q4_K_M 8B, 64 sequences): 21.0 ms a step with
/// mmq (narrow CTAs), 22.9 with cuBLAS; 48 sequences 19.1 ms.
pub const MMQ_MAX_TOK: usize = 64;
/// Weight rows of one `mmq_*` CTA (kernels/mmq.cu `MmqShape::ROWS`; the narrow `mmq_*_n` take 16), its
/// threads, and the token tiles of its kernels (`mmq_q4_k_16` ...): a product takes the smallest tile
/// that holds its tokens, else the largest.
const MMQ_ROWS: usize = 32;
const MMQ_THREADS: u32 = 256;
const MMQ_TILES: [usize; 3] = [16, 32, 64];
/// A number from the environment variable `name`, if it holds one.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

/// Threads per attention CTA of 8 warps (the `ATTN` instances' WARPS x 32 in kernels/attention.cu), and
/// of the 4-warp `attn_hd128_a4c64`.
const ATTN_THREADS: u32 = 256;
const ATTN_THREADS_W4: u32 = 128;
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
    /// `mmq_*` (k-quants on sm_80+), `[wide, narrow (mmq_*_n)][token tile of MMQ_TILES]`: batches of
    /// [`MMQ_MIN_TOK`] to [`MMQ_MAX_TOK`] tokens on the integer tensor cores, exact like the CPU
    /// (kernels/mmq.cu).
    mmq: Option<[[CudaFunction; 3]; 2]>,
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
    /// SMs (grid sizing: the attention variant a call takes)
    sms: usize,
    name: String,
    copied: AtomicUsize,
    scratch: Mutex<Scratch>,
    /// The activations now in the Q8 scratch: (x pointer, tokens, row length, Act as u8). Products of
    /// one input (Q, K, V; gate, up) quantize it once. Cleared by every launch other than a product's,
    /// by writes and allocations, and by a product that writes over x.
    quantized: Mutex<Option<(u64, usize, usize, u8)>>,
    /// (Q8 scratch, packed copy, padded tokens, row length) of the last `mmq_pack`: the packed copy
    /// holds the Q8 scratch's activations until the scratch is written again (cleared with `quantized`).
    mmq_packed: Mutex<Option<(u64, u64, usize, usize)>>,
    /// Launches deferred inside `run`, and the graphs that replay them (graph.rs).
    queue: Mutex<graph::Queue>,
    /// Whether one-token products use `mmv1_*`.
    mmv1: bool,
    /// Whether one-token k-quant products use `mmv1_q4_k` / `mmv1_q6_k` (2 rounds in flight) instead
    /// of `mmv` (`PAGELLM_CUDA_MMV1K=0`: `mmv`).
    mmv1k: bool,
    /// Whether k-quant products of [`MMQ_MIN_TOK`] to [`MMQ_MAX_TOK`] tokens use `mmq_*` (sm_80+; `PAGELLM_CUDA_MMQ=0`:
    /// `mmv` up to [`INT_PATH_MAX_TOK`], then cuBLAS).
    mmq: bool,
    /// The batch sizes that take `mmq_*` (defaults `MMQ_MIN_TOK ..= MMQ_MAX_TOK`; for measurements
    /// `PAGELLM_CUDA_MMQ_MIN`, `PAGELLM_CUDA_MMQ_MAX`).
    mmq_tokens: std::ops::RangeInclusive<usize>,
    /// Whether products take the narrow `mmq_*_n` (16 rows per CTA, 8 warps on each row's K; the
    /// default: faster on every shape measured, bench/GPU_NOTES.md calls 63-64) or the 32-row CTAs
    /// (`PAGELLM_CUDA_MMQ_NARROW=0`).
    mmq_narrow: bool,
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
    /// Whether the cp.async attention kernel (a4c64) may run (sm_80+).
    attn_async: bool,
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

fn blocks(n: usize, per: usize) -> u32 {
    u32::try_from(n.div_ceil(per)).expect("grid too large")
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
            mmq_act: Grow(None),
            wf16: Grow(None),
            xf16: Grow(None),
            part_o: Grow(None),
            part_ml: Grow(None),
            picks: Grow(None),
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
            mmq_packed: Mutex::new(None),
            queue,
            mmv1,
            mmv1k: !off("PAGELLM_CUDA_MMV1K"),
            mmq: major >= 8 && !off("PAGELLM_CUDA_MMQ"),
            mmq_tokens: env_usize("PAGELLM_CUDA_MMQ_MIN").unwrap_or(MMQ_MIN_TOK)..=env_usize("PAGELLM_CUDA_MMQ_MAX").unwrap_or(MMQ_MAX_TOK),
            mmq_narrow: env_usize("PAGELLM_CUDA_MMQ_NARROW") != Some(0),
            mmvp_blocks,
            fuse,
            quant_hints: Mutex::new(Vec::new()),
            attn128: attn::attn128().filter(|a| major >= 8 || a.0 != "attn_hd128_a4c64"),
            attn_async: major >= 8,
        })
    }

    /// This backend with k-quant products of `tokens` tokens on `mmq_*` (tests and kernel timings of
    /// every tile; the default is `MMQ_MIN_TOK ..= MMQ_MAX_TOK`).
    pub fn with_mmq_tokens(mut self, tokens: std::ops::RangeInclusive<usize>) -> Self {
        self.mmq_tokens = tokens;
        self
    }

    /// This backend with the narrow `mmq_*_n` kernels (true, the default) or the 32-row ones.
    pub fn with_mmq_narrow(mut self, narrow: bool) -> Self {
        self.mmq_narrow = narrow;
        self
    }

    /// Waits until every queued op has finished (timings, tests).
    pub fn synchronize(&self) {
        self.flush();
        self.stream.synchronize().unwrap_or_else(|e| panic!("cuda: {e}"));
    }

    /// Milliseconds of GPU time per run of `f`, run `reps` times back to back on the stream between two
    /// timing events (the host's own work overlaps the GPU's; benchmarks of one operation's kernels),
    /// after one untimed run.
    pub fn gpu_time_ms(&self, reps: usize, mut f: impl FnMut()) -> f64 {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        f();
        self.synchronize();
        let start = self.stream.record_event(flags).unwrap_or_else(|e| panic!("cuda: {e}"));
        for _ in 0..reps {
            f();
        }
        self.flush();
        let end = self.stream.record_event(flags).unwrap_or_else(|e| panic!("cuda: {e}"));
        let ms = start.elapsed_ms(&end).unwrap_or_else(|e| panic!("cuda: {e}"));
        ms as f64 / reps.max(1) as f64
    }

    /// Copies `src` to `dst` on the device (the copy-rate measurement of the kernel benchmarks).
    pub fn copy_device(&self, src: &Buffer, dst: &mut Buffer) {
        self.flush();
        self.forget_quantized();
        let d = dst.inner_mut().downcast_mut::<CudaSlice<f32>>().expect("buffer from another backend");
        self.stream.memcpy_dtod(slice(src), d).unwrap_or_else(|e| panic!("cuda copy: {e}"));
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
        self.forget_packed();
    }

    /// The Q8 scratch is about to be written: its packed copy for mmq is stale.
    fn forget_packed(&self) {
        *self.mmq_packed.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
            self.bind();
            q.issue(&op, &self.stream);
        }
    }

    fn p(&self, b: &Buffer) -> u64 {
        dptr(slice(b), &self.stream)
    }

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

    fn alloc_err(&self, what: &str, bytes: usize) -> BackendError {
        BackendError::OutOfMemory { what: what.into(), bytes, backend: "cuda".into() }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<Weight, BackendError> {
        self.upload_matrix(w)
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

    fn argmax_rows(&self, src: &Buffer, n_cols: usize, dst: &mut [u32]) {
        let n = dst.len();
        if n == 0 {
            return;
        }
        assert!(src.len() >= n * n_cols, "argmax_rows: buffer too small");
        let xp = self.p(src);
        let out = self.lock().picks.ensure(&self.stream, n, &self.flusher());
        self.launch("argmax_rows", (n as u32, 1, 1), 1024, &[A::P(xp), A::I(n_cols as i32), A::P(out)]);
        self.flush();
        {
            let s = self.lock();
            let view = s.picks.0.as_ref().expect("ensured").slice(..n);
            self.stream.memcpy_dtoh(&view, dst).unwrap_or_else(|e| panic!("cuda argmax_rows: {e}"));
        }
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
        self.product(w, x, n_tokens, out)
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
        let args = [A::P(kp), A::P(vp), A::P(self.p(k)), A::P(self.p(v)), A::P(slots), A::I(n as i32), A::I(width as i32), A::I(shape.head_dim as i32)];
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
        self.attend(q, kv, seqs, p, out, scores)
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
