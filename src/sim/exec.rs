//! Delivering messages and executing what replicas ask for: the network (delays, loss,
//! duplication, partitions, or the perf model's delays), a replica's step with its invariant
//! check, and each command's effect on the simulated disks, the network and the clients.

use std::sync::Arc;

use super::{Ev, Net, Node, Sim, CLIENT_RETRY};
use crate::entry::Entry;
use crate::io::{Command, Event};
use crate::message::Message;
use crate::replica::RoleKind;
use crate::types::ReplicaId;

impl Sim {
    pub(super) fn net_send(&mut self, from: Node, to: Node, net: Net) {
        self.stats.messages += 1;
        if let (Node::Replica(a), Node::Replica(b)) = (from, to) {
            if self.blocked.contains(&(a, b)) {
                return;
            }
        }
        if self.rng.chance(self.loss) {
            return;
        }
        let copies = if self.rng.chance(self.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if let Some(p) = self.cfg.perf {
                let between_replicas = matches!((from, to), (Node::Replica(_), Node::Replica(_)));
                p.message_delay(between_replicas, &mut self.rng)
            } else if self.rng.chance(0.05) {
                self.rng.range(1, self.max_delay * 4)
            } else {
                self.rng.range(1, self.max_delay + 1)
            };
            self.schedule(delay, Ev::Deliver { to, from, net: net.clone() });
        }
    }

    pub(super) fn deliver(&mut self, to: Node, from: Node, net: Net) {
        match (to, net) {
            (Node::Replica(r), Net::Peer(message, image)) => {
                let Node::Replica(f) = from else { return };
                if self.replicas[r].replica.is_none() {
                    return;
                }
                self.incoming_image = image;
                self.step(r, Event::Receive { from: ReplicaId(f as u32), message });
                self.incoming_image = None;
            }
            (Node::Replica(r), Net::Request(request)) => {
                if self.replicas[r].replica.is_some() {
                    self.step(r, Event::Propose(request));
                }
            }
            (Node::Replica(r), Net::ReadRequest { id, offset, len_bytes }) => {
                if self.replicas[r].replica.is_some() {
                    self.step(r, Event::Read { id, offset, len_bytes });
                }
            }
            (Node::Replica(r), Net::Change { id, change }) => {
                if self.replicas[r].replica.is_some() {
                    self.step(r, Event::ChangeMembership { id, change });
                }
            }
            (Node::Admin, Net::Reply { id, result }) => self.admin_reply(from, id, result),
            (Node::Client(c), Net::Reply { id, result }) => self.client_reply(c, from, id, result, None),
            (Node::Client(c), Net::ReadReply { id, blocks }) => self.client_reply(c, from, id, Ok(()), Some(blocks)),
            _ => unreachable!("misrouted message"),
        }
    }

    /// Steps replica `r` and executes the commands it produced (with `batch_rounds`, a write
    /// or an acknowledgement leaves them for the round's end, as the servers do).
    pub(super) fn step(&mut self, r: usize, event: Event) {
        let defer = self.cfg.batch_rounds
            && matches!(&event, Event::Propose(_) | Event::Receive { message: Message::Ack { .. }, .. });
        let sim_replica = &mut self.replicas[r];
        let replica = sim_replica.replica.as_mut().expect("step of a down replica");
        replica.step(event);
        replica.check_invariants();
        if replica.hole_depth() > replica.config().lbb_span as u64 {
            self.stats.wide_holes += 1;
        }
        let (role, term, id) = (replica.role(), replica.term(), replica.id());
        if matches!(role, RoleKind::Leader | RoleKind::LeaderMerging) {
            let prev = *self.leaders.entry(term).or_insert(id);
            if prev != id {
                self.violations.push(format!("election safety: term {} has leaders {:?} and {:?}", term.0, prev, id));
            }
        }
        let sim_replica = &mut self.replicas[r];
        sim_replica.deferred += 1;
        if defer {
            self.stats.deferred_steps += 1;
            if sim_replica.deferred == 1 {
                // A round lasts a moment: what arrives meanwhile joins it.
                let incarnation = sim_replica.incarnation;
                let round = self.rng.range(0, 3);
                self.schedule(round, Ev::Flush { r, incarnation });
            }
            return;
        }
        self.drain(r);
    }

