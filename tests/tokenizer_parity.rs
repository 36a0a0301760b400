//! Tokenizer parity with llama.cpp on the real models (oracle: tests/fixtures/gen_tokenizer.py, which
//! runs llama-cpp-python). For every fixture string and flag combination: the ids must equal llama.cpp's,
//! `decode` of our ids must equal llama.cpp's `llama_detokenize`, and the streaming decoder must give the
//! same text as `decode`. Variant fixtures rerun a real vocab under another `tokenizer.ggml.pre` or
//! `add_space_prefix`, with the same metadata overrides the generator gave llama.cpp.
//!
//! A missing model skips (prints why) unless `CI` is set, where it fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use pagellm::gguf::{string_array, GgufBuilder, GgufFile, Value};
use pagellm::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    overrides: BTreeMap<String, serde_json::Value>,
    n_vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    cases: Vec<Case>,
    pieces: Vec<Piece>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct Run {
    add_special: bool,
    parse_special: bool,
    ids: Vec<u32>,
    detok: String,
    detok_special: String,
}

#[derive(Deserialize)]
struct Piece {
    id: u32,
    plain: String,
    special: String,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load_fixture(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The model file, or `None` (after printing why) when it is absent outside CI.
fn open_model(rel: &str) -> Option<GgufFile> {
    let path = root().join(rel);
    if !path.exists() {
        if std::env::var_os("CI").is_some() {
            panic!("{rel} missing and CI is set (run models/fetch.sh)");
        }
        println!("skipped: {rel} missing (run models/fetch.sh)");
        return None;
    }
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{rel}: {e}")))
}

/// The model's metadata with some keys replaced, as an in-memory GGUF without tensors.
fn with_overrides(file: &GgufFile, overrides: &BTreeMap<String, serde_json::Value>) -> GgufFile {
    let mut b = GgufBuilder::new();
    for (key, value) in &file.metadata {
        let value = match overrides.get(key) {
            Some(serde_json::Value::String(s)) => Value::String(s.clone()),
            Some(serde_json::Value::Bool(v)) => Value::Bool(*v),
            Some(other) => panic!("override {key} = {other}: only strings and bools are supported"),
            None => value.clone(),
        };
        b = b.kv(key, value);
    }
    GgufFile::from_bytes(b.to_bytes().unwrap()).unwrap()
}

fn stream_decode(tok: &Tokenizer, ids: &[u32], special: bool) -> String {
    let mut dec = StreamDecoder::new(tok).with_special(special);
    let mut out: String = ids.iter().map(|&id| dec.push(id)).collect();
    out.push_str(&dec.flush());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check the committed fixture `tests/fixtures/tokenize_{name}.json`.
fn check(name: &str) {
    check_file(name, &root().join(format!("tests/fixtures/tokenize_{name}.json")));
}

/// Check one fixture file; panics listing every mismatch.
fn check_file(name: &str, path: &Path) {
    let fx = load_fixture(path);
    let Some(file) = open_model(&fx.model) else { return };
    let file = if fx.overrides.is_empty() { file } else { with_overrides(&file, &fx.overrides) };
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
    let load = t0.elapsed();

    let mut failures = check_meta(&tok, &fx);
    let t0 = Instant::now();
    let mut strings_ok = 0;
    for case in &fx.cases {
        let before = failures.len();
        for run in &case.runs {
            check_run(&tok, &case.text, run, &mut failures);
        }
        strings_ok += usize::from(failures.len() == before);
    }
    let run_time = t0.elapsed();
    for p in &fx.pieces {
        let (plain, special) = (hex(tok.piece(p.id, false)), hex(&tok.token_to_piece(p.id)));
        if plain != p.plain || special != p.special {
            let text = tok.token_text(p.id);
            failures.push(format!("piece of {} ({text:?}): {plain} / {special}, llama.cpp {} / {}", p.id, p.plain, p.special));
        }
    }

    println!(
        "{name}: {strings_ok}/{} strings match llama.cpp ({} flag combinations each), {} pieces checked; \
         load {load:.2?}, encode+decode of all cases {run_time:.2?}",
        fx.cases.len(),
        fx.cases.first().map_or(0, |c| c.runs.len()),
        fx.pieces.len()
    );
    let shown = failures.iter().take(50).cloned().collect::<Vec<_>>().join("\n  ");
    assert!(failures.is_empty(), "{name}: {} mismatches with llama.cpp (first 50):\n  {shown}", failures.len());
}

/// Special ids, flags and the end-of-generation set.
fn check_meta(tok: &Tokenizer, fx: &Fixture) -> Vec<String> {
    let meta = [
        ("n_vocab", tok.n_vocab() == fx.n_vocab),
        ("bos", Some(tok.bos_id()) == fx.bos),
        ("eos", Some(tok.eos_id()) == fx.eos),
        ("eot", tok.eot_id() == fx.eot),
        ("add_bos", tok.add_bos() == fx.add_bos),
        ("add_eos", tok.add_eos() == fx.add_eos),
        ("eog", tok.eog_ids() == fx.eog.as_slice()),
        ("is_eog", (0..fx.n_vocab as u32).all(|id| tok.is_eog(id) == fx.eog.contains(&id))),
    ];
    meta.iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| format!("{what} differs: {tok:?} eog {:?}; llama.cpp eog {:?} eot {:?}", tok.eog_ids(), fx.eog, fx.eot))
        .collect()
}

/// One string under one flag combination: ids, decode, detokenize with specials, streaming.
fn check_run(tok: &Tokenizer, text: &str, run: &Run, failures: &mut Vec<String>) {
    let flags = format!("add_special={} parse_special={}", run.add_special, run.parse_special);
    let ours = match tok.encode(text, run.add_special, run.parse_special) {
        Ok(ids) => ids,
        Err(e) => return failures.push(format!("{text:?} ({flags}): encode failed: {e}")),
    };
    if ours != run.ids {
        failures.push(format!("{text:?} ({flags}):\n    llama.cpp {:?}\n    pagellm   {ours:?}", run.ids));
    }
    let decoded = tok.decode(&ours);
    if decoded != run.detok {
        failures.push(format!("{text:?} ({flags}): decode {decoded:?}, llama.cpp {:?}", run.detok));
    }
    let special = String::from_utf8_lossy(&tok.detokenize(&ours, false, true)).into_owned();
    if special != run.detok_special {
        failures.push(format!("{text:?} ({flags}): detokenize(special) {special:?}, llama.cpp {:?}", run.detok_special));
    }
    for (sp, whole) in [(false, &decoded), (true, &special)] {
        let streamed = stream_decode(tok, &ours, sp);
        if &streamed != whole {
            failures.push(format!("{text:?} ({flags}): streamed(special={sp}) {streamed:?} != whole {whole:?}"));
        }
    }
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check("gemma3");
}

#[test]
fn llama3_pre_tokenizer_matches_llama_cpp() {
    check("smollm2_llama3");
}

#[test]
fn qwen2_pre_tokenizer_matches_llama_cpp() {
    check("smollm2_qwen2");
}

#[test]
fn gpt2_pre_tokenizer_and_clean_spaces_match_llama_cpp() {
    check("smollm2_gpt2");
}

#[test]
fn spm_space_prefix_matches_llama_cpp() {
    check("gemma3_spaceprefix");
}

/// Random strings written by `gen_tokenizer.py --fuzz N --out DIR`; run with PAGELLM_TOKENIZER_FUZZ=DIR.
#[test]
#[ignore = "needs PAGELLM_TOKENIZER_FUZZ=DIR from gen_tokenizer.py --fuzz"]
fn fuzz_matches_llama_cpp() {
    let dir = std::env::var("PAGELLM_TOKENIZER_FUZZ").expect("set PAGELLM_TOKENIZER_FUZZ to the --out folder");
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for path in names.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        check_file(&path.file_stem().unwrap().to_string_lossy(), path);
    }
}

/// A tiny gpt2 vocab (no model file needed) with the given pre-tokenizer.
fn tiny_bpe(model: &str, pre: Option<&str>) -> Result<Tokenizer, TokenizerError> {
    let mut b = GgufBuilder::new()
        .kv("tokenizer.ggml.model", Value::String(model.into()))
        .kv("tokenizer.ggml.tokens", string_array(["a", "b", "ab", "<|end|>"]))
        .kv("tokenizer.ggml.merges", string_array(["a b"]))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(3))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(3));
    if let Some(pre) = pre {
        b = b.kv("tokenizer.ggml.pre", Value::String(pre.into()));
    }
    Tokenizer::from_gguf(&GgufFile::from_bytes(b.to_bytes().unwrap()).unwrap())
}

