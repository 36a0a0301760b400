//! A model split over two backends (`--gpu-layers N`): the last `N` layers, the final norm and the output
//! projection on one (the GPU), the token embeddings and the other layers on the other (the CPU), as
//! llama.cpp's `-ngl` places them.
//!
//! ```text
//! embed (host)  layers 0 .. L-N (host)  | x copied once |  layers L-N .. L (dev)  output (dev)  logits
//! ```
//! [`SplitBackend`] is itself a [`Backend`], so the model code does not change: each weight lives on the
//! side its tensor name says (`blk.{i}.*` by layer; `token_embd` on the host, and also on the device when
//! the output projection is tied to it; `output*` on the device), each K/V pool on its layer's side
//! ([`Backend::alloc_kv_layer`]), and an op runs on the side of its weight or K/V pool. Activation buffers
//! exist on both sides; each remembers which side wrote it last, and an op on the other side first copies
//! the part it reads over (in this model's order: the residual stream once per step, at the boundary).
//! Results equal those of either backend alone wherever the two compute the same bits (the CPU and the
//! CUDA integer paths do).

use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    AttnParams, AttnSeq, Backend, BackendError, Buffer, Glu, HostWeight, KvShape, KvStore, RopeParams, Weight,
};

/// Which backend of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Host,
    Dev,
}

/// A weight on its side (the tied embedding table on both).
struct SplitWeight {
    host: Option<Weight>,
    dev: Option<Weight>,
}

impl SplitWeight {
    /// The copy a product uses: the device's when there is one.
    fn for_product(&self) -> (Side, &Weight) {
        match (&self.dev, &self.host) {
            (Some(w), _) => (Side::Dev, w),
            (None, Some(w)) => (Side::Host, w),
            (None, None) => unreachable!("a split weight has a copy"),
        }
    }

    /// The copy an embedding lookup uses: the host's when there is one.
    fn for_lookup(&self) -> (Side, &Weight) {
        match (&self.host, &self.dev) {
            (Some(w), _) => (Side::Host, w),
            (None, Some(w)) => (Side::Dev, w),
            (None, None) => unreachable!("a split weight has a copy"),
        }
    }
}

struct SplitKv {
    side: Side,
    kv: KvStore,
}

/// An activation buffer on both sides; `last` wrote it last.
struct SplitBuf {
    host: Buffer,
    dev: Buffer,
    last: Side,
}

impl SplitBuf {
    fn on(&self, s: Side) -> &Buffer {
        match s {
            Side::Host => &self.host,
            Side::Dev => &self.dev,
        }
    }

    fn on_mut(&mut self, s: Side) -> &mut Buffer {
        match s {
            Side::Host => &mut self.host,
            Side::Dev => &mut self.dev,
        }
    }
}

pub struct SplitBackend {
    host: Arc<dyn Backend>,
    dev: Arc<dyn Backend>,
    /// Layers `first_dev_layer..` run on the device.
    first_dev_layer: usize,
    /// The output projection reads `token_embd` (no `output.weight` in the file).
    output_tied: bool,
}

impl SplitBackend {
    /// The last `dev_layers` of `n_layers` (1 ..= n_layers) and the output on `dev`, the rest on `host`.
    pub fn new(host: Arc<dyn Backend>, dev: Arc<dyn Backend>, n_layers: usize, dev_layers: usize, output_tied: bool) -> SplitBackend {
        assert!((1..=n_layers).contains(&dev_layers), "split: {dev_layers} of {n_layers} layers");
        SplitBackend { host, dev, first_dev_layer: n_layers - dev_layers, output_tied }
    }

    fn be(&self, s: Side) -> &dyn Backend {
        match s {
            Side::Host => self.host.as_ref(),
            Side::Dev => self.dev.as_ref(),
        }
    }

    /// Where the tensor `name` goes: host, device or both.
    fn placement(&self, name: &str) -> (bool, bool) {
        if let Some(rest) = name.strip_prefix("blk.") {
            let layer: usize = rest.split('.').next().and_then(|i| i.parse().ok()).unwrap_or(0);
            let dev = layer >= self.first_dev_layer;
            return (!dev, dev);
        }
        match name {
            "token_embd.weight" => (true, self.output_tied),
            n if n.starts_with("output") => (false, true),
            _ => (true, false),
        }
    }

