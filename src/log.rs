//! The replica's log above its checkpoint: entries may have holes.

use std::collections::BTreeMap;

use crate::entry::{Entry, Op};
use crate::membership::{ConfigState, Membership};
use crate::types::{Index, Term};

#[derive(Clone, Debug)]
pub struct LogSlot {
    pub entry: Entry,
    /// This copy is on disk.
    pub durable: bool,
}

/// Entries above `checkpoint`, possibly with holes.
///
/// Invariants: every key is above `checkpoint`, `slots[i].entry.index == i`, and
/// `durable_upto` is the highest `d` such that every index in `(checkpoint, d]` is held and
/// durable (kept incrementally: acks report it on every message, and a scan of a long log
/// per message was the core's largest cost).
///
/// The log also answers "which membership is in force": the latest configuration entry in the
/// hole-free prefix `(checkpoint, held_upto]`, else `base`, the configuration as of the
/// checkpoint. (A configuration above a hole is not in force yet: the replica's log matches
/// the leader's only up to its first hole; see `membership`.) `configs` mirrors the
/// `Op::Config` entries among `slots`, and `held_upto` is kept incrementally like
/// `durable_upto`.
#[derive(Clone, Debug, Default)]
pub struct Log {
    checkpoint: Index,
    slots: BTreeMap<Index, LogSlot>,
    durable_upto: Index,
    held_upto: Index,
    base: ConfigState,
    configs: BTreeMap<Index, Membership>,
}

impl Log {
    /// An empty log above `checkpoint`, whose membership there is `base`.
    pub fn new(checkpoint: Index, base: ConfigState) -> Log {
        assert!(base.index <= checkpoint, "configuration above the checkpoint");
        let held_upto = checkpoint;
        Log { checkpoint, slots: BTreeMap::new(), durable_upto: checkpoint, held_upto, base, configs: BTreeMap::new() }
    }

    /// The configuration in force: the latest configuration entry of the hole-free prefix,
    /// else the base.
    pub fn config(&self) -> ConfigState {
        self.config_at(self.held_upto)
    }

    pub fn membership(&self) -> &Membership {
        self.configs.range(..=self.held_upto).next_back().map_or(&self.base.membership, |(_, m)| m)
    }

    /// Index of the configuration entry in force (0: bootstrap).
    pub fn config_index(&self) -> Index {
        self.configs.range(..=self.held_upto).next_back().map_or(self.base.index, |(i, _)| *i)
    }

    /// The end of the run of consecutive held slots starting right after `from` (at least
    /// `from`) whose slots all satisfy `ok`: how both kept prefixes advance and are checked.
    fn run_end(&self, from: Index, ok: impl Fn(&LogSlot) -> bool) -> Index {
        let mut end = from;
        for (i, slot) in self.slots.range(from.next()..) {
            if *i != end.next() || !ok(slot) {
                break;
            }
            end = *i;
        }
        end
    }

    /// Moves `held_upto` forward over held slots.
    fn advance_held(&mut self) {
        self.held_upto = self.run_end(self.held_upto.max(self.checkpoint), |_| true);
    }

    /// The configuration as of `index` (for a checkpoint or snapshot there).
    pub fn config_at(&self, index: Index) -> ConfigState {
        match self.configs.range(..=index).next_back() {
            Some((i, membership)) => ConfigState { index: *i, membership: membership.clone() },
            None => self.base.clone(),
        }
    }

    /// Moves `durable_upto` forward over held, durable slots.
    fn advance_durable(&mut self) {
        self.durable_upto = self.run_end(self.durable_upto.max(self.checkpoint), |slot| slot.durable);
    }

    pub fn checkpoint(&self) -> Index {
        self.checkpoint
    }

    pub fn get(&self, index: Index) -> Option<&LogSlot> {
        self.slots.get(&index)
    }

    pub fn entry(&self, index: Index) -> Option<&Entry> {
        self.slots.get(&index).map(|s| &s.entry)
    }

    pub fn contains(&self, index: Index) -> bool {
        self.slots.contains_key(&index)
    }

    /// Highest held index, or the checkpoint when the log is empty.
    pub fn last_index(&self) -> Index {
        self.slots.keys().next_back().copied().unwrap_or(self.checkpoint)
    }

