//! Benchmarks. `kernels`: every kernel and direction a training step of a model runs, at the
//! model's real layer shapes, timed with GPU timestamps where the adapter has them.

use crate::error::Result;
use crate::gpu::{DType, Gpu, Op, Tensor};
use crate::kernels::conv2d::{self, Conv2dGeom};
use crate::kernels::quant::{WeightQuantizer, act_backward, act_forward};
use crate::models::{LayerSpec, ModelSpec};
use crate::quant::{Bits, QuantConfig};
use crate::rng::Rng;

/// One timed kernel (or group of launches, e.g. split-K plus its reduction).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelTiming {
    pub model: String,
    pub batch: usize,
    pub layer: String,
    pub kernel: String,
    pub direction: String,
    pub shape: String,
    /// Median over repeats; `None` when the case could not run (`error` says why).
    pub seconds: Option<f64>,
    pub gflops: Option<f64>,
    /// Floating-point operations of the item (multiply-add = 2).
    pub flops: f64,
    /// Bytes of the tensors its dispatches bind, each counted once per dispatch.
    pub bound_bytes: Option<u64>,
    /// "gpu timestamps" or "wall clock".
    pub timer: &'static str,
    /// What ran: each dispatch's label (for a GEMM its tile, group packing and vector forms)
    /// and workgroup grid (grad-weight's z is groups times the split-K count).
    pub launches: Vec<String>,
    pub error: Option<String>,
}

/// How `gpu`'s benchmarks time their work: "gpu timestamps" where the adapter has timestamp
/// queries, else "wall clock".
pub fn timer(gpu: &Gpu) -> &'static str {
    if gpu.caps.timestamp_query {
        "gpu timestamps"
    } else {
        "wall clock"
    }
}

/// Makes the launches of one bench item (allocating and filling its tensors).
type Build = Box<dyn Fn(&Gpu) -> Result<Vec<Op>>>;

struct Item {
    layer: String,
    kernel: &'static str,
    direction: &'static str,
    shape: String,
    flops: f64,
    build: Build,
}

fn random_tensor(
    gpu: &Gpu,
    what: &str,
    shape: &[usize],
    rng: &mut Rng,
    lo: f32,
    hi: f32,
) -> Result<Tensor> {
    // Filled on the device, with no host-side generation or upload, whose time grows with the
    // batch and on a fast GPU outweighs the kernels timed (BENCHMARKS.md).
    let t = gpu.empty(what, shape, DType::F32)?;
    let seed = rng.next_u64() as u32;
    let fill = crate::kernels::elementwise::fill_uniform(gpu, &t, seed, (lo, hi))?;
    gpu.submit(what, &[fill])?;
    Ok(t)
}

