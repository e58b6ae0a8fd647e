//! Recovery of the write-ahead log: parse every segment image, tell a torn tail from corruption
//! in the middle, replay the valid records per chunk and set the write position (see the
//! module docs of [`super`] for the format and the rules).

use std::collections::BTreeMap;

use parallelraft::codec::decode_entry;
use parallelraft::{Entry, Index};

use super::{
    align8, round_up, segment_tag, Corruption, Recovery, Wal, FLAG_PACKED, FLAG_PAD_AFTER, HEADER_LEN, KIND_ENTRY,
    KIND_RESET, KIND_TRUNCATE, MAGIC,
};
use crate::storage::io::AlignedBuf;
use crate::storage::{Result, StorageError};

pub(super) struct Parsed {
    kind: u8,
    tag: u16,
    chunk: u64,
    seq: u64,
    batch: u64,
    batch_position: u32,
    batch_len: u32,
    index: Index,
    payload: Vec<u8>,
    /// Bytes from the record's start to where the next record may start (with padding).
    span: usize,
}

/// Validates one record at the start of `buf`, which is at offset `at` of the segment tagged
/// `tag`. `Ok(None)`: the segment's records end here (zeroes, or a valid record of the
/// segment's earlier life under another number).
pub(super) fn parse_record(buf: &[u8], at: usize, tag: u16) -> std::result::Result<Option<Parsed>, Option<Index>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    let magic = u32_at(0);
    if magic == 0 && buf[..HEADER_LEN].iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let hint = (magic == MAGIC).then(|| Index(u64_at(48)));
    if magic != MAGIC {
        return Err(None);
    }
    let payload_len = u32_at(12) as usize;
    if HEADER_LEN + payload_len > buf.len() {
        return Err(hint);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[8..HEADER_LEN]);
    crc.update(&buf[HEADER_LEN..HEADER_LEN + payload_len]);
    if crc.finalize() != u32_at(4) {
        return Err(hint);
    }
    let record_tag = u16::from_le_bytes([buf[10], buf[11]]);
    if record_tag != 0 && record_tag != tag {
        return Ok(None);
    }
    Ok(Some(Parsed {
        kind: buf[8],
        tag: record_tag,
        chunk: u64_at(40),
        seq: u64_at(16),
        batch: u64_at(24),
        batch_position: u32_at(32),
        batch_len: u32_at(36),
        index: Index(u64_at(48)),
        payload: buf[HEADER_LEN..HEADER_LEN + payload_len].to_vec(),
        span: if buf[9] & FLAG_PACKED != 0 && buf[9] & FLAG_PAD_AFTER == 0 {
            align8(HEADER_LEN + payload_len)
        } else {
            round_up(at + HEADER_LEN + payload_len) - at
        },
    }))
}

/// Every byte is zero (in 4 KiB pieces whose OR the compiler vectorizes, with an early exit).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(4096).all(|piece| piece.iter().fold(0u8, |acc, b| acc | b) == 0)
}

