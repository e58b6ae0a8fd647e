//! Framing shared by peer and frontend connections.
//!
//! ```text
//! frame  := len u32 | crc32(body) u32 | body            (len = bytes of body)
//! body   := kind u8 | cluster_id u64 | sender u32 | group u32 | payload
//! ```
//! Little endian. A frame whose checksum or cluster id is wrong ends the connection: the
//! stream can no longer be trusted, and the peer reconnects.

use bytes::{Buf, Bytes, BytesMut};
use parallelraft::codec::{decode_message_shared, encode_message, Sink};
use parallelraft::{ClientId, Index, MembershipChange, MembershipError, Message, ReplicaId, RequestId, Term};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::outgoing::Outgoing;
use crate::pieces::Pieces;
use crate::recv::SharedReader;

/// Largest body accepted: a full Append batch of large writes fits comfortably.
pub const MAX_FRAME_BYTES: usize = 96 << 20;
const HEADER_BYTES: usize = 1 + 8 + 4 + 4;

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Another chunk server; `sender` is its id.
    Peer,
    /// A volume frontend; `sender` is 0.
    Frontend,
}

/// One block of a snapshot image: its version and data (`None` reads as zeroes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapBlock {
    pub block: u64,
    pub version: Index,
    pub data: Option<Bytes>,
}

/// A frontend (or admin) request to a chunk's group. Offsets are within the chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOp {
    Write {
        offset: u64,
        data: Bytes,
    },
    Trim {
        offset: u64,
        len_bytes: u64,
    },
    WriteZeroes {
        offset: u64,
        len_bytes: u64,
    },
    Read {
        offset: u64,
        len_bytes: u64,
    },
    /// A membership change, executed by the group's leader through its log.
    Change(MembershipChange),
    /// This replica's view of its group, answered by any replica directly.
    Status,
    /// `(version, crc32)` of `count` blocks from `first_block`, read and verified here.
    Scrub {
        first_block: u64,
        count: u64,
    },
    /// The operator learned from the leader that the configuration entry at `config` removed
    /// this server: delete the replica's data, keeping its term and vote as a tombstone.
    Retire {
        config: Index,
    },
}

/// Largest `count` of a scrub request (4 MiB of blocks read per request).
pub const MAX_SCRUB_BLOCKS: u64 = 1024;

/// A replica's view of its group (the answer to [`RequestOp::Status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// `RoleKind` as text ("Leader", "Follower", ...), or "Failed".
    pub role: String,
    pub term: Term,
    pub leader: Option<ReplicaId>,
    pub voters: Vec<ReplicaId>,
    pub learners: Vec<ReplicaId>,
    /// Index of the configuration entry in force (0: the bootstrap placement).
    pub config_index: Index,
    pub committed: Index,
    pub applied: Index,
    pub last: Index,
    pub checkpoint: Index,
    /// Bytes this replica received to be rebuilt since the server started: image blocks, plus
    /// the write payload of log entries received while it was not a voter.
    pub rebuild_received_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Data(Bytes),
    NotLeader(Option<ReplicaId>),
    Busy,
    /// The replica could not execute it (e.g. a disk failure); the frontend tries another.
    Failed(String),
    /// The leader refused a membership change.
    Refused(MembershipError),
    Status(GroupStatus),
    /// `(version, crc32 of the 4 KiB)` per block of a scrub request.
    Scrub(Vec<(Index, u32)>),
    /// This server holds no replica of the chunk.
    Absent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Hello {
        role: Role,
    },
    Peer {
        message: Message,
    },
    /// Frame `seq` (from 0) of a stream; it covers every wanted block below `upto`.
    SnapData {
        snapshot: u64,
        seq: u64,
        upto: u64,
        blocks: Vec<SnapBlock>,
    },
    /// Opens a snapshot stream of an image as of at least `checkpoint`; the receiver answers
    /// with [`Body::SnapWant`] and the sender streams only what it asks for.
    SnapOffer {
        snapshot: u64,
        checkpoint: Index,
    },
    /// The blocks a receiver needs (see `server::rebuild`): below `covered`, those with a
    /// version above `low`; from `covered` on, those with a version above `high`.
    SnapWant {
        snapshot: u64,
        covered: u64,
        low: Index,
        high: Index,
    },
    /// Ends a snapshot stream of `frames` SnapData frames; the receiver steps `message` (a
    /// `Message::Snapshot`) only if it got all of them, in order.
    SnapEnd {
        snapshot: u64,
        frames: u64,
        message: Message,
    },
    /// Asks the peers of a group for their copies of blocks that failed their checksum here.
    /// A peer answers with a copy only if it holds everything the asker applied to the block:
    /// its version is at least `need`, or its applied watermark is.
    RepairAsk {
        blocks: Vec<BlockNeed>,
    },
    /// Verified copies of asked-for blocks, with the sender's applied watermark.
    RepairData {
        applied: Index,
        blocks: Vec<SnapBlock>,
    },
    Request {
        id: RequestId,
        floor: u64,
        op: RequestOp,
    },
    Response {
        id: RequestId,
        outcome: Outcome,
    },
}

