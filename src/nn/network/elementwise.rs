//! The elementwise nodes: a ReLU not fused into a BatchNorm (after a residual add, say), and the
//! sum of a residual block, `y = x0 + x1 (+ x2 ...)`, float as micronet's DoReFa leaves `Add`;
//! each input's gradient is `dy`.

use super::{Io, Kind, Layer, Ops};
use crate::error::Result;
use crate::gpu::Op;
use crate::kernels::elementwise;

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

pub(super) fn add(l: &Layer, io: &Io) -> Result<Ops> {
    debug_assert!(matches!(l.kind, Kind::Add));
    let (gpu, xs) = (io.gpu, io.xs);
    let mut fwd = vec![Op::Dispatch(elementwise::add_forward(
        gpu, &xs[0], &xs[1], io.y,
    )?)];
    for x in &xs[2..] {
        fwd.push(Op::Dispatch(elementwise::accumulate(gpu, x, io.y)?));
    }
    let mut bwd = Vec::new();
    if io.train {
        for dx in io.dxs.iter().flatten() {
            bwd.push(Op::Copy {
                src: io.dy(l)?.clone(),
                dst: dx.clone(),
            });
        }
    }
    Ok((fwd, bwd))
}
