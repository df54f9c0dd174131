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


class IaoRound(torch.autograd.Function):
    """IAO's clip-STE round (spec iao §1.1): R(v) forward; the gradient passes where
    lo <= v <= hi, the observer's range in v's units (bounds included)."""

    @staticmethod
    def forward(ctx, v, lo, hi):
        ctx.save_for_backward(v, lo, hi)
        return torch.sign(v) * torch.floor(torch.abs(v) + 0.5)

    @staticmethod
    def backward(ctx, g):
        v, lo, hi = ctx.saved_tensors
        return g * ((v >= lo) & (v <= hi)).to(g.dtype), None, None


class IaoObserver(nn.Module):
    """An observer's range (spec iao §1.5): the first call copies the tensor's extremes (per tensor
    "L", per output channel "C" or row "FC"), later calls keep running extremes (MinMax) or a
    moving average with momentum 0.1."""

    def __init__(self, level, moving_average, shape):
        super().__init__()
        self.level, self.moving_average = level, moving_average
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.observed = False

    @torch.no_grad()
    def forward(self, x):
        if self.level == "L":
            lo, hi = x.min().reshape(1), x.max().reshape(1)
        else:
            flat = x.flatten(1)
            lo = flat.min(1)[0].reshape(self.min_val.shape)
            hi = flat.max(1)[0].reshape(self.min_val.shape)
        if self.observed:
            if self.moving_average:
                lo = (1 - 0.1) * self.min_val + 0.1 * lo
                hi = (1 - 0.1) * self.max_val + 0.1 * hi
            else:
                lo, hi = torch.min(lo, self.min_val), torch.max(hi, self.max_val)
        self.observed = True
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)


