#!/usr/bin/env python3
"""Writes the PyTorch fixtures under tests/fixtures/: inputs, outputs and gradients of F.conv2d,
F.conv_transpose2d, F.linear and of the DoReFa quantizers, so that the Rust tests compare the WGSL
kernels with PyTorch without needing Python.

The quantizers are written from the spec (shared/spec/micronet-dorefa.md) with micronet's autograd
structure: a custom Round (sign * floor(|x| + 0.5), identity backward), and autograd through tanh,
abs and the full-tensor max (no detach), so the weight gradient includes the max term and PyTorch's
even split over ties. Forward levels use the spec's GPU-faithful formula (c * n, not c / s), the
numbers PyTorch gives on CUDA.

Usage: python3 tools/make_fixtures.py   (torch and safetensors, CPU is enough)
Each file holds tensors named "<case>/<name>" and, in the metadata, "<case>" -> JSON arguments.
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


class Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)

    @staticmethod
    def backward(ctx, g):
        return g


class ClampInclusive(torch.autograd.Function):
    """torch.clamp with the gradient mask of PyTorch 2.11 (the spec's reference): the gradient
    passes where lo <= x <= hi, bounds included. PyTorch 2.15 passes 0 exactly at the bounds
    (measured: clamp(x * 0.1, 0, 1) at x = 0 and x = 10), so the fixture does not rely on the
    installed version's rule."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ((x >= ctx.lo) & (x <= ctx.hi)).to(g.dtype), None, None


def act_quant(x, bits):
    if bits == 32:
        return x
    n = float(2**bits - 1)
    c = ClampInclusive.apply(x * 0.1, 0.0, 1.0)
    return Round.apply(c * n) * (1.0 / n)


def weight_quant(w, bits):
    if bits == 32:
        return w
    n = float(2**bits - 1)
    t = torch.tanh(w)
    m = torch.max(torch.abs(t))
    u = t / 2 / m + 0.5
    q = Round.apply(u * n) * (1.0 / n)
    return 2 * q - 1


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float32) * 2 - 1


def grads(out, inputs):
    """Backward of sum(out * r) for a random cotangent r; returns r and the input gradients."""
    r = rand(*out.shape)
    gs = torch.autograd.grad(out, inputs, grad_outputs=r)
    return r, gs


