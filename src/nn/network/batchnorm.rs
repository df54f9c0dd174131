//! BatchNorm (with the ReLU and channel shuffle fused into it, and the next layer's activation
//! quantizer where the memory planner asks): batch statistics and running-statistics update in
//! training, running statistics in evaluation; the backward pass; and the recompute of its
//! output for a consumer's backward. Where its reader forms its output as it loads its input
//! (a conv, `QuantInput::ThroughBn`; a max-pool; a residual block's float add), the output is
//! never written.

use super::Gemm;
use super::quantizers::InputQuant;
use super::{Io, Kind, Layer, Network, Ops, with_batch};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::conv2d::{self, InputBn};
use crate::kernels::maxpool;
use crate::kernels::norm::{self, BnForm, Epilogue};
use crate::quant::Bits;

pub(super) fn ops(net: &Network, l: &Layer, io: &Io) -> Result<Ops> {
    let Kind::BatchNorm { eps, momentum, ep } = l.kind else {
        unreachable!("batchnorm::ops is for BatchNorm layers")
    };
    let (gpu, batch) = (io.gpu, io.batch);
    let (gamma, beta) = (
        net.param(l.weight)?.expect("gamma"),
        net.param(l.bias)?.expect("beta"),
    );
    let (rm, rv) = l.running.expect("running stats");
    let (rm, rv) = (
        net.running.view(&net.running_arena, rm)?,
        net.running.view(&net.running_arena, rv)?,
    );
    let stats = l.bn_stats.as_ref().expect("bn stats");
    let x4 = io.x().reshape(&with_batch(batch, &l.in_shape))?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    if io.train {
        if batch * l.in_shape[1..].iter().product::<usize>() < 2 {
            return Err(Error::Invalid(format!(
                "layer {}: BatchNorm needs more than one value per channel to train: use a batch size of at least 2",
                l.name
            )));
        }
        match partials_of_conv(net, io)? {
            Some((partials, tile)) => fwd.push(norm::stats_merge(
                gpu,
                norm::BnShape::of(x4.shape())?,
                (partials, tile),
                eps,
                momentum,
                (&gamma, &beta),
                stats,
                &rm,
                &rv,
            )?),
            None => fwd.push(norm::stats_train(
                gpu,
                &x4,
                eps,
                momentum,
                (&gamma, &beta),
                stats,
                &rm,
                &rv,
            )?),
        }
    } else {
        fwd.push(norm::stats_eval(
            gpu,
            l.in_shape[0],
            eps,
            (&gamma, &beta),
            &rm,
            &rv,
            stats,
        )?);
    }
    // (Formed by its reader: the statistics are all this BatchNorm's forward writes.)
    if !io.buf.formed_by_reader {
        let fwd_ep = Epilogue {
            quantize: io.buf.quantize_output,
            ..ep
        };
        // The extremes of the output for the IAO quantizer that reads it, where it observes.
        let extremes = io
            .buf
            .extremes_for
            .filter(|_| io.train && !super::quantizers::frozen(net))
            .and_then(|j| net.layers[j].input_q.as_ref())
            .and_then(|slot| slot.q.produced_extremes());
        fwd.push(match extremes {
            Some(e) => norm::apply_extremes(gpu, fwd_ep, &x4, stats, (&gamma, &beta), io.y, e)?,
            None => norm::apply(gpu, fwd_ep, &x4, stats, &gamma, &beta, io.y)?,
        });
    }
    if io.train {
        let (dg, db) = (
            net.grad(l.weight)?.expect("gamma"),
            net.grad(l.bias)?.expect("beta"),
        );
        // Where the conv before applies the rest of the backward as it loads its output
        // gradient (`LayerBuffers::backward_by_conv`), only the reduction here.
        let dx = io.dx().filter(|_| !io.buf.backward_by_conv);
        match sums_of_reader(net, io, &x4)? {
            // The layer after formed the reduction's sums (see `LayerBuffers::bn_sums`).
            Some((sums, tile)) => {
                bwd.push(norm::backward_merge(
                    gpu,
                    norm::BnShape::of(x4.shape())?,
                    (sums, tile),
                    stats,
                    &gamma,
                    (&dg, &db),
                )?);
                if let Some(dx) = dx {
                    bwd.push(norm::backward_apply(
                        gpu,
                        ep,
                        &x4,
                        io.dy(l)?,
                        stats,
                        (&gamma, &beta),
                        (&dg, &db),
                        dx,
                    )?);
                }
            }
            None => bwd.extend(norm::backward(
                gpu,
                ep,
                &x4,
                io.dy(l)?,
                stats,
                &gamma,
                &beta,
                &dg,
                &db,
                dx,
            )?),
        }
    }
    Ok((fwd, bwd))
}

/// The backward sums the layer after formed for this BatchNorm as it wrote its output gradient
/// (a conv's grad-input, a max-pool's backward, or the IAO pass that masks it), and how many
/// tiles, where it forms them (`x`: the BatchNorm's input).
fn sums_of_reader<'a>(
    net: &Network,
    io: &'a Io,
    x: &Tensor,
) -> Result<Option<(&'a Tensor, usize)>> {
    let (Some(i), Some(sums)) = (io.buf.sums_from, io.buf.bn_sums.as_ref()) else {
        return Ok(None);
    };
    let reader = &net.layers[i];
    if io.buf.formed_in_mask_pass {
        // The reader's IAO mask pass formed them (`norm::apply_iao`).
        return Ok(Some((
            sums,
            norm::iao_sum_tiles(norm::BnShape::of(x.shape())?),
        )));
    }
    if super::weighted::grad_input_on_coop(io.gpu, reader).is_some() {
        // Per-image [C, H, W]: one column per input pixel.
        let columns = io.batch * reader.in_shape[1] * reader.in_shape[2];
        return Ok(Some((
            sums,
            columns.div_ceil(crate::kernels::conv_coop::TILE),
        )));
    }
    let tiles = match reader.kind {
        Kind::Weighted { op, .. } => {
            match Gemm::new(op, io.batch, &reader.in_shape, &reader.out_shape) {
                Gemm::Conv(g) => Some(conv2d::grad_input_bn_sum_tiles(io.gpu, &g)),
                _ => None,
            }
        }
        Kind::MaxPool(_) => maxpool::bn_sum_tiles(&super::pool::geometry(reader, io.batch)?),
        _ => None,
    };
    Ok(tiles.map(|t| (sums, t)))
}

