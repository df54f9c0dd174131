//! A weighted layer (conv, conv_transpose, linear) as micronet's quantized modules run it: the
//! input activation and the weight fake-quantized (DoReFa or IAO), the GEMM, and in backward the
//! input gradient (masked by the activation quantizer's straight-through rule), the weight
//! gradient through the weight quantizer, and the bias gradient.

use super::gemm::Gemm;
use super::lower::WeightQ;
use super::memory::{LayerBuffers, QuantInput};
use super::quantizers::InputQuant;
use super::{Io, Kind, Layer, Network, Ops, WeightedOp};
use crate::error::Result;
use crate::gpu::{CoopMode, Gpu};
use crate::gpu::{Op, Tensor};
use crate::kernels::conv_coop;
use crate::kernels::conv2d::{self, ActGrad, AroundBn, OutputBn};
use crate::quant::ActQuant;
use crate::quant::Bits;

pub(super) fn ops(net: &Network, l: &Layer, io: &Io) -> Result<Ops> {
    let Kind::Weighted { op, input } = l.kind else {
        unreachable!("weighted::ops is for weighted layers")
    };
    if let Some(f) = &l.fold {
        return super::bnfold::ops(net, l, f, io);
    }
    let gpu = io.gpu;
    let (x, buf) = (io.x(), io.buf);
    let (w, b) = (net.param(l.weight)?.expect("weights"), net.param(l.bias)?);
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let iq = InputQuant::of(net, l)?;
    // The quantized input (float: the input itself).
    let xq = match (&buf.xq, &iq) {
        (QuantInput::Temporary(t), Some(q)) => {
            let t = super::at_batch(t, io.batch)?;
            if io.train {
                fwd.extend(q.observe(gpu, x, io.buf.observed_by_producer)?);
            }
            fwd.push(q.forward(gpu, x, &t)?);
            t
        }
        (QuantInput::InPlace, Some(q)) => {
            if io.train {
                fwd.extend(q.observe(gpu, x, io.buf.observed_by_producer)?);
            }
            fwd.extend(q.forward_in_place(gpu, x)?);
            x.clone()
        }
        _ => x.clone(),
    };
    let w_hat = match (&l.quantizer, &l.w_hat) {
        (Some(q), Some(wh)) => {
            fwd.extend(q.forward(net, gpu, io.train, &w, wh)?);
            wh.clone()
        }
        _ => w.clone(),
    };
    // The input formed from the BatchNorm before, where it is loaded (x is that BatchNorm's
    // input), and quantized if the layer quantizes it.
    let input_bn = match (&buf.xq, input) {
        (QuantInput::ThroughBn(k), ActQuant::Dorefa(bits)) => Some(net.input_bn(*k, bits)?),
        (QuantInput::ThroughBn(k), ActQuant::Float) => Some(net.input_bn(*k, Bits::FLOAT)?),
        _ => None,
    };
    // The float input quantized where forward and grad-weight load it.
    let input_quant = match (&buf.xq, input) {
        (QuantInput::OnLoad, ActQuant::Dorefa(bits)) => Some(bits),
        _ => None,
    };
    // The backward of the BatchNorm after, applied where the backward GEMMs load dy (dy is this
    // conv's output then).
    let bn_after = match &buf.bn_after {
        Some((k, bn_dy)) if io.train => Some((*k, super::at_batch(bn_dy, io.batch)?)),
        _ => None,
    };
    let output_bn = match &bn_after {
        Some((k, bn_dy)) => Some(OutputBn {
            form: net.bn_form(*k)?,
            dy: bn_dy,
        }),
        None => None,
    };
    let around = AroundBn {
        input: input_bn,
        output: output_bn,
        // The BatchNorm before's backward sums, in grad-input's epilogue (see `bn_sums`).
        input_sums: buf.bn_sums.as_ref().filter(|_| input_bn.is_some()),
        input_quant: None,
        dx_plus: None,
    };
    // What forward and grad-weight do where they load the input (grad-input loads dy and w).
    let loading_input = AroundBn {
        input_quant,
        ..around
    };
    // Grad-input adds the input's other reader's gradient as it writes dx (the first part of
    // `accumulate`; `Network::grad_input_adds_part` says where).
    let part = match buf.accumulate.first() {
        Some((part, _)) if net.grad_input_adds_part(l, buf) => {
            Some(super::at_batch(part, io.batch)?)
        }
        _ => None,
    };
    let writing_dx = AroundBn {
        dx_plus: part.as_ref(),
        ..around
    };
    let gemm = Gemm::new(op, io.batch, &l.in_shape, &l.out_shape);
    fwd.push(forward_gemm(
        io,
        l,
        &gemm,
        (&xq, &w_hat, b.as_ref()),
        AroundBn {
            input: input_bn,
            input_quant,
            ..AroundBn::default()
        },
    )?);
    if !io.train {
        return Ok((fwd, bwd));
    }
    let dy = io.dy(l)?;
    // dL/dx̂ becomes dL/dx in place (the STE's mask, from the float x); the quantized input is
    // formed again for grad-weight: in its shared temporary, or where x lies (x was formed
    // again, float, for this backward).
    let in_place = matches!(buf.xq, QuantInput::InPlace | QuantInput::ByProducer);
    if let Some(q) = &iq {
        // DoReFa's mask (and requantization) in grad-input's epilogue where the GEMM has one.
        let fused = match (q, io.dx()) {
            (InputQuant::Dorefa(bits), Some(dx)) => {
                let act = ActGrad {
                    x,
                    bits: *bits,
                    requantize: in_place,
                };
                match (grad_input_on_coop(gpu, l), &gemm) {
                    (Some((mode, w_bits)), Gemm::Conv(g)) => Some(conv_coop::grad_input(
                        gpu,
                        g,
                        dy,
                        &w_hat,
                        dx,
                        w_bits,
                        (Some(act), writing_dx),
                        mode,
                    )?),
                    _ => gemm
                        .grad_input_act(gpu, dy, &w_hat, dx, act, writing_dx)
                        .transpose()?,
                }
            }
            _ => None,
        };
        // The quantized input formed again in its temporary, where the mask's pass does not.
        let mut to_temporary = matches!(buf.xq, QuantInput::Temporary(_));
        match io.dx() {
            Some(_) if fused.is_some() => bwd.extend(fused),
            Some(dx) => {
                bwd.push(gemm.grad_input(gpu, dy, &w_hat, dx, around)?);
                if let Some((k, bn_input)) = &buf.masks_through_bn {
                    // x is formed again here, from the BatchNorm's input, masked and quantized.
                    let bn_input = super::at_batch(bn_input, io.batch)?;
                    // With the BatchNorm's backward sums where it merges them.
                    let pass = (&bn_input, Some((dx, buf.bn_sums.as_ref())), Some(x));
                    bwd.push(net.bn_mask_pass(gpu, *k, q, pass, io.batch)?);
                } else if in_place {
                    bwd.extend(q.backward_requantize(gpu, x, dx)?);
                } else if to_temporary {
                    bwd.extend(q.backward_quantize(gpu, x, dx, &xq)?);
                    to_temporary = false;
                } else {
                    bwd.extend(q.backward_in_place(gpu, x, dx)?);
                }
            }
            None if in_place => bwd.extend(q.forward_in_place(gpu, x)?),
            None => {}
        }
        if to_temporary {
            bwd.push(q.forward(gpu, x, &xq)?);
        }
    } else if let Some(dx) = io.dx() {
        // A float input formed through a BatchNorm: grad-input's epilogue reads the
        // BatchNorm's input (x) for that BatchNorm's backward sums, and masks nothing.
        let unquantized = ActGrad {
            x,
            bits: Bits::FLOAT,
            requantize: false,
        };
        bwd.push(match input_bn {
            Some(_) => gemm
                .grad_input_act(gpu, dy, &w_hat, dx, unquantized, writing_dx)
                .expect("a conv2d's grad-input has an epilogue")?,
            None => gemm.grad_input(gpu, dy, &w_hat, dx, writing_dx)?,
        });
    }
    let dw = net.grad(l.weight)?.expect("weights");
    let db = net.grad(l.bias)?;
    let scratch = buf.split_k.as_ref();
    // Grad-weight on cooperative matrices where `grad_weight_on_coop` says so, else the fp32
    // kernel.
    let on_coop = grad_weight_on_coop(gpu, l);
    let grad_weight = |dw: &Tensor| match (on_coop, &gemm) {
        (Some((mode, a_bits)), Gemm::Conv(g)) => conv_coop::grad_weight(
            gpu,
            g,
            &xq,
            dy,
            (dw, db.as_ref()),
            a_bits,
            (loading_input, scratch),
            mode,
        ),
        _ => gemm.grad_weight(gpu, &xq, dy, (dw, db.as_ref()), scratch, loading_input),
    };
    match (&l.quantizer, &l.dw_hat) {
        (Some(q), Some(dw_hat)) => {
            // dL/dŴ goes through the weight quantizer's backward into dL/dW.
            bwd.extend(grad_weight(dw_hat)?);
            bwd.extend(q.backward(net, gpu, &w, dw_hat, &dw)?);
        }
        _ => bwd.extend(grad_weight(&dw)?),
    }
    Ok((fwd, bwd))
}

