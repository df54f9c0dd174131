//! micronet's binary and ternary quantizers on the GPU: every selftest case against the scalar
//! formulas (which `quant::wbwtab`'s unit tests hold to the spec's vectors).
mod common;

#[test]
fn wbwtab_quantizers_match_reference() {
    common::run_kernel_cases("wbwtab_quant");
}
