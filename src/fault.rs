//! The fault-injection test hook, `WGQAT_INJECT_FAULT`: tests make a run fail at a moment they
//! choose, on any machine, instead of at a moment a clock happens to give. It exists for testing
//! only; unset (the normal case) it costs one environment lookup per process.
//!
//! - `KIND@STEP` makes global training step STEP (from 1) fail: `nan-input` (a NaN pixel in its
//!   batch), `nan-weight` (a NaN in the first weight), `validation` (an invalid dispatch in its
//!   submit) or `lost` (the device destroyed before it). The trainer applies these.
//! - `kill@POINT:N` or `kill@POINT:FILE:N`: the process kills itself with SIGKILL the N-th time
//!   (from 1, counted in this process) it reaches POINT, as an outside `kill -9` landing exactly
//!   there would. POINTs ([`Point`]): `step` (a training step submitted, the GPU still on it),
//!   `eval` (the first test batch of an evaluation submitted), `log` (half of a metrics line
//!   appended: a torn line), `save` (`last.safetensors` written, `resume.safetensors` not yet),
//!   `tmp` (half of a temporary file written) and `rename` (a temporary file complete and synced,
//!   not yet renamed over its file). `tmp` and `rename` may name the file they count, e.g.
//!   `kill@rename:resume.safetensors:2`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A moment at which `kill@POINT:N` can end the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Step,
    Eval,
    Log,
    Save,
    Tmp,
    Rename,
}

impl Point {
    fn parse(s: &str) -> Option<Point> {
        Some(match s {
            "step" => Point::Step,
            "eval" => Point::Eval,
            "log" => Point::Log,
            "save" => Point::Save,
            "tmp" => Point::Tmp,
            "rename" => Point::Rename,
            _ => return None,
        })
    }
}

/// A parsed `kill@...` request and how often its point has been reached so far.
struct Kill {
    point: Point,
    file: Option<String>,
    n: u64,
    seen: AtomicU64,
}

fn spec() -> Option<String> {
    std::env::var("WGQAT_INJECT_FAULT").ok()
}

fn kill_request() -> Option<&'static Kill> {
    static KILL: OnceLock<Option<Kill>> = OnceLock::new();
    KILL.get_or_init(|| {
        let v = spec()?;
        let rest = v.strip_prefix("kill@")?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (point, file, n) = match parts[..] {
            [p, n] => (p, None, n),
            [p, f, n] => (p, Some(f.to_string()), n),
            _ => return None,
        };
        Some(Kill {
            point: Point::parse(point)?,
            file,
            n: n.parse().ok().filter(|&n| n > 0)?,
            seen: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// The step fault `KIND@STEP` (not a kill), if one is set.
pub fn step_fault() -> Option<(String, u64)> {
    let v = spec()?;
    let (kind, step) = v.split_once('@')?;
    if kind == "kill" {
        return None;
    }
    Some((kind.to_string(), step.parse().ok()?))
}

/// Counts one arrival at `point` (for `file`, where the point concerns a file) and says whether
/// this is the arrival the kill request names: the caller then leaves what it was doing in the
/// state it wants killed and calls [`die`].
pub fn due(point: Point, file: Option<&str>) -> bool {
    let Some(k) = kill_request() else {
        return false;
    };
    if k.point != point || (k.file.is_some() && k.file.as_deref() != file) {
        return false;
    }
    k.seen.fetch_add(1, Ordering::SeqCst) + 1 == k.n
}

/// Ends the process at `point` when the kill request names this arrival.
pub fn kill_point(point: Point) {
    if due(point, None) {
        die();
    }
}

/// Ends the process now, as SIGKILL from outside would: no destructor, flush or handler runs.
pub fn die() -> ! {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught, so this is reached only where there is no such signal.
    std::process::abort()
}
