//! End to end on the real models against llama.cpp (fixtures from `tests/fixtures/gen_llama.py`):
//! the prompt's token ids are fed directly (no tokenizer), then 32 steps teacher-forced with llama.cpp's
//! tokens, so every step compares the two on the same context.
//!
//! Why the bounds are what they are: both engines quantize activations to Q8 before every matmul, which
//! makes these small models chaotic at the 1e-6 level (a 1e-6 relative nudge of the input moves SmolLM2's
//! logits by ~5e-3), so no implementation that is not bit-identical to one llama.cpp build can hold a
//! 1e-2 bound on every step. Measured on the fixtures' 160 steps per model (top-5 probability error):
//!
//! ```text
//!                                        SmolLM2 mean / p95 / max    Gemma-3 mean / p95 / max
//! llama.cpp batch vs its own decode        0.009 / 0.028 / 0.045       0.015 / 0.049 / 0.295
//! pagellm AVX2 vs pagellm scalar           0.014 / 0.043 / 0.170       0.017 / 0.053 / 0.125
//! pagellm vs llama.cpp                     0.016 / 0.048 / 0.103       0.020 / 0.062 / 0.213
//! ```
//! llama.cpp's own batch run also picks a different greedy token than its decode run at steps whose
//! top-2 margin is 0.124 (Gemma-3) and 0.031 (SmolLM2). So the test bounds the error distribution
//! (mean, p95, max) at about twice llama.cpp's own spread, accepts a greedy divergence where llama.cpp's
//! top-2 margin is below [`MARGIN`] (every divergence is printed, with the stricter 0.03 flagged), and
//! requires most tokens to match outright. A real bug (wrong RoPE base, norm, mask) moves the mean
//! error by an order of magnitude and breaks greedy agreement at large margins.
//!
//! So the issue's own bounds (every greedy token; top-5 probabilities within 1e-2 for SmolLM2, 0.1 for
//! Gemma-3) are asserted with `--numerics llama.cpp`, the CPU computing llama.cpp's float operations one
//! by one (src/backend/cpu/ggml.rs): there both models give llama.cpp's logits bit for bit, every step
//! of every prompt (the printed errors are 0).
//!
//! A missing model or fixture fails under `CI`, and is skipped (printed) otherwise.

mod common;

use std::path::Path;
use std::sync::Arc;

use pagellm::gguf::GgufFile;
use pagellm::model::{Logits, Model, ModelError, ModelOptions};
use serde_json::Value;

const THREADS: usize = 2;
/// A greedy divergence is accepted where llama.cpp's own top-2 margin is below this (llama.cpp's batch
/// and decode runs disagree at margins up to 0.124).
const MARGIN: f64 = 0.15;
/// The margin the issue asked for; divergences above it are printed as such.
const STRICT_MARGIN: f64 = 0.03;

