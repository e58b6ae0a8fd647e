//! Peer and frontend connections (tokio, epoll), on the core's thread.
//!
//! Between two servers there is one connection (TCP, or a unix socket on one host: see
//! [`crate::net`]), shared by all groups and used in both directions: the server with the
//! lower id dials, the other accepts. Each side writes the batches the core could not write at
//! once (see [`super::link`]) and forwards every frame it reads to the core. A broken
//! connection is redialled with exponential backoff (50 ms to 1 s); frames in flight on it are
//! lost, which the protocol tolerates. Frontends connect to any server and say so in their
//! hello.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parallelraft::ReplicaId;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::link::LinkWriter;
use super::outbox::{ConnId, FRONTEND_BACKLOG_BYTES};
use crate::net::{Listener, ReadHalf, ServerAddr, Stream, WriteHalf};
use crate::poll::Activity;
use crate::recv::SharedReader;
use crate::wire::{encode, read_frame, read_frame_shared, Body, Frame, Role};

/// A connection, split: what `peer_link` runs a link on.
pub type Halves = (ReadHalf, WriteHalf);

/// What the connection tasks hand to the core thread.
pub enum Inbound {
    /// `at`: when the frame was read off the socket (for the `queue` stage).
    Frame {
        conn: ConnId,
        frame: Frame,
        at: Instant,
    },
    /// A frame from a peer the benchmark jitter holds back until `due` (see [`super::delay`]).
    Held {
        conn: ConnId,
        frame: Frame,
        due: Instant,
    },
    FrontendConnected {
        conn: ConnId,
        link: Arc<LinkWriter>,
    },
    FrontendGone {
        conn: ConnId,
    },
    /// A group commit finished on the WAL thread.
    WalDone(super::disk::WalDone),
    /// A checkpoint finished on the checkpoint thread.
    CheckpointDone(super::disk::CheckpointDone),
    Shutdown,
}

/// How long a new connection may take to say hello.
const HELLO_LIMIT: Duration = Duration::from_secs(10);

/// The sending side of the core's inbox: a bounded queue, and a wake-up for the core, which
/// waits for it on the same thread as the connection tasks (see [`super`]). Every item
/// queued is work for the server's pollers (see [`crate::poll`]).
#[derive(Clone)]
pub struct InboxTx {
    tx: SyncSender<Inbound>,
    ready: Arc<Notify>,
    activity: Arc<Activity>,
}

impl InboxTx {
    pub fn new(tx: SyncSender<Inbound>, ready: Arc<Notify>, activity: Arc<Activity>) -> InboxTx {
        InboxTx { tx, ready, activity }
    }

    /// As `SyncSender::try_send`: a full inbox hands the item back, to try again.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, item: Inbound) -> Result<(), TrySendError<Inbound>> {
        self.tx.try_send(item)?;
        self.activity.touch();
        self.ready.notify_one();
        Ok(())
    }

    /// Waits while the inbox is full: for the disk threads, never on the core's thread.
    /// False when the core is gone.
    pub fn send_blocking(&self, item: Inbound) -> bool {
        if self.tx.send(item).is_err() {
            return false;
        }
        self.activity.touch();
        self.ready.notify_one();
        true
    }
}

#[derive(Clone)]
pub struct Shared {
    pub cluster_id: u64,
    pub me: ReplicaId,
    pub inbox: InboxTx,
    pub next_conn: Arc<AtomicU64>,
    /// Benchmark option: frames from peers are held back at random (see [`Jitter`]). Off in
    /// production.
    pub jitter: Jitter,
}

/// Benchmark option: how long each frame from a peer is held before the core sees it, so frames
/// overtake each other (the reordering the paper's Figure 7 measures). Two shapes, which add:
/// - uniform: every frame waits a random `0..=uniform_us`;
/// - stragglers: one frame in `1000 / straggler_per_mille` waits `straggler_us` more (a TCP
///   retransmission, a descheduled sender: the rare long delay real networks have, and the one
///   in-order protocols stall behind).
///
/// The core holds them in its delay line (see [`super::delay`]) and steps each within a round
/// of its due time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Jitter {
    pub uniform_us: u64,
    pub straggler_us: u64,
    pub straggler_per_mille: u32,
}

