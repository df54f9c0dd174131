//! Shaders marked trusted compile without naga's runtime bounds checks. An access out of bounds
//! reads or writes something else than the clamped access does, so the whole kernel suite must
//! give identical bits with checks on and off. What this sees depends on the driver: an overrun
//! of a workgroup or private array shows (reading `partial[lid + 2 stride + 200]` in reduce.wgsl
//! made 15 of 276 outputs differ on lavapipe); a storage-buffer overrun does not where Vulkan's
//! robust buffer access bounds it either way (lavapipe), though it would on drivers without it.

use wgqat::gpu::{Gpu, GpuOptions};
use wgqat::selftest;

fn device(checks: bool) -> Gpu {
    Gpu::new(&GpuOptions::default())
        .unwrap_or_else(|e| panic!("tests need a GPU adapter (lavapipe is enough): {e}"))
        .with_shader_checks(checks)
}

#[test]
fn kernel_suite_gives_identical_bits_with_and_without_runtime_checks() {
    let (unchecked, checked) = (device(false), device(true));
    assert!(!unchecked.shader_checks() && checked.shader_checks());
    let cases = selftest::cases();
    let (mut outputs, mut differ) = (0, Vec::new());
    for case in &cases {
        let (a, b) = (case.run(&unchecked), case.run(&checked));
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
    println!(
        "{} cases, {outputs} outputs: {} differ with runtime checks on",
        cases.len(),
        differ.len()
    );
    assert!(differ.is_empty(), "outputs differ: {differ:#?}");
}
