//! One chunk replica on this server: the protocol core plus the storage that executes its
//! commands.
//!
//! Directory of a chunk replica:
//! ```text
//! chunk-00000003/
//!   hardstate          term, vote, sync term (meta::save_hard_state)
//!   wal-*.log          the write-ahead log
//!   blocks/            blocks.dat, blocks.meta and the checkpoint that describes them
//!   blocks.new/        a snapshot image being received (streaming catch-up)
//! ```
//! The checkpoint lives beside the blocks so that installing a snapshot (a directory swap)
//! replaces image and checkpoint together.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parallelraft::{
    CheckpointState, ClientError, ClientRequest, Command, Config, Entry, Event, Index, Message, Op, Replica, ReplicaId,
    RequestId,
};
use tracing::{info, warn};

use crate::metrics::{Stage, Stages};
use crate::storage::blocks::{BlockStore, ImageBlock};
use crate::storage::io::{open_engine, EngineKind, IoEngine};
use crate::storage::meta;
use crate::storage::wal::{Wal, WalOptions, WalRecord};
use crate::storage::{BadBlock, StorageError};
use crate::wire::{BlockNeed, Body, Outcome, RequestOp, SnapBlock};

use super::disk::{CheckpointJob, Disk, WalJob};
use super::outbox::{ConnId, Outbox};
use super::repair::{can_serve, Repairs};
use super::trace::Traces;

/// Blocks per snapshot data frame (1 MiB of data at most).
const SNAPSHOT_FRAME_BLOCKS: u64 = 256;

/// What a group counts for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupCounters {
    pub writes: u64,
    pub reads: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub leader_changes: u64,
    pub catchup_bytes_sent: u64,
    pub catchup_bytes_received: u64,
}

/// Storage settings shared by all groups of a server.
#[derive(Clone, Copy, Debug)]
pub struct StorageOptions {
    pub engine: EngineKind,
    pub wal_segment_bytes: u64,
    /// O_DIRECT for the WAL: its appends are synced at once, so the page cache only costs a copy.
    pub wal_direct: bool,
    /// O_DIRECT for the block store. Off by default: applies land in the page cache (a copy,
    /// no device round trip on the core thread) and become durable at the checkpoint's
    /// fdatasync, which is the block store's durability contract anyway; reads of hot blocks
    /// are served from memory.
    pub blocks_direct: bool,
}

/// A snapshot image being streamed to a peer, a slice per driver iteration.
struct OutSnapshot {
    to: ReplicaId,
    id: u64,
    next_block: u64,
    sent: u64,
    message: Message,
}

/// A snapshot image being received.
struct Staging {
    from: ReplicaId,
    id: u64,
    blocks: BlockStore,
    received: u64,
}

pub struct Group {
    pub chunk: u32,
    replica: Replica,
    dir: PathBuf,
    capacity_bytes: u64,
    options: StorageOptions,
    /// Shared with the WAL thread, which holds it during an append (see `super::disk`).
    wal: Arc<Mutex<Wal>>,
    /// An append of this group is running on the WAL thread.
    wal_in_flight: bool,
    /// The server's disk threads: group commits and checkpoints run there.
    disk: Disk,
    blocks: BlockStore,
    meta: Box<dyn IoEngine>,
    /// Records of the current group commit and the tokens they complete.
    wal_batch: Vec<WalRecord>,
    wal_tokens: Vec<u64>,
    /// Which frontend connection asked, per request in progress.
    waiting: HashMap<RequestId, ConnId>,
    outgoing: Vec<OutSnapshot>,
    staging: Option<Staging>,
    /// A snapshot image complete and matching the `Snapshot` message being stepped.
    incoming: Option<Staging>,
    events: VecDeque<Event>,
    next_snapshot_id: u64,
    /// Blocks that failed their checksum and the work waiting for their repair.
    repairs: Repairs,
    /// Stage timing of the requests served as leader and of follower WAL writes.
    traces: Traces,
    pub stages: Stages,
    pub counters: GroupCounters,
    was_leader: bool,
    /// Set when storage failed: the replica stopped (fail-stop) and ignores everything.
    pub failed: Option<String>,
}