    fn side_of_layer(&self, layer: usize) -> Side {
        if layer >= self.first_dev_layer {
            Side::Dev
        } else {
            Side::Host
        }
    }

    /// `b` made current on `side` for reading its first `len` elements (copied over from the side that
    /// wrote them last).
    fn pull(&self, b: &mut SplitBuf, side: Side, len: usize) {
        if b.last != side {
            let mut tmp = vec![0.0f32; len.min(b.host.len())];
            self.be(b.last).read_buffer(b.on(b.last), 0, &mut tmp);
            self.be(side).write_buffer(b.on_mut(side), 0, &tmp);
            b.last = side;
        }
    }
}

fn weight(w: &Weight) -> &SplitWeight {
    w.inner().downcast_ref::<SplitWeight>().expect("weight from another backend")
}

fn kv_of(kv: &KvStore) -> &SplitKv {
    kv.inner().downcast_ref::<SplitKv>().expect("kv store from another backend")
}

fn kv_mut(kv: &mut KvStore) -> &mut SplitKv {
    kv.inner_mut().downcast_mut::<SplitKv>().expect("kv store from another backend")
}

/// The buffer's state (ops run one at a time; each locks only distinct buffers).
fn lock(b: &Buffer) -> MutexGuard<'_, SplitBuf> {
    let m = b.inner().downcast_ref::<Mutex<SplitBuf>>().expect("buffer from another backend");
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend for SplitBackend {
    fn name(&self) -> String {
        format!("{} for layers 0..{}, {} for the rest and the output", self.host.name(), self.first_dev_layer, self.dev.name())
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<Weight, BackendError> {
        let (on_host, on_dev) = self.placement(&w.name);
        let host = on_host.then(|| self.host.upload_weight(w)).transpose()?;
        let dev = on_dev.then(|| self.dev.upload_weight(w)).transpose()?;
        Ok(Weight::new(w.ty, w.row_len, w.n_rows, Box::new(SplitWeight { host, dev })))
    }

    fn weight_bytes_copied(&self) -> usize {
        self.host.weight_bytes_copied() + self.dev.weight_bytes_copied()
    }

    fn alloc(&self, len: usize) -> Result<Buffer, BackendError> {
        let (host, dev) = (self.host.alloc(len)?, self.dev.alloc(len)?);
        Ok(Buffer::new(len, Box::new(Mutex::new(SplitBuf { host, dev, last: Side::Host }))))
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<KvStore, BackendError> {
        self.alloc_kv_layer(0, shape)
    }

    fn alloc_kv_layer(&self, layer: usize, shape: KvShape) -> Result<KvStore, BackendError> {
        let side = self.side_of_layer(layer);
        let kv = self.be(side).alloc_kv_layer(layer, shape)?;
        Ok(KvStore::new(shape, Box::new(SplitKv { side, kv })))
    }

    fn write_buffer(&self, dst: &mut Buffer, offset: usize, src: &[f32]) {
        let mut b = lock(dst);
        let side = b.last;
        self.be(side).write_buffer(b.on_mut(side), offset, src);
    }

    fn read_buffer(&self, src: &Buffer, offset: usize, dst: &mut [f32]) {
        let b = lock(src);
        self.be(b.last).read_buffer(b.on(b.last), offset, dst);
    }

    fn argmax_rows(&self, src: &Buffer, n_cols: usize, dst: &mut [u32]) {
        let b = lock(src);
        self.be(b.last).argmax_rows(b.on(b.last), n_cols, dst);
    }

    fn run(&self, f: &mut (dyn FnMut() + Send)) {
        self.dev.run(&mut || self.host.run(&mut *f))
    }

    fn embed(&self, table: &Weight, tokens: &[u32], out: &mut Buffer) {
        let (side, t) = weight(table).for_lookup();
        let mut o = lock(out);
        o.last = side;
        self.be(side).embed(t, tokens, o.on_mut(side));
    }

    fn matmul(&self, w: &Weight, x: &Buffer, n_tokens: usize, out: &mut Buffer) {
        let (side, wi) = weight(w).for_product();
        let (mut xb, mut o) = (lock(x), lock(out));
        self.pull(&mut xb, side, n_tokens * w.row_len());
        o.last = side;
        self.be(side).matmul(wi, xb.on(side), n_tokens, o.on_mut(side));
    }

    fn add_bias(&self, x: &mut Buffer, bias: &Weight, n_tokens: usize) {
        let (side, bi) = weight(bias).for_product();
        let mut xb = lock(x);
        self.pull(&mut xb, side, n_tokens * bias.row_len());
        self.be(side).add_bias(xb.on_mut(side), bi, n_tokens);
    }

    fn rms_norm(&self, x: &Buffer, w: Option<&Weight>, row_len: usize, n_rows: usize, eps: f32, out: &mut Buffer) {
        let (mut xb, mut o) = (lock(x), lock(out));
        let (side, wi) = match w.map(|w| weight(w).for_product()) {
            Some((s, wi)) => (s, Some(wi)),
            None => (xb.last, None),
        };
        self.pull(&mut xb, side, row_len * n_rows);
        o.last = side;
        self.be(side).rms_norm(xb.on(side), wi, row_len, n_rows, eps, o.on_mut(side));
    }

    fn rope(&self, x: &mut Buffer, positions: &[u32], n_heads: usize, head_dim: usize, p: &RopeParams) {
        let mut xb = lock(x);
        let side = xb.last;
        self.be(side).rope(xb.on_mut(side), positions, n_heads, head_dim, p);
    }

    fn kv_write(&self, kv: &mut KvStore, k: &Buffer, v: &Buffer, slot_mapping: &[u32]) {
        let len = slot_mapping.len() * kv.shape().token_width();
        let s = kv_mut(kv);
        let (mut kb, mut vb) = (lock(k), lock(v));
        self.pull(&mut kb, s.side, len);
        self.pull(&mut vb, s.side, len);
        self.be(s.side).kv_write(&mut s.kv, kb.on(s.side), vb.on(s.side), slot_mapping);
    }

    fn kv_copy_blocks(&self, kv: &mut KvStore, copies: &[(u32, u32)]) {
        let s = kv_mut(kv);
        self.be(s.side).kv_copy_blocks(&mut s.kv, copies);
    }

    fn attention(&self, q: &Buffer, kv: &KvStore, seqs: &[AttnSeq], p: &AttnParams, out: &mut Buffer, scores: Option<(&mut Buffer, usize)>) {
        let s = kv_of(kv);
        let n_rows = seqs.iter().map(|s| s.q_start + s.n_q).max().unwrap_or(0);
        let (mut qb, mut o) = (lock(q), lock(out));
        self.pull(&mut qb, s.side, n_rows * p.n_heads * p.head_dim);
        o.last = s.side;
        match scores {
            Some((sb, base)) => {
                // every layer writes its own part of the scores: the whole buffer follows the layers
                let mut sc = lock(sb);
                let len = sc.host.len();
                self.pull(&mut sc, s.side, len);
                self.be(s.side).attention(qb.on(s.side), &s.kv, seqs, p, o.on_mut(s.side), Some((sc.on_mut(s.side), base)));
            }
            None => self.be(s.side).attention(qb.on(s.side), &s.kv, seqs, p, o.on_mut(s.side), None),
        }
    }

    fn kv_move_slots(&self, kv: &mut KvStore, moves: &[(u32, u32)]) {
        let s = kv_mut(kv);
        self.be(s.side).kv_move_slots(&mut s.kv, moves);
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, len: usize) {
        // where y was computed (the residual stream follows the layers)
        let (mut xb, mut yb) = (lock(x), lock(y));
        let side = yb.last;
        self.pull(&mut xb, side, len);
        self.pull(&mut yb, side, len);
        self.be(side).add(xb.on_mut(side), yb.on(side), len);
    }

    fn scale(&self, x: &mut Buffer, s: f32, len: usize) {
        let mut xb = lock(x);
        let side = xb.last;
        self.be(side).scale(xb.on_mut(side), s, len);
    }

    fn glu(&self, gate: &mut Buffer, up: &Buffer, len: usize, act: Glu) {
        let (mut g, mut u) = (lock(gate), lock(up));
        let side = g.last;
        self.pull(&mut u, side, len);
        self.be(side).glu(g.on_mut(side), u.on(side), len, act);
    }

    fn get_rows(&self, src: &Buffer, row_len: usize, rows: &[u32], out: &mut Buffer) {
        let (sb, mut o) = (lock(src), lock(out));
        let side = sb.last;
        o.last = side;
        self.be(side).get_rows(sb.on(side), row_len, rows, o.on_mut(side));
    }
}
