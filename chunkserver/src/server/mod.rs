//! A chunk server process: many chunk replicas (one ParallelRaft group each) driven by one
//! core task, on one thread with the tokio tasks of its connections (a current-thread
//! runtime). Only the disk threads are others.
//!
//! Why one thread: every hand-off between threads that sleep costs a wake-up, ~30 µs each way
//! between the two vCPUs of the machines this runs on (see the shared machine limits). With
//! connection tasks on their own threads a frame read off a socket woke the core thread;
//! now it is simply next in the queue. Measured (fio 4 KiB, one chunk, interleaved runs):
//! random writes at iodepth 1 p50 379 / 387 µs against 416 / 428; at iodepth 32 11.3–11.8k
//! against 10.5–11.2k IOPS with 10% less CPU per write; random reads at iodepth 1 p50 140
//! against 159–165 µs, at iodepth 32 a median of 39.8k against 35.1k of eight runs each.
//!
//! The core runs to completion in rounds: take what arrived (waiting only until the
//! next tick), step the groups, execute their commands (block applies, reads, hard state and
//! checkpoints synchronously; log writes collected), make the collected log writes of every
//! group durable in one append to the server's WAL (group commit: one fdatasync for everything
//! that arrived during the previous round, on the WAL thread), feed the completions back, and
//! write the coalesced outgoing batches to their sockets (non-blocking; a connection task
//! takes over only what a full socket refuses, see [`link`]), then yield so the connection
//! tasks read what arrived meanwhile. Messages to peers leave before the local fdatasync
//! starts, so the leader's own log write overlaps the followers'.

mod delay;
pub mod disk;
pub mod group;
pub mod link;
pub mod outbox;
pub mod repair;
pub mod replicas;
mod trace;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parallelraft::{Config, ReplicaId, RoleKind};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use crate::config::{Cluster, ClusterWatch};
use crate::metrics::{Published, Stage, Stages, Totals};
use crate::net::{ServerAddr, StdListener};
use crate::poll::Activity;
use crate::wire::{Body, Outcome, RequestOp};
use group::rebuild::RateLimiter;
use group::{Group, GroupCounters, StorageOptions};
use link::LinkWriter;
use outbox::{Outbox, PEER_BACKLOG_BYTES};
use transport::{Inbound, InboxTx, Shared};

/// How often the core thread logs its groups' progress.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// How often `status` is rewritten in the data directory, for operators and tests. One line
/// per chunk: chunk, role, term, committed watermark, applied watermark, blocks awaiting
/// repair, blocks repaired since start, voters and learners (comma lists, `-` for none).
const STATUS_INTERVAL: Duration = Duration::from_millis(200);

/// How often the cluster file is checked for added servers.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// How often the `/metrics` text is rendered.
const METRICS_INTERVAL: Duration = Duration::from_millis(500);

/// Items the core thread's inbox holds before connection tasks wait.
const INBOX_CAPACITY: usize = 8192;

/// Look-behind span N of a chunk server unless told otherwise (`--lbb-span`). Measured while
/// the in-flight window was N + 1, so that the paper's N = 2 capped a chunk's pipeline at 3
/// writes (`bench compare --quick --targets parallel --lbb-span 2|16`, interleaved, 2 runs
/// each): 4 KiB random writes at iodepth 32 went from
/// 1.2k to 1.6–2.4k IOPS, iodepth 1 unchanged. N = 32 lets a client at iodepth 32 (fio's
/// usual depth) keep every write in flight, which matters when messages are delayed: with 2 ms
/// of jitter, iodepth 32 went from 3,274 to 5,361 IOPS (3,289 to 5,170 in Raft mode); without
/// jitter N = 16 and 32 measured alike (8,657 / 9,810 against 9,582 / 9,401; N = 64 was
/// lower, 8,443 / 8,241). Each entry carries N range sets (≈ 19 bytes each), inside the 4 KiB
/// alignment of its WAL record.
pub const DEFAULT_LBB_SPAN: usize = 32;

