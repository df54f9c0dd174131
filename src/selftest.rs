//! The kernel test suite that ships with the binary: every kernel and direction run on the chosen
//! adapter against the CPU reference. `wgqat selftest` prints the table; `cargo test` runs the
//! same cases.

use crate::DType;
use crate::error::Result;
use crate::gpu::{Gpu, Launch, Op, Tensor};
use crate::kernels;
use crate::kernels::quant::Bits;
use crate::reference::{self, Report, Tolerance};
use crate::rng::Rng;
use std::time::Instant;

/// A case's body: runs the kernel on inputs from the generator and compares each output.
type CaseFn = dyn Fn(&Gpu, &mut Rng) -> Result<Vec<(String, Report)>> + Send + Sync;

/// What a case computes, for one kernel, direction and shape.
pub struct Case {
    pub kernel: &'static str,
    pub direction: &'static str,
    pub shape: String,
    run: Box<CaseFn>,
}

/// The result of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub kernel: &'static str,
    pub direction: &'static str,
    pub shape: String,
    /// One comparison per output (e.g. dX, dW, db).
    pub outputs: Vec<(String, Report)>,
    pub seconds: f64,
    /// Set when the case could not run (compile or validation error).
    pub error: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.outputs.iter().all(|(_, r)| r.passed())
    }

    /// Multi-line description of what failed, for test output.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {} {}:", self.kernel, self.direction, self.shape);
        if let Some(e) = &self.error {
            s.push_str(&format!(" error: {e}"));
        }
        for (name, r) in &self.outputs {
            s.push_str(&format!("\n  {name}: {}", r.summary()));
        }
        s
    }
}

impl Case {
    pub fn new(
        kernel: &'static str,
        direction: &'static str,
        shape: String,
        run: impl Fn(&Gpu, &mut Rng) -> Result<Vec<(String, Report)>> + Send + Sync + 'static,
    ) -> Self {
        Case {
            kernel,
            direction,
            shape,
            run: Box::new(run),
        }
    }

