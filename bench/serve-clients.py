#!/usr/bin/env python3
"""Aggregate decode throughput of `pagellm run --serve` under N concurrent streaming clients.

Starts the server (or uses --url), then for each N in --clients runs N streaming /v1/completions
requests at once (greedy, a counting prompt per client so nobody stops early) and reports:

  decode tok/s   tokens received by all clients while all N were decoding (from the moment the last
                 client got its first token to the moment the first client finished), per second:
                 the steady state with exactly N sequences in every batch
  total tok/s    all completion tokens / wall time of the round (prefill and ramp included)

Standard library only.  Example:
  python3 bench/serve-clients.py models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 --clients 1,2,4,8,16
"""
import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse


def stream_one(host, port, prompt, max_tokens, out):
    conn = http.client.HTTPConnection(host, port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    stamps = []
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        ch = ev.get("choices") or []
        if ch and ch[0].get("text"):
            stamps.append(time.perf_counter())
    conn.close()
    out.append(stamps)


def round_(host, port, n, max_tokens):
    outs, threads = [], []
    t0 = time.perf_counter()
    for i in range(n):
        k = 1 + 7 * i
        prompt = f"Count from {k} to 100000, separated by commas: {k}, {k + 1}, {k + 2},"
        th = threading.Thread(target=stream_one, args=(host, port, prompt, max_tokens, outs))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if len(outs) != n:
        raise RuntimeError("a client failed")
    start = max(s[0] for s in outs)
    end = min(s[-1] for s in outs)
    steady = sum(sum(1 for t in s if start < t <= end) for s in outs)
    decode = steady / (end - start) if end > start else float("nan")
    total = sum(len(s) for s in outs)
    return decode, total / wall, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (starts target/release/pagellm)")
    ap.add_argument("--url", help="use a running server instead")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--bin", default="target/release/pagellm")
    args = ap.parse_args()

    proc = None
    if args.url:
        u = urlparse(args.url)
        host, port = u.hostname, u.port
    else:
        cmd = [args.bin, "run", args.model, "--serve", "--port", "0", "-t", str(args.threads), "-c", "4096"]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        addr = None
        for line in proc.stderr:
            if "on http://" in line:
                addr = line.split("on http://")[1].split("/")[0].strip()
                break
        if not addr:
            sys.exit("the server did not start")
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        host, port = addr.rsplit(":", 1)
        port = int(port)
    try:
        round_(host, port, 1, 8)  # warm-up
        print(f"{'clients':>7} {'decode tok/s':>13} {'total tok/s':>12} {'tokens':>7}")
        for n in [int(x) for x in args.clients.split(",")]:
            d, tot, toks = round_(host, port, n, args.max_tokens)
            print(f"{n:>7} {d:>13.1f} {tot:>12.1f} {toks:>7}", flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
