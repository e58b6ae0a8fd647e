//! Normal operation: proposals, out-of-order acknowledgement and commit, retransmission.

use std::collections::{BTreeMap, BTreeSet};

use super::{Replica, Role, MAX_ROUNDS_TRACKED};
use crate::config::Mode;
use crate::entry::{Entry, Op};
use crate::io::{ClientError, ClientRequest};
use crate::message::{CommitNotice, Message};
use crate::types::{Index, ReplicaId, Term};

/// At most this many indices newly under a peer's durable prefix are looked at one by one
/// after its acknowledgement; a longer advance (a peer catching up) takes the full scan.
const MAX_PREFIX_CANDIDATES: u64 = 256;

impl Replica {
    pub(super) fn on_propose(&mut self, request: ClientRequest) {
        if !self.serving_or_refuse(request.id) {
            return;
        }
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        let id = request.id;
        // At-most-once: a request already applied, or below its client's floor (acknowledged
        // long ago: this is a stale retry), is answered without a new entry.
        let floor = l.floors.get(&id.client).copied().unwrap_or(0);
        if self.table.covers(id) || id.seq < floor {
            self.reply(id, Ok(()));
            return;
        }
        if let Some(&index) = l.in_log.get(&id) {
            if self.gate.is_applied(index.0) {
                self.reply(id, Ok(()));
            } else {
                l.waiters.entry(index).or_default().push(id);
            }
            return;
        }
        if l.queue.iter().any(|r| r.id == id) {
            return; // The queued copy will be answered.
        }
        let barrier = l.change.is_some() || self.log.config_index() > self.committed;
        let full = self.log.last_index().0 >= self.committed.0 + self.cfg.window();
        let waits = full || !l.queue.is_empty() || barrier;
        if waits || self.follower_lag_full() {
            self.proposals_held_by_lag += u64::from(!waits);
            let Role::Leader(l) = &mut self.role else { unreachable!() };
            if l.queue.len() >= self.cfg.max_queued_proposals {
                self.reply(id, Err(ClientError::Busy));
            } else {
                l.queue.push_back(request);
            }
            return;
        }
        self.append(request);
    }

    /// Appends proposals from the queue while the in-flight window has room, and a pending
    /// membership change once the barrier allows it (see `reconfig`).
    pub(super) fn drain_queue(&mut self) {
        loop {
            if self.config_barrier() {
                return;
            }
            if self.log.last_index().0 >= self.committed.0 + self.cfg.window() {
                return;
            }
            let Role::Leader(l) = &self.role else {
                return;
            };
            if !l.serving || l.queue.is_empty() || self.follower_lag_full() {
                return;
            }
            let Role::Leader(l) = &mut self.role else { unreachable!() };
            let request = l.queue.pop_front().expect("queue checked non-empty");
            self.append(request);
        }
    }

    pub(super) fn append(&mut self, request: ClientRequest) {
        let index = self.log.last_index().next();
        let term = self.hard.term;
        let look_behind = self.look_behind_for(index, &BTreeMap::new());
        let entry = Entry {
            index,
            term,
            ballot: term,
            op: request.op,
            request: Some(request.id),
            floor: request.floor,
            look_behind,
        };
        let is_config = matches!(entry.op, Op::Config(_));
        self.put_entry(entry.clone(), false);
        self.gate_insert(&entry);
        self.persist_entries(vec![entry.clone()]);
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        l.in_log.insert(request.id, index);
        l.payload.push(index, crate::io::write_data(&entry.op).map_or(0, |d| d.len() as u64));
        let f = l.floors.entry(request.id.client).or_default();
        *f = (*f).max(request.floor);
        l.waiters.entry(index).or_default().push(request.id);
        l.unsent.push(entry);
        if is_config {
            self.sync_progress();
        }
    }

