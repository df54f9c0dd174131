//! Grad-input on cooperative matrices (`shaders/conv_coop_gi.wgsl`): the GEMM with
//! conv2d.wgsl's grad-input epilogue, each column of dy scaled for its f16 halves.

use super::{CoopMode, TILE, label_suffix, shader_for};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Op, Tensor};
use crate::kernels::conv2d::{
    ActGrad, AroundBn, Conv2dGeom, Fused, Mode, input_bn_constants, output_bn_constants,
};
use crate::kernels::{CONV_COOP_GI, expect_dtype, expect_shape};
use crate::quant::Bits;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    gn: u32,
    batch: u32,
    _pad: [u32; 2],
}

/// `dx = dL/dx` of a conv whose weights `w` hold `w_bits` DoReFa levels, on cooperative
/// matrices (`mode`): the weight codes exact in f16, the float `dy` as two f16 halves under a
/// power-of-two scale per column (input pixel) that the kernel finds first. With `act`, the
/// input quantizer's backward in the epilogue as `conv2d::grad_input_fused` applies it; with `bn.input` (and an `act` without
/// requantize), the mask of the input formed from the BatchNorm before, and with
/// `bn.input_sums` that BatchNorm's backward sums per [`TILE`] columns; with `bn.output`, `dy`
/// is the conv's output and its gradient is formed through the BatchNorm after it.
#[allow(clippy::too_many_arguments)]
pub fn grad_input(
    gpu: &Gpu,
    geom: &Conv2dGeom,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    w_bits: Bits,
    (act, bn): (Option<ActGrad<'_>>, AroundBn<'_>),
    mode: CoopMode,
) -> Result<Op> {
    const K: &str = "conv2d.grad_input (cooperative matrices)";
    geom.validate()?;
    for (name, t, shape) in [
        ("dy", dy, geom.output_shape()),
        ("w", w, geom.weight_shape()),
        ("dx", dx, geom.input_shape()),
    ] {
        expect_dtype(K, name, t, DType::F32)?;
        expect_shape(K, name, t, &shape)?;
    }
    if w_bits.is_float() || w_bits.get() > 8 {
        return Err(Error::shape(
            K,
            "needs weights of 2 to 8 bits (their codes must be exact in f16)",
        ));
    }
    if act.is_some_and(|a| a.bits.is_float()) {
        return Err(Error::shape(
            K,
            "a float input's gradient runs on the fp32 kernel (conv2d::grad_input_fused)",
        ));
    }
    let gemm = geom.gemm();
    let (_, gn, gk) = gemm.dims(Mode::GradInput);
    if u32::try_from(gn + TILE).is_err()
        || u32::try_from(gk + TILE).is_err()
        || u32::try_from(dx.numel().max(dy.numel())).is_err()
    {
        return Err(Error::shape(
            K,
            "tensor too large to index with 32 bits: use a smaller batch size",
        ));
    }
    let fused = Fused {
        act,
        bn_sums: bn.input_sums,
        ..Fused::on_load(bn)
    };
    fused.check(&gemm, Mode::GradInput, dx, gn.div_ceil(TILE), K)?;
    let (vec_w, vec_dy) = if gpu.vector_loads() {
        gemm.vector_loads(Mode::GradInput)
    } else {
        (0, 0)
    };
    let c = |v: usize| v as f64;
    let flag = |on: bool| f64::from(u8::from(on));
    let (input, output) = (bn.input, bn.output);
    // conv2d.wgsl's grad-input switches, by the same names.
    let mut constants = fused.act_constants();
    constants.extend(input_bn_constants(input));
    constants.extend(output_bn_constants(output));
    constants.extend([
        ("BN_SUMS", flag(bn.input_sums.is_some())),
        ("DX_PLUS", flag(bn.dx_plus.is_some())),
        ("W_LEVELS", f64::from(w_bits.levels())),
        ("W_INV_LEVELS", f64::from(w_bits.inv_levels())),
        ("VEC_W", flag(vec_w == 1)),
        ("VEC_DY", flag(vec_dy == 1)),
        ("KH", c(geom.kernel.0)),
        ("KW", c(geom.kernel.1)),
    ]);
    constants.extend(gemm.geometry_constants());
    let shader = shader_for(&CONV_COOP_GI, mode);
    let bindings = [
        Bind::Uniform,
        Bind::Read,
        Bind::Read,
        Bind::ReadWrite,
        Bind::ReadWrite,
        Bind::Read,
        Bind::ReadWrite,
        Bind::Read,
        Bind::Read,
        Bind::ReadVec4,
        Bind::ReadVec4,
        Bind::Read,
    ];
    let kernel = gpu.kernel(&KernelSpec {
        shader,
        entry: "main",
        constants: &constants,
        bindings: &bindings,
    })?;
    // Buffers of their own for the optional bindings, so that none aliases a written one.
    let placeholder = |what: &str| gpu.zeros(what, &[1], DType::F32);
    let (no_x, no_table, no_sums, no_dy, no_plus) = (
        placeholder("no input")?,
        placeholder("no BatchNorm table")?,
        placeholder("no BatchNorm sums")?,
        placeholder("no BatchNorm output gradient")?,
        placeholder("no gradient to add")?,
    );
    let act_x = act.map_or(&no_x, |a| a.x);
    let in_table = input.map_or(&no_table, |b| b.form.table);
    let (out_dy, out_table) = output.map_or((&no_dy, &no_table), |b| (b.dy, b.form.table));
    let sums = bn.input_sums.unwrap_or(&no_sums);
    let p = Params {
        gn: gn as u32,
        batch: geom.batch as u32,
        _pad: [0; 2],
    };
    Ok(Op::Dispatch(gpu.launch(
        &kernel,
        format!(
            "conv2d.grad_input x{:?} w{:?} g{}{} coop{}",
            geom.input_shape(),
            geom.weight_shape(),
            geom.groups,
            fused.describe(),
            label_suffix(mode)
        ),
        Some(bytemuck::bytes_of(&p)),
        &[
            w,
            dy,
            dx,
            act_x,
            in_table,
            sums,
            out_dy,
            out_table,
            w,
            dy,
            bn.dx_plus.unwrap_or(&no_plus),
        ],
        [
            gn.div_ceil(TILE) as u32,
            (geom.cin / geom.groups).div_ceil(TILE) as u32,
            geom.groups as u32,
        ],
    )?))
}
