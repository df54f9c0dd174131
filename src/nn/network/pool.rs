//! Max and average pooling. Max-pool keeps no index map: its backward finds each window's
//! maximum again in the input (the same rule, so the same choice).

use super::{Io, Kind, Layer, Ops};
use crate::error::{Error, Result};
use crate::kernels::pool::{self, PoolGeom};

pub(super) fn ops(l: &Layer, io: &Io) -> Result<Ops> {
    let (Kind::MaxPool(win) | Kind::AvgPool(win)) = l.kind else {
        unreachable!("pool::ops is for pooling layers")
    };
    let [c, h, w] = l.in_shape[..] else {
        return Err(Error::Invalid(format!(
            "layer {}: pooling needs (C, H, W)",
            l.name
        )));
    };
    let geom = PoolGeom {
        n: io.batch,
        c,
        h,
        w,
        kernel: win.kernel,
        stride: win.stride,
        padding: win.padding,
    };
    let (gpu, x) = (io.gpu, io.x());
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let dx = io.dx().filter(|_| io.train);
    if let Kind::MaxPool(_) = l.kind {
        fwd.push(pool::maxpool_forward(gpu, &geom, x, io.y)?);
        if let Some(dx) = dx {
            // x is this layer's input as the forward saw it (kept, or formed again).
            bwd.push(pool::maxpool_backward(gpu, &geom, x, io.dy(l)?, dx)?);
        }
    } else {
        fwd.push(pool::avgpool_forward(gpu, &geom, x, io.y)?);
        if let Some(dx) = dx {
            bwd.push(pool::avgpool_backward(gpu, &geom, io.dy(l)?, dx)?);
        }
    }
    Ok((fwd, bwd))
}
