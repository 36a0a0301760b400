//! End to end through the binary: `pagellm run -p` on the real models reproduces llama.cpp's greedy
//! text, is reproducible under a seed, and refuses bad input with one clear line.

mod common;

use std::process::{Command, Output};

fn pagellm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagellm")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "pagellm failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn raw_greedy_run_prints_llama_cpp_text() {
    for (rel, fx) in [(common::SMOLLM2, "llama_greedy_smollm2.json"), (common::GEMMA3, "llama_greedy_gemma3.json")] {
        let Some(path) = common::model_or_skip(rel) else { continue };
        // The case whose first low-margin step comes latest tests the longest stretch of text.
        let fixture = common::fixture(fx);
        let low_margin_at = |c: &serde_json::Value| {
            let steps = c["top5"].as_array().unwrap();
            steps.iter().position(|s| s[0][1].as_f64().unwrap() - s[1][1].as_f64().unwrap() < 0.1).unwrap_or(steps.len())
        };
        let case = fixture["cases"].as_array().unwrap().iter().max_by_key(|c| low_margin_at(c)).unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let o = pagellm(&["run", path.to_str().unwrap(), "-p", prompt, "--raw", "--temp", "0", "-n", "32"]);
        let text = stdout(&o);
        // The whole pipeline (tokenizer, forward, greedy, streaming detokenizer) must reproduce llama.cpp's
        // text up to the first step where llama.cpp's own top-2 margin is below 0.1: past such a step the
        // two engines may pick differently (tests/model_greedy.rs bounds how often, token by token).
        let tokens: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let k = low_margin_at(case);
        let file = pagellm::gguf::GgufFile::open(&path).unwrap();
        let tok = pagellm::tokenizer::Tokenizer::from_gguf(&file).unwrap();
        let want = tok.decode(&tokens[..k]);
        assert!(k >= 4, "{rel}: fixture has a low-margin step too early to test anything");
        assert!(text.starts_with(&want), "{rel}: output {text:?} does not start with llama.cpp's first {k} tokens {want:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("prompt") && err.contains("tok/s"), "no timings on stderr: {err}");
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed_and_chat_mode_answers() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let p = path.to_str().unwrap();
    let run = |seed: &str| stdout(&pagellm(&["run", p, "-p", "Name a fruit.", "-n", "16", "--temp", "1.0", "--seed", seed]));
    let a = run("5");
    assert!(!a.trim().is_empty());
    assert_eq!(a, run("5"), "same seed, different output");
}

/// `--no-repack` reads every weight in place: the same greedy text, token for token (the packed kernels
/// compute the same bits), on both models (each has a Q8_0 output matrix, the type AVX-512 packs).
#[test]
fn no_repack_gives_the_same_text() {
    for rel in [common::SMOLLM2, common::GEMMA3] {
        let Some(path) = common::model_or_skip(rel) else { continue };
        let p = path.to_str().unwrap();
        let run = |extra: &[&str]| {
            let args = [&["run", p, "-p", "The capital of France is", "--raw", "--temp", "0", "-n", "24", "--ignore-eos"], extra].concat();
            stdout(&pagellm(&args))
        };
        let (packed, in_place) = (run(&[]), run(&["--no-repack"]));
        assert!(!packed.trim().is_empty(), "{rel}: no output");
        assert_eq!(packed, in_place, "{rel}: --no-repack changed the output");
    }
}

#[test]
fn prompt_from_stdin() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagellm"))
        .args(["run", path.to_str().unwrap(), "-p", "-", "--raw", "--temp", "0", "-n", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"The capital of France is").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(stdout(&o).starts_with(" Paris"));
}

#[test]
fn bad_input_gets_one_clear_line() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let p = path.to_str().unwrap();
    let long = "word ".repeat(400);
    let o = pagellm(&["run", p, "-p", &long, "--raw", "--ctx", "128"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not fit the context of 128 tokens") && err.contains("--ctx"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let o = pagellm(&["run", "/nonexistent.gguf", "-p", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: cannot open /nonexistent.gguf"));

    let unknown = std::env::temp_dir().join(format!("pagellm-arch-{}.gguf", std::process::id()));
    let b = pagellm::gguf::GgufBuilder::new().kv("general.architecture", pagellm::gguf::Value::String("mamba9".into()));
    std::fs::write(&unknown, b.to_bytes().unwrap()).unwrap();
    let o = pagellm(&["run", unknown.to_str().unwrap(), "-p", "x"]);
    std::fs::remove_file(&unknown).ok();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("error:"), "{err}");
}
