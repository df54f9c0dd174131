//! ONNX export (opset 17) of a folded network: the fake-quantized float model with the levels
//! represented exactly. Quantized weights are float initializers holding the exact levels
//! 2·fl32(k·fl32(1/n)) − 1; activation quantizers are `Mul(0.1) → Clip(0, 1) → Mul(n) →
//! Add(0.5) → Floor → Mul(fl32(1/n))`, the same f32 steps as the GPU (QuantizeLinear would round
//! half to even, where DoReFa rounds half up). BatchNorm is folded into a per-channel Mul and
//! Add. Input `input` (N, C, H, W) normalised images; output `logits` (N, classes).
//!
//! The protobuf is written by hand: the few ONNX messages needed are plain field encodings.

use super::fold::{Folded, FoldedOp, Weights};
use super::model::{conv_axis, pool_axis};
use crate::error::Result;

/// Protobuf wire encoding.
#[derive(Default)]
pub(super) struct Pb(pub(super) Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }

    fn key(&mut self, field: u32, wire: u64) {
        self.varint(((field as u64) << 3) | wire);
    }

    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn msg(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
}

pub(super) const FLOAT: i64 = 1;
pub(super) const UINT8: i64 = 2;
pub(super) const INT8: i64 = 3;
const INT64: i64 = 7;

pub(super) enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// Graph under construction.
#[derive(Default)]
pub(super) struct Graph {
    nodes: Vec<Pb>,
    inits: Vec<Pb>,
    next: usize,
}

impl Graph {
    pub(super) fn name(&mut self, base: &str) -> String {
        self.next += 1;
        format!("{base}_{}", self.next)
    }

    pub(super) fn tensor(
        &mut self,
        base: &str,
        dims: &[i64],
        data_type: i64,
        raw: Vec<u8>,
    ) -> String {
        let name = self.name(base);
        let mut t = Pb::default();
        for &d in dims {
            t.int(1, d);
        }
        t.int(2, data_type);
        t.string(8, &name);
        t.bytes(9, &raw);
        self.inits.push(t);
        name
    }

    pub(super) fn floats(&mut self, base: &str, dims: &[i64], v: &[f32]) -> String {
        self.tensor(base, dims, FLOAT, bytemuck::cast_slice(v).to_vec())
    }

    pub(super) fn scalar(&mut self, v: f32) -> String {
        self.floats("const", &[], &[v])
    }

    pub(super) fn int64s(&mut self, base: &str, v: &[i64]) -> String {
        self.tensor(
            base,
            &[v.len() as i64],
            INT64,
            bytemuck::cast_slice(v).to_vec(),
        )
    }

    pub(super) fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.name(&op.to_lowercase());
        let mut n = Pb::default();
        for i in inputs {
            n.string(1, i);
        }
        n.string(2, &out);
        n.string(3, &out);
        n.string(4, op);
        for (name, a) in attrs {
            let mut p = Pb::default();
            p.string(1, name);
            match a {
                Attr::Int(v) => {
                    p.int(3, *v);
                    p.int(20, 2);
                }
                Attr::Ints(v) => {
                    for x in v {
                        p.int(8, *x);
                    }
                    p.int(20, 7);
                }
                Attr::Float(v) => {
                    p.key(2, 5);
                    p.0.extend_from_slice(&v.to_le_bytes());
                    p.int(20, 1);
                }
            }
            n.msg(5, p);
        }
        self.nodes.push(n);
        out
    }
}

fn value_info(name: &str, dims: &[Result<i64, &str>]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        match d {
            Ok(v) => dim.int(1, *v),
            Err(p) => dim.string(2, p),
        }
        shape.msg(1, dim);
    }
    let mut tensor = Pb::default();
    tensor.int(1, FLOAT);
    tensor.msg(2, shape);
    let mut ty = Pb::default();
    ty.msg(1, tensor);
    let mut v = Pb::default();
    v.string(1, name);
    v.msg(2, ty);
    v
}

