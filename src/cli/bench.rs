//! `pagellm bench`: prompt processing (pp) and text generation (tg) throughput, measured like llama-bench:
//! pp = one forward over `n_prompt` random tokens from an empty cache; tg = `n_gen` single-token steps
//! from an empty cache. Each test runs once to warm up, then `reps` times; mean and standard deviation.
//! With a depth `d > 0` (llama-bench's `-d`) each test starts from a cache already holding `d` random
//! tokens (prefilled in chunks of 512, untimed) and is named like llama-bench's: "tg128 @ d4096".

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{Logits, Model};

#[derive(Serialize, Debug, Clone)]
pub struct BenchRow {
    /// "pp512", "tg128", "tg128 @ d4096"
    pub test: String,
    /// Tokens in the cache before the test.
    pub depth: usize,
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
        rows.push(BenchRow { test, depth, n_tokens: n, threads, samples_ts: samples, avg_ts: avg, stddev_ts: sd });
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

/// llama-bench's table.
pub fn render(model_name: &str, rows: &[BenchRow]) -> String {
    let mut s = format!("| {:<40} | {:>7} | {:>8} | {:>20} |\n| {:-<40} | {:->7} | {:->8} | {:->20} |\n", "model", "threads", "test", "t/s", "", "", "", "");
    for r in rows {
        s += &format!("| {:<40} | {:>7} | {:>8} | {:>20} |\n", model_name, r.threads, r.test, format!("{:.2} ± {:.2}", r.avg_ts, r.stddev_ts));
    }
    s
}
