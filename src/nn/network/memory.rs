//! Where a network's activations and gradients live: which outputs are kept for the backward
//! pass and which are recomputed, the shared temporaries, and the gradient buffers.

use super::{Gemm, Kind, Layer, Network, WeightedOp, with_batch};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};
use crate::kernels::{conv2d, maxpool, norm};
use crate::models::Source;
use crate::quant::{ActQuant, Bits};

/// Where a layer's output gradient lives (see [`Network::alloc_buffers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GradPlace {
    /// The layer's source's (aliases).
    Alias,
    /// Its own output buffer: the BatchNorm after it writes the gradient there in place.
    Own,
    /// One of the shared gradient buffers (two for a chain; more where a gradient must outlive
    /// others, as a residual block's input gradient outlives the block's backward pass).
    Slot(usize),
}

/// Where a weighted layer's quantized input activation x̂ lives.
#[derive(Clone, Debug)]
pub(super) enum QuantInput {
    /// The layer takes its input as it is (a float layer).
    Float,
    /// In a shared temporary: quantized there in the forward pass, and again for grad-weight
    /// after the input gradient took the quantizer's mask from the float input.
    Temporary(Tensor),
    /// Where the input lies: the input is formed again for the backward pass anyway (a
    /// recomputed BatchNorm or shuffle output), so quantizing it over itself loses nothing.
    InPlace,
    /// As `InPlace`, but the input arrives quantized: the BatchNorm that makes it applies this
    /// layer's quantizer in its own kernel (`LayerBuffers::quantize_output`).
    ByProducer,
    /// Nowhere: the input is BatchNorm layer `k`'s output (with its activation and shuffle),
    /// which is never stored; the conv's GEMMs form it (quantized, where the conv quantizes
    /// its input) where they load it, from the
    /// BatchNorm's input (kept for the BatchNorm's backward anyway) and its statistics.
    ThroughBn(usize),
    /// Nowhere: the conv's forward and grad-weight GEMMs quantize the stored float input where
    /// they load it (kept anyway: grad-input's mask reads it), as a residual block's first conv
    /// reads the block's output.
    OnLoad,
}

/// Buffers of one layer at the capacity batch; plans take views of their first rows.
pub(super) struct LayerBuffers {
    pub(super) out: Tensor,
    pub(super) dout: Option<Tensor>,
    /// A weighted layer's quantized input, or its float input formed through the BatchNorm
    /// before (`ThroughBn`); `Float` for every other layer.
    pub(super) xq: QuantInput,
    /// The output lives in a shared temporary and is recomputed for the backward pass.
    pub(super) transient: bool,
    /// A BatchNorm whose output is never stored: its reader forms it (`QuantInput::ThroughBn`).
    /// `out` is then the BatchNorm's input, which the reader reads in its place.
    pub(super) formed_by_reader: bool,
    /// Per input, the BatchNorm whose output this layer forms where it reads that input (a
    /// conv's `QuantInput::ThroughBn` too): the input is then that BatchNorm's input.
    pub(super) reads_bn: Vec<Option<usize>>,
    /// A BatchNorm that takes its training statistics from the conv before it (`stats_from`,
    /// the conv's index): the per-tile partials the conv's forward GEMM forms, in a scratch
    /// shared by all (each is merged right after its conv); set on both layers. A 1×1 conv (or
    /// one without grad-input) also applies the BatchNorm's backward where its GEMMs load its
    /// output gradient (`backward_by_conv`): the BatchNorm's backward only reduces, and the
    /// conv has `bn_after`, the BatchNorm and its output gradient.
    pub(super) bn_partials: Option<Tensor>,
    pub(super) stats_from: Option<usize>,
    pub(super) bn_after: Option<(usize, Tensor)>,
    /// On such a BatchNorm: the conv applies its backward (it has `bn_after`; see
    /// `Network::bn_backward_by_conv`). Otherwise the BatchNorm applies it itself, in place
    /// over the conv output (the conv output's gradient takes its place).
    pub(super) backward_by_conv: bool,
    /// The sums of a BatchNorm's backward reduction, formed by the layer that reads its output
    /// (`reads_bn`) as it writes the BatchNorm's output gradient (a conv's grad-input epilogue,
    /// a max-pool's backward), where that BatchNorm's backward only reduces (`stats_from`), or
    /// by the IAO pass that masks that gradient (`masks_through_bn`): set on both, with
    /// `sums_from` (the reader's index) on the BatchNorm, which then adds them up instead of
    /// reducing its input and output gradient. The same scratch as `bn_partials` (each user is
    /// done with it before the next one writes).
    pub(super) bn_sums: Option<Tensor>,
    pub(super) sums_from: Option<usize>,
    /// Grad-weight's split-K partial sums: one scratch shared by all layers.
    pub(super) split_k: Option<Tensor>,
    /// A folded conv's second input gradient (through its float conv's statistics): one
    /// scratch shared by all folds.
    pub(super) fold_dx: Option<Tensor>,
    /// A BatchNorm whose output only feeds a layer that quantizes it in place: its forward
    /// applies that layer's activation quantizer at once (the backward forms the float output
    /// again, as before).
    pub(super) quantize_output: Option<Bits>,
    /// A BatchNorm whose output only feeds an IAO input quantizer (of layer `extremes_for`)
    /// writes the extremes of that output as it writes it, in training, so that the quantizer's
    /// observer only merges them (`observed_by_producer` on the reader) instead of reading the
    /// output again.
    pub(super) extremes_for: Option<usize>,
    pub(super) observed_by_producer: bool,
    /// A conv whose IAO-quantized input is a recomputed BatchNorm's output (layer `.0`, whose
    /// input is `.1`): its backward forms that output again, masks its input gradient and
    /// quantizes the output for grad-weight in one pass after grad-input (`norm::apply_iao`),
    /// so the BatchNorm's output is not formed again before (`formed_in_mask_pass` on the
    /// BatchNorm); a pool likewise, around its backward.
    pub(super) masks_through_bn: Option<(usize, Tensor)>,
    pub(super) formed_in_mask_pass: bool,
    /// Where the backward pass writes the gradient of each input (`None`: not needed). The first
    /// reader of a tensor writes its gradient buffer; later readers write their own.
    pub(super) din: Vec<Option<Tensor>>,
    /// `(part, sum)`: after this layer's backward pass (the last of its input's readers to run
    /// backward), `sum += part` for each later reader's part, in reader order: the first in
    /// a conv's grad-input as it writes `sum` (`Network::grad_input_adds_part`), the rest in
    /// passes.
    pub(super) accumulate: Vec<(Tensor, Tensor)>,
}

