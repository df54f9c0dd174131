//! The DoReFa quantizers on the GPU: every selftest case (levels bit for bit, backward within the
//! stated tolerance, codes round trip, exact division), and the spec's worked vectors.
mod common;

use wgqat::DType;
use wgqat::kernels::quant::{WeightQuantizer, act_forward};
use wgqat::quant::Bits;

#[test]
fn activation_quantizer_matches_reference() {
    common::run_kernel_cases("act_quant");
}

#[test]
fn weight_quantizer_matches_reference() {
    common::run_kernel_cases("weight_quant");
}

#[test]
fn exact_division_corrects_quotients_off_by_a_few_ulp() {
    common::run_kernel_cases("exact_div");
}

#[test]
fn spec_worked_vectors_on_the_gpu() {
    let gpu = common::gpu();
    let b8 = Bits::new(8).unwrap();
    let x = [
        -1.0f32, 0.0, 0.001, 0.5, 0.0196, 5.0, 9.99, 10.0, 10.000_001, 15.0,
    ];
    let xt = gpu.upload_f32("x", &[10], &x).unwrap();
    let yt = gpu.empty("y", &[10], DType::F32).unwrap();
    let y: Vec<Vec<f32>> = gpu
        .run_and_read("t", &[act_forward(gpu, b8, &xt, &yt).unwrap()], &[&yt])
        .unwrap();
    let k: Vec<f32> = y[0].iter().map(|v| (v * 255.0).round()).collect();
    assert_eq!(
        k,
        vec![0.0, 0.0, 0.0, 13.0, 0.0, 128.0, 255.0, 255.0, 255.0, 255.0]
    );

    let b4 = Bits::new(4).unwrap();
    let w = [0.3f32, -1.2, 0.9, 0.0, 0.7, -0.05];
    let g = [0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5];
    let wt = gpu.upload_f32("w", &[6], &w).unwrap();
    let gt = gpu.upload_f32("g", &[6], &g).unwrap();
    let w_hat = gpu.empty("w_hat", &[6], DType::F32).unwrap();
    let dw = gpu.empty("dw", &[6], DType::F32).unwrap();
    let q = WeightQuantizer::new(gpu, b4, &[6]).unwrap();
    let mut ops = q.forward(gpu, &wt, &w_hat).unwrap();
    ops.extend(q.backward(gpu, &gt, &dw).unwrap());
    let out: Vec<Vec<f32>> = gpu.run_and_read("t", &ops, &[&w_hat, &dw]).unwrap();
    let want_w = [0.333333, -1.0, 0.866667, 0.066667, 0.733333, -0.066667];
    let want_dw = [0.548871, 0.460852, 1.168151, 0.299884, -0.571046, 1.794816];
    for i in 0..6 {
        assert!((out[0][i] as f64 - want_w[i]).abs() < 1e-6, "{:?}", out[0]);
        assert!((out[1][i] as f64 - want_dw[i]).abs() < 2e-6, "{:?}", out[1]);
    }
    // With ties in the max, the max term is split evenly (torch >= 1.7 autograd).
    let w_tie = [0.3f32, -1.2, 1.2, 0.0, 0.7, -0.05];
    gpu.write(&wt, &w_tie).unwrap();
    let out: Vec<Vec<f32>> = gpu.run_and_read("t", &ops, &[&dw]).unwrap();
    let want_tie = [0.548871, 0.098991, 0.266892, 0.299884, -0.571045, 1.794816];
    for i in 0..6 {
        assert!(
            (out[0][i] as f64 - want_tie[i]).abs() < 2e-6,
            "{:?}",
            out[0]
        );
    }
}
