//! A model built on the GPU: parameters in arenas, per-layer buffers sized for the largest batch,
//! and plans (forward, loss, backward) recorded once per batch size and replayed every step.
//!
//! Layers follow micronet's quantized modules (spec §3): a quantized Conv2d / ConvTranspose2d /
//! Linear fake-quantizes its input activation and its weight, keeps its bias float, and (by
//! `prepare()`'s rule) the first such layer stays float unless `quantize_first_layer`.

mod gemm;
mod memory;

use super::params::Layout;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Op, Recorder, Tensor};
use crate::kernels::loss::{STEP_WORDS, StepValues};
use crate::kernels::norm::Epilogue;
use crate::kernels::pool::PoolGeom;
use crate::kernels::quant::{Bits, WeightQuantizer};
use crate::kernels::{elementwise, loss, norm, pool, quant, reduce};
use crate::models::{Graph, LayerSpec, LossKind, ModelSpec, Source};
use gemm::Gemm;
use memory::LayerBuffers;

/// Which layers are quantized, and to how many bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuantConfig {
    pub w_bits: Bits,
    pub a_bits: Bits,
    /// Quantize the first Conv/ConvTranspose/Linear too (micronet's `prepare()` leaves it float).
    pub quantize_first_layer: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            w_bits: Bits::new(8).expect("8 bits"),
            a_bits: Bits::new(8).expect("8 bits"),
            quantize_first_layer: false,
        }
    }
}

/// Training (batch statistics, gradients) or evaluation (running statistics, forward only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

#[derive(Clone, Copy, Debug)]
enum WeightedOp {
    Conv {
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    },
    ConvT {
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        output_padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    },
    Linear,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Weighted {
        op: WeightedOp,
        w_bits: Bits,
        a_bits: Bits,
    },
    BatchNorm {
        eps: f32,
        momentum: f32,
        /// The ReLU and channel shuffle that follow it, done in its kernels.
        ep: Epilogue,
    },
    Relu,
    /// A ReLU folded into the BatchNorm before it: its output is the BN's.
    FusedRelu,
    MaxPool(PoolWindow),
    AvgPool(PoolWindow),
    Shuffle(usize),
    /// A channel shuffle folded into the BatchNorm (and ReLU) before it: its output is the BN's.
    FusedShuffle,
    Flatten,
    /// The sum of its inputs (a residual block's); float, as micronet's DoReFa leaves `Add`.
    Add,
}

impl Kind {
    /// The layer's output is its input's buffer (the work, if any, is done by the layer before).
    fn is_alias(&self) -> bool {
        matches!(self, Kind::FusedRelu | Kind::FusedShuffle | Kind::Flatten)
    }
}

#[derive(Clone, Copy, Debug)]
struct PoolWindow {
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
}

/// A layer with its parameters' places in the arenas and its batch-independent buffers.
struct Layer {
    name: String,
    kind: Kind,
    /// The tensors it reads (one, or several for an add).
    inputs: Vec<Source>,
    in_shape: Vec<usize>,
    out_shape: Vec<usize>,
    /// Weight / gamma and bias / beta in the parameter arena.
    weight: Option<usize>,
    bias: Option<usize>,
    /// running_mean, running_var in the running arena.
    running: Option<(usize, usize)>,
    quantizer: Option<WeightQuantizer>,
    /// The quantized weight Ŵ and (training) dL/dŴ.
    w_hat: Option<Tensor>,
    dw_hat: Option<Tensor>,
    bn_stats: Option<Tensor>,
}

/// The built model.
pub struct Network {
    pub spec: ModelSpec,
    /// The spec lowered to leaf layers in registration order; `layers` follows it one to one.
    pub graph: Graph,
    pub quant: QuantConfig,
    layers: Vec<Layer>,
    pub params: Layout,
    pub running: Layout,
    pub param_arena: Tensor,
    pub grad_arena: Tensor,
    pub running_arena: Tensor,
    /// `num_batches_tracked` of each BatchNorm (running arena order / 2).
    pub batches_tracked: Vec<i64>,
    capacity: usize,
    trainable: bool,
    /// Allocated by the first plan, so that weights can be loaded and checked without them.
    buffers: std::sync::OnceLock<Vec<LayerBuffers>>,
    /// Recompute BatchNorm and shuffle outputs in backward instead of keeping them.
    recompute: bool,
    input: Tensor,
    labels: Tensor,
    per_row: Tensor,
    pub step: Tensor,
    pub metrics: Tensor,
    metric_slots: usize,
}

/// A recorded step for one batch size and mode: forward, loss (and metrics) and, in training,
/// backward. The trainer appends the optimizer update.
pub struct Plan {
    pub batch: usize,
    pub mode: Mode,
    pub ops: Recorder,
    /// The batch's input images `(b, C, H, W)` and labels `(b)`: write them before submitting.
    pub input: Tensor,
    pub labels: Tensor,
}

