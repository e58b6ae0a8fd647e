//! The frontend's client of the chunk servers.
//!
//! A volume request is split at chunk boundaries and into pieces of at most [`MAX_PIECE`]
//! bytes; each piece is one request to its chunk's group, sent to the server believed to lead
//! it. Redirects (`NotLeader`), `Busy`, a lost connection or a timeout make the piece try again
//! (the hinted leader, else the next replica) under the **same request identity**, so a retry
//! can never apply twice (the group's client table answers it), and the caller sees no error
//! from a leader change or a single failed server. Only a volume that stays without a serving
//! majority for [`STALL_LIMIT`] returns an error (EIO at the NBD edge).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parallelraft::{ClientId, MembershipChange, MembershipError, ReplicaId, RequestId};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::config::Cluster;
use crate::metrics::{Published, Stage, Stages, Totals};
use crate::net::{ServerAddr, Stream};
use crate::outgoing::{write_queued, Outgoing};
use crate::poll::Activity;
use crate::wire::{encode, encode_outgoing, read_frame, Body, Frame, Outcome, RequestOp, Role};

/// Largest single request to a group: bounds entry and message sizes.
pub const MAX_PIECE: u64 = 1 << 20;
/// How long one attempt waits for an answer before trying another server: between
/// `ATTEMPT_TICKS - 1` and `ATTEMPT_TICKS` ticks of [`SWEEP_EVERY`] (1.4-1.5 s).
const ATTEMPT_TICKS: u64 = 15;
/// How often the sweeper fails the attempts that waited too long. One sweeper for all, not a
/// timer per attempt: the timer's registration and the clock reads were ~4% of the frontend's
/// CPU at 4 KiB reads, iodepth 32.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// How long a piece keeps retrying without a serving majority before it fails.
pub const STALL_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeError {
    /// No serving majority within the stall limit.
    Unavailable(String),
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeError::Unavailable(why) => write!(f, "volume unavailable: {why}"),
        }
    }
}

/// An operation on the volume (byte offsets within the volume).
#[derive(Clone, Debug)]
pub enum VolumeOp {
    Read { offset: u64, len_bytes: u64 },
    Write { offset: u64, data: Bytes },
    Trim { offset: u64, len_bytes: u64 },
    WriteZeroes { offset: u64, len_bytes: u64 },
}

/// The attempts waiting for an answer on one connection, by sequence number.
type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

/// An attempt waiting for its answer.
struct Waiter {
    tx: oneshot::Sender<Outcome>,
    /// The sweeper's tick when it was sent (see [`ATTEMPT_TICKS`]).
    sent_at: u64,
}

struct ServerLink {
    tx: mpsc::Sender<Outgoing>,
    pending: Pending,
    up: Arc<AtomicBool>,
}

struct Inner {
    cluster: Cluster,
    client: ClientId,
    next_seq: AtomicU64,
    /// Sequence numbers not yet answered: the floor is the lowest.
    outstanding: Mutex<BTreeSet<u64>>,
    leaders: Mutex<Vec<Option<ReplicaId>>>,
    /// One per server; servers added to the cluster file while running are added here.
    links: RwLock<HashMap<ReplicaId, Arc<ServerLink>>>,
    pub retries: AtomicU64,
    /// Stage latencies of the frontend (`route`, and the NBD edge's `nbd_*`).
    stages: Mutex<Stages>,
    /// Work of this frontend (requests read, answers from servers), for its poller.
    activity: Arc<Activity>,
    /// Ticks of the attempt sweeper so far (see [`SWEEP_EVERY`]).
    ticks: AtomicU64,
}

#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

/// A client identity unique to this frontend process, so its sequence numbers never collide
/// with an earlier incarnation's in the groups' client tables.
fn fresh_client_id() -> ClientId {
    ClientId(crate::process_entropy(0) | 1)
}

impl Volume {
    /// Connects (lazily, in the background) to every server of the cluster. Call inside a
    /// tokio runtime.
    pub fn new(cluster: Cluster) -> Volume {
        let chunks = cluster.chunk_count() as usize;
        let servers = cluster.servers.clone();
        let volume = Volume {
            inner: Arc::new(Inner {
                client: fresh_client_id(),
                next_seq: AtomicU64::new(1),
                outstanding: Mutex::new(BTreeSet::new()),
                leaders: Mutex::new(vec![None; chunks]),
                links: RwLock::new(HashMap::new()),
                retries: AtomicU64::new(0),
                stages: Mutex::new(Stages::default()),
                activity: Activity::new(),
                ticks: AtomicU64::new(0),
                cluster,
            }),
        };
        tokio::spawn(sweep_attempts(Arc::downgrade(&volume.inner)));
        for (id, addr) in servers {
            volume.add_server(id, addr);
        }
        volume
    }

