//! The block store of one chunk replica: a data file of 4 KiB blocks and a metadata file with a
//! checksum, state and version per block, verified on every read.
//!
//! Durability contract: block writes become durable at [`BlockStore::sync`] (the checkpoint),
//! which writes the dirty metadata pages and fdatasyncs both files (after writing the dirty
//! data pages back in small windows, see [`super::writeback`]). Between checkpoints a crash
//! may leave any mix of old and new blocks and metadata; the protocol re-applies every entry
//! above the checkpoint after a restart, and a block whose data and checksum disagree meanwhile
//! reads as [`StorageError::BadBlocks`], never as data; the server repairs it from a peer.
//!
//! Versions: a block's version is the index of the entry that last wrote it. The protocol
//! applies the entries touching one block in index order (its conflict granule is the block),
//! so a block at version `v` holds the effect of every entry up to `v` that touches it.
//! [`BlockStore::apply`] relies on that to skip blocks already past an entry.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use parallelraft::{Entry, Index, Op};

use super::io::{check_batch, AlignedBuf, FileId, IoEngine, IoOp, OpenMode, ALIGN};
use super::writeback::{self, DirtyBlocks};
use super::{BadBlock, Result, StorageError};

pub const BLOCK_BYTES: u64 = 4096;
/// Smallest write unit accepted (the NBD minimum block size).
pub const SECTOR_BYTES: u64 = 512;
/// Blocks per data-file write at most. A large buffered write makes the kernel cache that
/// range in large folios, and every later 4 KiB write into such a folio walks all of its
/// buffer heads in `ext4_block_write_begin`: after a 512 MiB fill in 1 MiB writes, that one
/// function was 26% of all CPU under 4 KiB random writes (`perf record -a`), and the `apply`
/// stage's p50 went from 2 to 32 µs. Writes of at most 16 KiB keep folios small.
const WRITE_RUN_BLOCKS: u64 = 4;

const META_BYTES: usize = 16;
const META_PER_PAGE: u64 = (ALIGN / META_BYTES) as u64;
/// Metadata pages written by one write at most (1 MiB).
const META_RUN_PAGES: usize = 256;

/// `pages` (ascending, distinct) cut into runs of consecutive pages of at most
/// [`META_RUN_PAGES`].
fn page_runs(pages: &[u64]) -> impl Iterator<Item = &[u64]> {
    pages.chunk_by(|a, b| *b == *a + 1).flat_map(|run| run.chunks(META_RUN_PAGES))
}

/// State of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum BlockState {
    /// Never written, or trimmed / zeroed: reads as zeroes, nothing stored.
    Zero = 0,
    Data = 1,
    /// Its metadata slot was damaged: content and version unknown until the block is repaired
    /// from a peer or overwritten whole. Reads fail; partial writes fail.
    Lost = 2,
}

/// Metadata slot (16 bytes): data crc32 (4) | state (1) | check (3) | version (8). `check` is
/// the low 24 bits of a crc32 over the other fields, so a damaged slot is detected instead of
/// being trusted (a wrong version would make a repair accept a stale copy). An all-zero slot
/// is a never-written block, so a freshly allocated metadata file needs no initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockMeta {
    crc: u32,
    state: BlockState,
    /// Index of the log entry that last wrote the block (0 when `Lost`: unknown).
    version: Index,
}

impl BlockMeta {
    const ZERO: BlockMeta = BlockMeta { crc: 0, state: BlockState::Zero, version: Index(0) };
    const LOST: BlockMeta = BlockMeta { crc: 0, state: BlockState::Lost, version: Index(0) };

