//! The rust-version the package declares is true of the locked tree: no crate in Cargo.lock asks
//! for a newer toolchain. Each locked crate's manifest is read from cargo's registry sources on
//! this machine (no network). Crates only other platforms build are unpacked there once something
//! has read their manifests (`cargo metadata`, which .ci/run runs first);
//! with WGQAT_MSRV_ALL_SOURCES=1 (as CI sets it) a crate whose manifest is missing is an error,
//! otherwise it is listed and skipped.

use std::path::{Path, PathBuf};

fn version(v: &str) -> (u32, u32, u32) {
    let mut p = v.trim().split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (
        p.next().unwrap_or(0),
        p.next().unwrap_or(0),
        p.next().unwrap_or(0),
    )
}

/// (name, version) of every registry crate in Cargo.lock.
fn locked() -> Vec<(String, String)> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"))
        .expect("read Cargo.lock");
    let mut out = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.trim().strip_prefix('='))
                    .map(|r| r.trim().trim_matches('"').to_string())
            })
        };
        let (Some(name), Some(ver), Some(source)) =
            (field("name "), field("version "), field("source "))
        else {
            continue;
        };
        if source.starts_with("registry+") {
            out.push((name, ver));
        }
    }
    out
}

/// The `rust-version` in the `[package]` table of a manifest.
fn rust_version(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(r) = line.strip_prefix("rust-version") {
                return Some(
                    r.trim()
                        .trim_start_matches('=')
                        .trim()
                        .trim_matches('"')
                        .into(),
                );
            }
        }
    }
    None
}

fn registry_sources() -> Vec<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    std::fs::read_dir(home.join("registry/src"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn no_locked_crate_needs_a_newer_toolchain_than_the_package_declares() {
    let ours = env!("CARGO_PKG_RUST_VERSION");
    assert!(!ours.is_empty(), "Cargo.toml declares no rust-version");
    let sources = registry_sources();
    let (mut newer, mut missing, mut checked) = (Vec::new(), Vec::new(), 0);
    for (name, ver) in locked() {
        let manifest = sources
            .iter()
            .map(|s| s.join(format!("{name}-{ver}/Cargo.toml")))
            .find(|p| p.is_file());
        let Some(manifest) = manifest else {
            missing.push(format!("{name} {ver}"));
            continue;
        };
        checked += 1;
        let text = std::fs::read_to_string(&manifest).unwrap();
        if let Some(r) = rust_version(&text) {
            if version(&r) > version(ours) {
                newer.push(format!("{name} {ver} (rust-version {r})"));
            }
        }
    }
    println!(
        "{checked} locked crates checked against rust-version {ours}; {} not unpacked here",
        missing.len()
    );
    assert!(
        newer.is_empty(),
        "locked crates need a newer toolchain than rust-version {ours}: {}; pick versions that fit (cargo update, which .cargo/config.toml keeps within rust-version) or raise rust-version in Cargo.toml and the README",
        newer.join(", ")
    );
    if std::env::var_os("WGQAT_MSRV_ALL_SOURCES").is_some() {
        assert!(
            missing.is_empty(),
            "no manifest unpacked for {} (run `cargo metadata --format-version 1 --locked` first)",
            missing.join(", ")
        );
    } else if !missing.is_empty() {
        println!(
            "skipped (only other platforms build them): {}",
            missing.join(", ")
        );
    }
}

#[test]
fn the_manifest_reader_finds_rust_version_in_the_package_table_only() {
    let m = "[package]\nname = \"x\"\nrust-version = \"1.90\"\n[dependencies]\n";
    assert_eq!(rust_version(m).as_deref(), Some("1.90"));
    assert_eq!(
        rust_version("[workspace.package]\nrust-version = \"1.99\"\n"),
        None
    );
    assert!(version("1.90") > version("1.87.0"));
    assert_eq!(version("1.87"), version("1.87.0"));
}
