//! The write-ahead log: preallocated segments of packed records, group commit, and recovery
//! that tells a torn tail from corruption in the middle.
//!
//! One log serves every chunk replica of a server (records name their chunk), so one group
//! commit (one write, one fdatasync) makes the records of all groups durable at once: with a
//! log per chunk, random writes over a 1 GiB volume (four chunks) cost three times the syncs
//! and ~28% of the IOPS of writes within one chunk. Logs of earlier versions, one per chunk
//! directory, use the same format; they are read once and moved into the server's log
//! ([`super::migrate`]).
//!
//! Per chunk, replay is the records in order: entries, truncations, and resets (a chunk's
//! replica was created anew on this server: everything recorded for the chunk before is void).
//! A segment is pruned (recycled or deleted, see below) once every chunk with entries in it
//! has a durable checkpoint covering them ([`Wal::cover`]), or no longer has a replica here
//! ([`Wal::forget`]); a chunk whose entries pin old segments is named by [`Wal::pinning`], so
//! its replica can write its log anew at the head (a reset and its entries) and let them go.
//!
//! Record layout (little endian):
//!
//! ```text
//!  0 magic u32 "PRWL"        4 crc32 u32 over bytes 8..88 and the payload
//!  8 kind u8, flags u8, segment tag u16          12 payload_len u32
//! 16 seq u64                 24 batch u64         32 batch_position u32, batch_len u32
//! 40 chunk_id u64            48 index u64         56 term u64          64 ballot u64
//! 72 lba_offset u64 ... 80 lba_len u64 ... 88 payload (encoded entry), zero padding
//! ```
//!
//! Packing: every write of a batch starts on a 4 KiB boundary (O_DIRECT), and its records
//! follow each other on 8-byte boundaries (`FLAG_PACKED`); the last record of a write carries
//! `FLAG_PAD_AFTER` and is padded to the next 4 KiB boundary. A 4 KiB client write with its
//! header and look-behind ranges is ≈ 4.8 KiB, so packing writes ≈ 40% fewer bytes per entry
//! than one 4 KiB-aligned record each (8 KiB). Records without `FLAG_PACKED` (logs written
//! before packing) each fill whole 4 KiB units. Recovery that meets an invalid record looks for
//! the next record at the next 4 KiB boundary, so a damaged record also hides the records
//! packed after it in its write: their batch is incomplete, reported like any lost record.
//!
//! Recycling: a pruned segment becomes a spare as it is (renamed, not deleted), so a
//! segment is zeroed once in its life, not once per use, and deleting it sends the device no
//! discard. Up to [`MAX_SPARES`] spares (at most [`SPARE_POOL_BYTES`]) wait in line, since a
//! checkpoint often frees several segments at once: with one spare the others were deleted
//! and the next rotations zeroed fresh ones (128 KiB sequential writes: the disk wrote ~6.6
//! bytes and discarded ~0.5 per byte written, against ~6.1 and none with the line). A
//! recycled segment's old records stay in it; each record carries its segment's tag (a 16-bit
//! digest of the segment's number; 0 in logs written before recycling, accepted as they are),
//! and recovery reads a record whose checksum holds but whose tag is another segment's as the
//! end of the segment, as it reads zeroes. A write into a recycled segment (or into one found
//! at open with anything but zeroes past its records) ends with one zeroed 4 KiB block (when
//! the segment has room), so that the scan never runs from the new records into old bytes (an
//! old record cut at a 4 KiB boundary is invalid, and an invalid region followed by later
//! valid batches would be reported as corruption). Only segments
//! whose records all carry tags are recycled (an untagged old record would be replayed), and
//! a spare whose old tag equals the new segment's is deleted instead.
//!
//! Group commit: [`Wal::append_chunks`] writes all its records in one write per segment
//! touched and one fdatasync; the batch is durable when it returns. Batches are numbered; every
//! record names its batch and its position in it. Because a batch is issued only after the
//! previous one's sync completed, an invalid record followed by a valid record of a *later*
//! batch is corruption of synced data (reported, the entry marked missing so the protocol
//! fetches it from a peer), while an invalid record with nothing of a later batch after it is a
//! torn tail: that batch never completed, was never acknowledged, and is discarded whole.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};

use parallelraft::codec::{encode_entry, encoded_len};
use parallelraft::{Entry, Index, Op, Term};

