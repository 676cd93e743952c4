"""Compare two heap-probe dumps of the EngineCore: what Python memory grew between them.

    .venv/bin/python benchmarks/heap_probe/diff.py DIR/PID-3 DIR/PID-12 [--top 25]

(paths without the .snap/.json suffix). Prints the traced totals, the top differences by
file:line and by traceback, and the live gc objects whose count changed most.
"""

from __future__ import annotations

import argparse
import json
import tracemalloc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    old, new = (tracemalloc.Snapshot.load(p + ".snap") for p in (args.old, args.new))
    info_old, info_new = (json.load(open(p + ".json")) for p in (args.old, args.new))
    mb = 2**20
    print(f"traced (current, peak) MB: {info_old['traced'][0] / mb:.1f} -> {info_new['traced'][0] / mb:.1f}"
          f"  (peak {info_new['traced'][1] / mb:.1f})")
    print(f"\ntop {args.top} by file:line")
    for stat in new.compare_to(old, "lineno")[: args.top]:
        print(f"  {stat.size_diff / mb:+8.2f} MB {stat.count_diff:+8d} blocks  now {stat.size / mb:7.2f} MB  "
              f"{stat.traceback[0]}")
    print(f"\ntop {min(args.top, 10)} by traceback")
    for stat in new.compare_to(old, "traceback")[: min(args.top, 10)]:
        print(f"  {stat.size_diff / mb:+8.2f} MB {stat.count_diff:+8d} blocks")
        for line in stat.traceback.format()[-16:]:
            print("     " + line)
    print("\nlive gc-tracked objects, largest count changes")
    types = set(info_old["types"]) | set(info_new["types"])
    changes = sorted(((info_new["types"].get(t, 0) - info_old["types"].get(t, 0), t) for t in types),
                     key=lambda x: -abs(x[0]))
    for delta, name in changes[:15]:
        print(f"  {delta:+8d}  {name}  (now {info_new['types'].get(name, 0)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