/// The kernels one training step of `model` at `batch` runs: for each conv, forward, grad-input
/// (not for the first layer, whose input needs no gradient) and grad-weight; for each quantized
/// conv, the activation and weight quantizers both ways.
fn items(model: &ModelSpec, batch: usize, bits: Bits) -> Result<Vec<Item>> {
    let graph = model.graph()?;
    let mut out = Vec::new();
    let mut first = true;
    for node in &graph.nodes {
        let layer = &node.layer;
        let LayerSpec::Conv {
            out: cout,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            ..
        } = layer
        else {
            continue;
        };
        let [c, h, w] = node.in_shape[..] else {
            continue;
        };
        let g = Conv2dGeom {
            batch,
            cin: c,
            h,
            w,
            cout: *cout,
            kernel: kernel.t(),
            stride: stride.t(),
            padding: padding.t(),
            dilation: dilation.t(),
            groups: *groups,
        };
        let name = node.name.clone();
        let flops = 2.0 * g.macs() as f64;
        let shape = format!(
            "x{:?} w{:?} g{}",
            g.input_shape(),
            g.weight_shape(),
            g.groups
        );
        let mk = |direction: &'static str, f: Build| Item {
            layer: name.clone(),
            kernel: "conv2d",
            direction,
            shape: shape.clone(),
            flops,
            build: f,
        };
        out.push(mk(
            "forward",
            Box::new(move |gpu| {
                let mut rng = Rng::new(1);
                let x = random_tensor(gpu, "x", &g.input_shape(), &mut rng, 0.0, 1.0)?;
                let wt = random_tensor(gpu, "w", &g.weight_shape(), &mut rng, -1.0, 1.0)?;
                let b = gpu.zeros("b", &[g.cout], DType::F32)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                Ok(vec![conv2d::forward(gpu, &g, &x, &wt, Some(&b), &y)?])
            }),
        ));
        // The tensor-core forward of a quantized conv, where the adapter has cooperative
        // matrices (`kernels` skips it elsewhere).
        if !first && !bits.is_float() && bits.get() <= 8 {
            out.push(mk(
                "forward coop",
                Box::new(move |gpu| {
                    let mode = gpu.coop().ok_or_else(|| {
                        crate::error::Error::Invalid("no cooperative matrices".into())
                    })?;
                    let mut rng = Rng::new(1);
                    let x = random_tensor(gpu, "x", &g.input_shape(), &mut rng, 0.0, 1.0)?;
                    let wt = random_tensor(gpu, "w", &g.weight_shape(), &mut rng, -1.0, 1.0)?;
                    let b = gpu.zeros("b", &[g.cout], DType::F32)?;
                    let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                    Ok(vec![crate::kernels::conv_coop::forward(
                        gpu,
                        &g,
                        &x,
                        &wt,
                        Some(&b),
                        &y,
                        (bits, bits),
                        (Default::default(), None),
                        mode,
                    )?])
                }),
            ));
        }
        if !first {
            out.push(mk(
                "grad_input",
                Box::new(move |gpu| {
                    let mut rng = Rng::new(2);
                    let dy = random_tensor(gpu, "dy", &g.output_shape(), &mut rng, -1.0, 1.0)?;
                    let wt = random_tensor(gpu, "w", &g.weight_shape(), &mut rng, -1.0, 1.0)?;
                    let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                    Ok(vec![conv2d::grad_input(gpu, &g, &dy, &wt, &dx)?])
                }),
            ));
        }
        // Grad-input on tensor cores (dy as two f16 halves per column scale), as
        // `forward coop`.
        if !first && !bits.is_float() && bits.get() <= 8 {
            out.push(mk(
                "grad_input coop",
                Box::new(move |gpu| {
                    let mode = gpu.coop_grad_input().ok_or_else(|| {
                        crate::error::Error::Invalid("no cooperative matrices".into())
                    })?;
                    let mut rng = Rng::new(2);
                    let dy = random_tensor(gpu, "dy", &g.output_shape(), &mut rng, -1.0, 1.0)?;
                    let wt = random_tensor(gpu, "w", &g.weight_shape(), &mut rng, -1.0, 1.0)?;
                    let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                    Ok(vec![crate::kernels::conv_coop::grad_input(
                        gpu,
                        &g,
                        &dy,
                        &wt,
                        &dx,
                        bits,
                        (None, Default::default()),
                        mode,
                    )?])
                }),
            ));
        }
        out.push(mk(
            "grad_weight",
            Box::new(move |gpu| {
                let mut rng = Rng::new(3);
                let x = random_tensor(gpu, "x", &g.input_shape(), &mut rng, 0.0, 1.0)?;
                let dy = random_tensor(gpu, "dy", &g.output_shape(), &mut rng, -1.0, 1.0)?;
                let dw = gpu.empty("dw", &g.weight_shape(), DType::F32)?;
                conv2d::grad_weight(gpu, &g, &x, &dy, &dw, None)
            }),
        ));
        // Grad-weight on tensor cores (dy as two f16 halves), as `forward coop`.
        if !first && !bits.is_float() && bits.get() <= 8 {
            out.push(mk(
                "grad_weight coop",
                Box::new(move |gpu| {
                    let mode = gpu.coop_grad_weight().ok_or_else(|| {
                        crate::error::Error::Invalid("no cooperative matrices".into())
                    })?;
                    let mut rng = Rng::new(3);
                    let x = random_tensor(gpu, "x", &g.input_shape(), &mut rng, 0.0, 1.0)?;
                    let dy = random_tensor(gpu, "dy", &g.output_shape(), &mut rng, -1.0, 1.0)?;
                    let dw = gpu.empty("dw", &g.weight_shape(), DType::F32)?;
                    crate::kernels::conv_coop::grad_weight(
                        gpu,
                        &g,
                        &x,
                        &dy,
                        (&dw, None),
                        bits,
                        (Default::default(), None),
                        mode,
                    )
                }),
            ));
        }
        // The same GEMMs doing BatchNorm's work as they load (what a NIN training step runs for
        // a quantized conv between two BatchNorms): the input formed from the BatchNorm before
        // (ReLU, quantizer), forward's partial statistics for the BatchNorm after, and the
        // backward GEMMs applying that BatchNorm's backward to dy.
        if !first && !bits.is_float() {
            out.extend(bn_fused_items(&g, bits, &mk));
            out.push(bn_backward_pass_item(&name, &g));
        }
        if !first && !bits.is_float() {
            let xs = g.input_shape();
            let ws = g.weight_shape();
            let qshape = format!("a{:?} w{:?}", xs, ws);
            let q = |direction: &'static str, kernel: &'static str, f: Build| Item {
                layer: name.clone(),
                kernel,
                direction,
                shape: qshape.clone(),
                flops: 0.0,
                build: f,
            };
            out.push(q(
                "forward",
                "act_quant",
                Box::new(move |gpu| {
                    let x = random_tensor(gpu, "x", &xs, &mut Rng::new(4), 0.0, 12.0)?;
                    let y = gpu.empty("y", &xs, DType::F32)?;
                    Ok(vec![act_forward(gpu, bits, &x, &y)?])
                }),
            ));
            out.push(q(
                "backward",
                "act_quant",
                Box::new(move |gpu| {
                    let mut rng = Rng::new(5);
                    let x = random_tensor(gpu, "x", &xs, &mut rng, 0.0, 12.0)?;
                    let dy = random_tensor(gpu, "dy", &xs, &mut rng, -1.0, 1.0)?;
                    let dx = gpu.empty("dx", &xs, DType::F32)?;
                    Ok(vec![act_backward(gpu, bits, &x, &dy, &dx)?])
                }),
            ));
            out.push(q(
                "forward",
                "weight_quant",
                Box::new(move |gpu| {
                    let wt = random_tensor(gpu, "w", &ws, &mut Rng::new(6), -0.3, 0.3)?;
                    let w_hat = gpu.empty("w_hat", &ws, DType::F32)?;
                    WeightQuantizer::new(gpu, bits, &ws)?.forward(gpu, &wt, &w_hat)
                }),
            ));
            out.push(q(
                "backward",
                "weight_quant",
                Box::new(move |gpu| {
                    let mut rng = Rng::new(7);
                    let wt = random_tensor(gpu, "w", &ws, &mut rng, -0.3, 0.3)?;
                    let g = random_tensor(gpu, "g", &ws, &mut rng, -1.0, 1.0)?;
                    let w_hat = gpu.empty("w_hat", &ws, DType::F32)?;
                    let dw = gpu.empty("dw", &ws, DType::F32)?;
                    let quant = WeightQuantizer::new(gpu, bits, &ws)?;
                    // The forward computes t and m, which the backward reads.
                    let mut ops = quant.forward(gpu, &wt, &w_hat)?;
                    gpu.submit("weight quantizer forward", &ops)?;
                    ops = quant.backward(gpu, &g, &dw)?;
                    Ok(ops)
                }),
            ));
        }
        first = false;
    }
    Ok(out)
}

