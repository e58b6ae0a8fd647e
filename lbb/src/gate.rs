//! The apply gate: the paper's pending list, decided with look-behind buffers.

use std::collections::BTreeMap;

use crate::{LookBehind, Range, RangeSet};

/// Operating errors of the gate (misuse by the caller is a panic instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateError {
    /// The index is at or below the applied watermark: it was applied already.
    AlreadyApplied,
}

#[derive(Clone, Debug, Default)]
struct Slot {
    /// Ranges of this index: from the held entry itself, or learned from a successor's
    /// look-behind buffer while the entry is missing. `None`: unknown, conflicts with all.
    ranges: Option<RangeSet>,
    /// The entry itself is held by this replica (not just described by a successor).
    held: bool,
    committed: bool,
    applying: bool,
    applied: bool,
}

impl Slot {
    /// Held, committed and not started: [`ApplyGate::ready`] may return it.
    fn candidate(&self) -> bool {
        self.held && self.committed && !self.applying && !self.applied
    }
}

/// Decides which committed entries a replica may apply now.
///
/// Rule: a committed, held entry `i` may start applying when every entry `j` with
/// `applied_watermark < j < i` is either applied, or has *known* ranges disjoint from the ranges
/// of `i`. An entry that is applying counts as unapplied. Missing entries whose ranges are
/// unknown conflict with everything, so out-of-order apply stops at a hole wider than the
/// look-behind span. Conflicts are transitive: a blocked entry still blocks its own successors
/// that overlap it, so conflicting entries always apply in index order.
///
/// In `strict_order` mode (classic Raft) only the entry right after the watermark may apply.
///
/// Invariant: every slot is above `applied_watermark`; the slot at `applied_watermark + 1`, if
/// any, is not applied (the watermark would have advanced); `candidates` counts the slots that
/// are held, committed and neither applying nor applied.
#[derive(Clone, Debug)]
pub struct ApplyGate {
    span: usize,
    strict_order: bool,
    applied_watermark: u64,
    slots: BTreeMap<u64, Slot>,
    /// Slots [`ApplyGate::ready`] could return. The replica asks after every apply, commit and
    /// arrival; most of those times nothing new can start, and this answers without a scan
    /// (the scan was ~2% of all CPU under 4 KiB random writes at iodepth 32).
    candidates: usize,
}

impl ApplyGate {
    /// A gate whose entries up to and including `applied_watermark` are applied.
    pub fn new(span: usize, strict_order: bool, applied_watermark: u64) -> ApplyGate {
        assert!(span >= 1, "look-behind span must be at least 1");
        ApplyGate { span, strict_order, applied_watermark, slots: BTreeMap::new(), candidates: 0 }
    }

    pub fn span(&self) -> usize {
        self.span
    }

    pub fn applied_watermark(&self) -> u64 {
        self.applied_watermark
    }

    /// Forgets everything above `applied_watermark` and moves the watermark there. Used when
    /// the log above the watermark is replaced wholesale (merge sync, snapshot, restart).
    ///
    /// # Panics
    /// If an apply is in flight: the caller must drain applies first.
    pub fn reset(&mut self, applied_watermark: u64) {
        assert!(self.slots.values().all(|s| !s.applying), "reset with an apply in flight");
        self.applied_watermark = applied_watermark;
        self.slots.clear();
        self.candidates = 0;
    }

    /// Applies `change` to the slot at `index` (created empty if absent), keeping the
    /// candidate count.
    fn update(&mut self, index: u64, change: impl FnOnce(&mut Slot)) {
        let slot = self.slots.entry(index).or_default();
        let before = slot.candidate();
        change(slot);
        match (before, slot.candidate()) {
            (false, true) => self.candidates += 1,
            (true, false) => self.candidates -= 1,
            _ => {}
        }
    }

    /// Records that the entry at `index` with `ranges` and look-behind `look_behind` is held.
    /// Its look-behind buffer teaches the ranges of missing predecessors.
    pub fn insert(&mut self, index: u64, ranges: RangeSet, look_behind: &LookBehind) -> Result<(), GateError> {
        if index <= self.applied_watermark {
            return Err(GateError::AlreadyApplied);
        }
        self.update(index, |slot| {
            assert!(!slot.applying && !slot.applied, "insert over an applying/applied entry {index}");
            slot.ranges = Some(ranges);
            slot.held = true;
        });
        // The predecessors it describes, above the watermark: one ordered walk over the slots
        // present (most are, as held entries) rather than a map descent per distance (32 on
        // the servers; ~1.2% of all samples under 4 KiB random writes with stragglers, whose
        // pending slots pile up behind a late write). Only the absent ones are added after.
        let lowest = index.saturating_sub(look_behind.span() as u64).max(self.applied_watermark + 1);
        let mut absent = Vec::new();
        let mut next_absent = lowest; // the least predecessor not yet seen
        for (&prev, s) in self.slots.range_mut(lowest..index) {
            absent.extend(next_absent..prev);
            next_absent = prev + 1;
            if !s.held && s.ranges.is_none() {
                s.ranges = look_behind.at_distance((index - prev) as usize).cloned();
            }
        }
        absent.extend(next_absent..index);
        for prev in absent {
            if let Some(r) = look_behind.at_distance((index - prev) as usize) {
                self.slots.insert(prev, Slot { ranges: Some(r.clone()), ..Slot::default() });
            }
        }
        Ok(())
    }

