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
use crate::wire::{encode, encode_outgoing, read_frame_shared, Body, Frame, Outcome, RequestOp, Role};

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
    answer: Answer,
    /// The sweeper's tick when it was sent (see [`ATTEMPT_TICKS`]).
    sent_at: u64,
}

/// Where an attempt's outcome goes.
enum Answer {
    /// To a task awaiting it (retries, membership changes, `ask`).
    Task(oneshot::Sender<Outcome>),
    /// To a function (a first attempt made by [`Volume::submit`]), called on the runtime's
    /// thread by whoever ends the attempt (see [`Volume::start_attempt`]).
    Call(Box<dyn FnOnce(Outcome) + Send>),
}

impl Waiter {
    /// Ends the attempt with `outcome`. Call without holding the pending map's lock: a
    /// function may start the next attempt.
    fn answer(self, outcome: Outcome) {
        match self.answer {
            Answer::Task(tx) => {
                let _ = tx.send(outcome);
            }
            Answer::Call(f) => f(outcome),
        }
    }
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
        let mut pieces = self.pieces(&op);
        if pieces.len() == 1 {
            let (chunk, _, request) = pieces.pop().expect("one piece");
            return self.piece(chunk, request).await;
        }
        let mut set = tokio::task::JoinSet::new();
        for (chunk, at, request) in pieces {
            let me = self.clone();
            set.spawn(async move { (at, me.piece(chunk, request).await) });
        }
        let mut read: Option<BytesMut> = match op {
            VolumeOp::Read { len_bytes, .. } => Some(BytesMut::zeroed(len_bytes as usize)),
            _ => None,
        };
        while let Some(joined) = set.join_next().await {
            let (at, result) = joined.map_err(|e| VolumeError::Unavailable(format!("task failed: {e}")))?;
            if let (Some(buf), Some(data)) = (read.as_mut(), result?) {
                buf[at as usize..at as usize + data.len()].copy_from_slice(&data);
            }
        }
        Ok(read.map(BytesMut::freeze))
    }

    /// Executes `op` as [`Volume::execute`] does and calls `done` with the result (exactly
    /// once, on this runtime's thread), without a task of its own in the common case: a
    /// request of one piece is sent at once to the server believed to lead its chunk, and the
    /// link's reader calls `done` when that server answers it for good. Anything else (several
    /// pieces, a redirect, a timeout, a lost connection) goes on in a task, as `execute` would.
    /// Call inside the runtime.
    ///
    /// Why: the task spawned per NBD request, its future and its wake-ups took ~10% of the
    /// frontend's CPU at 4 KiB reads, iodepth 32, where the frontend took more CPU per read
    /// than the leader.
    pub fn submit(&self, op: VolumeOp, done: impl FnOnce(Result<Option<Bytes>, VolumeError>) + Send + 'static) {
        let mut pieces = self.pieces(&op);
        if pieces.len() != 1 {
            let me = self.clone();
            tokio::spawn(async move { done(me.execute(op).await) });
            return;
        }
        let (chunk, _, request) = pieces.pop().expect("one piece");
        let start = Instant::now();
        let seq = self.open_seq();
        let target = self.leader_guess(chunk);
        // Ends the request: the same bookkeeping as `routed` and `piece`.
        let finish = move |me: &Volume, result: Result<Outcome, VolumeError>| {
            me.close_seq(seq);
            me.record(Stage::Route, start.elapsed());
            done(result.map(data_of))
        };
        let me = self.clone();
        let frame_op = request.clone();
        let on_answer = move |outcome: Outcome| {
            if ends(&request, &outcome) {
                let outcome = me.served(chunk, target, outcome);
                finish(&me, Ok(outcome));
            } else {
                tokio::spawn(async move {
                    let result = me.routed_inner(chunk, seq, request, Some((target, outcome))).await;
                    finish(&me, result);
                });
            }
        };
        let floor = self.floor(seq);
        let id = RequestId { client: self.inner.client, seq };
        self.start_attempt(target, chunk, id, floor, frame_op, Answer::Call(Box::new(on_answer)));
    }

    /// `op` cut at chunk boundaries and into pieces of at most [`MAX_PIECE`] bytes (trims and
    /// zeroes carry no payload: one piece per chunk): (chunk, offset in the request, request).
    fn pieces(&self, op: &VolumeOp) -> Vec<(u32, u64, RequestOp)> {
        let chunk_bytes = self.inner.cluster.chunk_bytes;
        let (offset, len, piece_max) = match op {
            VolumeOp::Read { offset, len_bytes } => (*offset, *len_bytes, MAX_PIECE),
            VolumeOp::Write { offset, data } => (*offset, data.len() as u64, MAX_PIECE),
            VolumeOp::Trim { offset, len_bytes } | VolumeOp::WriteZeroes { offset, len_bytes } => {
                (*offset, *len_bytes, u64::MAX)
            }
        };
        let mut pieces = Vec::with_capacity(1);
        let mut at = 0;
        while at < len {
            let abs = offset + at;
            let chunk = (abs / chunk_bytes) as u32;
            let in_chunk = abs % chunk_bytes;
            let n = (len - at).min(chunk_bytes - in_chunk).min(piece_max);
            let request = match op {
                VolumeOp::Read { .. } => RequestOp::Read { offset: in_chunk, len_bytes: n },
                VolumeOp::Write { data, .. } => {
                    RequestOp::Write { offset: in_chunk, data: data.slice(at as usize..(at + n) as usize) }
                }
                VolumeOp::Trim { .. } => RequestOp::Trim { offset: in_chunk, len_bytes: n },
                VolumeOp::WriteZeroes { .. } => RequestOp::WriteZeroes { offset: in_chunk, len_bytes: n },
            };
            pieces.push((chunk, at, request));
            at += n;
        }
        pieces
    }

    /// One request to one chunk's group, retried until a leader executes it.
    async fn piece(&self, chunk: u32, op: RequestOp) -> Result<Option<Bytes>, VolumeError> {
        let start = Instant::now();
        let result = self.routed(chunk, op).await;
        self.record(Stage::Route, start.elapsed());
        result.map(data_of)
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
        let seq = self.open_seq();
        let result = self.routed_inner(chunk, seq, op, None).await;
        self.close_seq(seq);
        result
    }

    /// A new request identity's sequence number, outstanding until [`Volume::close_seq`].
    fn open_seq(&self) -> u64 {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        self.inner.outstanding.lock().unwrap().insert(seq);
        seq
    }

    fn close_seq(&self, seq: u64) {
        self.inner.outstanding.lock().unwrap().remove(&seq);
    }

    /// The floor an attempt of outstanding request `seq` carries: the lowest sequence number
    /// still outstanding (the group forgets the answers of requests below it).
    fn floor(&self, seq: u64) -> u64 {
        *self.inner.outstanding.lock().unwrap().first().unwrap_or(&seq)
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

    /// The server believed to lead `chunk`: the last one that executed a request for it, else
    /// one of its placement.
    fn leader_guess(&self, chunk: u32) -> ReplicaId {
        let cached = self.inner.leaders.lock().unwrap()[chunk as usize];
        cached.unwrap_or_else(|| {
            let placed = self.inner.cluster.replicas_of(chunk);
            placed[chunk as usize % placed.len()]
        })
    }

    /// `first`: the outcome of an attempt already made at that server under this identity
    /// (by [`Volume::submit`]); it is handled as if this loop had made it.
    async fn routed_inner(
        &self,
        chunk: u32,
        seq: u64,
        op: RequestOp,
        mut first: Option<(ReplicaId, Outcome)>,
    ) -> Result<Outcome, VolumeError> {
        let inner = &self.inner;
        let id = RequestId { client: inner.client, seq };
        let mut target = match &first {
            Some((tried, _)) => *tried,
            None => self.leader_guess(chunk),
        };
        // The search order and the stall deadline are set at the first answer that does not
        // end the request: the common case (the leader answers the first attempt) needs
        // neither the order nor the clock. The order: the group's members are where it was
        // placed, unless membership changes moved it; then any server of the cluster may hold
        // it, and redirects lead to its leader.
        let mut search: Option<Vec<ReplicaId>> = None;
        let mut deadline: Option<Instant> = None;
        let mut redirects = 0u32;
        loop {
            let outcome = match first.take() {
                Some((_, outcome)) => outcome,
                None => self.attempt(target, chunk, id, self.floor(seq), op.clone()).await,
            };
            if ends(&op, &outcome) {
                return Ok(self.served(chunk, target, outcome));
            }
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
        let (tx, rx) = oneshot::channel();
        self.start_attempt(server, chunk, id, floor, op, Answer::Task(tx));
        rx.await.unwrap_or_else(|_| Outcome::Failed("connection lost".into()))
    }

    /// Starts one attempt of request `id` at `server`: registers `answer` in the link's
    /// pending map and queues the request. `answer` gets the outcome exactly once: from the
    /// link's reader, from the sweeper when it waited too long, at a lost connection, or here
    /// at once when the server is unknown, not connected or its link closed. When the link's
    /// queue is full a task waits for room, the attempt registered meanwhile (so the sweeper
    /// can still fail it).
    fn start_attempt(&self, server: ReplicaId, chunk: u32, id: RequestId, floor: u64, op: RequestOp, answer: Answer) {
        let waiter = Waiter { answer, sent_at: self.inner.ticks.load(Ordering::Relaxed) };
        let link = self.inner.links.read().unwrap().get(&server).cloned();
        let Some(link) = link else {
            waiter.answer(Outcome::Failed("unknown server".into()));
            return;
        };
        if !link.up.load(Ordering::Relaxed) {
            waiter.answer(Outcome::Failed("not connected".into()));
            return;
        }
        link.pending.lock().unwrap().insert(id.seq, waiter);
        let frame = Frame {
            cluster_id: self.inner.cluster.cluster_id,
            sender: 0,
            group: chunk,
            body: Body::Request { id, floor, op },
        };
        match link.tx.try_send(encode_outgoing(&frame)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                tokio::spawn(async move {
                    if link.tx.send(item).await.is_err() {
                        link_closed(&link, id.seq);
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => link_closed(&link, id.seq),
        }
    }
}

/// The link of an attempt registered under `seq` closed before the request went out: the
/// attempt fails (if nothing else ended it meanwhile).
fn link_closed(link: &ServerLink, seq: u64) {
    let waiter = link.pending.lock().unwrap().remove(&seq);
    if let Some(waiter) = waiter {
        waiter.answer(Outcome::Failed("link closed".into()));
    }
}

/// The result of a data request that ended with `outcome` (see [`ends`]): a read's data, or
/// nothing for a write, trim or zeroes.
fn data_of(outcome: Outcome) -> Option<Bytes> {
    match outcome {
        Outcome::Done => None,
        Outcome::Data(data) => Some(data),
        other => unreachable!("a data request ended with {other:?}"),
    }
}

/// Whether `outcome` answers `op` for good: a data request's success (a read's data of the
/// length asked), or a membership change's refusal. Anything else makes the request try again.
fn ends(op: &RequestOp, outcome: &Outcome) -> bool {
    match (op, outcome) {
        (RequestOp::Read { len_bytes, .. }, Outcome::Data(data)) => data.len() as u64 == *len_bytes,
        (RequestOp::Read { .. }, _) => false,
        (_, Outcome::Done) => true,
        (RequestOp::Change(_), Outcome::Refused(_)) => true,
        _ => false,
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
            let expired = expired(&mut link.pending.lock().unwrap(), now);
            for waiter in expired {
                waiter.answer(Outcome::Failed("timed out".into()));
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
            let mut reader = crate::recv::SharedReader::new(reader);
            while let Ok(Some(frame)) = read_frame_shared(&mut reader).await {
                activity.touch();
                if let Body::Response { id, outcome } = frame.body {
                    let waiter = reader_pending.lock().unwrap().remove(&id.seq);
                    if let Some(waiter) = waiter {
                        waiter.answer(outcome);
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
        let lost: Vec<Waiter> = pending.lock().unwrap().drain().map(|(_, w)| w).collect();
        for waiter in lost {
            waiter.answer(Outcome::Failed("connection lost".into()));
        }
        debug!(server = server.0, "connection to chunk server lost");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallelraft::Mode;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// How a fake server answers a request.
    #[derive(Clone, Copy)]
    enum Script {
        /// Redirects every request to this server.
        Redirect(u32),
        /// Executes every request: reads return bytes of `len_bytes` filled with the chunk's
        /// number, anything else is done.
        Serve,
        /// Closes the connection at its first request (a server that dies with it in flight).
        Die,
    }

    /// A fake chunk server: answers per `script`, and records every request it gets as
    /// (chunk, sequence number).
    async fn fake_server(script: Script) -> (ServerAddr, Arc<Mutex<Vec<(u32, u64)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ServerAddr::Tcp(listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let log = log.clone();
                tokio::spawn(async move {
                    let (reader, mut writer) = stream.into_split();
                    let mut reader = crate::recv::SharedReader::new(reader);
                    while let Ok(Some(frame)) = read_frame_shared(&mut reader).await {
                        let Body::Request { id, op, .. } = frame.body else { continue };
                        log.lock().unwrap().push((frame.group, id.seq));
                        let outcome = match (script, op) {
                            (Script::Redirect(to), _) => Outcome::NotLeader(Some(ReplicaId(to))),
                            (Script::Die, _) => return,
                            (Script::Serve, RequestOp::Read { len_bytes, .. }) => {
                                Outcome::Data(Bytes::from(vec![frame.group as u8; len_bytes as usize]))
                            }
                            (Script::Serve, _) => Outcome::Done,
                        };
                        let mut out = BytesMut::new();
                        encode(
                            &Frame {
                                cluster_id: 7,
                                sender: 0,
                                group: frame.group,
                                body: Body::Response { id, outcome },
                            },
                            &mut out,
                        );
                        if writer.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// A volume of two 1 MiB chunks over three fake servers; chunk 0 is first tried at server
    /// 1, chunk 1 at server 2 (the bootstrap guess).
    async fn volume_over(scripts: [Script; 3]) -> (Volume, Vec<Arc<Mutex<Vec<(u32, u64)>>>>) {
        let mut servers = Vec::new();
        let mut logs = Vec::new();
        for (k, script) in scripts.into_iter().enumerate() {
            let (addr, log) = fake_server(script).await;
            servers.push((ReplicaId(k as u32 + 1), addr));
            logs.push(log);
        }
        let cluster = Cluster {
            cluster_id: 7,
            volume_name: "v".into(),
            size_bytes: 2 << 20,
            chunk_bytes: 1 << 20,
            mode: Mode::Parallel,
            servers,
            placed: vec![ReplicaId(1), ReplicaId(2), ReplicaId(3)],
        };
        let volume = Volume::new(cluster);
        for id in 1..=3 {
            while !volume.connected(ReplicaId(id)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        (volume, logs)
    }

    /// `volume.submit(op)`, waited for (at most 10 s: a request never answered fails the test
    /// instead of hanging it); also checks that the answer comes exactly once.
    async fn submitted(volume: &Volume, op: VolumeOp) -> Result<Option<Bytes>, VolumeError> {
        let (tx, rx) = oneshot::channel();
        volume.submit(op, move |result| tx.send(result).expect("answered twice"));
        tokio::time::timeout(Duration::from_secs(10), rx).await.expect("never answered").unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_submitted_request_follows_a_redirect_under_one_identity_and_remembers_the_leader() {
        let (volume, logs) = volume_over([Script::Redirect(2), Script::Serve, Script::Serve]).await;
        let read = submitted(&volume, VolumeOp::Read { offset: 4096, len_bytes: 8192 }).await.unwrap();
        assert_eq!(read.unwrap(), vec![0u8; 8192], "chunk 0's data, from server 2");
        let first = logs[0].lock().unwrap().clone();
        let second = logs[1].lock().unwrap().clone();
        assert_eq!(first.len(), 1, "server 1 was asked once");
        assert_eq!(second, first, "the retry at server 2 carried the same identity");
        assert_eq!(volume.retries(), 1);
        // The leader is remembered: the next request goes straight to server 2.
        assert_eq!(
            submitted(&volume, VolumeOp::Write { offset: 0, data: Bytes::from(vec![1u8; 4096]) }).await,
            Ok(None)
        );
        assert_eq!(logs[0].lock().unwrap().len(), 1, "server 1 was not asked again");
        assert_eq!(logs[1].lock().unwrap().len(), 2);
        assert_eq!(volume.retries(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_submitted_request_whose_server_dies_is_answered_by_another() {
        // Chunk 1 is first tried at server 2, which closes the connection with it in flight.
        let (volume, logs) = volume_over([Script::Serve, Script::Die, Script::Serve]).await;
        let read = submitted(&volume, VolumeOp::Read { offset: (1 << 20) + 512, len_bytes: 1024 }).await.unwrap();
        assert_eq!(read.unwrap(), vec![1u8; 1024], "chunk 1's data");
        let died = logs[1].lock().unwrap().clone();
        assert_eq!(died.len(), 1);
        let answered: Vec<(u32, u64)> =
            logs[0].lock().unwrap().iter().chain(logs[2].lock().unwrap().iter()).copied().collect();
        assert_eq!(answered, died, "retried once elsewhere, under the same identity");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_submitted_request_across_chunks_is_answered_whole() {
        let (volume, logs) = volume_over([Script::Serve, Script::Serve, Script::Serve]).await;
        let read = submitted(&volume, VolumeOp::Read { offset: (1 << 20) - 4096, len_bytes: 8192 }).await.unwrap();
        let mut expected = vec![0u8; 4096];
        expected.extend([1u8; 4096]);
        assert_eq!(read.unwrap(), expected, "the tail of chunk 0, then the head of chunk 1");
        assert_eq!(logs[0].lock().unwrap().len(), 1, "chunk 0 at server 1");
        assert_eq!(logs[1].lock().unwrap().len(), 1, "chunk 1 at server 2");
    }

    #[test]
    fn only_a_success_of_the_right_shape_or_a_refused_change_ends_a_request() {
        let read = RequestOp::Read { offset: 0, len_bytes: 4096 };
        let write = RequestOp::Write { offset: 0, data: Bytes::from_static(&[0; 512]) };
        let change = RequestOp::Change(MembershipChange::AddLearner(ReplicaId(4)));
        assert!(ends(&read, &Outcome::Data(Bytes::from(vec![0; 4096]))));
        assert!(!ends(&read, &Outcome::Data(Bytes::from(vec![0; 512]))), "a short read");
        assert!(!ends(&read, &Outcome::Done));
        assert!(ends(&write, &Outcome::Done));
        assert!(!ends(&write, &Outcome::Data(Bytes::new())));
        assert!(!ends(&write, &Outcome::Refused(MembershipError::NotAMember)));
        assert!(ends(&change, &Outcome::Done));
        assert!(ends(&change, &Outcome::Refused(MembershipError::NotAMember)));
        for retry in [Outcome::NotLeader(None), Outcome::Busy, Outcome::Failed("x".into()), Outcome::Absent] {
            assert!(!ends(&read, &retry) && !ends(&write, &retry) && !ends(&change, &retry), "{retry:?}");
        }
    }

    #[test]
    fn attempts_expire_after_their_ticks_and_not_before() {
        let mut pending = HashMap::new();
        let mut answers = Vec::new();
        for (seq, sent_at) in [(1u64, 0u64), (2, 5), (3, 10)] {
            let (tx, rx) = oneshot::channel();
            pending.insert(seq, Waiter { answer: Answer::Task(tx), sent_at });
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
