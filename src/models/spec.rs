//! The model description: a list of layers in a small JSON vocabulary, with shape inference and
//! parameter counts. The built-in `nin` and `nin_gc` are written in the same vocabulary.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// A size per axis (height, width); JSON accepts `3` or `[3, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PairRepr", into = "PairRepr")]
pub struct Pair(pub usize, pub usize);

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(untagged)]
enum PairRepr {
    One(usize),
    Two([usize; 2]),
}

impl From<PairRepr> for Pair {
    fn from(r: PairRepr) -> Pair {
        match r {
            PairRepr::One(v) => Pair(v, v),
            PairRepr::Two([a, b]) => Pair(a, b),
        }
    }
}

impl From<Pair> for PairRepr {
    fn from(p: Pair) -> PairRepr {
        if p.0 == p.1 {
            PairRepr::One(p.0)
        } else {
            PairRepr::Two([p.0, p.1])
        }
    }
}

impl Pair {
    pub fn t(self) -> (usize, usize) {
        (self.0, self.1)
    }
}

fn one() -> Pair {
    Pair(1, 1)
}
fn zero() -> Pair {
    Pair(0, 0)
}
fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn bn_eps() -> f32 {
    1e-5
}
fn bn_momentum() -> f32 {
    0.1
}

/// The window of a conv (or of a Linear seen as a 1×1 conv).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvWindow {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

