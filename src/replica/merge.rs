//! The merge stage: decide every index up to the highest one a quorum holds, write the decided
//! log at the new ballot to a quorum, and only then serve.

use std::collections::{BTreeMap, BTreeSet};

use super::{Replica, Role, SyncPending, VoteInfo};
use crate::entry::{Entry, Op};
use crate::message::Message;
use crate::types::{Index, ReplicaId, Term};

impl Replica {
    /// Merge phase 2 at the new leader. `votes` holds a quorum of grants, ourselves included.
    pub(super) fn begin_merge(&mut self, votes: BTreeMap<ReplicaId, VoteInfo>) {
        let term = self.hard.term;
        let base = self.committed;
        let naive = self.cfg.naive;
        // Every index above our committed watermark: own copies first.
        let mut chosen: BTreeMap<Index, Entry> =
            self.log.iter_from(base.max(self.log.checkpoint())).map(|s| (s.entry.index, s.entry.clone())).collect();
        if naive.paper_merge {
            // Naive variant: a skipped hole is not held, not even by the candidate.
            chosen.retain(|_, e| !matches!(e.op, Op::Noop));
        }
        if !naive.raft_truncation {
            for (voter, info) in &votes {
                if *voter == self.cfg.id || (!naive.paper_merge && info.sync != self.hard.sync) {
                    continue;
                }
                for e in &info.entries {
                    if e.index <= base {
                        continue;
                    }
                    let better = match chosen.get(&e.index) {
                        None => true,
                        // The paper's literal rule compares original terms (unsafe); we compare
                        // the ballot at which each copy was last written.
                        Some(cur) if naive.paper_merge => e.term > cur.term,
                        Some(cur) => e.ballot > cur.ballot,
                    };
                    if better {
                        chosen.insert(e.index, e.clone());
                    }
                }
            }
        }
        let end = chosen.keys().next_back().copied().unwrap_or(base).max(base);
        // Decide every index in (base, end]: the chosen copy, else a no-op; all at our ballot,
        // with look-behind buffers recomputed from the decided log.
        let mut decided: BTreeMap<Index, Entry> = BTreeMap::new();
        for i in base.0 + 1..=end.0 {
            let index = Index(i);
            let lb = self.look_behind_for(index, &decided);
            let entry = match chosen.remove(&index) {
                Some(mut e) => {
                    e.ballot = term;
                    e.look_behind = lb;
                    e
                }
                None => Entry::noop(index, term, lb),
            };
            decided.insert(index, entry);
        }
        let voter_committed = votes.iter().map(|(id, v)| (*id, v.committed)).collect();
        let tokens = self.replace_log(decided.into_values().collect(), end);
        self.install_leader(end, voter_committed);
        self.start_sync_wait(term, end, tokens);
        // Send the decided log to the voters right away; others get it when they answer.
        for peer in self.peers() {
            self.send_sync(peer);
        }
    }

    /// Replaces the log in the span of `entries` by them and drops everything after `end`.
    /// Returns the disk tokens whose completion makes the new log durable.
    ///
    /// Committed entries are never dropped: a committed index's decided copy must carry the
    /// same operation (asserted), so only its ballot changes.
    pub(super) fn replace_log(&mut self, entries: Vec<Entry>, end: Index) -> BTreeSet<u64> {
        let mut tokens = BTreeSet::new();
        for dropped in self.log.truncate_after(end) {
            assert!(!self.is_committed(dropped), "truncating committed entry {dropped:?} at {:?}", self.cfg.id);
            self.gate.remove(dropped.0);
        }
        self.gate.forget_above(end.0);
        tokens.insert(self.truncate_log(end));
        for e in &entries {
            let committed = self.is_committed(e.index);
            if committed {
                let old = self.log.entry(e.index).expect("committed entry not held");
                assert_eq!(old.op, e.op, "merge changed committed entry {:?} at {:?}", e.index, self.cfg.id);
                assert_eq!(old.request, e.request, "merge changed committed entry {:?}", e.index);
            } else {
                self.gate.remove(e.index.0);
            }
            self.log.put(e.clone(), false);
            if !committed {
                self.gate_insert(e);
            }
            if self.cfg.naive.paper_merge && matches!(e.op, Op::Noop) {
                // Naive variant: a skipped hole lives only in memory.
                self.log.mark_durable(e.index, e.ballot, e.term);
            }
        }
        tokens.extend(self.persist_entries(entries));
        tokens
    }

    pub(super) fn start_sync_wait(&mut self, term: Term, end: Index, tokens: BTreeSet<u64>) {
        self.sync_pending = Some(SyncPending { term, end, tokens });
        self.check_sync_done();
    }

