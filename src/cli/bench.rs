//! `pagellm bench`: prompt processing (pp) and text generation (tg) throughput, measured like llama-bench:
//! pp = one forward over `n_prompt` random tokens from an empty cache; tg = `n_gen` single-token steps
//! from an empty cache. Each test runs once to warm up, then `reps` times; mean and standard deviation.
//! With a depth `d > 0` (llama-bench's `-d`) each test starts from a cache already holding `d` random
//! tokens (prefilled in chunks of 512, untimed) and is named like llama-bench's: "tg128 @ d4096".
//!
//! With `--parallel N > 1` ([`run_parallel`], llama-batched-bench's S_PP and S_TG for one parallel
//! level) N sequences run side by side through the engine's batched API over one shared KV pool:
//! ```text
//! start_seq x N      N distinct prompts of n_prompt tokens, no prefix cache: nothing is shared
//! prefill            steps of at most UBATCH prompt tokens          pp = N * n_prompt / seconds
//! decode x n_gen     ONE step runs one token of each of the N       tg = N * n_gen / seconds
//!                    sequences; each next token is its own argmax
//! free_seq x N       so the next repetition starts from an empty pool
//! ```
//! Never stops on an end-of-generation token: every sequence runs `n_gen` steps.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::engine::{Engine, EngineError, EngineOptions, PoolOptions, Sequence};
use crate::gguf::GgufFile;
use crate::kv::{KvStorage, DEFAULT_BLOCK_SIZE};
use crate::model::{Logits, Model, UBATCH};
use crate::tokenizer::Tokenizer;

#[derive(Serialize, Debug, Clone)]
pub struct BenchRow {
    /// "pp512", "tg128", "tg128 @ d4096"
    pub test: String,
    /// Tokens in the cache before the test.
    pub depth: usize,
    /// Sequences decoded side by side (`--parallel`); 1: one sequence.
    pub parallel: usize,
    /// Tokens timed per repetition, over all sequences.
    pub n_tokens: usize,
    pub threads: usize,
    pub samples_ts: Vec<f64>,
    pub avg_ts: f64,
    pub stddev_ts: f64,
}

fn stats(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 { samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

fn random_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..n_vocab as u32)).collect()
}

/// Time pp (when `n_prompt > 0`) and tg (when `n_gen > 0`), each after `depth` tokens of context.
pub fn run(model: &Model, n_prompt: usize, n_gen: usize, depth: usize, reps: usize, threads: usize) -> Result<Vec<BenchRow>, crate::model::ModelError> {
    let n_vocab = model.config().n_vocab;
    let mut sess = model.new_session(depth + n_prompt.max(n_gen).max(1))?;
    let context = random_tokens(depth, n_vocab, 3);
    let mut rows = Vec::new();
    let mut row = |test: String, n: usize, samples: Vec<f64>| {
        let (avg, sd) = stats(&samples);
        let test = if depth > 0 { format!("{test} @ d{depth}") } else { test };
        rows.push(BenchRow { test, depth, parallel: 1, n_tokens: n, threads, samples_ts: samples, avg_ts: avg, stddev_ts: sd });
    };
    // pp feeds the prompt in one forward; tg feeds one token per forward. Both start from a cache of
    // `depth` tokens.
    for (prefix, n, step, seed) in [("pp", n_prompt, n_prompt, 1), ("tg", n_gen, 1, 2)] {
        if n == 0 {
            continue;
        }
        let toks = random_tokens(n, n_vocab, seed);
        let mut samples = Vec::new();
        for rep in 0..=reps {
            sess.clear();
            for chunk in context.chunks(512) {
                model.forward(&mut sess, chunk, Logits::Last)?;
            }
            let t = Instant::now();
            for chunk in toks.chunks(step) {
                model.forward(&mut sess, chunk, Logits::Last)?;
            }
            if rep > 0 {
                samples.push(n as f64 / t.elapsed().as_secs_f64());
            }
        }
        row(format!("{prefix}{n}"), n, samples);
    }
    Ok(rows)
}

