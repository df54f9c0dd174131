//! Parity with PyTorch for a whole training step: `tools/torch_reference.py` ran a tiny
//! nin_gc-shaped model (grouped convs, channel shuffle, both pools, BN, quantized last conv) and a
//! small ResNet (residual adds, an identity and a strided 1x1 shortcut, adaptive pooling, a
//! Linear head) from one initialisation on one batch, one step of torch.optim.SGD and one of
//! torch.optim.Adam. Here the same init, batch and step run on the GPU and are compared.
//!
//! Float (bits 32) must match tightly. A quantized net is chaotic by nature (one code
//! that rounds the other way moves a whole BN channel), so W8A8 is held to the loss and to the
//! direction (cosine) of every gradient, as micronet's float32-vs-float64 runs are.
mod common;

use std::collections::HashMap;
use std::path::Path;
use wgqat::kernels::optim::OptimizerKind;
use wgqat::models::ModelSpec;
use wgqat::nn::checkpoint::{Data, Named, read};
use wgqat::nn::{Mode, Network};
use wgqat::quant::Bits;
use wgqat::quant::QuantConfig;
use wgqat::train::Optimizer;

struct Reference {
    tensors: HashMap<String, Named>,
    spec: ModelSpec,
    bits: u32,
    lr: f64,
    momentum: f32,
    wd: f32,
    batch: usize,
}

fn load(name: &str) -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let (tensors, meta) = read(&path).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    Reference {
        tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
        spec: ModelSpec::from_json(&meta["model"], name).unwrap(),
        bits: cfg["bits"].as_u64().unwrap() as u32,
        lr: cfg["lr"].as_f64().unwrap(),
        momentum: cfg["momentum"].as_f64().unwrap() as f32,
        wd: cfg["wd"].as_f64().unwrap() as f32,
        batch: cfg["batch"].as_u64().unwrap() as usize,
    }
}

impl Reference {
    fn f32(&self, key: &str) -> &[f32] {
        match &self.tensors[key].data {
            Data::F32(v) => v,
            _ => panic!("{key} is not f32"),
        }
    }

    /// The state dict stored under `prefix.` with the prefix removed.
    fn state(&self, prefix: &str) -> Vec<Named> {
        self.tensors
            .values()
            .filter_map(|t| {
                t.name.strip_prefix(&format!("{prefix}.")).map(|n| Named {
                    name: n.to_string(),
                    ..t.clone()
                })
            })
            .collect()
    }
}

/// What one step on the GPU gives: loss, gradients and the state after the update.
struct Step {
    loss: f32,
    grads: HashMap<String, Vec<f32>>,
    after: HashMap<String, Vec<f32>>,
}

fn step(r: &Reference, kind: OptimizerKind) -> Step {
    step_with(r, kind, Outputs::Recomputed)
}

/// How a step treats BatchNorm and shuffle outputs for the backward pass.
#[derive(Clone, Copy, PartialEq)]
enum Outputs {
    /// Recomputed or formed by their readers (the default), with BatchNorm's backward sums
    /// formed by the conv reading its output.
    Recomputed,
    /// The same, with every BatchNorm backward reduced in a pass of its own (the order of
    /// [`Outputs::Kept`]'s sums).
    RecomputedReducedInPasses,
    /// Kept (`keep_all_outputs`).
    Kept,
}

/// One step, with BatchNorm and shuffle outputs treated as `outputs` says.
fn step_with(r: &Reference, kind: OptimizerKind, outputs: Outputs) -> Step {
    let gpu = common::gpu();
    let bits = Bits::new(r.bits).unwrap();
    let quant = QuantConfig {
        w_bits: bits,
        a_bits: bits,
        quantize_first_layer: false,
        ..QuantConfig::default()
    };
    let mut net = Network::new(gpu, &r.spec, quant, r.batch, true, 1).unwrap();
    if outputs == Outputs::Kept {
        net.keep_all_outputs().unwrap();
    }
    if outputs != Outputs::Recomputed {
        net.reduce_bn_backward_in_passes().unwrap();
    }
    net.load_named(gpu, Path::new("fixture init"), r.state("init"))
        .unwrap();
    let opt = Optimizer::new(gpu, &net, kind).unwrap();
    let mut plan = net.plan(gpu, r.batch, Mode::Train).unwrap();
    plan.ops.push_op(opt.op(gpu, &net).unwrap());
    let labels: Vec<u32> = match &r.tensors["labels"].data {
        Data::I64(v) => v.iter().map(|&l| l as u32).collect(),
        _ => panic!("labels"),
    };
    net.write_batch(gpu, &plan, r.f32("input"), &labels)
        .unwrap();
    net.write_step(gpu, &opt.next_values(r.lr, 0)).unwrap();
    plan.ops.submit(gpu, "parity step").unwrap();
    let loss = net.read_metrics(gpu, 1).unwrap()[0].0;
    let grads = net
        .params
        .entries()
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                gpu.read_f32(&net.gradient(&e.name).unwrap()).unwrap(),
            )
        })
        .collect();
    let after = common::f32_state(gpu, &net).into_iter().collect();
    Step { loss, grads, after }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// (relative error ||a - b|| / ||b||, cosine) of two tensors.