#[test]
fn unknown_types_are_refused_with_the_supported_list() {
    let err = tiny_bpe("gpt2", Some("made-up")).unwrap_err().to_string();
    assert!(err.contains("'made-up'") && err.contains("smollm") && err.contains("llama-bpe") && err.contains("qwen2"), "{err}");
    let err = tiny_bpe("gpt2", None).unwrap_err().to_string();
    assert!(err.contains("(missing)") && err.contains("smollm"), "{err}");
    let err = tiny_bpe("t5", Some("default")).unwrap_err().to_string();
    assert!(err.contains("'t5'") && err.contains("gpt2") && err.contains("llama"), "{err}");
    let tok = tiny_bpe("gpt2", Some("gpt-2")).unwrap();
    assert_eq!(tok.encode("abab", false, false).unwrap(), vec![2, 2]);
    assert!(tok.is_eog(3));
}

/// Characters split over byte tokens come out whole, and never before their last byte.
#[test]
fn stream_decoder_holds_incomplete_characters() {
    let Some(file) = open_model("models/gemma-3-270m-q4_k_m.gguf") else { return };
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let byte = |b: u8| tok.token_id(&format!("<0x{b:02X}>")).unwrap();
    let mut dec = tok.stream_decoder();
    // "é" = C3 A9, "🦙" = F0 9F A6 99.
    assert_eq!(dec.push(byte(0xC3)), "");
    assert_eq!(dec.push(byte(0xA9)), "é");
    for b in [0xF0, 0x9F, 0xA6] {
        assert_eq!(dec.push(byte(b)), "");
    }
    assert_eq!(dec.push(byte(0x99)), "🦙");
    assert_eq!(dec.push(byte(0xF0)), "");
    assert_eq!(dec.flush(), "\u{FFFD}", "an unfinished character at the end is one U+FFFD, as from_utf8_lossy");
}
