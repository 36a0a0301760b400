//! The device-neutral compute interface the model code is written against.
//!
//! Contract:
//! - **Data live on the device.** [`Buffer`] (activations, f32 elements), [`Weight`] (a quantized matrix)
//!   and [`KvStore`] (one layer's paged K/V pool) are opaque: the model allocates them through a
//!   [`Backend`], passes them to its ops and reads results back with [`Backend::read_buffer`]. Nothing
//!   outside the backend assumes they are host memory, so a CUDA backend implements the same trait.
//! - **Ops are functions of their inputs.** Every output element is reduced in a fixed order that does not
//!   depend on how many tokens share the batch (DESIGN.md, "Batch invariance").
//! - **Shapes are the caller's job.** The model checks every tensor shape at load; an op given buffers
//!   too small for the shapes it is told panics (a bug, not a user error). Weights that cannot be used
//!   (unsupported type, size mismatch) are refused with a [`BackendError`] at upload.
//! - **Only this module holds hardware code** (`#[target_feature]`, `core::arch`, feature detection).
//!
//! Layouts (row-major, the first index slowest):
//! ```text
//! activations   [n_tokens x width]                       f32
//! weight        [n_rows x row_len]  (GGUF dims = [row_len, n_rows]), GGML blocks along a row
//! KV pool       [num_blocks x block_size x n_kv_heads x head_dim] for K and again for V, f16
//! slot          block_id * block_size + offset_in_block
//! ```
//! A backend may order the head_dim elements of a K row its own way (the CUDA backend does: `kpos` in
//! kernels/common.cuh); only its own kernels read its pools.

pub mod cpu;
pub mod cuda;
pub mod split;

use std::any::Any;
use std::sync::Arc;

use crate::dtype::GgmlType;

/// Tokens per KV block unless a caller picks otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Why a backend refused a weight or an allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("tensor '{name}': type {ty} is not supported by the {backend} backend")]
    UnsupportedType { name: String, ty: GgmlType, backend: String },
    #[error("tensor '{name}': {problem}")]
    BadWeight { name: String, problem: String },
    #[error("cannot allocate {bytes} bytes for {what} on the {backend} backend")]
    OutOfMemory { what: String, bytes: usize, backend: String },
    #[error("cannot start the {backend} backend: {problem}")]
    Init { backend: String, problem: String },
}

/// Bytes that stay put while the backend uses them: a memory-mapped GGUF file.
pub trait HostBytes: Send + Sync {
    fn host_bytes(&self) -> &[u8];
}

/// A weight matrix in host memory, described for [`Backend::upload_weight`]:
/// `n_rows` rows of `row_len` elements of `ty`, starting `offset` bytes into `source`.
#[derive(Clone)]
pub struct HostWeight {
    pub name: String,
    pub ty: GgmlType,
    pub row_len: usize,
    pub n_rows: usize,
    pub source: Arc<dyn HostBytes>,
    pub offset: usize,
}

/// A weight matrix as a backend holds it. The CPU backend reads it in place from `source`.
pub struct Weight {
    ty: GgmlType,
    row_len: usize,
    n_rows: usize,
    inner: Box<dyn Any + Send + Sync>,
}

impl Weight {
    /// For backend implementations: wrap the backend's own representation.
    pub fn new(ty: GgmlType, row_len: usize, n_rows: usize, inner: Box<dyn Any + Send + Sync>) -> Weight {
        Weight { ty, row_len, n_rows, inner }
    }
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn row_len(&self) -> usize {
        self.row_len
    }
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    /// For backend implementations: the representation they stored.
    pub fn inner(&self) -> &(dyn Any + Send + Sync) {
        self.inner.as_ref()
    }
}

/// `len` f32 activations on the backend's device.
pub struct Buffer {
    len: usize,
    inner: Box<dyn Any + Send + Sync>,
}

impl Buffer {
    pub fn new(len: usize, inner: Box<dyn Any + Send + Sync>) -> Buffer {
        Buffer { len, inner }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn inner(&self) -> &(dyn Any + Send + Sync) {
        self.inner.as_ref()
    }
    pub fn inner_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self.inner.as_mut()
    }
}

/// The shape of one layer's paged K/V pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// f16 elements of K (or of V) per token.
    pub fn token_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Slots (tokens) the pool holds.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// One layer's K and V pools on the device.
pub struct KvStore {
    shape: KvShape,
    inner: Box<dyn Any + Send + Sync>,
}

