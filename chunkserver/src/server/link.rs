//! The sending side of one connection, written by the core thread itself when it can.
//!
//! The core used to hand every batch to the connection's tokio task, which (with the tasks on
//! threads of their own) cost a wake-up of a network thread (a futex or eventfd write, a
//! context switch, on a VM an inter-processor interrupt) per batch per round. Now the core
//! writes the batch with a non-blocking `send` and the task is woken only when the socket is
//! full: the part not taken waits in a backlog that the task drains as the socket drains.
//! `send` is safe from any thread (the unit tests call it from a plain one).
//!
//! Contract (order): bytes leave in the order [`LinkWriter::send`] was called. The core writes
//! directly only while the backlog is empty and the task is not in the middle of writing; the
//! task takes batches from the front. A batch written in part is always finished (a frame
//! cut in half would corrupt the stream); only whole batches are ever dropped: when there is no
//! connection, or when the backlog is over its bound (the peer is not reading, and the
//! protocol tolerates message loss; a frontend retries).
//!
//! A new connection starts with an empty backlog: bytes meant for the old stream are stale,
//! and a tail of a cut batch would be garbage on the new one.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::net::WriteHalf;
use crate::outgoing::{consume, MAX_PIECES};

/// Taken from the backlog for one write by the task, at most (or [`MAX_PIECES`] pieces).
const DRAIN_WRITE_BYTES: usize = 1 << 20;

/// Why a batch was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// No connection right now.
    NotConnected,
    /// The backlog is over its bound.
    Full,
}

pub struct LinkWriter {
    state: Mutex<State>,
    /// Wakes the draining task: bytes were queued, or the connection changed.
    wake: Notify,
    /// Bound of the backlog in bytes (a batch cut in half is finished regardless).
    max_backlog_bytes: usize,
}

struct State {
    writer: Option<Arc<WriteHalf>>,
    /// Bumped on every connection change, so a task of an old connection stops.
    epoch: u64,
    /// Pieces of batches, in stream order, none empty.
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
    /// The task holds pieces taken from the backlog and not yet written.
    draining: bool,
}

impl LinkWriter {
    pub fn new(max_backlog_bytes: usize) -> Arc<LinkWriter> {
        Arc::new(LinkWriter {
            state: Mutex::new(State {
                writer: None,
                epoch: 0,
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                draining: false,
            }),
            wake: Notify::new(),
            max_backlog_bytes,
        })
    }

    /// Sends `batch` (whole frames, as pieces in stream order: see [`crate::pieces`]): at once
    /// if the socket takes it, else (the rest) through the backlog. Called by the core thread;
    /// never blocks on the network.
    pub fn send(&self, batch: Vec<Bytes>) -> Result<(), Dropped> {
        let mut st = self.state.lock().unwrap();
        let Some(writer) = st.writer.clone() else { return Err(Dropped::NotConnected) };
        let mut rest = VecDeque::from(batch);
        rest.retain(|p| !p.is_empty());
        let mut cut = false;
        if st.backlog.is_empty() && !st.draining {
            match write_some(&writer, &mut rest) {
                Ok(_) if rest.is_empty() => return Ok(()),
                Ok(n) => cut = n > 0,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // A broken connection: its reader sees the error and the link reconnects.
                Err(_) => return Err(Dropped::NotConnected),
            }
        }
        let rest_bytes: usize = rest.iter().map(Bytes::len).sum();
        if !cut && st.backlog_bytes + rest_bytes > self.max_backlog_bytes {
            return Err(Dropped::Full);
        }
        st.backlog_bytes += rest_bytes;
        st.backlog.extend(rest);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Bytes waiting in the backlog.
    pub fn backlog_bytes(&self) -> usize {
        self.state.lock().unwrap().backlog_bytes
    }

    /// Makes `writer` the connection (or none): what was queued for the old one is discarded.
    /// Returns the epoch to pass to [`LinkWriter::drain`].
    pub fn connect(&self, writer: Option<WriteHalf>) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.writer = writer.map(Arc::new);
        st.epoch += 1;
        st.backlog.clear();
        st.backlog_bytes = 0;
        st.draining = false;
        let epoch = st.epoch;
        drop(st);
        // Any task of the old connection wakes and sees the epoch moved.
        self.wake.notify_waiters();
        epoch
    }

    /// Writes the backlog of connection `epoch` as the socket drains, until the connection
    /// fails (returns) or is replaced (returns). Run by the connection's task.
    pub async fn drain(&self, epoch: u64) {
        loop {
            let notified = self.wake.notified();
            let Some((writer, mut pieces)) = self.take(epoch) else { return };
            if pieces.is_empty() {
                notified.await;
                continue;
            }
            while !pieces.is_empty() {
                if writer.writable().await.is_err() {
                    return;
                }
                match write_some(&writer, &mut pieces) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
                if self.state.lock().unwrap().epoch != epoch {
                    return;
                }
            }
        }
    }

    /// The task's next write: pieces from the backlog's front, without copying them together
    /// (empty: nothing queued, and the core may write directly again). `None`: connection
    /// `epoch` is over.
    fn take(&self, epoch: u64) -> Option<(Arc<WriteHalf>, VecDeque<Bytes>)> {
        let mut st = self.state.lock().unwrap();
        if st.epoch != epoch {
            return None;
        }
        let writer = st.writer.clone()?;
        let mut pieces = VecDeque::new();
        let mut taken = 0;
        while taken < DRAIN_WRITE_BYTES && pieces.len() < MAX_PIECES {
            let Some(piece) = st.backlog.pop_front() else { break };
            taken += piece.len();
            pieces.push_back(piece);
        }
        st.backlog_bytes -= taken;
        st.draining = !pieces.is_empty();
        Some((writer, pieces))
    }
}