/// Bounds on the per-step top-5 probability error, and on greedy agreement.
struct Tolerance {
    mean: f64,
    p95: f64,
    max: f64,
    /// Fewest greedy tokens (of 32) that must match per prompt.
    min_matched: usize,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Which float order the CPU backend computes in.
#[derive(Clone, Copy, PartialEq)]
enum Numerics {
    /// pagellm's own (the default).
    Native,
    /// llama.cpp's (`--numerics llama.cpp`): its logits bit for bit.
    Llama,
}

/// The fixture and its model, or `None` (after printing why) when either is missing outside CI.
fn load(fixture: &str) -> Option<(Value, Model)> {
    load_with(fixture, Numerics::Native)
}

fn load_with(fixture: &str, numerics: Numerics) -> Option<(Value, Model)> {
    let fpath = root().join("tests/fixtures").join(fixture);
    let skip = |reason: String| {
        if std::env::var_os("CI").is_some() {
            panic!("{reason}");
        }
        println!("skipped: {reason}");
        None
    };
    let Ok(text) = std::fs::read_to_string(&fpath) else { return skip(format!("fixture {} is missing", fpath.display())) };
    let fx: Value = serde_json::from_str(&text).expect("fixture is JSON");
    let mpath = root().join(fx["model"].as_str().expect("fixture names its model"));
    if !mpath.exists() {
        return skip(format!("model {} is missing (run models/fetch.sh)", mpath.display()));
    }
    let file = Arc::new(GgufFile::open(&mpath).expect("model opens"));
    let opts = ModelOptions { ctx: 1024, threads: THREADS };
    let model = match numerics {
        Numerics::Native => Model::load(file, opts),
        Numerics::Llama => {
            use pagellm::backend::cpu::{CpuBackend, Kernels};
            let backend = CpuBackend::new(THREADS, Kernels::detect()).expect("cpu backend").with_llama_numerics();
            Model::load_on(file, opts, Arc::new(backend))
        }
    };
    Some((fx, model.expect("model loads")))
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

fn argmax(p: &[f64]) -> usize {
    p.iter().enumerate().fold(0, |best, (i, &v)| if v > p[best] { i } else { best })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array of ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn check_model(fixture: &str, tol: Tolerance) {
    check_model_with(fixture, tol, Numerics::Native)
}

fn check_model_with(fixture: &str, tol: Tolerance, numerics: Numerics) {
    let Some((fx, model)) = load_with(fixture, numerics) else { return };
    let mut worst = 0.0f64;
    let mut failures = Vec::new();
    let mut step_errs = Vec::new();
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_tokens"]);
        let want = ids(&case["tokens"]);
        let top5 = case["top5"].as_array().expect("top5");
        let mut sess = model.new_session(prompt.len() + want.len() + 1).unwrap();
        let mut logits = model.forward(&mut sess, &prompt, Logits::Last).unwrap();
        let (mut matched, mut case_err) = (0, 0.0f64);
        for (step, &tok) in want.iter().enumerate() {
            assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits at step {step}");
            let p = softmax(&logits);
            let ref5: Vec<(usize, f64)> = top5[step]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap()))
                .collect();
            let step_err = ref5.iter().fold(0.0f64, |m, &(id, pr)| m.max((p[id] - pr).abs()));
            step_errs.push(step_err);
            case_err = case_err.max(step_err);
            let ours = argmax(&p);
            if ours == tok as usize {
                matched += 1;
            } else {
                let margin = ref5[0].1 - ref5[1].1;
                println!(
                    "  {:?} step {step}: pagellm {ours} (p {:.4}) vs llama.cpp {tok} (p {:.4}), llama.cpp top-2 margin {margin:.4}{}",
                    case["prompt"].as_str().unwrap(),
                    p[ours],
                    p[tok as usize],
                    if margin >= STRICT_MARGIN { " (above 0.03)" } else { "" }
                );
                if margin >= MARGIN {
                    failures.push(format!("{:?} step {step}: greedy token differs at margin {margin:.4}", case["prompt"]));
                }
            }
            // teacher forcing: continue with llama.cpp's token so every step stays comparable
            logits = model.forward(&mut sess, &[tok], Logits::Last).unwrap();
        }
        sess.check_invariants();
        if matched < tol.min_matched {
            failures.push(format!("{:?}: only {matched}/{} greedy tokens match", case["prompt"], want.len()));
        }
        println!("{fixture} {:?}: {matched}/{} greedy tokens, max top-5 prob error {case_err:.5}", case["prompt"].as_str().unwrap(), want.len());
        worst = worst.max(case_err);
    }
    step_errs.sort_by(f64::total_cmp);
    let pct = |q: f64| step_errs[((step_errs.len() - 1) as f64 * q).round() as usize];
    let mean = step_errs.iter().sum::<f64>() / step_errs.len() as f64;
    println!("{fixture}: per-step top-5 prob error mean {mean:.4} median {:.4} p90 {:.4} p95 {:.4} max {worst:.4}", pct(0.5), pct(0.9), pct(0.95));
    assert!(failures.is_empty(), "greedy disagreement: {failures:#?}");
    assert!(mean <= tol.mean, "mean top-5 probability error {mean} > {}", tol.mean);
    assert!(pct(0.95) <= tol.p95, "p95 top-5 probability error {} > {}", pct(0.95), tol.p95);
    assert!(worst <= tol.max, "max top-5 probability error {worst} > {}", tol.max);
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model("llama_greedy_smollm2.json", Tolerance { mean: 0.025, p95: 0.08, max: 0.25, min_matched: 29 });
}

/// The issue's bounds, with llama.cpp's float order: every greedy token, top-5 probabilities within
/// 1e-2 at every step (they come out equal: the logits are llama.cpp's bit for bit).
#[test]
fn smollm2_llama_numerics_match_llama_cpp_exactly() {
    check_model_with("llama_greedy_smollm2.json", Tolerance { mean: 0.01, p95: 0.01, max: 0.01, min_matched: 32 }, Numerics::Llama);
}

