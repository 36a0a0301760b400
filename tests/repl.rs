//! The chat REPL through the binary (stdin scripted, so plain line mode) and the engine API in process,
//! on the real models: multi-turn chats re-use exactly the cached prefix, give the same replies without
//! the prefix cache, and the commands work.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

use pagellm::cli::generate;
use pagellm::cli::repl::{prompt_ids, Conversation};
use pagellm::engine::{Engine, EngineError, EngineOptions, FinishReason, RETAINED_SEQS};
use pagellm::sampling::{Sampler, SamplingParams};

/// One `[turn N: ...]` stats line.
#[derive(Debug, Clone, PartialEq)]
struct Turn {
    prompt: usize,
    cached: usize,
    prefill: usize,
    reply: usize,
    stop: String,
}

/// The number after `key` in `line` (`"prompt 120 tokens"` -> 120 for key "prompt ").
fn field(line: &str, key: &str) -> usize {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("no '{key}' in {line}")) + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

fn parse_turns(stderr: &str) -> Vec<Turn> {
    stderr
        .lines()
        .filter(|l| l.starts_with("[turn "))
        .map(|l| Turn {
            prompt: field(l, " prompt "),
            cached: field(l, " cached "),
            prefill: field(l, " prefill "),
            reply: field(l, " reply "),
            stop: l[l.find(" stop ").unwrap() + 6..].trim_end_matches(']').to_string(),
        })
        .collect()
}

/// Runs `pagellm run MODEL ARGS` with `script` on stdin; returns (stdout, stderr).
fn run_script(model: &Path, args: &[&str], script: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagellm"))
        .arg("run")
        .arg(model)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap());
    assert!(o.status.success(), "pagellm failed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    (out, err)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pagellm-repl-{}-{name}", std::process::id()))
}

fn read_conv(p: &Path) -> Conversation {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

const TEN_TURNS: [&str; 10] = [
    "Hi!",
    "What is your name?",
    "What is 2+2?",
    "Name a color.",
    "Name a fruit.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "Count to five.",
    "What day comes after Monday?",
    "Thanks, bye!",
];

/// Ten greedy turns: each re-uses exactly the previous prompt + reply tokens that the new rendering
/// repeats, and prefills only the rest; without the prefix cache the replies are byte-identical.
fn ten_turn_chat(rel: &str) {
    let Some(path) = common::model_or_skip(rel) else { return };
    let tag = Path::new(rel).file_stem().unwrap().to_string_lossy().into_owned();
    let (save_cached, save_plain) = (tmp(&format!("{tag}-cached.json")), tmp(&format!("{tag}-plain.json")));
    let script = |save: &Path| format!("{}\n/save {}\n", TEN_TURNS.join("\n"), save.display());
    let args = ["--temp", "0", "-n", "24"];
    let (out, err) = run_script(&path, &args, &script(&save_cached));
    let turns = parse_turns(&err);
    assert_eq!(turns.len(), 10, "{rel}: expected 10 stats lines:\n{err}");
    let conv = read_conv(&save_cached);
    assert_eq!(conv.messages.len(), 20, "{rel}: {conv:?}");

    // The expected counts, from the renderings tokenized with the library.
    let lm = generate::load(&path, 512, 1, None).unwrap();
    let mut held: Vec<u32> = Vec::new(); // what the cache holds after a turn: prompt + reply tokens
    let (mut sum_prompt, mut sum_cached) = (0, 0);
    for (k, t) in turns.iter().enumerate() {
        let asked = Conversation { system: None, messages: conv.messages[..2 * k + 1].to_vec() };
        let ids = prompt_ids(&lm.tokenizer, &lm.template, &asked).unwrap();
        assert_eq!(t.prompt, ids.len(), "{rel} turn {}: prompt tokens", k + 1);
        let want = common_prefix(&held, &ids).min(ids.len() - 1);
        assert_eq!(t.cached, want, "{rel} turn {}: cached tokens (cache held {}, prompt {})", k + 1, held.len(), ids.len());
        assert_eq!(t.prefill, ids.len() - want, "{rel} turn {}", k + 1);
        if k > 0 {
            // At least the previous prompt is repeated by every template here.
            let prev_prompt = turns[k - 1].prompt;
            assert!(t.cached >= prev_prompt, "{rel} turn {}: cached {} < previous prompt {prev_prompt}", k + 1, t.cached);
        }
        // The reply as the model sampled it: its text re-encodes to as many tokens as were sampled
        // (else the expected counts above would rest on other ids than the cache holds).
        let reply = &conv.messages[2 * k + 1];
        assert_eq!(reply.role, "assistant");
        let reply_ids = lm.tokenizer.encode(&reply.content, false, false).unwrap();
        assert_eq!(reply_ids.len(), t.reply, "{rel} turn {}: reply {:?} re-encodes to other tokens", k + 1, reply.content);
        held = [ids, reply_ids].concat();
        sum_prompt += t.prompt;
        sum_cached += t.cached;
    }
    println!("{rel}: 10 turns, {sum_prompt} prompt tokens, {sum_cached} from the cache");

    // The same chat without the prefix cache: every prompt prefilled whole, the same bytes out.
    let (out_plain, err_plain) = run_script(&path, &[&args[..], &["--no-prefix-cache"]].concat(), &script(&save_plain));
    let plain = parse_turns(&err_plain);
    assert!(plain.iter().all(|t| t.cached == 0 && t.prefill == t.prompt), "{rel}: {plain:?}");
    if out != out_plain {
        let other = read_conv(&save_plain);
        let k = conv.messages.iter().zip(&other.messages).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{rel}: replies differ with --no-prefix-cache from turn {} on (prefill is not batch invariant?):\n cached: {:?}\n whole:  {:?}",
            k / 2 + 1,
            conv.messages[k].content,
            other.messages[k].content
        );
    }
    std::fs::remove_file(&save_cached).ok();
    std::fs::remove_file(&save_plain).ok();
}

