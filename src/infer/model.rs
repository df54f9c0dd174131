//! The exported integer model: one safetensors file with the graph as a JSON manifest in its
//! metadata (key `wgqat_manifest`) and per layer
//!
//! | tensor | dtype | |
//! |---|---|---|
//! | `{name}.weight_codes` | U8 | weight codes k (level 2k/n − 1), layout (Cout, KH, KW, Cin/g) with Cin/g padded to a multiple of 4 by zero codes (see [`weight_row`]), bit-packed: 1 code per byte up to 8 bits, 2 per byte (low nibble first) up to 4, 4 per byte up to 2 |
//! | `{name}.weight` | F32 | float weights (the first layer), same layout |
//! | `{name}.scale`, `{name}.bias` | F32 | per output channel: z = acc · scale + bias |
//!
//! where for a quantized layer acc = Σ a·(2k − n_w) over integer activation codes a, so
//! scale = A/(n_a·n_w) folds the levels' scales, the conv bias and BatchNorm (see
//! [`super::fold`]); for a float layer acc = Σ x·w. Activations are channels-last. The ops
//! form a graph: each names the edges it reads (a residual block's add reads its body's and its
//! shortcut's).

use super::fold::{Folded, FoldedOp, Weights};
use crate::error::{Error, Result};
use crate::nn::checkpoint::{self, Data, Named};
use crate::quant::Bits;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "wgqat-int-2";
/// Format 1 (chains only, no `inputs`) reads as format 2.
const FORMAT_1: &str = "wgqat-int-1";

/// An IAO quantizer's codes on an edge: q in [qmin, qmax], stored as the byte u = q − qmin;
/// the value is (q + zero_point)·scale (micronet's sign of the zero point).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodeSpace {
    pub scale: f32,
    pub zero_point: f32,
    pub qmin: f32,
    pub qmax: f32,
}

/// An IAO conv's code spaces: its input's, and its output's when it writes the next
/// quantizer's codes (None: floats). Its weights are bytes u_w with per-channel offsets
/// `{name}.weight_zero` (the weight W = u_w + z_w).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IaoConv {
    pub input: CodeSpace,
    pub output: Option<CodeSpace>,
}

/// One op of the integer graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum IntOp {
    /// A conv (or a Linear, as a 1×1 conv of a flattened 1×1 input).
    Conv {
        name: String,
        cin: usize,
        cout: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        /// Bits of the weight codes; None: float weights (and float input).
        weight_bits: Option<u32>,
        /// Bits of the input activation codes; None: float input.
        input_bits: Option<u32>,
        relu: bool,
        /// Requantize the output to codes of this many bits (the next layer's), or None: float.
        output_bits: Option<u32>,
        /// An IAO conv (8-bit affine codes in and, with `output_bits`, out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iao: Option<IaoConv>,
    },
    /// Float activations to codes: floor(clamp(0.1 x, 0, 1) · n + 0.5).
    Quantize {
        bits: u32,
    },
    /// IAO: float activations to codes of `to`.
    IaoQuantize {
        to: CodeSpace,
    },
    /// IAO: codes of one quantizer to another's (the value, then the next quantizer).
    IaoRequant {
        from: CodeSpace,
        to: CodeSpace,
    },
    /// IAO: codes to their values.
    IaoDequant {
        from: CodeSpace,
    },
    /// wbwtab: float activations to the binary activation B(x) (sign, 0 → +1) as bits, 32
    /// channels per word.
    SignPack,
    /// wbwtab: bits back to ±1 floats, for a float layer.
    Unpack,
    /// wbwtab: a binary conv on bits, binary (`{name}.weight_bits`, bit 1 = +α) or ternary
    /// (and `{name}.weight_bits_neg`) weights, densely packed ([`pack_plane`]), then
    /// z = dot·scale + bias (α and the BatchNorm folded) and, with `sign`, B(z) as bits.
    XnorConv {
        name: String,
        cin: usize,
        cout: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        ternary: bool,
        sign: bool,
    },
    /// IAO's QuantAdd: the sum of the values of two code tensors of one space (`space`), then
    /// the block's ReLU, written as floats or as the codes of `output`.
    IaoAdd {
        space: CodeSpace,
        relu: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<CodeSpace>,
    },
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },
    AvgPool {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },
    Shuffle {
        groups: usize,
    },
    Flatten,
    /// The sum of two float tensors of one shape, then ReLU, then requantized as a conv's output.
    Add {
        relu: bool,
        output_bits: Option<u32>,
    },
}

