//! `shaders/norm.wgsl`: BatchNorm2d forward (train: batch statistics, running stats updated; eval:
//! running stats) and backward, with an optional fused ReLU.

use super::{Entry, NORM, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};
use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &NORM,
        name,
        used,
    }
}

const STATS: Entry = entry("bn_stats", &[(1, R), (2, W), (3, W), (4, W)]);
const EVAL_STATS: Entry = entry("bn_eval_stats", &[(2, W), (3, W), (4, W)]);
const APPLY: Entry = entry("bn_apply", &[(1, R), (5, R), (6, R), (7, R), (8, W)]);
const BACKWARD_REDUCE: Entry = entry(
    "bn_backward_reduce",
    &[(1, R), (5, R), (9, R), (10, R), (11, W), (12, W)],
);
const BACKWARD_APPLY: Entry = entry(
    "bn_backward_apply",
    &[
        (1, R),
        (5, R),
        (6, R),
        (9, R),
        (10, R),
        (13, R),
        (14, R),
        (15, W),
    ],
);

/// `(N, C, S)` of a BatchNorm input `(N, C, H, W)` (S = H·W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl BnShape {
    pub fn of(shape: &[usize]) -> Result<BnShape> {
        if shape.len() < 2 {
            return Err(Error::shape(
                "batchnorm",
                format!("input must be (N, C, ...), got {shape:?}"),
            ));
        }
        Ok(BnShape {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        })
    }

    fn numel(&self) -> usize {
        self.n * self.c * self.s
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    s: u32,
    relu: u32,
    eps: f32,
    momentum: f32,
    _pad: [f32; 2],
}

fn params(sh: BnShape, relu: bool, eps: f32, momentum: f32) -> Result<Params> {
    count_u32("batchnorm", sh.numel())?;
    Ok(Params {
        n: sh.n as u32,
        c: sh.c as u32,
        s: sh.s as u32,
        relu: relu as u32,
        eps,
        momentum,
        _pad: [0.0; 2],
    })
}

fn check(kernel: &str, named: &[(&str, &Tensor, &[usize])]) -> Result<()> {
    for (name, t, shape) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(())
}

fn per_channel(gpu: &Gpu, c: usize) -> [u32; 3] {
    grid_1d(c as u32, gpu.limits.max_compute_workgroups_per_dimension)
}

/// Train mode: `stats = [mean, invstd]` of `x` per channel (biased variance); running stats move
/// by `momentum` toward the batch mean and unbiased variance.
#[allow(clippy::too_many_arguments)]
pub fn stats_train(
    gpu: &Gpu,
    x: &Tensor,
    eps: f32,
    momentum: f32,
    stats: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<Op> {
    let sh = BnShape::of(x.shape())?;
    check(
        "bn_stats",
        &[
            ("x", x, x.shape()),
            ("stats", stats, &[2 * sh.c]),
            ("running_mean", running_mean, &[sh.c]),
            ("running_var", running_var, &[sh.c]),
        ],
    )?;
    STATS.launch(
        gpu,
        &[],
        format!("bn_stats {:?}", x.shape()),
        &params(sh, false, eps, momentum)?,
        &[x, stats, running_mean, running_var],
        per_channel(gpu, sh.c),
    )
}

/// Eval mode: `stats` from the running statistics.
pub fn stats_eval(
    gpu: &Gpu,
    c: usize,
    eps: f32,
    running_mean: &Tensor,
    running_var: &Tensor,
    stats: &Tensor,
) -> Result<Op> {
    check(
        "bn_eval_stats",
        &[
            ("stats", stats, &[2 * c]),
            ("running_mean", running_mean, &[c]),
            ("running_var", running_var, &[c]),
        ],
    )?;
    let sh = BnShape { n: 1, c, s: 1 };
    EVAL_STATS.launch(
        gpu,
        &[],
        format!("bn_eval_stats [{c}]"),
        &params(sh, false, eps, 0.0)?,
        &[stats, running_mean, running_var],
        elementwise_grid(gpu, c as u32),
    )
}

/// `y = γ (x − mean) invstd + β`, then ReLU when `relu`.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    gpu: &Gpu,
    relu: bool,
    x: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    y: &Tensor,
) -> Result<Op> {
    let sh = BnShape::of(x.shape())?;
    check(
        "bn_apply",
        &[
            ("x", x, x.shape()),
            ("stats", stats, &[2 * sh.c]),
            ("gamma", gamma, &[sh.c]),
            ("beta", beta, &[sh.c]),
            ("y", y, x.shape()),
        ],
    )?;
    let n = count_u32("bn_apply", sh.numel())?;
    APPLY.launch(
        gpu,
        &[],
        format!(
            "bn_apply{} {:?}",
            if relu { "+relu" } else { "" },
            x.shape()
        ),
        &params(sh, relu, 0.0, 0.0)?,
        &[x, stats, gamma, beta, y],
        elementwise_grid(gpu, n),
    )
}

/// Backward of [`apply`] in train mode: `dgamma`, `dbeta` (written whole) and, when wanted, `dx`.
/// `y` is the forward output (its sign masks `dy` when the ReLU is fused).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    relu: bool,
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
    dx: Option<&Tensor>,
) -> Result<Vec<Op>> {
    let sh = BnShape::of(x.shape())?;
    let c = [sh.c];
    check(
        "bn_backward",
        &[
            ("x", x, x.shape()),
            ("y", y, x.shape()),
            ("dy", dy, x.shape()),
            ("stats", stats, &[2 * sh.c]),
            ("gamma", gamma, &c),
            ("dgamma", dgamma, &c),
            ("dbeta", dbeta, &c),
        ],
    )?;
    let p = params(sh, relu, 0.0, 0.0)?;
    let mut ops = vec![BACKWARD_REDUCE.launch(
        gpu,
        &[],
        format!("bn_backward_reduce {:?}", x.shape()),
        &p,
        &[x, stats, y, dy, dgamma, dbeta],
        per_channel(gpu, sh.c),
    )?];
    if let Some(dx) = dx {
        check("bn_backward", &[("dx", dx, x.shape())])?;
        let n = count_u32("bn_backward", sh.numel())?;
        ops.push(BACKWARD_APPLY.launch(
            gpu,
            &[],
            format!("bn_backward_apply {:?}", x.shape()),
            &p,
            &[x, stats, gamma, y, dy, dgamma, dbeta, dx],
            elementwise_grid(gpu, n),
        )?);
    }
    Ok(ops)
}