use super::io::{check_batch, AlignedBuf, FileId, IoEngine, IoOp, OpenMode, ALIGN};
use super::{Result, StorageError};

mod recover;

const MAGIC: u32 = u32::from_le_bytes(*b"PRWL");
const HEADER_LEN: usize = 88;
/// Size of the writes that zero-fill a new segment.
const ZERO_FILL_BYTES: usize = 1 << 20;
/// Write buffers grow in steps of this; one larger than [`SCRATCH_KEEP_BYTES`] (a batch of many
/// large entries) is not kept after its batch.
const SCRATCH_STEP_BYTES: usize = 256 << 10;
const SCRATCH_KEEP_BYTES: usize = 16 << 20;
/// Spares kept at most (the line of segments waiting to be written again), and the bytes they
/// may hold together: an idle log keeps them, so the pool is small (four 32 MiB segments on
/// the servers, two of the default 64 MiB), and always room for one.
pub const MAX_SPARES: usize = 4;
pub const SPARE_POOL_BYTES: u64 = 128 << 20;
/// Bytes of the spare segment zeroed per [`Wal::prepare_spare`] step: small, so a group commit
/// that arrives during a step waits little (a 256 KiB O_DIRECT write is ~0.1–0.2 ms here).
const SPARE_STEP_BYTES: usize = 256 << 10;
const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_RESET: u8 = 3;
/// Flags (header byte 9): the record is packed; the record ends its write (padding follows).
const FLAG_PACKED: u8 = 1;
const FLAG_PAD_AFTER: u8 = 2;

/// What the protocol asks the log to make durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalRecord {
    Entry(Entry),
    /// Every entry above `after` written before this record is void.
    Truncate {
        after: Index,
    },
    /// Every record of this chunk written before this one is void (a new replica of the chunk).
    Reset,
}

impl WalRecord {
    /// A chunk's whole log written anew: a reset, then `entries` (a replica's log moved to the
    /// head of the server's log, or a chunk log of an earlier version moved into it).
    pub fn log_anew(entries: impl IntoIterator<Item = Entry>) -> Vec<WalRecord> {
        std::iter::once(WalRecord::Reset).chain(entries.into_iter().map(WalRecord::Entry)).collect()
    }
}

/// The id that names the server-wide log's files (`wal-ffffffffffffffff-*.log`); chunk ids are
/// `u32`, so it never names a chunk's log of an earlier version.
pub const SHARED_LOG_ID: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
pub struct WalOptions {
    /// Size of each preallocated segment file.
    pub segment_bytes: u64,
    pub direct: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes: 64 << 20, direct: true }
    }
}

/// An invalid record followed by valid records of later batches: synced data went bad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub segment: u64,
    pub offset: u64,
    /// The index the damaged header claims, if its magic survived (unverified).
    pub index_hint: Option<Index>,
}

/// What recovery found.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// The log of the chunk the log is named after (a chunk's own log of an earlier version) as
    /// the records, replayed in order, leave it.
    pub entries: Vec<Entry>,
    /// The same for every chunk with records (a chunk whose records were all voided by a reset
    /// or truncation may be present with no entries).
    pub chunks: BTreeMap<u64, Vec<Entry>>,
    pub records: u64,
    /// Records of an unfinished batch at the end were discarded.
    pub torn_tail: bool,
    pub corruptions: Vec<Corruption>,
}

struct Segment {
    number: u64,
    path: PathBuf,
    file: FileId,
    /// It may be recycled: every record in it carries a tag (written by this version) and the
    /// file is one segment long (a log opened with another segment size keeps older sizes).
    recyclable: bool,
    /// Bytes past the write position may be old records (a recycled segment, or one found at
    /// open whose bytes past its records are not all zero): each write ends with a zeroed
    /// block.
    stale_after_tail: bool,
    /// Per chunk, the highest index of its live entries in the segment (for pruning). A
    /// chunk's reset or `forget` removes it from every segment.
    live: BTreeMap<u64, Index>,
}

impl Segment {
    /// The segment holds `chunk`'s entry at `index`.
    fn holds(&mut self, chunk: u64, index: Index) {
        let live = self.live.entry(chunk).or_insert(index);
        *live = (*live).max(index);
    }
}

