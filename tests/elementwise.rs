//! ReLU forward and backward, the residual sum and gradient accumulation against the reference,
//! at sizes around the workgroup size and past
//! the 65535-workgroup grid limit.
mod common;

#[test]
fn relu_matches_reference() {
    common::run_kernel_cases("relu");
}

#[test]
fn residual_add_and_gradient_accumulation_match_reference() {
    common::run_kernel_cases("add");
}