impl IntOp {
    /// The MaxPool or AvgPool op of pool layer `layer` (the stride defaulting to the kernel);
    /// None for other layers.
    pub fn pool(layer: &crate::models::LayerSpec) -> Option<IntOp> {
        use crate::models::LayerSpec;
        let (max, kernel, stride, padding) = match layer {
            LayerSpec::MaxPool {
                kernel,
                stride,
                padding,
            } => (true, kernel, stride, padding),
            LayerSpec::AvgPool {
                kernel,
                stride,
                padding,
            } => (false, kernel, stride, padding),
            _ => return None,
        };
        let (kernel, stride, padding) = (
            pair(kernel.t()),
            pair(stride.unwrap_or(*kernel).t()),
            pair(padding.t()),
        );
        Some(if max {
            IntOp::MaxPool {
                kernel,
                stride,
                padding,
            }
        } else {
            IntOp::AvgPool {
                kernel,
                stride,
                padding,
            }
        })
    }

    /// A pool's output (H, W) for input (H, W); other ops keep it.
    pub fn pool_out(&self, h: usize, w: usize) -> (usize, usize) {
        match self {
            IntOp::MaxPool {
                kernel,
                stride,
                padding,
            }
            | IntOp::AvgPool {
                kernel,
                stride,
                padding,
            } => (
                pool_axis(h, kernel[0], stride[0], padding[0]),
                pool_axis(w, kernel[1], stride[1], padding[1]),
            ),
            _ => (h, w),
        }
    }
}

/// An op and the edges it reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntNode {
    #[serde(flatten)]
    pub op: IntOp,
    /// Edge 0 is the input image, edge k + 1 the output of op k; an op reads only earlier edges.
    /// Files of format `wgqat-int-1` have none: each op reads the one before.
    #[serde(default)]
    pub inputs: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub model: String,
    /// Input (C, H, W); images are normalised with `mean` and `std` per channel.
    pub input: [usize; 3],
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub classes: usize,
    /// A name per class (CIFAR-10's for a 10-class model); may be empty.
    #[serde(default)]
    pub class_names: Vec<String>,
    pub layout: String,
    pub ops: Vec<IntNode>,
}

impl Manifest {
    /// The manifest of `ops` for CIFAR-format input (its normalisation, and class names for
    /// 10 classes), channels-last.
    pub fn new(model: &str, input: [usize; 3], classes: usize, ops: Vec<IntNode>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            model: model.into(),
            input,
            mean: crate::data::MEAN,
            std: crate::data::STD,
            classes,
            class_names: if classes == crate::data::CLASSES {
                crate::data::CLASS_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            } else {
                Vec::new()
            },
            layout: "NHWC".into(),
            ops,
        }
    }

    /// Fills in the inputs of a chain (format 1) and checks that every op reads earlier edges,
    /// as many as it takes.
    pub fn check_inputs(&mut self) -> Result<()> {
        for (k, n) in self.ops.iter_mut().enumerate() {
            if n.inputs.is_empty() {
                n.inputs = vec![k];
            }
            let want = if matches!(n.op, IntOp::Add { .. } | IntOp::IaoAdd { .. }) {
                2
            } else {
                1
            };
            if n.inputs.len() != want {
                return Err(Error::Invalid(format!(
                    "op {k} of the model reads {} tensors, not {want}: the model file is damaged (export it again)",
                    n.inputs.len()
                )));
            }
            if let Some(e) = n.inputs.iter().find(|&&e| e > k) {
                return Err(Error::Invalid(format!(
                    "op {k} of the model reads edge {e}, which no earlier op writes: the model file is damaged (export it again)"
                )));
            }
        }
        Ok(())
    }
}

/// An integer model in memory: the manifest and its tensors.
#[derive(Clone, Debug)]
pub struct IntModel {
    pub manifest: Manifest,
    pub tensors: HashMap<String, Named>,
}

pub(crate) fn pair(p: (usize, usize)) -> [usize; 2] {
    [p.0, p.1]
}

