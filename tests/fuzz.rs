//! Property-based fuzzing, bounded to run in `cargo test`: the CIFAR-10 reader, the checkpoint
//! loader and the model-JSON parser get mutated and random inputs and must return a value or an
//! error, never panic. Mutations come from wgqat's seeded generator, so a failure reproduces.
mod common;

use std::path::Path;
use wgqat::models::ModelSpec;
use wgqat::nn::Network;
use wgqat::nn::checkpoint::read;
use wgqat::quant::QuantConfig;
use wgqat::rng::Rng;

/// Iterations scale with `WGQAT_FUZZ_SCALE` (default 1, bounded for CI; raise it for long runs).
fn iterations(base: usize) -> usize {
    base * std::env::var("WGQAT_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Flips, overwrites, inserts, deletes or truncates a few bytes.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let n = bytes.len().max(1) as u64;
        let at = rng.below(n) as usize;
        let last = bytes.len().saturating_sub(1);
        let byte = rng.below(256) as u8;
        let bit = 1u8 << rng.below(8);
        // Interesting values: digits, brackets, quotes, exponents, invalid UTF-8.
        let pick = [b'0', b'9', b'-', b'[', b'{', b'"', b'e', 0xff][rng.below(8) as usize];
        match rng.below(6) {
            0 if !bytes.is_empty() => bytes[at.min(last)] ^= bit,
            1 if !bytes.is_empty() => bytes[at.min(last)] = byte,
            2 => bytes.insert(at.min(bytes.len()), byte),
            3 if !bytes.is_empty() => {
                bytes.remove(at.min(last));
            }
            4 => bytes.truncate(at),
            _ if !bytes.is_empty() => bytes[at.min(last)] = pick,
            _ => {}
        }
    }
}

#[test]
fn cifar_reader_never_panics() {
    let mut rng = Rng::new(101);
    let base = wgqat::data::synthetic::generate(1, 1, 3).to_records();
    for i in 0..iterations(3000) {
        let mut b = if i % 3 == 0 {
            (0..rng.below(7000)).map(|_| rng.below(256) as u8).collect()
        } else {
            base.clone()
        };
        mutate(&mut rng, &mut b);
        let _ = wgqat::data::cifar::parse(&b, Path::new("fuzz.bin"));
    }
}

#[test]
fn model_json_parser_never_panics() {
    let mut rng = Rng::new(202);
    let seeds = [
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/tiny_nin.json")).unwrap(),
        serde_json::to_string(&wgqat::models::nin::nin_gc()).unwrap(),
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/tiny_resnet.json")).unwrap(),
        r#"{"input": [3, 8, 8], "layers": [{"type": "conv", "out": 3, "kernel": 1, "name": "a"}, {"type": "add", "inputs": ["input", "a", "a"]}, {"type": "adaptive_avgpool", "output": 2}]}"#.to_string(),
        r#"{"input": [3, 4000000000, 4000000000], "layers": [{"type": "conv", "out": 4000000000, "kernel": 3}, {"type": "flatten"}, {"type": "linear", "out": 9999999999}]}"#.to_string(),
        r#"{"input": [1, 1, 1], "layers": [{"type": "conv_transpose", "out": 2, "kernel": 99999, "stride": 99999, "output_padding": 5}]}"#.to_string(),
    ];
    for i in 0..iterations(4000) {
        let mut b = seeds[i % seeds.len()].clone().into_bytes();
        mutate(&mut rng, &mut b);
        let text = String::from_utf8(b).unwrap_or_default();
        if let Ok(spec) = ModelSpec::from_json(&text, "fuzz.json") {
            let _ = spec.param_count();
        }
    }
}

#[test]
fn checkpoint_loader_never_panics() {
    let gpu = common::gpu();
    let spec = ModelSpec::from_json(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ci_nin.json"),
        )
        .unwrap(),
        "ci_nin",
    )
    .unwrap();
    let mut net = Network::new(gpu, &spec, QuantConfig::default(), 2, false, 1).unwrap();
    wgqat::nn::init::initialise(gpu, &net, 1).unwrap();
    let dir = std::env::temp_dir().join(format!("wgqat-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.safetensors");
    net.save(gpu, &good, Default::default()).unwrap();
    let base = std::fs::read(&good).unwrap();
    let path = dir.join("fuzz.safetensors");
    let mut rng = Rng::new(303);
    let mut loaded = 0;
    for _ in 0..iterations(1500) {
        let mut b = base.clone();
        mutate(&mut rng, &mut b);
        std::fs::write(&path, &b).unwrap();
        if read(&path).is_ok() && net.load(gpu, &path).is_ok() {
            loaded += 1;
        }
    }
    // Mutations of tensor data (not the header) still load; the rest are errors.
    assert!(loaded > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