/// A step that checks what it writes for NaN and infinity (see [`Network::diagnostic_plan`]).
pub struct Diagnosis {
    pub plan: Plan,
    /// What each flag slot checks, in the order the step writes them.
    pub names: Vec<String>,
    /// One `u32` per name: 1 when a non-finite value was seen.
    pub flags: Tensor,
}

impl Diagnosis {
    /// The first place (in the step's order) that held a non-finite value, after the plan ran.
    pub fn first_nonfinite(&self, gpu: &Gpu) -> Result<Option<String>> {
        let flags = gpu.read_u32(&self.flags)?;
        Ok(self
            .names
            .iter()
            .zip(flags)
            .find(|(_, f)| *f != 0)
            .map(|(n, _)| n.clone()))
    }
}

struct Checker {
    flags: Tensor,
    names: Vec<String>,
}

impl Checker {
    fn check(&mut self, gpu: &Gpu, name: String, t: &Tensor) -> Result<Op> {
        let slot = self.names.len();
        self.names.push(name);
        Ok(Op::Dispatch(reduce::nonfinite_check(
            gpu,
            t,
            &self.flags,
            slot,
        )?))
    }
}

/// The fusions of the lowered graph, all in one place. Each folds a layer into the BatchNorm
/// whose output it reads, and applies only where nothing else reads that output (so no reader
/// sees the fused result in place of the tensor it asked for):
///
/// 1. BatchNorm → ReLU: the ReLU reads only the BatchNorm's output, which nothing else reads.
///    The BatchNorm applies the ReLU (`Epilogue::relu`); the ReLU is an alias of its output.
/// 2. BatchNorm [→ fused ReLU] → channel shuffle: likewise for the shuffle (and the fused ReLU's
///    output); the BatchNorm writes its output shuffled (`Epilogue::shuffle`), so the
///    unshuffled tensor never exists.
///
/// The memory planner (`memory.rs`) adds the last one: a BatchNorm whose output only a
/// quantized layer reads, and which is formed again for the backward pass anyway, writes it
/// quantized (`Epilogue::quantize`).
fn fuse(layers: &mut [Layer], consumers: &[Vec<usize>]) {
    let only_reader = |k: usize, i: usize| consumers[k] == [i];
    for i in 0..layers.len() {
        let [Source::Node(k)] = layers[i].inputs[..] else {
            continue;
        };
        match layers[i].kind {
            Kind::Relu if only_reader(k, i) => {
                if let Kind::BatchNorm { ep, .. } = &mut layers[k].kind {
                    ep.relu = true;
                    layers[i].kind = Kind::FusedRelu;
                }
            }
            Kind::Shuffle(groups) if only_reader(k, i) => {
                let bn = match (layers[k].kind, &layers[k].inputs[..]) {
                    (Kind::FusedRelu, &[Source::Node(b)]) => b,
                    _ => k,
                };
                if let Kind::BatchNorm { ep, .. } = &mut layers[bn].kind {
                    if ep.shuffle == 1 {
                        ep.shuffle = groups;
                        layers[i].kind = Kind::FusedShuffle;
                    }
                }
            }
            _ => {}
        }
    }
}

fn at_batch(t: &Tensor, b: usize) -> Result<Tensor> {
    let mut shape = t.shape().to_vec();
    shape[0] = b;
    t.view(0, &shape)
}

fn with_batch(b: usize, per_sample: &[usize]) -> Vec<usize> {
    std::iter::once(b)
        .chain(per_sample.iter().copied())
        .collect()
}

