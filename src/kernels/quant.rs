//! `shaders/quant.wgsl`: the DoReFa activation and weight quantizers (forward and backward) and
//! real quantization to integer codes. 32 bits is the identity: a copy, no shader.

use super::{Entry, QUANT, count_u32, elementwise_grid, expect_dtype, expect_shape};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor, grid_1d};
use crate::quant::Bits;

/// Elements each workgroup of a weight reduction covers (`CHUNK` in the shader).
const CHUNK: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    levels: u32,
    partials: u32,
    _pad0: u32,
    levels_f: f32,
    inv_levels: f32,
    _pad1: [f32; 2],
}

fn params(n: u32, bits: Bits, partials: u32) -> Params {
    Params {
        n,
        levels: bits.levels(),
        partials,
        _pad0: 0,
        levels_f: bits.levels() as f32,
        inv_levels: bits.inv_levels(),
        _pad1: [0.0; 2],
    }
}

use Bind::{Read as R, ReadWrite as W};

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &QUANT,
        name,
        used,
    }
}

const ACT_FORWARD: Entry = entry("act_forward", &[(1, R), (2, W)]);
const ACT_FORWARD_IN_PLACE: Entry = entry("act_forward_in_place", &[(2, W)]);
const ACT_BACKWARD_REQUANTIZE: Entry = entry("act_backward_requantize", &[(2, W), (5, W)]);
const ACT_BACKWARD: Entry = entry("act_backward", &[(3, R), (4, R), (5, W)]);
const ACT_BACKWARD_IN_PLACE: Entry = entry("act_backward_in_place", &[(3, R), (5, W)]);
const ACT_CODES: Entry = entry("act_codes", &[(1, R), (16, W)]);
const ACT_DEQUANT: Entry = entry("act_dequant", &[(2, W), (17, R)]);
const WEIGHT_DEQUANT: Entry = entry("weight_dequant", &[(13, W), (17, R)]);
const WQ_ABSMAX_PARTIAL: Entry = entry("wq_absmax_partial", &[(6, R), (7, W), (8, W)]);
const WQ_ABSMAX_FINAL: Entry = entry("wq_absmax_final", &[(9, R), (10, W)]);
const WQ_FORWARD: Entry = entry("wq_forward", &[(11, R), (12, R), (13, W)]);
const WQ_BACKWARD_PARTIAL: Entry =
    entry("wq_backward_partial", &[(8, W), (11, R), (12, R), (14, R)]);
const WQ_BACKWARD_FINAL: Entry = entry("wq_backward_final", &[(9, R), (10, W)]);
const WQ_BACKWARD: Entry = entry("wq_backward", &[(11, R), (12, R), (14, R), (15, W)]);
const WEIGHT_CODES: Entry = entry("weight_codes", &[(11, R), (12, R), (16, W)]);
const DIV_CHECK: Entry = entry("div_check", &[(18, R), (19, R), (20, R), (21, W)]);

fn launch_op(
    gpu: &Gpu,
    (entry, constants): (&Entry, &[(&str, f64)]),
    label: String,
    p: &Params,
    tensors: &[&Tensor],
    workgroups: [u32; 3],
) -> Result<Op> {
    entry.launch(gpu, constants, label, p, tensors, workgroups)
}

fn same_f32(kernel: &str, named: &[(&str, &Tensor)]) -> Result<()> {
    let shape = named[0].1.shape();
    for (name, t) in named {
        expect_dtype(kernel, name, t, DType::F32)?;
        expect_shape(kernel, name, t, shape)?;
    }
    Ok(())
}

fn copy(src: &Tensor, dst: &Tensor) -> Op {
    Op::Copy {
        src: src.clone(),
        dst: dst.clone(),
    }
}

/// Activation quantizer forward: `y = Round(clamp(0.1 x, 0, 1) n) / n` (32 bits: `y = x`).
pub fn act_forward(gpu: &Gpu, bits: Bits, x: &Tensor, y: &Tensor) -> Result<Op> {
    const K: &str = "act_forward";
    same_f32(K, &[("x", x), ("y", y)])?;
    if bits.is_float() {
        return Ok(copy(x, y));
    }
    let n = count_u32(K, x.numel())?;
    launch_op(
        gpu,
        (&ACT_FORWARD, &[]),
        format!("{K} w{bits} {:?}", x.shape()),
        &params(n, bits, 0),
        &[x, y],
        elementwise_grid(gpu, n),
    )
}

