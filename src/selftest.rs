//! The kernel test suite that ships with the binary: every kernel and direction run on the chosen
//! adapter against the CPU reference. `wgqat selftest` prints the table; `cargo test` runs the
//! same cases.

use crate::error::Result;
use crate::gpu::{Gpu, Launch, Op, Tensor};
use crate::kernels;
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
                let yt = gpu.empty("y", &[n], crate::DType::F32)?;
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
                let dxt = gpu.empty("dx", &[n], crate::DType::F32)?;
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
                let out = gpu.empty("sum", &[c], crate::DType::F32)?;
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
