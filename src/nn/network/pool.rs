//! Max and average pooling, of the input as it is or (IAO's `QuantMaxPool2d`, `QuantAvgPool2d`,
//! `QuantAdaptiveAvgPool2d`) fake-quantized. Max-pool keeps no index map: its backward finds each
//! window's maximum again in the input it pooled (the same rule, so the same choice).

use super::memory::QuantInput;
use super::quantizers::InputQuant;
use super::{Io, Kind, Layer, Network, Ops};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::maxpool::{self, MaxPoolEpilogue};
use crate::kernels::norm::BnForm;
use crate::kernels::pool::{self, PoolGeom};

pub(super) fn geometry(l: &Layer, batch: usize) -> Result<PoolGeom> {
    let (Kind::MaxPool(win) | Kind::AvgPool(win)) = l.kind else {
        unreachable!("pool::ops is for pooling layers")
    };
    let [c, h, w] = l.in_shape[..] else {
        return Err(Error::Invalid(format!(
            "layer {}: pooling needs (C, H, W)",
            l.name
        )));
    };
    Ok(PoolGeom {
        n: batch,
        c,
        h,
        w,
        kernel: win.kernel,
        stride: win.stride,
        padding: win.padding,
    })
}

/// A max-pool's forward op again (float, with its fused shuffle, its input formed from a
/// BatchNorm's as before where `input_bn`), into the same temporary: the same kernel on the same
/// input, so the same bits.
pub(super) fn recompute(
    l: &Layer,
    gpu: &Gpu,
    (x, y): (&Tensor, &Tensor),
    batch: usize,
    input_bn: Option<BnForm<'_>>,
) -> Result<Op> {
    let Kind::MaxPool(win) = l.kind else {
        unreachable!("pool::recompute is for max-pools")
    };
    let ep = MaxPoolEpilogue {
        shuffle: win.shuffle,
        quantize: None,
    };
    maxpool::maxpool_forward_fused(gpu, &geometry(l, batch)?, x, y, ep, input_bn)
}

pub(super) fn ops(net: &Network, l: &Layer, io: &Io) -> Result<Ops> {
    let geom = geometry(l, io.batch)?;
    let (gpu, x) = (io.gpu, io.x());
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let dx = io.dx().filter(|_| io.train);
    // The pooled input: x, or its quantized copy in the shared temporary.
    let iq = InputQuant::of(net, l)?;
    let xq = match (&io.buf.xq, &iq) {
        (QuantInput::Temporary(t), Some(q)) => {
            let t = super::at_batch(t, io.batch)?;
            if io.train {
                fwd.extend(q.observe(gpu, x, io.buf.observed_by_producer)?);
            }
            fwd.push(q.forward(gpu, x, &t)?);
            Some((q, t))
        }
        _ => None,
    };
    let pooled = xq.as_ref().map_or(x, |(_, t)| t);
    // The BatchNorm whose output is the input, and its input, where the quantizer's backward
    // passes form that output (`LayerBuffers::masks_through_bn`).
    let bn_input = io
        .buf
        .masks_through_bn
        .as_ref()
        .map(|(k, t)| super::at_batch(t, io.batch).map(|t| (*k, t)))
        .transpose()?;
    if let Kind::MaxPool(win) = l.kind {
        let ep = MaxPoolEpilogue {
            shuffle: win.shuffle,
            quantize: io.buf.quantize_output,
        };
        // The input formed from the BatchNorm before, where it is read (x is that BatchNorm's
        // input).
        let input_bn = io.buf.reads_bn[0].map(|k| net.bn_form(k)).transpose()?;
        fwd.push(maxpool::maxpool_forward_fused(
            gpu, &geom, pooled, io.y, ep, input_bn,
        )?);
        if let Some(dx) = dx {
            // The input as the forward pooled it (kept, or formed again: from the BatchNorm
            // before's input, where that BatchNorm's output is not formed again by itself).
            match (&xq, &bn_input) {
                (Some((q, t)), Some((k, bn_in))) => {
                    bwd.push(net.bn_mask_pass(gpu, *k, q, (bn_in, None, Some(t)), io.batch)?)
                }
                (Some((q, t)), None) => bwd.push(q.forward(gpu, x, t)?),
                _ => {}
            }
            // With the sums of the BatchNorm before's backward (see `LayerBuffers::bn_sums`).
            let sums = io.buf.bn_sums.as_ref().filter(|_| input_bn.is_some());
            bwd.push(maxpool::maxpool_backward_with_sums(
                gpu,
                &geom,
                (pooled, io.dy(l)?, dx),
                win.shuffle,
                input_bn,
                sums,
            )?);
        }
    } else {
        fwd.push(pool::avgpool_forward(gpu, &geom, pooled, io.y)?);
        if let Some(dx) = dx {
            bwd.push(pool::avgpool_backward(gpu, &geom, io.dy(l)?, dx)?);
        }
    }
    // The quantizer's straight-through mask, from the float input (or the BatchNorm's input).
    if let (Some(dx), Some((q, _))) = (dx, &xq) {
        match &bn_input {
            Some((k, bn_in)) => bwd.push(net.bn_mask_pass(
                gpu,
                *k,
                q,
                (bn_in, Some((dx, io.buf.bn_sums.as_ref())), None),
                io.batch,
            )?),
            None => bwd.extend(q.backward_in_place(gpu, x, dx)?),
        }
    }
    Ok((fwd, bwd))
}
