//! What a conv GEMM does besides multiplying ([`Fused`]): the activation quantizer's epilogue
//! and the BatchNorm work done where its operands are loaded or its outputs written.

use super::{GemmConv, Mode};
use crate::error::{Error, Result};
use crate::gpu::{DType, Tensor};
use crate::kernels::expect_dtype;
use crate::kernels::norm::BnForm;
use crate::quant::Bits;

/// Grad-input's epilogue: the layer input's DoReFa activation quantizer, applied as each dx is
/// written (the shader's `ACT_GRAD`), instead of a pass of its own over dx and x. At float bits
/// the quantizer is the identity and dx passes unmasked: what a float input formed through a
/// BatchNorm has (grad-input reads the BatchNorm's input x for that BatchNorm's backward sums).
#[derive(Clone, Copy, Debug)]
pub struct ActGrad<'a> {
    /// The layer's float input x: dx is masked by its straight-through rule.
    pub x: &'a Tensor,
    pub bits: Bits,
    /// Also replace x by its quantized value (what grad-weight reads next).
    pub requantize: bool,
}

/// A layer input that is a BatchNorm's output (with its ReLU and channel shuffle, and the
/// layer's DoReFa input quantizer) formed where the GEMM loads it instead of stored (the
/// shader's `IN_BN`): the GEMM is given the BatchNorm's input in the input's place. Forward and
/// grad-weight load the quantized input; grad-input's [`ActGrad`] epilogue forms the float one
/// for its mask.
#[derive(Clone, Copy, Debug)]
pub struct InputBn<'a> {
    pub form: BnForm<'a>,
    /// The layer's input quantizer.
    pub bits: Bits,
}

/// A conv whose output feeds a BatchNorm whose backward (the input gradient) is applied where
/// grad-input and grad-weight load the conv's output gradient (the shader's `OUT_BN`): their dy
/// is then the conv's output, `dy` here the BatchNorm's output gradient, and `form.table` must
/// hold the BatchNorm's `dbeta`, `dgamma` and scale (its backward reduction writes them).
#[derive(Clone, Copy, Debug)]
pub struct OutputBn<'a> {
    pub form: BnForm<'a>,
    pub dy: &'a Tensor,
}

/// The BatchNorms whose work a conv's GEMMs do where they load: the one whose output is the
/// conv's input, and the one after it whose backward forms the conv's output gradient.
/// `input_sums`: grad-input also forms the sums of the input BatchNorm's backward reduction (see
/// [`Fused::bn_sums`]). `input_quant`: no BatchNorm before, but the layer's float input
/// quantized where forward and grad-weight load it (see [`Fused::input_quant`]). `dx_plus`:
/// grad-input adds another reader's gradient of the input to dx as it writes it (see
/// [`Fused::dx_plus`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct AroundBn<'a> {
    pub input: Option<InputBn<'a>>,
    pub output: Option<OutputBn<'a>>,
    pub input_sums: Option<&'a Tensor>,
    pub input_quant: Option<Bits>,
    pub dx_plus: Option<&'a Tensor>,
}

impl AroundBn<'_> {
    /// Whether the GEMMs have work to do where they load their operands (which only conv2d's
    /// kernels do).
    pub fn any(&self) -> bool {
        self.input.is_some()
            || self.output.is_some()
            || self.input_sums.is_some()
            || self.input_quant.is_some()
            || self.dx_plus.is_some()
    }
}

