#!/usr/bin/env bash
# Run each fuzz target for a bounded time: fuzz/run.sh [SECONDS per target, default 60]
#
# Installs cargo-fuzz if missing. Builds with `--sanitizer none`: the
# sanitizers need a nightly compiler and this project builds on stable; the
# targets' own allocator (fuzz/src/lib.rs) aborts on any single allocation
# above the target's cap, which is what catches a trusted length prefix, and
# -rss_limit_mb bounds the total. Exits non-zero on the first crash, leak of
# memory past the RSS limit, or timeout; the input is left in
# fuzz/artifacts/<target>/ (reproduce: cargo fuzz run --sanitizer none <target> <file>).
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/.."
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked
fi
cargo fuzz build --sanitizer none
for target in client_frame ha_frame stomp_frame; do
  mkdir -p "fuzz/corpus/$target"
  echo "fuzz: $target for ${secs}s"
  # New inputs go to fuzz/corpus (not committed); fuzz/seeds is read-only input.
  set +e
  cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 -max_len=65536 -print_final_stats=1 2>&1 |
    grep -E "^(Done|stat::|==|SUMMARY|artifact_prefix|Test unit written|Error|thread)"
  # grep hides the progress lines; the pipeline's first status is the fuzzer's.
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" != 0 ]; then
    echo "fuzz: $target FAILED (exit $status); see fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
echo "fuzz: all targets ran clean"