    fn check(raw: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&raw[0..5]);
        h.update(&raw[8..16]);
        h.finalize() & 0x00ff_ffff
    }

    fn encode(&self, out: &mut [u8]) {
        if *self == BlockMeta::ZERO {
            out[..META_BYTES].fill(0);
            return;
        }
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4] = self.state as u8;
        out[8..16].copy_from_slice(&self.version.0.to_le_bytes());
        let check = BlockMeta::check(out);
        out[5..8].copy_from_slice(&check.to_le_bytes()[..3]);
    }

    /// `None`: the slot is damaged.
    fn decode(raw: &[u8]) -> Option<BlockMeta> {
        if raw[..META_BYTES].iter().all(|b| *b == 0) {
            return Some(BlockMeta::ZERO);
        }
        let mut check = [0u8; 4];
        check[..3].copy_from_slice(&raw[5..8]);
        if u32::from_le_bytes(check) != BlockMeta::check(raw) {
            return None;
        }
        let state = match raw[4] {
            0 => BlockState::Zero,
            1 => BlockState::Data,
            2 => BlockState::Lost,
            _ => return None,
        };
        Some(BlockMeta {
            crc: u32::from_le_bytes(raw[0..4].try_into().unwrap()),
            state,
            version: Index(u64::from_le_bytes(raw[8..16].try_into().unwrap())),
        })
    }

    /// Whether the block already holds the effect of the entry at `index`: entries touching a
    /// block are applied in index order (conflict granules are whole blocks), so a block at a
    /// version at or past `index` contains that entry's write and every earlier one.
    fn covers(&self, index: Index) -> bool {
        self.state != BlockState::Lost && self.version >= index
    }
}

/// One block of a store's image (see [`BlockStore::image`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBlock {
    pub block: u64,
    pub version: Index,
    /// `None`: the block reads as zeroes.
    pub data: Option<Vec<u8>>,
}

pub struct BlockStore {
    engine: Box<dyn IoEngine>,
    data: FileId,
    meta_file: FileId,
    blocks: u64,
    meta: Vec<BlockMeta>,
    /// Metadata pages changed since the last sync.
    dirty_pages: BTreeSet<u64>,
    /// Blocks whose data was written since the last sync (their pages may be dirty).
    dirty_blocks: DirtyBlocks,
    dir: PathBuf,
    /// The data file is open with O_DIRECT: writes must come from aligned memory.
    direct: bool,
}

/// What making the store durable takes, prepared on the thread that owns the store and run on
/// another ([`SyncWork::run`]): the data written since the last sync written back window by
/// window, the changed metadata pages as they are now, then fdatasync of both files. Writes
/// made after the work was taken may or may not be covered; their metadata pages stay dirty
/// for the next sync.
pub struct SyncWork {
    data_path: PathBuf,
    meta_path: PathBuf,
    /// Byte ranges of the data file to write back first, one at a time.
    windows: Vec<(u64, u64)>,
    pages: Vec<(u64, AlignedBuf)>,
}

impl SyncWork {
    /// Writes the pages and syncs both files through `engine` (its own file handles: the page
    /// cache and the device are per file, not per handle).
    pub fn run(self, engine: &mut dyn IoEngine) -> Result<()> {
        let data = engine.open(&self.data_path, OpenMode { create: false, direct: false })?;
        let meta = match engine.open(&self.meta_path, OpenMode { create: false, direct: true }) {
            Ok(m) => m,
            Err(e) => {
                engine.close(data);
                return Err(e.into());
            }
        };
        let result = write_back_and_sync(engine, data, meta, &self.windows, &self.pages);
        engine.close(data);
        engine.close(meta);
        result
    }
}

/// Writes `windows` of `data` back one at a time (each waits for the last), then writes
/// metadata pages into `meta` and fdatasyncs `data` and `meta`, as one batch.
fn write_back_and_sync(
    engine: &mut dyn IoEngine,
    data: FileId,
    meta: FileId,
    windows: &[(u64, u64)],
    pages: &[(u64, AlignedBuf)],
) -> Result<()> {
    for &(offset, len) in windows {
        let results = engine.submit(&mut [IoOp::WriteBack { file: data, offset, len }]);
        check_batch(&results, &[0])?;
    }
    let mut ops: Vec<IoOp<'_>> = Vec::new();
    let mut expected = Vec::new();
    for (page, buf) in pages {
        ops.push(IoOp::Write { file: meta, offset: page * ALIGN as u64, buf });
        expected.push(buf.len());
    }
    ops.extend([IoOp::Sync { file: data }, IoOp::Sync { file: meta }]);
    expected.extend([0, 0]);
    let results = engine.submit(&mut ops);
    check_batch(&results, &expected)?;
    Ok(())
}

