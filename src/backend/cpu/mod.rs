//! The CPU backend: weights read in place from the mapped file, activations in `Vec<f32>`, K/V in f16
//! pools, ops on a rayon pool of its own, kernels from one table chosen at start-up ([`Kernels`]).
//!
//! Elementwise ops (SIMD tables in `elementwise`) follow ggml's CPU code where its rounding is visible in
//! the logits: RMS norm sums squares in f64 and multiplies by the weight after scaling; GELU goes through
//! an f16 table (`GGML_GELU_FP16`); RoPE angles come from ggml's running product
//! `theta *= base^(-2/n_rot)`.

mod attention;
mod attention_simd;
mod avx2;
mod avx2_tiles;
mod avx512;
mod elementwise;
mod ggml;
mod kernels;
mod matmul;
mod neon;
#[cfg(all(target_arch = "aarch64", target_endian = "little"))]
mod neon_elementwise;
mod topology;

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use half::f16;
use rayon::prelude::*;

pub use attention::SPLIT_TOKENS as ATTN_SPLIT_TOKENS;
pub use topology::physical_cores;
pub use kernels::{
    act_side, aux_per_block, quantize_q8_0, quantize_q8_1, quantize_q8_k, FDotFn, GemmFn, GemmKernels, Isa, Kernels,
    QActs, QDotFn, QuantizeFn, Scratch,
};

use super::{
    AttnParams, AttnSeq, Backend, BackendError, Buffer, Glu, HostBytes, HostWeight, KvShape, KvStore, RopeMode,
    RopeParams, Weight,
};
use attention::CpuKv;

/// A weight: a byte range of a host source, read in place; a matrix of a type the kernel table repacks
/// also gets a packed copy at its first product (unless repacking is off).
struct CpuWeight {
    source: Arc<dyn HostBytes>,
    offset: usize,
    len: usize,
    packed: OnceLock<Option<matmul::Packed>>,
}

impl CpuWeight {
    fn data(&self) -> &[u8] {
        &self.source.host_bytes()[self.offset..self.offset + self.len]
    }
}

/// Rows per parallel task in elementwise ops (big enough that task overhead vanishes).
const ELEMS_PER_TASK: usize = 16 * 1024;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    k: Kernels,
    /// Norms, RoPE and activations for `k`'s ISA.
    e: &'static elementwise::Elementwise,
    /// Whether matrices of the type `k` packs are repacked at their first product.
    repack: bool,
    /// Heap bytes of the packed copies made so far.
    packed_bytes: AtomicUsize,
    /// llama.cpp's float order ([`ggml`]) instead of the native one.
    llama_numerics: bool,
}

impl CpuBackend {
    /// `threads` workers (0: one per physical core) running `kernels`.
    pub fn new(threads: usize, kernels: Kernels) -> Result<CpuBackend, BackendError> {
        let threads = if threads == 0 { physical_cores() } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("pagellm-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::Init { backend: "cpu".into(), problem: e.to_string() })?;
        let e = elementwise::table(kernels.isa);
        Ok(CpuBackend { pool, threads, k: kernels, e, repack: true, packed_bytes: AtomicUsize::new(0), llama_numerics: false })
    }

    /// Turns repacking off (`--no-repack`: every weight read in place from the map) or on (the
    /// default). Set it before loading a model.
    pub fn with_repack(mut self, on: bool) -> CpuBackend {
        self.repack = on;
        self
    }

    /// Computes as llama.cpp's CPU backend does, bit for bit where [`ggml`] says (slower; not batch
    /// invariant): its dots (and its K-quant products per batch shape), norms, RoPE, SwiGLU, GeGLU and
    /// attention replace this backend's kernels.
    pub fn with_llama_numerics(mut self) -> CpuBackend {
        (self.k, self.e, self.repack, self.llama_numerics) = (ggml::kernels(), &ggml::ELEMENTWISE, false, true);
        self
    }

    /// Whether a matrix of `ty` gets a packed copy (this table packs it and repacking is on).
    pub fn repacks(&self, ty: crate::dtype::GgmlType) -> bool {
        self.repack && self.k.gemm.and_then(|g| g.pack_for(ty)).is_some()
    }

    pub fn kernels(&self) -> &Kernels {
        &self.k
    }

    /// The bytes a weight reads (for tests: they lie inside the mapped file).
    pub fn weight_data<'a>(&self, w: &'a Weight) -> &'a [u8] {
        weight(w).data()
    }
}

