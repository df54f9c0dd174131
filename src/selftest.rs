//! The kernel test suite that ships with the binary: every kernel and direction run on the chosen
//! adapter against the CPU reference. `wgqat selftest` prints the table; `cargo test` runs the
//! same cases.

use crate::DType;
use crate::error::Result;
use crate::gpu::{Gpu, Launch, Op, Tensor};
use crate::kernels;
use crate::kernels::norm::Epilogue;
use crate::quant::Bits;
use crate::reference::{self, Report, Tolerance};
use crate::rng::Rng;
use std::time::Instant;

mod coop;
mod iao;
mod iao_int;
mod through_bn;
mod wbwtab;
mod xnor_int;

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
    add_cases(&mut v);
    reduce_cases(&mut v);
    quant_cases(&mut v);
    iao::cases(&mut v);
    wbwtab::cases(&mut v);
    gemm_family_cases(&mut v);
    through_bn::cases(&mut v);
    through_bn::maxpool_cases(&mut v);
    through_bn::stats_cases(&mut v);
    through_bn::output_cases(&mut v);
    through_bn::coop_grad_weight_case(&mut v);
    through_bn::coop_grad_input_case(&mut v);
    layer_cases(&mut v);
    int_cases(&mut v);
    iao_int::cases(&mut v);
    xnor_int::cases(&mut v);
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

/// The residual sum and gradient accumulation: one f32 add per element, exact.
fn add_cases(v: &mut Vec<Case>) {
    for n in [1usize, 257, 65535 * 256 + 300] {
        v.push(Case::new(
            "add",
            "forward",
            format!("[{n}]"),
            move |gpu, rng| {
                let (a, b) = (rng.vec_uniform(n, -1.0, 1.0), rng.vec_uniform(n, -1.0, 1.0));
                let at = gpu.upload_f32("a", &[n], &a)?;
                let bt = gpu.upload_f32("b", &[n], &b)?;
                let yt = gpu.empty("y", &[n], DType::F32)?;
                let l = kernels::elementwise::add_forward(gpu, &at, &bt, &yt)?;
                let got = run_read(gpu, vec![l], &[&yt])?;
                let want = reference::elementwise::add(&a, &b);
                Ok(vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::EXACT),
                )])
            },
        ));
    }
    for n in [1usize, 4099] {
        v.push(Case::new(
            "add",
            "accumulate",
            format!("[{n}]"),
            move |gpu, rng| {
                let (x, s) = (rng.vec_uniform(n, -1.0, 1.0), rng.vec_uniform(n, -1.0, 1.0));
                let xt = gpu.upload_f32("x", &[n], &x)?;
                let st = gpu.upload_f32("sum", &[n], &s)?;
                // Twice: the second adds x to what the first left.
                let ls = vec![
                    kernels::elementwise::accumulate(gpu, &xt, &st)?,
                    kernels::elementwise::accumulate(gpu, &xt, &st)?,
                ];
                let got = run_read(gpu, ls, &[&st])?;
                let once: Vec<f32> = reference::elementwise::add(&s, &x)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let want = reference::elementwise::add(&once, &x);
                Ok(vec![(
                    "sum".into(),
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
                let mut ops = vec![kernels::quant::act_forward(gpu, b, &xt, &yt)?];
                let inplace = gpu.upload_f32("x, then y", &[x.len()], &x)?;
                ops.extend(kernels::quant::act_forward_in_place(gpu, b, &inplace)?);
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&yt, &inplace])?;
                let want = f64s(&reference::quant::act_forward(&x, b));
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "y in place".into(),
                        reference::compare(&got[1], &want, Tolerance::EXACT),
                    ),
                ])
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
                // In place: dy first copied into the buffer that becomes dx.
                let inplace = gpu.upload_f32("dy, then dx", &[x.len()], &dy)?;
                let mut ops = vec![op];
                ops.extend(kernels::quant::act_backward_in_place(
                    gpu, b, &xt, &inplace,
                )?);
                // Mask and requantize in one pass: dy into dx, and x into its quantized value.
                let (xr, dr) = (
                    gpu.upload_f32("x, then quantized", &[x.len()], &x)?,
                    gpu.upload_f32("dy, then dx (requantize)", &[x.len()], &dy)?,
                );
                ops.extend(kernels::quant::act_backward_requantize(gpu, b, &xr, &dr)?);
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&dxt, &inplace, &dr, &xr])?;
                let want = f64s(&reference::quant::act_backward(&x, &dy, b));
                let want_q = f64s(&reference::quant::act_forward(&x, b));
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "dx in place".into(),
                        reference::compare(&got[1], &want, Tolerance::EXACT),
                    ),
                    (
                        "dx requantize".into(),
                        reference::compare(&got[2], &want, Tolerance::EXACT),
                    ),
                    (
                        "x requantized".into(),
                        reference::compare(&got[3], &want_q, Tolerance::EXACT),
                    ),
                ])
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

/// The three GEMM-family ops (conv2d, conv_transpose2d, matmul): tensor shapes, GPU launches and
/// references per direction, so one driver makes their cases.
trait GemmOp: Copy + std::fmt::Debug + Send + Sync + 'static {
    const NAME: &'static str;
    fn x_shape(&self) -> Vec<usize>;
    fn w_shape(&self) -> Vec<usize>;
    fn y_shape(&self) -> Vec<usize>;
    fn describe(&self) -> String;
    /// Longest sum of products per output element in each direction (sets the tolerance).
    fn reduction(&self) -> [usize; 3];
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>>;
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>>;
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>>;
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>>;
    /// Grad-weight with the bias gradient in the same pass over dy (what a network runs), for
    /// the ops whose grad-weight GEMM reads dy as A; None for the others.
    #[allow(clippy::too_many_arguments)]
    fn gpu_grad_weight_and_bias(
        &self,
        _gpu: &Gpu,
        _x: &Tensor,
        _dy: &Tensor,
        _dw: &Tensor,
        _db: &Tensor,
        _splits: Option<usize>,
        _scratch: Option<&Tensor>,
    ) -> Option<Result<Vec<Op>>> {
        None
    }
    /// Whether the op has the fused epilogues ([`GemmOp::gpu_grad_weight_and_bias`] and
    /// [`GemmOp::gpu_grad_input_act`]): conv2d and Linear, whose grad-weight reads dy as A.
    const FUSED_EPILOGUES: bool = false;
    /// Grad-input with the input's DoReFa quantizer in its epilogue; None where the op has none.
    fn gpu_grad_input_act(
        &self,
        _gpu: &Gpu,
        _dy: &Tensor,
        _w: &Tensor,
        _dx: &Tensor,
        _act: kernels::conv2d::ActGrad<'_>,
    ) -> Option<Result<Vec<Op>>> {
        None
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64>;
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64>;
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64>;
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64>;
}