/// Token ids that are neither control nor end-of-generation tokens (all of them when the file has no
/// tokenizer this build reads): what the parallel prompts are drawn from.
pub fn plain_ids(file: &GgufFile, n_vocab: usize) -> Vec<u32> {
    let tok = Tokenizer::from_gguf(file).ok();
    (0..n_vocab as u32).filter(|&id| tok.as_ref().is_none_or(|t| !t.is_control(id) && !t.is_eog(id))).collect()
}

/// `n_parallel` prompts of `n_prompt` tokens from `ids`, sequence `i`'s drawn with seed `100 + i`.
pub fn parallel_prompts(n_parallel: usize, n_prompt: usize, ids: &[u32]) -> Vec<Vec<u32>> {
    (0..n_parallel)
        .map(|i| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i as u64);
            (0..n_prompt).map(|_| ids[rng.gen_range(0..ids.len())]).collect()
        })
        .collect()
}

/// Why [`parallel_engine`] has no engine.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error("{n_parallel} sequences of {seq_tokens} tokens need a KV pool larger than memory can address: pass a smaller --parallel, -p or -n")]
    PoolOverflow { n_parallel: usize, seq_tokens: usize },
    #[error("no KV pool for {n_parallel} sequences of {seq_tokens} tokens ({mib} MiB): {source}: pass a smaller --parallel, -p or -n")]
    Pool { n_parallel: usize, seq_tokens: usize, mib: usize, source: EngineError },
}

/// An engine whose pool holds exactly `n_parallel` sequences of `seq_tokens` tokens each, no prefix
/// cache, no end-of-generation stop. The model must be loaded with a context of `seq_tokens` or more.
pub fn parallel_engine(model: Model, n_parallel: usize, seq_tokens: usize) -> Result<Engine, ParallelError> {
    let block_size = DEFAULT_BLOCK_SIZE;
    let per_block = KvStorage::bytes_per_block(model.config().n_layers, model.kv_shape(1, block_size));
    let kv_mem_bytes = seq_tokens
        .div_ceil(block_size)
        .checked_mul(n_parallel)
        .and_then(|blocks| blocks.checked_mul(per_block))
        .ok_or(ParallelError::PoolOverflow { n_parallel, seq_tokens })?;
    let opts = EngineOptions { ctx: seq_tokens, prefix_cache: false, budget: None };
    Engine::with_pool(model, Vec::new(), opts, PoolOptions { kv_mem_bytes, block_size })
        .map_err(|source| ParallelError::Pool { n_parallel, seq_tokens, mib: kv_mem_bytes.div_ceil(1 << 20), source })
}