/// A BatchNorm with its ReLU and no shuffle, as the `+bn` rows form it.
fn relu_bn(table: &Tensor) -> crate::kernels::norm::BnForm<'_> {
    crate::kernels::norm::BnForm {
        table,
        act: crate::kernels::norm::Act::Relu,
        shuffle: 1,
    }
}

/// A conv between two BatchNorms (tables `t_in`, `t_out`; `dy` the second's output gradient),
/// its input quantized to `bits`.
fn between_bns<'a>(
    t_in: &'a Tensor,
    t_out: &'a Tensor,
    dy: &'a Tensor,
    bits: Bits,
) -> crate::kernels::conv2d::AroundBn<'a> {
    use crate::kernels::conv2d::{AroundBn, InputBn, OutputBn};
    AroundBn {
        input: Some(InputBn {
            form: relu_bn(t_in),
            bits,
        }),
        output: Some(OutputBn {
            form: relu_bn(t_out),
            dy,
        }),
        ..AroundBn::default()
    }
}

/// The conv GEMMs of [`items`] with the BatchNorms around the conv fused in (`+bn` rows).
fn bn_fused_items(
    g: &Conv2dGeom,
    bits: Bits,
    mk: &dyn Fn(&'static str, Build) -> Item,
) -> Vec<Item> {
    use crate::kernels::conv2d::{ActGrad, InputBn};
    use crate::kernels::norm::{TABLE, entry};
    let g = *g;
    // A BatchNorm table: mean 0, invstd 1, gamma 1, beta 0, small sums.
    let table = move |gpu: &Gpu, c: usize, count: usize| -> Result<Tensor> {
        let mut t = vec![0.0f32; TABLE * c];
        for ch in 0..c {
            t[entry::at(ch, entry::INVSTD)] = 1.0;
            t[entry::at(ch, entry::GAMMA)] = 1.0;
            t[entry::at(ch, entry::DBETA)] = 0.01;
            t[entry::at(ch, entry::DGAMMA)] = -0.01;
            t[entry::at(ch, entry::SCALE)] = 1.0 / count as f32;
        }
        gpu.upload_f32("BatchNorm table", &[TABLE * c], &t)
    };
    let (oh, ow) = g.out_hw();
    let (in_count, out_count) = (g.batch * g.h * g.w, g.batch * oh * ow);
    vec![
        mk(
            "forward+bn",
            Box::new(move |gpu| {
                let mut rng = Rng::new(1);
                let x = random_tensor(gpu, "bn input", &g.input_shape(), &mut rng, -2.0, 2.0)?;
                let wt = random_tensor(gpu, "w", &g.weight_shape(), &mut rng, -1.0, 1.0)?;
                let b = gpu.zeros("b", &[g.cout], DType::F32)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let t_in = table(gpu, g.cin, in_count)?;
                let partials =
                    gpu.empty("partials", &[conv2d::forward_bn_partials(&g)], DType::F32)?;
                let input = InputBn {
                    form: relu_bn(&t_in),
                    bits,
                };
                Ok(vec![conv2d::forward_with(
                    gpu,
                    &g,
                    &x,
                    &wt,
                    Some(&b),
                    &y,
                    conv2d::AroundBn {
                        input: Some(input),
                        ..Default::default()
                    },
                    Some(&partials),
                )?])
            }),
        ),
        mk(
            "grad_input+bn",
            Box::new(move |gpu| {
                let mut rng = Rng::new(2);
                let y = random_tensor(gpu, "conv output", &g.output_shape(), &mut rng, -2.0, 2.0)?;
                let dy = random_tensor(gpu, "bn dy", &g.output_shape(), &mut rng, -1.0, 1.0)?;
                let wt = random_tensor(gpu, "w", &g.weight_shape(), &mut rng, -1.0, 1.0)?;
                let x = random_tensor(gpu, "bn input", &g.input_shape(), &mut rng, -2.0, 2.0)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let (t_in, t_out) = (table(gpu, g.cin, in_count)?, table(gpu, g.cout, out_count)?);
                let around = between_bns(&t_in, &t_out, &dy, bits);
                let act = ActGrad {
                    x: &x,
                    bits,
                    requantize: false,
                };
                Ok(vec![conv2d::grad_input_fused(
                    gpu,
                    &g,
                    &y,
                    &wt,
                    &dx,
                    Some(act),
                    around,
                )?])
            }),
        ),
        mk(
            "grad_weight+bn",
            Box::new(move |gpu| {
                let mut rng = Rng::new(3);
                let x = random_tensor(gpu, "bn input", &g.input_shape(), &mut rng, -2.0, 2.0)?;
                let y = random_tensor(gpu, "conv output", &g.output_shape(), &mut rng, -2.0, 2.0)?;
                let dy = random_tensor(gpu, "bn dy", &g.output_shape(), &mut rng, -1.0, 1.0)?;
                let dw = gpu.empty("dw", &g.weight_shape(), DType::F32)?;
                let db = gpu.empty("db", &[g.cout], DType::F32)?;
                let (t_in, t_out) = (table(gpu, g.cin, in_count)?, table(gpu, g.cout, out_count)?);
                let around = between_bns(&t_in, &t_out, &dy, bits);
                conv2d::grad_weight_fused(gpu, &g, &x, &y, (&dw, Some(&db)), around, None)
            }),
        ),
    ]
}

/// The backward of the BatchNorm after conv `g` as a pass of its own, in place over the conv
/// output (what a training step runs after a conv larger than 1×1, whose backward GEMMs then
/// load plain dy): beside the plain and `+bn` GEMM rows, the other way of doing that work.
fn bn_backward_pass_item(layer: &str, g: &Conv2dGeom) -> Item {
    use crate::kernels::norm::{self, Epilogue, TABLE, entry};
    let ys = g.output_shape();
    let (c, count) = (g.cout, ys[0] * ys[2] * ys[3]);
    Item {
        layer: layer.to_string(),
        kernel: "batchnorm",
        direction: "backward_apply",
        shape: format!("{ys:?} in place"),
        flops: 0.0,
        build: Box::new(move |gpu| {
            let mut rng = Rng::new(8);
            let y = random_tensor(gpu, "conv output", &ys, &mut rng, -2.0, 2.0)?;
            let dy = random_tensor(gpu, "bn dy", &ys, &mut rng, -1.0, 1.0)?;
            let mut t = vec![0.0f32; TABLE * c];
            for ch in 0..c {
                t[entry::at(ch, entry::INVSTD)] = 1.0;
                t[entry::at(ch, entry::GAMMA)] = 1.0;
                t[entry::at(ch, entry::SCALE)] = 1.0 / count as f32;
            }
            let stats = gpu.upload_f32("BatchNorm table", &[TABLE * c], &t)?;
            let gamma = gpu.upload_f32("gamma", &[c], &vec![1.0; c])?;
            let beta = gpu.zeros("beta", &[c], DType::F32)?;
            let dgamma = gpu.upload_f32("dgamma", &[c], &vec![-0.01; c])?;
            let dbeta = gpu.upload_f32("dbeta", &[c], &vec![0.01; c])?;
            Ok(vec![norm::backward_apply(
                gpu,
                Epilogue::act(crate::kernels::norm::Act::Relu),
                &y,
                &dy,
                &stats,
                (&gamma, &beta),
                (&dgamma, &dbeta),
                &y,
            )?])
        }),
    }
}

/// Times every kernel of a training step of each model at each batch size, handing each row to
/// `on_row` as it is measured (so that a run stopped early has shown what it finished).
/// Failures (e.g. a tensor over the device's binding limit) are reported per row, not fatal.
pub fn kernels(
    gpu: &Gpu,
    models: &[ModelSpec],
    batches: &[usize],
    bits: Bits,
    repeat: usize,
    on_row: &mut dyn FnMut(&KernelTiming) -> Result<()>,
) -> Result<Vec<KernelTiming>> {
    let timer = timer(gpu);
    let mut rows = Vec::new();
    for model in models {
        for &batch in batches {
            for item in items(model, batch, bits)? {
                let hardware = Some(crate::gpu::CoopMode::Hardware);
                let on_device = match item.direction {
                    "forward coop" => gpu.coop() == hardware,
                    "grad_weight coop" => gpu.coop_grad_weight() == hardware,
                    "grad_input coop" => gpu.coop_grad_input() == hardware,
                    _ => true,
                };
                if !on_device {
                    continue;
                }
                let mut row = KernelTiming {
                    model: model.name.clone(),
                    batch,
                    layer: item.layer.clone(),
                    kernel: item.kernel.to_string(),
                    direction: item.direction.to_string(),
                    shape: item.shape.clone(),
                    seconds: None,
                    gflops: None,
                    flops: item.flops,
                    bound_bytes: None,
                    timer,
                    launches: Vec::new(),
                    error: None,
                };
                let mut run = || -> Result<f64> {
                    let ops = (item.build)(gpu)?;
                    row.launches = ops
                        .iter()
                        .map(|o| match o {
                            Op::Dispatch(l) => format!("{} grid {:?}", l.label, l.workgroups()),
                            Op::Copy { .. } => "copy".to_string(),
                        })
                        .collect();
                    row.bound_bytes = Some(
                        ops.iter()
                            .map(|o| match o {
                                Op::Dispatch(l) => l.bound_bytes,
                                Op::Copy { .. } => o.memory_bound_bytes().unwrap_or(0),
                            })
                            .sum(),
                    );
                    gpu.submit_timed("bench warm-up", &ops)?;
                    let mut times: Vec<f64> = (0..repeat.max(1))
                        .map(|_| {
                            Ok(gpu
                                .submit_timed("bench", &ops)?
                                .iter()
                                .map(|t| t.seconds)
                                .sum())
                        })
                        .collect::<Result<_>>()?;
                    times.sort_by(f64::total_cmp);
                    Ok(times[times.len() / 2])
                };
                match run() {
                    Ok(s) => {
                        row.seconds = Some(s);
                        row.gflops = (item.flops > 0.0 && s > 0.0).then(|| item.flops / s * 1e-9);
                    }
                    Err(e) => row.error = Some(e.to_string()),
                }
                gpu.pool().trim();
                on_row(&row)?;
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// One configuration of the training benchmark.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainingBench {
    pub model: String,
    /// `dorefa` or `iao` (symmetric, per-channel, min-max weight observers: micronet's README
    /// setting).
    pub scheme: crate::quant::SchemeName,
    /// IAO with each conv's BatchNorm folded in.
    pub bn_fuse: bool,
    pub w_bits: u32,
    pub a_bits: u32,
    pub batch: usize,
    /// Images per second over the timed steps (wall clock, after warm-up).
    pub img_per_s: Option<f64>,
    pub step_ms: Option<f64>,
    pub timed_steps: usize,
    /// Queue submissions per training step in the timed loop.
    pub submits_per_step: Option<f64>,
    /// GPU buffers created per step in the timed loop (0 once warm).
    pub allocations_per_step: Option<f64>,
    /// Most bytes of GPU buffers wgqat held at once.
    pub peak_memory_bytes: Option<u64>,
    /// Compute dispatches in one training step (forward, loss, backward, optimizer).
    pub dispatches_per_step: Option<usize>,
    /// Bytes bound by the step's memory-bound dispatches (every kernel but the GEMMs), each
    /// binding counted once, and moved by its buffer copies (read and written): a lower bound
    /// of their traffic.
    pub memory_bound_bytes_per_step: Option<u64>,
    /// Seconds from building the network to the end of the first step (pipelines compiled,
    /// buffers created, weights initialised, the step run and waited for): what a user waits
    /// before training runs. Measured with at least one warm-up step; the first configuration
    /// of a run is the cold one (later ones reuse the pipelines they share).
    pub first_step_s: Option<f64>,
    /// Pipelines compiled for this row (planning the step and the optimizer): the work behind
    /// `first_step_s`. Pipelines an earlier row of the run compiled are shared, not counted.
    pub pipelines_compiled: Option<usize>,
    /// Per-kernel GPU time of one step (timestamps where the adapter has them), largest first.
    pub kernels: Vec<KernelShare>,
    /// The same step's GEMM launches (the weighted layers'), in plan order.
    pub gemms: Vec<GemmTime>,
    /// With `TrainingOptions::tune`, where the device has cooperative matrices: what the
    /// tuning timed and chose (the step then runs each GEMM as chosen). The tuning comes before
    /// the network is built and compiles the pipelines the step shares with it, so its
    /// `seconds` are not in `first_step_s` and its pipelines not in `pipelines_compiled`.
    pub tuning: Option<crate::tune::Tuning>,
    pub timer: &'static str,
    pub error: Option<String>,
}

/// One GEMM of a training step (see [`crate::nn::PlanGemm`]) and its GPU time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GemmTime {
    pub layer: String,
    pub direction: crate::nn::GemmDirection,
    /// On cooperative matrices (or their emulation).
    pub coop: bool,
    pub ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelShare {
    pub kernel: String,
    pub launches: usize,
    pub ms: f64,
    pub percent: f64,
    /// A memory-bound kernel's bytes per step (the tensors its dispatches bind, each once, as
    /// `memory_bound_bytes_per_step` counts them) and the bandwidth that makes (10^9 bytes/s);
    /// `None` for the GEMMs.
    pub memory_bound_bytes: Option<u64>,
    pub gb_per_s: Option<f64>,
}

/// Options of [`training`].
#[derive(Clone, Debug)]
pub struct TrainingOptions {
    pub warmup: usize,
    pub steps: usize,
    /// Also time each kernel of one step.
    pub breakdown: bool,
    /// Choose each quantized conv GEMM's kernel (cooperative matrices or fp32) from this many
    /// timed steps of each first ([`crate::tune`]); `None`: every GEMM that can runs on
    /// cooperative matrices.
    pub tune: Option<usize>,
}

/// QAT training throughput of `model` at `bits` and `batch`: synthetic data already on the GPU,
/// the real training step (forward, loss, backward, Adam) replayed after `warmup` steps.
pub fn training(
    gpu: &Gpu,
    model: &ModelSpec,
    quant: QuantConfig,
    batch: usize,
    opts: &TrainingOptions,
) -> TrainingBench {
    let bits = quant.w_bits;
    let timer = timer(gpu);
    let mut row = TrainingBench {
        model: model.name.clone(),
        scheme: quant.scheme.name(),
        bn_fuse: matches!(quant.scheme, crate::quant::Scheme::Iao(o) if o.bn_fuse),
        w_bits: bits.get(),
        a_bits: quant.a_bits.get(),
        batch,
        img_per_s: None,
        step_ms: None,
        timed_steps: opts.steps,
        submits_per_step: None,
        allocations_per_step: None,
        peak_memory_bytes: None,
        dispatches_per_step: None,
        memory_bound_bytes_per_step: None,
        first_step_s: None,
        pipelines_compiled: None,
        kernels: Vec::new(),
        gemms: Vec::new(),
        tuning: None,
        timer,
        error: None,
    };
    let run = |row: &mut TrainingBench| -> Result<()> {
        use crate::nn::{Mode, Network, init};
        if let Some(repeats) = opts.tune {
            row.tuning = crate::tune::tune(gpu, model, quant, batch, repeats)?;
        }
        gpu.pool().trim();
        gpu.pool().reset_peak();
        let pool_before = gpu.pool().stats();
        let start = std::time::Instant::now();
        let compiled_before = gpu.kernels().compiled();
        let mut net = Network::new(gpu, model, quant, batch, true, 1)?;
        if let Some(t) = &row.tuning {
            crate::tune::apply(&mut net, &t.uses)?;
        }
        init::initialise(gpu, &net, 1)?;
        let kind = crate::train::TrainConfig::default().optimizer_kind();
        let mut opt = crate::train::Optimizer::new(gpu, &net, kind)?;
        let mut plan = net.plan(gpu, batch, Mode::Train)?;
        plan.ops.push_op(opt.op(gpu, &net)?);
        row.pipelines_compiled = Some(gpu.kernels().compiled() - compiled_before);
        let launches = || {
            plan.ops.ops().iter().filter_map(|o| match o {
                crate::gpu::Op::Dispatch(l) => Some(l),
                _ => None,
            })
        };
        row.dispatches_per_step = Some(launches().count());
        row.memory_bound_bytes_per_step = Some(
            plan.ops
                .ops()
                .iter()
                .filter_map(crate::gpu::Op::memory_bound_bytes)
                .sum(),
        );
        let mut rng = Rng::new(5);
        let n = batch * model.input.iter().product::<usize>();
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(10) as u32).collect();
        net.write_batch(gpu, &plan, &rng.vec_uniform(n, -2.0, 2.0), &labels)?;
        let step = |opt: &mut crate::train::Optimizer| -> Result<()> {
            net.write_step(gpu, &opt.next_values(1e-3, 0))?;
            plan.ops.submit(gpu, "bench step")?;
            opt.t += 1;
            Ok(())
        };
        for i in 0..opts.warmup {
            step(&mut opt)?;
            if i == 0 {
                gpu.wait()?;
                row.first_step_s = Some(start.elapsed().as_secs_f64());
            }
        }
        gpu.wait()?;
        let (submits, pool) = (crate::gpu::submit_count(), gpu.pool().stats());
        let t0 = std::time::Instant::now();
        for _ in 0..opts.steps {
            step(&mut opt)?;
        }
        gpu.wait()?;
        let secs = t0.elapsed().as_secs_f64();
        // With no timed steps only the memory is measured (every buffer exists once planned).
        if opts.steps > 0 {
            let steps = opts.steps as f64;
            row.img_per_s = Some((opts.steps * batch) as f64 / secs);
            row.step_ms = Some(secs / steps * 1e3);
            row.submits_per_step = Some((crate::gpu::submit_count() - submits) as f64 / steps);
            row.allocations_per_step =
                Some((gpu.pool().stats().allocations - pool.allocations) as f64 / steps);
        }
        row.peak_memory_bytes = Some(
            gpu.pool()
                .stats()
                .peak_bytes
                .saturating_sub(pool_before.allocated_bytes),
        );
        if opts.breakdown {
            net.write_step(gpu, &opt.next_values(1e-3, 0))?;
            let times = gpu.submit_timed("bench breakdown", plan.ops.ops())?;
            let total: f64 = times.iter().map(|t| t.seconds).sum();
            // Per kernel: launches, seconds, and the bytes of its memory-bound dispatches.
            let mut by: std::collections::BTreeMap<String, (usize, f64, Option<u64>)> =
                Default::default();
            for (op, t) in plan.ops.ops().iter().zip(&times) {
                let k = t.label.split_whitespace().next().unwrap_or("?").to_string();
                let e = by.entry(k).or_default();
                e.0 += 1;
                e.1 += t.seconds;
                if let Some(b) = op.memory_bound_bytes() {
                    e.2 = Some(e.2.unwrap_or(0) + b);
                }
            }
            row.kernels = by
                .into_iter()
                .map(|(kernel, (launches, s, bytes))| KernelShare {
                    kernel,
                    launches,
                    ms: s * 1e3,
                    percent: 100.0 * s / total.max(1e-12),
                    memory_bound_bytes: bytes,
                    gb_per_s: bytes.filter(|_| s > 0.0).map(|b| b as f64 / s / 1e9),
                })
                .collect();
            row.kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms));
            row.gemms = plan
                .gemms
                .iter()
                .map(|g| GemmTime {
                    layer: g.layer.clone(),
                    direction: g.direction,
                    coop: g.coop,
                    ms: times[g.op].seconds * 1e3,
                })
                .collect();
        }
        Ok(())
    };
    if let Err(e) = run(&mut row) {
        row.error = Some(e.to_string());
    }
    gpu.pool().trim();
    row
}

/// One configuration of the inference benchmark: the exported integer model against the
/// fake-quant float network it came from, same weights, same batch, inputs already on the GPU.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InferenceBench {
    pub model: String,
    /// The quantization, as `QuantConfig::label` writes it (e.g. "W8A8", "IAO W8A8", "wbwtab W1A1").
    pub quant: String,
    pub w_bits: u32,
    pub a_bits: u32,
    pub batch: usize,
    pub int_img_per_s: Option<f64>,
    pub int_batch_ms: Option<f64>,
    pub fake_quant_img_per_s: Option<f64>,
    pub fake_quant_batch_ms: Option<f64>,
    pub timed_batches: usize,
    pub error: Option<String>,
}

