//! `shaders/conv2d.wgsl`: conv2d forward, grad-input, grad-weight (split-K) and grad-bias as
//! implicit GEMMs. `GemmConv` is the fully specified problem the shader solves;
//! conv_transpose2d and matmul map onto it too.
//!
//! - `geom`: the convolution as PyTorch states it;
//! - `fused`: the quantizer and BatchNorm work a GEMM does besides multiplying;
//! - `tile`: the workgroup tiles and their choice;
//! - `gemm`: the GEMM problem and its launch;
//! - here: the operations the network records, forward and backward.

mod fused;
mod gemm;
mod geom;
mod tile;

pub use fused::{ActGrad, AroundBn, Fused, InputBn, OutputBn};
pub(crate) use fused::{input_bn_constants, output_bn_constants};
pub(crate) use gemm::{GemmConv, Mode};
pub use geom::Conv2dGeom;
pub use tile::Tile;

use super::{expect_dtype, expect_shape, reduce};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Op, Tensor};

fn check(geom: &Conv2dGeom, kernel: &str, named: &[(&str, &Tensor, &[usize])]) -> Result<String> {
    geom.validate()?;
    for (name, t, shape) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(format!("{kernel} {}", geom.describe()))
}

/// `y = conv2d(x, w) + bias`.
pub fn forward(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> Result<Op> {
    forward_with(gpu, geom, x, w, bias, y, AroundBn::default(), None)
}

/// [`forward`] whose input is formed where it is loaded (`input.input`: from a BatchNorm's,
/// `x` then being the BatchNorm's input; `input.input_quant`: the float `x` quantized), and
/// which forms the partial statistics of the BatchNorm after it (`bn_stats`, at least
/// [`forward_bn_partials`] floats; merged by `norm::stats_merge` with
/// [`forward_tile_columns`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    input: AroundBn<'_>,
    bn_stats: Option<&Tensor>,
) -> Result<Op> {
    const K: &str = "conv2d.forward";
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
    let fused = Fused {
        bn_stats,
        bn_sums: input.input_sums,
        ..Fused::on_load(input)
    };
    Ok(Op::Dispatch(geom.gemm().launch_with(
        gpu,
        Mode::Forward,
        (w, x),
        bias,
        y,
        1,
        fused,
        label,
    )?))
}

/// Columns (of batch·OH·OW) per partial statistic the forward forms for a BatchNorm on `gpu`.
pub fn forward_tile_columns(gpu: &Gpu, geom: &Conv2dGeom) -> usize {
    geom.gemm().tile(gpu, Mode::Forward).bn
}

/// The column tiles (of batch·H·W) whose backward sums grad-input forms for the BatchNorm
/// before on `gpu`: `norm::backward_merge`'s tile count.
pub fn grad_input_bn_sum_tiles(gpu: &Gpu, geom: &Conv2dGeom) -> usize {
    let columns = geom.gemm().tile(gpu, Mode::GradInput).bn;
    (geom.batch * geom.h * geom.w).div_ceil(columns)
}

/// Floats of grad-input's BatchNorm backward sums on any device: the narrowest tile (32
/// columns) makes the most.
pub fn grad_input_bn_sums(geom: &Conv2dGeom) -> usize {
    2 * (geom.batch * geom.h * geom.w).div_ceil(32) * geom.cin
}

/// Floats of the forward's partial BatchNorm statistics on any device: the narrowest tile
/// (32 columns) makes the most.
pub fn forward_bn_partials(geom: &Conv2dGeom) -> usize {
    let (oh, ow) = geom.out_hw();
    2 * (geom.batch * oh * ow).div_ceil(32) * geom.cout
}

/// `dx = dL/dx` from `dy` (a transposed convolution with `w`).
pub fn grad_input(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
) -> Result<Op> {
    grad_input_fused(gpu, geom, dy, w, dx, None, AroundBn::default())
}

