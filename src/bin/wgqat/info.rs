//! `wgqat info` and `wgqat selftest`: what the adapter is and whether every kernel computes right
//! on it.

use std::process::ExitCode;
use wgqat::gpu::{AdapterSummary, Gpu, GpuOptions};
use wgqat::selftest::Outcome;

pub(crate) fn selftest(
    opts: &GpuOptions,
    json: bool,
    filter: Option<&str>,
    jobs: usize,
) -> anyhow::Result<ExitCode> {
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
    let outcomes = wgqat::selftest::run_cases(&gpu, &cases, jobs, &mut |o| {
        if !json {
            print_row(o);
        }
    });
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

/// One line of the selftest table.
fn print_row(o: &Outcome) {
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

pub(crate) fn info(opts: &GpuOptions, json: bool) -> anyhow::Result<ExitCode> {
    // What a user waits for before a network is built: adapters listed, the device opened and,
    // with cooperative matrices, their kernels checked on a throwaway device first.
    let start = std::time::Instant::now();
    let (adapters, chosen) = Gpu::probe(opts);
    let open_s = start.elapsed().as_secs_f64();
    let chosen_json = match &chosen {
        Ok(gpu) => {
            let l = &gpu.limits;
            serde_json::json!({
                "adapter": AdapterSummary::of(&gpu.info),
                "open_s": open_s,
                "features": gpu.caps.names(),
                "cooperative_matrices": coop_name(gpu),
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
            let checked = match gpu.coop() {
                Some(wgqat::gpu::CoopMode::Hardware) => {
                    ", its tensor-core kernels checked on a throwaway device first"
                }
                _ => "",
            };
            println!("  opened in {open_s:.2} s{checked}");
            println!("  features used: {}", gpu.caps.names().join(", "));
            println!(
                "  cooperative matrices: {}",
                match (gpu.coop(), gpu.coop_grad_weight(), gpu.coop_grad_input()) {
                    (Some(wgqat::gpu::CoopMode::Hardware), Some(_), Some(_)) => {
                        "used for quantized convs' forward, grad-weight and grad-input (f16 16x16x16 -> f32, checked against fp32 at start)"
                    }
                    (Some(wgqat::gpu::CoopMode::Hardware), Some(_), None) => {
                        "used for quantized convs' forward and grad-weight (f16 16x16x16 -> f32, checked against fp32 at start; grad-input stays fp32: it failed its check, or WGQAT_COOP left it out)"
                    }
                    (Some(wgqat::gpu::CoopMode::Hardware), None, Some(_)) => {
                        "used for quantized convs' forward and grad-input (f16 16x16x16 -> f32, checked against fp32 at start; grad-weight stays fp32: WGQAT_COOP left it out)"
                    }
                    (Some(wgqat::gpu::CoopMode::Hardware), None, None) => {
                        "used for quantized conv forwards (f16 16x16x16 -> f32, checked against fp32 at start; the backward stays fp32: it failed its check, or WGQAT_COOP left it out)"
                    }
                    (Some(wgqat::gpu::CoopMode::Emulated), ..) =>
                        "emulated in plain WGSL (WGQAT_COOP=emulate)",
                    (None, ..) => "not used (none on this adapter, or WGQAT_COOP=0)",
                }
            );
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

/// How quantized convs run on `gpu`, for JSON reports: "hardware" (forward, grad-weight and
/// grad-input on the adapter's cooperative matrices), "hardware, forward and grad-weight",
/// "hardware, forward and grad-input", "hardware, forward only", "emulated"
/// (`WGQAT_COOP=emulate`) or "none".
pub(crate) fn coop_name(gpu: &Gpu) -> &'static str {
    use wgqat::gpu::CoopMode::{Emulated, Hardware};
    match (gpu.coop(), gpu.coop_grad_weight(), gpu.coop_grad_input()) {
        (Some(Hardware), Some(_), Some(_)) => "hardware",
        (Some(Hardware), Some(_), None) => "hardware, forward and grad-weight",
        (Some(Hardware), None, Some(_)) => "hardware, forward and grad-input",
        (Some(Hardware), None, None) => "hardware, forward only",
        (Some(Emulated), ..) => "emulated",
        (None, ..) => "none",
    }
}