impl GemmOp for kernels::conv2d::Conv2dGeom {
    const NAME: &'static str = "conv2d";
    fn x_shape(&self) -> Vec<usize> {
        self.input_shape().to_vec()
    }
    fn w_shape(&self) -> Vec<usize> {
        self.weight_shape().to_vec()
    }
    fn y_shape(&self) -> Vec<usize> {
        self.output_shape().to_vec()
    }
    fn describe(&self) -> String {
        format!(
            "x{:?} w{:?} s{:?} p{:?} d{:?} g{}",
            self.input_shape(),
            self.weight_shape(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups
        )
    }
    fn reduction(&self) -> [usize; 3] {
        let (oh, ow) = self.out_hw();
        let khw = self.kernel.0 * self.kernel.1;
        [
            self.cin / self.groups * khw,
            self.cout / self.groups * khw,
            self.batch * oh * ow,
        ]
    }
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv2d::forward(gpu, self, x, w, Some(b), y)?])
    }
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv2d::grad_input(gpu, self, dy, w, dx)?])
    }
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        match splits {
            Some(s) => kernels::conv2d::grad_weight_split(gpu, self, x, dy, dw, s, scratch),
            None => kernels::conv2d::grad_weight(gpu, self, x, dy, dw, scratch),
        }
    }
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv2d::grad_bias(gpu, self, dy, db)?])
    }
    fn gpu_grad_input_act(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        act: kernels::conv2d::ActGrad<'_>,
    ) -> Option<Result<Vec<Op>>> {
        Some(
            kernels::conv2d::grad_input_fused(gpu, self, dy, w, dx, Some(act), Default::default())
                .map(|op| vec![op]),
        )
    }
    const FUSED_EPILOGUES: bool = true;
    fn gpu_grad_weight_and_bias(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        db: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Option<Result<Vec<Op>>> {
        Some(kernels::conv2d::grad_weight_and_bias(
            gpu, self, x, dy, dw, db, splits, scratch,
        ))
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        reference::conv2d::forward(self, x, w, Some(b))
    }
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        reference::conv2d::grad_input(self, dy, w)
    }
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        reference::conv2d::grad_weight(self, x, dy)
    }
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64> {
        reference::conv2d::grad_bias(self, dy)
    }
}

impl GemmOp for kernels::conv_transpose2d::ConvTranspose2dGeom {
    const NAME: &'static str = "conv_transpose2d";
    fn x_shape(&self) -> Vec<usize> {
        self.input_shape().to_vec()
    }
    fn w_shape(&self) -> Vec<usize> {
        self.weight_shape().to_vec()
    }
    fn y_shape(&self) -> Vec<usize> {
        self.output_shape().to_vec()
    }
    fn describe(&self) -> String {
        format!(
            "x{:?} w{:?} s{:?} p{:?} op{:?} d{:?} g{}",
            self.input_shape(),
            self.weight_shape(),
            self.stride,
            self.padding,
            self.output_padding,
            self.dilation,
            self.groups
        )
    }
    fn reduction(&self) -> [usize; 3] {
        let khw = self.kernel.0 * self.kernel.1;
        [
            self.cin / self.groups * khw,
            self.cout / self.groups * khw,
            self.batch * self.h * self.w,
        ]
    }
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv_transpose2d::forward(
            gpu,
            self,
            x,
            w,
            Some(b),
            y,
        )?])
    }
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv_transpose2d::grad_input(
            gpu, self, dy, w, dx,
        )?])
    }
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        match splits {
            Some(s) => {
                kernels::conv_transpose2d::grad_weight_split(gpu, self, x, dy, dw, s, scratch)
            }
            None => kernels::conv_transpose2d::grad_weight(gpu, self, x, dy, dw, scratch),
        }
    }
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::conv_transpose2d::grad_bias(
            gpu, self, dy, db,
        )?])
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::forward(self, x, w, Some(b))
    }
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::grad_input(self, dy, w)
    }
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::grad_weight(self, x, dy)
    }
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64> {
        reference::conv_transpose2d::grad_bias(self, dy)
    }
}

impl GemmOp for kernels::matmul::LinearGeom {
    const NAME: &'static str = "matmul";
    fn x_shape(&self) -> Vec<usize> {
        vec![self.batch, self.in_features]
    }
    fn w_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.in_features]
    }
    fn y_shape(&self) -> Vec<usize> {
        vec![self.batch, self.out_features]
    }
    fn describe(&self) -> String {
        format!(
            "[{}x{}]·[{}x{}]ᵀ",
            self.batch, self.in_features, self.out_features, self.in_features
        )
    }
    fn reduction(&self) -> [usize; 3] {
        [self.in_features, self.out_features, self.batch]
    }
    fn gpu_forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Op>> {
        Ok(vec![kernels::matmul::forward(gpu, self, x, w, Some(b), y)?])
    }
    fn gpu_grad_input(&self, gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::matmul::grad_input(gpu, self, dy, w, dx)?])
    }
    fn gpu_grad_weight(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        _splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Result<Vec<Op>> {
        kernels::matmul::grad_weight(gpu, self, x, dy, dw, scratch)
    }
    fn gpu_grad_bias(&self, gpu: &Gpu, dy: &Tensor, db: &Tensor) -> Result<Vec<Op>> {
        Ok(vec![kernels::matmul::grad_bias(gpu, self, dy, db)?])
    }
    fn gpu_grad_input_act(
        &self,
        gpu: &Gpu,
        dy: &Tensor,
        w: &Tensor,
        dx: &Tensor,
        act: kernels::conv2d::ActGrad<'_>,
    ) -> Option<Result<Vec<Op>>> {
        Some(kernels::matmul::grad_input_act(gpu, self, dy, w, dx, act).map(|op| vec![op]))
    }
    const FUSED_EPILOGUES: bool = true;
    fn gpu_grad_weight_and_bias(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        dy: &Tensor,
        dw: &Tensor,
        db: &Tensor,
        _splits: Option<usize>,
        scratch: Option<&Tensor>,
    ) -> Option<Result<Vec<Op>>> {
        Some(kernels::matmul::grad_weight_and_bias(
            gpu,
            self,
            x,
            dy,
            (dw, db),
            scratch,
        ))
    }
    fn ref_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        reference::matmul::forward(self, x, w, Some(b))
    }
    fn ref_grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        reference::matmul::grad_input(self, dy, w)
    }
    fn ref_grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        reference::matmul::grad_weight(self, x, dy)
    }
    fn ref_grad_bias(&self, dy: &[f64]) -> Vec<f64> {
        reference::matmul::grad_bias(self, dy)
    }
}

/// f32 sums of `k` products of values in [-1, 1]: the error grows about like sqrt(k) ulps of
/// the result; allow a margin of ~10 over what lavapipe shows.
fn gemm_tolerance(k: usize) -> Tolerance {
    Tolerance::new(2e-6 * (k as f64).sqrt(), 1e-5)
}

fn random(rng: &mut Rng, shape: &[usize]) -> Vec<f32> {
    rng.vec_uniform(shape.iter().product(), -1.0, 1.0)
}

