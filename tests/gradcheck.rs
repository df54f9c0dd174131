//! Finite-difference gradient checks, in f64, of the CPU references: for a random cotangent r and
//! L = Σ r·forward(x, w, b), central differences of L must equal grad_input(r), grad_weight(r) and
//! grad_bias(r). (The quantizers' straight-through surrogates are checked in reference::quant.)
//! The GPU kernels are tested against these references, so this closes the chain.

use wgqat::kernels::conv_transpose2d::ConvTranspose2dGeom;
use wgqat::kernels::conv2d::Conv2dGeom;
use wgqat::kernels::matmul::LinearGeom;
use wgqat::reference::{conv_transpose2d, conv2d, matmul};
use wgqat::rng::Rng;

fn rand(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect()
}

/// Checks d/dv Σ r·f(v) against `analytic` at every coordinate of `v`.
fn check(name: &str, v: &[f64], analytic: &[f64], r: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) {
    let loss = |v: &[f64]| -> f64 { f(v).iter().zip(r).map(|(a, b)| a * b).sum() };
    let h = 1e-5;
    let mut worst = 0.0f64;
    for j in 0..v.len() {
        let (mut p, mut m) = (v.to_vec(), v.to_vec());
        p[j] += h;
        m[j] -= h;
        let fd = (loss(&p) - loss(&m)) / (2.0 * h);
        worst = worst.max((fd - analytic[j]).abs());
    }
    // The maps are linear in each argument, so central differences are exact up to rounding.
    assert!(worst < 1e-8, "{name}: max |fd - analytic| = {worst:e}");
}

#[test]
fn conv2d_reference_gradients() {
    let mut rng = Rng::new(11);
    let geoms = [
        Conv2dGeom::square(2, 4, 5, 6, 3)
            .stride(2)
            .padding(1)
            .groups(2),
        Conv2dGeom {
            batch: 1,
            cin: 3,
            h: 6,
            w: 5,
            cout: 3,
            kernel: (2, 3),
            stride: (1, 2),
            padding: (1, 0),
            dilation: (2, 1),
            groups: 3,
        },
    ];
    for g in geoms {
        let n = |s: [usize; 4]| s.iter().product::<usize>();
        let (x, w, b) = (
            rand(&mut rng, n(g.input_shape())),
            rand(&mut rng, n(g.weight_shape())),
            rand(&mut rng, g.cout),
        );
        let r = rand(&mut rng, n(g.output_shape()));
        check("conv2d dx", &x, &conv2d::grad_input(&g, &r, &w), &r, |v| {
            conv2d::forward(&g, v, &w, Some(&b))
        });
        check("conv2d dw", &w, &conv2d::grad_weight(&g, &x, &r), &r, |v| {
            conv2d::forward(&g, &x, v, Some(&b))
        });
        check("conv2d db", &b, &conv2d::grad_bias(&g, &r), &r, |v| {
            conv2d::forward(&g, &x, &w, Some(v))
        });
    }
}

#[test]
fn conv_transpose2d_reference_gradients() {
    let mut rng = Rng::new(12);
    let geoms = [
        ConvTranspose2dGeom {
            batch: 2,
            cin: 4,
            h: 3,
            w: 4,
            cout: 6,
            kernel: (3, 3),
            stride: (2, 2),
            padding: (1, 1),
            output_padding: (1, 0),
            dilation: (1, 1),
            groups: 2,
        },
        ConvTranspose2dGeom {
            batch: 1,
            cin: 2,
            h: 4,
            w: 3,
            cout: 3,
            kernel: (2, 2),
            stride: (1, 1),
            padding: (0, 1),
            output_padding: (1, 0),
            dilation: (2, 2),
            groups: 1,
        },
    ];
    for g in geoms {
        g.validate().unwrap();
        let n = |s: [usize; 4]| s.iter().product::<usize>();
        let (x, w, b) = (
            rand(&mut rng, n(g.input_shape())),
            rand(&mut rng, n(g.weight_shape())),
            rand(&mut rng, g.cout),
        );
        let r = rand(&mut rng, n(g.output_shape()));
        check(
            "convT dx",
            &x,
            &conv_transpose2d::grad_input(&g, &r, &w),
            &r,
            |v| conv_transpose2d::forward(&g, v, &w, Some(&b)),
        );
        check(
            "convT dw",
            &w,
            &conv_transpose2d::grad_weight(&g, &x, &r),
            &r,
            |v| conv_transpose2d::forward(&g, &x, v, Some(&b)),
        );
        check(
            "convT db",
            &b,
            &conv_transpose2d::grad_bias(&g, &r),
            &r,
            |v| conv_transpose2d::forward(&g, &x, &w, Some(v)),
        );
    }
}

#[test]
fn conv_transpose2d_reference_is_the_adjoint_of_conv2d() {
    // <conv(x), y> = <x, convT(y)> with the same weight: ties the two references together.
    let mut rng = Rng::new(13);
    let c = Conv2dGeom {
        batch: 2,
        cin: 4,
        h: 7,
        w: 6,
        cout: 6,
        kernel: (3, 2),
        stride: (2, 1),
        padding: (1, 1),
        dilation: (1, 2),
        groups: 2,
    };
    let (oh, ow) = c.out_hw();
    let t = ConvTranspose2dGeom {
        batch: 2,
        cin: 6,
        h: oh,
        w: ow,
        cout: 4,
        kernel: c.kernel,
        stride: c.stride,
        padding: c.padding,
        output_padding: (
            c.h + 2 * c.padding.0 - c.dilation.0 * (c.kernel.0 - 1) - 1 - (oh - 1) * c.stride.0,
            c.w + 2 * c.padding.1 - c.dilation.1 * (c.kernel.1 - 1) - 1 - (ow - 1) * c.stride.1,
        ),
        dilation: c.dilation,
        groups: 2,
    };
    assert_eq!(t.output_shape(), c.input_shape());
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let (x, w, y) = (
        rand(&mut rng, n(c.input_shape())),
        rand(&mut rng, n(c.weight_shape())),
        rand(&mut rng, n(c.output_shape())),
    );
    let lhs: f64 = conv2d::forward(&c, &x, &w, None)
        .iter()
        .zip(&y)
        .map(|(a, b)| a * b)
        .sum();
    let rhs: f64 = conv_transpose2d::forward(&t, &y, &w, None)
        .iter()
        .zip(&x)
        .map(|(a, b)| a * b)
        .sum();
    assert!((lhs - rhs).abs() < 1e-10, "{lhs} vs {rhs}");
}

#[test]
fn matmul_reference_gradients() {
    let mut rng = Rng::new(14);
    let g = LinearGeom {
        batch: 3,
        in_features: 5,
        out_features: 4,
    };
    let (x, w, b) = (rand(&mut rng, 15), rand(&mut rng, 20), rand(&mut rng, 4));
    let r = rand(&mut rng, 12);
    check("linear dx", &x, &matmul::grad_input(&g, &r, &w), &r, |v| {
        matmul::forward(&g, v, &w, Some(&b))
    });
    check("linear dw", &w, &matmul::grad_weight(&g, &x, &r), &r, |v| {
        matmul::forward(&g, &x, v, Some(&b))
    });
    check("linear db", &b, &matmul::grad_bias(&g, &r), &r, |v| {
        matmul::forward(&g, &x, &w, Some(v))
    });
}
