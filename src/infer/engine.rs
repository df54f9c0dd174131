//! The integer model on the GPU (`shaders/intinfer.wgsl`): weights uploaded once, buffers sized
//! for the largest batch, one recorded plan per batch size, one submit per batch.

use super::model::{IntModel, IntOp, conv_axis, pool_axis};
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Gpu, Op, Tensor};
use crate::kernels::{Entry, INTINFER, elementwise_grid};
use Bind::{Read as R, ReadWrite as W};
use std::collections::HashMap;
use std::sync::Mutex;

const fn entry(name: &'static str, used: &'static [(usize, Bind)]) -> Entry {
    Entry {
        shader: &INTINFER,
        name,
        used,
    }
}

const CONV_INT: Entry = entry(
    "conv_int",
    &[(1, R), (3, R), (5, R), (6, R), (7, W), (8, W)],
);
const CONV_FLOAT: Entry = entry(
    "conv_float",
    &[(2, R), (4, R), (5, R), (6, R), (7, W), (8, W)],
);
const MAXPOOL_CODES: Entry = entry("maxpool_codes", &[(1, R), (7, W)]);
const MAXPOOL_FLOAT: Entry = entry("maxpool_float", &[(2, R), (8, W)]);
const AVGPOOL_FLOAT: Entry = entry("avgpool_float", &[(2, R), (8, W)]);
const SHUFFLE_CODES: Entry = entry("shuffle_codes", &[(1, R), (7, W)]);
const SHUFFLE_FLOAT: Entry = entry("shuffle_float", &[(2, R), (8, W)]);
const QUANTIZE_CODES: Entry = entry("quantize_codes", &[(2, R), (7, W)]);
const ADD_FLOAT: Entry = entry("add_float", &[(2, R), (7, W), (8, W), (9, R)]);
const CONV_IAO: Entry = entry(
    "conv_iao",
    &[
        (1, R),
        (3, R),
        (5, R),
        (6, R),
        (7, W),
        (8, W),
        (10, R),
        (14, R),
    ],
);
const REQUANT_IAO: Entry = entry("requant_iao", &[(1, R), (7, W)]);
const DEQUANT_IAO: Entry = entry("dequant_iao", &[(1, R), (8, W)]);
const SIGN_PACK: Entry = entry("sign_pack", &[(2, R), (7, W)]);
const UNPACK_BITS: Entry = entry("unpack_bits", &[(1, R), (8, W)]);
const MAXPOOL_BITS: Entry = entry("maxpool_bits", &[(1, R), (7, W)]);
const SHUFFLE_BITS: Entry = entry("shuffle_bits", &[(1, R), (7, W)]);
const CONV_XNOR: Entry = entry(
    "conv_xnor",
    &[(1, R), (5, R), (6, R), (7, W), (8, W), (12, R), (13, R)],
);
const ADD_IAO: Entry = entry("add_iao", &[(1, R), (7, W), (8, W), (11, R)]);

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    h: u32,
    w: u32,
    cin: u32,
    oh: u32,
    ow: u32,
    cout: u32,
    groups: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    w_levels: u32,
    out_levels: u32,
    relu: u32,
    shuffle_groups: u32,
    out_levels_f: f32,
    out_inv_levels: f32,
    in_scale: f32,
    in_zero: f32,
    in_qmin: f32,
    out_scale: f32,
    out_zero: f32,
    out_qmin: f32,
    out_qmax: f32,
    _pad: [u32; 3],
}

impl Params {
    /// A conv's or pool's window (pools: dilation 1, one group).
    fn window(
        &mut self,
        kernel: &[usize; 2],
        stride: &[usize; 2],
        padding: &[usize; 2],
        dilation: &[usize; 2],
        groups: usize,
    ) {
        let u = |v: usize| v as u32;
        (self.kh, self.kw, self.sh, self.sw) =
            (u(kernel[0]), u(kernel[1]), u(stride[0]), u(stride[1]));
        (self.ph, self.pw, self.dh, self.dw) =
            (u(padding[0]), u(padding[1]), u(dilation[0]), u(dilation[1]));
        self.groups = u(groups);
    }
}

