//! Deterministic simulation of one ParallelRaft group and its clients.
//!
//! One seed drives everything: message loss, duplication, reordering and delay; symmetric and
//! asymmetric partitions (including an isolated leader); crashes that lose unsynced writes and
//! tear in-flight WAL records; disk latency; and simulated time. After a fault phase every fault
//! heals and the run must make progress: every client operation completes and all replicas
//! converge to identical blocks.
//!
//! Checkers: one leader per term; every replica applies the same entry at each index; no
//! request applied twice; each 4 KiB block is a linearizable register over the client history
//! (which also catches lost acknowledged writes, judged against the converged final state);
//! liveness and convergence. Replica invariants are checked after every step.

mod admin;
mod checker;
mod client;
mod disk;
mod exec;
pub mod perf;

pub use checker::check_linearizable;
pub use client::{payload, HistoryOp, OpKind};
pub use disk::{Block, BLOCK_SIZE};
pub use perf::PerfModel;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use crate::config::{Config, Mode, NaiveFlags};
use crate::entry::{Entry, Op};
use crate::io::{CheckpointState, ClientError, ClientRequest, Event};
use crate::membership::{Membership, MembershipChange};
use crate::message::Message;
use crate::replica::{Replica, RoleKind};
use crate::rng::Rng;
use crate::types::{ClientId, Index, ReplicaId, RequestId, Term};
use admin::Admin;
use client::Client;
use disk::Disk;

/// Simulated time units per replica tick.
const TICK: u64 = 10;
/// A client resends an unanswered request after this long.
const CLIENT_RETRY: u64 = 150;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub replicas: usize,
    pub mode: Mode,
    pub naive: NaiveFlags,
    pub lbb_span: usize,
    /// `Config::in_flight_window` of every replica (`None`, the span's N + 1, by default, so
    /// the recorded regression seeds keep their schedules).
    pub in_flight_window: Option<u64>,
    pub checkpoint_interval: u64,
    /// `Config::checkpoint_idle_ticks` of every replica (0 by default, so the recorded
    /// regression seeds keep their schedules).
    pub checkpoint_idle_ticks: u64,
    /// `Config::max_sync_bytes` of every replica: a tight one makes new leaders send their
    /// decided logs in many chunks.
    pub max_sync_bytes: u64,
    /// `Config::max_vote_bytes` of every replica.
    pub max_vote_bytes: u64,
    pub clients: usize,
    pub ops_per_client: u64,
    pub volume_blocks: u64,
    /// Faults are injected during `[0, fault_time)`; then everything heals.
    pub fault_time: u64,
    /// After the fault phase, operations must complete and replicas converge within this.
    pub liveness_time: u64,
    /// Turn off every fault (a baseline that must always pass).
    pub faults: bool,
    /// Step writes and acknowledgements as the servers do: their commands wait until the end
    /// of the round (here: the replica's next other step, or a flush 0-2 time units later),
    /// so one append carries every write of the round. Off by default, so the recorded
    /// regression seeds keep their schedules.
    pub batch_rounds: bool,
    /// An operator changes the membership during the fault phase, with `SPARES` extra servers
    /// (off by default, so the recorded regression seeds keep their schedules).
    pub membership: bool,
    /// Measure instead of torture: no faults, the workload and delays of the model, and the
    /// latency of every write recorded (see [`perf`]). `None` for correctness runs.
    pub perf: Option<PerfModel>,
}

/// Servers beyond the bootstrap voters when membership changes are on.
pub const SPARES: usize = 2;

impl SimConfig {
    pub fn new(seed: u64, replicas: usize, mode: Mode) -> SimConfig {
        let defaults = Config::new(ReplicaId(0), Vec::new(), mode, 0);
        SimConfig {
            seed,
            replicas,
            mode,
            naive: NaiveFlags::default(),
            lbb_span: lbb::DEFAULT_SPAN,
            in_flight_window: None,
            checkpoint_interval: 24,
            checkpoint_idle_ticks: 0,
            max_sync_bytes: defaults.max_sync_bytes,
            max_vote_bytes: defaults.max_vote_bytes,
            clients: 3,
            ops_per_client: 40,
            volume_blocks: 12,
            fault_time: 4_000,
            liveness_time: 30_000,
            faults: true,
            batch_rounds: false,
            membership: false,
            perf: None,
        }
    }

