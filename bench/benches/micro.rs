//! Criterion micro-benchmarks that CI runs once with `--test` so they cannot rot: the core's
//! step throughput (a write proposed, persisted, committed and applied, on a single voter), the
//! same through three voters with ~30 writes in flight (what the leader's per-acknowledgement
//! work costs at depth, which a single voter never shows), the peer codec of an Append of 4 KiB
//! entries, and the NBD request parse / reply encode. (The look-behind
//! buffer's conflict check is `cargo bench -p lbb`.)

use bytes::{Bytes, BytesMut};
use chunkserver::nbd::proto::{structured_data_head, Request};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parallelraft::codec::{decode_message, decode_message_shared, encode_message};
use parallelraft::{
    ClientId, ClientRequest, Command, CommitNotice, Config, Entry, Event, Index, Message, Mode, Op, Replica, ReplicaId,
    RequestId, RoleKind, Term,
};

/// Runs every command a step produced as an instant, perfect disk would; returns the messages
/// it sent (a single voter sends none).
fn drive(replica: &mut Replica) -> Vec<(ReplicaId, Message)> {
    let mut events = Vec::new();
    let mut sent = Vec::new();
    loop {
        for command in replica.take_commands() {
            match command {
                Command::PersistEntries { token, .. } | Command::TruncateLog { token, .. } => {
                    events.push(Event::Persisted { token })
                }
                Command::Apply { entry } => events.push(Event::Applied { index: entry.index }),
                Command::Checkpoint { state } => events.push(Event::CheckpointDone { index: state.index }),
                Command::Send { to, message } => sent.push((to, message)),
                _ => {}
            }
        }
        if events.is_empty() {
            return sent;
        }
        for e in events.drain(..) {
            replica.step(e);
        }
    }
}

/// A single-voter group that has elected itself.
fn leader(mode: Mode) -> Replica {
    let mut r = Replica::new(Config::new(ReplicaId(1), vec![ReplicaId(1)], mode, 7));
    for _ in 0..1000 {
        r.step(Event::Tick);
        drive(&mut r);
        if r.role() == RoleKind::Leader {
            return r;
        }
    }
    panic!("a single voter did not elect itself");
}

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_write_path");
    group.throughput(Throughput::Elements(1));
    for mode in [Mode::Parallel, Mode::Raft] {
        let mut r = leader(mode);
        let data = Bytes::from(vec![7u8; 4096]);
        let mut seq = 0u64;
        let mut write = |r: &mut Replica| {
            seq += 1;
            let op = Op::Write { offset: (seq % 4096) * 4096, data: data.clone() };
            r.step(Event::Propose(ClientRequest { id: RequestId { client: ClientId(1), seq }, floor: seq, op }));
            drive(r);
        };
        // One write before measuring, so the check holds also when a filter skips this one.
        let before = r.applied_watermark();
        write(&mut r);
        assert!(r.applied_watermark() > before, "a write is applied");
        group.bench_function(BenchmarkId::from_parameter(format!("{mode:?}")), |b| b.iter(|| write(&mut r)));
    }
    group.finish();
}

/// Three voters with instant disks and an in-process network. Up to `held` of the followers'
/// acknowledgements wait in a queue and are delivered one by one, oldest first, as new writes
/// come in (about four a write: each follower acknowledges an append on arrival and again once
/// durable): so the leader keeps about `held / 4` writes in flight and hears one
/// acknowledgement at a time, as at iodepth 32 (a single voter never has more than one write in
/// flight).
struct Trio {
    replicas: Vec<Replica>,
    network: std::collections::VecDeque<(usize, usize, Message)>,
    acks: std::collections::VecDeque<(usize, usize, Message)>,
    held: usize,
}

impl Trio {
    fn new(mode: Mode, held: usize) -> Trio {
        let voters: Vec<ReplicaId> = (0..3).map(ReplicaId).collect();
        let replicas = (0..3)
            .map(|i| {
                Replica::new(Config {
                    lbb_span: 32,
                    ..Config::new(ReplicaId(i), voters.clone(), mode, 7 + u64::from(i))
                })
            })
            .collect();
        let mut t = Trio { replicas, network: Default::default(), acks: Default::default(), held };
        // Replica 0 campaigns first; the others hear it before their own timeouts.
        for _ in 0..1000 {
            t.step(0, Event::Tick);
            t.run(true);
            if t.replicas[0].role() == RoleKind::Leader {
                return t;
            }
        }
        panic!("replica 0 did not become leader");
    }

