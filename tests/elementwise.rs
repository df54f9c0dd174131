//! ReLU forward and backward, the residual sum, gradient accumulation and the uniform fill
//! against the reference, at sizes around the workgroup size and past the 65535-workgroup grid
//! limit.
mod common;

#[test]
fn relu_matches_reference() {
    common::run_kernel_cases("relu");
}

#[test]
fn residual_add_and_gradient_accumulation_match_reference() {
    common::run_kernel_cases("add");
}

#[test]
fn uniform_fill_matches_reference_stays_in_range_and_repeats_with_its_seed() {
    common::run_kernel_cases("fill");
}

/// A summand formed from a BatchNorm's input is checked against the sum's channels, and one
/// through a channel shuffle is refused (the add forms no shuffle), each with its reason.
#[test]
fn an_add_refuses_a_batchnorm_form_it_cannot_apply() {
    use wgqat::DType;
    use wgqat::kernels::elementwise::add_forward_formed;
    use wgqat::kernels::norm::{Act, BnForm, TABLE};
    let gpu = common::gpu();
    let shape = [2, 4, 3, 3];
    let x = gpu.zeros("x", &shape, DType::F32).unwrap();
    let y = gpu.empty("y", &shape, DType::F32).unwrap();
    let table = gpu.zeros("table", &[TABLE * 4], DType::F32).unwrap();
    let short = gpu.zeros("short table", &[TABLE * 3], DType::F32).unwrap();
    let form = |table, shuffle| BnForm {
        table,
        act: Act::Identity,
        shuffle,
    };
    let err = |a, b| {
        add_forward_formed(gpu, (&x, a), (&x, b), &y, true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let shuffled = err(Some(form(&table, 2)), None);
    assert!(shuffled.contains("channel shuffle"), "{shuffled}");
    let wrong = err(None, Some(form(&short, 1)));
    assert!(wrong.contains("a BatchNorm table of 24 floats"), "{wrong}");
    assert!(add_forward_formed(gpu, (&x, Some(form(&table, 1))), (&x, None), &y, true).is_ok());
}

/// The ReLU's backward into two gradients refuses two views of one buffer (two writable
/// bindings of one buffer in a dispatch) and takes two buffers.
#[test]
fn a_relu_backward_pair_takes_two_buffers() {
    use wgqat::DType;
    use wgqat::kernels::elementwise::relu_backward_pair;
    let gpu = common::gpu();
    let y = gpu.zeros("y", &[8], DType::F32).unwrap();
    let dy = gpu.zeros("dy", &[8], DType::F32).unwrap();
    // (Views start 256 bytes apart: 64 floats.)
    let both = gpu.zeros("both", &[128], DType::F32).unwrap();
    let (a, b) = (both.view(0, &[8]).unwrap(), both.view(64, &[8]).unwrap());
    let err = relu_backward_pair(gpu, &y, &dy, (&a, &b))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("two buffers"), "{err}");
    let other = gpu.zeros("other", &[8], DType::F32).unwrap();
    assert!(relu_backward_pair(gpu, &y, &dy, (&a, &other)).is_ok());
}
