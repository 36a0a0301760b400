//! Random inputs, references and buffer helpers shared by the backend tests (tests/backend_cpu.rs,
//! tests/cuda.rs).

use std::sync::Arc;

use pagellm::backend::{Backend, Buffer, HostBytes, HostWeight, Weight};
use pagellm::dtype::GgmlType;
use pagellm::quant;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Bytes(pub Vec<u8>);
impl HostBytes for Bytes {
    fn host_bytes(&self) -> &[u8] {
        &self.0
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Roughly normal values (sum of four uniforms), never zero in practice, with a few outliers like real
/// activations.
pub fn randn(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v: f32 = (0..4).map(|_| r.gen_range(-1.0f32..1.0)).sum();
            if i % 97 == 5 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

pub fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// `n_rows` random rows of `k` weights of `ty`, as GGUF bytes. K-quants have no quantizer here: random
/// bytes with sane f16 scales.
pub fn random_weights(r: &mut StdRng, ty: GgmlType, n_rows: usize, k: usize) -> Vec<u8> {
    let nb = k / ty.block_size();
    let mut out = vec![0u8; n_rows * nb * ty.type_size()];
    match ty {
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K | GgmlType::Q2K | GgmlType::Q3K => {
            r.fill(&mut out[..]);
            for blk in out.chunks_exact_mut(ty.type_size()) {
                let (d, dmin) = (r.gen_range(0.001f32..0.01), r.gen_range(0.001f32..0.01));
                let at = match ty {
                    GgmlType::Q6K => 208,
                    GgmlType::Q3K => 108,
                    GgmlType::Q2K => 80,
                    _ => 0,
                };
                blk[at..at + 2].copy_from_slice(&f16_bytes(d));
                if matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q2K) {
                    blk[at + 2..at + 4].copy_from_slice(&f16_bytes(dmin));
                }
            }
        }
        _ => quant::quantize(ty, &randn(r, n_rows * k), &mut out).unwrap(),
    }
    out
}

pub fn dequant(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    quant::dequantize(ty, b, &mut v).unwrap();
    v
}

/// ‖got − want‖ / ‖want‖; fails on NaN/inf in `got` and on an all-zero reference.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "NaN or inf in the output");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    assert!(den > 0.0, "reference is all zeros");
    (num / den).sqrt()
}

pub fn upload(b: &dyn Backend, ty: GgmlType, bytes: Vec<u8>, row_len: usize, n_rows: usize) -> Weight {
    let source: Arc<dyn HostBytes> = Arc::new(Bytes(bytes));
    b.upload_weight(&HostWeight { name: "w".into(), ty, row_len, n_rows, source, offset: 0 }).unwrap()
}

pub fn buffer(b: &dyn Backend, data: &[f32]) -> Buffer {
    let mut buf = b.alloc(data.len()).unwrap();
    b.write_buffer(&mut buf, 0, data);
    buf
}

pub fn read(b: &dyn Backend, buf: &Buffer, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    b.read_buffer(buf, 0, &mut v);
    v
}
