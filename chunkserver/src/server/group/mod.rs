//! One chunk replica on this server: the protocol core plus the storage that executes its
//! commands.
//!
//! Directory of a chunk replica:
//! ```text
//! chunk-00000003/
//!   hardstate          term, vote, sync term (meta::save_hard_state)
//!   members.boot       the bootstrap voters this replica was created with (none: a joiner)
//!   blocks/            blocks.dat, blocks.meta, the checkpoint that describes them and the
//!                      progress of an interrupted rebuild (see `rebuild`)
//! ```
//! The replica's log records live in the server's write-ahead log (`wal/` beside the chunk
//! directories, shared by every replica of the server). Earlier versions kept a `wal-*.log`
//! per chunk directory (moved into the server's log at start-up) and received images into
//! `blocks.new/` and swapped directories (a leftover of that is finished or undone).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parallelraft::{
    ClientError, ClientRequest, Command, Config, Entry, Event, Index, Message, Op, Replica, ReplicaId, RequestId,
};
use tracing::{info, warn};

use crate::metrics::{Stage, Stages};
use crate::storage::blocks::{BlockStore, ImageBlock};
use crate::storage::io::{open_engine, EngineKind, IoEngine};
use crate::storage::meta;
use crate::storage::meta::RebuildProgress;
use crate::storage::migrate::migrate;
use crate::storage::wal::{WalOptions, WalRecord};
use crate::storage::{fsync_dir, BadBlock, StorageError};
use crate::wire::{BlockNeed, Body, GroupStatus, Outcome, RequestOp, SnapBlock, MAX_SCRUB_BLOCKS};

use super::disk::{CheckpointJob, Disk, GroupAppend};
use super::outbox::{ConnId, Outbox};
use super::repair::{can_serve, Repairs};
use super::trace::Traces;

pub mod rebuild;
use rebuild::{OutSnapshot, Receiving};

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
    /// Write payload bytes received in log entries while not a voter (a learner's log tail).
    pub catchup_log_bytes_received: u64,
    /// Sync messages received that carried only part of a new leader's decided log.
    pub partial_syncs_received: u64,
    /// Times this replica rewrote its log at the head of the server's WAL.
    pub log_rewrites: u64,
}

/// Ticks between two rewrites of a replica's log (one second at the default 20 ms tick).
pub const REWRITE_EVERY_TICKS: u64 = 50;

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

