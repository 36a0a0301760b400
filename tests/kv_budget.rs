//! KV budget policies in the engine, on the real SmolLM2 (and Gemma-3's sliding windows):
//! - a budget at or above the sequence's length changes no bit (logits of every position, greedy tokens);
//! - a sequence that evicts and compacts never touches another sequence's blocks: it shares a cached
//!   prefix with others, and afterwards that prefix still gives exactly the logits of a fresh engine;
//! - its blocks stay bounded by the budget however long it runs, and the pool's invariants hold after
//!   every step.
//!
//! (Which tokens each policy keeps: the unit tests of kv/budget.rs; the probabilities H2O accumulates
//! against a naive recomputation: tests/kv_budget_attention.rs.)

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use pagellm::cli::generate;
use pagellm::engine::{Engine, EngineOptions, Sequence};
use pagellm::kv::{KvBudget, KvPolicy};
use pagellm::sampling::{argmax, Sampler, SamplingParams};

fn engine(path: &Path, ctx: usize, prefix_cache: bool, budget: Option<KvBudget>) -> Engine {
    let lm = generate::load(path, ctx, 2, None).unwrap();
    let eog = lm.tokenizer.eog_ids().to_vec();
    Engine::new(lm.model, eog, EngineOptions { ctx, prefix_cache, budget }).unwrap()
}

/// Some text's tokens: a long, varied prompt.
fn text_tokens(path: &Path, n: usize) -> Vec<u32> {
    let lm = generate::load(path, 64, 1, None).unwrap();
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3 text (Debian's base-files)");
    let ids = lm.tokenizer.encode(&text, true, false).unwrap();
    ids[..n].to_vec()
}

/// Logits of every position from `from` on, fed `step` tokens at a time.
fn all_logits(e: &mut Engine, tokens: &[u32], step: usize, from: usize, budget: Option<KvBudget>) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    e.eval_tokens(tokens, step, from, budget, &mut |pos, row| {
        assert_eq!(pos, from + rows.len());
        rows.push(row.to_vec())
    })
    .unwrap();
    rows
}

#[test]
fn a_budget_that_holds_everything_changes_no_bit() {
    for rel in [common::SMOLLM2, common::GEMMA3] {
        let Some(path) = common::model_or_skip(rel) else { continue };
        let tokens = text_tokens(&path, 700);
        let mut e = engine(&path, 1024, false, None);
        let want = all_logits(&mut e, &tokens, 16, 600, None);
        for policy in [KvPolicy::Sinks { sinks: 4 }, KvPolicy::H2o { recent: 0.5 }] {
            let budget = Some(KvBudget { tokens: 700, policy });
            let got = all_logits(&mut e, &tokens, 16, 600, budget);
            assert!(got == want, "{rel}: {policy} with a budget of the whole length changed logits");
        }
        // greedy generation through the engine's own budget
        let gen = |budget| {
            let mut e = engine(&path, 1024, true, budget);
            let mut s = Sampler::new(SamplingParams::greedy());
            e.generate(&tokens[..300], &mut s, 40, &AtomicBool::new(false), &mut |_| true).unwrap().tokens
        };
        assert_eq!(gen(Some(KvBudget { tokens: 400, policy: KvPolicy::H2o { recent: 0.5 } })), gen(None), "{rel}: greedy tokens");
        // and a budget that evicts does change them (the check above can fail)
        let evicting = all_logits(&mut e, &tokens, 16, 600, Some(KvBudget { tokens: 64, policy: KvPolicy::H2o { recent: 0.5 } }));
        assert!(evicting != want, "{rel}: a budget of 64 tokens evicted nothing");
    }
}

/// One decode step of `seq` (its pending tokens), greedy; checks the pool after it.
fn step(e: &mut Engine, seq: &mut Sequence, others: &[&Sequence]) -> u32 {
    let n = seq.num_pending();
    assert!(e.reserve(seq, n), "the pool ran out");
    let mut out = e.step(&mut [(&mut *seq, n)]).unwrap();
    let next = argmax(out.logits_mut(0).expect("the chunk reaches the last token"));
    let mut live: Vec<&Sequence> = others.to_vec();
    live.push(seq);
    e.check_invariants_with(&live).unwrap_or_else(|err| panic!("after a step: {err}"));
    next
}

#[test]
fn eviction_never_touches_another_sequences_blocks() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let tokens = text_tokens(&path, 400);
    let (prefix, rest) = tokens.split_at(200);
    let budget = KvBudget { tokens: 64, policy: KvPolicy::H2o { recent: 0.5 } };
    let mut e = engine(&path, 1024, true, None);

    // A: no budget, computes the shared 200-token prefix and stays running; its second step commits
    // its full blocks to the prefix cache
    let mut a = e.start_seq(prefix, None).unwrap();
    let mut a_tokens = Vec::new();
    for _ in 0..2 {
        let next = step(&mut e, &mut a, &[]);
        a.push(next);
        a_tokens.push(next);
    }

    // B: A's prefix blocks from the cache (shared with A), then 200 more tokens and 100 decode steps
    // under a 64-token budget
    let mut both = prefix.to_vec();
    both.extend_from_slice(rest);
    let mut b = e.start_seq(&both, Some(budget)).unwrap();
    assert!(b.cached_tokens() >= 192, "B re-uses the cached prefix blocks ({} tokens)", b.cached_tokens());
    let block_size = e.block_size();
    // kept tokens, holes under half of each block, one block being filled: far below the 32 blocks
    // 500 tokens take
    let bound = 2 * 64usize.div_ceil(block_size) + 2;
    for i in 0..100 {
        let next = step(&mut e, &mut b, &[&a]);
        b.push(next);
        assert!(b.num_blocks() <= bound, "step {i}: B holds {} blocks, more than its budget allows ({bound})", b.num_blocks());
    }
    let stats = e.stats();
    assert!(stats.evicted_tokens >= 400, "B evicted {} tokens", stats.evicted_tokens);

    // A goes on over the shared blocks exactly as a fresh engine computes it
    a_tokens.push(step(&mut e, &mut a, &[&b]));
    let mut fresh = engine(&path, 1024, false, None);
    let mut s = Sampler::new(SamplingParams::greedy());
    let want = fresh.generate(prefix, &mut s, 3, &AtomicBool::new(false), &mut |_| true).unwrap().tokens;
    assert_eq!(a_tokens, want, "A's tokens changed after B evicted inside their shared blocks");
    e.free_seq(b);
    e.free_seq(a);
    e.check_invariants().unwrap();

    // and the cached prefix still holds the prefix's KV: logits equal a fresh engine's
    let mut reuse = e.start_seq(&both[..260], None).unwrap();
    assert!(reuse.cached_tokens() >= 192);
    let n = reuse.num_pending();
    assert!(e.reserve(&mut reuse, n));
    let mut out = e.step(&mut [(&mut reuse, n)]).unwrap();
    let got = out.logits_mut(0).unwrap().to_vec();
    let want = all_logits(&mut fresh, &both[..260], 512, 259, None);
    assert!(got == want[0], "the cached prefix blocks were modified");
    e.free_seq(reuse);
}
