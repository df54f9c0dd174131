//! The quantizers a layer applies, of any scheme, as launches: the input's (a weighted layer's,
//! or under IAO a pool's) and the weight's. DoReFa's and wbwtab's are stateless; an IAO quantizer
//! observes in training (its state in the running arena) before it quantizes, except under
//! QAFT, which freezes every scale.

use super::Network;
use super::lower::{IaoSlot, Kind, Layer, WeightQ};
use crate::error::Result;
use crate::gpu::{Gpu, Op, Tensor};
use crate::kernels::quant;
use crate::quant::{ActQuant, Bits, Scheme};

/// A layer's input quantizer.
pub(super) enum InputQuant<'a> {
    Dorefa(Bits),
    Iao {
        slot: &'a IaoSlot,
        state: Tensor,
        frozen: bool,
    },
}

/// Whether IAO's scales are frozen (QAFT): training then observes nothing.
pub(super) fn frozen(net: &Network) -> bool {
    matches!(net.quant.scheme, Scheme::Iao(o) if o.qaft)
}

impl<'a> InputQuant<'a> {
    /// The input quantizer of `l`, if it has one.
    pub(super) fn of(net: &Network, l: &'a Layer) -> Result<Option<InputQuant<'a>>> {
        if let Some(slot) = &l.input_q {
            return Ok(Some(InputQuant::Iao {
                slot,
                state: net.running.view(&net.running_arena, slot.state)?,
                frozen: frozen(net),
            }));
        }
        Ok(match l.kind {
            Kind::Weighted {
                input: ActQuant::Dorefa(b),
                ..
            } => Some(InputQuant::Dorefa(b)),
            _ => None,
        })
    }

    /// What a training forward does before quantizing: IAO's observer and scale update. With
    /// `by_producer`, the layer that wrote `x` also wrote its extremes
    /// (`LayerBuffers::extremes_for`): the observer only merges them.
    pub(super) fn observe(&self, gpu: &Gpu, x: &Tensor, by_producer: bool) -> Result<Vec<Op>> {
        match self {
            InputQuant::Iao {
                slot,
                state,
                frozen: false,
            } if by_producer => Ok(vec![slot.q.observe_produced(gpu, state, x)?]),
            InputQuant::Iao {
                slot,
                state,
                frozen: false,
            } => slot.q.observe(gpu, state, x),
            _ => Ok(Vec::new()),
        }
    }

    pub(super) fn forward(&self, gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Op> {
        match self {
            InputQuant::Dorefa(b) => quant::act_forward(gpu, *b, x, y),
            InputQuant::Iao { slot, state, .. } => slot.q.forward(gpu, state, x, y),
        }
    }

    pub(super) fn forward_in_place(&self, gpu: &Gpu, x: &Tensor) -> Result<Vec<Op>> {
        match self {
            InputQuant::Dorefa(b) => quant::act_forward_in_place(gpu, *b, x),
            InputQuant::Iao { slot, state, .. } => {
                Ok(vec![slot.q.forward_in_place(gpu, state, x)?])
            }
        }
    }

    /// `d` (dL/dx̂) becomes dL/dx, masked by the float `x`.
    pub(super) fn backward_in_place(&self, gpu: &Gpu, x: &Tensor, d: &Tensor) -> Result<Vec<Op>> {
        match self {
            InputQuant::Dorefa(b) => quant::act_backward_in_place(gpu, *b, x, d),
            InputQuant::Iao { slot, state, .. } => {
                Ok(vec![slot.q.backward_in_place(gpu, state, x, d)?])
            }
        }
    }

    /// [`Self::backward_in_place`], then `x` quantized where it lies (in one pass).
    pub(super) fn backward_requantize(&self, gpu: &Gpu, x: &Tensor, d: &Tensor) -> Result<Vec<Op>> {
        match self {
            InputQuant::Dorefa(b) => quant::act_backward_requantize(gpu, *b, x, d),
            InputQuant::Iao { slot, state, .. } => {
                Ok(vec![slot.q.backward_requantize(gpu, state, x, d)?])
            }
        }
    }

    /// [`Self::backward_in_place`], then `x` quantized into `y` (IAO: in one pass).
    pub(super) fn backward_quantize(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        d: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        match self {
            InputQuant::Dorefa(_) => {
                let mut ops = self.backward_in_place(gpu, x, d)?;
                ops.push(self.forward(gpu, x, y)?);
                Ok(ops)
            }
            InputQuant::Iao { slot, state, .. } => {
                Ok(vec![slot.q.backward_quantize(gpu, state, x, d, y)?])
            }
        }
    }
}

impl WeightQ {
    /// `Ŵ` from `W` (IAO in training: the observer first).
    pub(super) fn forward(
        &self,
        net: &Network,
        gpu: &Gpu,
        train: bool,
        w: &Tensor,
        w_hat: &Tensor,
    ) -> Result<Vec<Op>> {
        match self {
            // The network's `DorefaWeights` forms every DoReFa layer's Ŵ at once.
            WeightQ::Dorefa(_) => Ok(Vec::new()),
            // Binary weights centre the latent weights in place, in evaluation too (micronet).
            WeightQ::Wbwtab(q) => q.forward(gpu, w, w_hat),
            WeightQ::Iao(slot) => {
                let state = net.running.view(&net.running_arena, slot.state)?;
                let mut ops = if train && !frozen(net) {
                    slot.q.observe(gpu, &state, w)?
                } else {
                    Vec::new()
                };
                ops.push(slot.q.forward(gpu, &state, w, w_hat)?);
                Ok(ops)
            }
        }
    }

    /// dL/dW from `g` = dL/dŴ.
    pub(super) fn backward(
        &self,
        net: &Network,
        gpu: &Gpu,
        w: &Tensor,
        g: &Tensor,
        dw: &Tensor,
    ) -> Result<Vec<Op>> {
        match self {
            // ... and every dL/dW at the end of the backward pass.
            WeightQ::Dorefa(_) => Ok(Vec::new()),
            WeightQ::Wbwtab(q) => q.backward(gpu, w, g, dw),
            WeightQ::Iao(slot) => {
                let state = net.running.view(&net.running_arena, slot.state)?;
                Ok(vec![slot.q.backward(gpu, &state, w, g, dw)?])
            }
        }
    }

    /// [`WeightQ::backward`] in place: `d` holds dL/dŴ and becomes dL/dW (IAO only: DoReFa's
    /// backward reads the whole gradient for its max term).
    pub(super) fn backward_in_place(
        &self,
        net: &Network,
        gpu: &Gpu,
        w: &Tensor,
        d: &Tensor,
    ) -> Result<Op> {
        match self {
            WeightQ::Iao(slot) => {
                let state = net.running.view(&net.running_arena, slot.state)?;
                slot.q.backward_in_place(gpu, &state, w, d)
            }
            _ => Err(crate::error::Error::Invalid(
                "only IAO's weight quantizer has an in-place backward".into(),
            )),
        }
    }
}
