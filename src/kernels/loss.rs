//! `shaders/loss.wgsl`: cross-entropy and MSE with their gradients, and per-step metrics written
//! on the GPU into a slot given by the step buffer.

use super::{Entry, LOSS, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor};
use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &LOSS,
        name,
        used,
    }
}

const CROSS_ENTROPY: Entry = entry("cross_entropy", &[(1, R), (2, R), (3, W), (4, W)]);
const MSE: Entry = entry("mse", &[(1, R), (3, W), (4, W), (8, R)]);
const BATCH_METRICS: Entry = entry("batch_metrics", &[(5, R), (6, W), (7, R)]);

/// The per-step values kernels read (`Step` in the shaders), written before each submit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepValues {
    /// Metrics slot this submit writes.
    pub slot: u32,
    /// Optimizer step, from 1.
    pub t: u32,
    pub lr: f32,
    /// Adam: `lr / (1 − β1^t)`, formed in f64.
    pub adam_step: f32,
    /// Adam: `sqrt(1 − β2^t)`, formed in f64.
    pub bias2_sqrt: f32,
    pub _pad: [u32; 3],
}

/// Words of the step buffer (a `U32` tensor of this length).
pub const STEP_WORDS: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    _pad: [u32; 2],
}

fn rows_cols(kernel: &str, t: &Tensor) -> Result<(usize, usize)> {
    let s = t.shape();
    if s.is_empty() || s[0] == 0 {
        return Err(Error::shape(
            kernel,
            format!("expects (batch, ...), got {s:?}"),
        ));
    }
    Ok((s[0], s[1..].iter().product()))
}

/// Cross-entropy of `logits (N, C)` against `labels (N)`: `dlogits = (softmax − onehot)/N`;
/// `per_row (2N)` = loss and correctness of each row.
pub fn cross_entropy(
    gpu: &Gpu,
    logits: &Tensor,
    labels: &Tensor,
    dlogits: &Tensor,
    per_row: &Tensor,
) -> Result<Op> {
    const K: &str = "cross_entropy";
    let (n, c) = rows_cols(K, logits)?;
    expect_dtype(K, "logits", logits, DType::F32)?;
    expect_dtype(K, "labels", labels, DType::U32)?;
    expect_shape(K, "labels", labels, &[n])?;
    expect_shape(K, "dlogits", dlogits, logits.shape())?;
    expect_shape(K, "per_row", per_row, &[2 * n])?;
    count_u32(K, n * c)?;
    CROSS_ENTROPY.launch(
        gpu,
        &[],
        format!("{K} [{n}, {c}]"),
        &Params {
            rows: n as u32,
            cols: c as u32,
            _pad: [0; 2],
        },
        &[logits, labels, dlogits, per_row],
        elementwise_grid(gpu, n as u32),
    )
}

/// Mean squared error of `y` against `target` (same shape): `dy = 2 (y − t) / numel`.
pub fn mse(gpu: &Gpu, y: &Tensor, target: &Tensor, dy: &Tensor, per_row: &Tensor) -> Result<Op> {
    const K: &str = "mse";
    let (n, c) = rows_cols(K, y)?;
    expect_dtype(K, "y", y, DType::F32)?;
    expect_shape(K, "target", target, y.shape())?;
    expect_shape(K, "dy", dy, y.shape())?;
    expect_shape(K, "per_row", per_row, &[2 * n])?;
    count_u32(K, n * c)?;
    MSE.launch(
        gpu,
        &[],
        format!("{K} {:?}", y.shape()),
        &Params {
            rows: n as u32,
            cols: c as u32,
            _pad: [0; 2],
        },
        &[y, dy, per_row, target],
        elementwise_grid(gpu, n as u32),
    )
}

/// `metrics[slot] = (mean loss, correct count)` of the `rows` rows of `per_row`.
pub fn batch_metrics(
    gpu: &Gpu,
    rows: usize,
    per_row: &Tensor,
    metrics: &Tensor,
    step: &Tensor,
) -> Result<Op> {
    const K: &str = "batch_metrics";
    expect_shape(K, "per_row", per_row, &[2 * rows])?;
    expect_dtype(K, "metrics", metrics, DType::F32)?;
    expect_dtype(K, "step", step, DType::U32)?;
    expect_shape(K, "step", step, &[STEP_WORDS])?;
    BATCH_METRICS.launch(
        gpu,
        &[],
        format!("{K} [{rows}]"),
        &Params {
            rows: rows as u32,
            cols: 0,
            _pad: [0; 2],
        },
        &[per_row, metrics, step],
        [1, 1, 1],
    )
}