/// In-flight window of a chunk's leader unless told otherwise (`--window`), in entries past
/// its committed watermark (`Config::in_flight_window`). With the span's N + 1 = 33, a write
/// whose messages are held up on the way to both followers (the bench harness's stragglers:
/// one message in 50 held 20 ms, so about one write in 600) stopped the chunk's other writes
/// 33 entries after it for the rest of its delay. 512 entries carry a 20 ms stall at 25k
/// writes a second. The bytes in flight stay bounded by the flow control's lag limit (half a
/// checkpoint, 16 MiB), as before. Measured (`chunkserver local --straggler-us 20000
/// --straggler-per-mille 20 --window 33|512`, fresh clusters, 256 MiB filled, 10 s of 4 KiB
/// random writes at iodepth 32, three interleaved pairs): 8,691 / 9,174 / 8,418 against
/// 10,253 / 10,022 / 9,137 IOPS, p99 20.1 / 20.1 / 20.3 against 8.7 / 9.6 / 9.0 ms. Without
/// delays, with 0-2 ms of uniform jitter and in Raft mode with stragglers the two measured
/// alike (three, two and two pairs). Over the bench harness's two chunks (`bench compare
/// --targets parallel-straggler,raft-straggler --jobs randwrite-4k-qd32 --runs 1 --window
/// 33|512`, three interleaved pairs) the rate gained less, 9,062 / 8,686 / 10,165 against
/// 8,962 / 10,528 / 9,648 IOPS, the tail as much: p99 15.1 / 14.9 / 15.3 against 9.4 / 8.0 /
/// 9.4 ms. Four connections × iodepth 16 into one chunk: 12,474 / 11,870 against 14,608 /
/// 13,942 IOPS (two pairs): more entries per group commit.
pub const DEFAULT_WINDOW: u64 = 512;
// The simulator's perf model runs the servers' window.
const _: () = assert!(DEFAULT_WINDOW == parallelraft::sim::perf::SERVER_WINDOW);

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub id: ReplicaId,
    pub cluster: Cluster,
    /// This server's directory (chunk replicas live in `chunk-NNNNNNNN/` below it).
    pub data_dir: PathBuf,
    pub storage: StorageOptions,
    pub tick: Duration,
    pub lbb_span: usize,
    /// Leader in-flight window of every chunk (`Config::in_flight_window`), in entries.
    pub window: u64,
    /// Benchmark option: random delays of frames between servers.
    pub jitter: transport::Jitter,
    /// Where `/metrics` is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Override of the listen address (default: this server's address in the cluster file).
    pub listen: Option<ServerAddr>,
    /// The cluster file, followed for servers added while running (none: not followed).
    pub config_path: Option<PathBuf>,
    /// Cap on the bytes per second this server sends to rebuild other replicas (0: none).
    pub rebuild_rate: u64,
    /// Entries between a chunk's checkpoints.
    pub checkpoint_interval: u64,
    /// Bytes of entries in one Sync (`Config::max_sync_bytes`).
    pub max_sync_bytes: u64,
    /// How long the core and WAL threads keep polling for work after the server's last (zero:
    /// they sleep at once); see [`crate::poll`].
    pub poll: Duration,
}

/// A chunk also checkpoints after this many bytes of writes (see `Config::checkpoint_bytes`).
pub const CHECKPOINT_BYTES: u64 = 32 << 20;

/// A chunk whose applying paused this many ticks (0.5 s at the default 20 ms tick) checkpoints
/// (see `Config::checkpoint_idle_ticks`). 128 KiB sequential writes over two chunks, one
/// written while the other waits, grew the server's WAL to ten segments (until the waiting
/// chunk rewrote its log at the head), freed eight at once, deleted all but one of them and
/// zeroed their successors anew.
pub const CHECKPOINT_IDLE_TICKS: u64 = 25;

/// Encoded entries of one merge report (`Config::max_vote_bytes`): as much as one frame holds,
/// with room for the message around them.
pub const MAX_VOTE_BYTES: u64 = 80 << 20;
const _: () = assert!(MAX_VOTE_BYTES + (16 << 20) <= crate::wire::MAX_FRAME_BYTES as u64);

/// Default of `--max-sync-bytes`.
pub const DEFAULT_MAX_SYNC_BYTES: &str = "32M";

/// Default of `--checkpoint-interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 4096;

/// Default of `--rebuild-rate`: about a third of what this class of machine's disk writes
/// sequentially (see the shared machine limits), so a rebuild leaves most of it to the
/// foreground.
pub const DEFAULT_REBUILD_RATE: &str = "64M";

