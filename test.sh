#!/usr/bin/env bash
# Run every test of the workspace (README "Quickstart"). Installs what the
# tests need when it can: as root with apt-get, iproute2 (the cable-pull
# lab's namespaces), chromium (the status page rendered in a headless
# browser) and python3-venv; stomp.py from PyPI into target/stomp-venv (the
# STOMP tests); cargo-deb (the package check). A part that cannot run here
# says `SKIPPED: <why>` and the rest still runs; cargo goes on past a failing
# test binary (--no-fail-fast) and the script exits non-zero if any test
# failed.
#
#   ./test.sh [more cargo test arguments, e.g. a test name filter or -- --nocapture]
#
# TWINMQ_REQUIRE_BROWSER=1 (set by .ci/run): fail instead of skipping the
# browser checks when chromium cannot be had; TWINMQ_REQUIRE_STOMP=1 likewise
# for stomp.py; TWINMQ_PACKAGE_INSTALL=1 (as root) installs, runs and removes
# the Debian package on this machine (broker/debian/check-deb.sh).
set -euo pipefail
cd "$(dirname "$0")"

loud() { printf '\n*** %s\n\n' "$*" >&2; }
root=false
[ "$(id -u)" = 0 ] && root=true
has_browser() { [ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ]; }

missing=()
command -v ip >/dev/null || missing+=(iproute2)
has_browser || missing+=(chromium)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
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

# stomp.py (PyPI) for the STOMP tests (broker/tests/stomp.rs), in a venv
# under target/ so that nothing is installed into the system's Python.
venv=target/stomp-venv
if ! "$venv/bin/python" -c 'import stomp' 2>/dev/null; then
    echo "installing stomp.py into $venv"
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q 'stomp.py==9.0.0'; } ||
        loud "SKIPPED: the STOMP tests (broker/tests/stomp.rs): cannot install stomp.py into $venv"
fi

start=$(date +%s)
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
echo "test.sh: cargo test --workspace took $(( $(date +%s) - start )) s, exit status $status"

# The Debian package: built with cargo-deb from the binaries just tested,
# its contents, config check and unit verified; installed, run, upgraded,
# removed and purged for real only with TWINMQ_PACKAGE_INSTALL=1 as root.
if [ $# -eq 0 ]; then
    broker/debian/check-deb.sh dev || { echo "test.sh: the package check FAILED" >&2; status=1; }
fi
exit "$status"
