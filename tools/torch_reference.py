#!/usr/bin/env python3
"""PyTorch reference of wgqat's training step, written from the spec (shared/spec/micronet-dorefa.md).

Builds a model from wgqat's JSON layer vocabulary in PyTorch (modules registered under the layers'
names, so state-dict keys are the same), applies micronet's prepare() rule (every Conv2d /
ConvTranspose2d / Linear quantized except the first, unless --quantize-first-layer), and from
one initialisation on one batch records:
  init.<key>   the state dict before training (float latent weights, BN buffers)
  input, labels, loss
  grad.<param> the gradient of every parameter
  sgd.<key>    the state after one torch.optim.SGD step
  adam.<key>   the state after one torch.optim.Adam step (coupled L2, micronet's optimizer)
into a safetensors file the Rust parity test compares with.

Usage:
  python3 tools/torch_reference.py --model tests/fixtures/tiny_nin_gc.json --bits 8 \
      --out tests/fixtures/parity_w8a8.safetensors
  python3 tools/torch_reference.py --model nin_gc.json --init-only --out init.safetensors

One step of micronet's nin_gc against wgqat on the first batch of a CIFAR-10 binary folder:
  wgqat model nin_gc > nin_gc.json
  python3 tools/torch_reference.py --model nin_gc.json --data DIR --batch 50 --lr 0.01 \
      --init-out init.safetensors --out ref.safetensors
  wgqat train --init init.safetensors --data DIR --optimizer sgd --no-augment --no-shuffle \
      --steps 1 --batch-size 50 --out run
  python3 tools/compare_step.py ref.safetensors run
"""
import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


class Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)

    @staticmethod
    def backward(ctx, g):
        return g


class ClampInclusive(torch.autograd.Function):
    """clamp with PyTorch 2.11's gradient mask (bounds included); see make_fixtures.py."""

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
    return Round.apply(ClampInclusive.apply(x * 0.1, 0.0, 1.0) * n) * (1.0 / n)


def weight_quant(w, bits):
    if bits == 32:
        return w
    n = float(2**bits - 1)
    t = torch.tanh(w)
    m = torch.max(torch.abs(t))
    q = Round.apply((t / 2 / m + 0.5) * n) * (1.0 / n)
    return 2 * q - 1


def pair(v):
    return tuple(v) if isinstance(v, list) else (v, v)


class Holder(nn.Module):
    """A container so that modules can live under dotted names like model.4.conv."""


def lower(spec):
    """The layer vocabulary as steps (name, layer, input names), in registration order, as the
    README's "Models from JSON" describes it: a layer without a name is `layers.{i}` at the top
    level and `{container}.{i}` inside a sequential; a residual block's body is
    `{block}.residual_function.{i}`, its shortcut `{block}.shortcut.{i}` (empty: identity), then
    `{block}.add` of the two and `{block}.relu`; an add sums tensors named by layer (or "input")."""
    steps = []
    names = {"input": "input"}

    def seq(layers, prefix, x):
        for i, layer in enumerate(layers):
            path = layer.get("name") or (f"layers.{i}" if prefix is None else f"{prefix}.{i}")
            x = one(layer, path, x)
        return x

    def one(layer, path, x):
        kind = layer["type"]
        if kind == "sequential":
            out = seq(layer["layers"], path, x)
        elif kind == "residual":
            b = seq(layer["body"], f"{path}.residual_function", x)
            s = seq(layer["shortcut"], f"{path}.shortcut", x) if layer.get("shortcut") else x
            steps.append((f"{path}.add", {"type": "add"}, [b, s]))
            out = f"{path}.add"
            if layer.get("relu", True):
                steps.append((f"{path}.relu", {"type": "relu"}, [out]))
                out = f"{path}.relu"
        elif kind == "add":
            steps.append((path, layer, [names[n] for n in layer["inputs"]]))
            out = path
        else:
            steps.append((path, layer, [x]))
            out = path
        names[path] = out
        return out

    seq(spec["layers"], None, "input")
    return steps