impl Jitter {
    /// From the command-line values (`--jitter-us`, `--straggler-us`, `--straggler-per-mille`).
    pub fn new(uniform_us: u64, straggler_us: u64, straggler_per_mille: u32) -> Result<Jitter, String> {
        if straggler_per_mille > 1000 {
            return Err("--straggler-per-mille must be at most 1000".into());
        }
        Ok(Jitter { uniform_us, straggler_us, straggler_per_mille })
    }

    /// The `serve` / `local` flags that give a server this jitter.
    pub fn args(&self) -> [String; 6] {
        [
            "--jitter-us".into(),
            self.uniform_us.to_string(),
            "--straggler-us".into(),
            self.straggler_us.to_string(),
            "--straggler-per-mille".into(),
            self.straggler_per_mille.to_string(),
        ]
    }

    pub fn is_off(&self) -> bool {
        self.uniform_us == 0 && (self.straggler_us == 0 || self.straggler_per_mille == 0)
    }

    /// The hold of the next frame (zero for most frames when only stragglers are set).
    pub fn delay(&self, rng: &mut parallelraft::rng::Rng) -> Duration {
        let mut us = if self.uniform_us > 0 { rng.range(0, self.uniform_us + 1) } else { 0 };
        if self.straggler_per_mille > 0 && rng.range(0, 1000) < u64::from(self.straggler_per_mille) {
            us += self.straggler_us;
        }
        Duration::from_micros(us)
    }
}