    /// Sends the entries appended since the last call to every synced follower, in one
    /// message each (see [`Replica::take_commands`]).
    pub(super) fn flush_appends(&mut self) {
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if l.unsent.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut l.unsent);
        let upto = entries.last().expect("unsent entries").index;
        let first = entries.first().expect("unsent entries").index;
        let ticks = self.ticks;
        let mut targets = Vec::new();
        for (id, p) in l.progress.iter_mut().filter(|(_, p)| p.synced) {
            // A follower with nothing in flight (durable up to just below these entries) has
            // not stalled, however long ago its prefix last moved: its stall clock starts now,
            // or the next heartbeat round would resend what this append carries.
            if p.durable.next() >= first {
                p.stall_tick = ticks;
            }
            p.sent_upto = p.sent_upto.max(upto);
            targets.push(*id);
        }
        let commit = self.commit_notice();
        for peer in targets {
            let message = Message::Append { term: self.hard.term, entries: entries.clone(), commit: commit.clone() };
            self.send(peer, message);
        }
    }

    pub(super) fn commit_notice(&self) -> CommitNotice {
        CommitNotice::new(self.committed, self.committed_above.iter().copied())
    }

    /// Heartbeat round: retransmits unacknowledged entries, (re)sends syncs and snapshots and
    /// carries the commit notice. Each broadcast is also a read-index round: a quorum echoing
    /// its sequence confirms our leadership as of its sending, which both releases the reads
    /// waiting for it and renews the read lease.
    pub(super) fn broadcast_heartbeat(&mut self) {
        // Entries appended since the last drain go first, or the round would send them too.
        self.flush_appends();
        /// What the round sends one follower.
        enum Step {
            /// Not synced yet: resend the decided log (or ask for its watermark).
            Sync,
            /// Needs entries we no longer hold: the block image.
            Snapshot,
            /// These entries (possibly none), then the heartbeat.
            Send(Vec<Index>),
        }
        let term = self.hard.term;
        // Entries at or below it are neither in the log nor retained (see `flow`).
        let floor = self.catch_up_floor();
        let last = self.log.last_index();
        let batch = self.cfg.max_batch_entries;
        let commit = self.commit_notice();
        let ticks = self.ticks;
        let Role::Leader(l) = &self.role else {
            return;
        };
        let snapshot: BTreeSet<ReplicaId> =
            l.progress.iter().filter(|(_, p)| p.synced && self.needs_snapshot(p)).map(|(id, _)| *id).collect();
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        l.read_seq += 1;
        if l.rounds.len() == MAX_ROUNDS_TRACKED {
            l.rounds.pop_front();
        }
        l.rounds.push_back((l.read_seq, ticks));
        let read_seq = l.read_seq;
        let serving = l.serving;
        // Entries in flight are resent only after the follower's durable prefix stalled this
        // long; otherwise a heartbeat sends only entries not sent yet, at most two batches
        // ahead of that prefix (a catch-up pipeline that never floods the link with copies).
        let stall_ticks = (self.cfg.election_timeout_min_ticks as u64 / 2).max(1);
        let mut plan = Vec::new();
        for (peer, p) in l.progress.iter_mut() {
            if !p.synced {
                plan.push((*peer, Step::Sync));
                continue;
            }
            if snapshot.contains(peer) {
                plan.push((*peer, Step::Snapshot));
                continue;
            }
            let from = p.durable.max(floor);
            let stalled = ticks.saturating_sub(p.stall_tick) >= stall_ticks;
            let full = p.sent_upto.0.saturating_sub(from.0) >= 2 * batch as u64;
            let missing: Vec<Index> = (from.0 + 1..=last.0)
                .map(Index)
                .filter(|i| !p.acked.contains(i) && (stalled || (!full && *i > p.sent_upto)))
                .take(batch)
                .collect();
            if serving && !missing.is_empty() {
                p.sent_upto = p.sent_upto.max(*missing.last().unwrap());
                if stalled {
                    p.stall_tick = ticks;
                }
            }
            plan.push((*peer, Step::Send(missing)));
        }
        for (peer, step) in plan {
            match step {
                Step::Sync => self.send_sync(peer),
                Step::Snapshot => self.maybe_send_snapshot(peer),
                Step::Send(missing) => {
                    if serving && !missing.is_empty() {
                        let entries: Vec<Entry> =
                            missing.iter().filter_map(|i| self.sendable_entry(*i).cloned()).collect();
                        self.send(peer, Message::Append { term, entries, commit: commit.clone() });
                    }
                    self.send(peer, Message::Heartbeat { term, commit: commit.clone(), read_seq });
                }
            }
        }
    }

    pub(super) fn on_append(&mut self, from: ReplicaId, term: Term, entries: Vec<Entry>, commit: CommitNotice) {
        if !self.accept_leader(from, term) {
            return;
        }
        if self.hard.sync != term || self.sync_pending.is_some() {
            self.send_ack(from, Vec::new(), 0); // not synced: the leader will sync us
            return;
        }
        let mut acked = Vec::new();
        let mut to_persist = Vec::new();
        for e in entries {
            debug_assert_eq!(e.ballot, term);
            if e.index <= self.log.checkpoint() {
                acked.push(e.index); // applied and synced under our checkpoint
                continue;
            }
            if self.is_committed(e.index) {
                // Committed elsewhere, but an acknowledgement still means durable *here*: a
                // leader that believed otherwise would never resend it after our crash.
                if self.log.get(e.index).is_some_and(|s| s.durable) {
                    acked.push(e.index);
                }
                continue;
            }
            match self.log.get(e.index) {
                Some(slot) if slot.entry.ballot == e.ballot => {
                    if slot.durable {
                        acked.push(e.index);
                    }
                }
                _ => {
                    self.gate.remove(e.index.0);
                    self.gate_insert(&e);
                    self.put_entry(e.clone(), false);
                    to_persist.push(e);
                }
            }
        }
        self.persist_entries(to_persist);
        self.apply_commit_notice(&commit);
        if self.cfg.mode == Mode::Raft {
            acked.clear(); // classic Raft acknowledges only the contiguous durable prefix
        }
        self.send_ack(from, acked, 0);
    }

    pub(super) fn on_heartbeat(&mut self, from: ReplicaId, term: Term, commit: CommitNotice, read_seq: u64) {
        if !self.accept_leader(from, term) {
            return;
        }
        if self.hard.sync == term && self.sync_pending.is_none() {
            self.apply_commit_notice(&commit);
        }
        self.send_ack(from, Vec::new(), read_seq);
    }

    fn apply_commit_notice(&mut self, commit: &CommitNotice) {
        // Only what can be new: held indices above our watermark and the scanned floor up to
        // the notice's watermark, and the notice's out-of-order ones (a scan of the whole log
        // per message was costly).
        let from = self.committed.max(self.notice_scanned).next();
        let mut held: Vec<Index> =
            self.log.indices_in(from, commit.watermark).filter(|i| !self.is_committed(*i)).collect();
        // The notice's runs and our own committed set are both ascending: one merged walk of the
        // indices we hold in each run, rather than two set lookups per index the run names.
        for &(first, last) in &commit.above {
            let first = first.max(self.committed.next());
            let mut ours = self.committed_above.range(first..=last.max(first)).peekable();
            for i in self.log.indices_in(first, last) {
                while ours.next_if(|c| **c < i).is_some() {}
                if ours.peek() != Some(&&i) {
                    held.push(i);
                }
            }
        }
        for i in held {
            self.mark_committed(i);
        }
        // Every held index up to the notice's watermark is committed now.
        self.notice_scanned = self.notice_scanned.max(commit.watermark);
        self.try_apply();
    }

    pub(super) fn send_ack(&mut self, to: ReplicaId, acked: Vec<Index>, read_seq: u64) {
        let synced = self.hard.sync == self.hard.term && self.sync_pending.is_none();
        let message = Message::Ack {
            term: self.hard.term,
            acked,
            durable: self.log.durable_prefix(),
            committed: self.committed,
            synced,
            sync_received: self.sync_received(),
            read_seq,
        };
        self.send(to, message);
    }

    pub(super) fn on_persisted(&mut self, token: u64) {
        let Some(copies) = self.writes_in_flight.remove(&token) else {
            return;
        };
        // Copies this write made durable: at our ballot (what a follower acknowledges), and all.
        let mut newly_durable = Vec::new();
        let mut marked = Vec::new();
        for (index, ballot, term) in copies {
            if self.log.mark_durable(index, ballot, term) {
                marked.push(index);
                if ballot == self.hard.term {
                    newly_durable.push(index);
                }
            }
        }
        let mut sync_done = false;
        if let Some(pending) = &mut self.sync_pending {
            if pending.tokens.remove(&token) {
                self.check_sync_done();
                sync_done = self.sync_pending.is_none();
            }
        }
        match &self.role {
            Role::Leader(_) if self.cfg.mode == Mode::Parallel && !sync_done => {
                // Only these counts changed: our own copies just marked durable, and a
                // configuration entry's (it counts our durable prefix, which they may have
                // moved; by the barrier it is the one uncommitted entry, and the last).
                // Why not the full scan: with a watermark held by a write that waits for
                // stragglers, it walks every entry of the in-flight window per durable write.
                let config = self.log.config_index();
                if config > self.committed {
                    marked.push(config);
                }
                self.try_commit_among(marked);
            }
            Role::Leader(_) => self.try_commit(),
            Role::Follower => {
                let synced = self.hard.sync == self.hard.term && self.sync_pending.is_none();
                if let (true, Some(leader)) = (synced, self.leader_hint) {
                    if self.cfg.mode == Mode::Raft {
                        newly_durable.clear();
                    }
                    self.send_ack(leader, newly_durable, 0);
                }
            }
            _ => {}
        }
    }

    // The fields of `Message::Ack`, destructured by the dispatcher like every other handler.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_ack(
        &mut self,
        from: ReplicaId,
        term: Term,
        acked: Vec<Index>,
        durable: Index,
        committed: Index,
        synced: bool,
        sync_received: Index,
        read_seq: u64,
    ) {
        if term > self.hard.term {
            self.become_follower(term, None);
            return;
        }
        let ticks = self.ticks;
        let (parallel, watermark, last) = (self.cfg.mode == Mode::Parallel, self.committed, self.log.last_index());
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if term < self.hard.term {
            return;
        }
        let Some(p) = l.progress.get_mut(&from) else {
            return; // not a member (any more)
        };
        let was_synced = p.synced;
        p.last_heard_tick = Some(ticks);
        p.committed = Some(committed);
        p.synced = synced;
        p.read_seq = p.read_seq.max(read_seq);
        // Parallel mode, from a peer synced before and after: the indices whose count this
        // acknowledgement can raise, the only ones it can make committable (see
        // `try_commit_among`). `None`: look at every index.
        let mut candidates: Option<Vec<Index>> = None;
        if synced {
            if durable > p.durable {
                p.stall_tick = ticks;
            }
            if durable > p.durable || durable >= last || !was_synced {
                p.moved_tick = ticks;
            }
            let from_index = p.durable.max(watermark);
            if parallel && was_synced && durable.0.saturating_sub(from_index.0) <= MAX_PREFIX_CANDIDATES {
                // Indices at or below the watermark among them are skipped by `commit_quorums`.
                let mut c: Vec<Index> = acked.clone();
                c.extend((from_index.0 + 1..=durable.0).map(Index));
                candidates = Some(c);
            }
            p.durable = p.durable.max(durable);
            p.acked.extend(acked);
            let floor = p.durable;
            p.acked = p.acked.split_off(&floor.next());
            p.sync_received = Index(0);
        } else {
            p.durable = Index(0);
            p.acked.clear();
            p.sent_upto = Index(0);
            p.sync_received = sync_received;
        }
        if !synced {
            // Sync (or snapshot) it now rather than waiting for the next heartbeat, but at
            // most once per tick.
            if p.last_sync_tick != Some(ticks) {
                self.send_sync(from);
            }
            return;
        }
        if !was_synced {
            self.maybe_start_serving();
        }
        match candidates {
            Some(c) => self.try_commit_among(c),
            None => self.try_commit(),
        }
        self.try_reads();
        // The echo may confirm a waiting membership change, and a follower's progress may open
        // the flow control (see `flow`).
        self.drain_queue();
    }

    /// Commits every index durable on a quorum. Parallel mode: each index on its own;
    /// Raft mode: only in order.
    ///
    /// Counted in the membership in force: with the configuration barrier every entry above the
    /// committed watermark belongs to it (the entries before an uncommitted configuration entry
    /// are all committed).
    pub(super) fn try_commit(&mut self) {
        self.commit_quorums(None);
    }

    /// [`Replica::try_commit`] for Parallel mode, looking only at `candidates`: after an
    /// acknowledgement, the indices it acknowledged and those its durable prefix newly covers;
    /// after the leader's own durable write, the copies it made durable and the uncommitted
    /// configuration entry. No other index's count changed, and every other event that changes
    /// counts (a peer becoming synced, serving, a configuration) is followed by a full
    /// [`Replica::try_commit`], so an index left out had no quorum before and has none now. Why: the full scan walks the whole in-flight window (two peers, a set lookup each)
    /// on every acknowledgement, two per write: in a profile of 4 KiB random writes at iodepth
    /// 32 it was the leader's most costly function of its own.
    fn try_commit_among(&mut self, mut candidates: Vec<Index>) {
        debug_assert_eq!(self.cfg.mode, Mode::Parallel, "Raft mode commits in order: a full scan");
        candidates.sort_unstable();
        candidates.dedup();
        self.commit_quorums(Some(candidates));
    }

    /// Commits the indices durable on a quorum among `candidates` (ascending), or among all
    /// held above the watermark.
    fn commit_quorums(&mut self, candidates: Option<Vec<Index>>) {
        let membership = self.log.membership();
        let quorum = membership.quorum();
        let me_voter = membership.is_voter(self.cfg.id);
        let Role::Leader(l) = &self.role else { return };
        if !l.serving {
            return;
        }
        let mut newly = Vec::new();
        // One of the two walks, without boxing either (this runs on every acknowledgement).
        let (among, all) = match &candidates {
            Some(c) => (Some(c.iter().filter(|i| **i > self.committed).filter_map(|i| self.log.get(*i))), None),
            None => (None, Some(self.log.iter_from(self.committed))),
        };
        for slot in among.into_iter().flatten().chain(all.into_iter().flatten()) {
            let i = slot.entry.index;
            if self.committed_above.contains(&i) {
                continue;
            }
            // A configuration entry counts only copies whose whole log prefix up to it is
            // durable (see `membership`, rule 6): logs have holes, and the new configuration's
            // majority must hold every entry committed before it.
            let whole_prefix = matches!(slot.entry.op, Op::Config(_));
            let mine = if whole_prefix { self.log.durable_prefix() >= i } else { slot.durable };
            let mut count = usize::from(mine && me_voter);
            count += l
                .progress
                .iter()
                .filter(|(id, p)| {
                    let holds = p.durable >= i || (!whole_prefix && p.acked.contains(&i));
                    membership.is_voter(**id) && p.synced && holds
                })
                .count();
            if count >= quorum {
                newly.push(i);
            } else if self.cfg.mode == Mode::Raft {
                break;
            }
        }
        if newly.is_empty() {
            return;
        }
        for i in newly {
            self.mark_committed(i);
        }
        self.try_apply();
        self.drain_queue();
    }
}
