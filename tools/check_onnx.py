#!/usr/bin/env python3
"""Runs a `wgqat export --format onnx` model with onnxruntime on a CIFAR-10 binary test set and
compares its predictions with wgqat's (`wgqat eval --predictions` or `wgqat infer --predictions`).

    wgqat data synthetic --out data --train 1 --test 1000
    wgqat export --checkpoint run/last.safetensors --format onnx --out model.onnx
    wgqat eval --checkpoint run/last.safetensors --data data --predictions wgqat.txt
    python3 tools/check_onnx.py --onnx model.onnx --data data --predictions wgqat.txt

An IAO checkpoint exports in the QDQ form (QuantizeLinear/DequantizeLinear, int8/uint8 codes,
per-channel weight scales); compare it with `wgqat eval`'s predictions the same way.
`--logits FILE` (from `--logits` of eval or infer) also compares the logits themselves. Exits 1
when any prediction differs. Needs numpy and onnxruntime (pip install onnxruntime).
"""
import argparse
import os
import sys

import numpy as np
import onnxruntime as ort

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)


def load_test_set(folder, limit):
    """CIFAR-10 test_batch.bin as normalised float32 NCHW images and labels, as wgqat reads it."""
    raw = np.fromfile(os.path.join(folder, "test_batch.bin"), dtype=np.uint8)
    if raw.size % 3073:
        sys.exit(f"{folder}/test_batch.bin: {raw.size} bytes is not a whole number of 3073-byte records")
    rec = raw.reshape(-1, 3073)[:limit]
    labels = rec[:, 0].astype(np.int64)
    x = rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    x = (x - MEAN[None, :, None, None]) / STD[None, :, None, None]
    return x.astype(np.float32), labels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--data", required=True, help="CIFAR-10 binary folder with test_batch.bin")
    ap.add_argument("--predictions", required=True, help="wgqat's predictions, one label per line")
    ap.add_argument("--logits", action="append", default=[], help="wgqat logits, one image per line (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images")
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()

    x, labels = load_test_set(a.data, a.limit)
    want = np.loadtxt(a.predictions, dtype=np.int64, ndmin=1)[: len(x)]
    if len(want) != len(x):
        sys.exit(f"{a.predictions} has {len(want)} predictions for {len(x)} images")
    # Plain sequential execution, no graph rewrites: the model's float steps are kept as written.
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(a.onnx, opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i : i + a.batch]})[0] for i in range(0, len(x), a.batch)])
    got = logits.argmax(axis=1)
    same = int((got == want).sum())
    acc = 100.0 * float((got == labels).mean())
    print(f"onnxruntime {ort.__version__}: {same}/{len(x)} predictions equal to wgqat's; onnx accuracy {acc:.2f}%")
    for path in a.logits:
        theirs = np.loadtxt(path, dtype=np.float32, ndmin=2)[: len(x)]
        d = np.abs(theirs - logits)
        print(f"  logits vs {path}: max abs diff {d.max():.3e}, median {np.median(d):.3e}, max |logit| {np.abs(logits).max():.3f}")
    if same != len(x):
        bad = np.nonzero(got != want)[0][:10]
        for i in bad:
            print(f"  image {i}: onnx {got[i]} (logits {np.round(logits[i], 4).tolist()}), wgqat {want[i]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
