#!/usr/bin/env python3
"""llama-bench's pp/tg tests through llama-cpp-python, so pagellm and llama.cpp are timed the same way:
pp = one eval of N random tokens from an empty cache; tg = N single-token evals from an empty cache;
one warm-up run, then R timed runs. Prints JSON like `pagellm bench --json`.

    python3 bench/llamacpp_bench.py MODEL [-p 512] [-n 128] [-r 3] [-t THREADS]
"""
import argparse, json, os, random, statistics, sys, time

import llama_cpp

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("-p", type=int, default=512)
ap.add_argument("-n", type=int, default=128)
ap.add_argument("-r", type=int, default=3)
ap.add_argument("-t", type=int, default=os.cpu_count())
args = ap.parse_args()

llm = llama_cpp.Llama(model_path=args.model, n_ctx=max(args.p, args.n) + 8, n_batch=max(args.p, 1), n_ubatch=max(args.p, 1),
                      n_threads=args.t, n_threads_batch=args.t, flash_attn=True, verbose=False)
rng = random.Random(1)
n_vocab = llm.n_vocab()
rows = []


def timed(n, fn):
    samples = []
    for rep in range(args.r + 1):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        if rep > 0:
            samples.append(n / dt)
    return samples


if args.p > 0:
    toks = [rng.randrange(n_vocab) for _ in range(args.p)]
    s = timed(args.p, lambda: llm.eval(toks))
    rows.append({"test": f"pp{args.p}", "n_tokens": args.p, "threads": args.t, "samples_ts": s,
                 "avg_ts": statistics.mean(s), "stddev_ts": statistics.stdev(s) if len(s) > 1 else 0.0})
if args.n > 0:
    toks = [rng.randrange(n_vocab) for _ in range(args.n)]

    def gen():
        for t in toks:
            llm.eval([t])
    s = timed(args.n, gen)
    rows.append({"test": f"tg{args.n}", "n_tokens": args.n, "threads": args.t, "samples_ts": s,
                 "avg_ts": statistics.mean(s), "stddev_ts": statistics.stdev(s) if len(s) > 1 else 0.0})
print(json.dumps({"model": os.path.basename(args.model), "llama_cpp_python": llama_cpp.__version__, "results": rows}))