#[test]
fn ten_turn_chat_reuses_the_prefix_smollm2() {
    ten_turn_chat(common::SMOLLM2);
}

#[test]
fn ten_turn_chat_reuses_the_prefix_gemma3() {
    ten_turn_chat(common::GEMMA3);
}

#[test]
fn commands_save_load_system_clear_and_multiline() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let (a, b, c, m) = (tmp("a.json"), tmp("b.json"), tmp("c.json"), tmp("m.json"));
    let long = "word ".repeat(120);
    let script = [
        "/system You answer in one short sentence.".to_string(),
        "Hi there".into(),
        format!("/save {}", a.display()),
        "/clear".into(),
        "What is 2+2?".into(),
        format!("/save {}", c.display()),
        format!("/load {}", a.display()),
        format!("/save {}", b.display()),
        "/bogus stuff".into(),
        "/stats".into(),
        long,
        "/system".into(),
        "/clear".into(),
        "Tell me \\".into(),
        "a joke".into(),
        "\"\"\"Line one".into(),
        "line two\"\"\"".into(),
        format!("/save {}", m.display()),
        "/exit".into(),
        "Never asked".into(),
    ]
    .join("\n");
    let (out, err) = run_script(&path, &["--temp", "0", "-n", "6", "--ctx", "96"], &script);

    // /system, /save and /load.
    let conv_a = read_conv(&a);
    assert_eq!(conv_a.system.as_deref(), Some("You answer in one short sentence."));
    assert_eq!(conv_a.messages.len(), 2);
    assert_eq!((conv_a.messages[0].role.as_str(), conv_a.messages[0].content.as_str()), ("user", "Hi there"));
    assert_eq!(conv_a.messages[1].role, "assistant");
    assert_eq!(read_conv(&b), conv_a, "/load then /save does not round-trip");
    assert_eq!(std::fs::read_to_string(&b).unwrap(), std::fs::read_to_string(&a).unwrap());
    // /clear keeps the system message and starts over.
    let conv_c = read_conv(&c);
    assert_eq!(conv_c.system, conv_a.system);
    assert_eq!(conv_c.messages.len(), 2);
    assert_eq!(conv_c.messages[0].content, "What is 2+2?");

    // An unknown command gets one line with a hint.
    let hint: Vec<&str> = err.lines().filter(|l| l.contains("/bogus")).collect();
    assert_eq!(hint.len(), 1, "{err}");
    assert!(hint[0].contains("/help"), "{}", hint[0]);
    assert!(err.contains("hit rate"), "/stats printed nothing:\n{err}");
    // A conversation too long for --ctx: one error line naming the flag; the REPL goes on.
    let too_long: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(too_long.len(), 1, "{err}");
    assert!(too_long[0].contains("--ctx") && too_long[0].contains("/clear"), "{}", too_long[0]);

    // Multi-line input; /system alone removes the message; /exit leaves before "Never asked".
    let conv_m = read_conv(&m);
    assert_eq!(conv_m.system, None);
    let users: Vec<&str> = conv_m.messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    assert_eq!(users, ["Tell me \na joke", "Line one\nline two"]);
    let turns = parse_turns(&err);
    assert_eq!(turns.len(), 4, "{err}");
    assert!(!out.trim().is_empty(), "no replies on stdout");
    for p in [a, b, c, m] {
        std::fs::remove_file(p).ok();
    }
}

