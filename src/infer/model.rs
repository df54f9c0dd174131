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
//! [`super::fold`]); for a float layer acc = Σ x·w. Activations are channels-last.

use super::fold::{Folded, FoldedOp, Weights};
use crate::error::{Error, Result};
use crate::kernels::quant::Bits;
use crate::nn::checkpoint::{self, Data, Named};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "wgqat-int-1";

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
    },
    /// Float activations to codes: floor(clamp(0.1 x, 0, 1) · n + 0.5).
    Quantize {
        bits: u32,
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
    pub ops: Vec<IntOp>,
}

/// An integer model in memory: the manifest and its tensors.
#[derive(Clone, Debug)]
pub struct IntModel {
    pub manifest: Manifest,
    pub tensors: HashMap<String, Named>,
}

fn pair(p: (usize, usize)) -> [usize; 2] {
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
fn pad_rows<T: Copy>(v: &[T], cig: usize, row: usize, fill: T) -> Vec<T> {
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
fn to_channels_last<T: Copy>(w: &[T], cout: usize, cig: usize, kh: usize, kw: usize) -> Vec<T> {
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
fn linear_to_channels_last<T: Copy>(
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

impl IntModel {
    /// The integer model of a folded network.
    pub fn from_folded(f: &Folded) -> Result<IntModel> {
        let mut ops = Vec::new();
        let mut tensors = HashMap::new();
        // Per-sample (C, H, W) of the current edge and whether it carries codes (their bits).
        let mut shape = (f.input[0], f.input[1], f.input[2]);
        let mut flattened_from: Option<(usize, usize, usize)> = None;
        let mut codes: Option<u32> = None;
        for (k, op) in f.ops.iter().enumerate() {
            match op {
                FoldedOp::Conv(c) => {
                    let want = c.input_bits.map(Bits::get);
                    match (codes, want) {
                        (None, Some(b)) => ops.push(IntOp::Quantize { bits: b }),
                        (Some(a), Some(b)) if a == b => {}
                        (Some(_), _) => {
                            return Err(Error::Invalid(format!(
                                "layer {}: unexpected input codes",
                                c.name
                            )));
                        }
                        (None, None) => {}
                    }
                    let cig = c.cin / c.groups;
                    let flat_channels = flattened_from.map_or(4, |f| f.0);
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
                            if let (true, Some(from)) = (c.linear, flattened_from) {
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
                            if let (true, Some(from)) = (c.linear, flattened_from) {
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
                    // Codes out when the next weighted op takes codes and only max-pools,
                    // shuffles and flattens (exact on codes) come between.
                    let output_bits = f.ops[k + 1..]
                        .iter()
                        .find(|o| {
                            !matches!(
                                o,
                                FoldedOp::MaxPool { .. }
                                    | FoldedOp::Shuffle { .. }
                                    | FoldedOp::Flatten
                            )
                        })
                        .and_then(|o| match o {
                            FoldedOp::Conv(next) => next.input_bits.map(Bits::get),
                            _ => None,
                        });
                    let (oh, ow) = if c.linear {
                        (1, 1)
                    } else {
                        let axis = |n: usize, k: usize, s: usize, p: usize, d: usize| {
                            (n + 2 * p - d * (k - 1) - 1) / s + 1
                        };
                        (
                            axis(shape.1, kh, c.stride.0, c.padding.0, c.dilation.0),
                            axis(shape.2, kw, c.stride.1, c.padding.1, c.dilation.1),
                        )
                    };
                    ops.push(IntOp::Conv {
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
                    });
                    shape = (c.cout, oh, ow);
                    flattened_from = None;
                    codes = output_bits;
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
                    if matches!(op, FoldedOp::AvgPool { .. }) && codes.is_some() {
                        return Err(Error::Invalid(
                            "average pooling of quantized codes is not supported".into(),
                        ));
                    }
                    let axis = |n: usize, k: usize, s: usize, p: usize| (n + 2 * p - k) / s + 1;
                    shape = (
                        shape.0,
                        axis(shape.1, kernel.0, stride.0, padding.0),
                        axis(shape.2, kernel.1, stride.1, padding.1),
                    );
                    let (kernel, stride, padding) = (pair(*kernel), pair(*stride), pair(*padding));
                    ops.push(if matches!(op, FoldedOp::MaxPool { .. }) {
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
                    });
                }
                FoldedOp::Shuffle { groups } => ops.push(IntOp::Shuffle { groups: *groups }),
                FoldedOp::Flatten => {
                    flattened_from = Some(shape);
                    shape = (shape.0 * shape.1 * shape.2, 1, 1);
                    ops.push(IntOp::Flatten);
                }
            }
        }
        if codes.is_some() {
            return Err(Error::Invalid("the model's output must be float".into()));
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            model: f.model.clone(),
            input: f.input,
            mean: crate::data::MEAN,
            std: crate::data::STD,
            classes: shape.0 * shape.1 * shape.2,
            class_names: if shape.0 * shape.1 * shape.2 == crate::data::CLASSES {
                crate::data::CLASS_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            } else {
                Vec::new()
            },
            layout: "NHWC".into(),
            ops,
        };
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
        let manifest: Manifest = serde_json::from_str(text)
            .map_err(|e| Error::file(path, format!("unreadable manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(Error::file(
                path,
                format!("format {:?}, this wgqat reads {FORMAT:?}", manifest.format),
            ));
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