impl BlockStore {
    /// Opens (or creates) a store of `capacity_bytes` (a multiple of 4 KiB) in `dir`.
    pub fn open(mut engine: Box<dyn IoEngine>, dir: &Path, capacity_bytes: u64, direct: bool) -> Result<BlockStore> {
        if capacity_bytes == 0 || !capacity_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(StorageError::Invalid(format!(
                "capacity {capacity_bytes} is not a positive multiple of 4 KiB"
            )));
        }
        let blocks = capacity_bytes / BLOCK_BYTES;
        let mode = OpenMode { create: true, direct };
        let data = engine.open(&dir.join("blocks.dat"), mode)?;
        let meta_file = engine.open(&dir.join("blocks.meta"), mode)?;
        let meta_len = blocks.div_ceil(META_PER_PAGE) * ALIGN as u64;
        if engine.len(data)? < capacity_bytes {
            engine.allocate(data, capacity_bytes)?;
        }
        if engine.len(meta_file)? < meta_len {
            engine.allocate(meta_file, meta_len)?;
        }
        let mut raw = AlignedBuf::zeroed(meta_len as usize);
        let results = engine.submit(&mut [IoOp::Read { file: meta_file, offset: 0, buf: &mut raw }]);
        check_batch(&results, &[meta_len as usize])?;
        let mut meta = Vec::with_capacity(blocks as usize);
        for b in 0..blocks as usize {
            // A damaged slot: the block is unreadable, version unknown, until repaired.
            let m = BlockMeta::decode(&raw[b * META_BYTES..(b + 1) * META_BYTES]).unwrap_or(BlockMeta::LOST);
            meta.push(m);
        }
        Ok(BlockStore {
            engine,
            data,
            meta_file,
            blocks,
            meta,
            dirty_pages: BTreeSet::new(),
            dirty_blocks: DirtyBlocks::new(blocks),
            dir: dir.to_path_buf(),
            direct,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.blocks * BLOCK_BYTES
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR_BYTES) || !len.is_multiple_of(SECTOR_BYTES) {
            return Err(StorageError::Invalid(format!("range {offset}+{len} not 512-byte aligned")));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.capacity_bytes()) {
            return Err(StorageError::Invalid(format!(
                "range {offset}+{len} beyond capacity {}",
                self.capacity_bytes()
            )));
        }
        Ok(())
    }

    /// Every change of a block goes through here; a block given data is also marked for the
    /// next sync's write-back.
    fn set_meta(&mut self, block: u64, m: BlockMeta) {
        self.meta[block as usize] = m;
        self.dirty_pages.insert(block / META_PER_PAGE);
        if m.state == BlockState::Data {
            self.dirty_blocks.mark(block);
        }
    }

