//! The look-behind buffer (LBB) of ParallelRaft.
//!
//! PolarFS lets a replica apply committed log entries out of order: an entry whose block
//! ranges do not overlap any earlier, not-yet-applied entry may be applied at once; an
//! overlapping one waits, in index order, until its predecessors are applied. To decide this
//! while earlier entries are still *missing* (holes in the log), every entry carries the ranges
//! written by the previous `N` entries: its look-behind buffer.
//!
//! This crate is pure: no IO, no clock, no threads. It provides
//! - [`Range`] and [`RangeSet`]: byte ranges `(offset, len)` on a volume or chunk;
//! - [`LookBehind`]: the summary of the previous `N` entries carried by one entry;
//! - [`ApplyGate`]: the per-replica apply scheduler (the paper's *pending list*): it answers
//!   which committed entries may be applied now, and whether a read must wait.
//!
//! Conflicts are conservative: a predecessor whose ranges are unknown (missing and not covered by
//! any held successor's look-behind buffer) conflicts with everything.

mod gate;
mod look_behind;
mod range;

pub use gate::{ApplyGate, GateError};
pub use look_behind::LookBehind;
pub use range::{Range, RangeSet};

/// The paper's default look-behind span ("N = 2 was good enough").
pub const DEFAULT_SPAN: usize = 2;