pub(super) fn ints(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// The ONNX model bytes of `f`.
pub fn export(f: &Folded) -> Result<Vec<u8>> {
    let mut g = Graph::default();
    // Per edge (the input, then each op's output): its ONNX name and per-sample (C, H, W).
    let mut names = vec!["input".to_string()];
    let mut shapes = vec![(f.input[0], f.input[1], f.input[2])];
    // (edge, bits) to the name of its quantized activations, shared by the convs reading them.
    let mut quantized: std::collections::HashMap<(usize, u32), String> = Default::default();
    for node in &f.ops {
        let op = &node.op;
        let e = node.inputs[0];
        let mut cur = names[e].clone();
        let (mut c, mut h, mut w) = shapes[e];
        match op {
            FoldedOp::Conv(fc) => {
                let mut x = cur.clone();
                if let Some(q) = fc.input_bits.and_then(|b| quantized.get(&(e, b.get()))) {
                    x = q.clone();
                } else if let Some(bits) = fc.input_bits {
                    let n = bits.levels() as f32;
                    let (tenth, zero, one, nn, half, inv) = (
                        g.scalar(0.1),
                        g.scalar(0.0),
                        g.scalar(1.0),
                        g.scalar(n),
                        g.scalar(0.5),
                        g.scalar(bits.inv_levels()),
                    );
                    let t = g.node("Mul", &[&x, &tenth], &[]);
                    let t = g.node("Clip", &[&t, &zero, &one], &[]);
                    let t = g.node("Mul", &[&t, &nn], &[]);
                    let t = g.node("Add", &[&t, &half], &[]);
                    let t = g.node("Floor", &[&t], &[]);
                    x = g.node("Mul", &[&t, &inv], &[]);
                    quantized.insert((e, bits.get()), x.clone());
                }
                let levels: Vec<f32> = match &fc.weights {
                    Weights::Float(v) => v.clone(),
                    Weights::Codes { bits, codes } => codes
                        .iter()
                        .map(|&k| 2.0 * (k as f32 * bits.inv_levels()) - 1.0)
                        .collect(),
                };
                let cig = fc.cin / fc.groups;
                let (y, channel_dims) = if fc.linear {
                    let wt = g.floats(
                        &format!("{}.weight", fc.name),
                        &[fc.cout as i64, fc.cin as i64],
                        &levels,
                    );
                    (
                        g.node("Gemm", &[&x, &wt], &[("transB", Attr::Int(1))]),
                        vec![1, fc.cout as i64],
                    )
                } else {
                    let wt = g.floats(
                        &format!("{}.weight", fc.name),
                        &ints(&[fc.cout, cig, fc.kernel.0, fc.kernel.1]),
                        &levels,
                    );
                    let attrs = [
                        (
                            "kernel_shape",
                            Attr::Ints(ints(&[fc.kernel.0, fc.kernel.1])),
                        ),
                        ("strides", Attr::Ints(ints(&[fc.stride.0, fc.stride.1]))),
                        (
                            "pads",
                            Attr::Ints(ints(&[
                                fc.padding.0,
                                fc.padding.1,
                                fc.padding.0,
                                fc.padding.1,
                            ])),
                        ),
                        (
                            "dilations",
                            Attr::Ints(ints(&[fc.dilation.0, fc.dilation.1])),
                        ),
                        ("group", Attr::Int(fc.groups as i64)),
                    ];
                    (h, w) = (
                        conv_axis(h, fc.kernel.0, fc.stride.0, fc.padding.0, fc.dilation.0),
                        conv_axis(w, fc.kernel.1, fc.stride.1, fc.padding.1, fc.dilation.1),
                    );
                    (
                        g.node("Conv", &[&x, &wt], &attrs),
                        vec![1, fc.cout as i64, 1, 1],
                    )
                };
                let a = g.floats(&format!("{}.scale", fc.name), &channel_dims, &fc.a);
                let b = g.floats(&format!("{}.bias", fc.name), &channel_dims, &fc.b);
                let t = g.node("Mul", &[&y, &a], &[]);
                cur = g.node("Add", &[&t, &b], &[]);
                if fc.relu {
                    cur = g.node("Relu", &[&cur], &[]);
                }
                c = fc.cout;
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
                let mut attrs = vec![
                    ("kernel_shape", Attr::Ints(ints(&[kernel.0, kernel.1]))),
                    ("strides", Attr::Ints(ints(&[stride.0, stride.1]))),
                    (
                        "pads",
                        Attr::Ints(ints(&[padding.0, padding.1, padding.0, padding.1])),
                    ),
                ];
                let max = matches!(op, FoldedOp::MaxPool { .. });
                if !max {
                    attrs.push(("count_include_pad", Attr::Int(1)));
                }
                cur = g.node(if max { "MaxPool" } else { "AveragePool" }, &[&cur], &attrs);
                (h, w) = (
                    pool_axis(h, kernel.0, stride.0, padding.0),
                    pool_axis(w, kernel.1, stride.1, padding.1),
                );
            }
            FoldedOp::Shuffle { groups } => {
                let (a, b) = (
                    g.int64s("shape", &ints(&[0, *groups, c / groups, h, w])),
                    g.int64s("shape", &ints(&[0, c, h, w])),
                );
                let t = g.node("Reshape", &[&cur, &a], &[]);
                let t = g.node(
                    "Transpose",
                    &[&t],
                    &[("perm", Attr::Ints(vec![0, 2, 1, 3, 4]))],
                );
                cur = g.node("Reshape", &[&t, &b], &[]);
            }
            FoldedOp::Flatten => {
                cur = g.node("Flatten", &[&cur], &[("axis", Attr::Int(1))]);
                (c, h, w) = (c * h * w, 1, 1);
            }
            FoldedOp::Add { relu } => {
                cur = g.node("Add", &[&cur, &names[node.inputs[1]]], &[]);
                if *relu {
                    cur = g.node("Relu", &[&cur], &[]);
                }
            }
        }
        names.push(cur);
        shapes.push((c, h, w));
    }
    let cur = names.last().expect("the input edge").clone();
    let (c, h, w) = *shapes.last().expect("the input edge");
    Ok(finish(g, &cur, &f.model, f.input, c * h * w))
}

/// The model bytes of graph `g` whose output tensor `cur` becomes `logits` (`classes` values per
/// image), with input `input` of per-image shape `input`.
pub(super) fn finish(
    mut g: Graph,
    cur: &str,
    model_name: &str,
    input: [usize; 3],
    classes: usize,
) -> Vec<u8> {
    let out = g.node("Identity", &[cur], &[]);
    // Name the last node's output `logits`.
    if let Some(last) = g.nodes.last_mut() {
        let mut n = Pb::default();
        n.string(1, cur);
        n.string(2, "logits");
        n.string(3, &out);
        n.string(4, "Identity");
        *last = n;
    }
    let mut graph = Pb::default();
    for n in g.nodes {
        graph.msg(1, n);
    }
    graph.string(2, model_name);
    for t in g.inits {
        graph.msg(5, t);
    }
    graph.msg(
        11,
        value_info(
            "input",
            &[
                Err("batch"),
                Ok(input[0] as i64),
                Ok(input[1] as i64),
                Ok(input[2] as i64),
            ],
        ),
    );
    graph.msg(
        12,
        value_info("logits", &[Err("batch"), Ok(classes as i64)]),
    );
    let mut opset = Pb::default();
    opset.string(1, "");
    opset.int(2, 17);
    let mut model = Pb::default();
    model.int(1, 8);
    model.string(2, "wgqat");
    model.string(3, env!("CARGO_PKG_VERSION"));
    model.msg(7, graph);
    model.msg(8, opset);
    model.0
}