    /// Reads whole blocks `first..first + count` into `out`, verifying each checksum. Every
    /// bad block of the range is reported ([`StorageError::BadBlocks`]); `out` then holds
    /// unspecified bytes, which the callers never use.
    ///
    /// The data lands in `out` directly, unless O_DIRECT needs an aligned buffer `out` is not
    /// in: a 4 KiB read as leader used to allocate and zero a bounce buffer, copy it out block
    /// by block, and [`BlockStore::read`] copied that again.
    fn read_blocks(&mut self, first: u64, count: u64, out: &mut [u8]) -> Result<()> {
        let bytes = (count * BLOCK_BYTES) as usize;
        assert_eq!(out.len(), bytes, "read_blocks: the buffer must hold the blocks exactly");
        let mut bounce =
            (self.direct && !(out.as_ptr() as usize).is_multiple_of(ALIGN)).then(|| AlignedBuf::zeroed(bytes));
        {
            let target: &mut [u8] = match bounce.as_mut() {
                Some(b) => b,
                None => &mut *out,
            };
            let results =
                self.engine.submit(&mut [IoOp::Read { file: self.data, offset: first * BLOCK_BYTES, buf: target }]);
            check_batch(&results, &[bytes])?;
        }
        if let Some(b) = &bounce {
            out.copy_from_slice(b);
        }
        let mut bad = Vec::new();
        for k in 0..count {
            let m = self.meta[(first + k) as usize];
            let block = &mut out[(k * BLOCK_BYTES) as usize..((k + 1) * BLOCK_BYTES) as usize];
            match m.state {
                // The file may hold anything there (data from before a trim): a Zero block
                // reads as zeroes whatever it holds.
                BlockState::Zero => block.fill(0),
                BlockState::Lost => bad.push(BadBlock { block: first + k, version: None }),
                BlockState::Data => {
                    if crc32fast::hash(block) != m.crc {
                        bad.push(BadBlock { block: first + k, version: Some(m.version) });
                    }
                }
            }
        }
        if !bad.is_empty() {
            return Err(StorageError::BadBlocks(bad));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` (512-byte aligned). Any block failing its checksum makes
    /// the whole read fail: corrupt bytes are never returned.
    pub fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        let mut whole = vec![0u8; ((last - first + 1) * BLOCK_BYTES) as usize];
        self.read_blocks(first, last - first + 1, &mut whole)?;
        let start = (offset - first * BLOCK_BYTES) as usize;
        if start == 0 {
            // The common case (the read starts on a block): the blocks are the answer.
            whole.truncate(len as usize);
            return Ok(whole);
        }
        Ok(whole[start..start + len as usize].to_vec())
    }

    /// Writes `data` at `offset` (512-byte aligned); partial blocks are read, patched and
    /// written whole. `version` is the log index of the write.
    pub fn write(&mut self, offset: u64, data: &[u8], version: Index) -> Result<()> {
        self.write_inner(offset, data.len() as u64, Some(data), version, false)
    }

    /// Zeroes `len` bytes at `offset`: whole blocks are marked zero without writing data.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, version: Index) -> Result<()> {
        self.write_inner(offset, len, None, version, false)
    }

    /// With `gated`, blocks already at `version` or later are left alone (see
    /// [`BlockMeta::covers`]): re-applying an entry after a crash, after installing a
    /// snapshot image or after a repair brought the block past it must not roll it back.
    fn write_inner(&mut self, offset: u64, len: u64, data: Option<&[u8]>, version: Index, gated: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        let count = last - first + 1;
        let skip: Vec<bool> = (first..=last).map(|b| gated && self.meta[b as usize].covers(version)).collect();
        if skip.iter().all(|s| *s) {
            return Ok(());
        }
        let whole_blocks = offset.is_multiple_of(BLOCK_BYTES) && len.is_multiple_of(BLOCK_BYTES);
        let owned: AlignedBuf;
        let bytes: &[u8] = match data {
            // Whole blocks go out from the caller's bytes (the common 4 KiB write: no buffer to
            // allocate, zero and fill), unless O_DIRECT needs an aligned buffer they are not in.
            Some(d) if whole_blocks && (!self.direct || (d.as_ptr() as usize).is_multiple_of(ALIGN)) => d,
            _ => {
                owned = self.merged_blocks(offset, len, data, &skip)?;
                &owned
            }
        };
        // Blocks that end up all zero are stored as Zero (no data write needed for them).
        let mut writes: Vec<(u64, u64)> = Vec::new(); // runs of blocks with data
        for k in 0..count {
            if skip[k as usize] {
                continue;
            }
            let block = &bytes[(k * BLOCK_BYTES) as usize..((k + 1) * BLOCK_BYTES) as usize];
            let zero = data.is_none() && block.iter().all(|b| *b == 0);
            if zero {
                self.set_meta(first + k, BlockMeta { version, ..BlockMeta::ZERO });
                continue;
            }
            self.set_meta(first + k, BlockMeta { crc: crc32fast::hash(block), state: BlockState::Data, version });
            match writes.last_mut() {
                Some((s, n)) if *s + *n == k && *n < WRITE_RUN_BLOCKS => *n += 1,
                _ => writes.push((k, 1)),
            }
        }
        let mut ops: Vec<IoOp<'_>> = Vec::new();
        let mut expected = Vec::new();
        for (k, n) in &writes {
            let run = &bytes[(*k * BLOCK_BYTES) as usize..((*k + *n) * BLOCK_BYTES) as usize];
            ops.push(IoOp::Write { file: self.data, offset: (first + *k) * BLOCK_BYTES, buf: run });
            expected.push(run.len());
        }
        let results = self.engine.submit(&mut ops);
        check_batch(&results, &expected)?;
        Ok(())
    }

    /// The blocks `offset..offset + len` spans as they are to be written, in an aligned buffer:
    /// `data` (zeroes when `None`) over the current content of a partial first and last block
    /// (read-modify-write, unless `skip` leaves that block alone). Both partial blocks are read
    /// before failing, so that every bad block is reported at once.
    fn merged_blocks(&mut self, offset: u64, len: u64, data: Option<&[u8]>, skip: &[bool]) -> Result<AlignedBuf> {
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        let count = last - first + 1;
        let mut buf = AlignedBuf::zeroed((count * BLOCK_BYTES) as usize);
        let head_partial = !offset.is_multiple_of(BLOCK_BYTES) && !skip[0];
        let tail_partial = !(offset + len).is_multiple_of(BLOCK_BYTES) && !skip[(count - 1) as usize];
        let mut bad = Vec::new();
        if head_partial {
            if let Err(e) = self.read_blocks(first, 1, &mut buf[..BLOCK_BYTES as usize]) {
                match e {
                    StorageError::BadBlocks(b) => bad.extend(b),
                    e => return Err(e),
                }
            }
        }
        if tail_partial && (last != first || !head_partial) {
            let at = ((last - first) * BLOCK_BYTES) as usize;
            if let Err(e) = self.read_blocks(last, 1, &mut buf[at..at + BLOCK_BYTES as usize]) {
                match e {
                    StorageError::BadBlocks(b) => bad.extend(b),
                    e => return Err(e),
                }
            }
        }
        if !bad.is_empty() {
            return Err(StorageError::BadBlocks(bad));
        }
        let start = (offset - first * BLOCK_BYTES) as usize;
        match data {
            Some(d) => buf[start..start + len as usize].copy_from_slice(d),
            None => buf[start..start + len as usize].fill(0),
        }
        Ok(buf)
    }

    /// Executes a committed entry's operation on every block not already past it. A partial
    /// write into a bad block fails with [`StorageError::BadBlocks`] and changes nothing that
    /// matters: blocks it did write are at the entry's version, so applying the entry again
    /// after the repair skips them.
    pub fn apply(&mut self, entry: &Entry) -> Result<()> {
        match &entry.op {
            Op::Noop | Op::Config(_) => Ok(()),
            Op::Write { offset, data } => self.write_inner(*offset, data.len() as u64, Some(data), entry.index, true),
            Op::Trim { offset, len_bytes } | Op::WriteZeroes { offset, len_bytes } => {
                self.write_inner(*offset, *len_bytes, None, entry.index, true)
            }
        }
    }

    /// One block, verified, whatever its state (a never-written block is a zero block at
    /// version 0): what a peer sends to repair its copy.
    pub fn block_image(&mut self, block: u64) -> Result<ImageBlock> {
        if block >= self.blocks {
            return Err(StorageError::Invalid(format!("block {block} beyond {}", self.blocks)));
        }
        let mut data = vec![0u8; BLOCK_BYTES as usize];
        self.read_blocks(block, 1, &mut data)?;
        let m = self.meta[block as usize];
        let data = (m.state == BlockState::Data).then_some(data);
        Ok(ImageBlock { block, version: m.version, data })
    }

    /// Whether `block` currently fails its checksum (or lost its metadata).
    pub fn is_bad(&mut self, block: u64) -> Result<bool> {
        match self.block_image(block) {
            Ok(_) => Ok(false),
            Err(StorageError::BadBlocks(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Replaces a bad block by a peer's copy. The caller checked that the copy is at least as
    /// new as everything this replica applied to the block. Returns `false` (and changes
    /// nothing) when the block is no longer bad: a whole-block write repaired it meanwhile.
    pub fn repair(&mut self, image: &ImageBlock) -> Result<bool> {
        if !self.is_bad(image.block)? {
            return Ok(false);
        }
        self.put_block(image.block, image.version, image.data.as_deref())?;
        Ok(true)
    }

    pub fn block_count(&self) -> u64 {
        self.blocks
    }

    /// The blocks of `first..first + count` that were ever written (version above 0), data
    /// verified against its checksum: a slice of the image streaming catch-up sends.
    pub fn image(&mut self, first: u64, count: u64) -> Result<Vec<ImageBlock>> {
        self.image_since(first, count, Index(0))
    }

    /// The blocks of `first..first + count` whose version is above `since`, data verified: a
    /// slice of an incremental image (a receiver that reflects every write up to `since`
    /// already holds the others). Reads nothing when no block qualifies.
    pub fn image_since(&mut self, first: u64, count: u64, since: Index) -> Result<Vec<ImageBlock>> {
        if first.checked_add(count).is_none_or(|end| end > self.blocks) {
            return Err(StorageError::Invalid(format!("blocks {first}+{count} beyond {}", self.blocks)));
        }
        let mut out = Vec::new();
        let wanted = |m: &BlockMeta| m.version > since || m.state == BlockState::Lost;
        let range = first as usize..(first + count) as usize;
        if !self.meta[range].iter().any(wanted) {
            return Ok(out);
        }
        let mut data = vec![0u8; (count * BLOCK_BYTES) as usize];
        self.read_blocks(first, count, &mut data)?;
        for k in 0..count {
            let m = self.meta[(first + k) as usize];
            if !wanted(&m) {
                continue;
            }
            // read_blocks succeeded, so no block of the range is Lost.
            let bytes = (m.state == BlockState::Data)
                .then(|| data[(k * BLOCK_BYTES) as usize..((k + 1) * BLOCK_BYTES) as usize].to_vec());
            out.push(ImageBlock { block: first + k, version: m.version, data: bytes });
        }
        Ok(out)
    }

    /// `(version, crc32 of the 4 KiB as read)` of `first..first + count`, every block verified
    /// against its own checksum: what a scrub compares across replicas.
    pub fn scrub(&mut self, first: u64, count: u64) -> Result<Vec<(Index, u32)>> {
        if first.checked_add(count).is_none_or(|end| end > self.blocks) {
            return Err(StorageError::Invalid(format!("blocks {first}+{count} beyond {}", self.blocks)));
        }
        let mut data = vec![0u8; (count * BLOCK_BYTES) as usize];
        self.read_blocks(first, count, &mut data)?;
        Ok((0..count)
            .map(|k| {
                let block = &data[(k * BLOCK_BYTES) as usize..((k + 1) * BLOCK_BYTES) as usize];
                (self.meta[(first + k) as usize].version, crc32fast::hash(block))
            })
            .collect())
    }

    /// Installs the blocks of an image slice that are newer than what this store holds (or
    /// replace a lost block), in place: a block only ever moves forward, so a store that
    /// reflected every write up to some index still does, whatever slice lands, and an
    /// interrupted stream leaves nothing inconsistent. Returns the bytes written.
    pub fn put_newer(&mut self, image: &[ImageBlock]) -> Result<u64> {
        let newer: Vec<ImageBlock> = image
            .iter()
            .filter(|b| {
                self.meta.get(b.block as usize).is_none_or(|m| m.state == BlockState::Lost || m.version < b.version)
            })
            .cloned()
            .collect();
        self.put_image(&newer)?;
        Ok(newer.iter().map(|b| b.data.as_ref().map_or(0, |d| d.len() as u64)).sum())
    }

    /// Sets one whole block (zeroes when `data` is `None`) at `version`, as installing a
    /// snapshot image does.
    pub fn put_block(&mut self, block: u64, version: Index, data: Option<&[u8]>) -> Result<()> {
        if block >= self.blocks {
            return Err(StorageError::Invalid(format!("block {block} beyond {}", self.blocks)));
        }
        match data {
            Some(d) if d.len() as u64 == BLOCK_BYTES => self.write(block * BLOCK_BYTES, d, version),
            Some(d) => Err(StorageError::Invalid(format!("image block of {} bytes", d.len()))),
            None => self.write_zeroes(block * BLOCK_BYTES, BLOCK_BYTES, version),
        }
    }

    /// Sets many whole blocks at their versions (a slice of a snapshot image), writing runs of
    /// consecutive data blocks with one write each.
    pub fn put_image(&mut self, image: &[ImageBlock]) -> Result<()> {
        let runs = image.chunk_by(|a, b| b.block == a.block + 1 && a.data.is_some() && b.data.is_some());
        for run in runs {
            let first = run[0].block;
            if run.iter().any(|b| b.block >= self.blocks) {
                return Err(StorageError::Invalid(format!("image block beyond {}", self.blocks)));
            }
            if run[0].data.is_none() {
                self.put_block(first, run[0].version, None)?;
                continue;
            }
            let mut buf = AlignedBuf::zeroed(run.len() * BLOCK_BYTES as usize);
            for (j, b) in run.iter().enumerate() {
                let data = b.data.as_deref().unwrap();
                if data.len() as u64 != BLOCK_BYTES {
                    return Err(StorageError::Invalid(format!("image block of {} bytes", data.len())));
                }
                buf[j * BLOCK_BYTES as usize..(j + 1) * BLOCK_BYTES as usize].copy_from_slice(data);
                self.set_meta(
                    b.block,
                    BlockMeta { crc: crc32fast::hash(data), state: BlockState::Data, version: b.version },
                );
            }
            let results =
                self.engine.submit(&mut [IoOp::Write { file: self.data, offset: first * BLOCK_BYTES, buf: &buf }]);
            check_batch(&results, &[buf.len()])?;
        }
        Ok(())
    }

    /// The work of a sync, to run elsewhere (see [`SyncWork`]).
    pub fn take_sync_work(&mut self) -> SyncWork {
        SyncWork {
            data_path: self.dir.join("blocks.dat"),
            meta_path: self.dir.join("blocks.meta"),
            windows: self.take_write_back_windows(),
            pages: self.take_dirty_pages(),
        }
    }

    /// The byte ranges of the data file to write back before the next fdatasync (see
    /// [`writeback::windows`]); clears the marks.
    fn take_write_back_windows(&mut self) -> Vec<(u64, u64)> {
        let runs = self.dirty_blocks.take_runs();
        writeback::windows(&runs).into_iter().map(|(first, span)| (first * BLOCK_BYTES, span * BLOCK_BYTES)).collect()
    }

    /// The dirty metadata pages as they are now, encoded, in runs of consecutive pages (at most
    /// [`META_RUN_PAGES`] each): `(first page, bytes)`. Random writes dirty most pages of a
    /// chunk between two checkpoints, and one O_DIRECT write per page cost a device round trip
    /// each (256 per checkpoint of a 256 MiB chunk).
    fn take_dirty_pages(&mut self) -> Vec<(u64, AlignedBuf)> {
        let pages: Vec<u64> = std::mem::take(&mut self.dirty_pages).into_iter().collect();
        let mut out = Vec::new();
        for run in page_runs(&pages) {
            let (start, count) = (run[0], run.len());
            let mut buf = AlignedBuf::zeroed(count * ALIGN);
            for (k, page) in run.iter().enumerate() {
                self.encode_page(*page, &mut buf[k * ALIGN..(k + 1) * ALIGN]);
            }
            out.push((start, buf));
        }
        out
    }

    /// Encodes metadata page `page` (its `META_PER_PAGE` slots) into `out` (one page).
    fn encode_page(&self, page: u64, out: &mut [u8]) {
        let first = page * META_PER_PAGE;
        for k in 0..META_PER_PAGE.min(self.blocks - first) {
            self.meta[(first + k) as usize].encode(&mut out[k as usize * META_BYTES..(k as usize + 1) * META_BYTES]);
        }
    }

    /// Makes every write so far durable: dirty metadata pages, then fdatasync of both files.
    pub fn sync(&mut self) -> Result<()> {
        let windows = self.take_write_back_windows();
        let pages = self.take_dirty_pages();
        write_back_and_sync(self.engine.as_mut(), self.data, self.meta_file, &windows, &pages)
    }
}

#[cfg(test)]
mod tests {
    use super::{page_runs, META_RUN_PAGES};

    #[test]
    fn page_runs_split_at_gaps_and_at_the_cap() {
        let runs_of = |pages: &[u64]| page_runs(pages).map(<[u64]>::to_vec).collect::<Vec<_>>();
        assert!(runs_of(&[]).is_empty());
        assert_eq!(runs_of(&[4]), vec![vec![4u64]]);
        assert_eq!(runs_of(&[0, 1, 2, 5, 7, 8]), vec![vec![0u64, 1, 2], vec![5], vec![7, 8]]);
        let long: Vec<u64> = (10..10 + 2 * META_RUN_PAGES as u64 + 3).collect();
        let runs = runs_of(&long);
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![META_RUN_PAGES, META_RUN_PAGES, 3]);
        assert_eq!(runs.concat(), long);
    }
}