/// One layer. `name` is the prefix of its parameters in checkpoints (e.g. `model.4.conv` gives
/// `model.4.conv.weight`); layers without one are named `layers.{index}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    Conv {
        out: usize,
        kernel: Pair,
        #[serde(default = "one")]
        stride: Pair,
        #[serde(default = "zero")]
        padding: Pair,
        #[serde(default = "one")]
        dilation: Pair,
        #[serde(default = "one_usize")]
        groups: usize,
        #[serde(default = "yes")]
        bias: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    ConvTranspose {
        out: usize,
        kernel: Pair,
        #[serde(default = "one")]
        stride: Pair,
        #[serde(default = "zero")]
        padding: Pair,
        #[serde(default = "zero")]
        output_padding: Pair,
        #[serde(default = "one")]
        dilation: Pair,
        #[serde(default = "one_usize")]
        groups: usize,
        #[serde(default = "yes")]
        bias: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    Linear {
        out: usize,
        #[serde(default = "yes")]
        bias: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    #[serde(rename = "batchnorm")]
    BatchNorm {
        #[serde(default = "bn_eps")]
        eps: f32,
        #[serde(default = "bn_momentum")]
        momentum: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    Relu,
    #[serde(rename = "maxpool")]
    MaxPool {
        kernel: Pair,
        #[serde(default)]
        stride: Option<Pair>,
        #[serde(default = "zero")]
        padding: Pair,
    },
    #[serde(rename = "avgpool")]
    AvgPool {
        kernel: Pair,
        #[serde(default)]
        stride: Option<Pair>,
        #[serde(default = "zero")]
        padding: Pair,
    },
    /// Adaptive average pooling to `output` (micronet's ResNets pool to 1×1): an average pool
    /// whose window tiles the input exactly.
    #[serde(rename = "adaptive_avgpool")]
    AdaptiveAvgPool {
        #[serde(default = "one")]
        output: Pair,
    },
    /// micronet's channel shuffle: view (N, g, C/g, H, W), swap dims 1 and 2.
    Shuffle {
        groups: usize,
    },
    Flatten,
    /// A named sequence (PyTorch's `nn.Sequential`): its layers are named `{name}.{i}`.
    Sequential {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        layers: Vec<LayerSpec>,
    },
    /// micronet's residual block, `relu(body(x) + shortcut(x))`: the body's layers are named
    /// `{name}.residual_function.{i}`, the shortcut's `{name}.shortcut.{i}` (empty: the identity),
    /// the sum `{name}.add`.
    Residual {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        body: Vec<LayerSpec>,
        #[serde(default)]
        shortcut: Vec<LayerSpec>,
        /// The ReLU after the sum.
        #[serde(default = "yes")]
        relu: bool,
    },
    /// The sum of named tensors: layer outputs by name (`conv1.2`, `layers.3`), or `input`.
    Add {
        inputs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// The loss a model trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Softmax cross-entropy against class labels (classification).
    #[default]
    CrossEntropy,
    /// Mean squared error against the input image (reconstruction).
    Mse,
}

/// A whole model: input shape `(C, H, W)`, layers, loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub name: String,
    pub input: [usize; 3],
    pub layers: Vec<LayerSpec>,
    #[serde(default)]
    pub loss: LossKind,
}

/// Shape of an activation without the batch dimension: `[C, H, W]` or `[F]` after flatten.
pub type Shape = Vec<usize>;

impl LayerSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Conv { .. } => "conv",
            LayerSpec::ConvTranspose { .. } => "conv_transpose",
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::BatchNorm { .. } => "batchnorm",
            LayerSpec::Relu => "relu",
            LayerSpec::MaxPool { .. } => "maxpool",
            LayerSpec::AvgPool { .. } => "avgpool",
            LayerSpec::AdaptiveAvgPool { .. } => "adaptive_avgpool",
            LayerSpec::Shuffle { .. } => "shuffle",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Sequential { .. } => "sequential",
            LayerSpec::Residual { .. } => "residual",
            LayerSpec::Add { .. } => "add",
        }
    }

    /// A conv's window (a Linear's: the 1×1 of a flattened input); None for other layers.
    pub fn conv_window(&self) -> Option<ConvWindow> {
        match *self {
            LayerSpec::Conv {
                kernel,
                stride,
                padding,
                dilation,
                groups,
                ..
            } => Some(ConvWindow {
                kernel: kernel.t(),
                stride: stride.t(),
                padding: padding.t(),
                dilation: dilation.t(),
                groups,
            }),
            LayerSpec::Linear { .. } => Some(ConvWindow {
                kernel: (1, 1),
                stride: (1, 1),
                padding: (0, 0),
                dilation: (1, 1),
                groups: 1,
            }),
            _ => None,
        }
    }

    /// Conv, ConvTranspose and Linear: the layers DoReFa quantizes.
    pub fn is_weighted(&self) -> bool {
        matches!(
            self,
            LayerSpec::Conv { .. } | LayerSpec::ConvTranspose { .. } | LayerSpec::Linear { .. }
        )
    }

    /// The largest integer field (name, value), for bounds checks before any arithmetic.
    fn largest_field(&self) -> Option<(&'static str, usize)> {
        let pairs = |f: &[(&'static str, Pair)]| {
            f.iter()
                .flat_map(|(n, p)| [(*n, p.0), (*n, p.1)])
                .collect::<Vec<_>>()
        };
        let fields: Vec<(&'static str, usize)> = match self {
            LayerSpec::Conv {
                out,
                kernel,
                stride,
                padding,
                dilation,
                groups,
                ..
            } => {
                let mut v = pairs(&[
                    ("kernel", *kernel),
                    ("stride", *stride),
                    ("padding", *padding),
                    ("dilation", *dilation),
                ]);
                v.extend([("out", *out), ("groups", *groups)]);
                v
            }
            LayerSpec::ConvTranspose {
                out,
                kernel,
                stride,
                padding,
                output_padding,
                dilation,
                groups,
                ..
            } => {
                let mut v = pairs(&[
                    ("kernel", *kernel),
                    ("stride", *stride),
                    ("padding", *padding),
                    ("output_padding", *output_padding),
                    ("dilation", *dilation),
                ]);
                v.extend([("out", *out), ("groups", *groups)]);
                v
            }
            LayerSpec::Linear { out, .. } => vec![("out", *out)],
            LayerSpec::MaxPool {
                kernel,
                stride,
                padding,
            }
            | LayerSpec::AvgPool {
                kernel,
                stride,
                padding,
            } => pairs(&[
                ("kernel", *kernel),
                ("stride", stride.unwrap_or(*kernel)),
                ("padding", *padding),
            ]),
            LayerSpec::Shuffle { groups } => vec![("groups", *groups)],
            _ => vec![],
        };
        fields.into_iter().max_by_key(|f| f.1)
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            LayerSpec::Conv { name, .. }
            | LayerSpec::ConvTranspose { name, .. }
            | LayerSpec::Linear { name, .. }
            | LayerSpec::BatchNorm { name, .. }
            | LayerSpec::Sequential { name, .. }
            | LayerSpec::Residual { name, .. }
            | LayerSpec::Add { name, .. } => name.as_deref(),
            _ => None,
        }
    }
}