    /// Forgets every slot above `index` (the log was truncated there). Entries above it must
    /// not be applying or applied.
    pub fn forget_above(&mut self, index: u64) {
        let dropped = self.slots.split_off(&(index + 1));
        assert!(dropped.values().all(|s| !s.applying && !s.applied), "forget_above drops applied entries");
        self.candidates -= dropped.values().filter(|s| s.candidate()).count();
    }

    /// Drops a held entry that was never applied (its copy was replaced or truncated).
    pub fn remove(&mut self, index: u64) {
        if let Some(slot) = self.slots.get(&index) {
            assert!(!slot.applying && !slot.applied, "remove of applying/applied entry {index}");
            if slot.candidate() {
                self.candidates -= 1;
            }
            self.slots.remove(&index);
        }
    }

    /// Marks `index` committed. Committing an index that is not held is allowed: it becomes
    /// appliable once the entry arrives.
    pub fn commit(&mut self, index: u64) {
        if index <= self.applied_watermark {
            return;
        }
        self.update(index, |slot| slot.committed = true);
    }

    pub fn is_committed(&self, index: u64) -> bool {
        index <= self.applied_watermark || self.slots.get(&index).is_some_and(|s| s.committed)
    }

    /// Entries that may start applying now, in index order, skipping any whose ranges overlap
    /// `blocked` (ranges being read right now). A skipped entry still blocks its overlapping
    /// successors.
    pub fn ready(&self, blocked: &RangeSet) -> Vec<u64> {
        let mut out = Vec::new();
        // Entries past the last candidate cannot change the answer.
        let mut candidates_left = self.candidates;
        if candidates_left == 0 {
            return out;
        }
        // The ranges of the unapplied entries passed so far, unmerged: a window of N + 1
        // entries makes this a few hundred comparisons, cheaper than merging each set into a
        // sorted one (which was a twentieth of a chunk server's CPU in Parallel mode).
        let mut unapplied: Vec<Range> = Vec::new();
        for (expected, (&index, slot)) in (self.applied_watermark + 1..).zip(self.slots.iter()) {
            if index != expected {
                // A hole no successor's look-behind buffer describes: unknown, conflicts with all.
                break;
            }
            if slot.applied {
                continue;
            }
            let Some(ranges) = slot.ranges.as_ref() else {
                break;
            };
            if slot.candidate() {
                let conflicts = ranges.ranges().iter().any(|r| unapplied.iter().any(|u| u.overlaps(r)));
                if !conflicts && !blocked.overlaps(ranges) {
                    out.push(index);
                }
                candidates_left -= 1;
            }
            if self.strict_order || candidates_left == 0 {
                break;
            }
            unapplied.extend_from_slice(ranges.ranges());
        }
        out
    }

    /// Entries above the watermark that are committed but may not apply yet: the pending list.
    pub fn pending(&self, blocked: &RangeSet) -> Vec<u64> {
        let ready = self.ready(blocked);
        self.slots
            .iter()
            .filter(|(i, s)| s.committed && !s.applying && !s.applied && !ready.contains(i))
            .map(|(i, _)| *i)
            .collect()
    }

    /// True when a read of `ranges` that must observe every entry up to `upto` has to wait:
    /// some entry in `(applied_watermark, upto]` is unapplied and overlaps it or is unknown.
    pub fn read_must_wait(&self, ranges: &RangeSet, upto: u64) -> bool {
        let mut expected = self.applied_watermark + 1;
        for (&index, slot) in self.slots.range(..=upto) {
            if index != expected {
                return true;
            }
            expected += 1;
            if slot.applied {
                continue;
            }
            match &slot.ranges {
                None => return true,
                Some(r) if r.overlaps(ranges) => return true,
                Some(_) => {}
            }
        }
        expected <= upto
    }

    /// Marks `index` as being applied. It must have been returned by [`ApplyGate::ready`].
    pub fn start_apply(&mut self, index: u64) {
        let slot = self.slots.get_mut(&index).expect("start_apply of unknown index");
        assert!(slot.candidate(), "start_apply of {index}, which ready() would not return");
        slot.applying = true;
        self.candidates -= 1;
    }

