//! ONNX export of an IAO model in the QDQ form: every IAO quantizer of the network becomes
//! `QuantizeLinear → DequantizeLinear` with its scale and zero point (int8 for symmetric codes,
//! uint8 for asymmetric ones), every quantized weight an int8/uint8 initializer of its codes
//! dequantized per output channel (`axis` 0) or per tensor, so that runtimes that fuse QDQ pairs
//! (onnxruntime, TensorRT) run the convs in integers, and others run the same fake-quantized
//! floats as `wgqat eval`. BatchNorms stay `BatchNormalization`; a folded conv (IAO `bn_fuse`)
//! exports its weight and bias folded with the running statistics, as evaluation uses them.
//!
//! micronet's zero point has the opposite sign of ONNX's (x ≈ s·(q + zp)): ONNX's is −zp.
//! QuantizeLinear rounds x/s half to even where IAO rounds half away from zero, so a value
//! exactly half-way between two codes can land one code apart (see `tools/check_onnx.py`).

use super::onnx::{Attr, FLOAT, Graph, INT8, UINT8, finish, ints};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::{LayerSpec, Source};
use crate::nn::Network;
use crate::nn::checkpoint::Data;
use crate::quant::Scheme;
use crate::quant::iao::{QType, Quantizer};
use std::collections::HashMap;

/// A tensor's shape and values.
pub(super) type Shaped = (Vec<usize>, Vec<f32>);
/// The state dict's F32 tensors by name.
pub(super) type State = HashMap<String, Shaped>;

/// The ONNX bytes of IAO network `net` (input: normalised images `(N, C, H, W)`; output
/// `logits`).
pub fn export(gpu: &Gpu, net: &Network) -> Result<Vec<u8>> {
    if !matches!(net.quant.scheme, Scheme::Iao(_)) {
        return Err(Error::Invalid(
            "the QDQ export is for IAO models; DoReFa models export with `--format onnx` as before"
                .into(),
        ));
    }
    let state: State = net
        .state_dict(gpu)?
        .into_iter()
        .filter_map(|t| match t.data {
            Data::F32(v) => Some((t.name, (t.shape, v))),
            _ => None,
        })
        .collect();
    let mut g = Graph::default();
    let graph = &net.graph;
    let consumers = graph.consumers();
    // A folded conv's BatchNorm eps (the BatchNorm reading it).
    let fold_eps = |i: usize| match consumers[i][..] {
        [j] => match graph.nodes[j].layer {
            LayerSpec::BatchNorm { eps, .. } => eps,
            _ => 1e-5,
        },
        _ => 1e-5,
    };
    let mut names: Vec<String> = Vec::with_capacity(graph.nodes.len());
    let edge = |names: &Vec<String>, s: Source| match s {
        Source::Input => "input".to_string(),
        Source::Node(k) => names[k].clone(),
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        let name = &node.name;
        let x = edge(&names, node.inputs[0]);
        let act = format!("{name}.activation_quantizer");
        let has_act = state.contains_key(&format!("{act}.scale"));
        let out = match &node.layer {
            LayerSpec::Conv {
                kernel,
                stride,
                padding,
                dilation,
                groups,
                ..
            }
            | LayerSpec::ConvTranspose {
                kernel,
                stride,
                padding,
                dilation,
                groups,
                ..
            } => {
                let xq = if has_act {
                    qdq(&mut g, &state, &x, &act)?
                } else {
                    x
                };
                let (w, b) = weight_and_bias(&state, name, fold_eps(i))?;
                let wq = weight(&mut g, &state, name, &w)?;
                let bias = g.floats(&format!("{name}.bias"), &[b.len() as i64], &b);
                let mut attrs = vec![
                    ("kernel_shape", Attr::Ints(ints(&[kernel.0, kernel.1]))),
                    ("strides", Attr::Ints(ints(&[stride.0, stride.1]))),
                    (
                        "pads",
                        Attr::Ints(ints(&[padding.0, padding.1, padding.0, padding.1])),
                    ),
                    ("dilations", Attr::Ints(ints(&[dilation.0, dilation.1]))),
                    ("group", Attr::Int(*groups as i64)),
                ];
                if let LayerSpec::ConvTranspose { output_padding, .. } = &node.layer {
                    attrs.push((
                        "output_padding",
                        Attr::Ints(ints(&[output_padding.0, output_padding.1])),
                    ));
                    g.node("ConvTranspose", &[&xq, &wq, &bias], &attrs)
                } else {
                    g.node("Conv", &[&xq, &wq, &bias], &attrs)
                }
            }
            LayerSpec::Linear { .. } => {
                let xq = if has_act {
                    qdq(&mut g, &state, &x, &act)?
                } else {
                    x
                };
                let (w, b) = weight_and_bias(&state, name, fold_eps(i))?;
                let wq = weight(&mut g, &state, name, &w)?;
                let bias = g.floats(&format!("{name}.bias"), &[b.len() as i64], &b);
                g.node("Gemm", &[&xq, &wq, &bias], &[("transB", Attr::Int(1))])
            }
            // Folded into the conv before it (IAO bn_fuse): its keys are the conv's.
            LayerSpec::BatchNorm { .. } if !state.contains_key(&format!("{name}.weight")) => x,
            LayerSpec::BatchNorm { eps, .. } => bn(&mut g, &state, name, &x, *eps)?,
            LayerSpec::Relu => g.node("Relu", &[&x], &[]),
            LayerSpec::MaxPool {
                kernel,
                stride,
                padding,
            }
            | LayerSpec::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                let xq = if has_act {
                    qdq(&mut g, &state, &x, &act)?
                } else {
                    x
                };
                let stride = stride.unwrap_or(*kernel);
                let mut attrs = vec![
                    ("kernel_shape", Attr::Ints(ints(&[kernel.0, kernel.1]))),
                    ("strides", Attr::Ints(ints(&[stride.0, stride.1]))),
                    (
                        "pads",
                        Attr::Ints(ints(&[padding.0, padding.1, padding.0, padding.1])),
                    ),
                ];
                if matches!(node.layer, LayerSpec::MaxPool { .. }) {
                    g.node("MaxPool", &[&xq], &attrs)
                } else {
                    attrs.push(("count_include_pad", Attr::Int(1)));
                    g.node("AveragePool", &[&xq], &attrs)
                }
            }
            LayerSpec::Shuffle { groups } => {
                let [c, h, w] = node.in_shape[..] else {
                    return Err(Error::Invalid(format!(
                        "layer {name}: a shuffle needs (C, H, W)"
                    )));
                };
                let (a, b) = (
                    g.int64s("shape", &ints(&[0, *groups, c / groups, h, w])),
                    g.int64s("shape", &ints(&[0, c, h, w])),
                );
                let t = g.node("Reshape", &[&x, &a], &[]);
                let t = g.node(
                    "Transpose",
                    &[&t],
                    &[("perm", Attr::Ints(vec![0, 2, 1, 3, 4]))],
                );
                g.node("Reshape", &[&t, &b], &[])
            }
            LayerSpec::Flatten => g.node("Flatten", &[&x], &[("axis", Attr::Int(1))]),
            LayerSpec::Add { .. } => {
                // QuantAdd: both summands through the one shared quantizer.
                let y = edge(&names, node.inputs[1]);
                let (xq, yq) = if has_act {
                    (
                        qdq(&mut g, &state, &x, &act)?,
                        qdq(&mut g, &state, &y, &act)?,
                    )
                } else {
                    (x, y)
                };
                g.node("Add", &[&xq, &yq], &[])
            }
            other => {
                return Err(Error::Invalid(format!(
                    "layer {name}: {} cannot be exported to ONNX",
                    other.kind()
                )));
            }
        };
        names.push(out);
    }
    let last = graph
        .nodes
        .last()
        .ok_or_else(|| Error::Invalid("an empty model".into()))?;
    let classes: usize = last.out_shape.iter().product();
    let input = [graph.input[0], graph.input[1], graph.input[2]];
    Ok(finish(
        g,
        names.last().expect("a layer"),
        &net.spec.name,
        input,
        classes,
    ))
}

