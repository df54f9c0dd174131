//! The quantized conv forward on cooperative matrices, through its plain-WGSL emulation (no
//! machine here has cooperative matrices; the kernels and the start-up check are the same code
//! the hardware path runs): the start-up check a device with cooperative matrices passes before
//! they are used, and a network's logits through it against the fp32 path.

mod common;

use wgqat::gpu::{CoopMode, Gpu, GpuOptions};
use wgqat::nn::{Mode, Network, init};
use wgqat::quant::{Bits, QuantConfig};

fn emulated() -> Option<Gpu> {
    let gpu = Gpu::new(&GpuOptions::default()).expect("an adapter");
    // The emulation needs f16 in shaders (lavapipe has it).
    gpu.caps
        .shader_f16
        .then(|| gpu.with_coop(Some(CoopMode::Emulated)))
}

#[test]
fn the_start_up_check_passes_on_the_emulated_path() {
    let Some(gpu) = emulated() else { return };
    wgqat::kernels::conv_coop::verify(&gpu).unwrap();
}

/// Logits of a net whose last conv is quantized (so no quantizer after it can round the small
/// differences into different codes): the same weights on both paths, within f32 rounding.
#[test]
fn logits_through_the_emulated_tensor_core_conv_match_the_fp32_path() {
    let Some(coop) = emulated() else { return };
    let fp32 = Gpu::new(&GpuOptions::default()).unwrap();
    let spec = wgqat::models::ModelSpec::from_json(
        r#"{"name": "coop_head", "input": [3, 12, 12], "layers": [
            {"type": "conv", "out": 24, "kernel": 3, "padding": 1, "name": "model.0.conv"},
            {"type": "batchnorm", "name": "model.0.bn"},
            {"type": "relu"},
            {"type": "conv", "out": 10, "kernel": 3, "padding": 1, "name": "model.1.conv"},
            {"type": "avgpool", "kernel": 12},
            {"type": "flatten"}
        ]}"#,
        "coop test",
    )
    .unwrap();
    let b = Bits::new(4).unwrap();
    let batch = 6;
    let mut logits = Vec::new();
    for gpu in [&fp32, &coop] {
        let net = Network::new(gpu, &spec, QuantConfig::dorefa(b, b), batch, true, 1).unwrap();
        init::initialise(gpu, &net, 3).unwrap();
        let plan = net.plan(gpu, batch, Mode::Eval).unwrap();
        let images: Vec<f32> = (0..batch * 3 * 144)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        // The tensor-core GEMM counts as arithmetic-bound, as conv2d.wgsl's GEMMs do, so that
        // `wgqat bench`'s memory-bound bytes are the same on both paths.
        let coop_launches = coop_memory_bound(&plan.ops);
        let on_coop = std::ptr::eq(gpu, &coop);
        assert_eq!(coop_launches, if on_coop { vec![false] } else { vec![] });
        gpu.write(&plan.input, &images).unwrap();
        let out = net.output().unwrap();
        let got: Vec<Vec<f32>> = gpu.run_and_read("step", plan.ops.ops(), &[out]).unwrap();
        logits.push(got[0][..batch * 10].to_vec());
    }
    let scale = logits[0].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = logits[0]
        .iter()
        .zip(&logits[1])
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("logits: largest {scale:e}, worst difference {worst:e}");
    assert!(scale > 0.0 && worst <= 1e-5 * scale, "{worst} of {scale}");
}

/// One SGD step of `two_bn_net` on the emulated tensor-core kernels: the loss, and every
/// tensor after the step, as on the fp32 path within rounding.
#[test]
fn a_training_step_through_the_emulated_tensor_core_kernels_matches_the_fp32_path() {
    let Some(coop) = emulated() else { return };
    let fp32 = Gpu::new(&GpuOptions::default()).unwrap();
    for in_loads in [false, true] {
        let on_fp32 = one_step(&fp32, None, in_loads);
        let on_coop = one_step(&coop, None, in_loads);
        let worst = assert_close(&on_fp32, &on_coop);
        println!(
            "one step (the second BatchNorm's backward {}): losses {} / {}, worst tensor difference {worst:.2e} of its largest value (at least 1e-3)",
            if in_loads {
                "in the conv's loads"
            } else {
                "in a pass"
            },
            on_fp32.0,
            on_coop.0
        );
    }
    // Where it is applied changes no bit on either path.
    assert_eq!(one_step(&coop, None, false), one_step(&coop, None, true));
    assert_eq!(one_step(&fp32, None, false), one_step(&fp32, None, true));
}

