#!/usr/bin/env python3
"""Merges `wgqat bench --json` with tools/torch_bench.py JSON files (eager and/or --compile) into
the Markdown table of BENCHMARKS.md: model, bits, batch, img/s each, ratios, peak memory.

Usage: python3 tools/bench_table.py wgqat.json torch_eager.json [torch_compile.json]

A file that cannot be read (a part of tools/gpu_check.sh that ran past its time limit leaves an
empty or cut-off one) is named on stderr and its columns stay empty: the rest of the table is
still written.
"""
import datetime
import json
import sys


def key(r):
    return (r["model"], r.get("scheme", "dorefa"), r.get("bn_fuse", False), r["w_bits"], r["batch"])


def load(path):
    """The JSON in `path`, or an empty result (and a line on stderr) where it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"bench_table: {path} not read ({e}); its columns stay empty", file=sys.stderr)
        return {"training": []}


def main():
    wgqat = load(sys.argv[1])
    ours = {key(r): r for r in wgqat["training"]}
    theirs = {}
    for path in sys.argv[2:]:
        for r in load(path)["training"]:
            theirs.setdefault(key(r), {})[r["mode"]] = r
    wg = wgqat.get("adapter", {})
    devices = sorted({r.get("device", "?") for t in theirs.values() for r in t.values()})
    torch_versions = sorted({r.get("torch", "?") for t in theirs.values() for r in t.values()})
    print(f"GPU: wgqat on {wg.get('name', '?')} ({wg.get('backend', '?')}, driver {wg.get('driver', '?')} {wg.get('driver_info', '')}); "
          f"PyTorch {', '.join(torch_versions)} on {', '.join(devices)}; measured {datetime.date.today().isoformat()}\n")
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
    print("| model | bits | batch | wgqat img/s | eager img/s | compile img/s | vs eager | vs compile | wgqat memory | eager memory | compile memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in sorted(ours.items()):
        t = theirs.get(k, {})
        e, c = t.get("eager"), t.get("compile")
        ips = r.get("img_per_s")
        fmt = lambda v: "-" if v is None else f"{v:,.0f}"
        ratio = lambda o: "-" if not (ips and o) else f"{ips / o['img_per_s']:.2f}x"
        bits = "fp32" if r["w_bits"] == 32 else f"W{r['w_bits']}A{r['a_bits']}"
        if r.get("scheme", "dorefa") == "iao" and r["w_bits"] != 32:
            bits = ("IAO-BN " if r.get("bn_fuse") else "IAO ") + bits
        print(f"| {r['model']} | {bits} | {r['batch']} | {fmt(ips)} | {fmt(e and e['img_per_s'])} | {fmt(c and c['img_per_s'])} | "
              f"{ratio(e)} | {ratio(c)} | {gib(r.get('peak_memory_bytes'))} | {gib(e and e['peak_memory_bytes'])} | {gib(c and c['peak_memory_bytes'])} |")


if __name__ == "__main__":
    main()