impl Network {
    /// Builds `spec` for batches of up to `capacity` rows. `trainable` allocates gradients;
    /// `metric_slots` is how many per-step metrics can be held before they are read back.
    pub fn new(
        gpu: &Gpu,
        spec: &ModelSpec,
        quant: QuantConfig,
        capacity: usize,
        trainable: bool,
        metric_slots: usize,
    ) -> Result<Network> {
        if capacity == 0 {
            return Err(Error::Invalid(
                "batch size 0: use a batch size of at least 1".into(),
            ));
        }
        let graph = spec.graph()?;
        check_capacity(gpu, &graph, capacity)?;
        let mut params = Layout::default();
        let mut running = Layout::default();
        let mut layers = Vec::new();
        // micronet's prepare(): every weighted layer but the first registered is quantized.
        let first_weighted = graph.nodes.iter().position(|n| n.layer.is_weighted());
        for (i, node) in graph.nodes.iter().enumerate() {
            let ls = &node.layer;
            let name = node.name.clone();
            let (in_shape, out_shape) = (node.in_shape.clone(), node.out_shape.clone());
            let quantized = quant.quantize_first_layer || Some(i) != first_weighted;
            let (wb, ab) = if quantized {
                (quant.w_bits, quant.a_bits)
            } else {
                (Bits::FLOAT, Bits::FLOAT)
            };
            let mut layer = Layer {
                name: name.clone(),
                kind: Kind::Flatten,
                inputs: node.inputs.clone(),
                in_shape: in_shape.clone(),
                out_shape,
                weight: None,
                bias: None,
                running: None,
                quantizer: None,
                w_hat: None,
                dw_hat: None,
                bn_stats: None,
            };
            let weighted = |op: WeightedOp,
                            w_shape: Vec<usize>,
                            bias: bool,
                            out: usize,
                            layer: &mut Layer,
                            params: &mut Layout|
             -> Result<()> {
                layer.kind = Kind::Weighted {
                    op,
                    w_bits: wb,
                    a_bits: ab,
                };
                layer.weight = Some(params.add(format!("{name}.weight"), &w_shape));
                layer.bias = bias.then(|| params.add(format!("{name}.bias"), &[out]));
                if !wb.is_float() {
                    layer.quantizer = Some(WeightQuantizer::new(gpu, wb, &w_shape)?);
                    layer.w_hat = Some(gpu.zeros(
                        &format!("{name} quantized weight"),
                        &w_shape,
                        DType::F32,
                    )?);
                    if trainable {
                        layer.dw_hat = Some(gpu.zeros(
                            &format!("{name} quantized weight gradient"),
                            &w_shape,
                            DType::F32,
                        )?);
                    }
                }
                Ok(())
            };
            match ls {
                LayerSpec::Conv {
                    out,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    bias,
                    ..
                } => {
                    let op = WeightedOp::Conv {
                        kernel: kernel.t(),
                        stride: stride.t(),
                        padding: padding.t(),
                        dilation: dilation.t(),
                        groups: *groups,
                    };
                    weighted(
                        op,
                        vec![*out, in_shape[0] / groups, kernel.0, kernel.1],
                        *bias,
                        *out,
                        &mut layer,
                        &mut params,
                    )?;
                }
                LayerSpec::ConvTranspose {
                    out,
                    kernel,
                    stride,
                    padding,
                    output_padding,
                    dilation,
                    groups,
                    bias,
                    ..
                } => {
                    let op = WeightedOp::ConvT {
                        kernel: kernel.t(),
                        stride: stride.t(),
                        padding: padding.t(),
                        output_padding: output_padding.t(),
                        dilation: dilation.t(),
                        groups: *groups,
                    };
                    weighted(
                        op,
                        vec![in_shape[0], out / groups, kernel.0, kernel.1],
                        *bias,
                        *out,
                        &mut layer,
                        &mut params,
                    )?;
                }
                LayerSpec::Linear { out, bias, .. } => {
                    weighted(
                        WeightedOp::Linear,
                        vec![*out, in_shape[0]],
                        *bias,
                        *out,
                        &mut layer,
                        &mut params,
                    )?;
                }
                LayerSpec::BatchNorm { eps, momentum, .. } => {
                    let c = in_shape[0];
                    layer.kind = Kind::BatchNorm {
                        eps: *eps,
                        momentum: *momentum,
                        ep: Epilogue::relu(false),
                    };
                    layer.weight = Some(params.add(format!("{name}.weight"), &[c]));
                    layer.bias = Some(params.add(format!("{name}.bias"), &[c]));
                    layer.running = Some((
                        running.add(format!("{name}.running_mean"), &[c]),
                        running.add(format!("{name}.running_var"), &[c]),
                    ));
                    layer.bn_stats = Some(gpu.zeros(
                        &format!("{name} batch statistics"),
                        &[2 * c],
                        DType::F32,
                    )?);
                }
                LayerSpec::Relu => layer.kind = Kind::Relu,
                LayerSpec::MaxPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    layer.kind = Kind::MaxPool(PoolWindow {
                        kernel: kernel.t(),
                        stride: stride.unwrap_or(*kernel).t(),
                        padding: padding.t(),
                    });
                }
                LayerSpec::AvgPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    layer.kind = Kind::AvgPool(PoolWindow {
                        kernel: kernel.t(),
                        stride: stride.unwrap_or(*kernel).t(),
                        padding: padding.t(),
                    });
                }
                LayerSpec::Shuffle { groups } => layer.kind = Kind::Shuffle(*groups),
                LayerSpec::Flatten => layer.kind = Kind::Flatten,
                LayerSpec::Add { .. } => layer.kind = Kind::Add,
                LayerSpec::AdaptiveAvgPool { .. }
                | LayerSpec::Sequential { .. }
                | LayerSpec::Residual { .. } => {
                    return Err(Error::Invalid(format!(
                        "layer {name}: {} is not a leaf of the lowered graph",
                        ls.kind()
                    )));
                }
            }
            layers.push(layer);
        }
        fuse(&mut layers, &graph.consumers());
        let batches_tracked = vec![0; running.entries().len() / 2];
        let param_arena = params.alloc(gpu, "parameters")?;
        let grad_arena = if trainable {
            params.alloc(gpu, "gradients")?
        } else {
            gpu.zeros("gradients", &[64], DType::F32)?
        };
        let running_arena = running.alloc(gpu, "running statistics")?;
        let input = gpu.zeros(
            "input batch",
            &with_batch(capacity, &spec.input),
            DType::F32,
        )?;
        let labels = gpu.zeros("labels", &[capacity], DType::U32)?;
        let per_row = gpu.zeros("per-row loss", &[2 * capacity], DType::F32)?;
        let step = gpu.zeros("step values", &[STEP_WORDS], DType::U32)?;
        let metric_slots = metric_slots.max(1);
        let metrics = gpu.zeros("metrics", &[2 * metric_slots], DType::F32)?;
        let net = Network {
            spec: spec.clone(),
            graph,
            quant,
            layers,
            params,
            running,
            param_arena,
            grad_arena,
            running_arena,
            batches_tracked,
            capacity,
            trainable,
            buffers: std::sync::OnceLock::new(),
            recompute: true,
            input,
            labels,
            per_row,
            step,
            metrics,
            metric_slots,
        };
        net.init_running(gpu)?;
        Ok(net)
    }

    /// Keeps every layer's output for the backward pass instead of recomputing BatchNorm and
    /// shuffle outputs (more memory, the same results); only before the first plan.
    pub fn keep_all_outputs(&mut self) -> Result<()> {
        if self.buffers.get().is_some() {
            return Err(Error::Invalid(
                "keep_all_outputs must come before the first plan".into(),
            ));
        }
        self.recompute = false;
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn metric_slots(&self) -> usize {
        self.metric_slots
    }

    /// Grows the metrics buffer to at least `slots` (plans must be recorded after this).
    pub fn ensure_metric_slots(&mut self, gpu: &Gpu, slots: usize) -> Result<()> {
        if slots > self.metric_slots {
            self.metrics = gpu.zeros("metrics", &[2 * slots], DType::F32)?;
            self.metric_slots = slots;
        }
        Ok(())
    }

    /// Names of the layers whose weights are quantized.
    pub fn quantized_layers(&self) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|l| matches!(l.kind, Kind::Weighted { w_bits, .. } if !w_bits.is_float()))
            .map(|l| l.name.as_str())
            .collect()
    }

    /// Per layer: whether its output depends on parameters, so that a gradient must flow back
    /// into it (never, in a network built for evaluation only).
    fn grad_needed(&self) -> Vec<bool> {
        let mut upstream = vec![false; self.layers.len()];
        // Layers only read earlier layers, so one pass in order settles them all.
        for (i, l) in self.layers.iter().enumerate() {
            upstream[i] = self.trainable
                && (l.weight.is_some()
                    || l.inputs
                        .iter()
                        .any(|s| matches!(s, Source::Node(k) if upstream[*k])));
        }
        upstream
    }

    /// BatchNorm running statistics start at mean 0, variance 1 (PyTorch's init).
    fn init_running(&self, gpu: &Gpu) -> Result<()> {
        let values: Vec<Vec<f32>> = self
            .running
            .entries()
            .iter()
            .map(|e| {
                vec![
                    if e.name.ends_with("running_var") {
                        1.0
                    } else {
                        0.0
                    };
                    e.numel()
                ]
            })
            .collect();
        gpu.write(&self.running_arena, &self.running.pack(&values))
    }

    /// Records the plan of one batch of `batch` rows (at most the capacity).
    pub fn plan(&self, gpu: &Gpu, batch: usize, mode: Mode) -> Result<Plan> {
        self.record(gpu, batch, mode, None)
    }

    /// A training step of `batch` rows (without the optimizer) that checks every value it writes,
    /// in the order it writes them, for NaN and infinity: parameters before the step, the input,
    /// each layer's output, the loss gradient, each gradient of the backward pass. The first check
    /// that fires in `names` order is where a non-finite value first appeared.
    pub fn diagnostic_plan(&self, gpu: &Gpu, batch: usize) -> Result<Diagnosis> {
        let slots = 2 + self.params.entries().len() * 2 + self.layers.len() * 2;
        let mut checker = Checker {
            flags: gpu.zeros("non-finite flags", &[slots], DType::U32)?,
            names: Vec::new(),
        };
        let plan = self.record(gpu, batch, Mode::Train, Some(&mut checker))?;
        Ok(Diagnosis {
            plan,
            names: checker.names,
            flags: checker.flags,
        })
    }

    fn record(
        &self,
        gpu: &Gpu,
        batch: usize,
        mode: Mode,
        mut checker: Option<&mut Checker>,
    ) -> Result<Plan> {
        let buffers = self.buffers(gpu)?;
        if batch == 0 || batch > self.capacity {
            return Err(Error::Invalid(format!(
                "batch of {batch} rows for a network built for at most {}",
                self.capacity
            )));
        }
        if mode == Mode::Train && !self.trainable {
            return Err(Error::Invalid(
                "this network was built for evaluation only".into(),
            ));
        }
        let input = at_batch(&self.input, batch)?;
        let labels = at_batch(&self.labels, batch)?;
        let mut fwd = Vec::new();
        let mut bwd: Vec<Vec<Op>> = Vec::new();
        if let Some(c) = checker.as_deref_mut() {
            for (k, e) in self.params.entries().iter().enumerate() {
                fwd.push(c.check(
                    gpu,
                    format!("parameter {} before the step", e.name),
                    &self.params.view(&self.param_arena, k)?,
                )?);
            }
            fwd.push(c.check(gpu, "input batch".into(), &input)?);
        }
        let tensor = |s: Source| match s {
            Source::Input => Ok(input.clone()),
            Source::Node(k) => at_batch(&buffers[k].out, batch),
        };
        // Ops that form a transient input again (the chain of recomputable layers that made it
        // from kept tensors).
        let mut x_again: Vec<Op> = Vec::new();
        for (i, buf) in buffers.iter().enumerate() {
            let l = &self.layers[i];
            let y = at_batch(&buf.out, batch)?;
            let dy = buf.dout.as_ref().map(|d| at_batch(d, batch)).transpose()?;
            let xs = l
                .inputs
                .iter()
                .map(|&s| tensor(s))
                .collect::<Result<Vec<_>>>()?;
            let dxs = buf
                .din
                .iter()
                .map(|d| match (mode, d) {
                    (Mode::Train, Some(d)) => at_batch(d, batch).map(Some),
                    _ => Ok(None),
                })
                .collect::<Result<Vec<_>>>()?;
            let (x, dx_used) = (&xs[0], dxs[0].as_ref());
            let (mut f, mut b) = match l.kind {
                Kind::Add => add_ops(gpu, &xs, &dxs, &y, dy.as_ref())?,
                _ => self.layer_ops(gpu, i, buf, mode, x, dx_used, &y, dy.as_ref(), batch)?,
            };
            if mode == Mode::Train {
                for (part, sum) in &buf.accumulate {
                    let (part, sum) = (at_batch(part, batch)?, at_batch(sum, batch)?);
                    b.push(Op::Dispatch(elementwise::accumulate(gpu, &part, &sum)?));
                }
            }
            let alias = l.kind.is_alias();
            if !alias {
                if buf.transient {
                    // Its consumer's backward forms the whole chain again.
                    x_again.extend(self.recompute_ops(gpu, i, x, &y, batch)?);
                } else {
                    // The backward of this layer, and of the chain that fed it, runs next:
                    // form the chain's outputs first.
                    b.splice(0..0, std::mem::take(&mut x_again));
                }
            }
            if let Some(c) = checker.as_deref_mut() {
                let what = format!(
                    "layer {i} ({} {})",
                    self.graph.nodes[i].layer.kind(),
                    l.name
                );
                f.push(c.check(gpu, format!("output of {what}"), &y)?);
                for idx in [l.weight, l.bias].into_iter().flatten() {
                    let e = &self.params.entries()[idx];
                    b.push(c.check(
                        gpu,
                        format!("gradient of {}", e.name),
                        &self.params.view(&self.grad_arena, idx)?,
                    )?);
                }
                for d in dxs.iter().flatten() {
                    b.push(c.check(gpu, format!("gradient into the input of {what}"), d)?);
                }
            }
            fwd.extend(f);
            bwd.push(b);
        }
        // Loss and metrics: the output's gradient comes from the loss in training.
        let rows =
            at_batch(&self.per_row.reshape(&[self.capacity, 2])?, batch)?.reshape(&[2 * batch])?;
        let last = buffers.last().expect("model has layers");
        let out = at_batch(&last.out, batch)?;
        let scratch;
        let dout = match (mode, &last.dout) {
            (Mode::Train, Some(d)) => at_batch(d, batch)?,
            _ => {
                // Eval still forms the loss; its gradient goes to a scratch buffer.
                scratch = gpu.empty("eval loss gradient", out.shape(), DType::F32)?;
                scratch.clone()
            }
        };
        match self.spec.loss {
            LossKind::CrossEntropy => {
                let logits = out.reshape(&[batch, out.numel() / batch])?;
                fwd.push(loss::cross_entropy(
                    gpu,
                    &logits,
                    &labels,
                    &dout.reshape(logits.shape())?,
                    &rows,
                )?);
            }
            LossKind::Mse => {
                if out.shape() != input.shape() {
                    return Err(Error::Invalid(format!(
                        "mse loss compares the output with the input image, but the output is {:?} and the input {:?}",
                        &out.shape()[1..],
                        &input.shape()[1..]
                    )));
                }
                fwd.push(loss::mse(gpu, &out, &input, &dout, &rows)?);
            }
        }
        if let Some(c) = checker {
            fwd.push(c.check(gpu, "gradient of the loss".into(), &dout)?);
        }
        fwd.push(loss::batch_metrics(
            gpu,
            batch,
            &rows,
            &self.metrics,
            &self.step,
        )?);
        let mut ops = Recorder::new();
        for op in fwd {
            ops.push_op(op);
        }
        if mode == Mode::Train {
            for b in bwd.into_iter().rev() {
                for op in b {
                    ops.push_op(op);
                }
            }
        }
        Ok(Plan {
            batch,
            mode,
            ops,
            input,
            labels,
        })
    }

    /// The forward op of transient layer `i` again, into the same temporary: the same kernel on
    /// the same inputs (BatchNorm with this step's batch statistics), so the same bits.
    fn recompute_ops(
        &self,
        gpu: &Gpu,
        i: usize,
        x: &Tensor,
        y: &Tensor,
        batch: usize,
    ) -> Result<Vec<Op>> {
        let l = &self.layers[i];
        match l.kind {
            Kind::BatchNorm { ep, .. } => {
                let p = |k: Option<usize>| {
                    self.params
                        .view(&self.param_arena, k.expect("BatchNorm has gamma and beta"))
                };
                let x4 = x.reshape(&with_batch(batch, &l.in_shape))?;
                let stats = l.bn_stats.as_ref().expect("bn stats");
                Ok(vec![norm::apply(
                    gpu,
                    ep,
                    &x4,
                    stats,
                    &p(l.weight)?,
                    &p(l.bias)?,
                    y,
                )?])
            }
            Kind::Shuffle(groups) => Ok(vec![pool::channel_shuffle(gpu, groups, false, x, y)?]),
            _ => Err(Error::Invalid(format!(
                "layer {} cannot be recomputed",
                l.name
            ))),
        }
    }

    /// Forward and backward ops of layer `i`: input `x` (and its gradient `dx` when wanted),
    /// output `y` (and `dy`).
    #[allow(clippy::too_many_arguments)]
    fn layer_ops(
        &self,
        gpu: &Gpu,
        i: usize,
        buf: &LayerBuffers,
        mode: Mode,
        x: &Tensor,
        dx: Option<&Tensor>,
        y: &Tensor,
        dy: Option<&Tensor>,
        batch: usize,
    ) -> Result<(Vec<Op>, Vec<Op>)> {
        let l = &self.layers[i];
        let train = mode == Mode::Train;
        let p = |idx: Option<usize>| {
            idx.map(|k| self.params.view(&self.param_arena, k))
                .transpose()
        };
        let g = |idx: Option<usize>| {
            idx.map(|k| self.params.view(&self.grad_arena, k))
                .transpose()
        };
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        let dy_or =
            || dy.ok_or_else(|| Error::Invalid(format!("layer {} has no output gradient", l.name)));
        match l.kind {
            Kind::Weighted {
                op,
                w_bits: _,
                a_bits,
            } => {
                let (w, b) = (
                    p(l.weight)?.expect("weighted layers have weights"),
                    p(l.bias)?,
                );
                // Quantized input and weight (float: the tensors themselves).
                let xq = match &buf.xq {
                    Some(t) => {
                        let t = at_batch(t, batch)?;
                        fwd.push(quant::act_forward(gpu, a_bits, x, &t)?);
                        t
                    }
                    None => {
                        if buf.xq_in_place && !buf.input_quantized {
                            fwd.extend(quant::act_forward_in_place(gpu, a_bits, x)?);
                        }
                        x.clone()
                    }
                };
                let w_hat = match (&l.quantizer, &l.w_hat) {
                    (Some(q), Some(wh)) => {
                        fwd.extend(q.forward(gpu, &w, wh)?);
                        wh.clone()
                    }
                    _ => w.clone(),
                };
                let gemm = Gemm::new(op, batch, &l.in_shape, &l.out_shape);
                fwd.push(gemm.forward(gpu, &xq, &w_hat, b.as_ref(), y)?);
                if train {
                    let dy = dy_or()?;
                    // dL/dx̂ becomes dL/dx in place (the STE's mask, from the float x); the
                    // quantized input is formed again for grad-weight: in its shared temporary,
                    // or where x lies (x was formed again, float, for this backward).
                    match dx {
                        Some(dx) => {
                            bwd.push(gemm.grad_input(gpu, dy, &w_hat, dx)?);
                            if buf.xq_in_place {
                                bwd.extend(quant::act_backward_requantize(gpu, a_bits, x, dx)?);
                            } else if buf.xq.is_some() {
                                bwd.extend(quant::act_backward_in_place(gpu, a_bits, x, dx)?);
                            }
                        }
                        None if buf.xq_in_place => {
                            bwd.extend(quant::act_forward_in_place(gpu, a_bits, x)?)
                        }
                        None => {}
                    }
                    if buf.xq.is_some() {
                        bwd.push(quant::act_forward(gpu, a_bits, x, &xq)?);
                    }
                    let dw = g(l.weight)?.expect("weighted layers have weights");
                    match (&l.quantizer, &l.dw_hat) {
                        (Some(q), Some(dw_hat)) => {
                            // dL/dŴ goes through the weight quantizer's backward into dL/dW.
                            bwd.extend(gemm.grad_weight(
                                gpu,
                                &xq,
                                dy,
                                dw_hat,
                                buf.split_k.as_ref(),
                            )?);
                            bwd.extend(q.backward(gpu, dw_hat, &dw)?);
                        }
                        _ => {
                            bwd.extend(gemm.grad_weight(gpu, &xq, dy, &dw, buf.split_k.as_ref())?)
                        }
                    }
                    if let Some(db) = g(l.bias)? {
                        bwd.push(gemm.grad_bias(gpu, dy, &db)?);
                    }
                }
            }
            Kind::BatchNorm { eps, momentum, ep } => {
                let (gamma, beta) = (p(l.weight)?.expect("gamma"), p(l.bias)?.expect("beta"));
                let (rm, rv) = l.running.expect("running stats");
                let (rm, rv) = (
                    self.running.view(&self.running_arena, rm)?,
                    self.running.view(&self.running_arena, rv)?,
                );
                let stats = l.bn_stats.as_ref().expect("bn stats");
                let x4 = x.reshape(&with_batch(batch, &l.in_shape))?;
                if train {
                    if batch * l.in_shape[1..].iter().product::<usize>() < 2 {
                        return Err(Error::Invalid(format!(
                            "layer {}: BatchNorm needs more than one value per channel to train: use a batch size of at least 2",
                            l.name
                        )));
                    }
                    fwd.push(norm::stats_train(gpu, &x4, eps, momentum, stats, &rm, &rv)?);
                } else {
                    fwd.push(norm::stats_eval(gpu, l.in_shape[0], eps, &rm, &rv, stats)?);
                }
                let fwd_ep = Epilogue {
                    quantize: buf.quantize_output,
                    ..ep
                };
                fwd.push(norm::apply(gpu, fwd_ep, &x4, stats, &gamma, &beta, y)?);
                if train {
                    let (dg, db) = (g(l.weight)?.expect("gamma"), g(l.bias)?.expect("beta"));
                    bwd.extend(norm::backward(
                        gpu,
                        ep,
                        &x4,
                        dy_or()?,
                        stats,
                        &gamma,
                        &beta,
                        &dg,
                        &db,
                        dx,
                    )?);
                }
            }
            Kind::Relu => {
                fwd.push(Op::Dispatch(elementwise::relu_forward(gpu, x, y)?));
                if let (true, Some(dx)) = (train, dx) {
                    bwd.push(Op::Dispatch(elementwise::relu_backward(
                        gpu,
                        y,
                        dy_or()?,
                        dx,
                    )?));
                }
            }
            Kind::FusedRelu | Kind::FusedShuffle | Kind::Flatten => {}
            Kind::Add => unreachable!("adds are recorded by add_ops"),
            Kind::MaxPool(win) | Kind::AvgPool(win) => {
                let [c, h, w] = l.in_shape[..] else {
                    return Err(Error::Invalid(format!(
                        "layer {}: pooling needs (C, H, W)",
                        l.name
                    )));
                };
                let geom = PoolGeom {
                    n: batch,
                    c,
                    h,
                    w,
                    kernel: win.kernel,
                    stride: win.stride,
                    padding: win.padding,
                };
                if let Kind::MaxPool(_) = l.kind {
                    fwd.push(pool::maxpool_forward(gpu, &geom, x, y)?);
                    if let (true, Some(dx)) = (train, dx) {
                        // x is this layer's input as the forward saw it (kept, or formed again).
                        bwd.push(pool::maxpool_backward(gpu, &geom, x, dy_or()?, dx)?);
                    }
                } else {
                    fwd.push(pool::avgpool_forward(gpu, &geom, x, y)?);
                    if let (true, Some(dx)) = (train, dx) {
                        bwd.push(pool::avgpool_backward(gpu, &geom, dy_or()?, dx)?);
                    }
                }
            }
            Kind::Shuffle(groups) => {
                fwd.push(pool::channel_shuffle(gpu, groups, false, x, y)?);
                if let (true, Some(dx)) = (train, dx) {
                    bwd.push(pool::channel_shuffle(gpu, groups, true, dy_or()?, dx)?);
                }
            }
        }
        Ok((fwd, bwd))
    }

    /// Writes a batch: images `(b, C, H, W)` normalised, and labels.
    pub fn write_batch(
        &self,
        gpu: &Gpu,
        plan: &Plan,
        images: &[f32],
        labels: &[u32],
    ) -> Result<()> {
        gpu.write(&plan.input, images)?;
        gpu.write(&plan.labels, labels)
    }

    /// Writes the values the next submit's kernels read (metrics slot, optimizer step, lr).
    pub fn write_step(&self, gpu: &Gpu, values: &StepValues) -> Result<()> {
        if values.slot as usize >= self.metric_slots {
            return Err(Error::Invalid(format!(
                "metrics slot {} of {}",
                values.slot, self.metric_slots
            )));
        }
        gpu.write(&self.step, std::slice::from_ref(values))
    }

    /// `(loss, correct)` of slots `0..n` (one GPU round trip).
    pub fn read_metrics(&self, gpu: &Gpu, n: usize) -> Result<Vec<(f32, f32)>> {
        let all = gpu.read_f32(&self.metrics)?;
        Ok(all.chunks(2).take(n).map(|c| (c[0], c[1])).collect())
    }

    /// The network's output buffer `(capacity, ...)` (logits of the last forward, in its first
    /// rows); allocated with the first plan.
    pub fn output(&self) -> Option<&Tensor> {
        self.buffers.get().and_then(|b| b.last()).map(|l| &l.out)
    }

    /// The gradient arena (for tests; zero padding).
    pub fn gradient(&self, name: &str) -> Result<Tensor> {
        let i = self
            .params
            .index_of(name)
            .ok_or_else(|| Error::Invalid(format!("no parameter {name}")))?;
        self.params.view(&self.grad_arena, i)
    }

    /// Per-BatchNorm indices into `batches_tracked`, in layer order.
    pub fn batchnorm_names(&self) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.running.is_some())
            .map(|l| l.name.clone())
            .collect()
    }
}

