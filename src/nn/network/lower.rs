//! Lowering: the model's graph (leaf layers in registration order) becomes the network's layers,
//! each with its kind, its parameters' places in the arenas, its quantizer and its
//! batch-independent buffers; then the fusions fold what they can into the BatchNorms. Every
//! fusion rule is in [`fuse`].

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::kernels::bnfold::BnFold;
use crate::kernels::iao::IaoQuantizer;
use crate::kernels::norm::{Act, Epilogue};
use crate::kernels::quant::WeightQuantizers;
use crate::kernels::wbwtab::WbwtabWeights;
use crate::models::{Graph, LayerSpec, Source};
use crate::nn::params::Layout;
use crate::quant::iao::{Operand, Spec};
use crate::quant::{ActQuant, Bits, QuantConfig, Role, Scheme, WeightQuant};

#[derive(Clone, Copy, Debug)]
pub(super) enum WeightedOp {
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
pub(super) enum Kind {
    Weighted {
        op: WeightedOp,
        /// How its input is quantized (an IAO quantizer's state is the layer's `input_q`).
        input: ActQuant,
    },
    BatchNorm {
        eps: f32,
        momentum: f32,
        /// The ReLU and channel shuffle that follow it, done in its kernels.
        ep: Epilogue,
    },
    Relu,
    /// wbwtab's binary activation in a ReLU's place: `B(x)`, gradient where −1 < x < 1 (a
    /// `FusedAct` where the BatchNorm before it applies it).
    Sign,
    /// A ReLU (or wbwtab's sign) folded into the BatchNorm (or float add) before it: its output
    /// is that layer's.
    FusedAct(Act),
    /// A BatchNorm folded into the conv before it (IAO `bn_fuse`): its output is the conv's.
    FoldedBn,
    MaxPool(PoolWindow),
    AvgPool(PoolWindow),
    Shuffle(usize),
    /// A channel shuffle folded into the BatchNorm (and ReLU) before it: its output is the BN's.
    FusedShuffle,
    Flatten,
    /// The sum of its inputs (a residual block's); float, as micronet's DoReFa leaves `Add`.
    /// `relu`: the ReLU after it, done in its pass (that ReLU is then a `FusedAct`).
    Add {
        relu: bool,
    },
}

impl Kind {
    /// The layer's output is its input's buffer (the work, if any, is done by the layer before).
    pub(super) fn is_alias(&self) -> bool {
        matches!(
            self,
            Kind::FusedAct(_) | Kind::FoldedBn | Kind::FusedShuffle | Kind::Flatten
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct PoolWindow {
    pub(super) kernel: (usize, usize),
    pub(super) stride: (usize, usize),
    pub(super) padding: (usize, usize),
    /// Max-pool: the channel shuffle fused after it, in this many groups (1: none).
    pub(super) shuffle: usize,
}

/// A layer with its parameters' places in the arenas and its batch-independent buffers.
pub(super) struct Layer {
    pub(super) name: String,
    pub(super) kind: Kind,
    /// The tensors it reads (one, or several for an add).
    pub(super) inputs: Vec<Source>,
    pub(super) in_shape: Vec<usize>,
    pub(super) out_shape: Vec<usize>,
    /// Weight / gamma and bias / beta in the parameter arena.
    pub(super) weight: Option<usize>,
    pub(super) bias: Option<usize>,
    /// running_mean, running_var in the running arena.
    pub(super) running: Option<(usize, usize)>,
    pub(super) quantizer: Option<WeightQ>,
    /// An IAO quantizer of the input (weighted layers, pools and adds under IAO; an add's
    /// quantizes both summands with the union of `observers`' ranges).
    pub(super) input_q: Option<IaoSlot>,
    /// An IAO add's observers of its two inputs (micronet's `observer_res`, `observer_shortcut`).
    pub(super) observers: Vec<IaoSlot>,
    /// IAO `bn_fuse`: the BatchNorm folded into this conv.
    pub(super) fold: Option<FoldSlot>,
    /// The quantized weight Ŵ and (training) dL/dŴ.
    pub(super) w_hat: Option<Tensor>,
    pub(super) dw_hat: Option<Tensor>,
    pub(super) bn_stats: Option<Tensor>,
    /// Which of its GEMMs may run on cooperative matrices (see `paths`).
    pub(super) coop: super::CoopUse,
}

/// The running-arena entry (`{conv}.bn_fold_observed`) saying whether a folded conv's running
/// statistics were ever set: not a state-dict key (micronet's `num_flag`), kept by resume files.
pub(super) const FOLD_FLAG: &str = "bn_fold_observed";

/// A weight quantizer of any scheme.
pub(super) enum WeightQ {
    /// Run for every DoReFa layer at once by the network's [`DorefaWeights`].
    Dorefa(Bits),
    Iao(Box<IaoSlot>),
    Wbwtab(WbwtabWeights),
}

/// An IAO quantizer and where its state lives: an entry of the running-statistics arena (saved,
/// restored and snapshotted with the BatchNorm statistics), written to checkpoints under
/// micronet's keys `{prefix}.scale`, `.zero_point`, `.eps`, `.quant_min_val`, `.quant_max_val`,
/// `.observer.min_val`, `.observer.max_val`.
pub(super) struct IaoSlot {
    pub(super) q: IaoQuantizer,
    /// Its entry in the running arena.
    pub(super) state: usize,
    /// e.g. `model.0.conv.activation_quantizer`.
    pub(super) prefix: String,
    /// micronet's shape of scale, zero point and the observer's range: `[1]` per tensor,
    /// `[C, 1, 1, 1]` per conv channel, `[C, 1]` per Linear row.
    pub(super) key_shape: Vec<usize>,
}

impl IaoSlot {
    fn new(
        gpu: &Gpu,
        spec: Spec,
        shape: &[usize],
        prefix: String,
        running: &mut Layout,
    ) -> Result<IaoSlot> {
        let q = IaoQuantizer::new(gpu, &prefix, spec, shape)?;
        let key_shape = if q.rows() > 1 {
            std::iter::once(shape[0])
                .chain(std::iter::repeat_n(1, shape.len() - 1))
                .collect()
        } else {
            vec![1]
        };
        Ok(IaoSlot {
            state: running.add(prefix.clone(), &[q.state_len()]),
            q,
            prefix,
            key_shape,
        })
    }
}

/// A conv with the BatchNorm folded into it: the fold's buffers and where its parameters
/// (`{conv}.gamma`, `{conv}.beta`) and running statistics (`{conv}.running_mean`,
/// `{conv}.running_var`, micronet's keys; and whether they were ever set) live.
pub(super) struct FoldSlot {
    pub(super) fold: BnFold,
    /// The folded BatchNorm's name: a float checkpoint's `{bn}.weight` ... start the fold.
    pub(super) bn_name: String,
    pub(super) gamma: usize,
    pub(super) beta: usize,
    pub(super) running: (usize, usize),
    pub(super) flag: usize,
}

/// A layer's role for [`QuantConfig::resolve`]: `sole_bn`, whether its only reader is a
/// BatchNorm.
fn role(ls: &LayerSpec, sole_bn: bool) -> Role {
    match ls {
        LayerSpec::Conv { .. } if sole_bn => Role::ConvBeforeBn,
        LayerSpec::Conv { .. } => Role::Conv,
        LayerSpec::ConvTranspose { .. } => Role::ConvTranspose,
        LayerSpec::Linear { .. } => Role::Linear,
        LayerSpec::MaxPool { .. }
        | LayerSpec::AvgPool { .. }
        | LayerSpec::AdaptiveAvgPool { .. } => Role::Pool,
        LayerSpec::Add { .. } => Role::Add,
        LayerSpec::Relu => Role::Relu,
        _ => Role::Other,
    }
}

/// The layers of `graph`, fused, with their parameters added to `params` and their running
/// statistics (and IAO quantizer states) to `running`. Which layers are quantized, and how, is
/// [`QuantConfig::resolve`]'s to say (micronet's `prepare()` for the scheme).
pub(super) fn lower(
    gpu: &Gpu,
    graph: &Graph,
    quant: QuantConfig,
    capacity: usize,
    trainable: bool,
    params: &mut Layout,
    running: &mut Layout,
) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let consumers = graph.consumers();
    let sole_bn = |i: usize| match consumers[i][..] {
        [j] => matches!(graph.nodes[j].layer, LayerSpec::BatchNorm { .. }).then_some(j),
        _ => None,
    };
    let roles: Vec<Role> = (0..graph.nodes.len())
        .map(|i| role(&graph.nodes[i].layer, sole_bn(i).is_some()))
        .collect();
    let plan = quant.resolve(&roles);
    // The BatchNorms folded into the convs before them.
    let folded: Vec<usize> = (0..graph.nodes.len())
        .filter(|&i| plan[i].fold)
        .filter_map(sole_bn)
        .collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        let ls = &node.layer;
        let name = node.name.clone();
        let (in_shape, out_shape) = (node.in_shape.clone(), node.out_shape.clone());
        let lq = plan[i];
        // An IAO input quantizer: per tensor, over batches up to the network's capacity.
        let input_q = match lq.input {
            ActQuant::Iao {
                bits,
                q_type,
                histogram,
            } => Some(IaoSlot::new(
                gpu,
                Spec {
                    histogram,
                    ..Spec::activation(bits, q_type)
                },
                &std::iter::once(capacity)
                    .chain(in_shape.iter().copied())
                    .collect::<Vec<_>>(),
                format!("{name}.activation_quantizer"),
                running,
            )?),
            _ => None,
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
            input_q,
            observers: Vec::new(),
            fold: None,
            w_hat: None,
            dw_hat: None,
            bn_stats: None,
            coop: Default::default(),
        };
        let weighted = |op: WeightedOp,
                        w_shape: Vec<usize>,
                        bias: bool,
                        out: usize,
                        layer: &mut Layer,
                        params: &mut Layout,
                        running: &mut Layout|
         -> Result<()> {
            layer.kind = Kind::Weighted {
                op,
                input: lq.input,
            };
            layer.weight = Some(params.add(format!("{name}.weight"), &w_shape));
            layer.bias = bias.then(|| params.add(format!("{name}.bias"), &[out]));
            layer.quantizer = match lq.weight {
                WeightQuant::Float => None,
                WeightQuant::Dorefa(b) => Some(WeightQ::Dorefa(b)),
                WeightQuant::Wbwtab(kind) => Some(WeightQ::Wbwtab(WbwtabWeights::new(
                    gpu, &name, kind, &w_shape,
                )?)),
                WeightQuant::Iao {
                    bits,
                    q_type,
                    per_channel,
                    observer,
                } => {
                    let spec = Spec {
                        bits,
                        q_type,
                        operand: Operand::Weight,
                        observer,
                        per_channel,
                        histogram: None,
                    };
                    let prefix = format!("{name}.weight_quantizer");
                    Some(WeightQ::Iao(Box::new(IaoSlot::new(
                        gpu, spec, &w_shape, prefix, running,
                    )?)))
                }
            };
            // DoReFa layers' Ŵ and dL/dŴ are views of their group's buffers (`dorefa_weights`).
            if layer.quantizer.is_some() && !matches!(layer.quantizer, Some(WeightQ::Dorefa(_))) {
                layer.w_hat =
                    Some(gpu.zeros(&format!("{name} quantized weight"), &w_shape, DType::F32)?);
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
                let w_shape = vec![*out, in_shape[0] / groups, kernel.0, kernel.1];
                weighted(
                    op,
                    w_shape.clone(),
                    *bias,
                    *out,
                    &mut layer,
                    params,
                    running,
                )?;
                if lq.fold {
                    let bn = sole_bn(i).expect("a fold has its BatchNorm");
                    let LayerSpec::BatchNorm { eps, momentum, .. } = graph.nodes[bn].layer else {
                        unreachable!("sole_bn finds BatchNorms")
                    };
                    let (pretrained, calib) = match quant.scheme {
                        Scheme::Iao(o) => (o.pretrained_model, o.bn_fuse_calib),
                        _ => (false, false),
                    };
                    layer.fold = Some(FoldSlot {
                        fold: BnFold::new(
                            gpu,
                            &name,
                            &w_shape,
                            (eps, momentum),
                            pretrained,
                            calib,
                        )?,
                        bn_name: graph.nodes[bn].name.clone(),
                        gamma: params.add(format!("{name}.gamma"), &[*out]),
                        beta: params.add(format!("{name}.beta"), &[*out]),
                        running: (
                            running.add(format!("{name}.running_mean"), &[*out]),
                            running.add(format!("{name}.running_var"), &[*out]),
                        ),
                        flag: running.add(format!("{name}.{FOLD_FLAG}"), &[1]),
                    });
                }
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
                    params,
                    running,
                )?;
            }
            LayerSpec::Linear { out, bias, .. } => {
                weighted(
                    WeightedOp::Linear,
                    vec![*out, in_shape[0]],
                    *bias,
                    *out,
                    &mut layer,
                    params,
                    running,
                )?;
            }
            LayerSpec::BatchNorm { .. } if folded.contains(&i) => layer.kind = Kind::FoldedBn,
            LayerSpec::BatchNorm { eps, momentum, .. } => {
                let c = in_shape[0];
                layer.kind = Kind::BatchNorm {
                    eps: *eps,
                    momentum: *momentum,
                    ep: Epilogue::NONE,
                };
                layer.weight = Some(params.add(format!("{name}.weight"), &[c]));
                layer.bias = Some(params.add(format!("{name}.bias"), &[c]));
                layer.running = Some((
                    running.add(format!("{name}.running_mean"), &[c]),
                    running.add(format!("{name}.running_var"), &[c]),
                ));
                layer.bn_stats = Some(gpu.zeros(
                    &format!("{name} batch statistics"),
                    &[crate::kernels::norm::TABLE * c],
                    DType::F32,
                )?);
            }
            LayerSpec::Relu if lq.binary => layer.kind = Kind::Sign,
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
                    shuffle: 1,
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
                    shuffle: 1,
                });
            }
            LayerSpec::Shuffle { groups } => layer.kind = Kind::Shuffle(*groups),
            LayerSpec::Flatten => layer.kind = Kind::Flatten,
            LayerSpec::Add { .. } => {
                layer.kind = Kind::Add { relu: false };
                if let ActQuant::Iao {
                    bits,
                    q_type,
                    histogram,
                } = lq.input
                {
                    if node.inputs.len() != 2 {
                        return Err(Error::Invalid(format!(
                            "layer {name}: IAO's QuantAdd adds two tensors, this add has {}; use adds of two",
                            node.inputs.len()
                        )));
                    }
                    let shape: Vec<usize> = std::iter::once(capacity)
                        .chain(in_shape.iter().copied())
                        .collect();
                    for which in ["observer_res", "observer_shortcut"] {
                        layer.observers.push(IaoSlot::new(
                            gpu,
                            Spec {
                                histogram,
                                ..Spec::activation(bits, q_type)
                            },
                            &shape,
                            format!("{name}.{which}"),
                            running,
                        )?);
                    }
                }
            }
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
    Ok(layers)
}

