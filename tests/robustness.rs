//! Robustness of `wgqat train` as a process: non-finite values, GPU faults (injected through the
//! WGQAT_INJECT_FAULT test hook), SIGKILL at many moments with resume, and bad input. Every
//! failure must be one line naming the problem, a non-zero exit, no panic, and checkpoints
//! already saved intact.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ci_nin.json")
        .to_string_lossy()
        .into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgqat-rb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small run: 10 steps per epoch of 32 images, metrics every 5 steps.
fn train_args(out: &Path, epochs: u32) -> Vec<String> {
    logged_args(out, epochs, 5)
}

fn logged_args(out: &Path, epochs: u32, log_every: u32) -> Vec<String> {
    [
        "train",
        "--model",
        &model(),
        "--train-limit",
        "320",
        "--test-limit",
        "64",
        "--batch-size",
        "32",
        "--log-every",
        &log_every.to_string(),
        "--epochs",
        &epochs.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn wgqat(args: &[String], fault: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgqat"));
    c.args(args);
    if let Some(f) = fault {
        c.env("WGQAT_INJECT_FAULT", f);
    }
    c.output().expect("run wgqat")
}

fn error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"))
        .to_string()
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let (mut t, _) = wgqat::nn::checkpoint::read(path).unwrap();
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t.into_iter()
        .map(|n| {
            let b = match n.data {
                wgqat::nn::checkpoint::Data::F32(v) => bytemuck::cast_slice(&v).to_vec(),
                wgqat::nn::checkpoint::Data::I64(v) => bytemuck::cast_slice(&v).to_vec(),
                wgqat::nn::checkpoint::Data::U8(v) => v,
            };
            (n.name, b)
        })
        .collect()
}

#[test]
fn a_nan_stops_training_naming_the_step_and_layer_and_keeps_the_checkpoint() {
    let (a, b) = (tmp("nan-ref"), tmp("nan"));
    assert!(wgqat(&train_args(&a, 1), None).status.success());
    // A NaN pixel in step 13 (epoch 2): epoch 1's checkpoint must be what an epoch-1 run saved.
    let line = error_line(&wgqat(&train_args(&b, 2), Some("nan-input@13")));
    assert!(
        line.contains("step 13") && line.contains("epoch 2") && line.contains("input batch"),
        "{line}"
    );
    assert!(tensors(&a.join("last.safetensors")) == tensors(&b.join("last.safetensors")));
    // Divergence: a huge learning rate overflows the first conv in step 2.
    let c = tmp("diverge");
    let mut args = train_args(&c, 1);
    args.extend(["--lr".into(), "1e37".into()]);
    let line = error_line(&wgqat(&args, None));
    assert!(
        line.contains("step 2") && line.contains("output of layer 0 (conv model.0.conv)"),
        "{line}"
    );
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn skip_step_undoes_a_non_finite_step_and_goes_on() {
    let d = tmp("skip");
    let mut args = train_args(&d, 1);
    args.extend(["--nan-policy".into(), "skip-step".into(), "--plain".into()]);
    args.retain(|a| a != "--quiet");
    let out = wgqat(&args, Some("nan-input@7"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("step 7 (epoch 1): loss NaN is not finite; skipping the step"),
        "{err}"
    );
    let lines = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert!(!lines.contains("NaN") && !lines.contains("null"), "{lines}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn gpu_faults_end_the_run_naming_the_kernel_and_keep_checkpoints() {
    let (a, b) = (tmp("gpu-ref"), tmp("gpu"));
    assert!(wgqat(&train_args(&a, 1), None).status.success());
    let line = error_line(&wgqat(&train_args(&b, 2), Some("validation@13")));
    assert!(
        line.contains("GPU validation error in training step, kernel relu_forward"),
        "{line}"
    );
    assert!(tensors(&a.join("last.safetensors")) == tensors(&b.join("last.safetensors")));
    // The run resumes from its last save and completes.
    let mut resume = train_args(&b, 2);
    resume.extend(["--resume".into(), b.to_str().unwrap().into()]);
    assert!(wgqat(&resume, None).status.success());
    let c = tmp("lost");
    let line = error_line(&wgqat(&train_args(&c, 2), Some("lost@13")));
    assert!(line.contains("device was lost"), "{line}");
    assert!(c.join("last.safetensors").is_file());
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Metrics lines without their img/s (the one field that depends on the machine's speed).
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("img_per_s");
            v
        })
        .collect()
}

/// The run's temporary file of `file` left by process `pid`, if any.
fn temporary(dir: &Path, file: &str, pid: u32) -> Option<PathBuf> {
    Some(dir.join(format!(".{file}.tmp-{pid}"))).filter(|p| p.is_file())
}

/// Ten kills at ten kinds of moment, each resumed as a user would (`--resume` once the run
/// folder exists), then the finished run must equal an uninterrupted one: every tensor of
/// `last.safetensors` and `best.safetensors` bit for bit, and `metrics.jsonl` line for line. Nine
/// kills are the process's own SIGKILL at a point it reports reaching (WGQAT_INJECT_FAULT=kill@..,
/// counted within each process), so they land at the same moment on any machine; the tenth is an
/// outside SIGKILL sent when the run has printed a progress line.
#[test]
fn sigkill_at_many_moments_then_resume_gives_the_uninterrupted_weights() {
    let (a, b) = (tmp("kill-ref"), tmp("kill"));
    // 3 epochs of 10 steps, a metrics line every 2 steps and a save at each.
    let args = |dir: &Path| {
        let mut v = logged_args(dir, 3, 2);
        v.extend(["--save-minutes".into(), "0".into()]);
        v
    };
    assert!(wgqat(&args(&a), None).status.success());
    let run = || {
        let mut v = args(&b);
        if b.join("config.json").is_file() {
            v.extend(["--resume".into(), b.to_str().unwrap().into()]);
        }
        v
    };
    // What each kill leaves, in order (each point counted from its process's start):
    let kills = [
        // the first step of a fresh run: nothing saved, so the resume starts over
        "kill@step:1",
        // half of the first resume state written: still nothing saved
        "kill@tmp:resume.safetensors:1",
        // the second resume state complete but not renamed: last.safetensors is newer than it
        "kill@rename:resume.safetensors:2",
        // a torn metrics line
        "kill@log:2",
        // the repair of that torn line, written but not renamed
        "kill@rename:metrics.jsonl:1",
        // between last/best.safetensors and resume.safetensors at the end of epoch 1
        "kill@save:3",
        // during the test-set evaluation
        "kill@eval:1",
        // the curves of epoch 1 written but not renamed
        "kill@rename:curves.png:1",
        // mid-epoch, the GPU on the step
        "kill@step:7",
    ];
    for kill in kills {
        let child = Command::new(env!("CARGO_BIN_EXE_wgqat"))
            .args(run())
            .env("WGQAT_INJECT_FAULT", kill)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{kill} did not kill the run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(!out.status.success(), "{kill}: the run finished");
        // The kill landed where it was meant to.
        let mut parts = kill.split(':');
        match (parts.next().unwrap(), parts.next().unwrap()) {
            ("kill@tmp" | "kill@rename", file) => assert!(
                temporary(&b, file, pid).is_some(),
                "{kill}: no temporary {file} left"
            ),
            ("kill@log", _) => {
                let text = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
                assert!(!text.ends_with('\n'), "{kill}: the last line is whole");
            }
            _ => {}
        }
    }
    // An outside SIGKILL once the run has printed its first progress line. Should the run finish
    // before the signal arrives (a machine far faster than this test expects), the final check
    // below still holds; only the kill is then missed.
    let mut v = run();
    v.retain(|a| a != "--quiet");
    v.push("--plain".into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_wgqat"))
        .args(v)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let progress = lines.find(|l| l.as_ref().is_ok_and(|l| l.starts_with("epoch ")));
    assert!(progress.is_some(), "the run printed no progress line");
    let killed = child.try_wait().unwrap().is_none() && child.kill().is_ok();
    drop(lines);
    child.wait().unwrap();
    if !killed {
        eprintln!("the outside SIGKILL came after the run had finished");
    }
    let out = wgqat(&run(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["last.safetensors", "best.safetensors"] {
        assert!(
            tensors(&a.join(f)) == tensors(&b.join(f)),
            "{f} differs after the kills"
        );
    }
    let (ma, mb) = (metrics(&a), metrics(&b));
    if let Some(i) = (0..ma.len().max(mb.len())).find(|&i| ma.get(i) != mb.get(i)) {
        panic!(
            "metrics.jsonl differs after the kills ({} vs {} lines): line {} is {:?} uninterrupted, {:?} here",
            ma.len(),
            mb.len(),
            i + 1,
            ma.get(i),
            mb.get(i)
        );
    }
    // No temporary files are left behind.
    for e in std::fs::read_dir(&b).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".tmp-"), "{n} left behind");
    }
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_batch_over_the_device_limits_names_the_limit_and_a_size_that_fits() {
    let d = tmp("big");
    // nin's first activation is 192 x 32 x 32 floats per image: 4096 images need 3 GiB.
    let out = wgqat(
        &[
            "train".into(),
            "--model".into(),
            "nin".into(),
            "--batch-size".into(),
            "4096".into(),
            "--steps".into(),
            "1".into(),
            "--out".into(),
            d.to_str().unwrap().into(),
        ],
        None,
    );
    let line = error_line(&out);
    assert!(
        line.contains("batch size 4096")
            && line.contains("max_storage_buffer_binding_size")
            && line.contains("--batch-size"),
        "{line}"
    );
    assert!(!d.exists(), "a failed start must not leave a run folder");
}

#[test]
fn checkpoints_missing_keys_or_with_other_dtypes_are_refused() {
    use wgqat::nn::checkpoint::{Data, Named, read, write};
    let d = tmp("ckpt");
    std::fs::create_dir_all(&d).unwrap();
    let run = d.join("run");
    let mut args = train_args(&run, 1);
    args.extend(["--steps".into(), "1".into()]);
    assert!(wgqat(&args, None).status.success());
    let (tensors, meta) = read(&run.join("last.safetensors")).unwrap();
    let eval = |p: &Path| {
        wgqat(
            &[
                "eval".into(),
                "--checkpoint".into(),
                p.to_str().unwrap().into(),
                "--model".into(),
                model(),
                "--test-limit".into(),
                "8".into(),
            ],
            None,
        )
    };
    let missing = d.join("missing.safetensors");
    write(
        &missing,
        &tensors
            .iter()
            .filter(|t| t.name != "model.2.bn.running_var")
            .cloned()
            .collect::<Vec<_>>(),
        meta.clone(),
    )
    .unwrap();
    let line = error_line(&eval(&missing));
    assert!(
        line.contains("has no tensor model.2.bn.running_var"),
        "{line}"
    );
    let extra = d.join("extra.safetensors");
    let mut t2 = tensors.clone();
    t2.push(Named::f32("model.9.conv.weight", &[1], vec![0.0]));
    write(&extra, &t2, meta.clone()).unwrap();
    assert!(error_line(&eval(&extra)).contains("model.9.conv.weight"));
    let int = d.join("int.safetensors");
    let t3: Vec<Named> = tensors
        .iter()
        .map(|t| match (&t.name[..], &t.data) {
            ("model.0.conv.bias", Data::F32(v)) => Named {
                data: Data::I64(v.iter().map(|&x| x as i64).collect()),
                ..t.clone()
            },
            _ => t.clone(),
        })
        .collect();
    write(&int, &t3, meta).unwrap();
    let line = error_line(&eval(&int));
    assert!(
        line.contains("model.0.conv.bias") && line.contains("I64") && line.contains("F32"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(d);
}
