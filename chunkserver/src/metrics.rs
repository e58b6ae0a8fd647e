//! Latency per stage of the write and read paths (`hdrhistogram`), counters and gauges, and
//! their Prometheus text at `/metrics` (`prometheus-client`).
//!
//! Who records what:
//! - the NBD frontend: `nbd_write` / `nbd_read` (request header read → reply written) and
//!   `route` (piece sent to a chunk leader → its answer back, retries included);
//! - a chunk server's core thread: `queue` (frame read off a socket → stepped by the core),
//!   `core_round` (busy time of one loop iteration);
//! - a chunk group, for the requests it serves as leader: `leader_durable` (request arrived →
//!   its entry durable in the local WAL), `replicate_send` (arrived → the Append carrying it
//!   handed to the peer transport), `ack_received` (that send → the first follower
//!   acknowledgement covering it), `commit_wait` (durable → apply starts: replication, follower
//!   fdatasync, ack, commit, look-behind gate), `apply`, `leader_write` (arrival → reply) and
//!   `leader_read`; as a follower `follower_durable` (a leader's entries handed to the WAL →
//!   durable); for every group commit `wal_sync` (WAL write + fdatasync), and `checkpoint`
//!   (block store sync + checkpoint file, on the checkpoint thread).
//!
//! Hot paths only record into histograms owned by their thread; text is rendered a few
//! times a second and handed to the HTTP task, which never touches the histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    NbdWrite,
    NbdRead,
    Route,
    Queue,
    LeaderDurable,
    ReplicateSend,
    AckReceived,
    FollowerDurable,
    CommitWait,
    Apply,
    LeaderWrite,
    LeaderRead,
    WalSync,
    Checkpoint,
    CoreRound,
}

impl Stage {
    pub const ALL: [Stage; 15] = [
        Stage::NbdWrite,
        Stage::NbdRead,
        Stage::Route,
        Stage::Queue,
        Stage::LeaderDurable,
        Stage::ReplicateSend,
        Stage::AckReceived,
        Stage::FollowerDurable,
        Stage::CommitWait,
        Stage::Apply,
        Stage::LeaderWrite,
        Stage::LeaderRead,
        Stage::WalSync,
        Stage::Checkpoint,
        Stage::CoreRound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::NbdWrite => "nbd_write",
            Stage::NbdRead => "nbd_read",
            Stage::Route => "route",
            Stage::Queue => "queue",
            Stage::LeaderDurable => "leader_durable",
            Stage::ReplicateSend => "replicate_send",
            Stage::AckReceived => "ack_received",
            Stage::FollowerDurable => "follower_durable",
            Stage::CommitWait => "commit_wait",
            Stage::Apply => "apply",
            Stage::LeaderWrite => "leader_write",
            Stage::LeaderRead => "leader_read",
            Stage::WalSync => "wal_sync",
            Stage::Checkpoint => "checkpoint",
            Stage::CoreRound => "core_round",
        }
    }
}

/// Histograms of stage latencies in microseconds (1 µs .. 60 s, 2 significant digits).
#[derive(Clone, Default)]
pub struct Stages {
    hist: BTreeMap<Stage, Histogram<u64>>,
}

/// A stage's summary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

impl Stages {
    pub fn record(&mut self, stage: Stage, d: Duration) {
        let h = self
            .hist
            .entry(stage)
            .or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds"));
        h.saturating_record((d.as_micros() as u64).max(1));
    }

    /// Adds another set of histograms (a group's into the server's).
    pub fn merge(&mut self, other: &Stages) {
        for (stage, h) in &other.hist {
            match self.hist.get_mut(stage) {
                Some(mine) => {
                    let _ = mine.add(h);
                }
                None => {
                    self.hist.insert(*stage, h.clone());
                }
            }
        }
    }

