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
# started. PERF_BENCH_TLS=1 turns TLS on, on the client port and (pair) on
# the HA link, with certificates made by the README's openssl recipe.
# PERF_BENCH_NODE_FLAGS: more twinmqd flags for every node (word-split), e.g.
# "--max-queue-bytes 4294967296" for a producer-only run past 1 GiB.
# PERF_BENCH_DRAIN=1: after the run (give it --no-consumer), a second bench
# with --no-producer drains what it stored: the consumer-only figure.
# PERF_BENCH_STOMP=1: the same load over the STOMP port, by stomp-bench
# (examples/src/stomp_bench.rs, in bin-dir: SENDs with receipts, 256 in
# flight, one consumer acking each MESSAGE); extra arguments go to it.
set -euo pipefail
mode=${1:-pair}
count=${2:-1000000}
bin=${3:-./target/release}
shift $(( $# < 3 ? $# : 3 ))
D="$bin/twinmqd"
C="$bin/twinmq"
[ -x "$D" ] && [ -x "$C" ] || { echo "build first: cargo build --release --workspace (no $D or $C)" >&2; exit 2; }
dir=${PERF_BENCH_DIR:-/tmp/perf-bench}
rm -rf "$dir" && mkdir -p "$dir"
pids=()
tls=() hatls=() ctls=()
read -r -a extra <<< "${PERF_BENCH_NODE_FLAGS:-}"
if [ "${PERF_BENCH_TLS:-0}" = 1 ]; then
    command -v openssl >/dev/null || { echo "PERF_BENCH_TLS=1 needs openssl" >&2; exit 2; }
    (
        cd "$dir"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -subj "/CN=perf CA" -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout ca.key -out ca.pem
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=node" -keyout node.key -out node.csr
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' > node.ext
        openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile node.ext -out node.crt
    ) >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; exit 1; }
    tls=(--tls-cert "$dir/node.crt" --tls-key "$dir/node.key")
    hatls=(--ha-tls-cert "$dir/node.crt" --ha-tls-key "$dir/node.key" --ha-tls-ca "$dir/ca.pem" --ha-tls-require-client-cert true)
    ctls=(--tls-ca "$dir/ca.pem")
fi
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_for() { # until "$@" succeeds, at most 30 s
    for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for: $*" >&2; exit 1
}

stomp_a=() stomp_b=()
if [ "${PERF_BENCH_STOMP:-0}" = 1 ]; then
    [ -x "$bin/stomp-bench" ] || { echo "build first: cargo build --release -p twinmq-examples --bin stomp-bench" >&2; exit 2; }
    stomp_a=(--stomp-listen 127.0.0.1:6410) stomp_b=(--stomp-listen 127.0.0.1:6412)
fi

case "$mode" in
single)
    "$D" --data-dir "$dir/s" --listen 127.0.0.1:6210 --durability local "${stomp_a[@]}" "${tls[@]}" "${extra[@]}" >"$dir/s.log" 2>&1 &
    pids+=($!)
    wait_for "$C" "${ctls[@]}" --servers 127.0.0.1:6210 status
    servers=127.0.0.1:6210
    ;;
pair)
    secret=$(head -c 32 /dev/urandom | base64)
    common=(--gateway tcp://127.0.0.1:1 --cluster-secret "$secret" --durability replicated "${tls[@]}" "${hatls[@]}" "${extra[@]}")
    "$D" --node-id a --data-dir "$dir/a" --listen 127.0.0.1:6211 --ha-listen 127.0.0.1:6311 \
        --peer-ha 127.0.0.1:6312 --priority 200 "${stomp_a[@]}" "${common[@]}" >"$dir/a.log" 2>&1 &
    pids+=($!)
    "$D" --node-id b --data-dir "$dir/b" --listen 127.0.0.1:6212 --ha-listen 127.0.0.1:6312 \
        --peer-ha 127.0.0.1:6311 --priority 100 "${stomp_b[@]}" "${common[@]}" >"$dir/b.log" 2>&1 &
    pids+=($!)
    in_sync() { "$C" "${ctls[@]}" --servers 127.0.0.1:6211 status 2>/dev/null | grep -q '"in_sync": *true'; }
    wait_for in_sync
    servers=127.0.0.1:6211,127.0.0.1:6212
    ;;
*) echo "usage: $0 [single|pair] [count] [bin-dir] [bench flags...]" >&2; exit 2 ;;
esac

if [ "${PERF_BENCH_STOMP:-0}" = 1 ]; then
    "$bin/stomp-bench" --hosts 127.0.0.1:6410 --count "$count" "$@"
    exit 0
fi
"$C" "${ctls[@]}" --servers "$servers" bench --count "$count" "$@"
if [ "${PERF_BENCH_DRAIN:-0}" = 1 ]; then
    "$C" "${ctls[@]}" --servers "$servers" bench --count "$count" --no-producer
fi
