//! Grad-weight on cooperative matrices (`shaders/conv_coop_gw.wgsl`).

use super::{CoopMode, TILE, label_suffix, shader_for};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Op, Tensor};
use crate::kernels::CONV_COOP_GW;
use crate::kernels::conv2d::{
    AroundBn, Conv2dGeom, Fused, Mode, input_bn_constants, output_bn_constants,
};
use crate::kernels::{expect_dtype, expect_shape};
use crate::quant::Bits;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GradWeightParams {
    gk: u32,
    k_chunk: u32,
    splits: u32,
    _pad: u32,
}

/// K steps of `conv_coop_gw.wgsl` (split-K chunks are multiples of it).
const GW_BK: usize = 16;

/// `dw = dL/dw` (and, given `db`, the bias gradient) of a conv whose input `x` holds `a_bits`
/// DoReFa levels, on cooperative matrices (`mode`): the float `dy` as two f16 halves per row
/// scale, the codes of `x` exact. With `bn.input`, `x` is a BatchNorm's input and the levels
/// are formed from it as they are loaded (its `bits` must be `a_bits`); with `bn.input_quant`
/// (`a_bits`), `x` is the layer's float input, quantized as it is loaded; with `bn.output`, `dy`
/// is the conv's output and its gradient is formed through the BatchNorm after it, as
/// `conv2d::grad_weight_fused` does. Split-K as there (chunks of a multiple of 16), its partial
/// sums in `scratch` when given and large enough.
#[allow(clippy::too_many_arguments)]
pub fn grad_weight(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    x: &Tensor,
    dy: &Tensor,
    (dw, db): (&Tensor, Option<&Tensor>),
    a_bits: Bits,
    (bn, scratch): (AroundBn<'_>, Option<&Tensor>),
    mode: CoopMode,
) -> Result<Vec<Op>> {
    const K: &str = "conv2d.grad_weight (cooperative matrices)";
    geom.validate()?;
    for (name, t, shape) in [
        ("x", x, geom.input_shape()),
        ("dy", dy, geom.output_shape()),
        ("dw", dw, geom.weight_shape()),
    ] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, &shape)?;
    }
    if let Some(b) = db {
        expect_shape(K, "db", b, &[geom.cout])?;
    }
    if a_bits.is_float() || a_bits.get() > 8 {
        return Err(Error::shape(
            K,
            "needs activations of 2 to 8 bits (their codes must be exact in f16)",
        ));
    }
    if bn.input.is_some_and(|b| b.bits != a_bits) || bn.input_quant.is_some_and(|b| b != a_bits) {
        return Err(Error::shape(
            K,
            "the input formed on load must be quantized to the activation bits",
        ));
    }
    let gemm = geom.gemm();
    let (gm, gn, gk) = gemm.dims(Mode::GradWeight);
    if u32::try_from(gk + GW_BK).is_err()
        || u32::try_from(x.numel().max(dy.numel()).max(dw.numel())).is_err()
    {
        return Err(Error::shape(
            K,
            "tensor too large to index with 32 bits: use a smaller batch size",
        ));
    }
    let fused = Fused::on_load(bn);
    fused.check(&gemm, Mode::GradWeight, dw, 1, K)?;
    // The fp32 kernel's split count, in chunks of whole K steps.
    let chunk = gk
        .div_ceil(gemm.default_splits().max(1))
        .next_multiple_of(GW_BK);
    let splits = gk.div_ceil(chunk);
    let c = |v: usize| v as f64;
    let flag = |on: bool| f64::from(u8::from(on));
    let mut constants = vec![
        ("BIAS_GRAD", flag(db.is_some())),
        // The fp32 grad-weight's VEC_A 2 condition: images of a multiple of 4 pixels.
        (
            "VEC_A",
            flag(gpu.vector_loads() && gemm.vector_loads(Mode::GradWeight).0 == 2),
        ),
        ("A_LEVELS", f64::from(a_bits.levels())),
        ("A_INV_LEVELS", f64::from(a_bits.inv_levels())),
        ("IN_QUANT", flag(fused.input_quant.is_some())),
        ("KH", c(geom.kernel.0)),
        ("KW", c(geom.kernel.1)),
    ];
    constants.extend(input_bn_constants(bn.input));
    constants.extend(output_bn_constants(bn.output));
    constants.extend(gemm.geometry_constants());
    let shader = shader_for(&CONV_COOP_GW, mode);
    let kernel = gpu.kernel(&KernelSpec {
        shader,
        entry: "main",
        constants: &constants,
        bindings: &[
            Bind::Uniform,
            Bind::Read,
            Bind::Read,
            Bind::ReadWrite,
            Bind::ReadWrite,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::ReadVec4,
        ],
    })?;
    let p = GradWeightParams {
        gk: gk as u32,
        k_chunk: chunk as u32,
        splits: splits as u32,
        _pad: 0,
    };
    let grid = [
        gn.div_ceil(TILE) as u32,
        gm.div_ceil(TILE) as u32,
        (geom.groups * splits) as u32,
    ];
    let label = format!(
        "conv2d.grad_weight x{:?} w{:?} g{}{} coop{}",
        geom.input_shape(),
        geom.weight_shape(),
        geom.groups,
        fused.describe(),
        label_suffix(mode)
    );
    gemm.split_k_ops(gpu, (dw, db), splits, scratch, |out, bias| {
        // Placeholders of one float for the optional bindings (buffers of their own, so that
        // none aliases a written one).
        let placeholder = |what: &str| gpu.zeros(what, &[1], DType::F32);
        let (no_bias, no_table, no_dy) = (
            placeholder("no bias gradient")?,
            placeholder("no BatchNorm table")?,
            placeholder("no BatchNorm output gradient")?,
        );
        let in_table = bn.input.map_or(&no_table, |b| b.form.table);
        let (out_dy, out_table) = bn
            .output
            .map_or((&no_dy, &no_table), |b| (b.dy, b.form.table));
        Ok(Op::Dispatch(gpu.launch(
            &kernel,
            label.clone(),
            Some(bytemuck::bytes_of(&p)),
            &[
                dy,
                x,
                out,
                bias.unwrap_or(&no_bias),
                in_table,
                out_dy,
                out_table,
                dy,
            ],
            grid,
        )?))
    })
}
