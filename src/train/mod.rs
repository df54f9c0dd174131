//! Training: configuration, the optimizer state, the loop with its run folder, curves and
//! progress display, and evaluation of checkpoints.

pub mod config;
pub mod curves;
pub mod eval;
pub mod optimizer;
pub mod progress;
pub mod run_dir;
pub mod trainer;

pub use config::{NanPolicy, OptimizerName, TrainConfig};
pub use optimizer::Optimizer;
pub use trainer::{Stopped, Summary, TrainOptions, train};
