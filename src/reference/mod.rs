//! Plain-Rust CPU references of every kernel, accumulating in f64: the oracle for tests and for
//! `wgqat selftest`. They favour obviousness over speed.

pub mod compare;
pub mod conv2d;
pub mod conv_transpose2d;
pub mod elementwise;
pub mod iao;
pub mod intinfer;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod quant;
pub mod reduce;

pub use compare::{Report, Tolerance, compare};
