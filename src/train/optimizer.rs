//! Optimizer state on the GPU: moment arenas with the parameters' layout, updated by one dispatch
//! per step, and the step-dependent values formed on the CPU in f64 as PyTorch forms them.

use crate::error::Result;
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::loss::StepValues;
use crate::kernels::optim::{OptimizerKind, update};
use crate::nn::Network;

/// Adam's or SGD's state: `m` (Adam's first moment, or SGD's momentum buffer) and `v`.
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub m: Tensor,
    pub v: Tensor,
    /// Steps taken (PyTorch's `state["step"]`).
    pub t: u32,
}

impl Optimizer {
    pub fn new(gpu: &Gpu, net: &Network, kind: OptimizerKind) -> Result<Optimizer> {
        Ok(Optimizer {
            kind,
            m: net.params.alloc(gpu, "optimizer state m")?,
            v: net.params.alloc(gpu, "optimizer state v")?,
            t: 0,
        })
    }

    /// The update of every parameter of `net`; reads `t` and lr from the network's step buffer.
    pub fn op(&self, gpu: &Gpu, net: &Network) -> Result<Op> {
        update(
            gpu,
            &self.kind,
            &net.step,
            &net.param_arena,
            &net.grad_arena,
            &self.m,
            &self.v,
        )
    }

    /// Step values for the next update (`t + 1`) at learning rate `lr`, writing metrics to `slot`.
    pub fn next_values(&self, lr: f64, slot: u32) -> StepValues {
        step_values(&self.kind, self.t + 1, lr, slot)
    }
}

/// The step buffer's values for optimizer step `t` (bias corrections in f64, as PyTorch).
pub fn step_values(kind: &OptimizerKind, t: u32, lr: f64, slot: u32) -> StepValues {
    let (adam_step, bias2_sqrt) = match *kind {
        OptimizerKind::Adam { beta1, beta2, .. } => (
            lr / (1.0 - (beta1 as f64).powi(t as i32)),
            (1.0 - (beta2 as f64).powi(t as i32)).sqrt(),
        ),
        OptimizerKind::Sgd { .. } => (0.0, 1.0),
    };
    StepValues {
        slot,
        t,
        lr: lr as f32,
        adam_step: adam_step as f32,
        bias2_sqrt: bias2_sqrt as f32,
        _pad: [0; 3],
    }
}