pub(crate) fn group_config(opts: &ServerOptions, voters: Vec<ReplicaId>, chunk: u32) -> Config {
    let mut cfg = Config::new(opts.id, voters, opts.cluster.mode, seed(chunk));
    cfg.lbb_span = opts.lbb_span;
    cfg.in_flight_window = Some(opts.window);
    cfg.election_timeout_min_ticks = 10;
    cfg.heartbeat_interval_ticks = 2;
    // Reads skip the read-index round for 6 ticks after a confirmed heartbeat; the core loop
    // reports a clock that ran more than a tick ahead of its ticks (Event::ClockJump).
    cfg.lease_ticks = cfg.election_timeout_min_ticks - parallelraft::LEASE_MARGIN_TICKS;
    cfg.checkpoint_interval = opts.checkpoint_interval;
    cfg.checkpoint_bytes = CHECKPOINT_BYTES;
    cfg.checkpoint_idle_ticks = CHECKPOINT_IDLE_TICKS;
    cfg.max_vote_bytes = MAX_VOTE_BYTES;
    cfg.max_sync_bytes = opts.max_sync_bytes;
    cfg.max_batch_entries = 64;
    cfg.max_queued_proposals = 1024;
    cfg
}

/// Election randomness: seeded per process start, so replicas restarted together still draw
/// different timeouts. (The core itself only ever sees the seed.)
fn seed(chunk: u32) -> u64 {
    crate::process_entropy(chunk as u64)
}

