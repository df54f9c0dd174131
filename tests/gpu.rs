//! The GPU layer: buffer reuse, limit errors, shape checks, error scopes, one submit per recording.
mod common;

use wgqat::gpu::{Gpu, GpuOptions, Recorder, thread_submit_count};
use wgqat::kernels::elementwise::{relu_backward, relu_forward};
use wgqat::{DType, Error};

#[test]
fn pool_reuses_buffers_so_steady_state_allocates_nothing() {
    // A device of its own: the shared one's pool also serves the tests running beside this one,
    // whose allocations would count here.
    let gpu = &Gpu::new(&GpuOptions::default()).unwrap();
    // Warm-up: the sizes a "step" needs.
    let step = || {
        let a = gpu.empty("a", &[1000, 3], DType::F32).unwrap();
        let b = gpu.empty("b", &[77], DType::U32).unwrap();
        drop((a, b));
    };
    step();
    let before = gpu.pool().stats();
    for _ in 0..10 {
        step();
    }
    let after = gpu.pool().stats();
    assert_eq!(
        after.allocations, before.allocations,
        "{before:?} -> {after:?}"
    );
    assert!(after.reuses >= before.reuses + 20);
}

#[test]
fn buffers_beyond_the_device_limits_are_errors_that_name_the_limit() {
    let gpu = common::gpu();
    let too_big_binding = gpu.limits.max_storage_buffer_binding_size as usize / 4 + 64;
    let e = gpu
        .empty("activations of layer 3", &[too_big_binding], DType::F32)
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::TooLarge { .. }), "{msg}");
    assert!(
        msg.contains("activations of layer 3") && msg.contains("smaller batch"),
        "{msg}"
    );
    assert!(
        msg.contains("max_storage_buffer_binding_size") || msg.contains("max_buffer_size"),
        "{msg}"
    );
    let e = gpu
        .pool()
        .check_size("x", gpu.limits.max_buffer_size + 1, false)
        .unwrap_err();
    assert!(e.to_string().contains("max_buffer_size"), "{e}");
}

#[test]
fn launches_check_shapes_before_the_gpu_sees_them() {
    let gpu = common::gpu();
    let x = gpu.zeros("x", &[4, 5], DType::F32).unwrap();
    let y = gpu.zeros("y", &[4, 6], DType::F32).unwrap();
    let e = relu_forward(gpu, &x, &y).unwrap_err().to_string();
    assert!(
        e.contains("relu_forward") && e.contains("[4, 5]") && e.contains("[4, 6]"),
        "{e}"
    );
    let u = gpu.zeros("u", &[4, 5], DType::U32).unwrap();
    let e = relu_forward(gpu, &u, &x).unwrap_err().to_string();
    assert!(e.contains("F32") && e.contains("U32"), "{e}");
}

#[test]
fn validation_errors_are_caught_and_name_the_context() {
    let gpu = common::gpu();
    let x = gpu.zeros("x", &[64], DType::F32).unwrap();
    // The same buffer bound read-only and read-write in one dispatch is invalid.
    let launch = relu_forward(gpu, &x, &x).unwrap();
    let mut rec = Recorder::new();
    rec.push(launch);
    let e = rec.submit(gpu, "aliasing test").unwrap_err();
    assert!(matches!(e, Error::Validation { .. }), "{e}");
    assert!(e.to_string().contains("aliasing test"), "{e}");
    // The device is still usable afterwards.
    let y = gpu.zeros("y", &[64], DType::F32).unwrap();
    let mut rec = Recorder::new();
    rec.push(relu_forward(gpu, &x, &y).unwrap());
    rec.submit(gpu, "after error").unwrap();
    gpu.wait().unwrap();
}

#[test]
fn a_recording_of_many_dispatches_is_one_submit() {
    let gpu = common::gpu();
    let x = gpu.upload_f32("x", &[300], &vec![-1.0; 300]).unwrap();
    let y = gpu.zeros("y", &[300], DType::F32).unwrap();
    let dx = gpu.zeros("dx", &[300], DType::F32).unwrap();
    let mut rec = Recorder::new();
    for _ in 0..5 {
        rec.push(relu_forward(gpu, &x, &y).unwrap());
        rec.push(relu_backward(gpu, &y, &x, &dx).unwrap());
    }
    // Other tests of this binary submit concurrently (on their own threads): count this
    // thread's submissions only.
    let mut best = u64::MAX;
    for _ in 0..3 {
        let before = thread_submit_count();
        rec.submit(gpu, "ten dispatches").unwrap();
        best = best.min(thread_submit_count() - before);
    }
    assert_eq!(best, 1);
    assert_eq!(gpu.read_f32(&y).unwrap(), vec![0.0; 300]);
}