fn agreement(a: &[f32], b: &[f32]) -> (f64, f64) {
    let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let diff: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let (na, nb) = (norm(&a), norm(&b));
    (
        norm(&diff) / nb.max(1e-30),
        if na * nb > 0.0 { dot / (na * nb) } else { 1.0 },
    )
}

/// Conv biases directly before a BatchNorm: their gradient is 0 analytically (BN subtracts the
/// batch mean), so what either side computes is rounding noise.
fn bias_before_bn(name: &str, spec: &ModelSpec) -> bool {
    name.ends_with("conv.bias")
        && spec
            .layers
            .iter()
            .any(|l| l.name() == Some(&name.replace("conv.bias", "bn")))
}

fn sgd(r: &Reference) -> OptimizerKind {
    OptimizerKind::Sgd {
        momentum: r.momentum,
        dampening: 0.0,
        nesterov: false,
        weight_decay: r.wd,
    }
}

fn adam(r: &Reference) -> OptimizerKind {
    OptimizerKind::Adam {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: r.wd,
    }
}

#[test]
fn float_step_matches_pytorch() {
    float_step("parity_float.safetensors");
}

/// A small ResNet (tools/torch_reference.py on examples/models/tiny_resnet.json): an identity and
/// a strided 1x1-conv shortcut, so the gradient of a block's input is the sum of two paths.
#[test]
fn float_resnet_step_matches_pytorch() {
    float_step("parity_resnet_float.safetensors");
}

fn float_step(fixture: &str) {
    let r = load(fixture);
    let s = step(&r, sgd(&r));
    let want_loss = r.f32("loss")[0];
    println!("loss: wgqat {} pytorch {}", s.loss, want_loss);
    assert!(
        (s.loss - want_loss).abs() < 1e-5,
        "loss {} vs {want_loss}",
        s.loss
    );
    for (name, g) in &s.grads {
        let (rel, cos) = agreement(g, r.f32(&format!("grad.{name}")));
        println!("grad {name}: rel err {rel:.2e} cos {cos:.8}");
        if !bias_before_bn(name, &r.spec) {
            assert!(rel < 1e-4, "grad {name}: relative error {rel:e}");
        }
    }
    // After one SGD step every tensor (parameters and BN running stats) agrees to f32 rounding.
    for (name, v) in &s.after {
        let want = r.f32(&format!("sgd.{name}"));
        let max = v
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 2e-6, "sgd.{name}: max abs difference {max:e}");
    }
    // Adam's first step moves each weight by about lr * sign(g): compared where PyTorch's gradient
    // sign is well determined (|g| above 1e-3 of the tensor's largest).
    let s = step(&r, adam(&r));
    for (name, v) in &s.after {
        let want = r.f32(&format!("adam.{name}"));
        let grad = r
            .tensors
            .get(&format!("grad.{name}"))
            .map(|_| r.f32(&format!("grad.{name}")));
        let (mut checked, mut worst) = (0, 0.0f32);
        for (i, (a, b)) in v.iter().zip(want).enumerate() {
            if let Some(g) = grad {
                let gmax = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                if bias_before_bn(name, &r.spec) || g[i].abs() <= 1e-3 * gmax {
                    continue;
                }
            }
            checked += 1;
            worst = worst.max((a - b).abs());
        }
        println!(
            "adam.{name}: {checked}/{} elements compared, max abs difference {worst:.2e}",
            v.len()
        );
        assert!(worst < 2e-6, "adam.{name}: max abs difference {worst:e}");
    }
}

