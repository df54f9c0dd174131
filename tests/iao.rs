//! The IAO quantizers on the GPU: every selftest case, exact against the scalar formulas (which
//! `quant::iao`'s unit tests hold to the spec's vectors).
mod common;

#[test]
fn iao_quantizers_match_reference() {
    common::run_kernel_cases("iao_quant");
}
