//! NBD protocol constants and pure encoders/validators (fixed newstyle, structured replies).
//! See `doc/proto.md` of the NBD project.

use bytes::{BufMut, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAGS_KNOWN: u32 = 0b11;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Advertised: flush and FUA (writes are durable on a majority when answered, on every
/// connection alike, hence also multi-conn), trim, write-zeroes and cache.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN
    | TFLAG_SEND_CACHE;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;

pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const BLOCK_MIN: u32 = 512;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const BLOCK_MAX: u32 = 32 << 20;

/// A request header as read off the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn parse(buf: &[u8; 28]) -> Result<Request, u32> {
        let magic = u32::from_be_bytes(buf[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: u16::from_be_bytes(buf[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(buf[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(buf[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(buf[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(buf[24..28].try_into().unwrap()),
        })
    }
}

/// Checks a request against the export; `Err(errno)` is the error to answer with.
pub fn validate(req: &Request, size: u64) -> Result<(), u32> {
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(EINVAL),
    };
    if req.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    if matches!(req.kind, CMD_FLUSH | CMD_DISC) {
        return Ok(());
    }
    if req.len == 0 || req.len > BLOCK_MAX && matches!(req.kind, CMD_READ | CMD_WRITE) {
        return Err(if req.len == 0 { EINVAL } else { EOVERFLOW });
    }
    let end = req.offset.checked_add(req.len as u64);
    if end.is_none_or(|e| e > size) {
        return Err(if matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL });
    }
    if !req.offset.is_multiple_of(BLOCK_MIN as u64) || !(req.len as u64).is_multiple_of(BLOCK_MIN as u64) {
        return Err(EINVAL);
    }
    Ok(())
}

pub fn option_reply(out: &mut BytesMut, option: u32, kind: u32, data: &[u8]) {
    out.put_u64(REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(kind);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Bytes of a simple reply's header.
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// A simple reply's header; the data of a successful READ must follow it directly.
pub fn simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// The head of a structured READ reply: one OFFSET_DATA chunk with DONE, whose `data_len`
/// bytes of data must follow it directly.
pub fn structured_data_head(out: &mut BytesMut, cookie: u64, offset: u64, data_len: usize) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_OFFSET_DATA);
    out.put_u64(cookie);
    out.put_u32(8 + data_len as u32);
    out.put_u64(offset);
}

/// A structured error chunk with DONE.
pub fn structured_error(out: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_ERROR);
    out.put_u64(cookie);
    out.put_u32(4 + 2 + message.len() as u32);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, kind, cookie: 1, offset, len }
    }

    #[test]
    fn validation() {
        let size = 1 << 20;
        assert_eq!(validate(&req(CMD_READ, 0, 0, 4096), size), Ok(()));
        assert_eq!(validate(&req(CMD_WRITE, CMD_FLAG_FUA, 512, 512), size), Ok(()));
        assert_eq!(validate(&req(CMD_WRITE, 0, 100, 512), size), Err(EINVAL));
        assert_eq!(validate(&req(CMD_WRITE, 0, size - 512, 1024), size), Err(ENOSPC));
        assert_eq!(validate(&req(CMD_READ, 0, size, 512), size), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, 0, u64::MAX - 10, 512), size), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, 0, 0, BLOCK_MAX + 512), u64::MAX), Err(EOVERFLOW));
        assert_eq!(validate(&req(99, 0, 0, 512), size), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, CMD_FLAG_FUA, 0, 512), size), Err(EINVAL));
        assert_eq!(validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096), size), Ok(()));
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), size), Ok(()));
        assert_eq!(validate(&req(CMD_TRIM, 0, 0, 0), size), Err(EINVAL));
    }

    #[test]
    fn request_parse() {
        let mut buf = [0u8; 28];
        buf[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        buf[24..28].copy_from_slice(&4096u32.to_be_bytes());
        let r = Request::parse(&buf).unwrap();
        assert_eq!((r.kind, r.len), (CMD_WRITE, 4096));
        buf[0] = 0;
        assert!(Request::parse(&buf).is_err());
    }
}