#[test]
fn w8a8_step_matches_pytorch_in_loss_and_gradient_direction() {
    w8a8_step("parity_w8a8.safetensors");
}

#[test]
fn w8a8_resnet_step_matches_pytorch_in_loss_and_gradient_direction() {
    w8a8_step("parity_resnet_w8a8.safetensors");
}

fn w8a8_step(fixture: &str) {
    let r = load(fixture);
    let s = step(&r, sgd(&r));
    let want_loss = r.f32("loss")[0];
    println!("loss: wgqat {} pytorch {}", s.loss, want_loss);
    assert!(
        (s.loss - want_loss).abs() < 2e-4,
        "loss {} vs {want_loss}",
        s.loss
    );
    for (name, g) in &s.grads {
        if bias_before_bn(name, &r.spec) {
            continue;
        }
        let (rel, cos) = agreement(g, r.f32(&format!("grad.{name}")));
        println!("grad {name}: rel err {rel:.2e} cos {cos:.6}");
        assert!(cos > 0.97, "grad {name}: cosine {cos}");
    }
    // BN running statistics after the step come from the forward pass only.
    for (name, v) in s.after.iter().filter(|(n, _)| n.contains("running")) {
        let (rel, _) = agreement(v, r.f32(&format!("sgd.{name}")));
        println!("sgd.{name}: rel err {rel:.2e}");
        assert!(rel < 1e-3, "sgd.{name}: relative error {rel:e}");
    }
}

/// Recomputing BatchNorm and shuffle outputs in the backward pass (to save memory) gives the
/// same bits as keeping them: loss, every gradient and every updated weight. (BatchNorm's
/// backward sums formed in grad-input add up in another order: tests/memory.rs's
/// `bn_sums_match_the_reduction_passes` compares those.)
#[test]
fn recomputed_outputs_change_no_bit() {
    for fixture in ["parity_float.safetensors", "parity_w8a8.safetensors"] {
        let r = load(fixture);
        let (a, b) = (
            step_with(&r, adam(&r), Outputs::RecomputedReducedInPasses),
            step_with(&r, adam(&r), Outputs::Kept),
        );
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{fixture}: loss");
        for (name, x, y) in a
            .grads
            .iter()
            .map(|(n, v)| (n, v, &b.grads[n]))
            .chain(a.after.iter().map(|(n, v)| (n, v, &b.after[n])))
        {
            let same =
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{fixture}: {name} differs");
        }
        println!(
            "{fixture}: loss, {} gradients and {} tensors after the step identical",
            a.grads.len(),
            a.after.len()
        );
    }
}

/// IAO (micronet's wqaq/iao) against `tools/torch_reference.py --scheme iao`: two SGD steps of
/// the tiny NIN-GC-shaped net on one batch, every conv quantized at W8A8 and the pools' inputs
/// too, for each q_type × q_level; and of the small ResNet (QuantAdd: two observers, one union
/// scale; the Linear head per row) for two of them; and with each conv's BatchNorm folded in
/// (`bn_fuse`: batch statistics of the float conv, gradients through them; `pretrained_model`:
/// the first step updates the running statistics instead of copying them; `bn_fuse_calib`: the
/// weight folded with the running variance, the conv rescaled to the batch's). The first step's loss and gradient directions, the second's
/// loss (its observers updated from the first), and after both every BatchNorm statistic and
/// every quantizer's scale, zero point and observer range.
#[test]
fn iao_steps_match_pytorch() {
    for fixture in [
        "parity_iao_symm_channel.safetensors",
        "parity_iao_symm_layer.safetensors",
        "parity_iao_asym_channel.safetensors",
        "parity_iao_asym_layer.safetensors",
        "parity_iao_resnet_symm_channel.safetensors",
        "parity_iao_resnet_asym_layer.safetensors",
        "parity_iao_bnfuse_symm_channel.safetensors",
        "parity_iao_bnfuse_asym_layer.safetensors",
        "parity_iao_bnfuse_symm_layer.safetensors",
        "parity_iao_bnfuse_asym_channel.safetensors",
        "parity_iao_bnfuse_resnet_symm_channel.safetensors",
        "parity_iao_bnfuse_pretrained.safetensors",
        "parity_iao_bnfuse_calib.safetensors",
        "parity_iao_bnfuse_calib_resnet.safetensors",
    ] {
        iao_steps(fixture);
    }
}

