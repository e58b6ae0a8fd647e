//! Writing what tasks queued for one socket: everything queued at the time goes out in one
//! vectored write (writev), and none of it is copied on the way.
//!
//! Why: the frontend's writers (the NBD replies of a connection, the requests to one chunk
//! server) copied every queued buffer into one batch buffer to write it with one syscall, and
//! a read's reply had already copied the data behind its header. At 4 KiB reads, iodepth 32,
//! `memmove` and the allocator were the largest user-space items of the frontend's profile
//! (7% and 11% of its samples). The kernel copies the bytes into the socket anyway; a writev
//! of the queued pieces costs the same syscall as the write of a batch.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::Receiver;

/// Most pieces one write passes to the kernel (Linux takes up to 1024, `IOV_MAX`).
pub const MAX_PIECES: usize = 256;

/// What a task queues for a socket: `head`, directly followed by `tail` in the stream (a reply
/// header and the data it carries, so the data need not be copied behind the header). The two
/// travel as one item, so no other item can come between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub head: Bytes,
    /// Empty when there is nothing after `head`.
    pub tail: Bytes,
}

impl Outgoing {
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for Outgoing {
    fn from(head: Bytes) -> Outgoing {
        Outgoing { head, tail: Bytes::new() }
    }
}

/// Writes `first`, then whatever else is queued in `rx` already (until about `limit` bytes or
/// [`MAX_PIECES`] pieces), in order, with as few writes as the socket takes. It yields once
/// before looking at the queue, so that tasks made ready by the same event (replies completed
/// together) queue theirs first. Returns the first write error.
pub async fn write_queued<W: AsyncWrite + Unpin>(
    writer: &mut W,
    first: Outgoing,
    rx: &mut Receiver<Outgoing>,
    limit: usize,
) -> io::Result<()> {
    tokio::task::yield_now().await;
    let mut total = first.len();
    let mut pieces = Vec::with_capacity(2 * (1 + rx.len()).min(MAX_PIECES / 2));
    pieces.extend([first.head, first.tail]);
    while total < limit && pieces.len() + 2 <= MAX_PIECES {
        match rx.try_recv() {
            Ok(more) => {
                total += more.len();
                pieces.extend([more.head, more.tail]);
            }
            Err(_) => break,
        }
    }
    write_all_pieces(writer, pieces).await
}

/// Writes every piece in order. A write may take part of a piece: the rest goes next.
async fn write_all_pieces<W: AsyncWrite + Unpin>(writer: &mut W, pieces: Vec<Bytes>) -> io::Result<()> {
    let mut pieces = VecDeque::from(pieces);
    pieces.retain(|p| !p.is_empty());
    while !pieces.is_empty() {
        let written = {
            let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
            writer.write_vectored(&slices).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        consume(&mut pieces, written);
    }
    Ok(())
}

/// Removes the first `n` bytes of `pieces` (what a vectored write took): pieces written whole
/// go, a piece written in part keeps its rest at the front.
pub fn consume(pieces: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let front = pieces.front_mut().expect("consumed past the pieces");
        if front.len() <= n {
            n -= front.len();
            pieces.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A socket that takes at most `per_write` bytes a call and counts the calls.
    struct Narrow {
        got: Vec<u8>,
        per_write: usize,
        calls: usize,
    }

    impl Narrow {
        fn take(&mut self, bufs: &[IoSlice<'_>]) -> usize {
            self.calls += 1;
            let mut room = self.per_write;
            for b in bufs {
                let n = b.len().min(room);
                self.got.extend_from_slice(&b[..n]);
                room -= n;
            }
            self.per_write - room
        }
    }

    impl AsyncWrite for Narrow {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(self.get_mut().take(&[IoSlice::new(buf)])))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(self.get_mut().take(bufs)))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn item(head: &str, tail: &str) -> Outgoing {
        Outgoing { head: Bytes::copy_from_slice(head.as_bytes()), tail: Bytes::copy_from_slice(tail.as_bytes()) }
    }

    #[tokio::test]
    async fn queued_items_go_out_in_order_and_whole_however_the_socket_splits_them() {
        for per_write in [1, 3, 7, 1000] {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            for o in [item("bb", ""), item("", ""), item("cc", "ddd"), item("", "e")] {
                tx.send(o).await.unwrap();
            }
            let mut w = Narrow { got: Vec::new(), per_write, calls: 0 };
            write_queued(&mut w, item("a", "aa"), &mut rx, 1 << 20).await.unwrap();
            assert_eq!(String::from_utf8(w.got).unwrap(), "aaabbccddde", "per_write {per_write}");
            assert_eq!(w.calls, 11_usize.div_ceil(per_write), "every call took what it could");
            assert!(rx.try_recv().is_err(), "all of the queue went");
        }
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_limit_and_leaves_the_rest_queued() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        for k in 0..5u8 {
            tx.send(Outgoing::from(Bytes::from(vec![k; 10]))).await.unwrap();
        }
        let mut w = Narrow { got: Vec::new(), per_write: 1 << 20, calls: 0 };
        write_queued(&mut w, Outgoing::from(Bytes::from(vec![9u8; 10])), &mut rx, 25).await.unwrap();
        // 10 (first) + 10 + 10 reaches 25: two queued items went with it.
        assert_eq!(w.got.len(), 30);
        assert_eq!(w.calls, 1, "one write for the batch");
        assert_eq!(rx.try_recv().unwrap().head[0], 2, "the next item is still queued");
    }

    #[tokio::test]
    async fn a_socket_that_takes_nothing_is_an_error() {
        let (_tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut w = Narrow { got: Vec::new(), per_write: 0, calls: 0 };
        let e = write_queued(&mut w, item("x", ""), &mut rx, 100).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    }
}