/// [`act_forward`] in place: `x` is overwritten with its quantized values (the same bits).
/// Float bits: no op.
pub fn act_forward_in_place(gpu: &Gpu, bits: Bits, x: &Tensor) -> Result<Vec<Op>> {
    in_place(gpu, bits, &ACT_FORWARD_IN_PLACE, &[("x", x)])
}

/// Activation quantizer backward (straight-through): `dx = 0.1 dy` where
/// `0 <= fl32(0.1 x) <= 1`, else 0 (32 bits: `dx = dy`).
pub fn act_backward(gpu: &Gpu, bits: Bits, x: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<Op> {
    const K: &str = "act_backward";
    same_f32(K, &[("x", x), ("dy", dy), ("dx", dx)])?;
    if bits.is_float() {
        return Ok(copy(dy, dx));
    }
    let n = count_u32(K, x.numel())?;
    launch_op(
        gpu,
        (&ACT_BACKWARD, &[]),
        format!("{K} a{bits} {:?}", x.shape()),
        &params(n, bits, 0),
        &[x, dy, dx],
        elementwise_grid(gpu, n),
    )
}

/// [`act_backward`] in place: `d` holds dL/dy and is overwritten with dL/dx (the same bits).
/// Float bits pass the gradient through: no op.
pub fn act_backward_in_place(gpu: &Gpu, bits: Bits, x: &Tensor, d: &Tensor) -> Result<Vec<Op>> {
    in_place(gpu, bits, &ACT_BACKWARD_IN_PLACE, &[("x", x), ("d", d)])
}

/// [`act_backward_in_place`] then [`act_forward_in_place`] in one pass: `d` (dL/dy) becomes
/// dL/dx, masked by the float `x`, and `x` becomes its quantized value; the same bits as the two.
pub fn act_backward_requantize(gpu: &Gpu, bits: Bits, x: &Tensor, d: &Tensor) -> Result<Vec<Op>> {
    in_place(gpu, bits, &ACT_BACKWARD_REQUANTIZE, &[("x", x), ("d", d)])
}

/// An activation-quantizer entry that rewrites its tensors in place, elementwise over the first
/// one (float bits: the identity both ways, so no op).
fn in_place(
    gpu: &Gpu,
    bits: Bits,
    entry: &'static Entry,
    named: &[(&str, &Tensor)],
) -> Result<Vec<Op>> {
    let k = entry.name;
    same_f32(k, named)?;
    if bits.is_float() {
        return Ok(Vec::new());
    }
    let x = named[0].1;
    let n = count_u32(k, x.numel())?;
    let tensors: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
    Ok(vec![launch_op(
        gpu,
        (entry, &[]),
        format!("{k} a{bits} {:?}", x.shape()),
        &params(n, bits, 0),
        &tensors,
        elementwise_grid(gpu, n),
    )?])
}

/// Activation codes `k` in `0..=n` (`Bits::code_dtype` words), the integer form of
/// [`act_forward`]'s output.
pub fn act_codes(gpu: &Gpu, bits: Bits, x: &Tensor, codes: &Tensor) -> Result<Op> {
    const K: &str = "act_codes";
    expect_dtype(K, "x", x, DType::F32)?;
    codes_check(K, bits, x.shape(), codes)?;
    let n = count_u32(K, x.numel())?;
    let words = count_u32(K, codes_words(bits, x.numel()))?;
    launch_op(
        gpu,
        (&ACT_CODES, &[("PACKED", packed(bits))]),
        format!("{K} a{bits} {:?}", x.shape()),
        &params(n, bits, 0),
        &[x, codes],
        elementwise_grid(gpu, words),
    )
}

/// Activation values `k · fl32(1/n)` from codes: bit for bit [`act_forward`]'s output.
pub fn act_dequant(gpu: &Gpu, bits: Bits, codes: &Tensor, y: &Tensor) -> Result<Op> {
    const K: &str = "act_dequant";
    expect_dtype(K, "y", y, DType::F32)?;
    codes_check(K, bits, y.shape(), codes)?;
    let n = count_u32(K, y.numel())?;
    launch_op(
        gpu,
        (&ACT_DEQUANT, &[("PACKED", packed(bits))]),
        format!("{K} a{bits} {:?}", y.shape()),
        &params(n, bits, 0),
        &[y, codes],
        elementwise_grid(gpu, n),
    )
}

/// Weight values `2 · (k · fl32(1/n)) − 1` from codes: bit for bit the quantizer's output.
pub fn weight_dequant(gpu: &Gpu, bits: Bits, codes: &Tensor, w_hat: &Tensor) -> Result<Op> {
    const K: &str = "weight_dequant";
    expect_dtype(K, "w_hat", w_hat, DType::F32)?;
    codes_check(K, bits, w_hat.shape(), codes)?;
    let n = count_u32(K, w_hat.numel())?;
    launch_op(
        gpu,
        (&WEIGHT_DEQUANT, &[("PACKED", packed(bits))]),
        format!("{K} w{bits} {:?}", w_hat.shape()),
        &params(n, bits, 0),
        &[w_hat, codes],
        elementwise_grid(gpu, n),
    )
}

fn packed(bits: Bits) -> f64 {
    f64::from(u8::from(bits.code_dtype() == DType::U8x4))
}

fn codes_words(bits: Bits, n: usize) -> usize {
    if bits.code_dtype() == DType::U8x4 {
        n.div_ceil(4)
    } else {
        n
    }
}

fn codes_check(kernel: &str, bits: Bits, shape: &[usize], codes: &Tensor) -> Result<()> {
    if bits.is_float() {
        return Err(Error::shape(kernel, "32-bit values have no integer codes"));
    }
    expect_dtype(kernel, "codes", codes, bits.code_dtype())?;
    expect_shape(kernel, "codes", codes, shape)
}

/// The weight quantizer of one weight tensor: its buffers (t = tanh(W), partial reductions and
/// the statistics `[m, S, c, 0]`) are made once, and its forward and backward are a few launches
/// to record into a step.
pub struct WeightQuantizer {
    bits: Bits,
    shape: Vec<usize>,
    partials: Option<Tensor>,
    stats: Option<Tensor>,
    t: Option<Tensor>,
}

impl WeightQuantizer {
    pub fn new(gpu: &Gpu, bits: Bits, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        let (partials, stats, t) = if bits.is_float() {
            (None, None, None)
        } else {
            (
                Some(gpu.zeros(
                    "weight quantizer partials",
                    &[2 * n.div_ceil(CHUNK)],
                    DType::F32,
                )?),
                Some(gpu.zeros("weight quantizer stats", &[4], DType::F32)?),
                Some(gpu.zeros("tanh(W)", shape, DType::F32)?),
            )
        };
        Ok(WeightQuantizer {
            bits,
            shape: shape.to_vec(),
            partials,
            stats,
            t,
        })
    }

    pub fn bits(&self) -> Bits {
        self.bits
    }

    /// `tanh(W)` of the last forward (None for 32 bits).
    pub fn t(&self) -> Option<&Tensor> {
        self.t.as_ref()
    }

    /// `[m, S, c, 0]`: max |t| (forward), and Σ du·t/2 and the tie count (backward).
    pub fn stats(&self) -> Option<&Tensor> {
        self.stats.as_ref()
    }

    fn blocks(&self) -> usize {
        self.shape.iter().product::<usize>().div_ceil(CHUNK).max(1)
    }

    fn check(&self, kernel: &str, named: &[(&str, &Tensor)]) -> Result<u32> {
        for (name, t) in named {
            expect_dtype(kernel, name, t, DType::F32)?;
            expect_shape(kernel, name, t, &self.shape)?;
        }
        count_u32(kernel, self.shape.iter().product())
    }

    fn parts(&self) -> (&Tensor, &Tensor, &Tensor) {
        match (&self.partials, &self.stats, &self.t) {
            (Some(p), Some(s), Some(t)) => (p, s, t),
            _ => unreachable!("quantizer buffers exist unless bits = 32"),
        }
    }

    /// `t = tanh(W)`, `m = max|t|` (two launches); what forward and `codes` start with.
    fn absmax(&self, gpu: &Gpu, w: &Tensor, n: u32) -> Result<Vec<Op>> {
        let (partials, stats, t) = self.parts();
        let blocks = self.blocks() as u32;
        let p = params(n, self.bits, blocks);
        let shape = format!("w{} {:?}", self.bits, self.shape);
        Ok(vec![
            launch_op(
                gpu,
                (&WQ_ABSMAX_PARTIAL, &[]),
                format!("wq_absmax_partial {shape}"),
                &p,
                &[w, t, partials],
                grid_1d(blocks, gpu.limits.max_compute_workgroups_per_dimension),
            )?,
            launch_op(
                gpu,
                (&WQ_ABSMAX_FINAL, &[]),
                format!("wq_absmax_final {shape}"),
                &p,
                &[partials, stats],
                [1, 1, 1],
            )?,
        ])
    }

    /// `Ŵ` from `W` (32 bits: a copy).
    pub fn forward(&self, gpu: &Gpu, w: &Tensor, w_hat: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "weight_quant_forward";
        let n = self.check(K, &[("w", w), ("w_hat", w_hat)])?;
        if self.bits.is_float() {
            return Ok(vec![copy(w, w_hat)]);
        }
        let (_, stats, t) = self.parts();
        let mut ops = self.absmax(gpu, w, n)?;
        ops.push(launch_op(
            gpu,
            (&WQ_FORWARD, &[]),
            format!("wq_forward w{} {:?}", self.bits, self.shape),
            &params(n, self.bits, 0),
            &[t, stats, w_hat],
            elementwise_grid(gpu, n),
        )?);
        Ok(ops)
    }

    /// `dL/dW` from `G = dL/dŴ`, using `t` and `m` of the last forward (32 bits: a copy).
    pub fn backward(&self, gpu: &Gpu, g: &Tensor, dw: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "weight_quant_backward";
        let n = self.check(K, &[("g", g), ("dw", dw)])?;
        if self.bits.is_float() {
            return Ok(vec![copy(g, dw)]);
        }
        let (partials, stats, t) = self.parts();
        let blocks = self.blocks() as u32;
        let p = params(n, self.bits, blocks);
        let shape = format!("w{} {:?}", self.bits, self.shape);
        Ok(vec![
            launch_op(
                gpu,
                (&WQ_BACKWARD_PARTIAL, &[]),
                format!("wq_backward_partial {shape}"),
                &p,
                &[partials, t, stats, g],
                grid_1d(blocks, gpu.limits.max_compute_workgroups_per_dimension),
            )?,
            launch_op(
                gpu,
                (&WQ_BACKWARD_FINAL, &[]),
                format!("wq_backward_final {shape}"),
                &p,
                &[partials, stats],
                [1, 1, 1],
            )?,
            launch_op(
                gpu,
                (&WQ_BACKWARD, &[]),
                format!("wq_backward {shape}"),
                &p,
                &[t, stats, g, dw],
                elementwise_grid(gpu, n),
            )?,
        ])
    }

    /// Integer codes `k` of `W` (level `2k − n`); recomputes `t` and `m` first.
    pub fn codes(&self, gpu: &Gpu, w: &Tensor, codes: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "weight_codes";
        let n = self.check(K, &[("w", w)])?;
        codes_check(K, self.bits, &self.shape, codes)?;
        let (_, stats, t) = self.parts();
        let words = count_u32(K, codes_words(self.bits, n as usize))?;
        let mut ops = self.absmax(gpu, w, n)?;
        ops.push(launch_op(
            gpu,
            (&WEIGHT_CODES, &[("PACKED", packed(self.bits))]),
            format!("{K} w{} {:?}", self.bits, self.shape),
            &params(n, self.bits, 0),
            &[t, stats, codes],
            elementwise_grid(gpu, words),
        )?);
        Ok(ops)
    }
}

/// The exact-division check of the adapter: `q = a / b` correctly rounded, starting from the
/// hardware quotient moved by `nudge` ulp (0 tests the hardware as it is).
pub fn div_check(gpu: &Gpu, a: &Tensor, b: &Tensor, nudge: &Tensor, q: &Tensor) -> Result<Op> {
    const K: &str = "div_check";
    same_f32(K, &[("a", a), ("b", b), ("q", q)])?;
    expect_dtype(K, "nudge", nudge, DType::I32)?;
    expect_shape(K, "nudge", nudge, a.shape())?;
    let n = count_u32(K, a.numel())?;
    launch_op(
        gpu,
        (&DIV_CHECK, &[]),
        format!("{K} {:?}", a.shape()),
        &params(n, Bits::EIGHT, 0),
        &[a, b, nudge, q],
        elementwise_grid(gpu, n),
    )
}