fn bn(g: &mut Graph, state: &State, name: &str, x: &str, eps: f32) -> Result<String> {
    let mut inputs = vec![x.to_string()];
    for s in ["weight", "bias", "running_mean", "running_var"] {
        let key = format!("{name}.{s}");
        let (shape, v) = state
            .get(&key)
            .ok_or_else(|| Error::Invalid(format!("the model has no tensor {key} to export")))?;
        inputs.push(g.floats(&key, &ints(shape), v));
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    Ok(g.node(
        "BatchNormalization",
        &refs,
        &[("epsilon", Attr::Float(eps))],
    ))
}

/// A layer's weight and bias as evaluation uses them: a folded conv's with the running
/// statistics (W·k and β + (b − μ)·k, k = γ/√(σ²+ε), in the GPU's f32 steps), else as stored
/// (no bias: zeros).
pub(super) fn weight_and_bias(state: &State, name: &str, eps: f32) -> Result<(Shaped, Vec<f32>)> {
    let get = |s: &str| {
        state
            .get(&format!("{name}.{s}"))
            .ok_or_else(|| Error::Invalid(format!("the model has no tensor {name}.{s} to export")))
    };
    let (shape, w) = get("weight")?.clone();
    let cout = shape[0];
    let bias = state
        .get(&format!("{name}.bias"))
        .map_or(vec![0.0; cout], |t| t.1.clone());
    let Some((_, gamma)) = state.get(&format!("{name}.gamma")) else {
        return Ok(((shape, w), bias));
    };
    let (beta, mean, var) = (
        &get("beta")?.1,
        &get("running_mean")?.1,
        &get("running_var")?.1,
    );
    let per = w.len() / cout;
    let k: Vec<f32> = (0..cout)
        .map(|c| gamma[c] / (var[c] + eps).sqrt())
        .collect();
    let wf = w.iter().enumerate().map(|(i, &v)| v * k[i / per]).collect();
    let bf = (0..cout)
        .map(|c| beta[c] + (bias[c] - mean[c]) * k[c])
        .collect();
    Ok(((shape, wf), bf))
}

/// The weight's codes under its quantizer, dequantized per output channel or per tensor.
fn weight(g: &mut Graph, state: &State, name: &str, (shape, w): &Shaped) -> Result<String> {
    let prefix = format!("{name}.weight_quantizer");
    let Some(q) = quantizer(state, &prefix)? else {
        return Ok(g.floats(&format!("{name}.weight"), &ints(shape), w));
    };
    let rows = q.len();
    let per = w.len() / rows.max(1);
    let codes: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, &v)| q[if rows == 1 { 0 } else { i / per }].code(v))
        .collect();
    let (dtype, bytes) = code_bytes(&codes, q[0].range.0 < 0.0);
    let wq = g.tensor(&format!("{name}.weight_codes"), &ints(shape), dtype, bytes);
    let scales: Vec<f32> = q.iter().map(|r| r.scale).collect();
    let zps: Vec<f32> = q.iter().map(|r| -r.zero_point).collect();
    check_zero_points(&prefix, &zps, dtype == INT8)?;
    let zp_bytes = code_bytes(&zps, dtype == INT8).1;
    let per_axis = rows > 1;
    let dims: Vec<i64> = if per_axis { vec![rows as i64] } else { vec![] };
    let s = g.tensor(
        &format!("{name}.weight_scale"),
        &dims,
        FLOAT,
        bytemuck::cast_slice(&scales).to_vec(),
    );
    let z = g.tensor(&format!("{name}.weight_zero_point"), &dims, dtype, zp_bytes);
    let attrs: Vec<(&str, Attr)> = if per_axis {
        vec![("axis", Attr::Int(0))]
    } else {
        vec![]
    };
    Ok(g.node("DequantizeLinear", &[&wq, &s, &z], &attrs))
}

