#!/usr/bin/env bash
# Cross-tests the aarch64 NEON kernel table on an x86_64 Linux host under qemu-user, on two emulated CPUs:
#
#   QEMU_CPU=max          has the dot-product extension: the table is "neon+dotprod" (sdot integer sums)
#   QEMU_CPU=cortex-a72   has not:                       the table is "neon" (vmull + vpadal sums)
#
# and on each runs the library's unit tests (neon.rs's own: both variants against scalar, the f16
# conversion on all 65,536 inputs; the NEON elementwise table and attention loops against their scalar
# oracles) and tests/backend_cpu.rs (every table against the scalar one). It checks the table each CPU
# should pick is the one that ran, and that the NEON elementwise and attention tests saw it.
#
# Installs what it lacks (the rustup target, gcc-aarch64-linux-gnu, qemu-user); where that cannot be done
# it prints a SKIP line with the reason and exits 0. Exits non-zero when a build or a test fails.
# Builds in its own target dir ($AARCH64_TARGET_DIR, default /tmp/aarch64-target), never in ./target.
# The linker and runner are passed here, not in a .cargo/config.toml, which would also send native
# aarch64 builds through qemu.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
dir=${AARCH64_TARGET_DIR:-/tmp/aarch64-target}
sysroot=/usr/aarch64-linux-gnu
skip() {
    echo "SKIP aarch64 cross tests: $*"
    exit 0
}

# ---- toolchain ----
host="$(uname -s)-$(uname -m)"
[ "$host" = Linux-x86_64 ] || skip "host is $host, not Linux-x86_64 (on aarch64, cargo test runs the NEON table natively)"
command -v rustup >/dev/null || skip "rustup not found (needed for the $target target)"
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target" || skip "rustup target add $target failed"
fi
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "${need[*]} missing and no apt-get to install them"
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq "${need[@]}"; } >/dev/null 2>&1 \
        || skip "apt-get install ${need[*]} failed"
fi
[ -d "$sysroot/lib" ] || skip "no aarch64 libc in $sysroot (package libc6-arm64-cross)"

# ---- build once, run under each CPU ----
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
cargo_test() { cargo test --release --target "$target" --target-dir "$dir" --lib --test backend_cpu "$@"; }

start=$(date +%s)
cargo_test --no-run
echo "aarch64 build: $(($(date +%s) - start)) s"

status=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for cpu_table in max:neon+dotprod cortex-a72:neon; do
    cpu=${cpu_table%%:*} table=${cpu_table#*:}
    t0=$(date +%s)
    if ! QEMU_CPU=$cpu cargo_test --no-fail-fast -- --nocapture --test-threads 2 >"$log" 2>&1; then
        cat "$log"
        echo "FAIL aarch64 tests under QEMU_CPU=$cpu"
        status=1
        continue
    fi
    missing=
    for line in "SIMD tables checked against scalar: [\"$table\"]" "elementwise tables: [Scalar, Neon]" \
        "attention SIMD loops checked: [\"$table\"]"; do
        grep -qF "$line" "$log" || missing="$missing  '$line'"
    done
    if [ -n "$missing" ]; then
        grep -E "SIMD tables|elementwise tables|attention SIMD" "$log" || true
        echo "FAIL under QEMU_CPU=$cpu: expected these lines:$missing"
        status=1
        continue
    fi
    echo "ok   QEMU_CPU=$cpu: table $table, $(($(date +%s) - t0)) s"
    grep -E '^ *Running|^test result' "$log" | sed 's/^ */     /'
done
echo "aarch64 cross tests finished in $(($(date +%s) - start)) s"
exit $status
