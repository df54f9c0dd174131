//! Models on the GPU: parameter arenas, the network with its per-batch-size plans, and
//! checkpoints with micronet's state-dict names.

pub mod checkpoint;
pub mod init;
pub mod network;
pub mod params;

pub use network::{CoopUse, Diagnosis, GemmDirection, Mode, Network, Plan, PlanGemm};
