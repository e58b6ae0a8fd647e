//! Which chunk replicas a server holds, and their life cycle on disk:
//!
//! - **Bootstrap.** On a server's first start, a replica of every chunk of its bootstrap
//!   placement is created with the placement's voters recorded in `members.boot`.
//! - **Joiner.** A leader that added this server to a group reaches it with a leader message
//!   (heartbeat, append, sync, snapshot) for a chunk it does not hold: the server creates a
//!   joiner replica (`members.boot` empty), which knows no membership, never votes, and learns
//!   the group's configuration from the leader's snapshot.
//! - **Retired.** When the operator removed this server from a group and tells it so, the
//!   replica's data is deleted but its hard state is kept as a tombstone, with the sync term
//!   cleared (the log it vouched for is gone). The `retired` marker keeps it closed across
//!   restarts. A later re-add starts a joiner on top of the tombstone, so the server never
//!   forgets a term it voted in (membership rule 7 in `parallelraft::membership`).
//!
//! Every step is ordered so a crash between two of them leaves a state the next start handles:
//! the tombstone hard state and the marker are durable before anything is deleted, and a
//! joiner's marker goes last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parallelraft::{Entry, HardState, Index, ReplicaId, Term};
use tracing::{info, warn};

use super::disk::Disk;
use super::group::Group;
use super::{group_config, ServerOptions};
use crate::storage::io::open_engine;
use crate::storage::wal::{Wal, WalOptions, WalRecord, SHARED_LOG_ID};
use crate::storage::{fsync_dir, meta, write_durable};

const BOOT_FILE: &str = "members.boot";
const RETIRED_FILE: &str = "retired";
const HARD_STATE_FILE: &str = "hardstate";
/// In the server's directory: the bootstrap replicas were created (never again: a replica
/// removed since must not come back from the placement).
const INITIALIZED_FILE: &str = "initialized";
/// In the server's directory: the write-ahead log of all its replicas.
const WAL_DIR: &str = "wal";

pub fn chunk_dir(data_dir: &Path, chunk: u32) -> PathBuf {
    data_dir.join(format!("chunk-{chunk:08}"))
}

fn write_boot(dir: &Path, voters: &[ReplicaId]) -> std::io::Result<()> {
    let list: Vec<String> = voters.iter().map(|r| r.0.to_string()).collect();
    write_durable(dir, BOOT_FILE, &format!("{}\n", list.join(",")))
}

