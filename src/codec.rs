//! Binary encoding of log entries, for write-ahead logs and the wire. Pure: no IO.
//!
//! Layout (little endian): index, term, ballot (u64 each); op tag (u8) and its fields; request
//! flag (u8) and (client, seq); floor (u64); look-behind span (u8) and per predecessor a flag
//! (u8: 0 unknown, 1 known) with a range count (u16) and (offset, len) pairs.

use bytes::{BufMut, Bytes, BytesMut};
use lbb::{LookBehind, Range, RangeSet};

use crate::entry::{Entry, Op};
use crate::types::{ClientId, Index, RequestId, Term};

/// A decoding failure: the bytes are not an entry this code wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed entry encoding: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

pub fn encode_entry(entry: &Entry, out: &mut BytesMut) {
    out.put_u64_le(entry.index.0);
    out.put_u64_le(entry.term.0);
    out.put_u64_le(entry.ballot.0);
    match &entry.op {
        Op::Noop => out.put_u8(0),
        Op::Write { offset, data } => {
            out.put_u8(1);
            out.put_u64_le(*offset);
            out.put_u32_le(data.len() as u32);
            out.put_slice(data);
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

/// Bytes `encode_entry` produces for `entry`.
pub fn encoded_len(entry: &Entry) -> usize {
    let op = match &entry.op {
        Op::Noop => 1,
        Op::Write { data, .. } => 1 + 8 + 4 + data.len(),
        Op::Trim { .. } | Op::WriteZeroes { .. } => 1 + 16,
    };
    let request = if entry.request.is_some() { 17 } else { 1 };
    let lbb: usize =
        entry.look_behind.previous().iter().map(|p| p.as_ref().map_or(1, |s| 3 + 16 * s.ranges().len())).sum();
    24 + op + request + 8 + 1 + lbb
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
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
    let mut r = Reader { buf };
    let index = Index(r.u64()?);
    let term = Term(r.u64()?);
    let ballot = Term(r.u64()?);
    let op = match r.u8()? {
        0 => Op::Noop,
        1 => {
            let offset = r.u64()?;
            let len = r.u32()? as usize;
            checked_range(offset, len as u64)?;
            Op::Write { offset, data: Bytes::copy_from_slice(r.take(len)?) }
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

#[cfg(test)]
mod tests {
    use super::*;

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