#[test]
fn tensor_views_and_reshapes_are_checked() {
    let gpu = common::gpu();
    let arena = gpu
        .upload_f32(
            "arena",
            &[256],
            &(0..256).map(|i| i as f32).collect::<Vec<_>>(),
        )
        .unwrap();
    let v = arena.view(64, &[2, 32]).unwrap();
    assert_eq!(gpu.read_f32(&v).unwrap()[0], 64.0);
    assert!(arena.view(3, &[4]).is_err(), "unaligned view must fail");
    assert!(
        arena.view(192, &[128]).is_err(),
        "view past the end must fail"
    );
    assert!(arena.reshape(&[16, 16]).is_ok());
    assert!(arena.reshape(&[16, 15]).is_err());
}

#[test]
fn a_kernel_binding_more_storage_buffers_than_the_adapter_allows_is_an_error_naming_the_limit() {
    use wgqat::kernels::conv2d::{self, Conv2dGeom};
    let mut gpu = Gpu::new(&GpuOptions::default()).unwrap();
    // An adapter with the Vulkan minimum's worth of storage buffers: the conv GEMM binds 15.
    gpu.limits.max_storage_buffers_per_shader_stage = 8;
    let g = Conv2dGeom::square(1, 4, 6, 8, 1);
    let t = |shape: [usize; 4]| gpu.zeros("t", &shape, DType::F32).unwrap();
    let (x, w, y) = (t(g.input_shape()), t(g.weight_shape()), t(g.output_shape()));
    let e = match conv2d::forward(&gpu, &g, &x, &w, None, &y) {
        Ok(_) => panic!("a conv binding 15 storage buffers was accepted with a limit of 8"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(matches!(e, Error::Shader { .. }), "{msg}");
    assert!(
        msg.contains("15 storage buffers")
            && msg.contains("allows 8")
            && msg.contains("max_storage_buffers_per_shader_stage"),
        "{msg}"
    );
}

#[test]
fn the_kernel_cache_names_each_specialisation_it_compiled() {
    let gpu = common::gpu();
    let x = gpu
        .upload_f32("x", &[5], &[1.0, -2.0, 3.0, -4.0, 5.0])
        .unwrap();
    let y = gpu.empty("y", &[5], DType::F32).unwrap();
    relu_forward(gpu, &x, &y).unwrap();
    let names = gpu.kernels().names();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("elementwise.wgsl:relu_forward")),
        "{names:?}"
    );
    assert!(names.is_sorted());
}

#[test]
fn selftest_cases_run_side_by_side_report_in_order_with_the_same_results() {
    use wgqat::selftest;
    let gpu = common::gpu();
    let cases: Vec<_> = ["relu", "act_quant", "exact_div"]
        .into_iter()
        .flat_map(selftest::cases_for)
        .collect();
    let name = |kernel: &str, direction: &str, shape: &str| format!("{kernel} {direction} {shape}");
    let mut seen = Vec::new();
    let side_by_side = selftest::run_cases(gpu, &cases, 3, &mut |o| {
        seen.push(name(o.kernel, o.direction, &o.shape))
    });
    let one_at_a_time = selftest::run_cases(gpu, &cases, 1, &mut |_| {});
    let order: Vec<String> = cases
        .iter()
        .map(|c| name(c.kernel, c.direction, &c.shape))
        .collect();
    assert!(cases.len() >= 10);
    assert_eq!(seen, order, "handed over in case order");
    for (a, b) in side_by_side.iter().zip(&one_at_a_time) {
        assert!(a.passed(), "{}", a.describe());
        let digests = |o: &selftest::Outcome| -> Vec<u64> {
            o.outputs.iter().map(|(_, r)| r.got_digest).collect()
        };
        assert_eq!(digests(a), digests(b), "{}", a.describe());
    }
    // A case that panics is reported as that case's error; the cases after it still run.
    let mut cases = cases;
    cases.insert(
        1,
        selftest::Case::new("broken", "forward", "[1]".into(), |_, _| {
            panic!("a planted bug")
        }),
    );
    let outcomes = selftest::run_cases(gpu, &cases, 2, &mut |_| {});
    assert_eq!(outcomes.len(), cases.len());
    let e = outcomes[1].error.as_deref().unwrap_or_default();
    assert!(e.contains("panicked: a planted bug"), "{e}");
    assert!(outcomes.iter().filter(|o| o.passed()).count() == cases.len() - 1);
}