/// A layer's GEMMs follow its `CoopUse`: each direction on the tensor-core kernels or the fp32
/// ones as set, the plan naming each GEMM launch's layer, direction and kernel; with every one
/// kept on fp32 the step gives the fp32 path's bits, and with some on each, its values within
/// rounding.
#[test]
fn each_gemm_runs_on_the_kernel_its_layers_coop_use_names() {
    use wgqat::nn::{CoopUse, GemmDirection};
    let Some(coop) = emulated() else { return };
    let b = Bits::new(8).unwrap();
    let mut net =
        Network::new(&coop, &two_bn_net(), QuantConfig::dorefa(b, b), 6, true, 1).unwrap();
    // Only the quantized conv can (the first conv is float).
    assert_eq!(
        net.coop_layers(&coop),
        [("model.1.conv".to_string(), GemmDirection::ALL.to_vec())]
    );
    for bits in 0..8u8 {
        let uses = CoopUse {
            forward: bits & 1 != 0,
            grad_input: bits & 2 != 0,
            grad_weight: bits & 4 != 0,
        };
        net.set_coop_use("model.1.conv", uses).unwrap();
        let plan = net.plan(&coop, 6, Mode::Train).unwrap();
        let mut seen = Vec::new();
        for g in &plan.gemms {
            let on_coop = g.layer == "model.1.conv" && uses.get(g.direction);
            assert_eq!(g.coop, on_coop, "{uses:?}: {g:?}");
            let wgqat::gpu::Op::Dispatch(l) = &plan.ops.ops()[g.op] else {
                panic!("{g:?} is not a dispatch")
            };
            assert_eq!(
                l.kernel_name().starts_with("conv_coop"),
                g.coop,
                "{}",
                l.label
            );
            assert!(l.label.contains(g.direction.name()), "{g:?}: {}", l.label);
            seen.push((g.layer.as_str(), g.direction));
        }
        // Both convs' three GEMMs (the first conv has no grad-input), in plan order.
        use GemmDirection::*;
        assert_eq!(
            seen,
            [
                ("model.0.conv", Forward),
                ("model.1.conv", Forward),
                ("model.1.conv", GradInput),
                ("model.1.conv", GradWeight),
                ("model.0.conv", GradWeight),
            ],
            "{uses:?}"
        );
        assert_eq!(coop_launches(&plan).len(), bits.count_ones() as usize);
    }
    let e = net
        .set_coop_use("model.1.bn", CoopUse::default())
        .unwrap_err();
    assert!(e.to_string().contains("model.1.bn"), "{e}");
    let fp32 = Gpu::new(&GpuOptions::default()).unwrap();
    let on_fp32 = one_step(&fp32, None, true);
    let none = CoopUse {
        forward: false,
        grad_input: false,
        grad_weight: false,
    };
    assert_eq!(
        one_step(&coop, Some(none), true),
        on_fp32,
        "every GEMM kept on fp32"
    );
    let mixed = CoopUse {
        grad_input: false,
        ..CoopUse::default()
    };
    assert_close(&on_fp32, &one_step(&coop, Some(mixed), true));
}

/// The tuning times the quantized conv's three GEMMs on both kernels and keeps each on the
/// faster; a network it is applied to runs them so. (Which is faster is the device's business:
/// the test checks that the choice follows the timings, whichever they are.) A device without
/// cooperative matrices has nothing to tune.
#[test]
fn the_tuning_keeps_each_gemm_on_the_kernel_it_timed_faster() {
    let Some(coop) = emulated() else { return };
    let b = Bits::new(8).unwrap();
    let quant = QuantConfig::dorefa(b, b);
    let t = wgqat::tune::tune(&coop, &two_bn_net(), quant, 6, 1)
        .unwrap()
        .expect("the emulated path has GEMMs to tune");
    assert_eq!(t.gemms.len(), 3, "{:?}", t.gemms);
    for g in &t.gemms {
        assert_eq!(g.layer, "model.1.conv");
        assert!(g.fp32_s > 0.0 && g.coop_s > 0.0, "{g:?}");
        assert_eq!(g.coop, g.coop_s <= g.fp32_s, "{g:?}");
    }
    let [(layer, uses)] = &t.uses[..] else {
        panic!("{:?}", t.uses)
    };
    assert_eq!(layer, "model.1.conv");
    let mut net = Network::new(&coop, &two_bn_net(), quant, 6, true, 1).unwrap();
    wgqat::tune::apply(&mut net, &t.uses).unwrap();
    let plan = net.plan(&coop, 6, Mode::Train).unwrap();
    for g in plan.gemms.iter().filter(|g| g.layer == "model.1.conv") {
        assert_eq!(g.coop, uses.get(g.direction), "{g:?}");
        let tuned = t.gemms.iter().find(|t| t.direction == g.direction).unwrap();
        assert_eq!(g.coop, tuned.coop, "{g:?}");
    }
    println!("{}", t.lines().join("\n"));
    let fp32 = Gpu::new(&GpuOptions::default()).unwrap();
    assert!(
        wgqat::tune::tune(&fp32, &two_bn_net(), quant, 6, 1)
            .unwrap()
            .is_none()
    );
}

