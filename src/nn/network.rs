//! A model built on the GPU: parameters in arenas, per-layer buffers sized for the largest batch,
//! and plans (forward, loss, backward) recorded once per batch size and replayed every step.
//!
//! Layers follow micronet's quantized modules (spec §3): a quantized Conv2d / ConvTranspose2d /
//! Linear fake-quantizes its input activation and its weight, keeps its bias float, and (by
//! `prepare()`'s rule) the first such layer stays float unless `quantize_first_layer`.

mod batchnorm;
mod bnfold;
mod elementwise;
mod gemm;
mod lower;
mod memory;
mod paths;
mod pool;
mod quantizers;
mod shuffle;
mod weighted;

use super::params::Layout;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Op, Recorder, Tensor};
use crate::kernels::loss::{STEP_WORDS, StepValues};
use crate::kernels::{loss, norm, reduce};
use crate::models::{Graph, LossKind, ModelSpec, Source};
use crate::quant::QuantConfig;
use gemm::Gemm;
use lower::{Kind, Layer, WeightedOp};
use memory::LayerBuffers;
pub use paths::{CoopUse, GemmDirection, PlanGemm};

/// An IAO quantizer's place in the running arena and its checkpoint names.
pub(crate) struct IaoInfo {
    /// e.g. `model.0.conv.activation_quantizer`, or an add's `conv2_x.0.add.observer_res`.
    pub prefix: String,
    /// An add's observer: only its range is saved (`{prefix}.min_val`, `{prefix}.max_val`).
    pub observer_only: bool,
    /// micronet's shape of its scale, zero point and observer range.
    pub key_shape: Vec<usize>,
    pub rows: usize,
    /// Its entry in the running arena: rows × [min, max, scale, zp], then `observed`.
    pub entry: usize,
    pub code_range: (f32, f32),
    pub initial: Vec<f32>,
}

/// A folded conv's names and running-arena entries.
pub(crate) struct FoldInfo {
    pub conv: String,
    pub bn: String,
    pub running_mean: usize,
    pub running_var: usize,
    pub flag: usize,
}

/// Training (batch statistics, gradients) or evaluation (running statistics, forward only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
    /// A training-mode forward pass only: BatchNorm on batch statistics, updating its running
    /// statistics, and observers updating; no backward (micronet's post-training calibration).
    Calibrate,
}

/// The built model.
pub struct Network {
    pub spec: ModelSpec,
    /// The spec lowered to leaf layers in registration order; `layers` follows it one to one.
    pub graph: Graph,
    pub quant: QuantConfig,
    layers: Vec<Layer>,
    /// Every DoReFa layer's weight quantizer, run together.
    dorefa: Option<lower::DorefaWeights>,
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
    /// BatchNorm backward reductions from grad-input's sums (see `LayerBuffers::bn_sums`).
    bn_sums: bool,
    /// Every BatchNorm after a conv has its backward applied in that conv's loads, whatever
    /// its kernel (see `Network::bn_backward_by_conv`).
    bn_backward_in_every_conv: bool,
    /// A conv's stored DoReFa input is quantized where its GEMMs load it
    /// (`QuantInput::OnLoad`).
    quantize_on_load: bool,
    /// A conv's grad-input adds the gradient of its input's other reader as it writes dx
    /// (`Network::grad_input_adds_part`).
    sum_in_grad_input: bool,
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
    /// The weighted layers' GEMM launches among `ops`, in order.
    pub gemms: Vec<PlanGemm>,
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

/// A node's forward and backward ops.
type Ops = (Vec<Op>, Vec<Op>);

/// What a node reads and writes in one plan: its inputs and output at the plan's batch, and in
/// training the gradients (an input's is `None` where no gradient is needed).
struct Io<'a> {
    gpu: &'a Gpu,
    batch: usize,
    train: bool,
    xs: &'a [Tensor],
    dxs: &'a [Option<Tensor>],
    y: &'a Tensor,
    dy: Option<&'a Tensor>,
    buf: &'a LayerBuffers,
}

