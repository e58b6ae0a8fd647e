//! The benchmark harness: runs the jobs of `fio-configs/` against the engine (ParallelRaft and
//! classic Raft mode, with and without message jitter) and against the anchors (`nbdkit
//! memory`, `nbdkit file`, the local disk) in one interleaved run, then reports medians,
//! ratios and plots. `cargo run --release -p bench -- compare --help`.

pub mod fio;
pub mod host;
pub mod plot;
pub mod probe;
pub mod report;
pub mod targets;
