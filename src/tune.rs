//! Choosing, per layer and direction, whether a quantized conv's GEMM runs on cooperative
//! matrices (tensor cores) or on the fp32 kernels, from timings on the device itself.
//!
//! The tensor cores win on large GEMMs, but not necessarily on a grouped layer with 16 rows per
//! group or a head with 10 output channels, and where the crossover lies depends on the GPU
//! and its driver. So rather than a rule written for one GPU, [`tune`] builds the network once,
//! records a training step with every eligible GEMM on cooperative matrices and one with every
//! GEMM on fp32, times both launch by launch (GPU timestamps where the adapter has them), and
//! keeps each GEMM on the faster kernel. The step is the real one: the GEMMs do the BatchNorm
//! work a training step fuses into them, at the training batch size.
//!
//! The choice depends on timings, so two runs may choose differently; each kernel gives the
//! same result up to summation order. A training run saves its choice with its resume state and
//! a resumed run keeps it, so that resuming stays bit-identical.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::kernels::elementwise::fill_uniform;
use crate::models::ModelSpec;
use crate::nn::{CoopUse, GemmDirection, Mode, Network, Plan, PlanGemm, init};
use crate::quant::QuantConfig;

/// Timed steps of each kernel family that `wgqat train --tune-kernels` and `wgqat bench
/// --tune-kernels` take.
pub const STEPS: usize = 3;

/// One GEMM's timings on both kernels and the choice.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TunedGemm {
    pub layer: String,
    pub direction: GemmDirection,
    /// Median GPU seconds of the layer's GEMM launches in this direction, per step.
    pub fp32_s: f64,
    pub coop_s: f64,
    /// Runs on cooperative matrices.
    pub coop: bool,
}

/// What [`tune`] measured and chose.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tuning {
    pub gemms: Vec<TunedGemm>,
    /// Per weighted layer with an eligible GEMM, which GEMMs run on cooperative matrices.
    pub uses: Vec<(String, CoopUse)>,
    /// Timed steps per kernel family.
    pub repeats: usize,
    /// Seconds the tuning took (network, pipelines, timed steps).
    pub seconds: f64,
    /// "gpu timestamps" or "wall clock".
    pub timer: &'static str,
}

impl Tuning {
    /// The timings and the choice as a table, one line per GEMM, then the totals.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "kernel tuning ({} steps of each, {}, {:.1} s):",
                self.repeats, self.timer, self.seconds
            ),
            format!(
                "  {:<16} {:<12} {:>10} {:>10}  runs on",
                "layer", "direction", "fp32 ms", "coop ms"
            ),
        ];
        for g in &self.gemms {
            out.push(format!(
                "  {:<16} {:<12} {:>10.3} {:>10.3}  {}",
                g.layer,
                g.direction.name(),
                g.fp32_s * 1e3,
                g.coop_s * 1e3,
                if g.coop { "tensor cores" } else { "fp32" }
            ));
        }
        let (fp32, coop, chosen) = self.totals();
        out.push(format!(
            "  these GEMMs per step: all on fp32 {:.3} ms, all on tensor cores {:.3} ms, as chosen {:.3} ms",
            fp32 * 1e3,
            coop * 1e3,
            chosen * 1e3
        ));
        out
    }

    /// The tuned GEMMs' summed time per step on fp32, on cooperative matrices, and as chosen.
    pub fn totals(&self) -> (f64, f64, f64) {
        self.gemms.iter().fold((0.0, 0.0, 0.0), |(f, c, b), g| {
            (f + g.fp32_s, c + g.coop_s, b + g.fp32_s.min(g.coop_s))
        })
    }
}

/// Sets each named layer's [`CoopUse`] on `net` (a [`Tuning`]'s `uses`, or those a resumed
/// run saved), for the plans recorded after.
pub fn apply(net: &mut Network, uses: &[(String, CoopUse)]) -> Result<()> {
    for (layer, coop) in uses {
        net.set_coop_use(layer, *coop)?;
    }
    Ok(())
}

