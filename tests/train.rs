//! Training end to end on lavapipe with a CI-sized NIN (tests/fixtures/ci_nin.json) on the
//! built-in synthetic data: it learns, its run folder is complete, and resuming reproduces an
//! uninterrupted run exactly.
mod common;

use std::path::{Path, PathBuf};
use wgqat::nn::checkpoint::read;
use wgqat::train::progress::Display;
use wgqat::train::trainer::{MetricsLine, read_lines};
use wgqat::train::{Stopped, TrainConfig, TrainOptions, train};

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ci_nin.json")
        .to_string_lossy()
        .into_owned()
}

fn small(train_images: usize, test_images: usize, epochs: u32) -> TrainConfig {
    TrainConfig {
        model: model(),
        synthetic_train: train_images,
        synthetic_test: test_images,
        batch_size: 32,
        eval_batch_size: 100,
        epochs,
        log_every: 5,
        ..TrainConfig::default()
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgqat-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(cfg: TrainConfig, out: &Path, resume: bool) -> wgqat::train::Summary {
    train(
        common::gpu(),
        TrainOptions {
            config: cfg,
            out: out.to_path_buf(),
            resume,
            display: Display::Quiet,
            wording: str::to_owned,
            stop: None,
        },
    )
    .unwrap()
}

/// Metrics lines without the wall-clock speed.
fn metrics(dir: &Path) -> Vec<MetricsLine> {
    read_lines(&dir.join("metrics.jsonl"))
        .into_iter()
        .map(|m| MetricsLine {
            img_per_s: None,
            ..m
        })
        .collect()
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let (mut t, _) = read(path).unwrap();
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t.into_iter()
        .map(|n| {
            let bytes = match n.data {
                wgqat::nn::checkpoint::Data::F32(v) => bytemuck::cast_slice(&v).to_vec(),
                wgqat::nn::checkpoint::Data::I64(v) => bytemuck::cast_slice(&v).to_vec(),
                wgqat::nn::checkpoint::Data::U8(v) => v,
            };
            (n.name, n.shape, bytes)
        })
        .collect()
}

#[test]
fn a_tiny_nin_learns_the_synthetic_data() {
    let dir = tmp("learn");
    let cfg = TrainConfig {
        augment: false,
        log_every: 50,
        ..small(1600, 400, 3)
    };
    let s = run(cfg, &dir, false);
    let (loss, acc) = s.last_eval.unwrap();
    let evals: Vec<MetricsLine> = metrics(&dir)
        .into_iter()
        .filter(|m| m.kind == "eval")
        .collect();
    println!(
        "test accuracy per epoch: {:?}",
        evals.iter().map(|m| m.acc).collect::<Vec<_>>()
    );
    assert_eq!(s.global_step, 150);
    // Chance is 10%; after 150 steps the W8A8 net is clearly past it, and test loss is falling.
    assert!(acc >= 18.0, "test accuracy {acc}% after 150 steps");
    assert!(loss < evals[0].loss, "test loss did not fall: {evals:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small JSON ResNet (an identity and a strided 1x1-conv shortcut) learns too, and a resume
/// mid-run reproduces the uninterrupted run bit for bit (the two-path gradient sums in a fixed
/// order).
#[test]
fn a_tiny_resnet_learns_and_resumes_bit_for_bit() {
    let dir = tmp("resnet");
    let resnet = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/models/tiny_resnet.json")
        .to_string_lossy()
        .into_owned();
    let cfg = TrainConfig {
        model: resnet,
        augment: false,
        log_every: 25,
        ..small(800, 200, 3)
    };
    let s = run(cfg.clone(), &dir, false);
    let evals: Vec<MetricsLine> = metrics(&dir)
        .into_iter()
        .filter(|m| m.kind == "eval")
        .collect();
    let train_loss: Vec<f64> = metrics(&dir)
        .into_iter()
        .filter(|m| m.kind == "train")
        .map(|m| m.loss)
        .collect();
    println!(
        "tiny_resnet: train loss {train_loss:?}, test accuracy per epoch {:?}",
        evals.iter().map(|m| m.acc).collect::<Vec<_>>()
    );
    assert_eq!(s.global_step, 75);
    assert!(
        train_loss.last() < train_loss.first(),
        "training loss did not fall: {train_loss:?}"
    );
    assert!(
        evals.last().unwrap().loss < evals[0].loss,
        "test loss did not fall: {evals:?}"
    );
    // Stopped after 40 steps (mid-epoch 2), then resumed: the same final weights.
    let part = tmp("resnet-part");
    let stop = TrainConfig {
        steps: Some(40),
        ..cfg.clone()
    };
    run(stop, &part, false);
    run(cfg, &part, true);
    assert!(
        tensors(&dir.join("last.safetensors")) == tensors(&part.join("last.safetensors")),
        "resumed weights differ"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&part).unwrap();
}

/// IAO (asymmetric, per-layer weights, moving-average weight observers, BatchNorms folded) on
/// the small ResNet: it learns, its checkpoint holds micronet's quantizer and fold keys, and a
/// resume mid-run reproduces the uninterrupted run bit for bit: the observers' ranges and the
/// folds' running statistics travel in the checkpoint and whether each was ever set in the
/// resume file, and QuantAdd's observers, which also move during each epoch's evaluation, are
/// saved after it.
#[test]
fn an_iao_resnet_learns_and_resumes_bit_for_bit() {
    use wgqat::quant::{Observer, QLevel, QType, SchemeName};
    let dir = tmp("iao");
    let resnet = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/models/tiny_resnet.json")
        .to_string_lossy()
        .into_owned();
    let cfg = TrainConfig {
        model: resnet,
        augment: false,
        log_every: 25,
        scheme: SchemeName::Iao,
        q_type: QType::Asymmetric,
        q_level: QLevel::Layer,
        weight_observer: Observer::MovingAverage,
        bn_fuse: true,
        ..small(800, 200, 3)
    };
    let s = run(cfg.clone(), &dir, false);
    assert_eq!(s.global_step, 75);
    let train_loss: Vec<f64> = metrics(&dir)
        .into_iter()
        .filter(|m| m.kind == "train")
        .map(|m| m.loss)
        .collect();
    println!("IAO tiny_resnet: train loss {train_loss:?}");
    assert!(
        train_loss.last() < train_loss.first(),
        "training loss did not fall: {train_loss:?}"
    );
    let names: Vec<String> = tensors(&dir.join("last.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    for key in [
        "conv1.0.activation_quantizer.scale",
        "conv1.0.weight_quantizer.observer.max_val",
        "conv2_x.0.add.observer_res.min_val",
        "conv2_x.0.add.activation_quantizer.zero_point",
        "fc.weight_quantizer.quant_max_val",
        "conv1.0.gamma",
        "conv2_x.0.residual_function.3.running_var",
    ] {
        assert!(names.iter().any(|n| n == key), "no {key} in {names:?}");
    }
    let part = tmp("iao-part");
    let stop = TrainConfig {
        steps: Some(40),
        ..cfg.clone()
    };
    run(stop, &part, false);
    run(cfg, &part, true);
    assert!(
        tensors(&dir.join("last.safetensors")) == tensors(&part.join("last.safetensors")),
        "resumed weights or quantizer states differ"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&part).unwrap();
}

#[test]
fn the_run_folder_holds_config_metrics_checkpoints_and_curves() {
    let dir = tmp("folder");
    let s = run(small(96, 50, 2), &dir, false);
    assert_eq!(s.stopped, Stopped::Finished);
    for f in [
        "config.json",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "resume.safetensors",
        "curves.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let lines = read_lines(&dir.join("metrics.jsonl"));
    assert!(
        lines
            .iter()
            .any(|m| m.kind == "train" && m.img_per_s.is_some_and(|v| v > 0.0))
    );
    assert_eq!(lines.iter().filter(|m| m.kind == "eval").count(), 2);
    // Every line has the documented fields.
    for raw in std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(raw).unwrap();
        for k in ["kind", "epoch", "step", "loss", "acc", "lr"] {
            assert!(v.get(k).is_some(), "{k} missing in {raw}");
        }
    }
    // The checkpoint holds micronet's names, with num_batches_tracked counting the steps.
    let (t, _) = read(&dir.join("last.safetensors")).unwrap();
    let tracked = t
        .iter()
        .find(|n| n.name == "model.0.bn.num_batches_tracked")
        .unwrap();
    assert_eq!(
        tracked.data,
        wgqat::nn::checkpoint::Data::I64(vec![s.global_step as i64])
    );
    assert!(
        t.iter()
            .any(|n| n.name == "model.2.conv.weight" && n.shape == vec![16, 8, 3, 3])
    );
    // The config in the folder is what ran.
    let saved: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved.model, model());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_after_an_epoch_reproduces_an_uninterrupted_run() {
    let (a, b) = (tmp("straight"), tmp("resumed"));
    run(small(96, 50, 2), &a, false);
    run(small(96, 50, 1), &b, false);
    let s = run(small(96, 50, 2), &b, true);
    assert_eq!(s.global_step, 6);
    assert_eq!(metrics(&a), metrics(&b));
    for f in ["last.safetensors", "resume.safetensors"] {
        assert!(tensors(&a.join(f)) == tensors(&b.join(f)), "{f} differs");
    }
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn a_step_limit_saves_and_resuming_mid_epoch_gives_the_same_weights() {
    let (a, b) = (tmp("straight2"), tmp("steps"));
    run(small(96, 50, 2), &a, false);
    let s = run(
        TrainConfig {
            steps: Some(2),
            ..small(96, 50, 2)
        },
        &b,
        false,
    );
    assert_eq!((s.stopped, s.global_step), (Stopped::StepLimit, 2));
    assert!(
        b.join("last.safetensors").is_file(),
        "--steps must save last.safetensors"
    );
    // Resume from the middle of epoch 1 (another --steps, then to the end).
    let s = run(
        TrainConfig {
            steps: Some(4),
            ..small(96, 50, 2)
        },
        &b,
        true,
    );
    assert_eq!(s.global_step, 4);
    let s = run(small(96, 50, 2), &b, true);
    assert_eq!((s.stopped, s.global_step), (Stopped::Finished, 6));
    assert!(tensors(&a.join("last.safetensors")) == tensors(&b.join("last.safetensors")));
    let evals = |d: &Path| {
        metrics(d)
            .into_iter()
            .filter(|m| m.kind == "eval")
            .collect::<Vec<_>>()
    };
    assert_eq!(evals(&a), evals(&b));
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
fn resume_refuses_other_settings_and_missing_state() {
    let dir = tmp("refuse");
    run(small(64, 32, 1), &dir, false);
    let other = TrainConfig {
        lr: 0.5,
        ..small(64, 32, 2)
    };
    let e = train(
        common::gpu(),
        TrainOptions {
            config: other,
            out: dir.clone(),
            resume: true,
            display: Display::Quiet,
            wording: str::to_owned,
            stop: None,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("lr") && e.contains("resume"), "{e}");
    let e = train(
        common::gpu(),
        TrainOptions {
            config: small(64, 32, 1),
            out: dir.clone(),
            resume: false,
            display: Display::Quiet,
            wording: str::to_owned,
            stop: None,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("already holds a run"), "{e}");
    let empty = tmp("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = train(
        common::gpu(),
        TrainOptions {
            config: small(64, 32, 1),
            out: empty.clone(),
            resume: true,
            display: Display::Quiet,
            wording: str::to_owned,
            stop: None,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("resume.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}