/// The DoReFa weight quantizers of every layer, run as one group: three launches forward (at
/// the start of a step: no weight depends on the batch) and three backward (at the end, when
/// every dL/dŴ is formed), whatever the depth. Ŵ and dL/dŴ of all layers lie in two buffers of
/// the group's layout, each layer's a view.
pub(super) struct DorefaWeights {
    pub(super) q: WeightQuantizers,
    pub(super) w_hat: Tensor,
    pub(super) dw_hat: Option<Tensor>,
    /// The layers it covers, in member order.
    pub(super) layers: Vec<usize>,
}

/// Groups the DoReFa layers' weight quantizers and gives each layer its Ŵ and dL/dŴ views
/// (None without a DoReFa layer).
pub(super) fn dorefa_weights(
    gpu: &Gpu,
    layers: &mut [Layer],
    params: &Layout,
    trainable: bool,
) -> Result<Option<DorefaWeights>> {
    let mut members = Vec::new();
    let mut covered = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if let (Some(WeightQ::Dorefa(bits)), Some(w)) = (&l.quantizer, l.weight) {
            let e = &params.entries()[w];
            members.push((*bits, e.shape.clone(), e.offset));
            covered.push(i);
        }
    }
    if members.is_empty() {
        return Ok(None);
    }
    let q = WeightQuantizers::new(gpu, &members)?;
    let w_hat = gpu.zeros("quantized weights", &[q.len()], DType::F32)?;
    let dw_hat = trainable
        .then(|| gpu.zeros("quantized weight gradients", &[q.len()], DType::F32))
        .transpose()?;
    for (j, &i) in covered.iter().enumerate() {
        layers[i].w_hat = Some(q.view(&w_hat, j)?);
        layers[i].dw_hat = dw_hat.as_ref().map(|d| q.view(d, j)).transpose()?;
    }
    Ok(Some(DorefaWeights {
        q,
        w_hat,
        dw_hat,
        layers: covered,
    }))
}

