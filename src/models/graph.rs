//! A model lowered to a graph: its leaf layers in registration order (the order PyTorch
//! registers modules, which is the order micronet's `prepare()` walks), each named by its module
//! path and reading the tensors it names. Containers (sequences, residual blocks) exist only in
//! the names; a residual block becomes its body, its shortcut, an `add` of the two and the ReLU.

use super::spec::{LayerSpec, ModelSpec, Pair, Shape, check_input, leaf_params, leaf_shape};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Where a node's input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The network's input image.
    Input,
    /// The output of node `i`.
    Node(usize),
}

/// One leaf layer of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The module path: the prefix of its parameters (`conv2_x.0.residual_function.0` gives
    /// `conv2_x.0.residual_function.0.weight`), and the name of its output tensor.
    pub name: String,
    /// A leaf: never a sequence or a residual block; an adaptive average pool is lowered to the
    /// average pool it equals.
    pub layer: LayerSpec,
    /// The tensors it reads: one, or several for an `add`.
    pub inputs: Vec<Source>,
    pub in_shape: Shape,
    pub out_shape: Shape,
}

/// The lowered model.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub input: Shape,
    pub nodes: Vec<Node>,
}

impl Graph {
    /// Whether every node reads only the node before it (or the input, for the first): a plain
    /// sequence of layers, as NIN.
    pub fn is_chain(&self) -> bool {
        self.nodes.iter().enumerate().all(|(i, n)| {
            n.inputs
                == [if i == 0 {
                    Source::Input
                } else {
                    Source::Node(i - 1)
                }]
        })
    }

    /// The nodes reading each node's output, in order.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for s in &n.inputs {
                if let Source::Node(k) = s {
                    out[*k].push(i);
                }
            }
        }
        out
    }

    /// Parameters per node.
    pub fn param_counts(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| leaf_params(&n.layer, n.in_shape[0]))
            .collect()
    }

    /// The shape of a source.
    pub fn shape(&self, s: Source) -> &Shape {
        match s {
            Source::Input => &self.input,
            Source::Node(i) => &self.nodes[i].out_shape,
        }
    }
}

/// How the layers of a sequence are named when they have no name of their own.
#[derive(Clone)]
enum Prefix {
    /// The model's top level: `layers.{i}`, with `layer {i}` in errors.
    Top,
    /// Inside a named container: `{path}.{i}`.
    Path(String),
}

struct Lowering {
    nodes: Vec<Node>,
    input: Shape,
    /// Tensor names (every node's and container's path, and `input`) to their sources.
    names: HashMap<String, Source>,
}

pub(super) fn lower(spec: &ModelSpec) -> Result<Graph> {
    check_input(&spec.input)?;
    if spec.layers.is_empty() {
        return Err(Error::Invalid("the model has no layers".into()));
    }
    let mut l = Lowering {
        nodes: Vec::new(),
        input: spec.input.to_vec(),
        names: HashMap::from([("input".to_string(), Source::Input)]),
    };
    l.sequence(&spec.layers, &Prefix::Top, Source::Input)?;
    let g = Graph {
        input: l.input,
        nodes: l.nodes,
    };
    // Every output but the model's own must be read: a dead end would get no gradient.
    let readers = g.consumers();
    if let Some(k) = (0..g.nodes.len().saturating_sub(1)).find(|&k| readers[k].is_empty()) {
        return Err(Error::Invalid(format!(
            "layer {} ({}): its output is never used (the model's output is its last layer's; add it to a later layer's input, or remove it)",
            g.nodes[k].name,
            g.nodes[k].layer.kind()
        )));
    }
    Ok(g)
}

impl Lowering {
    fn shape(&self, s: Source) -> &Shape {
        match s {
            Source::Input => &self.input,
            Source::Node(i) => &self.nodes[i].out_shape,
        }
    }

    /// Lowers `layers` reading `x`; returns the sequence's output.
    fn sequence(&mut self, layers: &[LayerSpec], prefix: &Prefix, mut x: Source) -> Result<Source> {
        for (i, layer) in layers.iter().enumerate() {
            let (path, at) = match (layer.name(), prefix) {
                (Some(n), _) => (n.to_string(), format!("layer {n} ({})", layer.kind())),
                (None, Prefix::Top) => (
                    format!("layers.{i}"),
                    format!("layer {i} ({})", layer.kind()),
                ),
                (None, Prefix::Path(p)) => {
                    let path = format!("{p}.{i}");
                    let at = format!("layer {path} ({})", layer.kind());
                    (path, at)
                }
            };
            x = self.layer(layer, path, &at, x)?;
        }
        Ok(x)
    }