/// What a GEMM does besides multiplying: grad-input's activation-quantizer epilogue, the
/// BatchNorms around it, forward's partial statistics for the BatchNorm after it (`(tiles, 2,
/// Cout)`: see [`forward_bn_partials`]) and grad-input's sums for the backward of the
/// BatchNorm before it (`bn_sums`, `(tiles, 2, Cin)`: per column tile and channel, the sum of
/// the BatchNorm's output gradient dx after its ReLU mask, and of that times x̂; see
/// [`grad_input_bn_sums`]), which its `norm::backward_merge` adds up instead of reducing dx.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fused<'a> {
    pub act: Option<ActGrad<'a>>,
    pub input_bn: Option<InputBn<'a>>,
    pub output_bn: Option<OutputBn<'a>>,
    pub bn_stats: Option<&'a Tensor>,
    pub bn_sums: Option<&'a Tensor>,
    /// The layer's DoReFa input quantizer, applied where forward and grad-weight load the
    /// stored float input (the shader's `IN_QUANT` without `IN_BN`), instead of a pass of its
    /// own into a temporary, forward and again for grad-weight.
    pub input_quant: Option<Bits>,
    /// Grad-input: the gradient another reader of the layer input wrote, added to dx as it is
    /// written (after the mask), so that dx is the input's whole gradient (the shader's
    /// `DX_PLUS`), instead of an accumulate pass after the GEMM.
    pub dx_plus: Option<&'a Tensor>,
}

