#!/usr/bin/env bash
# Throughput and confirm latency of a single node (`local`) and of the pair
# (`replicated`, fdatasync on both nodes), one producer with 256 in flight and
# one consumer acking each message, 1 KiB payloads (docs/BENCHMARKS.md).
#
#   docs/perf-bench.sh [single|pair] [count] [bin-dir] [extra bench flags...]
#
# bin-dir holds twinmqd and twinmq (default ./target/release), so two builds
# can be run by turns for an A/B. Every run starts from fresh data
# directories under $PERF_BENCH_DIR (default /tmp/perf-bench; /dev/shm/...
# puts them in memory, to see what the disk costs) and stops the brokers it
# started.
set -euo pipefail
mode=${1:-pair}
count=${2:-1000000}
bin=${3:-./target/release}
shift $(( $# < 3 ? $# : 3 ))
D="$bin/twinmqd"
C="$bin/twinmq"
[ -x "$D" ] && [ -x "$C" ] || { echo "build first: cargo build --release (no $D or $C)" >&2; exit 2; }
dir=${PERF_BENCH_DIR:-/tmp/perf-bench}
rm -rf "$dir" && mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_for() { # until "$@" succeeds, at most 30 s
    for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for: $*" >&2; exit 1
}

case "$mode" in
single)
    "$D" --data-dir "$dir/s" --listen 127.0.0.1:6210 --durability local >"$dir/s.log" 2>&1 &
    pids+=($!)
    wait_for "$C" --servers 127.0.0.1:6210 status
    servers=127.0.0.1:6210
    ;;
pair)
    secret=$(head -c 32 /dev/urandom | base64)
    common=(--gateway tcp://127.0.0.1:1 --cluster-secret "$secret" --durability replicated)
    "$D" --node-id a --data-dir "$dir/a" --listen 127.0.0.1:6211 --ha-listen 127.0.0.1:6311 \
        --peer-ha 127.0.0.1:6312 --priority 200 "${common[@]}" >"$dir/a.log" 2>&1 &
    pids+=($!)
    "$D" --node-id b --data-dir "$dir/b" --listen 127.0.0.1:6212 --ha-listen 127.0.0.1:6312 \
        --peer-ha 127.0.0.1:6311 --priority 100 "${common[@]}" >"$dir/b.log" 2>&1 &
    pids+=($!)
    in_sync() { "$C" --servers 127.0.0.1:6211 status 2>/dev/null | grep -q '"in_sync": *true'; }
    wait_for in_sync
    servers=127.0.0.1:6211,127.0.0.1:6212
    ;;
*) echo "usage: $0 [single|pair] [count] [bin-dir] [bench flags...]" >&2; exit 2 ;;
esac

"$C" --servers "$servers" bench --count "$count" "$@"