/// The loss and every f32 tensor after one SGD step of `two_bn_net` (its quantized conv reads a
/// BatchNorm's output and feeds another, so its forward, grad-input and grad-weight do the
/// first BatchNorm's work on load) on `gpu`, with model.1.conv's `CoopUse` if given. The second
/// BatchNorm's backward is applied in a pass (the default after a 3×3 conv) or, with
/// `bn_in_loads`, where model.1.conv's backward GEMMs load its output gradient.
fn one_step(
    gpu: &Gpu,
    uses: Option<wgqat::nn::CoopUse>,
    bn_in_loads: bool,
) -> (f32, Vec<(String, Vec<f32>)>) {
    use wgqat::train::{Optimizer, OptimizerName, TrainConfig};
    let b = Bits::new(8).unwrap();
    let batch = 6;
    let images: Vec<f32> = (0..batch * 3 * 144)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let labels: Vec<u32> = (0..batch as u32).collect();
    let spec = two_bn_net();
    let mut net = Network::new(gpu, &spec, QuantConfig::dorefa(b, b), batch, true, 1).unwrap();
    if let Some(u) = uses {
        net.set_coop_use("model.1.conv", u).unwrap();
    }
    if bn_in_loads {
        net.apply_bn_backward_in_every_conv().unwrap();
    }
    init::initialise(gpu, &net, 3).unwrap();
    let config = TrainConfig {
        optimizer: OptimizerName::Sgd,
        ..TrainConfig::default()
    };
    let opt = Optimizer::new(gpu, &net, config.optimizer_kind()).unwrap();
    let mut plan = net.plan(gpu, batch, Mode::Train).unwrap();
    let on_coop = coop_launches(&plan);
    if gpu.coop().is_some() && uses.is_none() {
        // model.1.conv's forward, grad-input (with the BatchNorm before's mask and sums)
        // and grad-weight, with the first BatchNorm's work on load, and the second's backward
        // where asked.
        assert_eq!(on_coop.len(), 3, "{on_coop:?}");
        assert!(on_coop[0].contains("forward") && on_coop[0].contains("through bn"));
        assert!(on_coop[0].contains("packed 4x32"), "{}", on_coop[0]);
        assert!(on_coop[1].contains("grad_input"), "{}", on_coop[1]);
        assert!(on_coop[1].contains("+bn sums"), "{}", on_coop[1]);
        assert!(on_coop[2].contains("grad_weight"), "{}", on_coop[2]);
        for gemm in &on_coop[1..] {
            assert_eq!(gemm.contains("+bn backward"), bn_in_loads, "{gemm}");
        }
        // The GEMMs count as arithmetic, not memory traffic.
        assert_eq!(coop_memory_bound(&plan.ops), [false; 3]);
    } else if gpu.coop().is_none() {
        assert!(on_coop.is_empty());
    }
    plan.ops.push_op(opt.op(gpu, &net).unwrap());
    net.write_batch(gpu, &plan, &images, &labels).unwrap();
    net.write_step(gpu, &opt.next_values(0.1, 0)).unwrap();
    plan.ops.submit(gpu, "coop check step").unwrap();
    let loss = net.read_metrics(gpu, 1).unwrap()[0].0;
    assert!(loss.is_finite() && loss > 1.0, "loss {loss}");
    (loss, common::f32_state(gpu, &net))
}