/// The next segment, under a name recovery ignores: a fresh file zeroed ahead of need, or a
/// pruned segment kept as it is (recycled).
struct Spare {
    path: PathBuf,
    file: FileId,
    /// Bytes zeroed from the start.
    zeroed: u64,
    /// Zeroed through the end and fdatasynced: ready to become a segment.
    synced: bool,
    /// The number it had as a segment, if it is a recycled one (then it is not zeroed: its
    /// old records carry that number's tag).
    origin: Option<u64>,
}

/// The tag records of segment `number` carry: never 0 (the tag of logs written before
/// recycling). Two numbers share a tag only 65,535 segments apart.
fn segment_tag(number: u64) -> u16 {
    (number % 65_535) as u16 + 1
}

pub struct Wal {
    engine: Box<dyn IoEngine>,
    dir: PathBuf,
    /// Names the files; the chunk of [`Wal::append`] and [`Recovery::entries`].
    log_id: u64,
    options: WalOptions,
    /// Per chunk, the index its durable checkpoint covers.
    covered: HashMap<u64, Index>,
    /// An append failed: the log's state on disk is unknown, so every later append fails too
    /// (a batch after a half-written one would make recovery call the first corruption).
    poisoned: Option<String>,
    segments: VecDeque<Segment>,
    /// Write position in the last segment.
    tail: u64,
    next_seq: u64,
    next_batch: u64,
    /// Spares in the order they become segments. Invariant: at most [`Wal::spare_limit`], and
    /// at most one fresh one (zeroed here, `origin` none), last: one is started only when the
    /// line is empty, and a pruned segment (ready as it is) goes ahead of it.
    spares: VecDeque<Spare>,
    /// Preparing a spare failed since the last rotation: not retried until then (rotation
    /// then zeroes its segment inline and reports any error to the group commit).
    spare_failed: bool,
    /// The last batch's write buffer, kept for the next (see [`Wal::take_scratch`]).
    scratch: Option<AlignedBuf>,
}

fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl Wal {
    fn segment_path(dir: &Path, log_id: u64, number: u64) -> PathBuf {
        dir.join(format!("wal-{log_id:016x}-{number:010}.log"))
    }

    /// Where a fresh spare segment is prepared. Not a `.log` name: recovery never reads it,
    /// and `open` removes one a crash left behind.
    fn spare_path(dir: &Path, log_id: u64) -> PathBuf {
        dir.join(format!("wal-{log_id:016x}-spare.tmp"))
    }

    /// Where a pruned segment waits as a spare (named after its old number, so the names in
    /// the line differ); removed by `open` like a fresh one.
    fn recycled_path(dir: &Path, log_id: u64, origin: u64) -> PathBuf {
        dir.join(format!("wal-{log_id:016x}-spare-{origin:010}.tmp"))
    }

    fn is_spare_name(path: &Path, log_id: u64) -> bool {
        path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.strip_prefix(&format!("wal-{log_id:016x}-spare")).is_some_and(|rest| rest.ends_with(".tmp"))
        })
    }

    /// See [`MAX_SPARES`].
    fn spare_limit(&self) -> usize {
        ((SPARE_POOL_BYTES / self.options.segment_bytes) as usize).clamp(1, MAX_SPARES)
    }

    fn parse_segment_name(path: &Path, log_id: u64) -> Option<u64> {
        let name = path.file_name()?.to_str()?;
        let rest = name.strip_prefix(&format!("wal-{log_id:016x}-"))?.strip_suffix(".log")?;
        rest.parse().ok()
    }

    /// Whether `dir` holds segments of the log named `log_id`.
    pub fn exists(engine: &mut dyn IoEngine, dir: &Path, log_id: u64) -> Result<bool> {
        Ok(engine.list_dir(dir)?.iter().any(|p| Wal::parse_segment_name(p, log_id).is_some()))
    }

    /// Opens (or creates) the log named `log_id` in `dir` and recovers it: [`SHARED_LOG_ID`] for
    /// a server's log, a chunk id for a chunk's own log of an earlier version.
    pub fn open(
        mut engine: Box<dyn IoEngine>,
        dir: &Path,
        log_id: u64,
        options: WalOptions,
    ) -> Result<(Wal, Recovery)> {
        if options.segment_bytes < (2 * ALIGN) as u64 || !options.segment_bytes.is_multiple_of(ALIGN as u64) {
            return Err(StorageError::Invalid(format!(
                "segment size {} not a multiple of {ALIGN}",
                options.segment_bytes
            )));
        }
        let listing = engine.list_dir(dir)?;
        for spare in listing.iter().filter(|p| Wal::is_spare_name(p, log_id)) {
            // A spare is never part of the log; a crash may have left it half zeroed, and a
            // recycled one is not worth the bookkeeping of finding out which.
            engine.remove(spare)?;
        }
        let mut numbers: Vec<u64> = listing.iter().filter_map(|p| Wal::parse_segment_name(p, log_id)).collect();
        numbers.sort_unstable();
        let mut segments = VecDeque::new();
        let mut images = Vec::new();
        for number in numbers {
            let path = Wal::segment_path(dir, log_id, number);
            let file = engine.open(&path, OpenMode { create: false, direct: options.direct })?;
            let file_len = engine.len(file)?;
            let len = (file_len as usize / ALIGN) * ALIGN;
            let mut image = AlignedBuf::zeroed(len.max(ALIGN));
            if len > 0 {
                let results = engine.submit(&mut [IoOp::Read { file, offset: 0, buf: &mut image[..len] }]);
                check_batch(&results, &[len])?;
            }
            images.push((number, image, len));
            // Whether every record is tagged is known after the scan (`recover`).
            segments.push_back(Segment {
                number,
                path,
                file,
                recyclable: file_len == options.segment_bytes,
                stale_after_tail: true, // until recovery has looked past its records
                live: BTreeMap::new(),
            });
        }
        let mut wal = Wal {
            engine,
            dir: dir.to_path_buf(),
            log_id,
            options,
            covered: HashMap::new(),
            poisoned: None,
            segments,
            tail: 0,
            next_seq: 1,
            next_batch: 1,
            spares: VecDeque::new(),
            spare_failed: false,
            scratch: None,
        };
        let recovery = wal.recover(&images)?;
        if wal.segments.is_empty() {
            wal.new_segment()?;
        }
        Ok((wal, recovery))
    }

    /// Creates the next segment: preallocated under a temporary name, then renamed durably,
    /// so a crash never leaves a half-created segment under a real name.
    fn new_segment(&mut self) -> Result<()> {
        let number = self.segments.back().map_or(1, |s| s.number + 1);
        let path = Wal::segment_path(&self.dir, self.log_id, number);
        self.spare_failed = false;
        while let Some(at) =
            self.spares.iter().position(|s| s.origin.is_some_and(|o| segment_tag(o) == segment_tag(number)))
        {
            // Its old records would read as this segment's.
            let spare = self.spares.remove(at).expect("position found above");
            self.discard(spare)?;
        }
        let recycled = self.spares.front().is_some_and(|s| s.origin.is_some());
        let (tmp, file) = match self.spares.pop_front() {
            // Usually prepared while the WAL thread was idle; finish whatever is left.
            Some(spare) => {
                if !spare.synced {
                    self.zero_fill(spare.file, spare.zeroed, self.options.segment_bytes)?;
                }
                (spare.path, spare.file)
            }
            None => {
                let tmp = path.with_extension("tmp");
                let file = self.engine.open(&tmp, OpenMode { create: true, direct: self.options.direct })?;
                // Write the zeroes for real rather than only fallocate: on ext4 and XFS an
                // fallocated range is "unwritten", and every later fdatasync into it must also
                // commit the extent conversion to the journal, which more than doubles the cost
                // of each group commit. One sequential pass per segment buys plain data syncs
                // for its whole life.
                self.engine.allocate(file, self.options.segment_bytes)?;
                self.zero_fill(file, 0, self.options.segment_bytes)?;
                (tmp, file)
            }
        };
        self.engine.rename_durable(&tmp, &path)?;
        self.segments.push_back(Segment {
            number,
            path,
            file,
            recyclable: true,
            stale_after_tail: recycled,
            live: BTreeMap::new(),
        });
        self.tail = 0;
        Ok(())
    }

    /// One step of preparing the next segment, for a caller with nothing better to do (the WAL
    /// thread between group commits): zeroing a segment inline stalled the group commit that
    /// rotated for tens of milliseconds (32 MiB written and synced). Starts once the current
    /// segment is half full, so idle logs keep no spare; while older segments exist, only once
    /// it is 7/8 full, as one of them usually becomes the spare first when a checkpoint covers
    /// it (a fresh spare zeroed before that made recycling rare: 128 KiB sequential writes
    /// then measured 96-107 MiB/s against 121-123 with this wait). Returns whether it did any
    /// work; a failure is reported once and not retried before the next rotation.
    pub fn prepare_spare(&mut self) -> Result<bool> {
        if self.spare_failed || self.tail < self.options.segment_bytes / 2 {
            return Ok(false);
        }
        if self.spares.is_empty() && self.segments.len() > 1 && self.tail < self.options.segment_bytes / 8 * 7 {
            return Ok(false);
        }
        let result = self.prepare_spare_step();
        if result.is_err() {
            self.spare_failed = true;
            // Only a fresh spare is prepared, and it is the last (see `spares`).
            if let Some(spare) = self.spares.pop_back_if(|s| s.origin.is_none()) {
                let _ = self.discard(spare);
            }
        }
        result
    }

    /// Closes and deletes a spare that will not become a segment.
    fn discard(&mut self, spare: Spare) -> Result<()> {
        self.engine.close(spare.file);
        self.engine.remove(&spare.path)?;
        Ok(())
    }

    fn prepare_spare_step(&mut self) -> Result<bool> {
        let segment_bytes = self.options.segment_bytes;
        let Some(spare) = self.spares.back() else {
            let path = Wal::spare_path(&self.dir, self.log_id);
            let file = self.engine.open(&path, OpenMode { create: true, direct: self.options.direct })?;
            self.spares.push_back(Spare { path, file, zeroed: 0, synced: false, origin: None });
            self.engine.allocate(file, segment_bytes)?;
            return Ok(true);
        };
        let (file, zeroed) = (spare.file, spare.zeroed);
        if spare.synced {
            return Ok(false);
        }
        if zeroed < segment_bytes {
            let to = segment_bytes.min(zeroed + SPARE_STEP_BYTES as u64);
            self.write_zeroes(file, zeroed, to)?;
            self.spares.back_mut().expect("spare checked above").zeroed = to;
        } else {
            self.sync(file)?;
            self.spares.back_mut().expect("spare checked above").synced = true;
        }
        Ok(true)
    }

    /// Writes zeroes over `from..to` of `file` (both 4 KiB-aligned; the range may be empty) in
    /// pieces of at most [`ZERO_FILL_BYTES`], then fdatasyncs it.
    fn zero_fill(&mut self, file: FileId, from: u64, to: u64) -> Result<()> {
        self.write_zeroes(file, from, to)?;
        self.sync(file)
    }

    /// Writes zeroes over `from..to` of `file` (both 4 KiB-aligned; the range may be empty) in
    /// pieces of at most [`ZERO_FILL_BYTES`], without syncing.
    fn write_zeroes(&mut self, file: FileId, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let zeroes = AlignedBuf::zeroed(ZERO_FILL_BYTES.min((to - from) as usize));
        let mut offset = from;
        while offset < to {
            let n = (to - offset).min(zeroes.len() as u64) as usize;
            let results = self.engine.submit(&mut [IoOp::Write { file, offset, buf: &zeroes[..n] }]);
            check_batch(&results, &[n])?;
            offset += n as u64;
        }
        Ok(())
    }

    fn sync(&mut self, file: FileId) -> Result<()> {
        let results = self.engine.submit(&mut [IoOp::Sync { file }]);
        check_batch(&results, &[0])?;
        Ok(())
    }

    /// Bytes of a packed record (the write it ends is padded to 4 KiB on top).
    fn record_len(record: &WalRecord) -> usize {
        align8(
            HEADER_LEN
                + match record {
                    WalRecord::Entry(e) => encoded_len(e),
                    WalRecord::Truncate { .. } | WalRecord::Reset => 0,
                },
        )
    }

    // The header's fields, in layout order.
    #[allow(clippy::too_many_arguments)]
    fn encode(
        record: &WalRecord,
        tag: u16,
        chunk: u64,
        seq: u64,
        batch: u64,
        position: u32,
        len: u32,
        flags: u8,
        out: &mut [u8],
    ) {
        let (kind, index, term, ballot, lba, payload_len) = match record {
            WalRecord::Entry(e) => {
                let lba = match &e.op {
                    Op::Noop | Op::Config(_) => (0, 0),
                    Op::Write { offset, data } => (*offset, data.len() as u64),
                    Op::Trim { offset, len_bytes } | Op::WriteZeroes { offset, len_bytes } => (*offset, *len_bytes),
                };
                (KIND_ENTRY, e.index, e.term, e.ballot, lba, encoded_len(e))
            }
            WalRecord::Truncate { after } => (KIND_TRUNCATE, *after, Term(0), Term(0), (0, 0), 0),
            WalRecord::Reset => (KIND_RESET, Index(0), Term(0), Term(0), (0, 0), 0),
        };
        let end = HEADER_LEN + payload_len;
        if let WalRecord::Entry(e) = record {
            // Straight into the write buffer, a slice of exactly the encoded length: an
            // encoding longer than `encoded_len` panics in `put_slice`, a shorter one here
            // (it would leave an earlier batch's bytes inside the record).
            let mut payload = &mut out[HEADER_LEN..end];
            encode_entry(e, &mut payload);
            assert!(payload.is_empty(), "encoded_len disagrees with encode_entry");
        }
        out[end..].fill(0); // the alignment padding
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[8] = kind;
        out[9] = flags;
        out[10..12].copy_from_slice(&tag.to_le_bytes());
        out[12..16].copy_from_slice(&(payload_len as u32).to_le_bytes());
        out[16..24].copy_from_slice(&seq.to_le_bytes());
        out[24..32].copy_from_slice(&batch.to_le_bytes());
        out[32..36].copy_from_slice(&position.to_le_bytes());
        out[36..40].copy_from_slice(&len.to_le_bytes());
        out[40..48].copy_from_slice(&chunk.to_le_bytes());
        out[48..56].copy_from_slice(&index.0.to_le_bytes());
        out[56..64].copy_from_slice(&term.0.to_le_bytes());
        out[64..72].copy_from_slice(&ballot.0.to_le_bytes());
        out[72..80].copy_from_slice(&lba.0.to_le_bytes());
        out[80..88].copy_from_slice(&lba.1.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[8..end]);
        out[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    }

    /// Makes `records` (of the chunk the log is named after) durable as one batch; see
    /// [`Wal::append_chunks`].
    pub fn append(&mut self, records: &[WalRecord]) -> Result<()> {
        self.append_chunks(&[(self.log_id, records)])
    }

    /// Makes the records of every `(chunk, records)` durable as one batch: one write per
    /// segment touched, one fdatasync. A chunk's records replay in the order given. On error
    /// the replicas must stop ([`StorageError::Fatal`]): nothing of the batch may be
    /// acknowledged, and every later append fails as well.
    pub fn append_chunks(&mut self, chunks: &[(u64, &[WalRecord])]) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(StorageError::Fatal(std::io::Error::other(format!("an earlier append failed: {why}"))));
        }
        let records: Vec<(u64, &WalRecord)> =
            chunks.iter().flat_map(|(chunk, records)| records.iter().map(move |r| (*chunk, r))).collect();
        if records.is_empty() {
            return Ok(());
        }
        let lens: Vec<usize> = records.iter().map(|(_, r)| Wal::record_len(r)).collect();
        let segment_bytes = self.options.segment_bytes as usize;
        if let Some(too_big) = lens.iter().find(|l| **l > segment_bytes) {
            return Err(StorageError::Invalid(format!("record of {too_big} bytes exceeds the segment size")));
        }
        let result = self.write_batch(&records, &lens);
        if let Err(e) = &result {
            self.poisoned = Some(e.to_string());
        }
        result
    }

    fn write_batch(&mut self, records: &[(u64, &WalRecord)], lens: &[usize]) -> Result<()> {
        let segment_bytes = self.options.segment_bytes as usize;
        let batch = self.next_batch;
        self.next_batch += 1;
        // Each piece (one per segment touched) pads to 4 KiB and may add a trailer block.
        let mut scratch = self.take_scratch(lens.iter().sum::<usize>() + records.len() * 2 * ALIGN);
        // Lay the records out, rotating segments when the next record does not fit.
        let mut pieces: Vec<(usize, u64, Range<usize>)> = Vec::new(); // (segment slot, offset, bytes of `scratch`)
        let mut used = 0;
        let mut i = 0;
        while i < records.len() {
            if self.tail as usize + lens[i] > segment_bytes {
                // Write what we have for the full segment before rotating: ordering by slot.
                self.new_segment()?;
            }
            let start = i;
            let mut bytes = 0;
            while i < records.len() && self.tail as usize + bytes + lens[i] <= segment_bytes {
                bytes += lens[i];
                i += 1;
            }
            let segment = self.segments.back().expect("a log has a segment");
            let tag = segment_tag(segment.number);
            // A zeroed block after the records ends the scan there (see the module docs).
            let trailer = segment.stale_after_tail && self.tail as usize + round_up(bytes) + ALIGN <= segment_bytes;
            let piece = used..used + round_up(bytes) + if trailer { ALIGN } else { 0 };
            let buf = &mut scratch[piece.clone()];
            let mut at = 0;
            for (k, (chunk, record)) in records[start..i].iter().enumerate() {
                let position = (start + k) as u32;
                let flags = if start + k + 1 == i { FLAG_PACKED | FLAG_PAD_AFTER } else { FLAG_PACKED };
                let out = &mut buf[at..at + lens[start + k]];
                Wal::encode(record, tag, *chunk, self.next_seq, batch, position, records.len() as u32, flags, out);
                self.next_seq += 1;
                match record {
                    WalRecord::Entry(e) => self.segments.back_mut().unwrap().holds(*chunk, e.index),
                    // If this batch never becomes durable, the log is poisoned and nothing is
                    // pruned any more, so voiding the old records early is safe.
                    WalRecord::Reset => self.void(*chunk),
                    WalRecord::Truncate { .. } => {}
                }
                at += lens[start + k];
            }
            // The padding to 4 KiB and the trailer: the buffer holds an earlier batch's bytes.
            buf[at..].fill(0);
            let offset = self.tail;
            // The next write starts over the trailer.
            self.tail += round_up(bytes) as u64;
            used = piece.end;
            pieces.push((self.segments.len() - 1, offset, piece));
        }
        let mut ops = Vec::new();
        let mut expected = Vec::new();
        for (slot, offset, piece) in &pieces {
            ops.push(IoOp::Write { file: self.segments[*slot].file, offset: *offset, buf: &scratch[piece.clone()] });
            expected.push(piece.len());
        }
        let mut synced: Vec<usize> = pieces.iter().map(|p| p.0).collect();
        synced.dedup();
        for slot in synced {
            ops.push(IoOp::Sync { file: self.segments[slot].file });
            expected.push(0);
        }
        let results = self.engine.submit(&mut ops);
        drop(ops);
        if scratch.len() <= SCRATCH_KEEP_BYTES {
            self.scratch = Some(scratch);
        }
        check_batch(&results, &expected)?;
        Ok(())
    }

    /// A write buffer of at least `len` bytes: the one kept from the last batch when it is large
    /// enough (reused, not zeroed again: a batch writes every byte of what it uses), else a new
    /// one (in steps of [`SCRATCH_STEP_BYTES`]).
    fn take_scratch(&mut self, len: usize) -> AlignedBuf {
        match self.scratch.take() {
            Some(buf) if buf.len() >= len => buf,
            _ => AlignedBuf::zeroed(len.div_ceil(SCRATCH_STEP_BYTES).max(1) * SCRATCH_STEP_BYTES),
        }
    }

    /// Deletes the oldest segments whose entries are all at or below `checkpoint` (covered by a
    /// durable checkpoint), for a log of one chunk (the one it is named after); see
    /// [`Wal::cover`].
    pub fn prune(&mut self, checkpoint: Index) -> Result<usize> {
        self.cover(self.log_id, checkpoint);
        self.prune_covered()
    }

    /// `chunk`'s durable checkpoint covers its entries up to `checkpoint` (never moves back).
    pub fn cover(&mut self, chunk: u64, checkpoint: Index) {
        let c = self.covered.entry(chunk).or_insert(checkpoint);
        *c = (*c).max(checkpoint);
    }

    /// `chunk` has no replica here any more (or a new one whose reset voids the old records):
    /// its records pin no segment.
    pub fn forget(&mut self, chunk: u64) {
        self.void(chunk);
        self.covered.remove(&chunk);
    }

    /// `chunk`'s records so far are void (a reset, or no replica): they pin no segment.
    fn void(&mut self, chunk: u64) {
        for seg in self.segments.iter_mut() {
            seg.live.remove(&chunk);
        }
    }

    /// Forgets every chunk `keep` refuses (after recovery: chunks without a replica here).
    pub fn retain_chunks(&mut self, keep: impl Fn(u64) -> bool) {
        let known: std::collections::BTreeSet<u64> =
            self.segments.iter().flat_map(|s| s.live.keys().copied()).collect();
        for chunk in known.into_iter().filter(|c| !keep(*c)) {
            self.forget(chunk);
        }
    }

    fn is_covered(&self, chunk: u64, max: Index) -> bool {
        self.covered.get(&chunk).is_some_and(|c| *c >= max)
    }

    /// Deletes the oldest segments in which every chunk's entries are covered by its
    /// checkpoint; each joins the spares instead while they have room and it is recyclable
    /// (see the module docs and `Segment::recyclable`), ahead of a fresh spare still being
    /// zeroed. The segment being written is kept.
    pub fn prune_covered(&mut self) -> Result<usize> {
        let mut removed = 0;
        if self.poisoned.is_some() {
            return Ok(0); // what the failed batch would have made redundant is needed again
        }
        while self.segments.len() > 1 && self.segments[0].live.iter().all(|(c, max)| self.is_covered(*c, *max)) {
            let s = self.segments.pop_front().unwrap();
            removed += 1;
            if s.recyclable && self.spares.len() < self.spare_limit() {
                let path = Wal::recycled_path(&self.dir, self.log_id, s.number);
                if let Err(e) = self.engine.rename_durable(&s.path, &path) {
                    self.engine.close(s.file);
                    return Err(e.into());
                }
                let segment_bytes = self.options.segment_bytes;
                let spare = Spare { path, file: s.file, zeroed: segment_bytes, synced: true, origin: Some(s.number) };
                let at = self.spares.len() - usize::from(self.spares.back().is_some_and(|b| b.origin.is_none()));
                self.spares.insert(at, spare);
                continue;
            }
            self.engine.close(s.file);
            self.engine.remove(&s.path)?;
        }
        #[cfg(debug_assertions)]
        self.check_invariants();
        Ok(removed)
    }

    /// When the log holds more than `max_segments` segments: the chunks whose uncovered entries
    /// keep the oldest one (each can rewrite its log at the head, see the module docs).
    pub fn pinning(&self, max_segments: usize) -> Vec<u64> {
        if self.segments.len() <= max_segments {
            return Vec::new();
        }
        self.segments[0].live.iter().filter(|(c, max)| !self.is_covered(**c, **max)).map(|(c, _)| *c).collect()
    }

    /// Deletes every segment (a chunk's log of an earlier version, once moved; see [`super::migrate`]).
    pub fn destroy(mut self) -> Result<()> {
        while let Some(spare) = self.spares.pop_front() {
            self.discard(spare)?;
        }
        while let Some(s) = self.segments.pop_front() {
            self.engine.close(s.file);
            self.engine.remove(&s.path)?;
        }
        Ok(())
    }

    /// A spare segment is ready (zeroed and synced, or recycled), so the next rotation writes
    /// no zeroes.
    pub fn spare_ready(&self) -> bool {
        self.spares.front().is_some_and(|s| s.synced)
    }

    /// Spares waiting to become segments (ready or not).
    pub fn spare_count(&self) -> usize {
        self.spares.len()
    }

    /// Panics unless the spares hold their invariant (see `spares`): at most the limit, a
    /// fresh one only last, recycled ones ready and none the number of a live segment.
    pub fn check_invariants(&self) {
        assert!(self.spares.len() <= self.spare_limit(), "{} spares, limit {}", self.spares.len(), self.spare_limit());
        let fresh: Vec<usize> = (0..self.spares.len()).filter(|i| self.spares[*i].origin.is_none()).collect();
        assert!(fresh.is_empty() || fresh == [self.spares.len() - 1], "fresh spares at {fresh:?}");
        for spare in self.spares.iter().filter(|s| s.origin.is_some()) {
            assert!(spare.synced && spare.zeroed == self.options.segment_bytes, "a recycled spare not ready");
            assert!(self.segments.iter().all(|seg| Some(seg.number) != spare.origin), "a spare still a segment");
        }
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }
}