/// `QuantizeLinear → DequantizeLinear` of `x` with the per-tensor quantizer at `prefix`.
fn qdq(g: &mut Graph, state: &State, x: &str, prefix: &str) -> Result<String> {
    let q = quantizer(state, prefix)?
        .ok_or_else(|| Error::Invalid(format!("the model has no quantizer {prefix} to export")))?;
    let q = q[0];
    let signed = q.range.0 < 0.0;
    check_zero_points(prefix, &[-q.zero_point], signed)?;
    let (dtype, zp) = code_bytes(&[-q.zero_point], signed);
    let s = g.tensor(
        &format!("{prefix}.scale"),
        &[],
        FLOAT,
        q.scale.to_le_bytes().to_vec(),
    );
    let z = g.tensor(&format!("{prefix}.zero_point"), &[], dtype, zp);
    let t = g.node("QuantizeLinear", &[x, &s, &z], &[]);
    Ok(g.node("DequantizeLinear", &[&t, &s, &z], &[]))
}

/// The quantizer rows stored under `prefix` (None: no such quantizer).
pub(super) fn quantizer(state: &State, prefix: &str) -> Result<Option<Vec<Quantizer>>> {
    let Some((_, scale)) = state.get(&format!("{prefix}.scale")) else {
        return Ok(None);
    };
    let col = |s: &str| {
        state
            .get(&format!("{prefix}.{s}"))
            .map(|t| t.1.clone())
            .ok_or_else(|| {
                Error::Invalid(format!("the model has no tensor {prefix}.{s} to export"))
            })
    };
    let (zp, lo, hi, qmin, qmax) = (
        col("zero_point")?,
        col("observer.min_val")?,
        col("observer.max_val")?,
        col("quant_min_val")?[0],
        col("quant_max_val")?[0],
    );
    let q_type = if qmin < 0.0 {
        QType::Symmetric
    } else {
        QType::Asymmetric
    };
    Ok(Some(
        (0..scale.len())
            .map(|r| Quantizer {
                scale: scale[r],
                zero_point: zp[r],
                min: lo[r],
                max: hi[r],
                range: (qmin, qmax),
                q_type,
            })
            .collect(),
    ))
}

/// ONNX's zero points (−zp) must be codes of the type: an asymmetric range that excludes 0
/// (micronet does not nudge it to include 0) gives one that is not.
fn check_zero_points(prefix: &str, z: &[f32], signed: bool) -> Result<()> {
    let (lo, hi) = if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    match z.iter().find(|&&v| !(lo..=hi).contains(&v)) {
        Some(v) => Err(Error::Invalid(format!(
            "{prefix}: ONNX zero point {v} is outside {}'s range (the observed range excludes 0), so QuantizeLinear cannot express this quantizer",
            if signed { "int8" } else { "uint8" }
        ))),
        None => Ok(()),
    }
}

/// Integer values as int8 (signed) or uint8 bytes; the ONNX data type.
fn code_bytes(v: &[f32], signed: bool) -> (i64, Vec<u8>) {
    if signed {
        (INT8, v.iter().map(|&c| (c as i8) as u8).collect())
    } else {
        (UINT8, v.iter().map(|&c| c as u8).collect())
    }
}
