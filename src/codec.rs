//! Binary encoding of log entries, for write-ahead logs and the wire. Pure: no IO.
//!
//! Layout (little endian): index, term, ballot (u64 each); op tag (u8) and its fields; request
//! flag (u8) and (client, seq); floor (u64); look-behind span (u8) and per predecessor a flag
//! (u8: 0 unknown, 1 known) with a range count (u16) and (offset, len) pairs.

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};
use lbb::{LookBehind, Range, RangeSet};

use crate::entry::{Entry, Op};
use crate::membership::{ConfigState, Membership};
use crate::message::{Candidacy, CommitNotice, Message};
use crate::table::ClientTable;
use crate::types::{ClientId, Index, ReplicaId, RequestId, Term};

/// Where encodings go. A write's data goes through [`Sink::put_data`], so a sink that can keep a
/// reference to it instead of a copy may (the chunk server's batches of frames, written with
/// one `writev`: a leader used to copy each 128 KiB write into the batch of every follower).
/// The bytes, in order, are the same whatever the sink.
pub trait Sink {
    fn put_slice(&mut self, bytes: &[u8]);

    /// `data`, which the sink may share instead of copying.
    fn put_data(&mut self, data: &Bytes) {
        self.put_slice(data)
    }

    fn put_u8(&mut self, v: u8) {
        self.put_slice(&[v])
    }

    fn put_u16_le(&mut self, v: u16) {
        self.put_slice(&v.to_le_bytes())
    }

    fn put_u32_le(&mut self, v: u32) {
        self.put_slice(&v.to_le_bytes())
    }

    fn put_u64_le(&mut self, v: u64) {
        self.put_slice(&v.to_le_bytes())
    }
}

impl Sink for BytesMut {
    fn put_slice(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes)
    }
}

/// A slice of exactly the length to encode (panics past its end, as `BufMut` does).
impl Sink for &mut [u8] {
    fn put_slice(&mut self, bytes: &[u8]) {
        BufMut::put_slice(self, bytes)
    }
}

/// A decoding failure: the bytes are not an entry this code wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed entry encoding: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Writes `entry` ([`encoded_len`] bytes) to `out`: a growing buffer, or a slice of exactly
/// that length (the WAL encodes into its aligned write buffer without an intermediate copy).
pub fn encode_entry(entry: &Entry, out: &mut (impl Sink + ?Sized)) {
    out.put_u64_le(entry.index.0);
    out.put_u64_le(entry.term.0);
    out.put_u64_le(entry.ballot.0);
    match &entry.op {
        Op::Noop => out.put_u8(0),
        Op::Write { offset, data } => {
            out.put_u8(1);
            out.put_u64_le(*offset);
            out.put_u32_le(data.len() as u32);
            out.put_data(data);
        }
        Op::Trim { offset, len_bytes } => {
            out.put_u8(2);
            out.put_u64_le(*offset);
            out.put_u64_le(*len_bytes);
        }
        Op::WriteZeroes { offset, len_bytes } => {
            out.put_u8(3);
            out.put_u64_le(*offset);
            out.put_u64_le(*len_bytes);
        }
        Op::Config(m) => {
            out.put_u8(4);
            put_membership(m, out);
        }
    }
    match entry.request {
        None => out.put_u8(0),
        Some(id) => {
            out.put_u8(1);
            out.put_u64_le(id.client.0);
            out.put_u64_le(id.seq);
        }
    }
    out.put_u64_le(entry.floor);
    let previous = entry.look_behind.previous();
    out.put_u8(previous.len() as u8);
    for p in previous {
        match p {
            None => out.put_u8(0),
            Some(set) => {
                out.put_u8(1);
                out.put_u16_le(set.ranges().len() as u16);
                for r in set.ranges() {
                    out.put_u64_le(r.offset);
                    out.put_u64_le(r.len_bytes);
                }
            }
        }
    }
}