impl Io<'_> {
    fn x(&self) -> &Tensor {
        &self.xs[0]
    }

    fn dx(&self) -> Option<&Tensor> {
        self.dxs[0].as_ref()
    }

    fn dy(&self, l: &Layer) -> Result<&Tensor> {
        self.dy
            .ok_or_else(|| Error::Invalid(format!("layer {} has no output gradient", l.name)))
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
        let mut layers = lower::lower(
            gpu,
            &graph,
            quant,
            capacity,
            trainable,
            &mut params,
            &mut running,
        )?;
        let dorefa = lower::dorefa_weights(gpu, &mut layers, &params, trainable)?;
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
            dorefa,
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
            bn_sums: true,
            bn_backward_in_every_conv: false,
            quantize_on_load: true,
            sum_in_grad_input: true,
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
        self.before_first_plan("keep_all_outputs")?;
        self.recompute = false;
        Ok(())
    }

    /// Reduces every BatchNorm's backward (dgamma, dbeta) in a pass of its own over its input
    /// and output gradient, instead of adding up the sums the conv reading its output formed in
    /// its grad-input epilogue: the same values summed in another order (for comparing the two);
    /// only before the first plan.
    pub fn reduce_bn_backward_in_passes(&mut self) -> Result<()> {
        self.before_first_plan("reduce_bn_backward_in_passes")?;
        self.bn_sums = false;
        Ok(())
    }

    /// Quantizes a conv's stored DoReFa input in passes of its own (into a temporary, forward
    /// and again for grad-weight) instead of where the conv's GEMMs load it: the same bits, for
    /// comparing the two; only before the first plan.
    pub fn quantize_inputs_in_passes(&mut self) -> Result<()> {
        self.before_first_plan("quantize_inputs_in_passes")?;
        self.quantize_on_load = false;
        Ok(())
    }

    /// Adds the gradients of a tensor read by several layers in passes of their own
    /// (`accumulate`) only, instead of the first in the grad-input of the conv that writes the
    /// sum: the same bits, for comparing the two; only before the first plan.
    pub fn sum_gradients_in_passes(&mut self) -> Result<()> {
        self.before_first_plan("sum_gradients_in_passes")?;
        self.sum_in_grad_input = false;
        Ok(())
    }

    /// Applies the backward of every BatchNorm after a conv where that conv's backward GEMMs
    /// load its output gradient, also after a conv larger than 1×1 (which by default leaves it
    /// to a pass of the BatchNorm's own): the same bits, for comparing the two; only before the
    /// first plan.
    pub fn apply_bn_backward_in_every_conv(&mut self) -> Result<()> {
        self.before_first_plan("apply_bn_backward_in_every_conv")?;
        self.bn_backward_in_every_conv = true;
        Ok(())
    }

    /// The buffers are laid out by the first plan: `what` (a choice they depend on) must come
    /// before it.
    fn before_first_plan(&self, what: &str) -> Result<()> {
        if self.buffers.get().is_some() {
            return Err(Error::Invalid(format!(
                "{what} must come before the first plan"
            )));
        }
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

    /// The layers (graph nodes) that are wbwtab's binary activation in a ReLU's place.
    pub fn binary_activations(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&i| {
                matches!(
                    self.layers[i].kind,
                    Kind::Sign | Kind::FusedAct(norm::Act::Sign)
                )
            })
            .collect()
    }

    /// Names of the layers whose weights wbwtab makes binary or ternary.
    pub fn wbwtab_layers(&self) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|l| matches!(l.quantizer, Some(lower::WeightQ::Wbwtab(_))))
            .map(|l| l.name.as_str())
            .collect()
    }

    fn dorefa_layer(&self, i: usize) -> bool {
        self.dorefa.as_ref().is_some_and(|d| d.layers.contains(&i))
    }

    /// Names of the layers whose weights DoReFa quantizes.
    pub fn quantized_layers(&self) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|l| matches!(l.quantizer, Some(lower::WeightQ::Dorefa(_))))
            .map(|l| l.name.as_str())
            .collect()
    }

    /// Every IAO quantizer, in layer order (a layer's input quantizer before its weight's, as
    /// micronet registers them): where its state lives and how a checkpoint names it.
    pub(crate) fn iao_quantizers(&self) -> Vec<IaoInfo> {
        let mut out = Vec::new();
        for l in &self.layers {
            let weight = match &l.quantizer {
                Some(lower::WeightQ::Iao(slot)) => Some(&**slot),
                _ => None,
            };
            let observers = l.observers.iter().map(|s| (s, true));
            let quantizers = l.input_q.iter().chain(weight).map(|s| (s, false));
            for (slot, observer_only) in observers.chain(quantizers) {
                out.push(IaoInfo {
                    observer_only,
                    prefix: slot.prefix.clone(),
                    key_shape: slot.key_shape.clone(),
                    rows: slot.q.rows(),
                    entry: slot.state,
                    code_range: slot.q.code_range(),
                    initial: slot.q.initial_state(),
                });
            }
        }
        out
    }

    /// Every folded conv's state names: `(conv, bn, running_mean entry, running_var entry, flag
    /// entry)`.
    pub(crate) fn folds(&self) -> Vec<FoldInfo> {
        self.layers
            .iter()
            .filter_map(|l| {
                l.fold.as_ref().map(|f| FoldInfo {
                    conv: l.name.clone(),
                    bn: f.bn_name.clone(),
                    running_mean: f.running.0,
                    running_var: f.running.1,
                    flag: f.flag,
                })
            })
            .collect()
    }

    /// The running-arena words that say whether a stateful part has seen data since it was
    /// made or loaded (each IAO quantizer's observer, each fold's running statistics): micronet
    /// keeps them out of its state dict; resume files keep them. `(entry, offset)`.
    pub(crate) fn observed_flags(&self) -> Vec<(usize, usize)> {
        let iao = self
            .iao_quantizers()
            .into_iter()
            .map(|q| (q.entry, q.rows * crate::kernels::iao::ROW_WORDS));
        iao.chain(self.folds().into_iter().map(|f| (f.flag, 0)))
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

    /// BatchNorm running statistics start at mean 0, variance 1 (PyTorch's init); IAO
    /// quantizers at range 0, scale 1, zero point 0.
    fn init_running(&self, gpu: &Gpu) -> Result<()> {
        let mut values: Vec<Vec<f32>> = self
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
        for q in self.iao_quantizers() {
            values[q.entry] = q.initial;
        }
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
        if mode != Mode::Eval && !self.trainable {
            return Err(Error::Invalid(
                "this network was built for evaluation only".into(),
            ));
        }
        let input = at_batch(&self.input, batch)?;
        let labels = at_batch(&self.labels, batch)?;
        let mut fwd = Vec::new();
        let mut bwd: Vec<Vec<Op>> = Vec::new();
        // Which layer each op's GEMM belongs to (`None`: not a weighted layer's GEMM), beside
        // `fwd` and each of `bwd`.
        let mut fwd_layer: Vec<Option<usize>> = Vec::new();
        let mut bwd_layer: Vec<Vec<Option<usize>>> = Vec::new();
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
        if let Some(d) = &self.dorefa {
            fwd.extend(d.q.forward(gpu, &self.param_arena, &d.w_hat)?);
        }
        let tensor = |s: Source| match s {
            Source::Input => Ok(input.clone()),
            Source::Node(k) => at_batch(&buffers[k].out, batch),
        };
        // Ops that form a transient input again (the chain of recomputable layers that made it
        // from kept tensors), by layer.
        let mut x_again: Vec<(usize, Vec<Op>)> = Vec::new();
        let readers = self.readers();
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
            let x = &xs[0];
            let io = Io {
                gpu,
                batch,
                train: mode != Mode::Eval,
                xs: &xs,
                dxs: &dxs,
                y: &y,
                dy: dy.as_ref(),
                buf,
            };
            let (mut f, mut b) = self.layer_ops(i, &io)?;
            if mode == Mode::Train {
                // (The first part added by the conv's grad-input, where it adds it.)
                let in_grad_input = usize::from(self.grad_input_adds_part(l, buf));
                for (part, sum) in buf.accumulate.iter().skip(in_grad_input) {
                    let (part, sum) = (at_batch(part, batch)?, at_batch(sum, batch)?);
                    b.push(Op::Dispatch(crate::kernels::elementwise::accumulate(
                        gpu, &part, &sum,
                    )?));
                }
            }
            let alias = l.kind.is_alias();
            if !alias {
                if buf.transient {
                    // Its consumer's backward forms the whole chain again.
                    x_again.push((i, self.recompute_ops(gpu, i, (x, &y), batch, buf)?));
                } else {
                    // The backward of this layer, and of the chain that fed it, runs next:
                    // form the chain's outputs first, those that a backward reads (and that
                    // the reader's mask pass does not form).
                    let again = std::mem::take(&mut x_again)
                        .into_iter()
                        .filter(|(k, _)| {
                            !buffers[*k].formed_in_mask_pass
                                && readers[*k].iter().any(|&r| self.backward_reads_input(r))
                        })
                        .flat_map(|(_, ops)| ops);
                    b.splice(0..0, again.collect::<Vec<_>>());
                }
            }
            if let Some(c) = checker.as_deref_mut() {
                let what = format!(
                    "layer {i} ({} {})",
                    self.graph.nodes[i].layer.kind(),
                    l.name
                );
                // (A BatchNorm formed by its reader has no output of its own to check.)
                if !buf.formed_by_reader {
                    f.push(c.check(gpu, format!("output of {what}"), &y)?);
                }
                // A DoReFa weight's gradient is formed after the whole backward pass.
                let weight = l.weight.filter(|_| !self.dorefa_layer(i));
                for idx in [weight, l.bias].into_iter().flatten() {
                    let e = &self.params.entries()[idx];
                    b.push(c.check(
                        gpu,
                        format!("gradient of {}", e.name),
                        &self.params.view(&self.grad_arena, idx)?,
                    )?);
                }
                // (A BatchNorm whose backward the conv before applies writes no input gradient.)
                for d in dxs.iter().flatten().filter(|_| buf.stats_from.is_none()) {
                    b.push(c.check(gpu, format!("gradient into the input of {what}"), d)?);
                }
            }
            let weighted = matches!(l.kind, Kind::Weighted { .. });
            let tag = |op: &Op| (weighted && paths::gemm_of(op, false).is_some()).then_some(i);
            fwd_layer.resize(fwd.len(), None);
            fwd_layer.extend(f.iter().map(tag));
            bwd_layer.push(b.iter().map(tag).collect());
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
        if let Some(c) = checker.as_deref_mut() {
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
        let mut gemms = Vec::new();
        let mut push = |ops: &mut Recorder, op: Op, layer: Option<usize>, in_backward: bool| {
            if let (Some(i), Some((direction, coop))) = (layer, paths::gemm_of(&op, in_backward)) {
                gemms.push(PlanGemm {
                    op: ops.len(),
                    layer: self.layers[i].name.clone(),
                    direction,
                    coop,
                });
            }
            ops.push_op(op);
        };
        // (The loss and metrics came after the layers.)
        fwd_layer.resize(fwd.len(), None);
        for (op, layer) in fwd.into_iter().zip(fwd_layer) {
            push(&mut ops, op, layer, false);
        }
        if mode == Mode::Train {
            for (b, layers) in bwd.into_iter().zip(bwd_layer).rev() {
                for (op, layer) in b.into_iter().zip(layers) {
                    push(&mut ops, op, layer, true);
                }
            }
            if let Some(d) = &self.dorefa {
                let dw_hat = d.dw_hat.as_ref().expect("a trainable network has dL/dŴ");
                for op in d.q.backward(gpu, dw_hat, &self.grad_arena)? {
                    ops.push_op(op);
                }
                if let Some(c) = checker {
                    for &i in &d.layers {
                        let idx = self.layers[i].weight.expect("DoReFa layers have weights");
                        ops.push_op(c.check(
                            gpu,
                            format!("gradient of {}", self.params.entries()[idx].name),
                            &self.params.view(&self.grad_arena, idx)?,
                        )?);
                    }
                }
            }
        }
        Ok(Plan {
            batch,
            mode,
            ops,
            input,
            labels,
            gemms,
        })
    }

    /// Whether layer `i`'s backward reads its input, so that a transient input read only by
    /// layers that do not is not formed again for the backward pass. All but: a float average
    /// pool (its input gradient is the output gradient spread over each window), a float add
    /// (each summand's gradient is the output's, masked by its own output where a ReLU is
    /// fused), a ReLU (masked by its output) and a channel shuffle (the inverse shuffle).
    fn backward_reads_input(&self, i: usize) -> bool {
        let l = &self.layers[i];
        match l.kind {
            Kind::AvgPool(_) | Kind::Add { .. } => l.input_q.is_some(),
            Kind::Relu | Kind::Shuffle(_) => false,
            _ => true,
        }
    }

    /// The forward op of transient layer `i` again, into the same temporary: the same kernel on
    /// the same inputs, so the same bits.
    fn recompute_ops(
        &self,
        gpu: &Gpu,
        i: usize,
        (x, y): (&Tensor, &Tensor),
        batch: usize,
        buf: &LayerBuffers,
    ) -> Result<Vec<Op>> {
        let l = &self.layers[i];
        match l.kind {
            Kind::BatchNorm { .. } => Ok(vec![batchnorm::recompute(gpu, self, l, x, y, batch)?]),
            Kind::Shuffle(_) => Ok(vec![shuffle::recompute(gpu, l, x, y)?]),
            Kind::MaxPool(_) => {
                let input_bn = buf.reads_bn[0].map(|k| self.bn_form(k)).transpose()?;
                Ok(vec![pool::recompute(l, gpu, (x, y), batch, input_bn)?])
            }
            _ => Err(Error::Invalid(format!(
                "layer {} cannot be recomputed",
                l.name
            ))),
        }
    }

    /// Forward and backward ops of layer `i`, each node kind in its own module.
    fn layer_ops(&self, i: usize, io: &Io) -> Result<Ops> {
        let l = &self.layers[i];
        match l.kind {
            Kind::Weighted { .. } => weighted::ops(self, l, io),
            Kind::BatchNorm { .. } => batchnorm::ops(self, l, io),
            Kind::MaxPool(_) | Kind::AvgPool(_) => pool::ops(self, l, io),
            Kind::Shuffle(_) => shuffle::ops(l, io),
            Kind::Relu => elementwise::relu(l, io),
            Kind::Sign => elementwise::sign(l, io),
            Kind::Add { .. } => elementwise::add(self, l, io),
            // Aliases: the layer before did the work.
            Kind::FusedAct(_) | Kind::FoldedBn | Kind::FusedShuffle | Kind::Flatten => {
                Ok((Vec::new(), Vec::new()))
            }
        }
    }

    /// A parameter's view in the parameter arena.
    fn param(&self, idx: Option<usize>) -> Result<Option<Tensor>> {
        idx.map(|k| self.params.view(&self.param_arena, k))
            .transpose()
    }

    /// A parameter's gradient's view in the gradient arena.
    fn grad(&self, idx: Option<usize>) -> Result<Option<Tensor>> {
        idx.map(|k| self.params.view(&self.grad_arena, k))
            .transpose()
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
