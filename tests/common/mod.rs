//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod backend;

use std::path::{Path, PathBuf};

pub const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "models/gemma-3-270m-q4_k_m.gguf";

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The model path, or `None` with a printed reason when it is absent outside CI (in CI it must exist).
pub fn model_or_skip(rel: &str) -> Option<PathBuf> {
    let path = root().join(rel);
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "{rel} is missing in CI: .ci/run must fetch it (models/fetch.sh)");
    println!("skipped: {rel} missing (run models/fetch.sh)");
    None
}

pub fn fixture(rel: &str) -> serde_json::Value {
    let p = root().join("tests/fixtures").join(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// How many elements of `a` and `b` differ in their bits.
pub fn bits_differ(a: &[f32], b: &[f32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

/// The logits after `prompt`, then after each of `steps` greedy tokens: one row per step.
pub fn greedy_logits(model: &pagellm::model::Model, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    use pagellm::model::Logits;
    let mut sess = model.new_session(prompt.len() + steps + 1).unwrap();
    let mut rows = vec![model.forward(&mut sess, prompt, Logits::Last).unwrap()];
    for _ in 0..steps {
        let next = pagellm::sampling::argmax(rows.last().unwrap());
        rows.push(model.forward(&mut sess, &[next], Logits::Last).unwrap());
    }
    rows
}