fn iao_steps(fixture: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let (_, meta) = read(&path).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    let options: wgqat::quant::IaoOptions = serde_json::from_value(cfg["scheme"].clone()).unwrap();
    let steps = cfg["steps"].as_u64().unwrap() as usize;
    let r = load(fixture);
    let gpu = common::gpu();
    let bits = Bits::new(r.bits).unwrap();
    let mut net = Network::new(
        gpu,
        &r.spec,
        QuantConfig::iao(bits, bits, options),
        r.batch,
        true,
        steps,
    )
    .unwrap();
    net.load_named(gpu, Path::new("fixture init"), r.state("init"))
        .unwrap();
    let mut opt = Optimizer::new(gpu, &net, sgd(&r)).unwrap();
    let mut plan = net.plan(gpu, r.batch, Mode::Train).unwrap();
    plan.ops.push_op(opt.op(gpu, &net).unwrap());
    let labels: Vec<u32> = match &r.tensors["labels"].data {
        Data::I64(v) => v.iter().map(|&l| l as u32).collect(),
        _ => panic!("labels"),
    };
    net.write_batch(gpu, &plan, r.f32("input"), &labels)
        .unwrap();
    let mut grads = HashMap::new();
    for k in 0..steps {
        net.write_step(gpu, &opt.next_values(r.lr, k as u32))
            .unwrap();
        opt.t += 1;
        plan.ops.submit(gpu, "iao parity step").unwrap();
        if k == 0 {
            for e in net.params.entries() {
                grads.insert(
                    e.name.clone(),
                    gpu.read_f32(&net.gradient(&e.name).unwrap()).unwrap(),
                );
            }
        }
    }
    let losses = net.read_metrics(gpu, steps).unwrap();
    println!("{fixture} ({options:?})");
    for (k, (loss, _)) in losses.iter().enumerate() {
        let want = r.f32(&format!("loss{k}"))[0];
        println!("  loss of step {}: wgqat {loss} pytorch {want}", k + 1);
        // Looser than DoReFa's 2e-4: an IAO scale is the max of a float tensor, so one ulp of
        // summation order there moves every code of the tensor a little (measured: 2.1e-3 at
        // step 1 for symmetric per-layer, 0 for the other three).
        let tol = [5e-3, 1e-2][k.min(1)];
        assert!(
            (loss - want).abs() < tol,
            "{fixture}: step {}: loss {loss} vs {want}",
            k + 1
        );
    }
    let mut worst_cos = 1.0f64;
    for (name, g) in &grads {
        if bias_before_bn(name, &r.spec) {
            continue;
        }
        let (_, cos) = agreement(g, r.f32(&format!("grad.{name}")));
        worst_cos = worst_cos.min(cos);
        assert!(cos > 0.97, "{fixture}: grad {name}: cosine {cos}");
    }
    println!(
        "  {} gradients of step 1: cosine >= {worst_cos:.6}",
        grads.len()
    );
    let after: HashMap<String, Named> = net
        .state_dict(gpu)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    // The same keys as micronet's IAO state dict (the reference's), no more, no fewer.
    let theirs = r.state("sgd");
    assert_eq!(after.len(), theirs.len(), "{fixture}: state-dict keys");
    let (mut checked, mut worst_rel) = (0, 0.0f64);
    for t in &theirs {
        let name = &t.name;
        let stateful = name.contains("_quantizer.") || name.contains(".observer_");
        if !(stateful || name.contains("running")) {
            continue;
        }
        let Some(Named {
            data: Data::F32(v), ..
        }) = after.get(name)
        else {
            panic!("{fixture}: wgqat has no F32 tensor {name}");
        };
        let want = t.f32s().unwrap();
        if name.ends_with("zero_point") {
            // A zero point is R(min/s): a range that moved by rounding may move it one code.
            let worst = v
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1.0, "{fixture}: {name} differs by {worst} codes");
        } else {
            let (rel, _) = agreement(v, want);
            worst_rel = worst_rel.max(rel);
            // The image's quantizer sees only the input: it must agree to rounding.
            let image = ["model.0.conv.activation", "conv1.0.activation"];
            let tol = if image.iter().any(|p| name.starts_with(p)) {
                1e-6
            } else {
                1e-2
            };
            assert!(rel < tol, "{fixture}: sgd.{name}: relative error {rel:e}");
        }
        checked += 1;
    }
    println!(
        "  {checked} BatchNorm and quantizer tensors after the steps: relative error <= {worst_rel:.2e}"
    );
}