/// An activation between ops: (C, H, W) per image, as codes of `bits` bits or as floats.
#[derive(Clone)]
struct Edge {
    c: usize,
    h: usize,
    w: usize,
    bits: Option<u32>,
    t: Tensor,
}

impl Edge {
    fn at(&self, batch: usize) -> Result<Tensor> {
        let per = match self.bits {
            Some(1) => self.h * self.w * self.c.div_ceil(32),
            Some(_) => self.h * self.w * self.c.div_ceil(4),
            None => self.h * self.w * self.c,
        };
        self.t.view(0, &[batch * per])
    }
}

struct Layer {
    w_codes: Option<Tensor>,
    w_float: Option<Tensor>,
    scale: Tensor,
    bias: Tensor,
    /// IAO: the weight codes' per-channel offsets and the int32 bias.
    iao_terms: Option<(Tensor, Tensor)>,
}

/// A binary conv's weight planes and epilogue.
struct XnorLayer {
    w_pos: Tensor,
    w_neg: Tensor,
    scale: Tensor,
    bias: Tensor,
}

/// The input side of an IAO op's parameters.
fn iao_in(p: &mut Params, s: &super::model::CodeSpace) {
    (p.in_scale, p.in_zero, p.in_qmin) = (s.scale, s.zero_point, s.qmin);
}

/// The output side of an IAO op's parameters.
fn iao_out(p: &mut Params, s: &super::model::CodeSpace) {
    (p.out_scale, p.out_zero, p.out_qmin, p.out_qmax) = (s.scale, s.zero_point, s.qmin, s.qmax);
}

/// A plan for one batch size: its ops and where the logits land.
struct Planned {
    ops: Vec<Op>,
    logits: Tensor,
}

pub struct IntEngine {
    pub model: IntModel,
    capacity: usize,
    layers: HashMap<String, Layer>,
    xnor: HashMap<String, XnorLayer>,
    /// Every edge at the capacity batch: the input images (0), then each op's output.
    edges: Vec<Edge>,
    dummy: Tensor,
    plans: Mutex<HashMap<usize, std::sync::Arc<Planned>>>,
    /// Activations are channels-last; when the output has a spatial extent (flattened or not),
    /// this (C, H, W) is the shape whose channels-last order it is in, to be put back in
    /// PyTorch's (C, H, W) order.
    out_order: Option<(usize, usize, usize)>,
}

fn edge_tensor(
    gpu: &Gpu,
    what: &str,
    cap: usize,
    c: usize,
    h: usize,
    w: usize,
    bits: Option<u32>,
) -> Result<Tensor> {
    match bits {
        Some(1) => gpu.zeros(what, &[cap * h * w * c.div_ceil(32)], DType::U32),
        Some(_) => gpu.zeros(what, &[cap * h * w * c.div_ceil(4)], DType::U32),
        None => gpu.zeros(what, &[cap * h * w * c], DType::F32),
    }
}