/// The issue's Gemma-3 bound (0.1), with llama.cpp's float order.
#[test]
fn gemma3_llama_numerics_match_llama_cpp_exactly() {
    check_model_with("llama_greedy_gemma3.json", Tolerance { mean: 0.1, p95: 0.1, max: 0.1, min_matched: 32 }, Numerics::Llama);
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_model("llama_greedy_gemma3.json", Tolerance { mean: 0.035, p95: 0.1, max: 0.35, min_matched: 29 });
}

/// Every CPU kernel table this machine runs gives the same results on both real models (the fixtures'
/// first prompt and 8 teacher-forced steps): the SIMD tables (AVX2, AVX-512 with its Q8_0 repacking)
/// the same logits bit for bit, the scalar one the same greedy tokens and logits to rounding. So the
/// greedy and perplexity checks above hold for each table, not only the detected one.
#[test]
fn every_kernel_table_gives_the_same_logits() {
    use pagellm::backend::cpu::{CpuBackend, Kernels};
    for fixture in ["llama_greedy_smollm2.json", "llama_greedy_gemma3.json"] {
        let Some((fx, _)) = load(fixture) else { continue };
        let file = Arc::new(GgufFile::open(root().join(fx["model"].as_str().unwrap())).unwrap());
        let case = &fx["cases"][0];
        let (prompt, forced) = (ids(&case["prompt_tokens"]), ids(&case["tokens"]));
        let run = |k: Kernels| -> Vec<Vec<f32>> {
            let backend = Arc::new(CpuBackend::new(THREADS, k).unwrap());
            let model = Model::load_on(file.clone(), ModelOptions { ctx: 256, threads: THREADS }, backend).unwrap();
            let mut sess = model.new_session(prompt.len() + 9).unwrap();
            let mut rows = vec![model.forward(&mut sess, &prompt, Logits::Last).unwrap()];
            for &t in &forced[..8] {
                rows.push(model.forward(&mut sess, &[t], Logits::Last).unwrap());
            }
            rows
        };
        // the SIMD tables compute the same bits as each other; the scalar one sums its float dots (f16
        // K/V) in another order, so it agrees to rounding: same greedy token at every step
        let tables = Kernels::all();
        let scalar = run(tables[0]);
        let mut simd: Option<(&str, Vec<Vec<f32>>)> = None;
        for k in &tables[1..] {
            let got = run(*k);
            let worst = got.iter().zip(&scalar).map(|(g, w)| {
                let (d, n) = g.iter().zip(w).fold((0.0f64, 0.0f64), |(d, n), (&a, &b)| (d + (a as f64 - b as f64).powi(2), n + (b as f64).powi(2)));
                (d / n).sqrt()
            }).fold(0.0f64, f64::max);
            let argmax_f = |v: &[f32]| v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b });
            let same_greedy = got.iter().zip(&scalar).all(|(g, w)| argmax_f(g) == argmax_f(w));
            println!("{fixture}: {} vs scalar: logits relative L2 at most {worst:.2e}, greedy tokens {}", k.name(), if same_greedy { "equal" } else { "DIFFER" });
            // (f32 rounding differences grow through the f16 K/V roundings and the layers to 1e-2 relative
            // on SmolLM2 and 6e-2 on Gemma-3: the models' own sensitivity, the same that moves llama.cpp's
            // probabilities with its batching; a broken kernel gives ~1)
            assert!(same_greedy && worst < 0.1, "{fixture}: the {} table strays from the scalar one ({worst:e})", k.name());
            match &simd {
                None => simd = Some((k.name(), got)),
                Some((name, want)) => {
                    let differ: usize = got.iter().zip(want).map(|(g, w)| common::bits_differ(g, w)).sum();
                    println!("{fixture}: {} vs {name}: {differ} logits of 9 steps differ", k.name());
                    assert_eq!(differ, 0, "{fixture}: the {} table's logits differ from the {name} table's", k.name());
                }
            }
        }
    }
}

