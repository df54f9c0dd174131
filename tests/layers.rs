//! BatchNorm, pooling, channel shuffle, losses and optimizers against the f64 reference.
mod common;

#[test]
fn batchnorm_matches_reference() {
    common::run_kernel_cases("batchnorm");
}

#[test]
fn pooling_and_shuffle_match_reference() {
    common::run_kernel_cases("maxpool");
    common::run_kernel_cases("avgpool");
    common::run_kernel_cases("channel_shuffle");
}

#[test]
fn losses_match_reference() {
    common::run_kernel_cases("cross_entropy");
    common::run_kernel_cases("mse");
}

#[test]
fn optimizers_match_reference() {
    common::run_kernel_cases("optimizer");
}
