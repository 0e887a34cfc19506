#!/usr/bin/env bash
# What a confirm costs on disk, seen from the kernel: a pair on loopback
# (`durability = replicated`), both nodes under strace, N confirmed 1 KiB
# messages (a second run with 200 KiB ones makes sled write blob files).
# For each node it prints the syscalls that make data durable, the group
# commits the node counted (`twinmq status`: store.flushes) and, for every
# blob file sled created, whether that file and the blobs directory were
# fsynced. Exit 1 if a node made fewer fdatasyncs than group commits or left
# a blob file unsynced.
#
#   docs/strace-sync.sh [N]            (default 5000; needs strace and the
#                                       release binaries: cargo build --release --workspace)
set -euo pipefail
n="${1:-5000}"
cd "$(dirname "$0")/.."
command -v strace >/dev/null || { echo "SKIPPED: strace is not installed (apt-get install strace)"; exit 0; }
bin=target/release
[ -x $bin/twinmqd ] && [ -x $bin/twinmq ] || { echo "build first: cargo build --release --workspace"; exit 2; }
tmp=$(mktemp -d)
pids=()
cleanup() {
  # The brokers first (strace, told to stop, waits for the process it started).
  for p in "${pids[@]}"; do pkill -KILL -P "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
a_c=$(port); a_h=$(port); b_c=$(port); b_h=$(port)
common=(--durability replicated --gateway tcp://127.0.0.1:1 --cluster-secret "$(head -c 32 /dev/urandom | base64)")
start() { # name client ha peer_ha peer_client priority
  strace -f -y -qq -e trace=openat,fdatasync,fsync,sync_file_range -o "$tmp/$1.strace" \
    $bin/twinmqd --node-id "$1" --data-dir "$tmp/$1" --listen "127.0.0.1:$2" --ha-listen "127.0.0.1:$3" \
    --peer-ha "127.0.0.1:$4" --peer-client "127.0.0.1:$5" --priority "$6" "${common[@]}" 2>"$tmp/$1.log" &
  pids+=($!)
}
start a "$a_c" "$a_h" "$b_h" "$b_c" 200
start b "$b_c" "$b_h" "$a_h" "$a_c" 100
servers="127.0.0.1:$a_c,127.0.0.1:$b_c"
status() { $bin/twinmq --servers "127.0.0.1:$1" status 2>/dev/null || echo '{}'; }
for _ in $(seq 100); do
  status "$b_c" | grep -q '"in_sync":true' && break
  sleep 0.1
done

run() { # count size
  $bin/twinmq --servers "$servers" pub strace --count "$1" --size "$2" --window 64 >/dev/null
}
flushes() { status "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["flushes"])'; }

check() { # node client-port label before-flushes
  local node=$1 f
  f=$(flushes "$2")
  python3 - "$tmp/$node.strace" "$node" "$3" "$4" "$f" <<'EOF'
import os, re, sys
path, node, label, before, after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
count = {"fdatasync": 0, "fsync": 0, "sync_file_range": 0}
created, fsynced, dir_synced = [], set(), 0
for line in open(path):
    m = re.search(r"\b(fdatasync|fsync|sync_file_range)\((\d+)<([^>]*)>", line)
    if m:
        count[m.group(1)] += 1
        if m.group(1) == "fsync":
            if m.group(3).endswith("/blobs"):
                dir_synced += 1
            else:
                fsynced.add(m.group(3))
    m = re.search(r'openat\(.*"([^"]*/blobs/[^"]+)".*O_CREAT', line)
    if m:
        created.append(m.group(1))
# A blob file sled removed again (a page superseded before the next sync)
# needs no fsync: only those still there count.
unsynced = [c for c in created if os.path.exists(c)
            and not any(s.endswith(c.split("/blobs/")[1]) for s in fsynced if "/blobs/" in s)]
commits = after - before
print(f"{node} ({label}): {commits} group commits; fdatasync {count['fdatasync']}, fsync {count['fsync']} "
      f"(blob files created {len(created)}, unsynced {len(unsynced)}, blob dir fsyncs {dir_synced}), "
      f"sync_file_range {count['sync_file_range']}")
if count["fdatasync"] < commits or unsynced:
    print(f"FAIL: {node}: fewer fdatasyncs than group commits, or unsynced blob files {unsynced[:3]}")
    sys.exit(1)
EOF
}

fa=$(flushes "$a_c"); fb=$(flushes "$b_c")
run "$n" 1024
check a "$a_c" "active, $n x 1 KiB" "$fa"
check b "$b_c" "passive, $n x 1 KiB" "$fb"
: > "$tmp/a.strace.keep"
fa=$(flushes "$a_c"); fb=$(flushes "$b_c")
run 300 204800
check a "$a_c" "active, then 300 x 200 KiB, totals" 0
check b "$b_c" "passive, then 300 x 200 KiB, totals" 0