    fn layer(&mut self, layer: &LayerSpec, path: String, at: &str, x: Source) -> Result<Source> {
        let out = match layer {
            LayerSpec::Sequential { layers, .. } => {
                if layers.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{at}: a sequence needs at least one layer"
                    )));
                }
                self.sequence(layers, &Prefix::Path(path.clone()), x)?
            }
            LayerSpec::Residual {
                body,
                shortcut,
                relu,
                ..
            } => {
                if body.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{at}: the body needs at least one layer"
                    )));
                }
                let b =
                    self.sequence(body, &Prefix::Path(format!("{path}.residual_function")), x)?;
                let s = if shortcut.is_empty() {
                    x
                } else {
                    self.sequence(shortcut, &Prefix::Path(format!("{path}.shortcut")), x)?
                };
                let (bs, ss) = (self.shape(b).clone(), self.shape(s).clone());
                if bs != ss {
                    return Err(Error::Invalid(format!(
                        "{at}: the body gives {bs:?} but the shortcut {ss:?}; they must match to be added (give the shortcut a 1x1 conv with the body's stride and channels, and a batchnorm)"
                    )));
                }
                let add = LayerSpec::Add {
                    inputs: Vec::new(),
                    name: None,
                };
                let sum = self.push(format!("{path}.add"), add, vec![b, s], at)?;
                if *relu {
                    self.push(format!("{path}.relu"), LayerSpec::Relu, vec![sum], at)?
                } else {
                    sum
                }
            }
            LayerSpec::Add { inputs, .. } => {
                if inputs.len() < 2 {
                    return Err(Error::Invalid(format!(
                        "{at}: an add needs at least two inputs, got {}",
                        inputs.len()
                    )));
                }
                let mut sources = Vec::new();
                for name in inputs {
                    let inside = path == *name || path.starts_with(&format!("{name}."));
                    let src = match self.names.get(name) {
                        Some(s) if !inside => *s,
                        _ if inside => {
                            return Err(Error::Invalid(format!(
                                "{at}: input {name:?} is a cycle: it is this layer's own output, or that of a container holding it"
                            )));
                        }
                        _ => {
                            return Err(Error::Invalid(format!(
                                "{at}: no tensor named {name:?} before it (an add sums earlier layers' outputs, by name, or \"input\")"
                            )));
                        }
                    };
                    sources.push(src);
                }
                let first = self.shape(sources[0]).clone();
                for (name, s) in inputs.iter().zip(&sources) {
                    if *self.shape(*s) != first {
                        return Err(Error::Invalid(format!(
                            "{at}: {name:?} is {:?} but {:?} is {first:?}; added tensors must have the same shape",
                            self.shape(*s),
                            inputs[0]
                        )));
                    }
                }
                self.push(path.clone(), layer.clone(), sources, at)?
            }
            LayerSpec::AdaptiveAvgPool { .. } => {
                let out = leaf_shape(layer, self.shape(x), at)?;
                let (h, w) = (self.shape(x)[1], self.shape(x)[2]);
                let window = Pair(h / out[1], w / out[2]);
                let pool = LayerSpec::AvgPool {
                    kernel: window,
                    stride: Some(window),
                    padding: Pair(0, 0),
                };
                self.push(path.clone(), pool, vec![x], at)?
            }
            leaf => self.push(path.clone(), leaf.clone(), vec![x], at)?,
        };
        // A container's name is the name of its output too.
        self.name(path, out, at)?;
        Ok(out)
    }

    fn name(&mut self, path: String, s: Source, at: &str) -> Result<()> {
        match self.names.get(&path) {
            Some(old) if *old != s => Err(Error::Invalid(format!(
                "{at}: the name {path:?} is used twice; give each layer its own name"
            ))),
            _ => {
                self.names.insert(path, s);
                Ok(())
            }
        }
    }

    fn push(
        &mut self,
        name: String,
        layer: LayerSpec,
        inputs: Vec<Source>,
        at: &str,
    ) -> Result<Source> {
        let in_shape = self.shape(inputs[0]).clone();
        let at = if matches!(layer, LayerSpec::Add { .. } | LayerSpec::Relu) && !at.contains(&name)
        {
            format!("{at}, {name}")
        } else {
            at.to_string()
        };
        let out_shape = leaf_shape(&layer, &in_shape, &at)?;
        let i = self.nodes.len();
        self.name(name.clone(), Source::Node(i), &at)?;
        self.nodes.push(Node {
            name,
            layer,
            inputs,
            in_shape,
            out_shape,
        });
        Ok(Source::Node(i))
    }
}