impl Network {
    /// The layer whose buffer holds `s` (aliases resolved to their source), or `None` for the
    /// network's input.
    pub(super) fn root(&self, mut s: Source) -> Option<usize> {
        while let Source::Node(k) = s {
            if !self.layers[k].kind.is_alias() {
                return Some(k);
            }
            s = self.layers[k].inputs[0];
        }
        None
    }

    /// For each layer, the layers (not aliases) that read the tensor in its buffer, in order.
    pub(super) fn readers(&self) -> Vec<Vec<usize>> {
        let mut readers = vec![Vec::new(); self.layers.len()];
        for (i, l) in self.layers.iter().enumerate() {
            if l.kind.is_alias() {
                continue;
            }
            for &s in &l.inputs {
                if let Some(r) = self.root(s) {
                    readers[r].push(i);
                }
            }
        }
        readers
    }

    /// Which layers' outputs are transient: cheap to recompute exactly from what is kept
    /// (BatchNorm from its input and batch statistics, a channel shuffle or a max-pool from its
    /// input), so they
    /// live in one of two shared temporaries and are formed again at the start of their
    /// consumer's backward. A transient output has one reader, the next layer (so it is alive
    /// only from one layer to the next, as in a chain, also inside a residual block), and chains
    /// stop at two so that a chain's outputs sit in different temporaries.
    /// Returns per layer 0 (kept, an alias, or `formed` by its reader: no place at all), or the
    /// temporary (1 or 2) its output lives in.
    pub(super) fn transient_layers(&self, formed: &[bool]) -> Vec<usize> {
        let n = self.layers.len();
        let mut transient = vec![0usize; n];
        if !self.recompute {
            return transient;
        }
        let readers = self.readers();
        // Chain length of each layer's output: 0 stored, 1 or 2 transient (aliases follow).
        let mut depth = vec![0usize; n];
        for i in 0..n {
            let input_depth = self.root(self.layers[i].inputs[0]).map_or(0, |k| depth[k]);
            if self.layers[i].kind.is_alias() {
                depth[i] = input_depth;
                continue;
            }
            if formed[i] {
                continue;
            }
            // (A max-pool that quantizes its own input keeps its output: IAO's.)
            let recomputable = match self.layers[i].kind {
                Kind::BatchNorm { .. } | Kind::Shuffle(_) => true,
                Kind::MaxPool(_) => self.layers[i].input_q.is_none(),
                _ => false,
            };
            let next = (i + 1..n).find(|&k| !self.layers[k].kind.is_alias());
            let read_next_only = next.is_some_and(|k| readers[i] == [k]);
            if recomputable && read_next_only && input_depth < 2 {
                depth[i] = input_depth + 1;
                transient[i] = depth[i];
            }
        }
        transient
    }

