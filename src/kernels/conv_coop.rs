//! `shaders/conv_coop.wgsl` and `shaders/conv_coop_gw.wgsl`: the forward and the grad-weight of
//! a quantized conv2d on cooperative matrices (tensor cores), and the plain-WGSL emulation of
//! the same kernels that tests them where there are none.
//!
//! Only a conv whose input is DoReFa-quantized runs here (its activation codes are exact in f16),
//! and in the forward only with DoReFa weights too (their codes likewise); grad-weight takes the
//! float gradient as two f16 halves (see its shader). Everything else, and grad-input, stays on
//! the fp32 kernel family of `conv2d.wgsl`.

use super::conv2d::{AroundBn, Conv2dGeom, Fused, InputBn, Mode};
use super::{CONV_COOP, CONV_COOP_GW, SHADERS_COOP, expect_dtype, expect_shape};
use crate::error::{Error, Result};
pub use crate::gpu::CoopMode;
use crate::gpu::{Bind, DType, Gpu, KernelSpec, Op, Shader, Tensor};
use crate::quant::Bits;
use std::sync::OnceLock;

/// The tile of a workgroup (the shader's BM × BN; four subgroups of 32 invocations): also the
/// columns per partial BatchNorm statistic it forms.
pub const TILE: usize = 128;

/// One emulation per shader of [`SHADERS_COOP`] (a test keeps the two counts equal).
const EMULATED_SLOTS: usize = 2;