/// Integer vs fake-quant inference throughput of `model` (random weights: speed does not depend
/// on them; IAO's quantizers calibrated on one random batch) under `quant` at `batch`, each timed
/// over `opts.steps` submits after `opts.warmup`.
pub fn inference(
    gpu: &Gpu,
    model: &ModelSpec,
    quant: QuantConfig,
    batch: usize,
    opts: &TrainingOptions,
) -> InferenceBench {
    let mut row = InferenceBench {
        model: model.name.clone(),
        quant: quant.label(),
        w_bits: quant.w_bits.get(),
        a_bits: quant.a_bits.get(),
        batch,
        int_img_per_s: None,
        int_batch_ms: None,
        fake_quant_img_per_s: None,
        fake_quant_batch_ms: None,
        timed_batches: opts.steps,
        error: None,
    };
    // Wall time of `steps` submits of `submit` after `warmup` of them.
    let time = |submit: &dyn Fn() -> Result<()>| -> Result<f64> {
        for _ in 0..opts.warmup {
            submit()?;
        }
        gpu.wait()?;
        let t0 = std::time::Instant::now();
        for _ in 0..opts.steps {
            submit()?;
        }
        gpu.wait()?;
        Ok(t0.elapsed().as_secs_f64() / opts.steps.max(1) as f64)
    };
    let run = |row: &mut InferenceBench| -> Result<()> {
        use crate::nn::{Mode, Network, init};
        gpu.pool().trim();
        // IAO calibrates (a training-mode pass), so its network is built for training.
        let iao = matches!(quant.scheme, crate::quant::Scheme::Iao(_));
        let mut net = Network::new(gpu, model, quant, batch, iao, 1)?;
        init::initialise(gpu, &net, 1)?;
        let mut rng = Rng::new(5);
        let x = rng.vec_uniform(batch * model.input.iter().product::<usize>(), -2.0, 2.0);
        if iao {
            // Scales and offsets to export: IAO's observers see one batch.
            net.ensure_metric_slots(gpu, 1)?;
            let plan = net.plan(gpu, batch, Mode::Calibrate)?;
            net.write_batch(gpu, &plan, &x, &vec![0; batch])?;
            net.write_step(gpu, &Default::default())?;
            plan.ops.submit(gpu, "bench calibration")?;
        }
        // The integer model first, so that a model it cannot take leaves the float row empty too.
        let int_model = crate::infer::int_model(gpu, &net)?;
        let engine = crate::infer::IntEngine::new(gpu, int_model, batch)?;
        engine.run(gpu, &x)?;
        let s = time(&|| engine.submit(gpu, batch))?;
        (row.int_img_per_s, row.int_batch_ms) = (Some(batch as f64 / s), Some(s * 1e3));
        drop(engine);
        let plan = net.plan(gpu, batch, Mode::Eval)?;
        net.write_batch(gpu, &plan, &x, &vec![0; batch])?;
        net.write_step(gpu, &Default::default())?;
        let s = time(&|| {
            plan.ops
                .submit(gpu, "bench fake-quant inference")
                .map(|_| ())
        })?;
        (row.fake_quant_img_per_s, row.fake_quant_batch_ms) =
            (Some(batch as f64 / s), Some(s * 1e3));
        Ok(())
    };
    if quant.w_bits.is_float() && !matches!(quant.scheme, crate::quant::Scheme::Wbwtab(_)) {
        row.error = Some("a float model has no integer form: use bits 2..=8".into());
    } else if let Err(e) = run(&mut row) {
        row.error = Some(e.to_string());
    }
    gpu.pool().trim();
    row
}