    /// Long runs for soak testing off CI.
    pub fn soak(mut self) -> SimConfig {
        self.ops_per_client = 400;
        self.fault_time = 40_000;
        self.liveness_time = 60_000;
        self
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub steps: u64,
    pub messages: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub max_term: u64,
    pub ops_completed: u64,
    pub snapshots_installed: u64,
    pub torn_records: u64,
    pub out_of_order_applies: u64,
    pub membership_changes: u64,
    /// Sync messages that carried only part of a decided log (`max_sync_bytes`).
    pub partial_syncs: u64,
    /// Checkpoints the replicas started.
    pub checkpoints: u64,
    /// Replica steps after which the replica lacked an entry more than the look-behind span
    /// below its last: with any window on a follower that lacks entries the others committed,
    /// and with an in-flight window wider than N + 1 also above the leader's watermark.
    pub wide_holes: u64,
    /// With `batch_rounds`: steps whose commands waited for a later step or flush, and
    /// drains that ran the commands of two or more such steps together.
    pub deferred_steps: u64,
    pub batched_drains: u64,
    pub end_time: u64,
    /// Perf model only: each acknowledged write's (invocation, reply) times, in reply order.
    pub writes: Vec<(u64, u64)>,
}

#[derive(Clone, Debug)]
pub struct SimReport {
    pub seed: u64,
    pub violations: Vec<String>,
    pub stats: SimStats,
}

impl SimReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Replica(usize),
    Client(usize),
    Admin,
}

type Image = Arc<BTreeMap<u64, Block>>;

#[derive(Clone, Debug)]
enum Net {
    Peer(Message, Option<Image>),
    Request(ClientRequest),
    ReadRequest { id: RequestId, offset: u64, len_bytes: u64 },
    Reply { id: RequestId, result: Result<(), ClientError> },
    ReadReply { id: RequestId, blocks: Vec<(Option<RequestId>, Bytes)> },
    Change { id: RequestId, change: MembershipChange },
}

#[derive(Clone, Debug)]
enum Ev {
    Tick(usize),
    Deliver {
        to: Node,
        from: Node,
        net: Net,
    },
    DiskDone {
        r: usize,
        incarnation: u64,
        token: u64,
    },
    ApplyDone {
        r: usize,
        incarnation: u64,
        entry: Entry,
    },
    ReadDone {
        r: usize,
        incarnation: u64,
        id: RequestId,
        offset: u64,
        len_bytes: u64,
    },
    CheckpointDone {
        r: usize,
        incarnation: u64,
        state: CheckpointState,
    },
    /// The end of a round of `r` (see `SimConfig::batch_rounds`).
    Flush {
        r: usize,
        incarnation: u64,
    },
    ClientWake(usize),
    Fault,
    Restart(usize),
    Heal,
    AdminWake,
    /// Wipe a removed server's disk; it becomes a spare.
    Wipe(usize),
}

struct SimReplica {
    replica: Option<Replica>,
    disk: Disk,
    incarnation: u64,
    /// One of the bootstrap voters (a wiped server joins as a new replica instead).
    bootstrap: bool,
    /// Steps since the last drain of its commands (see `SimConfig::batch_rounds`).
    deferred: u32,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    /// Global logical clock for the history: strictly increasing per recorded event.
    clock: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: HashMap<usize, Ev>,
    next_event_id: usize,
    replicas: Vec<SimReplica>,
    clients: Vec<Client>,
    history: Vec<HistoryOp>,
    history_index: HashMap<RequestId, usize>,
    blocked: BTreeSet<(usize, usize)>,
    paused_until: Vec<u64>,
    /// A pause ended (or is under way) that the replica's driver has not reported yet.
    clock_jumped: Vec<bool>,
    loss: f64,
    duplicate: f64,
    max_delay: u64,
    healed: bool,
    leaders: BTreeMap<Term, ReplicaId>,
    applied_at: BTreeMap<Index, (Term, Option<RequestId>, u32)>,
    request_index: HashMap<RequestId, Index>,
    violations: Vec<String>,
    stats: SimStats,
    /// Snapshot image riding with the message being processed.
    incoming_image: Option<Image>,
    admin: Option<Admin>,
    /// Perf model: the earliest time of the next convergence check.
    next_convergence_check: u64,
    /// Perf model: when each replica's applies so far are done.
    apply_free_at: Vec<u64>,
}

