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
