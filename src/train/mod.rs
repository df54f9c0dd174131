//! Training: the optimizer state and (in the trainer) the loop, schedule, metrics and run folder.

pub mod optimizer;

pub use optimizer::Optimizer;
