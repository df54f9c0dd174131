//! A weighted layer (conv, conv_transpose, linear) as micronet's quantized modules run it: the
//! input activation and the weight fake-quantized (DoReFa or IAO), the GEMM, and in backward the
//! input gradient (masked by the activation quantizer's straight-through rule), the weight
//! gradient through the weight quantizer, and the bias gradient.

use super::gemm::Gemm;
use super::lower::WeightQ;
use super::memory::QuantInput;
use super::quantizers::InputQuant;
use super::{Io, Kind, Layer, Network, Ops};
use crate::error::Result;
use crate::gpu::{Op, Tensor};
use crate::kernels::conv_coop;
use crate::kernels::conv2d::ActGrad;
use crate::quant::ActQuant;

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
                fwd.extend(q.observe(gpu, x)?);
            }
            fwd.push(q.forward(gpu, x, &t)?);
            t
        }
        (QuantInput::InPlace, Some(q)) => {
            if io.train {
                fwd.extend(q.observe(gpu, x)?);
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
    let gemm = Gemm::new(op, io.batch, &l.in_shape, &l.out_shape);
    fwd.push(forward_gemm(
        io,
        l,
        input,
        &gemm,
        (&xq, &w_hat, b.as_ref()),
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
                gemm.grad_input_act(gpu, dy, &w_hat, dx, act).transpose()?
            }
            _ => None,
        };
        match io.dx() {
            Some(_) if fused.is_some() => bwd.extend(fused),
            Some(dx) => {
                bwd.push(gemm.grad_input(gpu, dy, &w_hat, dx)?);
                if in_place {
                    bwd.extend(q.backward_requantize(gpu, x, dx)?);
                } else {
                    bwd.extend(q.backward_in_place(gpu, x, dx)?);
                }
            }
            None if in_place => bwd.extend(q.forward_in_place(gpu, x)?),
            None => {}
        }
        if let QuantInput::Temporary(_) = buf.xq {
            bwd.push(q.forward(gpu, x, &xq)?);
        }
    } else if let Some(dx) = io.dx() {
        bwd.push(gemm.grad_input(gpu, dy, &w_hat, dx)?);
    }
    let dw = net.grad(l.weight)?.expect("weights");
    let db = net.grad(l.bias)?;
    let scratch = buf.split_k.as_ref();
    match (&l.quantizer, &l.dw_hat) {
        (Some(q), Some(dw_hat)) => {
            // dL/dŴ goes through the weight quantizer's backward into dL/dW.
            bwd.extend(gemm.grad_weight(gpu, &xq, dy, (dw_hat, db.as_ref()), scratch)?);
            bwd.extend(q.backward(net, gpu, &w, dw_hat, &dw)?);
        }
        _ => bwd.extend(gemm.grad_weight(gpu, &xq, dy, (&dw, db.as_ref()), scratch)?),
    }
    Ok((fwd, bwd))
}

/// The forward GEMM: on cooperative matrices for a conv whose weights and input are both
/// DoReFa-quantized, where the device has them (both operands hold levels whose codes are exact
/// in f16), else the fp32 kernel.
fn forward_gemm(
    io: &Io,
    l: &Layer,
    input: ActQuant,
    gemm: &Gemm,
    (xq, w_hat, b): (&Tensor, &Tensor, Option<&Tensor>),
) -> Result<Op> {
    match (io.gpu.coop(), gemm, &l.quantizer, input) {
        (Some(mode), Gemm::Conv(g), Some(WeightQ::Dorefa(wb)), ActQuant::Dorefa(ab))
            if wb.get() <= 8 && ab.get() <= 8 =>
        {
            conv_coop::forward(io.gpu, g, xq, w_hat, b, io.y, (*wb, ab), mode)
        }
        _ => gemm.forward(io.gpu, xq, w_hat, b, io.y),
    }
}
