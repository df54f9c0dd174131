//! The `wgqat` command line.

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use wgqat::gpu::{AdapterSummary, Gpu, GpuOptions};

#[derive(Parser)]
#[command(
    name = "wgqat",
    version,
    about = "Quantization-aware training on any GPU through wgpu (Vulkan, Metal, DX12)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List GPU adapters, the one wgqat would choose, its features and limits.
    Info {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Quantization-aware training (micronet DoReFa recipe).
    Train {
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Run every kernel and direction against the CPU reference on this adapter; exit non-zero
    /// on any failure. Check a new GPU or driver with it before training or embedding.
    Selftest {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only kernels whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Time every kernel and direction of a training step at the models' real layer shapes.
    Kernels {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Models (comma list of nin_gc, nin or JSON files).
        #[arg(long, default_value = "nin_gc,nin", value_delimiter = ',')]
        model: Vec<String>,
        /// Batch sizes (comma list).
        #[arg(long, default_value = "50,256", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Bits of the quantizer kernels (2..=16; 32 leaves them out).
        #[arg(long, default_value_t = 8)]
        bits: u32,
        /// Timed runs per kernel (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Adapter choice, shared by every command that uses the GPU.
#[derive(Args, Clone, Default)]
struct GpuArgs {
    /// Graphics API: vulkan, metal, dx12 or gl (default: env WGPU_BACKEND, else all).
    #[arg(long)]
    backend: Option<String>,
    /// Use the adapter whose name contains this (default: env WGPU_ADAPTER_NAME, else the
    /// highest-performance one).
    #[arg(long)]
    adapter: Option<String>,
}

impl GpuArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            backend: self.backend.clone(),
            adapter: self.adapter.clone(),
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,wgpu_hal=error,wgpu_core=error,naga=error"),
    )
    .format_timestamp(None)
    .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Info { gpu, json } => info(&gpu.options(), json),
        Command::Train { gpu: _ } => {
            eprintln!("training is not available yet: this build has the GPU foundation only");
            Ok(ExitCode::FAILURE)
        }
        Command::Selftest { gpu, json, filter } => {
            selftest(&gpu.options(), json, filter.as_deref())
        }
        Command::Bench {
            what:
                BenchWhat::Kernels {
                    gpu,
                    model,
                    batch,
                    bits,
                    repeat,
                    json,
                },
        } => bench_kernels(&gpu.options(), &model, &batch, bits, repeat, json),
    }
}

fn selftest(opts: &GpuOptions, json: bool, filter: Option<&str>) -> anyhow::Result<ExitCode> {
    let gpu = Gpu::new(opts)?;
    let cases: Vec<_> = wgqat::selftest::cases()
        .into_iter()
        .filter(|c| filter.is_none_or(|f| c.kernel.contains(f)))
        .collect();
    if !json {
        println!("selftest on {} ({} cases)", gpu.describe(), cases.len());
        println!(
            "{:<17} {:<22} {:<48} {:>11} {:>11} {:>8}  result",
            "kernel", "direction", "shape", "max abs", "max rel", "ms"
        );
    }
    let mut outcomes = Vec::new();
    for case in &cases {
        let o = case.run(&gpu);
        if !json {
            let worst = o
                .outputs
                .iter()
                .max_by(|a, b| a.1.max_abs.total_cmp(&b.1.max_abs))
                .map(|(_, r)| r);
            let result = match (&o.error, o.passed()) {
                (Some(e), _) => format!("ERROR {e}"),
                (None, true) => "ok".to_string(),
                (None, false) => {
                    let bad: Vec<String> = o
                        .outputs
                        .iter()
                        .filter(|(_, r)| !r.passed())
                        .map(|(n, r)| format!("{n}: {}", r.summary()))
                        .collect();
                    format!("FAIL {}", bad.join("; "))
                }
            };
            println!(
                "{:<17} {:<22} {:<48} {:>11.3e} {:>11.3e} {:>8.1}  {}",
                o.kernel,
                o.direction,
                o.shape,
                worst.map_or(0.0, |r| r.max_abs),
                worst.map_or(0.0, |r| r.max_rel),
                o.seconds * 1e3,
                result
            );
        }
        outcomes.push(o);
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    if json {
        let out = serde_json::json!({
            "adapter": AdapterSummary::of(&gpu.info),
            "passed": outcomes.len() - failed,
            "failed": failed,
            "cases": outcomes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{} passed, {} failed", outcomes.len() - failed, failed);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench_kernels(
    opts: &GpuOptions,
    models: &[String],
    batches: &[usize],
    bits: u32,
    repeat: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bits = wgqat::kernels::quant::Bits::new(bits)?;
    if batches.contains(&0) {
        anyhow::bail!("batch size 0: use a batch size of at least 1");
    }
    let specs = models
        .iter()
        .map(|m| wgqat::models::load(m))
        .collect::<wgqat::Result<Vec<_>>>()?;
    let gpu = Gpu::new(opts)?;
    let rows = wgqat::bench::kernels(&gpu, &specs, batches, bits, repeat)?;
    if json {
        let out = serde_json::json!({ "adapter": AdapterSummary::of(&gpu.info), "kernels": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "kernel benchmark on {} ({})",
        gpu.describe(),
        rows.first().map_or("", |r| r.timer)
    );
    println!(
        "{:<7} {:>5} {:<13} {:<13} {:<12} {:<44} {:>10} {:>9}",
        "model", "batch", "layer", "kernel", "direction", "shape", "ms", "GFLOP/s"
    );
    for r in &rows {
        let time = r
            .seconds
            .map_or("-".to_string(), |s| format!("{:.3}", s * 1e3));
        let rate = r.gflops.map_or("-".to_string(), |g| format!("{g:.1}"));
        println!(
            "{:<7} {:>5} {:<13} {:<13} {:<12} {:<44} {:>10} {:>9}{}",
            r.model,
            r.batch,
            r.layer,
            r.kernel,
            r.direction,
            r.shape,
            time,
            rate,
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!("  skipped: {e}"))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn info(opts: &GpuOptions, json: bool) -> anyhow::Result<ExitCode> {
    let (adapters, chosen) = Gpu::probe(opts);
    let chosen_json = match &chosen {
        Ok(gpu) => {
            let l = &gpu.limits;
            serde_json::json!({
                "adapter": AdapterSummary::of(&gpu.info),
                "features": gpu.caps.names(),
                "subgroup_size": [gpu.info.subgroup_min_size, gpu.info.subgroup_max_size],
                "limits": {
                    "max_buffer_size": l.max_buffer_size,
                    "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                    "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
                    "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                    "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
                    "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
                    "min_storage_buffer_offset_alignment": l.min_storage_buffer_offset_alignment,
                },
            })
        }
        Err(_) => serde_json::Value::Null,
    };
    let error = chosen.as_ref().err().map(|e| e.to_string());
    if json {
        let out = serde_json::json!({
            "adapters": adapters,
            "chosen": chosen_json,
            "error": error,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("adapters found: {}", adapters.len());
        for (i, a) in adapters.iter().enumerate() {
            println!(
                "  [{i}] {} ({}, {}) driver: {} {}",
                a.name, a.backend, a.device_type, a.driver, a.driver_info
            );
        }
        if let Ok(gpu) = &chosen {
            let l = &gpu.limits;
            println!("chosen: {}", gpu.describe());
            println!("  features used: {}", gpu.caps.names().join(", "));
            println!(
                "  subgroup size: {}..{}",
                gpu.info.subgroup_min_size, gpu.info.subgroup_max_size
            );
            println!("  max buffer size: {} MiB", l.max_buffer_size >> 20);
            println!(
                "  max storage binding: {} MiB",
                l.max_storage_buffer_binding_size >> 20
            );
            println!(
                "  storage buffers per stage: {}",
                l.max_storage_buffers_per_shader_stage
            );
            println!(
                "  workgroup memory: {} KiB, invocations per workgroup: {}",
                l.max_compute_workgroup_storage_size >> 10,
                l.max_compute_invocations_per_workgroup
            );
            println!(
                "  workgroups per dimension: {}",
                l.max_compute_workgroups_per_dimension
            );
        }
    }
    match error {
        Some(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}