/// A prompt prefilled whole, in pieces, or one token at a time gives the same logits (batch invariance).
#[test]
fn prefill_split_is_invariant() {
    let Some((fx, model)) = load("llama_greedy_smollm2.json") else { return };
    let prompt = ids(&fx["cases"][2]["prompt_tokens"]);
    let mut whole = model.new_session(64).unwrap();
    let all = model.forward(&mut whole, &prompt, Logits::All).unwrap();
    let n_vocab = model.config().n_vocab;
    assert_eq!(all.len(), prompt.len() * n_vocab);

    let mut split = model.new_session(64).unwrap();
    let mut pieces = Vec::new();
    for part in prompt.chunks(4) {
        pieces.extend(model.forward(&mut split, part, Logits::All).unwrap());
    }
    assert!(all == pieces, "logits depend on how the prompt was split");

    let mut single = model.new_session(64).unwrap();
    let mut last = Vec::new();
    for &t in &prompt {
        last = model.forward(&mut single, &[t], Logits::Last).unwrap();
    }
    assert!(last[..] == all[(prompt.len() - 1) * n_vocab..], "token-by-token logits differ from the batch's");

    // From(i) returns the tail; truncate + re-run reproduces it.
    let mut again = model.new_session(64).unwrap();
    let tail = model.forward(&mut again, &prompt, Logits::From(prompt.len() - 3)).unwrap();
    assert!(tail[..] == all[(prompt.len() - 3) * n_vocab..]);
    again.truncate(prompt.len() - 1);
    again.check_invariants();
    let redo = model.forward(&mut again, &prompt[prompt.len() - 1..], Logits::Last).unwrap();
    assert!(redo[..] == all[(prompt.len() - 1) * n_vocab..]);
}

/// User errors are typed errors, not panics.
#[test]
fn limits_are_errors() {
    let Some((_, model)) = load("llama_greedy_smollm2.json") else { return };
    let mut sess = model.new_session(20).unwrap();
    let cap = sess.capacity();
    let err = model.forward(&mut sess, &vec![1u32; cap + 1], Logits::Last).unwrap_err();
    assert!(matches!(err, ModelError::ContextFull { .. }), "{err}");
    assert!(err.to_string().contains("--ctx"), "{err}");
    assert_eq!(sess.len(), 0);
    let err = model.forward(&mut sess, &[model.config().n_vocab as u32], Logits::Last).unwrap_err();
    assert!(matches!(err, ModelError::BadToken { .. }), "{err}");
    assert!(matches!(model.new_session(100_000), Err(ModelError::SessionTooLarge { .. })));
    model.forward(&mut sess, &[1, 2, 3], Logits::Last).unwrap();
    assert_eq!(sess.len(), 3);
    sess.clear();
    assert_eq!(sess.len(), 0);
    sess.check_invariants();
}

/// A synthetic model (random weights) written to a temporary file and loaded.
fn synthetic(shape: &str, recipe: pagellm::synth::Recipe) -> Model {
    let dir = std::env::temp_dir().join(format!("pagellm-model-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{shape}-{recipe:?}.gguf"));
    pagellm::synth::write_model(&path, pagellm::synth::shape(shape).unwrap(), recipe, 7, |_, _| {}).unwrap();
    let file = Arc::new(GgufFile::open(&path).unwrap());
    std::fs::remove_file(&path).ok();
    Model::load(file, ModelOptions { ctx: 512, threads: THREADS }).unwrap()
}

/// Both architectures run on synthetic weights past gemma3's sliding window (64 in tiny-gemma3), and the
/// logits do not depend on how the tokens were split into calls.
#[test]
fn synthetic_models_are_batch_invariant() {
    use pagellm::dtype::GgmlType;
    use pagellm::synth::Recipe;
    for (shape, recipe) in [("tiny", Recipe::Uniform(GgmlType::Q4_0)), ("tiny-gemma3", Recipe::Q4KM), ("tiny", Recipe::Uniform(GgmlType::F16))] {
        let model = synthetic(shape, recipe);
        let n_vocab = model.config().n_vocab;
        let toks: Vec<u32> = (0..150).map(|i| (i * 37 % (n_vocab - 3) + 3) as u32).collect();
        let mut whole = model.new_session(200).unwrap();
        let all = model.forward(&mut whole, &toks, Logits::All).unwrap();
        assert!(all.iter().all(|v| v.is_finite()), "{shape}: non-finite logits");
        let mut parts = model.new_session(200).unwrap();
        let mut got = Vec::new();
        for chunk in toks[..140].chunks(37) {
            got.extend(model.forward(&mut parts, chunk, Logits::All).unwrap());
        }
        for &t in &toks[140..] {
            got.extend(model.forward(&mut parts, &[t], Logits::All).unwrap());
        }
        assert!(got == all, "{shape} {recipe:?}: logits depend on the split");
        parts.check_invariants();
    }
}