/// The largest size any layer field may take, and the most values one image's activation (or one
/// layer's weight) may have: shaders index with 32 bits.
const MAX_DIM: usize = 1 << 24;
const MAX_ELEMENTS: usize = u32::MAX as usize;

/// Values in a shape, if at most [`MAX_ELEMENTS`].
fn elements(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
}

/// Weights of a layer with `cin` input channels, if at most [`MAX_ELEMENTS`].
fn weight_count(layer: &LayerSpec, cin: usize) -> Option<usize> {
    let per = |a: usize, b: usize, k: &Pair| elements(&[a, b, k.0, k.1]);
    match layer {
        LayerSpec::Conv {
            out,
            kernel,
            groups,
            ..
        } => per(*out, cin / groups.max(&1), kernel),
        LayerSpec::ConvTranspose {
            out,
            kernel,
            groups,
            ..
        } => per(cin, out / groups.max(&1), kernel),
        LayerSpec::Linear { out, .. } => elements(&[*out, cin]),
        _ => Some(0),
    }
}

fn pool_out(n: usize, k: usize, s: usize, p: usize) -> Option<usize> {
    (n + 2 * p >= k).then(|| (n + 2 * p - k) / s + 1)
}

impl ModelSpec {
    /// Reads a model from JSON; errors name the layer and the problem.
    pub fn from_json(text: &str, origin: &str) -> Result<ModelSpec> {
        let bad = |msg: String| {
            Error::Invalid(format!(
                "{origin}: {msg} (see the README's \"Models from JSON\")"
            ))
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        // Layers one by one, so that an error names the layer.
        if let Some(layers) = value.get("layers").and_then(|l| l.as_array()) {
            for (i, l) in layers.iter().enumerate() {
                if let Err(e) = serde_json::from_value::<LayerSpec>(l.clone()) {
                    let kind = l.get("type").and_then(|t| t.as_str()).unwrap_or("?");
                    return Err(bad(format!("layer {i} ({kind}): {e}")));
                }
            }
        }
        let spec: ModelSpec =
            serde_json::from_value(value).map_err(|e| bad(format!("not a model: {e}")))?;
        spec.shapes()
            .map_err(|e| Error::Invalid(format!("{origin}: {e}")))?;
        Ok(spec)
    }

    /// The model lowered to a graph of leaf layers in registration order, each with its module
    /// path, inputs and shapes (see [`Graph`](super::graph::Graph)); checks every layer.
    pub fn graph(&self) -> Result<super::graph::Graph> {
        super::graph::lower(self)
    }

    /// The input shape, then the output shape of every node of the graph, in order.
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        let g = self.graph()?;
        Ok(std::iter::once(g.input.clone())
            .chain(g.nodes.into_iter().map(|n| n.out_shape))
            .collect())
    }

    /// Parameters per graph node (weights, biases, BN γ and β), in order.
    pub fn param_counts(&self) -> Result<Vec<usize>> {
        Ok(self.graph()?.param_counts())
    }

    pub fn param_count(&self) -> Result<usize> {
        Ok(self.param_counts()?.iter().sum())
    }
}