/// IAO post-training quantization against `tools/torch_reference.py --ptq`: three training-mode
/// forward passes on one batch (histogram observers at the percentile, every quantizer
/// symmetric, BatchNorm statistics moving, no backward), then every scale, zero point, observer
/// range and BatchNorm statistic, for the tiny NIN-GC-shaped net (percentile 0.999) and the
/// small ResNet (0.9, QuantAdd's histogram observers).
#[test]
fn iao_ptq_calibration_matches_pytorch() {
    for fixture in ["ptq_iao.safetensors", "ptq_iao_resnet.safetensors"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        let (_, meta) = read(&path).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
        let options: wgqat::quant::IaoOptions =
            serde_json::from_value(cfg["scheme"].clone()).unwrap();
        assert!(options.ptq.is_some(), "{fixture}: a PTQ fixture");
        let passes = cfg["steps"].as_u64().unwrap();
        let r = load(fixture);
        let gpu = common::gpu();
        let bits = Bits::new(r.bits).unwrap();
        let mut net = Network::new(
            gpu,
            &r.spec,
            QuantConfig::iao(bits, bits, options),
            r.batch,
            true,
            1,
        )
        .unwrap();
        net.load_named(gpu, Path::new("fixture init"), r.state("init"))
            .unwrap();
        let plan = net.plan(gpu, r.batch, Mode::Calibrate).unwrap();
        let labels: Vec<u32> = match &r.tensors["labels"].data {
            Data::I64(v) => v.iter().map(|&l| l as u32).collect(),
            _ => panic!("labels"),
        };
        net.write_batch(gpu, &plan, r.f32("input"), &labels)
            .unwrap();
        for _ in 0..passes {
            plan.ops.submit(gpu, "calibration").unwrap();
        }
        let after: HashMap<String, Named> = net
            .state_dict(gpu)
            .unwrap()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let theirs = r.state("after");
        assert_eq!(after.len(), theirs.len(), "{fixture}: state-dict keys");
        let (mut checked, mut worst) = (0, 0.0f64);
        for t in &theirs {
            let name = &t.name;
            // num_batches_tracked: the trainer counts calibration passes, not the network.
            let Some(want) = t.f32s() else { continue };
            let Some(Named {
                data: Data::F32(v), ..
            }) = after.get(name)
            else {
                panic!("{fixture}: wgqat has no F32 tensor {name}");
            };
            let (rel, _) = agreement(v, want);
            worst = worst.max(rel);
            // Weights and the image did not change, so their quantizers agree to rounding; the
            // rest see activations that differ by float rounding.
            let exact = name.contains("weight_quantizer")
                || name.starts_with("model.0.conv.activation")
                || name.starts_with("conv1.0.activation")
                || !(name.contains("observer")
                    || name.contains("scale")
                    || name.contains("running"));
            // An observer's range (and the scale formed from it) behind several quantized
            // layers moves with the levels rounding puts activations on: less than one 8-bit
            // step of it (1/255) apart. (ResNet's fc input: 3.6e-4 with BatchNorm statistics
            // summed per channel, 1.1e-3 with them merged from the conv's tiles.)
            let observed = name.contains("observer") || name.contains("scale");
            let tol = match (exact, observed) {
                (true, _) => 1e-6,
                (false, true) => 3e-3,
                (false, false) => 1e-3,
            };

            assert!(rel < tol, "{fixture}: {name}: relative error {rel:e}");
            checked += 1;
        }
        println!(
            "{fixture}: {checked} tensors after {passes} calibration passes, relative error <= {worst:.2e}"
        );
    }
}