fn weight(w: &Weight) -> &CpuWeight {
    w.inner().downcast_ref::<CpuWeight>().expect("weight from another backend")
}

fn buf(b: &Buffer) -> &[f32] {
    b.inner().downcast_ref::<Vec<f32>>().expect("buffer from another backend")
}

fn buf_mut(b: &mut Buffer) -> &mut [f32] {
    b.inner_mut().downcast_mut::<Vec<f32>>().expect("buffer from another backend")
}

fn kv_ref(kv: &KvStore) -> &CpuKv {
    kv.inner().downcast_ref::<CpuKv>().expect("kv store from another backend")
}

/// A weight vector (norm weights, biases) as f32: borrowed when it is aligned little-endian F32.
fn vector(w: &Weight) -> Cow<'_, [f32]> {
    let data = weight(w).data();
    if w.ty() == crate::dtype::GgmlType::F32 && cfg!(target_endian = "little") {
        // SAFETY: any 4 bytes are a valid f32; align_to only hands out the aligned middle part.
        let (pre, mid, post) = unsafe { data.align_to::<f32>() };
        if pre.is_empty() && post.is_empty() {
            return Cow::Borrowed(mid);
        }
    }
    let mut v = vec![0.0f32; w.row_len() * w.n_rows()];
    crate::quant::dequantize(w.ty(), data, &mut v).expect("weight type checked at upload");
    Cow::Owned(v)
}

/// ggml's `gelu_f32` (tanh approximation), used to fill the f16 table.
fn gelu_f32(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// `gelu` of every f16 input, as f16 bits (ggml's `ggml_table_gelu_f16`, 128 KiB).
fn f16_table(gelu: fn(f32) -> f32) -> Vec<u16> {
    (0..=u16::MAX).map(|b| f16::from_f32(gelu(f16::from_bits(b).to_f32())).to_bits()).collect()
}

/// The table of [`gelu_f32`].
fn gelu_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| f16_table(gelu_f32))
}

/// ggml's f32 GEGLU with `GGML_GELU_FP16`: the gate goes through f16 and the table.
fn gelu_mul(x: f32, g: f32, table: &[u16]) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x * g
    } else {
        f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32() * g
    }
}

thread_local! {
    /// Each worker's `cos` and `sin` of [`rope_cache`], kept so that RoPE allocates nothing per call.
    static ROPE_CACHE: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = std::cell::RefCell::default();
}