/// One batched run's timings and greedy tokens.
pub struct BatchRun {
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Per sequence: the `n_gen + 1` tokens picked (one from the prompt's logits, one per decode step).
    pub tokens: Vec<Vec<u32>>,
}

/// Prefills `prompts` side by side, then runs `n_gen` decode steps of one token per sequence each;
/// frees every sequence at the end (also on error).
pub fn decode_batch(engine: &mut Engine, prompts: &[Vec<u32>], n_gen: usize) -> Result<BatchRun, EngineError> {
    let mut seqs = Vec::with_capacity(prompts.len());
    let res = decode_seqs(engine, prompts, n_gen, &mut seqs);
    let tokens = seqs.iter().map(|s| s.tokens()[s.prompt_len()..].to_vec()).collect();
    for seq in seqs {
        engine.free_seq(seq);
    }
    let (prefill_secs, decode_secs) = res?;
    Ok(BatchRun { prefill_secs, decode_secs, tokens })
}

/// [`decode_batch`]'s steps, the sequences left in `seqs` for the caller to free.
fn decode_seqs(engine: &mut Engine, prompts: &[Vec<u32>], n_gen: usize, seqs: &mut Vec<Sequence>) -> Result<(f64, f64), EngineError> {
    // Prefill: prompts in order, at most UBATCH tokens a step (the scheduler's token budget); a
    // sequence whose last prompt token ran picks its first token.
    let t = Instant::now();
    for p in prompts {
        seqs.push(engine.start_seq(p, None)?);
    }
    let mut next = 0; // the first sequence whose prompt is not yet computed
    while next < seqs.len() {
        let mut budget = UBATCH;
        let mut work = Vec::new();
        for seq in seqs[next..].iter_mut() {
            if budget == 0 {
                break;
            }
            let n = seq.num_pending().min(budget);
            reserve(engine, seq, n)?;
            budget -= n;
            work.push((seq, n));
        }
        step_and_pick(engine, &mut work)?;
        next = seqs.iter().position(|s| s.num_computed() < s.prompt_len()).unwrap_or(seqs.len());
    }
    let prefill_secs = t.elapsed().as_secs_f64();
    // Decode: one token of every sequence per step.
    let t = Instant::now();
    for _ in 0..n_gen {
        for seq in seqs.iter_mut() {
            reserve(engine, seq, 1)?;
        }
        let mut work: Vec<_> = seqs.iter_mut().map(|s| (s, 1)).collect();
        step_and_pick(engine, &mut work)?;
    }
    Ok((prefill_secs, t.elapsed().as_secs_f64()))
}

/// Slots for `n` tokens of `seq`; the pool was sized for every sequence, so a refusal is an error.
fn reserve(engine: &mut Engine, seq: &mut Sequence, n: usize) -> Result<(), EngineError> {
    if engine.reserve(seq, n) {
        return Ok(());
    }
    let st = engine.stats();
    Err(EngineError::PoolExhausted { need: (seq.num_computed() + n).div_ceil(st.block_size), num_blocks: st.total_blocks, block_size: st.block_size })
}

/// One engine step; each sequence whose chunk reached its end gets its greedy next token, picked where
/// the logits are ([`Engine::step_greedy`]: on a GPU, one integer a sequence comes back, not its logits;
/// host picking was 1.3 ms of a 64-sequence step on the H200, plus the 33 MB copy).
fn step_and_pick(engine: &mut Engine, work: &mut [(&mut Sequence, usize)]) -> Result<(), EngineError> {
    let out = engine.step_greedy(work)?;
    for (i, (seq, _)) in work.iter_mut().enumerate() {
        if let Some(token) = out.greedy(i) {
            seq.push(token);
        }
    }
    engine.recycle(out);
    Ok(())
}

/// `--parallel N`: pp over N prompts of `n_prompt` tokens, tg over `n_gen` steps of N tokens; one
/// warm-up, then `reps` timed repetitions (module doc). Needs `n_prompt >= 1`.
pub fn run_parallel(engine: &mut Engine, prompts: &[Vec<u32>], n_gen: usize, reps: usize, threads: usize) -> Result<Vec<BenchRow>, EngineError> {
    let (n_parallel, n_prompt) = (prompts.len(), prompts.first().map_or(0, Vec::len));
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    let mut decode = 0.0;
    for rep in 0..=reps {
        let run = decode_batch(engine, prompts, n_gen)?;
        if rep > 0 {
            pp.push((n_parallel * n_prompt) as f64 / run.prefill_secs);
            tg.push((n_parallel * n_gen) as f64 / run.decode_secs);
            decode += run.decode_secs;
        }
    }
    if n_gen > 0 && decode > 0.0 {
        let step_ms = 1e3 * decode / (reps * n_gen) as f64;
        eprintln!("tg x{n_parallel}: {step_ms:.2} ms per step");
    }
    let row = |test: String, n: usize, samples: Vec<f64>| {
        let (avg_ts, stddev_ts) = stats(&samples);
        BenchRow { test, depth: 0, parallel: n_parallel, n_tokens: n, threads, samples_ts: samples, avg_ts, stddev_ts }
    };
    let mut rows = vec![row(format!("pp{n_prompt} x{n_parallel}"), n_parallel * n_prompt, pp)];
    if n_gen > 0 {
        rows.push(row(format!("tg{n_gen} x{n_parallel}"), n_parallel * n_gen, tg));
    }
    Ok(rows)
}

/// llama-bench's table.
pub fn render(model_name: &str, rows: &[BenchRow]) -> String {
    let mut s = format!("| {:<40} | {:>7} | {:>8} | {:>20} |\n| {:-<40} | {:->7} | {:->8} | {:->20} |\n", "model", "threads", "test", "t/s", "", "", "", "");
    for r in rows {
        s += &format!("| {:<40} | {:>7} | {:>8} | {:>20} |\n", model_name, r.threads, r.test, format!("{:.2} ± {:.2}", r.avg_ts, r.stddev_ts));
    }
    s
}
