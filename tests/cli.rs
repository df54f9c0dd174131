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
    assert!(
        v["chosen"]["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0
    );
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
}

#[test]
fn bench_kernels_prints_rows_with_times() {
    let out = wgqat(&[
        "bench", "kernels", "--model", "nin_gc", "--batch", "1", "--repeat", "1", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["kernels"].as_array().unwrap();
    // 9 convs: forward and grad-weight each, grad-input for 8; 4 quantizer rows for 8 of them.
    assert_eq!(rows.len(), 9 * 2 + 8 + 8 * 4);
    assert!(
        rows.iter().all(|r| r["seconds"].as_f64().unwrap() > 0.0),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r["gflops"].as_f64().unwrap_or(0.0) > 0.0)
    );
}