/// The engine API in process: prefix re-use, batch invariance at the token level, stop conditions.
#[test]
fn engine_reuses_prefix_and_stops() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let load = |prefix_cache| {
        let lm = generate::load(&path, 256, 2, None).unwrap();
        let eog = lm.tokenizer.eog_ids().to_vec();
        (Engine::new(lm.model, eog, EngineOptions { ctx: 256, prefix_cache, budget: None }).unwrap(), lm.tokenizer)
    };
    let (mut eng, tok) = load(true);
    let (mut whole, _) = load(false);
    let no = AtomicBool::new(false);
    let greedy = |e: &mut Engine, prompt: &[u32], max: usize| {
        let mut s = Sampler::new(SamplingParams::greedy());
        e.generate(prompt, &mut s, max, &no, &mut |_| true).unwrap()
    };

    let prompt = tok.encode("The capital of France is Paris. The capital of Italy is", false, false).unwrap();
    let n = prompt.len();
    let g1 = greedy(&mut eng, &prompt, 8);
    assert_eq!((g1.cached_tokens, g1.tokens.len(), g1.finish), (0, 8, FinishReason::Length));
    // The same prompt again: all but the last token come from the cache, the same tokens out.
    let g2 = greedy(&mut eng, &prompt, 8);
    assert_eq!((g2.cached_tokens, &g2.tokens), (n - 1, &g1.tokens));
    // Prompt + reply: the whole reply was run, so everything but the last token is cached, and the
    // continuation equals the one computed from scratch.
    let next = [&prompt[..], &g1.tokens].concat();
    let g3 = greedy(&mut eng, &next, 12);
    assert_eq!(g3.cached_tokens, next.len() - 1);
    let g3_whole = greedy(&mut whole, &next, 12);
    assert_eq!(g3_whole.cached_tokens, 0);
    assert_eq!(g3.tokens, g3_whole.tokens, "prefix + suffix and whole prefill disagree");
    // A prompt that diverges midway re-uses up to the divergence.
    let mut fork = prompt.clone();
    fork[n - 3] = tok.encode(" Spain", false, false).unwrap()[0];
    assert_eq!(greedy(&mut eng, &fork, 2).cached_tokens, n - 3);

    let s = eng.stats();
    assert_eq!(s.block_size, 16);
    assert_eq!(s.total_blocks, 16);
    assert_eq!(s.queried_tokens, (3 * n + next.len()) as u64);
    assert_eq!(s.hit_tokens, (n - 1 + next.len() - 1 + n - 3) as u64);
    // Held blocks: the last sequence (n + 2 tokens) and the other retained ones, never more than those.
    assert!(s.used_blocks >= (n + 2).div_ceil(16), "{s:?}");
    assert!(s.used_blocks <= RETAINED_SEQS * (next.len() + 12).div_ceil(16), "{s:?}");
    eng.check_invariants().unwrap();
    assert_eq!(whole.stats().hit_tokens, 0);

    // on_token returning false stops after that token; a set cancel flag stops before the first.
    let mut s = Sampler::new(SamplingParams::greedy());
    let g = eng.generate(&prompt, &mut s, 8, &no, &mut |_| false).unwrap();
    assert_eq!((g.tokens.len(), g.finish), (1, FinishReason::Stop));
    let yes = AtomicBool::new(true);
    let g = eng.generate(&prompt, &mut s, 8, &yes, &mut |_| true).unwrap();
    assert_eq!((g.tokens.len(), g.finish), (0, FinishReason::Cancelled));
    assert_eq!(greedy(&mut eng, &prompt, 0).finish, FinishReason::Length);

    // Typed errors: too long for the context (naming the flag), empty.
    let long = vec![prompt[0]; 256];
    let e = eng.generate(&long, &mut s, 8, &no, &mut |_| true).unwrap_err();
    assert!(matches!(e, EngineError::PromptTooLong { n_prompt: 256, ctx: 256, .. }));
    assert!(e.to_string().contains("--ctx"), "{e}");
    assert!(matches!(eng.generate(&[], &mut s, 8, &no, &mut |_| true), Err(EngineError::EmptyPrompt)));

    // clear_cache: nothing is re-used afterwards.
    eng.clear_cache();
    assert_eq!(eng.stats().used_blocks, 0);
    assert_eq!(greedy(&mut eng, &prompt, 1).cached_tokens, 0);
}