    /// Stores `entry`, replacing any copy at its index.
    pub fn put(&mut self, entry: Entry, durable: bool) {
        assert!(entry.index > self.checkpoint, "put at or below the checkpoint");
        let index = entry.index;
        match &entry.op {
            Op::Config(m) => {
                self.configs.insert(index, m.clone());
            }
            _ => {
                self.configs.remove(&index);
            }
        }
        self.slots.insert(index, LogSlot { entry, durable });
        if !durable && index <= self.durable_upto {
            self.durable_upto = Index(index.0 - 1);
        }
        self.advance_durable();
        if index == self.held_upto.next() {
            self.advance_held();
        }
    }

    /// Marks the copy at `index` durable if it is still the copy with `ballot` and `term`.
    pub fn mark_durable(&mut self, index: Index, ballot: Term, term: Term) -> bool {
        match self.slots.get_mut(&index) {
            Some(slot) if slot.entry.ballot == ballot && slot.entry.term == term && !slot.durable => {
                slot.durable = true;
                if index == self.durable_upto.next() {
                    self.advance_durable();
                }
                true
            }
            _ => false,
        }
    }

    /// Drops every entry above `after`; returns the dropped indices.
    pub fn truncate_after(&mut self, after: Index) -> Vec<Index> {
        let dropped = self.slots.split_off(&after.next());
        self.configs.split_off(&after.next());
        self.durable_upto = self.durable_upto.min(after).max(self.checkpoint);
        self.held_upto = self.held_upto.min(after).max(self.checkpoint);
        dropped.into_keys().collect()
    }

    /// Forgets entries up to `through` (covered by a checkpoint).
    pub fn prune_through(&mut self, through: Index) {
        if through <= self.checkpoint {
            return;
        }
        self.base = self.config_at(through);
        self.slots = self.slots.split_off(&through.next());
        self.configs = self.configs.split_off(&through.next());
        self.checkpoint = through;
        self.advance_durable();
        self.advance_held();
    }

    /// Forgets entries up to `through`, which a snapshot installed with membership `config`
    /// (our own log may not hold the configuration entries below it).
    pub fn install_checkpoint(&mut self, through: Index, config: ConfigState) {
        assert!(through > self.checkpoint && config.index <= through, "snapshot checkpoint not above ours");
        self.prune_through(through);
        self.base = config;
    }

    /// Highest `d` such that every index in `(checkpoint, d]` is held and durable.
    pub fn durable_prefix(&self) -> Index {
        self.durable_upto
    }

    /// [`Log::durable_prefix`] computed by a scan (for invariant checks).
    pub fn durable_prefix_scan(&self) -> Index {
        self.run_end(self.checkpoint, |slot| slot.durable)
    }

    pub fn iter_from(&self, after: Index) -> impl Iterator<Item = &LogSlot> {
        self.slots.range(after.next()..).map(|(_, s)| s)
    }

    /// Held indices in `from..=to`.
    pub fn indices_in(&self, from: Index, to: Index) -> impl Iterator<Item = Index> + '_ {
        (from <= to).then(|| self.slots.range(from..=to).map(|(i, _)| *i)).into_iter().flatten()
    }

    pub fn indices(&self) -> impl Iterator<Item = Index> + '_ {
        self.slots.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn check_invariants(&self) {
        if let Some((first, _)) = self.slots.iter().next() {
            assert!(*first > self.checkpoint, "log slot at or below checkpoint");
        }
        for (i, slot) in &self.slots {
            assert_eq!(*i, slot.entry.index, "log slot keyed at the wrong index");
            assert!(slot.entry.ballot >= slot.entry.term, "entry ballot below its term");
        }
        assert_eq!(self.durable_upto, self.durable_prefix_scan(), "durable prefix kept wrong");
        assert!(self.base.index <= self.checkpoint, "base configuration above the checkpoint");
        assert_eq!(self.held_upto, self.run_end(self.checkpoint, |_| true), "hole-free prefix kept wrong");
        let held: BTreeMap<Index, &Membership> = self
            .slots
            .iter()
            .filter_map(|(i, s)| match &s.entry.op {
                Op::Config(m) => Some((*i, m)),
                _ => None,
            })
            .collect();
        assert!(held.len() == self.configs.len() && held.iter().all(|(i, m)| self.configs.get(i) == Some(*m)));
        self.membership().check_invariants();
    }
}