/// Bytes `entry` takes in a message's entry list (with its length prefix): what the limits on
/// merge reports and sync chunks count.
pub fn listed_len(entry: &Entry) -> u64 {
    4 + encoded_len(entry) as u64
}

/// Bytes `encode_entry` produces for `entry`.
pub fn encoded_len(entry: &Entry) -> usize {
    let op = match &entry.op {
        Op::Noop => 1,
        Op::Write { data, .. } => 1 + 8 + 4 + data.len(),
        Op::Config(m) => 1 + membership_len(m),
        Op::Trim { .. } | Op::WriteZeroes { .. } => 1 + 16,
    };
    let request = if entry.request.is_some() { 17 } else { 1 };
    let lbb: usize =
        entry.look_behind.previous().iter().map(|p| p.as_ref().map_or(1, |s| 3 + 16 * s.ranges().len())).sum();
    24 + op + request + 8 + 1 + lbb
}

struct Reader<'a> {
    buf: &'a [u8],
    /// The buffer `buf` lies in, when the caller has it as [`Bytes`]: write payloads are then
    /// slices of it (shared, not copied).
    origin: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, origin: None }
    }
    /// `n` bytes as a payload: a slice of the origin when there is one, else a copy.
    fn payload(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let origin = self.origin;
        let bytes = self.take(n)?;
        Ok(match origin {
            Some(o) => o.slice_ref(bytes),
            None => Bytes::copy_from_slice(bytes),
        })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

fn checked_range(offset: u64, len: u64) -> Result<Range, DecodeError> {
    offset.checked_add(len).ok_or(DecodeError("range overflows"))?;
    Ok(Range::new(offset, len))
}

/// Decodes one entry that fills `buf` exactly.
pub fn decode_entry(buf: &[u8]) -> Result<Entry, DecodeError> {
    read_entry(&mut Reader::new(buf))
}

/// Decodes one entry that fills `r`'s buffer exactly.
fn read_entry(r: &mut Reader<'_>) -> Result<Entry, DecodeError> {
    let index = Index(r.u64()?);
    let term = Term(r.u64()?);
    let ballot = Term(r.u64()?);
    let op = match r.u8()? {
        0 => Op::Noop,
        1 => {
            let offset = r.u64()?;
            let len = r.u32()? as usize;
            checked_range(offset, len as u64)?;
            Op::Write { offset, data: r.payload(len)? }
        }
        2 => {
            let (offset, len_bytes) = (r.u64()?, r.u64()?);
            checked_range(offset, len_bytes)?;
            Op::Trim { offset, len_bytes }
        }
        3 => {
            let (offset, len_bytes) = (r.u64()?, r.u64()?);
            checked_range(offset, len_bytes)?;
            Op::WriteZeroes { offset, len_bytes }
        }
        4 => Op::Config(r.membership()?),
        _ => return Err(DecodeError("unknown op")),
    };
    let request = match r.u8()? {
        0 => None,
        1 => Some(RequestId { client: ClientId(r.u64()?), seq: r.u64()? }),
        _ => return Err(DecodeError("bad request flag")),
    };
    let floor = r.u64()?;
    let span = r.u8()? as usize;
    let mut previous = Vec::with_capacity(span);
    for _ in 0..span {
        match r.u8()? {
            0 => previous.push(None),
            1 => {
                let n = r.u16()? as usize;
                let mut set = RangeSet::new();
                for _ in 0..n {
                    let (offset, len) = (r.u64()?, r.u64()?);
                    set.insert(checked_range(offset, len)?);
                }
                previous.push(Some(set));
            }
            _ => return Err(DecodeError("bad look-behind flag")),
        }
    }
    if !r.buf.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    if ballot < term {
        return Err(DecodeError("ballot below term"));
    }
    Ok(Entry { index, term, ballot, op, request, floor, look_behind: LookBehind::new(previous) })
}

/// A membership: voter count (u16) and ids (u32 each), then the same for learners.
fn put_membership(m: &Membership, out: &mut (impl Sink + ?Sized)) {
    for set in [&m.voters, &m.learners] {
        out.put_u16_le(set.len() as u16);
        for id in set {
            out.put_u32_le(id.0);
        }
    }
}

fn membership_len(m: &Membership) -> usize {
    4 + 4 * (m.voters.len() + m.learners.len())
}

/// A configuration state: the index of its entry (u64), then the membership.
pub fn encode_config(config: &ConfigState, out: &mut (impl Sink + ?Sized)) {
    out.put_u64_le(config.index.0);
    put_membership(&config.membership, out);
}

/// Decodes a configuration state at the start of `buf`; returns it and the bytes it took.
pub fn decode_config(buf: &[u8]) -> Result<(ConfigState, usize), DecodeError> {
    let mut r = Reader::new(buf);
    let config = r.config()?;
    Ok((config, buf.len() - r.buf.len()))
}

fn put_candidacy(c: &Candidacy, out: &mut (impl Sink + ?Sized)) {
    for v in [c.sync.0, c.sync_end.0, c.committed.0, c.durable.0, c.config.0] {
        out.put_u64_le(v);
    }
}

fn put_entries(entries: &[Entry], out: &mut (impl Sink + ?Sized)) {
    out.put_u32_le(entries.len() as u32);
    for e in entries {
        out.put_u32_le(encoded_len(e) as u32);
        encode_entry(e, out);
    }
}

fn put_commit(commit: &CommitNotice, out: &mut (impl Sink + ?Sized)) {
    out.put_u64_le(commit.watermark.0);
    out.put_u32_le(commit.above.len() as u32);
    for (first, last) in &commit.above {
        out.put_u64_le(first.0);
        out.put_u64_le(last.0);
    }
}

/// Encodes a peer message: a tag byte, then the variant's fields in declaration order;
/// entry lists are a count and length-prefixed entries.
pub fn encode_message(message: &Message, out: &mut (impl Sink + ?Sized)) {
    match message {
        Message::PreVote { term, candidate } => {
            out.put_u8(1);
            out.put_u64_le(term.0);
            put_candidacy(candidate, out);
        }
        Message::PreVoteResponse { term, granted } => {
            out.put_u8(2);
            out.put_u64_le(term.0);
            out.put_u8(*granted as u8);
        }
        Message::Vote { term, candidate } => {
            out.put_u8(3);
            out.put_u64_le(term.0);
            put_candidacy(candidate, out);
        }
        Message::VoteResponse { term, granted, sync, committed, checkpoint, entries } => {
            out.put_u8(4);
            out.put_u64_le(term.0);
            out.put_u8(*granted as u8);
            for v in [sync.0, committed.0, checkpoint.0] {
                out.put_u64_le(v);
            }
            put_entries(entries, out);
        }
        Message::Sync { term, base, upto, end, entries } => {
            out.put_u8(5);
            for v in [term.0, base.0, upto.0, end.0] {
                out.put_u64_le(v);
            }
            put_entries(entries, out);
        }
        Message::Append { term, entries, commit } => {
            out.put_u8(6);
            out.put_u64_le(term.0);
            put_entries(entries, out);
            put_commit(commit, out);
        }
        Message::Heartbeat { term, commit, read_seq } => {
            out.put_u8(7);
            out.put_u64_le(term.0);
            put_commit(commit, out);
            out.put_u64_le(*read_seq);
        }
        Message::Ack { term, acked, durable, committed, synced, sync_received, read_seq } => {
            out.put_u8(8);
            out.put_u64_le(term.0);
            out.put_u32_le(acked.len() as u32);
            for i in acked {
                out.put_u64_le(i.0);
            }
            out.put_u64_le(durable.0);
            out.put_u64_le(committed.0);
            out.put_u8(*synced as u8);
            out.put_u64_le(sync_received.0);
            out.put_u64_le(*read_seq);
        }
        Message::Snapshot { term, checkpoint, table, config, upto, end, entries } => {
            out.put_u8(9);
            out.put_u64_le(term.0);
            out.put_u64_le(checkpoint.0);
            let mut t = BytesMut::new();
            table.encode(&mut t);
            out.put_u32_le(t.len() as u32);
            out.put_slice(&t);
            encode_config(config, out);
            out.put_u64_le(upto.0);
            out.put_u64_le(end.0);
            put_entries(entries, out);
        }
    }
}

impl Reader<'_> {
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("bad boolean")),
        }
    }
    fn index(&mut self) -> Result<Index, DecodeError> {
        Ok(Index(self.u64()?))
    }
    fn term(&mut self) -> Result<Term, DecodeError> {
        Ok(Term(self.u64()?))
    }
    /// A count read from the wire, checked against the bytes left so a hostile count cannot
    /// make us allocate more than the message could hold.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes) > self.buf.len() {
            return Err(DecodeError("count exceeds message"));
        }
        Ok(n)
    }
    fn entries(&mut self) -> Result<Vec<Entry>, DecodeError> {
        let n = self.count(4)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u32()? as usize;
            let mut entry = Reader { buf: self.take(len)?, origin: self.origin };
            entries.push(read_entry(&mut entry)?);
        }
        Ok(entries)
    }
    fn indices(&mut self) -> Result<Vec<Index>, DecodeError> {
        let n = self.count(8)?;
        (0..n).map(|_| self.index()).collect()
    }
    fn commit(&mut self) -> Result<CommitNotice, DecodeError> {
        let watermark = self.index()?;
        let n = self.count(16)?;
        let above = (0..n).map(|_| Ok((self.index()?, self.index()?))).collect::<Result<_, _>>()?;
        let commit = CommitNotice { watermark, above };
        if !commit.is_well_formed() {
            return Err(DecodeError("commit notice runs out of order"));
        }
        Ok(commit)
    }
    fn ids(&mut self) -> Result<BTreeSet<ReplicaId>, DecodeError> {
        let n = self.u16()? as usize;
        if n * 4 > self.buf.len() {
            return Err(DecodeError("member count exceeds message"));
        }
        (0..n).map(|_| Ok(ReplicaId(self.u32()?))).collect()
    }
    fn membership(&mut self) -> Result<Membership, DecodeError> {
        let m = Membership { voters: self.ids()?, learners: self.ids()? };
        if !m.is_well_formed() {
            return Err(DecodeError("malformed membership"));
        }
        Ok(m)
    }
    fn candidacy(&mut self) -> Result<Candidacy, DecodeError> {
        Ok(Candidacy {
            sync: self.term()?,
            sync_end: self.index()?,
            committed: self.index()?,
            durable: self.index()?,
            config: self.index()?,
        })
    }
    fn config(&mut self) -> Result<ConfigState, DecodeError> {
        Ok(ConfigState { index: self.index()?, membership: self.membership()? })
    }
}

