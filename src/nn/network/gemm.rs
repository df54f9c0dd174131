//! The batch-size-specific GEMM geometry of a weighted layer (conv, conv-transpose, linear) and
//! its kernels in each direction.

use super::WeightedOp;
use crate::error::Result;
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::conv_transpose2d::{self, ConvTranspose2dGeom};
use crate::kernels::conv2d::{self, Conv2dGeom};
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

    pub(super) fn grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        match self {
            Gemm::Conv(g) => conv2d::grad_weight(gpu, g, x, dy, dw, scratch),
            Gemm::ConvT(g) => conv_transpose2d::grad_weight(gpu, g, x, dy, dw, scratch),
            Gemm::Linear(g) => matmul::grad_weight(gpu, g, x, dy, dw, scratch),
        }
    }

    /// Elements of split-K partial sums [`Gemm::grad_weight`] needs.
    pub(super) fn grad_weight_scratch_len(&self) -> usize {
        match self {
            Gemm::Conv(g) => g.gemm().grad_weight_scratch_len(),
            Gemm::ConvT(g) => g.gemm().grad_weight_scratch_len(),
            Gemm::Linear(g) => g.gemm().grad_weight_scratch_len(),
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
