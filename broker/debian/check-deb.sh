#!/usr/bin/env bash
# Build the Debian package with cargo-deb and check it (run by ./test.sh):
#   - its files, conffiles, dependencies and maintainer scripts;
#   - the shipped /etc/twinmq/twinmq.toml passes `twinmqd --check-config`,
#     and a broken one fails with exit 2 naming the key;
#   - the unit passes `systemd-analyze verify` and its exposure score is
#     printed (`systemd-analyze security`), where systemd-analyze exists;
#   - with TWINMQ_PACKAGE_INSTALL=1 as root (a throwaway machine: .ci/run
#     sets it), the real cycle with dpkg: install (user, directories,
#     modes), the node run as the unit runs it (user twinmq, READY=1 on
#     NOTIFY_SOCKET, messages in and out, SIGHUP reload), upgrade keeping an
#     edited conffile, remove keeping configuration and data, purge removing
#     the configuration and keeping the data.
#
#   broker/debian/check-deb.sh [release|dev]   (default dev: the binaries the tests built)
#
# A release package: cargo build --release -p twinmq-broker -p twinmq-cli &&
#                    cargo deb -p twinmq-broker --no-build
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${1:-dev}"
loud() { printf '\n*** %s\n\n' "$*" >&2; }
fail() {
    echo "check-deb: FAILED: $*" >&2
    exit 1
}

if ! command -v dpkg-deb >/dev/null; then
    loud "SKIPPED: the Debian package check: no dpkg-deb on this machine"
    exit 0
fi
if ! command -v cargo-deb >/dev/null; then
    echo "check-deb: installing cargo-deb"
    cargo install cargo-deb --version 3.8.0 --locked --quiet
fi

if [ "$profile" = release ]; then
    cargo build --release -p twinmq-broker -p twinmq-cli
    deb=$(cargo deb -p twinmq-broker --no-build | tail -1)
else
    cargo build -p twinmq-broker -p twinmq-cli
    # cargo-deb warns that dev is not a release profile: right, this checks the packaging, not the build.
    deb=$(cargo deb -p twinmq-broker --no-build --profile dev 2>/dev/null | tail -1)
fi
[ -f "$deb" ] || fail "cargo deb wrote no package ($deb)"
echo "check-deb: built $deb"

work=$(mktemp -d /tmp/twinmq-deb.XXXXXX)
node=
trap 'if [ -n "$node" ]; then kill "$node" 2>/dev/null || true; fi; rm -rf "$work"' EXIT

# Contents.
dpkg-deb -c "$deb" | awk '{print $NF}' | sed 's|^\./|/|' >"$work/files"
for f in /usr/bin/twinmqd /usr/bin/twinmq /etc/twinmq/twinmq.toml /usr/share/doc/twinmq/DEPLOY.md \
    /usr/share/doc/twinmq/examples/icmp-gateway.conf /usr/share/doc/twinmq/examples/twinmq.rules.yml; do
    grep -qx "$f" "$work/files" || fail "$f is not in the package"
done
unit_path=$(grep -E '^(/usr)?/lib/systemd/system/twinmqd\.service$' "$work/files") ||
    fail "no twinmqd.service in the package"
dpkg-deb -e "$deb" "$work/control"
grep -qx /etc/twinmq/twinmq.toml "$work/control/conffiles" || fail "twinmq.toml is not a conffile"
grep -q '^Depends:.*adduser' "$work/control/control" || fail "the package does not depend on adduser"
grep -q 'adduser --system' "$work/control/postinst" || fail "postinst makes no system user"
grep -q 'deb-systemd-helper enable twinmqd.service' "$work/control/postinst" ||
    fail "postinst does not enable twinmqd.service"
grep -q 'try-restart twinmqd.service' "$work/control/postinst" || fail "postinst does not restart the node on upgrade"
grep -q 'stop twinmqd.service' "$work/control/prerm" || fail "prerm does not stop the node on remove"
grep -q 'TWINMQ_PURGE_DATA' "$work/control/postrm" || fail "postrm does not keep the data on purge"
echo "check-deb: contents, conffiles and maintainer scripts as expected"

# The shipped configuration, as the unit's ExecStartPre checks it.
root="$work/root"
dpkg-deb -x "$deb" "$root"
"$root/usr/bin/twinmqd" --check-config "$root/etc/twinmq/twinmq.toml" || fail "the shipped twinmq.toml fails --check-config"
{ cat "$root/etc/twinmq/twinmq.toml" && echo 'durability = "sometimes"'; } >"$work/bad.toml"
set +e
"$root/usr/bin/twinmqd" --check-config "$work/bad.toml" 2>"$work/bad.err"
status=$?
set -e
[ "$status" = 2 ] || fail "--check-config of a bad file exited $status, not 2"
grep -q durability "$work/bad.err" || fail "--check-config did not name the key: $(cat "$work/bad.err")"
echo "check-deb: --check-config passes the shipped config and refuses a bad one naming the key"

