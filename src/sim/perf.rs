//! The perf model: the simulator as a benchmark of the protocol alone. One client keeps
//! `iodepth` writes of one 4 KiB block outstanding over a large volume (so conflicts are rare,
//! as with fio's random writes); every message takes a fixed delay, plus, between replicas, a
//! random jitter and rare stragglers; every disk write takes a fixed time; nothing else costs
//! anything. So the comparison of the two modes shows what ordering costs, free of the CPU
//! limits of a real run on a small machine (where both modes run out of CPU first).
//!
//! Time: the simulator's unit is read as 10 µs here (a tick, `TICK` units, is 100 µs); the
//! replicas' election timeout is raised far above every delay the model draws, so nothing but
//! the workload happens.

use crate::config::{Config, Mode};
use crate::rng::Rng;

use super::{run, SimConfig};

/// Microseconds per simulated time unit in this model.
pub const UNIT_US: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerfModel {
    /// Writes the client keeps outstanding.
    pub iodepth: usize,
    /// Delay of every message (client and replicas), in units.
    pub net: u64,
    /// Plus, between replicas, a uniform `0..=jitter` units (reordering).
    pub jitter: u64,
    /// Plus, between replicas, `straggler` units on one message in `1000 / straggler_per_mille`.
    pub straggler: u64,
    pub straggler_per_mille: u64,
    /// Time of a durable write (WAL append, checkpoint), in units.
    pub disk: u64,
    /// Time of applying one entry (a buffered write into the block file), in units.
    pub apply: u64,
    /// The leader's in-flight window in entries (`Config::in_flight_window`).
    pub window: u64,
    /// Rounds as the servers run them (`SimConfig::batch_rounds`): the writes and
    /// acknowledgements a replica receives within a round (0-2 units, up to 20 µs) go out as
    /// one append per follower, so one straggling message holds all of them.
    pub batch: bool,
}

/// The chunk servers' in-flight window (their `DEFAULT_WINDOW`, which a test there checks
/// against this).
pub const SERVER_WINDOW: u64 = 512;

impl PerfModel {
    /// Delays like the engine's on this machine (stage profile, iodepth 1): a 30 µs hop, a
    /// 180 µs durable WAL append, a 10 µs apply; jitter and stragglers off; the servers' window.
    pub fn new(iodepth: usize) -> PerfModel {
        PerfModel {
            iodepth,
            net: 3,
            jitter: 0,
            straggler: 0,
            straggler_per_mille: 0,
            disk: 18,
            apply: 1,
            window: SERVER_WINDOW,
            batch: false,
        }
    }

    /// The same with the servers' rounds (see [`PerfModel::batch`]).
    pub fn with_batching(self) -> PerfModel {
        PerfModel { batch: true, ..self }
    }

    /// The same with an in-flight window of `entries`.
    pub fn with_window(self, entries: u64) -> PerfModel {
        PerfModel { window: entries, ..self }
    }

    /// The bench harness's `-jitter` targets: 0-2 ms between chunk servers.
    pub fn with_jitter(self) -> PerfModel {
        PerfModel { jitter: 200, ..self }
    }

    /// The bench harness's `-straggler` targets: one message in 50 held 20 ms.
    pub fn with_stragglers(self) -> PerfModel {
        PerfModel { straggler: 2000, straggler_per_mille: 20, ..self }
    }

    pub(super) fn configure(&self, c: &mut Config) {
        // 50 ms election timeouts and a heartbeat each millisecond: far above every delay drawn
        // (a straggler is 20 ms), so no election interrupts the measurement.
        c.election_timeout_min_ticks = 500;
        c.heartbeat_interval_ticks = 10;
        c.in_flight_window = Some(self.window);
    }

    pub(super) fn message_delay(&self, between_replicas: bool, rng: &mut Rng) -> u64 {
        let mut delay = self.net;
        if between_replicas {
            if self.jitter > 0 {
                delay += rng.range(0, self.jitter + 1);
            }
            if self.straggler_per_mille > 0 && rng.range(0, 1000) < self.straggler_per_mille {
                delay += self.straggler;
            }
        }
        delay.max(1)
    }

    /// Nothing is lost, so a client never needs to resend.
    pub(super) fn client_retry(&self) -> u64 {
        u64::MAX / 4
    }
}

/// What one perf run measured, over the writes invoked after the first answer (the first
/// election is not part of it).
#[derive(Clone, Debug, PartialEq)]
pub struct PerfResult {
    pub writes: usize,
    /// Writes per second of simulated time.
    pub iops: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Snapshots installed by followers: catch-up from the block image, which costs nothing in
    /// this model and a rebuild (the chunk's blocks streamed) on the servers.
    pub snapshots: u64,
}

/// Runs `ops` writes through a three-replica group in `mode` under `model`; the checkers run as
/// in every simulation, and a violation is an error.
pub fn measure(mode: Mode, model: PerfModel, ops: u64, seed: u64) -> Result<PerfResult, String> {
    let mut cfg = SimConfig::new(seed, 3, mode);
    cfg.faults = false;
    cfg.perf = Some(model);
    cfg.batch_rounds = model.batch;
    cfg.clients = 1;
    cfg.ops_per_client = ops;
    cfg.volume_blocks = 1 << 16;
    // As the servers run: each entry describes its 32 predecessors (the leader's window is the
    // model's).
    cfg.lbb_span = 32;
    cfg.checkpoint_interval = 4096;
    cfg.fault_time = 0;
    cfg.liveness_time = 100_000_000;
    let report = run(&cfg);
    if !report.passed() {
        return Err(format!("seed {seed}: {}", report.violations.join("; ")));
    }
    let writes = &report.stats.writes;
    let Some(&(_, first_reply)) = writes.first() else {
        return Err("no write was answered".into());
    };
    let mut latencies: Vec<u64> =
        writes.iter().filter(|(invoked, _)| *invoked >= first_reply).map(|(i, r)| r - i).collect();
    let last_reply = writes.last().map_or(first_reply, |w| w.1);
    if latencies.is_empty() || last_reply == first_reply {
        return Err(format!("too few writes ({}) to measure", writes.len()));
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] * UNIT_US;
    Ok(PerfResult {
        writes: latencies.len(),
        iops: latencies.len() as f64 / ((last_reply - first_reply) * UNIT_US) as f64 * 1e6,
        p50_us: at(0.5),
        p99_us: at(0.99),
        snapshots: report.stats.snapshots_installed,
    })
}
