//! The hand-driven harness of the scripted histories (`scenarios.rs`, `replication.rs`): three
//! replicas of the real core with instant disks, a network the test controls link by link, and
//! disk completions a test can park and release in any order.

// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use parallelraft::sim::write_op;
use parallelraft::{
    CheckpointState, ClientId, ClientRequest, Command, Config, Event, Index, Message, Mode, NaiveFlags, Op, Replica,
    ReplicaId, RequestId, RoleKind, Term,
};

pub const A: usize = 0;
pub const B: usize = 1;
pub const C: usize = 2;

/// Three replicas with instant disks and a network the test controls link by link.
pub struct Harness {
    pub replicas: Vec<Replica>,
    /// Block → tag of the request that last wrote it, per replica.
    pub blocks: Vec<BTreeMap<u64, RequestId>>,
    pub network: VecDeque<(usize, usize, Message)>,
    pub local: VecDeque<(usize, Event)>,
    pub cut: BTreeSet<(usize, usize)>,
    /// Messages from these replicas vanish (used while aging their leader contact).
    pub muted: BTreeSet<usize>,
    /// Disk completions of these replicas are parked (a slow disk) until released.
    pub slow_disk: BTreeSet<usize>,
    pub parked: Vec<(usize, Event)>,
    pub acknowledged: Vec<RequestId>,
    /// Index → request applied there (`None`: a no-op), per replica.
    pub applied: Vec<BTreeMap<Index, Option<RequestId>>>,
    /// Reads handed to the block store, in order.
    pub reads_executed: Vec<RequestId>,
    /// Every vote answer sent: (voter, candidate, granted, indices reported).
    pub vote_reports: Vec<(usize, usize, bool, Vec<Index>)>,
    /// Every Sync sent: (leader, follower, upto, end).
    pub syncs: Vec<(usize, usize, Index, Index)>,
    /// Every snapshot (catch-up from the block image) a leader started: (leader, follower).
    pub snapshots: Vec<(usize, usize)>,
}

impl Harness {
    pub fn new(naive: NaiveFlags) -> Harness {
        Harness::configured(|cfg| cfg.naive = naive)
    }