    /// Runs the case with inputs drawn from a generator seeded by the case's name.
    pub fn run(&self, gpu: &Gpu) -> Outcome {
        let seed = self
            .kernel
            .bytes()
            .chain(self.direction.bytes())
            .chain(self.shape.bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let t0 = Instant::now();
        let res = (self.run)(gpu, &mut Rng::new(seed));
        let seconds = t0.elapsed().as_secs_f64();
        let (outputs, error) = match res {
            Ok(o) => (o, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        Outcome {
            kernel: self.kernel,
            direction: self.direction,
            shape: self.shape.clone(),
            outputs,
            seconds,
            error,
        }
    }
}

/// Runs `launches` in one submit and reads `outputs` back as f32.
pub fn run_read(gpu: &Gpu, launches: Vec<Launch>, outputs: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
    let ops: Vec<Op> = launches.into_iter().map(Op::Dispatch).collect();
    let mut out: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, outputs)?;
    for (v, t) in out.iter_mut().zip(outputs) {
        v.truncate(t.numel());
    }
    Ok(out)
}

/// Every case, in a fixed order.
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    elementwise_cases(&mut v);
    reduce_cases(&mut v);
    quant_cases(&mut v);
    v
}

/// The cases of one kernel.
pub fn cases_for(kernel: &str) -> Vec<Case> {
    cases().into_iter().filter(|c| c.kernel == kernel).collect()
}

fn elementwise_cases(v: &mut Vec<Case>) {
    // Sizes around the 256-thread workgroup, and one past 65535 workgroups (a 2-D grid).
    for n in [1usize, 255, 257, 1000, 65535 * 256 + 300] {
        v.push(Case::new(
            "relu",
            "forward",
            format!("[{n}]"),
            move |gpu, rng| {
                let x = rng.vec_uniform(n, -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[n], &x)?;
                let yt = gpu.empty("y", &[n], DType::F32)?;
                let got = run_read(
                    gpu,
                    vec![kernels::elementwise::relu_forward(gpu, &xt, &yt)?],
                    &[&yt],
                )?;
                let want = reference::elementwise::relu_forward(&x);
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
    for n in [1usize, 257, 4099] {
        v.push(Case::new(
            "relu",
            "backward",
            format!("[{n}]"),
            move |gpu, rng| {
                let y: Vec<f32> = rng
                    .vec_uniform(n, -1.0, 1.0)
                    .iter()
                    .map(|v| v.max(0.0))
                    .collect();
                let dy = rng.vec_uniform(n, -1.0, 1.0);
                let yt = gpu.upload_f32("y", &[n], &y)?;
                let dyt = gpu.upload_f32("dy", &[n], &dy)?;
                let dxt = gpu.empty("dx", &[n], DType::F32)?;
                let l = kernels::elementwise::relu_backward(gpu, &yt, &dyt, &dxt)?;
                let got = run_read(gpu, vec![l], &[&dxt])?;
                let want = reference::elementwise::relu_backward(&y, &dy);
                Ok(vec![(
                    "dx".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
}

fn reduce_cases(v: &mut Vec<Case>) {
    // (N, C, S): one element per channel, S around the workgroup size, many channels.
    for (n, c, s) in [
        (1usize, 1usize, 1usize),
        (3, 5, 7),
        (2, 3, 300),
        (50, 10, 64),
        (4, 70_000, 1),
    ] {
        v.push(Case::new(
            "channel_sum",
            "forward",
            format!("[{n},{c},{s}]"),
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * s, -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[n, c, s], &x)?;
                let out = gpu.empty("sum", &[c], DType::F32)?;
                let got = run_read(
                    gpu,
                    vec![kernels::reduce::channel_sum(gpu, &xt, &out)?],
                    &[&out],
                )?;
                let want = reference::reduce::channel_sum(&x, n, c, s);
                // f32 sums of up to n*s terms of magnitude <= 1.
                let tol = Tolerance::new(1e-6 * (n * s) as f64, 1e-5);
                Ok(vec![(
                    "sum".into(),
                    reference::compare(&got[0], &want, tol),
                )])
            },
        ));
    }
}

fn bits(b: u32) -> Bits {
    Bits::new(b).expect("valid test bits")
}

/// Inputs for the activation quantizer: the spec's table, half-way ties at several widths, and
/// uniform values over [-2, 12] (past both clamp ends).
fn act_inputs(rng: &mut Rng, n: usize, b: Bits) -> Vec<f32> {
    let mut x = vec![
        -1.0, 0.0, 0.001, 0.5, 0.0196, 5.0, 9.99, 10.0, 10.000_001, 15.0,
    ];
    let levels = b.levels() as f32;
    for k in 0..8 {
        x.push((k as f32 + 0.5) / levels * 10.0); // near the ties c*n = k + 1/2
    }
    while x.len() < n {
        x.push(rng.uniform(-2.0, 12.0));
    }
    x.truncate(n.max(1));
    x
}

fn quant_cases(v: &mut Vec<Case>) {
    for (b, n) in [(2u32, 1000usize), (4, 257), (8, 5000), (16, 300)] {
        v.push(Case::new(
            "act_quant",
            "forward",
            format!("a{b} [{n}]"),
            move |gpu, rng| {
                let b = bits(b);
                let x = act_inputs(rng, n, b);
                let xt = gpu.upload_f32("x", &[x.len()], &x)?;
                let yt = gpu.empty("y", &[x.len()], DType::F32)?;
                let op = kernels::quant::act_forward(gpu, b, &xt, &yt)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&yt])?;
                let want = f64s(&reference::quant::act_forward(&x, b));
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
        v.push(Case::new(
            "act_quant",
            "backward",
            format!("a{b} [{n}]"),
            move |gpu, rng| {
                let b = bits(b);
                let x = act_inputs(rng, n, b);
                let dy = rng.vec_uniform(x.len(), -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[x.len()], &x)?;
                let dyt = gpu.upload_f32("dy", &[x.len()], &dy)?;
                let dxt = gpu.empty("dx", &[x.len()], DType::F32)?;
                let op = kernels::quant::act_backward(gpu, b, &xt, &dyt, &dxt)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&dxt])?;
                let want = f64s(&reference::quant::act_backward(&x, &dy, b));
                Ok(vec![(
                    "dx".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
        v.push(Case::new(
            "act_quant",
            "codes",
            format!("a{b} [{n}]"),
            move |gpu, rng| {
                let b = bits(b);
                let x = act_inputs(rng, n, b);
                let len = x.len();
                let xt = gpu.upload_f32("x", &[len], &x)?;
                let codes = gpu.empty("codes", &[len], b.code_dtype())?;
                let back = gpu.empty("dequant", &[len], DType::F32)?;
                let fake = gpu.empty("fake", &[len], DType::F32)?;
                let ops = vec![
                    kernels::quant::act_codes(gpu, b, &xt, &codes)?,
                    kernels::quant::act_dequant(gpu, b, &codes, &back)?,
                    kernels::quant::act_forward(gpu, b, &xt, &fake)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&back, &fake])?;
                let words: Vec<u32> = gpu.read(&codes)?;
                let want_codes: Vec<f64> = x
                    .iter()
                    .map(|&v| reference::quant::act_code(v, b) as f64)
                    .collect();
                Ok(vec![
                    (
                        "codes".into(),
                        reference::compare(
                            &unpack_codes(&words, b, len),
                            &want_codes,
                            Tolerance::EXACT,
                        ),
                    ),
                    (
                        "dequant = fake-quant".into(),
                        reference::compare(&got[0], &f64s(&got[1]), Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // Weight tensors: a conv-like shape, one larger than a reduction block, ties in the max
    // (duplicated largest value and saturated |w| > 9.1), and an all-zero tensor.
    let weights: [(&str, u32, usize); 5] = [
        ("[16,8,3,3]", 4, 16 * 8 * 9),
        ("[9000] (3 blocks)", 8, 9000),
        ("ties [512]", 2, 512),
        ("saturated [300]", 8, 300),
        ("zeros [64]", 4, 64),
    ];
    for (shape, b, n) in weights {
        let make = move |rng: &mut Rng| -> Vec<f32> {
            let mut w = rng.vec_uniform(n, -1.5, 1.5);
            match shape {
                s if s.starts_with("ties") => {
                    w[3] = 2.0;
                    w[100] = 2.0;
                    w[200] = -2.0;
                }
                s if s.starts_with("saturated") => {
                    w[7] = 9.5;
                    w[8] = -12.0;
                    w[9] = 30.0;
                }
                s if s.starts_with("zeros") => w.iter_mut().for_each(|v| *v = 0.0),
                _ => {}
            }
            w
        };
        v.push(Case::new(
            "weight_quant",
            "forward",
            format!("w{b} {shape}"),
            move |gpu, rng| {
                let b = bits(b);
                let w = make(rng);
                let wt = gpu.upload_f32("w", &[n], &w)?;
                let w_hat = gpu.empty("w_hat", &[n], DType::F32)?;
                let q = kernels::quant::WeightQuantizer::new(gpu, b, &[n])?;
                let ops = q.forward(gpu, &wt, &w_hat)?;
                let t = q.t().expect("quantized");
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&w_hat, t])?;
                let (t_ref, _) = reference::quant::weight_forward(&w, b);
                // tanh is within a few ulp of libm's (both are about 1 ulp from exact); levels are
                // exact given t.
                let levels = reference::quant::weight_forward_from_t(&got[1], b);
                Ok(vec![
                    (
                        "tanh(W)".into(),
                        reference::compare(&got[1], &f64s(&t_ref), Tolerance::new(1e-30, 3e-7)),
                    ),
                    (
                        "levels given t".into(),
                        reference::compare(&got[0], &f64s(&levels), Tolerance::EXACT),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "weight_quant",
            "backward",
            format!("w{b} {shape}"),
            move |gpu, rng| {
                let b = bits(b);
                let w = make(rng);
                let g = rng.vec_uniform(n, -1.0, 1.0);
                let wt = gpu.upload_f32("w", &[n], &w)?;
                let gt = gpu.upload_f32("g", &[n], &g)?;
                let w_hat = gpu.empty("w_hat", &[n], DType::F32)?;
                let dw = gpu.empty("dw", &[n], DType::F32)?;
                let q = kernels::quant::WeightQuantizer::new(gpu, b, &[n])?;
                let mut ops = q.forward(gpu, &wt, &w_hat)?;
                ops.extend(q.backward(gpu, &gt, &dw)?);
                let t = q.t().expect("quantized");
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dw, t])?;
                let want = reference::quant::weight_backward(&got[1], &g, b);
                // The max term sums n products in f32.
                let tol = Tolerance::new(1e-6 * (n as f64).sqrt(), 1e-5);
                Ok(vec![("dW".into(), reference::compare(&got[0], &want, tol))])
            },
        ));
        v.push(Case::new(
            "weight_quant",
            "codes",
            format!("w{b} {shape}"),
            move |gpu, rng| {
                let b = bits(b);
                let w = make(rng);
                let wt = gpu.upload_f32("w", &[n], &w)?;
                let q = kernels::quant::WeightQuantizer::new(gpu, b, &[n])?;
                let codes = gpu.empty("codes", &[n], b.code_dtype())?;
                let back = gpu.empty("dequant", &[n], DType::F32)?;
                let fake = gpu.empty("fake", &[n], DType::F32)?;
                let mut ops = q.codes(gpu, &wt, &codes)?;
                ops.push(kernels::quant::weight_dequant(gpu, b, &codes, &back)?);
                ops.extend(q.forward(gpu, &wt, &fake)?);
                let t = q.t().expect("quantized");
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&back, &fake, t])?;
                let words: Vec<u32> = gpu.read(&codes)?;
                let m = reference::quant::absmax(&got[2]);
                let want_codes: Vec<f64> = got[2]
                    .iter()
                    .map(|&t| reference::quant::weight_code(t, m, b) as f64)
                    .collect();
                Ok(vec![
                    (
                        "codes".into(),
                        reference::compare(
                            &unpack_codes(&words, b, n),
                            &want_codes,
                            Tolerance::EXACT,
                        ),
                    ),
                    (
                        "dequant = fake-quant".into(),
                        reference::compare(&got[0], &f64s(&got[1]), Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // Exact division: the hardware quotient, and one moved by up to 3 ulp either way.
    for nudge in [0i32, 1, -1, 3, -3] {
        v.push(Case::new(
            "exact_div",
            "forward",
            format!("nudge {nudge} ulp [4096]"),
            move |gpu, rng| {
                let n = 4096;
                let a: Vec<f32> = (0..n).map(|_| rng.uniform(-0.5, 0.5)).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.uniform(1e-3, 1.0)).collect();
                let nudges = vec![nudge; n];
                let at = gpu.upload_f32("a", &[n], &a)?;
                let bt = gpu.upload_f32("b", &[n], &b)?;
                let nt = gpu.upload("nudge", &[n], DType::I32, &nudges)?;
                let qt = gpu.empty("q", &[n], DType::F32)?;
                let op = kernels::quant::div_check(gpu, &at, &bt, &nt, &qt)?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &[op], &[&qt])?;
                let want: Vec<f64> = a.iter().zip(&b).map(|(a, b)| (a / b) as f64).collect();
                Ok(vec![(
                    "q".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Codes as floats from packed (four per word) or one-per-word storage.
fn unpack_codes(words: &[u32], b: Bits, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match b.code_dtype() {
            DType::U8x4 => ((words[i / 4] >> (8 * (i % 4))) & 0xff) as f32,
            _ => words[i] as f32,
        })
        .collect()
}
