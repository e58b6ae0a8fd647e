//! The simulated operator: during the fault phase it changes the group's membership one server
//! at a time, through the same `Event::ChangeMembership` a real operator's command becomes.
//!
//! Scenarios: replace a voter (often the leader) by a spare (add learner, promote once caught
//! up, remove the old one); remove a voter first and then add a spare back; add a learner and
//! remove it again. A removed server keeps running as a zombie for a while (it must not disrupt
//! the group), then its disk is wiped and it becomes a spare again.

use std::collections::{BTreeSet, VecDeque};

use super::{redirect, Ev, Net, Node, Sim, CLIENT_RETRY};
use crate::io::ClientError;
use crate::membership::{Membership, MembershipChange, MembershipError};
use crate::rng::Rng;
use crate::types::{ClientId, ReplicaId, RequestId};

/// One change on its way to the group.
#[derive(Clone, Debug)]
pub struct InFlight {
    pub id: RequestId,
    pub change: MembershipChange,
    pub target: ReplicaId,
    /// Resend (to the next server when `timeout`) at this time.
    pub retry_at: u64,
    pub timeout: bool,
}

pub struct Admin {
    pub id: ClientId,
    pub rng: Rng,
    next_seq: u64,
    /// The membership after every change answered `Ok`: exact, since only we change it.
    pub membership: Membership,
    /// Changes of the scenario under way, in order.
    pub plan: VecDeque<MembershipChange>,
    pub in_flight: Option<InFlight>,
    /// Removed servers whose disks will be wiped (then they are spares again).
    pub wiping: BTreeSet<ReplicaId>,
    pub leader_guess: ReplicaId,
    pub changes_done: u64,
}

/// A scenario's changes, or `None` when no spare is free.
pub fn plan(
    rng: &mut Rng,
    membership: &Membership,
    nodes: usize,
    wiping: &BTreeSet<ReplicaId>,
    leader: Option<ReplicaId>,
) -> Option<Vec<MembershipChange>> {
    let spares: Vec<ReplicaId> =
        (0..nodes as u32).map(ReplicaId).filter(|id| !membership.contains(*id) && !wiping.contains(id)).collect();
    let spare = *spares.get(rng.range(0, spares.len().max(1) as u64) as usize)?;
    let voters: Vec<ReplicaId> = membership.voters.iter().copied().collect();
    let victim = match leader {
        Some(l) if membership.is_voter(l) && rng.chance(0.4) => l,
        _ => voters[rng.range(0, voters.len() as u64) as usize],
    };
    use MembershipChange::*;
    let roll = rng.range(0, 100);
    Some(if roll < 60 {
        vec![AddLearner(spare), Promote(spare), Remove(victim)]
    } else if roll < 85 && voters.len() >= 3 {
        vec![Remove(victim), AddLearner(spare), Promote(spare)]
    } else {
        vec![AddLearner(spare), Remove(spare)]
    })
}

impl Admin {
    pub fn new(id: ClientId, rng: Rng, membership: Membership) -> Admin {
        let leader_guess = *membership.voters.iter().next().expect("bootstrap voters");
        Admin {
            id,
            rng,
            next_seq: 0,
            membership,
            plan: VecDeque::new(),
            in_flight: None,
            wiping: BTreeSet::new(),
            leader_guess,
            changes_done: 0,
        }
    }

    pub fn idle(&self) -> bool {
        self.plan.is_empty() && self.in_flight.is_none()
    }

    /// Starts the next change of the plan, if none is in flight.
    pub fn next_change(&mut self, now: u64, retry: u64) -> Option<InFlight> {
        if self.in_flight.is_some() {
            return None;
        }
        let change = self.plan.pop_front()?;
        let id = RequestId { client: self.id, seq: self.next_seq };
        self.next_seq += 1;
        let f = InFlight { id, change, target: self.leader_guess, retry_at: now + retry, timeout: true };
        self.in_flight = Some(f.clone());
        Some(f)
    }
}

/// How often the operator looks at its work.
const ADMIN_POLL: u64 = 50;

impl Sim {
    pub(super) fn admin_wake(&mut self) {
        let (now, nodes, fault_time) = (self.now, self.replicas.len(), self.cfg.fault_time);
        let leader = self.current_leader().map(|l| ReplicaId(l as u32));
        let Some(admin) = &mut self.admin else { return };
        let mut send = None;
        if let Some(f) = &mut admin.in_flight {
            if f.retry_at <= now {
                if f.timeout {
                    f.target = ReplicaId((f.target.0 + 1) % nodes as u32); // no answer: try another
                }
                f.retry_at = now + CLIENT_RETRY;
                f.timeout = true;
                send = Some(f.clone());
            }
        } else if admin.plan.is_empty() && now < fault_time && admin.rng.chance(0.3) {
            if let Some(changes) = plan(&mut admin.rng, &admin.membership, nodes, &admin.wiping, leader) {
                admin.plan.extend(changes);
            }
        }
        if send.is_none() {
            send = admin.next_change(now, CLIENT_RETRY);
        }
        let keep_polling = now < fault_time || !admin.idle();
        if let Some(f) = send {
            self.net_send(Node::Admin, Node::Replica(f.target.0 as usize), Net::Change { id: f.id, change: f.change });
        }
        if keep_polling {
            self.schedule(ADMIN_POLL, Ev::AdminWake);
        }
    }

    pub(super) fn admin_reply(&mut self, from: Node, id: RequestId, result: Result<(), ClientError>) {
        let Node::Replica(from) = from else { return };
        let (now, nodes) = (self.now, self.replicas.len() as u32);
        let Some(admin) = &mut self.admin else { return };
        let Some(f) = &mut admin.in_flight else { return };
        if f.id != id {
            return; // a late duplicate
        }
        match result {
            Ok(()) => {
                let change = f.change;
                admin.in_flight = None;
                admin.leader_guess = ReplicaId(from as u32);
                admin.changes_done += 1;
                self.stats.membership_changes += 1;
                match admin.membership.apply(change) {
                    Ok(next) => admin.membership = next,
                    Err(e) => {
                        let v = format!("membership: {change:?} answered Ok but it is invalid after the others ({e})");
                        self.violations.push(v);
                        return;
                    }
                }
                if let MembershipChange::Remove(gone) = change {
                    admin.wiping.insert(gone);
                    let delay = admin.rng.range(100, 1500);
                    self.schedule(delay, Ev::Wipe(gone.0 as usize));
                }
            }
            Err(ClientError::NotLeader { hint }) => {
                let next = redirect(hint, from, nodes);
                admin.leader_guess = next;
                f.target = next;
                f.retry_at = now + 5;
                f.timeout = false;
            }
            Err(ClientError::Busy) | Err(ClientError::Membership(MembershipError::LearnerBehind)) => {
                f.retry_at = now + 30;
                f.timeout = false;
            }
            Err(ClientError::Membership(e)) => {
                let v = format!("membership: {:?} refused ({e}) though the operator's view allows it", f.change);
                self.violations.push(v);
            }
        }
    }

    /// The removed server's disk is wiped and it starts afresh as a joining replica: a spare.
    pub(super) fn wipe(&mut self, r: usize) {
        let id = ReplicaId(r as u32);
        let Some(admin) = &mut self.admin else { return };
        if admin.membership.contains(id) || !admin.wiping.remove(&id) {
            return;
        }
        let s = &mut self.replicas[r];
        s.replica = None;
        s.disk = s.disk.wiped(); // data gone, hard state kept (membership rule 7)
        s.bootstrap = false;
        self.start_replica(r);
    }
}