impl KvStore {
    pub fn new(shape: KvShape, inner: Box<dyn Any + Send + Sync>) -> KvStore {
        KvStore { shape, inner }
    }
    pub fn shape(&self) -> KvShape {
        self.shape
    }
    pub fn inner(&self) -> &(dyn Any + Send + Sync) {
        self.inner.as_ref()
    }
    pub fn inner_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self.inner.as_mut()
    }
}

/// How rotary embedding pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs `(x[2i], x[2i+1])` (llama; GGUF converters permute Q/K for this).
    Norm,
    /// Half split `(x[i], x[i + n_rot/2])` (GPT-NeoX, qwen2/3, gemma3).
    Neox,
}

/// Rotary embedding of the first `n_rot` dimensions of every head, as ggml's `rope_ext` without YaRN:
/// `theta_i = pos * freq_scale * base^(-2i/n_rot) / freq_factors[i]`.
#[derive(Clone, Debug)]
pub struct RopeParams<'a> {
    pub mode: RopeMode,
    pub n_rot: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
    /// llama3-style per-pair divisors (`rope_freqs.weight`), `n_rot / 2` values.
    pub freq_factors: Option<&'a [f32]>,
}

/// The gated activations of a GLU feed-forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU).
    GeluTanh,
}

/// One sequence's part of an attention batch.
///
/// ```text
/// positions   0 ................ ctx_len - n_q ....... ctx_len - 1
///             [ cached prefix   ][ the n_q new tokens          ]
/// q rows      q_start .. q_start + n_q of the query buffer
/// ```
/// The new tokens' K/V must already be in the pool (see [`Backend::kv_write`]); token `j` of the sequence
/// lives in slot `block_table[j / block_size] * block_size + j % block_size`.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    pub q_start: usize,
    pub n_q: usize,
    pub ctx_len: usize,
    pub block_table: &'a [u32],
    /// A sequence under a KV budget policy (`None`: every entry live, entry `j` at position `j`).
    pub view: Option<&'a KvView<'a>>,
}

/// The cache of a sequence under a KV budget policy (kv/budget.rs): its `ctx_len` *entries* (the slots
/// of its block table, in order) are no longer positions `0..ctx_len`.
///
/// ```text
/// entries     0 1 2 3 | 4 5 6 7 | 8 9          (block_size 4; the n_q new tokens are the last entries)
/// live        1 0 0 1 | 1 1 0 1 | 1 1          live[b] bit o: entry b * block_size + o is live
/// positions   0 1 2 3 | 9 10 11 12 | 40 41     original positions, increasing
/// ```
/// Dead entries (evicted tokens, holes) get no weight. The query at entry `e` sees the live entries
/// `j <= e` with `positions[e] - positions[j] < window` (the window rule on original positions).
/// With every entry live and `positions[j] == j` the result is bit-identical to `view: None`.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// One mask per block of the table (block_size <= 64).
    pub live: &'a [u64],
    /// `[ctx_len]` original position of each entry.
    pub positions: &'a [u32],
    /// Where this sequence's attention probabilities go in the `scores` output of
    /// [`Backend::attention`]: `[n_kv_heads x ctx_len]` f32 from this offset; element `(g, j)` is the
    /// probability entry `j` got, summed over the query heads of KV head `g` and the sequence's query
    /// rows (0 for a dead or unseen entry). The H2O policy accumulates these over steps.
    pub score_offset: Option<usize>,
}

/// Shape and masking of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k` before the softmax.
    pub scale: f32,
    /// Sliding window: the query at position `p` sees keys `j` with `p - j < window` (llama.cpp's rule).
    pub window: Option<usize>,
}

/// The operations a device provides. All lengths are in f32 elements unless said otherwise.
pub trait Backend: Send + Sync {
    /// For logs and errors: "cpu (avx2, 2 threads)".
    fn name(&self) -> String;

    // ---- memory ----

