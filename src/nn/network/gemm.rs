//! The batch-size-specific GEMM geometry of a weighted layer (conv, conv-transpose, linear) and
//! its kernels in each direction.

use super::WeightedOp;
use crate::error::Result;
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::conv_transpose2d::{self, ConvTranspose2dGeom};
use crate::kernels::conv2d::{self, ActGrad, Conv2dGeom};
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

    pub(super) fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Op> {
        match self {
            Gemm::Conv(g) => conv2d::forward(gpu, g, x, w, b, y),
            Gemm::ConvT(g) => conv_transpose2d::forward(gpu, g, x, w, b, y),
            Gemm::Linear(g) => matmul::forward(gpu, g, x, w, b, y),
        }
    }

    pub(super) fn grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Op> {
        match self {
            Gemm::Conv(g) => conv2d::grad_input(gpu, g, dy, w, dx),
            Gemm::ConvT(g) => conv_transpose2d::grad_input(gpu, g, dy, w, dx),
            Gemm::Linear(g) => matmul::grad_input(gpu, g, dy, w, dx),
        }
    }

    /// dL/dW into `dw` and, given `db`, the bias gradient: in the same pass over dy for conv2d
    /// and Linear (dy is their grad-weight GEMM's A), by its own reduction for conv-transpose.
    /// Grad-input with the layer input's DoReFa quantizer in the epilogue (conv2d, Linear); None
    /// where the GEMM has no such epilogue (conv-transpose: the caller runs the quantizer's pass).
    pub(super) fn grad_input_act(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        act: ActGrad<'_>,
    ) -> Option<Result<Op>> {
        match self {
            Gemm::Conv(g) => Some(conv2d::grad_input_act(gpu, g, dy, w, dx, act)),
            Gemm::Linear(g) => Some(matmul::grad_input_act(gpu, g, dy, w, dx, act)),
            Gemm::ConvT(_) => None,
        }
    }

    pub(super) fn grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        (dw, db): (&Tensor, Option<&Tensor>),
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        match (self, db) {
            (Gemm::Conv(g), None) => conv2d::grad_weight(gpu, g, x, dy, dw, scratch),
            (Gemm::Conv(g), Some(db)) => {
                conv2d::grad_weight_and_bias(gpu, g, x, dy, dw, db, None, scratch)
            }
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