/// The output side shared by convs and adds (`store` in the shader): requantization levels in
/// `p`, the `OUT_CODES` constant, and the (codes, floats) output bindings, `y` in the one used
/// and a dummy in the other.
fn epilogue<'a>(
    p: &mut Params,
    output_bits: Option<u32>,
    y: &'a Tensor,
    dummy_codes: &'a Tensor,
    dummy_floats: &'a Tensor,
) -> ([(&'static str, f64); 1], &'a Tensor, &'a Tensor) {
    if let Some(b) = output_bits {
        p.out_levels = (1u32 << b) - 1;
        p.out_levels_f = p.out_levels as f32;
        p.out_inv_levels = (1.0f64 / p.out_levels as f64) as f32;
    }
    let consts = [("OUT_CODES", f64::from(u8::from(output_bits.is_some())))];
    match output_bits {
        Some(_) => (consts, y, dummy_floats),
        None => (consts, dummy_codes, y),
    }
}

impl IntEngine {
    /// Uploads `model` and allocates buffers for batches of up to `capacity` images.
    pub fn new(gpu: &Gpu, model: IntModel, capacity: usize) -> Result<IntEngine> {
        if capacity == 0 {
            return Err(Error::Invalid(
                "batch size 0: use a batch size of at least 1".into(),
            ));
        }
        let mut model = model;
        model.manifest.check_inputs()?;
        let [c0, h0, w0] = model.manifest.input;
        let input = gpu.zeros(
            "input images (channels-last)",
            &[capacity * h0 * w0 * c0],
            DType::F32,
        )?;
        let mut layers = HashMap::new();
        let mut xnor = HashMap::new();
        let mut edges = vec![Edge {
            c: c0,
            h: h0,
            w: w0,
            bits: None,
            t: input,
        }];
        // Per edge: the (C, H, W) whose channels-last order its values are in.
        let mut order = vec![(c0, h0, w0)];
        for (k, node) in model.manifest.ops.iter().enumerate() {
            let what = format!("op {k} output");
            let e = node.inputs[0];
            let Edge {
                mut c,
                mut h,
                mut w,
                mut bits,
                ..
            } = edges[e];
            let mut ord = (c, h, w);
            match &node.op {
                IntOp::Conv {
                    name,
                    cin,
                    cout,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    weight_bits,
                    output_bits,
                    iao,
                    ..
                } => {
                    if *cin != c {
                        return Err(Error::Invalid(format!(
                            "layer {name} takes {cin} channels but gets {c}"
                        )));
                    }
                    let n = cout
                        * kernel[0]
                        * kernel[1]
                        * super::model::weight_row(*cin, *groups, weight_bits.is_some());
                    let (w_codes, w_float) = match weight_bits {
                        Some(b) => {
                            let codes = model.weight_codes(name, n, *b)?;
                            let words: Vec<u32> = codes
                                .chunks(4)
                                .map(|q| {
                                    q.iter()
                                        .enumerate()
                                        .fold(0u32, |a, (j, &v)| a | ((v as u32) << (8 * j)))
                                })
                                .collect();
                            (
                                Some(gpu.upload_u32(
                                    &format!("{name} weight codes"),
                                    &[words.len()],
                                    &words,
                                )?),
                                None,
                            )
                        }
                        None => (
                            None,
                            Some(gpu.upload_f32(
                                &format!("{name} weights"),
                                &[n],
                                model.floats(&format!("{name}.weight"), n)?,
                            )?),
                        ),
                    };
                    let scale = gpu.upload_f32(
                        &format!("{name} scale"),
                        &[*cout],
                        model.floats(&format!("{name}.scale"), *cout)?,
                    )?;
                    let bias = gpu.upload_f32(
                        &format!("{name} bias"),
                        &[*cout],
                        model.floats(&format!("{name}.bias"), *cout)?,
                    )?;
                    let iao_terms = match iao {
                        Some(_) => Some((
                            gpu.upload_f32(
                                &format!("{name} weight zero"),
                                &[*cout],
                                model.floats(&format!("{name}.weight_zero"), *cout)?,
                            )?,
                            gpu.upload_u32(
                                &format!("{name} int32 bias"),
                                &[*cout],
                                &model
                                    .ints(&format!("{name}.bias_int"), *cout)?
                                    .iter()
                                    .map(|&b| b as u32)
                                    .collect::<Vec<u32>>(),
                            )?,
                        )),
                        None => None,
                    };
                    layers.insert(
                        name.clone(),
                        Layer {
                            w_codes,
                            w_float,
                            scale,
                            bias,
                            iao_terms,
                        },
                    );
                    (h, w) = (
                        conv_axis(h, kernel[0], stride[0], padding[0], dilation[0]),
                        conv_axis(w, kernel[1], stride[1], padding[1], dilation[1]),
                    );
                    c = *cout;
                    bits = *output_bits;
                    ord = (c, h, w);
                }
                IntOp::Quantize { bits: b } => bits = Some(*b),
                IntOp::IaoQuantize { .. } | IntOp::IaoRequant { .. } => bits = Some(8),
                IntOp::SignPack => bits = Some(1),
                IntOp::Unpack => bits = None,
                IntOp::XnorConv {
                    name,
                    cin,
                    cout,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    ternary,
                    sign,
                } => {
                    if *cin != c || bits != Some(1) {
                        return Err(Error::Invalid(format!(
                            "layer {name} takes {cin} binary channels but gets {c} (the model file is damaged; export it again)"
                        )));
                    }
                    let (taps, cig) = (cout * kernel[0] * kernel[1], cin / groups);
                    let n = taps * cig.div_ceil(32);
                    let pos = model.weight_plane(&format!("{name}.weight_bits"), taps, cig)?;
                    let neg = if *ternary {
                        model.weight_plane(&format!("{name}.weight_bits_neg"), taps, cig)?
                    } else {
                        vec![0; n]
                    };
                    xnor.insert(
                        name.clone(),
                        XnorLayer {
                            w_pos: gpu.upload_u32(&format!("{name} weight bits"), &[n], &pos)?,
                            w_neg: gpu.upload_u32(&format!("{name} weight bits -"), &[n], &neg)?,
                            scale: gpu.upload_f32(
                                &format!("{name} scale"),
                                &[*cout],
                                model.floats(&format!("{name}.scale"), *cout)?,
                            )?,
                            bias: gpu.upload_f32(
                                &format!("{name} bias"),
                                &[*cout],
                                model.floats(&format!("{name}.bias"), *cout)?,
                            )?,
                        },
                    );
                    (h, w) = (
                        conv_axis(h, kernel[0], stride[0], padding[0], dilation[0]),
                        conv_axis(w, kernel[1], stride[1], padding[1], dilation[1]),
                    );
                    c = *cout;
                    bits = sign.then_some(1);
                    ord = (c, h, w);
                }
                IntOp::IaoDequant { .. } => bits = None,
                IntOp::MaxPool {
                    kernel,
                    stride,
                    padding,
                }
                | IntOp::AvgPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    (h, w) = (
                        pool_axis(h, kernel[0], stride[0], padding[0]),
                        pool_axis(w, kernel[1], stride[1], padding[1]),
                    );
                    ord = (c, h, w);
                }
                IntOp::Shuffle { .. } => {}
                IntOp::Flatten => {
                    (c, h, w) = (c * h * w, 1, 1);
                    ord = order[e];
                }
                IntOp::IaoAdd { output, .. } => {
                    let y = &edges[node.inputs[1]];
                    if (y.c, y.h, y.w) != (c, h, w) || bits != Some(8) || y.bits != Some(8) {
                        return Err(Error::Invalid(format!(
                            "op {k} adds a {c}x{h}x{w} and a {}x{}x{} tensor: an IAO add takes two code tensors of one shape (the model file is damaged; export it again)",
                            y.c, y.h, y.w
                        )));
                    }
                    bits = output.map(|_| 8);
                    ord = order[e];
                }
                IntOp::Add { output_bits, .. } => {
                    let y = &edges[node.inputs[1]];
                    if (y.c, y.h, y.w) != (c, h, w) || bits.is_some() || y.bits.is_some() {
                        return Err(Error::Invalid(format!(
                            "op {k} adds a {c}x{h}x{w} and a {}x{}x{} tensor: an add takes two float tensors of one shape (the model file is damaged; export it again)",
                            y.c, y.h, y.w
                        )));
                    }
                    bits = *output_bits;
                    ord = order[e];
                }
            }
            let t = edge_tensor(gpu, &what, capacity, c, h, w, bits)?;
            edges.push(Edge { c, h, w, bits, t });
            order.push(ord);
        }
        let dummy = gpu.zeros("unused output", &[1], DType::F32)?;
        let last = *order.last().expect("the input edge");
        Ok(IntEngine {
            model,
            capacity,
            layers,
            xnor,
            edges,
            dummy,
            plans: Mutex::new(HashMap::new()),
            out_order: (last.1 * last.2 > 1).then_some(last),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn classes(&self) -> usize {
        self.model.manifest.classes
    }

    fn plan(&self, gpu: &Gpu, batch: usize) -> Result<std::sync::Arc<Planned>> {
        if let Some(p) = self.plans.lock().ok().and_then(|m| m.get(&batch).cloned()) {
            return Ok(p);
        }
        let mut ops = Vec::new();
        let dummy_u = gpu.zeros("unused codes", &[1], DType::U32)?;
        for (k, node) in self.model.manifest.ops.iter().enumerate() {
            let op = &node.op;
            let cur = &self.edges[node.inputs[0]];
            let out = &self.edges[k + 1];
            let (x, y) = (cur.at(batch)?, out.at(batch)?);
            let mut p = Params {
                batch: batch as u32,
                h: cur.h as u32,
                w: cur.w as u32,
                cin: cur.c as u32,
                oh: out.h as u32,
                ow: out.w as u32,
                cout: out.c as u32,
                ..Params::default()
            };
            let label = |s: &str| format!("{s} [{batch}, {}, {}, {}]", cur.h, cur.w, cur.c);
            match op {
                IntOp::Conv {
                    name,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    weight_bits,
                    relu,
                    output_bits,
                    iao,
                    ..
                } => {
                    let l = &self.layers[name];
                    p.window(kernel, stride, padding, dilation, *groups);
                    p.w_levels = weight_bits.map_or(0, |b| (1u32 << b) - 1);
                    p.relu = *relu as u32;
                    let (consts, codes_out, float_out) =
                        epilogue(&mut p, *output_bits, &y, &dummy_u, &self.dummy);
                    let grid =
                        elementwise_grid(gpu, (batch * out.h * out.w * out.c.div_ceil(4)) as u32);
                    if let (Some(q), Some(wc), Some((wz, bq))) = (iao, &l.w_codes, &l.iao_terms) {
                        iao_in(&mut p, &q.input);
                        if let Some(o) = &q.output {
                            iao_out(&mut p, o);
                        }
                        let consts = [consts[0], ("OUT_IAO", 1.0)];
                        ops.push(CONV_IAO.launch(
                            gpu,
                            &consts,
                            label(&format!("conv_iao {name}")),
                            &p,
                            &[&x, wc, &l.scale, &l.bias, codes_out, float_out, wz, bq],
                            grid,
                        )?);
                        continue;
                    }
                    ops.push(match (weight_bits, &l.w_codes, &l.w_float) {
                        (Some(_), Some(wc), _) => CONV_INT.launch(
                            gpu,
                            &consts,
                            label(&format!("conv_int {name}")),
                            &p,
                            &[&x, wc, &l.scale, &l.bias, codes_out, float_out],
                            grid,
                        )?,
                        (None, _, Some(wf)) => CONV_FLOAT.launch(
                            gpu,
                            &consts,
                            label(&format!("conv_float {name}")),
                            &p,
                            &[&x, wf, &l.scale, &l.bias, codes_out, float_out],
                            grid,
                        )?,
                        _ => return Err(Error::Invalid(format!("layer {name}: weights missing"))),
                    });
                }
                IntOp::Quantize { bits } => {
                    p.out_levels = (1u32 << bits) - 1;
                    p.out_levels_f = p.out_levels as f32;
                    let n = batch * out.h * out.w * out.c.div_ceil(4);
                    ops.push(QUANTIZE_CODES.launch(
                        gpu,
                        &[],
                        label("quantize_codes"),
                        &p,
                        &[&x, &y],
                        elementwise_grid(gpu, n as u32),
                    )?);
                }
                IntOp::IaoQuantize { to } | IntOp::IaoRequant { to, .. } => {
                    iao_out(&mut p, to);
                    let e = match op {
                        IntOp::IaoRequant { from, .. } => {
                            iao_in(&mut p, from);
                            &REQUANT_IAO
                        }
                        // DoReFa's quantize kernel, with IAO's codes.
                        _ => &QUANTIZE_CODES,
                    };
                    let n = batch * out.h * out.w * out.c.div_ceil(4);
                    ops.push(e.launch(
                        gpu,
                        &[("OUT_IAO", 1.0)],
                        label(e.name),
                        &p,
                        &[&x, &y],
                        elementwise_grid(gpu, n as u32),
                    )?);
                }
                IntOp::SignPack | IntOp::Unpack => {
                    let (e, n) = match op {
                        IntOp::SignPack => (&SIGN_PACK, batch * out.h * out.w * out.c.div_ceil(32)),
                        _ => (&UNPACK_BITS, batch * out.h * out.w * out.c),
                    };
                    ops.push(e.launch(
                        gpu,
                        &[],
                        label(e.name),
                        &p,
                        &[&x, &y],
                        elementwise_grid(gpu, n as u32),
                    )?);
                }
                IntOp::XnorConv {
                    name,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    ternary,
                    sign,
                    ..
                } => {
                    let l = &self.xnor[name];
                    p.window(kernel, stride, padding, dilation, *groups);
                    let (codes_out, float_out) = if *sign {
                        (&y, &self.dummy)
                    } else {
                        (&dummy_u, &y)
                    };
                    ops.push(CONV_XNOR.launch(
                        gpu,
                        &[
                            ("OUT_BITS", f64::from(u8::from(*sign))),
                            ("TERNARY", f64::from(u8::from(*ternary))),
                        ],
                        label(&format!("conv_xnor {name}")),
                        &p,
                        &[
                            &x, &l.scale, &l.bias, codes_out, float_out, &l.w_pos, &l.w_neg,
                        ],
                        elementwise_grid(gpu, (batch * out.h * out.w * out.c.div_ceil(32)) as u32),
                    )?);
                }
                IntOp::IaoDequant { from } => {
                    iao_in(&mut p, from);
                    let n = batch * out.h * out.w * out.c;
                    ops.push(DEQUANT_IAO.launch(
                        gpu,
                        &[],
                        label("dequant_iao"),
                        &p,
                        &[&x, &y],
                        elementwise_grid(gpu, n as u32),
                    )?);
                }
                IntOp::MaxPool {
                    kernel,
                    stride,
                    padding,
                }
                | IntOp::AvgPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    p.window(kernel, stride, padding, &[1, 1], 1);
                    let avg = matches!(op, IntOp::AvgPool { .. });
                    let (e, n) = match (avg, cur.bits) {
                        (false, Some(1)) => {
                            (&MAXPOOL_BITS, batch * out.h * out.w * out.c.div_ceil(32))
                        }
                        (false, Some(_)) => {
                            (&MAXPOOL_CODES, batch * out.h * out.w * out.c.div_ceil(4))
                        }
                        (false, None) => (&MAXPOOL_FLOAT, batch * out.h * out.w * out.c),
                        (true, None) => (&AVGPOOL_FLOAT, batch * out.h * out.w * out.c),
                        (true, Some(_)) => {
                            return Err(Error::Invalid("average pooling of codes".into()));
                        }
                    };
                    ops.push(e.launch(
                        gpu,
                        &[],
                        label(e.name),
                        &p,
                        &[&x, &y],
                        elementwise_grid(gpu, n as u32),
                    )?);
                }
                IntOp::Shuffle { groups } => {
                    p.shuffle_groups = *groups as u32;
                    let (e, n) = match cur.bits {
                        Some(1) => (&SHUFFLE_BITS, batch * out.h * out.w * out.c.div_ceil(32)),
                        Some(_) => (&SHUFFLE_CODES, batch * out.h * out.w * out.c.div_ceil(4)),
                        None => (&SHUFFLE_FLOAT, batch * out.h * out.w * out.c),
                    };
                    ops.push(e.launch(
                        gpu,
                        &[],
                        label(e.name),
                        &p,
                        &[&x, &y],
                        elementwise_grid(gpu, n as u32),
                    )?);
                }
                IntOp::Flatten => ops.push(Op::Copy {
                    src: x.clone(),
                    dst: y.clone(),
                }),
                IntOp::IaoAdd {
                    space,
                    relu,
                    output,
                } => {
                    let x2 = self.edges[node.inputs[1]].at(batch)?;
                    p.relu = *relu as u32;
                    iao_in(&mut p, space);
                    if let Some(o) = output {
                        iao_out(&mut p, o);
                    }
                    let (consts, codes_out, float_out) =
                        epilogue(&mut p, output.map(|_| 8), &y, &dummy_u, &self.dummy);
                    ops.push(ADD_IAO.launch(
                        gpu,
                        &[consts[0], ("OUT_IAO", 1.0)],
                        label("add_iao"),
                        &p,
                        &[&x, codes_out, float_out, &x2],
                        elementwise_grid(gpu, (batch * out.h * out.w * out.c.div_ceil(4)) as u32),
                    )?);
                }
                IntOp::Add { relu, output_bits } => {
                    let x2 = self.edges[node.inputs[1]].at(batch)?;
                    p.relu = *relu as u32;
                    let (consts, codes_out, float_out) =
                        epilogue(&mut p, *output_bits, &y, &dummy_u, &self.dummy);
                    ops.push(ADD_FLOAT.launch(
                        gpu,
                        &consts,
                        label("add_float"),
                        &p,
                        &[&x, codes_out, float_out, &x2],
                        elementwise_grid(gpu, (batch * out.h * out.w * out.c.div_ceil(4)) as u32),
                    )?);
                }
            }
        }
        let cur = self.edges.last().expect("the input edge");
        if cur.bits.is_some() {
            return Err(Error::Invalid(
                "the model's output is codes, not logits".into(),
            ));
        }
        let planned = std::sync::Arc::new(Planned {
            ops,
            logits: cur.at(batch)?,
        });
        if let Ok(mut m) = self.plans.lock() {
            m.insert(batch, planned.clone());
        }
        Ok(planned)
    }

    /// Logits `(batch, classes)` of normalised images given NCHW `(batch, C, H, W)`, as the
    /// training data pipeline makes them (one submit, one readback).
    pub fn run(&self, gpu: &Gpu, images_nchw: &[f32]) -> Result<Vec<f32>> {
        let [c, h, w] = self.model.manifest.input;
        let per = c * h * w;
        if images_nchw.is_empty() || !images_nchw.len().is_multiple_of(per) {
            return Err(Error::Invalid(format!(
                "{} values is not a whole number of {c}x{h}x{w} images",
                images_nchw.len()
            )));
        }
        let batch = images_nchw.len() / per;
        if batch > self.capacity {
            return Err(Error::Invalid(format!(
                "batch of {batch} images for an engine built for {}",
                self.capacity
            )));
        }
        let mut nhwc = vec![0.0f32; images_nchw.len()];
        for n in 0..batch {
            for ch in 0..c {
                for p in 0..h * w {
                    nhwc[(n * h * w + p) * c + ch] = images_nchw[(n * c + ch) * h * w + p];
                }
            }
        }
        gpu.write(&self.edges[0].t.view(0, &[batch * per])?, &nhwc)?;
        let plan = self.plan(gpu, batch)?;
        let mut out: Vec<Vec<f32>> =
            gpu.run_and_read("integer inference", &plan.ops, &[&plan.logits])?;
        let out = out.remove(0);
        Ok(match self.out_order {
            None => out,
            Some((c, h, w)) => {
                let hw = h * w;
                let mut chw = vec![0.0f32; out.len()];
                for (img, src) in chw.chunks_mut(c * hw).zip(out.chunks(c * hw)) {
                    for p in 0..hw {
                        for ch in 0..c {
                            img[ch * hw + p] = src[p * c + ch];
                        }
                    }
                }
                chw
            }
        })
    }

    /// Submits the batch's plan without reading back (for benchmarks).
    pub fn submit(&self, gpu: &Gpu, batch: usize) -> Result<()> {
        let plan = self.plan(gpu, batch)?;
        gpu.submit("integer inference", &plan.ops)?;
        Ok(())
    }
}
