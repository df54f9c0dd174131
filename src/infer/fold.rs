//! Folding a trained network into inference form: each weighted layer with the BatchNorm and ReLU
//! after it becomes one op, `z = conv(x) · A + B` per output channel (A = γ/√(σ²+ε),
//! B = A·b + β − A·μ), with quantized weights as their integer codes. The codes come from the
//! GPU's weight quantizer, so they are bit for bit the levels training and `wgqat eval` use.
//! Both the integer model and the ONNX export are written from this.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::quant::WeightQuantizer;
use crate::models::graph::Source;
use crate::models::{LayerSpec, ModelSpec};
use crate::nn::Network;
use crate::nn::checkpoint::Data;
use crate::quant::Bits;
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
    /// The sum of two float tensors (a residual block's body and shortcut), then the ReLU.
    Add {
        relu: bool,
    },
}

/// An op and the edges it reads: edge 0 is the input image, edge k + 1 the output of op k.
#[derive(Clone, Debug, PartialEq)]
pub struct FoldedNode {
    pub op: FoldedOp,
    pub inputs: Vec<usize>,
}

/// A network in inference form: ops in an order where each reads only earlier edges.
#[derive(Clone, Debug)]
pub struct Folded {
    pub model: String,
    pub input: [usize; 3],
    pub ops: Vec<FoldedNode>,
}

impl Folded {
    /// A sequence of ops, each reading the one before.
    pub fn chain(model: &str, input: [usize; 3], ops: Vec<FoldedOp>) -> Folded {
        Folded {
            model: model.into(),
            input,
            ops: ops
                .into_iter()
                .enumerate()
                .map(|(k, op)| FoldedNode {
                    op,
                    inputs: vec![k],
                })
                .collect(),
        }
    }

    /// The ops reading each edge (edge 0 the input), in order.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.ops.len() + 1];
        for (k, n) in self.ops.iter().enumerate() {
            for &e in &n.inputs {
                out[e].push(k);
            }
        }
        out
    }
}

fn unsupported(name: &str, l: &LayerSpec, why: &str) -> Error {
    Error::Invalid(format!("cannot export layer {name} ({}): {why}", l.kind()))
}

/// Folds `net` (with its trained weights on the GPU). A conv or Linear absorbs the BatchNorm that
/// alone reads it and the ReLU that alone reads that; an add absorbs the ReLU that alone reads
/// it (a residual block's). The folded graph keeps the model's branches.
pub fn fold(gpu: &Gpu, net: &Network) -> Result<Folded> {
    match net.quant.scheme {
        crate::quant::Scheme::Dorefa => {}
        crate::quant::Scheme::Iao(_) => {
            return Err(Error::Invalid(
                "an IAO model exports through `infer::iao::int_model` (wgqat export does)".into(),
            ));
        }
        crate::quant::Scheme::Wbwtab(_) => {
            return Err(Error::Invalid(
                "a wbwtab model has no ONNX form (no ONNX operator computes its XNOR-popcount convs): export it with --format int (the XNOR integer model) and run it with `wgqat infer`".into(),
            ));
        }
    }
    let spec: &ModelSpec = &net.spec;
    let graph = &net.graph;
    let nodes = &graph.nodes;
    let readers = graph.consumers();
    // The node that alone reads node i, when it is of the kind `want`.
    let sole = |i: usize, want: fn(&LayerSpec) -> bool| match readers[i].as_slice() {
        [j] if want(&nodes[*j].layer) => Some(*j),
        _ => None,
    };
    let is_bn = |l: &LayerSpec| matches!(l, LayerSpec::BatchNorm { .. });
    let is_relu = |l: &LayerSpec| matches!(l, LayerSpec::Relu);
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
    let mut ops: Vec<FoldedNode> = Vec::new();
    // Per graph node: the folded edge holding its output (None: absorbed into a later op's).
    let mut edge_of: Vec<Option<usize>> = vec![None; nodes.len()];
    let mut absorbed = vec![false; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        if absorbed[i] {
            continue;
        }
        let layer = &node.layer;
        let name = node.name.as_str();
        let inputs = node
            .inputs
            .iter()
            .map(|s| match s {
                Source::Input => Ok(0),
                Source::Node(k) => edge_of[*k].ok_or_else(|| {
                    unsupported(name, layer, "it reads a value folded into another layer")
                }),
            })
            .collect::<Result<Vec<usize>>>()?;
        // The last node this op stands for.
        let mut last = i;
        let op = match layer {
            LayerSpec::Conv { out, bias, .. } | LayerSpec::Linear { out, bias, .. } => {
                let linear = matches!(layer, LayerSpec::Linear { .. });
                let crate::models::spec::ConvWindow {
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                } = layer.conv_window().expect("a conv or Linear");
                let cin = node.in_shape[0];
                let w = get(format!("{name}.weight"))?;
                let conv_bias = if *bias {
                    get(format!("{name}.bias"))?
                } else {
                    vec![0.0; *out]
                };
                let is_q = quantized.iter().any(|q| q == name);
                let weights = if is_q {
                    let bits = net.quant.w_bits;
                    if bits.get() > 8 {
                        return Err(unsupported(
                            name,
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
                            name,
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
                if let Some(j) = sole(i, is_bn) {
                    let LayerSpec::BatchNorm { eps, .. } = &nodes[j].layer else {
                        unreachable!("sole() checked the kind")
                    };
                    let bn = &nodes[j].name;
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
                    absorbed[j] = true;
                    last = j;
                }
                let relu = sole(last, is_relu);
                if let Some(j) = relu {
                    absorbed[j] = true;
                    last = j;
                }
                FoldedOp::Conv(FoldedConv {
                    name: name.to_string(),
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
                    relu: relu.is_some(),
                })
            }
            LayerSpec::MaxPool {
                kernel,
                stride,
                padding,
            } => FoldedOp::MaxPool {
                kernel: kernel.t(),
                stride: stride.unwrap_or(*kernel).t(),
                padding: padding.t(),
            },
            LayerSpec::AvgPool {
                kernel,
                stride,
                padding,
            } => FoldedOp::AvgPool {
                kernel: kernel.t(),
                stride: stride.unwrap_or(*kernel).t(),
                padding: padding.t(),
            },
            LayerSpec::Shuffle { groups } => FoldedOp::Shuffle { groups: *groups },
            LayerSpec::Flatten => FoldedOp::Flatten,
            LayerSpec::Add { .. } => {
                if inputs.len() != 2 {
                    return Err(unsupported(
                        name,
                        layer,
                        "inference export adds exactly two tensors",
                    ));
                }
                let relu = sole(i, is_relu);
                if let Some(j) = relu {
                    absorbed[j] = true;
                    last = j;
                }
                FoldedOp::Add {
                    relu: relu.is_some(),
                }
            }
            LayerSpec::ConvTranspose { .. } => {
                return Err(unsupported(
                    name,
                    layer,
                    "inference export supports conv and linear layers",
                ));
            }
            LayerSpec::BatchNorm { .. } | LayerSpec::Relu => {
                return Err(unsupported(
                    name,
                    layer,
                    "a BatchNorm or ReLU must be the only reader of a conv or linear layer (a ReLU: or of an add) to be folded",
                ));
            }
            LayerSpec::AdaptiveAvgPool { .. }
            | LayerSpec::Sequential { .. }
            | LayerSpec::Residual { .. } => {
                return Err(unsupported(name, layer, "not a leaf layer"));
            }
        };
        ops.push(FoldedNode { op, inputs });
        edge_of[last] = Some(ops.len());
    }
    Ok(Folded {
        model: spec.name.clone(),
        input: spec.input,
        ops,
    })
}
