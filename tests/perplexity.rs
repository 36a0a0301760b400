//! Perplexity on GPL-3 at ctx 512 within 1% of llama.cpp's (llama.cpp 0c1e570, 14 chunks:
//! 18.3914 for SmolLM2 and 13.9062 for Gemma-3; figures from the issue, measured with llama-perplexity).

mod common;

use std::sync::Arc;

use pagellm::cli::perplexity::evaluate;
use pagellm::gguf::GgufFile;
use pagellm::model::{Model, ModelOptions};
use pagellm::tokenizer::Tokenizer;

const TEXT: &str = "/usr/share/common-licenses/GPL-3";

fn check(rel: &str, want: f64) {
    let Some(path) = common::model_or_skip(rel) else { return };
    let text = std::fs::read_to_string(TEXT).expect("GPL-3 text (Debian's base-files) is present");
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = Model::load(file, ModelOptions { ctx: 512, threads }).unwrap();
    let t = std::time::Instant::now();
    let r = evaluate(&model, &tok, &text, 512, 0, |_, _| {}).unwrap();
    println!("{rel}: PPL {:.4} +/- {:.4} over {} chunks ({} scored) in {:.1} s; llama.cpp {want}", r.ppl, r.ppl_err, r.n_chunks, r.scored, t.elapsed().as_secs_f64());
    assert_eq!(r.n_chunks, 14, "llama.cpp scores 14 chunks of this text");
    let rel_err = (r.ppl - want).abs() / want;
    assert!(rel_err < 0.01, "{rel}: PPL {:.4} is {:.2}% from llama.cpp's {want}", r.ppl, rel_err * 100.0);
}

#[test]
fn perplexity_smollm2_matches_llama_cpp() {
    check(common::SMOLLM2, 18.3914);
}

#[test]
fn perplexity_gemma3_matches_llama_cpp() {
    check(common::GEMMA3, 13.9062);
}