/// A block to repair and the least version a copy must have (see [`Body::RepairAsk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockNeed {
    pub block: u64,
    pub need: Index,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub cluster_id: u64,
    pub sender: u32,
    pub group: u32,
    pub body: Body,
}

#[derive(Debug)]
pub enum WireError {
    Io(std::io::Error),
    Malformed(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Malformed(m) => write!(f, "malformed frame: {m}"),
        }
    }
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e)
    }
}

fn bad(m: impl Into<String>) -> WireError {
    WireError::Malformed(m.into())
}

/// Appends the encoded frame to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    encode_unsealed(frame, out);
    seal(out, start, &[]);
}

/// Appends the encoded frame to `out`, sharing its data (a write's payload, a read's result,
/// snapshot blocks) instead of copying it. The bytes, in order, are those of [`encode`].
pub fn encode_pieces(frame: &Frame, out: &mut Pieces) {
    let mark = out.mark();
    encode_unsealed(frame, out);
    let mut crc = crc32fast::Hasher::new();
    let mut body_len = 0;
    out.for_each_since(mark, 8, |part| {
        crc.update(part);
        body_len += part.len();
    });
    put_head(out.head_at(mark), body_len, crc.finalize());
}

/// Writes a frame's length and checksum into its first 8 bytes, `frame`.
fn put_head(frame: &mut [u8], body_len: usize, crc: u32) {
    frame[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends `frame` with its length and checksum left zero, for [`seal`] or [`encode_pieces`]
/// to fill in.
fn encode_unsealed(frame: &Frame, out: &mut impl Sink) {
    out.put_u32_le(0);
    out.put_u32_le(0);
    let kind = match &frame.body {
        Body::Hello { .. } => 1,
        Body::Peer { .. } => 2,
        Body::SnapData { .. } => 3,
        Body::SnapEnd { .. } => 4,
        Body::Request { .. } => 5,
        Body::Response { .. } => 6,
        Body::RepairAsk { .. } => 7,
        Body::RepairData { .. } => 8,
        Body::SnapOffer { .. } => 9,
        Body::SnapWant { .. } => 10,
    };
    out.put_u8(kind);
    out.put_u64_le(frame.cluster_id);
    out.put_u32_le(frame.sender);
    out.put_u32_le(frame.group);
    match &frame.body {
        Body::Hello { role } => out.put_u8(match role {
            Role::Peer => 1,
            Role::Frontend => 2,
        }),
        Body::Peer { message } => encode_message(message, out),
        Body::SnapData { snapshot, seq, upto, blocks } => {
            out.put_u64_le(*snapshot);
            out.put_u64_le(*seq);
            out.put_u64_le(*upto);
            encode_blocks(blocks, out);
        }
        Body::SnapOffer { snapshot, checkpoint } => {
            out.put_u64_le(*snapshot);
            out.put_u64_le(checkpoint.0);
        }
        Body::SnapWant { snapshot, covered, low, high } => {
            out.put_u64_le(*snapshot);
            out.put_u64_le(*covered);
            out.put_u64_le(low.0);
            out.put_u64_le(high.0);
        }
        Body::RepairAsk { blocks } => {
            out.put_u32_le(blocks.len() as u32);
            for b in blocks {
                out.put_u64_le(b.block);
                out.put_u64_le(b.need.0);
            }
        }
        Body::RepairData { applied, blocks } => {
            out.put_u64_le(applied.0);
            encode_blocks(blocks, out);
        }
        Body::SnapEnd { snapshot, frames, message } => {
            out.put_u64_le(*snapshot);
            out.put_u64_le(*frames);
            encode_message(message, out);
        }
        Body::Request { id, floor, op } => {
            out.put_u64_le(id.client.0);
            out.put_u64_le(id.seq);
            out.put_u64_le(*floor);
            match op {
                RequestOp::Write { offset, data } => {
                    out.put_u8(1);
                    out.put_u64_le(*offset);
                    out.put_data(data);
                }
                RequestOp::Trim { offset, len_bytes } => {
                    out.put_u8(2);
                    out.put_u64_le(*offset);
                    out.put_u64_le(*len_bytes);
                }
                RequestOp::WriteZeroes { offset, len_bytes } => {
                    out.put_u8(3);
                    out.put_u64_le(*offset);
                    out.put_u64_le(*len_bytes);
                }
                RequestOp::Read { offset, len_bytes } => {
                    out.put_u8(4);
                    out.put_u64_le(*offset);
                    out.put_u64_le(*len_bytes);
                }
                RequestOp::Change(change) => {
                    out.put_u8(5);
                    let (kind, server) = match change {
                        MembershipChange::AddLearner(r) => (1, r),
                        MembershipChange::Promote(r) => (2, r),
                        MembershipChange::Remove(r) => (3, r),
                    };
                    out.put_u8(kind);
                    out.put_u32_le(server.0);
                }
                RequestOp::Status => out.put_u8(6),
                RequestOp::Scrub { first_block, count } => {
                    out.put_u8(7);
                    out.put_u64_le(*first_block);
                    out.put_u64_le(*count);
                }
                RequestOp::Retire { config } => {
                    out.put_u8(8);
                    out.put_u64_le(config.0);
                }
            }
        }
        Body::Response { id, outcome } => {
            out.put_u64_le(id.client.0);
            out.put_u64_le(id.seq);
            match outcome {
                Outcome::Done => out.put_u8(1),
                Outcome::Data(d) => {
                    out.put_u8(2);
                    out.put_data(d);
                }
                Outcome::NotLeader(hint) => {
                    out.put_u8(3);
                    out.put_u32_le(hint.map_or(u32::MAX, |h| h.0));
                }
                Outcome::Busy => out.put_u8(4),
                Outcome::Failed(why) => {
                    out.put_u8(5);
                    out.put_slice(why.as_bytes());
                }
                Outcome::Refused(e) => {
                    out.put_u8(6);
                    out.put_u8(membership_error_code(*e));
                }
                Outcome::Status(st) => {
                    out.put_u8(7);
                    encode_status(st, out);
                }
                Outcome::Scrub(sums) => {
                    out.put_u8(8);
                    out.put_u32_le(sums.len() as u32);
                    for (version, crc) in sums {
                        out.put_u64_le(version.0);
                        out.put_u32_le(*crc);
                    }
                }
                Outcome::Absent => out.put_u8(9),
            }
        }
    }
}

/// Writes the length and checksum of the frame at `start` of `out`, whose body is the rest of
/// `out` followed by `tail` (bytes that go on the wire right after it, not copied in).
fn seal(out: &mut BytesMut, start: usize, tail: &[u8]) {
    let body = start + 8;
    let body_len = out.len() - body + tail.len();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[body..]);
    crc.update(tail);
    put_head(&mut out[start..], body_len, crc.finalize());
}

/// Room for a request frame without its data (a read, trim or zeroes request is ~70 bytes).
const REQUEST_HEAD_BYTES: usize = 128;

/// `frame` encoded as one queue item: a write request's data is the tail, as the caller holds
/// it, instead of a copy behind the header (the frontend sends every write's data this way);
/// any other frame is all head. The bytes on the wire are those of [`encode`].
pub fn encode_outgoing(frame: &Frame) -> Outgoing {
    let Body::Request { id, floor, op: RequestOp::Write { offset, data } } = &frame.body else {
        // Sized for any request but a write's data, so the buffer never grows (each growth
        // from empty is a reallocation: three for a read request, ~3% of the frontend's CPU
        // at 4 KiB reads).
        let mut out = BytesMut::with_capacity(REQUEST_HEAD_BYTES);
        encode(frame, &mut out);
        return out.freeze().into();
    };
    // The data is the request's last field: encode the rest, then count the data in.
    let head = Frame {
        body: Body::Request { id: *id, floor: *floor, op: RequestOp::Write { offset: *offset, data: Bytes::new() } },
        ..*frame
    };
    let mut out = BytesMut::with_capacity(REQUEST_HEAD_BYTES);
    encode_unsealed(&head, &mut out);
    seal(&mut out, 0, data);
    Outgoing { head: out.freeze(), tail: data.clone() }
}

fn membership_error_code(e: MembershipError) -> u8 {
    match e {
        MembershipError::AlreadyMember => 1,
        MembershipError::NotAMember => 2,
        MembershipError::NotALearner => 3,
        MembershipError::LearnerBehind => 4,
        MembershipError::LastVoter => 5,
    }
}

fn membership_error(code: u8) -> Result<MembershipError, WireError> {
    Ok(match code {
        1 => MembershipError::AlreadyMember,
        2 => MembershipError::NotAMember,
        3 => MembershipError::NotALearner,
        4 => MembershipError::LearnerBehind,
        5 => MembershipError::LastVoter,
        _ => return Err(bad("unknown membership error")),
    })
}

fn encode_ids(ids: &[ReplicaId], out: &mut impl Sink) {
    out.put_u32_le(ids.len() as u32);
    for id in ids {
        out.put_u32_le(id.0);
    }
}

fn decode_ids(buf: &mut Bytes) -> Result<Vec<ReplicaId>, WireError> {
    let n = get_u32(buf)? as usize;
    if n > buf.remaining() / 4 {
        return Err(bad("id count exceeds frame"));
    }
    (0..n).map(|_| get_u32(buf).map(ReplicaId)).collect()
}

fn encode_status(st: &GroupStatus, out: &mut impl Sink) {
    out.put_u32_le(st.role.len() as u32);
    out.put_slice(st.role.as_bytes());
    out.put_u64_le(st.term.0);
    out.put_u32_le(st.leader.map_or(u32::MAX, |h| h.0));
    encode_ids(&st.voters, out);
    encode_ids(&st.learners, out);
    for i in [st.config_index, st.committed, st.applied, st.last, st.checkpoint] {
        out.put_u64_le(i.0);
    }
    out.put_u64_le(st.rebuild_received_bytes);
}

fn decode_status(buf: &mut Bytes) -> Result<GroupStatus, WireError> {
    let len = get_u32(buf)? as usize;
    need(buf, len)?;
    let role = String::from_utf8_lossy(&buf.split_to(len)).into_owned();
    let term = Term(get_u64(buf)?);
    let h = get_u32(buf)?;
    let leader = (h != u32::MAX).then_some(ReplicaId(h));
    let voters = decode_ids(buf)?;
    let learners = decode_ids(buf)?;
    let mut index = || get_u64(buf).map(Index);
    Ok(GroupStatus {
        role,
        term,
        leader,
        voters,
        learners,
        config_index: index()?,
        committed: index()?,
        applied: index()?,
        last: index()?,
        checkpoint: index()?,
        rebuild_received_bytes: get_u64(buf)?,
    })
}

fn encode_blocks(blocks: &[SnapBlock], out: &mut impl Sink) {
    out.put_u32_le(blocks.len() as u32);
    for b in blocks {
        out.put_u64_le(b.block);
        out.put_u64_le(b.version.0);
        match &b.data {
            None => out.put_u8(0),
            Some(d) => {
                out.put_u8(1);
                out.put_u32_le(d.len() as u32);
                out.put_data(d);
            }
        }
    }
}

/// Decodes what [`encode_blocks`] wrote; it must end the frame.
fn decode_blocks(buf: &mut Bytes) -> Result<Vec<SnapBlock>, WireError> {
    let n = get_u32(buf)? as usize;
    if n > buf.remaining() / 17 {
        return Err(bad("block count exceeds frame"));
    }
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        let block = get_u64(buf)?;
        let version = Index(get_u64(buf)?);
        let data = match get_u8(buf)? {
            0 => None,
            1 => {
                let len = get_u32(buf)? as usize;
                need(buf, len)?;
                Some(buf.split_to(len))
            }
            _ => return Err(bad("bad block flag")),
        };
        blocks.push(SnapBlock { block, version, data });
    }
    if buf.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok(blocks)
}

