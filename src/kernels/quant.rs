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
    /// Members of a weight-quantizer group.
    members: u32,
    _pad0: u32,
    levels_f: f32,
    inv_levels: f32,
    _pad1: [f32; 2],
}

fn params(n: u32, bits: Bits, members: u32) -> Params {
    Params {
        n,
        levels: bits.levels(),
        members,
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
const WQ_ABSMAX_PARTIAL: Entry = entry("wq_absmax_partial", &[(6, R), (7, W), (8, W), (22, R)]);
const WQ_ABSMAX_FINAL: Entry = entry("wq_absmax_final", &[(9, R), (10, W), (22, R)]);
const WQ_FORWARD: Entry = entry("wq_forward", &[(11, R), (12, R), (13, W), (22, R)]);
const WQ_BACKWARD_PARTIAL: Entry = entry(
    "wq_backward_partial",
    &[(8, W), (11, R), (12, R), (14, R), (22, R)],
);
const WQ_BACKWARD_FINAL: Entry = entry("wq_backward_final", &[(9, R), (10, W), (22, R)]);
const WQ_BACKWARD: Entry = entry(
    "wq_backward",
    &[(11, R), (12, R), (14, R), (15, W), (22, R)],
);
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

/// One weight tensor of a [`WeightQuantizers`] group as the shader reads it (`Member`).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Member {
    n: u32,
    w_off: u32,
    t_off: u32,
    part_off: u32,
    block0: u32,
    tile0: u32,
    stat_off: u32,
    levels: u32,
    levels_f: f32,
    inv_levels: f32,
    _pad: [u32; 2],
}

/// Elements of an arena slot's alignment (256 bytes of f32): each member's t, Ŵ and G start on
/// a boundary at which they can be bound on their own.
const ALIGN: usize = 64;

/// The DoReFa weight quantizers of several weight tensors (a network's), run together: forward
/// and backward are three launches each whatever the number of tensors, and each tensor's
/// values are exactly those it would get alone. `W` and `dL/dW` are read and written at each
/// member's offset in one buffer (a parameter arena); `t = tanh(W)`, `Ŵ` and `G = dL/dŴ` lie in
/// buffers of the group's own layout ([`Self::len`], [`Self::view`]).
pub struct WeightQuantizers {
    members: Vec<(Bits, Vec<usize>, Member)>,
    table: Tensor,
    partials: Tensor,
    stats: Tensor,
    t: Tensor,
    blocks: u32,
    tiles: u32,
    len: usize,
}

impl WeightQuantizers {
    /// A group of `(bits, shape, offset of W)` tensors (quantized bits only: 32-bit weights need
    /// no quantizer).
    pub fn new(gpu: &Gpu, tensors: &[(Bits, Vec<usize>, usize)]) -> Result<Self> {
        const K: &str = "weight_quantizers";
        if tensors.is_empty() {
            return Err(Error::shape(K, "a group needs at least one weight tensor"));
        }
        let (mut members, mut len, mut parts, mut blocks, mut tiles) = (Vec::new(), 0, 0, 0, 0);
        for (j, (bits, shape, w_off)) in tensors.iter().enumerate() {
            if bits.is_float() {
                return Err(Error::shape(K, "32-bit weights have no quantizer"));
            }
            let n: usize = shape.iter().product();
            let b = n.div_ceil(CHUNK).max(1);
            let u = |v: usize| count_u32(K, v);
            members.push((
                *bits,
                shape.clone(),
                Member {
                    n: u(n)?,
                    w_off: u(*w_off)?,
                    t_off: u(len)?,
                    part_off: u(parts)?,
                    block0: u(blocks)?,
                    tile0: u(tiles)?,
                    stat_off: u(4 * j)?,
                    levels: bits.levels(),
                    levels_f: bits.levels() as f32,
                    inv_levels: bits.inv_levels(),
                    _pad: [0; 2],
                },
            ));
            len = (len + n).next_multiple_of(ALIGN);
            parts += 2 * b;
            blocks += b;
            tiles += n.div_ceil(256).max(1);
        }
        let words: Vec<u32> = members
            .iter()
            .flat_map(|(_, _, m)| {
                bytemuck::cast_slice::<Member, u32>(std::slice::from_ref(m)).to_vec()
            })
            .collect();
        Ok(WeightQuantizers {
            table: gpu.upload_u32("weight quantizer members", &[words.len()], &words)?,
            partials: gpu.zeros("weight quantizer partials", &[parts], DType::F32)?,
            stats: gpu.zeros("weight quantizer stats", &[4 * members.len()], DType::F32)?,
            t: gpu.zeros("tanh(W)", &[len.max(1)], DType::F32)?,
            blocks: count_u32(K, blocks)?,
            tiles: count_u32(K, tiles)?,
            len: len.max(1),
            members,
        })
    }

    /// Elements of a buffer in the group's layout (t, Ŵ, G).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `j`'s tensor in `arena`, a buffer of the group's layout.
    pub fn view(&self, arena: &Tensor, j: usize) -> Result<Tensor> {
        let (_, shape, m) = &self.members[j];
        arena.view(m.t_off as usize, shape)
    }

    /// `tanh(W)` of the last forward, in the group's layout.
    pub fn t(&self) -> &Tensor {
        &self.t
    }

    /// `[m, S, c, 0]` of each member: max |t| (forward), Σ du·t/2 and the tie count (backward).
    pub fn stats(&self) -> &Tensor {
        &self.stats
    }

    fn describe(&self) -> String {
        match &self.members[..] {
            [(bits, shape, _)] => format!("w{bits} {shape:?}"),
            all => format!("{} tensors", all.len()),
        }
    }

    /// Checks that `w` (and `dw`) hold every member at its offset, and the group-layout buffers
    /// every member.
    fn check(
        &self,
        kernel: &str,
        w_layout: &[(&str, &Tensor)],
        t_layout: &[(&str, &Tensor)],
    ) -> Result<()> {
        let w_end = self
            .members
            .iter()
            .map(|(_, _, m)| (m.w_off + m.n) as usize)
            .max()
            .unwrap_or(0);
        let t_end = self
            .members
            .iter()
            .map(|(_, _, m)| (m.t_off + m.n) as usize)
            .max()
            .unwrap_or(0);
        for (names, end) in [(w_layout, w_end), (t_layout, t_end)] {
            for (name, t) in names {
                expect_dtype(kernel, name, t, DType::F32)?;
                if t.numel() < end {
                    return Err(Error::shape(
                        kernel,
                        format!(
                            "{name} has {} elements where the weights need {end}",
                            t.numel()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn params(&self) -> Params {
        let bits = self.members[0].0;
        params(0, bits, self.members.len() as u32)
    }

    fn reduction(&self, gpu: &Gpu) -> [u32; 3] {
        grid_1d(self.blocks, gpu.limits.max_compute_workgroups_per_dimension)
    }

    fn elementwise(&self, gpu: &Gpu) -> [u32; 3] {
        grid_1d(self.tiles, gpu.limits.max_compute_workgroups_per_dimension)
    }

    /// `t = tanh(W)`, `m = max|t|` (two launches); what forward and `codes` start with.
    fn absmax(&self, gpu: &Gpu, w: &Tensor) -> Result<Vec<Op>> {
        let (p, what) = (self.params(), self.describe());
        Ok(vec![
            launch_op(
                gpu,
                (&WQ_ABSMAX_PARTIAL, &[]),
                format!("wq_absmax_partial {what}"),
                &p,
                &[w, &self.t, &self.partials, &self.table],
                self.reduction(gpu),
            )?,
            launch_op(
                gpu,
                (&WQ_ABSMAX_FINAL, &[]),
                format!("wq_absmax_final {what}"),
                &p,
                &[&self.partials, &self.stats, &self.table],
                [self.members.len() as u32, 1, 1],
            )?,
        ])
    }

    /// Every member's `Ŵ` (into `w_hat`, the group's layout) from its `W` (in `w`).
    pub fn forward(&self, gpu: &Gpu, w: &Tensor, w_hat: &Tensor) -> Result<Vec<Op>> {
        self.check("weight_quant_forward", &[("w", w)], &[("w_hat", w_hat)])?;
        let mut ops = self.absmax(gpu, w)?;
        ops.push(launch_op(
            gpu,
            (&WQ_FORWARD, &[]),
            format!("wq_forward {}", self.describe()),
            &self.params(),
            &[&self.t, &self.stats, w_hat, &self.table],
            self.elementwise(gpu),
        )?);
        Ok(ops)
    }

    /// Every member's `dL/dW` (into `dw`, at its offset) from `G = dL/dŴ` (in `g`, the group's
    /// layout), using `t` and `m` of the last forward.
    pub fn backward(&self, gpu: &Gpu, g: &Tensor, dw: &Tensor) -> Result<Vec<Op>> {
        self.check("weight_quant_backward", &[("dw", dw)], &[("g", g)])?;
        let (p, what) = (self.params(), self.describe());
        Ok(vec![
            launch_op(
                gpu,
                (&WQ_BACKWARD_PARTIAL, &[]),
                format!("wq_backward_partial {what}"),
                &p,
                &[&self.partials, &self.t, &self.stats, g, &self.table],
                self.reduction(gpu),
            )?,
            launch_op(
                gpu,
                (&WQ_BACKWARD_FINAL, &[]),
                format!("wq_backward_final {what}"),
                &p,
                &[&self.partials, &self.stats, &self.table],
                [self.members.len() as u32, 1, 1],
            )?,
            launch_op(
                gpu,
                (&WQ_BACKWARD, &[]),
                format!("wq_backward {what}"),
                &p,
                &[&self.t, &self.stats, g, dw, &self.table],
                self.elementwise(gpu),
            )?,
        ])
    }
}

/// The weight quantizer of one weight tensor: a group of one (32 bits: a copy). Its buffers are
/// made once, and its forward and backward are a few launches to record into a step.
pub struct WeightQuantizer {
    bits: Bits,
    shape: Vec<usize>,
    group: Option<WeightQuantizers>,
    /// The group's `t`, shaped as the weight.
    t: Option<Tensor>,
}

impl WeightQuantizer {
    pub fn new(gpu: &Gpu, bits: Bits, shape: &[usize]) -> Result<Self> {
        let group = if bits.is_float() {
            None
        } else {
            Some(WeightQuantizers::new(gpu, &[(bits, shape.to_vec(), 0)])?)
        };
        let t = group.as_ref().map(|g| g.view(g.t(), 0)).transpose()?;
        Ok(WeightQuantizer {
            bits,
            shape: shape.to_vec(),
            group,
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
        self.group.as_ref().map(|g| g.stats())
    }

    fn check(&self, kernel: &str, named: &[(&str, &Tensor)]) -> Result<u32> {
        for (name, t) in named {
            expect_dtype(kernel, name, t, DType::F32)?;
            expect_shape(kernel, name, t, &self.shape)?;
        }
        count_u32(kernel, self.shape.iter().product())
    }

    /// `Ŵ` from `W` (32 bits: a copy).
    pub fn forward(&self, gpu: &Gpu, w: &Tensor, w_hat: &Tensor) -> Result<Vec<Op>> {
        self.check("weight_quant_forward", &[("w", w), ("w_hat", w_hat)])?;
        match &self.group {
            None => Ok(vec![copy(w, w_hat)]),
            Some(g) => g.forward(gpu, w, w_hat),
        }
    }

    /// `dL/dW` from `G = dL/dŴ`, using `t` and `m` of the last forward (32 bits: a copy).
    pub fn backward(&self, gpu: &Gpu, g: &Tensor, dw: &Tensor) -> Result<Vec<Op>> {
        self.check("weight_quant_backward", &[("g", g), ("dw", dw)])?;
        match &self.group {
            None => Ok(vec![copy(g, dw)]),
            Some(q) => q.backward(gpu, g, dw),
        }
    }

    /// Integer codes `k` of `W` (level `2k − n`); recomputes `t` and `m` first.
    pub fn codes(&self, gpu: &Gpu, w: &Tensor, codes: &Tensor) -> Result<Vec<Op>> {
        const K: &str = "weight_codes";
        let n = self.check(K, &[("w", w)])?;
        codes_check(K, self.bits, &self.shape, codes)?;
        let group = self.group.as_ref().expect("codes_check refuses 32 bits");
        let words = count_u32(K, codes_words(self.bits, n as usize))?;
        let mut ops = group.absmax(gpu, w)?;
        ops.push(launch_op(
            gpu,
            (&WEIGHT_CODES, &[("PACKED", packed(self.bits))]),
            format!("{K} w{} {:?}", self.bits, self.shape),
            &params(n, self.bits, 0),
            &[group.t(), group.stats(), codes],
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