    fn step(&mut self, r: usize, event: Event) {
        self.replicas[r].step(event);
        for (to, message) in drive(&mut self.replicas[r]) {
            self.network.push_back((r, to.0 as usize, message));
        }
    }

    /// Delivers messages until quiet, but for the last `held` acknowledgements to the leader
    /// (none are held with `flush`).
    fn run(&mut self, flush: bool) {
        loop {
            if let Some((from, to, message)) = self.network.pop_front() {
                if to == 0 && matches!(message, Message::Ack { .. }) && !flush {
                    self.acks.push_back((from, to, message));
                    continue;
                }
                self.step(to, Event::Receive { from: ReplicaId(from as u32), message });
            } else if self.acks.len() > self.held || (flush && !self.acks.is_empty()) {
                let (from, to, message) = self.acks.pop_front().unwrap();
                self.step(to, Event::Receive { from: ReplicaId(from as u32), message });
            } else {
                return;
            }
        }
    }
}

fn bench_window(c: &mut Criterion) {
    let mut group = c.benchmark_group("cluster_write_window32");
    group.throughput(Throughput::Elements(1));
    for mode in [Mode::Parallel, Mode::Raft] {
        let mut t = Trio::new(mode, 120); // ~30 writes in flight (the LBB span allows 33)
        let data = Bytes::from(vec![7u8; 4096]);
        let mut seq = 0u64;
        let mut write = |t: &mut Trio| {
            seq += 1;
            let op = Op::Write { offset: (seq % 65_536) * 4096, data: data.clone() };
            t.step(0, Event::Propose(ClientRequest { id: RequestId { client: ClientId(1), seq }, floor: seq, op }));
            t.run(false);
        };
        // Fill the window, then check that writes commit while it stays full.
        for _ in 0..100 {
            write(&mut t);
        }
        let before = t.replicas[0].applied_watermark();
        for _ in 0..100 {
            write(&mut t);
        }
        assert!(t.replicas[0].applied_watermark() > before, "writes commit with the window full");
        group.bench_function(BenchmarkId::from_parameter(format!("{mode:?}")), |b| b.iter(|| write(&mut t)));
    }
    group.finish();
}

fn append(entries: usize) -> Message {
    let entries = (1..=entries as u64)
        .map(|i| Entry {
            index: Index(i),
            term: Term(3),
            ballot: Term(3),
            op: Op::Write { offset: i * 4096, data: Bytes::from(vec![i as u8; 4096]) },
            request: Some(RequestId { client: ClientId(9), seq: i }),
            floor: i,
            look_behind: lbb::LookBehind::unknown(2),
        })
        .collect();
    Message::Append { term: Term(3), entries, commit: CommitNotice { watermark: Index(0), above: vec![] } }
}

fn bench_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("peer_codec_append");
    for n in [1usize, 16] {
        let message = append(n);
        let mut buf = BytesMut::new();
        encode_message(&message, &mut buf);
        let encoded = buf.freeze();
        assert_eq!(decode_message(&encoded).unwrap(), message);
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", n), &message, |b, m| {
            let mut out = BytesMut::with_capacity(encoded.len());
            b.iter(|| {
                out.clear();
                encode_message(black_box(m), &mut out);
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, e| {
            b.iter(|| decode_message(black_box(e)).unwrap())
        });
        // As servers decode frames: payloads are slices of the frame, not copies.
        assert_eq!(decode_message_shared(&encoded).unwrap(), message);
        group.bench_with_input(BenchmarkId::new("decode_shared", n), &encoded, |b, e| {
            b.iter(|| decode_message_shared(black_box(e)).unwrap())
        });
    }
    group.finish();
}

fn bench_nbd(c: &mut Criterion) {
    let mut header = [0u8; 28];
    header[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    header[6..8].copy_from_slice(&1u16.to_be_bytes());
    header[8..16].copy_from_slice(&42u64.to_be_bytes());
    header[24..28].copy_from_slice(&4096u32.to_be_bytes());
    assert!(Request::parse(&header).is_ok());
    c.bench_function("nbd_request_parse", |b| b.iter(|| Request::parse(black_box(&header)).unwrap()));
    // The data of a read follows its head without a copy (see `chunkserver::outgoing`).
    let mut out = BytesMut::with_capacity(64);
    c.bench_function("nbd_structured_read_reply_head", |b| {
        b.iter(|| {
            out.clear();
            structured_data_head(&mut out, 42, 0, black_box(4096));
        })
    });
}

criterion_group!(benches, bench_step, bench_window, bench_codec, bench_nbd);
criterion_main!(benches);