fn end(buf: &Bytes) -> Result<(), WireError> {
    if buf.has_remaining() {
        return Err(bad("trailing bytes"));
    }
    Ok(())
}

fn need(buf: &Bytes, n: usize) -> Result<(), WireError> {
    if buf.remaining() < n {
        return Err(bad("truncated"));
    }
    Ok(())
}

fn get_u64(buf: &mut Bytes) -> Result<u64, WireError> {
    need(buf, 8)?;
    Ok(buf.get_u64_le())
}

fn get_u32(buf: &mut Bytes) -> Result<u32, WireError> {
    need(buf, 4)?;
    Ok(buf.get_u32_le())
}

fn get_u8(buf: &mut Bytes) -> Result<u8, WireError> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}

fn message(buf: &Bytes) -> Result<Message, WireError> {
    decode_message_shared(buf).map_err(|e| bad(e.to_string()))
}

/// Decodes a frame body (after the length and checksum were checked).
pub fn decode_body(mut buf: Bytes) -> Result<Frame, WireError> {
    need(&buf, HEADER_BYTES)?;
    let kind = buf.get_u8();
    let cluster_id = buf.get_u64_le();
    let sender = buf.get_u32_le();
    let group = buf.get_u32_le();
    let body = match kind {
        1 => match get_u8(&mut buf)? {
            1 => Body::Hello { role: Role::Peer },
            2 => Body::Hello { role: Role::Frontend },
            _ => return Err(bad("unknown role")),
        },
        2 => Body::Peer { message: message(&buf)? },
        3 => {
            let snapshot = get_u64(&mut buf)?;
            let seq = get_u64(&mut buf)?;
            let upto = get_u64(&mut buf)?;
            Body::SnapData { snapshot, seq, upto, blocks: decode_blocks(&mut buf)? }
        }
        9 => {
            let snapshot = get_u64(&mut buf)?;
            let checkpoint = Index(get_u64(&mut buf)?);
            end(&buf)?;
            Body::SnapOffer { snapshot, checkpoint }
        }
        10 => {
            let snapshot = get_u64(&mut buf)?;
            let covered = get_u64(&mut buf)?;
            let low = Index(get_u64(&mut buf)?);
            let high = Index(get_u64(&mut buf)?);
            end(&buf)?;
            Body::SnapWant { snapshot, covered, low, high }
        }
        7 => {
            let n = get_u32(&mut buf)? as usize;
            if n > buf.remaining() / 16 {
                return Err(bad("block count exceeds frame"));
            }
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(BlockNeed { block: get_u64(&mut buf)?, need: Index(get_u64(&mut buf)?) });
            }
            if buf.has_remaining() {
                return Err(bad("trailing bytes"));
            }
            Body::RepairAsk { blocks }
        }
        8 => {
            let applied = Index(get_u64(&mut buf)?);
            Body::RepairData { applied, blocks: decode_blocks(&mut buf)? }
        }
        4 => {
            let snapshot = get_u64(&mut buf)?;
            let frames = get_u64(&mut buf)?;
            Body::SnapEnd { snapshot, frames, message: message(&buf)? }
        }
        5 => {
            let id = RequestId { client: ClientId(get_u64(&mut buf)?), seq: get_u64(&mut buf)? };
            let floor = get_u64(&mut buf)?;
            let op = match get_u8(&mut buf)? {
                1 => RequestOp::Write { offset: get_u64(&mut buf)?, data: buf.split_off(0) },
                2 => RequestOp::Trim { offset: get_u64(&mut buf)?, len_bytes: get_u64(&mut buf)? },
                3 => RequestOp::WriteZeroes { offset: get_u64(&mut buf)?, len_bytes: get_u64(&mut buf)? },
                4 => RequestOp::Read { offset: get_u64(&mut buf)?, len_bytes: get_u64(&mut buf)? },
                5 => {
                    let kind = get_u8(&mut buf)?;
                    let server = ReplicaId(get_u32(&mut buf)?);
                    RequestOp::Change(match kind {
                        1 => MembershipChange::AddLearner(server),
                        2 => MembershipChange::Promote(server),
                        3 => MembershipChange::Remove(server),
                        _ => return Err(bad("unknown membership change")),
                    })
                }
                6 => RequestOp::Status,
                7 => RequestOp::Scrub { first_block: get_u64(&mut buf)?, count: get_u64(&mut buf)? },
                8 => RequestOp::Retire { config: Index(get_u64(&mut buf)?) },
                _ => return Err(bad("unknown request op")),
            };
            if buf.has_remaining() {
                return Err(bad("trailing bytes"));
            }
            Body::Request { id, floor, op }
        }
        6 => {
            let id = RequestId { client: ClientId(get_u64(&mut buf)?), seq: get_u64(&mut buf)? };
            let outcome = match get_u8(&mut buf)? {
                1 => Outcome::Done,
                2 => Outcome::Data(buf.split_off(0)),
                3 => {
                    let h = get_u32(&mut buf)?;
                    Outcome::NotLeader((h != u32::MAX).then_some(ReplicaId(h)))
                }
                4 => Outcome::Busy,
                5 => Outcome::Failed(String::from_utf8_lossy(&buf.split_off(0)).into_owned()),
                6 => Outcome::Refused(membership_error(get_u8(&mut buf)?)?),
                7 => Outcome::Status(decode_status(&mut buf)?),
                8 => {
                    let n = get_u32(&mut buf)? as usize;
                    if n > buf.remaining() / 12 {
                        return Err(bad("scrub count exceeds frame"));
                    }
                    let mut sums = Vec::with_capacity(n);
                    for _ in 0..n {
                        sums.push((Index(get_u64(&mut buf)?), get_u32(&mut buf)?));
                    }
                    Outcome::Scrub(sums)
                }
                9 => Outcome::Absent,
                _ => return Err(bad("unknown outcome")),
            };
            if buf.has_remaining() {
                return Err(bad("trailing bytes"));
            }
            Body::Response { id, outcome }
        }
        _ => return Err(bad(format!("unknown frame kind {kind}"))),
    };
    Ok(Frame { cluster_id, sender, group, body })
}