/// The bootstrap voters recorded at creation; `None` for a directory written before the file
/// existed.
fn read_boot(dir: &Path) -> Result<Option<Vec<ReplicaId>>, String> {
    let path = dir.join(BOOT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(Some(Vec::new()));
    }
    text.split(',')
        .map(|t| t.parse().map(ReplicaId).map_err(|_| format!("bad {}: {text:?}", path.display())))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn open_one(
    opts: &ServerOptions,
    disk: &Disk,
    chunk: u32,
    voters: Vec<ReplicaId>,
    logged: Vec<Entry>,
) -> Result<Group, String> {
    let cfg = group_config(opts, voters, chunk);
    let (dir, len) = (chunk_dir(&opts.data_dir, chunk), opts.cluster.chunk_len(chunk));
    Group::open(chunk, dir, len, cfg, opts.storage, disk.clone(), logged)
}

/// Opens (or creates) the server's write-ahead log in `wal/` of the data directory and
/// recovers it: per chunk, its log entries.
pub fn open_log(opts: &ServerOptions) -> Result<(Wal, BTreeMap<u64, Vec<Entry>>), String> {
    let data = &opts.data_dir;
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create data directory {}: {e}", data.display()))?;
    // Before anything is read or written in it: a directory of a newer format is refused.
    crate::storage::format::check_and_stamp(data)?;
    let dir = data.join(WAL_DIR);
    let ctx = |e: &dyn std::fmt::Display| format!("the write-ahead log in {}: {e}", dir.display());
    std::fs::create_dir_all(&dir).map_err(|e| ctx(&e))?;
    let engine = open_engine(opts.storage.engine).map_err(|e| ctx(&e))?;
    let options = WalOptions { segment_bytes: opts.storage.wal_segment_bytes, direct: opts.storage.wal_direct };
    let (log, recovery) = Wal::open(engine, &dir, SHARED_LOG_ID, options).map_err(|e| ctx(&e))?;
    for c in &recovery.corruptions {
        // The entry is left out of the recovered log: its replica holds a hole there, which the
        // protocol fills from its peers (merge or catch-up); it is never guessed.
        warn!(segment = c.segment, offset = c.offset, index = ?c.index_hint, "WAL record failed its checksum");
    }
    if recovery.torn_tail {
        info!("discarded a torn batch at the end of the WAL");
    }
    Ok((log, recovery.chunks))
}

/// Opens every chunk replica this server holds, creating the bootstrap ones on first start;
/// `logged` is what the server's log recovered (see [`open_log`]).
pub fn open_groups(
    opts: &ServerOptions,
    disk: &Disk,
    mut logged: BTreeMap<u64, Vec<Entry>>,
) -> Result<BTreeMap<u32, Group>, String> {
    let data = &opts.data_dir;
    let placed = opts.cluster.chunks_on(opts.id);
    if !data.join(INITIALIZED_FILE).exists() {
        // First start (or one interrupted while creating): create what the placement gives us.
        for &chunk in &placed {
            let dir = chunk_dir(data, chunk);
            if dir.exists() {
                continue;
            }
            std::fs::create_dir_all(&dir)
                .and_then(|()| write_boot(&dir, &opts.cluster.replicas_of(chunk)))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        write_durable(data, INITIALIZED_FILE, "bootstrap replicas created\n")
            .map_err(|e| format!("cannot write to {}: {e}", data.display()))?;
    }
    let mut groups = BTreeMap::new();
    for chunk in 0..opts.cluster.chunk_count() {
        let dir = chunk_dir(data, chunk);
        if !dir.is_dir() || dir.join(RETIRED_FILE).exists() {
            continue;
        }
        let voters = match read_boot(&dir)? {
            Some(v) => v,
            // A directory of an earlier version: it was created from the placement.
            None if placed.contains(&chunk) => opts.cluster.replicas_of(chunk),
            None => Vec::new(),
        };
        let entries = logged.remove(&(chunk as u64)).unwrap_or_default();
        groups.insert(chunk, open_one(opts, disk, chunk, voters, entries)?);
    }
    // Records of chunks without a replica here (retired) keep no segment.
    disk.lock_log().retain_chunks(|c| u32::try_from(c).is_ok_and(|c| groups.contains_key(&c)));
    Ok(groups)
}

/// A leader reached this server for `chunk`, which it does not hold: create a joiner replica
/// (on top of a tombstone, if the server was a member before).
pub fn create_joiner(opts: &ServerOptions, disk: &Disk, chunk: u32) -> Result<Group, String> {
    let dir = chunk_dir(&opts.data_dir, chunk);
    // First, durably: whatever the server's log still holds of an earlier replica of this chunk
    // is void, so no restart replays it into the new one.
    disk.lock_log()
        .append_chunks(&[(chunk as u64, &[WalRecord::Reset])])
        .map_err(|e| format!("cannot create a joiner replica of chunk {chunk}: the write-ahead log: {e}"))?;
    let ctx = |e: std::io::Error| format!("cannot create a joiner replica in {}: {e}", dir.display());
    std::fs::create_dir_all(&dir).map_err(ctx)?;
    remove_all_but(&dir, &[HARD_STATE_FILE, RETIRED_FILE]).map_err(ctx)?;
    write_boot(&dir, &[]).map_err(ctx)?;
    match std::fs::remove_file(dir.join(RETIRED_FILE)) {
        Ok(()) => fsync_dir(&dir).map_err(ctx)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx(e)),
    }
    info!(chunk, "joining a group: created a replica that waits for its leader's snapshot");
    open_one(opts, disk, chunk, Vec::new(), Vec::new())
}

/// Deletes a removed replica's data, keeping its term and vote (see the module docs). The
/// caller checked that no disk job of the group runs.
pub fn retire(opts: &ServerOptions, group: Group) -> Result<(), String> {
    let dir = group.dir().to_owned();
    let hard = group.replica().hard_state().clone();
    let chunk = group.chunk;
    drop(group);
    let ctx = |e: &dyn std::fmt::Display| format!("cannot retire the replica in {}: {e}", dir.display());
    let tombstone = HardState { sync: Term(0), sync_end: Index(0), ..hard };
    let mut engine = open_engine(opts.storage.engine).map_err(|e| ctx(&e))?;
    meta::save_hard_state(engine.as_mut(), &dir, &tombstone).map_err(|e| ctx(&e))?;
    write_durable(&dir, RETIRED_FILE, "removed from the group; hard state kept as a tombstone\n")
        .map_err(|e| ctx(&e))?;
    remove_all_but(&dir, &[HARD_STATE_FILE, RETIRED_FILE]).map_err(|e| ctx(&e))?;
    info!(chunk, term = tombstone.term.0, "replica retired: data deleted, term and vote kept");
    Ok(())
}

fn remove_all_but(dir: &Path, keep: &[&str]) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if keep.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    fsync_dir(dir)
}

/// Whether a replica may be retired on the operator's word that the configuration entry at
/// `config` removed it: its own configuration is not newer and including it.
pub fn may_retire(group: &Group, config: Index) -> Result<(), String> {
    let state = group.replica().config_state();
    let me = group.replica().id();
    if state.index > config && state.membership.contains(me) {
        return Err(format!(
            "this replica knows a newer configuration (entry {}) that includes it: {}",
            state.index.0, state.membership
        ));
    }
    Ok(())
}
