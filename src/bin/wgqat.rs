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
    }
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
