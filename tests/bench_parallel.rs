//! `pagellm bench --parallel N`: the binary reports positive pp and tg rates for N sequences, and the
//! batched decode it times gives every sequence the same greedy tokens as decoding it alone (batch
//! invariance, DESIGN.md), through the bench's own batch path and through `Engine::generate`.

mod common;

use std::process::Command;
use std::sync::atomic::AtomicBool;

use pagellm::cli::{bench, generate};
use pagellm::sampling::{Sampler, SamplingParams};

#[test]
fn bench_parallel_json_reports_pp_and_tg() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let args = ["bench", path.to_str().unwrap(), "--parallel", "3", "-p", "16", "-n", "4", "-r", "1", "--json", "--device", "cpu"];
    let o = Command::new(env!("CARGO_BIN_EXE_pagellm")).args(args).output().unwrap();
    assert!(o.status.success(), "pagellm failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    for (prefix, n_tokens) in [("pp", 3 * 16), ("tg", 3 * 4)] {
        let row = rows.iter().find(|r| r["test"].as_str().unwrap().starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} row: {v}"));
        assert_eq!(row["parallel"], 3, "{row}");
        assert_eq!(row["n_tokens"], n_tokens, "{row}");
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[test]
fn bench_parallel_refuses_bad_flags_with_one_line() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    for extra in [&["--parallel", "0"][..], &["--parallel", "2", "-d", "8"], &["--parallel", "2", "-p", "0"]] {
        let mut args = vec!["bench", path.to_str().unwrap(), "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_pagellm")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.starts_with("error: --parallel") && err.lines().count() == 1, "{extra:?}: {err}");
    }
}

/// Prompts of 200 tokens, so the 3 x 200 prompt tokens are split over two prefill steps of at most
/// UBATCH (512) tokens, one sequence's prompt across both.
#[test]
fn batched_greedy_tokens_equal_each_sequence_alone() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let (n_parallel, n_prompt, n_gen) = (3, 200, 8);
    let seq_tokens = n_prompt + n_gen;
    let lm = generate::load(&path, seq_tokens, 2, None).unwrap();
    let ids = bench::plain_ids(&lm.file, lm.model.config().n_vocab);
    assert!(ids.iter().all(|&id| !lm.tokenizer.is_eog(id) && !lm.tokenizer.is_control(id)));
    let prompts = bench::parallel_prompts(n_parallel, n_prompt, &ids);
    assert!(prompts.iter().enumerate().all(|(i, p)| p.len() == n_prompt && !prompts[..i].contains(p)), "prompts not distinct");
    let mut engine = bench::parallel_engine(lm.model, n_parallel, seq_tokens).unwrap();

    let batched = bench::decode_batch(&mut engine, &prompts, n_gen).unwrap();
    engine.check_invariants().unwrap();
    assert_eq!(engine.stats().used_blocks, 0, "sequences not freed");
    for (i, prompt) in prompts.iter().enumerate() {
        assert_eq!(batched.tokens[i].len(), n_gen + 1);
        let alone = bench::decode_batch(&mut engine, std::slice::from_ref(prompt), n_gen).unwrap();
        assert_eq!(batched.tokens[i], alone.tokens[0], "sequence {i}: batched and alone differ");
        // The single-sequence path (no EOG ids: never stops early).
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let g = engine.generate(prompt, &mut greedy, n_gen + 1, &AtomicBool::new(false), &mut |_| true).unwrap();
        assert_eq!(batched.tokens[i], g.tokens, "sequence {i}: batched and Engine::generate differ");
    }

    // Repetitions (the bench's warm-up plus -r) leave the pool empty each time.
    let rows = bench::run_parallel(&mut engine, &prompts, 2, 2, 2).unwrap();
    assert_eq!(rows.iter().map(|r| r.test.as_str()).collect::<Vec<_>>(), ["pp200 x3", "tg2 x3"]);
    assert!(rows.iter().all(|r| r.parallel == 3 && r.samples_ts.len() == 2 && r.avg_ts > 0.0));
    engine.check_invariants().unwrap();
}