    /// Executes the commands replica `r` produced since its last drain.
    pub(super) fn drain(&mut self, r: usize) {
        let sim_replica = &mut self.replicas[r];
        let steps = std::mem::take(&mut sim_replica.deferred);
        if steps == 0 {
            return;
        }
        if steps >= 2 {
            self.stats.batched_drains += 1;
        }
        let replica = sim_replica.replica.as_mut().expect("drain of a down replica");
        let commands = replica.take_commands();
        let incarnation = self.replicas[r].incarnation;
        for command in commands {
            self.execute(r, incarnation, command);
        }
    }

    pub(super) fn disk_delay(&mut self) -> u64 {
        match self.cfg.perf {
            Some(p) => p.disk,
            None => self.rng.range(1, 16),
        }
    }

    /// How long a client waits for an answer before it resends.
    pub(super) fn client_retry(&self) -> u64 {
        self.cfg.perf.map_or(CLIENT_RETRY, |p| p.client_retry())
    }

    pub(super) fn execute(&mut self, r: usize, incarnation: u64, command: Command) {
        match command {
            Command::PersistHardState(hard) => self.replicas[r].disk.persist_hard_state(hard),
            Command::PersistEntries { token, entries } => {
                self.replicas[r].disk.issue_entries(token, entries);
                let d = self.disk_delay();
                self.schedule(d, Ev::DiskDone { r, incarnation, token });
            }
            Command::TruncateLog { token, after } => {
                self.replicas[r].disk.issue_truncate(token, after);
                let d = self.disk_delay();
                self.schedule(d, Ev::DiskDone { r, incarnation, token });
            }
            Command::PruneLog { through } => self.replicas[r].disk.prune(through),
            Command::Send { to, message } => {
                self.check_message_bytes(r, &message);
                self.net_send(Node::Replica(r), Node::Replica(to.0 as usize), Net::Peer(message, None));
            }
            Command::Apply { entry } => {
                let d = match self.cfg.perf {
                    // One apply at a time per replica, as a server's core thread applies.
                    Some(p) => {
                        let done = self.apply_free_at[r].max(self.now) + p.apply;
                        self.apply_free_at[r] = done;
                        done - self.now
                    }
                    None => self.rng.range(1, 8),
                };
                self.schedule(d, Ev::ApplyDone { r, incarnation, entry });
            }
            Command::Read { id, offset, len_bytes } => {
                let d = self.rng.range(1, 8);
                self.schedule(d, Ev::ReadDone { r, incarnation, id, offset, len_bytes });
            }
            Command::Reply { id, result } => {
                let to = if self.admin.as_ref().is_some_and(|a| a.id == id.client) {
                    Node::Admin
                } else {
                    Node::Client(id.client.0 as usize - 1)
                };
                self.net_send(Node::Replica(r), to, Net::Reply { id, result });
            }
            Command::Checkpoint { state } => {
                self.stats.checkpoints += 1;
                let d = self.disk_delay();
                self.schedule(d, Ev::CheckpointDone { r, incarnation, state });
            }
            Command::SendSnapshot { to, message } => {
                self.check_message_bytes(r, &message);
                let image = Arc::new(self.replicas[r].disk.image());
                self.net_send(Node::Replica(r), Node::Replica(to.0 as usize), Net::Peer(message, Some(image)));
            }
            Command::InstallSnapshot { from: _, state } => {
                let image = self.incoming_image.clone().expect("InstallSnapshot without an image");
                self.replicas[r].disk.install((*image).clone(), state);
                self.stats.snapshots_installed += 1;
            }
        }
    }

    /// Every replica must apply the same entry at each index, and no request at two indices.
    pub(super) fn check_apply(&mut self, entry: &Entry) {
        let digest = {
            let mut e = entry.clone();
            e.ballot = e.term;
            e.look_behind = lbb::LookBehind::default();
            e.checksum()
        };
        let key = (entry.term, entry.request, digest);
        match self.applied_at.get(&entry.index) {
            Some(prev) if *prev != key => self
                .violations
                .push(format!("apply agreement: index {} applied as {:?} and as {:?}", entry.index.0, prev, key)),
            Some(_) => {}
            None => {
                self.applied_at.insert(entry.index, key);
            }
        }
        if let Some(id) = entry.request {
            let prev = *self.request_index.entry(id).or_insert(entry.index);
            if prev != entry.index {
                self.violations
                    .push(format!("at-most-once: request {id:?} applied at {} and {}", prev.0, entry.index.0));
            }
        }
        if entry.index.0 > self.applied_at.range(..entry.index).next_back().map_or(0, |(i, _)| i.0) + 1 {
            self.stats.out_of_order_applies += 1;
        }
    }
}