/// Times a training step of `spec` at `batch` rows with every eligible GEMM on cooperative
/// matrices and with every GEMM on fp32 (`repeats` timed steps each, after one untimed), and
/// chooses per layer and direction. `None` where the device runs no GEMM on cooperative
/// matrices (nothing to choose). Runs on a network of its own, whose buffers go back to the
/// driver once it is done with them (the network trained next has other sizes).
pub fn tune(
    gpu: &Gpu,
    spec: &ModelSpec,
    quant: QuantConfig,
    batch: usize,
    repeats: usize,
) -> Result<Option<Tuning>> {
    let start = std::time::Instant::now();
    let mut net = Network::new(gpu, spec, quant, batch, true, 1)?;
    let eligible = net.coop_layers(gpu);
    if eligible.iter().all(|(_, dirs)| dirs.is_empty()) {
        drop(net);
        gpu.pool().trim();
        return Ok(None);
    }
    init::initialise(gpu, &net, 1)?;
    let repeats = repeats.max(1);
    // Both steps recorded, then timed in turn, so that a clock that drifts during the tuning
    // weighs on both alike.
    let mut plans = Vec::new();
    for on in [true, false] {
        let all = CoopUse {
            forward: on,
            grad_input: on,
            grad_weight: on,
        };
        for (layer, _) in &eligible {
            net.set_coop_use(layer, all)?;
        }
        plans.push(net.plan(gpu, batch, Mode::Train)?);
    }
    let times = time_gemms(gpu, &plans, repeats)?;
    drop((plans, net));
    gpu.pool().trim();
    let (coop, fp32) = (&times[0], &times[1]);
    let mut gemms = Vec::new();
    let mut uses = Vec::new();
    for (layer, dirs) in &eligible {
        let mut chosen = CoopUse::default();
        for &d in dirs {
            let of = |t: &[(PlanGemm, f64)], on_coop: bool| {
                let mut it = t
                    .iter()
                    .filter(|(g, _)| &g.layer == layer && g.direction == d && g.coop == on_coop)
                    .map(|(_, s)| *s)
                    .peekable();
                it.peek().is_some().then(|| it.sum::<f64>())
            };
            // A direction the step does not run (grad-input of a first layer) stays as it is.
            let (Some(coop_s), Some(fp32_s)) = (of(coop, true), of(fp32, false)) else {
                continue;
            };
            let on = coop_s <= fp32_s;
            chosen.set(d, on);
            gemms.push(TunedGemm {
                layer: layer.clone(),
                direction: d,
                fp32_s,
                coop_s,
                coop: on,
            });
        }
        uses.push((layer.clone(), chosen));
    }
    Ok(Some(Tuning {
        gemms,
        uses,
        repeats,
        seconds: start.elapsed().as_secs_f64(),
        timer: crate::bench::timer(gpu),
    }))
}

/// Each GEMM launch of each plan with its median time over `repeats` timed steps, the plans
/// timed in turn (after one untimed step each, which also waits for the pipelines).
fn time_gemms(gpu: &Gpu, plans: &[Plan], repeats: usize) -> Result<Vec<Vec<(PlanGemm, f64)>>> {
    for plan in plans {
        gpu.submit(
            "tuning input",
            &[fill_uniform(gpu, &plan.input, 7, (-1.0, 1.0))?],
        )?;
        gpu.submit("tuning warm-up", plan.ops.ops())?;
        gpu.wait()?;
    }
    let mut runs: Vec<Vec<Vec<f64>>> = plans
        .iter()
        .map(|p| vec![Vec::with_capacity(repeats); p.gemms.len()])
        .collect();
    for _ in 0..repeats {
        for (plan, runs) in plans.iter().zip(&mut runs) {
            let t = gpu.submit_timed("tuning", plan.ops.ops())?;
            for (g, r) in plan.gemms.iter().zip(runs.iter_mut()) {
                r.push(t[g.op].seconds);
            }
        }
    }
    Ok(plans
        .iter()
        .zip(runs)
        .map(|(plan, runs)| {
            plan.gemms
                .iter()
                .cloned()
                .zip(runs)
                .map(|(g, mut r)| {
                    r.sort_by(f64::total_cmp);
                    (g, r[r.len() / 2])
                })
                .collect()
        })
        .collect())
}