fn gemm_cases<G: GemmOp>(v: &mut Vec<Case>, geom: G) {
    let shape = geom.describe();
    let [k_fwd, k_dx, k_dw] = geom.reduction();
    v.push(Case::new(
        G::NAME,
        "forward",
        shape.clone(),
        move |gpu, rng| {
            let (x, w) = (random(rng, &geom.x_shape()), random(rng, &geom.w_shape()));
            let b = random(rng, &[geom.y_shape()[1]]);
            let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
            let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
            let bt = gpu.upload_f32("b", &[b.len()], &b)?;
            let yt = gpu.empty("y", &geom.y_shape(), DType::F32)?;
            let got: Vec<Vec<f32>> = gpu.run_and_read(
                "selftest",
                &geom.gpu_forward(gpu, &xt, &wt, &bt, &yt)?,
                &[&yt],
            )?;
            let want = geom.ref_forward(&f64s(&x), &f64s(&w), &f64s(&b));
            Ok(vec![(
                "y".into(),
                reference::compare(&got[0], &want, gemm_tolerance(k_fwd)),
            )])
        },
    ));
    v.push(Case::new(
        G::NAME,
        "grad_input",
        shape.clone(),
        move |gpu, rng| {
            let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
            let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
            let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
            let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
            let got: Vec<Vec<f32>> = gpu.run_and_read(
                "selftest",
                &geom.gpu_grad_input(gpu, &dyt, &wt, &dxt)?,
                &[&dxt],
            )?;
            let want = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
            Ok(vec![(
                "dx".into(),
                reference::compare(&got[0], &want, gemm_tolerance(k_dx)),
            )])
        },
    ));
    // Grad-input with the input's quantizer in its epilogue (what a network runs for a DoReFa
    // layer): dx masked by x's straight-through rule and, in every other shape, x requantized
    // in place. x spans [-3, 13], so about a quarter falls outside the rule's range.
    if G::FUSED_EPILOGUES {
        let requantize = geom.x_shape().iter().sum::<usize>() % 2 == 0;
        let direction = if requantize {
            "grad_input+act requantize"
        } else {
            "grad_input+act"
        };
        v.push(Case::new(
            G::NAME,
            direction,
            shape.clone(),
            move |gpu, rng| {
                let (dy, w) = (random(rng, &geom.y_shape()), random(rng, &geom.w_shape()));
                let x: Vec<f32> = random(rng, &geom.x_shape())
                    .iter()
                    .map(|v| 5.0 + 8.0 * v)
                    .collect();
                let bits = Bits::new(4).expect("4 bits");
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let wt = gpu.upload_f32("w", &geom.w_shape(), &w)?;
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let dxt = gpu.empty("dx", &geom.x_shape(), DType::F32)?;
                let act = kernels::conv2d::ActGrad {
                    x: &xt,
                    bits,
                    requantize,
                };
                let ops = geom
                    .gpu_grad_input_act(gpu, &dyt, &wt, &dxt, act)
                    .expect("the op has the epilogue")?;
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dxt, &xt])?;
                let dx = geom.ref_grad_input(&f64s(&dy), &f64s(&w));
                // The straight-through rule of the f32 input, on the f64 sum.
                let want = reference::quant::act_backward_f64(&x, &dx);
                let x_want = if requantize {
                    f64s(&reference::quant::act_forward(&x, bits))
                } else {
                    f64s(&x)
                };
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &want, gemm_tolerance(k_dx)),
                    ),
                    (
                        "x".into(),
                        reference::compare(&got[1], &x_want, Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // With the bias gradient in the same pass where the op has it (checked beside dw).
    for splits in [None, Some(3)] {
        let direction = match (splits.is_some(), G::FUSED_EPILOGUES) {
            (false, false) => "grad_weight",
            (true, false) => "grad_weight split-K 3",
            (false, true) => "grad_weight+bias",
            (true, true) => "grad_weight+bias split-K 3",
        };
        if splits.is_some() && G::NAME == "matmul" {
            continue;
        }
        v.push(Case::new(
            G::NAME,
            direction,
            shape.clone(),
            move |gpu, rng| {
                let (x, dy) = (random(rng, &geom.x_shape()), random(rng, &geom.y_shape()));
                let xt = gpu.upload_f32("x", &geom.x_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
                let dwt = gpu.empty("dw", &geom.w_shape(), DType::F32)?;
                let c = geom.y_shape()[1];
                let dbt = gpu.empty("db", &[c], DType::F32)?;
                // The split case writes its partial sums into a larger shared scratch that
                // holds stale NaNs, as a network's does: they must all be overwritten.
                let n = 4 * geom.w_shape().iter().product::<usize>() + 4 * c + 64;
                let scratch = match splits {
                    Some(_) => Some(gpu.upload_f32("scratch", &[n], &vec![f32::NAN; n])?),
                    None => None,
                };
                let scratch = scratch.as_ref();
                let (ops, read) = match geom
                    .gpu_grad_weight_and_bias(gpu, &xt, &dyt, &dwt, &dbt, splits, scratch)
                {
                    Some(ops) => (ops?, vec![&dwt, &dbt]),
                    None => (
                        geom.gpu_grad_weight(gpu, &xt, &dyt, &dwt, splits, scratch)?,
                        vec![&dwt],
                    ),
                };
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &read)?;
                let want = geom.ref_grad_weight(&f64s(&x), &f64s(&dy));
                let mut out = vec![(
                    "dw".into(),
                    reference::compare(&got[0], &want, gemm_tolerance(k_dw)),
                )];
                if let Some(db) = got.get(1) {
                    let want = geom.ref_grad_bias(&f64s(&dy));
                    out.push((
                        "db".into(),
                        reference::compare(db, &want, gemm_tolerance(dy.len() / c)),
                    ));
                }
                Ok(out)
            },
        ));
    }
    v.push(Case::new(G::NAME, "grad_bias", shape, move |gpu, rng| {
        let dy = random(rng, &geom.y_shape());
        let dyt = gpu.upload_f32("dy", &geom.y_shape(), &dy)?;
        let c = geom.y_shape()[1];
        let dbt = gpu.empty("db", &[c], DType::F32)?;
        let got: Vec<Vec<f32>> =
            gpu.run_and_read("selftest", &geom.gpu_grad_bias(gpu, &dyt, &dbt)?, &[&dbt])?;
        let want = geom.ref_grad_bias(&f64s(&dy));
        let k = dy.len() / c;
        Ok(vec![(
            "db".into(),
            reference::compare(&got[0], &want, gemm_tolerance(k)),
        )])
    }));
}

/// Shapes covering stride 2, padding, dilation 2, groups (depthwise too), 1x1 and 5x5 kernels,
/// asymmetric settings, odd sizes, batch 1, every tile height (16 to 192 rows, and 128-row tiles
/// beyond), both tile widths, M, N and K that are not multiples of the tile, and group packing
/// (full and partly empty tiles).
pub fn conv2d_shapes() -> Vec<kernels::conv2d::Conv2dGeom> {
    use kernels::conv2d::Conv2dGeom as G;
    vec![
        G::square(2, 3, 8, 4, 3).padding(1),
        G::square(1, 5, 9, 6, 5).stride(2).padding(2),
        G {
            batch: 2,
            cin: 4,
            h: 7,
            w: 9,
            cout: 6,
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 2),
            dilation: (2, 2),
            groups: 2,
        },
        G::square(2, 8, 6, 8, 3).padding(1).groups(8),
        G::square(3, 16, 5, 70, 1),
        G {
            batch: 2,
            cin: 6,
            h: 11,
            w: 10,
            cout: 4,
            kernel: (3, 1),
            stride: (1, 2),
            padding: (1, 0),
            dilation: (2, 1),
            groups: 2,
        },
        G::square(1, 3, 32, 8, 5).padding(2),
        G::square(4, 16, 16, 32, 3).padding(1).groups(4),
        // 17..=32 rows in every direction: the 32-row tile.
        G::square(2, 24, 6, 20, 3).padding(1),
        // Forward and grad-weight on the 160-row tile (64 columns); grad-input's K = 150.
        G::square(2, 8, 5, 150, 1),
        // The 192-row tile, two column tiles with a tail; grad-input on the 64-row tile.
        G::square(1, 40, 12, 190, 3).padding(1),
        // Three 128-row tiles, the last holding 4 rows.
        G::square(1, 10, 6, 260, 1),
        // Grad-input on the 128-row tile.
        G::square(2, 120, 4, 16, 1),
        // Every vector load (pointwise, 36 pixels) with tails: forward's weight blocks past
        // K = 12 and past 70 rows, pixel quads past 72 columns; grad-input's weight quads past
        // its 12 rows; grad-weight's dy blocks past 70 rows and input blocks past 12 columns.
        G::square(2, 12, 6, 70, 1),
        // Group packing, NIN-GC's shape: 4 groups of 32 rows per tile (forward, grad-weight),
        // of 16 (grad-input).
        G::square(2, 64, 6, 128, 3).padding(1).groups(4),
        // 6 groups of 32 rows in slots of 4 (the second tile half empty); grad-input packs
        // all 6 groups of 8 rows.
        G::square(1, 48, 5, 192, 3).padding(1).groups(6),
        // Packed with stride, dilation and asymmetric padding.
        G {
            batch: 2,
            cin: 16,
            h: 9,
            w: 7,
            cout: 32,
            kernel: (3, 3),
            stride: (2, 1),
            padding: (1, 2),
            dilation: (1, 2),
            groups: 2,
        },
    ]
}

pub fn conv_transpose2d_shapes() -> Vec<kernels::conv_transpose2d::ConvTranspose2dGeom> {
    use kernels::conv_transpose2d::ConvTranspose2dGeom as G;
    let sq = |batch, cin, hw, cout, k, s, p, op, d, groups| G {
        batch,
        cin,
        h: hw,
        w: hw,
        cout,
        kernel: (k, k),
        stride: (s, s),
        padding: (p, p),
        output_padding: (op, op),
        dilation: (d, d),
        groups,
    };
    vec![
        sq(2, 4, 5, 3, 3, 2, 1, 1, 1, 1),
        sq(1, 6, 4, 4, 3, 1, 0, 0, 2, 2),
        sq(2, 4, 3, 6, 2, 2, 0, 0, 1, 1),
        sq(1, 3, 5, 2, 5, 3, 2, 2, 1, 1),
        sq(2, 4, 6, 4, 3, 1, 1, 1, 2, 1),
        G {
            batch: 1,
            cin: 8,
            h: 3,
            w: 5,
            cout: 8,
            kernel: (1, 3),
            stride: (2, 1),
            padding: (0, 1),
            output_padding: (1, 0),
            dilation: (1, 1),
            groups: 8,
        },
        sq(2, 70, 4, 66, 1, 1, 0, 0, 1, 1),
    ]
}

pub fn matmul_shapes() -> Vec<kernels::matmul::LinearGeom> {
    use kernels::matmul::LinearGeom as G;
    [
        (1, 1, 1),
        (5, 7, 3),
        (50, 192, 10),
        (3, 130, 70),
        (64, 64, 64),
        (200, 33, 17),
    ]
    .into_iter()
    .map(|(batch, in_features, out_features)| G {
        batch,
        in_features,
        out_features,
    })
    .collect()
}

fn gemm_family_cases(v: &mut Vec<Case>) {
    for g in conv2d_shapes() {
        gemm_cases(v, g);
    }
    coop::cases(v);
    for g in conv_transpose2d_shapes() {
        gemm_cases(v, g);
    }
    for g in matmul_shapes() {
        gemm_cases(v, g);
    }
}

fn layer_cases(v: &mut Vec<Case>) {
    // BatchNorm: train forward (with running stats), eval forward, backward; with and without
    // the fused ReLU and channel shuffle; a single-element channel batch too. The reference
    // shuffles its output (and unshuffles the output gradient) separately.
    // With `quantize` bits (0: none), forward eval also checks the fused activation quantizer
    // bit for bit against act_forward of the unquantized output.
    for (n, c, s, relu, shuffle, quantize) in [
        (4usize, 3usize, 25usize, true, 1usize, 0u32),
        (2, 70, 64, false, 1, 0),
        (50, 4, 1, true, 1, 0),
        (3, 5, 300, true, 1, 4),
        (4, 6, 25, true, 2, 8),
        (2, 12, 9, false, 3, 2),
    ] {
        let ep = Epilogue {
            relu,
            shuffle,
            quantize: None,
        };
        let shape = format!(
            "[{n},{c},{s}]{}{}{}",
            if relu { " +relu" } else { "" },
            if shuffle > 1 {
                format!(" +shuffle {shuffle}")
            } else {
                String::new()
            },
            if quantize > 0 {
                format!(" +a{quantize}")
            } else {
                String::new()
            }
        );
        let shuffled = move |v: Vec<f64>, inverse: bool| {
            if shuffle > 1 {
                reference::pool::channel_shuffle(&v, (n, c, s), shuffle, inverse)
            } else {
                v
            }
        };
        v.push(Case::new(
            "batchnorm",
            "forward train",
            shape.clone(),
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * s, -2.0, 3.0);
                let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
                let (rm0, rv0) = (rng.vec_uniform(c, -0.1, 0.1), rng.vec_uniform(c, 0.5, 1.5));
                let xt = gpu.upload_f32("x", &[n, c, s], &x)?;
                let (gt, bt) = (
                    gpu.upload_f32("gamma", &[c], &gamma)?,
                    gpu.upload_f32("beta", &[c], &beta)?,
                );
                let (rm, rv) = (
                    gpu.upload_f32("rm", &[c], &rm0)?,
                    gpu.upload_f32("rv", &[c], &rv0)?,
                );
                let stats = gpu.empty("stats", &[kernels::norm::TABLE * c], DType::F32)?;
                let y = gpu.empty("y", &[n, c, s], DType::F32)?;
                let ops = vec![
                    kernels::norm::stats_train(gpu, &xt, 1e-5, 0.1, (&gt, &bt), &stats, &rm, &rv)?,
                    kernels::norm::apply(gpu, ep, &xt, &stats, &gt, &bt, &y)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &rm, &rv])?;
                let (want, mean, var) = reference::norm::forward_train(
                    &f64s(&x),
                    (n, c, s),
                    &f64s(&gamma),
                    &f64s(&beta),
                    1e-5,
                    relu,
                );
                let want = shuffled(want, false);
                let (wrm, wrv) = reference::norm::running_update(
                    &f64s(&rm0),
                    &f64s(&rv0),
                    &mean,
                    &var,
                    n * s,
                    0.1,
                );
                let tol = Tolerance::new(2e-5, 1e-4);
                Ok(vec![
                    ("y".into(), reference::compare(&got[0], &want, tol)),
                    (
                        "running_mean".into(),
                        reference::compare(&got[1], &wrm, tol),
                    ),
                    ("running_var".into(), reference::compare(&got[2], &wrv, tol)),
                ])
            },
        ));
        v.push(Case::new(
            "batchnorm",
            "forward eval",
            shape.clone(),
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * s, -2.0, 3.0);
                let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
                let (rm0, rv0) = (rng.vec_uniform(c, -0.5, 0.5), rng.vec_uniform(c, 0.5, 1.5));
                let xt = gpu.upload_f32("x", &[n, c, s], &x)?;
                let (gt, bt) = (
                    gpu.upload_f32("gamma", &[c], &gamma)?,
                    gpu.upload_f32("beta", &[c], &beta)?,
                );
                let (rm, rv) = (
                    gpu.upload_f32("rm", &[c], &rm0)?,
                    gpu.upload_f32("rv", &[c], &rv0)?,
                );
                let stats = gpu.empty("stats", &[kernels::norm::TABLE * c], DType::F32)?;
                let y = gpu.empty("y", &[n, c, s], DType::F32)?;
                let ops = vec![
                    kernels::norm::stats_eval(gpu, c, 1e-5, (&gt, &bt), &rm, &rv, &stats)?,
                    kernels::norm::apply(gpu, ep, &xt, &stats, &gt, &bt, &y)?,
                ];
                let yq = gpu.empty("y quantized", &[n, c, s], DType::F32)?;
                let mut ops = ops;
                if quantize > 0 {
                    let q = Epilogue {
                        quantize: Some(bits(quantize)),
                        ..ep
                    };
                    ops.push(kernels::norm::apply(gpu, q, &xt, &stats, &gt, &bt, &yq)?);
                }
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &yq])?;
                let want = shuffled(
                    reference::norm::apply(
                        &f64s(&x),
                        (n, c, s),
                        &f64s(&rm0),
                        &f64s(&rv0),
                        &f64s(&gamma),
                        &f64s(&beta),
                        1e-5,
                        relu,
                    ),
                    false,
                );
                let mut checks = vec![(
                    "y".into(),
                    reference::compare(&got[0], &want, Tolerance::new(1e-5, 1e-5)),
                )];
                if quantize > 0 {
                    let want_q = reference::quant::act_forward(&got[0], bits(quantize));
                    checks.push((
                        format!("y quantized a{quantize}"),
                        reference::compare(&got[1], &f64s(&want_q), Tolerance::EXACT),
                    ));
                }
                Ok(checks)
            },
        ));
        v.push(Case::new(
            "batchnorm",
            "backward",
            shape,
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * s, -2.0, 3.0);
                let dy = rng.vec_uniform(n * c * s, -1.0, 1.0);
                let (gamma, beta) = (rng.vec_uniform(c, 0.5, 1.5), rng.vec_uniform(c, -0.5, 0.5));
                let xt = gpu.upload_f32("x", &[n, c, s], &x)?;
                let dyt = gpu.upload_f32("dy", &[n, c, s], &dy)?;
                let (gt, bt) = (
                    gpu.upload_f32("gamma", &[c], &gamma)?,
                    gpu.upload_f32("beta", &[c], &beta)?,
                );
                let (rm, rv) = (
                    gpu.zeros("rm", &[c], DType::F32)?,
                    gpu.zeros("rv", &[c], DType::F32)?,
                );
                let stats = gpu.empty("stats", &[kernels::norm::TABLE * c], DType::F32)?;
                let y = gpu.empty("y", &[n, c, s], DType::F32)?;
                let (dg, db) = (
                    gpu.empty("dgamma", &[c], DType::F32)?,
                    gpu.empty("dbeta", &[c], DType::F32)?,
                );
                let dx = gpu.empty("dx", &[n, c, s], DType::F32)?;
                let mut ops = vec![
                    kernels::norm::stats_train(gpu, &xt, 1e-5, 0.1, (&gt, &bt), &stats, &rm, &rv)?,
                    kernels::norm::apply(gpu, ep, &xt, &stats, &gt, &bt, &y)?,
                ];
                ops.extend(kernels::norm::backward(
                    gpu,
                    ep,
                    &xt,
                    &dyt,
                    &stats,
                    &gt,
                    &bt,
                    &dg,
                    &db,
                    Some(&dx),
                )?);
                // In place: dx over a copy of x, as a network writes it over the conv output.
                let x_then_dx = gpu.upload_f32("x, then dx", &[n, c, s], &x)?;
                let (dg2, db2) = (
                    gpu.empty("dgamma 2", &[c], DType::F32)?,
                    gpu.empty("dbeta 2", &[c], DType::F32)?,
                );
                ops.extend(kernels::norm::backward(
                    gpu,
                    ep,
                    &x_then_dx,
                    &dyt,
                    &stats,
                    &gt,
                    &bt,
                    &dg2,
                    &db2,
                    Some(&x_then_dx),
                )?);
                let got: Vec<Vec<f32>> =
                    gpu.run_and_read("selftest", &ops, &[&dx, &dg, &db, &x_then_dx])?;
                let (yr, mean, var) = reference::norm::forward_train(
                    &f64s(&x),
                    (n, c, s),
                    &f64s(&gamma),
                    &f64s(&beta),
                    1e-5,
                    relu,
                );
                // The ReLU mask comes from the GPU's own y (a value at exactly 0 may round either
                // way); the backward forms the same pre-activation again, so their signs agree.
                let y_gpu: Vec<f64> = if relu {
                    shuffled(f64s(&gpu.read_f32(&y)?), true)
                } else {
                    yr
                };
                let (wdx, wdg, wdb) = reference::norm::backward(
                    &f64s(&x),
                    &y_gpu,
                    &shuffled(f64s(&dy), true),
                    (n, c, s),
                    &mean,
                    &var,
                    &f64s(&gamma),
                    1e-5,
                    relu,
                );
                let k = ((n * s) as f64).sqrt();
                Ok(vec![
                    (
                        "dx".into(),
                        reference::compare(&got[0], &wdx, Tolerance::new(1e-5 * k, 1e-4)),
                    ),
                    (
                        "dgamma".into(),
                        reference::compare(&got[1], &wdg, Tolerance::new(2e-6 * k, 1e-5)),
                    ),
                    (
                        "dbeta".into(),
                        reference::compare(&got[2], &wdb, Tolerance::new(2e-6 * k, 1e-5)),
                    ),
                    (
                        "dx in place".into(),
                        reference::compare(&got[3], &wdx, Tolerance::new(1e-5 * k, 1e-4)),
                    ),
                ])
            },
        ));
    }
    // Pools: NIN's k3 s2 p1 (overlapping, -inf padding) and k2 s2, avg 8, odd sizes, asymmetric.
    use kernels::pool::PoolGeom;
    let pools = [
        PoolGeom {
            n: 2,
            c: 3,
            h: 8,
            w: 8,
            kernel: (3, 3),
            stride: (2, 2),
            padding: (1, 1),
        },
        PoolGeom {
            n: 2,
            c: 4,
            h: 8,
            w: 6,
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
        },
        PoolGeom {
            n: 3,
            c: 10,
            h: 8,
            w: 8,
            kernel: (8, 8),
            stride: (1, 1),
            padding: (0, 0),
        },
        PoolGeom {
            n: 1,
            c: 2,
            h: 7,
            w: 9,
            kernel: (3, 2),
            stride: (1, 2),
            padding: (1, 1),
        },
        // Small planes, 8 to a workgroup in max-pool backward, the last workgroup's 5.
        PoolGeom {
            n: 3,
            c: 7,
            h: 16,
            w: 16,
            kernel: (3, 3),
            stride: (2, 2),
            padding: (1, 1),
        },
        // Planes whose windows do not fit one workgroup: max-pool backward in two bands, with
        // input rows that no window covers (stride 3 over 2) at and around the band edge.
        PoolGeom {
            n: 1,
            c: 2,
            h: 300,
            w: 70,
            kernel: (2, 3),
            stride: (3, 2),
            padding: (0, 1),
        },
        // Rows too wide for a band (2,100 windows): max-pool backward window by window.
        PoolGeom {
            n: 1,
            c: 1,
            h: 3,
            w: 4200,
            kernel: (3, 3),
            stride: (2, 2),
            padding: (1, 1),
        },
    ];
    for g in pools {
        let shape = format!(
            "{:?} k{:?} s{:?} p{:?}",
            g.input_shape(),
            g.kernel,
            g.stride,
            g.padding
        );
        v.push(Case::new(
            "maxpool",
            "forward+backward",
            shape.clone(),
            move |gpu, rng| {
                // Coarse values so that ties (first maximum wins) occur.
                let x: Vec<f32> = (0..g.input_shape().iter().product())
                    .map(|_| (rng.below(5) as f32) - 2.0)
                    .collect();
                let dy = random(rng, &g.output_shape());
                let xt = gpu.upload_f32("x", &g.input_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let ops = vec![
                    kernels::maxpool::maxpool_forward(gpu, &g, &xt, &y)?,
                    kernels::maxpool::maxpool_backward(gpu, &g, &xt, &dyt, &dx)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
                let (wy, warg) = reference::pool::maxpool_forward(&g, &f64s(&x));
                let wdx = reference::pool::maxpool_backward(&g, &f64s(&dy), &warg);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &wy, Tolerance::EXACT),
                    ),
                    (
                        "dx".into(),
                        reference::compare(&got[1], &wdx, Tolerance::new(1e-6, 1e-6)),
                    ),
                ])
            },
        ));
        v.push(Case::new(
            "avgpool",
            "forward+backward",
            shape,
            move |gpu, rng| {
                let x = random(rng, &g.input_shape());
                let dy = random(rng, &g.output_shape());
                let xt = gpu.upload_f32("x", &g.input_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let ops = vec![
                    kernels::pool::avgpool_forward(gpu, &g, &xt, &y)?,
                    kernels::pool::avgpool_backward(gpu, &g, &dyt, &dx)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
                let tol = Tolerance::new(1e-6, 1e-5);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(
                            &got[0],
                            &reference::pool::avgpool_forward(&g, &f64s(&x)),
                            tol,
                        ),
                    ),
                    (
                        "dx".into(),
                        reference::compare(
                            &got[1],
                            &reference::pool::avgpool_backward(&g, &f64s(&dy)),
                            tol,
                        ),
                    ),
                ])
            },
        ));
    }
    // Max-pool with the shuffle after it and the next layer's quantizer fused (what a NIN-GC
    // network runs): the output shuffled and quantized, the gradient read shuffled.
    for (g, groups) in [
        (
            PoolGeom {
                n: 2,
                c: 4,
                h: 8,
                w: 6,
                kernel: (2, 2),
                stride: (2, 2),
                padding: (0, 0),
            },
            2usize,
        ),
        (
            PoolGeom {
                n: 2,
                c: 12,
                h: 7,
                w: 7,
                kernel: (3, 3),
                stride: (2, 2),
                padding: (1, 1),
            },
            4,
        ),
    ] {
        let shape = format!("{:?} k{:?} g{groups}", g.input_shape(), g.kernel);
        v.push(Case::new(
            "maxpool",
            "forward+backward shuffled, a4",
            shape,
            move |gpu, rng| {
                // Coarse values (ties) over [-3, 13]: some outside the quantizer's range.
                let x: Vec<f32> = (0..g.input_shape().iter().product())
                    .map(|_| rng.below(17) as f32 - 2.63)
                    .collect();
                let dy = random(rng, &g.output_shape());
                let bits = Bits::new(4).expect("4 bits");
                let xt = gpu.upload_f32("x", &g.input_shape(), &x)?;
                let dyt = gpu.upload_f32("dy", &g.output_shape(), &dy)?;
                let y = gpu.empty("y", &g.output_shape(), DType::F32)?;
                let dx = gpu.empty("dx", &g.input_shape(), DType::F32)?;
                let ep = kernels::maxpool::MaxPoolEpilogue {
                    shuffle: groups,
                    quantize: Some(bits),
                };
                let ops = vec![
                    kernels::maxpool::maxpool_forward_fused(gpu, &g, &xt, &y, ep, None)?,
                    kernels::maxpool::maxpool_backward_shuffled(
                        gpu, &g, &xt, &dyt, &dx, groups, None,
                    )?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &dx])?;
                let (oh, ow) = g.out_hw();
                let planes = (g.n, g.c, oh * ow);
                let (pooled, arg) = reference::pool::maxpool_forward(&g, &f64s(&x));
                let shuffled = reference::pool::channel_shuffle(&pooled, planes, groups, false);
                let as_f32: Vec<f32> = shuffled.iter().map(|&v| v as f32).collect();
                let wy = f64s(&reference::quant::act_forward(&as_f32, bits));
                let dy_pool = reference::pool::channel_shuffle(&f64s(&dy), planes, groups, true);
                let wdx = reference::pool::maxpool_backward(&g, &dy_pool, &arg);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &wy, Tolerance::EXACT),
                    ),
                    (
                        "dx".into(),
                        reference::compare(&got[1], &wdx, Tolerance::new(1e-6, 1e-6)),
                    ),
                ])
            },
        ));
    }
    for (n, c, hw, groups) in [
        (2usize, 8usize, 3usize, 2usize),
        (1, 512, 4, 16),
        (2, 12, 5, 4),
    ] {
        v.push(Case::new(
            "channel_shuffle",
            "forward+backward",
            format!("[{n},{c},{hw}] g{groups}"),
            move |gpu, rng| {
                let x = rng.vec_uniform(n * c * hw, -1.0, 1.0);
                let xt = gpu.upload_f32("x", &[n, c, hw, 1], &x)?;
                let y = gpu.empty("y", &[n, c, hw, 1], DType::F32)?;
                let back = gpu.empty("back", &[n, c, hw, 1], DType::F32)?;
                let ops = vec![
                    kernels::pool::channel_shuffle(gpu, groups, false, &xt, &y)?,
                    kernels::pool::channel_shuffle(gpu, groups, true, &y, &back)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&y, &back])?;
                let want = reference::pool::channel_shuffle(&f64s(&x), (n, c, hw), groups, false);
                Ok(vec![
                    (
                        "y".into(),
                        reference::compare(&got[0], &want, Tolerance::EXACT),
                    ),
                    (
                        "inverse(y) = x".into(),
                        reference::compare(&got[1], &f64s(&x), Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    // Losses with their metrics slot.
    for (n, classes) in [(1usize, 10usize), (50, 10), (300, 7)] {
        v.push(Case::new(
            "cross_entropy",
            "forward+backward",
            format!("[{n},{classes}]"),
            move |gpu, rng| {
                let z: Vec<f32> = rng.vec_uniform(n * classes, 0.0, 6.0);
                let labels: Vec<u32> = (0..n).map(|_| rng.below(classes as u64) as u32).collect();
                let zt = gpu.upload_f32("logits", &[n, classes], &z)?;
                let lt = gpu.upload_u32("labels", &[n], &labels)?;
                let dz = gpu.empty("dlogits", &[n, classes], DType::F32)?;
                let rows = gpu.empty("per_row", &[2 * n], DType::F32)?;
                let metrics = gpu.zeros("metrics", &[8], DType::F32)?;
                let step = gpu.upload(
                    "step",
                    &[kernels::loss::STEP_WORDS],
                    DType::U32,
                    &[2u32, 0, 0, 0, 0, 0, 0, 0],
                )?;
                let ops = vec![
                    kernels::loss::cross_entropy(gpu, &zt, &lt, &dz, &rows)?,
                    kernels::loss::batch_metrics(gpu, n, &rows, &metrics, &step)?,
                ];
                let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dz, &metrics])?;
                let (loss, grad, correct) =
                    reference::loss::cross_entropy(&f64s(&z), &labels, classes);
                Ok(vec![
                    (
                        "dlogits".into(),
                        reference::compare(&got[0], &grad, Tolerance::new(1e-7, 1e-5)),
                    ),
                    (
                        "loss (slot 2)".into(),
                        reference::compare(&got[1][4..5], &[loss], Tolerance::new(1e-6, 1e-5)),
                    ),
                    (
                        "correct (slot 2)".into(),
                        reference::compare(&got[1][5..6], &[correct as f64], Tolerance::EXACT),
                    ),
                ])
            },
        ));
    }
    v.push(Case::new(
        "mse",
        "forward+backward",
        "[4,3,5,5]".into(),
        move |gpu, rng| {
            let shape = [4usize, 3, 5, 5];
            let (y, t) = (random(rng, &shape), random(rng, &shape));
            let yt = gpu.upload_f32("y", &shape, &y)?;
            let tt = gpu.upload_f32("target", &shape, &t)?;
            let dy = gpu.empty("dy", &shape, DType::F32)?;
            let rows = gpu.empty("per_row", &[8], DType::F32)?;
            let metrics = gpu.zeros("metrics", &[2], DType::F32)?;
            let step = gpu.zeros("step", &[kernels::loss::STEP_WORDS], DType::U32)?;
            let ops = vec![
                kernels::loss::mse(gpu, &yt, &tt, &dy, &rows)?,
                kernels::loss::batch_metrics(gpu, 4, &rows, &metrics, &step)?,
            ];
            let got: Vec<Vec<f32>> = gpu.run_and_read("selftest", &ops, &[&dy, &metrics])?;
            let (loss, grad) = reference::loss::mse(&f64s(&y), &f64s(&t));
            Ok(vec![
                (
                    "dy".into(),
                    reference::compare(&got[0], &grad, Tolerance::new(1e-8, 1e-5)),
                ),
                (
                    "loss".into(),
                    reference::compare(&got[1][..1], &[loss], Tolerance::new(1e-6, 1e-5)),
                ),
            ])
        },
    ));
    // Optimizers: three steps each, so state and bias corrections matter.
    for (name, kind) in [
        (
            "adam",
            kernels::optim::OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
            },
        ),
        (
            "sgd",
            kernels::optim::OptimizerKind::Sgd {
                momentum: 0.9,
                dampening: 0.1,
                nesterov: false,
                weight_decay: 1e-2,
            },
        ),
        (
            "sgd",
            kernels::optim::OptimizerKind::Sgd {
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 0.0,
            },
        ),
    ] {
        v.push(Case::new(
            "optimizer",
            name,
            format!("3 steps [1000] {kind:?}"),
            move |gpu, rng| {
                let n = 1000;
                let p0 = rng.vec_uniform(n, -1.0, 1.0);
                let pt = gpu.upload_f32("param", &[n], &p0)?;
                let (m, vv) = (
                    gpu.zeros("m", &[n], DType::F32)?,
                    gpu.zeros("v", &[n], DType::F32)?,
                );
                let step = gpu.zeros("step", &[kernels::loss::STEP_WORDS], DType::U32)?;
                let (mut p, mut mr, mut vr) = (f64s(&p0), vec![0.0; n], vec![0.0; n]);
                let lr = 0.01;
                for t in 1..=3u32 {
                    let g = rng.vec_uniform(n, -1.0, 1.0);
                    let gt = gpu.upload_f32("grad", &[n], &g)?;
                    let values = crate::train::optimizer::step_values(&kind, t, lr, 0);
                    gpu.write(&step, &[values])?;
                    let op = kernels::optim::update(gpu, &kind, &step, &pt, &gt, &m, &vv)?;
                    gpu.submit("selftest", &[op])?;
                    match kind {
                        kernels::optim::OptimizerKind::Adam {
                            beta1,
                            beta2,
                            eps,
                            weight_decay,
                        } => reference::optim::adam(
                            &mut p,
                            &f64s(&g),
                            &mut mr,
                            &mut vr,
                            t,
                            lr,
                            (beta1 as f64, beta2 as f64, eps as f64, weight_decay as f64),
                        ),
                        kernels::optim::OptimizerKind::Sgd {
                            momentum,
                            dampening,
                            nesterov,
                            weight_decay,
                        } => reference::optim::sgd(
                            &mut p,
                            &f64s(&g),
                            &mut mr,
                            t,
                            lr,
                            (
                                momentum as f64,
                                dampening as f64,
                                nesterov,
                                weight_decay as f64,
                            ),
                        ),
                    }
                }
                let got = gpu.read_f32(&pt)?;
                Ok(vec![(
                    "param after 3 steps".into(),
                    reference::compare(&got, &p, Tolerance::new(1e-6, 1e-5)),
                )])
            },
        ));
    }
}

/// A random folded conv (ReLU on) of `bits`-bit weight codes (None: float weights) reading
/// `input_bits`-bit codes (None: floats).
#[allow(clippy::too_many_arguments)]
fn random_folded_conv(
    rng: &mut Rng,
    name: &str,
    cin: usize,
    cout: usize,
    k: usize,
    pad: usize,
    groups: usize,
    bits: Option<u32>,
    input_bits: Option<u32>,
) -> crate::infer::fold::FoldedOp {
    use crate::infer::fold::{FoldedConv, FoldedOp, Weights};
    let n = cout * cin / groups * k * k;
    let weights = match bits {
        Some(b) => Weights::Codes {
            bits: Bits::new(b).expect("bits"),
            codes: (0..n).map(|_| rng.below((1 << b) as u64) as u8).collect(),
        },
        None => Weights::Float(rng.vec_uniform(n, -0.5, 0.5)),
    };
    FoldedOp::Conv(FoldedConv {
        name: name.into(),
        cin,
        cout,
        kernel: (k, k),
        stride: (1, 1),
        padding: (pad, pad),
        dilation: (1, 1),
        groups,
        linear: false,
        weights,
        input_bits: input_bits.map(|b| Bits::new(b).expect("bits")),
        a: rng.vec_uniform(cout, 0.5, 3.0),
        b: rng.vec_uniform(cout, -0.5, 1.5),
        relu: true,
    })
}

/// `op` (a conv) changed by `f`: e.g. without its ReLU, or as a Linear.
fn edited(
    op: crate::infer::fold::FoldedOp,
    f: impl FnOnce(&mut crate::infer::fold::FoldedConv),
) -> crate::infer::fold::FoldedOp {
    match op {
        crate::infer::fold::FoldedOp::Conv(mut c) => {
            f(&mut c);
            crate::infer::fold::FoldedOp::Conv(c)
        }
        other => other,
    }
}

/// A random model in inference form that takes every path of the integer engine: a float first
/// conv requantized to codes, max-pool and shuffle of codes, grouped 8-bit and 4-bit quantized
/// convs, a float output through max-pool and avg-pool, flatten and a float Linear. With
/// `quantized_first`, the first conv takes 6-bit codes of the image (a quantize op, weight rows
/// padded from 3 channels to 4) with 5-bit weights.
pub fn random_int_model(rng: &mut Rng, quantized_first: bool) -> crate::infer::IntModel {
    use crate::infer::fold::{Folded, FoldedOp};
    let conv = random_folded_conv;
    let mut ops = vec![
        if quantized_first {
            conv(rng, "c0", 3, 8, 3, 1, 1, Some(5), Some(6))
        } else {
            conv(rng, "c0", 3, 8, 3, 1, 1, None, None)
        },
        FoldedOp::MaxPool {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
        },
        FoldedOp::Shuffle { groups: 2 },
        conv(rng, "c1", 8, 12, 3, 1, 2, Some(8), Some(8)),
        conv(rng, "c2", 12, 8, 1, 0, 1, Some(4), Some(4)),
        FoldedOp::MaxPool {
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 1),
        },
        FoldedOp::AvgPool {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
        },
        FoldedOp::Flatten,
    ];
    ops.push(edited(conv(rng, "fc", 32, 10, 1, 0, 1, None, None), |c| {
        (c.linear, c.relu) = (true, false)
    }));
    crate::infer::IntModel::from_folded(&Folded::chain("random", [3, 9, 9], ops))
        .expect("a valid model")
}

/// A random residual model in inference form: a float stem; a block with an identity shortcut
/// (its input read as codes by the body and as floats by the add, so a quantize op comes
/// between); a block whose body and 1x1 shortcut conv both read the first add's output as codes
/// (the add writes codes); then average pooling, flatten and a quantized Linear.
pub fn random_residual_int_model(rng: &mut Rng) -> crate::infer::IntModel {
    use crate::infer::fold::{Folded, FoldedNode, FoldedOp};
    let conv = random_folded_conv;
    let q8 = (Some(8), Some(8));
    let ops = [
        (conv(rng, "stem", 3, 8, 3, 1, 1, None, None), vec![0]),
        (conv(rng, "a.body.0", 8, 8, 3, 1, 1, q8.0, q8.1), vec![1]),
        (
            edited(
                conv(rng, "a.body.1", 8, 8, 3, 1, 2, Some(4), Some(8)),
                |c| c.relu = false,
            ),
            vec![2],
        ),
        (FoldedOp::Add { relu: true }, vec![3, 1]),
        (conv(rng, "b.body.0", 8, 12, 3, 1, 1, q8.0, q8.1), vec![4]),
        (
            edited(conv(rng, "b.body.1", 12, 12, 1, 0, 1, q8.0, Some(8)), |c| {
                c.relu = false
            }),
            vec![5],
        ),
        (
            edited(conv(rng, "b.shortcut", 8, 12, 1, 0, 1, q8.0, q8.1), |c| {
                c.relu = false
            }),
            vec![4],
        ),
        (FoldedOp::Add { relu: true }, vec![6, 7]),
        (
            FoldedOp::AvgPool {
                kernel: (9, 9),
                stride: (9, 9),
                padding: (0, 0),
            },
            vec![8],
        ),
        (FoldedOp::Flatten, vec![9]),
        (
            edited(conv(rng, "fc", 12, 10, 1, 0, 1, Some(4), Some(4)), |c| {
                (c.linear, c.relu) = (true, false)
            }),
            vec![10],
        ),
    ];
    crate::infer::IntModel::from_folded(&Folded {
        model: "random residual".into(),
        input: [3, 9, 9],
        ops: ops
            .into_iter()
            .map(|(op, inputs)| FoldedNode { op, inputs })
            .collect(),
    })
    .expect("a valid model")
}

/// The integer engine's logits for `batch` random images against its CPU reference's. Integer
/// sums are exact; the epilogue is one multiply-add per value, which a GPU may fuse: codes then
/// agree except at exact rounding ties.
fn engine_against_reference(
    gpu: &Gpu,
    rng: &mut Rng,
    model: crate::infer::IntModel,
    batch: usize,
) -> Result<Vec<(String, Report)>> {
    let n = batch * model.manifest.input.iter().product::<usize>();
    let x = rng.vec_uniform(n, -2.0, 2.0);
    let engine = crate::infer::IntEngine::new(gpu, model.clone(), batch)?;
    let got = engine.run(gpu, &x)?;
    let want = f64s(&reference::intinfer::run(&model, &x)?);
    Ok(vec![(
        "logits".into(),
        reference::compare(&got, &want, Tolerance::new(1e-5, 1e-5)),
    )])
}

fn int_cases(v: &mut Vec<Case>) {
    for batch in [1usize, 4] {
        v.push(Case::new(
            "int_engine",
            "forward",
            format!("random residual model, batch {batch}"),
            move |gpu, rng| {
                let model = random_residual_int_model(rng);
                engine_against_reference(gpu, rng, model, batch)
            },
        ));
    }
    for (batch, qfirst) in [(1usize, false), (5, false), (3, true)] {
        let what = if qfirst {
            "quantized first layer"
        } else {
            "float first layer"
        };
        v.push(Case::new(
            "int_engine",
            "forward",
            format!("random model, {what}, batch {batch}"),
            move |gpu, rng| {
                let model = random_int_model(rng, qfirst);
                engine_against_reference(gpu, rng, model, batch)
            },
        ));
    }
}