class Net(nn.Module):
    def __init__(self, spec, w_bits, a_bits, quantize_first):
        super().__init__()
        self.steps = []
        # One zero image through the layers as they are built gives every input's shape.
        probe = {"input": torch.zeros([1] + spec["input"])}
        first = True
        for name, layer, inputs in lower(spec):
            kind = layer["type"]
            x = probe[inputs[0]]
            c = x.shape[1]
            mod = None
            if kind == "conv":
                g = layer.get("groups", 1)
                mod = nn.Conv2d(c, layer["out"], pair(layer["kernel"]), pair(layer.get("stride", 1)),
                                pair(layer.get("padding", 0)), pair(layer.get("dilation", 1)), g,
                                bias=layer.get("bias", True))
            elif kind == "conv_transpose":
                g = layer.get("groups", 1)
                mod = nn.ConvTranspose2d(c, layer["out"], pair(layer["kernel"]), pair(layer.get("stride", 1)),
                                         pair(layer.get("padding", 0)), pair(layer.get("output_padding", 0)), g,
                                         bias=layer.get("bias", True), dilation=pair(layer.get("dilation", 1)))
            elif kind == "linear":
                mod = nn.Linear(c, layer["out"], bias=layer.get("bias", True))
            elif kind == "batchnorm":
                mod = nn.BatchNorm2d(c, eps=layer.get("eps", 1e-5), momentum=layer.get("momentum", 0.1))
            bits = None
            if kind in ("conv", "conv_transpose", "linear"):
                quantized = quantize_first or not first
                bits = (w_bits, a_bits) if quantized else (32, 32)
                first = False
            if mod is not None:
                self._register(name, mod)
            step = (kind, layer, mod, bits, inputs, name)
            with torch.no_grad():
                probe[name] = x if kind in ("batchnorm", "relu", "add", "shuffle") else self._run(step, probe, 32)
            self.steps.append(step)
        self.spec = spec

    def _register(self, dotted, mod):
        parent = self
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, Holder())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], mod)

    @staticmethod
    def _run(step, t, float_bits=None):
        kind, layer, mod, bits, inputs, _ = step
        x = t[inputs[0]]
        if bits is not None and float_bits is not None:
            bits = (float_bits, float_bits)
        if kind == "conv":
            return F.conv2d(act_quant(x, bits[1]), weight_quant(mod.weight, bits[0]), mod.bias, mod.stride,
                            mod.padding, mod.dilation, mod.groups)
        if kind == "conv_transpose":
            return F.conv_transpose2d(act_quant(x, bits[1]), weight_quant(mod.weight, bits[0]), mod.bias,
                                      mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
        if kind == "linear":
            return F.linear(act_quant(x, bits[1]), weight_quant(mod.weight, bits[0]), mod.bias)
        if kind == "batchnorm":
            return mod(x)
        if kind == "relu":
            return F.relu(x)
        if kind == "add":
            # Float, as micronet's DoReFa leaves Add; summed left to right.
            out = x
            for name in inputs[1:]:
                out = out + t[name]
            return out
        if kind == "maxpool":
            return F.max_pool2d(x, pair(layer["kernel"]), pair(layer.get("stride", layer["kernel"])),
                                pair(layer.get("padding", 0)))
        if kind == "avgpool":
            return F.avg_pool2d(x, pair(layer["kernel"]), pair(layer.get("stride", layer["kernel"])),
                                pair(layer.get("padding", 0)))
        if kind == "adaptive_avgpool":
            return F.adaptive_avg_pool2d(x, pair(layer.get("output", 1)))
        if kind == "shuffle":
            n, c, h, w = x.shape
            g = layer["groups"]
            return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        if kind == "flatten":
            return x.reshape(x.shape[0], -1)
        raise ValueError(f"unknown layer type {kind}")

    def forward(self, x):
        t = {"input": x}
        for step in self.steps:
            t[step[5]] = self._run(step, t)
        return t[self.steps[-1][5]]


def first_batch(folder, n):
    """The first n records of data_batch_1.bin, normalised as micronet's test transform."""
    import os
    import numpy as np
    path = os.path.join(folder, "data_batch_1.bin")
    if not os.path.exists(path):
        path = os.path.join(folder, "cifar-10-batches-bin", "data_batch_1.bin")
    rec = np.fromfile(path, dtype=np.uint8)[: n * 3073].reshape(n, 3073)
    labels = torch.from_numpy(rec[:, 0].astype(np.int64))
    x = torch.from_numpy(rec[:, 1:].astype(np.float32).reshape(n, 3, 32, 32)) / 255.0
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    return (x - mean) / std, labels


def micronet_init(net):
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def state(net, prefix):
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model JSON (wgqat's layer vocabulary)")
    ap.add_argument("--bits", type=int, default=8, help="w and a bits (32 = float)")
    ap.add_argument("--quantize-first-layer", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--wd", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init-only", action="store_true", help="write just the initial state dict")
    ap.add_argument("--data", help="CIFAR-10 binary folder: use its first batch (no shuffle, no augmentation)")
    ap.add_argument("--init-out", help="also write the initial state dict here (for wgqat train --init)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    spec = json.load(open(args.model))
    torch.manual_seed(args.seed)
    net = Net(spec, args.bits, args.bits, args.quantize_first_layer)
    micronet_init(net)
    if args.init_only:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, args.out)
        print(f"{args.out}: initial state of {len(net.state_dict())} tensors")
        return
    init = {k: v.clone() for k, v in net.state_dict().items()}
    if args.init_out:
        save_file({k: v.detach().contiguous() for k, v in init.items()}, args.init_out)
    c, h, w = spec["input"]
    if args.data:
        x, labels = first_batch(args.data, args.batch)
    else:
        x = torch.randn(args.batch, c, h, w)
        labels = torch.randint(0, 10, (args.batch,))
    out = {"input": x, "labels": labels.to(torch.int64)}
    out.update(state(net, "init"))

    results = {}
    for name, make in [
        ("sgd", lambda p: torch.optim.SGD(p, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)),
        ("adam", lambda p: torch.optim.Adam(p, lr=args.lr, weight_decay=args.wd)),
    ]:
        net.load_state_dict(init)
        net.train()
        opt = make(net.parameters())
        opt.zero_grad()
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        if name == "sgd":
            out["loss"] = loss.detach().reshape(1)
            for k, p in net.named_parameters():
                out[f"grad.{k}"] = p.grad.detach().clone()
        opt.step()
        out.update(state(net, name))
        results[name] = loss.item()
    meta = {"config": json.dumps(dict(bits=args.bits, quantize_first_layer=args.quantize_first_layer,
                                      lr=args.lr, momentum=args.momentum, wd=args.wd, batch=args.batch)),
            "model": json.dumps(spec), "torch": torch.__version__}
    save_file(out, args.out, metadata=meta)
    print(f"{args.out}: loss {results}")


if __name__ == "__main__":
    main()