    /// Makes a host weight usable by the ops (the CPU backend keeps a view; a GPU backend copies).
    fn upload_weight(&self, w: &HostWeight) -> Result<Weight, BackendError>;
    /// Bytes of weight data this backend copied into memory it owns (0 for the CPU's in-place reads).
    fn weight_bytes_copied(&self) -> usize;
    /// A zero-filled buffer of `len` f32.
    fn alloc(&self, len: usize) -> Result<Buffer, BackendError>;
    /// A zero-filled K/V pool.
    fn alloc_kv(&self, shape: KvShape) -> Result<KvStore, BackendError>;
    /// Layer `layer`'s K/V pool (a backend split by layers puts it on that layer's device).
    fn alloc_kv_layer(&self, layer: usize, shape: KvShape) -> Result<KvStore, BackendError> {
        let _ = layer;
        self.alloc_kv(shape)
    }
    /// Host to device: `dst[offset..offset + src.len()] = src`.
    fn write_buffer(&self, dst: &mut Buffer, offset: usize, src: &[f32]);
    /// Device to host: `dst = src[offset..offset + dst.len()]`.
    fn read_buffer(&self, src: &Buffer, offset: usize, dst: &mut [f32]);
    /// Device to host, only each row's greedy token: `dst[r]` = [`crate::sampling::argmax`] of row `r`
    /// of the `[dst.len() x n_cols]` matrix at the start of `src` (the same index, ties and NaNs
    /// included). A GPU reads back one integer a row instead of the row. By default the rows are read
    /// back and reduced on the host.
    fn argmax_rows(&self, src: &Buffer, n_cols: usize, dst: &mut [u32]) {
        let mut row = vec![0.0f32; n_cols];
        for (r, d) in dst.iter_mut().enumerate() {
            self.read_buffer(src, r * n_cols, &mut row);
            *d = crate::sampling::argmax(&row);
        }
    }

    // ---- ops ----

    /// Runs `f`, a sequence of ops, as one unit. The CPU backend enters its thread pool once here so
    /// the ops inside dispatch without waking threads per op; other backends may just call `f`.
    fn run(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }

    /// `out[t] = table row tokens[t]` dequantized: out `[n x table.row_len]`.
    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut Buffer);
    /// `out[t][r] = w[r] . x[t]`: x `[n_tokens x w.row_len]`, out `[n_tokens x w.n_rows]`.
    fn matmul(&self, w: &Weight, x: &Buffer, n_tokens: usize, out: &mut Buffer);
    /// `x[t] += bias` for `n_tokens` rows of `bias.row_len`.
    fn add_bias(&self, x: &mut Buffer, bias: &Weight, n_tokens: usize);
    /// RMS norm of each of `n_rows` rows of `row_len`, times `weight` (a `row_len` vector) if given.
    /// With `row_len = head_dim` and `n_rows = n_tokens * n_heads` this is the per-head QK norm.
    fn rms_norm(&self, x: &Buffer, weight: Option<&Weight>, row_len: usize, n_rows: usize, eps: f32, out: &mut Buffer);
    /// Rotates `x` `[n_tokens x n_heads x head_dim]` in place; token `t` is at `positions[t]`.
    fn rope(&self, x: &mut Buffer, positions: &[u32], n_heads: usize, head_dim: usize, p: &RopeParams);
    /// Stores token `t`'s K and V (`[n_tokens x n_kv_heads x head_dim]`, rounded to f16) in slot
    /// `slot_mapping[t]`.
    fn kv_write(&self, kv: &mut KvStore, k: &Buffer, v: &Buffer, slot_mapping: &[u32]);
    /// Copies every slot of block `src` to block `dst`, K and V, for each `(src, dst)` in order: the
    /// copy-on-write of a shared partial block before a sequence appends to its own copy.
    fn kv_copy_blocks(&self, kv: &mut KvStore, copies: &[(u32, u32)]);
    /// Causal attention of the query rows of every sequence over its cached keys:
    /// q `[n_tokens x n_heads x head_dim]` -> out, same shape. Query head `h` reads KV head
    /// `h / (n_heads / n_kv_heads)` (GQA).
    /// With `scores = (buffer, base)`, sequences whose view has a `score_offset` also get their attention
    /// probabilities written at `base + score_offset` (see [`KvView`]); the same pass computes them, no
    /// second read of K.
    fn attention(&self, q: &Buffer, kv: &KvStore, seqs: &[AttnSeq], p: &AttnParams, out: &mut Buffer, scores: Option<(&mut Buffer, usize)>);
    /// Moves K and V of slot `src` to slot `dst` for each `(src, dst)`, all sources read before any
    /// destination is written (a sequence's compaction after evictions: kv/budget.rs).
    fn kv_move_slots(&self, kv: &mut KvStore, moves: &[(u32, u32)]);
    /// `x[..len] += y[..len]`.
    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize);
    /// `x[..len] *= s`.
    fn scale(&self, x: &mut Buffer, s: f32, len: usize);
    /// `gate[..len] = act(gate) * up`.
    fn glu(&self, gate: &mut Buffer, up: &Buffer, len: usize, act: Glu);
    /// `out[i] = src row rows[i]` for rows of `row_len`.
    fn get_rows(&self, src: &Buffer, row_len: usize, rows: &[u32], out: &mut Buffer);
}