/// Writes from the front of `pieces` what the socket takes without waiting, and removes it
/// (a piece written in part keeps its rest). Returns the bytes written; `WouldBlock` if none.
fn write_some(writer: &WriteHalf, pieces: &mut VecDeque<Bytes>) -> std::io::Result<usize> {
    let mut written = 0;
    while !pieces.is_empty() {
        let slices: Vec<IoSlice<'_>> = pieces.iter().take(MAX_PIECES).map(|p| IoSlice::new(p)).collect();
        let offered: usize = slices.iter().map(|s| s.len()).sum();
        let n = match writer.try_write_vectored(&slices) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock && written > 0 => return Ok(written),
            Err(e) => return Err(e),
        };
        written += n;
        consume(pieces, n);
        if n < offered {
            // The socket is full: another call now would only find it so.
            break;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{ServerAddr, StdListener, Stream};
    use tokio::io::AsyncReadExt;

    /// A connected pair over TCP (`unix`: false) or a unix socket.
    async fn pair(unix: bool) -> (Stream, Stream, Option<tempfile::TempDir>) {
        let (addr, dir) = if unix {
            let dir = tempfile::tempdir().unwrap();
            (ServerAddr::UnixPath(dir.path().join("s")), Some(dir))
        } else {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            (ServerAddr::Tcp(port), None)
        };
        let listener = StdListener::bind(&addr).unwrap().into_tokio().unwrap();
        let client = Stream::connect(&addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server, dir)
    }

    /// Everything sent arrives once and in order, whether written at once or through the
    /// backlog (a reader that starts late fills the socket first), in batches of one piece to
    /// more than a write takes; a new connection starts empty; sends without a connection are
    /// dropped. Over TCP and over a unix socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_arrive_in_order_through_a_full_socket() {
        for unix in [false, true] {
            in_order_through_a_full_socket(unix).await;
        }
    }

    async fn in_order_through_a_full_socket(unix: bool) {
        let link = LinkWriter::new(64 << 20);
        assert_eq!(link.send(vec![Bytes::from_static(b"x")]), Err(Dropped::NotConnected));
        let (client, server, _dir) = pair(unix).await;
        let (mut server, _w) = server.into_split();
        let (_r, w) = client.into_split();
        let epoch = link.connect(Some(w));
        let drainer = tokio::spawn({
            let link = link.clone();
            async move { link.drain(epoch).await }
        });
        // 32 MiB in batches of varied sizes, each byte its position mod 251: far more than
        // the socket buffers hold while nobody reads.
        let total = 32usize << 20;
        let sender = std::thread::spawn({
            let link = link.clone();
            move || {
                let mut at = 0usize;
                let mut size = 1usize;
                let mut backlogged = false;
                while at < total {
                    let n = size.min(total - at);
                    let batch = Bytes::from((at..at + n).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
                    // Cut into 1 to 300 pieces (more than one write takes), an empty one
                    // among them.
                    let count = 1 + size % 300;
                    let step = n.div_ceil(count);
                    let mut pieces: Vec<Bytes> =
                        (0..n).step_by(step).map(|i| batch.slice(i..(i + step).min(n))).collect();
                    pieces.insert(pieces.len() / 2, Bytes::new());
                    link.send(pieces).unwrap();
                    backlogged |= link.backlog_bytes() > 0;
                    at += n;
                    size = size * 7 % 100_003 + 1;
                }
                backlogged
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut got = vec![0u8; total];
        // Lost bytes would leave the reader waiting forever: fail instead (a liveness bound,
        // minutes above the ~0.1 s this takes).
        tokio::time::timeout(std::time::Duration::from_secs(120), server.read_exact(&mut got))
            .await
            .unwrap_or_else(|_| panic!("bytes lost on the way (unix: {unix})"))
            .unwrap();
        assert!(sender.join().unwrap(), "the socket never filled: the backlog path was not taken (unix: {unix})");
        for (i, b) in got.iter().enumerate() {
            assert_eq!(*b, (i % 251) as u8, "byte {i} out of order (unix: {unix})");
        }
        // A new connection: the old task stops; nothing stale reaches the new stream.
        link.connect(None);
        drainer.await.unwrap();
        assert_eq!(link.send(vec![Bytes::from_static(b"y")]), Err(Dropped::NotConnected));
        assert_eq!(link.backlog_bytes(), 0);
    }

    /// A full backlog drops whole batches and says so.
    #[tokio::test]
    async fn a_full_backlog_drops_whole_batches() {
        let (client, _server, _dir) = pair(false).await;
        let (_r, w) = client.into_split();
        let link = LinkWriter::new(1 << 20);
        link.connect(Some(w));
        let batch = Bytes::from(vec![7u8; 256 << 10]);
        let mut dropped = 0;
        for _ in 0..256 {
            if link.send(vec![batch.clone()]) == Err(Dropped::Full) {
                dropped += 1;
            }
        }
        assert!(dropped > 0, "64 MiB never filled a 1 MiB backlog");
        assert!(link.backlog_bytes() <= (1 << 20) + (256 << 10));
    }
}
