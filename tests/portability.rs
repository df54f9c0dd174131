//! Every shader must parse and validate with naga (the version wgpu uses) and translate to SPIR-V
//! (Vulkan), MSL (Metal) and HLSL (DX12), entry point by entry point, so the Metal and DX12 paths
//! stay compilable without those machines. The cooperative-matrix kernels, which only Vulkan
//! runs, translate to SPIR-V (no machine here has cooperative matrices: this is their only
//! check short of a GPU), and their plain-WGSL emulations to every backend.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn translate(name: &str, source: &str) -> Vec<String> {
    translate_to(name, source, true)
}

/// `all_backends`: SPIR-V, MSL and HLSL; else SPIR-V only.
fn translate_to(name: &str, source: &str, all_backends: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let module = match naga::front::wgsl::parse_str(source) {
        Ok(m) => m,
        Err(e) => {
            return vec![format!(
                "shaders/{name}: wgsl parse: {}",
                e.emit_to_string(source)
            )];
        }
    };
    let info = match Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module) {
        Ok(i) => i,
        Err(e) => {
            return vec![format!(
                "shaders/{name}: validation: {}",
                e.emit_to_string(source)
            )];
        }
    };
    for ep in &module.entry_points {
        let stage = ep.stage;
        let ep_name = ep.name.as_str();
        let (m, i) = match naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            Some((stage, ep_name)),
            &naga::back::PipelineConstants::default(),
        ) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("shaders/{name}:{ep_name}: overrides: {e}"));
                continue;
            }
        };
        let spv_opts = spv::PipelineOptions {
            shader_stage: stage,
            entry_point: ep_name.to_string(),
        };
        // naga's SPIR-V writer panics on some expressions it cannot place (a runtime index
        // inside coopStoreT's arguments, in naga 30.0.2): report that as a failure too.
        let written = std::panic::catch_unwind(|| {
            spv::write_vec(&m, &i, &spv::Options::default(), Some(&spv_opts))
        });
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("shaders/{name}:{ep_name}: SPIR-V (Vulkan): {e}")),
            Err(_) => failures.push(format!(
                "shaders/{name}:{ep_name}: SPIR-V (Vulkan): naga panicked"
            )),
        }
        if !all_backends {
            continue;
        }
        let msl_opts = msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let msl_pipe = msl::PipelineOptions {
            entry_point: Some((stage, ep_name.to_string())),
            ..Default::default()
        };
        if let Err(e) = msl::write_string(&m, &i, &msl_opts, &msl_pipe) {
            failures.push(format!("shaders/{name}:{ep_name}: MSL (Metal): {e}"));
        }
        for model in [hlsl::ShaderModel::V5_1, hlsl::ShaderModel::V6_0] {
            let opts = hlsl::Options {
                shader_model: model,
                ..Default::default()
            };
            let pipe = hlsl::PipelineOptions {
                entry_point: Some((stage, ep_name.to_string())),
            };
            let mut out = String::new();
            let mut w = hlsl::Writer::new(&mut out, &opts, &pipe);
            if let Err(e) = w.write(&m, &i, None) {
                failures.push(format!(
                    "shaders/{name}:{ep_name}: HLSL {model:?} (DX12): {e}"
                ));
            }
        }
    }
    failures
}

#[test]
fn every_shader_translates_to_every_backend() {
    let mut failures = Vec::new();
    for s in wgqat::kernels::SHADERS {
        failures.extend(translate(s.name, s.source));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_cooperative_matrix_kernels_translate_to_spirv_and_their_emulations_everywhere() {
    let mut failures = Vec::new();
    for s in wgqat::kernels::SHADERS_COOP {
        failures.extend(translate_to(s.name, s.source, false));
        failures.extend(translate(
            &format!("{} (emulated)", s.name),
            &wgqat::kernels::conv_coop::emulate(s.source),
        ));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let registered: Vec<&str> = wgqat::kernels::SHADERS
        .iter()
        .chain(wgqat::kernels::SHADERS_COOP)
        .map(|s| s.name)
        .collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") {
            assert!(
                registered.contains(&name.as_str()),
                "shaders/{name} is not in kernels::SHADERS, so nothing tests or embeds it"
            );
        }
    }
}

#[test]
fn a_broken_shader_is_reported_with_file_and_stage() {
    let f = translate(
        "broken.wgsl",
        "@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }",
    );
    assert!(
        !f.is_empty() && f[0].starts_with("shaders/broken.wgsl"),
        "{f:?}"
    );
}