/// The partial statistics the conv before formed for this BatchNorm, and their tile width
/// (the fp32 kernel's forward tile, or the cooperative-matrix kernel's), where it forms them.
fn partials_of_conv<'a>(net: &Network, io: &'a Io) -> Result<Option<(&'a Tensor, usize)>> {
    let (Some(i), Some(partials)) = (io.buf.stats_from, io.buf.bn_partials.as_ref()) else {
        return Ok(None);
    };
    let conv = &net.layers[i];
    if super::weighted::forward_on_coop(io.gpu, conv).is_some() {
        return Ok(Some((partials, crate::kernels::conv_coop::TILE)));
    }
    let Kind::Weighted { op, .. } = conv.kind else {
        return Ok(None);
    };
    match Gemm::new(op, io.batch, &conv.in_shape, &conv.out_shape) {
        Gemm::Conv(g) => Ok(Some((partials, conv2d::forward_tile_columns(io.gpu, &g)))),
        _ => Ok(None),
    }
}

/// The forward op again, into the same temporary: the same kernel on the same input with this
/// step's batch statistics, so the same bits (float: a fused quantizer is not applied again).
pub(super) fn recompute(
    gpu: &Gpu,
    net: &Network,
    l: &Layer,
    x: &Tensor,
    y: &Tensor,
    batch: usize,
) -> Result<Op> {
    let Kind::BatchNorm { ep, .. } = l.kind else {
        unreachable!("batchnorm::recompute is for BatchNorm layers")
    };
    let p = |k: Option<usize>| {
        net.param(k)
            .map(|t| t.expect("BatchNorm has gamma and beta"))
    };
    let x4 = x.reshape(&with_batch(batch, &l.in_shape))?;
    let stats = l.bn_stats.as_ref().expect("bn stats");
    norm::apply(gpu, ep, &x4, stats, &p(l.weight)?, &p(l.bias)?, y)
}

/// What a mask pass reads and writes ([`Network::bn_mask_pass`]): the BatchNorm's input, the
/// gradient to mask (with the scratch for the BatchNorm's backward sums, where they are formed
/// there), and where to write the quantized output.
pub(super) type MaskPass<'a> = (
    &'a Tensor,
    Option<(&'a Tensor, Option<&'a Tensor>)>,
    Option<&'a Tensor>,
);

impl Network {
    /// In the backward pass of the layer that reads BatchNorm layer `k`'s output under the IAO
    /// quantizer `q` (`LayerBuffers::masks_through_bn`): that output formed again from the
    /// BatchNorm's input `x`, then `dx` masked and/or the quantized output written `into`, in
    /// one pass (`norm::apply_iao`); with `dx`'s scratch, the BatchNorm's backward sums too
    /// (`LayerBuffers::bn_sums`), which its backward merges.
    pub(super) fn bn_mask_pass(
        &self,
        gpu: &Gpu,
        k: usize,
        q: &InputQuant<'_>,
        (x, dx, into): MaskPass<'_>,
        batch: usize,
    ) -> Result<Op> {
        let l = &self.layers[k];
        let (Kind::BatchNorm { ep, .. }, InputQuant::Iao { slot, state, .. }) = (l.kind, q) else {
            return Err(Error::Invalid(format!(
                "layer {}: only a BatchNorm before an IAO quantizer forms its output in the mask pass",
                l.name
            )));
        };
        let p = |k: Option<usize>| {
            self.param(k)
                .map(|t| t.expect("BatchNorm has gamma and beta"))
        };
        let shape = with_batch(batch, &l.in_shape);
        let stats = l.bn_stats.as_ref().expect("bn stats");
        let as_bn = |t: Option<&Tensor>| t.map(|t| t.reshape(&shape)).transpose();
        norm::apply_iao(
            gpu,
            ep,
            (&x.reshape(&shape)?, stats),
            (&p(l.weight)?, &p(l.bias)?),
            (&slot.q, state),
            dx.map(|(d, sums)| Ok::<_, Error>((d.reshape(&shape)?, sums)))
                .transpose()?
                .as_ref()
                .map(|(d, sums)| (d, *sums)),
            as_bn(into)?.as_ref(),
        )
    }

    /// How a conv forms BatchNorm layer `k`'s output where it loads it, quantized to `bits`.
    pub(super) fn input_bn(&self, k: usize, bits: Bits) -> Result<InputBn<'_>> {
        Ok(InputBn {
            form: self.bn_form(k)?,
            bits,
        })
    }

    /// How a reader forms BatchNorm layer `k`'s output from its input.
    pub(super) fn bn_form(&self, k: usize) -> Result<BnForm<'_>> {
        let l = &self.layers[k];
        let (Kind::BatchNorm { ep, .. }, Some(table)) = (l.kind, l.bn_stats.as_ref()) else {
            return Err(Error::Invalid(format!(
                "layer {} is not a BatchNorm: its reader cannot form its output",
                l.name
            )));
        };
        Ok(BnForm {
            table,
            act: ep.act,
            shuffle: ep.shuffle,
        })
    }
}
