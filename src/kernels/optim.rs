//! `shaders/optim.wgsl`: Adam (coupled L2, PyTorch's order of operations) and SGD (momentum,
//! dampening, Nesterov) over a whole parameter arena in one dispatch.

use super::loss::STEP_WORDS;
use super::{Entry, OPTIM, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::Result;
use crate::gpu::{Bind, DType, Gpu, Op, Tensor};
use Bind::{Read as R, ReadWrite as W};

const ADAM: Entry = Entry {
    shader: &OPTIM,
    name: "adam",
    used: &[(1, R), (2, W), (3, R), (4, W), (5, W)],
};
const SGD: Entry = Entry {
    shader: &OPTIM,
    name: "sgd",
    used: &[(1, R), (2, W), (3, R), (4, W), (5, W)],
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    nesterov: u32,
    _pad: [u32; 2],
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

/// Hyper-parameters that do not change between steps (lr does: it is in the step buffer).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    Sgd {
        momentum: f32,
        dampening: f32,
        nesterov: bool,
        weight_decay: f32,
    },
}

impl OptimizerKind {
    pub fn weight_decay(&self) -> f32 {
        match *self {
            OptimizerKind::Adam { weight_decay, .. } | OptimizerKind::Sgd { weight_decay, .. } => {
                weight_decay
            }
        }
    }
}

/// One update of every element of `param` from `grad`, with state `m` and `v` (SGD keeps its
/// momentum buffer in `m`; `v` is unused). All four have the same shape.
pub fn update(
    gpu: &Gpu,
    kind: &OptimizerKind,
    step: &Tensor,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<Op> {
    const K: &str = "optimizer";
    for (name, t) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, param.shape())?;
    }
    expect_shape(K, "step", step, &[STEP_WORDS])?;
    let n = count_u32(K, param.numel())?;
    let (entry, p) = match *kind {
        OptimizerKind::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => (
            &ADAM,
            Params {
                n,
                nesterov: 0,
                _pad: [0; 2],
                beta1,
                beta2,
                eps,
                weight_decay,
            },
        ),
        OptimizerKind::Sgd {
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } => (
            &SGD,
            Params {
                n,
                nesterov: nesterov as u32,
                _pad: [0; 2],
                beta1: momentum,
                beta2: dampening,
                eps: 0.0,
                weight_decay,
            },
        ),
    };
    entry.launch(
        gpu,
        &[],
        format!("{} [{n}]", entry.name),
        &p,
        &[step, param, grad, m, v],
        elementwise_grid(gpu, n),
    )
}
