//! ReLU forward and backward against the reference, at sizes around the workgroup size and past
//! the 65535-workgroup grid limit.
mod common;

#[test]
fn relu_matches_reference() {
    common::run_kernel_cases("relu");
}
