//! `GET /metrics`: Prometheus text format (version 0.0.4) from the scheduler's counters and the HTTP
//! responses counted by the server's middleware.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::engine::scheduler::{SchedulerOptions, SchedulerStats};

/// One metric: its HELP and TYPE lines, then one sample per (labels, value).
fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn one(v: impl Into<f64>) -> Vec<(String, f64)> {
    vec![(String::new(), v.into())]
}

pub fn render(s: &SchedulerStats, opts: &SchedulerOptions, http: &BTreeMap<(&'static str, u16), u64>, uptime_s: f64) -> String {
    let mut out = String::new();
    let http: Vec<(String, f64)> =
        http.iter().map(|((ep, code), n)| (format!("{{endpoint=\"{ep}\",code=\"{code}\"}}"), *n as f64)).collect();
    metric(&mut out, "pagellm_http_requests_total", "counter", "HTTP responses by endpoint and status code.", &http);
    let outcomes = [("completed", s.completed), ("cancelled", s.cancelled), ("failed", s.failed), ("rejected_queue_full", s.rejected)];
    let outcomes: Vec<(String, f64)> = outcomes.iter().map(|(o, n)| (format!("{{outcome=\"{o}\"}}"), *n as f64)).collect();
    metric(&mut out, "pagellm_requests_total", "counter", "Generation requests by outcome.", &outcomes);
    let finish = vec![
        ("{finish_reason=\"stop\"}".to_string(), s.finished_stop as f64),
        ("{finish_reason=\"length\"}".to_string(), s.finished_length as f64),
    ];
    metric(&mut out, "pagellm_choices_total", "counter", "Finished choices (sequences) by finish reason.", &finish);
    metric(&mut out, "pagellm_prompt_tokens_total", "counter", "Prompt tokens of every choice.", &one(s.prompt_tokens as f64));
    metric(
        &mut out,
        "pagellm_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens served from the prefix cache.",
        &one(s.cached_tokens as f64),
    );
    metric(&mut out, "pagellm_completion_tokens_total", "counter", "Generated tokens.", &one(s.completion_tokens as f64));
    let c = &s.cache;
    let hit_rate = if c.queried_tokens == 0 { 0.0 } else { c.hit_tokens as f64 / c.queried_tokens as f64 };
    metric(&mut out, "pagellm_prefix_cache_hit_rate", "gauge", "Share of prompt tokens whose KV was re-used, since start.", &one(hit_rate));
    metric(&mut out, "pagellm_queue_length", "gauge", "Requests waiting for the engine.", &one(s.waiting as f64));
    metric(&mut out, "pagellm_queue_capacity", "gauge", "Most requests that may wait (--max-queue).", &one(opts.max_queue as f64));
    metric(&mut out, "pagellm_requests_running", "gauge", "Requests the engine is working on.", &one(s.running as f64));
    metric(&mut out, "pagellm_kv_blocks_total", "gauge", "KV cache blocks in the pool.", &one(c.total_blocks as f64));
    metric(&mut out, "pagellm_kv_blocks_used", "gauge", "KV cache blocks holding tokens.", &one(c.used_blocks as f64));
    metric(&mut out, "pagellm_kv_blocks_cached", "gauge", "Full KV blocks a later prompt can re-use.", &one(c.cached_blocks as f64));
    metric(&mut out, "pagellm_kv_blocks_free", "gauge", "KV cache blocks a new token can take (empty or cached and unreferenced).", &one(c.free_blocks as f64));
    metric(
        &mut out,
        "pagellm_kv_blocks_retained",
        "gauge",
        "Used blocks held only by finished sequences kept for continuation (equals used when idle; more is a leak).",
        &one(c.retained_blocks as f64),
    );
    metric(
        &mut out,
        "pagellm_kv_blocks_used_by_requests",
        "gauge",
        "Used blocks minus retained ones: blocks of running sequences; 0 when idle.",
        &one(c.used_blocks.saturating_sub(c.retained_blocks) as f64),
    );
    metric(&mut out, "pagellm_sequences_running", "gauge", "Sequences (choices) in the running batch.", &one(s.running_seqs as f64));
    metric(&mut out, "pagellm_steps_total", "counter", "Batched forward steps.", &one(s.steps as f64));
    metric(&mut out, "pagellm_step_sequences_total", "counter", "Sequences over all steps (divide by steps: mean batch size).", &one(s.step_seqs as f64));
    metric(&mut out, "pagellm_step_tokens_total", "counter", "Tokens over all steps (decode tokens plus prefill chunks).", &one(s.step_tokens as f64));
    metric(&mut out, "pagellm_preemptions_total", "counter", "Sequences preempted because the KV pool ran out.", &one(s.preemptions as f64));
    metric(&mut out, "pagellm_kv_invariant_errors_total", "counter", "KV pool checks failed when the scheduler went idle.", &one(s.invariant_errors as f64));
    metric(&mut out, "pagellm_kv_block_size", "gauge", "Tokens per KV block.", &one(c.block_size as f64));
    metric(&mut out, "pagellm_context_tokens", "gauge", "Most tokens (prompt + reply) per request.", &one(opts.ctx as f64));
    metric(&mut out, "pagellm_uptime_seconds", "gauge", "Seconds since the server started.", &one(uptime_s));
    out
}