/// [`grad_input`] with the layer input's DoReFa quantizer in its epilogue (`act`: `dx` masked by
/// the float input `act.x` and, with `act.requantize`, `act.x` replaced by its quantized value)
/// and the BatchNorms around the conv: with `bn.input`, `act.x` is that BatchNorm's input and
/// the float input is formed from it; with `bn.output`, `dy` is the conv's output and its
/// gradient is formed through the BatchNorm after it.
pub fn grad_input_fused(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    act: Option<ActGrad<'_>>,
    bn: AroundBn<'_>,
) -> Result<Op> {
    let label = check(
        geom,
        "conv2d.grad_input",
        &[
            ("dy", dy, &geom.output_shape()),
            ("w", w, &geom.weight_shape()),
            ("dx", dx, &geom.input_shape()),
        ],
    )?;
    if let Some(a) = act {
        check(
            geom,
            "conv2d.grad_input",
            &[("x", a.x, &geom.input_shape())],
        )?;
    }
    Ok(Op::Dispatch(geom.gemm().launch_with(
        gpu,
        Mode::GradInput,
        (w, dy),
        None,
        dx,
        1,
        Fused {
            act,
            bn_sums: bn.input_sums,
            ..Fused::on_load(bn)
        },
        label,
    )?))
}

/// `dw = dL/dw` (correlation of `x` with `dy`), with the default split-K; its partial sums go
/// into `scratch` when given (sized by `GemmConv::grad_weight_scratch_len`).
pub fn grad_weight(
    gpu: &Gpu,
    geom: &Conv2dGeom,
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
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: usize,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_with(gpu, geom, x, dy, dw, Some(splits), scratch)
}

/// `dw` and `db = dL/dbias` in one pass over `dy` (the bias gradient is the row sums of
/// grad-weight's A = dy), with the default split-K or `splits`; the partial sums of both go into
/// `scratch` when given (sized by `GemmConv::grad_weight_scratch_len(true)`).
#[allow(clippy::too_many_arguments)]
pub fn grad_weight_and_bias(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    db: &Tensor,
    splits: Option<usize>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    check(geom, "conv2d.grad_weight", &[("db", db, &[geom.cout])])?;
    grad_weight_inner(
        gpu,
        geom,
        x,
        dy,
        (dw, Some(db)),
        splits,
        scratch,
        AroundBn::default(),
    )
}

/// Grad-weight (and, given `db`, the bias gradient) with the default split-K, its input formed
/// where it is loaded (`bn.input`: from a BatchNorm's, `x` being the BatchNorm's input;
/// `bn.input_quant`: the float `x` quantized).
pub fn grad_weight_fused(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    (dw, db): (&Tensor, Option<&Tensor>),
    bn: AroundBn<'_>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    if let Some(db) = db {
        check(geom, "conv2d.grad_weight", &[("db", db, &[geom.cout])])?;
    }
    grad_weight_inner(gpu, geom, x, dy, (dw, db), None, scratch, bn)
}

fn grad_weight_with(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: Option<usize>,
    scratch: Option<&Tensor>,
) -> Result<Vec<Op>> {
    grad_weight_inner(
        gpu,
        geom,
        x,
        dy,
        (dw, None),
        splits,
        scratch,
        AroundBn::default(),
    )
}

#[allow(clippy::too_many_arguments)]
fn grad_weight_inner(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    (dw, db): (&Tensor, Option<&Tensor>),
    splits: Option<usize>,
    scratch: Option<&Tensor>,
    bn: AroundBn<'_>,
) -> Result<Vec<Op>> {
    let label = check(
        geom,
        "conv2d.grad_weight",
        &[
            ("x", x, &geom.input_shape()),
            ("dy", dy, &geom.output_shape()),
            ("dw", dw, &geom.weight_shape()),
        ],
    )?;
    let g = geom.gemm();
    let splits = splits.unwrap_or_else(|| g.default_splits());
    g.grad_weight_ops(gpu, (dy, x), (dw, db), splits, scratch, bn, label)
}

/// `db[c] = Σ_{n,y,x} dy[n, c, y, x]`.
pub fn grad_bias(gpu: &Gpu, geom: &Conv2dGeom, dy: &Tensor, db: &Tensor) -> Result<Op> {
    check(
        geom,
        "conv2d.grad_bias",
        &[("dy", dy, &geom.output_shape()), ("db", db, &[geom.cout])],
    )?;
    Ok(Op::Dispatch(reduce::channel_sum(gpu, dy, db)?))
}
