#!/usr/bin/env bash
# CPU seconds per thread of the given processes over SECS seconds, read from
# /proc/<pid>/task/*/stat (utime + stime; perf does not run in this VM).
#
#   docs/thread-cpu.sh SECS PID [PID...]
set -euo pipefail
secs=$1; shift
tick=$(getconf CLK_TCK)
snap() {
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            [ -r "$t/stat" ] || continue
            # comm may hold spaces: take the fields after the closing paren.
            s=$(cat "$t/stat" 2>/dev/null) || continue
            comm=${s#*(}; comm=${comm%)*}; rest=${s##*) }
            set -- $rest
            echo "$p ${t##*/} ${comm// /_} $(( ${12} + ${13} ))"
        done
    done
}
before=$(snap "$@")
sleep "$secs"
after=$(snap "$@")
join -j1 <(echo "$before" | awk '{print $1"/"$2, $3, $4}' | sort) \
         <(echo "$after" | awk '{print $1"/"$2, $3, $4}' | sort) |
    awk -v tick="$tick" -v secs="$secs" '{d=($5-$3)/tick; if (d>0) printf "%-14s %-20s %6.2f s  %5.1f %%\n", $1, $2, d, 100*d/secs}' |
    sort -k3 -nr
