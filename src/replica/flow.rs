//! Follower flow control: a leader neither runs far ahead of a follower that keeps up nor
//! prunes from under it the entries it still needs.
//!
//! Why: a write commits on a majority, and the in-flight window counts from the committed
//! watermark, so the slowest of three replicas could fall behind without bound. Once it needed
//! entries below the leader's checkpoint it could be caught up only from the block image (a
//! rebuild), during which the group kept two copies of every new write. Measured before this
//! module: a fresh, healthy `local` cluster filled with 256 MiB of 1 MiB writes sent three
//! rebuilds, and a follower was still being rebuilt (164 MB streamed) through the 4 KiB random
//! writes that followed.
//!
//! Rules (leader only):
//! - A follower *keeps up* while it is synced, was heard from within an election timeout, needs
//!   no entry the leader no longer holds, and its durable prefix advanced (or stood at the
//!   leader's last index) within an election timeout. A follower that is down, cut off, being
//!   rebuilt, or stuck (a failed disk behind a live process) does not keep up, so it holds the
//!   group back for at most an election timeout.
//! - Admission: no new entry while a follower that keeps up lags [`Replica::lag_entries`]
//!   entries or [`Replica::lag_bytes`] payload bytes behind the last index: half a checkpoint's
//!   worth, so a 20 ms straggler at ten thousand writes a second (two hundred entries) passes.
//! - Retention: a checkpoint still prunes the log at the applied watermark, but the entries a
//!   follower that keeps up lacks stay in `Retained`, at most a checkpoint's worth, and are
//!   sent from there; only a follower lacking more is caught up from the block image.

use std::collections::VecDeque;

use super::{Progress, Replica, Role};
use crate::entry::Entry;
use crate::types::Index;

/// Payload bytes appended by this leader, as running totals per index (the leader's log has
/// no holes above its checkpoint, and `append` adds one index at a time): the bytes a follower
/// lags by are a difference of two totals, not a walk over the log.
///
/// Invariants: `totals[k]` is the total through index `first + k`; totals never decrease.
#[derive(Clone, Debug, Default)]
pub(super) struct PayloadTotals {
    first: Index,
    /// Total through `first - 1` (what `at` answers below `first`).
    base: u64,
    totals: VecDeque<u64>,
}

impl PayloadTotals {
    fn last_total(&self) -> u64 {
        self.totals.back().copied().unwrap_or(self.base)
    }

    /// Counts `bytes` at `index`. An index that does not follow the last starts a new run
    /// (entries before it count nothing: they were decided by the merge, not appended here).
    pub(super) fn push(&mut self, index: Index, bytes: u64) {
        if Index(self.first.0 + self.totals.len() as u64) != index {
            self.base = self.last_total();
            self.first = index;
            self.totals.clear();
        }
        let total = self.last_total() + bytes;
        self.totals.push_back(total);
    }

    /// Total through `index`.
    fn at(&self, index: Index) -> u64 {
        if index < self.first {
            return self.base;
        }
        self.totals.get((index.0 - self.first.0) as usize).copied().unwrap_or_else(|| self.last_total())
    }

    /// Payload bytes in `(after, through]`.
    pub(super) fn between(&self, after: Index, through: Index) -> u64 {
        self.at(through).saturating_sub(self.at(after))
    }

    /// Forgets the totals through `index` (no follower needs them).
    pub(super) fn prune_through(&mut self, index: Index) {
        while self.first <= index {
            let Some(total) = self.totals.pop_front() else {
                break;
            };
            self.base = total;
            self.first = self.first.next();
        }
    }

    pub(super) fn check_invariants(&self) {
        let mut prev = self.base;
        for t in &self.totals {
            assert!(*t >= prev, "payload totals decrease");
            prev = *t;
        }
    }
}

/// Entries pruned by a checkpoint that a follower keeping up still lacks: a contiguous run
/// ending at the checkpoint. Bounded by a checkpoint's worth (`Config::checkpoint_interval`
/// entries, `Config::checkpoint_bytes` payload bytes).
#[derive(Clone, Debug, Default)]
pub(super) struct Retained {
    entries: VecDeque<Entry>,
}

impl Retained {
    pub(super) fn get(&self, index: Index) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        self.entries.get(index.0.checked_sub(first.0)? as usize)
    }

    /// The lowest index held, if any.
    fn first(&self) -> Option<Index> {
        self.entries.front().map(|e| e.index)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn drop_through(&mut self, index: Index) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.entries.pop_front();
        }
    }
}

impl Replica {
    /// A follower lagging this many entries behind the last index stops admission.
    pub(super) fn lag_entries(&self) -> u64 {
        (self.cfg.checkpoint_interval / 2).max(self.cfg.window())
    }

    /// ... or this many payload bytes.
    pub(super) fn lag_bytes(&self) -> u64 {
        (self.cfg.checkpoint_bytes / 2).max(1)
    }

    /// The highest index whose entry a leader can no longer send: below it, catch-up needs the
    /// block image.
    pub(super) fn catch_up_floor(&self) -> Index {
        let checkpoint = self.log.checkpoint();
        match &self.role {
            Role::Leader(l) => l.retained.first().map_or(checkpoint, |f| Index(f.0 - 1)),
            _ => checkpoint,
        }
    }

    /// An entry at `index` from the log or, at a leader, from the retained ones.
    pub(super) fn sendable_entry(&self, index: Index) -> Option<&Entry> {
        match &self.role {
            Role::Leader(l) if index <= self.log.checkpoint() => l.retained.get(index),
            _ => self.log.entry(index),
        }
    }