    /// Completes a merge or sync once its writes are durable: adopt the sync term.
    pub(super) fn check_sync_done(&mut self) {
        let Some(pending) = &self.sync_pending else {
            return;
        };
        if !pending.tokens.is_empty() {
            return;
        }
        let (term, end) = (pending.term, pending.end);
        self.sync_pending = None;
        if term != self.hard.term {
            return; // Superseded by a newer term before it completed.
        }
        self.hard.sync = term;
        self.hard.sync_end = end;
        self.persist_hard_state();
        if matches!(self.role, Role::Leader(_)) {
            self.maybe_start_serving();
        } else if let Some(leader) = self.leader_hint {
            self.send_ack(leader, Vec::new(), 0);
        }
    }

    /// The leader serves once a quorum (itself included) durably adopted its merged log.
    ///
    /// The quorum is the decided log's membership's (it may differ by one server from the one
    /// that elected us; see `membership`).
    pub(super) fn maybe_start_serving(&mut self) {
        let membership = self.log.membership();
        let quorum = membership.quorum();
        let self_synced = self.hard.sync == self.hard.term && self.sync_pending.is_none();
        let Role::Leader(l) = &self.role else { return };
        if l.serving || !self_synced {
            return;
        }
        let synced = usize::from(membership.is_voter(self.cfg.id))
            + l.progress.iter().filter(|(id, p)| membership.is_voter(**id) && p.synced).count();
        if synced < quorum {
            return;
        }
        let end = l.merge_end;
        // Everything up to the merge end is now on a quorum at our ballot: committed.
        for i in self.committed.0 + 1..=end.0 {
            self.mark_committed(Index(i));
        }
        let aw = self.applied_watermark();
        let entries: Vec<_> = self.log.iter_from(aw).map(|s| s.entry.clone()).collect();
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        l.serving = true;
        for e in entries {
            if let Some(id) = e.request {
                l.in_log.insert(id, e.index);
                let f = l.floors.entry(id.client).or_default();
                *f = (*f).max(e.floor);
            }
        }
        self.try_apply();
        self.drain_queue();
        self.broadcast_heartbeat();
    }

    /// Sends the decided log to `peer` (or a snapshot when it needs pruned entries, or more than
    /// `max_sync_bytes` of them).
    pub(super) fn send_sync(&mut self, peer: ReplicaId) {
        let term = self.hard.term;
        let checkpoint = self.log.checkpoint();
        let ticks = self.ticks;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let end = l.merge_end;
        let p = l.progress.get_mut(&peer).expect("progress for peer");
        let Some(peer_committed) = p.committed else {
            // We do not know its watermark yet: a heartbeat makes it answer with it.
            let commit = crate::message::CommitNotice::default();
            self.send(peer, Message::Heartbeat { term, commit, read_seq: 0 });
            return;
        };
        if peer_committed < checkpoint {
            self.maybe_send_snapshot(peer);
            return;
        }
        p.last_sync_tick = Some(ticks);
        let (mut entries, mut bytes) = (Vec::new(), 0u64);
        for s in self.log.iter_from(peer_committed).take_while(|s| s.entry.index <= end) {
            bytes += crate::io::write_data(&s.entry.op).map_or(0, |d| d.len() as u64);
            if bytes > self.cfg.max_sync_bytes {
                break;
            }
            entries.push(s.entry.clone());
        }
        if bytes > self.cfg.max_sync_bytes {
            self.maybe_send_snapshot(peer);
            return;
        }
        self.send(peer, Message::Sync { term, base: peer_committed, end, entries });
    }

    /// Follower side of merge phase 2.
    pub(super) fn on_sync(&mut self, from: ReplicaId, term: Term, base: Index, end: Index, entries: Vec<Entry>) {
        if !self.accept_leader(from, term) {
            return;
        }
        if self.hard.sync == term || self.sync_pending.as_ref().is_some_and(|p| p.term == term) {
            // Duplicate: we adopted (or are adopting) this term's log; never truncate again.
            self.send_ack(from, Vec::new(), 0);
            return;
        }
        if base > self.committed || !self.applying.is_empty() || self.checkpoint_in_progress.is_some() {
            // We lack committed entries at or below `base` (or are mid-apply): ask again.
            self.send_ack(from, Vec::new(), 0);
            return;
        }
        let keep_from = self.committed.max(self.log.checkpoint());
        let entries: Vec<Entry> = entries.into_iter().filter(|e| e.index > keep_from).collect();
        assert!(entries.iter().all(|e| e.ballot <= term && e.index <= end), "malformed sync");
        let tokens = self.replace_log(entries, end);
        self.start_sync_wait(term, end, tokens);
    }
}
