//! The look-behind buffer carried by one log entry.

use crate::RangeSet;

/// The ranges written by the `span` entries preceding an entry, nearest first:
/// `previous[0]` describes index `i - 1`, `previous[k]` index `i - 1 - k`.
///
/// `None` means the proposer did not know that predecessor (for example it lies below the
/// proposer's pruned log); a reader must then treat it as conflicting with everything.
/// A no-op predecessor is `Some(empty set)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LookBehind {
    previous: Vec<Option<RangeSet>>,
}

impl LookBehind {
    pub fn new(previous: Vec<Option<RangeSet>>) -> LookBehind {
        LookBehind { previous }
    }

    /// A buffer that knows nothing about its `span` predecessors.
    pub fn unknown(span: usize) -> LookBehind {
        LookBehind { previous: vec![None; span] }
    }

    pub fn span(&self) -> usize {
        self.previous.len()
    }

    /// Ranges of the entry at distance `distance` (1 = the immediate predecessor), if known.
    pub fn at_distance(&self, distance: usize) -> Option<&RangeSet> {
        assert!(distance >= 1);
        self.previous.get(distance - 1).and_then(|r| r.as_ref())
    }

    pub fn previous(&self) -> &[Option<RangeSet>] {
        &self.previous
    }
}
