//! The WGSL kernels against PyTorch: fixtures written by `tools/make_fixtures.py` (F.conv2d,
//! F.conv_transpose2d, F.linear and DoReFa quantizers with PyTorch autograd). PyTorch's f32 and
//! ours each carry rounding error, so GEMM tolerances are twice those against the f64 reference.
mod common;

use common::Fixture;
use wgqat::DType;
use wgqat::gpu::{Gpu, Op, Tensor};
use wgqat::kernels::conv_transpose2d::ConvTranspose2dGeom;
use wgqat::kernels::matmul::LinearGeom;
use wgqat::kernels::quant::{WeightQuantizer, act_backward, act_forward};
use wgqat::kernels::{conv_transpose2d, conv2d, conv2d::Conv2dGeom, matmul};
use wgqat::quant::Bits;
use wgqat::reference::{Tolerance, compare};

fn pair(v: &serde_json::Value) -> (usize, usize) {
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

fn run(gpu: &Gpu, ops: Vec<Op>, out: &Tensor) -> Vec<f32> {
    let mut v: Vec<Vec<f32>> = gpu.run_and_read("fixture", &ops, &[out]).unwrap();
    v.remove(0)
}

fn tol(k: usize) -> Tolerance {
    Tolerance::new(4e-6 * (k as f64).sqrt(), 2e-5)
}

fn assert_all(results: Vec<(String, wgqat::reference::Report)>) {
    let mut bad = Vec::new();
    for (name, r) in &results {
        println!("{name}: {}", r.summary());
        if !r.passed() {
            bad.push(format!("{name}: {}", r.summary()));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Runs forward, grad-input, grad-weight and grad-bias of one GEMM-family case.
fn gemm_case(
    gpu: &Gpu,
    f: &Fixture,
    case: &str,
    label: &str,
    k: [usize; 3],
    launch: &dyn Fn(&str, &[&Tensor]) -> Vec<Op>,
) -> Vec<(String, wgqat::reference::Report)> {
    let t = |n: &str| f.upload(gpu, case, n);
    let empty = |n: &str| gpu.empty(n, &f.get(case, n).0, DType::F32).unwrap();
    let (x, w, b, dy) = (t("x"), t("w"), t("b"), t("dy"));
    let (y, dx, dw, db) = (empty("y"), empty("dx"), empty("dw"), empty("db"));
    let mut out = Vec::new();
    for (dir, ins, o, want, kk) in [
        ("forward", vec![&x, &w, &b, &y], &y, "y", k[0]),
        ("grad_input", vec![&dy, &w, &dx], &dx, "dx", k[1]),
        ("grad_weight", vec![&x, &dy, &dw], &dw, "dw", k[2]),
        ("grad_bias", vec![&dy, &db], &db, "db", k[2]),
    ] {
        let got = run(gpu, launch(dir, &ins), o);
        out.push((
            format!("{label} case {case} {dir}"),
            compare(&got, &f.f64s(case, want), tol(kk)),
        ));
    }
    out
}

#[test]
fn conv2d_matches_pytorch() {
    let gpu = common::gpu();
    let f = Fixture::load("conv2d");
    let mut results = Vec::new();
    for case in f.cases() {
        let a = f.args(&case);
        let u = |k: &str| a[k].as_u64().unwrap() as usize;
        let g = Conv2dGeom {
            batch: u("batch"),
            cin: u("cin"),
            h: u("h"),
            w: u("w"),
            cout: u("cout"),
            kernel: pair(&a["kernel"]),
            stride: pair(&a["stride"]),
            padding: pair(&a["padding"]),
            dilation: pair(&a["dilation"]),
            groups: u("groups"),
        };
        let (oh, ow) = g.out_hw();
        let khw = g.kernel.0 * g.kernel.1;
        let k = [
            g.cin / g.groups * khw,
            g.cout / g.groups * khw,
            g.batch * oh * ow,
        ];
        results.extend(gemm_case(
            gpu,
            &f,
            &case,
            "conv2d",
            k,
            &|dir, t| match dir {
                "forward" => vec![conv2d::forward(gpu, &g, t[0], t[1], Some(t[2]), t[3]).unwrap()],
                "grad_input" => vec![conv2d::grad_input(gpu, &g, t[0], t[1], t[2]).unwrap()],
                "grad_weight" => conv2d::grad_weight(gpu, &g, t[0], t[1], t[2], None).unwrap(),
                _ => vec![conv2d::grad_bias(gpu, &g, t[0], t[1]).unwrap()],
            },
        ));
    }
    assert_all(results);
}

#[test]
fn conv_transpose2d_matches_pytorch() {
    let gpu = common::gpu();
    let f = Fixture::load("conv_transpose2d");
    let mut results = Vec::new();
    for case in f.cases() {
        let a = f.args(&case);
        let u = |k: &str| a[k].as_u64().unwrap() as usize;
        let g = ConvTranspose2dGeom {
            batch: u("batch"),
            cin: u("cin"),
            h: u("h"),
            w: u("w"),
            cout: u("cout"),
            kernel: pair(&a["kernel"]),
            stride: pair(&a["stride"]),
            padding: pair(&a["padding"]),
            output_padding: pair(&a["output_padding"]),
            dilation: pair(&a["dilation"]),
            groups: u("groups"),
        };
        let khw = g.kernel.0 * g.kernel.1;
        let k = [
            g.cin / g.groups * khw,
            g.cout / g.groups * khw,
            g.batch * g.h * g.w,
        ];
        results.extend(gemm_case(
            gpu,
            &f,
            &case,
            "conv_transpose2d",
            k,
            &|dir, t| match dir {
                "forward" => {
                    vec![conv_transpose2d::forward(gpu, &g, t[0], t[1], Some(t[2]), t[3]).unwrap()]
                }
                "grad_input" => {
                    vec![conv_transpose2d::grad_input(gpu, &g, t[0], t[1], t[2]).unwrap()]
                }
                "grad_weight" => {
                    conv_transpose2d::grad_weight(gpu, &g, t[0], t[1], t[2], None).unwrap()
                }
                _ => vec![conv_transpose2d::grad_bias(gpu, &g, t[0], t[1]).unwrap()],
            },
        ));
    }
    assert_all(results);
}

#[test]
fn linear_matches_pytorch() {
    let gpu = common::gpu();
    let f = Fixture::load("linear");
    let mut results = Vec::new();
    for case in f.cases() {
        let a = f.args(&case);
        let u = |k: &str| a[k].as_u64().unwrap() as usize;
        let g = LinearGeom {
            batch: u("batch"),
            in_features: u("in_features"),
            out_features: u("out_features"),
        };
        let k = [g.in_features, g.out_features, g.batch];
        results.extend(gemm_case(
            gpu,
            &f,
            &case,
            "linear",
            k,
            &|dir, t| match dir {
                "forward" => vec![matmul::forward(gpu, &g, t[0], t[1], Some(t[2]), t[3]).unwrap()],
                "grad_input" => vec![matmul::grad_input(gpu, &g, t[0], t[1], t[2]).unwrap()],
                "grad_weight" => matmul::grad_weight(gpu, &g, t[0], t[1], t[2], None).unwrap(),
                _ => vec![matmul::grad_bias(gpu, &g, t[0], t[1]).unwrap()],
            },
        ));
    }
    assert_all(results);
}

#[test]
fn quantizers_match_pytorch_autograd() {
    let gpu = common::gpu();
    let f = Fixture::load("quant");
    let mut results = Vec::new();
    for case in f.cases() {
        let a = f.args(&case);
        let bits = Bits::new(a["bits"].as_u64().unwrap() as u32).unwrap();
        let (shape, _) = f.get(&case, "dy");
        let n: usize = shape.iter().product();
        let dy = f.upload(gpu, &case, "dy");
        let y = gpu.empty("y", shape, DType::F32).unwrap();
        let dx = gpu.empty("dx", shape, DType::F32).unwrap();
        if a["kind"] == "act" {
            let x = f.upload(gpu, &case, "x");
            let got_y = run(gpu, vec![act_forward(gpu, bits, &x, &y).unwrap()], &y);
            results.push((
                format!("act a{bits} y"),
                compare(&got_y, &f.f64s(&case, "y"), Tolerance::EXACT),
            ));
            // PyTorch forms ((dy·s)·n)·0.1, within an ulp of 0.1·dy.
            let got_dx = run(
                gpu,
                vec![act_backward(gpu, bits, &x, &dy, &dx).unwrap()],
                &dx,
            );
            results.push((
                format!("act a{bits} dx"),
                compare(&got_dx, &f.f64s(&case, "dx"), Tolerance::new(0.0, 2.4e-7)),
            ));
        } else {
            let w = f.upload(gpu, &case, "w");
            let q = WeightQuantizer::new(gpu, bits, shape).unwrap();
            let mut ops = q.forward(gpu, &w, &y).unwrap();
            ops.extend(q.backward(gpu, &dy, &dx).unwrap());
            let got: Vec<Vec<f32>> = gpu.run_and_read("fixture", &ops, &[&y, &dx]).unwrap();
            // Levels: equal except where PyTorch's own u·n lies within 1e-4 of a rounding step
            // (there an ulp of difference in tanh may pick the other level).
            let t = &f.get(&case, "t").1;
            let m = t.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let want = &f.get(&case, "y").1;
            let levels = bits.levels() as f64;
            let mut off_tie_mismatches = 0;
            for i in 0..n {
                if got[0][i] != want[i] {
                    let un = ((t[i] as f64 / 2.0) / m as f64 + 0.5) * levels;
                    if ((un - un.floor()) - 0.5).abs() > 1e-4 {
                        off_tie_mismatches += 1;
                    }
                }
            }
            assert_eq!(
                off_tie_mismatches, 0,
                "weight w{bits} case {case}: levels differ away from rounding steps"
            );
            let exact = got[0].iter().zip(want).filter(|(a, b)| a == b).count();
            println!("weight w{bits} case {case}: {exact}/{n} levels bit-identical to PyTorch");
            results.push((
                format!("weight w{bits} ties={} dW", a["ties"]),
                compare(&got[1], &f.f64s(&case, "dw"), Tolerance::new(2e-6, 2e-5)),
            ));
        }
    }
    assert_all(results);
}
