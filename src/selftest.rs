//! The kernel test suite that ships with the binary: every kernel and direction run on the chosen
//! adapter against the CPU reference. `wgqat selftest` prints the table; `cargo test` runs the
//! same cases.

use crate::error::Result;
use crate::gpu::{Gpu, Launch, Op, Tensor};
use crate::quant::Bits;
use crate::reference::Report;
use crate::rng::Rng;
use std::time::Instant;

mod bn_merge;
mod coop;
mod dx_plus;
mod elementwise;
mod gemm;
mod iao;
mod iao_int;
mod int;
mod loss;
mod norm;
mod optim;
mod pool;
mod quant;
mod quant_on_load;
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
        // A case that panics is that case's error, not the end of the suite.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (self.run)(gpu, &mut Rng::new(seed))
        }));
        let seconds = t0.elapsed().as_secs_f64();
        let (outputs, error) = match res {
            Ok(Ok(o)) => (o, None),
            Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
            Err(panic) => {
                let what = crate::util::panic_message(panic.as_ref());
                (Vec::new(), Some(format!("panicked: {what}")))
            }
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

/// Runs `cases` on `gpu`, up to `jobs` at a time on threads of their own (their pipelines
/// compile, and their CPU references run, side by side where the driver compiles on several
/// threads), handing each outcome to `on_outcome` in case order as soon as it and every case
/// before it have finished. Each case draws its inputs from its own seed, so outcomes do not
/// depend on `jobs`.
pub fn run_cases(
    gpu: &Gpu,
    cases: &[Case],
    jobs: usize,
    on_outcome: &mut dyn FnMut(&Outcome),
) -> Vec<Outcome> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, cases.len().max(1)) {
            let (tx, next) = (tx.clone(), &next);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    if tx.send((i, case.run(gpu))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Outcomes arrive in completion order; each is held until those before it are in.
        let mut held = std::collections::HashMap::new();
        let mut done: Vec<Outcome> = Vec::with_capacity(cases.len());
        for (i, outcome) in rx {
            held.insert(i, outcome);
            while let Some(o) = held.remove(&done.len()) {
                on_outcome(&o);
                done.push(o);
            }
        }
        done
    })
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
    elementwise::relu_cases(&mut v);
    elementwise::fill_cases(&mut v);
    elementwise::add_cases(&mut v);
    elementwise::reduce_cases(&mut v);
    quant::cases(&mut v);
    iao::cases(&mut v);
    wbwtab::cases(&mut v);
    gemm::cases(&mut v);
    through_bn::cases(&mut v);
    through_bn::pool::cases(&mut v);
    through_bn::add::cases(&mut v);
    through_bn::stats::cases(&mut v);
    through_bn::output::cases(&mut v);
    through_bn::output::coop_grad_weight_case(&mut v);
    through_bn::output::coop_grad_input_case(&mut v);
    quant_on_load::cases(&mut v);
    dx_plus::cases(&mut v);
    norm::cases(&mut v);
    norm::sign_cases(&mut v);
    bn_merge::cases(&mut v);
    pool::cases(&mut v);
    loss::cases(&mut v);
    optim::cases(&mut v);
    int::cases(&mut v);
    iao_int::cases(&mut v);
    xnor_int::cases(&mut v);
    v
}

/// The cases of one kernel.
pub fn cases_for(kernel: &str) -> Vec<Case> {
    cases().into_iter().filter(|c| c.kernel == kernel).collect()
}

fn bits(b: u32) -> Bits {
    Bits::new(b).expect("valid test bits")
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn random(rng: &mut Rng, shape: &[usize]) -> Vec<f32> {
    rng.vec_uniform(shape.iter().product(), -1.0, 1.0)
}