/// `shader` (one of [`SHADERS_COOP`]) rewritten in plain WGSL: each cooperative-matrix
/// operation becomes a call of `shaders/lib/coop_emulation.wgsl`, the rest (staging, tiles,
/// epilogue) is unchanged.
pub fn emulated_shader(shader: &'static Shader) -> &'static Shader {
    static EMULATED: [OnceLock<Shader>; EMULATED_SLOTS] = [OnceLock::new(), OnceLock::new()];
    let i = SHADERS_COOP
        .iter()
        .position(|s| std::ptr::eq(*s, shader))
        .expect("a cooperative-matrix shader");
    EMULATED[i].get_or_init(|| Shader {
        name: Box::leak(format!("{} (emulated)", shader.name).into_boxed_str()),
        source: Box::leak(emulate(shader.source).into_boxed_str()),
        trusted: true,
    })
}

/// The textual rewrite behind [`emulated_shader`].
pub fn emulate(source: &str) -> String {
    let rewrites = [
        ("enable wgpu_cooperative_matrix;\n", ""),
        ("alias MA = coop_mat16x16<f16, A>;", "alias MA = vec3<u32>;"),
        ("alias MB = coop_mat16x16<f16, B>;", "alias MB = vec3<u32>;"),
        (
            "alias MC = coop_mat16x16<f32, C>;",
            "alias MC = array<f32, 8>;",
        ),
        ("coopLoadT<MA>(&a_sh[", "emu_load_a_sh("),
        ("coopLoadT<MA>(&a_lo[", "emu_load_a_lo("),
        ("coopLoadT<MB>(&b_sh[", "emu_load_b_sh("),
        ("], AS);", ", AS);"),
        ("], BS);", ", BS);"),
        ("coopMultiplyAdd(", "emu_mma("),
        ("coopStoreT(cv, &c_sh[ci], 16u);", "emu_store(cv, ci);"),
        (",\n        @builtin(subgroup_id) sg_id: u32)", ")"),
        (
            "let sg = sg_id;",
            "let sg = lid / 32u;\n    lane = lid % 32u;",
        ),
    ];
    let mut s = source.to_string();
    for (from, to) in rewrites {
        s = s.replace(from, to);
    }
    s.push_str(include_str!("../../shaders/lib/coop_emulation.wgsl"));
    // Element (r, c) of a matrix the loads describe, from whichever workgroup arrays the kernel
    // has (`emu_load_*` numbers them).
    s.push_str("\nfn emu_fetch(d: vec3<u32>, r: u32, c: u32) -> f32 {\n");
    for (id, array) in ["a_sh", "b_sh", "a_lo"].iter().enumerate() {
        if source.contains(&format!("var<workgroup> {array}:")) {
            s.push_str(&format!(
                "    if (d.x == {id}u) {{\n        return f32({array}[d.y + r * d.z + c]);\n    }}\n"
            ));
        }
    }
    s.push_str("    return 0.0;\n}\n");
    s
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    gn: u32,
    _pad: [u32; 3],
}

/// `y = conv2d(x, w) + bias` for `x` holding `a_bits` DoReFa activation levels and `w` holding
/// `w_bits` weight levels, on cooperative matrices (`mode`). With `input_bn` (whose `bits` must
/// be `a_bits`), `x` is a BatchNorm's input and the levels are formed from it as they are loaded.
/// With `bn_stats`, it also forms the partial statistics of the BatchNorm after it, per [`TILE`]
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
    (input_bn, bn_stats): (Option<InputBn<'_>>, Option<&Tensor>),
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
    if input_bn.is_some_and(|bn| bn.bits != a_bits) {
        return Err(Error::shape(
            K,
            "the input formed from a BatchNorm must be quantized to the activation bits",
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
        input_bn,
        bn_stats,
        ..Fused::default()
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
        ("IN_BN", flag(input_bn.is_some())),
        ("IN_RELU", flag(input_bn.is_some_and(|b| b.form.relu))),
        ("IN_SHUFFLE", c(input_bn.map_or(1, |b| b.form.shuffle))),
        ("BN_STATS", flag(bn_stats.is_some())),
        ("SCALE", f64::from((1.0 / (nw * na)) as f32)),
        ("KH", c(geom.kernel.0)),
        ("KW", c(geom.kernel.1)),
        ("VEC_W", flag(vec_a == 2)),
        ("VEC_X", flag(vec_b == 1)),
    ];
    constants.extend(gemm.geometry_constants());
    let shader = match mode {
        CoopMode::Hardware => &CONV_COOP,
        CoopMode::Emulated => emulated_shader(&CONV_COOP),
    };
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
    let bn_table = input_bn.map_or(&no_bn, |b| b.form.table);
    let bn_part = bn_stats.unwrap_or(&no_stats);
    let p = Params {
        gn: gn as u32,
        _pad: [0; 3],
    };
    let grid = [
        gn.div_ceil(TILE) as u32,
        (geom.cout / geom.groups).div_ceil(TILE) as u32,
        geom.groups as u32,
    ];
    Ok(Op::Dispatch(gpu.launch(
        &kernel,
        format!(
            "conv2d.forward x{:?} w{:?} g{}{} coop{}",
            geom.input_shape(),
            geom.weight_shape(),
            geom.groups,
            fused.describe(),
            if mode == CoopMode::Emulated {
                " (emulated)"
            } else {
                ""
            }
        ),
        Some(bytemuck::bytes_of(&p)),
        &[w, x, bias, y, bn_table, bn_part, w, x],
        grid,
    )?))
}

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
/// are formed from it as they are loaded (its `bits` must be `a_bits`); with `bn.output`, `dy`
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
    if bn.input.is_some_and(|b| b.bits != a_bits) {
        return Err(Error::shape(
            K,
            "the input formed from a BatchNorm must be quantized to the activation bits",
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
    let fused = Fused {
        input_bn: bn.input,
        output_bn: bn.output,
        ..Fused::default()
    };
    fused.check(&gemm, Mode::GradWeight, dw, 1, K)?;
    // The fp32 kernel's split count, in chunks of whole K steps.
    let chunk = gk
        .div_ceil(gemm.default_splits().max(1))
        .next_multiple_of(GW_BK);
    let splits = gk.div_ceil(chunk);
    let c = |v: usize| v as f64;
    let flag = |on: bool| f64::from(u8::from(on));
    let (input, output) = (bn.input, bn.output);
    let mut constants = vec![
        ("BIAS_GRAD", flag(db.is_some())),
        ("IN_BN", flag(input.is_some())),
        ("IN_RELU", flag(input.is_some_and(|b| b.form.relu))),
        ("IN_SHUFFLE", c(input.map_or(1, |b| b.form.shuffle))),
        ("OUT_BN", flag(output.is_some())),
        ("OUT_RELU", flag(output.is_some_and(|b| b.form.relu))),
        ("OUT_SHUFFLE", c(output.map_or(1, |b| b.form.shuffle))),
        // The fp32 grad-weight's VEC_A 2 condition: images of a multiple of 4 pixels.
        (
            "VEC_A",
            flag(gpu.vector_loads() && gemm.vector_loads(Mode::GradWeight).0 == 2),
        ),
        ("A_LEVELS", f64::from(a_bits.levels())),
        ("A_INV_LEVELS", f64::from(a_bits.inv_levels())),
        ("KH", c(geom.kernel.0)),
        ("KW", c(geom.kernel.1)),
    ];
    constants.extend(gemm.geometry_constants());
    let shader = match mode {
        CoopMode::Hardware => &CONV_COOP_GW,
        CoopMode::Emulated => emulated_shader(&CONV_COOP_GW),
    };
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
        if mode == CoopMode::Emulated {
            " (emulated)"
        } else {
            ""
        }
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
        let in_table = input.map_or(&no_table, |b| b.form.table);
        let (out_dy, out_table) = output.map_or((&no_dy, &no_table), |b| (b.dy, b.form.table));
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

/// Checks the device's cooperative-matrix path (`gpu.coop()`) against the fp32 kernels, on a
/// quantized conv with tails in every dimension: the forward, and (where `gpu.coop_grad_weight()`
/// says it runs there) grad-weight with the bias gradient from a dy of small gradients. The results must agree to rounding. (Every
/// cooperative-matrix kernel compiles here, so that a driver that fails one fails on the
/// throwaway device this runs on.)
pub fn verify(gpu: &Gpu) -> Result<()> {
    let mode = gpu
        .coop()
        .ok_or_else(|| Error::Invalid("no cooperative-matrix path to verify".into()))?;
    let geom = Conv2dGeom::square(2, 40, 7, 136, 3).padding(1);
    let bits = Bits::new(8).expect("8 bits");
    let n = bits.levels();
    // Levels as the quantizers form them: activations k * fl32(1/n), weights 2 k fl32(1/n) - 1.
    let level = |i: usize, m: u32| ((i * 2654435761) % (m as usize + 1)) as f32;
    let x: Vec<f32> = (0..geom.input_shape().iter().product())
        .map(|i| level(i, n) * bits.inv_levels())
        .collect();
    let w: Vec<f32> = (0..geom.weight_shape().iter().product())
        .map(|i| 2.0 * (level(i + 7, n) * bits.inv_levels()) - 1.0)
        .collect();
    let b: Vec<f32> = (0..geom.cout).map(|i| i as f32 * 0.01 - 0.5).collect();
    // Gradients around 1e-6, below f16's normal range.
    let dy: Vec<f32> = (0..geom.output_shape().iter().product())
        .map(|i| (level(i + 3, 1000) - 500.0) * 2e-9)
        .collect();
    let xt = gpu.upload_f32("coop check x", &geom.input_shape(), &x)?;
    let wt = gpu.upload_f32("coop check w", &geom.weight_shape(), &w)?;
    let bt = gpu.upload_f32("coop check bias", &[geom.cout], &b)?;
    let dyt = gpu.upload_f32("coop check dy", &geom.output_shape(), &dy)?;
    let out = |what: &str, shape: &[usize]| gpu.empty(what, shape, DType::F32);
    let y = [
        out("coop check y", &geom.output_shape())?,
        out("coop check y fp32", &geom.output_shape())?,
    ];
    let dw = [
        out("coop check dw", &geom.weight_shape())?,
        out("coop check dw fp32", &geom.weight_shape())?,
    ];
    let db = [
        out("coop check db", &[geom.cout])?,
        out("coop check db fp32", &[geom.cout])?,
    ];
    let mut ops = vec![
        forward(
            gpu,
            &geom,
            &xt,
            &wt,
            Some(&bt),
            &y[0],
            (bits, bits),
            (None, None),
            mode,
        )?,
        super::conv2d::forward(gpu, &geom, &xt, &wt, Some(&bt), &y[1])?,
    ];
    // Grad-weight where the device runs it on cooperative matrices (else the fp32 kernel on
    // both sides, which compares equal).
    ops.extend(match gpu.coop_grad_weight() {
        Some(mode) => grad_weight(
            gpu,
            &geom,
            &xt,
            &dyt,
            (&dw[0], Some(&db[0])),
            bits,
            (AroundBn::default(), None),
            mode,
        )?,
        None => {
            super::conv2d::grad_weight_and_bias(gpu, &geom, &xt, &dyt, &dw[0], &db[0], None, None)?
        }
    });
    ops.extend(super::conv2d::grad_weight_and_bias(
        gpu, &geom, &xt, &dyt, &dw[1], &db[1], None, None,
    )?);
    let got: Vec<Vec<f32>> = gpu.run_and_read(
        "cooperative-matrix check",
        &ops,
        &[&y[0], &y[1], &dw[0], &dw[1], &db[0], &db[1]],
    )?;
    for (what, pair) in ["the conv", "grad-weight", "the bias gradient"]
        .iter()
        .zip(got.chunks(2))
    {
        let scale = pair[1].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = pair[0]
            .iter()
            .zip(&pair[1])
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if scale == 0.0 || pair[0].iter().any(|v| !v.is_finite()) || worst > 1e-5 * scale {
            return Err(Error::Invalid(format!(
                "{what} on cooperative matrices differs from the fp32 kernel by {worst:e} (largest value {scale:e})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emulations_have_no_cooperative_matrix_left() {
        assert_eq!(SHADERS_COOP.len(), EMULATED_SLOTS);
        for shader in SHADERS_COOP {
            let s = emulated_shader(shader).source;
            for gone in ["coop", "subgroup_id", "wgpu_cooperative_matrix"] {
                let rest: Vec<&str> = s
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//") && l.contains(gone))
                    .collect();
                assert!(
                    rest.is_empty(),
                    "{gone} left in the emulation of {}: {rest:?}",
                    shader.name
                );
            }
        }
    }
}