#[test]
fn unknown_architecture_and_missing_tensors_are_errors() {
    use pagellm::gguf::{GgufBuilder, Value};
    let bytes = GgufBuilder::new().kv("general.architecture", Value::String("phi2".into())).to_bytes().unwrap();
    let file = Arc::new(GgufFile::from_bytes(bytes).unwrap());
    let err = Model::load(file, ModelOptions { ctx: 0, threads: 1 }).err().expect("phi2 is refused");
    assert!(matches!(err, ModelError::UnknownArch { .. }), "{err}");
    assert!(err.to_string().contains("llama, mistral, qwen2, qwen3, gemma3"), "{err}");

    let bytes = GgufBuilder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("llama.embedding_length", Value::U32(64))
        .kv("llama.block_count", Value::U32(1))
        .kv("llama.attention.head_count", Value::U32(2))
        .kv("llama.feed_forward_length", Value::U32(128))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .to_bytes()
        .unwrap();
    let file = Arc::new(GgufFile::from_bytes(bytes).unwrap());
    let err = Model::load(file, ModelOptions { ctx: 0, threads: 1 }).err().expect("no tensors");
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
}

/// `Engine::step_greedy` hands back the arg-max of the logits `Engine::step` gives, step after step, for
/// sequences of different lengths prefilled and decoded together (synthetic llama and gemma3 weights).
#[test]
fn step_greedy_gives_the_argmax_of_step() {
    use pagellm::dtype::GgmlType;
    use pagellm::sampling::argmax;
    use pagellm::synth::Recipe;
    for (shape, recipe) in [("tiny", Recipe::Uniform(GgmlType::Q4_0)), ("tiny-gemma3", Recipe::Q4KM)] {
        let model = synthetic(shape, recipe);
        let n_vocab = model.config().n_vocab;
        let prompts: Vec<Vec<u32>> =
            [5usize, 40, 90].iter().map(|&n| (0..n).map(|i| ((i * 31 + n) % (n_vocab - 3) + 3) as u32).collect()).collect();
        let mut engine = pagellm::cli::bench::parallel_engine(model, 2 * prompts.len(), 100).unwrap();
        let mut with_logits: Vec<_> = prompts.iter().map(|p| engine.start_seq(p, None).unwrap()).collect();
        let mut greedy: Vec<_> = prompts.iter().map(|p| engine.start_seq(p, None).unwrap()).collect();
        let mut compared = 0;
        for _ in 0..6 {
            for set in [&mut with_logits, &mut greedy] {
                for s in set.iter_mut() {
                    let n = s.num_pending();
                    assert!(engine.reserve(s, n));
                }
            }
            let mut work: Vec<_> = with_logits.iter_mut().map(|s| {
                let n = s.num_pending();
                (s, n)
            }).collect();
            let out = engine.step(&mut work).unwrap();
            let want: Vec<u32> = (0..work.len()).map(|i| argmax(out.logits(i).unwrap())).collect();
            assert!((0..work.len()).all(|i| out.greedy(i).is_none()), "{shape}: step gave greedy tokens");
            engine.recycle(out);
            let mut work: Vec<_> = greedy.iter_mut().map(|s| {
                let n = s.num_pending();
                (s, n)
            }).collect();
            let out = engine.step_greedy(&mut work).unwrap();
            let got: Vec<u32> = (0..work.len()).map(|i| out.greedy(i).unwrap()).collect();
            assert!((0..work.len()).all(|i| out.logits(i).is_none()), "{shape}: step_greedy gave logits");
            engine.recycle(out);
            assert_eq!(got, want, "{shape}: step_greedy differs from the argmax of step's logits");
            compared += got.len();
            for (set, toks) in [(&mut with_logits, &want), (&mut greedy, &want)] {
                for (s, &t) in set.iter_mut().zip(toks) {
                    s.push(t);
                }
            }
        }
        println!("{shape}: {compared} greedy tokens equal to the argmax of the logits");
        for s in with_logits.into_iter().chain(greedy) {
            engine.free_seq(s);
        }
        engine.check_invariants().unwrap();
    }
}