/// Forward and backward of a sum: `y = x0 + x1 (+ x2 ...)`, each input's gradient `dy`.
fn add_ops(
    gpu: &Gpu,
    xs: &[Tensor],
    dxs: &[Option<Tensor>],
    y: &Tensor,
    dy: Option<&Tensor>,
) -> Result<(Vec<Op>, Vec<Op>)> {
    let mut fwd = vec![Op::Dispatch(elementwise::add_forward(
        gpu, &xs[0], &xs[1], y,
    )?)];
    for x in &xs[2..] {
        fwd.push(Op::Dispatch(elementwise::accumulate(gpu, x, y)?));
    }
    let mut bwd = Vec::new();
    for dx in dxs.iter().flatten() {
        let dy = dy.ok_or_else(|| Error::Invalid("an add has no output gradient".into()))?;
        bwd.push(Op::Copy {
            src: dy.clone(),
            dst: dx.clone(),
        });
    }
    Ok((fwd, bwd))
}

/// The largest batch whose activation buffers fit the device's per-binding and per-buffer
/// limits, so that a too-large batch is an error that says what fits.
pub fn max_batch(gpu: &Gpu, spec: &ModelSpec) -> Result<usize> {
    max_batch_of(gpu, &spec.graph()?)
}

fn max_batch_of(gpu: &Gpu, graph: &Graph) -> Result<usize> {
    let per_sample = std::iter::once(&graph.input)
        .chain(graph.nodes.iter().map(|n| &n.out_shape))
        .map(|s| 4 * s.iter().product::<usize>() as u64)
        .max()
        .unwrap_or(4);
    let limit = gpu
        .limits
        .max_storage_buffer_binding_size
        .min(gpu.limits.max_buffer_size);
    Ok((limit / per_sample) as usize)
}