/// wbwtab (micronet's binary/ternary networks) against `tools/torch_reference.py --scheme
/// wbwtab`: one SGD step of the tiny NIN-GC-shaped net for W binary/ternary/float × A
/// binary/float: loss, every gradient, and the state after the step (binary weights centred in
/// place by the forward). With float activations, or float weights, both sides agree to
/// rounding. With binary weights *and* activations a conv output takes few distinct values, so
/// a BatchNorm output lands within rounding of 0 (in this batch 239 of 2304 values before the
/// last sign, 57 exactly 0 in PyTorch): which side of 0 is a matter of summation order, and each
/// flip moves the gradients (measured: loss 2.2171 vs 2.2227, gradient cosines down to 0.85).
/// Those are held to the loss and the gradients' direction only, as chaotic nets are.
#[test]
fn wbwtab_step_matches_pytorch() {
    use wgqat::quant::{Activations, Scheme, WbwtabOptions, Weights};
    for (fixture, weights, activations) in [
        (
            "parity_wbwtab_w2a32.safetensors",
            Weights::Binary,
            Activations::Float,
        ),
        (
            "parity_wbwtab_w3a32.safetensors",
            Weights::Ternary,
            Activations::Float,
        ),
        (
            "parity_wbwtab_w32a2.safetensors",
            Weights::Float,
            Activations::Binary,
        ),
        (
            "parity_wbwtab_w2a2.safetensors",
            Weights::Binary,
            Activations::Binary,
        ),
        (
            "parity_wbwtab_w3a2.safetensors",
            Weights::Ternary,
            Activations::Binary,
        ),
    ] {
        let chaotic = weights != Weights::Float && activations == Activations::Binary;
        let (loss_tol, cos_min, rel_max) = if chaotic {
            (2e-2, 0.7, 5e-2)
        } else {
            (1e-5, 0.9999, 1e-4)
        };
        let r = load(fixture);
        let gpu = common::gpu();
        let quant = QuantConfig {
            scheme: Scheme::Wbwtab(WbwtabOptions {
                weights,
                activations,
            }),
            ..QuantConfig::default()
        };
        let mut net = Network::new(gpu, &r.spec, quant, r.batch, true, 1).unwrap();
        net.load_named(gpu, Path::new("fixture init"), r.state("init"))
            .unwrap();
        let opt = Optimizer::new(gpu, &net, sgd(&r)).unwrap();
        let mut plan = net.plan(gpu, r.batch, Mode::Train).unwrap();
        plan.ops.push_op(opt.op(gpu, &net).unwrap());
        let labels: Vec<u32> = match &r.tensors["labels"].data {
            Data::I64(v) => v.iter().map(|&l| l as u32).collect(),
            _ => panic!("labels"),
        };
        net.write_batch(gpu, &plan, r.f32("input"), &labels)
            .unwrap();
        net.write_step(gpu, &opt.next_values(r.lr, 0)).unwrap();
        plan.ops.submit(gpu, "wbwtab parity step").unwrap();
        let loss = net.read_metrics(gpu, 1).unwrap()[0].0;
        let want = r.f32("loss")[0];
        assert!(
            (loss - want).abs() < loss_tol,
            "{fixture}: loss {loss} vs {want}"
        );
        let mut worst_cos = 1.0f64;
        for e in net.params.entries() {
            if bias_before_bn(&e.name, &r.spec) {
                continue;
            }
            let g = gpu.read_f32(&net.gradient(&e.name).unwrap()).unwrap();
            let (_, cos) = agreement(&g, r.f32(&format!("grad.{}", e.name)));
            worst_cos = worst_cos.min(cos);
            assert!(cos > cos_min, "{fixture}: grad {}: cosine {cos}", e.name);
        }
        let mut worst_rel = 0.0f64;
        for t in net.state_dict(gpu).unwrap() {
            let Data::F32(v) = &t.data else { continue };
            // A conv bias before a BatchNorm moves by its gradient, which is rounding noise; in
            // the chaotic nets only the weights (centred in place, then updated) are compared.
            if bias_before_bn(&t.name, &r.spec) || (chaotic && !t.name.ends_with("conv.weight")) {
                continue;
            }
            let (rel, _) = agreement(v, r.f32(&format!("sgd.{}", t.name)));
            worst_rel = worst_rel.max(rel);
            assert!(
                rel < rel_max,
                "{fixture}: sgd.{}: relative error {rel:e}",
                t.name
            );
        }
        println!(
            "{fixture}: loss wgqat {loss} pytorch {want}; gradients: cosine >= {worst_cos:.6}; state after: relative error <= {worst_rel:.2e}"
        );
    }
}