/// Weights per (output channel, tap): Cin/groups, for codes padded to a multiple of 4 (the engine
/// packs four input channels per word; padded activation lanes are 0, so the padding adds
/// nothing). Padding happens only with one group (a 3-channel quantized first layer).
pub fn weight_row(cin: usize, groups: usize, codes: bool) -> usize {
    let cig = cin / groups;
    if codes { cig.next_multiple_of(4) } else { cig }
}

/// `rows` rows of `cig` values each, padded with `fill` to `row` values.
pub(crate) fn pad_rows<T: Copy>(v: &[T], cig: usize, row: usize, fill: T) -> Vec<T> {
    if cig == row {
        return v.to_vec();
    }
    v.chunks(cig)
        .flat_map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(fill, row - cig))
        })
        .collect()
}

/// Codes per byte for `bits`-bit codes.
pub fn codes_per_byte(bits: u32) -> usize {
    match bits {
        0..=2 => 4,
        3..=4 => 2,
        _ => 1,
    }
}

/// Packs codes into bytes, `codes_per_byte` per byte, lowest bits first.
pub fn pack_codes(codes: &[u8], bits: u32) -> Vec<u8> {
    let per = codes_per_byte(bits);
    let width = 8 / per;
    codes
        .chunks(per)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (j, &v)| b | (v << (width * j)))
        })
        .collect()
}

pub fn unpack_codes(bytes: &[u8], bits: u32, n: usize) -> Vec<u8> {
    let per = codes_per_byte(bits);
    let width = 8 / per;
    let mask = ((1u16 << width) - 1) as u8;
    (0..n)
        .map(|i| (bytes[i / per] >> (width * (i % per))) & mask)
        .collect()
}

/// `(Cout, Cin/g, KH, KW)` to `(Cout, KH, KW, Cin/g)`.
pub(crate) fn to_channels_last<T: Copy>(
    w: &[T],
    cout: usize,
    cig: usize,
    kh: usize,
    kw: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len());
    for o in 0..cout {
        for y in 0..kh {
            for x in 0..kw {
                for c in 0..cig {
                    out.push(w[((o * cig + c) * kh + y) * kw + x]);
                }
            }
        }
    }
    out
}

/// A Linear's input features from (C, H, W) order (PyTorch's flatten) to (H, W, C).
pub(crate) fn linear_to_channels_last<T: Copy>(
    w: &[T],
    out: usize,
    (c, h, wd): (usize, usize, usize),
) -> Vec<T> {
    let f = c * h * wd;
    let mut r = Vec::with_capacity(w.len());
    for o in 0..out {
        for y in 0..h {
            for x in 0..wd {
                for ch in 0..c {
                    r.push(w[o * f + (ch * h + y) * wd + x]);
                }
            }
        }
    }
    r
}

/// Output size along one axis of a conv.
pub fn conv_axis(n: usize, k: usize, s: usize, p: usize, d: usize) -> usize {
    (n + 2 * p - d * (k - 1) - 1) / s + 1
}

/// Output size along one axis of a pool.
pub fn pool_axis(n: usize, k: usize, s: usize, p: usize) -> usize {
    (n + 2 * p - k) / s + 1
}

/// The codes (their bits) that every reader of folded edge `e` takes, directly or through ops
/// exact on codes; None when one reader takes floats, readers differ, or nothing reads `e` (the
/// model's output).
fn wanted_codes(f: &Folded, readers: &[Vec<usize>], e: usize) -> Option<u32> {
    let mut bits = None;
    for &k in &readers[e] {
        let b = match &f.ops[k].op {
            FoldedOp::Conv(c) => c.input_bits.map(Bits::get),
            FoldedOp::MaxPool { .. } | FoldedOp::Shuffle { .. } | FoldedOp::Flatten => {
                wanted_codes(f, readers, k + 1)
            }
            FoldedOp::AvgPool { .. } | FoldedOp::Add { .. } => None,
        }?;
        if bits.is_some_and(|x| x != b) {
            return None;
        }
        bits = Some(b);
    }
    bits
}

