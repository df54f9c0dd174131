//! A weighted layer (conv, conv_transpose, linear) as micronet's DoReFa modules run it: the input
//! activation and the weight fake-quantized, the GEMM, and in backward the input gradient (masked
//! by the activation quantizer's straight-through rule), the weight gradient through the weight
//! quantizer, and the bias gradient.

use super::gemm::Gemm;
use super::memory::QuantInput;
use super::{Io, Kind, Layer, Network, Ops};
use crate::error::Result;
use crate::kernels::quant;

pub(super) fn ops(net: &Network, l: &Layer, io: &Io) -> Result<Ops> {
    let Kind::Weighted { op, a_bits, .. } = l.kind else {
        unreachable!("weighted::ops is for weighted layers")
    };
    let gpu = io.gpu;
    let (x, buf) = (io.x(), io.buf);
    let (w, b) = (net.param(l.weight)?.expect("weights"), net.param(l.bias)?);
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    // The quantized input (float: the input itself).
    let xq = match &buf.xq {
        QuantInput::Temporary(t) => {
            let t = super::at_batch(t, io.batch)?;
            fwd.push(quant::act_forward(gpu, a_bits, x, &t)?);
            t
        }
        QuantInput::InPlace => {
            fwd.extend(quant::act_forward_in_place(gpu, a_bits, x)?);
            x.clone()
        }
        QuantInput::ByProducer | QuantInput::Float => x.clone(),
    };
    let w_hat = match (&l.quantizer, &l.w_hat) {
        (Some(q), Some(wh)) => {
            fwd.extend(q.forward(gpu, &w, wh)?);
            wh.clone()
        }
        _ => w.clone(),
    };
    let gemm = Gemm::new(op, io.batch, &l.in_shape, &l.out_shape);
    fwd.push(gemm.forward(gpu, &xq, &w_hat, b.as_ref(), io.y)?);
    if !io.train {
        return Ok((fwd, bwd));
    }
    let dy = io.dy(l)?;
    // dL/dx̂ becomes dL/dx in place (the STE's mask, from the float x); the quantized input is
    // formed again for grad-weight: in its shared temporary, or where x lies (x was formed
    // again, float, for this backward).
    let in_place = matches!(buf.xq, QuantInput::InPlace | QuantInput::ByProducer);
    match io.dx() {
        Some(dx) => {
            bwd.push(gemm.grad_input(gpu, dy, &w_hat, dx)?);
            match &buf.xq {
                _ if in_place => bwd.extend(quant::act_backward_requantize(gpu, a_bits, x, dx)?),
                QuantInput::Temporary(_) => {
                    bwd.extend(quant::act_backward_in_place(gpu, a_bits, x, dx)?)
                }
                _ => {}
            }
        }
        None if in_place => bwd.extend(quant::act_forward_in_place(gpu, a_bits, x)?),
        None => {}
    }
    if let QuantInput::Temporary(_) = buf.xq {
        bwd.push(quant::act_forward(gpu, a_bits, x, &xq)?);
    }
    let dw = net.grad(l.weight)?.expect("weights");
    let scratch = buf.split_k.as_ref();
    match (&l.quantizer, &l.dw_hat) {
        (Some(q), Some(dw_hat)) => {
            // dL/dŴ goes through the weight quantizer's backward into dL/dW.
            bwd.extend(gemm.grad_weight(gpu, &xq, dy, dw_hat, scratch)?);
            bwd.extend(q.backward(gpu, dw_hat, &dw)?);
        }
        _ => bwd.extend(gemm.grad_weight(gpu, &xq, dy, &dw, scratch)?),
    }
    if let Some(db) = net.grad(l.bias)? {
        bwd.push(gemm.grad_bias(gpu, dy, &db)?);
    }
    Ok((fwd, bwd))
}
