//! Shared by the integration tests: one device per test binary, and a runner for the selftest
//! cases of a kernel.
#![allow(dead_code)]

use std::sync::OnceLock;
use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::selftest;

/// The device all tests of a binary share (tests run on threads; wgpu devices are thread-safe).
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(&GpuOptions::default())
            .unwrap_or_else(|e| panic!("tests need a GPU adapter (lavapipe is enough): {e}"))
    })
}

/// Runs every selftest case of `kernel` and fails with all failures described.
pub fn run_kernel_cases(kernel: &str) {
    let gpu = gpu();
    let cases = selftest::cases_for(kernel);
    assert!(!cases.is_empty(), "no selftest cases for {kernel}");
    let mut failures = Vec::new();
    for case in &cases {
        let out = case.run(gpu);
        println!("{} ({:.2}s)", out.describe(), out.seconds);
        if !out.passed() {
            failures.push(out.describe());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