    /// Three replicas whose configuration `tune` adjusts.
    pub fn configured(tune: impl Fn(&mut Config)) -> Harness {
        let voters: Vec<ReplicaId> = (0..3).map(ReplicaId).collect();
        let replicas = (0..3)
            .map(|i| {
                let mut cfg = Config::new(ReplicaId(i), voters.clone(), Mode::Parallel, 7 + i as u64);
                cfg.checkpoint_interval = 1_000;
                tune(&mut cfg);
                Replica::new(cfg)
            })
            .collect();
        Harness {
            replicas,
            blocks: vec![BTreeMap::new(); 3],
            network: VecDeque::new(),
            local: VecDeque::new(),
            cut: BTreeSet::new(),
            muted: BTreeSet::new(),
            slow_disk: BTreeSet::new(),
            parked: Vec::new(),
            acknowledged: Vec::new(),
            applied: vec![BTreeMap::new(); 3],
            reads_executed: Vec::new(),
            vote_reports: Vec::new(),
            syncs: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    pub fn isolate(&mut self, r: usize) {
        for o in 0..3 {
            if o != r {
                self.cut.insert((r, o));
                self.cut.insert((o, r));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn step(&mut self, r: usize, event: Event) {
        self.replicas[r].step(event);
        self.replicas[r].check_invariants();
        for command in self.replicas[r].take_commands() {
            match command {
                Command::PersistEntries { token, .. } | Command::TruncateLog { token, .. } => {
                    if self.slow_disk.contains(&r) {
                        self.parked.push((r, Event::Persisted { token }));
                    } else {
                        self.local.push_back((r, Event::Persisted { token }));
                    }
                }
                Command::Send { to, message } => {
                    let to = to.0 as usize;
                    if let Message::VoteResponse { granted, entries, .. } = &message {
                        self.vote_reports.push((r, to, *granted, entries.iter().map(|e| e.index).collect()));
                    }
                    if let Message::Sync { upto, end, .. } = &message {
                        self.syncs.push((r, to, *upto, *end));
                    }
                    if !self.cut.contains(&(r, to)) && !self.muted.contains(&r) {
                        self.network.push_back((r, to, message));
                    }
                }
                Command::Apply { entry } => {
                    self.applied[r].insert(entry.index, entry.request);
                    if let Op::Write { offset, data } = &entry.op {
                        for k in 0..data.len() as u64 / 4096 {
                            self.blocks[r].insert(offset / 4096 + k, entry.request.unwrap());
                        }
                    }
                    self.local.push_back((r, Event::Applied { index: entry.index }));
                }
                Command::Reply { id, result: Ok(()) } => self.acknowledged.push(id),
                Command::Read { id, .. } => {
                    self.reads_executed.push(id);
                    self.local.push_back((r, Event::ReadDone { id }));
                }
                Command::Checkpoint { state } => {
                    self.local.push_back((r, Event::CheckpointDone { index: state.index }))
                }
                Command::SendSnapshot { to, .. } => self.snapshots.push((r, to.0 as usize)),
                _ => {}
            }
        }
    }

    /// Delivers everything in flight (and what it causes) until quiet.
    pub fn run(&mut self) {
        for _ in 0..100_000 {
            if let Some((r, event)) = self.local.pop_front() {
                self.step(r, event);
            } else if let Some((from, to, message)) = self.network.pop_front() {
                if !self.cut.contains(&(from, to)) {
                    self.step(to, Event::Receive { from: ReplicaId(from as u32), message });
                }
            } else {
                return;
            }
        }
        panic!("network never went quiet");
    }

    /// Makes `r` the serving leader: first ages every other reachable replica's leader contact
    /// (their own campaigns muted), then ticks `r` alone.
    pub fn elect(&mut self, r: usize) {
        assert!(self.try_elect(r), "replica {r} did not become leader");
    }

    pub fn try_elect(&mut self, r: usize) -> bool {
        let max_term = self.replicas.iter().map(|x| x.term()).max().unwrap();
        let others: Vec<usize> = (0..3).filter(|o| *o != r && !self.cut.contains(&(r, *o))).collect();
        for &o in &others {
            self.muted.insert(o);
            for _ in 0..40 {
                self.step(o, Event::Tick);
            }
            self.muted.remove(&o);
        }
        self.network.clear();
        for _ in 0..200 {
            self.step(r, Event::Tick);
            self.run();
            if self.replicas[r].role() == RoleKind::Leader && self.replicas[r].term() > max_term {
                return true;
            }
        }
        false
    }

    /// Restarts every replica from what it holds (no checkpoint has been taken): the log, all
    /// durable here, and the hard state; the committed watermark is forgotten.
    pub fn restart_all(&mut self) {
        for r in 0..3 {
            let old = &self.replicas[r];
            assert_eq!(old.checkpoint_index(), Index(0), "restart_all keeps no checkpoint");
            let entries = (1..=old.last_index().0).filter_map(|i| old.entry(Index(i)).cloned()).collect();
            self.replicas[r] =
                Replica::recover(old.config().clone(), old.hard_state().clone(), CheckpointState::default(), entries);
        }
        self.network.clear();
        self.local.clear();
    }

    /// Writes `seqs` (sequence k to block `block(k)`) through leader `r` and returns them once
    /// all are acknowledged (a tick sends the commit notice the replies wait for).
    pub fn write_acknowledged(
        &mut self,
        r: usize,
        seqs: std::ops::RangeInclusive<u64>,
        block: impl Fn(u64) -> u64,
    ) -> Vec<RequestId> {
        let ids: Vec<RequestId> = seqs.map(|seq| self.propose(r, seq, block(seq))).collect();
        self.run();
        self.step(r, Event::Tick);
        self.run();
        assert!(ids.iter().all(|id| self.acknowledged.contains(id)), "writes through {r} not acknowledged");
        ids
    }

    pub fn propose(&mut self, r: usize, seq: u64, block: u64) -> RequestId {
        let id = RequestId { client: ClientId(1), seq };
        let request = ClientRequest { id, floor: 0, op: write_op(id, block, 1) };
        self.step(r, Event::Propose(request));
        id
    }

    pub fn block(&self, r: usize, block: u64) -> Option<RequestId> {
        self.blocks[r].get(&block).copied()
    }
}

/// A one-block write of the harness: its payload bytes and its bytes in a message's entry list
/// (what `max_sync_bytes` and `max_vote_bytes` count).
pub fn one_block_write_bytes() -> (u64, u64) {
    let id = RequestId { client: ClientId(1), seq: 1 };
    let op = write_op(id, 0, 1);
    let payload = parallelraft::io::write_data(&op).expect("a write").len() as u64;
    let entry = parallelraft::Entry {
        index: Index(1),
        term: Term(1),
        ballot: Term(1),
        op,
        request: Some(id),
        floor: 0,
        look_behind: Default::default(),
    };
    (payload, parallelraft::codec::listed_len(&entry))
}

pub const X: u64 = 3;
pub const Y: u64 = 9;