    /// Per layer, the conv whose forward GEMM forms its BatchNorm statistics, if any: a
    /// BatchNorm whose input is a conv2d's output (not folded) that nothing else reads.
    pub(super) fn stats_from_conv(&self) -> Vec<Option<usize>> {
        let readers = self.readers();
        (0..self.layers.len())
            .map(|k| {
                let bn = &self.layers[k];
                let i = self.root(bn.inputs[0])?;
                let l = &self.layers[i];
                let conv = matches!(
                    l.kind,
                    Kind::Weighted {
                        op: WeightedOp::Conv { .. },
                        ..
                    }
                ) && l.fold.is_none();
                (matches!(bn.kind, Kind::BatchNorm { .. }) && conv && readers[i] == [k])
                    .then_some(i)
            })
            .collect()
    }

    /// Per layer, the conv that applies a BatchNorm's backward where its backward GEMMs load
    /// that BatchNorm's output gradient (the conv's `bn_after`), if any: those of
    /// [`Self::stats_from_conv`] whose GEMMs load each element of it once, a 1×1 conv or one
    /// with no grad-input (the network's first). A larger kernel's grad-input loads each
    /// element once per tap (9 times for 3×3) and would form the BatchNorm's backward as many
    /// times over (on lavapipe that made NIN-GC's 3×3 grad-inputs 1.4x to 1.5x slower than
    /// with the values in memory): there the BatchNorm applies its backward in a pass, in
    /// place, and the conv loads the result.
    pub(super) fn bn_backward_by_conv(&self) -> Vec<Option<usize>> {
        let needed = self.grad_needed();
        let loads_once = |i: usize| {
            let l = &self.layers[i];
            let one_by_one = matches!(
                l.kind,
                Kind::Weighted {
                    op: WeightedOp::Conv { kernel: (1, 1), .. },
                    ..
                }
            );
            let grad_input = self.root(l.inputs[0]).is_some_and(|k| needed[k]);
            one_by_one || !grad_input || self.bn_backward_in_every_conv
        };
        self.stats_from_conv()
            .into_iter()
            .map(|conv| conv.filter(|&i| loads_once(i)))
            .collect()
    }

    /// Per layer, the layer that forms a BatchNorm's backward sums, if any: a BatchNorm whose
    /// reader forms its output (`through`) and can form them (`bn_sums_len`), and whose backward
    /// only reduces (`stats_from`: the conv before applies the rest).
    fn bn_sums_by(
        &self,
        through: &[Option<usize>],
        stats_from: &[Option<usize>],
    ) -> Vec<Option<usize>> {
        let mut by = vec![None; self.layers.len()];
        if !self.bn_sums {
            return by;
        }
        for (i, k) in through.iter().enumerate() {
            if let Some(k) = *k
                && self.bn_sums_len(i, self.capacity).is_some()
                && stats_from[k].is_some()
            {
                by[k] = Some(i);
            }
        }
        by
    }

    /// The floats of BatchNorm backward sums layer `i` forms at `batch` where it reads a
    /// BatchNorm's output: a conv's grad-input (any geometry), a max-pool's backward (where its
    /// rows fit bands); `None` for other layers.
    fn bn_sums_len(&self, i: usize, batch: usize) -> Option<usize> {
        let l = &self.layers[i];
        match l.kind {
            Kind::Weighted {
                op: op @ WeightedOp::Conv { .. },
                ..
            } => match Gemm::new(op, batch, &l.in_shape, &l.out_shape) {
                Gemm::Conv(g) => Some(conv2d::grad_input_bn_sums(&g)),
                _ => None,
            },
            Kind::MaxPool(_) => {
                let g = super::pool::geometry(l, batch).ok()?;
                maxpool::bn_sum_tiles(&g).map(|tiles| 2 * tiles * g.c)
            }
            _ => None,
        }
    }

    /// Per layer and input, the BatchNorm whose output it forms where it reads that input, if
    /// any: a conv whose input is DoReFa-quantized or float (in its GEMMs' loads), a max-pool that
    /// quantizes no input of its own, or a float add (a residual block's last BatchNorm and its
    /// shortcut's; not through a shuffle), reading a BatchNorm's output (through its fused ReLU
    /// and shuffle) that nothing else reads, where the BatchNorm's input is kept (so it is
    /// intact until the reader's backward, which runs before the BatchNorm's). Only where
    /// outputs are recomputed at all (`keep_all_outputs` keeps every output, as before).
    pub(super) fn reads_through_bn(&self, transient: &[usize]) -> Vec<Vec<Option<usize>>> {
        let readers = self.readers();
        (0..self.layers.len())
            .map(|i| {
                let l = &self.layers[i];
                let able = |ep: norm::Epilogue, j: usize| match l.kind {
                    Kind::Weighted {
                        op: WeightedOp::Conv { .. },
                        input: ActQuant::Dorefa(_) | ActQuant::Float,
                    } => l.fold.is_none(),
                    Kind::MaxPool(_) => l.input_q.is_none(),
                    // (The first two summands: the others are added in passes of their own.)
                    Kind::Add { .. } => l.input_q.is_none() && ep.shuffle == 1 && j < 2,
                    _ => false,
                };
                let through = |(j, &s): (usize, &Source)| {
                    let k = self.root(s)?;
                    let bn = &self.layers[k];
                    let Kind::BatchNorm { ep, .. } = bn.kind else {
                        return None;
                    };
                    let kept_input = self.root(bn.inputs[0]).is_none_or(|r| transient[r] == 0);
                    (self.recompute && able(ep, j) && readers[k] == [i] && kept_input).then_some(k)
                };
                l.inputs.iter().enumerate().map(through).collect()
            })
            .collect()
    }