impl IntModel {
    /// The integer model of a folded network. Each edge carries codes or floats: an op writes
    /// codes when every op reading it is a quantized conv taking those codes, directly or
    /// through max-pools, shuffles and flattens (exact on codes); otherwise floats, and one
    /// Quantize op per edge gives the quantized convs among its readers their codes (a residual
    /// block's input is read as codes by its convs and as floats by an identity shortcut).
    pub fn from_folded(f: &Folded) -> Result<IntModel> {
        let readers = f.consumers();
        let mut ops: Vec<IntNode> = Vec::new();
        let mut tensors = HashMap::new();
        // Per folded edge: its edge in the integer graph, per-sample (C, H, W), the (C, H, W)
        // a flattened edge was flattened from, and the bits of its codes (None: floats).
        let mut int_edge = vec![0usize];
        let mut shape = vec![(f.input[0], f.input[1], f.input[2])];
        let mut flattened_from: Vec<Option<(usize, usize, usize)>> = vec![None];
        let mut codes: Vec<Option<u32>> = vec![None];
        // (folded edge, bits) to the integer edge of its Quantize op.
        let mut quantized: HashMap<(usize, u32), usize> = HashMap::new();
        let push = |ops: &mut Vec<IntNode>, op: IntOp, inputs: Vec<usize>| {
            ops.push(IntNode { op, inputs });
            ops.len()
        };
        for (k, node) in f.ops.iter().enumerate() {
            let e = node.inputs[0];
            let output_bits = wanted_codes(f, &readers, k + 1);
            let (out_shape, out_flat, out_codes, id) = match &node.op {
                FoldedOp::Conv(c) => {
                    let want = c.input_bits.map(Bits::get);
                    let src = match (codes[e], want) {
                        (Some(a), Some(b)) if a == b => int_edge[e],
                        (None, Some(b)) => *quantized.entry((e, b)).or_insert_with(|| {
                            push(&mut ops, IntOp::Quantize { bits: b }, vec![int_edge[e]])
                        }),
                        (None, None) => int_edge[e],
                        (Some(_), _) => {
                            return Err(Error::Invalid(format!(
                                "layer {}: unexpected input codes",
                                c.name
                            )));
                        }
                    };
                    let cig = c.cin / c.groups;
                    let flat_channels = flattened_from[e].map_or(4, |f| f.0);
                    if want.is_some()
                        && ((!cig.is_multiple_of(4) && c.groups > 1)
                            || !flat_channels.is_multiple_of(4))
                    {
                        return Err(Error::Invalid(format!(
                            "layer {}: integer inference packs four input channels per word; {} channels per group is not a multiple of 4",
                            c.name, cig
                        )));
                    }
                    let (kh, kw) = c.kernel;
                    let (weight_bits, n_w) = match &c.weights {
                        Weights::Codes { bits, codes } => {
                            let mut cl = to_channels_last(codes, c.cout, cig, kh, kw);
                            if let (true, Some(from)) = (c.linear, flattened_from[e]) {
                                cl = linear_to_channels_last(codes, c.cout, from);
                            }
                            let n = bits.levels() as u64;
                            // acc = sum a (2k - n): bound its magnitude for i32 accumulation.
                            let bound = (c.input_bits.map_or(255, |b| b.levels() as u64))
                                * n
                                * (cig * kh * kw) as u64;
                            if bound >= i32::MAX as u64 {
                                return Err(Error::Invalid(format!(
                                    "layer {}: too many inputs per output for 32-bit integer accumulation",
                                    c.name
                                )));
                            }
                            let packed = pack_codes(
                                &pad_rows(&cl, cig, weight_row(c.cin, c.groups, true), 0),
                                bits.get(),
                            );
                            let key = format!("{}.weight_codes", c.name);
                            tensors.insert(
                                key.clone(),
                                Named {
                                    name: key,
                                    shape: vec![packed.len()],
                                    data: Data::U8(packed),
                                },
                            );
                            (Some(bits.get()), n as f64)
                        }
                        Weights::Float(w) => {
                            let mut cl = to_channels_last(w, c.cout, cig, kh, kw);
                            if let (true, Some(from)) = (c.linear, flattened_from[e]) {
                                cl = linear_to_channels_last(w, c.cout, from);
                            }
                            tensors.insert(
                                format!("{}.weight", c.name),
                                Named::f32(
                                    format!("{}.weight", c.name),
                                    &[c.cout, kh, kw, cig],
                                    cl,
                                ),
                            );
                            (None, 1.0)
                        }
                    };
                    let n_a = c.input_bits.map_or(1.0, |b| b.levels() as f64);
                    let scale: Vec<f32> =
                        c.a.iter()
                            .map(|&a| {
                                if weight_bits.is_some() {
                                    (a as f64 / (n_a * n_w)) as f32
                                } else {
                                    a
                                }
                            })
                            .collect();
                    tensors.insert(
                        format!("{}.scale", c.name),
                        Named::f32(format!("{}.scale", c.name), &[c.cout], scale),
                    );
                    tensors.insert(
                        format!("{}.bias", c.name),
                        Named::f32(format!("{}.bias", c.name), &[c.cout], c.b.clone()),
                    );
                    let (oh, ow) = if c.linear {
                        (1, 1)
                    } else {
                        (
                            conv_axis(shape[e].1, kh, c.stride.0, c.padding.0, c.dilation.0),
                            conv_axis(shape[e].2, kw, c.stride.1, c.padding.1, c.dilation.1),
                        )
                    };
                    let op = IntOp::Conv {
                        name: c.name.clone(),
                        cin: c.cin,
                        cout: c.cout,
                        kernel: pair(c.kernel),
                        stride: pair(c.stride),
                        padding: pair(c.padding),
                        dilation: pair(c.dilation),
                        groups: c.groups,
                        weight_bits,
                        input_bits: want,
                        relu: c.relu,
                        output_bits,
                        iao: None,
                    };
                    let id = push(&mut ops, op, vec![src]);
                    ((c.cout, oh, ow), None, output_bits, id)
                }
                FoldedOp::MaxPool {
                    kernel,
                    stride,
                    padding,
                }
                | FoldedOp::AvgPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    let max = matches!(node.op, FoldedOp::MaxPool { .. });
                    if !max && codes[e].is_some() {
                        return Err(Error::Invalid(
                            "average pooling of quantized codes is not supported".into(),
                        ));
                    }
                    let s = shape[e];
                    let out = (
                        s.0,
                        pool_axis(s.1, kernel.0, stride.0, padding.0),
                        pool_axis(s.2, kernel.1, stride.1, padding.1),
                    );
                    let (kernel, stride, padding) = (pair(*kernel), pair(*stride), pair(*padding));
                    let op = if max {
                        IntOp::MaxPool {
                            kernel,
                            stride,
                            padding,
                        }
                    } else {
                        IntOp::AvgPool {
                            kernel,
                            stride,
                            padding,
                        }
                    };
                    let id = push(&mut ops, op, vec![int_edge[e]]);
                    (out, None, codes[e], id)
                }
                FoldedOp::Shuffle { groups } => {
                    let op = IntOp::Shuffle { groups: *groups };
                    let id = push(&mut ops, op, vec![int_edge[e]]);
                    (shape[e], flattened_from[e], codes[e], id)
                }
                FoldedOp::Flatten => {
                    let s = shape[e];
                    let id = push(&mut ops, IntOp::Flatten, vec![int_edge[e]]);
                    ((s.0 * s.1 * s.2, 1, 1), Some(s), codes[e], id)
                }
                FoldedOp::Add { relu } => {
                    let &[x, y] = node.inputs.as_slice() else {
                        return Err(Error::Invalid(format!(
                            "op {k}: an add of {} tensors (it takes two)",
                            node.inputs.len()
                        )));
                    };
                    if codes[x].is_some() || codes[y].is_some() {
                        return Err(Error::Invalid(format!(
                            "op {k}: an add of quantized codes (it adds floats)"
                        )));
                    }
                    if (shape[x], flattened_from[x]) != (shape[y], flattened_from[y]) {
                        return Err(Error::Invalid(format!(
                            "op {k}: an add of tensors of shapes {:?} and {:?}",
                            shape[x], shape[y]
                        )));
                    }
                    let op = IntOp::Add {
                        relu: *relu,
                        output_bits,
                    };
                    let id = push(&mut ops, op, vec![int_edge[x], int_edge[y]]);
                    (shape[x], flattened_from[x], output_bits, id)
                }
            };
            int_edge.push(id);
            shape.push(out_shape);
            flattened_from.push(out_flat);
            codes.push(out_codes);
        }
        if codes.last().copied().flatten().is_some() {
            return Err(Error::Invalid("the model's output must be float".into()));
        }
        let (c, h, w) = *shape.last().expect("the input edge");
        let manifest = Manifest::new(&f.model, f.input, c * h * w, ops);
        Ok(IntModel { manifest, tensors })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert(
            "wgqat_manifest".into(),
            serde_json::to_string(&self.manifest).map_err(|e| Error::Invalid(e.to_string()))?,
        );
        let mut t: Vec<Named> = self.tensors.values().cloned().collect();
        t.sort_by(|a, b| a.name.cmp(&b.name));
        checkpoint::write(path, &t, meta)
    }

    pub fn read(path: &Path) -> Result<IntModel> {
        let (tensors, meta) = checkpoint::read(path)?;
        let text = meta.get("wgqat_manifest").ok_or_else(|| {
            Error::file(path, "has no wgqat_manifest: not an integer model (wgqat export writes them; a training checkpoint goes to wgqat eval)")
        })?;
        let mut manifest: Manifest = serde_json::from_str(text)
            .map_err(|e| Error::file(path, format!("unreadable manifest: {e}")))?;
        if manifest.format != FORMAT && manifest.format != FORMAT_1 {
            return Err(Error::file(
                path,
                format!(
                    "format {:?}, this wgqat reads {FORMAT:?} and {FORMAT_1:?}",
                    manifest.format
                ),
            ));
        }
        manifest
            .check_inputs()
            .map_err(|e| Error::file(path, e.to_string()))?;
        Ok(IntModel {
            manifest,
            tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
        })
    }

    /// A layer's weights as codes (one per element, channels-last) and their bits.
    pub fn weight_codes(&self, name: &str, n: usize, bits: u32) -> Result<Vec<u8>> {
        match self
            .tensors
            .get(&format!("{name}.weight_codes"))
            .map(|t| &t.data)
        {
            Some(Data::U8(b)) if b.len() == n.div_ceil(codes_per_byte(bits)) => {
                Ok(unpack_codes(b, bits, n))
            }
            _ => Err(Error::Invalid(format!(
                "the model has no (or a misshapen) {name}.weight_codes"
            ))),
        }
    }

    /// A float tensor of `n` values.
    pub fn floats(&self, key: &str, n: usize) -> Result<&[f32]> {
        match self.tensors.get(key).and_then(Named::f32s) {
            Some(v) if v.len() == n => Ok(v),
            _ => Err(Error::Invalid(format!(
                "the model has no (or a misshapen) {key}"
            ))),
        }
    }

    /// An integer tensor of `n` values that fit in i32 (IAO's int32 bias).
    pub fn ints(&self, key: &str, n: usize) -> Result<Vec<i32>> {
        match self.tensors.get(key).map(|t| &t.data) {
            Some(Data::I64(v)) if v.len() == n => v
                .iter()
                .map(|&x| i32::try_from(x).ok())
                .collect::<Option<Vec<i32>>>()
                .ok_or_else(|| Error::Invalid(format!("{key} does not fit in int32"))),
            _ => Err(Error::Invalid(format!(
                "the model has no (or a misshapen) {key}"
            ))),
        }
    }

    /// A binary conv's weight bit plane `key` of `taps` (output channel, ky, kx) × `cig` input
    /// channels, as the engine reads it: each tap's bits from a fresh 32-bit word.
    pub fn weight_plane(&self, key: &str, taps: usize, cig: usize) -> Result<Vec<u32>> {
        match self.tensors.get(key).map(|t| &t.data) {
            Some(Data::U8(b)) if b.len() == (taps * cig).div_ceil(8) => {
                Ok(unpack_plane(b, taps, cig))
            }
            _ => Err(Error::Invalid(format!(
                "the model has no (or a misshapen) {key}"
            ))),
        }
    }
}

