//! LBB-gated apply, leader reads, checkpoints and streaming catch-up.

use lbb::RangeSet;

use super::{PendingRead, Replica, Role};
use crate::entry::{granule_range, Entry, Op};
use crate::io::{CheckpointState, Command};
use crate::message::Message;
use crate::types::{Index, ReplicaId, RequestId, Term};

impl Replica {
    /// Starts applying every committed entry the look-behind buffer allows.
    pub(super) fn try_apply(&mut self) {
        loop {
            let blocked: RangeSet = {
                let mut set = RangeSet::new();
                for r in self.executing_reads.values() {
                    set.union_with(r);
                }
                set
            };
            let ready = self.gate.ready(&blocked);
            if ready.is_empty() {
                break;
            }
            let mut finished_noop = false;
            for i in ready {
                let index = Index(i);
                self.gate.start_apply(i);
                let entry = self.log.entry(index).expect("ready entry not held").clone();
                if matches!(entry.op, Op::Noop) {
                    self.applied(index);
                    finished_noop = true;
                } else {
                    self.applying.insert(index, entry.ranges());
                    self.out.push(Command::Apply { entry });
                }
            }
            if !finished_noop {
                break;
            }
        }
    }

    pub(super) fn on_applied(&mut self, index: Index) {
        if self.applying.remove(&index).is_none() {
            return; // not ours (never happens with a correct driver)
        }
        self.applied(index);
        self.try_apply();
        self.try_reads();
        self.maybe_checkpoint();
    }

    fn applied(&mut self, index: Index) {
        self.gate.finish_apply(index.0);
        let aw = self.applied_watermark();
        while self.folded < aw {
            let next = self.folded.next();
            let entry = self.log.entry(next).expect("applied entry not held");
            self.table.fold(entry);
            self.folded_bytes_since_checkpoint += crate::io::write_data(&entry.op).map_or(0, |d| d.len() as u64);
            if let (Role::Leader(l), Some(id)) = (&mut self.role, entry.request) {
                l.in_log.remove(&id);
            }
            self.folded = next;
            self.last_fold_tick = self.ticks;
        }
        if let Role::Leader(l) = &mut self.role {
            if let Some(ids) = l.waiters.remove(&index) {
                for id in ids {
                    self.out.push(Command::Reply { id, result: Ok(()) });
                }
            }
        }
        self.step_down_if_removed();
    }

    /// A read waits for nothing but overlapping writes while the read lease holds (or the group
    /// has one voter); otherwise it joins a read-index round started for it.
    pub(super) fn on_read(&mut self, id: RequestId, offset: u64, len_bytes: u64) {
        if !self.serving_or_refuse(id) {
            return;
        }
        let fence = self.log.last_index();
        let leased = self.quorum() == 1 || self.cfg.naive.unsafe_reads || self.lease_valid();
        if leased {
            self.reads_leased += 1;
        } else {
            self.reads_with_round += 1;
        }
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        let ranges = RangeSet::single(granule_range(offset, len_bytes));
        // Sequence 0 is confirmed from the start; the next broadcast's is confirmed by its echoes.
        let seq = if leased { 0 } else { l.read_seq + 1 };
        l.reads.push(PendingRead { id, offset, len_bytes, ranges, fence, seq });
        if leased {
            self.try_reads();
        } else {
            self.broadcast_heartbeat();
        }
    }

    /// Whether this leader may serve a read without a round: a quorum echoed a round sent less
    /// than `lease_ticks` ago, so no voter of that quorum helps elect another leader yet.
    fn lease_valid(&self) -> bool {
        let Role::Leader(l) = &self.role else { return false };
        self.cfg.lease_ticks > 0 && self.ticks < l.lease_until
    }

    /// Extends the lease by every round up to `confirmed` (echoed by a quorum). With
    /// `lease_ticks` 0 the lease never reaches past the current tick, so it never holds.
    fn renew_lease(&mut self, confirmed: u64) {
        let lease = self.cfg.lease_ticks as u64;
        let Role::Leader(l) = &mut self.role else { return };
        while let Some(&(seq, sent)) = l.rounds.front() {
            if seq > confirmed {
                break;
            }
            l.rounds.pop_front();
            l.lease_until = l.lease_until.max(sent + lease);
        }
    }

    /// An unknown stretch of time passed (see `Event::ClockJump`): the lease, and the send ticks
    /// of rounds still unconfirmed, no longer say how long ago anything happened.
    pub(super) fn on_clock_jump(&mut self) {
        if self.cfg.naive.lease_ignores_pauses {
            return;
        }
        if let Role::Leader(l) = &mut self.role {
            l.lease_until = 0;
            l.rounds.clear();
        }
    }

    /// The highest read-index sequence a quorum of voters has echoed: leadership is confirmed
    /// for every round up to it.
    pub(super) fn confirmed_read_seq(&self) -> u64 {
        let membership = self.log.membership();
        let quorum = membership.quorum();
        let Role::Leader(l) = &self.role else { return 0 };
        let mut echoes: Vec<u64> =
            l.progress.iter().filter(|(id, _)| membership.is_voter(**id)).map(|(_, p)| p.read_seq).collect();
        if membership.is_voter(self.cfg.id) {
            echoes.push(l.read_seq); // ourselves
        }
        echoes.resize(echoes.len().max(quorum), 0);
        echoes.sort_unstable_by(|a, b| b.cmp(a));
        echoes[quorum - 1]
    }