/// Reads exactly `len` bytes into a new buffer, without zeroing it first (a frame of 64
/// entries is ~270 KiB; zeroing it was a measurable share of the network threads' time).
pub async fn read_bytes<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len);
    // `take` bounds each read: the buffer may have room past `len`, and the bytes after it
    // belong to the next frame.
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

/// Reads one frame. `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, WireError> {
    let mut head = [0u8; 8];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, crc) = parse_head(head)?;
    let body = read_bytes(reader, len).await?.freeze();
    check_body(body, crc).map(Some)
}

/// As [`read_frame`], the body shared with the receive buffer instead of copied out of it
/// (see [`crate::recv`]): what every connection reads after its hello.
pub async fn read_frame_shared<R: AsyncRead + Unpin>(reader: &mut SharedReader<R>) -> Result<Option<Frame>, WireError> {
    let Some(head) = reader.read_array::<8>().await? else { return Ok(None) };
    let (len, crc) = parse_head(head)?;
    let body = reader.read_bytes(len).await?;
    check_body(body, crc).map(Some)
}

/// A frame's length and checksum.
fn parse_head(head: [u8; 8]) -> Result<(usize, u32), WireError> {
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
    if !(HEADER_BYTES..=MAX_FRAME_BYTES).contains(&len) {
        return Err(bad(format!("frame length {len}")));
    }
    Ok((len, crc))
}