/// Whether layer `l`'s GEMMs can run on cooperative matrices on `gpu`, and with which weight
/// and activation bits: a conv whose weights and input are both DoReFa-quantized (both operands
/// hold levels whose codes are exact in f16), where the device has them.
pub(super) fn coop_operands(gpu: &Gpu, l: &Layer) -> Option<(CoopMode, (Bits, Bits))> {
    let Kind::Weighted {
        op: WeightedOp::Conv { .. },
        input: ActQuant::Dorefa(ab),
    } = l.kind
    else {
        return None;
    };
    match (gpu.coop(), &l.quantizer) {
        (Some(mode), Some(WeightQ::Dorefa(wb)))
            if wb.get() <= 8 && ab.get() <= 8 && l.fold.is_none() =>
        {
            Some((mode, (*wb, ab)))
        }
        _ => None,
    }
}

/// Whether layer `l`'s forward runs on cooperative matrices on `gpu`: where its operands allow
/// it ([`coop_operands`]) and the layer's [`super::CoopUse`] does.
pub(super) fn forward_on_coop(gpu: &Gpu, l: &Layer) -> Option<(CoopMode, (Bits, Bits))> {
    coop_operands(gpu, l).filter(|_| l.coop.forward)
}

/// Whether layer `l`'s grad-weight runs on cooperative matrices on `gpu`, with which input
/// bits: where its operands allow it (the input's codes are exact in f16), the device runs
/// grad-weight there and the layer's [`super::CoopUse`] does.
fn grad_weight_on_coop(gpu: &Gpu, l: &Layer) -> Option<(CoopMode, Bits)> {
    coop_operands(gpu, l)
        .zip(gpu.coop_grad_weight())
        .filter(|_| l.coop.grad_weight)
        .map(|((_, (_, a_bits)), mode)| (mode, a_bits))
}