    /// Needs entries the leader no longer holds (the snapshot rule of the heartbeat).
    pub(super) fn needs_snapshot(&self, p: &Progress) -> bool {
        let floor = self.catch_up_floor();
        p.committed.is_some_and(|c| c < floor) && p.durable < floor
    }

    /// See the module doc.
    pub(super) fn keeps_up(&self, p: &Progress) -> bool {
        let timeout = self.cfg.election_timeout_min_ticks as u64;
        p.synced
            && p.last_heard_tick.is_some_and(|t| self.ticks.saturating_sub(t) <= timeout)
            && self.ticks.saturating_sub(p.moved_tick) <= timeout
            && !self.needs_snapshot(p)
    }

    /// A follower that keeps up lags too far behind for another entry to be appended.
    pub(super) fn follower_lag_full(&self) -> bool {
        let Role::Leader(l) = &self.role else {
            return false;
        };
        let last = self.log.last_index();
        let (entries, bytes) = (self.lag_entries(), self.lag_bytes());
        l.progress
            .values()
            .filter(|p| self.keeps_up(p))
            .any(|p| last.0.saturating_sub(p.durable.0) >= entries || l.payload.between(p.durable, last) >= bytes)
    }

    /// The lowest durable prefix among followers that keep up and lack at most a checkpoint's
    /// worth below `through`: entries above it are still wanted. `through` when none lacks any.
    fn wanted_after(&self, through: Index) -> Index {
        let Role::Leader(l) = &self.role else {
            return through;
        };
        let mut floor = through;
        for p in l.progress.values().filter(|p| self.keeps_up(p)) {
            let lacks = through.0.saturating_sub(p.durable.0);
            let within = lacks <= self.cfg.checkpoint_interval
                && l.payload.between(p.durable, through) <= self.cfg.checkpoint_bytes;
            if p.durable < floor && within {
                floor = p.durable;
            }
        }
        floor
    }

    /// Before the log is pruned through `through` (a checkpoint): keeps the entries a follower
    /// that keeps up still lacks. Every such follower holds at least the current floor (it
    /// would need the image otherwise), so the run stays contiguous.
    pub(super) fn retain_before_prune(&mut self, through: Index) {
        let floor = self.wanted_after(through);
        let from = floor.max(self.log.checkpoint());
        let kept: Vec<Entry> =
            self.log.iter_from(from).take_while(|s| s.entry.index <= through).map(|s| s.entry.clone()).collect();
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        l.retained.drop_through(floor);
        l.retained.entries.extend(kept);
    }

    /// Lets go of retained entries and payload totals no follower that keeps up still wants.
    pub(super) fn trim_retained(&mut self) {
        let floor = self.wanted_after(self.log.checkpoint());
        if let Role::Leader(l) = &mut self.role {
            l.retained.drop_through(floor);
        }
        // Totals at or below the new floor answer no question a follower that keeps up asks.
        let catch_up_floor = self.catch_up_floor();
        if let Role::Leader(l) = &mut self.role {
            l.payload.prune_through(catch_up_floor);
        }
    }

    /// Leader: how many entries the furthest follower that keeps up lags behind the last
    /// index (0 elsewhere).
    pub fn follower_lag(&self) -> u64 {
        let Role::Leader(l) = &self.role else {
            return 0;
        };
        let last = self.log.last_index();
        l.progress.values().filter(|p| self.keeps_up(p)).map(|p| last.0.saturating_sub(p.durable.0)).max().unwrap_or(0)
    }

    /// Leader: entries under the checkpoint kept for followers (0 elsewhere).
    pub fn retained_entries(&self) -> usize {
        match &self.role {
            Role::Leader(l) => l.retained.len(),
            _ => 0,
        }
    }

    /// Proposals this replica queued, as leader, only because a follower lagged: how often
    /// flow control held the group back.
    pub fn proposals_held_by_lag(&self) -> u64 {
        self.proposals_held_by_lag
    }

    pub(super) fn check_flow_invariants(&self) {
        let Role::Leader(l) = &self.role else {
            return;
        };
        l.payload.check_invariants();
        let checkpoint = self.log.checkpoint();
        if let Some(last) = l.retained.entries.back() {
            assert_eq!(last.index, checkpoint, "retained entries do not end at the checkpoint");
        }
        for (a, b) in l.retained.entries.iter().zip(l.retained.entries.iter().skip(1)) {
            assert_eq!(a.index.next(), b.index, "retained entries not contiguous");
        }
        assert!(l.retained.len() as u64 <= self.cfg.checkpoint_interval, "retained more than a checkpoint's worth");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_totals_answer_the_bytes_between_two_indices() {
        let mut t = PayloadTotals::default();
        for (i, bytes) in [(3, 100), (4, 0), (5, 50), (6, 7)] {
            t.push(Index(i), bytes);
            t.check_invariants();
        }
        assert_eq!(t.between(Index(2), Index(6)), 157, "below the first index counts nothing");
        assert_eq!(t.between(Index(3), Index(5)), 50);
        assert_eq!(t.between(Index(5), Index(9)), 7, "past the last index: the last total");
        t.prune_through(Index(4));
        assert_eq!(t.between(Index(4), Index(6)), 57);
        assert_eq!(t.between(Index(1), Index(6)), 57, "pruned indices answer the pruned total");
        // An index that does not follow the last (a new leader's first append after a merge)
        // starts a new run on top of the totals so far.
        t.push(Index(10), 1000);
        t.check_invariants();
        assert_eq!(t.between(Index(6), Index(10)), 1000);
        assert_eq!(t.between(Index(9), Index(10)), 1000);
        t.prune_through(Index(20));
        assert_eq!(t.between(Index(0), Index(30)), 0);
    }
}