/// Asserts two steps' losses and tensors agree within the tensor-core path's rounding (the
/// forward sums and the backward's two f16 halves of dy round differently from fp32); returns
/// the worst difference relative to its tensor's largest value.
fn assert_close(a: &(f32, Vec<(String, Vec<f32>)>), c: &(f32, Vec<(String, Vec<f32>)>)) -> f32 {
    let (l0, l1) = (a.0, c.0);
    assert!((l0 - l1).abs() <= 1e-5 * l0.abs(), "losses {l0} and {l1}");
    let mut worst = 0.0f32;
    for ((name, a), (_, c)) in a.1.iter().zip(&c.1) {
        let scale = a.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(c)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale.max(1e-3));
        assert!(
            diff <= 1e-4 * scale + 1e-7,
            "{name} differs by {diff:e} (largest {scale:e})"
        );
    }
    worst
}

/// A net whose quantized conv (model.1.conv) reads a BatchNorm's output and feeds another: two
/// groups of 5 output channels, which the coop forward packs into one tile.
fn two_bn_net() -> wgqat::models::ModelSpec {
    wgqat::models::ModelSpec::from_json(
        r#"{"name": "coop_step", "input": [3, 12, 12], "layers": [
        {"type": "conv", "out": 8, "kernel": 3, "padding": 1, "name": "model.0.conv"},
        {"type": "batchnorm", "name": "model.0.bn"},
        {"type": "relu"},
        {"type": "conv", "out": 10, "kernel": 3, "padding": 1, "groups": 2, "name": "model.1.conv"},
        {"type": "batchnorm", "name": "model.1.bn"},
        {"type": "relu"},
        {"type": "avgpool", "kernel": 12},
        {"type": "flatten"}
    ]}"#,
        "coop test",
    )
    .unwrap()
}

/// The dispatches of `ops` on the (emulated) cooperative-matrix kernels, in plan order.
fn coop_dispatches(ops: &wgqat::gpu::Recorder) -> impl Iterator<Item = &wgqat::gpu::Launch> {
    ops.ops().iter().filter_map(|op| match op {
        wgqat::gpu::Op::Dispatch(l) if l.kernel_name().starts_with("conv_coop") => Some(l),
        _ => None,
    })
}

/// Whether each launch of `ops` on the (emulated) cooperative-matrix kernels counts as
/// memory-bound, in plan order.
fn coop_memory_bound(ops: &wgqat::gpu::Recorder) -> Vec<bool> {
    coop_dispatches(ops).map(|l| l.memory_bound()).collect()
}

/// The labels of a training plan's launches on the (emulated) cooperative-matrix kernels.
fn coop_launches(plan: &wgqat::nn::Plan) -> Vec<String> {
    coop_dispatches(&plan.ops)
        .map(|l| l.label.clone())
        .collect()
}

/// A device whose backward kernels failed their start-up check (or that `WGQAT_COOP` left
/// out) keeps the rest on cooperative matrices and runs those on the fp32 kernels: without
/// grad-input, the forward and grad-weight stay there; without grad-weight, the forward and
/// grad-input; without both, the forward alone.
#[test]
fn without_the_backward_kernels_only_what_passed_runs_on_cooperative_matrices() {
    let b = Bits::new(8).unwrap();
    for (grad_weight, grad_input, want) in [
        (true, false, &["forward", "grad_weight"][..]),
        (false, true, &["forward", "grad_input"][..]),
        (false, false, &["forward"][..]),
    ] {
        let Some(coop) = emulated() else { return };
        let gpu = coop
            .with_coop_grad_input(grad_input)
            .with_coop_grad_weight(grad_weight);
        assert!(gpu.coop().is_some());
        assert_eq!(gpu.coop_grad_input().is_some(), grad_input);
        assert_eq!(gpu.coop_grad_weight().is_some(), grad_weight);
        let net = Network::new(&gpu, &two_bn_net(), QuantConfig::dorefa(b, b), 6, true, 1).unwrap();
        let plan = net.plan(&gpu, 6, Mode::Train).unwrap();
        let on_coop = coop_launches(&plan);
        assert_eq!(on_coop.len(), want.len(), "{on_coop:?}");
        for (label, kind) in on_coop.iter().zip(want) {
            assert!(label.contains(kind), "{on_coop:?}");
        }
        wgqat::kernels::conv_coop::verify(&gpu).unwrap();
    }
}
