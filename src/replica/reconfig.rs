//! Membership changes at the leader: accept one single-server change at a time, append it
//! behind a barrier, keep the replication progress in step with the membership, and step
//! down once a change that removed the leader is applied. The rules and the safety argument
//! are in `crate::membership`.

use super::{PendingChange, Progress, Replica, Role};
use crate::entry::Op;
use crate::io::{ClientError, ClientRequest};
use crate::membership::{MembershipChange, MembershipError};
use crate::types::{Index, ReplicaId, RequestId};

impl Replica {
    /// An operator's change. Answered `Ok` once the configuration entry is applied; a retry of
    /// an applied change (same `id`) is answered `Ok` again. Refusals come only from a leader
    /// that confirmed its leadership after the change arrived.
    ///
    /// Contract: the changes of one client id are issued one after another, so a change's own
    /// sequence number is its client's floor.
    pub(super) fn on_change_membership(&mut self, id: RequestId, change: MembershipChange) {
        if !self.serving_or_refuse(id) {
            return;
        }
        if self.table.covers(id) {
            self.reply(id, Ok(()));
            return;
        }
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        if let Some(&index) = l.in_log.get(&id) {
            l.waiters.entry(index).or_default().push(id);
            return;
        }
        match l.change {
            Some(pending) if pending.id == id => return, // answered when decided
            Some(_) => {
                self.reply(id, Err(ClientError::Busy));
                return;
            }
            None => {}
        }
        l.change = Some(PendingChange { id, change, read_seq: l.read_seq + 1 });
        self.broadcast_heartbeat(); // the read-index round that confirms our leadership
        self.drain_queue();
    }

    /// Valid against the membership in force, and a promoted learner has caught up: it adopted
    /// our merged log (so holds the image up to its checkpoint) and is durable to within one
    /// in-flight window of our committed watermark.
    fn check_change(&self, change: MembershipChange) -> Result<(), MembershipError> {
        self.log.membership().apply(change)?;
        if let MembershipChange::Promote(learner) = change {
            let Role::Leader(l) = &self.role else { return Err(MembershipError::LearnerBehind) };
            let caught_up = l
                .progress
                .get(&learner)
                .is_some_and(|p| p.synced && p.durable.0 + self.cfg.window() >= self.committed.0);
            if !caught_up {
                return Err(MembershipError::LearnerBehind);
            }
        }
        Ok(())
    }

    /// The configuration barrier. Returns true while ordinary proposals must not be appended:
    /// a configuration entry is uncommitted, or an accepted change waits for its leadership
    /// confirmation or for every earlier entry to commit. Decides the waiting change (refuse,
    /// or append its configuration entry) as soon as it can.
    pub(super) fn config_barrier(&mut self) -> bool {
        if self.log.config_index() > self.committed {
            return true;
        }
        let Role::Leader(l) = &self.role else { return false };
        let Some(pending) = l.change else { return false };
        if !l.serving || self.confirmed_read_seq() < pending.read_seq {
            return true;
        }
        if let Err(e) = self.check_change(pending.change) {
            let Role::Leader(l) = &mut self.role else { unreachable!() };
            l.change = None;
            self.reply(pending.id, Err(ClientError::Membership(e)));
            return false;
        }
        if self.log.last_index() > self.committed {
            return true; // every earlier entry commits first
        }
        let Role::Leader(l) = &mut self.role else { unreachable!() };
        l.change = None;
        let next = self.log.membership().apply(pending.change).expect("checked change");
        let id = pending.id;
        self.append(ClientRequest { id, floor: id.seq, op: Op::Config(next) });
        true
    }

    /// Makes the leader's progress map hold exactly the other members: new ones start
    /// unsynced (the next heartbeat asks for their watermark, then syncs or snapshots them),
    /// removed ones are forgotten.
    pub(super) fn sync_progress(&mut self) {
        let peers: Vec<ReplicaId> = self.peers();
        let Role::Leader(l) = &mut self.role else { return };
        l.progress.retain(|id, _| peers.contains(id));
        for peer in peers {
            l.progress.entry(peer).or_insert_with(Progress::default);
        }
    }

    /// A leader that is no voter of the applied configuration hands over: it stops serving and
    /// lets the remaining voters elect a leader (it never campaigns again in this group).
    pub(super) fn step_down_if_removed(&mut self) {
        if !matches!(self.role, Role::Leader(_)) || self.is_voter(self.cfg.id) {
            return;
        }
        let config = self.log.config_index();
        if config > Index(0) && config <= self.applied_watermark() {
            let term = self.hard.term;
            self.become_follower(term, None);
        }
    }
}