class BinaryActivation(torch.autograd.Function):
    """wbwtab's binary activation (spec §6.1): sign with 0 -> +1; the gradient passes where
    -1 < x < 1 (exclusive)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ((x > -1) & (x < 1)).to(g.dtype)


class Identity(torch.autograd.Function):
    """Forward f(w), gradient straight through (wbwtab's sign of the weights)."""

    @staticmethod
    def forward(ctx, w, f):
        return f

    @staticmethod
    def backward(ctx, g):
        return g, None


def wbwtab_weight(mod, w_bits):
    """wbwtab's weight quantizer (spec §6.2-§6.3). Binary: the latent weights are centred over
    input channels and clamped to [-1, 1] in place (outside autograd), then B(w)·alpha with
    alpha = mean |w| per output channel (with its gradient); ternary: delta = 0.7 mean |w|,
    alpha = mean of |w| over |w| > delta, t·alpha."""
    w = mod.weight
    dims = tuple(range(1, w.dim()))
    if w_bits == 2:
        with torch.no_grad():
            w.data.copy_((w - w.mean(dim=1, keepdim=True)).clamp(-1, 1))
        alpha = w.abs().mean(dim=dims, keepdim=True)
        b = torch.where(w < 0, -torch.ones_like(w), torch.ones_like(w))
        return Identity.apply(w, b) * alpha
    delta = (0.7 * w.abs().mean(dim=dims, keepdim=True)).detach()
    t = torch.sign(torch.sign(w + delta) + torch.sign(w - delta)).detach()
    mask = (w.abs() > delta).to(w.dtype)
    alpha = (w.abs() * mask).sum(dim=dims, keepdim=True) / mask.sum(dim=dims, keepdim=True)
    return Identity.apply(w, t) * alpha


class IaoHistogramObserver(nn.Module):
    """PTQ's activation observer (spec iao §1.5): the k-th smallest |x|, k = int(percentile *
    numel), as the maximum (the first call copies, later calls average with momentum 0.1); the
    minimum stays 0."""

    def __init__(self, percentile):
        super().__init__()
        self.percentile = percentile
        self.register_buffer("min_val", torch.zeros(1))
        self.register_buffer("max_val", torch.zeros(1))
        self.observed = False

    @torch.no_grad()
    def forward(self, x):
        flat = x.abs().reshape(-1)
        cur = torch.kthvalue(flat, int(self.percentile * flat.numel()), dim=0)[0].reshape(1)
        if self.observed:
            cur = (1 - 0.1) * self.max_val + 0.1 * cur
        self.observed = True
        self.max_val.copy_(cur)


class IaoQuantizer(nn.Module):
    """An IAO fake quantizer as the spec (iao §1.2-§1.5) describes micronet's: buffers scale,
    zero_point (micronet's sign: x ~ s (code + zp)), eps, quant_min_val, quant_max_val and an
    observer; in training the observer takes the input and scale and zero point follow; then
    y = (clamp(R(x/s - zp), qmin, qmax) + zp) s."""

    def __init__(self, bits, q_type, weight, level, moving_average, rows=1, histogram=None):
        super().__init__()
        self.asym = q_type == "asymmetric"
        if self.asym:
            qmin, qmax = 0, 2**bits - (2 if weight else 1)
        else:
            qmin, qmax = (-(2 ** (bits - 1) - 1) if weight else -(2 ** (bits - 1))), 2 ** (bits - 1) - 1
        shape = {"L": (1,), "C": (rows, 1, 1, 1), "FC": (rows, 1)}[level]
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("eps", torch.tensor(torch.finfo(torch.float32).eps))
        self.register_buffer("quant_min_val", torch.tensor(float(qmin)))
        self.register_buffer("quant_max_val", torch.tensor(float(qmax)))
        self.qmin, self.qmax = float(qmin), float(qmax)  # as Python floats: no device sync
        self.observer = (IaoObserver(level, moving_average, shape) if histogram is None
                         else IaoHistogramObserver(histogram))

    @torch.no_grad()
    def update_qparams(self):
        lo, hi = self.observer.min_val, self.observer.max_val
        qmin, qmax = self.qmin, self.qmax
        if self.asym:
            s = torch.max((hi - lo) / float(qmax - qmin), self.eps)
            q = lo / s
            zp = torch.sign(q) * torch.floor(torch.abs(q) + 0.5)
        else:
            s = torch.max(torch.max(lo.abs(), hi.abs()) / (float(qmax - qmin) / 2), self.eps)
            zp = torch.zeros_like(s)
        self.scale.copy_(s)
        self.zero_point.copy_(zp)

    def quantize(self, x):
        s, zp = self.scale, self.zero_point
        v = x / s - zp
        lo = self.observer.min_val / s - zp
        hi = self.observer.max_val / s - zp
        if not self.asym:
            hi = torch.max(lo.abs(), hi.abs())
            lo = -hi
        code = ClampInclusive.apply(IaoRound.apply(v, lo, hi), self.qmin, self.qmax)
        return (code + zp) * s

    def forward(self, x):
        if self.training:
            self.observer(x)
            self.update_qparams()
        return self.quantize(x)


class IaoAdd(nn.Module):
    """micronet's QuantAdd (spec iao §2.1): both observers take their inputs in every mode; their
    union is the shared quantizer's range (scale and zero point follow in training);
    y = Q(res) + Q(shortcut)."""

    def __init__(self, bits, q_type, histogram=None):
        super().__init__()
        observer = (lambda: IaoObserver("L", True, (1,))) if histogram is None else (
            lambda: IaoHistogramObserver(histogram))
        self.observer_res = observer()
        self.observer_shortcut = observer()
        self.activation_quantizer = IaoQuantizer(bits, q_type, False, "L", True)

    def forward(self, res, shortcut):
        self.observer_res(res)
        self.observer_shortcut(shortcut)
        q = self.activation_quantizer
        with torch.no_grad():
            q.observer.min_val.copy_(torch.min(self.observer_res.min_val, self.observer_shortcut.min_val))
            q.observer.max_val.copy_(torch.max(self.observer_res.max_val, self.observer_shortcut.max_val))
        if self.training:
            q.update_qparams()
        return q.quantize(res) + q.quantize(shortcut)


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
    def __init__(self, spec, w_bits, a_bits, quantize_first, iao=None, wbwtab=None):
        """iao: None (DoReFa), or dict(q_type, q_level, weight_observer) for micronet's IAO
        prepare(): every conv, conv_transpose and linear quantized (input per tensor, weight per
        output channel or per layer; conv_transpose per layer), and the inputs of pools."""
        super().__init__()
        self.steps = []
        self.iao = iao
        # One zero image through the layers as they are built gives every input's shape.
        probe = {"input": torch.zeros([1] + spec["input"])}
        first = True
        steps = lower(spec)
        readers = {}
        for n, _, ins in steps:
            for i in ins:
                readers.setdefault(i, []).append(n)
        kinds = {n: l["type"] for n, l, _ in steps}
        # IAO bn_fuse: a conv read only by a BatchNorm folds it (micronet's QuantBNFuseConv2d); a
        # conv without one stays float, as micronet's prepare() leaves it.
        folds, folded_bns = {}, set()
        if iao is not None and iao.get("bn_fuse"):
            for n, l, _ in steps:
                r = readers.get(n, [])
                if l["type"] == "conv" and len(r) == 1 and kinds[r[0]] == "batchnorm":
                    folds[n] = next(bl for bn, bl, _ in steps if bn == r[0])
                    folded_bns.add(r[0])
        # wbwtab's prepare(): counting convs in registration order, the first and last stay
        # float, the others binary or ternary; a ReLU reached after the first conv and before the
        # last becomes the binary activation; Linear stays float.
        n_convs = sum(1 for _, l, _ in steps if l["type"] in ("conv", "conv_transpose"))
        seen = 0
        for name, layer, inputs in steps:
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
            elif kind == "batchnorm" and name not in folded_bns:
                mod = nn.BatchNorm2d(c, eps=layer.get("eps", 1e-5), momentum=layer.get("momentum", 0.1))
            bits = None
            if kind in ("conv", "conv_transpose", "linear"):
                quantized = quantize_first or not first or iao is not None
                bits = (w_bits, a_bits) if quantized else (32, 32)
                first = False
            if mod is not None:
                self._register(name, mod)
            if wbwtab is not None:
                if kind in ("conv", "conv_transpose"):
                    seen += 1
                    if 1 < seen < n_convs and wbwtab["W"] != 32:
                        mod.wbwtab_w = wbwtab["W"]
                if kind in ("conv", "conv_transpose", "linear"):
                    bits = (32, 32)
                if kind == "relu" and 0 < seen < n_convs and wbwtab["A"] == 2:
                    kind = "sign"
            if name in folds:
                bn = folds[name]
                cout = mod.weight.shape[0]
                mod.register_parameter("gamma", nn.Parameter(torch.ones(cout)))
                mod.register_parameter("beta", nn.Parameter(torch.zeros(cout)))
                mod.register_buffer("running_mean", torch.zeros(cout))
                mod.register_buffer("running_var", torch.ones(cout))
                mod.fold_eps, mod.fold_momentum = bn.get("eps", 1e-5), bn.get("momentum", 0.1)
                mod.fold_first, mod.pretrained = True, bool(iao.get("pretrained_model"))
                mod.calib = bool(iao.get("bn_fuse_calib"))
            if iao is not None and iao.get("bn_fuse") and kind == "conv" and name not in folds:
                bits = (32, 32)
            elif iao is not None:
                # PTQ's quantizers are symmetric whatever q_type says.
                q_type = "symmetric" if iao.get("ptq") else iao["q_type"]
                holder = mod
                if kind in ("maxpool", "avgpool", "adaptive_avgpool"):
                    holder = Holder()
                    self._register(name, holder)
                if kind == "add":
                    if len(inputs) != 2:
                        raise ValueError("IAO's QuantAdd adds two tensors")
                    mod = IaoAdd(a_bits, q_type, iao.get("ptq"))
                    self._register(name, mod)
                elif holder is not None and kind != "batchnorm":
                    holder.add_module("activation_quantizer",
                                      IaoQuantizer(a_bits, q_type, False, "L", True,
                                                   histogram=iao.get("ptq")))
                if kind in ("conv", "conv_transpose", "linear"):
                    level = "L"
                    if iao["q_level"] == "channel" and kind != "conv_transpose":
                        level = "C" if kind == "conv" else "FC"
                    holder.add_module("weight_quantizer",
                                      IaoQuantizer(w_bits, q_type, True, level,
                                                   iao["weight_observer"] == "moving-average",
                                                   rows=mod.weight.shape[0]))
                if kind in ("maxpool", "avgpool", "adaptive_avgpool"):
                    mod = holder
            step = (kind, layer, mod, bits, inputs, name)
            with torch.no_grad():
                probe[name] = x if kind in ("batchnorm", "relu", "sign", "add", "shuffle") else self._run(step, probe, 32)
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
        if isinstance(mod, IaoAdd):
            if float_bits is not None:
                return x + t[inputs[1]]
            return mod(x, t[inputs[1]])
        if kind == "sign":
            return BinaryActivation.apply(x) if float_bits is None else x
        if hasattr(mod, "wbwtab_w") and float_bits is None:
            w = wbwtab_weight(mod, mod.wbwtab_w)
            if kind == "conv":
                return F.conv2d(x, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
            return F.conv_transpose2d(x, w, mod.bias, mod.stride, mod.padding, mod.output_padding,
                                      mod.groups, mod.dilation)
        if hasattr(mod, "gamma") and float_bits is None:
            return Net._folded(mod, x)
        if hasattr(mod, "activation_quantizer"):
            # IAO: the module's own quantizers replace DoReFa's (float_bits: a shape probe).
            if float_bits is None:
                x = mod.activation_quantizer(x)
            if kind in ("maxpool", "avgpool", "adaptive_avgpool"):
                mod = None
            else:
                w = mod.weight if float_bits is not None else mod.weight_quantizer(mod.weight)
                bits = (32, 32)
                if kind == "conv":
                    return F.conv2d(x, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
                if kind == "conv_transpose":
                    return F.conv_transpose2d(x, w, mod.bias, mod.stride, mod.padding, mod.output_padding,
                                              mod.groups, mod.dilation)
                return F.linear(x, w, mod.bias)
        if kind == "conv":
            return F.conv2d(act_quant(x, bits[1]), weight_quant(mod.weight, bits[0]), mod.bias, mod.stride,
                            mod.padding, mod.dilation, mod.groups)
        if kind == "conv_transpose":
            return F.conv_transpose2d(act_quant(x, bits[1]), weight_quant(mod.weight, bits[0]), mod.bias,
                                      mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
        if kind == "linear":
            return F.linear(act_quant(x, bits[1]), weight_quant(mod.weight, bits[0]), mod.bias)
        if kind == "batchnorm":
            return x if mod is None else mod(x)
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

    @staticmethod
    def _folded(mod, x):
        """micronet's QuantBNFuseConv2d (spec iao §3): training folds the batch statistics of
        the float conv (unbiased variance, gradients through them) and updates the running ones
        (the first call copies unless pretrained); evaluation folds the running ones."""
        conv = lambda inp, w, b: F.conv2d(inp, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)
        if mod.training:
            y0 = conv(x, mod.weight, mod.bias)
            mu = y0.mean(dim=(0, 2, 3))
            var = y0.var(dim=(0, 2, 3))
            with torch.no_grad():
                if mod.fold_first and not mod.pretrained:
                    mod.running_mean.copy_(mu)
                    mod.running_var.copy_(var)
                else:
                    m = mod.fold_momentum
                    mod.running_mean.copy_((1 - m) * mod.running_mean + m * mu)
                    mod.running_var.copy_((1 - m) * mod.running_var + m * var)
                mod.fold_first = False
        else:
            mu, var = mod.running_mean, mod.running_var
        std = torch.sqrt(var + mod.fold_eps)
        if mod.bias is not None:
            b_f = mod.beta + (mod.bias - mu) * (mod.gamma / std)
        else:
            b_f = mod.beta - mu * (mod.gamma / std)
        if mod.training and mod.calib:
            # bn_fuse_calib: the weight folded with the running variance (after this step's
            # update, a constant), the quantized conv rescaled to the batch's.
            std_r = torch.sqrt(mod.running_var + mod.fold_eps)
            w_f = mod.weight * (mod.gamma / std_r).reshape(-1, 1, 1, 1)
            y = conv(mod.activation_quantizer(x), mod.weight_quantizer(w_f), None)
            return y * (std_r / std).reshape(1, -1, 1, 1) + b_f.reshape(1, -1, 1, 1)
        w_f = mod.weight * (mod.gamma / std).reshape(-1, 1, 1, 1)
        return conv(mod.activation_quantizer(x), mod.weight_quantizer(w_f), b_f)

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
    # Here, not at the top: tools/torch_bench.py imports the models without it.
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model JSON (wgqat's layer vocabulary)")
    ap.add_argument("--bits", type=int, default=8, help="w and a bits (32 = float)")
    ap.add_argument("--quantize-first-layer", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--wd", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scheme", choices=["dorefa", "iao", "wbwtab"], default="dorefa")
    ap.add_argument("--W", type=int, choices=[2, 3, 32], default=2, help="wbwtab weights: binary, ternary, float")
    ap.add_argument("--A", type=int, choices=[2, 32], default=2, help="wbwtab activations: binary, float")
    ap.add_argument("--q-type", choices=["symmetric", "asymmetric"], default="symmetric")
    ap.add_argument("--q-level", choices=["channel", "layer"], default="channel")
    ap.add_argument("--weight-observer", choices=["min-max", "moving-average"], default="min-max")
    ap.add_argument("--ptq", type=float, metavar="PERCENTILE",
                    help="IAO post-training quantization: histogram observers at this percentile; "
                         "--steps training-mode forward passes on the batch, no backward")
    ap.add_argument("--bn-fuse", action="store_true", help="IAO: fold each conv's BatchNorm into it")
    ap.add_argument("--bn-fuse-calib", action="store_true",
                    help="IAO --bn-fuse: fold W with the running variance, rescale the conv to the batch's")
    ap.add_argument("--pretrained-model", action="store_true",
                    help="IAO --bn-fuse: the first step updates the running statistics instead of copying")
    ap.add_argument("--steps", type=int, default=1,
                    help="IAO: SGD steps on the batch (the second shows the observers' update rule)")
    ap.add_argument("--init-only", action="store_true", help="write just the initial state dict")
    ap.add_argument("--data", help="CIFAR-10 binary folder: use its first batch (no shuffle, no augmentation)")
    ap.add_argument("--init-out", help="also write the initial state dict here (for wgqat train --init)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    spec = json.load(open(args.model))
    torch.manual_seed(args.seed)
    iao = None
    if args.scheme == "iao":
        iao = dict(q_type=args.q_type, q_level=args.q_level, weight_observer=args.weight_observer,
                   ptq=args.ptq, bn_fuse=args.bn_fuse, pretrained_model=args.pretrained_model,
                   bn_fuse_calib=args.bn_fuse_calib)
    wbwtab = dict(W=args.W, A=args.A) if args.scheme == "wbwtab" else None
    net = Net(spec, args.bits, args.bits, args.quantize_first_layer, iao, wbwtab)
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
    if wbwtab is not None:
        # One SGD step (micronet's wbwtab: weight decay 0 by default): loss, gradients, and the
        # state after it, whose binary weights were centred in place by the forward.
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        for n, p in net.named_parameters():
            out[f"grad.{n}"] = p.grad.detach().clone()
        opt.step()
        out["loss"] = loss.detach().reshape(1)
        out.update(state(net, "sgd"))
        meta = {"config": json.dumps(dict(bits=32, lr=args.lr, momentum=args.momentum, wd=args.wd,
                                          batch=args.batch, scheme=wbwtab)),
                "model": json.dumps(spec), "torch": torch.__version__}
        save_file(out, args.out, metadata=meta)
        print(f"{args.out}: loss {loss.item()}")
        return
    if iao is not None and args.ptq:
        # Calibration: training-mode forward passes, nothing learned; the state after them.
        net.train()
        for _ in range(args.steps):
            net(x)
        out.update(state(net, "after"))
        meta = {"config": json.dumps(dict(bits=args.bits, batch=args.batch, steps=args.steps, lr=args.lr,
                                          momentum=args.momentum, wd=args.wd, scheme=iao)),
                "model": json.dumps(spec), "torch": torch.__version__}
        save_file(out, args.out, metadata=meta)
        print(f"{args.out}: calibrated over {args.steps} forward passes")
        return
    if iao is not None:
        # SGD steps on the batch: loss of each, gradients of the first, the state after the last
        # (quantizer scales, zero points and observer ranges included).
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        losses = []
        for k in range(args.steps):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), labels)
            loss.backward()
            if k == 0:
                for n, p in net.named_parameters():
                    out[f"grad.{n}"] = p.grad.detach().clone()
            opt.step()
            losses.append(loss.item())
            out[f"loss{k}"] = loss.detach().reshape(1)
        out["loss"] = out["loss0"].clone()
        out.update(state(net, "sgd"))
        meta = {"config": json.dumps(dict(bits=args.bits, lr=args.lr, momentum=args.momentum, wd=args.wd,
                                          batch=args.batch, steps=args.steps, scheme=iao)),
                "model": json.dumps(spec), "torch": torch.__version__}
        save_file(out, args.out, metadata=meta)
        print(f"{args.out}: losses {losses}")
        return
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