/// Runs the server until `stop` fires (or forever). Errors are start-up errors (bad data
/// directory, busy port), already phrased for the user.
pub fn run(opts: ServerOptions, stop: Option<tokio::sync::oneshot::Receiver<()>>) -> Result<(), String> {
    let cluster = &opts.cluster;
    let me = opts.id;
    let listen = match opts.listen.clone() {
        Some(a) => a,
        None => cluster.addr_of(me).ok_or_else(|| format!("server {} is not in the cluster file", me.0))?,
    };
    let std_listener = StdListener::bind(&listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let (inbox_tx, inbox) = sync_channel::<Inbound>(INBOX_CAPACITY);
    let ready = Arc::new(Notify::new());
    let activity = Activity::new();
    let inbox_tx = InboxTx::new(inbox_tx, ready.clone(), activity.clone());
    let (log, recovered) = replicas::open_log(&opts)?;
    let disk = disk::spawn(inbox_tx.clone(), opts.storage.engine, log, activity.clone(), opts.poll)
        .map_err(|e| format!("cannot start the disk threads: {e}"))?;
    let mut groups = replicas::open_groups(&opts, &disk, recovered)?;
    info!(server = me.0, %listen, chunks = groups.len(), mode = ?cluster.mode, "chunk server up");

    // One thread for the core and every connection: a frame read off a socket reaches the
    // core without waking another thread (a cross-vCPU wake-up costs ~30 µs each way on this
    // class of machine, see the shared machine limits), and the core's own sends need none.
    let runtime = crate::poll::current_thread_runtime(opts.poll)?;
    let shared = Shared {
        cluster_id: cluster.cluster_id,
        me,
        inbox: inbox_tx,
        next_conn: Arc::new(AtomicU64::new(1)),
        jitter: opts.jitter,
    };
    let mut outbox = Outbox::new(cluster.cluster_id, me);
    let mut peers = Peers {
        handle: runtime.handle().clone(),
        shared: shared.clone(),
        accept_from: Arc::new(std::sync::Mutex::new(Vec::new())),
        cluster: cluster.clone(),
        watch: opts.config_path.as_deref().map(ClusterWatch::new),
    };
    for (peer, addr) in cluster.servers.clone() {
        peers.connect(peer, addr, &mut outbox);
    }
    {
        let _guard = runtime.enter();
        let listener = std_listener.into_tokio().map_err(|e| e.to_string())?;
        crate::poll::spawn_runtime_poller(activity.clone(), opts.poll);
        runtime.spawn(transport::accept_loop(shared.clone(), listener, peers.accept_from.clone()));
        let shared_for_stop = shared.clone();
        runtime.spawn(async move {
            match stop {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => wait_for_signal().await,
            }
            shared_for_stop.deliver(Inbound::Shutdown).await;
        });
    }
    let published: Published = Arc::new(std::sync::Mutex::new(String::new()));
    if let Some(addr) = opts.metrics {
        let _guard = runtime.enter();
        crate::metrics::spawn(addr, published.clone());
    }
    // The core runs as a task, not as the `block_on` future: waking a task from this same
    // thread only queues it, while waking the `block_on` future writes the driver's eventfd.
    let core = runtime.spawn(async move {
        core_loop(&opts, &disk, &mut groups, &mut outbox, &mut peers, inbox, &ready, &activity, &published).await
    });
    let _ = runtime.block_on(core);
    info!(server = me.0, "chunk server stopping");
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

/// The connections to the other servers, and the servers added to the cluster file later.
struct Peers {
    handle: tokio::runtime::Handle,
    shared: Shared,
    accept_from: transport::AcceptFrom,
    /// The cluster as this server knows it (the start-up file plus added spares).
    cluster: Cluster,
    watch: Option<ClusterWatch>,
}

impl Peers {
    /// Starts the link to `peer`: the lower id dials, the higher accepts.
    fn connect(&mut self, peer: ReplicaId, addr: ServerAddr, outbox: &mut Outbox) {
        let me = self.shared.me;
        if peer == me {
            return;
        }
        let link = LinkWriter::new(PEER_BACKLOG_BYTES);
        outbox.add_peer(peer, link.clone());
        let (stream_tx, stream_rx) = mpsc::channel(4);
        let dial = me < peer;
        if !dial {
            self.accept_from.lock().unwrap().push((peer, stream_tx));
        }
        self.handle.spawn(transport::peer_link(self.shared.clone(), peer, addr, dial, link, stream_rx));
    }

    /// Connects to servers added to the cluster file since the last look.
    fn poll(&mut self, outbox: &mut Outbox) {
        let Some(watch) = self.watch.as_mut() else { return };
        match watch.poll(&self.cluster) {
            Ok(added) => {
                for (peer, addr) in &added {
                    info!(server = peer.0, %addr, "server added to the cluster file; connecting");
                    self.connect(*peer, addr.clone(), outbox);
                }
                self.cluster.add_servers(&added);
            }
            Err(e) => warn!("{e}"),
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Tells every group that time passed unticked when the clock is more than a tick past the
/// tick due (a stalled process or a long round): the ticks are not replayed, so a read lease
/// counted in them would outlast the voters' promise not to elect anyone else.
fn report_clock_jump(groups: &mut BTreeMap<u32, Group>, outbox: &mut Outbox, next_tick: Instant, tick: Duration) {
    if Instant::now() > next_tick + tick {
        for g in groups.values_mut() {
            g.clock_jumped(outbox);
        }
    }
}

/// Runs on the runtime's only thread, with the connection tasks: it awaits only to wait for
/// work and, after each round, to let those tasks read what arrived meanwhile.
#[allow(clippy::too_many_arguments)]
async fn core_loop(
    opts: &ServerOptions,
    disk: &disk::Disk,
    groups: &mut BTreeMap<u32, Group>,
    outbox: &mut Outbox,
    peers: &mut Peers,
    inbox: Receiver<Inbound>,
    ready: &Notify,
    activity: &Activity,
    published: &Published,
) {
    let mut stages = Stages::default();
    let mut next_metrics = Instant::now();
    let mut next_tick = Instant::now() + opts.tick;
    let mut next_report = Instant::now() + REPORT_INTERVAL;
    let mut next_status = Instant::now();
    let mut next_watch = Instant::now() + WATCH_INTERVAL;
    let mut limiter = RateLimiter::new(opts.rebuild_rate);
    let mut rate = RebuildRate::default();
    // As the WAL thread last reported it.
    let mut wal_segments = disk.lock_log().segment_count();
    // Reused round after round (it grows to the largest round once, not every round).
    let mut batch = Vec::new();
    // Frames the benchmark jitter holds back (empty unless it is on).
    let mut held = delay::DelayLine::default();
    // One timer for the loop's waits, moved only when their deadline changes (it is the next
    // tick in most rounds). A new `Sleep` per wait registered a timer each time, and a timer
    // registered earlier than the time driver's next wake-up writes the driver's eventfd: a
    // system call per wait, and another when the driver reads it back.
    let mut timer = Box::pin(tokio::time::sleep_until(next_tick.into()));
    loop {
        if Instant::now() >= next_status {
            next_status = Instant::now() + STATUS_INTERVAL;
            write_status(&opts.data_dir, groups);
        }
        if opts.metrics.is_some() && Instant::now() >= next_metrics {
            next_metrics = Instant::now() + METRICS_INTERVAL;
            let bytes_per_sec = rate.sample(groups);
            *published.lock().unwrap() =
                render_metrics(&stages, groups, outbox, bytes_per_sec, wal_segments, held.held_total());
        }
        if Instant::now() >= next_report {
            next_report += REPORT_INTERVAL;
            report(groups, outbox);
        }
        if Instant::now() >= next_watch {
            next_watch = Instant::now() + WATCH_INTERVAL;
            peers.poll(outbox);
        }
        // Wait for work, but never past the next tick; keep streaming snapshots promptly.
        let streaming = groups.values().any(|g| g.snapshots_streaming());
        let now = Instant::now();
        let mut wait = if streaming { Duration::from_millis(1) } else { next_tick.saturating_duration_since(now) };
        if !take(&inbox, &mut batch) {
            return;
        }
        held.release_due(now, &mut batch);
        if batch.is_empty() {
            match held.idle(now) {
                // A held frame is due sooner than tokio's timer could wake us: look again.
                delay::Idle::Spin if now < next_tick => {
                    crate::poll::yield_round(activity, opts.poll).await;
                    continue;
                }
                delay::Idle::Spin => wait = Duration::ZERO, // this round runs the tick
                delay::Idle::Sleep(until_due) => wait = wait.min(until_due.unwrap_or(wait)),
            }
            let deadline = tokio::time::Instant::from_std(now + wait);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            // A send after the take above left a permit: this returns at once then.
            tokio::select! {
                _ = ready.notified() => {}
                _ = &mut timer => {}
            }
            if !take(&inbox, &mut batch) {
                return;
            }
        }
        let round_start = Instant::now();
        let mut clock_checked = false;
        for item in batch.drain(..) {
            if !clock_checked && matches!(item, Inbound::Frame { .. } | Inbound::Held { .. }) {
                // Leases count ticks: a stall that held them back is reported before any
                // frame is stepped (a frame may be a read the lease would serve).
                clock_checked = true;
                report_clock_jump(groups, outbox, next_tick, opts.tick);
            }
            match item {
                Inbound::Shutdown => {
                    // Records not yet durable were never acknowledged; an append in flight
                    // finishes on the WAL thread and its completion is simply not stepped.
                    outbox.flush();
                    return;
                }
                Inbound::WalDone(done) => {
                    wal_segments = done.segments;
                    for (chunk, tokens) in done.appends {
                        if let Some(g) = groups.get_mut(&chunk) {
                            g.wal_done(tokens, done.error.clone(), done.took, outbox);
                        }
                    }
                    for chunk in done.pinning {
                        if let Some(g) = groups.get_mut(&chunk) {
                            g.rewrite_log();
                        }
                    }
                }
                Inbound::CheckpointDone(done) => {
                    if let Some(g) = groups.get_mut(&done.chunk) {
                        g.checkpoint_done(done.index, done.error, done.took, outbox);
                    }
                }
                Inbound::FrontendConnected { conn, link } => outbox.add_frontend(conn, link),
                Inbound::FrontendGone { conn } => {
                    outbox.remove_frontend(conn);
                    for g in groups.values_mut() {
                        g.forget_conn(conn);
                    }
                }
                Inbound::Frame { conn, frame, at } => {
                    stages.record(Stage::Queue, at.elapsed());
                    frame_arrived(opts, disk, groups, outbox, conn, frame);
                }
                Inbound::Held { conn, frame, due } => {
                    if let Some((conn, frame)) = held.hold(due, conn, frame) {
                        // The line is full: stepped now, as if it had drawn no delay.
                        frame_arrived(opts, disk, groups, outbox, conn, frame);
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            report_clock_jump(groups, outbox, next_tick, opts.tick);
            for g in groups.values_mut() {
                g.tick(outbox);
            }
            next_tick += opts.tick;
            if next_tick < now {
                // Fell behind (a long disk stall): do not replay missed ticks in a burst.
                next_tick = now + opts.tick;
            }
        }
        // Send what the steps produced, then start the group commits on the WAL thread; their
        // completions come back through the inbox and produce acks and replies.
        for g in groups.values_mut() {
            g.flush(outbox);
            g.pump_snapshots(outbox, &mut limiter);
        }
        outbox.flush();
        submit_wal(disk, groups);
        stages.record(Stage::CoreRound, round_start.elapsed());
        // The connection tasks share this thread: let them read (and the I/O driver poll)
        // before the next round, or a busy core would starve them.
        tokio::task::yield_now().await;
    }
}

/// Hands this round's group commit (the pending records of every group without an append in
/// flight) and any new checkpoints to the WAL thread.
fn submit_wal(disk: &disk::Disk, groups: &mut BTreeMap<u32, Group>) {
    let mut appends = Vec::new();
    for g in groups.values_mut() {
        if let Some(through) = g.take_wal_cover() {
            // Lost only with the thread, which the append below reports.
            disk.send(disk::WalJob::Cover { chunk: g.chunk, through });
        }
        appends.extend(g.take_wal());
    }
    if appends.is_empty() {
        return;
    }
    let chunks: Vec<u32> = appends.iter().map(|a| a.chunk).collect();
    // Past this many segments the log names the replicas that pin its oldest one: about what
    // a log per replica held (a checkpoint's worth of entries plus the segment being written).
    let max_segments = 2 * groups.len() + 2;
    if !disk.send(disk::WalJob::Append { appends, max_segments }) {
        for chunk in chunks {
            if let Some(g) = groups.get_mut(&chunk) {
                g.wal_lost();
            }
        }
    }
}

/// Moves what the inbox holds (up to a round's worth) into `batch`; false when every sender
/// is gone.
fn take(inbox: &Receiver<Inbound>, batch: &mut Vec<Inbound>) -> bool {
    while batch.len() < 4096 {
        match inbox.try_recv() {
            Ok(item) => batch.push(item),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// Routes a frame to its group. A leader message for a chunk this server does not hold makes
/// it a joiner of that group; a retire request deletes a replica the operator removed.
fn frame_arrived(
    opts: &ServerOptions,
    disk: &disk::Disk,
    groups: &mut BTreeMap<u32, Group>,
    outbox: &mut Outbox,
    conn: outbox::ConnId,
    frame: crate::wire::Frame,
) {
    use parallelraft::Message;
    let chunk = frame.group;
    let from = ReplicaId(frame.sender);
    if let Body::Request { id, op: RequestOp::Retire { config }, .. } = &frame.body {
        let outcome = retire(opts, disk, groups, chunk, *config);
        outbox.frontend(conn, chunk, Body::Response { id: *id, outcome });
        return;
    }
    if let std::collections::btree_map::Entry::Vacant(slot) = groups.entry(chunk) {
        let leader_message = matches!(
            &frame.body,
            Body::Peer {
                message: Message::Heartbeat { .. }
                    | Message::Append { .. }
                    | Message::Sync { .. }
                    | Message::Snapshot { .. }
            }
        );
        if leader_message && chunk < opts.cluster.chunk_count() && opts.cluster.addr_of(from).is_some() {
            match replicas::create_joiner(opts, disk, chunk) {
                Ok(g) => {
                    slot.insert(g);
                }
                Err(e) => warn!(chunk, "{e}"),
            }
        }
    }
    let Some(group) = groups.get_mut(&chunk) else {
        if let Body::Request { id, .. } = frame.body {
            outbox.frontend(conn, chunk, Body::Response { id, outcome: Outcome::Absent });
        }
        return;
    };
    match frame.body {
        Body::Peer { message } => group.receive(from, message, outbox),
        Body::SnapOffer { snapshot, checkpoint } => group.snapshot_offer(from, snapshot, checkpoint, outbox),
        Body::SnapWant { snapshot, covered, low, high } => group.snapshot_want(from, snapshot, covered, low, high),
        Body::SnapData { snapshot, seq, upto, blocks } => group.snapshot_data(from, snapshot, seq, upto, blocks),
        Body::SnapEnd { snapshot, frames, message } => group.snapshot_end(from, snapshot, frames, message, outbox),
        Body::Request { id, floor, op } => group.request(conn, id, floor, op, outbox),
        Body::RepairAsk { blocks } => group.repair_ask(from, blocks, outbox),
        Body::RepairData { applied, blocks } => group.repair_data(from, applied, blocks, outbox),
        Body::Hello { .. } | Body::Response { .. } => {
            warn!(conn, "unexpected frame kind from a connection; ignored")
        }
    }
}

/// The operator's word that the configuration entry at `config` removed this server from
/// `chunk`'s group.
fn retire(
    opts: &ServerOptions,
    disk: &disk::Disk,
    groups: &mut BTreeMap<u32, Group>,
    chunk: u32,
    config: parallelraft::Index,
) -> Outcome {
    let Some(group) = groups.get(&chunk) else {
        return Outcome::Done; // nothing (left) here
    };
    if let Err(why) = replicas::may_retire(group, config) {
        return Outcome::Failed(why);
    }
    if !group.is_idle() {
        return Outcome::Busy;
    }
    let group = groups.remove(&chunk).expect("present");
    disk.send(disk::WalJob::Forget { chunk });
    match replicas::retire(opts, group) {
        Ok(()) => Outcome::Done,
        Err(e) => {
            warn!(chunk, "{e}");
            Outcome::Failed(e)
        }
    }
}

/// The bytes per second this server's rebuild streams sent and received, between two samples.
#[derive(Default)]
struct RebuildRate {
    last: Option<(Instant, u64)>,
}

impl RebuildRate {
    fn sample(&mut self, groups: &BTreeMap<u32, Group>) -> i64 {
        let c = |g: &Group| g.counters;
        let bytes: u64 = groups
            .values()
            .map(|g| c(g).catchup_bytes_sent + c(g).catchup_bytes_received + c(g).catchup_log_bytes_received)
            .sum();
        let now = Instant::now();
        let rate = match self.last {
            Some((at, before)) if now > at => (bytes.saturating_sub(before) as f64 / (now - at).as_secs_f64()) as i64,
            _ => 0,
        };
        self.last = Some((now, bytes));
        rate
    }
}

/// The server's `/metrics` text: its own stages and every group's, merged, plus per-chunk
/// gauges and totals.
fn render_metrics(
    own: &Stages,
    groups: &BTreeMap<u32, Group>,
    outbox: &Outbox,
    rebuild_rate: i64,
    wal_segments: usize,
    jitter_held: u64,
) -> String {
    let mut stages = own.clone();
    let mut c = GroupCounters::default();
    let mut repaired = 0;
    let (mut reads_leased, mut reads_with_round, mut votes_refused) = (0, 0, 0);
    for g in groups.values() {
        let (leased, with_round) = g.replica().read_counts();
        votes_refused += g.replica().oversized_vote_refusals();
        reads_leased += leased;
        reads_with_round += with_round;
        stages.merge(&g.stages);
        let k = g.counters;
        c.writes += k.writes;
        c.reads += k.reads;
        c.bytes_written += k.bytes_written;
        c.bytes_read += k.bytes_read;
        c.leader_changes += k.leader_changes;
        c.catchup_bytes_sent += k.catchup_bytes_sent;
        c.catchup_bytes_received += k.catchup_bytes_received;
        c.catchup_log_bytes_received += k.catchup_log_bytes_received;
        c.partial_syncs_received += k.partial_syncs_received;
        c.log_rewrites += k.log_rewrites;
        repaired += g.repair_counts().1;
    }
    let per_chunk = |f: &dyn Fn(&Group) -> i64| groups.values().map(|g| (g.chunk, f(g))).collect::<Vec<_>>();
    let totals = Totals {
        counters: vec![
            ("writes", "Writes served as leader", c.writes),
            ("reads", "Reads served as leader", c.reads),
            ("written_bytes", "Bytes written as leader", c.bytes_written),
            ("read_bytes", "Bytes read as leader", c.bytes_read),
            ("reads_leased", "Reads served as leader under the read lease, without a round of their own", reads_leased),
            ("reads_with_round", "Reads served as leader after a read-index round of their own", reads_with_round),
            ("leader_changes", "Times a replica here became leader", c.leader_changes),
            (
                "partial_syncs_received",
                "Sync messages received that carried part of a new leader's decided log (--max-sync-bytes)",
                c.partial_syncs_received,
            ),
            (
                "votes_refused_oversized",
                "Votes refused because the candidate lacked more of the log than one message carries",
                votes_refused,
            ),
            ("rebuild_sent_bytes", "Block bytes streamed to rebuild other replicas", c.catchup_bytes_sent),
            ("rebuild_received_bytes", "Block bytes received to rebuild replicas here", c.catchup_bytes_received),
            (
                "rebuild_log_received_bytes",
                "Write bytes received in log entries by replicas here that are not voters yet",
                c.catchup_log_bytes_received,
            ),
            ("blocks_repaired", "Blocks repaired from a peer after a checksum failure", repaired),
            ("dropped_batches", "Outgoing batches dropped on full backlogs", outbox.dropped_batches),
            (
                "jitter_held_frames",
                "Frames from peers held back by the benchmark jitter (--jitter-us, --straggler-us)",
                jitter_held,
            ),
            (
                "wal_rewrites",
                "Replica logs rewritten at the head of the server's WAL because their entries kept its oldest segment",
                c.log_rewrites,
            ),
        ],
        chunk_gauges: vec![
            ("in_flight", "Frontend requests in progress", per_chunk(&|g| g.in_flight() as i64)),
            (
                "commit_lag",
                "Entries held above the committed watermark",
                per_chunk(&|g| (g.replica().last_index().0 - g.replica().committed_watermark().0) as i64),
            ),
            (
                "apply_lag",
                "Committed entries not yet applied",
                per_chunk(&|g| {
                    g.replica().committed_watermark().0.saturating_sub(g.replica().applied_watermark().0) as i64
                }),
            ),
            (
                "pending_list",
                "Entries the look-behind gate holds back",
                per_chunk(&|g| g.replica().pending_list_len() as i64),
            ),
            (
                "holes",
                "Indexes below the last one that this replica does not hold",
                per_chunk(&|g| g.replica().holes() as i64),
            ),
            (
                "follower_lag",
                "Leader: entries the furthest follower that keeps up lags behind the last index (flow control holds new writes at half a checkpoint)",
                per_chunk(&|g| g.replica().follower_lag() as i64),
            ),
            (
                "retained_entries",
                "Leader: entries under the checkpoint kept for followers that lack them",
                per_chunk(&|g| g.replica().retained_entries() as i64),
            ),
            (
                "proposals_held_by_lag",
                "Writes queued as leader only because a follower lagged (since start)",
                per_chunk(&|g| g.replica().proposals_held_by_lag() as i64),
            ),
            (
                "is_leader",
                "1 where this replica leads",
                per_chunk(&|g| (g.replica().role() == RoleKind::Leader) as i64),
            ),
            ("bad_blocks", "Blocks awaiting repair", per_chunk(&|g| g.repair_counts().0 as i64)),
            (
                "voters",
                "Voters of the configuration in force",
                per_chunk(&|g| g.replica().membership().voters.len() as i64),
            ),
            (
                "learners",
                "Learners (replicas being rebuilt) of the configuration in force",
                per_chunk(&|g| g.replica().membership().learners.len() as i64),
            ),
            (
                "config_index",
                "Log index of the configuration in force (0: the bootstrap placement)",
                per_chunk(&|g| g.replica().config_state().index.0 as i64),
            ),
            ("rebuild_streams_out", "Rebuild streams being sent", per_chunk(&|g| g.rebuild_streams().0 as i64)),
            ("rebuild_stream_in", "1 while a rebuild stream is received", per_chunk(&|g| g.rebuild_streams().1 as i64)),
        ],
        gauges: vec![
            (
                "rebuild_bytes_per_second",
                "Rebuild bytes (image sent and received, log received as a learner) per second, over the last metrics interval",
                rebuild_rate,
            ),
            ("wal_segments", "Segments of the server's write-ahead log", wal_segments as i64),
        ],
    };
    crate::metrics::render(&stages, &totals)
}

fn report(groups: &BTreeMap<u32, Group>, outbox: &Outbox) {
    for g in groups.values() {
        let r = g.replica();
        info!(
            chunk = g.chunk,
            role = ?r.role(),
            term = r.term().0,
            last = r.last_index().0,
            committed = r.committed_watermark().0,
            applied = r.applied_watermark().0,
            checkpoint = r.checkpoint_index().0,
            failed = g.failed.is_some(),
            "group"
        );
    }
    if outbox.dropped_batches > 0 {
        warn!(dropped = outbox.dropped_batches, "outgoing batches dropped on full backlogs so far");
    }
}

fn write_status(dir: &std::path::Path, groups: &BTreeMap<u32, Group>) {
    let mut text = String::new();
    for g in groups.values() {
        let r = g.replica();
        let role = if g.failed.is_some() { "Failed".to_string() } else { format!("{:?}", r.role()) };
        let (bad, repaired) = g.repair_counts();
        let list = |set: &std::collections::BTreeSet<ReplicaId>| {
            if set.is_empty() {
                "-".to_string()
            } else {
                set.iter().map(|r| r.0.to_string()).collect::<Vec<_>>().join(",")
            }
        };
        let m = r.membership();
        text.push_str(&format!(
            "{} {} {} {} {} {} {} {} {} {}\n",
            g.chunk,
            role,
            r.term().0,
            r.committed_watermark().0,
            r.applied_watermark().0,
            bad,
            repaired,
            list(&m.voters),
            list(&m.learners),
            r.checkpoint_index().0
        ));
    }
    let tmp = dir.join("status.tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("status"));
    }
}
