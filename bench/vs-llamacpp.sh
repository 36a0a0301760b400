#!/usr/bin/env bash
# pagellm bench vs llama.cpp (llama-cpp-python from PyPI, built with native flags) on the same model file,
# same prompt/generation lengths and threads, alternating runs in one go (the machine is noisy).
# Appends a ratio table to bench/RESULTS.md.
#
#   [ROUNDS=3] [THREADS=2] [BASELINE=path/to/older/pagellm] bench/vs-llamacpp.sh MODEL...
#
# BASELINE adds an older pagellm build to every round (a before/after column measured in the same run).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
threads=${THREADS:-2}
pp=${PP:-512}
tg=${TG:-128}
reps=${REPS:-3}
baseline=${BASELINE:-}
[ $# -gt 0 ] || set -- models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf
python3 -c "import llama_cpp" 2>/dev/null || { echo "needs: pip install llama-cpp-python==0.3.36"; exit 1; }
cargo build --release -q
tmp=$(mktemp -d)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
trap 'rm -rf "$tmp"' EXIT

for m in "$@"; do
  name=$(basename "$m")
  for r in $(seq 1 "$rounds"); do
    echo "round $r: $name" >&2
    target/release/pagellm bench "$m" -p "$pp" -n "$tg" -r "$reps" -t "$threads" --json > "$tmp/$name.pagellm.$r.json"
    if [ -n "$baseline" ]; then
      "$baseline" bench "$m" -p "$pp" -n "$tg" -r "$reps" -t "$threads" --json 2>/dev/null > "$tmp/$name.baseline.$r.json"
    fi
    python3 bench/llamacpp_bench.py "$m" -p "$pp" -n "$tg" -r "$reps" -t "$threads" 2>/dev/null > "$tmp/$name.llama.$r.json"
  done
done

python3 - "$tmp" "$threads" "$pp" "$tg" "$rounds" "$reps" "$baseline" "$load_before" "$@" >> bench/RESULTS.md <<'PY'
import glob, json, os, platform, statistics, subprocess, sys, datetime
tmp, threads, pp, tg, rounds, reps, baseline, load_before = sys.argv[1:9]
models = sys.argv[9:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
flags = set(next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), []))
simd = " ".join(f for f in ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"] if f in flags)
rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
load_after = " ".join(open("/proc/loadavg").read().split()[:3])
print(f"\n### CPU: pagellm vs llama.cpp, {datetime.date.today()} (pagellm {rev})\n")
print(f"Machine: {cpu}, {os.cpu_count()} cores ({simd}); threads {threads}; {rounds} alternating rounds x {reps} reps; "
      f"peer: llama-cpp-python (llama.cpp), flash attention on.\n")
base = f" BASELINE={baseline}" if baseline else ""
print(f"Command: `ROUNDS={rounds} THREADS={threads}{base} bench/vs-llamacpp.sh {' '.join(models)}`; "
      f"load average before {load_before}, after {load_after} (a shared machine: other jobs run beside it).\n")
if baseline:
    print("| model | test | pagellm t/s (median) | llama.cpp t/s (median) | ratio | baseline t/s (median) | pagellm / baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
else:
    print("| model | test | pagellm t/s (median) | llama.cpp t/s (median) | ratio |")
    print("| --- | --- | --- | --- | --- |")
for m in models:
    name = os.path.basename(m)
    def samples(kind, test):
        out = []
        for f in sorted(glob.glob(f"{tmp}/{name}.{kind}.*.json")):
            for r in json.load(open(f))["results"]:
                if r["test"] == test:
                    out += r["samples_ts"]
        return out
    for test in [f"pp{pp}", f"tg{tg}"]:
        a, b, c = samples("pagellm", test), samples("llama", test), samples("baseline", test)
        if a and b:
            ma, mb = statistics.median(a), statistics.median(b)
            row = f"| {name} | {test} | {ma:.1f} | {mb:.1f} | {ma / mb:.2f}x |"
            if baseline:
                mc = statistics.median(c) if c else float("nan")
                row += f" {mc:.1f} | {ma / mc:.2f}x |"
            print(row)
PY
tail -n 12 bench/RESULTS.md
