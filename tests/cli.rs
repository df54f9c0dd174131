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
