//! `wgqat train` and `wgqat eval` as a user runs them: a CIFAR-10-format folder end to end, and
//! bad input, each a one-line error naming the problem, a non-zero exit and no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn wgqat(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args(args)
        .output()
        .expect("run wgqat")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgqat-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ci_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ci_nin.json")
        .to_string_lossy()
        .into_owned()
}

/// A CIFAR-10 binary folder with small synthetic sets.
fn cifar_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    let (train, test) = wgqat::data::synthetic::train_test(3, 64, 40);
    std::fs::write(d.join("data_batch_1.bin"), train.to_records()).unwrap();
    std::fs::write(d.join("test_batch.bin"), test.to_records()).unwrap();
    d
}

/// Asserts failure with wgqat's one-line error containing every `needle`.
fn fails_with(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    for n in needles {
        assert!(line.contains(n), "{n:?} not in {line:?}");
    }
}

#[test]
fn trains_and_evaluates_a_cifar_folder_and_writes_predictions() {
    let data = cifar_dir("ok");
    let out = data.join("run");
    let o = wgqat(&[
        "train",
        "--model",
        &ci_model(),
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--eval-batch-size",
        "32",
        "--out",
        out.to_str().unwrap(),
        "--plain",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("epoch 1: test loss"), "{err}");
    let preds = data.join("preds.txt");
    let o = wgqat(&[
        "eval",
        "--checkpoint",
        out.join("last.safetensors").to_str().unwrap(),
        "--model",
        &ci_model(),
        "--data",
        data.to_str().unwrap(),
        "--predictions",
        preds.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["images"], 40);
    // eval agrees with the trainer's own evaluation after the epoch.
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|m: &serde_json::Value| m["kind"] == "eval")
        .collect();
    assert!((v["acc"].as_f64().unwrap() - evals[0]["acc"].as_f64().unwrap()).abs() < 1e-9);
    let lines: Vec<u32> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(lines.len(), 40);
    assert!(lines.iter().all(|&l| l < 10));
    std::fs::remove_dir_all(&data).unwrap();
}

/// IAO from the command line: `--scheme iao` trains, `eval` takes the scheme from the
/// checkpoint and reproduces the trainer's evaluation, `export` and `infer` give eval's
/// predictions, a DoReFa checkpoint initialises an IAO run, and what IAO cannot mean (a
/// quantized first layer, another bit width than the checkpoint's) is a one-line error.
#[test]
fn iao_trains_evaluates_and_refuses_what_it_cannot_do() {
    let data = cifar_dir("iao");
    let model = ci_model();
    let run = |dir: &str, extra: &[&str]| {
        let out = data.join(dir);
        let mut args = vec![
            "train",
            "--model",
            &model,
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--eval-batch-size",
            "32",
            "--plain",
        ];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        (wgqat(&args.iter().map(|s| &**s).collect::<Vec<_>>()), out)
    };
    let (o, iao) = run("iao", &["--scheme", "iao", "--q-type", "asymmetric"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("IAO W8A8 asymmetric, per-channel"), "{err}");
    let ckpt = iao.join("last.safetensors");
    let o = wgqat(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--model",
        &ci_model(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["scheme"]["scheme"], "iao");
    assert_eq!(v["scheme"]["q_type"], "asymmetric");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(iao.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|m: &serde_json::Value| m["kind"] == "eval")
        .collect();
    let (l, l0) = (
        v["loss"].as_f64().unwrap(),
        evals[0]["loss"].as_f64().unwrap(),
    );
    assert!((l - l0).abs() < 1e-6, "eval loss {l} vs the trainer's {l0}");
    assert_eq!(
        v["acc"].as_f64(),
        evals[0]["acc"].as_f64(),
        "eval vs trainer"
    );
    // Another bit width than the checkpoint's quantizers were made for.
    fails_with(
        &wgqat(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--model",
            &ci_model(),
            "--data",
            data.to_str().unwrap(),
            "--a-bits",
            "4",
        ]),
        &["quant_max_val", "other bits"],
    );
    // The integer model: its predictions are eval's.
    let int = data.join("iao.int.safetensors");
    let o = wgqat(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--model",
        &ci_model(),
        "--out",
        int.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (pe, pi) = (data.join("eval.txt"), data.join("infer.txt"));
    for args in [
        vec![
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--model",
            &model,
        ],
        vec!["infer", "--model", int.to_str().unwrap()],
    ] {
        let out = if args[0] == "eval" { &pe } else { &pi };
        let mut args = args.clone();
        args.extend([
            "--data",
            data.to_str().unwrap(),
            "--predictions",
            out.to_str().unwrap(),
        ]);
        let o = wgqat(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // The int32 bias rounds the conv bias to accumulator units (spec §5.2), so an image whose
    // two best logits are that close may be classified differently (4 of 1,500 images of three
    // trained tiny_nin, 0 of 500 of a tiny_resnet, measured on 2026-12-06).
    let (e, i) = (
        std::fs::read_to_string(&pe).unwrap(),
        std::fs::read_to_string(&pi).unwrap(),
    );
    let differ = e.lines().zip(i.lines()).filter(|(a, b)| a != b).count();
    let n = e.lines().count();
    assert!(n > 0 && n == i.lines().count());
    assert!(
        differ * 50 <= n,
        "integer and fake-quant predictions differ for {differ} of {n} images"
    );
    let (o, _) = run("first", &["--scheme", "iao", "--quantize-first-layer"]);
    fails_with(&o, &["--quantize-first-layer", "IAO quantizes every layer"]);
    // A DoReFa (or float) checkpoint starts an IAO run: its quantizers start afresh.
    let (o, dorefa) = run("dorefa", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let init = dorefa.join("last.safetensors");
    let (o, _) = run(
        "init",
        &["--scheme", "iao", "--init", init.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // With the BatchNorms folded: a DoReFa checkpoint's BatchNorms start the folds, and eval
    // (running statistics) reproduces the trainer's evaluation.
    let (o, fused) = run(
        "bnfuse",
        &[
            "--scheme",
            "iao",
            "--bn-fuse",
            "--init",
            init.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = wgqat(&[
        "eval",
        "--checkpoint",
        fused.join("last.safetensors").to_str().unwrap(),
        "--model",
        &ci_model(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["scheme"]["bn_fuse"], true);
    let trained: Vec<serde_json::Value> = std::fs::read_to_string(fused.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|m: &serde_json::Value| m["kind"] == "eval")
        .collect();
    assert_eq!(
        v["acc"].as_f64(),
        trained[0]["acc"].as_f64(),
        "bn_fuse eval vs trainer"
    );
    let (o, _) = run("pretrained", &["--scheme", "iao", "--pretrained-model"]);
    fails_with(&o, &["--pretrained-model", "--bn-fuse"]);
    // PTQ of the DoReFa-trained model (its float weights; PTQ's quantizers are symmetric, so
    // the asymmetric IAO checkpoint above would not load): calibration, evaluation, checkpoints.
    let (o, ptq) = run(
        "ptq",
        &[
            "--scheme",
            "iao",
            "--ptq",
            "--ptq-batches",
            "2",
            "--percentile",
            "0.99",
            "--init",
            init.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("calibrating on 3 training batches") && err.contains("calibrated: test loss"),
        "{err}"
    );
    assert!(ptq.join("best.safetensors").exists());
    // QAFT from it: the weights move, every scale and zero point stays as the PTQ left it.
    let (o, qaft) = run(
        "qaft",
        &[
            "--scheme",
            "iao",
            "--qaft",
            "--lr",
            "1e-3",
            "--init",
            ptq.join("last.safetensors").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tensors = |p: &Path| -> std::collections::HashMap<String, Vec<f32>> {
        wgqat::nn::checkpoint::read(p)
            .unwrap()
            .0
            .into_iter()
            .filter_map(|t| t.f32s().map(|v| (t.name.clone(), v.to_vec())))
            .collect()
    };
    let (before, after) = (
        tensors(&ptq.join("last.safetensors")),
        tensors(&qaft.join("last.safetensors")),
    );
    let mut frozen = 0;
    for (name, v) in &before {
        if name.ends_with(".scale") || name.ends_with(".zero_point") {
            assert_eq!(&after[name], v, "QAFT moved {name}");
            frozen += 1;
        }
    }
    assert!(frozen >= 10, "{frozen} scales compared");
    assert_ne!(
        before["model.0.conv.weight"], after["model.0.conv.weight"],
        "QAFT trained nothing"
    );
    let (o, _) = run("ptq-no-init", &["--scheme", "iao", "--ptq"]);
    fails_with(&o, &["calibrates a trained model", "--init"]);
    let (o, _) = run("ptq-dorefa", &["--ptq"]);
    fails_with(&o, &["IAO's", "--scheme iao"]);
    std::fs::remove_dir_all(&data).unwrap();
}

/// wbwtab from the command line: binary weights and activations train with weight decay 0 (as
/// micronet's wbwtab main.py), the checkpoint keeps the float model's names with the binary
/// layers' weights centred, eval takes the scheme from it, and an all-zero output channel or
/// wbwtab's flags under another scheme are one-line errors.
#[test]
fn wbwtab_trains_and_refuses_what_it_cannot_do() {
    let data = cifar_dir("wbwtab");
    let model = ci_model();
    let out = data.join("run");
    let o = wgqat(&[
        "train",
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--eval-batch-size",
        "32",
        "--plain",
        "--scheme",
        "wbwtab",
        "--weights",
        "ternary",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("wbwtab W1.5A1"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["wd"], 0.0);
    assert_eq!(config["weights"], "ternary");
    let ckpt = out.join("last.safetensors");
    let o = wgqat(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["scheme"]["scheme"], "wbwtab");
    // The integer model (bits and a ternary XNOR conv): its predictions are eval's.
    let int = data.join("wbwtab.int.safetensors");
    let o = wgqat(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--model",
        &model,
        "--out",
        int.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // The export's own check of the folded model against the network.
    assert!(
        err.contains("on 16 random inputs the integer model predicts as the network for 16,"),
        "{err}"
    );
    let (pe, pi) = (data.join("eval.txt"), data.join("infer.txt"));
    for (mut args, out) in [
        (
            vec![
                "eval",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--model",
                &model,
            ],
            &pe,
        ),
        (vec!["infer", "--model", int.to_str().unwrap()], &pi),
    ] {
        args.extend([
            "--data",
            data.to_str().unwrap(),
            "--predictions",
            out.to_str().unwrap(),
        ]);
        let o = wgqat(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(
        std::fs::read_to_string(&pe).unwrap(),
        std::fs::read_to_string(&pi).unwrap(),
        "integer and fake-quant predictions differ"
    );
    fails_with(
        &wgqat(&[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--model",
            &model,
            "--format",
            "onnx",
            "--out",
            data.join("wbwtab.onnx").to_str().unwrap(),
        ]),
        &["no ONNX form", "--format int"],
    );
    assert!(!data.join("wbwtab.onnx").exists());
    // Zero one output channel of the ternary layer (ci_nin's middle conv).
    let (mut tensors, meta) = wgqat::nn::checkpoint::read(&ckpt).unwrap();
    let name = "model.2.conv.weight".to_string();
    for t in tensors.iter_mut().filter(|t| t.name == name) {
        let per = t.shape[1..].iter().product::<usize>();
        if let wgqat::nn::checkpoint::Data::F32(v) = &mut t.data {
            v[..per].iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let bad = data.join("zero.safetensors");
    wgqat::nn::checkpoint::write(&bad, &tensors, meta).unwrap();
    fails_with(
        &wgqat(&[
            "eval",
            "--checkpoint",
            bad.to_str().unwrap(),
            "--model",
            &model,
        ]),
        &[&name, "all-zero output channel (0)"],
    );
    fails_with(
        &wgqat(&[
            "train",
            "--model",
            &model,
            "--weights",
            "ternary",
            "--steps",
            "1",
        ]),
        &["--weights", "--scheme wbwtab"],
    );
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn missing_or_empty_data_folders_are_errors() {
    fails_with(
        &wgqat(&["train", "--data", "/no/such/folder", "--steps", "1"]),
        &["/no/such/folder", "not a folder"],
    );
    let empty = tmp("empty");
    fails_with(
        &wgqat(&["train", "--data", empty.to_str().unwrap(), "--steps", "1"]),
        &["no CIFAR-10 binary files"],
    );
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn truncated_files_and_bad_labels_are_errors_naming_the_file() {
    let data = cifar_dir("bad");
    let f = data.join("data_batch_1.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    fails_with(
        &wgqat(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            &ci_model(),
            "--steps",
            "1",
        ]),
        &["data_batch_1.bin", "3073"],
    );
    let mut bad = bytes.clone();
    bad[3073] = 12;
    std::fs::write(&f, &bad).unwrap();
    fails_with(
        &wgqat(&[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--model",
            &ci_model(),
            "--steps",
            "1",
        ]),
        &["record 1", "label 12"],
    );
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn bad_models_bits_and_batch_sizes_are_errors() {
    fails_with(
        &wgqat(&["train", "--model", "vgg16", "--steps", "1"]),
        &["unknown model", "vgg16", "resnet18"],
    );
    for b in ["1", "0", "33"] {
        fails_with(
            &wgqat(&["train", "--w-bits", b, "--steps", "1"]),
            &[b, "bits"],
        );
        fails_with(&wgqat(&["train", "--a-bits", b, "--steps", "1"]), &["bits"]);
    }
    fails_with(
        &wgqat(&["train", "--batch-size", "0", "--steps", "1"]),
        &["batch size 0"],
    );
    let dir = tmp("json");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"input": [3, 32, 32], "layers": [{"type": "conv", "out": 8, "kernel": 3, "groups": 5}]}"#).unwrap();
    fails_with(
        &wgqat(&["train", "--model", bad.to_str().unwrap(), "--steps", "1"]),
        &["layer 0", "conv", "divisible by groups"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_with_wrong_shapes_or_garbage_are_errors_naming_the_key() {
    let dir = tmp("ckpt");
    // A checkpoint of ci_nin offered to nin_gc: the first conv has the wrong shape.
    let out = dir.join("run");
    let o = wgqat(&[
        "train",
        "--model",
        &ci_model(),
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--train-limit",
        "8",
        "--test-limit",
        "8",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = out.join("last.safetensors");
    fails_with(
        &wgqat(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--model",
            "nin_gc",
            "--test-limit",
            "4",
        ]),
        &["model.0.conv.weight", "[8, 3, 3, 3]", "[256, 3, 5, 5]"],
    );
    fails_with(
        &wgqat(&["train", "--init", ckpt.to_str().unwrap(), "--steps", "1"]),
        &["model.0.conv.weight", "shape"],
    );
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a checkpoint").unwrap();
    fails_with(
        &wgqat(&[
            "eval",
            "--checkpoint",
            junk.to_str().unwrap(),
            "--model",
            &ci_model(),
        ]),
        &["junk.safetensors", "safetensors"],
    );
    let cut = dir.join("cut.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &wgqat(&[
            "eval",
            "--checkpoint",
            cut.to_str().unwrap(),
            "--model",
            &ci_model(),
        ]),
        &["cut.safetensors"],
    );
    fails_with(
        &wgqat(&[
            "eval",
            "--checkpoint",
            dir.join("none.safetensors").to_str().unwrap(),
        ]),
        &["none.safetensors"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_output_folder_that_cannot_be_written_is_an_error() {
    let dir = tmp("ro");
    let blocker = dir.join("file");
    std::fs::write(&blocker, b"x").unwrap();
    // A run folder below a regular file cannot be created.
    fails_with(
        &wgqat(&[
            "train",
            "--model",
            &ci_model(),
            "--steps",
            "1",
            "--out",
            blocker.join("run").to_str().unwrap(),
        ]),
        &["--out"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--tune-kernels` on the emulated tensor-core path: the run times each quantized conv's GEMMs
/// on both kernels, prints the table and saves the choice with its resume state; a resumed run
/// keeps that choice without timing again. Where the adapter has no cooperative matrices it
/// says so and trains on the fp32 kernels.
#[test]
fn tune_kernels_chooses_once_and_a_resumed_run_keeps_the_choice() {
    let out = tmp("tune");
    // One quantized conv (a pointwise one, reading a BatchNorm's output): few pipelines to
    // compile on the emulated path.
    let model = out.with_extension("json");
    std::fs::write(
        &model,
        r#"{"name": "tune_net", "input": [3, 32, 32], "layers": [
        {"type": "conv", "out": 8, "kernel": 3, "stride": 4, "padding": 1, "name": "model.0.conv"},
        {"type": "batchnorm", "name": "model.0.bn"}, {"type": "relu"},
        {"type": "conv", "out": 10, "kernel": 1, "name": "model.1.conv"},
        {"type": "batchnorm", "name": "model.1.bn"}, {"type": "relu"},
        {"type": "avgpool", "kernel": 8},
        {"type": "flatten"}
    ]}"#,
    )
    .unwrap();
    let model = model.to_str().unwrap();
    let run_in = |out: &Path, extra: &[&str], coop: &str| {
        let mut args = vec![
            "train",
            "--model",
            model,
            "--batch-size",
            "8",
            "--train-limit",
            "32",
            "--test-limit",
            "16",
            "--optimizer",
            "sgd",
            "--no-augment",
            "--out",
            out.to_str().unwrap(),
            "--plain",
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_wgqat"))
            .args(&args)
            .env("WGQAT_COOP", coop)
            .output()
            .expect("run wgqat");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let run = |extra: &[&str], coop: &str| run_in(&out, extra, coop);
    let saved_choice = || {
        let (_, meta) = wgqat::nn::checkpoint::read(&out.join("resume.safetensors")).unwrap();
        let progress: serde_json::Value = serde_json::from_str(&meta["progress"]).unwrap();
        progress["coop_uses"].clone()
    };
    let err = run(&["--tune-kernels", "--steps", "2"], "emulate");
    assert!(err.contains("kernel tuning (3 steps of each"), "{err}");
    // The quantized conv's three directions, each on one kernel or the other.
    for layer in ["model.1.conv"] {
        for direction in ["forward", "grad_input", "grad_weight"] {
            let line = err
                .lines()
                .find(|l| l.contains(layer) && l.contains(direction))
                .unwrap_or_else(|| panic!("no {layer} {direction} line in {err}"));
            assert!(
                line.ends_with("tensor cores") || line.ends_with("fp32"),
                "{line}"
            );
        }
    }
    let choice = saved_choice();
    let layers: Vec<&str> = choice
        .as_array()
        .expect("the choice is saved")
        .iter()
        .map(|e| e[0].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["model.1.conv"]);
    // The table is also in the run folder, its choice the saved one.
    let tuning: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("kernel_tuning.json")).unwrap())
            .unwrap();
    assert_eq!(tuning["gemms"].as_array().unwrap().len(), 3, "{tuning}");
    assert_eq!(tuning["uses"], choice, "{tuning}");
    let err = run(
        &["--resume", out.to_str().unwrap(), "--steps", "4"],
        "emulate",
    );
    assert!(!err.contains("kernel tuning"), "{err}");
    assert_eq!(saved_choice(), choice, "the resumed run kept the choice");
    // Without cooperative matrices (`WGQAT_COOP=0`) there is nothing to choose.
    let err = run_in(&tmp("tune-fp32"), &["--tune-kernels", "--steps", "1"], "0");
    assert!(
        err.contains("nothing to tune, no GEMM of this model runs on cooperative matrices"),
        "{err}"
    );
}
