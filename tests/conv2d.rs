//! conv2d forward, grad-input, grad-weight (also split-K) and grad-bias against the f64 reference,
//! over shapes with stride, padding, dilation, groups, odd sizes and several tiles.
mod common;

#[test]
fn conv2d_matches_reference() {
    common::run_kernel_cases("conv2d");
}

/// An input quantized where the GEMM loads it is for forward and grad-weight (grad-input loads
/// dy and w, and its mask is an `ActGrad`), of quantized bits, and not beside a BatchNorm
/// formed on load (which quantizes with it): anything else is an error naming the rule.
#[test]
fn inputs_quantized_on_load_are_refused_where_they_do_not_apply() {
    use wgqat::DType;
    use wgqat::kernels::conv2d::{self, AroundBn, Conv2dGeom};
    use wgqat::quant::Bits;
    let gpu = common::gpu();
    let g = Conv2dGeom::square(1, 4, 6, 8, 3).padding(1);
    let t = |shape: [usize; 4]| gpu.zeros("t", &shape, DType::F32).unwrap();
    let (x, w, y) = (t(g.input_shape()), t(g.weight_shape()), t(g.output_shape()));
    let quantized = |b: u32| AroundBn {
        input_quant: Some(Bits::new(b).unwrap()),
        ..AroundBn::default()
    };
    let refused = |r: wgqat::Result<_>| r.err().map(|e: wgqat::Error| e.to_string());
    let e = refused(conv2d::grad_input_fused(
        gpu,
        &g,
        &y,
        &w,
        &x,
        None,
        quantized(8),
    ))
    .unwrap();
    assert!(e.contains("grad-input does not load"), "{e}");
    let e = refused(conv2d::forward_with(
        gpu,
        &g,
        &x,
        &w,
        None,
        &y,
        quantized(32),
        None,
    ))
    .unwrap();
    assert!(e.contains("float input"), "{e}");
    // The same input in forward and grad-weight is accepted.
    conv2d::forward_with(gpu, &g, &x, &w, None, &y, quantized(8), None).unwrap();
    conv2d::grad_weight_fused(
        gpu,
        &g,
        &x,
        &y,
        (&t(g.weight_shape()), None),
        quantized(8),
        None,
    )
    .unwrap();
}

/// Another reader's gradient is added by grad-input alone (the GEMM that writes dx), and must
/// be dx's size: anything else is an error naming the rule.
#[test]
fn a_gradient_to_add_is_refused_outside_grad_input() {
    use wgqat::DType;
    use wgqat::kernels::conv2d::{self, AroundBn, Conv2dGeom};
    let gpu = common::gpu();
    let g = Conv2dGeom::square(1, 4, 6, 8, 3).padding(1);
    let t = |shape: [usize; 4]| gpu.zeros("t", &shape, DType::F32).unwrap();
    let (x, w, y) = (t(g.input_shape()), t(g.weight_shape()), t(g.output_shape()));
    let plus = |p| AroundBn {
        dx_plus: Some(p),
        ..AroundBn::default()
    };
    fn refused<T>(r: wgqat::Result<T>) -> Option<String> {
        r.err().map(|e| e.to_string())
    }
    let other = t(g.input_shape());
    let e = refused(conv2d::forward_with(
        gpu,
        &g,
        &x,
        &w,
        None,
        &y,
        plus(&other),
        None,
    ))
    .unwrap();
    assert!(e.contains("only grad-input adds"), "{e}");
    let e = refused(conv2d::grad_weight_fused(
        gpu,
        &g,
        &x,
        &y,
        (&t(g.weight_shape()), None),
        plus(&other),
        None,
    ))
    .unwrap();
    assert!(e.contains("only grad-input adds"), "{e}");
    let e = refused(conv2d::grad_input_fused(
        gpu,
        &g,
        &y,
        &w,
        &x,
        None,
        plus(&y),
    ))
    .unwrap();
    assert!(e.contains("not the size of dx"), "{e}");
    conv2d::grad_input_fused(gpu, &g, &y, &w, &x, None, plus(&other)).unwrap();
}
