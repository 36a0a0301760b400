//! `pagellm::quant` against the `gguf` Python package, bit for bit.
//!
//! Fixtures come from `tests/fixtures/gen_quant.py` (see its first line to regenerate): random blocks with
//! sane scales and the oracle's f32 decoding of them, and random f32 inputs with the oracle's encoding.
//! Both sides do the same IEEE f32 operations in the same order (ggml's scalar reference), so every f32
//! must match in its bits and every encoded byte exactly: no ulp tolerance is needed or allowed.
//! Q8_K (both ways) and Q8_1 (encoding) have no function in the gguf package; their oracle is the
//! script's float32 numpy port of ggml-quants.c. `gen_quant.py --check-ggml DIR` replays all block
//! fixtures through ggml-quants.c itself (done for llama.cpp as vendored in llama-cpp-python 0.3.36).

use std::path::PathBuf;

use pagellm::dtype::GgmlType;
use pagellm::quant;

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "quant",
        name,
    ]
    .iter()
    .collect();
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with `python3 tests/fixtures/gen_quant.py`)",
            path.display()
        )
    })
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Panics listing the first mismatches (type, block, element) and how many there were.
fn report(ty: GgmlType, what: &str, mismatches: Vec<String>, total: usize) {
    if !mismatches.is_empty() {
        let shown: Vec<&String> = mismatches.iter().take(12).collect();
        panic!(
            "{ty} {what}: {} of {total} differ from the gguf oracle:\n  {}",
            mismatches.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
}

/// `<name>.blocks` decoded by pagellm equals `<name>.f32` in every bit.
fn check_dequantize(name: &str, ty: GgmlType) {
    let blocks = fixture(&format!("{name}.blocks"));
    let want = f32s(&fixture(&format!("{name}.f32")));
    assert!(
        !want.is_empty() && want.iter().any(|&v| v != 0.0),
        "{ty}: empty or all-zero fixture"
    );
    let mut got = vec![f32::NAN; want.len()];
    quant::dequantize(ty, &blocks, &mut got).unwrap_or_else(|e| panic!("{ty}: {e}"));
    let bs = ty.block_size();
    let mismatches = got
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| {
            format!(
                "block {} element {}: got {g:e} ({:#010x}), oracle {w:e} ({:#010x})",
                i / bs,
                i % bs,
                g.to_bits(),
                w.to_bits()
            )
        })
        .collect();
    report(ty, "dequantize", mismatches, want.len());
}

/// `<name>.qin.f32` encoded by pagellm equals `<name>.qout` in every byte.
fn check_quantize(name: &str, ty: GgmlType) {
    let x = f32s(&fixture(&format!("{name}.qin.f32")));
    let want = fixture(&format!("{name}.qout"));
    assert!(x.iter().any(|&v| v != 0.0), "{ty}: all-zero input");
    let mut got = vec![0u8; want.len()];
    quant::quantize(ty, &x, &mut got).unwrap_or_else(|e| panic!("{ty}: {e}"));
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let mismatches = got
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(i, (g, w))| {
            let block = i / ts;
            let input = &x[block * bs..(block + 1) * bs];
            let hint = if bs == 1 {
                format!(" (input {:e} = {:#010x})", input[0], input[0].to_bits())
            } else {
                String::new()
            };
            format!(
                "block {block} byte {}: got {g:#04x}, oracle {w:#04x}{hint}",
                i % ts
            )
        })
        .collect();
    report(ty, "quantize", mismatches, want.len());
}

macro_rules! oracle_tests {
    ($check:ident: $($test:ident => ($name:literal, $ty:ident)),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                $check($name, GgmlType::$ty);
            }
        )*
    };
}

oracle_tests! { check_dequantize:
    dequantize_f32 => ("f32", F32),
    dequantize_f16 => ("f16", F16),
    dequantize_bf16 => ("bf16", BF16),
    dequantize_q4_0 => ("q4_0", Q4_0),
    dequantize_q4_1 => ("q4_1", Q4_1),
    dequantize_q5_0 => ("q5_0", Q5_0),
    dequantize_q5_1 => ("q5_1", Q5_1),
    dequantize_q8_0 => ("q8_0", Q8_0),
    dequantize_q2_k => ("q2_k", Q2K),
    dequantize_q3_k => ("q3_k", Q3K),
    dequantize_q4_k => ("q4_k", Q4K),
    dequantize_q5_k => ("q5_k", Q5K),
    dequantize_q6_k => ("q6_k", Q6K),
    dequantize_q8_k => ("q8_k", Q8K),
}

oracle_tests! { check_quantize:
    quantize_f32 => ("f32", F32),
    quantize_f16 => ("f16", F16),
    quantize_bf16 => ("bf16", BF16),
    quantize_q4_0 => ("q4_0", Q4_0),
    quantize_q4_1 => ("q4_1", Q4_1),
    quantize_q5_0 => ("q5_0", Q5_0),
    quantize_q5_1 => ("q5_1", Q5_1),
    quantize_q8_0 => ("q8_0", Q8_0),
    quantize_q8_1 => ("q8_1", Q8_1),
    quantize_q8_k => ("q8_k", Q8K),
}

/// Every type `GgmlType::is_supported` promises has a dequantization fixture above.
#[test]
fn every_supported_type_has_a_fixture() {
    for ty in GgmlType::all().filter(|t| t.is_supported()) {
        let name = ty.name().to_ascii_lowercase();
        assert!(!fixture(&format!("{name}.blocks")).is_empty(), "{ty}");
        assert!(!fixture(&format!("{name}.f32")).is_empty(), "{ty}");
    }
}
