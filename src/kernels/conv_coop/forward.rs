//! The forward on cooperative matrices (`shaders/conv_coop.wgsl`).

use super::{CoopMode, TILE, grid, label_suffix, packing_label, shader_for, slot_rows};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Op, Tensor};
use crate::kernels::CONV_COOP;
use crate::kernels::conv2d::{AroundBn, Conv2dGeom, Fused, Mode, input_bn_constants};
use crate::kernels::{expect_dtype, expect_shape};
use crate::quant::Bits;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    gn: u32,
    _pad: [u32; 3],
}

/// `y = conv2d(x, w) + bias` for `x` holding `a_bits` DoReFa activation levels and `w` holding
/// `w_bits` weight levels, on cooperative matrices (`mode`). With `input.input` (whose `bits`
/// must be `a_bits`), `x` is a BatchNorm's input and the levels are formed from it as they are
/// loaded; with `input.input_quant` (`a_bits`), `x` is the layer's float input, quantized as it
/// is loaded. With `bn_stats`, it also forms the partial statistics of the BatchNorm after it, per [`TILE`]
/// columns, as `conv2d::forward_with` does.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    (w_bits, a_bits): (Bits, Bits),
    (input, bn_stats): (AroundBn<'_>, Option<&Tensor>),
    mode: CoopMode,
) -> Result<Op> {
    const K: &str = "conv2d.forward (cooperative matrices)";
    geom.validate()?;
    for (name, t, shape) in [
        ("x", x, geom.input_shape()),
        ("w", w, geom.weight_shape()),
        ("y", y, geom.output_shape()),
    ] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, &shape)?;
    }
    if let Some(b) = bias {
        expect_shape(K, "bias", b, &[geom.cout])?;
    }
    if w_bits.is_float() || a_bits.is_float() || w_bits.get() > 8 || a_bits.get() > 8 {
        return Err(Error::shape(
            K,
            "needs weights and activations of 2 to 8 bits (their codes must be exact in f16)",
        ));
    }
    if input.input.is_some_and(|bn| bn.bits != a_bits)
        || input.input_quant.is_some_and(|b| b != a_bits)
    {
        return Err(Error::shape(
            K,
            "the input formed on load must be quantized to the activation bits",
        ));
    }
    let (oh, ow) = geom.out_hw();
    let gn = geom.batch * oh * ow;
    if u32::try_from(gn).is_err() || u32::try_from(x.numel().max(y.numel())).is_err() {
        return Err(Error::shape(
            K,
            "tensor too large to index with 32 bits: use a smaller batch size",
        ));
    }
    // The BatchNorm work is conv2d.wgsl's forward's, checked and labelled the same way.
    let fused = Fused {
        bn_stats,
        bn_sums: input.input_sums,
        ..Fused::on_load(input)
    };
    let gemm = geom.gemm();
    // The fp32 forward's vector forms: VEC_A 2 (weight rows), VEC_B 1 (a pointwise input).
    let (vec_a, vec_b) = if gpu.vector_loads() {
        gemm.vector_loads(Mode::Forward)
    } else {
        (0, 0)
    };
    fused.check(&gemm, Mode::Forward, y, gn.div_ceil(TILE), K)?;
    let (nw, na) = (f64::from(w_bits.levels()), f64::from(a_bits.levels()));
    let c = |v: usize| v as f64;
    let flag = |on: bool| f64::from(u8::from(on));
    let mut constants = vec![
        ("HAS_BIAS", flag(bias.is_some())),
        ("W_LEVELS", nw),
        ("A_LEVELS", na),
        ("A_INV_LEVELS", f64::from(a_bits.inv_levels())),
        ("BN_STATS", flag(bn_stats.is_some())),
        ("IN_QUANT", flag(fused.input_quant.is_some())),
        ("SCALE", f64::from((1.0 / (nw * na)) as f32)),
        ("KH", c(geom.kernel.0)),
        ("KW", c(geom.kernel.1)),
        ("VEC_W", flag(vec_a == 2)),
        ("VEC_X", flag(vec_b == 1)),
    ];
    let cog = geom.cout / geom.groups;
    let rg = slot_rows(cog, geom.groups);
    constants.push(("RG", c(rg)));
    constants.extend(input_bn_constants(input.input));
    constants.extend(gemm.geometry_constants());
    let shader = shader_for(&CONV_COOP, mode);
    let kernel = gpu.kernel(&KernelSpec {
        shader,
        entry: "main",
        constants: &constants,
        bindings: &[
            Bind::Uniform,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::ReadWrite,
            Bind::Read,
            Bind::ReadWrite,
            Bind::Read,
            Bind::Read,
        ],
    })?;
    // Placeholders of one float for the optional bindings.
    let placeholder = |what: &str| gpu.zeros(what, &[1], DType::F32);
    let (none, no_bn, no_stats) = (
        placeholder("no bias")?,
        placeholder("no BatchNorm table")?,
        placeholder("no BatchNorm statistics")?,
    );
    let bias = bias.unwrap_or(&none);
    let bn_table = input.input.map_or(&no_bn, |b| b.form.table);
    let bn_part = bn_stats.unwrap_or(&no_stats);
    let p = Params {
        gn: gn as u32,
        _pad: [0; 3],
    };
    Ok(Op::Dispatch(gpu.launch(
        &kernel,
        format!(
            "conv2d.forward x{:?} w{:?} g{}{} coop{}{}",
            geom.input_shape(),
            geom.weight_shape(),
            geom.groups,
            fused.describe(),
            packing_label(rg),
            label_suffix(mode)
        ),
        Some(bytemuck::bytes_of(&p)),
        &[w, x, bias, y, bn_table, bn_part, w, x],
        grid(cog, gn, geom.groups, rg),
    )?))
}
