//! micronet's channel shuffle, when it is not fused into the BatchNorm before it; its backward
//! is the inverse shuffle, and its output can be formed again for a consumer's backward.

use super::{Io, Kind, Layer, Ops};
use crate::error::Result;
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::pool;

pub(super) fn ops(l: &Layer, io: &Io) -> Result<Ops> {
    let Kind::Shuffle(groups) = l.kind else {
        unreachable!("shuffle::ops is for shuffle layers")
    };
    let fwd = vec![pool::channel_shuffle(io.gpu, groups, false, io.x(), io.y)?];
    let mut bwd = Vec::new();
    if let (true, Some(dx)) = (io.train, io.dx()) {
        bwd.push(pool::channel_shuffle(io.gpu, groups, true, io.dy(l)?, dx)?);
    }
    Ok((fwd, bwd))
}

/// The forward op again, into the same temporary.
pub(super) fn recompute(gpu: &Gpu, l: &Layer, x: &Tensor, y: &Tensor) -> Result<Op> {
    let Kind::Shuffle(groups) = l.kind else {
        unreachable!("shuffle::recompute is for shuffle layers")
    };
    pool::channel_shuffle(gpu, groups, false, x, y)
}