/// A GEMM on the tensor cores beside the fp32 kernel's: the `bench kernels` rows of the same
/// model, batch, layer and direction (`forward coop` and `forward`, …), both timed.
pub struct CoopVsFp32<'a> {
    pub fp32: &'a KernelTiming,
    pub coop: &'a KernelTiming,
}

impl CoopVsFp32<'_> {
    /// The fp32 kernel's time over the tensor cores': above 1 the tensor cores are faster.
    pub fn speedup(&self) -> f64 {
        self.fp32.seconds.unwrap_or(0.0) / self.coop.seconds.unwrap_or(f64::INFINITY)
    }
}

/// Every timed tensor-core row of `rows` with its timed fp32 counterpart, in the rows' order.
pub fn coop_vs_fp32(rows: &[KernelTiming]) -> Vec<CoopVsFp32<'_>> {
    rows.iter()
        .filter_map(|coop| {
            let direction = coop.direction.strip_suffix(" coop")?;
            coop.seconds?;
            let fp32 = rows.iter().find(|f| {
                (&f.model, f.batch, &f.layer, f.direction.as_str())
                    == (&coop.model, coop.batch, &coop.layer, direction)
                    && f.seconds.is_some()
            })?;
            Some(CoopVsFp32 { fp32, coop })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(layer: &str, direction: &str, seconds: Option<f64>) -> KernelTiming {
        KernelTiming {
            model: "nin_gc".into(),
            batch: 256,
            layer: layer.into(),
            kernel: "conv2d".into(),
            direction: direction.into(),
            shape: String::new(),
            seconds,
            gflops: None,
            flops: 1e9,
            bound_bytes: None,
            timer: "gpu timestamps",
            launches: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn each_tensor_core_row_meets_the_fp32_row_of_its_layer_and_direction() {
        let rows = [
            row("model.1.conv", "forward", Some(2e-3)),
            row("model.1.conv", "forward coop", Some(5e-4)),
            row("model.1.conv", "grad_input", Some(1e-3)),
            row("model.1.conv", "forward+bn", Some(3e-3)),
            row("model.4.conv", "grad_input", Some(1e-3)),
            row("model.4.conv", "grad_input coop", Some(2e-3)),
            // Not timed: left out.
            row("model.5.conv", "forward", None),
            row("model.5.conv", "forward coop", Some(1e-3)),
            row("model.6.conv", "grad_weight coop", None),
        ];
        let pairs = coop_vs_fp32(&rows);
        let got: Vec<(&str, &str, f64)> = pairs
            .iter()
            .map(|p| {
                (
                    p.fp32.layer.as_str(),
                    p.fp32.direction.as_str(),
                    p.speedup(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("model.1.conv", "forward", 4.0),
                ("model.4.conv", "grad_input", 0.5)
            ]
        );
    }
}