fn blocks_dir(dir: &Path) -> PathBuf {
    dir.join("blocks")
}

fn staging_dir(dir: &Path) -> PathBuf {
    dir.join("blocks.new")
}

fn old_dir(dir: &Path) -> PathBuf {
    dir.join("blocks.old")
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Finishes or undoes a snapshot install a crash interrupted (see [`Group::install`]).
fn repair_swap(dir: &Path) -> std::io::Result<()> {
    let (blocks, staging, old) = (blocks_dir(dir), staging_dir(dir), old_dir(dir));
    if staging.exists() {
        if blocks.exists() {
            // A receive that never completed.
            std::fs::remove_dir_all(&staging)?;
        } else {
            // Crashed between the two renames: the new image is complete (it was synced first).
            std::fs::rename(&staging, &blocks)?;
        }
    }
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    fsync_dir(dir)
}

impl Group {
    /// Opens (or creates) the replica of `chunk` in `dir` and recovers it from disk.
    pub fn open(
        chunk: u32,
        dir: PathBuf,
        capacity_bytes: u64,
        cfg: Config,
        options: StorageOptions,
        disk: Disk,
    ) -> Result<Group, String> {
        let ctx = |e: &dyn std::fmt::Display| format!("chunk {chunk} in {}: {e}", dir.display());
        std::fs::create_dir_all(blocks_dir(&dir)).map_err(|e| ctx(&e))?;
        repair_swap(&dir).map_err(|e| ctx(&e))?;
        let engine = || open_engine(options.engine).map_err(|e| format!("io engine: {e}"));
        let mut meta = engine()?;
        let hard = meta::load_hard_state(meta.as_mut(), &dir).map_err(|e| ctx(&e))?;
        let checkpoint = meta::load_checkpoint(meta.as_mut(), &blocks_dir(&dir)).map_err(|e| ctx(&e))?;
        let blocks = BlockStore::open(engine()?, &blocks_dir(&dir), capacity_bytes, options.blocks_direct)
            .map_err(|e| ctx(&e))?;
        let wal_options = WalOptions { segment_bytes: options.wal_segment_bytes, direct: options.wal_direct };
        let (wal, recovery) = Wal::open(engine()?, &dir, chunk as u64, wal_options).map_err(|e| ctx(&e))?;
        for c in &recovery.corruptions {
            // The entry is left out of the recovered log: the replica holds a hole there, which
            // the protocol fills from its peers (merge or catch-up); it is never guessed.
            warn!(chunk, segment = c.segment, offset = c.offset, index = ?c.index_hint, "WAL record failed its checksum");
        }
        if recovery.torn_tail {
            info!(chunk, "discarded a torn batch at the end of the WAL");
        }
        let entries = recovery.entries.len();
        let replica = Replica::recover(cfg, hard, checkpoint.clone(), recovery.entries);
        info!(chunk, checkpoint = checkpoint.index.0, entries, term = replica.term().0, "chunk replica recovered");
        Ok(Group {
            chunk,
            replica,
            dir,
            capacity_bytes,
            options,
            wal: Arc::new(Mutex::new(wal)),
            wal_in_flight: false,
            disk,
            blocks,
            meta,
            wal_batch: Vec::new(),
            wal_tokens: Vec::new(),
            waiting: HashMap::new(),
            outgoing: Vec::new(),
            staging: None,
            incoming: None,
            events: VecDeque::new(),
            next_snapshot_id: 1,
            repairs: Repairs::default(),
            traces: Traces::default(),
            stages: Stages::default(),
            counters: GroupCounters::default(),
            was_leader: false,
            failed: None,
        })
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    fn fail(&mut self, what: &str, e: StorageError) {
        let why = format!("{what}: {e}");
        tracing::error!(chunk = self.chunk, "replica stopped (fail-stop): {why}");
        self.failed = Some(why);
        self.wal_batch.clear();
        self.wal_tokens.clear();
        self.events.clear();
    }

    /// Feeds an event in, then runs every command it leads to (except the WAL group commit,
    /// which [`Group::submit_wal`] hands to the WAL thread).
    pub fn step(&mut self, event: Event, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        self.events.push_back(event);
        self.drain(out);
    }

    /// Steps the queued events and runs the commands they lead to.
    fn drain(&mut self, out: &mut Outbox) {
        while let Some(event) = self.events.pop_front() {
            if self.failed.is_some() {
                return;
            }
            self.replica.step(event);
            #[cfg(debug_assertions)]
            {
                self.replica.check_invariants();
                self.repairs.check_invariants();
            }
            for command in self.replica.take_commands() {
                if self.failed.is_some() {
                    return;
                }
                self.execute(command, out);
            }
        }
    }

    /// A frontend request arrived on `conn`.
    pub fn request(&mut self, conn: ConnId, id: RequestId, floor: u64, op: RequestOp, out: &mut Outbox) {
        if let Some(why) = &self.failed {
            out.frontend(conn, self.chunk, Body::Response { id, outcome: Outcome::Failed(why.clone()) });
            return;
        }
        self.waiting.insert(id, conn);
        let (write, len_bytes) = match &op {
            RequestOp::Read { len_bytes, .. } => (false, *len_bytes),
            RequestOp::Write { data, .. } => (true, data.len() as u64),
            RequestOp::Trim { len_bytes, .. } | RequestOp::WriteZeroes { len_bytes, .. } => (true, *len_bytes),
        };
        self.traces.arrived(id, write, len_bytes);
        let event = match op {
            RequestOp::Read { offset, len_bytes } => Event::Read { id, offset, len_bytes },
            RequestOp::Write { offset, data } => {
                Event::Propose(ClientRequest { id, floor, op: Op::Write { offset, data } })
            }
            RequestOp::Trim { offset, len_bytes } => {
                Event::Propose(ClientRequest { id, floor, op: Op::Trim { offset, len_bytes } })
            }
            RequestOp::WriteZeroes { offset, len_bytes } => {
                Event::Propose(ClientRequest { id, floor, op: Op::WriteZeroes { offset, len_bytes } })
            }
        };
        self.step(event, out);
    }

    /// Forgets the requests of a closed frontend connection.
    pub fn forget_conn(&mut self, conn: ConnId) {
        self.waiting.retain(|_, c| *c != conn);
        let waiting = &self.waiting;
        self.traces.retain(|id| waiting.contains_key(id));
    }

    fn respond(&mut self, id: RequestId, outcome: Outcome, out: &mut Outbox) {
        if let Some(t) = self.traces.finish(&id) {
            let c = &mut self.counters;
            match (&outcome, t.write) {
                (Outcome::Done, true) => {
                    self.stages.record(Stage::LeaderWrite, t.arrived.elapsed());
                    c.writes += 1;
                    c.bytes_written += t.len_bytes;
                }
                (Outcome::Data(_), false) => {
                    self.stages.record(Stage::LeaderRead, t.arrived.elapsed());
                    c.reads += 1;
                    c.bytes_read += t.len_bytes;
                }
                _ => {}
            }
        }
        if let Some(conn) = self.waiting.remove(&id) {
            out.frontend(conn, self.chunk, Body::Response { id, outcome });
        }
    }

    fn execute(&mut self, command: Command, out: &mut Outbox) {
        match command {
            Command::PersistHardState(hard) => {
                if let Err(e) = meta::save_hard_state(self.meta.as_mut(), &self.dir, &hard) {
                    self.fail("saving hard state", e);
                }
            }
            Command::PersistEntries { token, entries } => {
                let leader = matches!(
                    self.replica.role(),
                    parallelraft::RoleKind::Leader | parallelraft::RoleKind::LeaderMerging
                );
                self.traces.persist(token, &entries, leader);
                self.wal_batch.extend(entries.into_iter().map(WalRecord::Entry));
                self.wal_tokens.push(token);
            }
            Command::TruncateLog { token, after } => {
                self.wal_batch.push(WalRecord::Truncate { after });
                self.wal_tokens.push(token);
            }
            Command::PruneLog { through } => {
                let pruned = self.wal.lock().unwrap_or_else(|e| e.into_inner()).prune(through);
                if let Err(e) = pruned {
                    self.fail("pruning the WAL", e);
                }
            }
            Command::Send { to, message } => {
                if let Message::Append { entries, .. } = &message {
                    self.traces.sent(entries, &mut self.stages);
                }
                out.peer(to, self.chunk, Body::Peer { message })
            }
            Command::Apply { entry } => self.apply(entry, out),
            Command::Read { id, offset, len_bytes } => self.read(id, offset, len_bytes, out),
            Command::Reply { id, result } => {
                let outcome = match result {
                    Ok(()) => Outcome::Done,
                    Err(ClientError::NotLeader { hint }) => Outcome::NotLeader(hint),
                    Err(ClientError::Busy) => Outcome::Busy,
                    Err(ClientError::Membership(e)) => Outcome::Failed(e.to_string()),
                };
                self.respond(id, outcome, out);
            }
            Command::Checkpoint { state } => {
                let job = CheckpointJob {
                    chunk: self.chunk,
                    work: self.blocks.take_sync_work(),
                    dir: blocks_dir(&self.dir),
                    state,
                };
                if self.disk.checkpoint.send(job).is_err() {
                    self.fail(
                        "checkpoint",
                        StorageError::Fatal(std::io::Error::other("the checkpoint thread is gone")),
                    );
                }
            }
            Command::SendSnapshot { to, message } => {
                // The leader asks again while an image is still streaming (it cannot know the
                // image is large). Restarting would never finish; the image being sent stays
                // valid for its own message, so keep it unless leadership changed.
                if self.outgoing.iter().any(|s| s.to == to && s.message.term() == message.term()) {
                    return;
                }
                self.outgoing.retain(|s| s.to != to);
                let id = self.next_snapshot_id;
                self.next_snapshot_id += 1;
                info!(chunk = self.chunk, to = to.0, "streaming catch-up: sending the block image");
                self.outgoing.push(OutSnapshot { to, id, next_block: 0, sent: 0, message });
            }
            Command::InstallSnapshot { from, state } => {
                if let Err(e) = self.install(from, state) {
                    self.fail("installing a snapshot", e);
                }
            }
        }
    }

    fn apply(&mut self, entry: Entry, out: &mut Outbox) {
        let start = Instant::now();
        if let Some(t) = entry.request.and_then(|id| self.traces.get(&id)) {
            self.stages.record(Stage::CommitWait, start - t.durable.unwrap_or(t.arrived));
        }
        let result = self.blocks.apply(&entry);
        self.stages.record(Stage::Apply, start.elapsed());
        match result {
            Ok(()) => self.events.push_back(Event::Applied { index: entry.index }),
            Err(StorageError::BadBlocks(bad)) => {
                self.want_repair(&bad, out);
                self.repairs.park_apply(entry);
            }
            Err(e) => self.fail("applying an entry", e),
        }
    }

    fn read(&mut self, id: RequestId, offset: u64, len_bytes: u64, out: &mut Outbox) {
        let outcome = match self.blocks.read(offset, len_bytes) {
            Ok(data) => Outcome::Data(Bytes::from(data)),
            Err(StorageError::BadBlocks(bad)) => {
                // Never served: the read waits for the repair (ReadDone is held back, so no
                // write overlapping it is applied meanwhile).
                self.want_repair(&bad, out);
                self.repairs.park_read(id, offset, len_bytes);
                return;
            }
            Err(e @ StorageError::Invalid(_)) => Outcome::Failed(e.to_string()),
            Err(e) => {
                self.fail("reading blocks", e);
                return;
            }
        };
        self.respond(id, outcome, out);
        self.events.push_back(Event::ReadDone { id });
    }

    fn peers(&self) -> Vec<ReplicaId> {
        let me = self.replica.id();
        self.replica.config().voters.iter().copied().filter(|r| *r != me).collect()
    }

    fn want_repair(&mut self, bad: &[BadBlock], out: &mut Outbox) {
        for b in bad {
            warn!(chunk = self.chunk, block = b.block, version = ?b.version.map(|v| v.0), "block failed its checksum; asking the peers for a copy");
        }
        let asks = self.repairs.add(bad, self.replica.highest_committed());
        self.ask(asks, out);
    }

    fn ask(&self, asks: Vec<BlockNeed>, out: &mut Outbox) {
        if asks.is_empty() {
            return;
        }
        for peer in self.peers() {
            out.peer(peer, self.chunk, Body::RepairAsk { blocks: asks.clone() });
        }
    }

    /// A peer asks for copies of its bad blocks: send each one we hold verified and new enough.
    pub fn repair_ask(&mut self, from: ReplicaId, asks: Vec<BlockNeed>, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        let applied = self.replica.applied_watermark();
        let mut copies = Vec::new();
        let mut ours_bad = Vec::new();
        for ask in asks {
            match self.blocks.block_image(ask.block) {
                Ok(image) if can_serve(image.version, applied, ask.need) => copies.push(SnapBlock {
                    block: image.block,
                    version: image.version,
                    data: image.data.map(Bytes::from),
                }),
                Ok(_) => {} // behind the asker: it asks again later
                Err(StorageError::BadBlocks(bad)) => ours_bad.extend(bad),
                Err(StorageError::Invalid(why)) => warn!(chunk = self.chunk, from = from.0, "bad repair ask: {why}"),
                Err(e) => return self.fail("reading a block for a peer", e),
            }
        }
        if !ours_bad.is_empty() {
            // The same block is bad here too: repair ours from the third replica.
            self.want_repair(&ours_bad, out);
        }
        if !copies.is_empty() {
            out.peer(from, self.chunk, Body::RepairData { applied, blocks: copies });
        }
    }

    /// Copies of our bad blocks from a peer: install the acceptable ones, then retry the work
    /// that waited for them.
    pub fn repair_data(&mut self, from: ReplicaId, applied: Index, copies: Vec<SnapBlock>, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        let mut progress = false;
        for copy in copies {
            if !self.repairs.acceptable(&copy, applied) {
                continue;
            }
            let image = ImageBlock { block: copy.block, version: copy.version, data: copy.data.map(|d| d.to_vec()) };
            match self.blocks.repair(&image) {
                Ok(repaired) => {
                    if repaired {
                        info!(
                            chunk = self.chunk,
                            block = copy.block,
                            version = copy.version.0,
                            from = from.0,
                            "repaired a block from a peer"
                        );
                    }
                    self.repairs.resolved(copy.block, repaired);
                    progress = true;
                }
                Err(StorageError::Invalid(why)) => warn!(chunk = self.chunk, from = from.0, "bad repair copy: {why}"),
                Err(e) => return self.fail("repairing a block", e),
            }
        }
        if progress {
            let (reads, applies) = self.repairs.take_parked();
            for entry in applies {
                self.apply(entry, out);
            }
            for r in reads {
                self.read(r.id, r.offset, r.len_bytes, out);
            }
            self.drain(out);
        }
    }

    /// Replaces the block store by the received image: sync the image and its checkpoint,
    /// then swap directories (`blocks` → `blocks.old`, `blocks.new` → `blocks`) and fsync the
    /// chunk directory. A crash anywhere leaves either the old store or the new one
    /// ([`repair_swap`] finishes the job at start-up).
    fn install(&mut self, from: ReplicaId, state: CheckpointState) -> Result<(), StorageError> {
        let mut staging = self.incoming.take().expect("InstallSnapshot without a complete image");
        assert_eq!(staging.from, from, "image and snapshot message from different peers");
        staging.blocks.sync()?;
        meta::save_checkpoint(self.meta.as_mut(), &staging_dir(&self.dir), &state)?;
        let checkpoint = state.index;
        drop(staging);
        let (blocks, staged, old) = (blocks_dir(&self.dir), staging_dir(&self.dir), old_dir(&self.dir));
        std::fs::rename(&blocks, &old)?;
        std::fs::rename(&staged, &blocks)?;
        fsync_dir(&self.dir)?;
        std::fs::remove_dir_all(&old)?;
        let engine = open_engine(self.options.engine)?;
        self.blocks = BlockStore::open(engine, &blocks, self.capacity_bytes, self.options.blocks_direct)?;
        info!(chunk = self.chunk, from = from.0, checkpoint = checkpoint.0, "installed a snapshot image");
        Ok(())
    }

    /// A checkpoint finished on the checkpoint thread.
    pub fn checkpoint_done(&mut self, index: Index, error: Option<String>, took: Duration, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        self.stages.record(Stage::Checkpoint, took);
        match error {
            None => self.step(Event::CheckpointDone { index }, out),
            Some(why) => self.fail("checkpoint", StorageError::Fatal(std::io::Error::other(why))),
        }
    }

    /// Hands the pending WAL records to the WAL thread as one append (one fdatasync), unless
    /// an append of this group is still running. Returns whether a job was sent.
    pub fn submit_wal(&mut self) -> bool {
        if self.failed.is_some() || self.wal_in_flight || self.wal_tokens.is_empty() {
            return false;
        }
        let job = WalJob {
            chunk: self.chunk,
            wal: self.wal.clone(),
            records: std::mem::take(&mut self.wal_batch),
            tokens: std::mem::take(&mut self.wal_tokens),
        };
        self.wal_in_flight = true;
        if self.disk.wal.send(job).is_err() {
            self.fail("WAL append", StorageError::Fatal(std::io::Error::other("the WAL thread is gone")));
        }
        true
    }

    /// An append finished: report every token it covered, or fail-stop if it failed (nothing
    /// of that batch may be acknowledged: no Persisted event is delivered).
    pub fn wal_done(&mut self, tokens: Vec<u64>, error: Option<String>, took: Duration, out: &mut Outbox) {
        self.wal_in_flight = false;
        if self.failed.is_some() {
            return;
        }
        if let Some(why) = error {
            self.fail("WAL append", StorageError::Fatal(std::io::Error::other(why)));
            return;
        }
        self.stages.record(Stage::WalSync, took);
        self.traces.durable(&tokens, &mut self.stages);
        for token in tokens {
            self.step(Event::Persisted { token }, out);
        }
    }

    pub fn tick(&mut self, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        let leader = self.replica.role() == parallelraft::RoleKind::Leader;
        if leader && !self.was_leader {
            self.counters.leader_changes += 1;
        }
        self.was_leader = leader;
        self.traces.trim();
        let (asks, expired) = self.repairs.tick();
        self.ask(asks, out);
        for r in expired {
            let why = "a block of the range failed its checksum and no peer had a good copy yet";
            self.respond(r.id, Outcome::Failed(why.into()), out);
            self.events.push_back(Event::ReadDone { id: r.id });
        }
        self.step(Event::Tick, out);
    }

    /// Requests in progress from frontends.
    pub fn in_flight(&self) -> usize {
        self.waiting.len()
    }

    /// Blocks found bad and not yet repaired, and blocks repaired since start.
    pub fn repair_counts(&self) -> (usize, u64) {
        (self.repairs.wanted(), self.repairs.repaired)
    }

    pub fn receive(&mut self, from: ReplicaId, message: Message, out: &mut Outbox) {
        if let Message::Ack { acked, durable, synced: true, .. } = &message {
            self.traces.acked(acked, *durable, &mut self.stages);
        }
        self.step(Event::Receive { from, message }, out);
    }

    /// A slice of a snapshot image from `from`.
    pub fn snapshot_data(&mut self, from: ReplicaId, id: u64, blocks: Vec<SnapBlock>) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.stage(from, id, blocks) {
            warn!(chunk = self.chunk, "dropping a snapshot image being received: {e}");
            self.staging = None;
        }
    }

    fn stage(&mut self, from: ReplicaId, id: u64, blocks: Vec<SnapBlock>) -> Result<(), StorageError> {
        let fresh = !matches!(&self.staging, Some(s) if s.from == from && s.id == id);
        if fresh {
            self.staging = None;
            let dir = staging_dir(&self.dir);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            std::fs::create_dir_all(&dir)?;
            let engine = open_engine(self.options.engine)?;
            let store = BlockStore::open(engine, &dir, self.capacity_bytes, self.options.blocks_direct)?;
            self.staging = Some(Staging { from, id, blocks: store, received: 0 });
        }
        let staging = self.staging.as_mut().unwrap();
        let image: Vec<ImageBlock> = blocks
            .into_iter()
            .map(|b| ImageBlock { block: b.block, version: b.version, data: b.data.map(|d| d.to_vec()) })
            .collect();
        staging.blocks.put_image(&image)?;
        self.counters.catchup_bytes_received +=
            image.iter().map(|b| b.data.as_ref().map_or(0, |d| d.len() as u64)).sum::<u64>();
        staging.received += image.len() as u64;
        Ok(())
    }

    /// The end of a snapshot stream: step the `Snapshot` message only if the whole image
    /// arrived (a stream cut by a reconnect is dropped; the leader sends a new one).
    pub fn snapshot_end(&mut self, from: ReplicaId, id: u64, blocks: u64, message: Message, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        if blocks == 0 {
            if let Err(e) = self.stage(from, id, Vec::new()) {
                warn!(chunk = self.chunk, "cannot stage an empty snapshot: {e}");
                return;
            }
        }
        match self.staging.take() {
            Some(s) if s.from == from && s.id == id && s.received == blocks => {
                self.incoming = Some(s);
                self.step(Event::Receive { from, message }, out);
                // Not installed (stale or already caught up): discard the image.
                if self.incoming.take().is_some() {
                    let _ = std::fs::remove_dir_all(staging_dir(&self.dir));
                }
            }
            other => {
                if other.is_some() {
                    let _ = std::fs::remove_dir_all(staging_dir(&self.dir));
                }
                warn!(chunk = self.chunk, from = from.0, "incomplete snapshot image ignored");
            }
        }
    }

    /// Streams the next slices of outgoing snapshot images, as far as the peers' queues allow.
    pub fn pump_snapshots(&mut self, out: &mut Outbox) {
        let block_count = self.blocks.block_count();
        let mut bad_blocks = Vec::new();
        let mut k = 0;
        while k < self.outgoing.len() {
            let s = &mut self.outgoing[k];
            let mut done = false;
            while out.peer_has_room(s.to) {
                if s.next_block >= block_count {
                    let body = Body::SnapEnd { snapshot: s.id, blocks: s.sent, message: s.message.clone() };
                    out.peer(s.to, self.chunk, body);
                    done = true;
                    break;
                }
                let count = SNAPSHOT_FRAME_BLOCKS.min(block_count - s.next_block);
                let image = match self.blocks.image(s.next_block, count) {
                    Ok(image) => image,
                    Err(StorageError::BadBlocks(bad)) => {
                        // Not sent with a hole: repair first; the leader asks for a snapshot again.
                        warn!(chunk = self.chunk, "cannot send a snapshot before repairing {} block(s)", bad.len());
                        bad_blocks.extend(bad);
                        done = true;
                        break;
                    }
                    Err(e) => {
                        // A corrupt local block: this replica cannot serve the image.
                        warn!(chunk = self.chunk, "cannot send a snapshot: {e}");
                        done = true;
                        break;
                    }
                };
                s.next_block += count;
                if image.is_empty() {
                    continue;
                }
                s.sent += image.len() as u64;
                self.counters.catchup_bytes_sent +=
                    image.iter().map(|b| b.data.as_ref().map_or(0, |d| d.len() as u64)).sum::<u64>();
                let blocks = image
                    .into_iter()
                    .map(|b| SnapBlock { block: b.block, version: b.version, data: b.data.map(Bytes::from) })
                    .collect();
                out.peer(s.to, self.chunk, Body::SnapData { snapshot: s.id, blocks });
            }
            if done {
                self.outgoing.remove(k);
            } else {
                k += 1;
            }
        }
        if !bad_blocks.is_empty() {
            self.want_repair(&bad_blocks, out);
        }
    }

    pub fn snapshots_streaming(&self) -> bool {
        !self.outgoing.is_empty()
    }
}
