//! Time of one default sampling call (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8) over a
//! Llama-3-sized vocabulary: `cargo run --release --example sample_time` (or under
//! `valgrind --tool=callgrind` for instruction counts). A server samples each sequence of a batch on its
//! scheduler thread, so this is paid once per sequence per step.
use std::time::Instant;

use pagellm::sampling::{Sampler, SamplingParams};

fn main() {
    let n = 128_256;
    let mut x: u64 = 12345;
    let base: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 10000) as f32 / 10000.0 - 0.5) * 12.0
        })
        .collect();
    let mut s = Sampler::new(SamplingParams::default());
    let reps = 200;
    let t = Instant::now();
    let mut sum = 0u64;
    for _ in 0..reps {
        let mut l = base.clone();
        sum += u64::from(s.sample(&mut l));
    }
    let per_call = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(base.clone());
    }
    let copy = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("default sampling over {n} logits: {per_call:.3} ms a call, of which {copy:.3} ms copying the logits (token ids sum {sum})");
}
