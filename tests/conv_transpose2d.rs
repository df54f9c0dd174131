//! conv_transpose2d forward, grad-input, grad-weight (also split-K) and grad-bias against the f64 reference,
//! over shapes with stride, padding, dilation, groups, odd sizes and several tiles.
mod common;

#[test]
fn conv_transpose2d_matches_reference() {
    common::run_kernel_cases("conv_transpose2d");
}
