//! A conv with its BatchNorm folded in (IAO `bn_fuse`, micronet's `QuantBNFuseConv2d`, spec iao
//! §3), forward and backward side by side.
//!
//! Training: y0 = conv(x, W, b), the float conv of the float input, gives the batch statistics
//! (and the running update); W_f = W·γ/√(σ²+ε) and b_f = β + (b − μ)·γ/√(σ²+ε); the output is
//! conv(Q(x), Q(W_f)) + b_f (`calib`: W_f with the running σ², and the conv rescaled by
//! √(σ²_r+ε)/√(σ²+ε)). Evaluation and QAFT fold the running statistics instead. y0 lives
//! in the layer's output buffer until the quantized conv overwrites it, and is formed there again
//! for the backward pass (nothing reads this output by then), where it becomes dy0 in place.

use super::gemm::Gemm;
use super::lower::FoldSlot;
use super::memory::QuantInput;
use super::quantizers::{InputQuant, frozen};
use super::{Io, Kind, Layer, Network, Ops};
use crate::error::{Error, Result};
use crate::gpu::Op;
use crate::kernels::bnfold::FoldParams;
use crate::kernels::conv2d::AroundBn;
use crate::kernels::elementwise;

pub(super) fn ops(net: &Network, l: &Layer, f: &FoldSlot, io: &Io) -> Result<Ops> {
    let Kind::Weighted { op, .. } = l.kind else {
        unreachable!("a fold is a conv's")
    };
    let gpu = io.gpu;
    let (x, buf) = (io.x(), io.buf);
    let (w, b) = (net.param(l.weight)?.expect("weights"), net.param(l.bias)?);
    let (gamma, beta) = (
        net.param(Some(f.gamma))?.expect("gamma"),
        net.param(Some(f.beta))?.expect("beta"),
    );
    let run = |k: usize| net.running.view(&net.running_arena, k);
    let (rm, rv, flag) = (run(f.running.0)?, run(f.running.1)?, run(f.flag)?);
    let p = FoldParams {
        gamma: &gamma,
        beta: &beta,
        bias: b.as_ref(),
        running_mean: &rm,
        running_var: &rv,
        flag: &flag,
    };
    let (Some(iq), QuantInput::Temporary(t), Some(wq), Some(w_hat)) =
        (InputQuant::of(net, l)?, &buf.xq, &l.quantizer, &l.w_hat)
    else {
        return Err(Error::Invalid(format!(
            "layer {}: a folded conv quantizes its input and weight (IAO)",
            l.name
        )));
    };
    let xq = super::at_batch(t, io.batch)?;
    let gemm = Gemm::new(op, io.batch, &l.in_shape, &l.out_shape);
    // Batch statistics in training, unless QAFT freezes them with the scales.
    let batch_stats = io.train && !frozen(net);
    if batch_stats && io.batch * l.out_shape[1..].iter().product::<usize>() < 2 {
        return Err(Error::Invalid(format!(
            "layer {}: a folded BatchNorm needs more than one value per channel to train: use a batch size of at least 2",
            l.name
        )));
    }
    let mut fwd = Vec::new();
    if batch_stats {
        fwd.push(gemm.forward(gpu, x, &w, b.as_ref(), io.y, AroundBn::default())?);
        fwd.extend(f.fold.stats(gpu, &p, io.y)?);
    } else {
        fwd.push(f.fold.running(gpu, &p)?);
    }
    fwd.push(f.fold.weight(gpu, &p, &w, batch_stats)?);
    if io.train {
        fwd.extend(iq.observe(gpu, x, io.buf.observed_by_producer)?);
    }
    fwd.push(iq.forward(gpu, x, &xq)?);
    fwd.extend(wq.forward(net, gpu, io.train, &f.fold.w_f, w_hat)?);
    // calib: the quantized conv without bias, rescaled to the batch's statistics, plus b_f.
    let calib = f.fold.calib && batch_stats;
    if calib {
        fwd.push(gemm.forward(gpu, &xq, w_hat, None, io.y, AroundBn::default())?);
        fwd.push(f.fold.calib_out(gpu, &p, io.y)?);
    } else {
        fwd.push(gemm.forward(
            gpu,
            &xq,
            w_hat,
            Some(&f.fold.bias_f),
            io.y,
            AroundBn::default(),
        )?);
    }
    if !io.train {
        return Ok((fwd, Vec::new()));
    }

    let dy = io.dy(l)?;
    let dw_hat = l.dw_hat.as_ref().expect("a trainable fold has dŴ");
    let (dw, dgamma, dbeta) = (
        net.grad(l.weight)?.expect("weights"),
        net.grad(Some(f.gamma))?.expect("gamma"),
        net.grad(Some(f.beta))?.expect("beta"),
    );
    let db = net.grad(l.bias)?;
    let scratch = buf.split_k.as_ref();
    let mut bwd = vec![gemm.grad_bias(gpu, dy, &f.fold.db_f)?];
    // The quantized input is formed again: first thing with calib, else in the mask's pass.
    let mut xq_formed = calib;
    if calib {
        // d rho from the quantized conv formed again (this output is dead by now), then dy·rho
        // in place: the quantized conv's own output gradient.
        bwd.push(iq.forward(gpu, x, &xq)?);
        bwd.push(gemm.forward(gpu, &xq, w_hat, None, io.y, AroundBn::default())?);
        bwd.push(f.fold.calib_grad(gpu, &p, io.y, dy)?);
    }
    // Through the quantized conv: dx (the input quantizer's mask), dŴ and on to dW_f in place.
    if let Some(dx) = io.dx() {
        bwd.push(gemm.grad_input(gpu, dy, w_hat, dx, AroundBn::default())?);
        if xq_formed {
            bwd.extend(iq.backward_in_place(gpu, x, dx)?);
        } else {
            bwd.extend(iq.backward_quantize(gpu, x, dx, &xq)?);
            xq_formed = true;
        }
    }
    if !xq_formed {
        bwd.push(iq.forward(gpu, x, &xq)?);
    }
    bwd.extend(gemm.grad_weight(gpu, &xq, dy, (dw_hat, None), scratch, AroundBn::default())?);
    bwd.push(wq.backward_in_place(net, gpu, &f.fold.w_f, dw_hat)?);
    // Through the fold: dγ, dβ, and (batch statistics) dy0 over y0 formed again.
    let y0_shape = io.y.shape().to_vec();
    bwd.push(
        f.fold
            .backward_channel(gpu, &p, &w, dw_hat, &y0_shape, (&dgamma, &dbeta))?,
    );
    if batch_stats {
        bwd.push(gemm.forward(gpu, x, &w, b.as_ref(), io.y, AroundBn::default())?);
        bwd.push(f.fold.dy0(gpu, &p, io.y)?);
        bwd.extend(gemm.grad_weight(
            gpu,
            x,
            io.y,
            (&dw, db.as_ref()),
            scratch,
            AroundBn::default(),
        )?);
        if let Some(dx) = io.dx() {
            let part = super::at_batch(
                buf.fold_dx
                    .as_ref()
                    .expect("folds share an input-gradient scratch"),
                io.batch,
            )?;
            bwd.push(gemm.grad_input(gpu, io.y, &w, &part, AroundBn::default())?);
            bwd.push(Op::Dispatch(elementwise::accumulate(gpu, &part, dx)?));
        }
    }
    bwd.push(f.fold.grad(gpu, dw_hat, &dw, (batch_stats, batch_stats))?);
    if let Some(db) = &db {
        bwd.push(
            f.fold
                .grad(gpu, &f.fold.db_f, db, (batch_stats, batch_stats))?,
        );
    }
    Ok((fwd, bwd))
}
