#!/usr/bin/env python3
"""Compares one wgqat training step with tools/torch_reference.py's: the loss (from the run's
metrics.jsonl) and every tensor of the run's last.safetensors against the reference's state after
its SGD step ("sgd." prefix; use --prefix adam. for an Adam run).

Usage: python3 tools/compare_step.py ref.safetensors RUN_DIR [--prefix sgd.]
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("run")
    ap.add_argument("--prefix", default="sgd.")
    a = ap.parse_args()
    ref = load_file(a.reference)
    ours = load_file(os.path.join(a.run, "last.safetensors"))
    lines = [json.loads(l) for l in open(os.path.join(a.run, "metrics.jsonl"))]
    loss = [l for l in lines if l["kind"] == "train"][0]["loss"]
    print(f"loss: wgqat {loss:.7f}  pytorch {float(ref['loss']):.7f}  difference {abs(loss - float(ref['loss'])):.2e}")
    worst = 0.0
    for k, v in sorted(ours.items()):
        r = ref[a.prefix + k]
        if v.dtype == torch.int64:
            same = int(v) == int(r)
            print(f"{k:35s} {'equal' if same else f'{int(v)} vs {int(r)}'}")
            continue
        d = (v.double() - r.double()).abs().max().item()
        top = r.double().abs().max().item()
        rel = d / max(top, 1e-30)
        # A conv bias right before a BatchNorm gets no gradient in exact arithmetic; after one step
        # both sides hold rounding noise (~1e-8), where a relative difference means nothing.
        noise = top < 1e-6
        if not noise:
            worst = max(worst, rel)
        print(f"{k:35s} max |difference| {d:.2e} (relative to the tensor's max {rel:.2e})"
              + ("  [tensor is rounding noise, max below 1e-6]" if noise else ""))
    print(f"largest relative difference (tensors above 1e-6): {worst:.2e}")


if __name__ == "__main__":
    main()
