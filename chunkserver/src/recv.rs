//! A receive buffer that hands out what it read without copying it: the socket's bytes land in
//! one `BytesMut`, and each frame body or write payload is split off it as shared [`Bytes`].
//!
//! Why: through a `BufReader`, every body was copied from the reader's buffer into a buffer of
//! its own. At 128 KiB sequential writes that copy was 16% of the frontend's samples (the NBD
//! write payloads) and 9-10% of each follower's (the leader's appends). Reading the rest of a
//! long body past the buffer did not avoid it: reading a frame's header fills the buffer with
//! whatever the socket holds, usually most of the body.
//!
//! What it costs: a body keeps the whole allocation it lies in ([`RECV_BUFFER_BYTES`], or its
//! own length and more) alive until every body split from it is dropped; frames are consumed
//! within milliseconds.
//!
//! Contract: bytes come out in stream order, whether through [`SharedReader::read_bytes`],
//! [`SharedReader::read_array`] (which fill the buffer with one large read) or `AsyncRead`
//! (which takes the buffer first, then reads only what the caller asks, for handshakes).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Allocation of the receive buffer: one `recv` takes every frame that has arrived, up to this.
pub const RECV_BUFFER_BYTES: usize = 256 << 10;

/// Room under which the buffer takes a fresh allocation before reading (a read into a few
/// bytes of room would cost a syscall for little).
const MIN_READ_ROOM_BYTES: usize = 16 << 10;

pub struct SharedReader<R> {
    inner: R,
    /// Bytes read and not yet handed out.
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> SharedReader<R> {
    pub fn new(inner: R) -> SharedReader<R> {
        SharedReader { inner, buf: BytesMut::new() }
    }

    /// Buffers at least `n` bytes. False: the stream ended cleanly before any byte of them.
    async fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() < n {
            let missing = n - self.buf.len();
            if self.buf.capacity() - self.buf.len() < missing.max(MIN_READ_ROOM_BYTES) {
                // Room for all that is missing, so a body is never cut across allocations
                // (only the part of it already read moves). Reuses the allocation when no
                // body split from it is alive; otherwise allocates a fresh one.
                self.buf.reserve(missing.max(RECV_BUFFER_BYTES));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    /// The next `n` bytes, shared with the buffer.
    pub async fn read_bytes(&mut self, n: usize) -> io::Result<Bytes> {
        if !self.fill(n).await? && n > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// The next `N` bytes, copied. `None`: the stream ended cleanly before them.
    pub async fn read_array<const N: usize>(&mut self) -> io::Result<Option<[u8; N]>> {
        if !self.fill(N).await? {
            return Ok(None);
        }
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SharedReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.buf.is_empty() {
            return Pin::new(&mut me.inner).poll_read(cx, out);
        }
        let n = out.remaining().min(me.buf.len());
        out.put_slice(&me.buf[..n]);
        me.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Test helper: a stream that delivers `bytes` in uneven pieces (1 B to ~70 KiB) through a
/// 48 KiB pipe, as a socket does; the task ends when all is written. Call within a runtime.
#[cfg(test)]
pub(crate) fn uneven_stream(bytes: Vec<u8>) -> (tokio::task::JoinHandle<()>, tokio::io::DuplexStream) {
    use tokio::io::AsyncWriteExt;
    let (mut tx, rx) = tokio::io::duplex(48 << 10);
    let writer = tokio::spawn(async move {
        let mut at = 0;
        let mut step = 1000;
        while at < bytes.len() {
            let n = step.min(bytes.len() - at);
            tx.write_all(&bytes[at..at + n]).await.unwrap();
            at += n;
            step = step * 5 % 70_001 + 1;
            tokio::task::yield_now().await;
        }
    });
    (writer, rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Headers, bodies of every size (past the buffer's allocation too) and plain reads come
    /// out in stream order, whatever pieces the stream arrives in; bodies are not copies of
    /// each other's memory; a clean end is told from a cut one.
    #[tokio::test]
    async fn bytes_come_out_in_stream_order() {
        let sizes = [0usize, 1, 100, 4096, 70_000, 131_072, RECV_BUFFER_BYTES + 5, 1 << 20, 3];
        let mut stream = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            stream.extend_from_slice(&(n as u32).to_le_bytes());
            stream.extend((0..n).map(|j| (i * 31 + j) as u8));
        }
        stream.extend_from_slice(b"tail");
        let (writer, rx) = uneven_stream(stream);
        let mut reader = SharedReader::new(rx);
        let mut bodies = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let head = reader.read_array::<4>().await.unwrap().unwrap();
            assert_eq!(u32::from_le_bytes(head) as usize, n);
            let body = reader.read_bytes(n).await.unwrap();
            assert!(body.iter().enumerate().all(|(j, b)| *b == (i * 31 + j) as u8), "body {i} ({n} bytes)");
            bodies.push(body);
        }
        // Earlier bodies are intact after later reads reused or replaced the buffer.
        for (i, body) in bodies.iter().enumerate() {
            assert!(body.iter().enumerate().all(|(j, b)| *b == (i * 31 + j) as u8), "body {i} changed");
        }
        let mut tail = [0u8; 4];
        reader.read_exact(&mut tail).await.unwrap();
        assert_eq!(&tail, b"tail");
        writer.await.unwrap();
        assert_eq!(reader.read_array::<4>().await.unwrap(), None, "a clean end");
        assert_eq!(reader.buffered(), 0);

        // A stream cut inside a body is an error, not an end.
        let (mut tx, rx) = tokio::io::duplex(1024);
        tx.write_all(&[1, 2, 3]).await.unwrap();
        drop(tx);
        let mut reader = SharedReader::new(rx);
        assert_eq!(reader.read_bytes(10).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
