//! Folding a trained network into inference form: each weighted layer with the BatchNorm and ReLU
//! after it becomes one op, `z = conv(x) · A + B` per output channel (A = γ/√(σ²+ε),
//! B = A·b + β − A·μ), with quantized weights as their integer codes. The codes come from the
//! GPU's weight quantizer, so they are bit for bit the levels training and `wgqat eval` use.
//! Both the integer model and the ONNX export are written from this.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::quant::{Bits, WeightQuantizer};
use crate::models::{LayerSpec, ModelSpec};
use crate::nn::Network;
use crate::nn::checkpoint::Data;
use std::collections::HashMap;

/// Weights of a folded layer, in the checkpoint's layout `(Cout, Cin/g, KH, KW)` (Linear:
/// `(out, in)`).
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    Float(Vec<f32>),
    /// Codes k in 0..=n (level 2k/n − 1) of `bits`-bit weights.
    Codes {
        bits: Bits,
        codes: Vec<u8>,
    },
}

/// A weighted layer folded with its BatchNorm and ReLU.
#[derive(Clone, Debug, PartialEq)]
pub struct FoldedConv {
    pub name: String,
    pub cin: usize,
    pub cout: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
    /// A Linear layer (1×1 on a 1×1 input; its input is flattened).
    pub linear: bool,
    pub weights: Weights,
    /// Bits of the input activation quantizer (None: float input, the first layer).
    pub input_bits: Option<Bits>,
    /// Per output channel: z = conv(x̂, Ŵ) · a + b (levels as values, not codes).
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub relu: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FoldedOp {
    Conv(FoldedConv),
    MaxPool {
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    },
    AvgPool {
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    },
    Shuffle {
        groups: usize,
    },
    Flatten,
}

/// A network in inference form.
#[derive(Clone, Debug)]
pub struct Folded {
    pub model: String,
    pub input: [usize; 3],
    pub ops: Vec<FoldedOp>,
}

fn unsupported(i: usize, l: &LayerSpec, why: &str) -> Error {
    Error::Invalid(format!("cannot export layer {i} ({}): {why}", l.kind()))
}

/// Folds `net` (with its trained weights on the GPU).
pub fn fold(gpu: &Gpu, net: &Network) -> Result<Folded> {
    let spec: &ModelSpec = &net.spec;
    let graph = &net.graph;
    if !graph.is_chain() {
        return Err(Error::Invalid(format!(
            "cannot export {}: integer export takes a sequence of layers, and this model branches (a residual add); train and evaluate it with fake quantization",
            spec.name
        )));
    }
    let shapes = spec.shapes()?;
    let layers: Vec<&LayerSpec> = graph.nodes.iter().map(|n| &n.layer).collect();
    let layer_name = |i: usize| graph.nodes[i].name.clone();
    let state: HashMap<String, Vec<f32>> = net
        .state_dict(gpu)?
        .into_iter()
        .filter_map(|t| match t.data {
            Data::F32(v) => Some((t.name, v)),
            _ => None,
        })
        .collect();
    let get = |k: String| {
        state
            .get(&k)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("the model has no tensor {k}")))
    };
    let quantized: Vec<String> = net
        .quantized_layers()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut ops = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let layer = layers[i];
        match layer {
            LayerSpec::Conv { out, bias, .. } | LayerSpec::Linear { out, bias, .. } => {
                let linear = matches!(layer, LayerSpec::Linear { .. });
                let (kernel, stride, padding, dilation, groups) = match layer {
                    LayerSpec::Conv {
                        kernel,
                        stride,
                        padding,
                        dilation,
                        groups,
                        ..
                    } => (kernel.t(), stride.t(), padding.t(), dilation.t(), *groups),
                    _ => ((1, 1), (1, 1), (0, 0), (1, 1), 1),
                };
                let name = layer_name(i);
                let cin = shapes[i][0];
                let w = get(format!("{name}.weight"))?;
                let conv_bias = if *bias {
                    get(format!("{name}.bias"))?
                } else {
                    vec![0.0; *out]
                };
                let is_q = quantized.contains(&name);
                let weights = if is_q {
                    let bits = net.quant.w_bits;
                    if bits.get() > 8 {
                        return Err(unsupported(
                            i,
                            layer,
                            "integer export supports weights of up to 8 bits",
                        ));
                    }
                    let shape = vec![w.len()];
                    let wq = WeightQuantizer::new(gpu, bits, &shape)?;
                    let wt = gpu.upload_f32("weights to export", &shape, &w)?;
                    let codes = gpu.empty("weight codes", &shape, bits.code_dtype())?;
                    let words: Vec<Vec<u32>> =
                        gpu.run_and_read("weight codes", &wq.codes(gpu, &wt, &codes)?, &[&codes])?;
                    let codes: Vec<u8> = (0..w.len())
                        .map(|j| ((words[0][j / 4] >> (8 * (j % 4))) & 0xff) as u8)
                        .collect();
                    Weights::Codes { bits, codes }
                } else {
                    Weights::Float(w)
                };
                let input_bits = if is_q {
                    let a = net.quant.a_bits;
                    if a.get() > 8 {
                        return Err(unsupported(
                            i,
                            layer,
                            "integer export supports activations of up to 8 bits",
                        ));
                    }
                    Some(a)
                } else {
                    None
                };
                // BatchNorm (eval: running statistics) and ReLU after it fold into A and B.
                let (mut a, mut b) = (
                    vec![1.0f64; *out],
                    conv_bias.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                );
                let mut next = i + 1;
                if let Some(LayerSpec::BatchNorm { eps, .. }) = layers.get(next) {
                    let bn = layer_name(next);
                    let (g, be, rm, rv) = (
                        get(format!("{bn}.weight"))?,
                        get(format!("{bn}.bias"))?,
                        get(format!("{bn}.running_mean"))?,
                        get(format!("{bn}.running_var"))?,
                    );
                    for c in 0..*out {
                        let ac = g[c] as f64 / (rv[c] as f64 + *eps as f64).sqrt();
                        b[c] = ac * b[c] + be[c] as f64 - ac * rm[c] as f64;
                        a[c] = ac;
                    }
                    next += 1;
                }
                let relu = matches!(layers.get(next), Some(LayerSpec::Relu));
                if relu {
                    next += 1;
                }
                ops.push(FoldedOp::Conv(FoldedConv {
                    name,
                    cin,
                    cout: *out,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    linear,
                    weights,
                    input_bits,
                    a: a.iter().map(|&v| v as f32).collect(),
                    b: b.iter().map(|&v| v as f32).collect(),
                    relu,
                }));
                i = next;
                continue;
            }
            LayerSpec::MaxPool {
                kernel,
                stride,
                padding,
            } => ops.push(FoldedOp::MaxPool {
                kernel: kernel.t(),
                stride: stride.unwrap_or(*kernel).t(),
                padding: padding.t(),
            }),
            LayerSpec::AvgPool {
                kernel,
                stride,
                padding,
            } => ops.push(FoldedOp::AvgPool {
                kernel: kernel.t(),
                stride: stride.unwrap_or(*kernel).t(),
                padding: padding.t(),
            }),
            LayerSpec::Shuffle { groups } => ops.push(FoldedOp::Shuffle { groups: *groups }),
            LayerSpec::Flatten => ops.push(FoldedOp::Flatten),
            LayerSpec::ConvTranspose { .. } => {
                return Err(unsupported(
                    i,
                    layer,
                    "inference export supports conv and linear layers",
                ));
            }
            LayerSpec::BatchNorm { .. } | LayerSpec::Relu => {
                return Err(unsupported(
                    i,
                    layer,
                    "a BatchNorm or ReLU must follow a conv or linear layer to be folded",
                ));
            }
            LayerSpec::Add { .. }
            | LayerSpec::AdaptiveAvgPool { .. }
            | LayerSpec::Sequential { .. }
            | LayerSpec::Residual { .. } => {
                return Err(unsupported(i, layer, "not a layer of a chain"));
            }
        }
        i += 1;
    }
    Ok(Folded {
        model: spec.name.clone(),
        input: spec.input,
        ops,
    })
}