/// Runs one seed to completion and reports every violation found.
pub fn run(cfg: &SimConfig) -> SimReport {
    assert!(cfg.perf.is_none() || !cfg.faults, "the perf model measures a run without faults");
    let mut sim = Sim::new(cfg.clone());
    sim.run();
    SimReport { seed: cfg.seed, violations: sim.violations, stats: sim.stats }
}

impl Sim {
    fn new(cfg: SimConfig) -> Sim {
        let mut rng = Rng::new(cfg.seed);
        let nodes = cfg.replicas + if cfg.membership { SPARES } else { 0 };
        let replicas = (0..nodes)
            .map(|r| SimReplica {
                replica: None,
                disk: Disk::default(),
                incarnation: 0,
                bootstrap: r < cfg.replicas,
                deferred: 0,
            })
            .collect();
        let clients = (0..cfg.clients)
            .map(|c| Client {
                id: ClientId(c as u64 + 1),
                next_seq: 0,
                remaining: cfg.ops_per_client,
                iodepth: match cfg.perf {
                    Some(p) => p.iodepth,
                    None => rng.range(1, 5) as usize,
                },
                leader_guess: ReplicaId(rng.range(0, nodes as u64) as u32),
                outstanding: BTreeMap::new(),
                rng: Rng::new(rng.next_u64()),
                next_wake: None,
            })
            .collect();
        let (loss, duplicate, max_delay) = if cfg.faults {
            (rng.range(0, 10) as f64 / 100.0, rng.range(0, 6) as f64 / 100.0, rng.range(5, 60))
        } else {
            (0.0, 0.0, 10)
        };
        let admin = cfg.membership.then(|| {
            let bootstrap = Membership::with_voters((0..cfg.replicas as u32).map(ReplicaId));
            Admin::new(ClientId(cfg.clients as u64 + 1), Rng::new(rng.next_u64()), bootstrap)
        });
        Sim {
            rng,
            now: 0,
            seq: 0,
            clock: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event_id: 0,
            replicas,
            clients,
            history: Vec::new(),
            history_index: HashMap::new(),
            blocked: BTreeSet::new(),
            paused_until: vec![0; nodes],
            clock_jumped: vec![false; nodes],
            loss,
            duplicate,
            max_delay,
            healed: !cfg.faults,
            leaders: BTreeMap::new(),
            applied_at: BTreeMap::new(),
            request_index: HashMap::new(),
            violations: Vec::new(),
            stats: SimStats::default(),
            incoming_image: None,
            admin,
            next_convergence_check: 0,
            apply_free_at: vec![0; nodes],
            cfg,
        }
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        let id = self.next_event_id;
        self.next_event_id += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((self.now + delay, self.seq, id)));
    }

    fn tick_clock(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn replica_config(&self, r: usize) -> Config {
        let voters = if self.replicas[r].bootstrap {
            (0..self.cfg.replicas).map(|i| ReplicaId(i as u32)).collect()
        } else {
            Vec::new() // joins when an operator adds it
        };
        let seed =
            self.cfg.seed.wrapping_mul(31).wrapping_add(r as u64 * 7919 + self.replicas[r].incarnation * 104_729);
        let mut c = Config::new(ReplicaId(r as u32), voters, self.cfg.mode, seed);
        c.lbb_span = self.cfg.lbb_span;
        c.in_flight_window = self.cfg.in_flight_window;
        c.checkpoint_interval = self.cfg.checkpoint_interval;
        c.checkpoint_idle_ticks = self.cfg.checkpoint_idle_ticks;
        c.max_sync_bytes = self.cfg.max_sync_bytes;
        c.max_vote_bytes = self.cfg.max_vote_bytes;
        c.naive = self.cfg.naive;
        c.max_batch_entries = 16;
        if let Some(p) = self.cfg.perf {
            p.configure(&mut c);
        }
        c
    }

    fn start_replica(&mut self, r: usize) {
        self.replicas[r].incarnation += 1;
        self.replicas[r].deferred = 0;
        let recovered = self.replicas[r].disk.recover();
        self.stats.torn_records += recovered.torn_records as u64;
        let cfg = self.replica_config(r);
        self.replicas[r].replica = Some(Replica::recover(cfg, recovered.hard, recovered.checkpoint, recovered.entries));
        let first_tick = self.rng.range(1, TICK + 1);
        self.schedule(first_tick, Ev::Tick(r));
    }

    fn run(&mut self) {
        for r in 0..self.replicas.len() {
            self.start_replica(r);
        }
        if self.admin.is_some() {
            let first = self.rng.range(200, 800);
            self.schedule(first, Ev::AdminWake);
        }
        for c in 0..self.cfg.clients {
            self.schedule_wake(c, 1 + c as u64);
        }
        if self.cfg.faults {
            let first = self.rng.range(100, 600);
            self.schedule(first, Ev::Fault);
            self.schedule(self.cfg.fault_time, Ev::Heal);
        }
        let deadline = self.cfg.fault_time + self.cfg.liveness_time;
        let mut converged = false;
        while let Some(Reverse((time, _, id))) = self.queue.pop() {
            if !self.violations.is_empty() {
                break;
            }
            self.now = time;
            if self.now > deadline {
                break;
            }
            let ev = self.events.remove(&id).expect("event");
            self.handle(ev);
            self.stats.steps += 1;
            if self.healed && self.clients_done() && self.convergence_check_due() && self.converged() {
                converged = true;
                break;
            }
        }
        self.stats.end_time = self.now;
        self.stats.max_term = self.leaders.keys().next_back().map_or(0, |t| t.0);
        if !self.violations.is_empty() {
            return;
        }
        if !converged {
            let pending: u64 = self.clients.iter().map(|c| c.remaining + c.outstanding.len() as u64).sum();
            let states: Vec<String> = self
                .replicas
                .iter()
                .map(|s| match &s.replica {
                    Some(r) => {
                        format!(
                            "{:?} {:?} [{} @{}] t{} sync{} end{} w{} aw{} last{} ckpt{}",
                            r.id(),
                            r.role(),
                            r.membership(),
                            r.config_state().index.0,
                            r.term().0,
                            r.hard_state().sync.0,
                            r.hard_state().sync_end.0,
                            r.committed_watermark().0,
                            r.applied_watermark().0,
                            r.last_index().0,
                            r.checkpoint_index().0
                        ) + " "
                            + &r.debug_state()
                    }
                    None => "down".into(),
                })
                .collect();
            let admin = match &self.admin {
                Some(a) => format!("; operator: {} in flight {:?} plan {:?}", a.membership, a.in_flight, a.plan),
                None => String::new(),
            };
            self.violations.push(format!(
                "liveness: no convergence by time {deadline} ({pending} client ops unfinished; replicas: {}{admin})",
                states.join("; ")
            ));
            return;
        }
        self.final_checks();
    }

    fn clients_done(&self) -> bool {
        self.clients.iter().all(|c| c.remaining == 0 && c.outstanding.is_empty())
    }

    /// A serving leader whose log is fully committed, every member applied all of it, and the
    /// operator has finished its changes. (Servers outside the membership are left alone.)
    fn converged(&self) -> bool {
        if self.admin.as_ref().is_some_and(|a| !a.idle()) {
            return false;
        }
        let Some(leader) = self.serving_leader() else {
            return false;
        };
        let last = leader.last_index();
        if leader.committed_watermark() != last || !leader.membership().is_voter(leader.id()) {
            return false;
        }
        leader.membership().members().all(|m| {
            self.replicas[m.0 as usize]
                .replica
                .as_ref()
                .is_some_and(|r| r.applied_watermark() == last && r.term() == leader.term())
        })
    }

    /// The serving leader of the highest term (a deposed one may not know it yet).
    fn serving_leader(&self) -> Option<&Replica> {
        self.replicas
            .iter()
            .filter_map(|s| s.replica.as_ref())
            .filter(|r| r.role() == RoleKind::Leader)
            .max_by_key(|r| r.term())
    }

    /// The members of the converged group (every server without membership changes).
    fn final_members(&self) -> Vec<usize> {
        let leader = self.serving_leader().expect("converged without a leader");
        leader.membership().members().map(|m| m.0 as usize).collect()
    }

    fn final_checks(&mut self) {
        let members = self.final_members();
        for m in &members {
            let r = self.replicas[*m].replica.as_ref().expect("member up");
            if let Some(admin) = &self.admin {
                if *r.membership() != admin.membership {
                    self.violations.push(format!(
                        "membership: server {m} has {} but the operator's changes make {}",
                        r.membership(),
                        admin.membership
                    ));
                }
            }
        }
        let images: Vec<BTreeMap<u64, Block>> = members.iter().map(|m| self.replicas[*m].disk.all_blocks()).collect();
        let normalize = |img: &BTreeMap<u64, Block>| -> BTreeMap<u64, (Option<RequestId>, Bytes)> {
            img.iter().filter(|(_, b)| b.tag.is_some()).map(|(k, b)| (*k, (b.tag, b.data.clone()))).collect()
        };
        let first = normalize(&images[0]);
        for (r, img) in images.iter().enumerate().skip(1) {
            if normalize(img) != first {
                let differing: Vec<u64> = (0..self.cfg.volume_blocks)
                    .filter(|b| img.get(b).map(|x| x.tag) != images[0].get(b).map(|x| x.tag))
                    .collect();
                self.violations.push(format!(
                    "convergence: replica {} blocks differ from replica {} at {differing:?}",
                    members[r], members[0]
                ));
            }
        }
        let final_state: BTreeMap<u64, Option<RequestId>> =
            (0..self.cfg.volume_blocks).map(|b| (b, images[0].get(&b).and_then(|x| x.tag))).collect();
        for (b, blk) in &images[0] {
            self.verify_block(*b, blk.tag, &blk.data, "final state");
        }
        let end = self.tick_clock() + 1;
        let found = check_linearizable(&self.history, &final_state, end);
        self.violations.extend(found.into_iter().map(|v| format!("linearizability: {v}")));
    }

    fn verify_block(&mut self, block: u64, tag: Option<RequestId>, data: &Bytes, what: &str) {
        let expected = match tag.and_then(|t| self.history_index.get(&t).map(|i| (t, self.history[*i].kind.clone()))) {
            Some((t, OpKind::Write)) => payload(t, block),
            Some(_) | None => Bytes::from_static(&[0u8; BLOCK_SIZE as usize]),
        };
        if *data != expected {
            self.violations.push(format!("data: block {block} ({what}) holds bytes that do not match its tag {tag:?}"));
        }
    }

    /// The replica an event is processed by, if any (for pauses).
    fn target(ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Tick(r)
            | Ev::DiskDone { r, .. }
            | Ev::ApplyDone { r, .. }
            | Ev::ReadDone { r, .. }
            | Ev::CheckpointDone { r, .. } => Some(*r),
            Ev::Deliver { to: Node::Replica(r), .. } => Some(*r),
            _ => None,
        }
    }

    fn handle(&mut self, ev: Ev) {
        if let Some(r) = Self::target(&ev) {
            // A paused process (GC pause, stalled VM) handles nothing until it resumes; its
            // clock stops too, so it comes back believing whatever it believed.
            let until = self.paused_until[r];
            if self.now < until {
                self.schedule(until - self.now, ev);
                return;
            }
            if std::mem::take(&mut self.clock_jumped[r]) && self.replicas[r].replica.is_some() {
                // What a real driver sees on its monotonic clock after a stall, before anything
                // else it handles (the server checks before each frame).
                self.step(r, Event::ClockJump);
            }
        }
        match ev {
            Ev::Tick(r) => {
                if self.replicas[r].replica.is_some() {
                    self.step(r, Event::Tick);
                    self.schedule(TICK, Ev::Tick(r));
                }
            }
            Ev::Deliver { to, from, net } => self.deliver(to, from, net),
            Ev::DiskDone { r, incarnation, token } => {
                if self.live(r, incarnation) {
                    self.replicas[r].disk.complete(token);
                    self.step(r, Event::Persisted { token });
                }
            }
            Ev::ApplyDone { r, incarnation, entry } => {
                if self.live(r, incarnation) {
                    self.check_apply(&entry);
                    self.replicas[r].disk.apply(&entry);
                    self.step(r, Event::Applied { index: entry.index });
                }
            }
            Ev::ReadDone { r, incarnation, id, offset, len_bytes } => {
                if self.live(r, incarnation) {
                    let first = offset / BLOCK_SIZE;
                    let blocks = (first..first + len_bytes / BLOCK_SIZE)
                        .map(|b| match self.replicas[r].disk.read_block(b) {
                            Some(blk) => (blk.tag, blk.data.clone()),
                            None => (None, Bytes::from_static(&[0u8; BLOCK_SIZE as usize])),
                        })
                        .collect();
                    self.net_send(
                        Node::Replica(r),
                        Node::Client(id.client.0 as usize - 1),
                        Net::ReadReply { id, blocks },
                    );
                    self.step(r, Event::ReadDone { id });
                }
            }
            Ev::CheckpointDone { r, incarnation, state } => {
                if self.live(r, incarnation) {
                    let index = state.index;
                    self.replicas[r].disk.checkpoint(state);
                    self.step(r, Event::CheckpointDone { index });
                }
            }
            Ev::Flush { r, incarnation } => {
                if self.live(r, incarnation) {
                    self.drain(r);
                }
            }
            Ev::ClientWake(c) => {
                if self.clients[c].next_wake == Some(self.now) {
                    self.clients[c].next_wake = None;
                    self.client_wake(c);
                }
            }
            Ev::Fault => self.inject_fault(),
            Ev::Restart(r) => {
                if self.replicas[r].replica.is_none() {
                    self.start_replica(r);
                }
            }
            Ev::Heal => {
                self.healed = true;
                self.blocked.clear();
                self.loss = 0.0;
                self.duplicate = 0.0;
                self.max_delay = self.max_delay.min(20);
                for r in 0..self.replicas.len() {
                    if self.replicas[r].replica.is_none() {
                        self.start_replica(r);
                    }
                }
            }
            Ev::AdminWake => self.admin_wake(),
            Ev::Wipe(r) => self.wipe(r),
        }
    }

    fn live(&self, r: usize, incarnation: u64) -> bool {
        self.replicas[r].replica.is_some() && self.replicas[r].incarnation == incarnation
    }

    fn inject_fault(&mut self) {
        if self.healed {
            return;
        }
        let n = self.replicas.len();
        let roll = self.rng.range(0, 100);
        if roll < 10 {
            let r = match self.current_leader() {
                Some(l) if self.rng.chance(0.7) => l,
                _ => self.rng.range(0, n as u64) as usize,
            };
            // A second pause during the first extends it, never shortens it: the tick held back
            // to the first pause's end would otherwise leave a process that handles messages
            // with its clock stopped, which no driver does (the server checks its clock every
            // round).
            let until = self.now + self.rng.range(200, 1500);
            self.paused_until[r] = self.paused_until[r].max(until);
            self.clock_jumped[r] = true;
            self.stats.pauses += 1;
        } else if roll < 35 {
            let r = self.rng.range(0, n as u64) as usize;
            if self.replicas[r].replica.is_some() {
                self.crash(r);
                let downtime = self.rng.range(50, 800);
                self.schedule(downtime, Ev::Restart(r));
            }
        } else if roll < 65 {
            // Symmetric partition isolating one replica, often the leader.
            let leader = self.current_leader();
            let r = match leader {
                Some(l) if self.rng.chance(0.6) => l,
                _ => self.rng.range(0, n as u64) as usize,
            };
            self.blocked.clear();
            for o in 0..n {
                if o != r {
                    self.blocked.insert((r, o));
                    self.blocked.insert((o, r));
                }
            }
            self.stats.partitions += 1;
        } else if roll < 85 {
            // Asymmetric: random one-way links fail.
            self.blocked.clear();
            for a in 0..n {
                for b in 0..n {
                    if a != b && self.rng.chance(0.25) {
                        self.blocked.insert((a, b));
                    }
                }
            }
            self.stats.partitions += 1;
        } else {
            self.blocked.clear();
        }
        let next = self.rng.range(100, 700);
        self.schedule(next, Ev::Fault);
    }

    /// A merge report, Sync or snapshot must fit in one transport frame: their entries stay
    /// within `max_vote_bytes` or `max_sync_bytes` (encoded), or are a single entry (the real
    /// transport refuses a frame over its limit).
    fn check_message_bytes(&mut self, r: usize, message: &Message) {
        if let Message::Sync { upto, end, .. } = message {
            if upto < end {
                self.stats.partial_syncs += 1;
            }
        }
        let (entries, limit) = match message {
            Message::VoteResponse { entries, .. } => (entries, self.cfg.max_vote_bytes),
            Message::Sync { entries, .. } | Message::Snapshot { entries, .. } => (entries, self.cfg.max_sync_bytes),
            _ => return,
        };
        let bytes: u64 = entries.iter().map(crate::codec::listed_len).sum();
        if bytes > limit && entries.len() > 1 {
            self.violations.push(format!(
                "replica {r} sent {bytes} bytes of entries in {} entries, over its limit {limit}",
                entries.len()
            ));
        }
    }

    fn current_leader(&self) -> Option<usize> {
        self.replicas
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.replica.as_ref().map(|r| (i, r)))
            .filter(|(_, r)| matches!(r.role(), RoleKind::Leader | RoleKind::LeaderMerging))
            .max_by_key(|(_, r)| r.term())
            .map(|(i, _)| i)
    }

    fn crash(&mut self, r: usize) {
        self.stats.crashes += 1;
        self.replicas[r].replica = None;
        let torn = 0.3;
        let mut rng = Rng::new(self.rng.next_u64());
        self.replicas[r].disk.crash(&mut rng, torn);
    }

    /// Whether to look for convergence now: at most once per tick's worth of time (it compares
    /// every replica's blocks). Fault runs look at multiples of `TICK`; the perf model's fixed
    /// delays may never land on one, so it looks a tick after it last looked.
    fn convergence_check_due(&mut self) -> bool {
        if self.cfg.perf.is_none() {
            return self.now.is_multiple_of(TICK);
        }
        if self.now < self.next_convergence_check {
            return false;
        }
        self.next_convergence_check = self.now + TICK;
        true
    }
}

/// Where a client (or the operator) goes after `from` answered "not the leader": the hint,
/// else the next server.
fn redirect(hint: Option<ReplicaId>, from: usize, nodes: u32) -> ReplicaId {
    hint.filter(|h| h.0 != from as u32).unwrap_or(ReplicaId((from as u32 + 1) % nodes))
}

/// Blocks of payload of a write (whole blocks), for tests.
pub fn write_op(id: RequestId, first_block: u64, blocks: u64) -> Op {
    let mut data = Vec::new();
    for b in first_block..first_block + blocks {
        data.extend_from_slice(&payload(id, b));
    }
    Op::Write { offset: first_block * BLOCK_SIZE, data: Bytes::from(data) }
}
