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
        self.start_sync_wait(term, end, end, tokens);
        // Send the decided log to the voters right away; others get it when they answer.
        for peer in self.peers() {
            self.send_sync(peer);
        }
    }

    /// Replaces the log in the span of `entries` by them and drops everything after `end`.
    /// Returns the disk tokens whose completion makes the new log durable.
    pub(super) fn replace_log(&mut self, entries: Vec<Entry>, end: Index) -> BTreeSet<u64> {
        let mut tokens = BTreeSet::new();
        for dropped in self.log.truncate_after(end) {
            assert!(!self.is_committed(dropped), "truncating committed entry {dropped:?} at {:?}", self.cfg.id);
            self.gate.remove(dropped.0);
        }
        self.gate.forget_above(end.0);
        tokens.insert(self.truncate_log(end));
        tokens.extend(self.put_decided(entries));
        tokens
    }

    /// Puts decided copies in place of whatever the log holds at their indices (a later
    /// chunk of a sync, after `replace_log` took the first). Returns their disk tokens.
    ///
    /// Committed entries are never dropped: a committed index's decided copy must carry the
    /// same operation (asserted), so only its ballot changes.
    fn put_decided(&mut self, entries: Vec<Entry>) -> BTreeSet<u64> {
        for e in &entries {
            let committed = self.is_committed(e.index);
            if committed {
                let old = self.log.entry(e.index).expect("committed entry not held");
                assert_eq!(old.op, e.op, "merge changed committed entry {:?} at {:?}", e.index, self.cfg.id);
                assert_eq!(old.request, e.request, "merge changed committed entry {:?}", e.index);
            } else {
                self.gate.remove(e.index.0);
            }
            self.put_entry(e.clone(), false);
            if !committed {
                self.gate_insert(e);
            }
            if self.cfg.naive.paper_merge && matches!(e.op, Op::Noop) {
                // Naive variant: a skipped hole lives only in memory.
                self.log.mark_durable(e.index, e.ballot, e.term);
            }
        }
        self.persist_entries(entries).into_iter().collect()
    }

    /// Waits for the decided log of `term` to be durable through `end`; `received` is how far
    /// it is in place so far (chunks of a follower's sync), `tokens` the writes in flight.
    pub(super) fn start_sync_wait(&mut self, term: Term, end: Index, received: Index, tokens: BTreeSet<u64>) {
        self.sync_pending = Some(SyncPending { term, end, received, tokens });
        self.check_sync_done();
    }

    /// Completes a merge or sync once the whole decided log is in place and durable: adopt
    /// the sync term.
    pub(super) fn check_sync_done(&mut self) {
        let Some(pending) = &self.sync_pending else {
            return;
        };
        if !pending.tokens.is_empty() || self.sync_held(pending) < pending.end {
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

    /// How far a sync of our term under way holds the leader's log (0 when none): reported in
    /// every ack, so the leader sends the next chunk from there (or nothing, once complete).
    pub(super) fn sync_received(&self) -> Index {
        match &self.sync_pending {
            Some(p) if p.term == self.hard.term => self.sync_held(p),
            _ => Index(0),
        }
    }

    /// A sync of our term under way still lacks chunks.
    pub(super) fn sync_lacks_chunks(&self) -> bool {
        self.sync_pending.as_ref().is_some_and(|p| p.term == self.hard.term && self.sync_held(p) < p.end)
    }

    /// How far the log being adopted is in place: the chunks received, and below our
    /// committed watermark everything (a committed index's copy is the decided one; a snapshot
    /// can move the watermark past the chunks).
    fn sync_held(&self, p: &SyncPending) -> Index {
        p.received.max(self.committed)
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

    /// Sends `peer` the next chunk of the decided log: from where its last ack said its sync
    /// stands, else from its committed watermark; at most `max_sync_bytes` encoded (one
    /// entry at least). A snapshot instead when it needs pruned entries.
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
        let base = peer_committed.max(p.sync_received);
        if base < checkpoint {
            self.maybe_send_snapshot(peer);
            return;
        }
        p.last_sync_tick = Some(ticks);
        let (entries, upto) = self.decided_chunk(base, end);
        self.send(peer, Message::Sync { term, base, upto, end, entries });
    }

    /// The decided log from `base` on: entries up to `end` within `max_sync_bytes` (encoded)
    /// (one entry at least), and the index they reach.
    pub(super) fn decided_chunk(&self, base: Index, end: Index) -> (Vec<Entry>, Index) {
        let decided = self.log.iter_from(base).map(|s| &s.entry).take_while(|e| e.index <= end);
        let (entries, all) = within_bytes(decided, self.cfg.max_sync_bytes);
        let upto = if all { end.max(base) } else { entries.last().expect("one entry at least").index };
        (entries, upto)
    }

    /// Follower side of merge phase 2: the first chunk of a leader's decided log replaces our
    /// log from our committed watermark on and truncates after its end; later chunks continue
    /// where the last one stopped. Every chunk is acknowledged at once, so the leader sends the
    /// next while this one is written; the sync term is adopted once all of it is durable.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_sync(
        &mut self,
        from: ReplicaId,
        term: Term,
        base: Index,
        upto: Index,
        end: Index,
        entries: Vec<Entry>,
    ) {
        if !self.accept_leader(from, term) {
            return;
        }
        if self.hard.sync == term {
            // Duplicate: we adopted this term's log; never truncate again.
            self.send_ack(from, Vec::new(), 0);
            return;
        }
        if let Some(pending) = self.sync_pending.as_ref().filter(|p| p.term == term) {
            // A chunk of the log we are adopting: take it if it continues what we hold.
            let received = self.sync_held(pending);
            if base <= received && upto > received && end == pending.end {
                let entries: Vec<Entry> = entries.into_iter().filter(|e| e.index > received).collect();
                assert!(entries.iter().all(|e| e.ballot <= term && e.index <= upto), "malformed sync chunk");
                let tokens = self.put_decided(entries);
                let pending = self.sync_pending.as_mut().expect("sync pending");
                pending.tokens.extend(tokens);
                pending.received = upto;
                self.check_sync_done();
            }
            if self.sync_lacks_chunks() {
                self.send_ack(from, Vec::new(), 0); // asks for the next chunk
            }
            return;
        }
        if base > self.committed || !self.applying.is_empty() || self.checkpoint_in_progress.is_some() {
            // We lack committed entries at or below `base` (or are mid-apply): ask again.
            self.send_ack(from, Vec::new(), 0);
            return;
        }
        let keep_from = self.committed.max(self.log.checkpoint());
        let entries: Vec<Entry> = entries.into_iter().filter(|e| e.index > keep_from).collect();
        assert!(entries.iter().all(|e| e.ballot <= term && e.index <= upto && upto <= end), "malformed sync");
        let tokens = self.replace_log(entries, end);
        self.start_sync_wait(term, end, upto.max(keep_from), tokens);
        if self.sync_lacks_chunks() {
            self.send_ack(from, Vec::new(), 0); // asks for the next chunk
        }
    }
}

/// Copies of `entries`, in order, until the next would take their encoded size
/// ([`crate::codec::listed_len`]) over `limit_bytes`; the first always goes in, so one large
/// entry still moves. The flag says whether all of them went in. What bounds a Sync chunk and
/// a merge report alike.
pub(super) fn within_bytes<'a>(entries: impl Iterator<Item = &'a Entry>, limit_bytes: u64) -> (Vec<Entry>, bool) {
    let (mut taken, mut bytes) = (Vec::new(), 0u64);
    for e in entries {
        let len = crate::codec::listed_len(e);
        if !taken.is_empty() && bytes + len > limit_bytes {
            return (taken, false);
        }
        bytes += len;
        taken.push(e.clone());
    }
    (taken, true)
}
