//! The tensors of a model: one table of names, shapes and whether each is required, checked against the
//! file and handed to the backend as views into the mapped file (the CPU backend never copies them).

use std::sync::Arc;

use crate::backend::{Backend, HostBytes, HostWeight, Weight};
use crate::gguf::GgufFile;

use super::config::Config;
use super::ModelError;

/// The mapped file as the backend sees it: bytes that stay put.
pub(super) struct MappedFile(pub Arc<GgufFile>);

impl HostBytes for MappedFile {
    fn host_bytes(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// Whether a tensor must be in the file.
#[derive(Clone, Copy)]
enum Need {
    Required,
    Optional,
    /// Required when the configuration says so, absent otherwise.
    When(fn(&Config) -> bool),
}

/// GGUF shape `[ne0, ne1]` (ne0 = row length; a vector has ne1 = 1).
type ShapeFn = fn(&Config) -> [usize; 2];

/// Global tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum G {
    TokenEmbd,
    OutputNorm,
    /// Absent when the output projection is tied to the embeddings.
    Output,
    /// llama3-style RoPE frequency divisors.
    RopeFreqs,
}

const GLOBAL: [(G, &str, ShapeFn, Need); 4] = [
    (G::TokenEmbd, "token_embd.weight", |c| [c.dim, c.n_vocab], Need::Required),
    (G::OutputNorm, "output_norm.weight", |c| [c.dim, 1], Need::Required),
    (G::Output, "output.weight", |c| [c.dim, c.n_vocab], Need::Optional),
    (G::RopeFreqs, "rope_freqs.weight", |c| [c.n_rot / 2, 1], Need::Optional),
];

/// Per-layer tensors (named `blk.{il}.{name}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    Out,
    PostAttnNorm,
    FfnNorm,
    Gate,
    Up,
    Down,
    PostFfwNorm,
}

const LAYER: [(L, &str, ShapeFn, Need); 16] = [
    (L::AttnNorm, "attn_norm.weight", |c| [c.dim, 1], Need::Required),
    (L::Q, "attn_q.weight", |c| [c.dim, c.q_dim()], Need::Required),
    (L::K, "attn_k.weight", |c| [c.dim, c.kv_dim()], Need::Required),
    (L::V, "attn_v.weight", |c| [c.dim, c.kv_dim()], Need::Required),
    (L::QBias, "attn_q.bias", |c| [c.q_dim(), 1], Need::When(|c| c.qkv_bias)),
    (L::KBias, "attn_k.bias", |c| [c.kv_dim(), 1], Need::When(|c| c.qkv_bias)),
    (L::VBias, "attn_v.bias", |c| [c.kv_dim(), 1], Need::When(|c| c.qkv_bias)),
    (L::QNorm, "attn_q_norm.weight", |c| [c.head_dim, 1], Need::When(|c| c.qk_norm)),
    (L::KNorm, "attn_k_norm.weight", |c| [c.head_dim, 1], Need::When(|c| c.qk_norm)),
    (L::Out, "attn_output.weight", |c| [c.q_dim(), c.dim], Need::Required),
    (L::PostAttnNorm, "post_attention_norm.weight", |c| [c.dim, 1], Need::When(|c| c.post_norms)),
    (L::FfnNorm, "ffn_norm.weight", |c| [c.dim, 1], Need::Required),
    (L::Gate, "ffn_gate.weight", |c| [c.dim, c.ffn_dim], Need::Required),
    (L::Up, "ffn_up.weight", |c| [c.dim, c.ffn_dim], Need::Required),
    (L::Down, "ffn_down.weight", |c| [c.ffn_dim, c.dim], Need::Required),
    (L::PostFfwNorm, "post_ffw_norm.weight", |c| [c.dim, 1], Need::When(|c| c.post_norms)),
];

/// One layer's tensors, indexed by [`L`].
pub struct LayerWeights {
    w: Vec<Option<Weight>>,
}

impl LayerWeights {
    /// A tensor the table marks required for this configuration (checked at load).
    pub fn get(&self, t: L) -> &Weight {
        self.w[t as usize].as_ref().expect("required tensor checked at load")
    }
    pub fn opt(&self, t: L) -> Option<&Weight> {
        self.w[t as usize].as_ref()
    }
}

/// All tensors of a model, on the backend.
pub struct Weights {
    global: Vec<Option<Weight>>,
    pub layers: Vec<LayerWeights>,
    /// `rope_freqs.weight` on the host (a RoPE parameter, `n_rot / 2` values).
    pub rope_freqs: Option<Vec<f32>>,
}

impl Weights {
    pub fn get(&self, t: G) -> &Weight {
        self.global[t as usize].as_ref().expect("required tensor checked at load")
    }
    /// The output projection: `output.weight`, or the embeddings when tied.
    pub fn output(&self) -> &Weight {
        self.global[G::Output as usize].as_ref().unwrap_or_else(|| self.get(G::TokenEmbd))
    }

    pub(super) fn load(file: &Arc<GgufFile>, cfg: &Config, backend: &dyn Backend) -> Result<Weights, ModelError> {
        let source: Arc<dyn HostBytes> = Arc::new(MappedFile(file.clone()));
        let global = GLOBAL
            .iter()
            .map(|&(_, name, shape, need)| load_one(file, &source, backend, cfg, name.to_string(), shape(cfg), need))
            .collect::<Result<Vec<_>, _>>()?;
        let layers = (0..cfg.n_layers)
            .map(|il| {
                let w = LAYER
                    .iter()
                    .map(|&(_, name, shape, need)| {
                        load_one(file, &source, backend, cfg, format!("blk.{il}.{name}"), shape(cfg), need)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(LayerWeights { w })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let rope_freqs = match file.tensor(GLOBAL[G::RopeFreqs as usize].1) {
            Some(info) => {
                let mut v = vec![0.0f32; info.n_elements as usize];
                crate::quant::dequantize(info.ty, file.tensor_data(info), &mut v)
                    .map_err(|e| ModelError::BadTensor { name: info.name.clone(), problem: e.to_string() })?;
                Some(v)
            }
            None => None,
        };
        Ok(Weights { global, layers, rope_freqs })
    }
}

/// Checks one tensor against the table and uploads it; `None` for an absent optional tensor.
fn load_one(
    file: &GgufFile,
    source: &Arc<dyn HostBytes>,
    backend: &dyn Backend,
    cfg: &Config,
    name: String,
    shape: [usize; 2],
    need: Need,
) -> Result<Option<Weight>, ModelError> {
    let required = match need {
        Need::Required => true,
        Need::Optional => false,
        Need::When(f) => f(cfg),
    };
    let Some(info) = file.tensor(&name) else {
        return if required { Err(ModelError::MissingTensor { name }) } else { Ok(None) };
    };
    // Compare shapes with trailing 1s dropped ([640] == [640, 1]).
    let trim = |d: &[u64]| {
        let mut d = d.to_vec();
        while d.len() > 1 && d.last() == Some(&1) {
            d.pop();
        }
        d
    };
    let expected = [shape[0] as u64, shape[1] as u64];
    if trim(&info.dims) != trim(&expected) {
        return Err(ModelError::BadTensor {
            name,
            problem: format!("shape {:?}, expected {:?} for this configuration", info.dims, trim(&expected)),
        });
    }
    let host = HostWeight {
        name: name.clone(),
        ty: info.ty,
        row_len: shape[0],
        n_rows: shape[1],
        source: source.clone(),
        offset: (file.data_offset + info.offset) as usize,
    };
    Ok(Some(backend.upload_weight(&host)?))
}