fn check_body(body: Bytes, crc: u32) -> Result<Frame, WireError> {
    if crc32fast::hash(&body) != crc {
        return Err(bad("checksum mismatch"));
    }
    decode_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallelraft::Term;

    fn round_trip(body: Body) {
        let frame = Frame { cluster_id: 9, sender: 2, group: 5, body };
        let mut out = BytesMut::new();
        encode(&frame, &mut out);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut reader: &[u8] = &out;
        let got = rt.block_on(read_frame(&mut reader)).unwrap().unwrap();
        assert_eq!(got, frame);
        // Any flipped bit is caught by the checksum (or the length check).
        let mut damaged = out.to_vec();
        let at = damaged.len() / 2;
        damaged[at] ^= 0x10;
        let mut reader: &[u8] = &damaged;
        assert!(rt.block_on(read_frame(&mut reader)).is_err());
        // As pieces, behind another frame in the same batch: the same bytes.
        let hello = Frame { cluster_id: 9, sender: 2, group: 0, body: Body::Hello { role: Role::Peer } };
        let mut pieces = Pieces::default();
        encode_pieces(&hello, &mut pieces);
        encode_pieces(&frame, &mut pieces);
        pieces.check_invariants();
        let mut whole = BytesMut::new();
        encode(&hello, &mut whole);
        whole.extend_from_slice(&out);
        assert_eq!(pieces.take().concat(), whole[..], "{:?}", frame.body);
    }

    /// Frames of every size read back through the shared receive buffer, whether a body is
    /// all in the buffer, partly there, or not yet arrived: the stream arrives in uneven pieces.
    #[test]
    fn frames_of_every_size_read_back_through_the_shared_buffer() {
        let id = RequestId { client: ClientId(3), seq: 4 };
        let sizes = [0, 100, 32 << 10, 131072, 1 << 20, 7, 200_000, 300_000, 5];
        let frames: Vec<Frame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Frame {
                cluster_id: 9,
                sender: 0,
                group: i as u32,
                body: Body::Request {
                    id,
                    floor: 0,
                    op: RequestOp::Write { offset: 0, data: Bytes::from(vec![i as u8 + 1; n]) },
                },
            })
            .collect();
        let mut stream = BytesMut::new();
        for f in &frames {
            encode(f, &mut stream);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (writer, rx) = crate::recv::uneven_stream(stream.to_vec());
            let mut reader = SharedReader::new(rx);
            for f in &frames {
                assert_eq!(read_frame_shared(&mut reader).await.unwrap().as_ref(), Some(f));
            }
            assert_eq!(read_frame_shared(&mut reader).await.unwrap(), None);
            writer.await.unwrap();
        });
    }

    /// A leader's append shares each large write's data with the batch instead of copying it
    /// (small data is copied), and reads back as the same message.
    #[test]
    fn a_batch_shares_large_data() {
        use lbb::LookBehind;
        use parallelraft::{Entry, Op};
        let big = Bytes::from((0..131072u32).map(|i| (i * 13) as u8).collect::<Vec<u8>>());
        let entry = |index, data: &Bytes| Entry {
            index: Index(index),
            term: Term(2),
            ballot: Term(2),
            op: Op::Write { offset: 0, data: data.clone() },
            request: Some(RequestId { client: ClientId(1), seq: index }),
            floor: 0,
            look_behind: LookBehind::unknown(2),
        };
        let small = Bytes::from(vec![3u8; 512]);
        let message = Message::Append {
            term: Term(2),
            entries: vec![entry(1, &big), entry(2, &small), entry(3, &big)],
            commit: parallelraft::CommitNotice { watermark: Index(0), above: vec![] },
        };
        let frame = Frame { cluster_id: 9, sender: 1, group: 3, body: Body::Peer { message } };
        let mut pieces = Pieces::default();
        encode_pieces(&frame, &mut pieces);
        let taken = pieces.take();
        assert_eq!(taken.iter().filter(|p| p.as_ptr() == big.as_ptr()).count(), 2, "large data copied");
        assert!(taken.iter().all(|p| p.as_ptr() != small.as_ptr()), "small data shared");
        let mut whole = BytesMut::new();
        encode(&frame, &mut whole);
        assert_eq!(taken.concat(), whole[..]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = taken.concat();
        let mut reader: &[u8] = &bytes;
        assert_eq!(rt.block_on(read_frame(&mut reader)).unwrap().unwrap(), frame);
    }

    #[test]
    fn a_write_requests_data_goes_out_as_the_tail_with_the_same_bytes_on_the_wire() {
        let id = RequestId { client: ClientId(3), seq: 4 };
        let data = Bytes::from((0..8192u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let ops = [
            RequestOp::Write { offset: 8192, data: data.clone() },
            RequestOp::Write { offset: 0, data: Bytes::new() },
            RequestOp::Read { offset: 4096, len_bytes: 4096 },
        ];
        for op in ops {
            let frame = Frame { cluster_id: 9, sender: 0, group: 5, body: Body::Request { id, floor: 2, op } };
            let mut whole = BytesMut::new();
            encode(&frame, &mut whole);
            let out = encode_outgoing(&frame);
            let written = [&out.head[..], &out.tail[..]].concat();
            assert_eq!(written, whole[..], "{frame:?}");
            if let Body::Request { op: RequestOp::Write { data, .. }, .. } = &frame.body {
                // The tail is the caller's buffer itself, not a copy.
                assert_eq!(out.tail.as_ptr(), data.as_ptr());
                assert_eq!(out.tail.len(), data.len());
            } else {
                assert!(out.tail.is_empty());
            }
        }
        let hello = Frame { cluster_id: 9, sender: 1, group: 0, body: Body::Hello { role: Role::Frontend } };
        let mut whole = BytesMut::new();
        encode(&hello, &mut whole);
        assert_eq!(encode_outgoing(&hello), Outgoing::from(whole.freeze()));
    }

    #[test]
    fn frames_round_trip() {
        let id = RequestId { client: ClientId(3), seq: 4 };
        round_trip(Body::Hello { role: Role::Peer });
        round_trip(Body::Peer { message: Message::PreVoteResponse { term: Term(3), granted: true } });
        round_trip(Body::SnapOffer { snapshot: 3, checkpoint: Index(77) });
        round_trip(Body::SnapWant { snapshot: 3, covered: 12, low: Index(5), high: Index(0) });
        round_trip(Body::SnapData {
            snapshot: 1,
            seq: 4,
            upto: 300,
            blocks: vec![
                SnapBlock { block: 0, version: Index(3), data: Some(Bytes::from(vec![1u8; 4096])) },
                SnapBlock { block: 7, version: Index(4), data: None },
            ],
        });
        round_trip(Body::SnapEnd {
            snapshot: 1,
            frames: 2,
            message: Message::PreVoteResponse { term: Term(1), granted: false },
        });
        round_trip(Body::RepairAsk {
            blocks: vec![BlockNeed { block: 9, need: Index(4) }, BlockNeed { block: 10, need: Index(0) }],
        });
        round_trip(Body::RepairAsk { blocks: vec![] });
        round_trip(Body::RepairData {
            applied: Index(12),
            blocks: vec![SnapBlock { block: 9, version: Index(5), data: Some(Bytes::from(vec![2u8; 4096])) }],
        });
        round_trip(Body::Request {
            id,
            floor: 2,
            op: RequestOp::Write { offset: 512, data: Bytes::from(vec![5u8; 512]) },
        });
        round_trip(Body::Request { id, floor: 2, op: RequestOp::Read { offset: 0, len_bytes: 4096 } });
        round_trip(Body::Request { id, floor: 2, op: RequestOp::Trim { offset: 0, len_bytes: 4096 } });
        round_trip(Body::Request { id, floor: 2, op: RequestOp::WriteZeroes { offset: 0, len_bytes: 4096 } });
        round_trip(Body::Response { id, outcome: Outcome::Data(Bytes::from(vec![1u8; 100])) });
        round_trip(Body::Response { id, outcome: Outcome::Data(Bytes::from(vec![4u8; 4096])) });
        round_trip(Body::Response { id, outcome: Outcome::NotLeader(Some(ReplicaId(2))) });
        round_trip(Body::Response { id, outcome: Outcome::NotLeader(None) });
        round_trip(Body::Response { id, outcome: Outcome::Busy });
        round_trip(Body::Response { id, outcome: Outcome::Done });
        round_trip(Body::Response { id, outcome: Outcome::Failed("disk".into()) });
        for change in [
            MembershipChange::AddLearner(ReplicaId(4)),
            MembershipChange::Promote(ReplicaId(4)),
            MembershipChange::Remove(ReplicaId(2)),
        ] {
            round_trip(Body::Request { id, floor: 4, op: RequestOp::Change(change) });
        }
        round_trip(Body::Request { id, floor: 4, op: RequestOp::Status });
        round_trip(Body::Request { id, floor: 4, op: RequestOp::Scrub { first_block: 9, count: 1024 } });
        round_trip(Body::Request { id, floor: 4, op: RequestOp::Retire { config: Index(31) } });
        for e in [
            MembershipError::AlreadyMember,
            MembershipError::NotAMember,
            MembershipError::NotALearner,
            MembershipError::LearnerBehind,
            MembershipError::LastVoter,
        ] {
            round_trip(Body::Response { id, outcome: Outcome::Refused(e) });
        }
        round_trip(Body::Response {
            id,
            outcome: Outcome::Status(GroupStatus {
                role: "Leader".into(),
                term: Term(4),
                leader: Some(ReplicaId(2)),
                voters: vec![ReplicaId(1), ReplicaId(2), ReplicaId(4)],
                learners: vec![ReplicaId(5)],
                config_index: Index(40),
                committed: Index(41),
                applied: Index(41),
                last: Index(42),
                checkpoint: Index(30),
                rebuild_received_bytes: 1 << 20,
            }),
        });
        round_trip(Body::Response { id, outcome: Outcome::Scrub(vec![(Index(3), 77), (Index(0), 1)]) });
        round_trip(Body::Response { id, outcome: Outcome::Absent });
    }
}