impl Wal {
    /// Parses every segment image and replays the valid records; sets the write position.
    pub(super) fn recover(&mut self, images: &[(u64, AlignedBuf, usize)]) -> Result<Recovery> {
        // All valid records with their positions, and the invalid regions between them.
        struct At {
            seg: usize,
            offset: usize,
            rec: Parsed,
        }
        let mut valid: Vec<At> = Vec::new();
        let mut invalid: Vec<(usize, usize, Option<Index>)> = Vec::new();
        for (seg, (number, image, len)) in images.iter().enumerate() {
            let mut offset = 0;
            while offset + HEADER_LEN <= *len {
                match parse_record(&image[offset..*len], offset, segment_tag(*number)) {
                    Ok(Some(rec)) => {
                        let span = rec.span;
                        valid.push(At { seg, offset, rec });
                        offset += span;
                    }
                    Ok(None) => break, // unwritten: the rest of this segment is empty
                    Err(hint) => {
                        if invalid.last().is_none_or(|(s, o, _)| (*s, *o) != (seg, offset)) {
                            invalid.push((seg, offset, hint));
                        }
                        offset = round_up(offset + 1); // a write starts on the next 4 KiB boundary
                    }
                }
            }
        }
        // Per segment, the end of everything written in it (valid or not): what lies past the
        // write position after recovery is zeroed below.
        let mut written_end = vec![0usize; images.len()];
        for v in &valid {
            written_end[v.seg] = written_end[v.seg].max(v.offset + v.rec.span);
        }
        for (seg, offset, _) in &invalid {
            written_end[*seg] = written_end[*seg].max(round_up(offset + 1));
        }
        for (seg, segment) in self.segments.iter_mut().enumerate() {
            segment.recyclable &= !valid.iter().any(|v| v.seg == seg && v.rec.tag == 0);
        }
        let mut recovery = Recovery::default();
        // Each maximal invalid region, with the batch its bytes belong to.
        let mut regions: Vec<(usize, usize, Option<Index>)> = Vec::new();
        for r in invalid {
            let contiguous = regions.last().is_some_and(|(s, o, _)| {
                !valid.iter().any(|v| (v.seg, v.offset) > (*s, *o) && (v.seg, v.offset) < (r.0, r.1))
            });
            if !contiguous {
                regions.push(r);
            }
        }
        let last_batch = valid.iter().map(|v| v.rec.batch).max().unwrap_or(0);
        for (seg, offset, hint) in &regions {
            let later = valid.iter().filter(|v| (v.seg, v.offset) > (*seg, *offset)).map(|v| v.rec.batch).min();
            let before = valid.iter().rev().find(|v| (v.seg, v.offset) < (*seg, *offset));
            // The damaged bytes belong to the previous record's batch if that batch is
            // incomplete there, else to the next batch.
            let damaged_batch = match before {
                Some(v) if v.rec.batch_position + 1 < v.rec.batch_len => v.rec.batch,
                Some(v) => v.rec.batch + 1,
                None => 1,
            };
            if later.is_some_and(|b| b > damaged_batch) || valid.iter().any(|v| v.rec.batch > damaged_batch) {
                recovery.corruptions.push(Corruption {
                    segment: images[*seg].0,
                    offset: *offset as u64,
                    index_hint: *hint,
                });
            }
        }
        // A batch is whole when every position is present. The last batch, if not whole, never
        // finished its sync: a torn tail, discarded entirely. An earlier batch that is not whole
        // lost synced records: corruption (its surviving records are kept).
        let mut present: BTreeMap<u64, (u32, usize)> = BTreeMap::new();
        for v in &valid {
            let e = present.entry(v.rec.batch).or_insert((v.rec.batch_len, 0));
            e.1 += 1;
        }
        // A batch that spanned into the first surviving segment from a pruned one starts at
        // offset 0 there with a later position: its head was pruned, not lost.
        let pruned_head =
            valid.iter().find(|v| v.seg == 0 && v.offset == 0 && v.rec.batch_position > 0).map(|v| v.rec.batch);
        let torn_batch = present.get(&last_batch).filter(|(len, n)| *n < *len as usize).map(|_| last_batch);
        for (batch, (len, n)) in &present {
            if *n < *len as usize
                && Some(*batch) != torn_batch
                && Some(*batch) != pruned_head
                && recovery.corruptions.is_empty()
            {
                recovery.corruptions.push(Corruption { segment: 0, offset: 0, index_hint: None });
            }
        }
        let trailing_garbage = regions.iter().any(|(s, o, _)| valid.iter().all(|v| (v.seg, v.offset) < (*s, *o)));
        if torn_batch.is_some() || trailing_garbage {
            recovery.torn_tail = true;
        }
        if let Some(b) = torn_batch {
            valid.retain(|v| v.rec.batch != b);
        }
        // Replay in record order.
        valid.sort_by_key(|v| v.rec.seq);
        let mut logs: BTreeMap<u64, BTreeMap<Index, Entry>> = BTreeMap::new();
        for v in &valid {
            let log = logs.entry(v.rec.chunk).or_default();
            match v.rec.kind {
                KIND_ENTRY => {
                    let entry = decode_entry(&v.rec.payload).map_err(|e| StorageError::Corrupt {
                        what: format!("WAL record seq {} passed its checksum but does not decode: {e}", v.rec.seq),
                    })?;
                    self.segments[v.seg].holds(v.rec.chunk, entry.index);
                    log.insert(entry.index, entry);
                }
                KIND_TRUNCATE => {
                    log.split_off(&v.rec.index.next());
                }
                KIND_RESET => {
                    log.clear();
                    self.void(v.rec.chunk);
                }
                other => {
                    return Err(StorageError::Corrupt { what: format!("unknown WAL record kind {other}") });
                }
            }
        }
        recovery.records = valid.len() as u64;
        recovery.chunks = logs.into_iter().map(|(chunk, log)| (chunk, log.into_values().collect())).collect();
        recovery.entries = recovery.chunks.get(&self.log_id).cloned().unwrap_or_default();
        self.next_seq = valid.iter().map(|v| v.rec.seq).max().unwrap_or(0) + 1;
        self.next_batch = valid.iter().map(|v| v.rec.batch).max().unwrap_or(0) + 1;
        // Resume writing after the last kept record (overwriting a torn tail), in its segment;
        // drop later segments that kept nothing.
        let end = valid.iter().max_by_key(|v| (v.seg, v.offset)).map(|last| (last.seg, last.offset + last.rec.span));
        if let Some((seg, offset)) = end {
            while self.segments.len() > seg + 1 {
                let s = self.segments.pop_back().unwrap();
                self.engine.close(s.file);
                self.engine.remove(&s.path)?;
            }
            // The last kept record ends a write (a torn batch was dropped whole); rounding up
            // only guards the O_DIRECT alignment of the next write.
            self.tail = round_up(offset) as u64;
        } else {
            self.tail = 0;
        }
        // Zero what lies past the write position (a torn batch's records, garbage): a new
        // batch reuses the torn batch's number and sequence numbers, and may be shorter than
        // it, so a record of the torn batch left behind the new one would be taken for part of
        // it by the next recovery and replayed, though it was never acknowledged.
        if let Some(last) = self.segments.len().checked_sub(1) {
            let end = round_up(written_end.get(last).copied().unwrap_or(0));
            if end > self.tail as usize {
                self.zero_fill(self.segments[last].file, self.tail, end as u64)?;
            }
            // Past that, the segment is zeroes (it was zeroed when made) or a recycled one's old
            // records: only then must each write end with a zeroed block (see the module docs).
            // A scan of what open read anyway; a clean restart otherwise wrote 4 KiB more per
            // group commit until the next rotation.
            let (_, image, len) = &images[last];
            let from = end.max(self.tail as usize).min(*len);
            self.segments[last].stale_after_tail = !is_zero(&image[from..*len]);
        }
        Ok(recovery)
    }
}
