//! The quantized conv forward on cooperative matrices, through its plain-WGSL emulation (no
//! machine here has cooperative matrices; the kernels and the start-up check are the same code
//! the hardware path runs): the start-up check a device with cooperative matrices passes before
//! they are used, and a network's logits through it against the fp32 path.

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
        let coop_launches: Vec<bool> = plan
            .ops
            .ops()
            .iter()
            .filter_map(|op| match op {
                wgqat::gpu::Op::Dispatch(l) if l.kernel_name().starts_with("conv_coop") => {
                    Some(l.memory_bound())
                }
                _ => None,
            })
            .collect();
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
