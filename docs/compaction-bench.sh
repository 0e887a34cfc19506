#!/usr/bin/env bash
# Compaction benchmark, single node (issue 11; docs/BENCHMARKS.md "Compaction"):
# a busy queue (BUSY x 1 KiB, consumed as it goes) next to a slow one
# (SLOW x 1 KiB published one at a time alongside, never consumed), so that
# nearly every record holds one slow message among busy ones. Then report the
# data directory's size, the records' bytes against what their live messages
# weigh, and what the compactor did, COMPACT_WAIT seconds after the load;
# ROUNDS times (sled reuses the space freed, it does not give it back: the
# rounds after the first show whether the directory keeps growing).
#   cargo build --release -p twinmq-broker -p twinmq-cli
#   docs/compaction-bench.sh                      # the compactor on (defaults)
#   EXTRA="--compaction-bytes-per-sec 0" docs/compaction-bench.sh   # off
set -u
BUSY=${BUSY:-400000}
SLOW=${SLOW:-10000}
BIN=${BIN:-target/release}
DIR=${DIR:-/tmp/twinmq-compaction-bench}
PORT=${PORT:-5691}
EXTRA=${EXTRA:-}
COMPACT_WAIT=${COMPACT_WAIT:-40}
ROUNDS=${ROUNDS:-3}
need_mib=$(( BUSY * 3 / 1024 + 512 ))
free_mib=$(df -Pm "$(dirname "$DIR")" | awk 'NR==2 {print $4}')
if [ "$free_mib" -lt "$need_mib" ]; then
  echo "SKIPPED: needs ~$need_mib MiB free on $(dirname "$DIR"), only $free_mib MiB"
  exit 0
fi
rm -rf "$DIR"
LOG=$DIR.log
# shellcheck disable=SC2086
"$BIN/twinmqd" --data-dir "$DIR" --listen "127.0.0.1:$PORT" --durability local --auto-create true $EXTRA >"$LOG" 2>&1 &
P=$!
sleep 0.5
cli() { "$BIN/twinmq" --servers "127.0.0.1:$PORT" "$@"; }
field() { cli status | grep -o "\"$1\": *[0-9]*" | head -1 | tr -dc 0-9; }
report() {
  echo "$1: data directory $(du -sm "$DIR" | cut -f1) MiB; records $(( $(field live_bytes) >> 20 )) MiB" \
    "for $(( $(field live_message_bytes) >> 20 )) MiB of live messages; compacted $(field compacted_records) records," \
    "$(( $(field compacted_bytes) >> 20 )) MiB less"
}
for round in $(seq 1 "$ROUNDS"); do
  t0=$(date +%s%N)
  cli pub slow --count "$SLOW" --size 1024 --window 1 --prefix "slow$round" >/dev/null &
  S=$!
  cli bench --queue busy --count "$BUSY" --size 1024 --window 256 | grep -E "^(producer|consumer)"
  wait "$S"
  echo "round $round: load done in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  report "after the load"
  sleep "$COMPACT_WAIT"
  report "${COMPACT_WAIT} s later"
done
kill "$P"; wait "$P" 2>/dev/null
[ -n "${KEEP:-}" ] || rm -rf "$DIR"
