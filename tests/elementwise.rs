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
