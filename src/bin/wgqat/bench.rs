//! `wgqat bench`: training and inference throughput, and the per-kernel table.

use crate::BenchArgs;
use crate::info::coop_name;
use crate::train::model_column;
use std::path::Path;
use std::process::ExitCode;
use wgqat::gpu::{AdapterSummary, Gpu, GpuOptions};
use wgqat::quant::{Bits, SchemeName};

pub(crate) fn bench_kernels(
    opts: &GpuOptions,
    models: &[String],
    batches: &[usize],
    (bits, repeat): (u32, usize),
    json: bool,
    out: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let bits = wgqat::quant::Bits::new(bits)?;
    if batches.contains(&0) {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    let specs = models
        .iter()
        .map(|m| wgqat::models::load(m))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let gpu = Gpu::new(opts)?;
    let report = |rows: &[wgqat::bench::KernelTiming]| {
        serde_json::json!({
            "adapter": AdapterSummary::of(&gpu.info),
            "cooperative_matrices": coop_name(&gpu),
            "kernels": rows,
        })
    };
    if !json {
        println!(
            "kernel benchmark on {} ({})",
            gpu.describe(),
            wgqat::bench::timer(&gpu)
        );
        println!(
            "{:<7} {:>5} {:<13} {:<13} {:<14} {:<44} {:>10} {:>9} {:>9} {:>10}",
            "model",
            "batch",
            "layer",
            "kernel",
            "direction",
            "shape",
            "ms",
            "GFLOP/s",
            "GFLOP",
            "MiB bound"
        );
    }
    // Each row printed (table) and the file rewritten (--out) as it is measured.
    let mut so_far = Vec::new();
    let rows = wgqat::bench::kernels(&gpu, &specs, batches, bits, repeat, &mut |r| {
        if !json {
            print_kernel_row(r);
        }
        if let Some(path) = out {
            so_far.push(r.clone());
            write_report(path, &report(&so_far))?;
        }
        Ok(())
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report(&rows))?);
    } else {
        print_coop_vs_fp32(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the adapter has tensor cores, each of their GEMMs beside the fp32 kernel's, and per
/// model and batch the time of those GEMMs all on fp32, all on tensor cores, and each on the
/// faster (what a per-layer choice would give).
fn print_coop_vs_fp32(rows: &[wgqat::bench::KernelTiming]) {
    let pairs = wgqat::bench::coop_vs_fp32(rows);
    if pairs.is_empty() {
        return;
    }
    println!(
        "\ntensor cores against the fp32 kernels (speed-up above 1: the tensor cores are faster)"
    );
    println!(
        "{:<7} {:>5} {:<13} {:<14} {:>10} {:>10} {:>9}",
        "model", "batch", "layer", "direction", "fp32 ms", "coop ms", "speed-up"
    );
    let ms = |r: &wgqat::bench::KernelTiming| r.seconds.unwrap_or(0.0) * 1e3;
    for p in &pairs {
        println!(
            "{:<7} {:>5} {:<13} {:<14} {:>10.3} {:>10.3} {:>8.2}x",
            p.fp32.model,
            p.fp32.batch,
            p.fp32.layer,
            p.fp32.direction,
            ms(p.fp32),
            ms(p.coop),
            p.speedup()
        );
    }
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for p in &pairs {
        let key = (p.fp32.model.as_str(), p.fp32.batch);
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    for (model, batch) in groups {
        let of = || {
            pairs
                .iter()
                .filter(move |p| (p.fp32.model.as_str(), p.fp32.batch) == (model, batch))
        };
        let fp32: f64 = of().map(|p| ms(p.fp32)).sum();
        let coop: f64 = of().map(|p| ms(p.coop)).sum();
        let best: f64 = of().map(|p| ms(p.fp32).min(ms(p.coop))).sum();
        println!(
            "{model} batch {batch}: these GEMMs all on fp32 {fp32:.3} ms, all on tensor cores {coop:.3} ms, each on the faster {best:.3} ms"
        );
    }
}

/// One row of `bench kernels`' table.
fn print_kernel_row(r: &wgqat::bench::KernelTiming) {
    let time = r
        .seconds
        .map_or("-".to_string(), |s| format!("{:.3}", s * 1e3));
    let rate = r.gflops.map_or("-".to_string(), |g| format!("{g:.1}"));
    println!(
        "{:<7} {:>5} {:<13} {:<13} {:<14} {:<44} {:>10} {:>9} {:>9.3} {:>10}{}",
        r.model,
        r.batch,
        r.layer,
        r.kernel,
        r.direction,
        r.shape,
        time,
        rate,
        r.flops * 1e-9,
        r.bound_bytes
            .map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1048576.0)),
        r.error
            .as_ref()
            .map_or(String::new(), |e| format!("  skipped: {e}"))
    );
}

/// A benchmark's JSON report as it stands, written whole over `path` (`--out`).
fn write_report(path: &Path, report: &serde_json::Value) -> wgqat::Result<()> {
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| wgqat::Error::Invalid(format!("benchmark report: {e}")))?;
    wgqat::util::atomic_write(path, format!("{text}\n").as_bytes())
}

/// The configurations `bench` runs: each scheme at each width (IAO also with BN folding under
/// `--bn-fuse`; wbwtab binary whatever the bits), float once.
fn bench_quants(a: &BenchArgs, bits: &[Bits]) -> Vec<wgqat::quant::QuantConfig> {
    let mut quants: Vec<wgqat::quant::QuantConfig> = Vec::new();
    for &b in bits {
        for &scheme in &a.scheme {
            let q = match scheme {
                _ if b.is_float() => wgqat::quant::QuantConfig::dorefa(b, b),
                SchemeName::Dorefa => wgqat::quant::QuantConfig::dorefa(b, b),
                SchemeName::Iao => wgqat::quant::QuantConfig::iao(b, b, Default::default()),
                // Binary weights and activations, whatever the bits say.
                SchemeName::Wbwtab => wgqat::quant::QuantConfig {
                    scheme: wgqat::quant::Scheme::Wbwtab(Default::default()),
                    ..wgqat::quant::QuantConfig::dorefa(b, b)
                },
            };
            if !quants.contains(&q) {
                quants.push(q);
            }
            if a.bn_fuse && scheme == SchemeName::Iao && !b.is_float() {
                let o = wgqat::quant::IaoOptions {
                    bn_fuse: true,
                    ..Default::default()
                };
                quants.push(wgqat::quant::QuantConfig::iao(b, b, o));
            }
        }
    }
    quants
}

/// `--batch`, or `default` without it; a batch size of 0 is refused.
fn batch_sizes(a: &BenchArgs, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    let batches = a.batch.clone().unwrap_or_else(|| default.to_vec());
    if batches.contains(&0) {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    Ok(batches)
}

/// The models `--model` names, loaded.
fn model_specs(a: &BenchArgs) -> wgqat::Result<Vec<wgqat::models::ModelSpec>> {
    a.model.iter().map(|m| wgqat::models::load(m)).collect()
}

pub(crate) fn bench_training(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    if a.infer {
        return bench_inference(a);
    }
    let bits = a
        .bits
        .iter()
        .map(|&b| Bits::new(b))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let batches = batch_sizes(a, &[50, 128, 256])?;
    let specs = model_specs(a)?;
    let gpu = Gpu::new(&a.gpu.options())?;
    let opts = wgqat::bench::TrainingOptions {
        warmup: a.warmup,
        steps: a.steps,
        breakdown: !a.no_breakdown,
        tune: a.tune_kernels.then_some(wgqat::tune::STEPS),
    };
    let mut rows = Vec::new();
    let mw = model_column(&specs);
    if !a.json {
        println!(
            "training benchmark on {} (wall clock over {} steps after {} warm-up steps)",
            gpu.describe(),
            a.steps,
            a.warmup
        );
        println!(
            "{:<mw$} {:>11} {:>6} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12} {:>9}",
            "model",
            "bits",
            "batch",
            "img/s",
            "ms/step",
            "submits/step",
            "allocs/step",
            "peak MiB",
            "dispatches",
            "mem GiB",
            "1st step s",
            "pipelines"
        );
    }
    let quants = bench_quants(a, &bits);
    let report = |rows: &[wgqat::bench::TrainingBench]| {
        serde_json::json!({
            "adapter": AdapterSummary::of(&gpu.info),
            "cooperative_matrices": coop_name(&gpu),
            "training": rows,
        })
    };
    for spec in &specs {
        for &q in &quants {
            for &batch in &batches {
                let r = wgqat::bench::training(&gpu, spec, q, batch, &opts);
                if !a.json {
                    let f = |v: Option<f64>, p: usize| {
                        v.map_or("-".to_string(), |x| format!("{x:.p$}"))
                    };
                    println!(
                        "{:<mw$} {:>11} {:>6} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12} {:>9}{}",
                        r.model,
                        q.label(),
                        batch,
                        f(r.img_per_s, 1),
                        f(r.step_ms, 1),
                        f(r.submits_per_step, 2),
                        f(r.allocations_per_step, 2),
                        f(r.peak_memory_bytes.map(|m| m as f64 / 1048576.0), 1),
                        r.dispatches_per_step.map_or("-".into(), |d| d.to_string()),
                        f(
                            r.memory_bound_bytes_per_step
                                .map(|m| m as f64 / (1u64 << 30) as f64),
                            2
                        ),
                        f(r.first_step_s, 2),
                        r.pipelines_compiled.map_or("-".into(), |p| p.to_string()),
                        r.error
                            .as_ref()
                            .map_or(String::new(), |e| format!("  skipped: {e}"))
                    );
                    for line in r.tuning.iter().flat_map(|t| t.lines()) {
                        println!("  {line}");
                    }
                    for k in r.kernels.iter().take(6) {
                        // Memory-bound kernels: the bytes they bind and the bandwidth made.
                        let bound = match (k.memory_bound_bytes, k.gb_per_s) {
                            (Some(b), Some(g)) => {
                                let gib = b as f64 / (1u64 << 30) as f64;
                                format!(" {gib:>8.3} GiB {g:>8.1} GB/s")
                            }
                            _ => String::new(),
                        };
                        println!(
                            "{:>30} {:>4} launches {:>9.3} ms {:>5.1}%{bound}",
                            k.kernel, k.launches, k.ms, k.percent
                        );
                    }
                }
                rows.push(r);
                if let Some(path) = &a.out {
                    write_report(path, &report(&rows))?;
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report(&rows))?);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_inference(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    // Float has no integer form: the default bits list's 32 is dropped.
    let bits = a
        .bits
        .iter()
        .filter(|&&b| b != 32)
        .map(|&b| Bits::new(b))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let quants = bench_quants(a, &bits);
    let batches = batch_sizes(a, &[1, 256])?;
    if bits.is_empty() {
        anyhow::bail!("no quantized bits to benchmark: give --bits 2..=8");
    }
    let specs = model_specs(a)?;
    let gpu = Gpu::new(&a.gpu.options())?;
    let opts = wgqat::bench::TrainingOptions {
        warmup: a.warmup,
        steps: a.steps,
        breakdown: false,
        tune: None,
    };
    let mw = model_column(&specs);
    let report = |rows: &[wgqat::bench::InferenceBench]| serde_json::json!({ "adapter": AdapterSummary::of(&gpu.info), "inference": rows });
    if !a.json {
        println!(
            "inference benchmark on {} (wall clock over {} batches after {} warm-up batches, inputs on the GPU)",
            gpu.describe(),
            a.steps,
            a.warmup
        );
        println!(
            "{:<mw$} {:>13} {:>6} {:>12} {:>12} {:>14} {:>14} {:>8}",
            "model",
            "quantization",
            "batch",
            "int img/s",
            "int ms",
            "fake-q img/s",
            "fake-q ms",
            "speedup"
        );
    }
    let mut rows = Vec::new();
    for spec in &specs {
        for &q in &quants {
            for &batch in &batches {
                let r = wgqat::bench::inference(&gpu, spec, q, batch, &opts);
                if !a.json {
                    let f = |v: Option<f64>, p: usize| {
                        v.map_or("-".to_string(), |x| format!("{x:.p$}"))
                    };
                    let speedup = r
                        .int_img_per_s
                        .zip(r.fake_quant_img_per_s)
                        .map(|(i, q)| i / q);
                    println!(
                        "{:<mw$} {:>13} {:>6} {:>12} {:>12} {:>14} {:>14} {:>8}{}",
                        r.model,
                        r.quant,
                        batch,
                        f(r.int_img_per_s, 1),
                        f(r.int_batch_ms, 2),
                        f(r.fake_quant_img_per_s, 1),
                        f(r.fake_quant_batch_ms, 2),
                        speedup.map_or("-".to_string(), |s| format!("{s:.2}x")),
                        r.error
                            .as_ref()
                            .map_or(String::new(), |e| format!("  skipped: {e}"))
                    );
                }
                rows.push(r);
                if let Some(path) = &a.out {
                    write_report(path, &report(&rows))?;
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report(&rows))?);
    }
    Ok(ExitCode::SUCCESS)
}