/// The output shape of leaf layer `layer` on input `cur`, checking that it fits; `at` names the
/// layer in errors ("layer 3 (conv)").
pub(super) fn leaf_shape(layer: &LayerSpec, cur: &Shape, at: &str) -> Result<Shape> {
    if let Some(field) = layer.largest_field().filter(|&(_, v)| v > MAX_DIM) {
        return Err(Error::Invalid(format!(
            "{at}: {} = {} is too large (at most {MAX_DIM})",
            field.0, field.1
        )));
    }
    let bad = |msg: String| Error::Invalid(format!("{at}: {msg}"));
    let chw = |what: &str| -> Result<(usize, usize, usize)> {
        match cur.as_slice() {
            &[c, h, w] => Ok((c, h, w)),
            _ => Err(bad(format!("{what} needs a (C, H, W) input, got {cur:?}"))),
        }
    };
    let next = match layer {
        LayerSpec::Conv {
            out,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            ..
        } => {
            let (c, h, w) = chw("conv")?;
            let g = crate::kernels::conv2d::Conv2dGeom {
                batch: 1,
                cin: c,
                h,
                w,
                cout: *out,
                kernel: kernel.t(),
                stride: stride.t(),
                padding: padding.t(),
                dilation: dilation.t(),
                groups: *groups,
            };
            g.validate().map_err(|e| bad(e.to_string()))?;
            let (oh, ow) = g.out_hw();
            vec![*out, oh, ow]
        }
        LayerSpec::ConvTranspose {
            out,
            kernel,
            stride,
            padding,
            output_padding,
            dilation,
            groups,
            ..
        } => {
            let (c, h, w) = chw("conv_transpose")?;
            let g = crate::kernels::conv_transpose2d::ConvTranspose2dGeom {
                batch: 1,
                cin: c,
                h,
                w,
                cout: *out,
                kernel: kernel.t(),
                stride: stride.t(),
                padding: padding.t(),
                output_padding: output_padding.t(),
                dilation: dilation.t(),
                groups: *groups,
            };
            g.validate().map_err(|e| bad(e.to_string()))?;
            let (oh, ow) = g.out_hw();
            vec![*out, oh, ow]
        }
        LayerSpec::Linear { out, .. } => {
            if cur.len() != 1 {
                return Err(bad(format!(
                    "linear needs a flat input (add a flatten layer), got {cur:?}"
                )));
            }
            if *out == 0 {
                return Err(bad("out must be at least 1".into()));
            }
            vec![*out]
        }
        LayerSpec::BatchNorm { eps, momentum, .. } => {
            chw("batchnorm")?;
            if eps.is_nan() || *eps <= 0.0 || !(0.0..=1.0).contains(momentum) {
                return Err(bad("eps must be > 0 and momentum in [0, 1]".into()));
            }
            cur.clone()
        }
        LayerSpec::Relu | LayerSpec::Add { .. } => cur.clone(),
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
            let (c, h, w) = chw(layer.kind())?;
            let s = stride.unwrap_or(*kernel);
            if kernel.0 == 0 || kernel.1 == 0 || s.0 == 0 || s.1 == 0 {
                return Err(bad("kernel and stride must be at least 1".into()));
            }
            if 2 * padding.0 > kernel.0 || 2 * padding.1 > kernel.1 {
                return Err(bad("padding must be at most half the kernel".into()));
            }
            match (
                pool_out(h, kernel.0, s.0, padding.0),
                pool_out(w, kernel.1, s.1, padding.1),
            ) {
                (Some(oh), Some(ow)) => vec![c, oh, ow],
                _ => {
                    return Err(bad(format!(
                        "a {kernel:?} window does not fit a {h}x{w} input"
                    )));
                }
            }
        }
        LayerSpec::AdaptiveAvgPool { output } => {
            let (c, h, w) = chw("adaptive_avgpool")?;
            if output.0 == 0 || output.1 == 0 || h % output.0 != 0 || w % output.1 != 0 {
                return Err(bad(format!(
                    "an output of {:?} does not tile a {h}x{w} input evenly (use an output that divides it, e.g. 1)",
                    output.t()
                )));
            }
            vec![c, output.0, output.1]
        }
        LayerSpec::Shuffle { groups } => {
            let (c, _, _) = chw("shuffle")?;
            if *groups == 0 || c % groups != 0 {
                return Err(bad(format!(
                    "{c} channels cannot be shuffled in {groups} groups"
                )));
            }
            cur.clone()
        }
        LayerSpec::Flatten => vec![cur.iter().product()],
        LayerSpec::Sequential { .. } | LayerSpec::Residual { .. } => {
            return Err(bad("a container is not a leaf layer".into()));
        }
    };
    if elements(&next).is_none() {
        return Err(bad(format!(
            "its output {next:?} has more than {MAX_ELEMENTS} values per image"
        )));
    }
    if weight_count(layer, cur[0]).is_none() {
        return Err(bad(format!("more than {MAX_ELEMENTS} parameters")));
    }
    Ok(next)
}