    /// Marks work for the frontend's poller (the NBD edge calls it for each request).
    pub fn touch(&self) {
        self.inner.activity.touch();
    }

    /// Keeps the frontend's runtime polling within `window` after its last work (see
    /// [`crate::poll`]; build the runtime with [`crate::poll::current_thread_runtime`]). Call
    /// inside that runtime, once.
    pub fn poll(&self, window: Duration) {
        crate::poll::spawn_runtime_poller(self.inner.activity.clone(), window);
    }

    /// Starts talking to a server (one added to the cluster file while running). Call inside a
    /// tokio runtime.
    pub fn add_server(&self, id: ReplicaId, addr: ServerAddr) {
        let mut links = self.inner.links.write().unwrap();
        if links.contains_key(&id) {
            return;
        }
        let (tx, rx) = mpsc::channel(1024);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let up = Arc::new(AtomicBool::new(false));
        let activity = self.inner.activity.clone();
        tokio::spawn(link_task(self.inner.cluster.cluster_id, id, addr, rx, pending.clone(), up.clone(), activity));
        links.insert(id, Arc::new(ServerLink { tx, pending, up }));
    }

    /// Follows the cluster file at `path` for added servers (see `ClusterWatch`). Call inside a
    /// tokio runtime.
    pub fn watch(&self, path: &std::path::Path) {
        let mut watch = crate::config::ClusterWatch::new(path);
        let volume = self.clone();
        let mut known = self.inner.cluster.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match watch.poll(&known) {
                    Ok(added) => {
                        for (id, addr) in &added {
                            tracing::info!(server = id.0, %addr, "server added to the cluster file");
                            volume.add_server(*id, addr.clone());
                        }
                        known.add_servers(&added);
                    }
                    Err(e) => warn!("{e}"),
                }
            }
        });
    }

    /// Every server to ask about `chunk`: its bootstrap placement first, then the others.
    fn search_order(&self, chunk: u32) -> Vec<ReplicaId> {
        let mut order = self.inner.cluster.replicas_of(chunk);
        let mut others: Vec<ReplicaId> =
            self.inner.links.read().unwrap().keys().copied().filter(|id| !order.contains(id)).collect();
        others.sort();
        order.extend(others);
        order
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.cluster.size_bytes
    }

    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// Retries (redirects, timeouts, busy answers) so far: a measure of failover work.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Executes `op` (which the caller validated against the volume size); returns the data
    /// of a read.
    pub async fn execute(&self, op: VolumeOp) -> Result<Option<Bytes>, VolumeError> {
        let chunk_bytes = self.inner.cluster.chunk_bytes;
        let (offset, len) = match &op {
            VolumeOp::Read { offset, len_bytes }
            | VolumeOp::Trim { offset, len_bytes }
            | VolumeOp::WriteZeroes { offset, len_bytes } => (*offset, *len_bytes),
            VolumeOp::Write { offset, data } => (*offset, data.len() as u64),
        };
        // Pieces: (chunk, offset in chunk, offset in request, length).
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < len {
            let abs = offset + at;
            let chunk = (abs / chunk_bytes) as u32;
            let in_chunk = abs % chunk_bytes;
            let piece_max = match op {
                VolumeOp::Read { .. } | VolumeOp::Write { .. } => MAX_PIECE,
                // Trims and zeroes carry no payload: one piece per chunk.
                _ => u64::MAX,
            };
            let n = (len - at).min(chunk_bytes - in_chunk).min(piece_max);
            pieces.push((chunk, in_chunk, at, n));
            at += n;
        }
        let single = pieces.len() == 1;
        let mut set = tokio::task::JoinSet::new();
        for (k, (chunk, in_chunk, at, n)) in pieces.into_iter().enumerate() {
            let request = match &op {
                VolumeOp::Read { .. } => RequestOp::Read { offset: in_chunk, len_bytes: n },
                VolumeOp::Write { data, .. } => {
                    RequestOp::Write { offset: in_chunk, data: data.slice(at as usize..(at + n) as usize) }
                }
                VolumeOp::Trim { .. } => RequestOp::Trim { offset: in_chunk, len_bytes: n },
                VolumeOp::WriteZeroes { .. } => RequestOp::WriteZeroes { offset: in_chunk, len_bytes: n },
            };
            if single {
                return self.piece(chunk, request).await;
            }
            let me = self.clone();
            set.spawn(async move { (k, at, me.piece(chunk, request).await) });
        }
        let mut read: Option<BytesMut> = matches!(op, VolumeOp::Read { .. }).then(|| BytesMut::zeroed(len as usize));
        while let Some(joined) = set.join_next().await {
            let (_, at, result) = joined.map_err(|e| VolumeError::Unavailable(format!("task failed: {e}")))?;
            if let (Some(buf), Some(data)) = (read.as_mut(), result?) {
                buf[at as usize..at as usize + data.len()].copy_from_slice(&data);
            }
        }
        Ok(read.map(BytesMut::freeze))
    }

    /// One request to one chunk's group, retried until a leader executes it.
    async fn piece(&self, chunk: u32, op: RequestOp) -> Result<Option<Bytes>, VolumeError> {
        let start = Instant::now();
        let result = self.routed(chunk, op).await;
        self.record(Stage::Route, start.elapsed());
        match result? {
            Outcome::Done => Ok(None),
            Outcome::Data(data) => Ok(Some(data)),
            other => unreachable!("routed() returned {other:?} for a data request"),
        }
    }

    /// A membership change of `chunk`'s group, executed by its leader: `Ok(Err(_))` when the
    /// leader refused it. Contract: one change at a time per `Volume` (a change's sequence
    /// number is its own floor in the group's client table).
    pub async fn change(
        &self,
        chunk: u32,
        change: MembershipChange,
    ) -> Result<Result<(), MembershipError>, VolumeError> {
        match self.routed(chunk, RequestOp::Change(change)).await? {
            Outcome::Done => Ok(Ok(())),
            Outcome::Refused(e) => Ok(Err(e)),
            other => unreachable!("routed() returned {other:?} for a membership change"),
        }
    }

    /// One request to one server, not retried (status, scrub, retire).
    pub async fn ask(&self, server: ReplicaId, chunk: u32, op: RequestOp) -> Outcome {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let id = RequestId { client: self.inner.client, seq };
        self.attempt(server, chunk, id, seq, op).await
    }

    /// Whether the connection to `server` is up.
    pub fn connected(&self, server: ReplicaId) -> bool {
        self.inner.links.read().unwrap().get(&server).is_some_and(|l| l.up.load(Ordering::Relaxed))
    }

    /// Sends `op` to `chunk`'s leader under one request identity until an answer that ends it.
    async fn routed(&self, chunk: u32, op: RequestOp) -> Result<Outcome, VolumeError> {
        let inner = &self.inner;
        let seq = inner.next_seq.fetch_add(1, Ordering::Relaxed);
        inner.outstanding.lock().unwrap().insert(seq);
        let result = self.routed_inner(chunk, seq, op).await;
        inner.outstanding.lock().unwrap().remove(&seq);
        result
    }

    /// Records a frontend stage latency.
    pub fn record(&self, stage: Stage, d: Duration) {
        self.inner.stages.lock().unwrap().record(stage, d);
    }

    /// The frontend's `/metrics` text.
    pub fn render_metrics(&self) -> String {
        let stages = self.inner.stages.lock().unwrap().clone();
        let totals = Totals {
            counters: vec![("frontend_retries", "Pieces sent again (redirect, busy, failure)", self.retries())],
            chunk_gauges: vec![],
            gauges: vec![],
        };
        crate::metrics::render(&stages, &totals)
    }

    /// Publishes [`Volume::render_metrics`] at `addr` (refreshed every 500 ms). Call inside a
    /// tokio runtime.
    pub fn serve_metrics(&self, addr: std::net::SocketAddr) {
        let published: Published = Arc::new(Mutex::new(String::new()));
        crate::metrics::spawn(addr, published.clone());
        let volume = self.clone();
        tokio::spawn(async move {
            loop {
                *published.lock().unwrap() = volume.render_metrics();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    async fn routed_inner(&self, chunk: u32, seq: u64, op: RequestOp) -> Result<Outcome, VolumeError> {
        let inner = &self.inner;
        let id = RequestId { client: inner.client, seq };
        let cached = inner.leaders.lock().unwrap()[chunk as usize];
        let mut target = cached.unwrap_or_else(|| {
            let placed = inner.cluster.replicas_of(chunk);
            placed[chunk as usize % placed.len()]
        });
        // The search order and the stall deadline are set at the first answer that does not
        // end the request: the common case (the leader answers the first attempt) needs
        // neither the order nor the clock. The order: the group's members are where it was
        // placed, unless membership changes moved it; then any server of the cluster may hold
        // it, and redirects lead to its leader.
        let mut search: Option<Vec<ReplicaId>> = None;
        let mut deadline: Option<Instant> = None;
        let mut redirects = 0u32;
        let expected_len = match &op {
            RequestOp::Read { len_bytes, .. } => Some(*len_bytes as usize),
            _ => None,
        };
        loop {
            let floor = *inner.outstanding.lock().unwrap().first().unwrap_or(&seq);
            let outcome = match self.attempt(target, chunk, id, floor, op.clone()).await {
                Outcome::Done if expected_len.is_none() => return Ok(self.served(chunk, target, Outcome::Done)),
                Outcome::Data(data) if expected_len == Some(data.len()) => {
                    return Ok(self.served(chunk, target, Outcome::Data(data)))
                }
                Outcome::Refused(e) if matches!(op, RequestOp::Change(_)) => {
                    return Ok(self.served(chunk, target, Outcome::Refused(e)))
                }
                other => other,
            };
            let replicas = search.get_or_insert_with(|| self.search_order(chunk));
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + STALL_LIMIT);
            let next_replica = |t: ReplicaId| {
                let i = replicas.iter().position(|r| *r == t).unwrap_or(0);
                replicas[(i + 1) % replicas.len()]
            };
            let pause = match outcome {
                Outcome::Done | Outcome::Data(_) | Outcome::Refused(_) | Outcome::Status(_) | Outcome::Scrub(_) => {
                    warn!(chunk, server = target.0, "answer does not match the request; trying again");
                    target = next_replica(target);
                    Duration::from_millis(10)
                }
                Outcome::Absent => {
                    // Not (or no longer) a member: ask the next server.
                    redirects = 0;
                    target = next_replica(target);
                    Duration::from_millis(2)
                }
                Outcome::NotLeader(Some(hint)) if hint != target && replicas.contains(&hint) && redirects < 3 => {
                    redirects += 1;
                    target = hint;
                    Duration::ZERO
                }
                Outcome::NotLeader(_) => {
                    // An election is probably under way.
                    redirects = 0;
                    target = next_replica(target);
                    Duration::from_millis(20)
                }
                Outcome::Busy => Duration::from_millis(2),
                Outcome::Failed(why) => {
                    debug!(chunk, server = target.0, "attempt failed: {why}");
                    redirects = 0;
                    target = next_replica(target);
                    Duration::from_millis(20)
                }
            };
            inner.retries.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= deadline {
                return Err(VolumeError::Unavailable(format!("chunk {chunk}: no serving leader for {STALL_LIMIT:?}")));
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// Notes `target` as `chunk`'s leader (it just executed a request) and returns `outcome`.
    fn served(&self, chunk: u32, target: ReplicaId, outcome: Outcome) -> Outcome {
        self.inner.leaders.lock().unwrap()[chunk as usize] = Some(target);
        outcome
    }

    async fn attempt(&self, server: ReplicaId, chunk: u32, id: RequestId, floor: u64, op: RequestOp) -> Outcome {
        let Some(link) = self.inner.links.read().unwrap().get(&server).cloned() else {
            return Outcome::Failed("unknown server".into());
        };
        if !link.up.load(Ordering::Relaxed) {
            return Outcome::Failed("not connected".into());
        }
        let (tx, rx) = oneshot::channel();
        let sent_at = self.inner.ticks.load(Ordering::Relaxed);
        link.pending.lock().unwrap().insert(id.seq, Waiter { tx, sent_at });
        let frame = Frame {
            cluster_id: self.inner.cluster.cluster_id,
            sender: 0,
            group: chunk,
            body: Body::Request { id, floor, op },
        };
        if link.tx.send(encode_outgoing(&frame)).await.is_err() {
            link.pending.lock().unwrap().remove(&id.seq);
            return Outcome::Failed("link closed".into());
        }
        // The reader answers it, the sweeper fails it when it waited too long, and a lost
        // connection drops it.
        rx.await.unwrap_or_else(|_| Outcome::Failed("connection lost".into()))
    }
}

/// Every [`SWEEP_EVERY`], fails the attempts that have waited [`ATTEMPT_TICKS`] ticks (a
/// server that neither answers nor drops the connection: stopped, or partitioned without a
/// reset). Ends with the volume.
async fn sweep_attempts(volume: std::sync::Weak<Inner>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(inner) = volume.upgrade() else { return };
        let now = inner.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let links: Vec<Arc<ServerLink>> = inner.links.read().unwrap().values().cloned().collect();
        for link in links {
            for waiter in expired(&mut link.pending.lock().unwrap(), now) {
                let _ = waiter.tx.send(Outcome::Failed("timed out".into()));
            }
        }
    }
}

/// Takes the waiters of `pending` sent [`ATTEMPT_TICKS`] or more ticks before `now`.
fn expired(pending: &mut HashMap<u64, Waiter>, now: u64) -> Vec<Waiter> {
    pending.extract_if(|_, w| now >= w.sent_at + ATTEMPT_TICKS).map(|(_, w)| w).collect()
}

/// Keeps one connection to a server: writes queued requests, routes answers to their
/// waiters, and fails every waiter at once when the connection drops (so a killed server
/// costs one round trip, not a timeout).
async fn link_task(
    cluster_id: u64,
    server: ReplicaId,
    addr: ServerAddr,
    mut rx: mpsc::Receiver<Outgoing>,
    pending: Pending,
    up: Arc<AtomicBool>,
    activity: Arc<Activity>,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        let stream = match Stream::connect(&addr).await {
            Ok(s) => s,
            Err(_) => {
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        let (reader, mut writer) = stream.into_split();
        let mut hello = BytesMut::new();
        encode(&Frame { cluster_id, sender: 0, group: 0, body: Body::Hello { role: Role::Frontend } }, &mut hello);
        if writer.write_all(&hello).await.is_err() {
            continue;
        }
        backoff = Duration::from_millis(20);
        up.store(true, Ordering::Relaxed);
        let reader_pending = pending.clone();
        let activity = activity.clone();
        let mut reader_task = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::with_capacity(crate::server::transport::READ_BUFFER_BYTES, reader);
            while let Ok(Some(frame)) = read_frame(&mut reader).await {
                activity.touch();
                if let Body::Response { id, outcome } = frame.body {
                    if let Some(waiter) = reader_pending.lock().unwrap().remove(&id.seq) {
                        let _ = waiter.tx.send(outcome);
                    }
                }
            }
        });
        loop {
            tokio::select! {
                batch = rx.recv() => {
                    let Some(first) = batch else { reader_task.abort(); return };
                    if write_queued(&mut writer, first, &mut rx, 1 << 20).await.is_err() {
                        break;
                    }
                }
                _ = &mut reader_task => break,
            }
        }
        reader_task.abort();
        up.store(false, Ordering::Relaxed);
        // Every request in flight on this connection fails now; its piece retries elsewhere.
        pending.lock().unwrap().clear();
        debug!(server = server.0, "connection to chunk server lost");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_expire_after_their_ticks_and_not_before() {
        let mut pending = HashMap::new();
        let mut answers = Vec::new();
        for (seq, sent_at) in [(1u64, 0u64), (2, 5), (3, 10)] {
            let (tx, rx) = oneshot::channel();
            pending.insert(seq, Waiter { tx, sent_at });
            answers.push(rx);
        }
        assert!(expired(&mut pending, ATTEMPT_TICKS - 1).is_empty(), "one tick early");
        let first = expired(&mut pending, ATTEMPT_TICKS);
        assert_eq!(first.iter().map(|w| w.sent_at).collect::<Vec<_>>(), [0]);
        assert_eq!(pending.len(), 2, "the others still wait");
        let mut rest: Vec<u64> = expired(&mut pending, ATTEMPT_TICKS + 10).iter().map(|w| w.sent_at).collect();
        rest.sort();
        assert_eq!(rest, [5, 10]);
        assert!(pending.is_empty());
    }
}
