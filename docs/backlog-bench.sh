#!/usr/bin/env bash
# Backlog benchmark, single node (issue 11; docs/BENCHMARKS.md): fill N x 1 KiB
# persistent messages with no consumer, then report RSS, disk use, kill -9,
# restart-to-serving (cold page cache), RSS after restart, drain rate of the
# whole backlog from disk, RSS after the drain.
#   cargo build --release -p twinmq-broker -p twinmq-cli
#   sudo docs/backlog-bench.sh 500000
# Needs root for the cold cache (echo 3 > /proc/sys/vm/drop_caches; warm otherwise).
set -u
N=${1:-500000}
BIN=${BIN:-target/release}
DIR=${DIR:-/tmp/twinmq-backlog-bench}
PORT=${PORT:-5690}
EXTRA=${EXTRA:-}
need_mib=$(( N * 2 / 1024 + 512 ))
free_mib=$(df -Pm "$(dirname "$DIR")" | awk 'NR==2 {print $4}')
if [ "$free_mib" -lt "$need_mib" ]; then
  echo "SKIPPED: $N messages need ~$need_mib MiB free on $(dirname "$DIR"), only $free_mib MiB"
  exit 0
fi
rm -rf "$DIR"
LOG=$DIR.log
: > "$LOG"
rss() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status"; }
start() {
  # shellcheck disable=SC2086
  "$BIN/twinmqd" --data-dir "$DIR" --listen "127.0.0.1:$PORT" --durability local \
    --max-queue-depth 100000000 --max-queue-bytes 1000000000000 $EXTRA >>"$LOG" 2>&1 &
  echo $!
}
serving_after() {
  local t0=$1 n=0
  while [ $((n++)) -lt 3000 ] && ! "$BIN/twinmq" --servers "127.0.0.1:$PORT" pub probe --count 1 >/dev/null 2>&1; do
    sleep 0.02
  done
  echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms"
}
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
P=$(start); sleep 0.5
t0=$(date +%s%N)
"$BIN/twinmq" --servers "127.0.0.1:$PORT" bench --count "$N" --size 1024 --window 256 --no-consumer | head -2
echo "fill: $(( N * 1000 / $(ms_since "$t0") )) msgs/s"
echo "RSS after fill: $(rss "$P"); data directory: $(du -sm "$DIR" | cut -f1) MiB"
sleep 2
kill -9 "$P"; wait "$P" 2>/dev/null
sync
if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; cache=cold; else cache=warm; fi
t0=$(date +%s%N); P=$(start)
echo "kill -9, restart -> serving ($cache page cache): $(serving_after "$t0")"
sleep 1; echo "RSS after restart: $(rss "$P")"
t0=$(date +%s%N)
"$BIN/twinmq" --servers "127.0.0.1:$PORT" sub bench --count "$N" --prefetch 1024 --timeout 300 | tail -1
echo "drain: $(( N * 1000 / $(ms_since "$t0") )) msgs/s"
sleep 2; echo "RSS after drain: $(rss "$P")"
kill "$P"; wait "$P" 2>/dev/null
grep -E "sled database open|index checkpoint loaded|store log read" "$LOG" | tail -3 | cut -c1-160
rm -rf "$DIR"