    /// Executes every read whose leadership is confirmed and whose overlapping writes up to
    /// its fence are applied.
    pub(super) fn try_reads(&mut self) {
        let confirmed = self.confirmed_read_seq();
        self.renew_lease(confirmed);
        let confirmed = if self.cfg.naive.unsafe_reads { u64::MAX } else { confirmed };
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if l.reads.is_empty() {
            return;
        }
        let mut run = Vec::new();
        l.reads.retain(|r| {
            let ready = r.seq <= confirmed
                && !self.gate.read_must_wait(&r.ranges, r.fence.0)
                && !self.applying.values().any(|a| a.overlaps(&r.ranges));
            if ready {
                run.push(r.clone());
            }
            !ready
        });
        for r in run {
            self.executing_reads.insert(r.id, r.ranges.clone());
            self.out.push(Command::Read { id: r.id, offset: r.offset, len_bytes: r.len_bytes });
        }
    }

    pub(super) fn on_read_done(&mut self, id: RequestId) {
        if self.executing_reads.remove(&id).is_some() {
            self.try_apply();
        }
    }

    /// Takes a checkpoint when enough entries, or enough bytes, were applied since the last one,
    /// or when applying stopped a while ago with entries applied past it.
    pub(super) fn maybe_checkpoint(&mut self) {
        let aw = self.applied_watermark();
        let above = aw > self.log.checkpoint();
        let entries_due = aw.0 >= self.log.checkpoint().0 + self.cfg.checkpoint_interval;
        let bytes_due = above && self.folded_bytes_since_checkpoint >= self.cfg.checkpoint_bytes;
        let idle = self.cfg.checkpoint_idle_ticks;
        let idle_due = above && idle > 0 && self.ticks >= self.last_fold_tick + idle;
        if self.checkpoint_in_progress.is_some() || !(entries_due || bytes_due || idle_due) {
            return;
        }
        self.checkpoint_in_progress = Some(aw);
        self.folded_bytes_since_checkpoint = 0;
        let state = CheckpointState { index: aw, table: self.table.clone(), config: self.log.config_at(aw) };
        self.out.push(Command::Checkpoint { state });
    }

    pub(super) fn on_checkpoint_done(&mut self, index: Index) {
        if self.checkpoint_in_progress != Some(index) {
            return;
        }
        self.checkpoint_in_progress = None;
        if index > self.log.checkpoint() {
            self.retain_before_prune(index);
            self.log.prune_through(index);
            self.out.push(Command::PruneLog { through: index });
        }
    }

    /// Streaming catch-up: at most one snapshot per election timeout per follower.
    pub(super) fn maybe_send_snapshot(&mut self, peer: ReplicaId) {
        let ticks = self.ticks;
        let limit = self.cfg.election_timeout_min_ticks as u64;
        let term = self.hard.term;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let p = l.progress.get_mut(&peer).expect("progress for peer");
        if p.last_snapshot_tick.is_some_and(|t| ticks - t < limit) {
            return;
        }
        p.last_snapshot_tick = Some(ticks);
        // Ship the state at our applied watermark: the client table folded exactly there, and
        // blocks at least that new (fuzzy: later applies may be in the image too, which replay
        // of the log tail above the watermark makes good, since replay is ordered per range).
        // A follower not yet synced also gets our decided merge log above that point.
        let end = l.merge_end;
        let checkpoint = self.applied_watermark();
        let table = self.table.clone();
        let config = self.log.config_at(checkpoint);
        let (entries, upto) = self.decided_chunk(checkpoint, end);
        let message = Message::Snapshot { term, checkpoint, table, config, upto, end, entries };
        self.out.push(Command::SendSnapshot { to: peer, message });
    }

    pub(super) fn on_snapshot(
        &mut self,
        from: ReplicaId,
        term: Term,
        state: CheckpointState,
        upto: Index,
        end: Index,
        entries: Vec<Entry>,
    ) {
        let checkpoint = state.index;
        if !self.accept_leader(from, term) {
            return;
        }
        let busy = !self.applying.is_empty()
            || !self.executing_reads.is_empty()
            || self.checkpoint_in_progress.is_some()
            // A sync still writing; one waiting only for chunks gives way (the leader pruned
            // what the next chunk needed, so the image replaces it).
            || self.sync_pending.as_ref().is_some_and(|p| !p.tokens.is_empty());
        if checkpoint <= self.committed || busy {
            self.send_ack(from, Vec::new(), 0);
            return;
        }
        let table = state.table.clone();
        self.log.install_checkpoint(checkpoint, state.config.clone());
        self.out.push(Command::InstallSnapshot { from, state });
        self.committed = checkpoint;
        self.committed_above.retain(|i| *i > checkpoint);
        while self.committed_above.remove(&self.committed.next()) {
            self.committed = self.committed.next();
        }
        self.gate.reset(checkpoint.0);
        let held: Vec<_> = self.log.iter_from(checkpoint).map(|s| s.entry.clone()).collect();
        for e in &held {
            self.gate_insert(e);
            if self.is_committed(e.index) {
                self.gate.commit(e.index.0);
            }
        }
        self.table = table;
        self.folded = checkpoint;
        if self.hard.sync != term {
            // Adopt the leader's merged log with the image, so a high committed watermark
            // never comes with a stale sync term (the vote rule relies on it).
            let entries: Vec<Entry> = entries.into_iter().filter(|e| e.index > checkpoint).collect();
            let sync_end = end.max(checkpoint);
            let tokens = self.replace_log(entries, sync_end);
            self.start_sync_wait(term, sync_end, upto.max(checkpoint), tokens);
            if self.sync_lacks_chunks() {
                self.send_ack(from, Vec::new(), 0); // asks for the rest in Sync chunks
            }
        } else {
            self.send_ack(from, Vec::new(), 0);
        }
        self.try_apply();
    }
}