/// Decodes one message that fills `buf` exactly; write payloads are copied out of it.
pub fn decode_message(buf: &[u8]) -> Result<Message, DecodeError> {
    read_message(Reader::new(buf))
}

/// Decodes one message that fills `buf` exactly; write payloads are slices of `buf` (no copy;
/// they keep `buf`'s allocation alive until the last of them is dropped).
pub fn decode_message_shared(buf: &Bytes) -> Result<Message, DecodeError> {
    read_message(Reader { buf, origin: Some(buf) })
}

fn read_message(mut r: Reader<'_>) -> Result<Message, DecodeError> {
    let message = match r.u8()? {
        1 => Message::PreVote { term: r.term()?, candidate: r.candidacy()? },
        2 => Message::PreVoteResponse { term: r.term()?, granted: r.bool()? },
        3 => Message::Vote { term: r.term()?, candidate: r.candidacy()? },
        4 => Message::VoteResponse {
            term: r.term()?,
            granted: r.bool()?,
            sync: r.term()?,
            committed: r.index()?,
            checkpoint: r.index()?,
            entries: r.entries()?,
        },
        5 => Message::Sync {
            term: r.term()?,
            base: r.index()?,
            upto: r.index()?,
            end: r.index()?,
            entries: r.entries()?,
        },
        6 => Message::Append { term: r.term()?, entries: r.entries()?, commit: r.commit()? },
        7 => Message::Heartbeat { term: r.term()?, commit: r.commit()?, read_seq: r.u64()? },
        8 => Message::Ack {
            term: r.term()?,
            acked: r.indices()?,
            durable: r.index()?,
            committed: r.index()?,
            synced: r.bool()?,
            sync_received: r.index()?,
            read_seq: r.u64()?,
        },
        9 => {
            let term = r.term()?;
            let checkpoint = r.index()?;
            let len = r.u32()? as usize;
            let table = ClientTable::decode(r.take(len)?)?;
            let config = r.config()?;
            let upto = r.index()?;
            Message::Snapshot { term, checkpoint, table, config, upto, end: r.index()?, entries: r.entries()? }
        }
        _ => return Err(DecodeError("unknown message tag")),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let entry = Entry {
            index: Index(5),
            term: Term(1),
            ballot: Term(2),
            op: Op::Trim { offset: 0, len_bytes: 8192 },
            request: None,
            floor: 0,
            look_behind: LookBehind::unknown(2),
        };
        let commit = CommitNotice::new(Index(3), [5, 6, 7, 9].map(Index));
        assert_eq!(commit.above, vec![(Index(5), Index(7)), (Index(9), Index(9))]);
        let candidate =
            Candidacy { sync: Term(2), sync_end: Index(3), committed: Index(4), durable: Index(5), config: Index(2) };
        let config = Membership {
            voters: [1, 2, 4].map(ReplicaId).into_iter().collect(),
            learners: [7].map(ReplicaId).into_iter().collect(),
        };
        let config_entry = Entry { index: Index(6), op: Op::Config(config.clone()), ..entry.clone() };
        let write = Entry {
            index: Index(8),
            op: Op::Write { offset: 4096, data: Bytes::from(vec![3u8; 4096]) },
            ..entry.clone()
        };
        assert_eq!(encoded_len(&config_entry), {
            let mut b = BytesMut::new();
            encode_entry(&config_entry, &mut b);
            b.len()
        });
        let mut table = ClientTable::default();
        table.fold(&Entry { request: Some(RequestId { client: ClientId(4), seq: 1 }), ..entry.clone() });
        let messages = vec![
            Message::PreVote { term: Term(1), candidate },
            Message::PreVoteResponse { term: Term(9), granted: true },
            Message::Vote { term: Term(1), candidate: Candidacy { durable: Index(6), config: Index(0), ..candidate } },
            Message::VoteResponse {
                term: Term(1),
                granted: false,
                sync: Term(1),
                committed: Index(2),
                checkpoint: Index(1),
                entries: vec![entry.clone(), entry.clone()],
            },
            Message::Sync {
                term: Term(3),
                base: Index(1),
                upto: Index(2),
                end: Index(5),
                entries: vec![entry.clone(), write.clone()],
            },
            Message::Append { term: Term(3), entries: vec![entry.clone(), write], commit: commit.clone() },
            Message::Heartbeat { term: Term(3), commit, read_seq: 77 },
            Message::Ack {
                term: Term(3),
                acked: vec![Index(4), Index(6)],
                durable: Index(3),
                committed: Index(2),
                synced: true,
                sync_received: Index(9),
                read_seq: 8,
            },
            Message::Snapshot {
                term: Term(3),
                checkpoint: Index(2),
                table,
                config: ConfigState { index: Index(1), membership: config.clone() },
                upto: Index(4),
                end: Index(5),
                entries: vec![entry, config_entry],
            },
        ];
        for m in messages {
            let mut buf = BytesMut::new();
            encode_message(&m, &mut buf);
            assert_eq!(decode_message(&buf).unwrap(), m);
            for cut in [0, 1, buf.len() - 1] {
                assert!(decode_message(&buf[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            // The shared decoding gives the same message, its payloads inside the buffer.
            let shared = buf.freeze();
            let decoded = decode_message_shared(&shared).unwrap();
            assert_eq!(decoded, m);
            let inside = |e: &Entry| match &e.op {
                Op::Write { data, .. } => shared.as_ptr_range().contains(&data.as_ptr()),
                _ => true,
            };
            let entries = match &decoded {
                Message::VoteResponse { entries, .. }
                | Message::Sync { entries, .. }
                | Message::Append { entries, .. }
                | Message::Snapshot { entries, .. } => &entries[..],
                _ => &[],
            };
            assert!(entries.iter().all(inside), "{m:?}: a payload was copied");
            for cut in [0, 1, shared.len() - 1] {
                assert!(decode_message_shared(&shared.slice(..cut)).is_err(), "{m:?} cut at {cut}");
            }
        }
    }

    /// A notice's runs name exactly the indices it was built from, and the decoder refuses
    /// runs that break their contract (not above the watermark's next index, out of order,
    /// overlapping, touching, or reversed) instead of letting a follower act on them.
    #[test]
    fn commit_notices_are_runs_and_malformed_ones_are_refused() {
        let committed: Vec<Index> = [5, 6, 7, 9, 12, 13].map(Index).to_vec();
        let notice = CommitNotice::new(Index(3), committed.iter().copied());
        assert_eq!(notice.above.len(), 3);
        assert!(notice.is_well_formed());
        let named: Vec<Index> = notice.above.iter().flat_map(|&(first, last)| (first.0..=last.0).map(Index)).collect();
        assert_eq!(named, committed);
        let heartbeat = |commit: CommitNotice| {
            let mut buf = BytesMut::new();
            encode_message(&Message::Heartbeat { term: Term(2), commit, read_seq: 1 }, &mut buf);
            decode_message(&buf)
        };
        assert!(heartbeat(notice.clone()).is_ok());
        let run = |a: u64, b: u64| (Index(a), Index(b));
        for above in [
            vec![run(4, 6)],            // the watermark's next index cannot be committed above it
            vec![run(3, 3)],            // at the watermark
            vec![run(7, 6)],            // reversed
            vec![run(5, 7), run(8, 9)], // touching: one run
            vec![run(5, 7), run(6, 9)], // overlapping
            vec![run(9, 9), run(5, 6)], // out of order
            vec![run(5, u64::MAX), run(u64::MAX, u64::MAX)], // nothing can follow the last index
        ] {
            let bad = CommitNotice { watermark: Index(3), above: above.clone() };
            assert!(!bad.is_well_formed(), "{above:?}");
            assert!(heartbeat(bad).is_err(), "{above:?} decoded");
        }
    }

    #[test]
    fn round_trip() {
        let entry = Entry {
            index: Index(7),
            term: Term(2),
            ballot: Term(3),
            op: Op::Write { offset: 4096, data: Bytes::from(vec![7u8; 4096]) },
            request: Some(RequestId { client: ClientId(9), seq: 11 }),
            floor: 10,
            look_behind: LookBehind::new(vec![Some(RangeSet::single(Range::new(0, 512))), None]),
        };
        let mut buf = BytesMut::new();
        encode_entry(&entry, &mut buf);
        assert_eq!(buf.len(), encoded_len(&entry));
        assert_eq!(decode_entry(&buf).unwrap(), entry);
        for cut in [0, 10, buf.len() - 1] {
            assert!(decode_entry(&buf[..cut]).is_err());
        }
    }
}