/// `cos` and `sin` of every rotated pair's angle at `pos`, as ggml's `ggml_rope_cache_init` computes them.
fn rope_cache(pos: u32, p: &RopeParams, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    let theta_scale = p.freq_base.powf(-2.0 / p.n_rot as f32);
    let mut theta = pos as f32;
    cos.clear();
    sin.clear();
    for i in 0..p.n_rot / 2 {
        let ff = p.freq_factors.map_or(1.0, |f| f[i]);
        let t = p.freq_scale * (theta / ff);
        cos.push(t.cos());
        sin.push(t.sin());
        theta *= theta_scale;
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        let k = if self.llama_numerics { "llama.cpp numerics" } else { self.k.name() };
        format!("cpu ({k}, {} threads)", self.threads)
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<Weight, BackendError> {
        let bad = |problem: String| BackendError::BadWeight { name: w.name.clone(), problem };
        if !matmul::supported(w.ty) {
            return Err(BackendError::UnsupportedType { name: w.name.clone(), ty: w.ty, backend: "cpu".into() });
        }
        let row_bytes = crate::quant::row_bytes(w.ty, w.row_len)
            .ok_or_else(|| bad(format!("rows of {} are not whole {} blocks", w.row_len, w.ty)))?;
        let len = row_bytes.checked_mul(w.n_rows).ok_or_else(|| bad("size overflows".into()))?;
        let available = w.source.host_bytes().len();
        if w.offset.checked_add(len).is_none_or(|end| end > available) {
            return Err(bad(format!("{len} bytes at offset {} run past the {available} bytes of the file", w.offset)));
        }
        let inner = CpuWeight { source: w.source.clone(), offset: w.offset, len, packed: OnceLock::new() };
        Ok(Weight::new(w.ty, w.row_len, w.n_rows, Box::new(inner)))
    }

    fn weight_bytes_copied(&self) -> usize {
        self.packed_bytes.load(Ordering::Relaxed)
    }

    fn run(&self, f: &mut (dyn FnMut() + Send)) {
        self.pool.install(f)
    }

    fn alloc(&self, len: usize) -> Result<Buffer, BackendError> {
        let mut v: Vec<f32> = Vec::new();
        v.try_reserve_exact(len).map_err(|_| BackendError::OutOfMemory {
            what: "activations".into(),
            bytes: len * 4,
            backend: "cpu".into(),
        })?;
        v.resize(len, 0.0);
        Ok(Buffer::new(len, Box::new(v)))
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<KvStore, BackendError> {
        let bytes = shape.num_slots() * shape.token_width() * 2 * 2;
        let mut probe: Vec<u8> = Vec::new();
        probe.try_reserve_exact(bytes).map_err(|_| BackendError::OutOfMemory {
            what: "the KV cache".into(),
            bytes,
            backend: "cpu".into(),
        })?;
        drop(probe);
        Ok(KvStore::new(shape, Box::new(CpuKv::new(shape))))
    }

    fn write_buffer(&self, dst: &mut Buffer, offset: usize, src: &[f32]) {
        buf_mut(dst)[offset..offset + src.len()].copy_from_slice(src);
    }

    fn read_buffer(&self, src: &Buffer, offset: usize, dst: &mut [f32]) {
        dst.copy_from_slice(&buf(src)[offset..offset + dst.len()]);
    }

    fn argmax_rows(&self, src: &Buffer, n_cols: usize, dst: &mut [u32]) {
        let data = buf(src);
        for (r, d) in dst.iter_mut().enumerate() {
            *d = crate::sampling::argmax(&data[r * n_cols..(r + 1) * n_cols]);
        }
    }

    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut Buffer) {
        let (tw, row_len) = (weight(table), table.row_len());
        let data = tw.data();
        let row_bytes = data.len() / table.n_rows();
        let out = &mut buf_mut(out)[..tokens.len() * row_len];
        self.pool.install(|| {
            out.par_chunks_mut(row_len).zip(tokens.par_iter()).for_each(|(o, &tok)| {
                let r = tok as usize;
                assert!(r < table.n_rows(), "embed: token {r} outside a vocabulary of {}", table.n_rows());
                crate::quant::dequantize(table.ty(), &data[r * row_bytes..(r + 1) * row_bytes], o)
                    .expect("weight type checked at upload");
            })
        });
    }

    fn matmul(&self, w: &Weight, x: &Buffer, n_tokens: usize, out: &mut Buffer) {
        let (x, out, cw) = (buf(x), buf_mut(out), weight(w));
        if self.llama_numerics && matches!(w.ty(), crate::dtype::GgmlType::Q4K | crate::dtype::GgmlType::Q6K) {
            let (rl, nr) = (w.row_len(), w.n_rows());
            return self.pool.install(|| ggml::matmul_k(w.ty(), cw.data(), rl, nr, &x[..n_tokens * rl], n_tokens, out));
        }
        self.pool.install(|| {
            let packed = cw.packed.get_or_init(|| {
                let p = self.repacks(w.ty()).then(|| matmul::pack(&self.k, w.ty(), cw.data(), w.row_len(), w.n_rows()));
                let p = p.flatten();
                self.packed_bytes.fetch_add(p.as_ref().map_or(0, |p| p.bytes()), Ordering::Relaxed);
                p
            });
            let (ty, data) = (w.ty(), cw.data());
            matmul::matmul(&self.k, self.threads, ty, data, w.row_len(), w.n_rows(), packed.as_ref(), x, n_tokens, out)
        });
    }

    fn add_bias(&self, x: &mut Buffer, bias: &Weight, n_tokens: usize) {
        let b = vector(bias);
        for row in buf_mut(x)[..n_tokens * b.len()].chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b.iter()).for_each(|(o, &v)| *o += v);
        }
    }

    fn rms_norm(&self, x: &Buffer, w: Option<&Weight>, row_len: usize, n_rows: usize, eps: f32, out: &mut Buffer) {
        let wv = w.map(vector);
        if let Some(wv) = &wv {
            assert_eq!(wv.len(), row_len, "rms_norm: weight length");
        }
        let (x, out) = (&buf(x)[..n_rows * row_len], &mut buf_mut(out)[..n_rows * row_len]);
        let e = self.e;
        let rows_per_task = (ELEMS_PER_TASK / row_len).max(1);
        self.pool.install(|| {
            out.par_chunks_mut(rows_per_task * row_len).zip(x.par_chunks(rows_per_task * row_len)).for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_exact_mut(row_len).zip(xs.chunks_exact(row_len)) {
                    let mean = ((e.sum_sq)(xrow) / row_len as f64) as f32;
                    let scale = 1.0 / (mean + eps).sqrt();
                    (e.scale_mul)(orow, xrow, scale, wv.as_deref());
                }
            })
        });
    }

    fn rope(&self, x: &mut Buffer, positions: &[u32], n_heads: usize, head_dim: usize, p: &RopeParams) {
        assert!(p.n_rot <= head_dim && p.n_rot.is_multiple_of(2));
        let width = n_heads * head_dim;
        let x = &mut buf_mut(x)[..positions.len() * width];
        let (half, e) = (p.n_rot / 2, self.e);
        self.pool.install(|| {
            x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &pos)| {
                ROPE_CACHE.with_borrow_mut(|(cos, sin)| {
                    rope_cache(pos, p, cos, sin);
                    for head in row.chunks_exact_mut(head_dim) {
                        match p.mode {
                            RopeMode::Norm => (e.rotate_pairs)(&mut head[..p.n_rot], cos, sin),
                            RopeMode::Neox => {
                                let (a, b) = head[..p.n_rot].split_at_mut(half);
                                (e.rotate_halves)(a, b, cos, sin)
                            }
                        }
                    }
                })
            })
        });
    }

    fn kv_write(&self, kv: &mut KvStore, k: &Buffer, v: &Buffer, slot_mapping: &[u32]) {
        let shape = kv.shape();
        let store = kv.inner_mut().downcast_mut::<CpuKv>().expect("kv store from another backend");
        attention::kv_write(store, shape, buf(k), buf(v), slot_mapping);
    }

    fn kv_copy_blocks(&self, kv: &mut KvStore, copies: &[(u32, u32)]) {
        let shape = kv.shape();
        let store = kv.inner_mut().downcast_mut::<CpuKv>().expect("kv store from another backend");
        attention::kv_copy_blocks(store, shape, copies);
    }

    fn attention(&self, q: &Buffer, kv: &KvStore, seqs: &[AttnSeq], p: &AttnParams, out: &mut Buffer, scores: Option<(&mut Buffer, usize)>) {
        let (q, out) = (buf(q), buf_mut(out));
        if self.llama_numerics && scores.is_none() && seqs.iter().all(|s| s.view.is_none()) {
            let tiny = seqs.iter().map(|s| s.n_q).sum::<usize>() >= 2;
            return self.pool.install(|| ggml::attention(q, kv_ref(kv), kv.shape(), seqs, p, out, tiny));
        }
        let scores = scores.map(|(s, base)| &mut buf_mut(s)[base..]);
        self.pool.install(|| attention::attention(&self.k, q, kv_ref(kv), kv.shape(), seqs, p, out, scores));
    }

    fn kv_move_slots(&self, kv: &mut KvStore, moves: &[(u32, u32)]) {
        let shape = kv.shape();
        let store = kv.inner_mut().downcast_mut::<CpuKv>().expect("kv store from another backend");
        attention::kv_move_slots(store, shape, moves);
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize) {
        let (x, y) = (&mut buf_mut(x)[..len], &buf(y)[..len]);
        x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
    }

    fn scale(&self, x: &mut Buffer, s: f32, len: usize) {
        buf_mut(x)[..len].iter_mut().for_each(|v| *v *= s);
    }

    fn glu(&self, gate: &mut Buffer, up: &Buffer, len: usize, act: Glu) {
        let (g, u) = (&mut buf_mut(gate)[..len], &buf(up)[..len]);
        let (table, e) = (gelu_table(), self.e);
        self.pool.install(|| {
            g.par_chunks_mut(ELEMS_PER_TASK).zip(u.par_chunks(ELEMS_PER_TASK)).for_each(|(g, u)| match act {
                Glu::Silu => (e.silu_mul)(g, u),
                Glu::GeluTanh if self.llama_numerics => ggml::geglu_mul(g, u),
                Glu::GeluTanh => g.iter_mut().zip(u).for_each(|(x, &y)| *x = gelu_mul(*x, y, table)),
            })
        });
    }

    fn get_rows(&self, src: &Buffer, row_len: usize, rows: &[u32], out: &mut Buffer) {
        let (src, out) = (buf(src), buf_mut(out));
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            out[i * row_len..(i + 1) * row_len].copy_from_slice(&src[r * row_len..(r + 1) * row_len]);
        }
    }
}
