//! What training shows: a progress bar with step, loss, img/s and ETA on a terminal, plain log
//! lines otherwise, or nothing.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// A bar when stderr is a terminal, else plain lines.
    Auto,
    Plain,
    Quiet,
}

pub struct Reporter {
    mode: Display,
    /// How the settings that notices name (`` `lr` ``) are worded (the binary: as flags).
    wording: fn(&str) -> String,
    bar: Option<ProgressBar>,
    /// The (epoch, step) of the last plain training line, so a position is printed once.
    last_plain: std::cell::Cell<Option<(u32, u64)>>,
}

impl Reporter {
    pub fn new(display: Display, wording: fn(&str) -> String) -> Reporter {
        let mode = match display {
            Display::Auto if !std::io::stderr().is_terminal() => Display::Plain,
            d => d,
        };
        Reporter {
            mode,
            wording,
            bar: None,
            last_plain: std::cell::Cell::new(None),
        }
    }

    /// Starts the bar of an epoch (on a terminal).
    pub fn start_epoch(&mut self, epoch: u32, epochs: u32, steps: u64, done: u64) {
        self.finish();
        if self.mode == Display::Auto {
            let bar = ProgressBar::new(steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            bar.set_position(done);
            self.bar = Some(bar);
        }
    }

    /// Seconds between interim updates on slow devices: a bar refreshes often, log lines rarely.
    pub fn refresh_seconds(&self) -> f64 {
        match self.mode {
            Display::Auto => 5.0,
            Display::Plain => 30.0,
            Display::Quiet => f64::INFINITY,
        }
    }

    pub fn step(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// Training metrics of the last interval.
    #[allow(clippy::too_many_arguments)]
    pub fn train(
        &self,
        epoch: u32,
        step: u64,
        steps: u64,
        loss: f64,
        acc: f64,
        lr: f64,
        img_s: f64,
    ) {
        let msg = format!("loss {loss:.4} acc {acc:.2}% lr {lr:.2e} {img_s:.0} img/s");
        match (&self.bar, self.mode) {
            (Some(b), _) => b.set_message(msg),
            (None, Display::Plain)
                if self.last_plain.replace(Some((epoch, step))) != Some((epoch, step)) =>
            {
                eprintln!("epoch {epoch} step {step}/{steps} {msg}")
            }
            _ => {}
        }
    }

    /// A line that stays visible (evaluation, notices).
    pub fn line(&self, text: &str) {
        let text = &(self.wording)(text);
        match (&self.bar, self.mode) {
            (Some(b), _) => b.println(text),
            (None, Display::Quiet) => {}
            (None, _) => eprintln!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
