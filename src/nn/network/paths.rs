//! Which kernel each quantized conv's GEMMs run on: the cooperative-matrix kernels (tensor
//! cores) or the fp32 family, per layer and direction. By default every GEMM that can run on
//! cooperative matrices does; [`Network::set_coop_use`] keeps some on fp32 (what
//! `crate::tune` chooses from timings on the device), and a recorded plan names which kernel each
//! GEMM launch belongs to ([`PlanGemm`]), so that a step's timings can be read per layer.

use super::{Kind, Network, weighted};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Op};

/// One of a conv's three GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmDirection {
    Forward,
    GradInput,
    GradWeight,
}

impl GemmDirection {
    pub const ALL: [GemmDirection; 3] = [
        GemmDirection::Forward,
        GemmDirection::GradInput,
        GemmDirection::GradWeight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemmDirection::Forward => "forward",
            GemmDirection::GradInput => "grad_input",
            GemmDirection::GradWeight => "grad_weight",
        }
    }
}

/// Which of a quantized conv's GEMMs may run on cooperative matrices: each where the layer's
/// operands allow it and the device runs that direction there (all three by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoopUse {
    pub forward: bool,
    pub grad_input: bool,
    pub grad_weight: bool,
}

impl Default for CoopUse {
    fn default() -> Self {
        CoopUse {
            forward: true,
            grad_input: true,
            grad_weight: true,
        }
    }
}

impl CoopUse {
    pub fn get(&self, d: GemmDirection) -> bool {
        match d {
            GemmDirection::Forward => self.forward,
            GemmDirection::GradInput => self.grad_input,
            GemmDirection::GradWeight => self.grad_weight,
        }
    }

    pub fn set(&mut self, d: GemmDirection, on: bool) {
        match d {
            GemmDirection::Forward => self.forward = on,
            GemmDirection::GradInput => self.grad_input = on,
            GemmDirection::GradWeight => self.grad_weight = on,
        }
    }
}

/// A GEMM launch of a recorded plan: its index in the plan's ops, the layer and direction it
/// computes, and whether it runs on cooperative matrices (or their emulation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanGemm {
    pub op: usize,
    pub layer: String,
    pub direction: GemmDirection,
    pub coop: bool,
}

/// The direction of a conv / matmul GEMM launch of a layer's forward (`in_backward` false) or
/// backward ops, and whether it is a cooperative-matrix one, from its kernel: the
/// `conv_coop*.wgsl` file, or `conv2d.wgsl` (any of its launches in the forward is the forward,
/// even a transposed conv's, which is a grad-input GEMM; in the backward, `MODE` 2 is
/// grad-weight and the others grad-input). `None` for every other kernel (a split-K sum, a
/// BatchNorm pass, …).
pub(super) fn gemm_of(op: &Op, in_backward: bool) -> Option<(GemmDirection, bool)> {
    let Op::Dispatch(launch) = op else {
        return None;
    };
    let name = launch.kernel_name();
    let mut parts = name.split(':');
    let shader = parts.next()?;
    if shader.starts_with("conv_coop_gi") {
        Some((GemmDirection::GradInput, true))
    } else if shader.starts_with("conv_coop_gw") {
        Some((GemmDirection::GradWeight, true))
    } else if shader.starts_with("conv_coop") {
        Some((GemmDirection::Forward, true))
    } else if shader == "conv2d.wgsl" {
        let d = if !in_backward {
            GemmDirection::Forward
        } else if parts.any(|p| p == "MODE=2") {
            GemmDirection::GradWeight
        } else {
            GemmDirection::GradInput
        };
        Some((d, false))
    } else {
        None
    }
}

impl Network {
    /// The layers whose GEMMs can run on cooperative matrices on `gpu`, each with the
    /// directions the device runs there (in layer order; empty where it has none).
    pub fn coop_layers(&self, gpu: &Gpu) -> Vec<(String, Vec<GemmDirection>)> {
        self.layers
            .iter()
            .filter(|l| weighted::coop_operands(gpu, l).is_some())
            .map(|l| {
                let on_device = |d: &GemmDirection| match d {
                    GemmDirection::Forward => gpu.coop().is_some(),
                    GemmDirection::GradInput => gpu.coop_grad_input().is_some(),
                    GemmDirection::GradWeight => gpu.coop_grad_weight().is_some(),
                };
                let dirs = GemmDirection::ALL.into_iter().filter(on_device).collect();
                (l.name.clone(), dirs)
            })
            .collect()
    }

    /// Which of layer `name`'s GEMMs may run on cooperative matrices; plans recorded after
    /// this follow it (those recorded before keep theirs). The results are the same either way
    /// up to summation order (see `kernels::conv_coop`).
    pub fn set_coop_use(&mut self, name: &str, coop: CoopUse) -> Result<()> {
        let layer = self
            .layers
            .iter_mut()
            .find(|l| l.name == name && matches!(l.kind, Kind::Weighted { .. }))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no conv or linear layer named `{name}` in this model: name one of its weighted layers"
                ))
            })?;
        layer.coop = coop;
        Ok(())
    }

    /// Every weighted layer's [`CoopUse`], in layer order.
    pub fn coop_uses(&self) -> Vec<(String, CoopUse)> {
        self.layers
            .iter()
            .filter(|l| matches!(l.kind, Kind::Weighted { .. }))
            .map(|l| (l.name.clone(), l.coop))
            .collect()
    }
}