/// A binary conv's weight bit plane as stored: `bit(tap, ci)` at bit `tap·cig + ci`, 8 to a
/// byte with no padding (a conv's rows of 16 channels would otherwise waste half their words).
pub fn pack_plane(taps: usize, cig: usize, bit: impl Fn(usize, usize) -> bool) -> Vec<u8> {
    let mut out = vec![0u8; (taps * cig).div_ceil(8)];
    for t in 0..taps {
        for ci in 0..cig {
            if bit(t, ci) {
                let i = t * cig + ci;
                out[i / 8] |= 1 << (i % 8);
            }
        }
    }
    out
}

/// A stored bit plane to the engine's layout: ceil(cig/32) words per tap, lanes past `cig` 0.
pub fn unpack_plane(b: &[u8], taps: usize, cig: usize) -> Vec<u32> {
    let row = cig.div_ceil(32);
    let mut out = vec![0u32; taps * row];
    for t in 0..taps {
        for ci in 0..cig {
            let i = t * cig + ci;
            if (b[i / 8] >> (i % 8)) & 1 == 1 {
                out[t * row + ci / 32] |= 1 << (ci % 32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_planes_pack_densely_and_unpack_to_word_rows() {
        let (taps, cig) = (5, 37);
        let bit = |t: usize, ci: usize| (t * 7 + ci * 3) % 5 < 2;
        let packed = pack_plane(taps, cig, bit);
        assert_eq!(packed.len(), (5 * 37usize).div_ceil(8));
        let rows = unpack_plane(&packed, taps, cig);
        assert_eq!(rows.len(), taps * 2);
        for t in 0..taps {
            for ci in 0..64 {
                let got = (rows[t * 2 + ci / 32] >> (ci % 32)) & 1 == 1;
                assert_eq!(got, ci < cig && bit(t, ci), "tap {t} channel {ci}");
            }
        }
    }

    #[test]
    fn codes_pack_and_unpack_at_every_width() {
        for bits in [2u32, 3, 4, 5, 8] {
            let n: usize = 37;
            let max = (1u16 << bits) - 1;
            let codes: Vec<u8> = (0..n).map(|i| (i as u16 * 7 % (max + 1)) as u8).collect();
            let packed = pack_codes(&codes, bits);
            assert_eq!(packed.len(), n.div_ceil(codes_per_byte(bits)));
            assert_eq!(unpack_codes(&packed, bits, n), codes);
        }
    }

    fn manifest(ops: &str) -> Manifest {
        serde_json::from_str(&format!(
            r#"{{"format": "wgqat-int-1", "model": "m", "input": [3, 4, 4], "mean": [0, 0, 0],
                "std": [1, 1, 1], "classes": 48, "layout": "NHWC", "ops": {ops}}}"#
        ))
        .unwrap()
    }

    /// A format-1 manifest (a chain, no inputs) reads as each op reading the one before; a
    /// damaged graph is an error naming the op.
    #[test]
    fn manifests_name_their_inputs_and_format_1_is_a_chain() {
        let mut m = manifest(r#"[{"op": "shuffle", "groups": 3}, {"op": "flatten"}]"#);
        m.check_inputs().unwrap();
        assert_eq!(m.ops[0].inputs, vec![0]);
        assert_eq!(m.ops[1].inputs, vec![1]);
        let text = serde_json::to_string(&m.ops[1]).unwrap();
        assert_eq!(text, r#"{"op":"flatten","inputs":[1]}"#);
        let add = r#"{"op": "add", "relu": true, "output_bits": null"#;
        let mut ok = manifest(&format!(
            r#"[{{"op": "flatten"}}, {add}, "inputs": [0, 0]}}]"#
        ));
        ok.check_inputs().unwrap();
        for (ops, needle) in [
            (
                format!("[{add}}}]"),
                "op 0 of the model reads 1 tensors, not 2",
            ),
            (
                format!(r#"[{add}, "inputs": [0, 1]}}]"#),
                "op 0 of the model reads edge 1, which no earlier op writes",
            ),
        ] {
            let err = manifest(&ops).check_inputs().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn weights_move_to_channels_last() {
        // (Cout 1, Cin 2, KH 1, KW 2): values c*10 + x.
        let w = [0, 1, 10, 11];
        assert_eq!(to_channels_last(&w, 1, 2, 1, 2), vec![0, 10, 1, 11]);
        // Linear from (C 2, H 1, W 2) flatten order to (H, W, C).
        assert_eq!(
            linear_to_channels_last(&w, 1, (2, 1, 2)),
            vec![0, 10, 1, 11]
        );
    }
}
