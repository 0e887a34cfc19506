#!/usr/bin/env python3
"""Sum a folded CPU profile (twinmqd built with `--features profile`, see
src/bin/twinmqd.rs) per thread and per function.

usage: docs/profile-top.py FILE [N] [THREAD-SUBSTRING]

Prints the samples per thread, then the N (default 40) functions with the
most samples of their own (innermost frame; innermost frame with a path;
innermost frame of ours, twinmq_*) and the N with the most samples
inclusive (anywhere on the stack), optionally only for threads whose name
contains THREAD-SUBSTRING. Names are shortened: generic arguments and the
hash suffix are dropped.
"""
import collections
import re
import sys


def short(name):
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    out, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out) or name


def main():
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    only = sys.argv[3] if len(sys.argv) > 3 else None
    threads = collections.Counter()
    own = collections.Counter()
    incl = collections.Counter()
    ours = collections.Counter()
    named = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        count = int(count)
        parts = stack.split(";")
        thread = re.sub(r"\d+", "N", parts[0])
        threads[thread] += count
        if only and only not in parts[0]:
            continue
        frames = [short(f) for f in parts[1:]]
        total += count
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        # Innermost function with a path (inlined frames carry none), and
        # innermost function of ours: who pays for what runs below it.
        path = next((f for f in reversed(frames) if "::" in f), "?")
        named[path] += count
        raw = parts[1:]
        mine = next((f[:140] for f in reversed(raw) if "twinmq" in f), "(not ours)")
        ours[mine] += count
    alls = sum(threads.values())
    print(f"samples: {alls}")
    for t, c in threads.most_common():
        print(f"{c:8d} {100.0 * c / alls:5.1f}%  {t}")
    print(f"\nown ({total} samples{' in ' + only if only else ''}):")
    for f, c in own.most_common(n):
        print(f"{c:8d} {100.0 * c / max(total, 1):5.1f}%  {f}")
    print("\nown, innermost function with a path:")
    for f, c in named.most_common(n):
        print(f"{c:8d} {100.0 * c / max(total, 1):5.1f}%  {f}")
    print("\nunder our innermost function:")
    for f, c in ours.most_common(n):
        print(f"{c:8d} {100.0 * c / max(total, 1):5.1f}%  {f}")
    print("\ninclusive:")
    for f, c in incl.most_common(n):
        print(f"{c:8d} {100.0 * c / max(total, 1):5.1f}%  {f}")


if __name__ == "__main__":
    main()