impl<'a> Fused<'a> {
    /// What the GEMMs do where they load, as `bn` describes it: the input formed (through a
    /// BatchNorm, or quantized) and the next BatchNorm's backward (grad-input's sums apart).
    pub(crate) fn on_load(bn: AroundBn<'a>) -> Fused<'a> {
        Fused {
            input_bn: bn.input,
            output_bn: bn.output,
            input_quant: bn.input_quant,
            dx_plus: bn.dx_plus,
            ..Fused::default()
        }
    }

    /// Checks that `mode`'s GEMM of `g`, writing `out` in `tiles` column tiles, can do these.
    pub(crate) fn check(
        &self,
        g: &GemmConv,
        mode: Mode,
        out: &Tensor,
        tiles: usize,
        label: &str,
    ) -> Result<()> {
        let refuse = |why: &str| Err(Error::shape(label, why));
        if self.act.is_some() && mode != Mode::GradInput {
            return refuse("only grad-input applies an input quantizer");
        }
        if let Some(a) = self.act {
            if a.bits.is_float() && a.requantize {
                return refuse("a float input has no quantized value to write back");
            }
            expect_dtype(label, "x", a.x, DType::F32)?;
            if a.x.numel() != out.numel() {
                return refuse("the input x is not the size of dx");
            }
        }
        if let Some(bn) = self.input_bn {
            if mode == Mode::GradInput && self.act.is_none_or(|a| a.requantize) {
                return refuse(
                    "grad-input forms a BatchNorm's output only for its quantizer's mask (an ActGrad without requantize)",
                );
            }
            bn.form.check(label, g.cin)?;
        }
        if let Some(bits) = self.input_quant {
            if mode == Mode::GradInput {
                return refuse(
                    "grad-input does not load the layer input: its quantizer's mask is an ActGrad",
                );
            }
            if self.input_bn.is_some() {
                return refuse("an input formed through a BatchNorm is quantized with it");
            }
            if bits.is_float() {
                return refuse("a float input has no quantizer to apply on load");
            }
        }
        if let Some(t) = self.dx_plus {
            if mode != Mode::GradInput {
                return refuse("only grad-input adds another gradient to what it writes");
            }
            expect_dtype(label, "dx_plus", t, DType::F32)?;
            if t.numel() != out.numel() {
                return refuse("the gradient to add is not the size of dx");
            }
        }
        if let Some(bn) = self.output_bn {
            if mode == Mode::Forward {
                return refuse("only the backward GEMMs apply the next BatchNorm's backward");
            }
            bn.form.check(label, g.cout)?;
            if bn.dy.numel() != g.batch * g.cout * g.oh * g.ow {
                return refuse(
                    "the BatchNorm's output gradient is not the size of the conv's output",
                );
            }
        }
        if let Some(t) = self.bn_sums {
            if mode != Mode::GradInput || self.input_bn.is_none() {
                return refuse(
                    "only grad-input forms a BatchNorm's backward sums, of the BatchNorm it forms its input from",
                );
            }
            let need = 2 * tiles * g.cin;
            if t.numel() < need {
                return Err(Error::shape(
                    label,
                    format!(
                        "{} floats for BatchNorm backward sums, {need} needed",
                        t.numel()
                    ),
                ));
            }
        }
        if let Some(t) = self.bn_stats {
            if mode != Mode::Forward {
                return refuse("only the forward GEMM forms BatchNorm statistics");
            }
            let need = 2 * tiles * g.cout;
            if t.numel() < need {
                return Err(Error::shape(
                    label,
                    format!(
                        "{} floats for BatchNorm partial statistics, {need} needed",
                        t.numel()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The shader's constants that switch these on.
    pub(super) fn constants(&self) -> Vec<(&'static str, f64)> {
        let flag = |on: bool| f64::from(u8::from(on));
        let mut c = self.act_constants();
        c.extend(input_bn_constants(self.input_bn));
        c.extend([
            (
                "IN_QUANT",
                flag(
                    self.input_bn.is_some_and(|b| !b.bits.is_float()) || self.input_quant.is_some(),
                ),
            ),
            ("BN_STATS", flag(self.bn_stats.is_some())),
            ("BN_SUMS", flag(self.bn_sums.is_some())),
            ("DX_PLUS", flag(self.dx_plus.is_some())),
        ]);
        c.extend(output_bn_constants(self.output_bn));
        c
    }

    /// Grad-input's input-quantizer backward (ACT_GRAD: 0 none, 1 the mask, 2 also the
    /// requantization) and the levels of that quantizer, else of the input formed on load.
    pub(crate) fn act_constants(&self) -> Vec<(&'static str, f64)> {
        let levels = self
            .act
            .map(|a| a.bits)
            .or(self.input_bn.map(|b| b.bits))
            .or(self.input_quant);
        vec![
            (
                "ACT_GRAD",
                self.act
                    .filter(|a| !a.bits.is_float())
                    .map_or(0.0, |a| if a.requantize { 2.0 } else { 1.0 }),
            ),
            ("ACT_LEVELS", levels.map_or(1.0, |b| f64::from(b.levels()))),
            (
                "ACT_INV_LEVELS",
                levels.map_or(1.0, |b| f64::from(b.inv_levels())),
            ),
        ]
    }

    /// What a launch's label says of these.
    pub(crate) fn describe(&self) -> String {
        let mut s = String::new();
        for (on, what) in [
            (self.input_bn.is_some(), " through bn"),
            (self.input_quant.is_some(), " quantized on load"),
            (self.bn_stats.is_some(), " +bn stats"),
            (self.bn_sums.is_some(), " +bn sums"),
            (self.output_bn.is_some(), " +bn backward"),
            (self.dx_plus.is_some(), " +dx"),
        ] {
            if on {
                s.push_str(what);
            }
        }
        s
    }
}

/// The constants of the input formed from a BatchNorm's on load: IN_BN, IN_ACT, IN_SHUFFLE
/// (conv2d.wgsl and the cooperative-matrix kernels alike).
pub(crate) fn input_bn_constants(input: Option<InputBn<'_>>) -> [(&'static str, f64); 3] {
    [
        ("IN_BN", f64::from(u8::from(input.is_some()))),
        ("IN_ACT", input.map_or(0, |b| b.form.act.code()) as f64),
        ("IN_SHUFFLE", input.map_or(1, |b| b.form.shuffle) as f64),
    ]
}

/// The constants of the next BatchNorm's backward applied to dy on load: OUT_BN, OUT_ACT,
/// OUT_SHUFFLE.
pub(crate) fn output_bn_constants(output: Option<OutputBn<'_>>) -> [(&'static str, f64); 3] {
    [
        ("OUT_BN", f64::from(u8::from(output.is_some()))),
        ("OUT_ACT", output.map_or(0, |b| b.form.act.code()) as f64),
        ("OUT_SHUFFLE", output.map_or(1, |b| b.form.shuffle) as f64),
    ]
}
