//! The elementwise nodes: a ReLU not fused into the layer before, and the sum of a residual
//! block, `y = x0 + x1 (+ x2 ...)`: float as micronet's DoReFa leaves `Add` (each input's
//! gradient is `dy`; with the ReLU after it fused, `dy` where `y > 0`; a summand that is a
//! BatchNorm's output read by the add alone is formed from that BatchNorm's input as the add loads
//! it), or IAO's `QuantAdd` (both summands quantized with one scale).

use super::lower::IaoSlot;
use super::{Io, Kind, Layer, Network, Ops};
use crate::error::Result;
use crate::gpu::Op;
use crate::kernels::{elementwise, wbwtab};

pub(super) fn relu(l: &Layer, io: &Io) -> Result<Ops> {
    debug_assert!(matches!(l.kind, Kind::Relu));
    let fwd = vec![Op::Dispatch(elementwise::relu_forward(
        io.gpu,
        io.x(),
        io.y,
    )?)];
    let mut bwd = Vec::new();
    if let (true, Some(dx)) = (io.train, io.dx()) {
        bwd.push(Op::Dispatch(elementwise::relu_backward(
            io.gpu,
            io.y,
            io.dy(l)?,
            dx,
        )?));
    }
    Ok((fwd, bwd))
}

/// wbwtab's binary activation: `y = B(x)`; `dx = dy` where −1 < x < 1 (x kept or formed again).
pub(super) fn sign(l: &Layer, io: &Io) -> Result<Ops> {
    debug_assert!(matches!(l.kind, Kind::Sign));
    let fwd = vec![wbwtab::sign_forward(io.gpu, io.x(), io.y)?];
    let mut bwd = Vec::new();
    if let (true, Some(dx)) = (io.train, io.dx()) {
        bwd.push(wbwtab::sign_backward(io.gpu, io.x(), io.dy(l)?, dx)?);
    }
    Ok((fwd, bwd))
}

pub(super) fn add(net: &Network, l: &Layer, io: &Io) -> Result<Ops> {
    let Kind::Add { relu } = l.kind else {
        unreachable!("add is for adds")
    };
    if let Some(slot) = &l.input_q {
        return quant_add(net, l, slot, io);
    }
    let (gpu, xs) = (io.gpu, io.xs);
    // (The fusion takes only adds of two: a ReLU after more summands stays a layer.)
    // A summand that is a BatchNorm's output never stored is formed from its input here.
    let form = |j: usize| io.buf.reads_bn[j].map(|k| net.bn_form(k)).transpose();
    let mut fwd = vec![Op::Dispatch(elementwise::add_forward_formed(
        gpu,
        (&xs[0], form(0)?),
        (&xs[1], form(1)?),
        io.y,
        relu,
    )?)];
    for x in &xs[2..] {
        fwd.push(Op::Dispatch(elementwise::accumulate(gpu, x, io.y)?));
    }
    let mut bwd = Vec::new();
    if io.train {
        let dy = io.dy(l)?;
        let mut dxs = io.dxs.iter().flatten().peekable();
        // The gradient the summands share: dy, or with the ReLU dy where y > 0, formed in the
        // first input gradient (and the second, in the same pass) and copied from there.
        let shared = match (relu, dxs.next()) {
            (true, Some(first)) => {
                let second = dxs.next_if(|d| !d.same_buffer(first));
                bwd.push(Op::Dispatch(match second {
                    Some(second) => {
                        elementwise::relu_backward_pair(gpu, io.y, dy, (first, second))?
                    }
                    None => elementwise::relu_backward(gpu, io.y, dy, first)?,
                }));
                first
            }
            (false, Some(first)) => {
                bwd.push(Op::Copy {
                    src: dy.clone(),
                    dst: first.clone(),
                });
                dy
            }
            (_, None) => dy,
        };
        for dx in dxs {
            bwd.push(Op::Copy {
                src: shared.clone(),
                dst: dx.clone(),
            });
        }
    }
    Ok((fwd, bwd))
}

/// micronet's `QuantAdd(res, shortcut)`: its two observers take their inputs in training and in
/// evaluation alike (and under QAFT); the union of their ranges is the shared quantizer's range (scale and zero
/// point follow in training); `y = Q(res) + Q(shortcut)`, and each input's gradient is `dy`
/// through the quantizer's straight-through mask.
fn quant_add(net: &Network, l: &Layer, slot: &IaoSlot, io: &Io) -> Result<Ops> {
    let gpu = io.gpu;
    let view = |s: &IaoSlot| net.running.view(&net.running_arena, s.state);
    let (state, [res, shortcut]) = (view(slot)?, [&l.observers[0], &l.observers[1]]);
    let (rs, ss) = (view(res)?, view(shortcut)?);
    let mut fwd = res.q.observe(gpu, &rs, &io.xs[0])?;
    fwd.extend(shortcut.q.observe(gpu, &ss, &io.xs[1])?);
    fwd.extend(slot.q.union(gpu, &state, &rs, &ss)?);
    // Under QAFT the observers still move, the scale does not.
    if io.train && !super::quantizers::frozen(net) {
        fwd.push(slot.q.update_qparams(gpu, &state)?);
    }
    fwd.push(
        slot.q
            .add_forward(gpu, &state, &io.xs[0], &io.xs[1], io.y)?,
    );
    let mut bwd = Vec::new();
    if io.train {
        for (x, dx) in io.xs.iter().zip(io.dxs) {
            if let Some(dx) = dx {
                bwd.push(slot.q.backward(gpu, &state, x, io.dy(l)?, dx)?);
            }
        }
    }
    Ok((fwd, bwd))
}