/// Parameters of leaf layer `layer` with `cin` input channels (weights, biases, BN γ and β).
pub(super) fn leaf_params(layer: &LayerSpec, cin: usize) -> usize {
    match layer {
        LayerSpec::Conv {
            out,
            kernel,
            groups,
            bias,
            ..
        } => out * (cin / groups) * kernel.0 * kernel.1 + if *bias { *out } else { 0 },
        LayerSpec::ConvTranspose {
            out,
            kernel,
            groups,
            bias,
            ..
        } => cin * (out / groups) * kernel.0 * kernel.1 + if *bias { *out } else { 0 },
        LayerSpec::Linear { out, bias, .. } => out * cin + if *bias { *out } else { 0 },
        LayerSpec::BatchNorm { .. } => 2 * cin,
        _ => 0,
    }
}

/// Checks the input shape before any layer sees it.
pub(super) fn check_input(input: &[usize; 3]) -> Result<()> {
    if input.contains(&0) {
        return Err(Error::Invalid(format!(
            "input shape {input:?} has a zero size"
        )));
    }
    if input.iter().any(|&d| d > MAX_DIM) || elements(input).is_none() {
        return Err(Error::Invalid(format!(
            "input shape {input:?} is too large (at most {MAX_ELEMENTS} values per image)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        ModelSpec::from_json(json, "m.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_layer_and_the_problem() {
        let e = err(
            r#"{"input": [3, 32, 32], "layers": [{"type": "relu"}, {"type": "conv", "kernel": 3}]}"#,
        );
        assert!(e.contains("layer 1 (conv)") && e.contains("out"), "{e}");
        let e = err(r#"{"input": [3, 32, 32], "layers": [{"type": "dropout"}]}"#);
        assert!(
            e.contains("layer 0 (dropout)") && e.contains("unknown variant"),
            "{e}"
        );
        let e = err(
            r#"{"input": [3, 32, 32], "layers": [{"type": "flatten"}, {"type": "conv", "out": 4, "kernel": 3}]}"#,
        );
        assert!(
            e.contains("layer 1 (conv)") && e.contains("(C, H, W)"),
            "{e}"
        );
        let e = err(r#"{"input": [3, 8, 8], "layers": [{"type": "maxpool", "kernel": 9}]}"#);
        assert!(
            e.contains("layer 0 (maxpool)") && e.contains("does not fit"),
            "{e}"
        );
        assert!(err("{").contains("not valid JSON"));
        // Graphs: a name used before it exists, a cycle, mismatched shapes, a dead end.
        let e = err(
            r#"{"input": [3, 8, 8], "layers": [{"type": "conv", "out": 4, "kernel": 1, "name": "a"},
                {"type": "add", "inputs": ["a", "b"]}, {"type": "conv", "out": 4, "kernel": 1, "name": "b"}]}"#,
        );
        assert!(
            e.contains("layer 1 (add)") && e.contains("no tensor named \"b\" before it"),
            "{e}"
        );
        let e = err(
            r#"{"input": [3, 8, 8], "layers": [{"type": "sequential", "name": "s", "layers": [
                {"type": "conv", "out": 3, "kernel": 1}, {"type": "add", "inputs": ["input", "s"]}]}]}"#,
        );
        assert!(e.contains("layer s.1 (add)") && e.contains("cycle"), "{e}");
        let e = err(
            r#"{"input": [3, 8, 8], "layers": [{"type": "residual", "name": "blk", "body": [
                {"type": "conv", "out": 4, "kernel": 3, "padding": 1}]}]}"#,
        );
        assert!(
            e.contains("layer blk (residual)")
                && e.contains("[4, 8, 8]")
                && e.contains("[3, 8, 8]"),
            "{e}"
        );
        let e = err(
            r#"{"input": [3, 8, 8], "layers": [{"type": "conv", "out": 3, "kernel": 1, "name": "a"},
                {"type": "conv", "out": 3, "kernel": 1, "name": "b"}, {"type": "add", "inputs": ["input", "a"]}]}"#,
        );
        assert!(
            e.contains("layer b (conv)") && e.contains("never used"),
            "{e}"
        );
        let e =
            err(r#"{"input": [3, 6, 6], "layers": [{"type": "adaptive_avgpool", "output": 4}]}"#);
        assert!(
            e.contains("layer 0 (adaptive_avgpool)") && e.contains("does not tile"),
            "{e}"
        );
        assert!(err(r#"{"layers": []}"#).contains("input"));
        assert!(err(r#"{"input": [3, 32, 32], "layers": []}"#).contains("no layers"));
    }
}
