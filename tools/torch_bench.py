#!/usr/bin/env python3
"""PyTorch's QAT training throughput for the same models and measurement as `wgqat bench`:
nin_gc, nin and resnet18 (tools/models/*.json, written by `wgqat model`; resnet18 is micronet's
models/resnet.py under DoReFa's prepare(): every conv but the first, and fc, quantized; adds float) with the spec's DoReFa quantizers
(tools/torch_reference.py), Adam (lr 0.01, coupled L2 1e-5), cross-entropy, random data already on
the device, images per second over the timed steps after warm-up, and peak memory. --scheme iao
runs micronet's IAO prepare() instead (symmetric, per-channel weights, min-max weight observers:
every conv and Linear, the pools' and adds' inputs; tools/torch_reference.py's IAO modules), and
iao-bn the same with each conv's BatchNorm folded in (bn_fuse).

Usage:
  python3 tools/torch_bench.py [--compile] [--scheme dorefa,iao] [--model nin_gc,nin,resnet18] [--bits 8,32] [--batch 50,128,256]
                               [--warmup 5] [--steps 30] [--json] [--out FILE]
CUDA is used when present (cuDNN's defaults, TF32 allowed as PyTorch allows it by default);
--strict-fp32 turns TF32 off. --out FILE also writes the JSON report to FILE, rewritten after
every row, so that a run stopped by a time limit (tools/gpu_check.sh) leaves the rows it finished.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import Net, micronet_init  # noqa: E402


def bench(spec, bits, batch, args, device, scheme="dorefa"):
    torch.manual_seed(1)
    iao = None
    if scheme in ("iao", "iao-bn") and bits != 32:
        iao = dict(q_type="symmetric", q_level="channel", weight_observer="min-max",
                   bn_fuse=scheme == "iao-bn")
    net = Net(spec, bits, bits, False, iao).to(device)
    micronet_init(net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-5)
    model = torch.compile(net) if args.compile else net
    c, h, w = spec["input"]
    x = torch.randn(batch, c, h, w, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    secs = time.perf_counter() - t0
    return {
        "model": spec["name"],
        "scheme": "iao" if iao else "dorefa",
        "bn_fuse": bool(iao and iao["bn_fuse"]),
        "w_bits": bits,
        "a_bits": bits,
        "batch": batch,
        "img_per_s": args.steps * batch / secs,
        "step_ms": secs / args.steps * 1e3,
        "timed_steps": args.steps,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "mode": "compile" if args.compile else "eager",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def write_report(path, rows):
    """The report as it stands, written beside `path` and renamed over it (never half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"training": rows}, f, indent=2)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--model", default="nin_gc,nin")
    ap.add_argument("--scheme", default="dorefa",
                    help="comma list: dorefa, iao, iao-bn (IAO with BatchNorms folded, bn_fuse)")
    ap.add_argument("--bits", default="8,32")
    ap.add_argument("--batch", default="50,128,256")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--strict-fp32", action="store_true", help="no TF32 on CUDA")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON report here, after every row")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.strict_fp32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for name in args.model.split(","):
        path = name if name.endswith(".json") else os.path.join(here, "models", f"{name}.json")
        spec = json.load(open(path))
        runs = []
        for bits in [int(b) for b in args.bits.split(",")]:
            for scheme in args.scheme.split(","):
                key = (bits, "dorefa" if bits == 32 else scheme)
                if key not in runs:
                    runs.append(key)
        for bits, scheme in runs:
            for batch in [int(b) for b in args.batch.split(",")]:
                r = bench(spec, bits, batch, args, device, scheme)
                rows.append(r)
                if args.out:
                    write_report(args.out, rows)
                if not args.json:
                    mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"
                    prefix = {"iao": "IAO ", "iao-bn": "IAO-BN "}.get(scheme, "")
                    label = "fp32" if bits == 32 else prefix + f"W{bits}A{bits}"
                    print(f"{r['model']:8} {label:9} {batch:5} "
                          f"{r['img_per_s']:10.1f} img/s {r['step_ms']:9.1f} ms/step peak {mem} ({r['mode']}, {r['device']})",
                          flush=True)
    if args.json:
        print(json.dumps({"training": rows}, indent=2))


if __name__ == "__main__":
    main()