def conv2d_cases():
    tensors, meta = {}, {}
    shapes = [
        dict(batch=2, cin=3, h=8, w=8, cout=4, kernel=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1),
        dict(batch=1, cin=4, h=9, w=7, cout=6, kernel=[5, 5], stride=[2, 2], padding=[2, 2], dilation=[1, 1], groups=2),
        dict(batch=2, cin=6, h=7, w=9, cout=6, kernel=[3, 3], stride=[1, 2], padding=[2, 1], dilation=[2, 2], groups=6),
        dict(batch=3, cin=16, h=5, w=5, cout=70, kernel=[1, 1], stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1),
    ]
    for i, s in enumerate(shapes):
        x = rand(s["batch"], s["cin"], s["h"], s["w"]).requires_grad_()
        w = rand(s["cout"], s["cin"] // s["groups"], *s["kernel"]).requires_grad_()
        b = rand(s["cout"]).requires_grad_()
        y = F.conv2d(x, w, b, s["stride"], s["padding"], s["dilation"], s["groups"])
        r, (dx, dw, db) = grads(y, (x, w, b))
        for k, v in dict(x=x, w=w, b=b, y=y, dy=r, dx=dx, dw=dw, db=db).items():
            tensors[f"{i}/{k}"] = v.detach().contiguous()
        meta[str(i)] = json.dumps(s)
    return tensors, meta


def conv_transpose2d_cases():
    tensors, meta = {}, {}
    shapes = [
        dict(batch=2, cin=4, h=5, w=5, cout=3, kernel=[3, 3], stride=[2, 2], padding=[1, 1], output_padding=[1, 1], dilation=[1, 1], groups=1),
        dict(batch=1, cin=6, h=4, w=3, cout=4, kernel=[3, 2], stride=[1, 2], padding=[0, 1], output_padding=[1, 0], dilation=[2, 1], groups=2),
        dict(batch=2, cin=4, h=3, w=4, cout=8, kernel=[2, 2], stride=[2, 2], padding=[0, 0], output_padding=[0, 0], dilation=[1, 1], groups=4),
    ]
    for i, s in enumerate(shapes):
        x = rand(s["batch"], s["cin"], s["h"], s["w"]).requires_grad_()
        w = rand(s["cin"], s["cout"] // s["groups"], *s["kernel"]).requires_grad_()
        b = rand(s["cout"]).requires_grad_()
        y = F.conv_transpose2d(x, w, b, s["stride"], s["padding"], s["output_padding"], s["groups"], s["dilation"])
        r, (dx, dw, db) = grads(y, (x, w, b))
        for k, v in dict(x=x, w=w, b=b, y=y, dy=r, dx=dx, dw=dw, db=db).items():
            tensors[f"{i}/{k}"] = v.detach().contiguous()
        meta[str(i)] = json.dumps(s)
    return tensors, meta


def linear_cases():
    tensors, meta = {}, {}
    for i, (batch, fin, fout) in enumerate([(5, 7, 3), (50, 192, 10), (3, 130, 70)]):
        x = rand(batch, fin).requires_grad_()
        w = rand(fout, fin).requires_grad_()
        b = rand(fout).requires_grad_()
        y = F.linear(x, w, b)
        r, (dx, dw, db) = grads(y, (x, w, b))
        for k, v in dict(x=x, w=w, b=b, y=y, dy=r, dx=dx, dw=dw, db=db).items():
            tensors[f"{i}/{k}"] = v.detach().contiguous()
        meta[str(i)] = json.dumps(dict(batch=batch, in_features=fin, out_features=fout))
    return tensors, meta


def quant_cases():
    tensors, meta = {}, {}
    i = 0
    for bits in [2, 4, 8]:
        # Activations over both clamp ends, the spec's table, and exact half-way ties.
        table = torch.tensor([-1.0, 0.0, 0.001, 0.5, 0.0196, 5.0, 9.99, 10.0, 10.0000009, 15.0])
        n = 2**bits - 1
        ties = (torch.arange(0, 8, dtype=torch.float32) + 0.5) / n * 10
        x = torch.cat([table, ties, torch.rand(1000) * 14 - 2]).requires_grad_()
        y = act_quant(x, bits)
        r, (dx,) = grads(y, (x,))
        for k, v in dict(x=x, y=y, dy=r, dx=dx).items():
            tensors[f"{i}/{k}"] = v.detach().contiguous()
        meta[str(i)] = json.dumps(dict(kind="act", bits=bits))
        i += 1
    for bits, tie in [(2, False), (4, True), (8, False), (8, True)]:
        w = rand(16, 8, 3, 3) * 1.5
        if tie:  # equal largest |w| at three places: the max gradient is split evenly
            w.view(-1)[[5, 300, 900]] = torch.tensor([2.0, -2.0, 2.0])
        w.requires_grad_()
        t = torch.tanh(w)
        y = weight_quant(w, bits)
        r, (dw,) = grads(y, (w,))
        for k, v in dict(w=w, t=t, y=y, dy=r, dw=dw).items():
            tensors[f"{i}/{k}"] = v.detach().contiguous()
        meta[str(i)] = json.dumps(dict(kind="weight", bits=bits, ties=tie))
        i += 1
    return tensors, meta


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    for name, make in [
        ("conv2d", conv2d_cases),
        ("conv_transpose2d", conv_transpose2d_cases),
        ("linear", linear_cases),
        ("quant", quant_cases),
    ]:
        tensors, meta = make()
        meta["torch"] = torch.__version__
        path = os.path.join(OUT, f"{name}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"{path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
