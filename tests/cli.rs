//! The command line as a user runs it.

use std::process::Command;

fn wgqat(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args(args)
        .output()
        .expect("run wgqat")
}

#[test]
fn info_lists_the_chosen_adapter_as_json() {
    let out = wgqat(&["info", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["adapters"].as_array().unwrap().is_empty());
    assert!(v["chosen"]["adapter"]["name"].is_string());
    // The seconds it took to open the device (a report, not a bound).
    assert!(v["chosen"]["open_s"].as_f64().is_some_and(|s| s >= 0.0));
    assert!(
        v["chosen"]["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0
    );
}

/// On a headless machine without XDG_RUNTIME_DIR, Mesa's Wayland probe printed two "error:"
/// lines at every start: stderr now holds only wgqat's own lines.
#[test]
fn a_headless_start_prints_nothing_but_wgqats_own_lines() {
    let out = Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args(["info"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "wgqat info wrote to stderr"
    );
    let dir = std::env::temp_dir().join(format!("wgqat-cli-quiet-{}", std::process::id()));
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ci_nin.json");
    let out = Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args([
            "train",
            "--model",
            model,
            "--steps",
            "1",
            "--train-limit",
            "32",
        ])
        .args([
            "--test-limit",
            "16",
            "--batch-size",
            "16",
            "--plain",
            "--out",
        ])
        .arg(&dir)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let own = [
        "no --data given",
        "training ",
        "epoch ",
        "stopped at --steps",
    ];
    for line in err.lines() {
        assert!(
            own.iter().any(|p| line.starts_with(p)),
            "a line that is not wgqat's: {line:?}"
        );
    }
}

#[test]
fn unknown_adapter_and_backend_are_one_line_errors() {
    for args in [
        &["info", "--adapter", "no-such-gpu"][..],
        &["info", "--backend", "cuda"][..],
    ] {
        let out = wgqat(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            line.contains("no-such-gpu") || line.contains("cuda"),
            "{line}"
        );
    }
}

/// A WGQAT_COOP value wgqat does not know stops it with a line that names the setting and its
/// values, rather than quietly choosing a path.
#[test]
fn an_unknown_wgqat_coop_value_is_a_one_line_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .arg("info")
        .env("WGQAT_COOP", "forward,backward")
        .output()
        .expect("run wgqat");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("WGQAT_COOP=forward,backward") && line.contains("grad-weight"),
        "{line}"
    );
}

/// A reader that stops early (`wgqat selftest | head -3`) ends wgqat without a panic message.
#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args(["selftest", "--filter", "quant"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wgqat");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("selftest on"), "{first}");
    // The pipe is closed here, with most of the table still to come.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn selftest_runs_the_cases_and_reports_json() {
    let out = wgqat(&["selftest", "--filter", "relu", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failed"], 0);
    assert!(v["passed"].as_u64().unwrap() >= 5);
    assert!(v["cases"][0]["outputs"][0][1]["max_abs"].is_number());
    // Side by side, the same cases in the same order; 0 jobs is refused.
    let out = wgqat(&["selftest", "--filter", "relu", "--json", "--jobs", "3"]);
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{} {} {}", c["kernel"], c["direction"], c["shape"]))
            .collect()
    };
    assert!(out.status.success() && w["failed"] == 0);
    assert_eq!(names(&v), names(&w));
    let out = wgqat(&["selftest", "--jobs", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jobs"));
}

/// A file for a test's output, in a fresh folder of the system's temporary one.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wgqat-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `--out`'s file holds the report printed at the end (it is rewritten after every row, so a run
/// stopped early leaves the rows it finished).
fn assert_report_file_matches(path: &std::path::Path, printed: &serde_json::Value) {
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(&written, printed);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn bench_kernels_prints_rows_with_times() {
    let file = scratch("kernels.json");
    let out = wgqat(&[
        "bench",
        "kernels",
        "--model",
        "nin_gc",
        "--batch",
        "1",
        "--repeat",
        "1",
        "--json",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_report_file_matches(&file, &v);
    let rows = v["kernels"].as_array().unwrap();
    // 9 convs: forward and grad-weight each, grad-input for 8; for the 8 quantized ones the
    // three `+bn` GEMMs, the BatchNorm backward as a pass and 4 quantizer rows.
    assert_eq!(rows.len(), 9 * 2 + 8 + 8 * 3 + 8 + 8 * 4);
    assert_eq!(
        rows.iter()
            .filter(|r| r["kernel"] == "batchnorm" && r["direction"] == "backward_apply")
            .count(),
        8
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r["direction"].as_str().unwrap().ends_with("+bn"))
            .count(),
        8 * 3
    );
    assert!(
        rows.iter().all(|r| r["seconds"].as_f64().unwrap() > 0.0),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r["gflops"].as_f64().unwrap_or(0.0) > 0.0)
    );
    // Each row says what ran: the GEMMs their tiles and grids, and model.1's 32x32 images
    // take vec4 stores.
    let launches = |r: &serde_json::Value| -> Vec<String> {
        r["launches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect()
    };
    assert!(rows.iter().all(|r| !launches(r).is_empty()), "{rows:?}");
    for r in rows.iter().filter(|r| r["kernel"] == "conv2d") {
        let first = &launches(r)[0];
        assert!(
            first.contains(" tile ") && first.contains(" grid ["),
            "{first}"
        );
    }
    let forward = rows
        .iter()
        .find(|r| r["layer"] == "model.1.conv" && r["direction"] == "forward")
        .unwrap();
    assert!(launches(forward)[0].contains("vec4 out"), "{forward}");
}

#[test]
fn training_bench_shows_one_submit_and_no_allocations_per_step() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ci_nin.json");
    let file = scratch("training.json");
    let out = wgqat(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--bits",
        "8,32",
        "--batch",
        "8",
        "--warmup",
        "2",
        "--steps",
        "3",
        "--tune-kernels",
        "--json",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_report_file_matches(&file, &v);
    let rows = v["training"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows[0]["pipelines_compiled"].as_u64().unwrap() > 10,
        "{}",
        rows[0]
    );
    for r in rows {
        assert_eq!(r["submits_per_step"], 1.0, "{r}");
        assert_eq!(r["allocations_per_step"], 0.0, "{r}");
        assert!(r["img_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0);
        // At least a forward, a grad-input or grad-weight and an optimizer pass per layer, and
        // more bytes than the input batch (8 images of 3x32x32 f32).
        assert!(r["dispatches_per_step"].as_u64().unwrap() > 10, "{r}");
        assert!(r["memory_bound_bytes_per_step"].as_u64().unwrap() > 8 * 3 * 32 * 32 * 4);
        // The wait for the first step (network, pipelines, the step itself) is reported, and
        // the pipelines compiled for it (the first row compiles; the second shares some).
        assert!(r["first_step_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["pipelines_compiled"].as_u64().is_some(), "{r}");
        let kernels = r["kernels"].as_array().unwrap();
        assert!(kernels.iter().any(|k| k["kernel"] == "conv2d.forward"));
        // Memory-bound kernels carry their bytes per step and the bandwidth made, the GEMMs
        // neither, and their bytes add up to the step's.
        let bytes: u64 = kernels
            .iter()
            .filter_map(|k| k["memory_bound_bytes"].as_u64())
            .sum();
        assert_eq!(
            bytes,
            r["memory_bound_bytes_per_step"].as_u64().unwrap(),
            "{r}"
        );
        for k in kernels {
            let name = k["kernel"].as_str().unwrap();
            let gemm = name.starts_with("conv2d") || name.starts_with("conv_coop");
            assert_eq!(k["memory_bound_bytes"].is_null(), gemm, "{k}");
            assert_eq!(k["gb_per_s"].is_null(), gemm, "{k}");
        }
        // The step's GEMMs by layer and direction: ci_nin's three convs (the first has no
        // grad-input).
        let gemms: Vec<String> = r["gemms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                assert!(g["ms"].as_f64().unwrap() >= 0.0, "{g}");
                format!(
                    "{} {}",
                    g["layer"].as_str().unwrap(),
                    g["direction"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(gemms.len(), 8, "{gemms:?}");
        for layer in ["model.0.conv", "model.2.conv", "model.3.conv"] {
            assert!(gemms.contains(&format!("{layer} forward")), "{gemms:?}");
            assert!(gemms.contains(&format!("{layer} grad_weight")), "{gemms:?}");
        }
        // `--tune-kernels` tunes where the adapter has cooperative matrices (the quantized
        // row: 2 quantized convs, 3 GEMMs each), and has nothing to tune elsewhere.
        let quantized = r["w_bits"] == 8;
        if v["cooperative_matrices"] == "none" || !quantized {
            assert!(r["tuning"].is_null(), "{r}");
        } else {
            assert_eq!(r["tuning"]["gemms"].as_array().unwrap().len(), 6, "{r}");
        }
    }
}

#[test]
fn the_model_files_for_the_pytorch_tools_match_the_built_in_models() {
    for name in ["nin_gc", "nin", "resnet18"] {
        let out = wgqat(&["model", name]);
        assert!(out.status.success());
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tools/models/{name}.json"));
        let committed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            committed, built,
            "tools/models/{name}.json is stale: regenerate it with `wgqat model {name}`"
        );
    }
}

/// `tools/gpu_check.sh` is the one prepared run for a lent GPU machine, which comes in short
/// windows: its parts' time limits add up to at most 6 minutes, and every wgqat command in it
/// uses options that command has (a typo there would cost a whole window).
#[test]
fn the_gpu_script_fits_six_minutes_and_uses_real_options() {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/gpu_check.sh"),
    )
    .unwrap();
    let parts: Vec<Vec<&str>> = script
        .lines()
        .filter(|l| l.starts_with("part "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(parts.len() >= 8, "{parts:?}");
    let total: u32 = parts.iter().map(|p| p[2].parse::<u32>().unwrap()).sum();
    assert!(total <= 360, "the parts' limits add up to {total} s");
    for p in &parts {
        let Some(at) = p.iter().position(|w| *w == "\"$W\"") else {
            continue;
        };
        // The subcommand (and `kernels` after `bench`), then the options.
        let words: Vec<&str> = p[at + 1..].to_vec();
        let sub: Vec<&str> = words
            .iter()
            .take_while(|w| !w.starts_with("--"))
            .take(2)
            .copied()
            .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        let mut help_args = sub.clone();
        help_args.push("--help");
        let help = wgqat(&help_args);
        assert!(help.status.success(), "{help_args:?}");
        let help = String::from_utf8_lossy(&help.stdout);
        for opt in words.iter().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(&format!("{opt} ")) || help.contains(&format!("{opt}\n")),
                "`wgqat {}` has no {opt} (tools/gpu_check.sh part {})",
                sub.join(" "),
                p[1]
            );
        }
    }
}