pub struct Group {
    pub chunk: u32,
    replica: Replica,
    dir: PathBuf,
    /// An append of this group is running on the WAL thread.
    wal_in_flight: bool,
    /// A durable checkpoint the server's log has not been told of yet (entries up to it may go).
    wal_cover: Option<Index>,
    /// Ticks since start, and the tick of the last rewrite of the log (see `rewrite_log`).
    ticks: u64,
    rewritten_at: Option<u64>,
    /// A checkpoint of this group is running on the checkpoint thread.
    checkpoint_running: bool,
    /// The server's disk threads: group commits and checkpoints run there.
    disk: Disk,
    blocks: BlockStore,
    meta: Box<dyn IoEngine>,
    /// Records of the next group commit and the tokens they complete (records may complete no
    /// token: a rewrite of the log, see [`Group::rewrite_log`]).
    wal_batch: Vec<WalRecord>,
    wal_tokens: Vec<u64>,
    /// Which frontend connection asked, per request in progress.
    waiting: HashMap<RequestId, ConnId>,
    /// Rebuild streams to peers (see `rebuild`).
    outgoing: Vec<OutSnapshot>,
    /// The rebuild stream being received, if any.
    receiving: Option<Receiving>,
    /// Every frame of the `Snapshot` message being stepped arrived.
    image_ready: bool,
    /// How far an interrupted rebuild got (in memory; saved every `rebuild::SAVE_EVERY_BYTES`).
    progress: RebuildProgress,
    unsaved_rebuild_bytes: u64,
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
    /// Opens (or creates) the replica of `chunk` in `dir` and recovers it from disk: `logged` is
    /// what the server's log recovered for the chunk (a chunk log of an earlier version in `dir`
    /// replaces it, see `crate::storage::migrate`).
    pub fn open(
        chunk: u32,
        dir: PathBuf,
        capacity_bytes: u64,
        cfg: Config,
        options: StorageOptions,
        disk: Disk,
        logged: Vec<Entry>,
    ) -> Result<Group, String> {
        let ctx = |e: &dyn std::fmt::Display| format!("chunk {chunk} in {}: {e}", dir.display());
        std::fs::create_dir_all(blocks_dir(&dir)).map_err(|e| ctx(&e))?;
        repair_swap(&dir).map_err(|e| ctx(&e))?;
        let engine = || open_engine(options.engine).map_err(|e| format!("io engine: {e}"));
        let mut meta = engine()?;
        let hard = meta::load_hard_state(meta.as_mut(), &dir).map_err(|e| ctx(&e))?;
        let checkpoint = meta::load_checkpoint(meta.as_mut(), &blocks_dir(&dir)).map_err(|e| ctx(&e))?;
        let progress = meta::load_rebuild_progress(meta.as_mut(), &blocks_dir(&dir)).map_err(|e| ctx(&e))?;
        let blocks = BlockStore::open(engine()?, &blocks_dir(&dir), capacity_bytes, options.blocks_direct)
            .map_err(|e| ctx(&e))?;
        let wal_options = WalOptions { segment_bytes: options.wal_segment_bytes, direct: options.wal_direct };
        let migrated = migrate(&mut disk.lock_log(), engine()?, &dir, chunk, wal_options).map_err(|e| ctx(&e))?;
        let logged = match migrated {
            Some(recovery) => {
                for c in &recovery.corruptions {
                    // Left out of the log: a hole, which the protocol fills from its peers.
                    warn!(chunk, segment = c.segment, offset = c.offset, index = ?c.index_hint, "WAL record failed its checksum");
                }
                info!(chunk, entries = recovery.entries.len(), "moved the chunk's own WAL into the server's");
                recovery.entries
            }
            None => logged,
        };
        let entries = logged.len();
        let replica = Replica::recover(cfg, hard, checkpoint.clone(), logged);
        info!(chunk, checkpoint = checkpoint.index.0, entries, term = replica.term().0, "chunk replica recovered");
        Ok(Group {
            chunk,
            replica,
            dir,
            wal_in_flight: false,
            wal_cover: Some(checkpoint.index),
            ticks: 0,
            rewritten_at: None,
            checkpoint_running: false,
            disk,
            blocks,
            meta,
            wal_batch: Vec::new(),
            wal_tokens: Vec::new(),
            waiting: HashMap::new(),
            outgoing: Vec::new(),
            receiving: None,
            image_ready: false,
            progress,
            unsaved_rebuild_bytes: 0,
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

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// No disk job of this group is running (so its files may be deleted).
    pub fn is_idle(&self) -> bool {
        !self.wal_in_flight && !self.checkpoint_running
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
    /// whose records [`Group::take_wal`] gives to the server's next one).
    pub fn step(&mut self, event: Event, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        self.events.push_back(event);
        self.drain(out);
    }

    /// Runs the commands of the events stepped so far, then steps the queued events and runs
    /// the commands they lead to.
    fn drain(&mut self, out: &mut Outbox) {
        loop {
            for command in self.replica.take_commands() {
                if self.failed.is_some() {
                    return;
                }
                self.execute(command, out);
            }
            let Some(event) = self.events.pop_front() else {
                return;
            };
            // Its commands run at the top of the next turn.
            self.step_deferred(event);
        }
    }

    /// Runs what the writes and acknowledgements of this round led to (see
    /// [`Group::step_deferred`]): each follower gets the round's writes in one append. Call once
    /// per round, before the outbox is flushed.
    pub fn flush(&mut self, out: &mut Outbox) {
        if self.failed.is_none() {
            self.drain(out);
        }
    }

    /// A frontend request arrived on `conn`.
    pub fn request(&mut self, conn: ConnId, id: RequestId, floor: u64, op: RequestOp, out: &mut Outbox) {
        if let Some(why) = &self.failed {
            out.frontend(conn, self.chunk, Body::Response { id, outcome: Outcome::Failed(why.clone()) });
            return;
        }
        let (write, len_bytes) = match &op {
            RequestOp::Read { len_bytes, .. } => (false, *len_bytes),
            RequestOp::Write { data, .. } => (true, data.len() as u64),
            RequestOp::Trim { len_bytes, .. } | RequestOp::WriteZeroes { len_bytes, .. } => (true, *len_bytes),
            RequestOp::Change(change) => {
                self.waiting.insert(id, conn);
                info!(chunk = self.chunk, ?change, "membership change requested");
                return self.step(Event::ChangeMembership { id, change: *change }, out);
            }
            RequestOp::Status => {
                let outcome = Outcome::Status(self.status());
                return out.frontend(conn, self.chunk, Body::Response { id, outcome });
            }
            RequestOp::Scrub { first_block, count } => {
                let outcome = self.scrub(*first_block, *count);
                return out.frontend(conn, self.chunk, Body::Response { id, outcome });
            }
            RequestOp::Retire { .. } => unreachable!("the server retires replicas"),
        };
        self.waiting.insert(id, conn);
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
            RequestOp::Change(_) | RequestOp::Status | RequestOp::Scrub { .. } | RequestOp::Retire { .. } => {
                unreachable!("answered above")
            }
        };
        if write {
            self.step_deferred(event);
        } else {
            self.step(event, out);
        }
    }

    /// Steps `event` (nothing once the group failed), but its commands wait for the round's
    /// end ([`Group::flush`]) or the group's next [`Group::step`]: the writes of one round then
    /// reach each follower in one append, not one message (and one WAL record list, one
    /// acknowledgement, one frame check) each. Nothing is lost by the wait: the round sends its
    /// messages and starts its WAL writes only after every frame of it is stepped. For events
    /// whose commands need nothing of the group's state around them (unlike a snapshot's end,
    /// say).
    fn step_deferred(&mut self, event: Event) {
        if self.failed.is_some() {
            return;
        }
        self.replica.step(event);
        #[cfg(debug_assertions)]
        {
            self.replica.check_invariants();
            self.repairs.check_invariants();
        }
    }

    /// This replica's view of its group.
    pub fn status(&self) -> GroupStatus {
        let r = &self.replica;
        let config = r.config_state();
        GroupStatus {
            role: if self.failed.is_some() { "Failed".into() } else { format!("{:?}", r.role()) },
            term: r.term(),
            leader: r.leader_hint(),
            voters: config.membership.voters.iter().copied().collect(),
            learners: config.membership.learners.iter().copied().collect(),
            config_index: config.index,
            committed: r.committed_watermark(),
            applied: r.applied_watermark(),
            last: r.last_index(),
            checkpoint: r.checkpoint_index(),
            rebuild_received_bytes: self.counters.catchup_bytes_received + self.counters.catchup_log_bytes_received,
        }
    }

    /// Checksums of a range of blocks, for a scrub.
    fn scrub(&mut self, first_block: u64, count: u64) -> Outcome {
        if self.failed.is_some() {
            return Outcome::Failed("replica failed".into());
        }
        if count > MAX_SCRUB_BLOCKS {
            return Outcome::Failed(format!("scrub of {count} blocks: at most {MAX_SCRUB_BLOCKS} per request"));
        }
        match self.blocks.scrub(first_block, count) {
            Ok(sums) => Outcome::Scrub(sums),
            Err(StorageError::BadBlocks(bad)) => {
                Outcome::Failed(format!("{} block(s) fail their checksum here (first: {})", bad.len(), bad[0].block))
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
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
            Command::PruneLog { through } => self.wal_cover = self.wal_cover.max(Some(through)),
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
                    Err(ClientError::Membership(e)) => Outcome::Refused(e),
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
                self.checkpoint_running = true;
                if self.disk.checkpoint.send(job).is_err() {
                    self.fail(
                        "checkpoint",
                        StorageError::Fatal(std::io::Error::other("the checkpoint thread is gone")),
                    );
                }
            }
            Command::SendSnapshot { to, message } => self.offer_snapshot(to, message, out),
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

    /// The other members of the group (voters and learners) as this replica knows them.
    fn peers(&self) -> Vec<ReplicaId> {
        let me = self.replica.id();
        self.replica.membership().members().filter(|r| *r != me).collect()
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

    /// A checkpoint finished on the checkpoint thread.
    pub fn checkpoint_done(&mut self, index: Index, error: Option<String>, took: Duration, out: &mut Outbox) {
        self.checkpoint_running = false;
        if self.failed.is_some() {
            return;
        }
        self.stages.record(Stage::Checkpoint, took);
        match error {
            None => self.step(Event::CheckpointDone { index }, out),
            Some(why) => self.fail("checkpoint", StorageError::Fatal(std::io::Error::other(why))),
        }
    }

    /// The pending WAL records as this round's part of the server's group commit, unless an
    /// append of this group is still running (then they wait for the next round after it).
    pub fn take_wal(&mut self) -> Option<GroupAppend> {
        if self.failed.is_some() || self.wal_in_flight || (self.wal_batch.is_empty() && self.wal_tokens.is_empty()) {
            return None;
        }
        self.wal_in_flight = true;
        Some(GroupAppend {
            chunk: self.chunk,
            records: std::mem::take(&mut self.wal_batch),
            tokens: std::mem::take(&mut self.wal_tokens),
        })
    }

    /// A checkpoint the server's log has not been told of yet.
    pub fn take_wal_cover(&mut self) -> Option<Index> {
        self.wal_cover.take()
    }

    /// The WAL thread is gone: the records handed to it never become durable.
    pub fn wal_lost(&mut self) {
        self.wal_in_flight = false;
        self.fail("WAL append", StorageError::Fatal(std::io::Error::other("the WAL thread is gone")));
    }

    /// This replica's records keep the server's oldest log segment: writes its log anew at the
    /// head, a reset and every entry it holds above its checkpoint, ahead of any records still
    /// pending (the copy already reflects them; replaying them again changes nothing). Entries
    /// not yet reported durable become durable sooner, which the protocol allows. Skipped
    /// while an append of the group runs (the next report names it again), and within
    /// [`REWRITE_EVERY_TICKS`] of the last rewrite: a replica whose own uncovered entries fill
    /// the log (a follower that cannot commit) would otherwise copy them round after round.
    pub fn rewrite_log(&mut self) {
        let recent = self.rewritten_at.is_some_and(|t| self.ticks - t < REWRITE_EVERY_TICKS);
        if self.failed.is_some() || self.wal_in_flight || recent {
            return;
        }
        self.rewritten_at = Some(self.ticks);
        self.counters.log_rewrites += 1;
        let mut records = WalRecord::log_anew(self.replica.entries().cloned());
        info!(chunk = self.chunk, entries = records.len() - 1, "rewriting the replica's log at the head of the WAL");
        records.append(&mut self.wal_batch);
        self.wal_batch = records;
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
        self.ticks += 1;
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

    /// The server's clock ran ahead of its ticks (see `Event::ClockJump`).
    pub fn clock_jumped(&mut self, out: &mut Outbox) {
        self.step(Event::ClockJump, out);
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
        if let Message::Sync { upto, end, .. } = &message {
            self.counters.partial_syncs_received += u64::from(upto < end);
        }
        match &message {
            Message::Ack { acked, durable, synced: true, .. } => self.traces.acked(acked, *durable, &mut self.stages),
            Message::Append { entries, .. } | Message::Sync { entries, .. }
                if !self.replica.membership().is_voter(self.replica.id()) =>
            {
                // A learner (or joiner) being rebuilt from the log rather than the image; copies
                // of entries it already holds (retransmissions) are not counted.
                let r = &self.replica;
                self.counters.catchup_log_bytes_received += entries
                    .iter()
                    .filter(|e| e.index > r.checkpoint_index() && r.entry(e.index).is_none())
                    .map(|e| parallelraft::io::write_data(&e.op).map_or(0, |d| d.len() as u64))
                    .sum::<u64>();
            }
            _ => {}
        }
        if matches!(message, Message::Ack { .. }) {
            // Like a write (see `request`): what it leads to (commits, applies, replies) runs at
            // the round's end, so an acknowledgement does not cut the round's append short.
            self.step_deferred(Event::Receive { from, message });
        } else {
            self.step(Event::Receive { from, message }, out);
        }
    }
}
