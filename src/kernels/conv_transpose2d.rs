//! conv_transpose2d with PyTorch's semantics, on `shaders/conv2d.wgsl`. A transposed convolution
//! is the adjoint of a convolution C whose input has the transposed conv's output shape and whose
//! weight is the same tensor read as `(Cout_C = Cin, Cin_C/groups = Cout/groups, KH, KW)`. So:
//!   forward     = C's grad-input   (with the bias added in its epilogue)
//!   grad-input  = C's forward
//!   grad-weight = C's grad-weight with the roles of x and dy exchanged
//! and every direction runs the same tuned GEMMs as conv2d.

use super::conv2d::{GemmConv, Mode};
use super::{expect_dtype, expect_shape, reduce};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Op, Tensor};

/// PyTorch's `ConvTranspose2d` arguments and the input size. Pairs are (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConvTranspose2dGeom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub output_padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl ConvTranspose2dGeom {
    /// `(h − 1)·s − 2p + d·(k − 1) + output_padding + 1` per axis (0 if that is not positive).
    pub fn out_hw(&self) -> (usize, usize) {
        let axis = |n: usize, k: usize, s: usize, p: usize, op: usize, d: usize| {
            let full = (n.max(1) - 1) * s + d * (k.max(1) - 1) + op + 1;
            full.saturating_sub(2 * p)
        };
        (
            axis(
                self.h,
                self.kernel.0,
                self.stride.0,
                self.padding.0,
                self.output_padding.0,
                self.dilation.0,
            ),
            axis(
                self.w,
                self.kernel.1,
                self.stride.1,
                self.padding.1,
                self.output_padding.1,
                self.dilation.1,
            ),
        )
    }

    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.cin, self.h, self.w]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        let (oh, ow) = self.out_hw();
        [self.batch, self.cout, oh, ow]
    }

    /// `(Cin, Cout/groups, KH, KW)`, PyTorch's layout.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.cin,
            self.cout / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
    }

    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> u64 {
        [
            self.batch,
            self.cin,
            self.h,
            self.w,
            self.cout / self.groups.max(1),
            self.kernel.0,
            self.kernel.1,
        ]
        .iter()
        .map(|&v| v as u64)
        .product()
    }

    pub fn validate(&self) -> Result<()> {
        let what = format!(
            "conv_transpose2d of a {}x{}x{} input to {} channels (kernel {:?}, stride {:?}, padding {:?}, output padding {:?}, dilation {:?}, groups {})",
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kernel,
            self.stride,
            self.padding,
            self.output_padding,
            self.dilation,
            self.groups
        );
        let positive = [
            self.batch,
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kernel.0,
            self.kernel.1,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            self.groups,
        ];
        if positive.contains(&0) {
            return Err(Error::shape(
                &what,
                "sizes, kernel, stride, dilation and groups must be at least 1",
            ));
        }
        if !self.cin.is_multiple_of(self.groups) || !self.cout.is_multiple_of(self.groups) {
            return Err(Error::shape(
                &what,
                "in and out channels must be divisible by groups",
            ));
        }
        let (op, s, d) = (self.output_padding, self.stride, self.dilation);
        if (op.0 >= s.0 && op.0 >= d.0) || (op.1 >= s.1 && op.1 >= d.1) {
            return Err(Error::shape(
                &what,
                "output padding must be smaller than either stride or dilation",
            ));
        }
        let (oh, ow) = self.out_hw();
        if oh == 0 || ow == 0 {
            return Err(Error::shape(
                &what,
                "the output would be empty: reduce the padding",
            ));
        }
        Ok(())
    }

    /// The convolution C this is the adjoint of.
    pub(crate) fn gemm(&self) -> GemmConv {
        let (oh, ow) = self.out_hw();
        GemmConv {
            batch: self.batch,
            cin: self.cout,
            h: oh,
            w: ow,
            cout: self.cin,
            oh: self.h,
            ow: self.w,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }

    fn describe(&self) -> String {
        format!(
            "x{:?} w{:?} s{:?} p{:?} op{:?} d{:?} g{}",
            self.input_shape(),
            self.weight_shape(),
            self.stride,
            self.padding,
            self.output_padding,
            self.dilation,
            self.groups
        )
    }
}

fn check(
    geom: &ConvTranspose2dGeom,
    kernel: &str,
    named: &[(&str, &Tensor, &[usize])],
) -> Result<String> {
    geom.validate()?;
    for (name, t, shape) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(format!("{kernel} {}", geom.describe()))
}

/// `y = conv_transpose2d(x, w) + bias`.
pub fn forward(
    gpu: &Gpu,
    geom: &ConvTranspose2dGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<Op> {
    const K: &str = "conv_transpose2d.forward";
    let label = check(
        geom,
        K,
        &[
            ("x", x, &geom.input_shape()),
            ("w", w, &geom.weight_shape()),
            ("y", y, &geom.output_shape()),
        ],
    )?;
    if let Some(b) = bias {
        check(geom, K, &[("bias", b, &[geom.cout])])?;
    }
    Ok(Op::Dispatch(geom.gemm().launch(
        gpu,
        Mode::GradInput,
        w,
        x,
        bias,
        y,
        1,
        label,
    )?))
}

/// `dx = dL/dx` (a convolution of `dy` with `w`).
pub fn grad_input(
    gpu: &Gpu,
    geom: &ConvTranspose2dGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
) -> Result<Op> {
    let label = check(
        geom,
        "conv_transpose2d.grad_input",
        &[
            ("dy", dy, &geom.output_shape()),
            ("w", w, &geom.weight_shape()),
            ("dx", dx, &geom.input_shape()),
        ],
    )?;
    Ok(Op::Dispatch(geom.gemm().launch(
        gpu,
        Mode::Forward,
        w,
        dy,
        None,
        dx,
        1,
        label,
    )?))
}

/// `dw = dL/dw`, with the default split-K; its partial sums go into `scratch` when given.
pub fn grad_weight(
    gpu: &Gpu,
    geom: &ConvTranspose2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_with(gpu, geom, x, dy, dw, None, scratch)
}

/// [`grad_weight`] with an explicit split-K count.
#[allow(clippy::too_many_arguments)]
pub fn grad_weight_split(
    gpu: &Gpu,
    geom: &ConvTranspose2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: usize,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_with(gpu, geom, x, dy, dw, Some(splits), scratch)
}

fn grad_weight_with(
    gpu: &Gpu,
    geom: &ConvTranspose2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: Option<usize>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    let label = check(
        geom,
        "conv_transpose2d.grad_weight",
        &[
            ("x", x, &geom.input_shape()),
            ("dy", dy, &geom.output_shape()),
            ("dw", dw, &geom.weight_shape()),
        ],
    )?;
    let g = geom.gemm();
    let splits = splits.unwrap_or_else(|| g.default_splits());
    g.grad_weight_ops(
        gpu,
        (x, dy),
        (dw, None),
        splits,
        scratch,
        super::conv2d::AroundBn::default(),
        label,
    )
}

/// `db[c] = Σ_{n,y,x} dy[n, c, y, x]`.
pub fn grad_bias(gpu: &Gpu, geom: &ConvTranspose2dGeom, dy: &Tensor, db: &Tensor) -> Result<Op> {
    check(
        geom,
        "conv_transpose2d.grad_bias",
        &[("dy", dy, &geom.output_shape()), ("db", db, &[geom.cout])],
    )?;
    Ok(Op::Dispatch(reduce::channel_sum(gpu, dy, db)?))
}
