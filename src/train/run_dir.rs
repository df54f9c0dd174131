//! The run folder on disk: the metrics file (appended line by line, repaired on resume), the
//! saved progress and resume state, and the checks that make a folder safe to write or resume.

use super::config::TrainConfig;
use super::curves::EpochPoint;
use super::optimizer::Optimizer;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::Network;
use crate::nn::checkpoint::{self, Data, Named};
use std::collections::HashMap;
use std::path::Path;

/// Where training stands; saved in `resume.safetensors`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Progress {
    /// The epoch in progress or next to run (from 1).
    pub(super) epoch: u32,
    /// Steps of `epoch` already taken.
    pub(super) step_in_epoch: u64,
    pub(super) global_step: u64,
    pub(super) best_acc: f64,
    pub(super) optimizer_t: u32,
    /// With `tune_kernels`: which GEMMs the tuning put on cooperative matrices, kept on resume
    /// (so that a resumed run is bit-identical to one that went on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) coop_uses: Option<Vec<(String, crate::nn::CoopUse)>>,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricsLine {
    /// "train" (an interval of steps) or "eval" (the test set after an epoch).
    pub kind: String,
    pub epoch: u32,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub loss: f64,
    /// Accuracy in percent.
    pub acc: f64,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub img_per_s: Option<f64>,
    /// Images the line covers.
    pub images: u64,
}

/// Creates the run folder and proves it is writable before any work is done; returns whether
/// it was created here.
pub(super) fn prepare_dir(dir: &Path, resume: bool) -> Result<bool> {
    if resume {
        if !dir.join("resume.safetensors").is_file() {
            return Err(Error::file(
                dir,
                "has no resume.safetensors or config.json: it is not a wgqat run folder (pass the folder a run was started in)",
            ));
        }
        return Ok(false);
    }
    let existed = dir.exists();
    if dir.join("resume.safetensors").exists() {
        return Err(Error::file(
            dir,
            "already holds a run: `resume` it, or choose another `out` folder",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::file(
            dir,
            format!("cannot create the run folder ({e}): choose another `out` folder"),
        )
    })?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|e| {
        Error::file(
            dir,
            format!("cannot write in the run folder ({e}): choose another `out` folder"),
        )
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(!existed)
}

pub(super) fn read_resume(dir: &Path, cfg: &TrainConfig) -> Result<(Vec<Named>, Progress)> {
    let path = dir.join("resume.safetensors");
    let (tensors, meta) = checkpoint::read(&path)?;
    let bad = |what: &str| {
        Error::file(
            &path,
            format!("{what}: the file is damaged or not written by wgqat"),
        )
    };
    let saved: TrainConfig =
        serde_json::from_str(meta.get("config").ok_or_else(|| bad("no config"))?)
            .map_err(|_| bad("unreadable config"))?;
    let diffs = cfg.differences_from(&saved);
    if !diffs.is_empty() {
        return Err(Error::Invalid(format!(
            "cannot resume {}: it was trained with other settings ({}); resume with the run's own settings (only `epochs` and `steps` may change)",
            dir.display(),
            diffs.join("; ")
        )));
    }
    let progress: Progress =
        serde_json::from_str(meta.get("progress").ok_or_else(|| bad("no progress"))?)
            .map_err(|_| bad("unreadable progress"))?;
    Ok((tensors, progress))
}

/// The resume file's record of which IAO observers have seen data (not a state-dict key).
pub(super) const IAO_OBSERVED: &str = "wgqat.iao_observed";

pub(super) fn restore(
    gpu: &Gpu,
    net: &mut Network,
    opt: &mut Optimizer,
    dir: &Path,
    tensors: Vec<Named>,
) -> Result<()> {
    let path = dir.join("resume.safetensors");
    let (mut m, mut v) = (HashMap::new(), HashMap::new());
    let mut model = Vec::new();
    let mut observed = None;
    for t in tensors {
        if t.name == IAO_OBSERVED {
            observed = t.f32s().map(<[f32]>::to_vec);
        } else if let Some(n) = t.name.strip_prefix("optimizer.m.") {
            m.insert(n.to_string(), t);
        } else if let Some(n) = t.name.strip_prefix("optimizer.v.") {
            v.insert(n.to_string(), t);
        } else {
            model.push(t);
        }
    }
    net.load_named(gpu, &path, model)?;
    // The observers go on as they were (a load alone would have them start afresh).
    if let Some(flags) = observed {
        net.set_iao_observed(gpu, &flags)?;
    }
    let take = |map: &mut HashMap<String, Named>| -> Result<Vec<Vec<f32>>> {
        net.params
            .entries()
            .iter()
            .map(|e| match map.remove(&e.name) {
                Some(Named {
                    data: Data::F32(d),
                    shape,
                    ..
                }) if shape == e.shape => Ok(d),
                _ => Err(Error::file(
                    &path,
                    format!("optimizer state for {} is missing or misshapen", e.name),
                )),
            })
            .collect()
    };
    let (mv, vv) = (take(&mut m)?, take(&mut v)?);
    gpu.write(&opt.m, &net.params.pack(&mv))?;
    gpu.write(&opt.v, &net.params.pack(&vv))
}

/// Temporary files of writes a killed process never finished (`.NAME.tmp-PID`): the real files
/// are intact (writes are renamed into place), so these are only litter.
pub(super) fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Keeps the lines of `metrics.jsonl` up to `global_step` (a torn last line, or lines written
/// after the state being resumed, are dropped) and returns the per-epoch history they hold.
pub(super) fn repair_metrics(dir: &Path, global_step: u64) -> Result<Vec<EpochPoint>> {
    let path = dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let lines: Vec<(String, MetricsLine)> = text
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<MetricsLine>(l)
                .ok()
                .map(|m| (l.to_string(), m))
        })
        .filter(|(_, m)| m.step <= global_step)
        .collect();
    let mut kept = String::new();
    for (l, _) in &lines {
        kept.push_str(l);
        kept.push('\n');
    }
    if kept != text {
        crate::util::atomic_write(&path, kept.as_bytes())?;
    }
    Ok(history(
        &lines.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
    ))
}

/// Per-epoch points from metrics lines: train loss/acc weighted by images, test from eval lines.
pub fn history(lines: &[MetricsLine]) -> Vec<EpochPoint> {
    let mut out: Vec<EpochPoint> = Vec::new();
    let mut acc: HashMap<u32, (f64, f64, f64)> = HashMap::new();
    for m in lines {
        match m.kind.as_str() {
            "train" => {
                let e = acc.entry(m.epoch).or_default();
                e.0 += m.loss * m.images as f64;
                e.1 += m.acc * m.images as f64;
                e.2 += m.images as f64;
            }
            "eval" => {
                let (l, a, n) = acc.get(&m.epoch).copied().unwrap_or_default();
                out.push(EpochPoint {
                    epoch: m.epoch,
                    train_loss: if n > 0.0 { l / n } else { f64::NAN },
                    train_acc: if n > 0.0 { a / n } else { f64::NAN },
                    test_loss: m.loss,
                    test_acc: m.acc,
                });
            }
            _ => {}
        }
    }
    out
}

/// Parsed lines of a metrics file (unreadable lines skipped).
pub fn read_lines(path: &Path) -> Vec<MetricsLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
