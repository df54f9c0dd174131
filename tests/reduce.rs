//! Per-channel sums against the f64 reference, and determinism run to run.
mod common;

use wgqat::DType;
use wgqat::kernels::reduce::channel_sum;
use wgqat::rng::Rng;
use wgqat::selftest::run_read;

#[test]
fn channel_sum_matches_reference() {
    common::run_kernel_cases("channel_sum");
}

#[test]
fn channel_sum_is_deterministic() {
    let gpu = common::gpu();
    let x = Rng::new(3).vec_uniform(8 * 16 * 999, -1.0, 1.0);
    let xt = gpu.upload_f32("x", &[8, 16, 999], &x).unwrap();
    let out = gpu.empty("out", &[16], DType::F32).unwrap();
    let a = run_read(gpu, vec![channel_sum(gpu, &xt, &out).unwrap()], &[&out]).unwrap();
    let b = run_read(gpu, vec![channel_sum(gpu, &xt, &out).unwrap()], &[&out]).unwrap();
    assert_eq!(
        a[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}
