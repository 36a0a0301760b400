//! `pagellm info` against the `gguf` Python package's reading of the real models
//! (fixtures from tests/fixtures/gen_info.py).

use std::path::Path;
use std::process::Command;

use pagellm::cli::info::ModelInfo;
use pagellm::gguf::GgufFile;
use serde_json::Value as Json;

mod common;
use common::model_or_skip;

fn check(fixture: &str, rel: &str) {
    let Some(path) = model_or_skip(rel) else { return };
    let oracle: Json = serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture)).unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let info = ModelInfo::from_file(&path, &f);
    let ours = serde_json::to_value(&info).unwrap();
    for key in ["file_size", "gguf_version", "architecture", "name", "n_params", "n_tensors", "context_length", "n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "tokenizer_model", "has_chat_template"] {
        assert_eq!(ours[key], oracle[key], "{rel}: '{key}' differs from the gguf package");
    }
    let base = ours["rope"]["freq_base"].as_f64().unwrap();
    assert!((base - oracle["rope_freq_base"].as_f64().unwrap()).abs() < 1e-3, "{rel}: rope base {base}");
    let types = oracle["tensor_types"].as_object().unwrap();
    assert_eq!(info.tensor_types.len(), types.len(), "{rel}: tensor type rows");
    for row in &info.tensor_types {
        let o = &types[&row.ty];
        assert_eq!(row.count as u64, o["count"].as_u64().unwrap(), "{rel}: {} count", row.ty);
        assert_eq!(row.elements, o["elements"].as_u64().unwrap(), "{rel}: {} elements", row.ty);
        assert_eq!(row.bytes, o["bytes"].as_u64().unwrap(), "{rel}: {} bytes", row.ty);
    }

    // The binary prints the same facts, as a table and as JSON.
    let exe = env!("CARGO_BIN_EXE_pagellm");
    let out = Command::new(exe).args(["info", "--json"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["n_params"], oracle["n_params"]);
    let table = Command::new(exe).arg("info").arg(&path).output().unwrap();
    let text = String::from_utf8(table.stdout).unwrap();
    for needle in [format!("layers               {}", oracle["n_layers"]), format!("kv heads             {}", oracle["n_kv_heads"])] {
        assert!(text.contains(&needle), "table lacks '{needle}':\n{text}");
    }
}

#[test]
fn info_smollm2_matches_gguf_package() {
    check("tests/fixtures/info_smollm2.json", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn info_gemma3_matches_gguf_package() {
    check("tests/fixtures/info_gemma3.json", "models/gemma-3-270m-q4_k_m.gguf");
}

#[test]
fn info_on_a_bad_file_is_one_clear_line() {
    let path = std::env::temp_dir().join(format!("pagellm-bad-{}.gguf", std::process::id()));
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pagellm")).arg("info").arg(&path).output().unwrap();
    std::fs::remove_file(&path).ok();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: file truncated: tensor count at byte 8"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn synth_files_read_back_with_their_shape() {
    let dir = std::env::temp_dir();
    for (shape, ty) in [("tiny", "q4_0"), ("tiny-gemma3", "q4_k_m"), ("tiny", "q6_k")] {
        let path = dir.join(format!("pagellm-synth-{}-{shape}-{ty}.gguf", std::process::id()));
        let out = Command::new(env!("CARGO_BIN_EXE_pagellm")).args(["synth", "--shape", shape, "--type", ty, "-o"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let f = GgufFile::open(&path).unwrap();
        let sh = pagellm::synth::shape(shape).unwrap();
        let info = ModelInfo::from_file(&path, &f);
        assert_eq!(info.n_layers, Some(sh.n_layers));
        assert_eq!(info.head_dim, Some(sh.head_dim));
        assert_eq!(info.vocab_size, Some(sh.vocab));
        // Every tensor's data decodes to finite values near the N(0, 0.02) target.
        for t in &f.tensors {
            let mut vals = vec![0f32; t.n_elements as usize];
            pagellm::quant::dequantize(t.ty, f.tensor_data(t), &mut vals).unwrap();
            assert!(vals.iter().all(|v| v.is_finite()), "{}: non-finite", t.name);
            if t.dims.len() == 2 {
                let rms = (vals.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
                assert!(rms > 0.002 && rms < 0.2, "{} {}: rms {rms}", t.name, t.ty);
            }
        }
        std::fs::remove_file(&path).ok();
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_pagellm")).args(["synth", "--shape", "huge", "-o", "/tmp/x.gguf"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown shape 'huge'; known: tiny"));
}