    pub fn summary(&self, stage: Stage) -> Option<Summary> {
        let h = self.hist.get(&stage).filter(|h| !h.is_empty())?;
        Some(Summary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabel {
    stage: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChunkLabel {
    chunk: String,
}

/// A per-chunk gauge: name, help, (chunk, value) pairs.
pub type ChunkGauge = (&'static str, &'static str, Vec<(u32, i64)>);

/// Totals a process reports next to its stages.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// (name, help, value): monotonic counters (exposed with a `_total` suffix).
    pub counters: Vec<(&'static str, &'static str, u64)>,
    /// (name, help, per-chunk values): gauges.
    pub chunk_gauges: Vec<ChunkGauge>,
    /// (name, help, value): process-wide gauges.
    pub gauges: Vec<(&'static str, &'static str, i64)>,
}

/// The Prometheus text of `stages` and `totals`.
pub fn render(stages: &Stages, totals: &Totals) -> String {
    let mut registry = Registry::with_prefix("parallelraft");
    let quantiles = Family::<QuantileLabel, Gauge<f64, AtomicU64>>::default();
    let counts = Family::<StageLabel, Counter>::default();
    let sums = Family::<StageLabel, Counter<f64, AtomicU64>>::default();
    for stage in Stage::ALL {
        let Some(s) = stages.summary(stage) else { continue };
        for (q, v) in [("0.5", s.p50_us), ("0.99", s.p99_us), ("0.999", s.p999_us)] {
            quantiles.get_or_create(&QuantileLabel { stage: stage.name().into(), quantile: q.into() }).set(v as f64);
        }
        let label = StageLabel { stage: stage.name().into() };
        counts.get_or_create(&label).inc_by(s.count);
        sums.get_or_create(&label).inc_by(s.mean_us * s.count as f64);
    }
    registry.register("stage_latency_us", "Latency of a stage of the I/O path, microseconds", quantiles);
    registry.register("stage_count", "Events recorded per stage", counts);
    registry.register("stage_latency_us_sum", "Sum of a stage's latencies, microseconds", sums);
    for (name, help, value) in &totals.counters {
        let c = Counter::<u64>::default();
        c.inc_by(*value);
        registry.register(*name, *help, c);
    }
    for (name, help, value) in &totals.gauges {
        let g = Gauge::<i64>::default();
        g.set(*value);
        registry.register(*name, *help, g);
    }
    for (name, help, values) in &totals.chunk_gauges {
        let family = Family::<ChunkLabel, Gauge>::default();
        for (chunk, v) in values {
            family.get_or_create(&ChunkLabel { chunk: chunk.to_string() }).set(*v);
        }
        registry.register(*name, *help, family);
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

/// The latest rendered text, shared with the HTTP task.
pub type Published = Arc<Mutex<String>>;

/// Serves `GET /metrics` with the latest published text until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, text: Published) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let text = text.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            // The request line and headers; bodies are not expected.
            let request = loop {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[got..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(n)) => got += n,
                }
                let seen = String::from_utf8_lossy(&buf[..got]).to_string();
                if seen.contains("\r\n\r\n") || seen.contains("\n\n") || got == buf.len() {
                    break seen;
                }
            };
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if request.starts_with("GET ") && (path == "/metrics" || path == "/") {
                ("200 OK", text.lock().unwrap().clone())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let mut reply = String::new();
            let _ = write!(
                reply,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = stream.write_all(reply.as_bytes()).await {
                debug!("metrics reply: {e}");
            }
        });
    }
}

/// Binds the metrics port and spawns [`serve`] on the current runtime. A busy port is
/// reported and the process goes on without metrics (they are an aid, not a duty).
pub fn spawn(addr: std::net::SocketAddr, text: Published) {
    match std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    }) {
        Ok(listener) => {
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            tokio::spawn(serve(listener, text));
        }
        Err(e) => warn!(%addr, "metrics not served: {e}"),
    }
}

/// Parses the stage quantiles out of a `/metrics` text: stage → (p50, p99, p99.9, count).
pub fn parse_stages(text: &str) -> BTreeMap<String, (f64, f64, f64, u64)> {
    let mut out: BTreeMap<String, (f64, f64, f64, u64)> = BTreeMap::new();
    for line in text.lines() {
        let Some((head, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let label = |key: &str| {
            let start = head.find(&format!("{key}=\""))? + key.len() + 2;
            let end = head[start..].find('"')? + start;
            Some(head[start..end].to_string())
        };
        let Some(stage) = label("stage") else { continue };
        let e = out.entry(stage).or_insert((f64::NAN, f64::NAN, f64::NAN, 0));
        if head.starts_with("parallelraft_stage_latency_us{") {
            match label("quantile").as_deref() {
                Some("0.5") => e.0 = value,
                Some("0.99") => e.1 = value,
                Some("0.999") => e.2 = value,
                _ => {}
            }
        } else if head.starts_with("parallelraft_stage_count_total{") {
            e.3 = value as u64;
        }
    }
    out
}

/// The sum of a metric over its label sets (`name` without the `parallelraft_` prefix): a
/// per-chunk gauge over all chunks, or a counter (its `_total` name). 0 when absent.
pub fn sum_of(text: &str, name: &str) -> f64 {
    let full = format!("parallelraft_{name}");
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(head, _)| *head == full || head.strip_prefix(full.as_str()).is_some_and(|rest| rest.starts_with('{')))
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_render_as_prometheus_text_and_parse_back() {
        let mut a = Stages::default();
        for us in [100u64, 200, 300, 400, 10_000] {
            a.record(Stage::WalSync, Duration::from_micros(us));
        }
        let mut b = Stages::default();
        b.record(Stage::WalSync, Duration::from_micros(250));
        b.record(Stage::Apply, Duration::from_micros(30));
        a.merge(&b);
        let s = a.summary(Stage::WalSync).unwrap();
        assert_eq!(s.count, 6);
        assert!((249..=251).contains(&s.p50_us), "{s:?}");
        assert!(a.summary(Stage::Route).is_none());
        let totals = Totals {
            counters: vec![("writes", "writes served", 7)],
            chunk_gauges: vec![("inflight", "requests in flight", vec![(0, 3), (1, 0)])],
            gauges: vec![("rebuild_bytes_per_second", "rate", 4096)],
        };
        let text = render(&a, &totals);
        assert!(text.contains("parallelraft_stage_latency_us{stage=\"wal_sync\",quantile=\"0.5\"}"), "{text}");
        assert!(text.contains("parallelraft_writes_total 7"), "{text}");
        assert!(text.contains("parallelraft_inflight{chunk=\"0\"} 3"), "{text}");
        assert!(text.contains("parallelraft_rebuild_bytes_per_second 4096"), "{text}");
        let parsed = parse_stages(&text);
        let (p50, _, _, count) = parsed["wal_sync"];
        assert!((249.0..=251.0).contains(&p50));
        assert_eq!(count, 6);
        assert_eq!(parsed["apply"].3, 1);
        assert_eq!(sum_of(&text, "inflight"), 3.0, "summed over chunks");
        assert_eq!(sum_of(&text, "writes_total"), 7.0);
        assert_eq!(sum_of(&text, "writes"), 0.0, "a prefix of another name is not that name");
        assert_eq!(sum_of(&text, "absent_total"), 0.0);
    }
}
