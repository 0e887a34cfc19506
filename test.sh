#!/usr/bin/env bash
# Run every test of the workspace (README "Quickstart"). Installs what the
# tests need when it can: as root with apt-get, iproute2 (the cable-pull
# lab's namespaces) and chromium (the status page rendered in a headless
# browser). A part that cannot run here says `SKIPPED: <why>` and the rest
# still runs; cargo goes on past a failing test binary (--no-fail-fast) and
# the script exits non-zero if any test failed.
#
#   ./test.sh [more cargo test arguments, e.g. a test name filter or -- --nocapture]
#
# TWINMQ_REQUIRE_BROWSER=1 (set by .ci/run): fail instead of skipping the
# browser checks when chromium cannot be had.
set -euo pipefail
cd "$(dirname "$0")"

loud() { printf '\n*** %s\n\n' "$*" >&2; }
root=false
[ "$(id -u)" = 0 ] && root=true
has_browser() { [ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ]; }

missing=()
command -v ip >/dev/null || missing+=(iproute2)
has_browser || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if $root && command -v apt-get >/dev/null; then
        echo "installing: ${missing[*]}"
        { apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } ||
            loud "could not install ${missing[*]} (the parts that need them are skipped below)"
    else
        loud "not root with apt-get: cannot install ${missing[*]}"
    fi
fi

if ! has_browser; then
    if [ "${TWINMQ_REQUIRE_BROWSER:-0}" = 1 ]; then
        echo "TWINMQ_REQUIRE_BROWSER=1 and no chromium: the status page's browser test cannot run" >&2
        exit 1
    fi
    loud "SKIPPED: the status page's browser checks (broker/tests/http.rs): no chromium (apt-get install chromium)"
    export TWINMQ_SKIP_BROWSER=1
fi
if ! $root; then
    loud "SKIPPED: the cable-pull lab, the nemesis and the failing-disk tests need root (network namespaces, /dev/fuse); they report SKIPPED and pass"
elif ! command -v ip >/dev/null; then
    loud "SKIPPED: the cable-pull lab and the nemesis need iproute2 (ip); they report SKIPPED and pass"
fi

start=$(date +%s)
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
echo "test.sh: cargo test --workspace took $(( $(date +%s) - start )) s, exit status $status"
exit "$status"