fn check_capacity(gpu: &Gpu, graph: &Graph, capacity: usize) -> Result<()> {
    let fits = max_batch_of(gpu, graph)?;
    let shapes: Vec<&Vec<usize>> = std::iter::once(&graph.input)
        .chain(graph.nodes.iter().map(|n| &n.out_shape))
        .collect();
    if capacity <= fits {
        return Ok(());
    }
    let (i, s) = shapes
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| s.iter().product::<usize>())
        .expect("shapes");
    let bytes = 4 * (capacity * s.iter().product::<usize>()) as u64;
    let (limit_name, limit) =
        if gpu.limits.max_storage_buffer_binding_size <= gpu.limits.max_buffer_size {
            (
                "max_storage_buffer_binding_size",
                gpu.limits.max_storage_buffer_binding_size,
            )
        } else {
            ("max_buffer_size", gpu.limits.max_buffer_size)
        };
    let at = if i == 0 {
        "the input".to_string()
    } else {
        format!(
            "the output of layer {} ({})",
            i - 1,
            graph.nodes[i - 1].name
        )
    };
    Err(Error::TooLarge {
        what: format!("batch size {capacity}: {at}"),
        size: bytes,
        limit_name,
        limit,
        hint: format!("use a batch size of at most {fits}"),
    })
}