/// How the CPU backend is built (`--threads`, `--no-repack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuOptions {
    /// Worker threads (0: one per physical core).
    pub threads: usize,
    /// Whether matrices of the types the kernel table packs get a packed copy (see
    /// `cpu::CpuBackend::with_repack`); off, every weight is read in place from the map.
    pub repack: bool,
    /// Whose float order the CPU computes in.
    pub numerics: Numerics,
}

impl CpuOptions {
    /// `threads` workers, repacking on, native numerics (the defaults).
    pub fn threads(threads: usize) -> CpuOptions {
        CpuOptions { threads, repack: true, numerics: Numerics::Native }
    }
}

/// The float order of the CPU backend (`--numerics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// pagellm's own: SIMD kernels, results independent of the batch (the default).
    #[default]
    Native,
    /// llama.cpp's CPU backend's (its x86 AVX-512 build): the same logits bit for bit on the model
    /// types it covers (`cpu::CpuBackend::with_llama_numerics`); slower, and like llama.cpp not batch
    /// invariant.
    LlamaCpp,
}

impl std::str::FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "native" => Ok(Numerics::Native),
            "llama.cpp" | "llamacpp" => Ok(Numerics::LlamaCpp),
            _ => Err(format!("unknown numerics '{s}': use native or llama.cpp")),
        }
    }
}

/// The CPU backend with the best kernels this machine has (`PAGELLM_CPU=scalar` forces the scalar ones).
pub fn cpu(opts: CpuOptions) -> Result<Arc<dyn Backend>, BackendError> {
    let b = cpu::CpuBackend::new(opts.threads, cpu::Kernels::detect())?.with_repack(opts.repack);
    Ok(Arc::new(match opts.numerics {
        Numerics::Native => b,
        Numerics::LlamaCpp => b.with_llama_numerics(),
    }))
}

/// Which device `--device` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when a GPU is usable, else the CPU (with a one-line notice).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(format!("unknown device '{s}': use auto, cpu or cuda")),
        }
    }
}

/// `--device` and `--gpu-layers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    pub device: DeviceChoice,
    /// Only the last N layers (and the output) on the GPU, the rest on the CPU; `None`: all on the
    /// device `device` picks.
    pub gpu_layers: Option<usize>,
}

/// The backend for a model of `n_layers` layers (`output_tied`: its output projection is the embedding
/// table): [`select`]'s, or with `gpu_layers` below `n_layers` a [`split::SplitBackend`] (0: the CPU).
pub fn select_for(dev: DeviceOptions, cpu_opts: CpuOptions, n_layers: usize, output_tied: bool) -> Result<Arc<dyn Backend>, BackendError> {
    let n = match dev.gpu_layers {
        Some(n) if n < n_layers => n,
        _ => return select(dev.device, cpu_opts),
    };
    match if n == 0 { None } else { gpu(dev.device)? } {
        Some(gpu) => Ok(Arc::new(split::SplitBackend::new(cpu(cpu_opts)?, gpu, n_layers, n, output_tied))),
        None => cpu(cpu_opts),
    }
}

/// The GPU `device` asks for: none for `Cpu`; for `Auto` none when no CUDA library or GPU is usable,
/// saying why on stderr; for `Cuda` that is an error.
fn gpu(device: DeviceChoice) -> Result<Option<Arc<dyn Backend>>, BackendError> {
    if device == DeviceChoice::Cpu {
        return Ok(None);
    }
    match cuda::CudaBackend::new(0) {
        Ok(b) => Ok(Some(Arc::new(b))),
        Err(e) if device == DeviceChoice::Cuda => Err(e),
        Err(e) => {
            eprintln!("note: using the CPU ({e})");
            Ok(None)
        }
    }
}

/// The backend for `device` (`cpu`: how to build the CPU one). `Auto` falls back to the CPU, saying why on
/// stderr, when no CUDA library or GPU is usable; `Cuda` is then an error.
pub fn select(device: DeviceChoice, cpu_opts: CpuOptions) -> Result<Arc<dyn Backend>, BackendError> {
    match gpu(device)? {
        Some(gpu) => Ok(gpu),
        None => cpu(cpu_opts),
    }
}
