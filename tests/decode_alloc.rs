//! No allocation on the decode hot path: a global allocator counts heap allocations between two tokens
//! of a greedy generation on the real models (CPU backend). After a few warm-up steps the forward pass
//! allocates nothing (its buffers and the attention and RoPE scratch are kept between calls); what is
//! left per step is the engine's: the step's positions and slot mapping (the logits row handed to the
//! sampler is written into the last step's), and now and then the reply's token list growing. Over the bound, the test prints where
//! the worst step's allocations came from (before the scratch was kept: ~1,600 to 2,100 a step).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use pagellm::cli::generate;
use pagellm::engine::{Engine, EngineOptions, PoolOptions};
use pagellm::sampling::{Sampler, SamplingParams};

mod common;

/// Allocations of the engine per decode step: positions, slot mapping.
const ENGINE_PER_STEP: usize = 2;
/// More than that, over all counted steps together: the reply's token list doubling its capacity, and
/// the one-time scratch (~15-20 allocations) of a worker thread that rayon hands its first task of a
/// kind late. One allocation more than `ENGINE_PER_STEP` every step exceeds it (84 counted steps: the
/// logits row, before it was re-used, was such a one); before the scratch was kept, a step made ~1,700.
const GROWTH: usize = 64;
/// Steps before counting: buffers grow to their working size, and each worker thread takes its scratch
/// the first time the scheduler hands it a task of each kind (a one-row RoPE runs on one worker; which
/// one is rayon's choice, so a late first task can still come after these steps: see `GROWTH`).
const WARM_UP: usize = 16;
/// Steps generated: they cross several 16-token blocks (block tables and key lists grow), and count
/// more steps after the warm-up than `GROWTH`.
const STEPS: usize = 100;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// While set, every allocation records the first pagellm frames of its backtrace in `SITES`.
static TRACE: AtomicBool = AtomicBool::new(false);
static SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());
thread_local!(static IN_TRACE: Cell<bool> = const { Cell::new(false) });

fn record() {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    if !TRACE.load(Ordering::Relaxed) || IN_TRACE.with(|t| t.replace(true)) {
        return;
    }
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let site: Vec<&str> = bt.lines().filter(|l| l.contains("pagellm::")).map(str::trim).take(3).collect();
    SITES.lock().unwrap().push(site.join(" <- "));
    IN_TRACE.with(|t| t.set(false));
}

// SAFETY: forwards to the system allocator unchanged; the counter and the trace (which allocates, but
// never re-enters itself on the same thread) are side records.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        record();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        record();
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations of each step of a `steps`-token greedy generation; with `trace_step`, that step's sites.
fn per_step(path: &std::path::Path, steps: usize, trace_step: Option<usize>) -> Vec<usize> {
    let lm = generate::load(path, 2048, 2, None).unwrap();
    // no end-of-generation ids: every step runs (like --ignore-eos)
    let opts = EngineOptions { ctx: 2048, prefix_cache: true, budget: None };
    let mut engine = Engine::with_pool(lm.model, Vec::new(), opts, PoolOptions { kv_mem_bytes: 0, block_size: 0 }).unwrap();
    let ids = lm.tokenizer.encode("Once upon a time, in a small village by the sea, there lived", true, false).unwrap();
    let mut s = Sampler::new(SamplingParams::greedy());
    let mut counts = Vec::new();
    let mut last = ALLOCS.load(Ordering::Relaxed);
    let mut on_token = |_: u32| {
        let now = ALLOCS.load(Ordering::Relaxed);
        counts.push(now - last);
        TRACE.store(trace_step == Some(counts.len()), Ordering::Relaxed);
        last = ALLOCS.load(Ordering::Relaxed);
        true
    };
    engine.generate(&ids, &mut s, steps, &AtomicBool::new(false), &mut on_token).unwrap();
    TRACE.store(false, Ordering::Relaxed);
    counts
}

#[test]
fn decode_steps_allocate_nothing_in_the_forward_pass() {
    for rel in [common::SMOLLM2, common::GEMMA3] {
        let Some(path) = common::model_or_skip(rel) else { continue };
        let counts = per_step(&path, STEPS, None);
        println!("{rel}: allocations per decode step: {counts:?}");
        assert_eq!(counts.len(), STEPS, "{rel}: not every step ran");
        let extra: Vec<usize> = counts.iter().skip(WARM_UP).map(|&c| c.saturating_sub(ENGINE_PER_STEP)).collect();
        let total: usize = extra.iter().sum();
        if total > GROWTH {
            let step = WARM_UP + (0..extra.len()).max_by_key(|&i| extra[i]).unwrap();
            SITES.lock().unwrap().clear();
            per_step(&path, step + 1, Some(step));
            let mut by_site = BTreeMap::new();
            for s in SITES.lock().unwrap().iter() {
                *by_site.entry(s.clone()).or_insert(0) += 1;
            }
            for (site, c) in by_site {
                println!("{c:6} {site}");
            }
            panic!("{rel}: {total} allocations beyond the engine's {ENGINE_PER_STEP} per step (bound {GROWTH}); step {step}'s sites above");
        }
    }
}
