//! Shaders marked trusted compile without naga's runtime bounds checks. An access out of bounds
//! reads or writes something else than the clamped access does, so the whole kernel suite must
//! give identical bits with checks on and off. What this sees depends on the driver: an overrun
//! of a workgroup or private array shows (reading `partial[lid + 2 stride + 200]` in reduce.wgsl
//! made 15 of 276 outputs differ on lavapipe); a storage-buffer overrun does not where Vulkan's
//! robust buffer access bounds it either way (lavapipe), though it would on drivers without it.
//!
//! Likewise the GEMM kernels give the same bits whether their pipelines are specialised to each
//! layer's geometry or read it from uniforms (only the index arithmetic differs), and whether
//! they read their operands and write their outputs as vec4s or element by element (the tiles
//! and outputs hold the same values).

use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::selftest;

fn device(checks: bool) -> Gpu {
    Gpu::new(&GpuOptions::default())
        .unwrap_or_else(|e| panic!("tests need a GPU adapter (lavapipe is enough): {e}"))
        .with_shader_checks(checks)
}

/// Runs every case on both devices, the two devices side by side (lavapipe compiles one
/// pipeline at a time per device); returns the outputs compared and those that differ.
fn compare(a_dev: &Gpu, b_dev: &Gpu, cases: &[selftest::Case]) -> (usize, Vec<String>) {
    let (on_a, on_b) = std::thread::scope(|s| {
        let on_a = s.spawn(|| selftest::run_cases(a_dev, cases, 1, &mut |_| {}));
        let on_b = selftest::run_cases(b_dev, cases, 1, &mut |_| {});
        (on_a.join().expect("the cases on the first device"), on_b)
    });
    let (mut outputs, mut differ) = (0, Vec::new());
    for (a, b) in on_a.iter().zip(&on_b) {
        let what = format!("{} {} {}", a.kernel, a.direction, a.shape);
        assert!(
            a.error.is_none() && b.error.is_none(),
            "{what}: {:?} / {:?}",
            a.error,
            b.error
        );
        assert_eq!(a.outputs.len(), b.outputs.len(), "{what}");
        for ((name, x), (_, y)) in a.outputs.iter().zip(&b.outputs) {
            outputs += 1;
            if x.got_digest != y.got_digest {
                differ.push(format!("{what}: {name}"));
            }
        }
    }
    (outputs, differ)
}

#[test]
fn kernel_suite_gives_identical_bits_with_and_without_runtime_checks() {
    let (unchecked, checked) = (device(false), device(true));
    assert!(!unchecked.shader_checks() && checked.shader_checks());
    let cases = selftest::cases();
    let (outputs, differ) = compare(&unchecked, &checked, &cases);
    println!(
        "{} cases, {outputs} outputs: {} differ with runtime checks on",
        cases.len(),
        differ.len()
    );
    assert!(differ.is_empty(), "outputs differ: {differ:#?}");
}

#[test]
fn gemms_give_identical_bits_specialised_or_shared() {
    let specialised = device(false).with_specialized_gemms(true);
    let shared = device(false).with_specialized_gemms(false);
    // The first shapes of each family: strides, padding, dilation, groups, odd sizes, and
    // transposed convolutions' output padding (each case compiles two pipelines).
    let first_shapes = |kernel: &str, n: usize| {
        let cases = selftest::cases_for(kernel);
        let mut keep: Vec<String> = cases.iter().map(|c| c.shape.clone()).collect();
        keep.dedup();
        keep.truncate(n);
        cases
            .into_iter()
            .filter(move |c| keep.contains(&c.shape) && c.direction != "grad_bias")
    };
    let cases: Vec<selftest::Case> = first_shapes("conv2d", 5)
        .chain(first_shapes("conv_transpose2d", 3))
        .collect();
    let (outputs, differ) = compare(&specialised, &shared, &cases);
    println!(
        "{} GEMM cases, {outputs} outputs: {} differ between specialised and shared pipelines",
        cases.len(),
        differ.len()
    );
    assert!(
        outputs >= 30 && differ.is_empty(),
        "outputs differ: {differ:#?}"
    );
}

#[test]
fn gemms_give_identical_bits_with_and_without_vector_loads() {
    let vector = device(false).with_vector_loads(true);
    let scalar = device(false).with_vector_loads(false);
    // Shapes that use every vector form (pointwise convs with pixel counts a multiple of 4,
    // weight rows a multiple of 4, tails in rows, columns and K; vec4 stores where images or
    // weight rows hold a multiple of 4), with the BatchNorm work done on load (input formed,
    // backward applied, its sums in grad-input), the input quantizer's mask and requantization
    // in grad-input, and a transposed convolution.
    let vector_shapes = [
        "w[70, 12, 1, 1]",
        "x[2, 64, 4, 4] w[64, 16, 1, 1]",
        "w[32, 4, 3, 3]",
        "x[2, 70, 4, 4]",
        "w[260, 10, 1, 1]",
        "w[16, 120, 1, 1]",
        "x[1, 3, 32, 32]",
        "x[2, 64, 6, 6] w[128, 16, 3, 3]",
        "x[2, 8, 6, 6] w[12, 4, 3, 3]",
    ];
    let cases: Vec<selftest::Case> = ["conv2d", "conv_transpose2d"]
        .into_iter()
        .flat_map(selftest::cases_for)
        .filter(|c| vector_shapes.iter().any(|s| c.shape.contains(s)) && c.direction != "grad_bias")
        .collect();
    let (outputs, differ) = compare(&vector, &scalar, &cases);
    println!(
        "{} GEMM cases, {outputs} outputs: {} differ between vector and scalar loads",
        cases.len(),
        differ.len()
    );
    assert!(
        outputs >= 30 && differ.is_empty(),
        "outputs differ: {differ:#?}"
    );
}
