//! The batch-size-specific GEMM geometry of a weighted layer (conv, conv-transpose, linear) and
//! its kernels in each direction.

use super::WeightedOp;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::conv_transpose2d::{self, ConvTranspose2dGeom};
use crate::kernels::conv2d::{self, ActGrad, AroundBn, Conv2dGeom};
use crate::kernels::matmul::{self, LinearGeom};

/// The batch-size-specific geometry of a weighted layer.
pub(super) enum Gemm {
    Conv(Conv2dGeom),
    ConvT(ConvTranspose2dGeom),
    Linear(LinearGeom),
}

impl Gemm {
    pub(super) fn new(
        op: WeightedOp,
        batch: usize,
        in_shape: &[usize],
        out_shape: &[usize],
    ) -> Gemm {
        match op {
            WeightedOp::Conv {
                kernel,
                stride,
                padding,
                dilation,
                groups,
            } => Gemm::Conv(Conv2dGeom {
                batch,
                cin: in_shape[0],
                h: in_shape[1],
                w: in_shape[2],
                cout: out_shape[0],
                kernel,
                stride,
                padding,
                dilation,
                groups,
            }),
            WeightedOp::ConvT {
                kernel,
                stride,
                padding,
                output_padding,
                dilation,
                groups,
            } => Gemm::ConvT(ConvTranspose2dGeom {
                batch,
                cin: in_shape[0],
                h: in_shape[1],
                w: in_shape[2],
                cout: out_shape[0],
                kernel,
                stride,
                padding,
                output_padding,
                dilation,
                groups,
            }),
            WeightedOp::Linear => Gemm::Linear(LinearGeom {
                batch,
                in_features: in_shape[0],
                out_features: out_shape[0],
            }),
        }
    }

    /// `y = op(x, w) + b`; with `input` (conv2d only) the layer's input formed where it is
    /// loaded (see [`conv2d::forward_with`]).
    pub(super) fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
        input: AroundBn<'_>,
    ) -> Result<Op> {
        match (self, input.any()) {
            (Gemm::Conv(g), _) => conv2d::forward_with(gpu, g, x, w, b, y, input, None),
            (Gemm::ConvT(g), false) => conv_transpose2d::forward(gpu, g, x, w, b, y),
            (Gemm::Linear(g), false) => matmul::forward(gpu, g, x, w, b, y),
            (_, true) => Err(only_conv()),
        }
    }

    /// dL/dx into `dx`; with `bn` (conv2d only) through the BatchNorms around the conv (see
    /// [`conv2d::grad_input_fused`]).
    pub(super) fn grad_input(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        bn: AroundBn<'_>,
    ) -> Result<Op> {
        match (self, bn.any()) {
            (Gemm::Conv(g), _) => conv2d::grad_input_fused(gpu, g, dy, w, dx, None, bn),
            (Gemm::ConvT(g), false) => conv_transpose2d::grad_input(gpu, g, dy, w, dx),
            (Gemm::Linear(g), false) => matmul::grad_input(gpu, g, dy, w, dx),
            (_, true) => Err(only_conv()),
        }
    }

    /// Grad-input with the layer input's DoReFa quantizer in the epilogue (conv2d, Linear); None
    /// where the GEMM has no such epilogue (conv-transpose: the caller runs the quantizer's pass).
    pub(super) fn grad_input_act(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        act: ActGrad<'_>,
        bn: AroundBn<'_>,
    ) -> Option<Result<Op>> {
        match (self, bn.any()) {
            (Gemm::Conv(g), _) => Some(conv2d::grad_input_fused(gpu, g, dy, w, dx, Some(act), bn)),
            (Gemm::Linear(g), false) => Some(matmul::grad_input_act(gpu, g, dy, w, dx, act)),
            (Gemm::ConvT(_), false) => None,
            (_, true) => Some(Err(only_conv())),
        }
    }

    /// dL/dW into `dw` and, given `db`, the bias gradient: in the same pass over dy for conv2d
    /// and Linear (dy is their grad-weight GEMM's A), by its own reduction for conv-transpose.
    pub(super) fn grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        (dw, db): (&Tensor, Option<&Tensor>),
        scratch: Option<&Tensor>,
        bn: AroundBn<'_>,
    ) -> Result<Vec<Op>> {
        if bn.any() && !matches!(self, Gemm::Conv(_)) {
            return Err(only_conv());
        }
        match (self, db) {
            (Gemm::Conv(g), db) => conv2d::grad_weight_fused(gpu, g, x, dy, (dw, db), bn, scratch),
            (Gemm::Linear(g), None) => matmul::grad_weight(gpu, g, x, dy, dw, scratch),
            (Gemm::Linear(g), Some(db)) => {
                matmul::grad_weight_and_bias(gpu, g, x, dy, (dw, db), scratch)
            }
            (Gemm::ConvT(g), db) => {
                let mut ops = conv_transpose2d::grad_weight(gpu, g, x, dy, dw, scratch)?;
                if let Some(db) = db {
                    ops.push(conv_transpose2d::grad_bias(gpu, g, dy, db)?);
                }
                Ok(ops)
            }
        }
    }

    /// Elements of split-K partial sums [`Gemm::grad_weight`] needs (`with_bias`: with a bias
    /// gradient).
    pub(super) fn grad_weight_scratch_len(&self, with_bias: bool) -> usize {
        match self {
            Gemm::Conv(g) => g.gemm().grad_weight_scratch_len(with_bias),
            Gemm::ConvT(g) => g.gemm().grad_weight_scratch_len(false),
            Gemm::Linear(g) => g.gemm().grad_weight_scratch_len(with_bias),
        }
    }

    pub(super) fn grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Op> {
        match self {
            Gemm::Conv(g) => conv2d::grad_bias(gpu, g, dy, db),
            Gemm::ConvT(g) => conv_transpose2d::grad_bias(gpu, g, dy, db),
            Gemm::Linear(g) => matmul::grad_bias(gpu, g, dy, db),
        }
    }
}

/// Only conv2d's GEMMs do a BatchNorm's or a quantizer's work as they load.
fn only_conv() -> Error {
    Error::Invalid(
        "only a conv2d does a BatchNorm's or an input quantizer's work as it loads its operands"
            .into(),
    )
}
