//! The benchmark harness comparing the engine with its anchors.
//!
//! Not built yet: this crate is filled by issue 5. It exists now only so the workspace has its
//! fixed layout; it exports nothing. The look-behind buffer's criterion benches live in `lbb`.