/// Whether layer `l`'s grad-input runs on cooperative matrices on `gpu`, with which weight
/// bits: where its operands allow it (the weight codes are exact in f16), the device runs
/// grad-input there and the layer's [`super::CoopUse`] does.
pub(super) fn grad_input_on_coop(gpu: &Gpu, l: &Layer) -> Option<(CoopMode, Bits)> {
    coop_operands(gpu, l)
        .zip(gpu.coop_grad_input())
        .filter(|_| l.coop.grad_input)
        .map(|((_, (w_bits, _)), mode)| (mode, w_bits))
}

impl Network {
    /// Whether layer `l`'s grad-input adds the gradient its input's other reader wrote (the
    /// first part of `buf.accumulate`) as it writes dx, instead of an accumulate pass after it:
    /// a conv2d (not folded) that writes the gradient the other readers' parts are added to,
    /// whose input is float or DoReFa-quantized (whose mask its epilogue applies before the
    /// add, as the pass would find dx), in training.
    pub(super) fn grad_input_adds_part(&self, l: &Layer, buf: &LayerBuffers) -> bool {
        self.sum_in_grad_input
            && matches!(
                l.kind,
                Kind::Weighted {
                    op: WeightedOp::Conv { .. },
                    input: ActQuant::Float | ActQuant::Dorefa(_),
                }
            )
            && l.fold.is_none()
            && l.input_q.is_none()
            && buf.din.first().is_some_and(|d| d.is_some())
            && !buf.accumulate.is_empty()
    }
}

/// The forward GEMM (its input formed where it is loaded as `input` says): on cooperative
/// matrices where [`forward_on_coop`] says so, else the fp32 kernel; in training either also
/// forms the statistics of the BatchNorm after it where that BatchNorm takes them from it.
fn forward_gemm(
    io: &Io,
    l: &Layer,
    gemm: &Gemm,
    (xq, w_hat, b): (&Tensor, &Tensor, Option<&Tensor>),
    input: AroundBn<'_>,
) -> Result<Op> {
    let stats = io.buf.bn_partials.as_ref().filter(|_| io.train);
    match (forward_on_coop(io.gpu, l), gemm) {
        (Some((mode, bits)), Gemm::Conv(g)) => {
            conv_coop::forward(io.gpu, g, xq, w_hat, b, io.y, bits, (input, stats), mode)
        }
        (_, Gemm::Conv(g)) => conv2d::forward_with(io.gpu, g, xq, w_hat, b, io.y, input, stats),
        _ => gemm.forward(io.gpu, xq, w_hat, b, io.y, input),
    }
}
