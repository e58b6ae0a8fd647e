//! Framing shared by peer and frontend connections.
//!
//! ```text
//! frame  := len u32 | crc32(body) u32 | body            (len = bytes of body)
//! body   := kind u8 | cluster_id u64 | sender u32 | group u32 | payload
//! ```
//! Little endian. A frame whose checksum or cluster id is wrong ends the connection: the
//! stream can no longer be trusted, and the peer reconnects.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parallelraft::codec::{decode_message, encode_message};
use parallelraft::{ClientId, Index, Message, ReplicaId, RequestId};
use tokio::io::{AsyncRead, AsyncReadExt};

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

/// A frontend request to a chunk's group. Offsets are within the chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOp {
    Write { offset: u64, data: Bytes },
    Trim { offset: u64, len_bytes: u64 },
    WriteZeroes { offset: u64, len_bytes: u64 },
    Read { offset: u64, len_bytes: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Data(Bytes),
    NotLeader(Option<ReplicaId>),
    Busy,
    /// The replica could not execute it (e.g. a disk failure); the frontend tries another.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Hello {
        role: Role,
    },
    Peer {
        message: Message,
    },
    SnapData {
        snapshot: u64,
        blocks: Vec<SnapBlock>,
    },
    /// Ends a snapshot stream: `blocks` SnapBlocks were sent before it.
    SnapEnd {
        snapshot: u64,
        blocks: u64,
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
    out.put_u32_le(0);
    out.put_u32_le(0);
    let body_start = out.len();
    let kind = match &frame.body {
        Body::Hello { .. } => 1,
        Body::Peer { .. } => 2,
        Body::SnapData { .. } => 3,
        Body::SnapEnd { .. } => 4,
        Body::Request { .. } => 5,
        Body::Response { .. } => 6,
        Body::RepairAsk { .. } => 7,
        Body::RepairData { .. } => 8,
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
        Body::SnapData { snapshot, blocks } => {
            out.put_u64_le(*snapshot);
            encode_blocks(blocks, out);
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
        Body::SnapEnd { snapshot, blocks, message } => {
            out.put_u64_le(*snapshot);
            out.put_u64_le(*blocks);
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
                    out.put_slice(data);
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
            }
        }
        Body::Response { id, outcome } => {
            out.put_u64_le(id.client.0);
            out.put_u64_le(id.seq);
            match outcome {
                Outcome::Done => out.put_u8(1),
                Outcome::Data(d) => {
                    out.put_u8(2);
                    out.put_slice(d);
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
            }
        }
    }
    let body_len = out.len() - body_start;
    let crc = crc32fast::hash(&out[body_start..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_blocks(blocks: &[SnapBlock], out: &mut BytesMut) {
    out.put_u32_le(blocks.len() as u32);
    for b in blocks {
        out.put_u64_le(b.block);
        out.put_u64_le(b.version.0);
        match &b.data {
            None => out.put_u8(0),
            Some(d) => {
                out.put_u8(1);
                out.put_u32_le(d.len() as u32);
                out.put_slice(d);
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
    decode_message(buf).map_err(|e| bad(e.to_string()))
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
            Body::SnapData { snapshot, blocks: decode_blocks(&mut buf)? }
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
            let blocks = get_u64(&mut buf)?;
            Body::SnapEnd { snapshot, blocks, message: message(&buf)? }
        }
        5 => {
            let id = RequestId { client: ClientId(get_u64(&mut buf)?), seq: get_u64(&mut buf)? };
            let floor = get_u64(&mut buf)?;
            let op = match get_u8(&mut buf)? {
                1 => RequestOp::Write { offset: get_u64(&mut buf)?, data: buf.split_off(0) },
                2 => RequestOp::Trim { offset: get_u64(&mut buf)?, len_bytes: get_u64(&mut buf)? },
                3 => RequestOp::WriteZeroes { offset: get_u64(&mut buf)?, len_bytes: get_u64(&mut buf)? },
                4 => RequestOp::Read { offset: get_u64(&mut buf)?, len_bytes: get_u64(&mut buf)? },
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

/// Reads one frame. `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, WireError> {
    let mut head = [0u8; 8];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
    if !(HEADER_BYTES..=MAX_FRAME_BYTES).contains(&len) {
        return Err(bad(format!("frame length {len}")));
    }
    let mut body = BytesMut::zeroed(len);
    reader.read_exact(&mut body).await?;
    if crc32fast::hash(&body) != crc {
        return Err(bad("checksum mismatch"));
    }
    decode_body(body.freeze()).map(Some)
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
    }

    #[test]
    fn frames_round_trip() {
        let id = RequestId { client: ClientId(3), seq: 4 };
        round_trip(Body::Hello { role: Role::Peer });
        round_trip(Body::Peer { message: Message::PreVoteResponse { term: Term(3), granted: true } });
        round_trip(Body::SnapData {
            snapshot: 1,
            blocks: vec![
                SnapBlock { block: 0, version: Index(3), data: Some(Bytes::from(vec![1u8; 4096])) },
                SnapBlock { block: 7, version: Index(4), data: None },
            ],
        });
        round_trip(Body::SnapEnd {
            snapshot: 1,
            blocks: 2,
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
        round_trip(Body::Response { id, outcome: Outcome::NotLeader(Some(ReplicaId(2))) });
        round_trip(Body::Response { id, outcome: Outcome::NotLeader(None) });
        round_trip(Body::Response { id, outcome: Outcome::Busy });
        round_trip(Body::Response { id, outcome: Outcome::Done });
        round_trip(Body::Response { id, outcome: Outcome::Failed("disk".into()) });
    }
}