    /// Per-layer buffers. Forward outputs are kept for the backward pass unless transient (see
    /// [`Network::transient_layers`]); gradients are not: a layer's output gradient is dead once
    /// its backward ran, so a conv output normalised by a BatchNorm takes its gradient in place
    /// and the others take turns in two shared buffers; a quantized layer's quantized input is
    /// formed where a recomputed input lies, or in a shared temporary.
    fn alloc_buffers(&self, gpu: &Gpu) -> Result<Vec<LayerBuffers>> {
        let cap = self.capacity;
        let elems = |s: &[usize]| s.iter().product::<usize>();
        // A DoReFa weighted layer's input, or an IAO quantizer's (weighted layers and pools).
        // (An IAO add quantizes its summands as it adds them: no copy.)
        let quantized_in = |l: &Layer| {
            (l.input_q.is_some() && !matches!(l.kind, Kind::Add { .. }))
                || matches!(
                    l.kind,
                    Kind::Weighted {
                        input: ActQuant::Dorefa(_),
                        ..
                    }
                )
        };
        // A BatchNorm formed by its reader needs no place of its own (nor a recompute).
        let mut formed_by_reader = vec![false; self.layers.len()];
        let through_each = self.reads_through_bn(&self.transient_layers(&formed_by_reader));
        for &k in through_each.iter().flatten().flatten() {
            formed_by_reader[k] = true;
        }
        // (A reader of one input: a conv or a pool.)
        let through: Vec<Option<usize>> = through_each.iter().map(|t| t[0]).collect();
        let transient = self.transient_layers(&formed_by_reader);
        // One scratch for the partial BatchNorm statistics of every conv that forms them, and
        // for the backward sums of every conv that forms those (`bn_sums`).
        let stats_from = self.stats_from_conv();
        let sums_by = self.bn_sums_by(&through, &stats_from);
        let conv_geom = |i: usize| {
            let l = &self.layers[i];
            let Kind::Weighted { op, .. } = l.kind else {
                return None;
            };
            match Gemm::new(op, cap, &l.in_shape, &l.out_shape) {
                Gemm::Conv(g) => Some(g),
                _ => None,
            }
        };
        let partials = stats_from
            .iter()
            .flatten()
            .filter_map(|&i| conv_geom(i).map(|g| conv2d::forward_bn_partials(&g)));
        let sums = sums_by
            .iter()
            .flatten()
            .filter_map(|&i| self.bn_sums_len(i, cap));
        let max_partials = partials.chain(sums).chain(self.mask_sums_lens(cap)).max();
        let bn_partials = max_partials
            .filter(|_| self.trainable)
            .map(|n| gpu.empty("BatchNorm partial statistics", &[n], DType::F32))
            .transpose()?;
        // Whether each layer's output is recomputed in backward (aliases follow their source).
        let mut recomputed = vec![false; self.layers.len()];
        for (i, l) in self.layers.iter().enumerate() {
            let source = self.root(l.inputs[0]);
            recomputed[i] =
                transient[i] > 0 || (l.kind.is_alias() && source.is_some_and(|k| recomputed[k]));
        }
        let input_recomputed = |i: usize| {
            self.root(self.layers[i].inputs[0])
                .is_some_and(|k| recomputed[k])
        };
        // A weighted layer's recomputed input is quantized where it lies; others go to a shared
        // temporary (an IAO pool's too: its backward needs the float input for the mask and the
        // quantized one to find each window's maximum).
        // (A folded conv needs its float input after the quantized one: a temporary too.)
        let in_place = |i: usize| {
            let l = &self.layers[i];
            quantized_in(l)
                && (input_recomputed(i) || through[i].is_some())
                && matches!(l.kind, Kind::Weighted { .. })
                && l.fold.is_none()
        };
        // A DoReFa conv whose input is neither formed again nor a BatchNorm's output quantizes
        // it where its GEMMs load it, instead of in the temporary (which the others keep: a
        // Linear, a transposed conv, a folded conv, an IAO quantizer).
        let on_load = |i: usize| {
            let l = &self.layers[i];
            self.quantize_on_load
                && quantized_in(l)
                && !in_place(i)
                && l.fold.is_none()
                && matches!(
                    l.kind,
                    Kind::Weighted {
                        op: WeightedOp::Conv { .. },
                        input: ActQuant::Dorefa(_),
                    }
                )
        };
        let max_qin = self
            .layers
            .iter()
            .enumerate()
            .filter(|&(i, l)| quantized_in(l) && !in_place(i) && !on_load(i))
            .map(|(_, l)| elems(&l.in_shape))
            .max();
        // Where each layer's output gradient lives. A conv/linear output that a BatchNorm
        // normalises takes its own gradient in place (the BN's backward overwrites it: nothing
        // reads that output again), so its layer needs no shared buffer; the others take turns
        // in two shared buffers, each sized for the largest gradient it holds (a layer and the
        // one it feeds never share one; aliases follow their source).
        let n = self.layers.len();
        let place = self.gradient_places();
        let slots = place
            .iter()
            .filter_map(|p| match p {
                GradPlace::Slot(s) => Some(s + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut grads = Vec::new();
        for s in 0..slots {
            let len = (0..n)
                .filter(|&i| place[i] == GradPlace::Slot(s))
                .map(|i| elems(&self.layers[i].out_shape))
                .max();
            grads.push(match (self.trainable, len) {
                (true, Some(len)) => Some(gpu.zeros(
                    &format!("output gradients {}", slot_name(s)),
                    &[cap * len],
                    DType::F32,
                )?),
                _ => None,
            });
        }
        let qtemp = max_qin
            .map(|n| gpu.zeros("quantized input", &[cap * n], DType::F32))
            .transpose()?;
        // Layers run their backward passes one after another, so one split-K scratch sized for
        // the largest serves them all (smaller batches split no more than the capacity does).
        let max_split_k = self
            .layers
            .iter()
            .filter_map(|l| match l.kind {
                Kind::Weighted { op, .. } if self.trainable => Some(
                    Gemm::new(op, cap, &l.in_shape, &l.out_shape)
                        .grad_weight_scratch_len(l.bias.is_some()),
                ),
                _ => None,
            })
            .max()
            .filter(|&n| n > 0);
        let split_k = max_split_k
            .map(|n| gpu.empty("grad-weight partial sums", &[n], DType::F32))
            .transpose()?;
        let max_fold_in = self
            .layers
            .iter()
            .filter(|l| l.fold.is_some() && self.trainable)
            .map(|l| elems(&l.in_shape))
            .max();
        let fold_dx = max_fold_in
            .map(|n| gpu.zeros("folded convs' input gradient", &[cap * n], DType::F32))
            .transpose()?;
        // Two temporaries for transient outputs: a chain's first output in one, its second in
        // the other.
        let max_transient = |temp: usize| {
            (0..self.layers.len())
                .filter(|&i| transient[i] == temp)
                .map(|i| elems(&self.layers[i].out_shape))
                .max()
        };
        let temps = shared_pair(
            gpu,
            "recomputed outputs",
            cap,
            [max_transient(1), max_transient(2)],
        )?;
        let mut out: Vec<LayerBuffers> = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let shape = with_batch(cap, &l.out_shape);
            let alias = |t: &Tensor| t.reshape(&shape);
            let (o, d) = match (l.kind.is_alias(), l.inputs[0]) {
                (true, Source::Node(k)) => {
                    let p: &LayerBuffers = &out[k];
                    (alias(&p.out)?, p.dout.as_ref().map(alias).transpose()?)
                }
                (true, Source::Input) => (alias(&self.input)?, None),
                _ => {
                    let o = if formed_by_reader[i] {
                        // The BatchNorm's input in its output's place (see `formed_by_reader`);
                        // its gradient has a place of its own, as any layer's.
                        alias(self.root(l.inputs[0]).map_or(&self.input, |k| &out[k].out))?
                    } else if transient[i] > 0 {
                        temps[transient[i] - 1]
                            .as_ref()
                            .expect("sized above")
                            .view(0, &shape)?
                    } else {
                        gpu.zeros(&format!("{} output", l.name), &shape, DType::F32)?
                    };
                    let d = match (self.trainable, place[i]) {
                        (false, _) => None,
                        (true, GradPlace::Own) => Some(o.clone()),
                        (true, GradPlace::Slot(s)) => {
                            Some(grads[s].as_ref().expect("sized above").view(0, &shape)?)
                        }
                        (true, GradPlace::Alias) => unreachable!("aliases are matched above"),
                    };
                    (o, d)
                }
            };
            let in_shape = with_batch(cap, &l.in_shape);
            let fold_dx = match (&fold_dx, &l.fold) {
                (Some(t), Some(_)) => Some(t.view(0, &in_shape)?),
                _ => None,
            };
            let xq = match (quantized_in(l), in_place(i), through[i]) {
                // (A float conv forms its input from the BatchNorm before as it loads it too.)
                (false, _, Some(k)) if matches!(l.kind, Kind::Weighted { .. }) => {
                    QuantInput::ThroughBn(k)
                }
                (false, _, _) => QuantInput::Float,
                (true, true, Some(k)) => QuantInput::ThroughBn(k),
                (true, true, None) => QuantInput::InPlace,
                (true, false, _) if on_load(i) => QuantInput::OnLoad,
                (true, false, _) => {
                    QuantInput::Temporary(qtemp.as_ref().expect("sized above").view(0, &in_shape)?)
                }
            };
            out.push(LayerBuffers {
                out: o,
                dout: d,
                xq,
                transient: recomputed[i],
                formed_by_reader: formed_by_reader[i],
                reads_bn: through_each[i].clone(),
                bn_partials: None,
                stats_from: None,
                bn_after: None,
                backward_by_conv: false,
                bn_sums: None,
                sums_from: None,
                split_k: split_k.clone(),
                fold_dx,
                quantize_output: None,
                extremes_for: None,
                observed_by_producer: false,
                masks_through_bn: None,
                formed_in_mask_pass: false,
                din: vec![None; l.inputs.len()],
                accumulate: Vec::new(),
            });
        }
        if let Some(partials) = &bn_partials {
            let backward_by = self.bn_backward_by_conv();
            for (k, conv) in stats_from.iter().enumerate() {
                if let (Some(i), Some(dy)) = (*conv, out[k].dout.clone()) {
                    out[k].stats_from = Some(i);
                    out[k].bn_partials = Some(partials.clone());
                    out[i].bn_partials = Some(partials.clone());
                    if backward_by[k] == Some(i) {
                        out[k].backward_by_conv = true;
                        out[i].bn_after = Some((k, dy));
                    }
                }
            }
            for (k, conv) in sums_by.iter().enumerate() {
                if let Some(i) = *conv {
                    out[k].sums_from = Some(i);
                    out[k].bn_sums = Some(partials.clone());
                    out[i].bn_sums = Some(partials.clone());
                }
            }
        }
        self.gradient_targets(gpu, &mut out)?;
        // A recomputed input quantized in place may come straight from a BatchNorm (through
        // its fused ReLU and shuffle) or a max-pool (through its fused shuffle): then that
        // layer's forward writes it quantized.
        for (i, l) in self.layers.iter().enumerate() {
            // DoReFa's quantizer only: BatchNorm's kernel applies it (an IAO quantizer observes
            // first, then quantizes with the scale it forms).
            let Kind::Weighted {
                input: ActQuant::Dorefa(a_bits),
                ..
            } = l.kind
            else {
                continue;
            };
            if !matches!(out[i].xq, QuantInput::InPlace) {
                continue;
            }
            let source = self.root(l.inputs[0]);
            if source.is_some_and(|k| {
                matches!(
                    self.layers[k].kind,
                    Kind::BatchNorm { .. } | Kind::MaxPool(_)
                )
            }) {
                let k = source.expect("checked");
                out[k].quantize_output = Some(a_bits);
                out[i].xq = QuantInput::ByProducer;
            }
        }
        self.extremes_by_producers(&mut out);
        self.masks_through_bns(&mut out, bn_partials.as_ref());
        Ok(out)
    }

    /// The floats of the backward sums an IAO mask pass may form for each BatchNorm at `batch`
    /// (`masks_through_bns`): those whose only reader quantizes its input, so that the shared
    /// scratch holds them.
    fn mask_sums_lens(&self, batch: usize) -> Vec<usize> {
        let readers = self.readers();
        (0..self.layers.len())
            .filter(|&i| self.layers[i].input_q.is_some())
            .filter_map(|i| self.mask_sums_len(self.sole_bn_input(i, &readers)?, batch))
            .collect()
    }

    /// The floats of BatchNorm layer `k`'s backward sums as an IAO mask pass forms them at
    /// `batch` (`norm::iao_sum_tiles`).
    fn mask_sums_len(&self, k: usize, batch: usize) -> Option<usize> {
        let sh = norm::BnShape::of(&with_batch(batch, &self.layers[k].in_shape)).ok()?;
        self.bn_sums.then(|| 2 * norm::iao_sum_tiles(sh) * sh.c)
    }

    /// The BatchNorm whose output is layer `i`'s (first) input and is read by `i` alone.
    fn sole_bn_input(&self, i: usize, readers: &[Vec<usize>]) -> Option<usize> {
        let k = self.root(self.layers[i].inputs[0])?;
        (matches!(self.layers[k].kind, Kind::BatchNorm { .. }) && readers[k] == [i]).then_some(k)
    }

    /// An IAO input quantizer (of a conv or a pool) whose input is a BatchNorm's output that
    /// nothing else reads, stored whole (not formed by its reader, not quantized by it): the
    /// BatchNorm writes the extremes of that output for the quantizer's observer
    /// (`LayerBuffers::extremes_for`).
    fn extremes_by_producers(&self, out: &mut [LayerBuffers]) {
        let readers = self.readers();
        for (i, l) in self.layers.iter().enumerate() {
            let Some(slot) = &l.input_q else { continue };
            if matches!(l.kind, Kind::Add { .. }) || slot.q.produced_extremes().is_none() {
                continue;
            }
            let Some(k) = self.sole_bn_input(i, &readers) else {
                continue;
            };
            if !out[k].formed_by_reader && out[k].quantize_output.is_none() {
                out[k].extremes_for = Some(i);
                out[i].observed_by_producer = true;
            }
        }
    }

    /// A layer with an IAO input quantizer and an input gradient, where that input is the
    /// output of a recomputed BatchNorm that nothing else reads and whose input is a layer's
    /// output: its backward does the BatchNorm's recompute in the passes of its quantizer
    /// (`LayerBuffers::masks_through_bn`). A conv (not folded) whose quantizer works where the
    /// input lies: the mask and requantization after grad-input; a pool, whose quantized input
    /// is a temporary: a max-pool's quantized input before its backward, and the mask after.
    /// With the shared scratch `sums` (and unless `Network::reduce_bn_backward_in_passes`),
    /// the pass that masks the gradient also forms the BatchNorm's backward sums, which its
    /// backward merges (`bn_sums`, `sums_from`) instead of reducing its input and gradient.
    fn masks_through_bns(&self, out: &mut [LayerBuffers], sums: Option<&Tensor>) {
        let readers = self.readers();
        for (i, l) in self.layers.iter().enumerate() {
            let fits = match l.kind {
                Kind::Weighted { .. } => {
                    l.fold.is_none() && matches!(out[i].xq, QuantInput::InPlace)
                }
                Kind::MaxPool(_) | Kind::AvgPool(_) => {
                    out[i].reads_bn[0].is_none() && matches!(out[i].xq, QuantInput::Temporary(_))
                }
                _ => false,
            };
            if !fits || l.input_q.is_none() || out[i].din[0].is_none() {
                continue;
            }
            let Some(k) = self.sole_bn_input(i, &readers) else {
                continue;
            };
            let recomputed =
                out[k].transient && !out[k].formed_by_reader && out[k].quantize_output.is_none();
            if !recomputed {
                continue;
            }
            if let Some(input) = self.root(self.layers[k].inputs[0]) {
                out[i].masks_through_bn = Some((k, out[input].out.clone()));
                out[k].formed_in_mask_pass = true;
                let fits = |t: &&Tensor| {
                    self.mask_sums_len(k, self.capacity)
                        .is_some_and(|n| n <= t.numel())
                };
                if let Some(sums) = sums.filter(fits).filter(|_| out[k].sums_from.is_none()) {
                    out[k].sums_from = Some(i);
                    out[k].bn_sums = Some(sums.clone());
                    out[i].bn_sums = Some(sums.clone());
                }
            }
        }
    }

    /// Where each layer's output gradient lives. A conv/linear output that only a BatchNorm
    /// reads takes its own gradient in place (the BN's backward overwrites it: nothing reads that
    /// output again; or, for a conv2d, the conv applies that backward as it loads its output, and
    /// nothing is written there); the others share buffers, each sized for the largest gradient
    /// it holds.
    /// A gradient is alive from the backward pass of its tensor's first reader (which writes
    /// it; the loss, for the output) to its own layer's: in a chain a layer's and the next
    /// one's, so two buffers taking turns; in a graph that branches, gradients are given the
    /// first buffer free over their whole lifetime (aliases follow their source).
    fn gradient_places(&self) -> Vec<GradPlace> {
        let n = self.layers.len();
        let readers = self.readers();
        let mut place = vec![GradPlace::Alias; n];
        let own = |i: usize| {
            matches!(self.layers[i].kind, Kind::Weighted { .. })
                && matches!(readers[i][..], [k] if matches!(self.layers[k].kind, Kind::BatchNorm { .. }))
        };
        // A BatchNorm whose backward the conv before applies (`bn_backward_by_conv`): its output
        // gradient is read by that conv's backward, which writes the conv's input gradient, so
        // the two must not share a buffer.
        let applied_by = self.bn_backward_by_conv();
        if self.graph.is_chain() {
            let mut last_slot: Option<usize> = None;
            for (i, l) in self.layers.iter().enumerate() {
                if l.kind.is_alias() {
                    continue;
                }
                place[i] = if own(i) {
                    if !applied_by.contains(&Some(i)) {
                        last_slot = None;
                    }
                    GradPlace::Own
                } else {
                    let s = last_slot.map_or(0, |s| 1 - s);
                    last_slot = Some(s);
                    GradPlace::Slot(s)
                };
            }
            return place;
        }
        // (first written, last read) in layer indices; backward runs from n down to 0.
        let mut lives: Vec<(usize, usize, usize)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if l.kind.is_alias() {
                continue;
            }
            if own(i) {
                place[i] = GradPlace::Own;
                continue;
            }
            let written = readers[i].first().copied().unwrap_or(n);
            lives.push((written, applied_by[i].unwrap_or(i), i));
        }
        lives.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        // The last read of each slot's current gradient; a slot is free once that is past.
        let mut busy_until: Vec<usize> = Vec::new();
        for (written, last_read, i) in lives {
            let s = match busy_until.iter().position(|&until| until > written) {
                Some(s) => s,
                None => {
                    busy_until.push(0);
                    busy_until.len() - 1
                }
            };
            busy_until[s] = last_read;
            place[i] = GradPlace::Slot(s);
        }
        place
    }

    /// Where each layer writes its inputs' gradients. The readers of a tensor (an alias's
    /// readers are its source's) run their backward passes in reverse order, so the first
    /// reader's is the last: it writes the tensor's gradient buffer, every later reader writes a
    /// part of its own, and the parts are added after the first reader's backward, in reader
    /// order (the same sums every run). In a chain each tensor has one reader, which writes the
    /// buffer directly, as before.
    fn gradient_targets(&self, gpu: &Gpu, out: &mut [LayerBuffers]) -> Result<()> {
        let root = |mut s: Source| {
            while let Source::Node(k) = s {
                if !self.layers[k].kind.is_alias() {
                    break;
                }
                s = self.layers[k].inputs[0];
            }
            s
        };
        let needed = self.grad_needed();
        // Readers of each tensor (by its root), in order: (layer, input slot).
        let mut readers: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.layers.len()];
        for (i, l) in self.layers.iter().enumerate() {
            if l.kind.is_alias() {
                continue;
            }
            for (j, &s) in l.inputs.iter().enumerate() {
                if let Source::Node(r) = root(s) {
                    if needed[r] {
                        readers[r].push((i, j));
                    }
                }
            }
        }
        for (r, list) in readers.iter().enumerate() {
            let Some(sum) = out[r].dout.clone() else {
                continue;
            };
            let Some(&(first, first_slot)) = list.first() else {
                continue;
            };
            let shape = |i: usize, j: usize| -> Result<Tensor> {
                let s = self.graph.shape(self.layers[i].inputs[j]);
                sum.reshape(&with_batch(self.capacity, s))
            };
            out[first].din[first_slot] = Some(shape(first, first_slot)?);
            for &(i, j) in &list[1..] {
                let part = gpu.zeros(
                    &format!("{} input gradient {j}", self.layers[i].name),
                    sum.shape(),
                    DType::F32,
                )?;
                out[i].din[j] = Some(part.reshape(shape(i, j)?.shape())?);
                out[first].accumulate.push((part, sum.clone()));
            }
        }
        Ok(())
    }

    pub(super) fn buffers(&self, gpu: &Gpu) -> Result<&[LayerBuffers]> {
        if self.buffers.get().is_none() {
            let _ = self.buffers.set(self.alloc_buffers(gpu)?);
        }
        Ok(self.buffers.get().expect("just set"))
    }
}

/// "A", "B", ... for shared buffer `s`.
fn slot_name(s: usize) -> String {
    if s < 26 {
        char::from(b'A' + s as u8).to_string()
    } else {
        format!("{s}")
    }
}

/// Two shared buffers, "`what` A" and "`what` B", of `cap` rows of `len` floats each (none where
/// no layer uses one).
fn shared_pair(
    gpu: &Gpu,
    what: &str,
    cap: usize,
    lens: [Option<usize>; 2],
) -> Result<[Option<Tensor>; 2]> {
    let make = |k: usize| {
        lens[k]
            .map(|len| {
                gpu.zeros(
                    &format!("{what} {}", ["A", "B"][k]),
                    &[cap * len],
                    DType::F32,
                )
            })
            .transpose()
    };
    Ok([make(0)?, make(1)?])
}