    /// Marks `index` applied and advances the watermark over the applied prefix.
    pub fn finish_apply(&mut self, index: u64) {
        let slot = self.slots.get_mut(&index).expect("finish_apply of unknown index");
        assert!(slot.applying, "finish_apply without start_apply at {index}");
        slot.applying = false;
        slot.applied = true;
        while let Some(slot) = self.slots.get(&(self.applied_watermark + 1)) {
            if !slot.applied {
                break;
            }
            self.slots.remove(&(self.applied_watermark + 1));
            self.applied_watermark += 1;
        }
    }

    pub fn is_applied(&self, index: u64) -> bool {
        index <= self.applied_watermark || self.slots.get(&index).is_some_and(|s| s.applied)
    }

    pub fn applying_count(&self) -> usize {
        self.slots.values().filter(|s| s.applying).count()
    }

    pub fn check_invariants(&self) {
        if let Some((&first, _)) = self.slots.iter().next() {
            assert!(first > self.applied_watermark, "slot at or below the applied watermark");
        }
        if let Some(slot) = self.slots.get(&(self.applied_watermark + 1)) {
            assert!(!slot.applied, "applied slot right above the watermark was not folded");
        }
        assert_eq!(
            self.candidates,
            self.slots.values().filter(|s| s.candidate()).count(),
            "candidate count out of step with the slots"
        );
        for (i, s) in &self.slots {
            assert!(!(s.applying && s.applied), "slot {i} both applying and applied");
            assert!(!(s.applying || s.applied) || (s.held && s.committed), "slot {i} applied but not held+committed");
            if let Some(r) = &s.ranges {
                r.check_invariants();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Range;

    fn rs(offset: u64, len: u64) -> RangeSet {
        RangeSet::single(Range::new(offset, len))
    }

    #[test]
    fn non_conflicting_entry_applies_past_a_described_hole() {
        let mut g = ApplyGate::new(2, false, 0);
        // Entry 2 is held; entry 1 is missing but described by 2's look-behind buffer.
        g.insert(2, rs(100, 10), &LookBehind::new(vec![Some(rs(0, 10)), None])).unwrap();
        g.commit(2);
        assert_eq!(g.ready(&RangeSet::new()), vec![2]);
        // Entry 3 overlaps the missing entry 1: it must wait.
        g.insert(3, rs(5, 1), &LookBehind::new(vec![Some(rs(100, 10)), Some(rs(0, 10))])).unwrap();
        g.commit(3);
        assert_eq!(g.ready(&RangeSet::new()), vec![2]);
    }

    #[test]
    fn unknown_hole_blocks_everything_after_it() {
        let mut g = ApplyGate::new(1, false, 0);
        g.insert(3, rs(100, 10), &LookBehind::new(vec![Some(rs(0, 1))])).unwrap();
        g.commit(3);
        // Index 1 is unknown (beyond the span of entry 3): nothing above it may apply.
        assert!(g.ready(&RangeSet::new()).is_empty());
    }

    #[test]
    fn conflicts_are_transitive_through_pending_entries() {
        let mut g = ApplyGate::new(2, false, 0);
        g.insert(1, rs(0, 10), &LookBehind::unknown(2)).unwrap(); // not committed yet
        g.insert(2, rs(5, 10), &LookBehind::new(vec![Some(rs(0, 10)), None])).unwrap();
        g.insert(3, rs(12, 1), &LookBehind::new(vec![Some(rs(5, 10)), Some(rs(0, 10))])).unwrap();
        g.commit(2);
        g.commit(3);
        // 3 does not overlap 1 but overlaps 2, which waits for 1.
        assert!(g.ready(&RangeSet::new()).is_empty());
        assert_eq!(g.pending(&RangeSet::new()), vec![2, 3]);
        g.commit(1);
        assert_eq!(g.ready(&RangeSet::new()), vec![1]);
        g.start_apply(1);
        g.finish_apply(1);
        assert_eq!(g.ready(&RangeSet::new()), vec![2]);
        assert_eq!(g.applied_watermark(), 1);
    }

    #[test]
    fn strict_order_applies_one_at_a_time() {
        let mut g = ApplyGate::new(2, true, 0);
        g.insert(1, rs(0, 1), &LookBehind::unknown(2)).unwrap();
        g.insert(2, rs(10, 1), &LookBehind::unknown(2)).unwrap();
        g.commit(1);
        g.commit(2);
        assert_eq!(g.ready(&RangeSet::new()), vec![1]);
    }

    #[test]
    fn reads_wait_for_overlapping_unapplied_entries() {
        let mut g = ApplyGate::new(2, false, 0);
        g.insert(1, rs(0, 10), &LookBehind::unknown(2)).unwrap();
        g.insert(2, rs(20, 10), &LookBehind::new(vec![Some(rs(0, 10)), None])).unwrap();
        assert!(g.read_must_wait(&rs(0, 1), 2));
        assert!(!g.read_must_wait(&rs(40, 1), 2));
        assert!(g.read_must_wait(&rs(40, 1), 3), "index 3 unknown");
        assert!(!g.read_must_wait(&rs(0, 1), 0));
    }
}
