//! BatchNorm, pooling, channel shuffle, losses and optimizers against the f64 reference.
mod common;

#[test]
fn batchnorm_matches_reference() {
    common::run_kernel_cases("batchnorm");
}

#[test]
fn pooling_and_shuffle_match_reference() {
    common::run_kernel_cases("maxpool");
    common::run_kernel_cases("avgpool");
    common::run_kernel_cases("channel_shuffle");
}

#[test]
fn losses_match_reference() {
    common::run_kernel_cases("cross_entropy");
    common::run_kernel_cases("mse");
}

#[test]
fn optimizers_match_reference() {
    common::run_kernel_cases("optimizer");
}

/// A plan names each weighted layer's GEMM launches by layer and direction, whatever GEMM
/// computes them: a transposed conv's forward is a grad-input GEMM and its grad-input a
/// forward one, and a Linear's run through the same kernel. Backward comes in reverse layer
/// order; the first layer has no grad-input.
#[test]
fn a_plan_names_each_gemm_by_layer_and_direction() {
    use wgqat::nn::{GemmDirection::*, Mode, Network};
    let gpu = wgqat::Gpu::new(&wgqat::GpuOptions::default()).unwrap();
    let spec = wgqat::models::ModelSpec::from_json(
        r#"{"name": "gemms", "input": [3, 8, 8], "layers": [
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "name": "c"},
        {"type": "relu"},
        {"type": "conv_transpose", "out": 4, "kernel": 2, "stride": 2, "name": "t"},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "out": 10, "name": "fc"}
    ]}"#,
        "plan gemms test",
    )
    .unwrap();
    let q = wgqat::quant::QuantConfig::dorefa(
        wgqat::quant::Bits::new(32).unwrap(),
        wgqat::quant::Bits::new(32).unwrap(),
    );
    let net = Network::new(&gpu, &spec, q, 2, true, 1).unwrap();
    let plan = net.plan(&gpu, 2, Mode::Train).unwrap();
    let seen: Vec<(&str, _, bool)> = plan
        .gemms
        .iter()
        .map(|g| (g.layer.as_str(), g.direction, g.coop))
        .collect();
    assert_eq!(
        seen,
        [
            ("c", Forward, false),
            ("t", Forward, false),
            ("fc", Forward, false),
            ("fc", GradInput, false),
            ("fc", GradWeight, false),
            ("t", GradInput, false),
            ("t", GradWeight, false),
            ("c", GradWeight, false),
        ]
    );
    // Each names a launch of the conv GEMM kernel, at increasing places in the plan.
    for w in plan.gemms.windows(2) {
        assert!(w[0].op < w[1].op);
    }
    for g in &plan.gemms {
        let wgqat::gpu::Op::Dispatch(l) = &plan.ops.ops()[g.op] else {
            panic!("{g:?}")
        };
        assert!(l.kernel_name().starts_with("conv2d.wgsl:"), "{g:?}: {l:?}");
    }
}