# The unit.
if command -v systemd-analyze >/dev/null; then
    # verify checks that ExecStart's binaries exist: point them at the extracted ones.
    sed "s|/usr/bin/twinmqd|$root/usr/bin/twinmqd|g" "$root$unit_path" >"$work/twinmqd.service"
    systemd-analyze verify "$work/twinmqd.service" 2>&1 | tee "$work/verify.out"
    if grep -v -e 'Failed to connect' -e 'bus' "$work/verify.out" | grep -q .; then
        fail "systemd-analyze verify complained about the unit"
    fi
    score=$(systemd-analyze security --offline=yes "$work/twinmqd.service" 2>/dev/null | grep -i 'overall exposure' || true)
    echo "check-deb: systemd-analyze verify clean; security: ${score:-no score printed}"
else
    loud "SKIPPED: systemd-analyze verify/security of the unit: no systemd-analyze here"
fi

# The real install cycle.
if [ "$(id -u)" != 0 ] || [ "${TWINMQ_PACKAGE_INSTALL:-0}" != 1 ]; then
    loud "SKIPPED: installing the package with dpkg (needs root and TWINMQ_PACKAGE_INSTALL=1: it changes the machine; .ci/run sets it)"
    exit 0
fi
if dpkg -s twinmq >/dev/null 2>&1; then
    fail "a twinmq package is installed already: not touching it"
fi
mode() { stat -c '%U:%G %a' "$1"; }
dpkg -i "$deb"
getent passwd twinmq >/dev/null || fail "install made no twinmq user"
[ "$(mode /var/lib/twinmq)" = "twinmq:twinmq 750" ] || fail "/var/lib/twinmq is $(mode /var/lib/twinmq)"
[ "$(mode /etc/twinmq/twinmq.toml)" = "root:twinmq 640" ] || fail "twinmq.toml is $(mode /etc/twinmq/twinmq.toml)"
echo "check-deb: installed: user twinmq, /var/lib/twinmq twinmq:twinmq 750, twinmq.toml root:twinmq 640"

# Run the node as the unit does (no systemd here to start it): its user, its
# ExecStartPre, READY=1 on NOTIFY_SOCKET, then messages, a reload, a stop.
runuser -u twinmq -- /usr/bin/twinmqd --check-config /etc/twinmq/twinmq.toml
notify="$work/notify.sock"
python3 - "$notify" >"$work/ready" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
import os
os.chmod(sys.argv[1], 0o777)
s.settimeout(60)
print(s.recv(256).decode())
EOF
listener=$!
for _ in $(seq 50); do [ -S "$notify" ] && break; sleep 0.1; done
chmod 755 "$work"
# setpriv execs (runuser would stay the parent and keep our signals from the node).
NOTIFY_SOCKET="$notify" setpriv --reuid=twinmq --regid=twinmq --init-groups \
    /usr/bin/twinmqd --config /etc/twinmq/twinmq.toml 2>"$work/node.log" &
node=$!
wait "$listener" || fail "no READY=1 from the node: $(tail -5 "$work/node.log")"
grep -q 'READY=1' "$work/ready" || fail "the node notified $(cat "$work/ready"), not READY=1"
/usr/bin/twinmq --servers 127.0.0.1:5570 pub deb.check --count 20 | grep -qx 'confirmed 20' ||
    fail "the packaged node did not confirm 20 messages"
/usr/bin/twinmq --servers 127.0.0.1:5570 sub deb.check --count 20 | grep -qx 'received 20' ||
    fail "the packaged node did not deliver the 20 messages"
kill -HUP "$node"
for _ in $(seq 50); do grep -q 'SIGHUP: users of the configuration reloaded' "$work/node.log" && break; sleep 0.1; done
grep -q 'SIGHUP: users of the configuration reloaded' "$work/node.log" || fail "no reload on SIGHUP: $(tail -5 "$work/node.log")"
kill -TERM "$node"
wait "$node" || fail "the node did not stop cleanly: $(tail -5 "$work/node.log")"
node=
[ -n "$(ls -A /var/lib/twinmq/store)" ] || fail "no store in /var/lib/twinmq/store"
echo "check-deb: the packaged node ran as twinmq: READY=1, 20 messages in and out, SIGHUP reload, clean stop"

# Upgrade (the same version again takes the upgrade path) keeps an edited conffile.
echo "# edited by check-deb" >>/etc/twinmq/twinmq.toml
dpkg -i --force-confold "$deb"
grep -q 'edited by check-deb' /etc/twinmq/twinmq.toml || fail "upgrade replaced the edited configuration"
# Remove keeps configuration and data.
dpkg -r twinmq
[ ! -e /usr/bin/twinmqd ] || fail "remove left /usr/bin/twinmqd"
[ -f /etc/twinmq/twinmq.toml ] || fail "remove deleted the configuration"
[ -d /var/lib/twinmq/store ] || fail "remove deleted the data"
# Purge removes the configuration, keeps the data.
dpkg --purge twinmq
[ ! -e /etc/twinmq ] || fail "purge left /etc/twinmq"
[ -d /var/lib/twinmq/store ] || fail "purge deleted the data (only TWINMQ_PURGE_DATA=yes may)"
rm -rf /var/lib/twinmq
deluser --quiet twinmq >/dev/null 2>&1 || true
echo "check-deb: upgrade kept the edited conffile; remove kept config and data; purge removed config, kept data"
echo "check-deb: all checks passed"