/// The fusions of the lowered graph, all in one place. Each folds a layer into the BatchNorm
/// (or add, or max-pool) whose output it reads, and applies only where nothing else reads that
/// output (so no reader sees the fused result in place of the tensor it asked for):
///
/// 1. BatchNorm → ReLU (or wbwtab's sign in its place): the activation reads only the
///    BatchNorm's output, which nothing else reads. The BatchNorm applies it (`Epilogue::act`);
///    the activation layer is an alias of its output.
/// 2. BatchNorm [→ fused activation] → channel shuffle: likewise for the shuffle (and the fused
///    activation's output); the BatchNorm writes its output shuffled (`Epilogue::shuffle`), so the
///    unshuffled tensor never exists.
/// 3. Max-pool → channel shuffle: likewise; the max-pool writes its output shuffled
///    (`PoolWindow::shuffle`) and reads its gradient where the shuffle put it.
/// 4. Float add of two → ReLU (a residual block's output): the add applies the ReLU
///    (`Kind::Add::relu`) and masks the gradient it passes on; the ReLU is an alias of its
///    output. (IAO's QuantAdd keeps its ReLU.)
///
/// The memory planner (`memory.rs`) adds the last one: a BatchNorm or max-pool whose output
/// only a quantized layer reads, and which is formed again for the backward pass anyway, writes
/// it quantized (`Epilogue::quantize`, `LayerBuffers::quantize_output`).
pub(super) fn fuse(layers: &mut [Layer], consumers: &[Vec<usize>]) {
    let only_reader = |k: usize, i: usize| consumers[k] == [i];
    for i in 0..layers.len() {
        let [Source::Node(k)] = layers[i].inputs[..] else {
            continue;
        };
        match layers[i].kind {
            Kind::Relu | Kind::Sign if only_reader(k, i) => {
                let act = match layers[i].kind {
                    Kind::Sign => Act::Sign,
                    _ => Act::Relu,
                };
                // A float add of two (IAO's QuantAdd quantizes its sum's inputs, not its output).
                let float_add = layers[k].input_q.is_none() && layers[k].inputs.len() == 2;
                match &mut layers[k].kind {
                    Kind::BatchNorm { ep, .. } => ep.act = act,
                    Kind::Add { relu } if float_add && act == Act::Relu => *relu = true,
                    _ => continue,
                }
                layers[i].kind = Kind::FusedAct(act);
            }
            Kind::Shuffle(groups) if only_reader(k, i) => {
                let bn = match (layers[k].kind, &layers[k].inputs[..]) {
                    (Kind::FusedAct(_), &[Source::Node(b)]) => b,
                    _ => k,
                };
                match &mut layers[bn].kind {
                    Kind::BatchNorm { ep, .. } if ep.shuffle == 1 => ep.shuffle = groups,
                    Kind::MaxPool(win) if win.shuffle == 1 => win.shuffle = groups,
                    _ => continue,
                }
                layers[i].kind = Kind::FusedShuffle;
            }
            _ => {}
        }
    }
}
