//! Crash-safe small files: the hard state (term, vote, sync term) and the checkpoint (index and
//! client table).
//!
//! Each is replaced atomically: write the new contents to `NAME.tmp`, fdatasync it, rename over
//! `NAME`, fsync the directory. A crash leaves either the old file or the new one, never a mix;
//! a checksum guards against bit rot, and a bad checksum is an error, never a guess (a replica
//! that forgot its vote could vote twice in a term).

use std::path::Path;

use bytes::{BufMut, BytesMut};
use parallelraft::codec::{decode_config, encode_config};
use parallelraft::table::ClientTable;
use parallelraft::{CheckpointState, HardState, Index, ReplicaId, Term};

use super::io::{check_batch, AlignedBuf, IoEngine, IoOp, OpenMode, ALIGN};
use super::{Result, StorageError};

const MAGIC: u32 = u32::from_le_bytes(*b"PRMD");
const HARD_STATE: &str = "hardstate";
const CHECKPOINT: &str = "checkpoint";

fn write_atomic(engine: &mut dyn IoEngine, dir: &Path, name: &str, body: &[u8]) -> Result<()> {
    // Frame: magic, body length, crc32 of body, body; padded to a whole number of pages.
    let framed_len = 12 + body.len();
    let mut buf = AlignedBuf::zeroed(framed_len.div_ceil(ALIGN) * ALIGN);
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
    buf[8..12].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    buf[12..framed_len].copy_from_slice(body);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = engine.open(&tmp, OpenMode { create: true, direct: true })?;
    let results = engine.submit(&mut [IoOp::Write { file, offset: 0, buf: &buf }, IoOp::Sync { file }]);
    engine.close(file);
    check_batch(&results, &[buf.len(), 0])?;
    engine.rename_durable(&tmp, &dir.join(name))?;
    Ok(())
}

fn read_framed(engine: &mut dyn IoEngine, dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    let file = match engine.open(&path, OpenMode { create: false, direct: true }) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let len = engine.len(file)? as usize;
    if len < ALIGN || !len.is_multiple_of(ALIGN) {
        engine.close(file);
        return Err(StorageError::Corrupt { what: format!("{name}: size {len} is not whole pages") });
    }
    let mut buf = AlignedBuf::zeroed(len);
    let results = engine.submit(&mut [IoOp::Read { file, offset: 0, buf: &mut buf }]);
    engine.close(file);
    check_batch(&results, &[len])?;
    let magic = u32::from_le_bytes(buf[0..4].try_into().unwrap());
    let body_len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if magic != MAGIC || 12 + body_len > len || crc32fast::hash(&buf[12..12 + body_len]) != crc {
        return Err(StorageError::Corrupt { what: format!("{name} fails its checksum") });
    }
    Ok(Some(buf[12..12 + body_len].to_vec()))
}

pub fn save_hard_state(engine: &mut dyn IoEngine, dir: &Path, hard: &HardState) -> Result<()> {
    let mut body = BytesMut::new();
    body.put_u64_le(hard.term.0);
    body.put_u64_le(hard.voted_for.map_or(u64::MAX, |v| v.0 as u64));
    body.put_u64_le(hard.sync.0);
    body.put_u64_le(hard.sync_end.0);
    write_atomic(engine, dir, HARD_STATE, &body)
}

/// The `count` little-endian words of a framed file, if it exists.
fn load_words(engine: &mut dyn IoEngine, dir: &Path, name: &str, count: usize) -> Result<Option<Vec<u64>>> {
    let Some(body) = read_framed(engine, dir, name)? else {
        return Ok(None);
    };
    if body.len() != count * 8 {
        return Err(StorageError::Corrupt { what: format!("{name} of {} bytes", body.len()) });
    }
    Ok(Some(body.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect()))
}

/// The saved hard state, or the initial one for a new replica.
pub fn load_hard_state(engine: &mut dyn IoEngine, dir: &Path) -> Result<HardState> {
    let Some(words) = load_words(engine, dir, HARD_STATE, 4)? else {
        return Ok(HardState::default());
    };
    let word = |i: usize| words[i];
    let voted_for = match word(1) {
        u64::MAX => None,
        v => Some(ReplicaId(u32::try_from(v).map_err(|_| StorageError::Corrupt { what: "vote out of range".into() })?)),
    };
    Ok(HardState { term: Term(word(0)), voted_for, sync: Term(word(2)), sync_end: Index(word(3)) })
}

/// Layout: index (u64), configuration length (u32) and configuration (see
/// `parallelraft::codec::encode_config`), then the client table.
pub fn save_checkpoint(engine: &mut dyn IoEngine, dir: &Path, checkpoint: &CheckpointState) -> Result<()> {
    let mut body = BytesMut::new();
    body.put_u64_le(checkpoint.index.0);
    let mut config = BytesMut::new();
    encode_config(&checkpoint.config, &mut config);
    body.put_u32_le(config.len() as u32);
    body.put_slice(&config);
    checkpoint.table.encode(&mut body);
    write_atomic(engine, dir, CHECKPOINT, &body)
}

pub fn load_checkpoint(engine: &mut dyn IoEngine, dir: &Path) -> Result<CheckpointState> {
    let Some(body) = read_framed(engine, dir, CHECKPOINT)? else {
        return Ok(CheckpointState::default());
    };
    let corrupt = |what: String| StorageError::Corrupt { what: format!("checkpoint: {what}") };
    if body.len() < 12 {
        return Err(corrupt("too short".into()));
    }
    let index = Index(u64::from_le_bytes(body[0..8].try_into().unwrap()));
    let config_len = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
    let config_bytes = body.get(12..12 + config_len).ok_or_else(|| corrupt("configuration truncated".into()))?;
    let (config, used) = decode_config(config_bytes).map_err(|e| corrupt(e.to_string()))?;
    if used != config_len || config.index > index {
        return Err(corrupt("malformed configuration".into()));
    }
    let table = ClientTable::decode(&body[12 + config_len..]).map_err(|e| corrupt(e.to_string()))?;
    Ok(CheckpointState { index, table, config })
}

const REBUILD: &str = "rebuild";

/// How far an interrupted rebuild (streaming catch-up) got: every block below `covered`
/// reflects every write up to `low`. Saved only after the blocks it describes were synced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    pub covered: u64,
    pub low: Index,
}

pub fn save_rebuild_progress(engine: &mut dyn IoEngine, dir: &Path, p: RebuildProgress) -> Result<()> {
    let mut body = BytesMut::new();
    body.put_u64_le(p.covered);
    body.put_u64_le(p.low.0);
    write_atomic(engine, dir, REBUILD, &body)
}

/// The saved progress, or none (nothing covered).
pub fn load_rebuild_progress(engine: &mut dyn IoEngine, dir: &Path) -> Result<RebuildProgress> {
    Ok(load_words(engine, dir, REBUILD, 2)?
        .map_or_else(RebuildProgress::default, |w| RebuildProgress { covered: w[0], low: Index(w[1]) }))
}

/// Forgets the progress once the image is installed (its checkpoint now says more).
pub fn clear_rebuild_progress(dir: &Path) -> Result<()> {
    match std::fs::remove_file(dir.join(REBUILD)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