impl Shared {
    /// Queues for the core thread, waiting (asynchronously) while its inbox is full: that is
    /// the backpressure that slows a fast sender down to the core's pace.
    pub async fn deliver(&self, mut item: Inbound) -> bool {
        loop {
            match self.inbox.try_send(item) {
                Ok(()) => return true,
                Err(TrySendError::Full(back)) => {
                    item = back;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
    }

    fn hello(&self) -> Bytes {
        let mut out = bytes::BytesMut::new();
        let frame =
            Frame { cluster_id: self.cluster_id, sender: self.me.0, group: 0, body: Body::Hello { role: Role::Peer } };
        encode(&frame, &mut out);
        out.freeze()
    }
}

/// Reads frames from a peer connection into the core thread until it fails.
async fn read_peer(shared: Shared, conn: ConnId, peer: ReplicaId, reader: ReadHalf) {
    // One recv takes every frame that has arrived (unbuffered, each frame cost two: its header
    // and its body). The hello was read unbuffered, since a peer's stream is handed on after it.
    let mut reader = SharedReader::new(reader);
    let mut rng = parallelraft::rng::Rng::new(crate::process_entropy(conn));
    let jitter = shared.jitter;
    loop {
        match read_frame_shared(&mut reader).await {
            Ok(Some(frame)) => {
                if frame.cluster_id != shared.cluster_id || frame.sender != peer.0 {
                    warn!(peer = peer.0, "frame from a foreign cluster or sender; dropping the connection");
                    return;
                }
                let delay = if jitter.is_off() { Duration::ZERO } else { jitter.delay(&mut rng) };
                let at = Instant::now();
                let item = if delay.is_zero() {
                    Inbound::Frame { conn, frame, at }
                } else {
                    Inbound::Held { conn, frame, due: at + delay }
                };
                if !shared.deliver(item).await {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                warn!(peer = peer.0, "peer connection: {e}");
                return;
            }
        }
    }
}

/// One peer link: keeps a connection to `peer` up, makes it the one `link` writes to, and
/// drains what the core could not write at once. `dial`: this side connects (lower id);
/// otherwise it waits for accepted connections (their hello read) on `streams`. Without a
/// connection, what the core sends is dropped (it would be stale by the time one is up).
pub async fn peer_link(
    shared: Shared,
    peer: ReplicaId,
    addr: ServerAddr,
    dial: bool,
    link: Arc<LinkWriter>,
    mut streams: mpsc::Receiver<Halves>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut connected_once = false;
    let mut next_stream: Option<Halves> = None;
    loop {
        let (reader, writer) = if let Some(halves) = next_stream.take() {
            halves
        } else if dial {
            match Stream::connect(&addr).await {
                Ok(s) => {
                    let (reader, mut writer) = s.into_split();
                    if writer.write_all(&shared.hello()).await.is_err() {
                        continue;
                    }
                    (reader, writer)
                }
                Err(e) => {
                    if connected_once {
                        debug!(peer = peer.0, "connect failed: {e}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        } else {
            match streams.recv().await {
                Some(s) => s,
                None => return,
            }
        };
        backoff = Duration::from_millis(50);
        if !connected_once {
            info!(peer = peer.0, "peer connected");
        }
        connected_once = true;
        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let epoch = link.connect(Some(writer));
        let mut reader_task = tokio::spawn(read_peer(shared.clone(), conn, peer, reader));
        // Until the reader fails (the connection is gone) or, on the accepting side, a newer
        // stream replaces this one.
        let keep_going = tokio::select! {
            _ = link.drain(epoch) => true,
            _ = &mut reader_task => true,
            s = streams.recv(), if !dial => {
                let more = s.is_some();
                next_stream = s;
                more
            }
        };
        reader_task.abort();
        link.connect(None);
        if !keep_going {
            return;
        }
    }
}

/// Accepts connections: peers are handed to their link, frontends get their own tasks.
/// Where accepted connections of peers that dial us go (peers with a lower id); servers added
/// while running are added to it.
pub type AcceptFrom = Arc<std::sync::Mutex<Vec<(ReplicaId, mpsc::Sender<Halves>)>>>;

pub async fn accept_loop(shared: Shared, listener: Listener, peer_streams: AcceptFrom) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let peer_streams = peer_streams.clone();
        tokio::spawn(async move {
            let (mut reader, writer) = stream.into_split();
            let hello = match tokio::time::timeout(HELLO_LIMIT, read_frame(&mut reader)).await {
                Ok(Ok(Some(f))) => f,
                _ => {
                    debug!(%from, "connection closed before a valid hello");
                    return;
                }
            };
            if hello.cluster_id != shared.cluster_id {
                warn!(%from, cluster = hello.cluster_id, "hello from another cluster; closing");
                return;
            }
            match hello.body {
                Body::Hello { role: Role::Peer } => {
                    let peer = ReplicaId(hello.sender);
                    let found = peer_streams.lock().unwrap().iter().find(|(p, _)| *p == peer).map(|(_, tx)| tx.clone());
                    let Some(tx) = found else {
                        warn!(%from, peer = peer.0, "hello from an unknown or lower-id peer; closing");
                        return;
                    };
                    let _ = tx.send((reader, writer)).await;
                }
                Body::Hello { role: Role::Frontend } => frontend(shared, reader, writer).await,
                _ => warn!(%from, "first frame is not a hello; closing"),
            }
        });
    }
}

async fn frontend(shared: Shared, reader: ReadHalf, writer: WriteHalf) {
    let mut reader = SharedReader::new(reader);
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let link = LinkWriter::new(FRONTEND_BACKLOG_BYTES);
    let epoch = link.connect(Some(writer));
    if !shared.deliver(Inbound::FrontendConnected { conn, link: link.clone() }).await {
        return;
    }
    let writer_task = tokio::spawn({
        let link = link.clone();
        async move { link.drain(epoch).await }
    });
    loop {
        match read_frame_shared(&mut reader).await {
            Ok(Some(frame)) if frame.cluster_id == shared.cluster_id => {
                if !matches!(frame.body, Body::Request { .. }) {
                    warn!("frontend sent a non-request frame; closing");
                    break;
                }
                if !shared.deliver(Inbound::Frame { conn, frame, at: Instant::now() }).await {
                    break;
                }
            }
            Ok(Some(_)) => break,
            Ok(None) => break,
            Err(e) => {
                debug!("frontend connection: {e}");
                break;
            }
        }
    }
    writer_task.abort();
    link.connect(None);
    shared.deliver(Inbound::FrontendGone { conn }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_shapes_add_and_stragglers_come_at_their_rate() {
        let mut rng = parallelraft::rng::Rng::new(7);
        assert!(Jitter::default().is_off());
        assert!(Jitter { straggler_us: 500, ..Jitter::default() }.is_off(), "a rate of zero is off");
        let stragglers = Jitter { uniform_us: 0, straggler_us: 20_000, straggler_per_mille: 20 };
        let held = (0..20_000).filter(|_| !stragglers.delay(&mut rng).is_zero()).count();
        assert!((300..=500).contains(&held), "2% of 20,000 frames held, got {held}");
        for _ in 0..100 {
            let d = stragglers.delay(&mut rng);
            assert!(d.is_zero() || d == Duration::from_millis(20), "{d:?}");
        }
        let both = Jitter { uniform_us: 1000, straggler_us: 20_000, straggler_per_mille: 1000 };
        for _ in 0..100 {
            let d = both.delay(&mut rng);
            assert!(d >= Duration::from_millis(20) && d <= Duration::from_millis(21), "{d:?}");
        }
    }
}
